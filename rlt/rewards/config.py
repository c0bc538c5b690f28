"""Reward settings (upstream key names) and their validation."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rlt.config import ConfigError
from rlt.rewards.ops import NORMALIZERS, REDUCTIONS


# The reward settings' defaults, for the command-line tools (runs compose them through Hydra).
REWARD_CFG_YAML = Path(__file__).resolve().parents[2] / "cfgs" / "trainer_cfg" / "reward_cfg" / "teacher_reward.yaml"


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


@dataclasses.dataclass
class RewardConfig:
    """r = r_SS - r_KL + match penalty (see README "Teacher reward")."""

    answer_log_prob_coeff: Any = (1.0, 0.01)
    kl_penalty_reward_coeff: Any = (3.0, 0.03)
    normalize_log_prob_fn: str | None = None
    clip_log_prob: float | None = None
    normalize_kl_fn: str | None = None
    clip_kl: float | None = None
    reduction_log_prob_fn: Any = ("mean", "min")
    reduction_kl_fn: Any = ("mean", "max")
    use_schulman_kl_estimation: bool = False
    not_matched_penalty: float = -1.0
    unbias_teacher_log_probs: bool = True
    unbias_student_log_probs_temp: float | None = 0.7
    include_teacher_think_entropy: bool = True
    reward_micro_batch_size: int = 4
    reward_logit_chunk_size: int = 1024
    reward_vocab_chunk_size: int = 4096

    def __post_init__(self):
        self.reduction_log_prob_fn = [str(r).lower() for r in _as_list(self.reduction_log_prob_fn)]
        self.reduction_kl_fn = [str(r).lower() for r in _as_list(self.reduction_kl_fn)]
        self.answer_log_prob_coeff = [float(c) for c in _as_list(self.answer_log_prob_coeff)]
        self.kl_penalty_reward_coeff = [float(c) for c in _as_list(self.kl_penalty_reward_coeff)]
        for coeff, red in (("answer_log_prob_coeff", "reduction_log_prob_fn"), ("kl_penalty_reward_coeff", "reduction_kl_fn")):
            c, r = getattr(self, coeff), getattr(self, red)
            bad = [x for x in r if x not in REDUCTIONS]
            if bad:
                raise ConfigError(f"{red}: unknown reduction(s) {bad}; choose from {list(REDUCTIONS)}")
            if len(c) != len(r):
                raise ConfigError(f"{coeff} has {len(c)} value(s) {c} but {red} has {len(r)} reduction(s) {r}; "
                                  "give one coefficient per reduction")
        for key in ("normalize_log_prob_fn", "normalize_kl_fn"):
            if getattr(self, key) not in NORMALIZERS:
                raise ConfigError(f"{key}={getattr(self, key)!r}: choose from {list(NORMALIZERS)}")
        t = self.unbias_student_log_probs_temp
        if t is not None and t <= 0:
            raise ConfigError(f"unbias_student_log_probs_temp={t} must be > 0 (or null for 1)")
        for key in ("reward_micro_batch_size", "reward_logit_chunk_size", "reward_vocab_chunk_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1")

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "RewardConfig":
        """Take the reward keys out of a flat config (other keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})

    @property
    def student_temperature(self) -> float:
        return 1.0 if self.unbias_student_log_probs_temp is None else float(self.unbias_student_log_probs_temp)
