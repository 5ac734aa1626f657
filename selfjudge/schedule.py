"""How many draft tokens to propose in each round: a fixed window, or one chosen from measured costs.

Windows do not come free on every machine: on a CPU a verify pass over k tokens costs more than one
token (2.5-4x for 5 tokens on an AVX2-only CPU), so a fixed γ can make speculative decoding slower than
the target alone. :class:`AdaptiveWindow` measures, as decoding goes, what a draft step and a target
pass of each width cost here, estimates the per-token acceptance rate α online, and picks the window
that maximises expected tokens per second::

    tokens(g) = (1 - α^(g+1)) / (1 - α)        # kept draft tokens + the target's own token
    cost(g)   = g · draft_step + verify(g + 1) # g = 0: one plain target step, verify(1)

g = 0 (the target alone) when no window pays; every ``probe_every`` rounds it drafts anyway, so that
α and the costs stay current and drafting can come back when it pays again. The window never changes
the tokens of lossless decoding, only how many rounds produce them.
"""

from __future__ import annotations

from typing import Callable, Protocol


class Schedule(Protocol):
    measures: bool          # whether the decoder should time the phases exactly (device syncs)

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

    ``max_gamma``: the largest window. ``decay``: weight of the past in the running estimates (per
    round). ``cost``: a cost model ``cost(kind, width) -> seconds`` (``kind`` "draft" for one draft
    step, "verify" for a target pass over ``width`` tokens) that replaces the measurements (tests).
    Keep one instance per (pair, machine) across decodes: its estimates carry over from the warm-up.
    """

    measures = True

    def __init__(self, max_gamma: int, *, decay: float = 0.9, probe_every: int = 16,
                 cost: Callable[[str, int], float] | None = None, seed: int = 0):
        if max_gamma < 1:
            raise ValueError(f"the adaptive schedule needs a largest window >= 1, got {max_gamma}")
        self.max_gamma, self.decay, self.probe_every, self.cost = max_gamma, decay, probe_every, cost
        self.verify_cost: dict[int, float] = {}      # width -> running mean seconds of a target pass
        self.draft_cost: float | None = None         # running mean seconds of one draft step
        self.hits, self.misses = 1.0, 1.0            # discounted accepted / rejected draft tokens (prior 1, 1)
        self.since_draft = 0                         # rounds since the last speculative one
        self.chosen: list[int] = []                  # windows chosen, in order (for reports and tests)
        self._probes = [min(4, max_gamma), 0, max_gamma, 1]   # the first rounds measure a spread of widths

    @property
    def alpha(self) -> float:
        return self.hits / (self.hits + self.misses)

    def _verify(self, w: int) -> float | None:
        if self.cost is not None:
            return self.cost("verify", w)
        known = sorted(self.verify_cost)
        if not known:
            return None
        if w in self.verify_cost:
            return self.verify_cost[w]
        lo = [k for k in known if k < w]
        hi = [k for k in known if k > w]
        if lo and hi:                                # interpolate between the nearest measured widths
            a, b = lo[-1], hi[0]
            return self.verify_cost[a] + (self.verify_cost[b] - self.verify_cost[a]) * (w - a) / (b - a)
        if hi:                                       # narrower than all measured: no cheaper than 0
            return self.verify_cost[hi[0]] * w / hi[0] if len(hi) == 1 else \
                max(0.0, self.verify_cost[hi[0]] - (self.verify_cost[hi[1]] - self.verify_cost[hi[0]])
                    * (hi[0] - w) / (hi[1] - hi[0]))
        if len(lo) == 1:                             # wider than all measured: extend the last slope
            return self.verify_cost[lo[-1]]
        a, b = lo[-2], lo[-1]
        slope = max(0.0, (self.verify_cost[b] - self.verify_cost[a]) / (b - a))
        return self.verify_cost[b] + slope * (w - b)

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
            if g == 0 and limit > 0 and self.since_draft >= self.probe_every:   # re-probe: can drafting pay again?
                g = max(range(1, limit + 1), key=lambda k: self.rate(k) or 0.0)
        self.chosen.append(g)
        return g

    def observe(self, g: int, kept: list[int], draft_seconds: float, verify_seconds: float) -> None:
        k = self.decay
        if g == 0:
            self.since_draft += 1
        else:
            self.since_draft = 0
            step = draft_seconds / g
            self.draft_cost = step if self.draft_cost is None else k * self.draft_cost + (1 - k) * step
            hits = sum(kept)
            misses = sum(1 for n in kept if n < g)
            self.hits, self.misses = k * self.hits + hits, k * self.misses + misses
        w = g + 1
        old = self.verify_cost.get(w)
        self.verify_cost[w] = verify_seconds if old is None else k * old + (1 - k) * verify_seconds
