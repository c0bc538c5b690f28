"""A straightforward per-sample implementation of the teacher reward: the oracle.

One completion at a time, full-vocabulary float32 log_softmax over the whole
sequence (as the reference implementation does), token character ranges from
incremental decoding (not offset mappings), plain reductions. Used by the
equivalence tests and by scripts/bench_reward.py.
"""
from __future__ import annotations

import re

import torch

from rlt.data.text import render_student_prompt, student_answer, render_student_text


def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-to-unicode table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _char_ranges(tok, ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) characters of each token, from the bytes each token stands for;
    a token holding part of a multi-byte character covers that whole character."""
    dec = _byte_decoder()
    added = {i for i in tok.added_tokens_decoder}
    pieces = [t.encode() if i in added else bytes(dec[ch] for ch in t)
              for i, t in zip(ids, tok.convert_ids_to_tokens(ids))]
    data = b"".join(pieces)
    char_of_byte, c = [], 0
    text = data.decode("utf-8", errors="strict")
    for ch in text:
        char_of_byte.extend([c] * len(ch.encode()))
        c += 1
    out, pos = [], 0
    for p in pieces:
        if not p:
            out.append((char_of_byte[pos] if pos < len(char_of_byte) else c,) * 2)
            continue
        out.append((char_of_byte[pos], char_of_byte[pos + len(p) - 1] + 1))
        pos += len(p)
    return out


def _full_logprobs(model, ids: list[int], temperature: float) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i = 1..L-1 -> [L-1], from full fp32 log_softmax."""
    x = torch.tensor([ids], device=next(model.parameters()).device)
    logits = model(input_ids=x).logits[0, :-1].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, x[0, 1:, None]).squeeze(-1).cpu()


def _reduce(v: torch.Tensor, op: str) -> float:
    if v.numel() == 0:
        return float("nan")
    if op == "mean":
        return v.mean().item()
    if op == "sum":
        return v.sum().item()
    if op == "min":
        return v.min().item()
    if op == "max":
        return v.max().item()
    if op == "median":
        return torch.sort(v).values[(v.numel() - 1) // 2].item()
    q = 0.25 if op == "first_quartile" else 0.75
    return torch.quantile(v, q).item()


def _norm(v, fn):
    return v if fn in (None, "none") else (v.exp() if fn == "exp" else 1 - (-v).exp())


def _score(v, ops, coeffs, nan):
    vals = [_reduce(v, op) for op in ops]
    vals = [nan if x != x else x for x in vals]
    return sum(c * x for c, x in zip(coeffs, vals))


@torch.no_grad()
def oracle_reward(teacher, student, tok, fmt, cfg, teacher_temperature, item) -> dict:
    e0, e1 = fmt.explanation_tags
    pad = fmt.delimiter_padding
    text = e0 + pad + item.completion
    m = re.search(re.escape(e0) + "(.*?)" + re.escape(e1), text, flags=re.DOTALL)
    match = 0.0
    completion = item.completion
    if m is None:
        match, completion = cfg.not_matched_penalty, completion + e1
        m = re.search(re.escape(e0) + "(.*?)" + re.escape(e1), e0 + pad + completion, flags=re.DOTALL)
    thought = m.group(1)

    p_ids = tok(item.prompt, add_special_tokens=False)["input_ids"]
    c_ids = tok(completion, add_special_tokens=False)["input_ids"]
    t_ids = p_ids + c_ids
    c_ranges = [(s + len(item.prompt), e + len(item.prompt)) for s, e in _char_ranges(tok, c_ids)]
    t_ranges = _char_ranges(tok, p_ids) + c_ranges
    th_start = len(item.prompt) - len(pad)
    th_end = th_start + len(thought)
    t_th = [i for i, (s, e) in enumerate(t_ranges) if s >= th_start and e <= th_end and s < e]

    s_text = render_student_text(tok, item.question, thought, item.solution, item.system, fmt)
    s_ids = tok(s_text, add_special_tokens=False)["input_ids"]
    s_ranges = _char_ranges(tok, s_ids)
    head = len(render_student_prompt(tok, item.question, item.system, fmt))
    st0 = head + len(fmt.think_prefix) + len(fmt.think_tags[0])
    so0 = head + len(student_answer(thought, "", fmt)) - len(fmt.solution_tags[1])
    s_th = [i for i, (s, e) in enumerate(s_ranges) if s >= st0 and e <= st0 + len(thought) and s < e]
    s_so = [i for i, (s, e) in enumerate(s_ranges) if s >= so0 and e <= so0 + len(item.solution) and s < e]

    # pair thought tokens: same id and same characters relative to the thought start
    t_keys = {}
    for i in t_th:
        key = (t_ids[i], t_ranges[i][0] - th_start, t_ranges[i][1] - th_start)
        t_keys.setdefault(key, []).append(i)
    pairs = []
    for j in s_th:
        key = (s_ids[j], s_ranges[j][0] - st0, s_ranges[j][1] - st0)
        if t_keys.get(key):
            pairs.append((t_keys[key].pop(0), j))

    s_lp = _full_logprobs(student, s_ids, cfg.student_temperature)
    t_lp = _full_logprobs(teacher, t_ids, teacher_temperature if cfg.unbias_teacher_log_probs else 1.0)
    sol = torch.stack([s_lp[j - 1] for j in s_so]) if s_so else torch.zeros(0)
    st = torch.stack([s_lp[j - 1] for _, j in pairs]) if pairs else torch.zeros(0)
    tt = torch.stack([t_lp[i - 1] for i, _ in pairs]) if pairs else torch.zeros(0)

    lo = -cfg.clip_log_prob if cfg.clip_log_prob is not None else None
    sol_p = _norm(sol, cfg.normalize_log_prob_fn)
    sol_p = sol_p.clamp(min=lo) if lo is not None else sol_p
    kl = tt - st
    if cfg.use_schulman_kl_estimation:
        kl = kl - 1 + torch.exp(-kl)
    kl_p = _norm(kl, cfg.normalize_kl_fn)
    ne_p = _norm(-st, cfg.normalize_kl_fn)
    if cfg.clip_kl is not None:
        kl_p, ne_p = kl_p.clamp(max=cfg.clip_kl), ne_p.clamp(max=cfg.clip_kl)
    pen = cfg.not_matched_penalty
    r_ss = _score(sol_p, cfg.reduction_log_prob_fn, cfg.answer_log_prob_coeff, pen)
    r_kl = _score(kl_p, cfg.reduction_kl_fn, cfg.kl_penalty_reward_coeff, -pen)
    r_ne = _score(ne_p, cfg.reduction_kl_fn, cfg.kl_penalty_reward_coeff, -pen)  # an empty thought: as r_KL
    full, no_ent = r_ss - r_kl + match, r_ss - r_ne + match
    return {"reward": full if cfg.include_teacher_think_entropy else no_ent, "r_ss": r_ss, "r_kl": r_kl,
            "r_kl_no_entropy": r_ne, "match_penalty": match, "thought_tokens": len(pairs), "solution_tokens": len(s_so)}
