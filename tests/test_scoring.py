"""The fast (packed, cached) scorer equals the naive full-recompute oracle; the label rule."""

from __future__ import annotations

import pytest
import torch

from selfjudge.features import FeatureSpec
from selfjudge.generation import greedy_batch, greedy_batch_traced
from selfjudge.models import format_prompt
from selfjudge.scoring import label_rule, score_response, score_response_naive, tau_from_rule

PROMPTS = [
    "how many apples does janet have?",
    "def sum list of int",
    "the price of 3 books is 12 dollars",
    "tom eats eggs each day",
    "what is 7 * 8",
]


def _responses(pair, n_new=48):
    out = []
    for q in PROMPTS:
        ids = format_prompt(pair.tokenizer, q)
        r = pair.target.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False)[0, len(ids) :].tolist()
        out.append((ids, r))
    return out


@pytest.fixture
def attn(request):
    """Switch both models of a session pair to one attention implementation for one test."""

    def use(pair, impl: str):
        for m in (pair.target, pair.draft):
            m.set_attn_implementation(impl)
        request.addfinalizer(lambda: [m.set_attn_implementation("sdpa") for m in (pair.target, pair.draft)])

    return use


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("pair_name", ["tiny_pair", "llama_pair"])
@pytest.mark.parametrize("variant", ["continuation", "max_logprob"])
def test_fast_equals_naive(pair_name, variant, impl, request, attn):
    pair = request.getfixturevalue(pair_name)
    attn(pair, impl)
    total = 0
    for window, packed in ((20, 2048), (5, 16)):  # 16 forces many packed chunks
        for ids, resp in _responses(pair):
            a = score_response(
                pair.target, pair.draft, ids, resp, pair.vocab_size, window, variant, max_packed_tokens=packed
            )
            b = score_response_naive(pair.target, pair.draft, ids, resp, pair.vocab_size, window, variant)
            assert torch.equal(a.positions, b.positions) and torch.equal(a.draft_tokens, b.draft_tokens)
            assert torch.allclose(a.orig, b.orig, atol=1e-5) and torch.allclose(a.alt, b.alt, atol=1e-5)
            assert (a.ld - b.ld).abs().max() <= 1e-4 if len(a.ld) else True
            assert torch.allclose(a.sub_features, b.sub_features, atol=1e-4)
            assert torch.allclose(a.orig_features, b.orig_features, atol=1e-5)
            assert (a.positions < len(resp) - 1).all()  # the final position is never scored
            total += len(a.positions)
    assert total > 40  # many mismatches, windows truncated at the end of y included


@pytest.mark.parametrize("pair_name", ["tiny_pair", "llama_pair"])
@pytest.mark.parametrize(
    "spec", [FeatureSpec(), FeatureSpec(layers=(-1, 1), include_draft=True)], ids=["last", "layers+draft"]
)
def test_traced_equals_naive(pair_name, spec, request):
    """Scores read from the generation's own pass (batched, left-padded, rows ending at different
    steps) equal the naive oracle, and the trace holds exactly the prefix of each row."""
    pair = request.getfixturevalue(pair_name)
    prompts = [format_prompt(pair.tokenizer, q) for q in PROMPTS]
    free = greedy_batch(pair.target, prompts, 40, [], pair.tokenizer.pad_token_id, pair.vocab_size)
    eos = [free[0][25], free[1][12]]  # two tokens of the free responses act as EOS: rows end at different steps
    resps, traces = greedy_batch_traced(
        pair.target, prompts, 40, eos, pair.tokenizer.pad_token_id, pair.vocab_size, spec
    )
    assert resps == greedy_batch(pair.target, prompts, 40, eos, pair.tokenizer.pad_token_id, pair.vocab_size)
    assert len({len(r) for r in resps}) > 1  # some rows stop early: their cache must not include padding
    total = 0
    for ids, resp, tr in zip(prompts, resps, traces):
        assert tr.cache.get_seq_length() == len(ids) + len(resp) - 1 and tr.logp_chosen.shape == (len(resp),)
        for window, packed in ((20, 2048), (4, 12)):
            a = score_response(
                pair.target,
                pair.draft,
                ids,
                resp,
                pair.vocab_size,
                window,
                spec=spec,
                max_packed_tokens=packed,
                trace=tr,
            )
            b = score_response_naive(pair.target, pair.draft, ids, resp, pair.vocab_size, window, spec=spec)
            assert torch.equal(a.positions, b.positions)
            assert torch.allclose(a.orig, b.orig, atol=1e-5) and torch.allclose(a.alt, b.alt, atol=1e-5)
            assert torch.allclose(a.sub_features, b.sub_features, atol=1e-4)
            assert torch.allclose(a.orig_features, b.orig_features, atol=1e-4)
            assert tr.cache.get_seq_length() == len(ids) + len(resp) - 1  # cropped back after every pass
            total += len(a.positions)
    assert total > 20


def test_trace_of_another_response_is_refused(tiny_pair):
    prompts = [format_prompt(tiny_pair.tokenizer, q) for q in PROMPTS[:2]]
    resps, traces = greedy_batch_traced(
        tiny_pair.target, prompts, 12, [], tiny_pair.tokenizer.pad_token_id, tiny_pair.vocab_size
    )
    with pytest.raises(ValueError, match="trace covers 12 tokens"):
        score_response(
            tiny_pair.target, tiny_pair.draft, prompts[0], resps[0][:10], tiny_pair.vocab_size, trace=traces[0]
        )
    with pytest.raises(ValueError, match=r"features.layers=\[-1, 1\]"):
        score_response(
            tiny_pair.target,
            tiny_pair.draft,
            prompts[0],
            resps[0],
            tiny_pair.vocab_size,
            spec=FeatureSpec(layers=(-1, 1)),
            trace=traces[0],
        )


def test_feature_options_match_naive(tiny_pair):
    spec = FeatureSpec(layers=(-1, 1), include_draft=True)
    ids, resp = _responses(tiny_pair)[0]
    a = score_response(tiny_pair.target, tiny_pair.draft, ids, resp, tiny_pair.vocab_size, spec=spec)
    b = score_response_naive(tiny_pair.target, tiny_pair.draft, ids, resp, tiny_pair.vocab_size, spec=spec)
    assert a.sub_features.shape[1] == spec.dim(64, 64) == 192
    assert torch.allclose(a.sub_features, b.sub_features, atol=1e-4)


def test_scores_match_definition_by_hand(tiny_pair):
    """Orig/Alt of one mismatch recomputed straight from the formulas in docs/method.md."""
    ids, resp = _responses(tiny_pair)[1]
    a = score_response(tiny_pair.target, tiny_pair.draft, ids, resp, tiny_pair.vocab_size, window=3)
    j = 0
    i, d = int(a.positions[j]), int(a.draft_tokens[j])
    P = len(ids)
    full = torch.log_softmax(tiny_pair.target(torch.tensor([ids + resp])).logits[0].float(), -1)
    k = min(3, len(resp) - 1 - i)
    orig = sum(full[P + i + m - 1, resp[i + m]] for m in range(k + 1)) / (k + 1)
    swapped = ids + resp[:i] + [d] + resp[i + 1 :]
    alt_lp = torch.log_softmax(tiny_pair.target(torch.tensor([swapped])).logits[0].float(), -1)
    alt = (full[P + i - 1, d] + sum(alt_lp[P + i + m - 1, resp[i + m]] for m in range(1, k + 1))) / (k + 1)
    assert abs(float(a.orig[j]) - float(orig)) < 1e-5 and abs(float(a.alt[j]) - float(alt)) < 1e-5


def test_identical_draft_has_no_mismatches(identical_pair):
    ids, resp = _responses(identical_pair)[0]
    a = score_response(identical_pair.target, identical_pair.draft, ids, resp, identical_pair.vocab_size)
    assert len(a.positions) == 0 and a.sub_features.shape[0] == 0


def test_label_rule_by_hand():
    ld = torch.tensor([-0.5, 0.0, 0.066, 0.0661, 2.0])
    assert label_rule(ld, 0.066).tolist() == [0, 0, 0, 1, 1]  # important iff LD > τ (strict)
    assert tau_from_rule(ld, "value", 0.066, 0.6) == 0.066
    ld = torch.arange(10, dtype=torch.float32)
    tau = tau_from_rule(ld, "quantile", 0.0, 0.6)
    assert tau == pytest.approx(5.4)
    assert label_rule(ld, tau).float().mean() == pytest.approx(0.4)


def test_bad_tau_and_variant():
    with pytest.raises(ValueError, match="data_gen.tau.mode"):
        tau_from_rule(torch.ones(3), "median", 0, 0.5)
    with pytest.raises(ValueError, match="data_gen.tau.quantile"):
        tau_from_rule(torch.ones(3), "quantile", 0, 1.5)
    with pytest.raises(ValueError, match="data_gen.score_variant"):
        score_response(None, None, [1], [2, 3], 10, variant="mean")


def test_short_responses(tiny_pair):
    """T = 0, 1, 2: the final position is never scored, so at most one mismatch (window of one token)."""
    ids, resp = _responses(tiny_pair)[0]
    for T in (0, 1, 2):
        a = score_response(tiny_pair.target, tiny_pair.draft, ids, resp[:T], tiny_pair.vocab_size)
        b = score_response_naive(tiny_pair.target, tiny_pair.draft, ids, resp[:T], tiny_pair.vocab_size)
        assert len(a.positions) == len(b.positions) <= max(0, T - 1)
        assert torch.allclose(a.ld, b.ld, atol=1e-5)
