"""Per-round windows: the adaptive schedule and the confidence stop change how many rounds lossless SD
takes, never its tokens (fp32: equal to fixed γ and to target greedy, batch 1 and batched); the
schedule falls back to the target alone when a draft step costs too much (an injected cost model),
re-probes from there, and picks the largest window when drafts are cheap and always accepted."""

from __future__ import annotations

import pytest

from selfjudge.batch_decoding import decode_batch
from selfjudge.decoding import decode
from selfjudge.models import format_prompt
from selfjudge.schedule import AdaptiveWindow, FixedWindow

PROMPTS = ["how many apples", "janet sells eggs", "def sum list", "the total price of 3 books", "what is 12 * 7"]


def _run(pair, ids, gamma=8, n=40, **kw):
    return decode(
        pair.target, pair.draft, ids, gamma=gamma, max_new_tokens=n, eos_ids=pair.eos_ids, vocab=pair.vocab_size, **kw
    )


def _greedy(pair, ids, n=40):
    return decode(pair.target, None, ids, gamma=0, max_new_tokens=n, eos_ids=pair.eos_ids, vocab=pair.vocab_size)[0]


def test_adaptive_and_confidence_stop_keep_lossless_exact(pair):
    sched = AdaptiveWindow(8)  # measured costs: one instance across prompts
    for q in PROMPTS[:3]:
        ids = format_prompt(pair.tokenizer, q)
        ref = _greedy(pair, ids)
        fixed = _run(pair, ids, gamma=4)[0]
        for kw in (
            dict(schedule=sched),
            dict(schedule=sched, confidence_stop=0.4),
            dict(confidence_stop=0.4),
            dict(confidence_stop=0.99),
        ):
            out, st = _run(pair, ids, **kw)
            assert out == ref == fixed, (q, kw)
            assert st.new_tokens == st.accepted + st.rounds == len(out)
    assert len(set(sched.chosen)) > 1  # it did choose different windows
    assert {1, 2, 5, 9} <= set(sched.verify_cost) and sched.draft_cost > 0  # probed widths were measured


def test_adaptive_batched_rows_equal_greedy(pair):
    prompts = [format_prompt(pair.tokenizer, q) for q in PROMPTS]
    rows = decode_batch(
        pair.target,
        pair.draft,
        prompts,
        gamma=6,
        max_new_tokens=30,
        eos_ids=pair.eos_ids,
        vocab=pair.vocab_size,
        schedule=AdaptiveWindow(6),
        confidence_stop=0.5,
    )
    for p, (out, _) in zip(prompts, rows):
        assert out == _greedy(pair, p, 30)


def test_confidence_stop_cuts_every_window_after_a_doubtful_token(pair):
    ids = format_prompt(pair.tokenizer, PROMPTS[0])
    out, st = _run(pair, ids, gamma=4, confidence_stop=1.0)  # every probability is below 1
    assert out == _greedy(pair, ids)
    assert st.proposed == st.draft_forwards == sum(st.accept_hist)  # one draft token per speculative round
    _, st = _run(pair, ids, gamma=4, confidence_stop=0.0)  # never stops: the fixed window's counts
    _, fixed = _run(pair, ids, gamma=4)
    assert (st.proposed, st.rounds, st.accept_hist) == (fixed.proposed, fixed.rounds, fixed.accept_hist)


def test_expensive_draft_falls_back_to_the_target_alone_and_reprobes(pair):
    cost = {"draft": 1.0, "verify": 0.01}  # one draft step costs 100 target passes
    sched = AdaptiveWindow(8, cost=lambda kind, w: cost[kind] * (w if kind == "verify" else 1), probe_every=10)
    ids = format_prompt(pair.tokenizer, PROMPTS[1])
    out, st = _run(pair, ids, n=60, schedule=sched)
    assert out == _greedy(pair, ids, 60)
    drafted = [i for i, g in enumerate(sched.chosen) if g > 0]
    assert len(drafted) <= len(sched.chosen) // 10 and st.proposed <= 8 * len(drafted)
    assert drafted and all(i % 10 == 9 for i in drafted)  # only the periodic re-probes draft
    assert st.rounds >= 45  # about one target pass per token


def test_cheap_accepted_drafts_use_the_largest_window(identical_pair):
    pair = identical_pair  # the draft is the target: every token is accepted
    sched = AdaptiveWindow(6, cost=lambda kind, w: 0.001 if kind == "draft" else 0.01 + 0.0001 * w)
    ids = format_prompt(pair.tokenizer, PROMPTS[2])
    out, st = _run(pair, ids, gamma=6, n=60, schedule=sched)
    assert out == _greedy(pair, ids, 60)
    assert 6 in sched.chosen and sched.best(6) == 6 and sched.alpha > 0.9


def test_rate_is_expected_tokens_over_cost():
    sched = AdaptiveWindow(8, cost=lambda kind, w: 0.2 if kind == "draft" else 1.0 + 0.5 * (w - 1))
    sched.hits, sched.misses = 3.0, 1.0  # α = 0.75
    for g in range(9):
        tokens = (1 - 0.75 ** (g + 1)) / 0.25
        assert sched.rate(g) == pytest.approx(tokens / (0.2 * g + 1.0 + 0.5 * g))
    assert sched.best(8) == max(range(9), key=sched.rate)


def test_measured_costs_interpolate_between_widths():
    sched = AdaptiveWindow(8)
    sched.observe(0, [0], 0.0, 1.0)  # width 1: 1 s
    sched.observe(4, [4], 0.4, 3.0)  # width 5: 3 s; a draft step 0.1 s
    assert sched._verify(3) == pytest.approx(2.0) and sched._verify(9) == pytest.approx(5.0)
    assert sched.draft_cost == pytest.approx(0.1)
    for seconds in (1.0, 50.0):  # a spike of a shared machine moves the median little
        sched.observe(0, [0], 0.0, seconds)
    assert sched.verify_cost[1] == pytest.approx(1.0)
    assert FixedWindow(4).window(2) == 2 and FixedWindow(4).window(9) == 4


def test_bad_confidence_stop(tiny_pair):
    with pytest.raises(ValueError, match="confidence_stop must be null or in"):
        _run(tiny_pair, [1, 2], confidence_stop=1.5)


def test_the_round_that_reads_the_prompt_teaches_the_schedule_nothing(pair):
    """Round 1 also reads the prompt: its time is prefill time (``prefill_seconds``), not a window's cost."""
    sched = AdaptiveWindow(4, keep=1000)
    ids = format_prompt(pair.tokenizer, PROMPTS[0])
    out, st = _run(pair, ids, gamma=4, n=30, schedule=sched)
    assert out == _greedy(pair, ids, n=30)
    measured = sum(len(runs) for runs in sched._verify_runs.values())
    assert measured == st.rounds - 1  # every round but the first timed a window
    assert st.prefill_seconds > 0
    assert st.seconds == pytest.approx(st.prefill_seconds + st.draft_seconds + st.verify_seconds)
