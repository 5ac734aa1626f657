"""AutoJudge-style labels (Garipov et al., 2025) for tasks with an answer checker.

For each of the first ``max_mismatches`` mismatches of a response, in order, the draft token is put
in place of the target's, the target regenerates greedily from there, and the mismatch is labelled
important (1) if the task score of the regenerated answer differs from the original answer's score.
Unlike the original, which searches mismatches sequentially along the regenerated text, every
mismatch here is judged against the same original response, so the labels sit beside the SelfJudge
labels of exactly the same mismatches. Mismatches past the budget keep -1 (not computed).
"""

from __future__ import annotations

from typing import Any

import torch

from selfjudge.models import ModelPair
from selfjudge.tasks import Example, Task


@torch.no_grad()
def autojudge_labels(
    pair: ModelPair,
    task: Task,
    example: Example,
    prompt: list[int],
    response: list[int],
    positions: torch.Tensor,
    draft_tokens: torch.Tensor,
    cfg: dict[str, Any],
) -> list[int]:
    """One label per mismatch (1 important, 0 not, -1 not computed)."""
    tok = pair.tokenizer
    base = task.score(example, tok.decode(response, skip_special_tokens=True))
    labels = [-1] * len(positions)
    if base is None:
        return labels
    dev = next(pair.target.parameters()).device
    budget = int(cfg.get("max_mismatches", 8))
    for j, (i, d) in enumerate(zip(positions.tolist()[:budget], draft_tokens.tolist()[:budget])):
        prefix = prompt + response[:i] + [d]
        remaining = max(1, int(cfg.get("max_new_tokens", 256)) - i - 1)
        out = pair.target.generate(
            input_ids=torch.tensor([prefix], device=dev), max_new_tokens=remaining, do_sample=False,
            eos_token_id=pair.eos_ids, pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None,
        )
        new = response[:i] + [d] + out[0, len(prefix):].tolist()
        labels[j] = int(task.score(example, tok.decode(new, skip_special_tokens=True)) != base)
    return labels
