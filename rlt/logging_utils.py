"""Rank-aware logging: rank 0 logs at INFO, other ranks only warnings."""
from __future__ import annotations

import logging
import os


def rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger once; non-zero ranks are quiet unless warning."""
    r = rank()
    fmt = f"[%(asctime)s rank{r}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level if r == 0 else logging.WARNING, format=fmt, datefmt="%H:%M:%S", force=True)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
