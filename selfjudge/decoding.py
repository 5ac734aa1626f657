"""Speculative decoding core: propose, verify, accept, roll back (batch size 1).

One loop serves every method: ``gamma=0`` is target-only autoregressive decoding (each round is one
target forward and one new token), and decoding the draft alone is the same loop with the draft as
the verifier. A round with ``gamma >= 1``:

1. the draft, whose KV cache covers every committed token but the last, reads the tokens it has not
   seen (the last committed one, plus the final draft token after a fully accepted window) and then
   proposes ``gamma`` tokens one at a time;
2. the target reads ``[last, d_1..d_gamma]`` in one forward pass over its cache, giving the
   distributions that judge each ``d_j`` and the hidden state where ``d_j`` is the input (the judge's
   feature, METHOD §2.8);
3. ``d_j`` is kept iff the standard test accepts it OR the policy's rule does; the longest kept prefix
   is committed plus one target token (the correction at the first rejection, or the bonus token);
4. both caches are cropped back to the committed length, so rejected tokens cost nothing more.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from selfjudge.features import FeatureSpec, forward_with_hidden


@dataclass
class Proposal:
    tokens: torch.Tensor          # [γ] draft tokens d_1..d_γ
    logits: torch.Tensor          # [γ, V] draft logits that produced them (float32, vocab-sliced)
    hidden: torch.Tensor          # [γ, H_d] draft state that produced each d_j


@dataclass
class Verification:
    draft_tokens: torch.Tensor    # [γ]
    target_logits: torch.Tensor   # [γ+1, V] row j-1 judges d_j; row γ gives the bonus token
    target_hidden: torch.Tensor   # [γ, F] target state where d_j is the input token
    draft_logits: torch.Tensor    # [γ, V]
    draft_hidden: torch.Tensor    # [γ, H_d]
    temperature: float


@dataclass
class DecodeStats:
    """Counts for one decoded example. Metrics derived from them are defined in selfjudge.metrics."""

    new_tokens: int = 0           # tokens generated (correction/bonus included, EOS included)
    target_forwards: int = 0      # verify passes (= rounds), prefill excluded
    draft_forwards: int = 0       # draft passes, prefill excluded
    proposed: int = 0             # draft tokens proposed
    accepted: int = 0             # draft tokens kept
    accept_hist: list[int] = field(default_factory=list)  # index n: rounds that kept n draft tokens
    seconds: float = 0.0          # wall time, prefill included


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Model:
    """A model with its KV cache; ``seen`` = number of tokens in the cache."""

    def __init__(self, model, spec: FeatureSpec, vocab: int):
        self.model, self.spec, self.vocab = model, spec, vocab
        self.body = getattr(model, model.base_model_prefix)
        self.cache = None
        self.seen = 0

    def prefill(self, ids: torch.Tensor) -> None:                  # ids [1, P-1]: no logits needed
        if ids.numel():
            out = self.body(input_ids=ids, cache=self.cache, use_cache=True)
            self.cache = out.past_key_values
            self.seen += ids.shape[1]

    def step(self, ids: torch.Tensor, spec: FeatureSpec | None = None):  # ids [1, k]
        out = forward_with_hidden(self.model, ids, spec or self.spec, cache=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.seen += ids.shape[1]
        return out.logits[0, :, : self.vocab].float(), out.hidden[0]  # [k, V], [k, F]

    def rollback(self, keep: int) -> None:
        if self.seen > keep:
            self.cache.crop(keep - self.seen)
            self.seen = keep


def _sample(logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[..., 0]


def _standard_accept(v: Verification, gen: torch.Generator | None) -> torch.Tensor:
    """Lossless test per draft token: greedy match, or the speculative-sampling test min(1, p/q)."""
    tl = v.target_logits[:-1]
    if v.temperature <= 0:
        return tl.argmax(-1) == v.draft_tokens
    p = F.softmax(tl / v.temperature, -1).gather(-1, v.draft_tokens[:, None])[:, 0]
    q = F.softmax(v.draft_logits / v.temperature, -1).gather(-1, v.draft_tokens[:, None])[:, 0]
    u = torch.rand(p.shape, generator=gen, device=p.device)
    return u < (p / q.clamp_min(1e-20)).clamp(max=1.0)


def _correction(v: Verification, j: int, gen: torch.Generator | None) -> torch.Tensor:
    """The target token after keeping j draft tokens (argmax, residual sample, or bonus sample)."""
    logits = v.target_logits[j]
    if v.temperature <= 0:
        return logits.argmax(-1)
    p = F.softmax(logits / v.temperature, -1)
    if j < v.draft_tokens.numel():  # rejected by the sampling test: sample from norm(max(p - q, 0))
        q = F.softmax(v.draft_logits[j] / v.temperature, -1)
        resid = (p - q).clamp_min(0)
        p = resid / resid.sum() if resid.sum() > 0 else p
    return torch.multinomial(p, 1, generator=gen)[0]


@torch.no_grad()
def decode(
    target,
    draft,
    prompt: list[int],
    *,
    gamma: int,
    max_new_tokens: int,
    eos_ids: list[int],
    vocab: int,
    policy=None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    feature_spec: FeatureSpec = FeatureSpec(),
) -> tuple[list[int], DecodeStats]:
    """Decode one prompt. ``gamma=0`` (or ``draft=None``) is target-only decoding. Returns (new ids, stats)."""
    if gamma < 0:
        raise ValueError(f"eval.gamma must be >= 1 for speculative decoding (0: target only), got {gamma}")
    if draft is None:
        gamma = 0
    dev = next(target.parameters()).device
    _sync(dev)
    t0 = time.perf_counter()
    stats = DecodeStats(accept_hist=[0] * (gamma + 1))
    tgt = _Model(target, feature_spec, vocab)
    drf = _Model(draft, FeatureSpec(), vocab) if gamma else None
    ids = torch.tensor([prompt], device=dev)
    tgt.prefill(ids[:, :-1])
    if drf:
        drf.prefill(ids[:, :-1])
    committed: list[int] = list(prompt)
    pending = ids[:, -1:]                                # tokens the draft has not read yet
    eos = set(eos_ids)
    out: list[int] = []
    while len(out) < max_new_tokens:
        g = min(gamma, max_new_tokens - len(out) - 1)
        last = torch.tensor([[committed[-1]]], device=dev)
        if g <= 0:  # a plain target step
            logits, _ = tgt.step(last)
            new = [int(_sample(logits[-1], temperature, generator))]
            stats.target_forwards += 1
            if drf:
                pending = torch.cat([pending, torch.tensor([new], device=dev)], 1)
        else:
            # 1. propose
            d_tok, d_log, d_hid = [], [], []
            inp = pending
            for _ in range(g):
                lg, hd = drf.step(inp)
                t = _sample(lg[-1], temperature, generator)
                d_tok.append(t), d_log.append(lg[-1]), d_hid.append(hd[-1])
                inp = t.view(1, 1)
            stats.draft_forwards += g
            prop = Proposal(torch.stack(d_tok), torch.stack(d_log), torch.stack(d_hid))
            # 2. verify in one target pass
            t_log, t_hid = tgt.step(torch.cat([last, prop.tokens[None]], 1))
            stats.target_forwards += 1
            v = Verification(prop.tokens, t_log, t_hid[1:], prop.logits, prop.hidden, temperature)
            # 3. accept: standard OR rule, longest prefix
            ok = _standard_accept(v, generator)
            if policy is not None:
                ok = ok | policy.accept(v)
            n = int(torch.cumprod(ok.to(torch.int64), 0).sum())
            corr = _correction(v, n, generator)
            new = prop.tokens[:n].tolist() + [int(corr)]
            stats.proposed += g
            stats.accepted += n
            stats.accept_hist[n] += 1
            # 4. roll back: caches keep every committed token but the newest
            base = len(committed)
            tgt.rollback(base + n)
            drf.rollback(base - 1 + min(n + 1, g))  # the draft read last, d_1..d_{g-1}
            pending = torch.tensor([new[-2:] if n == g else new[-1:]], device=dev)
        for k, t in enumerate(new):
            out.append(t)
            committed.append(t)
            if t in eos or len(out) >= max_new_tokens:
                new = new[: k + 1]
                break
        else:
            continue
        break
    stats.new_tokens = len(out)
    _sync(dev)
    stats.seconds = time.perf_counter() - t0
    return out, stats
