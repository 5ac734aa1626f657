"""AutoJudge-style labels (Garipov et al., 2025) beside the SelfJudge labels, for tasks with a checker.

For a mismatch ``i`` of the response ``y`` (draft token ``d_i``): put ``d_i`` in place of ``y_i``, let the
target regenerate greedily from ``x ⊕ y_<i ⊕ d_i``, and label the mismatch important (1) iff the task
score of the regenerated answer differs from the score of ``y``. Two search orders:

- ``sequential`` (AutoJudge's search): mismatches in order from the first. An important swap is
  undone and the search goes on along ``y``; an unimportant one is kept, so the search would go on
  along the regenerated response. Its later mismatches are not mismatches of ``y`` (their prefix
  holds ``d_i``), so they have no SelfJudge row to sit beside: the search stops there.
- ``independent``: every mismatch judged against the same ``y`` (no carrying forward); all
  regenerations of a response run as one batch.

Mismatches not reached (budget ``max_mismatches``, or past the sequential stop) keep -1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from selfjudge.generation import greedy_batch
from selfjudge.models import ModelPair
from selfjudge.tasks import Example, Task

AUTOJUDGE_MODES = ("sequential", "independent")


@dataclass(frozen=True)
class AutoJudgeSettings:
    enabled: bool  # compute AutoJudge labels (tasks with a checker only)
    mode: str  # sequential | independent
    max_mismatches: int  # regenerations per response (cost bound)
    max_new_tokens: int  # tokens regenerated after a swap (also capped by the response's own budget)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> AutoJudgeSettings:
        keys = {"enabled", "mode", "max_mismatches", "max_new_tokens"}
        if set(d) != keys:
            raise KeyError(f"data_gen.autojudge needs exactly the keys {sorted(keys)}, got {sorted(d)}")
        s = cls(bool(d["enabled"]), str(d["mode"]), int(d["max_mismatches"]), int(d["max_new_tokens"]))
        if s.mode not in AUTOJUDGE_MODES:
            raise ValueError(f"data_gen.autojudge.mode must be one of {AUTOJUDGE_MODES}, got '{s.mode}'")
        if s.max_mismatches < 0 or s.max_new_tokens < 0:
            raise ValueError("data_gen.autojudge.max_mismatches and max_new_tokens must be >= 0")
        return s


def _regenerate(
    pair: ModelPair,
    prompt: list[int],
    response: list[int],
    swaps: list[tuple[int, int]],
    budget: int,
    max_new_tokens: int,
) -> list[list[int]]:
    """Responses y_<i ⊕ d_i ⊕ greedy continuation for each (i, d_i), at most ``budget`` tokens long."""
    caps = [0 if d in pair.eos_ids else max(0, min(max_new_tokens, budget - i - 1)) for i, d in swaps]
    todo = [j for j, c in enumerate(caps) if c > 0]
    regen: dict[int, list[int]] = {}
    if todo:  # one batch; greedy is prefix-consistent, so each row is cut to its own cap afterwards
        prefixes = [prompt + response[: swaps[j][0]] + [swaps[j][1]] for j in todo]
        outs = greedy_batch(
            pair.target,
            prefixes,
            max(caps[j] for j in todo),
            pair.eos_ids,
            pair.tokenizer.pad_token_id,
            pair.vocab_size,
        )
        regen = {j: o[: caps[j]] for j, o in zip(todo, outs)}
    return [response[:i] + [d] + regen.get(j, []) for j, (i, d) in enumerate(swaps)]


@torch.no_grad()
def autojudge_labels(
    pair: ModelPair,
    task: Task,
    example: Example,
    prompt: list[int],
    response: list[int],
    positions: list[int],
    draft_tokens: list[int],
    s: AutoJudgeSettings,
    budget: int,
) -> list[int]:
    """One label per mismatch of ``response`` (1 important, 0 not, -1 not computed).

    ``budget``: the response length limit of the run (data_gen.max_new_tokens), so a regenerated
    answer is never allowed more tokens than the original had.
    """
    dec = pair.tokenizer.decode
    labels = [-1] * len(positions)
    base = task.score(example, dec(response, skip_special_tokens=True))
    if base is None or not positions:
        return labels
    swaps = list(zip(positions, draft_tokens))[: s.max_mismatches]
    if s.mode == "independent":
        for j, new in enumerate(_regenerate(pair, prompt, response, swaps, budget, s.max_new_tokens)):
            labels[j] = int(task.score(example, dec(new, skip_special_tokens=True)) != base)
        return labels
    for j, swap in enumerate(swaps):
        new = _regenerate(pair, prompt, response, [swap], budget, s.max_new_tokens)[0]
        labels[j] = int(task.score(example, dec(new, skip_special_tokens=True)) != base)
        if labels[j] == 0:
            break  # the swap is kept: the search leaves y
    return labels
