"""Target greedy responses, batched with left padding and a KV cache, stopping per row at EOS."""

from __future__ import annotations

from typing import Iterator

import torch


@torch.no_grad()
def greedy_responses(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    batch_size: int = 8,
) -> Iterator[tuple[int, list[int]]]:
    """Yield (prompt index, response ids) in batches of similar length; the response ends with its EOS
    token when one was produced, and has at most ``max_new_tokens`` tokens."""
    dev = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]) :] = 1
        out = model.generate(
            input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=eos_ids, pad_token_id=pad_id, temperature=None, top_p=None, top_k=None,
        )
        for r, i in enumerate(idx):
            resp = out[r, width:].tolist()
            for k, t in enumerate(resp):
                if t in eos_ids:
                    resp = resp[: k + 1]
                    break
            yield i, resp
