"""Fit a pipeline run to a time budget from rates measured on the machine at hand.

:func:`measure_rates` times a few target and draft forward passes (the warm-up); :func:`estimate` turns a
:class:`RunSize` into seconds per stage under a simple cost model; :func:`plan` cuts prompts first, then
new tokens, in a fixed order and never below floors, until the estimate fits, and says what it cut.

Cost model (seconds):
  data_gen = generation:  ceil(P / B) * N * batch_step      (greedy, B rows per step)
           + re-reading:  P * N * (1 + draft_share) / prefill  (teacher-forced draft pass, hidden states)
           + scoring:     P * N * MISMATCH_SHARE * window / prefill   (packed windows after each swap)
  eval     = (prompts * decodes_per_prompt * N + warm-up tokens) * step
             (every SD method counted at the target's own speed: an upper bound wherever drafting pays)
  train    = a few seconds on the judge's features (not planned)
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch

MISMATCH_SHARE = 0.25  # draft tokens that differ from the target's under teacher forcing (this pair: 10-25 %)
TRAIN_SECONDS = 30.0  # the judge trains on a few hundred feature rows: seconds


@dataclass(frozen=True)
class Rates:
    """Seconds and tokens/s measured on this machine (see :func:`measure_rates`)."""

    step_s: float  # target decode step, 1 row
    batch_step_s: float  # target decode step, data_gen.batch_size rows
    prefill_tok_s: float  # target tokens/s over one long forward pass
    draft_step_s: float  # draft decode step, 1 row

    def describe(self) -> str:
        return (
            f"target {1 / self.step_s:.1f} tok/s at batch 1, {1 / self.batch_step_s:.2f} steps/s at the "
            f"data_gen batch, prefill {self.prefill_tok_s:.0f} tok/s; draft {1 / self.draft_step_s:.1f} tok/s"
        )


@dataclass(frozen=True)
class RunSize:
    """What a run will do; the four cut-able knobs first."""

    gen_prompts: int  # data_gen prompts
    gen_tokens: int  # data_gen.max_new_tokens
    eval_prompts: int  # eval prompts (excluding warm-up)
    eval_tokens: int  # eval.max_new_tokens
    gen_batch: int = 8  # data_gen.batch_size
    window: int = 20  # data_gen.window
    eval_decodes: int = 5  # decodes per eval prompt (target, lossless, each rule threshold ...)
    warmup_tokens: int = 0  # eval warm-up tokens in all (kinds x warm-up prompts x warmup_tokens)


# cut order and floors: training prompts, then eval prompts, then the length of answers
KNOBS = (
    ("gen_prompts", 8, "data_gen prompts"),
    ("eval_prompts", 2, "eval prompts"),
    ("gen_tokens", 64, "data_gen max_new_tokens"),
    ("eval_tokens", 64, "eval max_new_tokens"),
)


def estimate(size: RunSize, rates: Rates) -> dict[str, float]:
    """Seconds per stage for ``size`` at ``rates`` (see the module docstring)."""
    p, n = size.gen_prompts, size.gen_tokens
    draft_share = rates.draft_step_s / rates.step_s
    gen = math.ceil(p / max(size.gen_batch, 1)) * n * rates.batch_step_s
    reread = p * n * (1 + draft_share) / rates.prefill_tok_s
    score = p * n * MISMATCH_SHARE * size.window / rates.prefill_tok_s
    ev = (size.eval_prompts * size.eval_decodes * size.eval_tokens + size.warmup_tokens) * rates.step_s
    return {"data_gen": gen + reread + score, "train": TRAIN_SECONDS, "eval": ev}


@dataclass
class Plan:
    size: RunSize  # what will run
    seconds: dict[str, float]  # its estimate per stage
    budget_s: float  # seconds available for the stages
    cuts: list[str]  # what was cut, e.g. "eval prompts 4 -> 2"
    fits: bool  # False: even the floors exceed the budget (run at the floors)

    def as_dict(self) -> dict:
        return {
            "size": asdict(self.size),
            "seconds": self.seconds,
            "budget_s": self.budget_s,
            "cuts": self.cuts,
            "fits": self.fits,
        }

    def describe(self) -> str:
        total = sum(self.seconds.values())
        head = (
            f"estimate {total / 60:.1f} min (data_gen {self.seconds['data_gen'] / 60:.1f}, eval "
            f"{self.seconds['eval'] / 60:.1f}) for a budget of {self.budget_s / 60:.1f} min"
        )
        if not self.cuts:
            return head + ": nothing cut"
        tail = "; ".join(self.cuts)
        return head + f": cut {tail}" + ("" if self.fits else " (at the floors; still over the budget)")


def plan(size: RunSize, rates: Rates, budget_s: float) -> Plan:
    """The largest run in knob order that fits ``budget_s`` seconds: each knob is lowered (down to its floor)
    only when the ones before it at their floors do not fit."""
    total = sum(estimate(size, rates).values())
    cur, cuts = size, []
    for name, floor, label in KNOBS:
        if total <= budget_s:
            break
        was = getattr(cur, name)
        if was <= floor:
            continue
        lo, hi, best = floor, was, floor  # largest value in [floor, was] that fits: estimates grow with it
        while lo <= hi:
            mid = (lo + hi) // 2
            if sum(estimate(replace(cur, **{name: mid}), rates).values()) <= budget_s:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        cur = replace(cur, **{name: best})
        cuts.append(f"{label} {was} -> {best}")
        total = sum(estimate(cur, rates).values())
    return Plan(cur, estimate(cur, rates), budget_s, cuts, total <= budget_s)


# --------------------------------------------------------------------------- measuring


def _median_s(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _step_s(model: torch.nn.Module, rows: int, context: int, reps: int) -> float:
    """Median seconds of one decode step of ``rows`` rows over a ``context``-token KV cache."""
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (rows, context + 1), generator=g).to(dev)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :context], cache=cache, use_cache=True)

    def step():
        model(input_ids=ids[:, context:], cache=cache, use_cache=True)
        cache.crop(-1)

    step()  # warm-up
    return _median_s(step, reps)


@torch.inference_mode()
def measure_rates(
    target: torch.nn.Module, draft: torch.nn.Module, batch: int, context: int = 64, reps: int = 4
) -> Rates:
    """Time decode steps (1 and ``batch`` rows) and a long forward pass: a few seconds on a CPU."""
    dev = next(target.parameters()).device
    vocab = target.get_input_embeddings().weight.shape[0]
    long_ids = torch.randint(0, vocab, (1, 256), generator=torch.Generator().manual_seed(1)).to(dev)
    target(input_ids=long_ids[:, :32])
    prefill = _median_s(lambda: target(input_ids=long_ids, logits_to_keep=1), 2)
    return Rates(
        step_s=_step_s(target, 1, context, reps),
        batch_step_s=_step_s(target, batch, context, reps),
        prefill_tok_s=long_ids.shape[1] / prefill,
        draft_step_s=_step_s(draft, 1, context, reps),
    )
