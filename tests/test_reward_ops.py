"""Reward math on hand-computed numbers."""
import math

import pytest
import torch

from rlt.config import ConfigError
from rlt.rewards.config import RewardConfig
from rlt.rewards.ops import kl_estimate, masked_reduce, normalize, reduce_all, weighted_scores
from rlt.rewards.teacher_reward import combine

X = torch.tensor([[1.0, 4.0, 2.0, 8.0], [3.0, -1.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
M = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize("op,row0,row1", [
    ("mean", 7 / 3, 1.0), ("sum", 7.0, 2.0), ("min", 1.0, -1.0), ("max", 4.0, 3.0),
    ("median", 2.0, -1.0),          # lower middle value for an even count
    ("first_quartile", 1.5, 0.0),   # [1,2,4]: index 0.5 -> 1.5; [-1,3]: -1 + 0.25*4
    ("last_quartile", 3.0, 2.0),    # [1,2,4]: index 1.5 -> 3;   [-1,3]: -1 + 0.75*4
])
def test_reductions(op, row0, row1):
    out = masked_reduce(X, M, op)
    assert out[0].item() == pytest.approx(row0) and out[1].item() == pytest.approx(row1)
    assert math.isnan(out[2].item())  # empty span -> NaN
    empty = masked_reduce(torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.bool), op)  # no span column at all
    assert empty.shape == (3,) and empty.isnan().all()


def test_unknown_reduction_and_normalizer():
    with pytest.raises(ValueError, match="unknown reduction 'avg'"):
        masked_reduce(X, M, "avg")
    with pytest.raises(ValueError, match="unknown normalizer"):
        normalize(X, "log")


def test_normalizers():
    x = torch.tensor([0.0, math.log(2.0)])
    assert normalize(x, None).tolist() == x.tolist()
    assert normalize(x, "exp").tolist() == pytest.approx([1.0, 2.0])
    assert normalize(x, "exp_norm").tolist() == pytest.approx([0.0, 0.5])


def test_kl_estimators():
    t, s = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0])
    assert kl_estimate(t, s).tolist() == [1.0, 0.0]
    assert kl_estimate(t, s, schulman=True).tolist() == pytest.approx([math.exp(-1), 0.0])


def test_weighted_scores_replace_nan():
    scores = torch.tensor([[2.0, float("nan")], [float("nan"), float("nan")]])
    assert weighted_scores(scores, torch.tensor([1.0, 0.5]), nan_fill=-1.0).tolist() == [1.5, -1.5]


def toy(cfg, match=0.0, sol_mask=(1, 1, 1)):
    """3 solution tokens with student log-probs -1, -2, -3; 2 thought tokens with
    student log-probs -2, -1 and teacher log-probs -1, -1 (so k1 KL = 1, 0)."""
    return combine(cfg, torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([sol_mask], dtype=torch.bool),
                   torch.tensor([[-2.0, -1.0]]), torch.tensor([[-1.0, -1.0]]), torch.tensor([[True, True]]),
                   torch.tensor([match]))


def test_full_reward_on_a_3_token_toy():
    c = toy(RewardConfig())  # paper: a=[1, .01] on [mean, min]; lambda=[3, .03] on [mean, max]
    # r_SS = 1*(-2) + 0.01*(-3) = -2.03 ; r_KL = 3*0.5 + 0.03*1 = 1.53
    assert c["r_ss"].item() == pytest.approx(-2.03)
    assert c["r_kl"].item() == pytest.approx(1.53)
    assert c["reward"].item() == pytest.approx(-3.56)
    # no-entropy variant: -student lp = [2, 1] -> 3*1.5 + 0.03*2 = 4.56
    assert c["reward_no_entropy"].item() == pytest.approx(-2.03 - 4.56)
    assert toy(RewardConfig(include_teacher_think_entropy=False))["reward"].item() == pytest.approx(-6.59)
    assert toy(RewardConfig(), match=-1.0)["reward"].item() == pytest.approx(-4.56)
    assert c["r_ss/min"].item() == pytest.approx(-0.03) and c["r_kl/max"].item() == pytest.approx(0.03)
    assert c["solution_log_prob/median"].item() == -2.0 and c["thought_kl/mean"].item() == 0.5


def test_toy_empty_solution_uses_penalty_and_clip_and_normalizers():
    c = toy(RewardConfig(), sol_mask=(0, 0, 0))
    assert c["r_ss"].item() == pytest.approx(-1.01)  # NaN -> not_matched_penalty for each reduction
    # clip below at -clip_log_prob: [-1, -2, -3] -> [-1, -1.5, -1.5]; mean -4/3, min -1.5
    c = toy(RewardConfig(clip_log_prob=1.5))
    assert c["r_ss"].item() == pytest.approx(-4 / 3 - 0.015)
    # exp normalizer on the solution; exp_norm then clip on the KL; Schulman KL
    e = math.exp
    k3 = e(-1)  # schulman KL of k1=1: 1 - 1 + e^-1; of k1=0: 0
    for clip, want in ((None, 1 - e(-k3)), (0.2, 0.2)):  # max KL 0.308 after exp_norm: clipped to 0.2
        c = toy(RewardConfig(normalize_log_prob_fn="exp", normalize_kl_fn="exp_norm", clip_kl=clip,
                             use_schulman_kl_estimation=True, answer_log_prob_coeff=1.0, reduction_log_prob_fn="mean",
                             kl_penalty_reward_coeff=[1.0], reduction_kl_fn=["max"]))
        assert c["r_ss"].item() == pytest.approx((e(-1) + e(-2) + e(-3)) / 3)
        assert c["r_kl"].item() == pytest.approx(want)


def test_reward_config_validation():
    with pytest.raises(ConfigError, match="answer_log_prob_coeff has 1 value"):
        RewardConfig(answer_log_prob_coeff=[1.0], reduction_log_prob_fn=["mean", "min"])
    with pytest.raises(ConfigError, match="kl_penalty_reward_coeff has 3 value"):
        RewardConfig(kl_penalty_reward_coeff=[1, 2, 3])
    with pytest.raises(ConfigError, match="unknown reduction"):
        RewardConfig(reduction_kl_fn=["mean", "avg"])
    with pytest.raises(ConfigError, match="normalize_kl_fn"):
        RewardConfig(normalize_kl_fn="softplus")
    with pytest.raises(ConfigError, match="unbias_student_log_probs_temp"):
        RewardConfig(unbias_student_log_probs_temp=0)
    assert RewardConfig(kl_penalty_reward_coeff=[0, 0]).kl_penalty_reward_coeff == [0.0, 0.0]
