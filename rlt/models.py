"""Resolving and loading models and tokenizers.

``rlt-tiny:SEED`` names a tiny random Qwen2 built locally on first use (see
rlt/testing/tiny_model.py) in ``$RLT_CACHE_DIR`` (default ~/.cache/rlt); any
other value is a local path or a hub id passed to transformers unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import field
from pathlib import Path

import torch

from rlt.errors import ConfigError

logger = logging.getLogger(__name__)
DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclasses.dataclass
class ModelConfig:
    """The model a run trains, generates with or evaluates."""

    model_name_or_path: str | None = field(default=None, metadata={
        "help": "checkpoint directory, hub id, or rlt-tiny:SEED (a tiny random Qwen2 built locally)"})
    dtype: str = field(default="auto", metadata={"help": f"weights' dtype: one of {list(DTYPES)} (auto: the checkpoint's)"})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "attention kernel passed to transformers (sdpa, eager, flash_attention_2, ...; null: its default)"})

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}: choose one of {list(DTYPES)}")

    def require_model(self) -> str:
        if not self.model_name_or_path:
            raise ConfigError("model_name_or_path is required (a checkpoint directory, hub id or rlt-tiny:SEED)")
        return self.model_name_or_path
TINY_RE = re.compile(r"^rlt-tiny:(\d+)$")
TINY_VERSION = "v3"  # bump when the tiny builder changes


def cache_dir() -> Path:
    return Path(os.environ.get("RLT_CACHE_DIR", Path.home() / ".cache" / "rlt"))


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_fingerprint(path: str) -> str | None:
    """A short hash of the weight files at the top of a local model directory: names, sizes and three 64 KiB
    samples of each (start, middle, end). Training the model again at that path changes it; copying the
    directory, or adding or removing checkpoint-N folders inside it, does not. None for a hub id."""
    root = Path(path)
    if not root.is_dir():
        return None
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        size = f.stat().st_size
        h.update(f"{f.name}:{size};".encode())
        with open(f, "rb") as fh:
            for offset in sorted({0, max(0, size // 2 - 32768), max(0, size - 65536)}):
                fh.seek(offset)
                h.update(fh.read(65536))
    return h.hexdigest()[:16]


def resolve_model_path(name_or_path: str, key: str | None = None) -> str:
    """A loadable path or hub id; builds ``rlt-tiny:SEED`` atomically if absent.

    A local path must be a model directory (with config.json). ``key`` (the setting that names the model, e.g.
    ``teacher``) is named in the errors, and with it a hub id is checked too: its config.json must be
    fetchable (or cached), so a wrong id or a missing network is one line here, before anything loads.
    """
    m = TINY_RE.match(str(name_or_path))
    if not m:
        if key:
            check_model(str(name_or_path), key)
        else:
            check_model_source(str(name_or_path))
        return str(name_or_path)
    target = cache_dir() / "tiny_models" / f"seed{m.group(1)}-{TINY_VERSION}"
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
        # A clean subprocess: inside a DeepSpeed ZeRO-3 launch, a model built
        # in-process would be partitioned and saved empty.
        from rlt.procs import non_distributed_env

        subprocess.run([sys.executable, "-m", "rlt.testing.tiny_model", str(tmp), "--seed", m.group(1)],
                       env=non_distributed_env(), check=True, stdout=subprocess.DEVNULL)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: same deterministic content
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def looks_like_hub_id(name: str) -> bool:
    """``name`` or ``org/name`` (letters, digits, ``_.-``; not starting with '.', '/' or '~') whose first part is
    not a local folder."""
    return (not name.startswith((".", "/", "~")) and bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name))
            and not Path(Path(name).parts[0]).is_dir())


def check_model_source(name: str, key: str | None = None) -> None:
    """``name`` can name a model, checked without the network and without building anything: ``rlt-tiny:SEED``,
    an existing model directory (:func:`check_model_dir`) or something shaped like a hub id."""
    if TINY_RE.match(name):
        return
    if Path(name).exists():
        check_model_dir(Path(name), key)
    elif not looks_like_hub_id(name):
        raise ConfigError(f"{_named(key, name)}: no such directory and not a hub id; {MODEL_FORMS}")


def check_model(name: str, key: str) -> None:
    """:func:`check_model_source`, and for a hub id, that the hub (or its local cache) has its config.json: one
    line naming ``key`` before anything starts. Builds nothing."""
    check_model_source(name, key)
    if not TINY_RE.match(name) and not Path(name).exists():
        check_hub_model(name, key)


def _named(key: str | None, value) -> str:
    return f"{key}={value}" if key else f"model path {str(value)!r}"


MODEL_FORMS = "give a checkpoint directory (with config.json), a hub id or rlt-tiny:SEED"


def check_model_dir(path: Path, key: str | None = None) -> None:
    """An existing local ``path`` is a model directory: not a LoRA adapter, not a file, config.json inside."""
    refuse_adapter_dir(path)
    if not path.is_dir():
        raise ConfigError(f"{_named(key, path)} is a file, not a model directory: {MODEL_FORMS}")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{_named(key, path)} has no config.json, so it is not a model: {MODEL_FORMS}")


def check_hub_model(repo_id: str, key: str) -> None:
    """``repo_id``'s config.json is in the local hub cache, or the hub has it; else one line naming ``key`` and
    the id. The hub is asked once, without huggingface_hub's download retries (about 25 s when offline)."""
    import huggingface_hub

    try:
        if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "config.json"), str):
            return
        found = huggingface_hub.file_exists(repo_id, "config.json")
    except Exception as e:  # malformed id, gated, offline mode, no network: each is named by its type
        why = type(e).__name__
    else:
        why = None if found else "not on the hub"
    if why:
        raise ConfigError(f"{key}={repo_id}: not a local path, and no config.json for it on the hub or in its "
                          f"cache ({why}); {MODEL_FORMS}")


def refuse_adapter_dir(path: Path) -> None:
    """A LoRA adapter directory (adapter_config.json, no config.json) is not a model: name the merged one."""
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        merged = path / "merged"
        hint = (f"use {merged}" if (merged / "config.json").is_file() else
                "train with save_merged_model=true and use <output_dir>/merged (see docs/lora.md to merge an adapter)")
        raise ConfigError(f"{path} holds a LoRA adapter, not a full model: {hint}")


def torch_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ConfigError(f"dtype={name!r} is not a torch dtype (use bfloat16, float16 or float32)")
    return dt


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tok.pad_token is None:
        raise ConfigError(f"tokenizer of {name_or_path} has no pad token; set one in its tokenizer_config.json")
    return tok


def load_causal_lm(name_or_path: str, dtype: str | None = "bfloat16", attn_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch_dtype(dtype) or "auto"}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), **kwargs)


def gpu_count() -> int:
    """GPUs torch can use here (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


NVIDIA_DEVICES = "/dev/nvidia[0-9]*"   # the driver's device nodes, one per GPU


def check_cuda_usable() -> None:
    """On a machine with NVIDIA GPUs (their device nodes exist) that torch cannot use (a CPU build of torch, a
    driver older than torch's CUDA), one line saying why, instead of a silent run on CPU processes. Hiding the
    GPUs on purpose (``CUDA_VISIBLE_DEVICES`` empty or ``-1``: it names no device) runs on the CPU."""
    import glob

    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", "x").split(",")[0].strip()
    if torch.cuda.is_available() or hidden in ("", "NoDevFiles") or hidden.startswith("-"):   # NoDevFiles: SLURM
        return
    nodes = sorted(glob.glob(NVIDIA_DEVICES))
    if not nodes:
        return
    if torch.version.cuda is None:
        why = f"this torch ({torch.__version__}) is a CPU build"
    else:
        try:
            torch.cuda.init()
            why = f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable GPU"
        except Exception as e:   # torch's own reason, e.g. "The NVIDIA driver on your system is too old"
            why = " ".join(str(e).split())[:300]
    raise ConfigError(f"this machine has NVIDIA GPUs ({', '.join(nodes[:2])}{', ...' if len(nodes) > 2 else ''}) "
                      f"but torch cannot use them: {why}; fix the install (scripts/setup_env.sh picks the CUDA "
                      "build when nvidia-smi works), or set CUDA_VISIBLE_DEVICES= (empty) or -1 to run on the CPU on purpose")


def resolve_device(setting: str, key: str) -> str:
    """A device setting of the offline tools, checked against what torch sees, before any model loads.

    ``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` as given.
    """
    n = gpu_count()
    if setting == "auto":
        return "cuda" if n else "cpu"
    m = re.fullmatch(r"cuda(?::(\d+))?", setting)
    if setting != "cpu" and not m:
        raise ConfigError(f"{key}={setting!r}: choose auto, cpu, cuda or cuda:N")
    if m and int(m.group(1) or 0) >= n:
        raise ConfigError(f"{key}={setting}: torch sees {n} GPU(s) here; choose cpu, auto"
                          + (f" or cuda:0..cuda:{n - 1}" if n else ""))
    return setting


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map text to the same ids (vocab and special tokens)."""
    return a.get_vocab() == b.get_vocab() and a.eos_token == b.eos_token and a.pad_token == b.pad_token


@dataclasses.dataclass
class LoraConfig:
    """LoRA adapters for a trained model (trl's key names)."""

    use_peft: bool = field(default=False, metadata={"help": "train LoRA adapters instead of the full weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scaling = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA path"})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "module names to adapt, or [all-linear] (null: peft's default for the architecture)"})

    def __post_init__(self):
        if self.lora_r < 1 or self.lora_alpha < 1 or not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_r={self.lora_r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}: "
                              "need r >= 1, alpha >= 1 and 0 <= dropout < 1")


def peft_config(cfg: LoraConfig):
    """peft's LoraConfig for ``use_peft: true`` (None otherwise)."""
    if not cfg.use_peft:
        return None
    try:
        from peft import LoraConfig
    except ImportError:
        raise ConfigError("use_peft=true needs the peft package (pip install peft)") from None
    targets = cfg.lora_target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                      task_type="CAUSAL_LM")


# ----------------------------------------------------------------------------- PEFT models: merged full weights
def is_peft(model) -> bool:
    from accelerate.utils import is_peft_model

    return is_peft_model(model)


def causal_lm(model):
    """The causal LM inside a PEFT model (its LoRA layers stay in place and active), or ``model`` itself."""
    return model.get_base_model() if is_peft(model) else model


def checkpoint_name(name: str) -> str:
    """A parameter name of a (PEFT-wrapped) model as the base checkpoint, and vLLM, name it."""
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    return name.replace("modules_to_save.default.", "").replace("_checkpoint_wrapped_module.", "")


@dataclasses.dataclass
class _Piece:
    """One gather of :func:`full_named_weights`: ``params`` are gathered together; ``layer`` (a peft tuner layer)
    is merged while they are; ``sources`` are the parameters whose values are yielded under ``names``."""

    names: list[str]
    sources: list[torch.nn.Parameter]
    params: list[torch.nn.Parameter]
    layer: object | None = None


def _pieces(model) -> list[_Piece]:
    pieces: list[_Piece] = []
    if not is_peft(model):
        return [_Piece([checkpoint_name(n)], [p], [p]) for n, p in model.named_parameters()]
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = {n: m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    done = set()
    for name, p in model.named_parameters():  # tied parameters come once, as in the checkpoint
        parts = name.split(".")
        owner = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in layers), None)
        if owner is None:
            if "original_module" not in name:  # modules_to_save keeps its trained copy only
                pieces.append(_Piece([checkpoint_name(name)], [p], [p]))
        elif owner not in done:
            done.add(owner)
            layer = layers[owner]
            base = list(layer.get_base_layer().named_parameters())
            pieces.append(_Piece([checkpoint_name(f"{owner}.{n}") for n, _ in base], [q for _, q in base],
                                 list(layer.parameters()), layer))
    return pieces


def is_zero3(params) -> bool:
    """Whether any of ``params`` is a ZeRO-3 partitioned parameter."""
    return any(hasattr(p, "ds_id") for p in params)


def gathered(params, modifier_rank: int | None = None):
    """Materialise ZeRO-3 partitioned parameters (every rank must enter; no-op otherwise): for reading, or, with
    ``modifier_rank``, for that rank to write them (DeepSpeed re-partitions its values on exit)."""
    import contextlib

    if is_zero3(params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def _merged_copies(layer, sources) -> list[torch.Tensor]:
    """Copies of ``sources`` (the base layer's weight, bias) with ``layer``'s active adapters merged; the live
    values are restored bit for bit (unmerge alone is not exact in floating point)."""
    import warnings

    saved = [p.data.clone() for p in sources]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "already merged"/"already unmerged" notices
        layer.merge()
        try:
            return [p.data.clone() for p in sources]
        finally:
            layer.unmerge()
            for p, s in zip(sources, saved):
                p.data.copy_(s)


def full_named_weights(model):
    """(name, tensor) for every weight of ``model`` as the base checkpoint (and vLLM) name it, LoRA merged.

    ``model``: an unwrapped model, PEFT or not. Under DeepSpeed ZeRO-3 each parameter is gathered exactly once
    and every rank must run the iteration to its end (the gathers are collectives); tensors of plain parameters
    are yielded while gathered, merged ones are fresh copies. Without PEFT it is ``named_parameters`` gathered one
    at a time. Adapter tensors (``lora_*``) are never yielded.

    Why rlt's and not trl's: trl's iteration is the private ``VLLMGeneration._iter_named_params`` of its
    single-server client, and under ZeRO-3 it gathers the whole PEFT model at once to merge; this one merges
    layer by layer (one layer gathered at a time), serves the filesystem sync and the merged save as well, and
    its names come with :func:`full_weight_metadata` without a gather.
    """
    for piece in _pieces(model):
        with gathered(piece.params):
            if piece.layer is None:
                yield piece.names[0], piece.sources[0].data
                continue
            merged = _merged_copies(piece.layer, piece.sources)
        yield from zip(piece.names, merged)


def full_weight_metadata(model) -> list[tuple[str, str, list[int]]]:
    """(name, dtype, full shape) of each tensor :func:`full_named_weights` yields, in order (no gather)."""
    return [(n, str(p.dtype).removeprefix("torch."), list(getattr(p, "ds_shape", p.shape)))
            for piece in _pieces(model) for n, p in zip(piece.names, piece.sources)]


def full_state_dict(model, keep: bool) -> dict[str, torch.Tensor] | None:
    """CPU copies of :func:`full_named_weights` on the ranks with ``keep`` (None on the others; under ZeRO-3
    every rank must call it)."""
    state = {}
    for name, t in full_named_weights(model):
        if keep:
            state[name] = t.detach().to("cpu", copy=True)
    return state if keep else None


def save_full_model(model, path, state: dict[str, torch.Tensor], tokenizer=None) -> None:
    """Write ``state`` (from :func:`full_state_dict`) as a checkpoint of ``model``'s base architecture: a
    directory AutoModelForCausalLM (and vLLM) load, with the tokenizer when given. Main process only."""
    causal_lm(model).save_pretrained(path, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
