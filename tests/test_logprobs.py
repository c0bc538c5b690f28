"""Selected-token log-probs: output-layer backends, pack plans, packed attention, ZeRO-3 lockstep, overlap."""
import logging
import os
import socket
import threading

import pytest
import torch
import torch.nn.functional as F

from rlt.rewards import logprobs as L


# ----------------------------------------------------------------------------- output layer
def reference(hidden, labels, weight, bias, temperature):
    """Plain float32 log_softmax of the full logits. -> [N]"""
    logits = hidden.float() @ weight.float().t() + (0 if bias is None else bias.float())
    return torch.log_softmax(logits / temperature, dim=-1).gather(1, labels[:, None]).squeeze(1)


@pytest.fixture(scope="module")
def head():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g)
    w = torch.randn(501, 16, generator=g)
    b = torch.randn(501, generator=g)
    lab = torch.randint(0, 501, (37,), generator=g)
    lab[:3] = torch.tensor([0, 500, 255])  # first, last and a block-edge column
    return h, w, b, lab


@pytest.mark.parametrize("backend", ["online", "rowchunk"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_backends_match_full_log_softmax_fp32(head, backend, temperature, with_bias):
    h, w, b, lab = head
    bias = b if with_bias else None
    want = reference(h, lab, w, bias, temperature)
    got = L.output_logprobs(h, lab, w, bias, temperature, backend, chunk_size=5, vocab_chunk_size=64)
    assert got.dtype == torch.float32 and got.shape == (37,)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_rowchunk_block_cap_splits_rows(head):
    h, w, b, lab = head
    want = reference(h, lab, w, b, 0.7)
    # 3 rows x 501 columns x 4 bytes fit in 6100 bytes: 13 chunks of at most 3 rows
    got = L.rowchunk_logprobs(h, lab, w, b, 0.7, chunk_size=1024, block_bytes=6100)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["online", "rowchunk"])
def test_backends_in_bfloat16_round_logits_like_the_model_dtype_gemm_then_softmax_in_float32(head, backend):
    h, w, b, lab = (x.bfloat16() if x.is_floating_point() else x for x in head)
    # the model-dtype GEMM rounded to bf16, then everything in float32 (what the CPU fallback computes)
    logits = F.linear(h, w, b).float() / 0.7
    want = torch.log_softmax(logits, -1).gather(1, lab[:, None]).squeeze(1)
    got = L.output_logprobs(h, lab, w, b, 0.7, backend, chunk_size=8, vocab_chunk_size=100)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_logits_float32_paths(head, caplog):
    h, w, b, _ = head
    torch.testing.assert_close(L.logits_float32(h, w, b), h @ w.t() + b)
    L._mm_float32_out.cache_clear()
    with caplog.at_level(logging.WARNING, logger="rlt.rewards.logprobs"):
        z = L.logits_float32(h.bfloat16(), w.bfloat16(), None)
    assert z.dtype == torch.float32 and z.shape == (37, 501)
    hb, wb = h.bfloat16(), w.bfloat16()
    if L._mm_float32_out(h.device, torch.bfloat16):   # float32 GEMM output: the float32 product of the bf16 values
        torch.testing.assert_close(z, hb.float() @ wb.float().t(), atol=1e-3, rtol=1e-4)
    else:   # the model-dtype GEMM, rounded to bf16; said, not silent
        assert "rounds the output layer's logits to torch.bfloat16" in caplog.text
        torch.testing.assert_close(z, F.linear(hb, wb).float(), atol=0, rtol=0)
    assert L.resolve_backend("auto", torch.device("cpu")) == "online"
    assert L.resolve_backend("auto", torch.device("cuda", 0)) == "rowchunk"
    with pytest.raises(ValueError, match="choose from"):
        L.resolve_backend("liger", torch.device("cpu"))


# ----------------------------------------------------------------------------- plans
def test_pack_plan_first_fit_decreasing():
    # 9 -> new; 8 -> new; 5 -> new; 3 -> fits only the pack of 5; 2 -> fits the pack of 8
    assert L.pack_plan([5, 3, 8, 2, 9], 10) == [[4], [2, 3], [0, 1]]
    assert L.pack_plan([12, 1], 10) == [[0], [1]]          # longer than the budget: alone
    assert L.pack_plan([4, 4, 4], 12) == [[0, 1, 2]]       # exactly full
    assert L.pack_plan([], 10) == []


def test_pack_plan_properties():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 300, (200,), generator=g).tolist() + [700, 1000]
    plan = L.pack_plan(lengths, 512)
    assert sorted(i for p in plan for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 512 or len(p) == 1 for p in plan)
    assert sum(lengths) / (512 * len(plan)) > 0.9   # FFD fills the packs
    # first-fit decreasing by hand: longest first, each into the first pack it fits, alone when over the cap
    assert L.pack_plan([300, 100, 250, 600, 200], 512) == [[3], [0, 4], [2, 1]]


def test_padded_plan_by_tokens_and_rows():
    # longest first: [9, 8] (2 x 9 = 18 <= 20), then [5, 3, 2] (3 x 5 = 15, 3 rows)
    assert L.padded_plan([5, 3, 8, 2, 9], 20, 3) == [[4, 2], [0, 1, 3]]
    assert L.padded_plan([5, 3, 8, 2, 9], 100, 2) == [[4, 2], [0, 1], [3]]
    assert L.padded_plan([30, 2], 20, 4) == [[0], [1]]


def test_with_dummies_equalises_ranks():
    plans = [L.pack_plan(lens, 10) for lens in ([5, 3, 8, 2, 9], [4], [])]
    target = max(len(p) for p in plans)               # what lockstep_max returns on every rank
    padded = [L.with_dummies(p, target) for p in plans]
    assert [len(p) for p in padded] == [3, 3, 3]
    assert padded[1] == [[0], [], []] and padded[2] == [[], [], []]
    with pytest.raises(ValueError, match="below"):
        L.with_dummies(plans[0], 2)
    assert L.lockstep_max([3, 0], torch.device("cpu"), enabled=False) == [3, 0]
    assert not L.needs_lockstep(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------- attention
def ref_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """A CPU stand-in for torch.nn.attention.varlen.varlen_attn: q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
    assert window_size == (-1, 0) and cu_q.dtype == torch.int32 and (enable_gqa == (q.shape[1] != k.shape[1]))
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
    out = []
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (x[s:e].transpose(0, 1)[None] for x in (q, k, v))
        out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=enable_gqa)[0])
    return torch.cat(out, dim=1).transpose(0, 1)


def test_varlen_attention_matches_per_segment_attention(monkeypatch):
    g = torch.Generator().manual_seed(2)
    bounds = [0, 5, 6, 13, 20]
    q = torch.randn(1, 4, 20, 8, generator=g)
    k, v = torch.randn(1, 2, 20, 8, generator=g), torch.randn(1, 2, 20, 8, generator=g)
    cu = torch.tensor(bounds, dtype=torch.int32)
    want = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        kk, vv = k[:, :, s:e].repeat_interleave(2, 1), v[:, :, s:e].repeat_interleave(2, 1)
        want.append(F.scaled_dot_product_attention(q[:, :, s:e], kk, vv, is_causal=True, scale=0.3))
    want = torch.cat(want, dim=2).transpose(1, 2)                       # [1, T, H, D]
    got, _ = L.varlen_attention(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=7)
    torch.testing.assert_close(got, want)
    # the CUDA branch: same layout handling around torch's varlen kernel (stand-in on CPU)
    import torch.nn.attention.varlen as tv

    monkeypatch.setattr(L, "_torch_varlen_ok", lambda device, dtype: True)
    monkeypatch.setattr(tv, "varlen_attn", ref_varlen_attn)
    got, _ = L.varlen_attention(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=7)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="one packed row"):
        L.varlen_attention(None, q, k, v, torch.ones(1, 20), cu_seq_lens_q=cu)


def test_varlen_call_adapts_to_each_torch_signature():
    # torch 2.9/2.10: is_causal, no scale, no GQA; later: scale + window_size; 2.12+: enable_gqa too
    old, mid, new = {"is_causal"}, {"scale", "window_size"}, {"scale", "window_size", "enable_gqa"}
    assert L.varlen_call_kwargs(new, 4, 2, 8, 0.3) == {"window_size": (-1, 0), "scale": 0.3, "enable_gqa": True}
    assert L.varlen_call_kwargs(mid, 4, 2, 8, 0.3) == {"window_size": (-1, 0), "scale": 0.3, "repeat_kv": 2}
    assert L.varlen_call_kwargs(old, 4, 4, 8, 8 ** -0.5) == {"is_causal": True}
    assert L.varlen_call_kwargs(old, 4, 1, 8, None) == {"is_causal": True, "repeat_kv": 4}
    assert L.varlen_call_kwargs(old, 4, 4, 8, 0.3) is None          # no way to pass a non-default scale
    assert L.varlen_call_kwargs(set(), 4, 4, 8, None) is None       # no causal mode at all


def test_varlen_attention_with_older_torch_signatures(monkeypatch):
    import torch.nn.attention.varlen as tv

    calls = []

    def causal_only(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):  # torch 2.9/2.10 shape
        assert is_causal and q.shape[1] == k.shape[1]
        calls.append("is_causal")
        return ref_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0))

    def no_gqa(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        assert q.shape[1] == k.shape[1]
        calls.append("scale")
        return ref_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size)

    g = torch.Generator().manual_seed(3)
    bounds = [0, 4, 11, 16]
    q = torch.randn(1, 4, 16, 8, generator=g)
    k, v = torch.randn(1, 2, 16, 8, generator=g), torch.randn(1, 2, 16, 8, generator=g)
    cu = torch.tensor(bounds, dtype=torch.int32)
    for fn, scaling, used in ((no_gqa, 0.3, ["scale"]), (causal_only, 8 ** -0.5, ["is_causal"]),
                              (causal_only, 0.3, [])):          # last: falls back to one SDPA per segment
        want, _ = L.varlen_attention(None, q, k, v, None, scaling=scaling, cu_seq_lens_q=cu, max_length_q=7)
        with monkeypatch.context() as m:
            m.setattr(L, "_torch_varlen_ok", lambda device, dtype: True)
            m.setattr(tv, "varlen_attn", fn)
            calls.clear()
            got, _ = L.varlen_attention(None, q, k, v, None, scaling=scaling, cu_seq_lens_q=cu, max_length_q=7)
        assert calls == used
        torch.testing.assert_close(got, want)


def test_a_pack_of_one_sequence_takes_the_plain_causal_attention(monkeypatch):
    import torch.nn.attention.varlen as tv

    def never(*a, **k):
        raise AssertionError("the varlen kernel is for packs of several sequences")

    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 9, 8, generator=g)
    k, v = torch.randn(1, 2, 9, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True,
                                          scale=0.3).transpose(1, 2)
    monkeypatch.setattr(L, "_torch_varlen_ok", lambda device, dtype: True)
    monkeypatch.setattr(tv, "varlen_attn", never)
    got, _ = L.varlen_attention(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=torch.tensor([0, 9], dtype=torch.int32))
    torch.testing.assert_close(got, want)


def test_packed_attention_switches_and_restores(tokenizer):
    from rlt.testing.tiny_model import build_model

    m = build_model(tokenizer, seed=0)
    assert m.config._attn_implementation == "sdpa"
    with L.packed_attention(m) as impl:
        assert impl == m.config._attn_implementation == L.VARLEN_ATTENTION
    assert m.config._attn_implementation == "sdpa"
    m.config._attn_implementation = "flash_attention_2"   # (not run) flash keeps its own varlen path
    with L.packed_attention(m) as impl:
        assert impl == "flash_attention_2"
    m.config._attn_implementation = "sdpa"


# ----------------------------------------------------------------------------- whole forwards
@pytest.fixture(scope="module")
def gqa_model(tokenizer):
    from rlt.testing.tiny_model import build_model

    return build_model(tokenizer, seed=3, num_heads=4, num_kv_heads=2, hidden_size=128).eval()


def unpadded_reference(model, seqs, positions, temperature):
    """Each sequence alone, no padding, full float32 log_softmax."""
    out, device = [], next(model.parameters()).device
    for s, pos in zip(seqs, positions):
        logits = model(input_ids=torch.tensor([s], device=device), use_cache=False).logits[0].float() / temperature
        lp = torch.log_softmax(logits, -1).cpu()
        out.append(torch.stack([lp[p - 1, s[p]] for p in pos]) if pos else torch.zeros(0))
    return out


def sample_sequences(n_vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, n_vocab, (n,), generator=g).tolist() for n in lengths]
    positions = [sorted(set(torch.randint(1, n, (max(1, n // 2),), generator=g).tolist())) if n > 1 else []
                 for n in lengths]
    return seqs, positions


@pytest.mark.parametrize("packing", ["packed", "padded"])
@pytest.mark.parametrize("backend", ["online", "rowchunk"])
def test_token_logprobs_equal_unpadded_per_sequence(gqa_model, tokenizer, packing, backend):
    lengths = [7, 30, 3, 55, 12, 2, 1, 90]   # 90 > budget: alone; 1: nothing scored
    seqs, positions = sample_sequences(len(tokenizer), lengths)
    want = unpadded_reference(gqa_model, seqs, positions, 0.7)
    got = L.token_logprobs(gqa_model, seqs, positions, 0.7, micro_batch_size=3, chunk_size=7, vocab_chunk_size=100,
                           token_budget=64, packing=packing, backend=backend)
    assert len(got) == len(seqs)
    for g_, w_, pos in zip(got, want, positions):
        assert g_.shape == (len(pos),)
        torch.testing.assert_close(g_, w_, atol=1e-5, rtol=0)
    assert gqa_model.config._attn_implementation == "sdpa"


def test_token_logprobs_rejects_bad_positions(gqa_model):
    with pytest.raises(ValueError, match="position"):
        L.token_logprobs(gqa_model, [[1, 2, 3]], [[0]])
    with pytest.raises(ValueError, match="position"):
        L.token_logprobs(gqa_model, [[1, 2, 3]], [[3]])


@pytest.mark.parametrize("packing", ["packed", "padded"])
def test_dummy_forwards_fill_up_to_the_synchronised_count(gqa_model, tokenizer, monkeypatch, packing):
    seqs, positions = sample_sequences(len(tokenizer), [20, 30, 40], seed=4)
    want = L.token_logprobs(gqa_model, seqs, positions, packing=packing, token_budget=64)
    calls = []
    hook = L.model_body(gqa_model).register_forward_hook(lambda m, a, k, o: calls.append(1), with_kwargs=True)
    monkeypatch.setattr(L, "lockstep_max", lambda values, device, enabled: [v + 2 for v in values])
    try:
        got = L.token_logprobs(gqa_model, seqs, positions, packing=packing, token_budget=64, lockstep=True)
    finally:
        hook.remove()
    n_plan = len(L.pack_plan([20, 30, 40], 64) if packing == "packed" else L.padded_plan([20, 30, 40], 64, 4))
    assert len(calls) == n_plan + 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ----------------------------------------------------------------------------- ZeRO-3 lockstep across 2 ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lockstep_worker(rank: int, port: int, tiny_path: str, out_dir: str):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        from rlt.data.formats import resolve_format
        from rlt.data.loading import load_examples
        from rlt.data.text import teacher_prompt
        from rlt.models import load_causal_lm, load_tokenizer
        from rlt.rewards import teacher_reward as TR
        from rlt.rewards.config import RewardConfig

        fmt = resolve_format("bespoke_stratos")
        tok = load_tokenizer(tiny_path)
        model = load_causal_lm(tiny_path, "float32").eval()
        exs = load_examples("rlt-countdown:4:0", fmt)
        n_items = 3 if rank == 0 else 1     # unequal work: rank 1 must run dummy rounds and forwards
        items = [TR.RewardInput(teacher_prompt(tok, e.question, e.solution, fmt), "Step.\n\n" * (k + 1) +
                                "<|end_of_explanation|>", e.question, e.solution, e.system)
                 for k, e in enumerate(exs[:n_items])]
        TR.needs_lockstep = lambda *models: True   # as under ZeRO-3 (forwards are collectives there)
        forwards = []
        hook = L.model_body(model).register_forward_hook(lambda m, a, o: forwards.append(1))
        reward = TR.TeacherReward(model, tok, fmt, RewardConfig(reward_token_budget=64), 0.7)
        reward.round_budgets = 1
        res = reward(model, items)
        hook.remove()
        alone = TR.TeacherReward(model, tok, fmt, RewardConfig(reward_token_budget=64), 0.7)
        alone.round_budgets = 1
        TR.needs_lockstep = lambda *models: False
        ref = alone(model, items)
        counts = [torch.zeros(1, dtype=torch.long) for _ in range(2)]
        torch.distributed.all_gather(counts, torch.tensor([len(forwards)]))
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(f"{[int(c) for c in counts]} {torch.equal(res.rewards, ref.rewards)} {len(res.rewards)}\n")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two processes over gloo
def test_lockstep_two_ranks_run_the_same_forwards(tiny_path, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_lockstep_worker, args=(_free_port(), str(tiny_path), str(tmp_path)), nprocs=2, join=True)
    lines = [(tmp_path / f"rank{r}.txt").read_text().split(" ", 2) for r in range(2)]
    for r, (c0, c1, rest) in enumerate(lines):
        assert c0.strip("[,") == c1.strip("]")   # both ranks counted the same number of forwards
        eq, n = rest.split()
        assert eq == "True" and int(n) == (3 if r == 0 else 1)
    assert int(lines[0][0].strip("[,")) > 2      # several rounds, several packs


# ----------------------------------------------------------------------------- the reward's scoring loop
E1 = "<|end_of_explanation|>"


@pytest.fixture(scope="module")
def reward_setup(tiny_path, tokenizer):
    from rlt.data.formats import resolve_format
    from rlt.data.loading import load_examples
    from rlt.data.text import teacher_prompt
    from rlt.models import load_causal_lm
    from rlt.rewards.teacher_reward import RewardInput

    fmt = resolve_format("bespoke_stratos")
    teacher = load_causal_lm(tiny_path, "float32").eval()
    student = load_causal_lm("rlt-tiny:1", "float32").eval()
    exs = load_examples("rlt-countdown:6:3", fmt)
    items = []
    for k in range(14):
        e = exs[k % len(exs)]
        body = "".join(f"Step {j}: {e.solution[:20 + 7 * j]}\n\n" for j in range(1 + k % 5))
        comp = body + (E1 if k % 4 else "")             # some without the end tag
        items.append(RewardInput(teacher_prompt(tokenizer, e.question, e.solution, fmt), comp, e.question,
                                 e.solution, e.system))
    return fmt, teacher, student, items


def _reward(reward_setup, tokenizer, **cfg):
    from rlt.rewards.config import RewardConfig
    from rlt.rewards.teacher_reward import TeacherReward

    fmt, teacher, student, items = reward_setup
    return TeacherReward(student, tokenizer, fmt, RewardConfig(**cfg), teacher_temperature=0.7)


def test_overlap_gives_identical_results(reward_setup, tokenizer):
    _, teacher, _, items = reward_setup
    r = _reward(reward_setup, tokenizer, reward_token_budget=96)
    r.round_budgets = 2                                      # several rounds
    threads = []
    real = r.prepare
    r.prepare = lambda it: threads.append(threading.current_thread()) or real(it)
    r.overlap = False
    seq = r(teacher, items)
    assert threads and set(threads) == {threading.main_thread()}
    threads.clear()
    r.overlap = True
    ahead = r(teacher, items)
    assert len(threads) == len(items) and threading.main_thread() not in threads   # prepared in the thread
    r.prepare = real
    prepared = r.score_prepared(teacher, [r.prepare(it) for it in items])
    for other in (ahead, prepared):
        assert other.components.keys() == seq.components.keys()
        for k in seq.components:
            assert torch.equal(torch.nan_to_num(other.components[k], 7.0), torch.nan_to_num(seq.components[k], 7.0)), k
    assert set(ahead.timing) == {"student", "teacher", "prepare", "prepare_wait"}
    assert ahead.timing["prepare"] > 0 and seq.timing["prepare"] > 0


def test_layouts_and_backends_agree(reward_setup, tokenizer):
    _, teacher, _, items = reward_setup
    base = _reward(reward_setup, tokenizer, reward_packing="padded", reward_logprob_backend="online",
                   reward_micro_batch_size=4, reward_token_budget=10**6)(teacher, items)
    for cfg in (dict(reward_packing="packed", reward_logprob_backend="online", reward_token_budget=200),
                dict(reward_packing="packed", reward_logprob_backend="rowchunk", reward_token_budget=64),
                dict(reward_packing="padded", reward_logprob_backend="rowchunk", reward_token_budget=300,
                     reward_micro_batch_size=3)):
        got = _reward(reward_setup, tokenizer, **cfg)(teacher, items)
        torch.testing.assert_close(got.rewards, base.rewards, atol=1e-5, rtol=0, msg=str(cfg))
        torch.testing.assert_close(got.components["r_kl"], base.components["r_kl"], atol=1e-5, rtol=0)


def test_preparation_errors_surface_from_the_thread(reward_setup, tokenizer):
    _, teacher, _, items = reward_setup
    r = _reward(reward_setup, tokenizer)
    r.overlap = True
    real = r.prepare
    r.prepare = lambda it: (_ for _ in ()).throw(RuntimeError("boom")) if it is items[5] else real(it)
    with pytest.raises(RuntimeError, match="boom"):
        r(teacher, items)
    bad = [items[0].__class__("no tag", "x", "q", "s")]
    with pytest.raises(ValueError, match="item 0"):
        r(teacher, bad)


def test_new_settings_are_validated():
    from rlt.errors import ConfigError
    from rlt.rewards.config import RewardConfig

    for kw in (dict(reward_packing="dense"), dict(reward_logprob_backend="liger"), dict(reward_token_budget=0)):
        with pytest.raises(ConfigError):
            RewardConfig(**kw)
    c = RewardConfig()
    assert (c.reward_token_budget, c.reward_packing, c.reward_logprob_backend) == (4096, "auto", "auto")



# ----------------------------------------------------------------------------- CUDA (skipped without a GPU)
def cuda(test):
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


@cuda
def test_cuda_rowchunk_keeps_float32_accumulation(head):
    h, w, b, lab = (x.cuda() for x in head)
    hb, wb = h.bfloat16(), w.bfloat16()
    assert L._mm_float32_out(hb.device, hb.dtype), "torch.mm(out_dtype=float32) unavailable: logits rounded to bf16"
    want = reference(hb.float(), lab, wb.float(), None, 0.7)      # exact products of the bf16 values, fp32 sums
    got = L.output_logprobs(hb, lab, wb, None, 0.7, "auto")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_varlen_kernel_matches_per_segment_attention(dtype):
    assert L._torch_varlen_ok(torch.device("cuda", torch.cuda.current_device()), dtype)
    g = torch.Generator(device="cuda").manual_seed(5)
    bounds = [0, 100, 101, 357, 500]
    q = torch.randn(1, 8, 500, 128, generator=g, device="cuda", dtype=dtype)
    k, v = (torch.randn(1, 2, 500, 128, generator=g, device="cuda", dtype=dtype) for _ in range(2))
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    got, _ = L.varlen_attention(None, q, k, v, None, scaling=128 ** -0.5, cu_seq_lens_q=cu, max_length_q=256)
    want = L.segment_attention(q.float(), k.float(), v.float(), bounds, 128 ** -0.5)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=0)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_token_logprobs_packed_equal_per_sequence(tokenizer, dtype):
    from rlt.testing.tiny_model import build_model

    model = build_model(tokenizer, seed=3, num_heads=4, num_kv_heads=2, hidden_size=256).eval().cuda().to(dtype)
    seqs, positions = sample_sequences(len(tokenizer), [7, 300, 3, 555, 120, 2, 1, 900], seed=6)
    want = unpadded_reference(model, seqs, positions, 0.7)
    for packing in ("packed", "padded"):
        got = L.token_logprobs(model, seqs, positions, 0.7, token_budget=1024, packing=packing)
        for g_, w_ in zip(got, want):
            # fp32: the same numbers; bf16: packed/padded vs unpadded differ only by kernel rounding
            torch.testing.assert_close(g_, w_, atol=1e-4 if dtype == torch.float32 else 0.1, rtol=0)


def test_auto_packing_by_device():
    from rlt.rewards.logprobs import resolve_packing

    assert resolve_packing("auto", torch.device("cpu")) == "padded"  # measured faster on CPU (README)
    assert resolve_packing("auto", torch.device("cuda")) == "packed"
    assert resolve_packing("packed", torch.device("cpu")) == "packed"
    with pytest.raises(ValueError, match="reward_packing='dense'"):
        resolve_packing("dense", torch.device("cpu"))
