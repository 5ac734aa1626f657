"""Static KV caches and CUDA graphs for batch-1 decoding (the latency mode on a GPU).

At batch 1 a small model's decoding step on a GPU is bound by kernel launches, not by the GPU: with
eager transformers a 1.5B-shaped target step and a 0.5B-shaped draft step both took about 23 ms on an
H100 (docs/bench/gpu_check_h100.txt), so a draft saved almost nothing. Replaying a captured CUDA
graph issues a whole forward pass at once. A graph needs fixed shapes and fixed memory, hence:

- the KV cache is a transformers ``StaticCache`` of a fixed length, kept per (model, role) across
  decodes; a new prompt resets it and a rollback crops the rejected positions (``StaticCache.crop``,
  which rewinds the length in place, so captured graphs keep reading the same tensor). Entries past
  the length are stale but never read: a query at position q attends to positions <= q, and the
  positions from the length up to q were written by that same forward pass. Sliding-window and other
  non-full attention layers cannot be rewound that way once their window has filled: they are refused;
- each fixed-shape call (a one- or two-token step, a verify window of one width and feature layout)
  is captured once and replayed with its input copied into a static buffer; outputs are cloned out.

A call that reads the prompt (the first round), and every call when the model is not on CUDA, runs
eagerly on the same static cache, so CPU tests cover everything but the capture itself. A capture that fails (an operation a graph cannot
hold) is reported once as a warning and that model goes on eagerly, with the same results.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Hashable

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

ROUND = 1024  # cache lengths: multiples of this, at least MIN_LEN, so that most prompts (and a short
MIN_LEN = 2048  # warm-up decode) reuse one cache and its graphs; masked positions cost little at batch 1


class StaticDecoder:
    """One model's static KV cache and its captured graphs, for one role (target or draft)."""

    def __init__(self, model: torch.nn.Module, max_len: int, graphs: bool):
        self.max_len, self.where = max_len, _where(model)
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        other = sorted({type(layer).__name__ for layer in self.cache.layers if type(layer) is not StaticLayer})
        if other:
            raise ValueError(
                f"static_cache: {type(model).__name__} has attention layers of kind {other} "
                "(sliding-window or hybrid attention); rejected draft tokens can only be rewound "
                "on full-attention layers: decode this model without static_cache"
            )
        self.graphs: dict[Hashable, _Graph] | None = {} if graphs else None
        self.pool = None  # one memory pool shared by this model's graphs
        self.failure: str | None = None  # why capturing failed (then every call runs eagerly)

    def reset(self) -> None:
        """Length 0: the next call (the one reading the prompt) writes from position 0."""
        self.cache.reset()

    def run(
        self, key: Hashable, fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], ids: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """``fn(ids)``: replayed from a graph captured for ``key`` on CUDA once the cache exists, else eager."""
        if self.graphs is None or ids.device.type != "cuda" or not self.cache.is_initialized:
            return fn(ids)
        graph = self.graphs.get(key)
        if graph is None:
            try:
                graph = self.graphs[key] = _Graph(fn, ids, self)
            except Exception as e:  # noqa: BLE001 - any capture failure falls back to the eager path
                torch.cuda.synchronize(ids.device)
                self.graphs, self.failure = None, f"{type(e).__name__}: {e}"
                warnings.warn(
                    f"CUDA graph capture failed, decoding eagerly on the static cache: {self.failure}", stacklevel=2
                )
                return fn(ids)
        return graph(ids)


class _Graph:
    """One captured call: static input buffer, static outputs, replay."""

    def __init__(self, fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], ids: torch.Tensor, owner: StaticDecoder):
        self.inp = ids.clone()
        side = torch.cuda.Stream(device=ids.device)
        side.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(side):  # warm-up (workspaces, kernels chosen); it advances the cache length
            fn(self.inp)
        torch.cuda.current_stream(ids.device).wait_stream(side)
        owner.cache.crop(-ids.shape[1])  # ... so it is rewound; capturing runs nothing
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=owner.pool):
            self.out = fn(self.inp)
        owner.pool = self.graph.pool()

    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.inp.copy_(ids)
        self.graph.replay()
        return tuple(o.clone() for o in self.out)


def _where(model: torch.nn.Module) -> tuple:
    """Device, dtype and the address of every weight: graphs replay on the memory they were captured
    on, so a model moved or reloaded (``.to(...)`` gives new tensors) needs new graphs."""
    ps = list(model.parameters())
    return ps[0].device, ps[0].dtype, tuple(p.data_ptr() for p in ps)


_STATES: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, StaticDecoder]] = weakref.WeakKeyDictionary()


def static_decoder(model: torch.nn.Module, role: str, need: int, graphs: bool) -> StaticDecoder:
    """The (model, role) static cache, rewound to length 0, holding at least ``need`` positions; a new
    one (and new graphs) only when it is too short, the model's weights moved (device, dtype, memory) or ``graphs`` changed. Two roles keep a model that is
    both target and draft (an identical draft) on two caches."""
    spread = len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1
    graphs = graphs and not spread  # a graph is captured on one device: a model over several runs eagerly
    per_model = _STATES.setdefault(model, {})
    st = per_model.get(role)
    if (
        st is None
        or st.max_len < need
        or st.where != _where(model)
        or (st.graphs is not None or st.failure is not None) != graphs
    ):
        max_len = max(MIN_LEN, ROUND * math.ceil(need / ROUND))
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and max_len > limit >= need:
            max_len = limit
        st = per_model[role] = StaticDecoder(model, max_len, graphs)
    st.reset()
    return st
