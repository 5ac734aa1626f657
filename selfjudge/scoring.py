"""SelfJudge scores: teacher-forced draft mismatches and the semantic-preservation score LD_N.

For a prompt ``x`` (P tokens) and the target's greedy response ``y`` (T tokens):
  d_i        = argmax q(. | x, y_<i)                     (one draft pass over x ⊕ y)
  M          = {i < T-1 : d_i != y_i}
  Orig_N(i)  = mean_{k=0..n} log p(y_{i+k} | x, y_<i+k)                  n = min(N, T-1-i)
  Alt_N(i)   = mean([log p(d_i | x, y_<i)] + [s_k(i) for k = 1..n])
  s_k(i)     = log p(y_{i+k} | x, ỹ_<i+k)   (continuation)   or   max_v log p(v | x, ỹ_<i+k)  (max_logprob)
  LD_N(i)    = Orig_N(i) - Alt_N(i)

:func:`score_response` (fast) takes the target's KV cache of x ⊕ y (from the generation that made y,
or from one pass over x ⊕ y), then scores all mismatch windows of the response in packed passes:
window i's n tokens (d_i, y_{i+1}, ..., y_{i+n-1}) sit at positions P+i.. and attend to the cached prefix x ⊕ y_<i and causally within the window,
through one 4D mask. :func:`score_response_naive` recomputes x ⊕ ỹ in full per mismatch: the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfjudge.features import FeatureSpec, forward_with_hidden, judge_features, scalar_features
from selfjudge.forward import lm_forward
from selfjudge.generation import TargetTrace
from selfjudge.judge_metrics import quantile as quantile_of

SCORE_VARIANTS = ("continuation", "max_logprob")


@dataclass
class ScoredResponse:
    positions: torch.Tensor  # [M] mismatch positions (index into the response)
    target_tokens: torch.Tensor  # [M] y_i
    draft_tokens: torch.Tensor  # [M] d_i
    orig: torch.Tensor  # [M] Orig_N(i)
    alt: torch.Tensor  # [M] Alt_N(i)
    ld: torch.Tensor  # [M] LD_N(i)
    sub_features: torch.Tensor  # [M, D] features of d_i at i (state at i of ỹ: input token d_i)
    orig_features: torch.Tensor  # [M, D] features of y_i at i (state at i of y: input y_i): label-0 negatives
    n_tokens: int  # response length T


def _logprobs(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    return F.log_softmax(logits[..., :vocab].float(), dim=-1)


@torch.no_grad()
def draft_proposals(draft, ids: torch.Tensor, P: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forced draft argmax for every response position, the draft state that produced it, and
    the draft's logits there.

    ids: [1, P+T]. Returns d [T], draft hidden [T, H_d] (the state at position P+i-1 predicts d_i) and
    logits [T, V] (model dtype).
    """
    out = lm_forward(draft, ids, keep=slice(P - 1, -1), use_cache=False)  # the LM head on y's positions only
    logits = out.logits[0, :, :vocab]  # [T, V]
    return logits.argmax(-1), out.hidden[0], logits


def _pair_features(spec: FeatureSpec, pos, d, y, t_logits, d_logits, d_hidden, prev, cur_orig, cur_sub):
    """Features of d_i (substituted) and y_i (original) at every mismatch i, by :func:`judge_features`.

    t_logits: [M, V] target logits predicting position i; d_logits: [T, V] draft logits; prev: [M, F]
    target state at i-1; cur_orig / cur_sub: [M, F] target states at i reading y_i / d_i."""
    dh = d_hidden[pos] if spec.include_draft else None
    sub_sc = orig_sc = None
    if spec.scalars:
        lq = d_logits[pos] if spec.needs_draft_logits else None
        sub_sc = scalar_features(spec.scalars, t_logits, d[pos], lq)
        orig_sc = scalar_features(spec.scalars, t_logits, y[pos], lq)
    sub = judge_features(cur_sub, spec, dh, prev_hidden=prev, scalars=sub_sc)
    orig = judge_features(cur_orig, spec, dh, prev_hidden=prev, scalars=orig_sc)
    return sub, orig


def _window_lengths(positions: torch.Tensor, T: int, window: int) -> torch.Tensor:
    return torch.clamp(T - 1 - positions, max=window)  # n_i >= 1 since i < T-1


def _alt_terms(logp_win: torch.Tensor, targets: torch.Tensor, variant: str) -> torch.Tensor:
    """s_k for one window: logp_win [n, V] at inputs (d_i, y_{i+1}, ...), targets y_{i+1..i+n}."""
    if variant == "continuation":
        return logp_win.gather(-1, targets[:, None])[:, 0]
    return logp_win.max(-1).values


@torch.no_grad()
def score_response(
    target,
    draft,
    prompt_ids: list[int],
    response_ids: list[int],
    vocab: int,
    window: int = 20,
    variant: str = "continuation",
    spec: FeatureSpec = FeatureSpec(),
    max_packed_tokens: int = 2048,
    trace: TargetTrace | None = None,
    after: int = -1,
) -> ScoredResponse:
    """Score every mismatch of one response with packed windows over the cached prefix (fast path).

    With ``trace`` (from :func:`~selfjudge.generation.greedy_batch_traced`, same ``spec``) the target's
    pass over x ⊕ y is the one generation already made: only the draft pass and the windows run here.
    Without it, one target pass over x ⊕ y builds the cache first. ``after``: only the mismatches at positions
    after it (those of a response an AutoJudge search carried on along after a kept swap).
    """
    if variant not in SCORE_VARIANTS:
        raise ValueError(f"data_gen.score_variant '{variant}' is not one of {SCORE_VARIANTS}")
    dev = next(target.parameters()).device
    P, T = len(prompt_ids), len(response_ids)
    if P < 1:
        raise ValueError("score_response needs a non-empty prompt (the first response token is predicted from it)")
    ids = torch.tensor([prompt_ids + response_ids], device=dev)  # [1, P+T]
    y = ids[0, P:]  # [T]
    d, d_hidden, d_logits = draft_proposals(draft, ids, P, vocab)
    d = d.to(dev)
    pos = torch.nonzero(d[: T - 1] != y[: T - 1]).flatten()  # [M]
    pos = pos[pos > after]
    if trace is None:
        full = forward_with_hidden(target, ids, spec, use_cache=True)
        logp = _logprobs(full.logits[0, P - 1 : -1], vocab)  # [T, V]: predicts y_0..y_{T-1}
        logp_y = logp.gather(-1, y[:, None])[:, 0]  # [T]
        t_logits = full.logits[0, P - 1 : -1][pos][:, :vocab]  # [M, V] predicts position i
        lp_pos = logp[pos]  # [M, V] log p(. | x, y_<i)
        hid_pos = full.hidden[0, P:][pos]  # [M, F] state at input y_i
        prev = full.hidden[0, P - 1 :][pos]  # [M, F] state at i-1 (output p)
        cache = full.past_key_values
    else:
        want = len(spec.layers) * trace.h_final.shape[-1]
        if trace.logp_chosen.numel() != T or trace.h_spec.shape[-1] != want:
            raise ValueError(
                f"the trace covers {trace.logp_chosen.numel()} tokens with {trace.h_spec.shape[-1]} "
                f"feature values; this response has {T} tokens and features.layers={list(spec.layers)} "
                f"needs {want}: pass the trace made for this response with the same spec"
            )
        logp_y = trace.logp_chosen.to(dev)
        head = target.get_output_embeddings()
        t_logits = head(trace.h_final[pos]).to(dev)[:, :vocab]  # [M, V] predicts position i
        lp_pos = _logprobs(t_logits, vocab)  # [M, V]
        hid_pos = trace.h_spec[pos + 1]  # step i+1's input is y_i
        prev = trace.h_spec[pos]  # step i's output is p(. | x, y_<i)
        cache = trace.cache
    logp_d = lp_pos.gather(-1, d[pos][:, None])[:, 0]  # [M] log p(d_i | x, y_<i)
    M = pos.numel()
    n = _window_lengths(pos, T, window)
    orig = torch.stack([logp_y[i : i + k + 1].mean() for i, k in zip(pos.tolist(), n.tolist())]) if M else logp_y[:0]
    alt, sub_hidden = _score_windows(
        target,
        cache,
        P,
        y,
        d,
        logp_d,
        pos,
        n,
        vocab,
        variant,
        spec,
        max_packed_tokens,
        hid_pos.shape[-1],
        hid_pos.dtype,
    )
    sub_feat, orig_feat = _pair_features(spec, pos, d, y, t_logits, d_logits, d_hidden, prev, hid_pos, sub_hidden)
    return ScoredResponse(
        pos.cpu(),
        y[pos].cpu(),
        d[pos].cpu(),
        orig.float().cpu(),
        alt.cpu(),
        (orig.float() - alt).cpu(),
        sub_feat.cpu(),
        orig_feat.cpu(),
        T,
    )


def _score_windows(target, cache, P, y, d, logp_d, pos, n, vocab, variant, spec, max_packed_tokens, F_dim, h_dtype):
    """Alt_N and the substituted-position states of every window, in packed passes over ``cache``
    (which holds at least x ⊕ y_<i for every window start i; it is cropped back after each pass)."""
    dev, dtype = y.device, next(target.parameters()).dtype
    M = pos.numel()
    alt = torch.empty(M, device=dev)
    sub_hidden = torch.empty(M, F_dim, device=dev, dtype=h_dtype)
    L = cache.get_seq_length()
    start = 0
    while start < M:  # chunks of windows, each one packed pass over the cached prefix
        end, total = start, 0
        while end < M and (total + int(n[end]) <= max_packed_tokens or end == start):
            total += int(n[end])
            end += 1
        toks, posn, owner = [], [], []
        for j in range(start, end):
            i, k = int(pos[j]), int(n[j])
            toks.append(torch.cat([d[i : i + 1], y[i + 1 : i + k]]))
            posn.append(torch.arange(P + i, P + i + k, device=dev))
            owner.append(torch.full((k,), j, device=dev))
        toks_t, posn_t, owner_t = torch.cat(toks), torch.cat(posn), torch.cat(owner)  # [W]
        W = toks_t.numel()
        # Allowed: cached key c < position of the query's window start (the prefix x ⊕ y_<i),
        # and window keys of the same window at or before the query.
        win_start = torch.tensor([P + int(pos[j]) for j in range(start, end)], device=dev)
        qs = win_start[owner_t - start]  # [W]
        prefix_ok = torch.arange(L, device=dev)[None, :] < qs[:, None]  # [W, L]
        same = owner_t[:, None] == owner_t[None, :]
        causal = torch.arange(W, device=dev)[None, :] <= torch.arange(W, device=dev)[:, None]
        allowed = torch.cat([prefix_ok, same & causal], dim=1)  # [W, L+W] bool
        # Additive float mask: sdpa takes it as is, and eager attention (which adds the mask to the
        # scores) would misread a bool one. A 4D mask bypasses transformers' own mask building.
        mask = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)
        mask = mask[None, None]  # [1, 1, W, L+W]
        out = forward_with_hidden(
            target,
            toks_t[None],
            spec,
            cache=cache,
            attention_mask=mask,
            position_ids=posn_t[None],
            use_cache=True,
        )
        cache.crop(-W)  # back to the prefix
        lp = _logprobs(out.logits[0], vocab)  # [W, V]
        off = 0
        for j in range(start, end):
            i, k = int(pos[j]), int(n[j])
            s = _alt_terms(lp[off : off + k], y[i + 1 : i + k + 1], variant)  # [k]
            alt[j] = torch.cat([logp_d[j][None], s]).mean()
            sub_hidden[j] = out.hidden[0, off]
            off += k
        start = end
    return alt, sub_hidden


@torch.no_grad()
def score_response_naive(
    target,
    draft,
    prompt_ids: list[int],
    response_ids: list[int],
    vocab: int,
    window: int = 20,
    variant: str = "continuation",
    spec: FeatureSpec = FeatureSpec(),
    limit: int | None = None,
    after: int = -1,
) -> ScoredResponse:
    """Reference scorer: one full forward over x ⊕ ỹ per mismatch, no cache (the test oracle).

    ``limit``: score only the first ``limit`` mismatches (benchmarks time the oracle on a subset); ``after``: only
    those at positions after it.
    """
    if variant not in SCORE_VARIANTS:
        raise ValueError(f"data_gen.score_variant '{variant}' is not one of {SCORE_VARIANTS}")
    dev = next(target.parameters()).device
    P, T = len(prompt_ids), len(response_ids)
    ids = torch.tensor([prompt_ids + response_ids], device=dev)
    y = ids[0, P:]
    d, d_hidden, d_logits = draft_proposals(draft, ids, P, vocab)
    d = d.to(dev)
    full = forward_with_hidden(target, ids, spec, use_cache=False)
    logp = _logprobs(full.logits[0, P - 1 : -1], vocab)
    pos = torch.nonzero(d[: T - 1] != y[: T - 1]).flatten()
    pos = pos[pos > after][:limit]
    orig, alt, sub_h = [], [], []
    for i in pos.tolist():
        k = min(window, T - 1 - i)
        orig.append(logp[torch.arange(i, i + k + 1), y[i : i + k + 1]].mean())
        swapped = ids.clone()
        swapped[0, P + i] = d[i]
        o = forward_with_hidden(target, swapped, spec, use_cache=False)
        lp = _logprobs(o.logits[0, P + i : P + i + k], vocab)  # predicts y_{i+1..i+k}
        s = _alt_terms(lp, y[i + 1 : i + k + 1], variant)
        alt.append(torch.cat([logp[i, d[i]][None], s]).mean())
        sub_h.append(o.hidden[0, P + i])
    H = full.hidden.shape[-1]
    orig_t = torch.stack(orig) if orig else torch.empty(0, device=dev)
    alt_t = torch.stack(alt) if alt else torch.empty(0, device=dev)
    sub = torch.stack(sub_h) if sub_h else torch.empty(0, H, device=dev)
    sub_f, orig_f = _pair_features(
        spec,
        pos,
        d,
        y,
        full.logits[0, P - 1 : -1][pos][:, :vocab],
        d_logits,
        d_hidden,
        full.hidden[0, P - 1 :][pos],
        full.hidden[0, P:][pos],
        sub,
    )
    return ScoredResponse(
        pos.cpu(),
        y[pos].cpu(),
        d[pos].cpu(),
        orig_t.cpu(),
        alt_t.cpu(),
        (orig_t - alt_t).cpu(),
        sub_f.cpu(),
        orig_f.cpu(),
        T,
    )


def label_rule(ld: torch.Tensor, tau: float) -> torch.Tensor:
    """1 (important: reject) iff LD > tau."""
    return (ld > tau).to(torch.int8)


def tau_from_rule(all_ld: torch.Tensor, mode: str, value: float, quantile: float) -> float:
    """τ by value, or as a quantile of the LD distribution (e.g. 0.6 -> about 40 % positives)."""
    if mode == "value":
        return float(value)
    if mode == "quantile":
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"data_gen.tau.quantile must be in (0, 1), got {quantile}")
        if all_ld.numel() == 0:
            raise ValueError("no mismatches were scored: cannot set data_gen.tau by quantile")
        return quantile_of(all_ld, quantile)  # numpy: no input-size limit (torch.quantile: < 2^24)
    raise ValueError(f"data_gen.tau.mode must be 'value' or 'quantile', got '{mode}'")
