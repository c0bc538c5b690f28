"""Selected-token log-probabilities without [batch, seq, vocab] float32 tensors.

Two independent choices, each ``auto`` by device:

* **Body layout** (``packing``): ``packed`` concatenates several sequences into
  one row with ``position_ids`` restarting at 0 per sequence and no attention
  mask (no padding at all); packs are filled first-fit-decreasing up to
  ``token_budget`` tokens (a longer sequence is alone in its pack). Attention
  stays inside each sequence: flash-attention models use their own varlen path
  (transformers reads ``cu_seq_lens_*`` / ``position_ids``); any other model is
  switched for the call to :func:`varlen_attention` (torch's FlashAttention
  ``varlen_attn`` on CUDA in half precision, one causal SDPA per sequence
  otherwise), so no [T, T] mask is built. ``padded`` is the former layout:
  right-padded rows grouped by length, at most ``micro_batch_size`` rows and
  ``token_budget`` padded tokens per micro-batch. ``auto``: packed on CUDA,
  padded elsewhere (faster on CPU: README "Teacher reward").
* **Output layer** (``backend``): the head is applied only at the scored
  positions. ``online`` (CPU): ``chunk_size`` rows x ``vocab_chunk_size``
  columns at a time, a running logsumexp in float32 (cache-sized blocks).
  ``rowchunk`` (CUDA): per row chunk one GEMM over the whole vocabulary with
  float32 output (float32 accumulation, no bf16 rounding of the logits), then
  an in-place float32 logsumexp; the [rows, vocab] block is capped at
  ``ROWCHUNK_BLOCK_BYTES``. ``fused`` (CUDA, triton): one Triton kernel does the
  tile GEMMs and the online logsumexp, so no logit reaches memory
  (:mod:`rlt.rewards.fused_logprobs`). ``auto``: rowchunk on CUDA, online elsewhere.

Under DeepSpeed ZeRO-3 every forward and every gather of the output-layer
weight is a collective, so all ranks must run the same number of them: the
number of micro-batches is all-reduced (max) and ranks with fewer run dummy
one-token forwards (:func:`lockstep_max`, :func:`with_dummies`).
"""
from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn.functional as F

from rlt.errors import ConfigError
from rlt.rewards.config import LOGPROB_BACKENDS, PACKINGS, RewardConfig

logger = logging.getLogger(__name__)

ROWCHUNK_BLOCK_BYTES = 256 * 2**20   # largest float32 [rows, vocab] block of the rowchunk backend
VARLEN_ATTENTION = "rlt_varlen"      # name registered in transformers' AttentionInterface


def _gathered(param):
    """Context that materialises a ZeRO-3 partitioned parameter (no-op otherwise)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=None)
    return contextlib.nullcontext()


def model_body(model):
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise TypeError(f"{type(model).__name__}: cannot find the transformer body (base_model)")
    return body


# ----------------------------------------------------------------------------- output layer
def online_logprobs(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    temperature: float, chunk_size: int,
                    vocab_chunk_size: int = RewardConfig.reward_vocab_chunk_size) -> torch.Tensor:
    """log softmax(h W^T / temperature)[label] row by row. hidden [N, H], labels [N] -> [N] float32.

    Rows go ``chunk_size`` at a time (the weight is streamed once per row
    chunk); within a row chunk the vocabulary goes ``vocab_chunk_size`` columns
    at a time: each [rows, columns] float32 block's logsumexp comes from one
    fused row-wise ``log_softmax`` (lse = z[:, 0] - log_softmax(z)[:, 0]) and is
    merged into a running logsumexp, so the largest temporaries are two
    [chunk_size, vocab_chunk_size] blocks (the CPU path).
    """
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    vocab = weight.shape[0]
    fold = temperature != 1.0 and hidden.dtype == torch.float32
    if fold:  # (h W^T + b) / t == (h / t) W^T + b / t: one small scaling instead of one per block
        hidden = hidden / temperature
        bias = None if bias is None else bias / temperature
    for s in range(0, hidden.shape[0], chunk_size):
        h, lab = hidden[s:s + chunk_size], labels[s:s + chunk_size]
        lse = torch.full((h.shape[0],), float("-inf"), dtype=torch.float32, device=h.device)
        picked = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
        for v in range(0, vocab, vocab_chunk_size):
            block = F.linear(h, weight[v:v + vocab_chunk_size], None if bias is None else bias[v:v + vocab_chunk_size])
            block = block.float()
            if temperature != 1.0 and not fold:  # low-precision models: scale after the upcast
                block.div_(temperature)
            here = (lab >= v) & (lab < v + block.shape[1])
            if here.any():
                rows = here.nonzero().squeeze(-1)
                picked[rows] = block[rows, lab[rows] - v]
            lse = torch.logaddexp(lse, block[:, 0] - torch.log_softmax(block, dim=-1)[:, 0])
        out[s:s + chunk_size] = picked - lse
    return out


# config keys whose value (other than None/1) changes the logits, from a scan of transformers 5.19's causal-LM
# heads: softcapping (Gemma-2/3/4, VaultGemma, nanochat), scales on the logits (Cohere, Granite, Falcon-H1,
# HyperCLOVA X) or on the hidden states before the head (MiniCPM3's logits_scaling, Inkling), MuseGlimmer's
# multiplier. A model that scales in code alone, with no config key, is not caught.
HEAD_SCALES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
               "logits_mup_width_multiplier", "output_multiplier")


def check_output_layer(model, what: str) -> None:
    """The reward applies ``model``'s output layer itself, as h W^T + b (:func:`output_logprobs`): refuse, in one
    line naming ``what``, a model whose logits are more than that (a LoRA adapter on the output layer, another
    module there, or a config that scales or caps the logits), whose log-probs would silently differ."""
    head = model.get_output_embeddings()
    if hasattr(head, "base_layer"):
        raise ConfigError(f"{what}: its output layer carries a LoRA adapter, which the reward's log-probs (h W^T + b "
                          "from the layer's weight) would leave out; drop the output layer (lm_head) from "
                          "lora_target_modules (all-linear leaves it out)")
    if not isinstance(head, torch.nn.Linear):
        raise ConfigError(f"{what}: its output layer is a {type(head).__name__}, not a Linear layer; the reward "
                          "computes the logits as h W^T + b")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in HEAD_SCALES:
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0):
            raise ConfigError(f"{what}: its config sets {key}={value}, which changes the logits; the reward computes "
                              "them as plain h W^T + b, so its log-probs would not be the model's")
    unpadded = getattr(config, "unpadded_vocab_size", None)   # Inkling drops the head's padding rows
    if unpadded is not None and unpadded < head.out_features:
        raise ConfigError(f"{what}: its config sets unpadded_vocab_size={unpadded} below the output layer's "
                          f"{head.out_features} rows; the reward normalizes over every row, so its log-probs would "
                          "not be the model's")


@functools.lru_cache(maxsize=None)
def _mm_float32_out(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` inputs on ``device`` (a warning,
    once per device and dtype, when it does not: the logits are then rounded to ``dtype``)."""
    try:
        a = torch.ones(2, 8, dtype=dtype, device=device)
        b = torch.ones(3, 8, dtype=dtype, device=device)
        if torch.mm(a, b.t(), out_dtype=torch.float32).dtype == torch.float32:
            return True
        why = "it returned another dtype"
    except (RuntimeError, NotImplementedError, TypeError) as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    logger.warning("torch.mm(out_dtype=float32) does not run for %s on %s (%s): the rowchunk backend rounds the "
                   "output layer's logits to %s before its float32 softmax, as the online backend always does "
                   "(reward_logprob_backend=fused, on CUDA, keeps them in float32; so does dtype=float32)",
                   dtype, device, why, dtype)
    return False


def logits_float32(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """h W^T + b in float32. hidden [R, H], weight [V, H] -> [R, V] float32.

    Half-precision inputs: float32 GEMM output (float32 accumulation kept, no
    rounding of the logits to the model's dtype) where torch offers it (CUDA),
    else the model-dtype GEMM upcast.
    """
    if hidden.dtype == torch.float32:
        return F.linear(hidden, weight, bias)
    if _mm_float32_out(hidden.device, hidden.dtype):
        z = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
        return z if bias is None else z.add_(bias.float())
    return F.linear(hidden, weight, bias).float()


def rowchunk_rows(vocab: int, chunk_size: int, block_bytes: int = ROWCHUNK_BLOCK_BYTES) -> int:
    """Rows per GEMM of the rowchunk backend: ``chunk_size``, fewer when a float32 [rows, vocab] block would
    pass ``block_bytes``."""
    return max(1, min(chunk_size, block_bytes // (4 * vocab)))


def rowchunk_logprobs(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      temperature: float, chunk_size: int, block_bytes: int = ROWCHUNK_BLOCK_BYTES) -> torch.Tensor:
    """log softmax(h W^T / temperature)[label]. hidden [N, H], labels [N] -> [N] float32.

    Per chunk of R = min(chunk_size, block_bytes / (4 V)) rows: one GEMM over
    the whole vocabulary into a float32 [R, V] block, then
    lp = (z[label] - max) / t - log sum exp((z - max) / t), computed in place
    (the block is the only [R, V] temporary; no Python loop over the vocabulary).
    """
    rows = rowchunk_rows(weight.shape[0], chunk_size, block_bytes)
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    inv_t = 1.0 / temperature
    for s in range(0, hidden.shape[0], rows):
        z = logits_float32(hidden[s:s + rows], weight, bias)                  # [R, V] float32
        picked = z.gather(1, labels[s:s + rows, None]).squeeze(1)
        top = z.amax(dim=1)
        z.sub_(top[:, None])
        if temperature != 1.0:
            z.mul_(inv_t)
        out[s:s + rows] = (picked - top) * inv_t - z.exp_().sum(dim=1).log()
    return out


def _fused_module():
    """:mod:`rlt.rewards.fused_logprobs` (imports triton), or one line saying what is missing."""
    try:
        from rlt.rewards import fused_logprobs
    except ImportError as e:
        raise ConfigError(f"reward_logprob_backend=fused needs triton ({e}); install it or choose online/rowchunk") \
            from None
    return fused_logprobs


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``rowchunk`` on CUDA, ``online`` elsewhere; ``fused`` is refused where it cannot run."""
    if backend not in LOGPROB_BACKENDS:
        raise ConfigError(f"reward_logprob_backend={backend!r}: choose from {list(LOGPROB_BACKENDS)}")
    if backend == "auto":
        return "rowchunk" if device.type == "cuda" else "online"
    if backend == "fused" and device.type != "cuda" and not _fused_module().interpreting():
        raise ConfigError(f"reward_logprob_backend=fused runs on CUDA, not on {device}; choose online or rowchunk")
    return backend


def check_backend(backend: str) -> None:
    """Refuse, in one line, a backend that cannot run on this machine (before any model is loaded)."""
    resolve_backend(backend, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def check_reward_device(config: RewardConfig, device: str | torch.device) -> None:
    """Refuse, before any model loads, reward settings that cannot run with the models on ``device``."""
    device = torch.device(device)
    resolve_packing(config.reward_packing, device)
    resolve_backend(config.reward_logprob_backend, device)


def output_logprobs(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    temperature: float, backend: str, chunk_size: int = RewardConfig.reward_logit_chunk_size,
                    vocab_chunk_size: int = RewardConfig.reward_vocab_chunk_size) -> torch.Tensor:
    """Selected-token log-probs with the chosen backend. hidden [N, H], labels [N] -> [N] float32."""
    backend = resolve_backend(backend, hidden.device)
    if backend == "fused":
        return _fused_module().fused_logprobs(hidden, labels, weight, bias, temperature)
    if backend == "rowchunk":
        return rowchunk_logprobs(hidden, labels, weight, bias, temperature, chunk_size)
    return online_logprobs(hidden, labels, weight, bias, temperature, chunk_size, vocab_chunk_size)


# ----------------------------------------------------------------------------- micro-batch plans
def pack_plan(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Sequence indices packed into rows of at most ``token_budget`` tokens.

    First-fit decreasing: longest first (ties by index), each into the first
    pack with room; a sequence longer than the budget gets a pack of its own.
    Deterministic; every index appears exactly once.
    """
    packs: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for p, free in enumerate(room):
            if lengths[i] <= free:
                packs[p].append(i)
                room[p] -= lengths[i]
                break
        else:
            packs.append([i])
            room.append(token_budget - lengths[i])
    return packs


def padded_plan(lengths: list[int], token_budget: int, max_rows: int) -> list[list[int]]:
    """Right-padded micro-batches: longest first, at most ``max_rows`` rows and
    rows x longest <= ``token_budget`` padded tokens (a longer sequence alone)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        b = batches[-1] if batches else None
        if b is not None and len(b) < max_rows and (len(b) + 1) * lengths[b[0]] <= token_budget:
            b.append(i)
        else:
            batches.append([i])
    return batches


def with_dummies(plan: list[list[int]], count: int) -> list[list[int]]:
    """``plan`` followed by empty micro-batches (dummy forwards) up to ``count`` entries."""
    if count < len(plan):
        raise ValueError(f"the synchronised count {count} is below this rank's {len(plan)} micro-batches")
    return plan + [[] for _ in range(count - len(plan))]


def resolve_packing(packing: str, device: torch.device) -> str:
    """``auto`` -> ``packed`` on CUDA (no padding, varlen attention), ``padded`` elsewhere: on CPU one SDPA per
    packed sequence measured slower than padded rows (scripts/bench_reward.py, README "Teacher reward")."""
    if packing not in PACKINGS:
        raise ConfigError(f"reward_packing={packing!r}: choose from {list(PACKINGS)}")
    if packing == "auto":
        return "packed" if device.type == "cuda" else "padded"
    return packing


# ----------------------------------------------------------------------------- ZeRO-3 lockstep
def needs_lockstep(*models) -> bool:
    """True when forwards are collectives: torch.distributed with several ranks and a
    ZeRO-3 partitioned parameter in one of ``models``."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    if torch.distributed.get_world_size() < 2:
        return False
    return any(hasattr(p, "ds_id") for m in models if m is not None for p in m.parameters())


def lockstep_max(values: list[int], device: torch.device, enabled: bool) -> list[int]:
    """Element-wise max of ``values`` over all ranks (``values`` itself when not enabled)."""
    if not enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.long, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [int(x) for x in t.tolist()]


# ----------------------------------------------------------------------------- varlen attention
def varlen_call_kwargs(params, hq: int, hkv: int, head_dim: int, scaling: float | None) -> dict | None:
    """Keyword arguments for torch's ``varlen_attn`` with parameter names ``params``, or None when it cannot do
    causal attention with ``scaling`` over ``hq`` query and ``hkv`` key/value heads.

    torch has shipped three signatures: ``is_causal`` (no ``scale``, no GQA), ``scale`` + ``window_size``, and
    that plus ``enable_gqa``. Without ``enable_gqa`` the caller repeats the key/value heads (``repeat_kv``);
    without ``scale`` only the default 1/sqrt(head_dim) is possible.
    """
    kw: dict = {}
    if "window_size" in params:
        kw["window_size"] = (-1, 0)
    elif "is_causal" in params:
        kw["is_causal"] = True
    else:
        return None
    if "scale" in params:
        kw["scale"] = scaling
    elif scaling is not None and abs(scaling - head_dim ** -0.5) > 1e-12:
        return None
    if hq != hkv:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            kw["repeat_kv"] = hq // hkv
    return kw


@functools.lru_cache(maxsize=None)
def _varlen_params(fn) -> frozenset:
    """Parameter names of ``fn`` (torch's ``varlen_attn``), read once per function: this runs in every layer."""
    import inspect

    return frozenset(inspect.signature(fn).parameters)


def torch_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                 scaling: float | None) -> torch.Tensor | None:
    """Causal varlen attention through torch's FlashAttention kernel. q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D];
    None when the installed torch's ``varlen_attn`` cannot do it (see :func:`varlen_call_kwargs`)."""
    from torch.nn.attention.varlen import varlen_attn

    kw = varlen_call_kwargs(_varlen_params(varlen_attn), q.shape[1], k.shape[1], q.shape[2], scaling)
    if kw is None:
        return None
    rep = kw.pop("repeat_kv", 1)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)


@functools.lru_cache(maxsize=None)
def _torch_varlen_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's FlashAttention varlen kernel runs here (CUDA, fp16/bf16, a supported card and signature)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        q = torch.zeros(4, 2, 64, dtype=dtype, device=device)
        cu = torch.tensor([0, 1, 4], dtype=torch.int32, device=device)
        if torch_varlen(q, q[:, :1], q[:, :1], cu, 3, 64 ** -0.5) is None:
            raise RuntimeError("this torch's varlen_attn has no causal mode or no scale argument")
        return True
    except Exception as e:  # noqa: BLE001  (an unsupported card or build: fall back, say why once)
        logger.warning("torch varlen_attn unavailable on %s/%s (%s); packed attention runs one SDPA per sequence",
                       device, dtype, e)
        return False


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int],
                      scaling: float | None) -> torch.Tensor:
    """Causal attention inside each segment, one SDPA per segment (any device/dtype; GQA without repeating heads).

    query [1, Hq, T, D], key/value [1, Hkv, T, D], bounds [0, e_1, ..., T] -> [1, T, Hq, D].
    """
    gqa = query.shape[1] != key.shape[1]   # kv head j serves query heads j*rep .. j*rep+rep-1 (as repeat_kv)
    outs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                           scale=scaling, enable_gqa=gqa)
            for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return torch.cat(outs, dim=2).transpose(1, 2)


def varlen_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                     dropout: float = 0.0, scaling: float | None = None, sliding_window=None,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None, **kwargs):
    """transformers attention function for one packed row (registered as ``rlt_varlen``).

    query [1, Hq, T, D], key/value [1, Hkv, T, D]; ``cu_seq_lens_q`` [S+1] int32
    segment bounds -> ([1, T, Hq, D], None). Causal within each segment only.
    """
    if attention_mask is not None or cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError("rlt_varlen attention takes one packed row with cu_seq_lens_q and no attention mask")
    if sliding_window is not None and (max_length_q or query.shape[2]) > sliding_window:
        raise NotImplementedError("rlt_varlen attention has no sliding window")
    if cu_seq_lens_q.numel() == 2:
        # one sequence (a pack of one, e.g. longer than the token budget): the causal SDPA call of an unpacked
        # forward. On an H200 (torch 2.11) bare forwards of 12k-token sequences took 3.08 s this way against
        # 3.34 s through the varlen kernel (scripts/bench_reward.py, 7B shape, bf16; README "Teacher reward").
        return segment_attention(query, key, value, [0, query.shape[2]], scaling), None
    if _torch_varlen_ok(query.device, query.dtype):
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))   # [T, H, D]
        cu = cu_seq_lens_q.to(torch.int32)
        m = int(max_length_q) if max_length_q is not None else int((cu[1:] - cu[:-1]).max())
        out = torch_varlen(q, k, v, cu, m, scaling)
        if out is not None:
            return out.unsqueeze(0), None
    return segment_attention(query, key, value, cu_seq_lens_q.tolist(), scaling), None


def _register_varlen_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)


@contextlib.contextmanager
def packed_attention(model):
    """Within the context the model attends inside packed segments without a [T, T] mask.

    Flash-attention implementations (transformers' varlen path) are kept; any
    other implementation is switched to ``rlt_varlen`` and restored afterwards.
    """
    config = model.config
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if "flash" in impl:
        yield impl
        return
    _register_varlen_attention()
    config._attn_implementation = VARLEN_ATTENTION
    try:
        yield VARLEN_ATTENTION
    finally:
        config._attn_implementation = impl


# ----------------------------------------------------------------------------- forwards
def _hidden(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def packed_inputs(sequences: list[list[int]], pack: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One packed row: ids [1, T], position_ids [1, T] (restarting at 0 per sequence), bounds [0, ..., T]."""
    ids = [t for i in pack for t in sequences[i]]
    pos = [p for i in pack for p in range(len(sequences[i]))]
    bounds = [0]
    for i in pack:
        bounds.append(bounds[-1] + len(sequences[i]))
    return torch.tensor([ids], dtype=torch.long), torch.tensor([pos], dtype=torch.long), bounds


def _dummy_forward(body, head, device, packed: bool) -> None:
    """A one-token forward and an output-layer gather: the collectives of one micro-batch."""
    one = torch.zeros((1, 1), dtype=torch.long, device=device)
    if packed:
        cu = torch.tensor([0, 1], dtype=torch.int32, device=device)
        body(input_ids=one, position_ids=torch.zeros_like(one), use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
             max_length_q=1, max_length_k=1)
    else:
        body(input_ids=one, attention_mask=torch.ones_like(one), use_cache=False)
    with _gathered(head.weight):
        pass


_R = RewardConfig   # the defaults below are the reward settings' defaults (one place)


@torch.no_grad()
def token_logprobs(model, sequences: list[list[int]], positions: list[list[int]], temperature: float = 1.0,
                   micro_batch_size: int = _R.reward_micro_batch_size, chunk_size: int = _R.reward_logit_chunk_size,
                   pad_token_id: int = 0, vocab_chunk_size: int = _R.reward_vocab_chunk_size, *,
                   token_budget: int = _R.reward_token_budget, packing: str = _R.reward_packing,
                   backend: str = _R.reward_logprob_backend, lockstep: bool | None = None) -> list[torch.Tensor]:
    """For each sequence, log p(seq[i] | seq[:i]) at each index i in positions (i >= 1).

    sequences: N lists of token ids; positions: N lists of indices -> N float32
    CPU tensors, each [len(positions[n])]. ``packing``/``backend``: see the module
    docstring; ``lockstep`` (default: :func:`needs_lockstep`) all-reduces the
    number of micro-batches so ZeRO-3 ranks run the same number of forwards.
    """
    if any(p < 1 or p >= len(s) for s, pos in zip(sequences, positions) for p in pos):
        raise ValueError("positions must lie in [1, len(sequence)): position 0 has no prefix to condition on")
    if token_budget < 1 or micro_batch_size < 1:
        raise ValueError("token_budget and micro_batch_size must be >= 1")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        packing = resolve_packing(packing, device)
        backend = resolve_backend(backend, device)
        lockstep = needs_lockstep(model) if lockstep is None else lockstep
        body, head = model_body(model), model.get_output_embeddings()
        lengths = [len(s) for s in sequences]
        plan = (pack_plan(lengths, token_budget) if packing == "packed"
                else padded_plan(lengths, token_budget, micro_batch_size))
        plan = with_dummies(plan, lockstep_max([len(plan)], device, lockstep)[0])
        pieces: list[torch.Tensor] = []   # per micro-batch, on the device; one copy to the CPU at the end
        order: list[int] = []             # sequence of each piece
        ctx = packed_attention(model) if packing == "packed" else contextlib.nullcontext()
        with ctx:
            for batch in plan:
                if not batch:
                    _dummy_forward(body, head, device, packing == "packed")
                    continue
                if packing == "packed":
                    ids, pos, bounds = packed_inputs(sequences, batch)
                    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
                    longest = max(lengths[i] for i in batch)
                    hidden = _hidden(body(input_ids=ids.to(device), position_ids=pos.to(device), use_cache=False,
                                          cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest,
                                          max_length_k=longest))[0]
                    flat = [b + p - 1 for b, i in zip(bounds, batch) for p in positions[i]]
                    rows = torch.tensor(flat, dtype=torch.long)
                    labels = ids[0, rows + 1]
                else:
                    width = max(lengths[i] for i in batch)
                    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
                    attn = torch.zeros((len(batch), width), dtype=torch.long)
                    for r, i in enumerate(batch):
                        ids[r, :lengths[i]] = torch.tensor(sequences[i])
                        attn[r, :lengths[i]] = 1
                    hidden = _hidden(body(input_ids=ids.to(device), attention_mask=attn.to(device),
                                          use_cache=False)).flatten(0, 1)
                    rows = torch.tensor([r * width + p - 1 for r, i in enumerate(batch) for p in positions[i]],
                                        dtype=torch.long)
                    labels = ids.flatten()[rows + 1]
                picked = hidden[rows.to(device)]
                with _gathered(head.weight):
                    pieces.append(output_logprobs(picked, labels.to(device), head.weight, getattr(head, "bias", None),
                                                  temperature, backend, chunk_size, vocab_chunk_size))
                order.extend(batch)
        flat_lp = torch.cat(pieces).cpu() if pieces else torch.zeros(0)
        out: list[torch.Tensor] = [torch.zeros(0)] * len(sequences)
        start = 0
        for i in order:
            out[i] = flat_lp[start:start + len(positions[i])]
            start += len(positions[i])
        return out
    finally:
        model.train(was_training)
