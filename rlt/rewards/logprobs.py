"""Selected-token log-probabilities without [batch, seq, vocab] float32 tensors.

The model body runs once per padded micro-batch; the output layer is applied
only at the positions that are scored, in chunks of rows, and each chunk's
log-prob is logit[label] - logsumexp(logits) in float32 (temperature applied
first). Under DeepSpeed ZeRO-3 the output-layer weight is gathered once per
micro-batch, so every rank issues the same collectives as long as it scores
the same number of micro-batches.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def _gathered(param):
    """Context that materialises a ZeRO-3 partitioned parameter (no-op otherwise)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param], modifier_rank=None)
    return contextlib.nullcontext()


def _body(model):
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise TypeError(f"{type(model).__name__}: cannot find the transformer body (base_model)")
    return body


def chunked_logprobs(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     temperature: float, chunk_size: int, vocab_chunk_size: int = 4096) -> torch.Tensor:
    """log softmax(h W^T / temperature)[label] row by row. hidden [N, H], labels [N] -> [N] float32.

    Rows go ``chunk_size`` at a time; within a row chunk the vocabulary goes
    ``vocab_chunk_size`` columns at a time with a running max and sum (online
    logsumexp), so the largest temporary is [chunk_size, vocab_chunk_size] and
    stays cache-friendly.
    """
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    vocab = weight.shape[0]
    fold = temperature != 1.0 and hidden.dtype == torch.float32
    if fold:  # (h W^T + b) / t == (h / t) W^T + b / t: one small scaling instead of one per block
        hidden = hidden / temperature
        bias = None if bias is None else bias / temperature
    for s in range(0, hidden.shape[0], chunk_size):
        h, lab = hidden[s:s + chunk_size], labels[s:s + chunk_size]
        run_max = torch.full((h.shape[0],), float("-inf"), dtype=torch.float32, device=h.device)
        run_sum = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
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
            new_max = torch.maximum(run_max, block.amax(dim=-1))
            run_sum = run_sum * torch.exp(run_max - new_max) + block.sub_(new_max[:, None]).exp_().sum(-1)
            run_max = new_max
        out[s:s + chunk_size] = picked - (run_sum.log() + run_max)
    return out


def length_grouped_batches(lengths: list[int], micro_batch_size: int) -> list[list[int]]:
    """Indices grouped into micro-batches of similar length (longest first)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s:s + micro_batch_size] for s in range(0, len(order), micro_batch_size)]


@torch.no_grad()
def token_logprobs(model, sequences: list[list[int]], positions: list[list[int]], temperature: float = 1.0,
                   micro_batch_size: int = 4, chunk_size: int = 1024, pad_token_id: int = 0,
                   vocab_chunk_size: int = 4096) -> list[torch.Tensor]:
    """For each sequence, log p(seq[i] | seq[:i]) at each index i in positions (i >= 1).

    sequences: N lists of token ids; positions: N lists of indices -> N float32
    tensors, each [len(positions[n])]. Right-padded micro-batches, grouped by length.
    """
    if any(p < 1 for pos in positions for p in pos):
        raise ValueError("position 0 has no prefix to condition on")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        head = model.get_output_embeddings()
        out: list[torch.Tensor | None] = [None] * len(sequences)
        for batch in length_grouped_batches([len(s) for s in sequences], micro_batch_size):
            width = max(len(sequences[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            attn = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                ids[r, :len(sequences[i])] = torch.tensor(sequences[i])
                attn[r, :len(sequences[i])] = 1
            hidden = _body(model)(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False)
            hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
            rows = torch.tensor([r for r, i in enumerate(batch) for _ in positions[i]], dtype=torch.long)
            cols = torch.tensor([p - 1 for i in batch for p in positions[i]], dtype=torch.long)
            labels = ids[rows, cols + 1].to(device)
            picked = hidden[rows.to(device), cols.to(device)]
            with _gathered(head.weight):
                lp = chunked_logprobs(picked, labels, head.weight, getattr(head, "bias", None), temperature, chunk_size,
                                      vocab_chunk_size)
            start = 0
            for i in batch:
                out[i] = lp[start:start + len(positions[i])].cpu()
                start += len(positions[i])
        return out
    finally:
        model.train(was_training)
