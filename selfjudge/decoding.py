"""Speculative decoding: one round (propose, verify, accept, commit) written once over ``[B, γ]`` tensors.

Every method runs through :func:`run_rounds`, so every method is decoded and timed the same way:
``gamma >= 1`` with a draft is speculative decoding, ``draft=None`` plain decoding of ``target``
(target-only; draft-only is ``decode(draft, None, ...)``). A round, for the B active rows:

1. **propose**: each row's draft cache covers every committed token but the ones it has not read (the
   newest one, plus the last draft token after a fully accepted window); the draft reads those, then
   proposes ``γ`` tokens one forward at a time, computing logits for the last position only;
2. **verify**: the target reads ``[last, d_1..d_γ]`` of every row in ONE forward pass, giving the
   distributions that judge each ``d_j`` and the hidden states where ``d_j`` is the input token (the
   judge's features, :func:`selfjudge.features.forward_with_hidden`);
3. **accept**: ``d_j`` is kept iff the standard test (greedy match, or the speculative-sampling test
   ``u < p/q``) accepts it OR the policy's rule does; each row commits its longest kept prefix plus one
   target token: the correction at the first rejection, or the bonus token after a full window;
4. **commit**: the positions of rejected tokens are dropped from both caches, so they cost nothing
   more and the draft never re-reads a token it has cached.

The prompt has no pass of its own: in the first round the draft's first step reads the prompt and the
target reads ``[prompt, d_1..d_γ]`` (a target-only step: the prompt), as transformers' assisted generation
does, saving one pass of each model per decode. Only with a :class:`PrefillMemo` (an eval decoding one
batch with every method) is the prompt prefilled once and copied into each method's caches.

Two cache back-ends do step 4: at batch 1 (:func:`decode`) the caches are cropped (a ``DynamicCache``,
or a ``StaticCache`` replaying CUDA graphs, :mod:`selfjudge.cuda_graphs`); for B rows
(:mod:`selfjudge.batch_decoding`) rejected positions stay as holes the attention mask hides.
Per round the host waits on the device once (greedy; twice with sampling, for the residual draw).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from selfjudge.cuda_graphs import StaticDecoder, static_decoder
from selfjudge.features import FeatureSpec, forward_with_hidden
from selfjudge.forward import lm_forward
from selfjudge.schedule import FixedWindow, Schedule


@dataclass
class Verification:
    """The target's verify pass over the proposals of a round; what acceptance rules read. Shapes carry
    a leading row dimension [B, ...] from the decoder; rules also accept one proposal without it."""

    draft_tokens: torch.Tensor  # [B, γ]
    target_logits: torch.Tensor  # [B, γ+1, V] (model dtype); row j-1 judges d_j, row γ the bonus token
    target_hidden: torch.Tensor  # [B, γ, F] target state where d_j is the input token
    draft_logits: torch.Tensor | None  # [B, γ, V]
    draft_hidden: torch.Tensor | None  # [B, γ, H_d]
    temperature: float  # 0: greedy
    prev_hidden: torch.Tensor | None = None  # [B, γ, F] target state whose output judges d_j (input d_{j-1} / last)

    @property
    def scale(self) -> float:
        """Logit divisor of the distributions rules compare: the temperature, or 1 when greedy."""
        return self.temperature if self.temperature > 0 else 1.0

    @cached_property
    def target_logp(self) -> torch.Tensor:  # [B, γ, V] log p(· | prefix, d_<j)
        return F.log_softmax(self.target_logits[..., :-1, :].float() / self.scale, dim=-1)

    @cached_property
    def draft_logp(self) -> torch.Tensor:  # [B, γ, V] log q(· | prefix, d_<j)
        if self.draft_logits is None:
            raise ValueError("this rule reads draft logits, but the policy did not ask for them (needs_draft_logits)")
        return F.log_softmax(self.draft_logits.float() / self.scale, dim=-1)

    @cached_property
    def target_argmax(self) -> torch.Tensor:  # [B, γ+1]
        return self.target_logits.argmax(-1)

    def row(self, i: int) -> Verification:
        """Row i of a batched verification, without the row dimension."""

        def cut(x):
            return None if x is None else x[i]

        return Verification(
            self.draft_tokens[i],
            self.target_logits[i],
            self.target_hidden[i],
            cut(self.draft_logits),
            cut(self.draft_hidden),
            self.temperature,
            cut(self.prev_hidden),
        )

    def take(self, pos: torch.Tensor) -> Verification:
        """The proposed tokens at ``pos`` (a [k] index into the flattened [(B,) γ] positions) as one proposal of
        k tokens, with what this verification has already computed (argmaxes, log-probabilities). Rules are
        position-wise, so each token gets the verdict it gets in its own row; the bonus row is a placeholder."""
        g = self.draft_tokens.shape[-1]
        ix = (pos // g, pos % g) if self.draft_tokens.dim() == 2 else (pos,)

        def pick(x):
            return None if x is None else x[ix]

        tl = self.target_logits
        r = Verification(
            self.draft_tokens[ix],
            torch.cat([tl[..., :-1, :][ix], tl.new_zeros(1, tl.shape[-1])]),
            pick(self.target_hidden),
            pick(self.draft_logits),
            pick(self.draft_hidden),
            self.temperature,
            pick(self.prev_hidden),
        )
        for name in ("target_logp", "draft_logp"):
            if name in self.__dict__:
                r.__dict__[name] = self.__dict__[name][ix]
        if "target_argmax" in self.__dict__:
            am = self.target_argmax[..., :-1][ix]
            r.__dict__["target_argmax"] = torch.cat([am, am.new_zeros(1)])
        return r


class AcceptRule(Protocol):
    """The policy signature (see selfjudge.policies)."""

    needs_draft_logits: bool
    needs_draft_hidden: bool
    feature_spec: FeatureSpec

    def accept(self, v: Verification) -> torch.Tensor | None:  # [(B,) γ] bool, or None for "no extra tokens"
        ...


@dataclass
class DecodeStats:
    """Counts of one decoded example; the metrics built on them are defined in selfjudge.metrics."""

    new_tokens: int = 0  # tokens generated, correction/bonus and EOS included
    rounds: int = 0  # decode rounds = target forwards after the prefill
    draft_forwards: int = 0  # draft forwards after the prefill (the catch-up read rides on the first one)
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens kept (by the standard test or the rule)
    accepted_by_rule: int = 0  # kept tokens the standard test alone would have rejected (first rejection on)
    accept_hist: list[int] = field(default_factory=list)  # index n: speculative rounds that kept n draft tokens
    prefill_seconds: float = 0.0  # prompt prefill, both models (without a kept prefill: the first round, which
    # reads the prompt with its window: the time to the first committed tokens)
    draft_seconds: float = 0.0  # proposing (exact only with profile=True on CUDA)
    verify_seconds: float = 0.0  # target verify passes + acceptance (exact only with profile=True on CUDA)
    rule_seconds: float = 0.0  # the acceptance rule alone (judge head, ...), part of verify_seconds
    seconds: float = 0.0  # wall time of the whole decode, prefill included

    @property
    def target_forwards(self) -> int:
        return self.rounds


@dataclass
class TargetTrace:
    """The target's own pass over x ⊕ y, recorded while it generated y (P prompt, T response tokens).

    Step s (s = 0..T-1) is the position whose output predicts y_s: the last prompt token for s = 0,
    the input y_{s-1} after that. ``cache`` holds x ⊕ y_<T-1 (P+T-1 positions): every prefix a
    mismatch window needs, since windows start at i <= T-2.
    """

    cache: DynamicCache  # one row, no padding
    logp_chosen: torch.Tensor  # [T] float32: log p(y_s | x, y_<s)
    h_final: torch.Tensor  # [T, H] post-norm last-layer state at step s (the LM head's input)
    h_spec: torch.Tensor  # [T, F] judge-feature states at step s (FeatureSpec layers)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def draw(logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> torch.Tensor:
    """Next token from logits [..., V]: argmax when greedy, else a sample of softmax(logits / T)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=gen).view(probs.shape[:-1])


def standard_accept(v: Verification, gen: torch.Generator | None = None) -> torch.Tensor:
    """The lossless test per draft token [(B,) γ] bool: greedy match, or u < min(1, p(d)/q(d)) when sampling."""
    if v.temperature <= 0:
        return v.target_argmax[..., :-1] == v.draft_tokens
    idx = v.draft_tokens[..., None]
    ratio = (v.target_logp.gather(-1, idx) - v.draft_logp.gather(-1, idx))[..., 0].exp()  # p/q [(B,) γ]
    u = torch.rand(ratio.shape, generator=gen, device=ratio.device)
    return u < ratio


def correction(v: Verification, n: torch.Tensor, proposed: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Each row's target token [B] after keeping n[b] of proposed[b] draft tokens: the argmax (greedy);
    with sampling a draw from norm(max(p - q, 0)) at a rejected position, or from p after them all."""
    rows = torch.arange(n.shape[0], device=n.device)
    if v.temperature <= 0:
        return v.target_argmax[rows, n]
    p = F.softmax(v.target_logits[rows, n].float() / v.temperature, dim=-1)  # [B, V]
    q = v.draft_logp[rows, n.clamp(max=v.draft_tokens.shape[1] - 1)].exp()
    resid = (p - q).clamp_min(0)
    total = resid.sum(-1, keepdim=True)
    rejected = (n < proposed)[:, None] & (total > 0)  # p == q: any draw from p is exact
    p = torch.where(rejected, resid / total.clamp_min(1e-30), p)
    return torch.multinomial(p, 1, generator=gen)[:, 0]


RULE_CHUNK = 8  # positions per rule call on the CPU: a vocab-wide rule's [8, V] intermediates stay in cache


def apply_rule(policy: AcceptRule, v: Verification, std: torch.Tensor) -> torch.Tensor | None:
    """The rule's verdicts [B, γ] where the lossless test (``std`` [B, γ]) rejects, False where it accepts
    (there the test keeps the token whatever the rule says), or None for "no extra tokens".

    Rules are position-wise (``positionwise``), so they read only the rejected tokens, 1-2 of a round's γ:
    on CUDA in one call, on the CPU in calls of ``RULE_CHUNK`` tokens (one [64, 8, V] call made the KL rule
    21 % of the verify phase on the real pair; row by row 7.5 %). A rule that reads whole proposals
    (``positionwise = False``) gets every row, one call per row on the CPU."""
    cuda = v.draft_tokens.device.type == "cuda"
    if not getattr(policy, "positionwise", True):
        if cuda:
            return policy.accept(v)
        rows = [policy.accept(v.row(i)) for i in range(v.draft_tokens.shape[0])]
        return None if rows[0] is None else torch.stack(rows)
    at = (~std).flatten().nonzero()[:, 0]  # flat positions the test rejects
    if at.numel() == 0:
        return None
    parts = [policy.accept(v.take(c)) for c in ([at] if cuda else at.split(RULE_CHUNK))]
    if parts[0] is None:
        return None
    out = torch.zeros(std.numel(), dtype=torch.bool, device=std.device)
    out[at] = torch.cat(parts).to(out.device)
    return out.view_as(std)


def check_args(draft, prompts: list[list[int]], gamma: int, max_new_tokens: int) -> None:
    """Refuse arguments no decode can run with (neutral names: callers name their own config keys)."""
    if draft is not None and gamma < 1:
        raise ValueError(f"gamma must be >= 1 for speculative decoding, got {gamma} (no draft: target only)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(not p for p in prompts):
        raise ValueError("empty prompt: nothing to condition on")


def left_pad(rows: list[list[int]], pad_id: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows right-aligned in one [B, W] tensor, and the [B, W] mask of their real (non-pad) cells."""
    width = max(len(r) for r in rows)
    if all(len(r) == width for r in rows):  # no padding (every round's newest tokens, mostly): one copy
        ids = torch.tensor(rows, dtype=torch.long, device=dev)
        return ids, torch.ones_like(ids)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            valid[i, width - len(r) :] = 1
    return ids.to(dev), valid.to(dev)


class CroppedCache:
    """Batch-1 back-end: one row, no padding; rejected positions are cropped. With a ``static`` decoder
    (:mod:`selfjudge.cuda_graphs`) the cache is its StaticCache and fixed-shape calls replay CUDA graphs.
    Masks and position ids are implied (one unpadded row) and not passed."""

    def __init__(self, model: torch.nn.Module, vocab: int, static: StaticDecoder | None = None):
        self.model, self.vocab, self.static = model, vocab, static
        self.cache = static.cache if static is not None else DynamicCache(config=model.config)

    def prefill(self, ids, valid, pos) -> None:
        if ids.shape[1]:
            lm_forward(self.model, ids, keep=slice(0, 0), cache=self.cache, use_cache=True)

    def last(self, ids, valid, pos) -> tuple[torch.Tensor, torch.Tensor]:
        """Read ids [1, k]; logits [1, V] and last-layer state [1, H] of the LAST position only."""

        def fn(x):
            out = lm_forward(self.model, x, keep=-1, cache=self.cache, use_cache=True)
            return out.logits[:, : self.vocab], out.hidden

        return self._run(("last", ids.shape[1], self.vocab), fn, ids) if ids.shape[1] <= 2 else fn(ids)

    def verify(self, ids, valid, pos, spec: FeatureSpec, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Read ids [1, k]; logits [1, width, V] and judge states [1, width, F] of the last ``width`` positions
        (a window; the first round's read also holds the prompt, run eagerly: no graph for one use)."""

        def fn(x):
            keep = slice(x.shape[1] - width, None)
            out = forward_with_hidden(self.model, x, spec, keep=keep, use_cache=True, cache=self.cache)
            return out.logits[..., : self.vocab], out.hidden

        return self._run(("verify", width, spec, self.vocab), fn, ids) if ids.shape[1] == width else fn(ids)

    def _run(self, key, fn, ids):
        return fn(ids) if self.static is None else self.static.run(key, fn, ids)

    def keep_first(self, width: int, keep: list[int]) -> None:
        """Of the newest ``width`` positions keep the first keep[0]."""
        if keep[0] < width:
            self.cache.crop(keep[0] - width)  # negative: drop that many positions

    def select(self, rows: torch.Tensor) -> None:
        """The one row finished: nothing to keep."""


class PrefillMemo:
    """The last prefill of each model, kept so that the next decode of the same prompts copies it instead of
    running it again (an eval decodes one batch of prompts with every method in turn; with long prompts the
    prefill is up to half of a batched decode on a CPU). The KV values are the same bytes either way, so
    tokens do not change. Timing stays honest: a copied prefill is charged the seconds it took when it ran.
    Caches must offer ``prefill(ids, valid, pos)`` and ``copy_from(other)``; one entry per model is kept."""

    def __init__(self) -> None:
        self._kept: dict[int, tuple[tuple, object, float]] = {}  # id(model) -> (prompts, cache copy, seconds)

    def keep(self, model: torch.nn.Module, prompts: list[list[int]], cache, seconds: float = 0.0) -> None:
        """Hold ``cache`` (owned from now on) as the prefill of ``prompts`` for ``model``: one made elsewhere,
        such as the AutoJudge regenerations' prefixes cut from the generation's own cache."""
        self._kept[id(model)] = (tuple(map(tuple, prompts)), cache, seconds)

    def fill(self, cache, model: torch.nn.Module, prompts: list[list[int]], ids, valid, pos) -> float:
        """Prefill ``cache``, or copy the kept prefill of these prompts into it; returns the seconds to charge
        minus the seconds spent here (0 when the prefill ran)."""
        key = tuple(map(tuple, prompts))
        kept = self._kept.get(id(model))
        sync(ids.device)
        t0 = time.perf_counter()
        if kept is not None and kept[0] == key:
            cache.copy_from(kept[1])
            sync(ids.device)
            return kept[2] - (time.perf_counter() - t0)
        self._kept.pop(id(model), None)  # the old prompts' copy goes before the new one is made
        cache.prefill(ids, valid, pos)
        sync(ids.device)
        seconds = time.perf_counter() - t0
        twin = copy.copy(cache)  # model and settings shared; its own tensors below
        twin.copy_from(cache)
        self._kept[id(model)] = (key, twin, seconds)
        return 0.0


def run_rounds(
    target: torch.nn.Module,
    draft: torch.nn.Module | None,
    prompts: list[list[int]],
    make_cache: Callable[[torch.nn.Module, str], object],
    *,
    gamma: int,
    max_new_tokens: int,
    eos_ids: list[int],
    vocab: int,
    pad_id: int = 0,
    policy: AcceptRule | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    profile: bool = False,
    schedule: Schedule | None = None,
    confidence_stop: float | None = None,
    trace: FeatureSpec | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
    prefill_memo: PrefillMemo | None = None,
) -> tuple[list[tuple[list[int], DecodeStats]], list[TargetTrace] | None]:
    """Decode every prompt as a row of one batch; returns (new tokens, stats) per prompt, and with
    ``trace`` (target-only) each row's :class:`TargetTrace`. ``make_cache(model, role)`` builds a
    back-end (:class:`CroppedCache` for one row, ``batch_decoding.HoleCache`` for many).

    Each round's wall time is shared equally by the rows active in it, so the rows' ``seconds`` add up
    to the batch's wall time. ``profile``: synchronise the device around each phase so that
    ``draft_seconds``/``verify_seconds``/``rule_seconds`` are exact on CUDA. ``schedule`` picks each
    round's window, one for all rows (default: ``gamma`` every round; :mod:`selfjudge.schedule`), up to
    ``gamma``. ``confidence_stop``: a round stops drafting after a token whose draft probability (top
    of the draft's distribution) is below this in every row. ``on_tokens``: called after each round, for
    each row, with the tokens it committed (one row: streaming; its time counts in ``seconds``).
    ``prefill_memo``: the prompts' prefilled caches are copied from it when it holds them (same model, same
    prompts), else made and left there (:class:`PrefillMemo`)."""
    check_args(draft, prompts, gamma, max_new_tokens)
    if confidence_stop is not None and not 0 <= confidence_stop <= 1:
        raise ValueError(f"confidence_stop must be null or in [0, 1], got {confidence_stop}")
    if trace is not None and draft is not None:
        raise ValueError("a trace records target-only decoding: pass draft=None")
    gamma = gamma if draft is not None else 0
    schedule = schedule if schedule is not None and gamma else FixedWindow(gamma)
    timed = profile or schedule.measures
    spec = policy.feature_spec if policy is not None else FeatureSpec()
    want_logits = temperature > 0 or bool(policy is not None and policy.needs_draft_logits)
    want_hidden = bool(policy is not None and policy.needs_draft_hidden)
    if not prompts:
        return [], ([] if trace is not None else None)
    dev = next(target.parameters()).device
    clock = time.perf_counter
    B = len(prompts)
    stats = [DecodeStats(accept_hist=[0] * (gamma + 1)) for _ in range(B)]
    outs: list[list[int]] = [[] for _ in range(B)]
    steps: list[list[tuple]] = [[] for _ in range(B)]  # trace: (logp, h_final, h_spec) per step
    traces: list[TargetTrace | None] = [None] * B
    eos = set(eos_ids)
    sync(dev)
    t0 = clock()
    tgt = make_cache(target, "target")
    drf = make_cache(draft, "draft") if gamma else None
    swap = 0.0  # a remembered prefill: its measured seconds replace the time spent copying it
    folded = prefill_memo is None  # no prefill to keep: the first round reads the prompts (no pass of its own)
    if folded:
        unread = [list(p) for p in prompts]
    else:
        ids, valid = left_pad([p[:-1] for p in prompts], pad_id, dev)
        pos = (valid.cumsum(-1) - 1).clamp_min(0)
        for c, model in ((tgt, target), (drf, draft)) if drf else ((tgt, target),):
            swap += prefill_memo.fill(c, model, prompts, ids, valid, pos)
        unread = [[p[-1]] for p in prompts]
    rows = list(range(B))  # prompt index of each active row
    length = torch.tensor([len(p) for p in prompts], device=dev)  # [n] committed tokens per row
    t_pending = [list(u) for u in unread]  # committed tokens the target has not read (the newest, after round 1)
    pending = [list(u) for u in unread]  # committed tokens the draft has not read
    sync(dev)
    t_round = clock()
    for r in rows:
        stats[r].prefill_seconds = stats[r].seconds = max(t_round - t0 + swap, 0.0) / B
    first = True
    while rows:
        n_act = len(rows)
        left = [max_new_tokens - len(outs[r]) for r in rows]
        g = schedule.window(min(gamma, max(left) - 1))
        t_draft = t_rule = 0.0
        t_in, t_live = left_pad(t_pending, pad_id, dev)  # [n, k]: the newest token (round 1: the prompt)
        t_pos = (length[:, None] - t_in.shape[1] + torch.arange(t_in.shape[1], device=dev)).clamp_min(0)
        if g <= 0:  # a plain target step for every row
            if trace is None:
                logits, _ = tgt.last(t_in, t_live, t_pos)
            else:
                logits, h_fin, h_spec = tgt.traced(t_in, t_live, t_pos, trace)
            nxt = draw(logits, temperature, generator)  # [n]
            if trace is not None:
                lp = F.log_softmax(logits.float(), -1).gather(-1, nxt[:, None])[:, 0]
                for i, r in enumerate(rows):
                    steps[r].append((lp[i], h_fin[i], h_spec[i]))
            news, kept = [[t] for t in nxt.tolist()], [0] * n_act
            g = 0
            for i, r in enumerate(rows):
                stats[r].rounds += 1
                if drf:
                    pending[i].append(news[i][0])
            length = length + 1
        else:
            # 1. propose: read what each row's draft cache lacks (right-aligned, holes before), then g steps
            inp, live = left_pad(pending, pad_id, dev)
            k = inp.shape[1]
            ps = (length[:, None] - k + torch.arange(k, device=dev)).clamp_min(0)
            toks, lgs, hids = [], [], []
            for s in range(g):
                lg, h = drf.last(inp, live, ps)
                tok = draw(lg, temperature, generator)  # [n]
                toks.append(tok)
                if want_logits:
                    lgs.append(lg)
                if want_hidden:
                    hids.append(h)
                inp, live, ps = tok[:, None], torch.ones_like(tok[:, None]), length[:, None] + s
                if (
                    confidence_stop is not None
                    and s < g - 1
                    and bool((F.softmax(lg.float(), -1).amax(-1) < confidence_stop).all())
                ):
                    break
            g = len(toks)
            D = torch.stack(toks, 1)  # [n, g]
            if timed:
                sync(dev)
            t_draft = clock() - t_round
            # 2. verify the n windows [last, d_1..d_g] in one target pass (round 1: [prompt, d_1..d_g])
            v_pos = torch.cat([t_pos, length[:, None] + torch.arange(g, device=dev)], 1)
            v_live = torch.cat([t_live, torch.ones_like(D)], 1)
            t_log, t_hid = tgt.verify(torch.cat([t_in, D], 1), v_live, v_pos, spec, g + 1)  # [n, g+1, V], [.., F]
            v = Verification(
                D,
                t_log,
                t_hid[:, 1:],
                torch.stack(lgs, 1) if want_logits else None,
                torch.stack(hids, 1) if want_hidden else None,
                temperature,
                t_hid[:, :-1],
            )
            # 3. accept: standard OR rule, within each row's allowance, longest kept prefix + one target token
            std = standard_accept(v, generator)  # [n, g]
            ok = std
            if policy is not None:
                if profile:
                    sync(dev)
                t3 = clock()
                rule = apply_rule(policy, v, std)  # [n, g] or None
                if profile:
                    sync(dev)
                t_rule = clock() - t3
                if rule is not None:
                    ok = std | rule
            props = [min(g, x - 1) for x in left]  # draft tokens each row may keep
            allow = torch.tensor(props, device=dev)
            lim = torch.arange(g, device=dev)[None] < allow[:, None]  # [n, g]
            greedy = temperature <= 0
            packed = torch.cat([D, v.target_argmax if greedy else D[:, :0], ok & lim, std & lim], 1).tolist()
            w = 2 * g + 1 if greedy else g  # one host sync: tokens, argmaxes, masks
            kept = [(x[w : w + g] + [0]).index(0) for x in packed]  # longest kept prefix per row
            n_t = torch.tensor(kept, device=dev)
            corr = [x[g + n] for x, n in zip(packed, kept)] if greedy else correction(v, n_t, allow, generator).tolist()
            news = []
            for i, r in enumerate(rows):
                n, d, std_i = kept[i], packed[i][:g], packed[i][w + g :]
                news.append(d[:n] + [corr[i]])
                st = stats[r]
                st.rounds += 1
                if props[i] > 0:  # else: a plain target step (batch-1 terms)
                    first_std_reject = (std_i + [0]).index(0)
                    st.accepted_by_rule += max(0, n - first_std_reject)
                    st.draft_forwards += props[i]
                    st.proposed += props[i]
                    st.accepted += n
                    st.accept_hist[n] += 1
                pending[i] = [d[g - 1], corr[i]] if n == g else [corr[i]]
            # 4. commit: the target keeps [last, d_1..d_n]; the draft read d_1..d_{g-1}, keeps d_1..d_min(n, g-1)
            tgt.keep_first(g + 1, [n + 1 for n in kept])
            drf.keep_first(g - 1, [min(n, g - 1) for n in kept])
            length = length + n_t + 1
        t_pending = [[x[-1]] for x in news]
        finished = []
        for i, r in enumerate(rows):
            n_out = len(outs[r])
            for t in news[i]:
                outs[r].append(t)
                if t in eos or len(outs[r]) >= max_new_tokens:
                    finished.append(i)
                    break
            if on_tokens is not None:
                on_tokens(outs[r][n_out:])
        if finished:
            if trace is not None:
                for i in finished:
                    lp, hf, hs = (torch.stack(x) for x in zip(*steps[rows[i]]))
                    traces[rows[i]] = TargetTrace(tgt.row_cache(i), lp, hf, hs)
            stay = [i for i in range(n_act) if i not in set(finished)]
            sel = torch.tensor(stay, dtype=torch.long, device=dev)
            for c in (tgt, drf) if drf else (tgt,):
                c.select(sel)
            length = length[sel]
            pending, t_pending = [pending[i] for i in stay], [t_pending[i] for i in stay]
        sync(dev)
        now = clock()
        dt = now - t_round
        if folded and first:  # the prompts' read: prefill time, not a round's cost the schedule should learn
            for r in rows:
                stats[r].prefill_seconds += dt / n_act
                stats[r].seconds += dt / n_act
        else:
            schedule.observe(g, kept, t_draft, dt - t_draft)
            for r in rows:
                st = stats[r]
                st.seconds += dt / n_act
                st.draft_seconds += t_draft / n_act
                st.verify_seconds += (dt - t_draft) / n_act
                st.rule_seconds += t_rule / n_act
        first = False
        if finished:
            rows = [rows[i] for i in stay]
        t_round = now
    for r in range(B):
        stats[r].new_tokens = len(outs[r])
    return list(zip(outs, stats)), (traces if trace is not None else None)


@torch.no_grad()
def decode(
    target: torch.nn.Module,
    draft: torch.nn.Module | None,
    prompt: list[int],
    *,
    gamma: int,
    max_new_tokens: int,
    eos_ids: list[int],
    vocab: int,
    policy: AcceptRule | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    profile: bool = False,
    static_cache: bool = False,
    schedule: Schedule | None = None,
    confidence_stop: float | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> tuple[list[int], DecodeStats]:
    """Decode one prompt; returns (new token ids, stats). ``draft=None``: ``target`` alone (gamma ignored).

    ``vocab``: logit columns both models share (``ModelPair.vocab_size``). ``policy``: an acceptance
    rule (None or ``lossless``: exact). ``profile``: synchronise the device around each phase so that
    ``draft_seconds``/``verify_seconds`` are exact on CUDA (costs a little speed). ``static_cache``:
    static KV caches kept across calls, and on CUDA the fixed-shape steps replay captured CUDA graphs
    (:mod:`selfjudge.cuda_graphs`; the latency mode on a GPU); same tokens as the default path.
    ``schedule``/``confidence_stop``: per-round windows up to ``gamma`` (:func:`run_rounds`).
    ``on_tokens``: called after each round with the tokens it committed (streaming; its time counts in ``seconds``).
    """
    dev = next(target.parameters()).device
    need = len(prompt) + max_new_tokens + gamma + 1  # positions a cache can hold at most

    def make_cache(model, role):
        static = static_decoder(model, role, need, dev.type == "cuda") if static_cache else None
        return CroppedCache(model, vocab, static)

    rows, _ = run_rounds(
        target,
        draft,
        [prompt],
        make_cache,
        gamma=gamma,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        vocab=vocab,
        policy=policy,
        temperature=temperature,
        generator=generator,
        profile=profile,
        schedule=schedule,
        confidence_stop=confidence_stop,
        on_tokens=on_tokens,
    )
    return rows[0]
