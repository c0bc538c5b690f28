"""The reward concern's settings (upstream key names, paper values) and their validation."""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from rlt.errors import ConfigError
from rlt.rewards.ops import NORMALIZERS, REDUCTIONS

PACKINGS = ("auto", "packed", "padded")                # reward_packing choices (rlt.rewards.logprobs)
LOGPROB_BACKENDS = ("auto", "online", "rowchunk", "fused")   # reward_logprob_backend choices


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


@dataclasses.dataclass
class RewardConfig:
    """r = r_SS - r_KL + match penalty (README "Teacher reward"), scored by a frozen student."""

    student_model: str | None = field(default=None, metadata={
        "help": "frozen student that scores explanations (path, hub id or rlt-tiny:SEED); required wherever the "
                "reward runs, never replaced by the reference model"})
    use_reference_teacher_model: bool = field(default=False, metadata={
        "help": "teacher log-probs from the reference model instead of the current policy (RL)"})
    answer_log_prob_coeff: Any = field(default_factory=lambda: [1.0, 0.01], metadata={
        "help": "alpha: one weight per reduction_log_prob_fn entry"})
    reduction_log_prob_fn: Any = field(default_factory=lambda: ["mean", "min"], metadata={
        "help": f"reductions of the solution log-probs, from {list(REDUCTIONS)}"})
    normalize_log_prob_fn: str | None = field(default=None, metadata={
        "help": "transform of the solution log-probs: null | exp | exp_norm"})
    clip_log_prob: float | None = field(default=None, metadata={
        "help": "clip solution log-probs below -clip_log_prob (null: no clip)"})
    kl_penalty_reward_coeff: Any = field(default_factory=lambda: [3.0, 0.03], metadata={
        "help": "lambda: one weight per reduction_kl_fn entry"})
    reduction_kl_fn: Any = field(default_factory=lambda: ["mean", "max"], metadata={
        "help": f"reductions of the per-token thought KL, from {list(REDUCTIONS)}"})
    normalize_kl_fn: str | None = field(default=None, metadata={
        "help": "transform of the per-token KL: null | exp | exp_norm"})
    clip_kl: float | None = field(default=None, metadata={"help": "clip the per-token KL above clip_kl (null: no clip)"})
    use_schulman_kl_estimation: bool = field(default=False, metadata={"help": "k3 KL estimator instead of k1"})
    not_matched_penalty: float = field(default=-1.0, metadata={
        "help": "added when the explanation end tag is missing; also fills empty spans"})
    unbias_teacher_log_probs: bool = field(default=True, metadata={
        "help": "divide teacher logits by the generation temperature"})
    unbias_student_log_probs_temp: float | None = field(default=0.7, metadata={
        "help": "divide student logits by this (null: 1)"})
    include_teacher_think_entropy: bool = field(default=True, metadata={
        "help": "false: the 'no entropy' variant (student NLL of the thought instead of the KL)"})
    reward_micro_batch_size: int = field(default=4, metadata={"help": "sequences per scoring forward pass"})
    reward_logit_chunk_size: int = field(default=1024, metadata={"help": "scored positions per output-layer chunk"})
    reward_vocab_chunk_size: int = field(default=2048, metadata={
        "help": "vocabulary columns per block of the online logsumexp (2048: fastest on CPU, README)"})
    reward_token_budget: int = field(default=4096, metadata={
        "help": "tokens per scoring forward (a pack, or rows x longest when padded); a longer sequence goes alone"})
    reward_packing: str = field(default="auto", metadata={
        "help": "auto (packed on CUDA, padded elsewhere) | packed (sequences concatenated, varlen attention, no padding) | "
                "padded (right-padded rows)"})
    reward_logprob_backend: str = field(default="auto", metadata={
        "help": "output layer: auto (rowchunk on CUDA, online elsewhere) | rowchunk (full-vocab fp32 GEMM per row "
                "chunk) | online (vocabulary blocks, running logsumexp) | fused (one Triton kernel, CUDA; no logits "
                "in memory)"})

    def __post_init__(self):
        self.reduction_log_prob_fn = [str(r).lower() for r in _as_list(self.reduction_log_prob_fn)]
        self.reduction_kl_fn = [str(r).lower() for r in _as_list(self.reduction_kl_fn)]
        for key in ("answer_log_prob_coeff", "kl_penalty_reward_coeff"):
            try:
                setattr(self, key, [float(c) for c in _as_list(getattr(self, key))])
            except (TypeError, ValueError):
                raise ConfigError(f"{key}={getattr(self, key)!r}: give a number or a list of numbers") from None
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
        for key in ("reward_micro_batch_size", "reward_logit_chunk_size", "reward_vocab_chunk_size",
                    "reward_token_budget"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        for key, choices in (("reward_packing", PACKINGS), ("reward_logprob_backend", LOGPROB_BACKENDS)):
            if getattr(self, key) not in choices:
                raise ConfigError(f"{key}={getattr(self, key)!r}: choose from {list(choices)}")

    @property
    def student_temperature(self) -> float:
        return 1.0 if self.unbias_student_log_probs_temp is None else float(self.unbias_student_log_probs_temp)
