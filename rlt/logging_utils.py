"""Rank-aware logging, and the library noise rlt hides (listed here, each with its reason).

Rank 0 logs at INFO, other ranks only warnings. The rank is read from the
launcher's environment because logging is set up before accelerate's state
exists (``accelerate.PartialState`` would start the process group).
"""
from __future__ import annotations

import logging
import os
import warnings

# Python warnings from libraries that a user can do nothing about: (category, message regex, why hidden).
KNOWN_WARNINGS = [
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated",
     "DeepSpeed 0.19.8 calls this torch API on every ZeRO step: thousands of identical lines per run"),
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
     "same, for ZeRO-3's parameter gathers"),
    (UserWarning, r"TRL currently supports vLLM versions",
     "trl 1.16 caps vLLM below 0.32; rlt pins vLLM 0.32 on purpose and uses only trl's VLLMClient from it"),
]
# Library log records that are expected in every rlt run: (logger name, message part, why hidden).
KNOWN_LOG_RECORDS = [
    ("accelerate.accelerator", "Gradient accumulation steps mismatch",
     "rlt derives gradient accumulation and hands it to DeepSpeed; accelerate's plugin default (1) is unused"),
]


def rank() -> int:
    # From the launcher's environment, not accelerate.PartialState: logging starts before (and without) it.
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


class _DropKnown(logging.Filter):
    def __init__(self, prefixes: list[str]):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.getMessage())
        return not any(p in msg for p in self.prefixes)


def hide_known_noise() -> None:
    """Install the filters above (idempotent)."""
    for category, pattern, _ in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    by_logger: dict[str, list[str]] = {}
    for name, prefix, _ in KNOWN_LOG_RECORDS:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in log.filters):
            log.addFilter(_DropKnown(prefixes))


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger once; non-zero ranks are quiet unless warning."""
    r = rank()
    fmt = f"[%(asctime)s rank{r}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level if r == 0 else logging.WARNING, format=fmt, datefmt="%H:%M:%S", force=True)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    hide_known_noise()
