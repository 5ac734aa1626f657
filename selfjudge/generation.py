"""Target greedy responses, batched: target-only decoding through the engine's masked-holes back-end
(:mod:`selfjudge.batch_decoding`); each row stops at its own EOS or after ``max_new_tokens``. In fp32
every row equals unbatched greedy decoding.

The loop is the engine's (not ``model.generate``), so that no generation-config setting of the
checkpoint (repetition penalty, sampling defaults) can change the response, and so that the argmax
runs over the shared vocabulary only (``pair.vocab_size`` columns).

:func:`greedy_batch_traced` also keeps, per response, what the decoding already computed: the KV
cache of x ⊕ y, the log-probability of each chosen token and the hidden states at every step
(:class:`TargetTrace`). The fast SelfJudge scorer reads the trace instead of running the target
over x ⊕ y a second time.
"""

from __future__ import annotations

import torch

from selfjudge.batch_decoding import run_batch
from selfjudge.decoding import PrefillMemo, TargetTrace
from selfjudge.features import FeatureSpec

__all__ = ["TargetTrace", "fixed_batches", "greedy_batch", "greedy_batch_traced"]


def fixed_batches(lengths: list[int], batch_size: int, name: str = "batch_size") -> list[list[int]]:
    """Indices grouped into batches of similar length (sorted, stable): the same lengths always give
    the same batches, so a resumed run pads every prompt exactly as an uninterrupted one. ``name``:
    what the caller calls ``batch_size`` in error messages (its config key)."""
    if batch_size < 1:
        raise ValueError(f"{name} must be >= 1, got {batch_size}")
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
    prefill_memo: PrefillMemo | None = None,
) -> list[list[int]]:
    """Greedy responses of one batch. A response ends with its EOS token when one was produced.
    ``prefill_memo``: the prompts' prefill, when it holds it (:class:`selfjudge.decoding.PrefillMemo`)."""
    return _greedy(model, prompts, max_new_tokens, eos_ids, pad_id, vocab, None, prefill_memo)[0]


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


def _greedy(model, prompts, max_new_tokens, eos_ids, pad_id, vocab, spec, prefill_memo=None):
    rows, traces = run_batch(
        model,
        None,
        prompts,
        gamma=0,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        vocab=vocab,
        pad_id=pad_id,
        trace=spec,
        prefill_memo=prefill_memo,
    )
    return [toks for toks, _ in rows], traces
