"""rlt's batched reward equals the per-sample oracle on tiny-model completions."""
import random

import pytest
import torch

from rlt.testing.reward_oracle import oracle_reward
from rlt.data.formats import resolve_format
from rlt.data.loading import load_examples
from rlt.data.text import teacher_prompt
from rlt.rewards.config import RewardConfig
from rlt.rewards.teacher_reward import RewardInput, TeacherReward

FMT = resolve_format("bespoke_stratos")
E1 = "<|end_of_explanation|>"


@pytest.fixture(scope="module")
def models(tiny_path):
    from rlt.models import load_causal_lm

    return load_causal_lm(tiny_path, "float32").eval(), load_causal_lm("rlt-tiny:1", "float32").eval()


def make_cases(tokenizer, teacher, n_sampled=40, seed=0):
    """Sampled completions plus hand-made edge cases."""
    exs = load_examples("rlt-countdown:8:2", FMT)
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    cases = []
    for k in range(n_sampled):
        ex = exs[k % len(exs)]
        prompt = teacher_prompt(tokenizer, ex.question, ex.solution, FMT)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        torch.manual_seed(seed * 1000 + k)
        out = teacher.generate(ids, do_sample=True, max_new_tokens=rng.randint(5, 60), temperature=1.0,
                               pad_token_id=tokenizer.pad_token_id)
        comp = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        if k % 3 == 0:  # end tag somewhere, sometimes with text after it
            cut = rng.randint(0, len(comp))
            comp = comp[:cut] + E1 + (comp[cut:] if k % 2 else "")
        cases.append(RewardInput(prompt, comp, ex.question, ex.solution, ex.system))
    ex = exs[0]
    prompt = teacher_prompt(tokenizer, ex.question, ex.solution, FMT)
    special = [
        (ex.solution, "Step 1: add.\n\nStep 2: multiply.\n\n" + E1),  # "\n\n" boundaries
        (ex.solution, E1),                                            # empty thought
        (ex.solution, E1 + "\n\ntrailing text after the tag"),       # text after the end tag
        (ex.solution, "no end tag at all"),                           # no end tag
        (ex.solution, "Schritt 1: 3 × 4 = 12 ✓ 日本語\n\n" + E1),     # unicode
        ("(3 + 4) * 2", "Group first.\n\n" + E1),                     # solution merging with its tags
        ("|>.5", "Half.\n\n" + E1 + "more"),
        ("\n\n\\boxed{\\frac{1}{2}}\n\n", "\n\n" + E1),
        (ex.solution, "A" + E1 + "B" + E1),                           # first end tag wins
    ]
    for sol, comp in special:
        cases.append(RewardInput(teacher_prompt(tokenizer, ex.question, sol, FMT), comp, ex.question, sol, ex.system))
    return cases


CONFIGS = {
    "paper": {},
    # no clips here: after "exp" a log-prob is > 0 > -clip_log_prob, and after "exp_norm" the near-uniform tiny
    # student's -log p gives 1 - p, about 0.999, above any clip_kl that binds only sometimes ("clips" below)
    "variants": dict(use_schulman_kl_estimation=True, normalize_log_prob_fn="exp", normalize_kl_fn="exp_norm",
                     reduction_log_prob_fn=["median", "first_quartile", "sum"],
                     answer_log_prob_coeff=[1, 0.5, 0.01], reduction_kl_fn=["last_quartile", "min"],
                     kl_penalty_reward_coeff=[2, 0.1], include_teacher_think_entropy=False,
                     unbias_student_log_probs_temp=None, unbias_teacher_log_probs=False,
                     reward_micro_batch_size=3, reward_logit_chunk_size=7, reward_vocab_chunk_size=100),
    # clip_log_prob and clip_kl are set in the test at the cases' median token values, so that they bind on
    # about half of the tokens (a fixed value would clip all or none of a random tiny model's tokens)
    "clips": dict(reduction_log_prob_fn=["mean", "min"], answer_log_prob_coeff=[1, 0.5],
                  reduction_kl_fn=["mean", "max"], kl_penalty_reward_coeff=[1, 0.5], reward_micro_batch_size=4),
}


def binding_clips(unclipped: dict, cfg: dict) -> dict:
    """``cfg`` with clip_log_prob / clip_kl at the median over the cases of each one's median solution log-prob /
    thought KL token (``unclipped``: the reward's components without the clips)."""
    lp, kl = unclipped["solution_log_prob/median"], unclipped["thought_kl/median"]
    assert lp.isfinite().sum() >= len(lp) // 2 and kl.isfinite().sum() >= len(kl) // 2   # spans to clip
    return {**cfg, "clip_log_prob": -lp[lp.isfinite()].median().item(), "clip_kl": kl[kl.isfinite()].median().item()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rlt_matches_oracle(tokenizer, models, name):
    teacher, student = models
    cases = make_cases(tokenizer, teacher, n_sampled=42 if name == "paper" else 12)
    assert len(cases) >= (50 if name == "paper" else 20)
    settings = CONFIGS[name]
    if name == "clips":
        plain = TeacherReward(student, tokenizer, FMT, RewardConfig(**settings), 0.7)(teacher, cases).components
        settings = binding_clips(plain, settings)
    cfg = RewardConfig(**settings)
    res = TeacherReward(student, tokenizer, FMT, cfg, teacher_temperature=0.7)(teacher, cases)
    if name == "clips":   # each clip changes the terms it applies to, for most cases
        for key in ("r_ss", "r_kl"):
            changed = (res.components[key] - plain[key]).abs() > 1e-6
            assert changed.sum() >= len(cases) // 2, (key, changed.tolist())
    # every compared term depends on the case (with "clips" -log p of the thought, about 7, is always above the
    # KL-sized clip_kl: the no-entropy term is clipped flat there, and compared unclipped in the other two)
    for key in ("r_ss", "r_kl") + (("r_kl_no_entropy",) if name != "clips" else ()):
        assert res.components[key].unique().numel() > len(cases) // 2, key
    kinds = {"no_tag": 0, "after_tag": 0}
    for i, item in enumerate(cases):
        ref = oracle_reward(teacher, student, tokenizer, FMT, cfg, 0.7, item)
        for key in ("reward", "r_ss", "r_kl", "r_kl_no_entropy", "match_penalty", "thought_tokens", "solution_tokens"):
            got = res.components[key][i].item()
            assert got == pytest.approx(ref[key], abs=1e-5), (i, key, item.completion[:80])
        kinds["no_tag"] += E1 not in item.completion
        kinds["after_tag"] += E1 in item.completion and not item.completion.endswith(E1)
    assert kinds["no_tag"] >= 5 and kinds["after_tag"] >= 3
    assert (res.components["match_penalty"] == -1).sum() == kinds["no_tag"]
    assert res.components["no_end_tag"].tolist() == [float(E1 not in c.completion) for c in cases]
    # with this tokenizer every student thought token has its teacher twin (the pairing is unit-tested below)
    assert res.components["misaligned_thought_tokens"].tolist() == [0.0] * len(cases)


def test_align_spans_counts_student_tokens_without_a_teacher_twin():
    from rlt.rewards.spans import Encoded, align_spans

    # teacher: "ab|cd" as [ab][cd]; student: the same text as [a][bcd] except the shared [cd]-free part
    teacher = Encoded(ids=[9, 1, 2], offsets=[(0, 3), (3, 5), (5, 7)])   # prompt token, "ab", "cd"
    student = Encoded(ids=[7, 5, 6, 2], offsets=[(0, 10), (10, 11), (11, 12), (12, 14)])  # "a", "b", "cd"
    pt, ps, missing = align_spans(teacher, [1, 2], 3, student, [1, 2, 3], 10)
    assert (pt, ps, missing) == ([2], [3], 2)  # only "cd" pairs (same id, same relative range)


def test_empty_thought_and_solution_spans_get_penalties(tokenizer, models):
    teacher, student = models
    ex = load_examples("rlt-countdown:1:0", FMT)[0]
    prompt = teacher_prompt(tokenizer, ex.question, ex.solution, FMT)
    res = TeacherReward(student, tokenizer, FMT, RewardConfig(), 0.7)(
        teacher, [RewardInput(prompt, E1, ex.question, ex.solution, ex.system)])
    assert res.components["thought_tokens"].item() == 0
    # empty thought span: every KL reduction is NaN -> -not_matched_penalty = +1 each
    assert res.components["r_kl"].item() == pytest.approx(3 * 1 + 0.03 * 1)
    # the no-entropy variant's term is a penalty too (the reference's +pen fill would make it -3.03, a bonus)
    assert res.components["r_kl_no_entropy"].item() == pytest.approx(3 * 1 + 0.03 * 1)
    assert res.components["reward_no_entropy"].item() == pytest.approx(res.components["reward_full_kl"].item())
    # a missing end tag is counted even when it costs nothing (no_end_tag_frac is its batch mean)
    res = TeacherReward(student, tokenizer, FMT, RewardConfig(not_matched_penalty=0.0), 0.7)(
        teacher, [RewardInput(prompt, "no tag here", ex.question, ex.solution, ex.system)])
    assert res.components["match_penalty"].item() == 0 and res.components["no_end_tag"].item() == 1
    # empty solution span: every solution reduction is NaN -> -not_matched_penalty, times (1 + 0.01)
    res = TeacherReward(student, tokenizer, FMT, RewardConfig(), 0.7)(
        teacher, [RewardInput(teacher_prompt(tokenizer, ex.question, "", FMT), "Add.\n\n" + E1, ex.question, "",
                              ex.system)])
    assert res.components["solution_tokens"].item() == 0 and res.components["thought_tokens"].item() > 0
    assert res.components["r_ss"].item() == pytest.approx(-1.01)


def test_oracle_feeds_ids_on_the_models_device():
    # the GPU run found the oracle sending CPU token ids to a CUDA model; a meta-device model stands in here
    from rlt.testing.reward_oracle import _full_logprobs

    class Seen(Exception):
        pass

    class MetaModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(1, device="meta"))

        def forward(self, input_ids):
            raise Seen(input_ids.device)

    with pytest.raises(Seen) as seen:
        _full_logprobs(MetaModel(), [1, 2, 3], 1.0)
    assert seen.value.args[0] == torch.device("meta")
