"""Token spans from character spans, via offset mappings.

A token belongs to a span when its characters lie inside the span. A token
that straddles a span edge (BPE merged it with a tag or the padding) is left
out, which is what the reference's "drop one edge token" search does, without
searching.
"""
from __future__ import annotations

import dataclasses
from collections import Counter


@dataclasses.dataclass
class Encoded:
    ids: list[int]
    offsets: list[tuple[int, int]]


def encode_pieces(tokenizer, pieces: list[str]) -> Encoded:
    """Tokenize each piece alone (as generation does: prompt, then completion) and
    concatenate; offsets refer to the concatenated text."""
    ids, offsets, base = [], [], 0
    for piece in pieces:
        enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        ids.extend(enc["input_ids"])
        offsets.extend((s + base, e + base) for s, e in enc["offset_mapping"])
        base += len(piece)
    return Encoded(ids, offsets)


def tokens_within(enc: Encoded, start: int, end: int) -> list[int]:
    """Indices of the tokens whose characters lie inside [start, end)."""
    return [i for i, (s, e) in enumerate(enc.offsets) if start <= s and e <= end and s < e]


def _keys(enc: Encoded, idx: list[int], origin: int) -> list[tuple]:
    seen: Counter = Counter()
    keys = []
    for i in idx:
        k = (enc.ids[i], enc.offsets[i][0] - origin, enc.offsets[i][1] - origin)
        keys.append(k + (seen[k],))
        seen[k] += 1
    return keys


def align_spans(a: Encoded, a_idx: list[int], a_origin: int,
                b: Encoded, b_idx: list[int], b_origin: int) -> tuple[list[int], list[int], int]:
    """Pair tokens of the same text in two tokenizations.

    Tokens pair when their ids and their character ranges (relative to each
    span's origin) agree. Returns (a indices, b indices, number of b tokens
    without a partner).
    """
    a_map = dict(zip(_keys(a, a_idx, a_origin), a_idx))
    pa, pb = [], []
    for k, j in zip(_keys(b, b_idx, b_origin), b_idx):
        i = a_map.get(k)
        if i is not None:
            pa.append(i)
            pb.append(j)
    return pa, pb, len(b_idx) - len(pb)
