"""The RLT teacher reward: how well a frozen student understands the teacher's explanation.

For each completion (teacher text after the RL prompt):
  thought  = text between the explanation start tag and the first end tag
             (the start tag + padding end the prompt, so the thought starts
             with the padding); a missing end tag costs ``not_matched_penalty``
             and the end tag is appended.
  r_SS     = coeffs . reductions(clip(normalize(student log-probs of the solution)))
  r_KL     = coeffs . reductions(clip(normalize(teacher - student log-probs of the thought)))
  reward   = r_SS - r_KL + match penalty
With ``include_teacher_think_entropy: false`` the KL term is replaced by the
student's negative log-likelihood of the thought (the "no entropy" variant).
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time

import torch
from trl.trainer.utils import pad

from rlt.data.formats import DataFormat
from rlt.data.text import student_text_with_spans
from rlt.rewards.config import RewardConfig
from rlt.rewards.logprobs import check_backend, check_output_layer, lockstep_max, needs_lockstep, token_logprobs
from rlt.rewards.ops import REDUCTIONS, kl_estimate, normalize, reduce_all, weighted_scores
from rlt.rewards.spans import align_spans, encode_pieces, tokens_within

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RewardInput:
    prompt: str          # RL prompt, ending with the explanation start tag + padding
    completion: str      # teacher text generated after the prompt
    question: str
    solution: str        # solution content, without tags
    system: str | None = None  # student system prompt of the row (None: the format's default)


@dataclasses.dataclass
class _Prepared:
    teacher_ids: list[int]
    student_ids: list[int]
    solution_pos: list[int]       # student token indices of the solution content
    thought_pos_student: list[int]  # aligned thought tokens (student side)
    thought_pos_teacher: list[int]  # the same tokens in the teacher sequence
    match_penalty: float
    matched: bool                   # the completion had the explanation end tag
    misaligned: int
    thought: str
    student_text: str


@dataclasses.dataclass
class RewardResult:
    rewards: torch.Tensor                 # [N]
    components: dict[str, torch.Tensor]   # name -> [N]
    timing: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds: student, teacher, prepare, prepare_wait

    def metrics(self) -> dict[str, float]:
        """Batch means (NaN-aware) of every component."""
        return {k: float(torch.nanmean(v.float())) for k, v in self.components.items()}


def extract_thought(completion: str, fmt: DataFormat) -> tuple[str, str, bool]:
    """(thought, completion with the end tag appended if missing, whether the end tag was there).

    The thought is padding + the completion up to the first explanation end
    tag (the RL prompt ends with the start tag + padding).
    """
    e1 = fmt.explanation_tags[1]
    matched = e1 in completion
    if not matched:
        completion = completion + e1
    return fmt.delimiter_padding + completion[:completion.find(e1)], completion, matched


class TeacherReward:
    """Scores teacher completions with a frozen student.

    student_model: the frozen student (eval mode, no grad).
    tokenizer: shared by teacher and student (the caller checks they agree).
    teacher_temperature: the generation temperature (log-probs are unbiased with it).
    """

    def __init__(self, student_model, tokenizer, fmt: DataFormat, config: RewardConfig, teacher_temperature: float):
        if student_model is None:
            raise ValueError("TeacherReward needs a student model")
        check_backend(config.reward_logprob_backend)
        check_output_layer(student_model, "student_model")
        self.student = student_model
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.cfg = config
        self.teacher_temperature = float(teacher_temperature) if config.unbias_teacher_log_probs else 1.0
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # ----------------------------------------------------------------- text side
    def prepare(self, item: RewardInput) -> _Prepared:
        prefix = self.fmt.explanation_tags[0] + self.fmt.delimiter_padding
        if not item.prompt.endswith(prefix):
            raise ValueError(f"the RL prompt must end with {prefix!r}")
        thought, completion, matched = extract_thought(item.completion, self.fmt)
        penalty = 0.0 if matched else float(self.cfg.not_matched_penalty)
        end = len(thought) - len(self.fmt.delimiter_padding)  # the thought's end within the completion
        teacher = encode_pieces(self.tokenizer, [item.prompt, completion])
        t_origin = len(item.prompt) - len(self.fmt.delimiter_padding)
        t_idx = tokens_within(teacher, t_origin, len(item.prompt) + end)

        text, (th0, th1), (so0, so1) = student_text_with_spans(
            self.tokenizer, item.question, thought, item.solution, item.system, self.fmt)
        student = encode_pieces(self.tokenizer, [text])
        s_idx = tokens_within(student, th0, th1)
        pt, ps, misaligned = align_spans(teacher, t_idx, t_origin, student, s_idx, th0)
        sol = tokens_within(student, so0, so1)
        return _Prepared(teacher.ids, student.ids, sol, ps, pt, penalty, matched, misaligned, thought, text)

    # ---------------------------------------------------------------- tensor side
    # Prepare (tokenize + align) the next round in a background thread while the
    # current one is scored: None -> when the student is on CUDA (on a 2-core CPU
    # the thread only competes with the matmuls). Results do not depend on it.
    overlap: bool | None = None
    # A scoring round holds about this many token budgets of sequences (per model).
    round_budgets: int = 4

    @torch.no_grad()
    def __call__(self, teacher_model, items: list[RewardInput]) -> RewardResult:
        check_output_layer(teacher_model, "the teacher (model_name_or_path)")
        prefix = self.fmt.explanation_tags[0] + self.fmt.delimiter_padding
        for k, item in enumerate(items):  # fail before any forward (a rank failing mid-way would stall ZeRO-3 peers)
            if not item.prompt.endswith(prefix):
                raise ValueError(f"item {k}: the RL prompt must end with {prefix!r}")
        overlap = self.overlap
        if overlap is None:
            overlap = next(self.student.parameters()).device.type == "cuda"
        with _PreparedStream(self.prepare, items, ahead=overlap) as stream:
            return self._score(teacher_model, stream)

    @torch.no_grad()
    def score_prepared(self, teacher_model, preps: list[_Prepared]) -> RewardResult:
        check_output_layer(teacher_model, "the teacher (model_name_or_path)")
        with _PreparedStream(lambda p: p, preps, ahead=False) as stream:
            return self._score(teacher_model, stream)

    def _rounds(self, stream):
        """Consecutive prepared items in rounds of about ``round_budgets`` token budgets (longer model's tokens)."""
        limit = self.round_budgets * self.cfg.reward_token_budget
        cur, tokens = [], 0
        for p in stream:
            cur.append(p)
            tokens += max(len(p.student_ids), len(p.teacher_ids))
            if tokens >= limit:
                yield cur
                cur, tokens = [], 0
        if cur:
            yield cur

    def _score(self, teacher_model, stream: "_PreparedStream") -> RewardResult:
        """Score round by round: student then teacher log-probs of each round's packs.

        Under ZeRO-3 (``needs_lockstep``) ranks agree each round on whether anyone
        still has items, and token_logprobs agrees on the number of forwards.
        """
        cfg = self.cfg
        lock = needs_lockstep(self.student, teacher_model)
        device = next(self.student.parameters()).device
        kw = dict(micro_batch_size=cfg.reward_micro_batch_size, chunk_size=cfg.reward_logit_chunk_size,
                  pad_token_id=self.pad_id, vocab_chunk_size=cfg.reward_vocab_chunk_size,
                  token_budget=cfg.reward_token_budget, packing=cfg.reward_packing,
                  backend=cfg.reward_logprob_backend, lockstep=lock)
        preps: list[_Prepared] = []
        s_lp: list[torch.Tensor] = []
        t_lp: list[torch.Tensor] = []
        timing = {"student": 0.0, "teacher": 0.0}
        rounds = self._rounds(stream)
        while True:
            batch = next(rounds, [])
            if not lockstep_max([int(bool(batch))], device, lock)[0]:
                break
            t0 = time.perf_counter()
            s_lp += token_logprobs(self.student, [p.student_ids for p in batch],
                                   [p.solution_pos + p.thought_pos_student for p in batch], cfg.student_temperature, **kw)
            t1 = time.perf_counter()
            t_lp += token_logprobs(teacher_model, [p.teacher_ids for p in batch],
                                   [p.thought_pos_teacher for p in batch], self.teacher_temperature, **kw)
            timing["student"] += t1 - t0
            timing["teacher"] += time.perf_counter() - t1
            preps += batch
        timing["prepare"], timing["prepare_wait"] = stream.prepare_s, stream.wait_s
        sol_lp, sol_mask = _pad([lp[:len(p.solution_pos)] for lp, p in zip(s_lp, preps)])
        st_lp, th_mask = _pad([lp[len(p.solution_pos):] for lp, p in zip(s_lp, preps)])
        tt_lp, _ = _pad(t_lp)
        match = torch.tensor([p.match_penalty for p in preps])
        comp = combine(self.cfg, sol_lp, sol_mask, st_lp, tt_lp, th_mask, match)
        comp["misaligned_thought_tokens"] = torch.tensor([float(p.misaligned) for p in preps])
        comp["no_end_tag"] = torch.tensor([float(not p.matched) for p in preps])  # also when the penalty is 0
        return RewardResult(comp["reward"], comp, timing)


class _PreparedStream:
    """``fn(item)`` for each item, in order, as an iterator.

    ``ahead``: a daemon thread computes them while the consumer works (the fast
    tokenizer releases the GIL); its exceptions are re-raised in the consumer at
    the failing item. ``prepare_s``: time spent in ``fn``; ``wait_s``: consumer
    time blocked on it. Use as a context manager (stops the thread on exit).
    """

    def __init__(self, fn, items, ahead: bool):
        self.fn, self.items, self.ahead = fn, list(items), ahead
        self.prepare_s = self.wait_s = 0.0
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._thread = None

    def _timed(self, item):
        t0 = time.perf_counter()
        try:
            return self.fn(item)
        finally:
            self.prepare_s += time.perf_counter() - t0

    def _work(self):
        for item in self.items:
            if self._stop.is_set():
                return
            try:
                self._queue.put((True, self._timed(item)))
            except BaseException as e:  # noqa: BLE001  (handed to the consumer)
                self._queue.put((False, e))
                return

    def __enter__(self):
        if self.ahead and self.items:
            self._thread = threading.Thread(target=self._work, name="rlt-reward-prepare", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __iter__(self):
        for item in self.items:
            if self._thread is None:
                t0 = time.perf_counter()
                out = self._timed(item)
                self.wait_s += time.perf_counter() - t0
                yield out
                continue
            t0 = time.perf_counter()
            ok, out = self._queue.get()
            self.wait_s += time.perf_counter() - t0
            if not ok:
                raise out
            yield out


def combine(cfg: RewardConfig, sol_lp, sol_mask, st_lp, tt_lp, th_mask, match) -> dict[str, torch.Tensor]:
    """The reward and its components from span log-probs.

    sol_lp, sol_mask: [N, S] student log-probs of the solution tokens (left-aligned);
    st_lp, tt_lp, th_mask: [N, K] student / teacher log-probs of the thought tokens;
    match: [N] match penalties. Returns name -> [N] (see README for the names).
    """
    a = torch.tensor(cfg.answer_log_prob_coeff)
    lam = torch.tensor(cfg.kl_penalty_reward_coeff)
    pen = float(cfg.not_matched_penalty)

    def process(x, fn, lo=None, hi=None):
        x = normalize(x, fn)
        return x.clamp(min=lo, max=hi) if (lo is not None or hi is not None) else x

    lo = None if cfg.clip_log_prob is None else -float(cfg.clip_log_prob)
    ss_scores = torch.nan_to_num(reduce_all(process(sol_lp, cfg.normalize_log_prob_fn, lo=lo), sol_mask,
                                            cfg.reduction_log_prob_fn), nan=pen)
    r_ss = weighted_scores(ss_scores, a, pen)
    kl = kl_estimate(tt_lp, st_lp, cfg.use_schulman_kl_estimation)
    kl_scores = torch.nan_to_num(reduce_all(process(kl, cfg.normalize_kl_fn, hi=cfg.clip_kl), th_mask,
                                            cfg.reduction_kl_fn), nan=-pen)
    r_kl = weighted_scores(kl_scores, lam, -pen)
    # An empty thought costs the no-entropy variant what it costs r_KL (the reference fills +pen here, which would
    # reward a completion with no explanation by lam . pen: README, "the reward")
    ne_scores = torch.nan_to_num(reduce_all(process(-st_lp, cfg.normalize_kl_fn, hi=cfg.clip_kl), th_mask,
                                            cfg.reduction_kl_fn), nan=-pen)
    r_ne = weighted_scores(ne_scores, lam, -pen)
    full, no_entropy = r_ss - r_kl + match, r_ss - r_ne + match
    reward = full if cfg.include_teacher_think_entropy else no_entropy

    comp: dict[str, torch.Tensor] = {}
    for op in REDUCTIONS:
        if op == "sum":
            continue
        comp[f"solution_log_prob/{op}"] = reduce_all(sol_lp, sol_mask, [op])[:, 0]
        comp[f"thought_kl/{op}"] = reduce_all(kl, th_mask, [op])[:, 0]
    for i, op in enumerate(cfg.reduction_log_prob_fn):
        comp[f"r_ss/{op}"] = ss_scores[:, i] * a[i]
    for i, op in enumerate(cfg.reduction_kl_fn):
        comp[f"r_kl/{op}"] = kl_scores[:, i] * lam[i]
    comp.update({
        "r_ss": r_ss, "r_kl": r_kl, "r_kl_no_entropy": r_ne, "match_penalty": match,
        "reward_full_kl": full, "reward_no_entropy": no_entropy, "reward": reward,
        "thought_tokens": th_mask.sum(-1).float(), "solution_tokens": sol_mask.sum(-1).float(),
    })
    return comp


def load_scorer(teacher: str, student: str, tokenizer, fmt: DataFormat, config: RewardConfig,
                teacher_temperature: float, dtype: str = "auto", device: str = "cpu"):
    """``items -> RewardResult`` for offline use: teacher and student loaded from paths, frozen, on ``device``
    (the reward then takes that device's path: packed layout and the CUDA output layer on a GPU).

    Refuses a student whose tokenizer differs from ``tokenizer`` (the reward uses one tokenizer).
    """
    from rlt.models import load_causal_lm, load_tokenizer, same_tokenizer

    if not same_tokenizer(tokenizer, load_tokenizer(student)):
        from rlt.errors import ConfigError

        raise ConfigError(f"teacher and student ({student}) tokenizers differ; the reward needs one shared tokenizer")
    teacher_model = load_causal_lm(teacher, dtype).eval().to(device)
    reward = TeacherReward(load_causal_lm(student, dtype).eval().to(device), tokenizer, fmt, config,
                           teacher_temperature)
    logger.info("scoring with teacher %s and student %s on %s", teacher, student, device)
    return lambda items: reward(teacher_model, items)


def _pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-aligned [N, T] values and mask from N 1-d tensors (T >= 1, also when every row is empty)."""
    lengths = torch.tensor([len(r) for r in rows])
    spare = rows[0].new_zeros(1) if rows else torch.zeros(1)  # keeps T >= 1; dropped below
    vals = pad([*rows, spare], padding_value=0.0)[:-1]
    return vals, torch.arange(vals.shape[1]) < lengths[:, None]
