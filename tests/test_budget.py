"""pipeline.budget_minutes: the planner cuts prompts, then tokens, to fit a budget from measured rates and
says what it cut; the pipeline applies the plan, prints estimates, and a rerun reuses it (stages skipped)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from selfjudge.budget import Rates, RunSize, estimate, measure_rates, plan
from selfjudge.pipeline import budget as pbudget
from selfjudge.pipeline import stage as pipeline

# a 2-core CPU with native bf16 (about what the quickstart pair measures there) and one 4x slower
FAST = Rates(step_s=0.2, batch_step_s=0.4, prefill_tok_s=100.0, draft_step_s=0.07)
SLOW = Rates(step_s=0.8, batch_step_s=1.6, prefill_tok_s=25.0, draft_step_s=0.28)
QUICKSTART = RunSize(
    gen_prompts=16,
    gen_tokens=128,
    eval_prompts=4,
    eval_tokens=128,
    gen_batch=8,
    window=20,
    eval_decodes=5,
    warmup_tokens=4 * 32,
)


def _total(size, rates):
    return sum(estimate(size, rates).values())


def test_estimate_grows_with_every_knob():
    base = _total(QUICKSTART, FAST)
    for knob in ("gen_prompts", "gen_tokens", "eval_prompts", "eval_tokens"):
        bigger = RunSize(**{**QUICKSTART.__dict__, knob: getattr(QUICKSTART, knob) * 2})
        assert _total(bigger, FAST) > base, knob
    assert _total(QUICKSTART, SLOW) == pytest.approx(4 * (base - 30.0) + 30.0)  # train is a fixed 30 s


def test_nothing_cut_when_the_run_fits():
    p = plan(QUICKSTART, FAST, budget_s=30 * 60)
    assert p.size == QUICKSTART and p.cuts == [] and p.fits
    assert "nothing cut" in p.describe()


def test_slow_machine_cuts_prompts_first_then_tokens_and_says_so():
    budget = 20 * 60
    assert _total(QUICKSTART, SLOW) > budget
    p = plan(QUICKSTART, SLOW, budget)
    assert p.fits and _total(p.size, SLOW) <= budget
    assert p.cuts[0] == "data_gen prompts 16 -> 8"  # training prompts go first, to their floor
    assert p.cuts[1].startswith("eval prompts 4 -> ")
    assert p.size.gen_prompts == 8 and 2 <= p.size.eval_prompts < 4
    # the largest setting that fits: one more eval prompt would not
    more = RunSize(**{**p.size.__dict__, "eval_prompts": p.size.eval_prompts + 1})
    assert _total(more, SLOW) > budget or p.size.eval_prompts == 4
    assert p.size.gen_tokens == QUICKSTART.gen_tokens or p.size.eval_prompts == 2
    assert "cut data_gen prompts 16 -> 8" in p.describe()


def test_tokens_are_cut_only_after_prompts_reach_their_floors():
    floors = RunSize(**{**QUICKSTART.__dict__, "gen_prompts": 8, "eval_prompts": 2})
    lo, hi = _total(RunSize(**{**floors.__dict__, "gen_tokens": 64, "eval_tokens": 64}), SLOW), _total(floors, SLOW)
    budget = (lo + hi) / 2  # prompts at their floors do not fit; shorter answers do
    p = plan(QUICKSTART, SLOW, budget)
    assert p.size.gen_prompts == 8 and p.size.eval_prompts == 2 and p.fits
    assert any(c.startswith("data_gen max_new_tokens 128 -> ") for c in p.cuts)
    assert _total(p.size, SLOW) <= budget


def test_too_slow_even_at_the_floors_says_so():
    p = plan(QUICKSTART, SLOW, budget_s=60)
    assert not p.fits
    assert (p.size.gen_prompts, p.size.eval_prompts, p.size.gen_tokens, p.size.eval_tokens) == (8, 2, 64, 64)
    assert "still over the budget" in p.describe()


def test_measure_rates_on_the_tiny_pair(tiny_pair):
    r = measure_rates(tiny_pair.target, tiny_pair.draft, batch=4, context=16, reps=2)
    assert r.step_s > 0 and r.batch_step_s > 0 and r.draft_step_s > 0 and r.prefill_tok_s > 0
    assert "tok/s" in r.describe()


def _cfg(run_dir: Path, cache_dir: Path, *extra: str):
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        return compose(
            "selfjudge",
            overrides=["experiment=tiny", f"run_dir={run_dir}", f"model.cache_dir={cache_dir}", "logger=none", *extra],
        )


def test_pipeline_fits_the_budget_and_a_rerun_reuses_the_plan(tmp_path, cache_dir, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    calls = []

    def slow_rates(target, draft, batch, **kw):  # the tiny pair is fast: pretend a slow machine
        calls.append(batch)
        return Rates(step_s=2.0, batch_step_s=4.0, prefill_tok_s=20.0, draft_step_s=0.5)

    monkeypatch.setattr(pbudget, "measure_rates", slow_rates)
    run_dir = tmp_path / "run"
    pipeline.run(_cfg(run_dir, cache_dir, "pipeline.budget_minutes=10"))
    out = caplog.text
    caplog.clear()
    assert calls == [4]  # measured once, at data_gen's batch size
    assert "data_gen prompts 12 -> 8" in out and "eval prompts 4 -> 2" in out
    assert "data_gen: running" in out and "min from the warm-up rates" in out
    man = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert man["counts"]["prompts"] == 8
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert summary["examples"] == 2
    saved = json.loads((run_dir / "budget_plan.json").read_text())
    assert saved["plan"]["cuts"][:2] == ["data_gen prompts 12 -> 8", "eval prompts 4 -> 2"]

    pipeline.run(_cfg(run_dir, cache_dir, "pipeline.budget_minutes=10"))
    out = caplog.text
    assert calls == [4]  # not measured again: the stored plan
    assert "the plan of" in out and out.count("skipped") == 3
