"""Resolving and loading models and tokenizers.

``rlt-tiny:SEED`` names a tiny random Qwen2 built locally on first use (see
rlt/testing/tiny_model.py) in ``$RLT_CACHE_DIR`` (default ~/.cache/rlt); any
other value is a local path or a hub id passed to transformers unchanged.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
TINY_RE = re.compile(r"^rlt-tiny:(\d+)$")
TINY_VERSION = "v2"  # bump when the tiny builder changes


def cache_dir() -> Path:
    return Path(os.environ.get("RLT_CACHE_DIR", Path.home() / ".cache" / "rlt"))


def resolve_model_path(name_or_path: str) -> str:
    """A loadable path or hub id; builds ``rlt-tiny:SEED`` atomically if absent."""
    m = TINY_RE.match(str(name_or_path))
    if not m:
        p = Path(name_or_path)
        if p.exists():
            return str(name_or_path)
        hub_like = re.match(r"^[\w.-]+(/[\w.-]+)?$", str(name_or_path)) and not Path(p.parts[0]).is_dir()
        if not hub_like:
            raise FileNotFoundError(f"model path {name_or_path!r} does not exist (and is not a hub id)")
        return str(name_or_path)
    target = cache_dir() / "tiny_models" / f"seed{m.group(1)}-{TINY_VERSION}"
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
        # A clean subprocess: inside a DeepSpeed ZeRO-3 launch, a model built
        # in-process would be partitioned and saved empty.
        from rlt.config import non_distributed_env

        subprocess.run([sys.executable, "-m", "rlt.testing.tiny_model", str(tmp), "--seed", m.group(1)],
                       env=non_distributed_env(), check=True, stdout=subprocess.DEVNULL)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: same deterministic content
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def torch_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"dtype={name!r} is not a torch dtype (use bfloat16, float16 or float32)")
    return dt


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tok.pad_token is None:
        raise ValueError(f"tokenizer of {name_or_path} has no pad token; set one in its tokenizer_config.json")
    return tok


def load_causal_lm(name_or_path: str, dtype: str | None = "bfloat16", attn_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch_dtype(dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), **kwargs)


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map text to the same ids (vocab and special tokens)."""
    return a.get_vocab() == b.get_vocab() and a.eos_token == b.eos_token and a.pad_token == b.pad_token
