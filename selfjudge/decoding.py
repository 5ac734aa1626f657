"""Speculative decoding core: propose, verify, accept, roll back. Batch size 1 (one prompt at a time;
many prompts at once: :mod:`selfjudge.batch_decoding`).

One loop serves every method, so every method is timed the same way: ``decode(target, draft, ...)``
with ``gamma >= 1`` is speculative decoding, ``draft=None`` is plain autoregressive
decoding of ``target``, and draft-only decoding is ``decode(draft, None, ...)``. A round:

1. **propose**: the draft's KV cache covers every committed token but the ones it has not read
   (the newest one, plus the last draft token after a fully accepted window); it reads those, then
   proposes ``γ`` tokens one forward at a time, computing logits for the last position only;
2. **verify**: the target reads ``[last, d_1..d_γ]`` in ONE forward pass over its cache
   (:func:`selfjudge.features.forward_with_hidden`), giving the distributions that judge each ``d_j``
   and the hidden states where ``d_j`` is the input token (the judge's features, docs/method.md);
3. **accept**: ``d_j`` is kept iff the standard test (greedy match, or the speculative-sampling test
   ``u < p/q``) accepts it OR the policy's rule does; the longest kept prefix is committed plus one
   target token: the correction at the first rejection, or the bonus token after a full window;
4. **roll back**: both caches are cropped (``DynamicCache.crop(-k)`` drops the last k positions; a
   static cache, :mod:`selfjudge.cuda_graphs`, rewinds its length), so rejected tokens cost nothing
   more and the draft never re-reads tokens it has cached.

Per round the host waits on the device once (greedy; twice with sampling, for the residual draw).
"""

from __future__ import annotations

import inspect
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


@dataclass
class Proposal:
    """What the draft proposed in one round."""

    tokens: torch.Tensor                 # [γ] d_1..d_γ (long)
    logits: torch.Tensor | None          # [γ, V] draft logits that produced each d_j (None if unused)
    hidden: torch.Tensor | None          # [γ, H_d] draft last-layer state that produced each d_j (None if unused)


@dataclass
class Verification:
    """The target's verify pass over one proposal; what acceptance rules read. Shapes are given for one
    proposal; the batched decoder passes a leading batch dimension [B, ...] and rules work on either."""

    draft_tokens: torch.Tensor           # [γ]
    target_logits: torch.Tensor          # [γ+1, V] (model dtype); row j-1 judges d_j, row γ gives the bonus token
    target_hidden: torch.Tensor          # [γ, F] target state where d_j is the input token
    draft_logits: torch.Tensor | None    # [γ, V]
    draft_hidden: torch.Tensor | None    # [γ, H_d]
    temperature: float                   # 0: greedy
    prev_hidden: torch.Tensor | None = None  # [γ, F] target state whose output judges d_j (input d_{j-1} / last)

    @property
    def scale(self) -> float:
        """Logit divisor of the distributions rules compare: the temperature, or 1 when greedy."""
        return self.temperature if self.temperature > 0 else 1.0

    @cached_property
    def target_logp(self) -> torch.Tensor:          # [γ, V] log p(· | prefix, d_<j)
        return F.log_softmax(self.target_logits[..., :-1, :].float() / self.scale, dim=-1)

    @cached_property
    def draft_logp(self) -> torch.Tensor:           # [γ, V] log q(· | prefix, d_<j)
        if self.draft_logits is None:
            raise ValueError("this rule reads draft logits, but the policy did not ask for them (needs_draft_logits)")
        return F.log_softmax(self.draft_logits.float() / self.scale, dim=-1)

    @cached_property
    def target_argmax(self) -> torch.Tensor:        # [γ+1]
        return self.target_logits.argmax(-1)


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

    new_tokens: int = 0           # tokens generated, correction/bonus and EOS included
    rounds: int = 0               # decode rounds = target forwards after the prefill
    draft_forwards: int = 0       # draft forwards after the prefill (the catch-up read rides on the first one)
    proposed: int = 0             # draft tokens proposed
    accepted: int = 0             # draft tokens kept (by the standard test or the rule)
    accepted_by_rule: int = 0     # kept tokens the standard test alone would have rejected (first rejection on)
    accept_hist: list[int] = field(default_factory=list)  # index n: speculative rounds that kept n draft tokens
    prefill_seconds: float = 0.0  # prompt prefill, both models
    draft_seconds: float = 0.0    # proposing (exact only with profile=True on CUDA)
    verify_seconds: float = 0.0   # target verify passes + acceptance (exact only with profile=True on CUDA)
    rule_seconds: float = 0.0     # the acceptance rule alone (judge head, ...), part of verify_seconds
    seconds: float = 0.0          # wall time of the whole decode, prefill included

    @property
    def target_forwards(self) -> int:
        return self.rounds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_kwarg(body: torch.nn.Module) -> str:
    """transformers >= 5.2x names the cache argument ``cache``; older releases ``past_key_values``."""
    params = inspect.signature(body.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _Runner:
    """One model plus its KV cache; ``seen`` = positions held in the cache. With a ``static`` decoder
    (:mod:`selfjudge.cuda_graphs`) the cache is its StaticCache and fixed-shape calls replay CUDA graphs."""

    def __init__(self, model: torch.nn.Module, vocab: int, static: StaticDecoder | None = None):
        self.model, self.vocab, self.static = model, vocab, static
        self.body = getattr(model, model.base_model_prefix)
        self.head = model.get_output_embeddings()
        self.kw = _cache_kwarg(self.body)
        self.cache = static.cache if static is not None else DynamicCache(config=model.config)
        self.seen = 0

    def prefill(self, ids: torch.Tensor) -> None:                   # ids [1, P]: states only, no logits
        if ids.shape[1]:
            self.body(input_ids=ids, use_cache=True, **{self.kw: self.cache})
            self.seen += ids.shape[1]

    def _last(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(input_ids=ids, use_cache=True, **{self.kw: self.cache}).last_hidden_state[:, -1]  # [1, H]
        return self.head(h)[0, : self.vocab].to(ids.device), h[0].to(ids.device)   # device_map: back home

    def last(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Read ids [1, k]; logits [V] and last-layer state [H] of the LAST position only."""
        out = self._run(("last", ids.shape[1], self.vocab), self._last, ids) if ids.shape[1] <= 2 else self._last(ids)
        self.seen += ids.shape[1]
        return out

    def verify(self, ids: torch.Tensor, spec: FeatureSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Read ids [1, k]; logits [k, V] and judge hidden states [k, F] of every position."""
        def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = forward_with_hidden(self.model, x, spec, use_cache=True, **{self.kw: self.cache})
            return out.logits[0, :, : self.vocab], out.hidden[0]
        res = self._run(("verify", ids.shape[1], spec, self.vocab), fn, ids)
        self.seen += ids.shape[1]
        return res

    def _run(self, key, fn, ids):
        return fn(ids) if self.static is None else self.static.run(key, fn, ids)

    def rollback(self, keep: int) -> None:
        if self.seen > keep:
            if self.static is not None:
                self.static.rewind(self.seen - keep)
            else:
                self.cache.crop(keep - self.seen)                    # negative: drop that many positions
            self.seen = keep


def _draw(logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> torch.Tensor:
    """Next token from logits [..., V]: argmax when greedy, else a sample of softmax(logits / T)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=gen).view(probs.shape[:-1])


def standard_accept(v: Verification, gen: torch.Generator | None = None) -> torch.Tensor:
    """The lossless test per draft token [γ] bool: greedy match, or u < min(1, p(d)/q(d)) when sampling."""
    if v.temperature <= 0:
        return v.target_argmax[:-1] == v.draft_tokens
    idx = v.draft_tokens[:, None]
    ratio = (v.target_logp.gather(-1, idx) - v.draft_logp.gather(-1, idx))[:, 0].exp()   # p/q [γ]
    u = torch.rand(ratio.shape, generator=gen, device=ratio.device)
    return u < ratio


def _correction(v: Verification, n: int, gen: torch.Generator | None, proposed: int | None = None) -> torch.Tensor:
    """The target token after keeping n of ``proposed`` (default γ) draft tokens: the argmax (greedy);
    with sampling a draw from norm(max(p - q, 0)) at a rejected position, or from p after them all."""
    if v.temperature <= 0:
        return v.target_argmax[n]
    p = F.softmax(v.target_logits[n].float() / v.temperature, dim=-1)
    if n < (v.draft_tokens.numel() if proposed is None else proposed):
        resid = (p - v.draft_logp[n].exp()).clamp_min(0)
        total = resid.sum()
        p = torch.where(total > 0, resid / total.clamp_min(1e-30), p)  # p == q: any draw from p is exact
    return torch.multinomial(p, 1, generator=gen)[0]


def setup(draft, prompts: list[list[int]], gamma: int, max_new_tokens: int, policy: AcceptRule | None,
          temperature: float) -> tuple[int, FeatureSpec, bool, bool]:
    """Check the arguments of a decode; (γ, 0 without a draft), the verify pass's feature spec, and
    whether the policy reads the draft's logits and hidden states."""
    if draft is not None and gamma < 1:
        raise ValueError(f"eval.gamma must be >= 1 for speculative decoding, got {gamma} (no draft: target only)")
    if max_new_tokens < 1:
        raise ValueError(f"eval.max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(not p for p in prompts):
        raise ValueError("empty prompt: nothing to condition on")
    spec = policy.feature_spec if policy is not None else FeatureSpec()
    want_logits = temperature > 0 or bool(policy is not None and policy.needs_draft_logits)
    want_hidden = bool(policy is not None and policy.needs_draft_hidden)
    return (gamma if draft is not None else 0), spec, want_logits, want_hidden


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
    on_tokens: Callable[[list[int]], None] | None = None,
) -> tuple[list[int], DecodeStats]:
    """Decode one prompt; returns (new token ids, stats). ``draft=None``: ``target`` alone (gamma ignored).

    ``vocab``: logit columns both models share (``ModelPair.vocab_size``). ``policy``: an acceptance
    rule (None or ``lossless``: exact). ``profile``: synchronise the device around each phase so that
    ``draft_seconds``/``verify_seconds`` are exact on CUDA (costs a little speed). ``static_cache``:
    static KV caches kept across calls, and on CUDA the fixed-shape steps replay captured CUDA graphs
    (:mod:`selfjudge.cuda_graphs`; the latency mode on a GPU); same tokens as the default path.
    ``on_tokens``: called after each round with the tokens it committed (streaming; its time counts in ``seconds``).
    """
    gamma, spec, want_logits, want_hidden = setup(draft, [prompt], gamma, max_new_tokens, policy, temperature)
    dev = next(target.parameters()).device
    clock = time.perf_counter
    _sync(dev)
    t0 = clock()
    st = DecodeStats(accept_hist=[0] * (gamma + 1))
    need = len(prompt) + max_new_tokens + gamma + 1                # positions a cache can hold at most
    tgt = _Runner(target, vocab, static_decoder(target, "target", need, dev.type == "cuda") if static_cache else None)
    drf = _Runner(draft, vocab, static_decoder(draft, "draft", need, dev.type == "cuda") if static_cache else None) \
        if gamma else None
    ids = torch.tensor([prompt], device=dev)                     # [1, P]
    tgt.prefill(ids[:, :-1])
    if drf:
        drf.prefill(ids[:, :-1])
    last = ids[:, -1:]                                           # [1, 1] newest committed token
    pending = last                                               # [1, k] committed tokens the draft has not read
    length = len(prompt)                                         # committed tokens
    eos = set(eos_ids)
    out: list[int] = []
    if profile:
        _sync(dev)
    st.prefill_seconds = clock() - t0
    while True:
        g = min(gamma, max_new_tokens - len(out) - 1)
        if g <= 0:                                               # a plain target step
            t1 = clock()
            logits, _ = tgt.last(last)
            nxt = _draw(logits, temperature, generator).view(1, 1)
            new = [int(nxt)]
            st.rounds += 1
            if drf:
                pending = torch.cat([pending, nxt], 1)
            last = nxt
            length += 1
            st.verify_seconds += clock() - t1
        else:
            # 1. propose: read what the draft has not seen, then γ one-token steps (last-position logits)
            t1 = clock()
            toks, lgs, hids = [], [], []
            inp = pending
            for _ in range(g):
                lg, h = drf.last(inp)
                tok = _draw(lg, temperature, generator)
                toks.append(tok)
                if want_logits:
                    lgs.append(lg)
                if want_hidden:
                    hids.append(h)
                inp = tok.view(1, 1)
            prop = Proposal(torch.stack(toks), torch.stack(lgs) if want_logits else None,
                            torch.stack(hids) if want_hidden else None)
            st.draft_forwards += g
            if profile:
                _sync(dev)
            t2 = clock()
            st.draft_seconds += t2 - t1
            # 2. verify in one target pass over [last, d_1..d_g]
            t_log, t_hid = tgt.verify(torch.cat([last, prop.tokens[None]], 1), spec)
            v = Verification(prop.tokens, t_log, t_hid[1:], prop.logits, prop.hidden, temperature, t_hid[:-1])
            # 3. accept: standard OR rule, longest kept prefix, then one target token
            std = standard_accept(v, generator)
            if policy is not None:
                if profile:
                    _sync(dev)
                t3 = clock()
                rule = policy.accept(v)
                if profile:
                    _sync(dev)
                st.rule_seconds += clock() - t3
            else:
                rule = None
            ok = std if rule is None else std | rule
            if temperature <= 0:   # one host sync: tokens, target argmaxes and both masks together
                packed = torch.cat([prop.tokens, v.target_argmax, ok.long(), std.long()]).tolist()
                d, tgt_max, ok_l, std_l = packed[:g], packed[g:2 * g + 1], packed[2 * g + 1:3 * g + 1], packed[3 * g + 1:]
                n = ok_l.index(0) if 0 in ok_l else g
                corr = v.target_argmax[n:n + 1]
                new = d[:n] + [tgt_max[n]]
            else:
                packed = torch.cat([prop.tokens, ok.long(), std.long()]).tolist()
                d, ok_l, std_l = packed[:g], packed[g:2 * g], packed[2 * g:]
                n = ok_l.index(0) if 0 in ok_l else g
                corr = _correction(v, n, generator).view(1)
                new = d[:n] + [int(corr)]
            first_std_reject = std_l.index(0) if 0 in std_l else g
            st.accepted_by_rule += max(0, n - first_std_reject)
            st.rounds += 1
            st.proposed += g
            st.accepted += n
            st.accept_hist[n] += 1
            # 4. roll back: the target keeps all committed tokens but the newest; the draft read last, d_1..d_{g-1}
            tgt.rollback(length + n)
            drf.rollback(length + min(n, g - 1))
            pending = torch.cat([prop.tokens[g - 1:], corr])[None] if n == g else corr[None]   # [1, 2] or [1, 1]
            last = corr[None]
            length += n + 1
            if profile:
                _sync(dev)
            st.verify_seconds += clock() - t2
        stop, n_out = False, len(out)
        for t in new:
            out.append(t)
            if t in eos:
                stop = True
                break
        if on_tokens is not None:
            on_tokens(out[n_out:])
        if stop or len(out) >= max_new_tokens:
            break
    st.new_tokens = len(out)
    _sync(dev)
    st.seconds = clock() - t0
    return out, st


def autoregressive(model: torch.nn.Module, prompt: list[int], **kwargs) -> tuple[list[int], DecodeStats]:
    """Plain decoding of one model (target-only or draft-only) through the same loop and timers."""
    return decode(model, None, prompt, gamma=0, **kwargs)
