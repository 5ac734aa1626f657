"""Target greedy responses, batched: left padding, an attention mask and a KV cache; each row stops at
its own EOS or after ``max_new_tokens``. In fp32 every row equals unbatched greedy decoding.

The loop is written out (not ``model.generate``) so that no generation-config setting of the
checkpoint (repetition penalty, sampling defaults) can change the response, and so that the argmax
runs over the shared vocabulary only (``pair.vocab_size`` columns).
"""

from __future__ import annotations

from typing import Iterator

import torch
from transformers import DynamicCache


def fixed_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted, stable): the same lengths always give
    the same batches, so a resumed run pads every prompt exactly as an uninterrupted one."""
    if batch_size < 1:
        raise ValueError(f"data_gen.batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[b : b + batch_size] for b in range(0, len(order), batch_size)]


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
    for _ in range(max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, cache=cache,
                       use_cache=True, logits_to_keep=1).logits          # [B, 1, V]
        nxt = logits[:, -1, :vocab].argmax(-1)                         # [B]
        for r in torch.nonzero(~done).flatten().tolist():
            out[r].append(int(nxt[r]))
        done |= torch.isin(nxt, eos)
        if bool(done.all()):
            break
        step_ids = torch.where(done, torch.full_like(nxt, pad_id), nxt)[:, None]   # [B, 1]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
    return out


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
        for i, resp in zip(idx, greedy_batch(model, [prompts[i] for i in idx], max_new_tokens, eos_ids, pad_id, vocab)):
            yield i, resp
