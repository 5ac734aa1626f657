"""How many draft tokens to propose in each round: a fixed window, or one chosen from measured costs.

Windows do not come free on every machine: on a CPU a verify pass over k tokens costs more than one
token (2.5-4x for 5 tokens on an AVX2-only CPU), so a fixed γ can make speculative decoding slower than
the target alone. :class:`AdaptiveWindow` measures, as decoding goes, what a draft step and a target
pass of each width cost here, estimates the per-token acceptance rate α online, and picks the window
that maximises expected tokens per second::

    tokens(g) = (1 - α^(g+1)) / (1 - α)        # kept draft tokens + the target's own token
    cost(g)   = g · draft_step + verify(g + 1) # g = 0: one plain target step, verify(1)

Costs are running medians of the last few rounds per width (robust to the spikes of a shared
machine); α is a discounted count of accepted and rejected draft tokens. g = 0 (the target alone)
when no window pays. Every ``probe_every`` rounds it tries the window measured least often (a
positive one when the target alone is best), so that α and the costs stay current and drafting can
come back when it pays again. The window never changes
the tokens of lossless decoding, only how many rounds produce them.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable
from typing import Protocol


class Schedule(Protocol):
    measures: bool  # whether the decoder should time the phases exactly (device syncs)

    def window(self, limit: int) -> int:
        """Draft tokens to propose this round, 0..limit (0: a plain target step)."""
        ...

    def observe(self, g: int, kept: list[int], draft_seconds: float, verify_seconds: float) -> None:
        """What a round with window g did: tokens kept per row, the time drafting and verifying took."""
        ...


class FixedWindow:
    """γ draft tokens every round (the comparisons between acceptance rules use this)."""

    measures = False

    def __init__(self, gamma: int):
        self.gamma = gamma

    def window(self, limit: int) -> int:
        return min(self.gamma, limit)

    def observe(self, g: int, kept: list[int], draft_seconds: float, verify_seconds: float) -> None:
        pass


class AdaptiveWindow:
    """The window that maximises expected tokens/s from measured costs and the observed acceptance.

    ``max_gamma``: the largest window. ``decay``: weight of the past in the acceptance counts (per
    round); ``keep``: rounds per running median. ``cost``: a cost model ``cost(kind, width) -> seconds`` (``kind`` "draft" for one draft
    step, "verify" for a target pass over ``width`` tokens) that replaces the measurements (tests).
    Keep one instance per (pair, machine) across decodes: its estimates carry over from the warm-up.
    """

    measures = True

    def __init__(
        self,
        max_gamma: int,
        *,
        decay: float = 0.95,
        keep: int = 9,
        probe_every: int = 16,
        cost: Callable[[str, int], float] | None = None,
    ):
        if max_gamma < 1:
            raise ValueError(f"the adaptive schedule needs a largest window >= 1, got {max_gamma}")
        self.max_gamma, self.decay, self.keep, self.probe_every, self.cost = max_gamma, decay, keep, probe_every, cost
        self._verify_runs: dict[int, deque] = {}  # width -> seconds of its last ``keep`` target passes
        self._draft_runs: deque = deque(maxlen=keep)  # seconds per draft step, last ``keep`` rounds
        self.hits, self.misses = 1.0, 1.0  # discounted accepted / rejected draft tokens (prior 1, 1)
        self.rounds = 0
        self.chosen: list[int] = []  # windows chosen, in order (for reports and tests)
        self._probes = [min(4, max_gamma), 0, max_gamma, 1]  # the first rounds measure a spread of widths

    @property
    def alpha(self) -> float:
        return self.hits / (self.hits + self.misses)

    @property
    def verify_cost(self) -> dict[int, float]:
        """Width -> running median seconds of a target pass over that many tokens."""
        return {w: statistics.median(r) for w, r in self._verify_runs.items()}

    @property
    def draft_cost(self) -> float | None:
        """Running median seconds of one draft step (None before the first speculative round)."""
        return statistics.median(self._draft_runs) if self._draft_runs else None

    def _verify(self, w: int) -> float | None:
        if self.cost is not None:
            return self.cost("verify", w)
        c = self.verify_cost
        known = sorted(c)
        if not known:
            return None
        if w in c:
            return c[w]
        lo = [k for k in known if k < w]
        hi = [k for k in known if k > w]
        if lo and hi:  # interpolate between the nearest measured widths
            a, b = lo[-1], hi[0]
            return c[a] + (c[b] - c[a]) * (w - a) / (b - a)
        if hi:  # narrower than all measured: the narrowest's cost
            return c[hi[0]]
        if len(lo) == 1:  # wider than all measured: extend the last slope
            return c[lo[-1]]
        a, b = lo[-2], lo[-1]
        return c[b] + max(0.0, (c[b] - c[a]) / (b - a)) * (w - b)

    def _draft(self) -> float | None:
        return self.cost("draft", 1) if self.cost is not None else self.draft_cost

    def rate(self, g: int) -> float | None:
        """Expected tokens per second of window g (None until its costs are known)."""
        v, d = self._verify(g + 1), self._draft()
        if v is None or (g and d is None):
            return None
        a = min(self.alpha, 1 - 1e-6)
        tokens = (1 - a ** (g + 1)) / (1 - a)
        return tokens / max(g * (d or 0.0) + v, 1e-12)

    def best(self, limit: int) -> int:
        rates = {g: self.rate(g) for g in range(limit + 1)}
        known = {g: r for g, r in rates.items() if r is not None}
        return max(known, key=lambda g: (known[g], -g)) if known else min(limit, self.max_gamma)

    def window(self, limit: int) -> int:
        limit = min(limit, self.max_gamma)
        if limit <= 0:
            return 0
        if self._probes and self.cost is None:
            g = min(self._probes.pop(0), limit)
        else:
            g = self.best(limit)
            if self.rounds % self.probe_every == self.probe_every - 1:  # re-probe the least measured window
                runs = {k: len(self._verify_runs.get(k + 1, ())) for k in range(0 if g else 1, limit + 1)}
                g = min(runs, key=lambda k: (runs[k], abs(k - g)))
        self.rounds += 1
        self.chosen.append(g)
        return g

    def observe(self, g: int, kept: list[int], draft_seconds: float, verify_seconds: float) -> None:
        if g > 0:
            self._draft_runs.append(draft_seconds / g)
            k = self.decay
            self.hits = k * self.hits + sum(kept)
            self.misses = k * self.misses + sum(1 for n in kept if n < g)
        self._verify_runs.setdefault(g + 1, deque(maxlen=self.keep)).append(verify_seconds)
