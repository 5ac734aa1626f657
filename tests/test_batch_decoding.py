"""Batched speculative decoding: in fp32 each row equals decoding its prompt alone (tokens and every
counter), for lossless, target-only and rule policies, with prompts of different lengths, EOS inside a
window, token limits that cut windows and rows leaving the batch at different rounds."""

from __future__ import annotations

import pytest
import torch

from selfjudge.batch_decoding import decode_batch
from selfjudge.decoding import decode
from selfjudge.judge import JudgeConfig, JudgeHead
from selfjudge.models import format_prompt
from selfjudge.policies import build_policy
from tests.reads import model_reads

PROMPTS = [
    "how many apples",
    "janet sells eggs",
    "def sum list",
    "the total price of 3 books",
    "what is 12 * 7",
    "tom has 5 cars and gives 2",
    "print the result",
    "students in each class",
]
COUNTERS = ("new_tokens", "rounds", "draft_forwards", "proposed", "accepted", "accepted_by_rule", "accept_hist")


def _prompts(pair, qs=PROMPTS):
    ids = [format_prompt(pair.tokenizer, q) for q in qs]
    assert len({len(x) for x in ids}) > 1  # rows really need padding
    return ids


def _check_rows(pair, prompts, gamma, n, eos=None, policy=None, draft=True):
    eos = pair.eos_ids if eos is None else eos
    kw = dict(gamma=gamma, max_new_tokens=n, eos_ids=eos, vocab=pair.vocab_size, policy=policy)
    d = pair.draft if draft else None
    rows = decode_batch(pair.target, d, prompts, pad_id=pair.tokenizer.pad_token_id or 0, **kw)
    assert len(rows) == len(prompts)
    for p, (out, st) in zip(prompts, rows):
        ref, ref_st = decode(pair.target, d, p, **kw)
        assert out == ref, (p, gamma, n)
        for c in COUNTERS:
            assert getattr(st, c) == getattr(ref_st, c), (c, p, gamma, n)
        assert st.seconds > 0 and st.prefill_seconds > 0
    return rows


@pytest.mark.parametrize("gamma", [1, 3, 8])
def test_lossless_rows_equal_batch_one(pair, gamma):
    rows = _check_rows(pair, _prompts(pair), gamma, 40)
    assert sum(st.accepted for _, st in rows) > 0


def test_target_only_rows_equal_batch_one(pair):
    _check_rows(pair, _prompts(pair)[:5], 0, 25, draft=False)


@pytest.mark.parametrize("n", [1, 2, 7, 9])
def test_token_limit_cuts_windows_like_batch_one(pair, n):
    _check_rows(pair, _prompts(pair)[:4], 4, n)


def test_eos_inside_window_and_rows_leaving_early(pair):
    """Each row stops at its own EOS, at different rounds; the rest of the batch goes on unchanged."""
    prompts = _prompts(pair)
    full = decode(pair.target, pair.draft, prompts[0], gamma=4, max_new_tokens=40, eos_ids=[], vocab=pair.vocab_size)[0]
    for pos in (3, 11, 22):
        rows = _check_rows(pair, prompts, 5, 40, eos=[full[pos]])
        lengths = {len(out) for out, _ in rows}
        assert len(lengths) > 1 and min(lengths) <= pos + 1  # rows ended at different rounds


def _head(pair, seed=0, include_draft=False):
    H = pair.target_info.hidden_size + (pair.draft_info.hidden_size if include_draft else 0)
    head = JudgeHead(
        JudgeConfig(
            feature_dim=H,
            target_model=pair.target_info.as_dict(),
            features={"layers": [-1], "include_draft": include_draft},
        )
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        head.net.weight.normal_(0, 0.3)
    return head.to(next(pair.target.parameters()).device).eval()


@pytest.mark.parametrize(
    "name,threshold",
    [("judge", 0.5), ("judge_draft", 0.5), ("topk", 3), ("likelihood", 1.5), ("kl", 1.0), ("typical", 0.3)],
)
def test_rule_policies_rows_equal_batch_one(pair, name, threshold):
    if name.startswith("judge"):
        policy = build_policy("judge", threshold, head=_head(pair, include_draft=name == "judge_draft"))
    else:
        policy = build_policy(name, threshold)
    rows = _check_rows(pair, _prompts(pair)[:6], 4, 30, policy=policy)
    assert sum(st.accepted_by_rule for _, st in rows) > 0  # the rule changed decisions


def test_judge_rule_cost_is_timed(pair):
    rows = decode_batch(
        pair.target,
        pair.draft,
        _prompts(pair)[:3],
        gamma=4,
        max_new_tokens=12,
        eos_ids=pair.eos_ids,
        vocab=pair.vocab_size,
        policy=build_policy("judge", 0.5, head=_head(pair)),
    )
    assert all(0 < st.rule_seconds < st.verify_seconds < st.seconds for _, st in rows)


def test_seconds_add_up_to_the_batch_wall_time(pair):
    import time

    t0 = time.perf_counter()
    rows = decode_batch(
        pair.target, pair.draft, _prompts(pair), gamma=4, max_new_tokens=20, eos_ids=pair.eos_ids, vocab=pair.vocab_size
    )
    wall = time.perf_counter() - t0
    total = sum(st.seconds for _, st in rows)
    assert 0.9 * wall <= total <= wall


def test_sampling_identical_draft_keeps_every_token(identical_pair):
    pair = identical_pair
    gen = torch.Generator().manual_seed(0)
    rows = decode_batch(
        pair.target,
        pair.draft,
        _prompts(pair)[:4],
        gamma=4,
        max_new_tokens=20,
        eos_ids=[],
        vocab=pair.vocab_size,
        temperature=0.8,
        generator=gen,
    )
    for out, st in rows:
        assert len(out) == 20 and st.accepted == st.proposed  # p == q: u < 1 always holds


def test_sampling_keeps_target_distribution():
    """Rows of one batch, each a speculative-sampling draw: the first token follows the target's softmax."""
    from tests.test_decoding import _chi2_pvalue, _tiny_vocab_pair

    V, T = 12, 0.8
    target, draft = _tiny_vocab_pair()
    prompt = [3, 7, 1]
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt])).logits[0, -1] / T, -1)
    gen = torch.Generator().manual_seed(3)
    first, rejected = torch.zeros(V), 0
    for _ in range(10):
        for out, st in decode_batch(
            target, draft, [prompt] * 150, gamma=2, max_new_tokens=2, eos_ids=[], vocab=V, temperature=T, generator=gen
        ):
            first[out[0]] += 1
            rejected += st.proposed - st.accepted
    assert rejected > 300
    assert _chi2_pvalue(first, p1) > 1e-3


def test_bad_arguments(tiny_pair):
    kw = dict(max_new_tokens=4, eos_ids=[], vocab=tiny_pair.vocab_size)
    with pytest.raises(ValueError, match="gamma must be >= 1"):
        decode_batch(tiny_pair.target, tiny_pair.draft, [[1, 2]], gamma=0, **kw)
    with pytest.raises(ValueError, match="empty prompt"):
        decode_batch(tiny_pair.target, tiny_pair.draft, [[1, 2], []], gamma=2, **kw)
    assert decode_batch(tiny_pair.target, tiny_pair.draft, [], gamma=2, **kw) == []


def test_progress_counts_every_committed_token_and_the_eval_bar_shows_it(pair):
    from tqdm import tqdm

    from selfjudge.evaluation import batch_progress

    seen = []
    rows = decode_batch(
        pair.target,
        pair.draft,
        _prompts(pair),
        gamma=4,
        max_new_tokens=20,
        eos_ids=pair.eos_ids,
        vocab=pair.vocab_size,
        on_tokens=seen.append,
    )
    assert sum(map(len, seen)) == sum(len(out) for out, _ in rows) and len(seen) > len(rows)
    bar = tqdm(total=1, disable=True)
    on_tokens = batch_progress(bar, "kl@0.5", len(rows), every=0.0)
    assert bar.postfix == f"kl@0.5: prefill of {len(rows)} prompts"  # shown before the first round
    for toks in seen:
        on_tokens(toks)
    assert bar.postfix == f"kl@0.5: {sum(len(out) for out, _ in rows)} tokens over {len(rows)} prompts"
    assert batch_progress(bar, "kl@0.5", 1) is None  # batch 1: the bar moves per decode


def test_a_kept_prefill_gives_the_same_rows_and_is_charged_its_measured_time(pair):
    from selfjudge.decoding import PrefillMemo

    prompts = _prompts(pair)
    kw = dict(gamma=4, max_new_tokens=12, eos_ids=pair.eos_ids, vocab=pair.vocab_size)
    memo = PrefillMemo()
    kl = build_policy("kl", 0.5)
    for draft, policy in ((None, None), (pair.draft, None), (pair.draft, kl), (pair.draft, None)):
        kept = {k: v[2] for k, v in memo._kept.items()}  # seconds each model's prefill took when it ran
        got = decode_batch(pair.target, draft, prompts, policy=policy, prefill_memo=memo, **kw)
        ref = decode_batch(pair.target, draft, prompts, policy=policy, **kw)  # no memo: round 1 reads the prompts
        for (out, st), (ref_out, ref_st) in zip(got, ref):
            assert out == ref_out
            assert all(getattr(st, c) == getattr(ref_st, c) for c in COUNTERS)
        models = [pair.target] + ([draft] if draft is not None else [])
        if all(id(m) in kept for m in models):  # copied, not run: charged what the prefills cost
            assert sum(st.prefill_seconds for _, st in got) >= sum(kept[id(m)] for m in models)
    assert set(memo._kept) == {id(pair.target), id(pair.draft)}  # one kept prefill per model
    decode_batch(pair.target, None, prompts[:3], prefill_memo=memo, **kw)
    assert memo._kept[id(pair.target)][0] == tuple(map(tuple, prompts[:3]))  # other prompts: replaced


def test_the_prompts_are_read_in_the_first_round_not_in_a_pass_of_their_own(pair):
    """Without a kept prefill the batch's first target pass reads [left-padded prompts, d_1..d_γ] and the
    draft's first step the prompts: one target pass per round, and the rows still equal batch-1 decodes."""
    prompts = _prompts(pair)[:4]
    with model_reads(pair) as reads:
        rows = _check_rows(pair, prompts, 4, 20)
    batch_rounds = max(st.rounds for _, st in rows)
    width = max(map(len, prompts))
    n_single = sum(st.rounds for _, st in rows)  # the batch-1 references' target passes, read after the batch
    assert reads["target"][0] == width + 4 and reads["draft"][0] == width
    assert len(reads["target"]) == batch_rounds + n_single  # the batch's passes, then each reference's
    assert all(st.prefill_seconds > 0 and st.verify_seconds > 0 for _, st in rows)
