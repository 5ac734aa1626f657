"""Count what each model of a pair reads: the width of ``input_ids`` of every forward pass, in order."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def model_reads(pair):
    """``with model_reads(pair) as reads:`` fills ``reads["target"]`` and ``reads["draft"]`` with the
    number of tokens each forward pass of that model read; the hooks are removed on exit."""
    reads = {"target": [], "draft": []}
    hooks = [
        m.model.register_forward_pre_hook(
            lambda mod, args, kw, r=reads[k]: r.append(kw["input_ids"].shape[1]), with_kwargs=True
        )
        for k, m in (("target", pair.target), ("draft", pair.draft))
    ]
    try:
        yield reads
    finally:
        for h in hooks:
            h.remove()
