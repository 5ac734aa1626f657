"""Target greedy responses, batched: left padding, an attention mask and a KV cache; each row stops at
its own EOS or after ``max_new_tokens``. In fp32 every row equals unbatched greedy decoding.

The loop is written out (not ``model.generate``) so that no generation-config setting of the
checkpoint (repetition penalty, sampling defaults) can change the response, and so that the argmax
runs over the shared vocabulary only (``pair.vocab_size`` columns).

:func:`greedy_batch_traced` also keeps, per response, what the decoding already computed: the KV
cache of x ⊕ y, the log-probability of each chosen token and the hidden states at every step
(:class:`TargetTrace`). The fast SelfJudge scorer reads the trace instead of running the target
over x ⊕ y a second time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from selfjudge.features import FeatureSpec


@dataclass
class TargetTrace:
    """The target's own pass over x ⊕ y, recorded while it generated y (P prompt, T response tokens).

    Step s (s = 0..T-1) is the position whose output predicts y_s: the last prompt token for s = 0,
    the input y_{s-1} after that. ``cache`` holds x ⊕ y_<T-1 (P+T-1 positions): every prefix a
    mismatch window needs, since windows start at i <= T-2.
    """
    cache: DynamicCache          # one row, no padding
    logp_chosen: torch.Tensor    # [T] float32: log p(y_s | x, y_<s)
    h_final: torch.Tensor        # [T, H] post-norm last-layer state at step s (the LM head's input)
    h_spec: torch.Tensor         # [T, F] judge-feature states at step s (FeatureSpec layers)


def fixed_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted, stable): the same lengths always give
    the same batches, so a resumed run pads every prompt exactly as an uninterrupted one."""
    if batch_size < 1:
        raise ValueError(f"data_gen.batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[b : b + batch_size] for b in range(0, len(order), batch_size)]


def _step(model, ids, spec: FeatureSpec | None, **kw) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One decoding step: next-token logits [B, V] and, when tracing, the last position's post-norm
    state [B, H] and feature states [B, F]. The LM head runs on the last position only."""
    home = ids.device                                                  # device_map: outputs come back here
    if spec is None:
        return model(input_ids=ids, logits_to_keep=1, **kw).logits[:, -1].to(home), None, None
    if spec.last_layer_only:
        h = getattr(model, model.base_model_prefix)(input_ids=ids, **kw).last_hidden_state[:, -1]
        return model.get_output_embeddings()(h).to(home), h.to(home), h.to(home)
    out = model(input_ids=ids, logits_to_keep=1, output_hidden_states=True, **kw)
    hs = out.hidden_states
    return (out.logits[:, -1].to(home), hs[-1][:, -1].to(home),
            torch.cat([hs[i][:, -1].to(home) for i in spec.layers], dim=-1))


def _row_cache(model, cache: DynamicCache, r: int, start: int, stop: int) -> DynamicCache:
    """Row ``r`` of a batch cache, key/value columns [start, stop) (its prompt and response, no padding)."""
    row = DynamicCache(config=model.config)
    for li, layer in enumerate(cache.layers):
        row.update(layer.keys[r : r + 1, :, start:stop], layer.values[r : r + 1, :, start:stop], li)
    return row


@torch.no_grad()
def greedy_batch(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    vocab: int,
) -> list[list[int]]:
    """Greedy responses of one batch. A response ends with its EOS token when one was produced."""
    return _greedy(model, prompts, max_new_tokens, eos_ids, pad_id, vocab, None)[0]


@torch.no_grad()
def greedy_batch_traced(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    vocab: int,
    spec: FeatureSpec = FeatureSpec(),
) -> tuple[list[list[int]], list[TargetTrace]]:
    """:func:`greedy_batch` plus each response's :class:`TargetTrace` (feature states per ``spec``)."""
    return _greedy(model, prompts, max_new_tokens, eos_ids, pad_id, vocab, spec)


def _greedy(model, prompts, max_new_tokens, eos_ids, pad_id, vocab, spec):
    dev = next(model.parameters()).device
    B, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p) :] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)                          # [B, W]: padding does not shift positions
    eos = torch.tensor(sorted(set(eos_ids)), device=dev)
    cache = DynamicCache(config=model.config)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    step_ids, step_pos = ids, pos
    lp_steps, hf_steps, hs_steps = [], [], []                          # per step: [B], [B, H], [B, F]
    for _ in range(max_new_tokens):
        logits, h_final, h_spec = _step(model, step_ids, spec, attention_mask=mask, position_ids=step_pos,
                                        cache=cache, use_cache=True)   # [B, V]
        logits = logits[:, :vocab]
        nxt = logits.argmax(-1)                                        # [B]
        if spec is not None:
            lp_steps.append(F.log_softmax(logits.float(), -1).gather(-1, nxt[:, None])[:, 0])
            hf_steps.append(h_final)
            hs_steps.append(h_spec)
        for r in torch.nonzero(~done).flatten().tolist():
            out[r].append(int(nxt[r]))
        done |= torch.isin(nxt, eos)
        if bool(done.all()):
            break
        step_ids = torch.where(done, torch.full_like(nxt, pad_id), nxt)[:, None]   # [B, 1]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
    if spec is None:
        return out, None
    lp, hf, hs = torch.stack(lp_steps, 1), torch.stack(hf_steps, 1), torch.stack(hs_steps, 1)  # [B, S, ...]
    traces = []
    for r, (p, y) in enumerate(zip(prompts, out)):
        T = len(y)
        traces.append(TargetTrace(_row_cache(model, cache, r, width - len(p), width + T - 1),
                                  lp[r, :T].clone(), hf[r, :T].clone(), hs[r, :T].clone()))
    return out, traces


def greedy_responses(
    model: torch.nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    vocab: int,
    batch_size: int = 8,
) -> Iterator[tuple[int, list[int]]]:
    """Yield (prompt index, greedy response) for every prompt, in batches of similar length."""
    for idx in fixed_batches([len(p) for p in prompts], batch_size):
        yield from zip(idx, greedy_batch(model, [prompts[i] for i in idx], max_new_tokens, eos_ids, pad_id, vocab))
