"""Speculative decoding of a batch of prompts: the rounds of :mod:`selfjudge.decoding`, B rows at once.

Every active row proposes a window, the target verifies all B windows in one forward pass, and each
row keeps its own accepted prefix. Rows keep different numbers of tokens, so the KV caches are not
cropped per row: a rejected position stays in the cache as a hole that the attention mask hides, and
every token is given its true position id (its index in that row's committed sequence). Columns no
row uses are cropped after each round; a row that ends (EOS or token limit) leaves the batch. In fp32
each row equals :func:`selfjudge.decoding.decode` of that prompt alone, tokens and counts (tested).

Why: at batch 1 both models are memory-bound, so one pass over B windows costs far less than B
passes (CPU, 1.5B target, bf16: 8 windows of 9 tokens in 2.2x the time of one window). This is the
throughput mode for evaluating many prompts; latency speedups are measured at batch size 1.

Timing: each round's wall time is shared equally by the rows active in it, so the rows' ``seconds``
add up to the batch's wall time and tokens/s over the rows is the batch's throughput.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache

from selfjudge.decoding import AcceptRule, DecodeStats, PrefillMemo, TargetTrace, run_rounds
from selfjudge.features import FeatureSpec, forward_with_hidden
from selfjudge.forward import lm_forward
from selfjudge.schedule import Schedule


class HoleCache:
    """Batch back-end: one model's batch KV cache and the attention mask over its columns (1: a live token)."""

    def __init__(self, model: torch.nn.Module, vocab: int, batch: int, dev: torch.device):
        self.model, self.vocab = model, vocab
        self.cache = DynamicCache(config=model.config)
        self.mask = torch.zeros((batch, 0), dtype=torch.long, device=dev)

    def _extend(self, valid: torch.Tensor, pos: torch.Tensor) -> dict:
        self.mask = torch.cat([self.mask, valid.long()], 1)
        return {"attention_mask": self.mask, "position_ids": pos, "use_cache": True, "cache": self.cache}

    def prefill(self, ids: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor) -> None:
        if ids.shape[1]:
            lm_forward(self.model, ids, keep=slice(0, 0), **self._extend(valid, pos))

    @classmethod
    def from_rows(cls, model: torch.nn.Module, vocab: int, rows: list[tuple[DynamicCache, int]]) -> HoleCache:
        """The batch cache a prefill of left-padded prefixes would leave, from caches that already hold them:
        row b is the first n_b positions of the one-row cache ``rows[b] = (cache, n_b)``, right-aligned (pad
        columns zero and masked out, so never attended to). Positions are kept: the keys were made at 0..n_b-1."""
        ref = rows[0][0].layers
        dev = ref[0].keys.device
        width = max(n for _, n in rows)
        out = cls(model, vocab, len(rows), dev)
        out.mask = torch.zeros((len(rows), width), dtype=torch.long, device=dev)
        for b, (_, n) in enumerate(rows):
            out.mask[b, width - n :] = 1
        for li, layer in enumerate(ref):
            k = layer.keys.new_zeros((len(rows), layer.keys.shape[1], width, layer.keys.shape[3]))
            v = layer.values.new_zeros((len(rows), layer.values.shape[1], width, layer.values.shape[3]))
            for b, (c, n) in enumerate(rows):
                if c.layers[li].keys.shape[2] < n:
                    raise ValueError(f"row {b}: its cache holds {c.layers[li].keys.shape[2]} positions, {n} asked")
                k[b, :, width - n :] = c.layers[li].keys[0, :, :n]
                v[b, :, width - n :] = c.layers[li].values[0, :, :n]
            out.cache.update(k, v, li)
        return out

    def copy_from(self, other: HoleCache) -> None:
        """This cache becomes a copy of ``other`` (its own tensors): a kept prefill (decoding.PrefillMemo)."""
        self.mask = other.mask.clone()
        self.cache = DynamicCache(config=self.model.config)
        for li, layer in enumerate(other.cache.layers):
            if layer.get_seq_length() > 0:
                self.cache.update(layer.keys.clone(), layer.values.clone(), li)

    def last(self, ids, valid, pos) -> tuple[torch.Tensor, torch.Tensor]:
        """Read ids [B, k]; logits [B, V] and last-layer state [B, H] of the LAST column."""
        out = lm_forward(self.model, ids, keep=-1, **self._extend(valid, pos))
        return out.logits[:, : self.vocab], out.hidden

    def traced(self, ids, valid, pos, spec: FeatureSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`last`, plus the judge states [B, F] of ``spec``'s layers at the last column."""
        out = lm_forward(self.model, ids, keep=-1, layers=spec.layers, **self._extend(valid, pos))
        return out.logits[:, : self.vocab], out.hidden, out.features

    def verify(self, ids, valid, pos, spec: FeatureSpec, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Read ids [B, k]; logits [B, width, V] and judge states [B, width, F] of the last ``width`` columns
        (all live; the first round's read also holds the left-padded prompts)."""
        keep = slice(ids.shape[1] - width, None)
        out = forward_with_hidden(self.model, ids, spec, keep=keep, **self._extend(valid, pos))
        return out.logits[..., : self.vocab], out.hidden

    def keep_first(self, width: int, keep: list[int]) -> None:
        """Of the newest ``width`` columns, row b keeps the first keep[b]; columns no row keeps are cropped."""
        if width <= 0:
            return
        S = self.mask.shape[1]
        cols = torch.arange(width, device=self.mask.device)
        self.mask[:, S - width :] *= (cols[None] < torch.tensor(keep, device=self.mask.device)[:, None]).long()
        used = max(keep)
        if used < width:
            self.cache.crop(used - width)
            self.mask = self.mask[:, : S - width + used]

    def select(self, rows: torch.Tensor) -> None:
        """Keep these batch rows, then drop leading columns no remaining row uses (others' prompt padding)."""
        self.mask = self.mask[rows]
        live = self.mask.any(0)
        first = int(live.long().argmax()) if bool(live.any()) else 0
        for layer in self.cache.layers:
            if layer.get_seq_length() > 0:
                layer.batch_select_indices(rows)
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        self.mask = self.mask[:, first:]

    def row_cache(self, i: int) -> DynamicCache:
        """Row i's live columns as a one-row cache (its tokens in order, no padding or holes)."""
        cols = torch.nonzero(self.mask[i]).flatten()
        row = DynamicCache(config=self.model.config)
        for li, layer in enumerate(self.cache.layers):
            row.update(layer.keys[i : i + 1, :, cols], layer.values[i : i + 1, :, cols], li)
        return row


def run_batch(
    target, draft, prompts: list[list[int]], **kw
) -> tuple[list[tuple[list[int], DecodeStats]], list[TargetTrace] | None]:
    """:func:`selfjudge.decoding.run_rounds` on the masked-holes back-end (arguments as there)."""
    dev = next(target.parameters()).device
    return run_rounds(target, draft, prompts, lambda m, _role: HoleCache(m, kw["vocab"], len(prompts), dev), **kw)


@torch.no_grad()
def decode_batch(
    target: torch.nn.Module,
    draft: torch.nn.Module | None,
    prompts: list[list[int]],
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
    on_tokens: Callable[[list[int]], None] | None = None,
    prefill_memo: PrefillMemo | None = None,
) -> list[tuple[list[int], DecodeStats]]:
    """Decode every prompt; returns (new token ids, stats) per prompt, in order. Arguments as in
    :func:`selfjudge.decoding.decode`; ``draft=None`` decodes ``target`` alone, B rows per step.
    ``pad_id`` fills the unused cells of the padded inputs (never attended to). ``schedule``: one
    window per round for all rows. ``on_tokens``: called each round for each row with the tokens it
    committed (the row is not named: a progress count, not a stream). ``prefill_memo``: reuse the prompts'
    prefill across calls (:class:`selfjudge.decoding.PrefillMemo`)."""
    return run_batch(
        target,
        draft,
        prompts,
        gamma=gamma,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        vocab=vocab,
        pad_id=pad_id,
        policy=policy,
        temperature=temperature,
        generator=generator,
        profile=profile,
        schedule=schedule,
        confidence_stop=confidence_stop,
        on_tokens=on_tokens,
        prefill_memo=prefill_memo,
    )[0]
