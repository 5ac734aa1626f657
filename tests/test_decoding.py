"""The decoder: lossless SD is exactly target greedy (fp32), policies' extremes, sampling keeps p."""

from __future__ import annotations

import pytest
import torch

from selfjudge.decoding import decode
from selfjudge.judge import JudgeConfig, JudgeHead
from selfjudge.models import format_prompt, pair_from_mapping
from selfjudge.policies import JudgeRule, KLRule, LikelihoodGap, Policy, TopK, build_policy

PROMPTS = ["how many apples", "janet sells eggs", "def sum list", "the total price of 3 books", "what is 12 * 7",
           "tom has 5 cars and gives 2", "print the result", "students in each class"]


def _ref(pair, ids, n, eos=None):
    out = pair.target.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                               eos_token_id=eos if eos is not None else pair.eos_ids, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _decode(pair, ids, gamma, n=40, policy=None, eos=None, **kw):
    return decode(pair.target, pair.draft, ids, gamma=gamma, max_new_tokens=n,
                  eos_ids=eos if eos is not None else pair.eos_ids, vocab=pair.vocab_size, policy=policy, **kw)


@pytest.mark.parametrize("gamma", [0, 1, 2, 4, 8])
def test_lossless_equals_target_greedy(tiny_pair, gamma):
    for q in PROMPTS:
        ids = format_prompt(tiny_pair.tokenizer, q)
        out, st = _decode(tiny_pair, ids, gamma)
        assert out == _ref(tiny_pair, ids, 40), (q, gamma)
        assert st.new_tokens == 40
        if gamma:
            assert st.target_forwards < 40  # some draft tokens were accepted
            assert sum(st.accept_hist) <= st.target_forwards  # the last round may be a plain target step


def test_lossless_llama_and_eos_inside_window(llama_pair):
    for q in PROMPTS[:4]:
        ids = format_prompt(llama_pair.tokenizer, q)
        full = _ref(llama_pair, ids, 30)
        eos = [full[13]]  # a token the greedy answer emits: stop there, wherever it falls in a window
        ref = _ref(llama_pair, ids, 30, eos=eos)
        assert ref[-1] == eos[0] and len(ref) <= 14
        for gamma in (3, 8):
            out, _ = _decode(llama_pair, ids, gamma, n=30, eos=eos)
            assert out == ref


def test_identical_draft_accepts_every_token(identical_pair):
    ids = format_prompt(identical_pair.tokenizer, PROMPTS[0])
    out, st = _decode(identical_pair, ids, 4, n=40)
    assert st.accepted == st.proposed and st.accept_hist[4] == st.target_forwards
    assert st.new_tokens / st.target_forwards == 5.0  # γ accepted + the bonus token per round
    assert out == _ref(identical_pair, ids, 40)


def _head(pair, bias: float) -> JudgeHead:
    head = JudgeHead(JudgeConfig(feature_dim=pair.target_info.hidden_size, target_model=pair.target_info.as_dict()))
    with torch.no_grad():
        head.net.weight.normal_(0, 0.01)
        head.net.bias.fill_(bias)
    return head


def test_policy_extremes(tiny_pair):
    strict = [JudgeRule(_head(tiny_pair, 0.0), 0.0), TopK(1), TopK(0), LikelihoodGap(0.0), KLRule(0.0), Policy()]
    loose = [JudgeRule(_head(tiny_pair, -3.0), 1.0), TopK(tiny_pair.vocab_size), LikelihoodGap(float("inf"))]
    for q in PROMPTS[:4]:
        ids = format_prompt(tiny_pair.tokenizer, q)
        ref = _ref(tiny_pair, ids, 40)
        for pol in strict:
            assert _decode(tiny_pair, ids, 4, policy=pol)[0] == ref, pol
        for pol in loose:
            _, st = _decode(tiny_pair, ids, 4, policy=pol)
            assert st.accepted == st.proposed, pol


def test_judge_threshold_moves_acceptance(tiny_pair):
    ids = format_prompt(tiny_pair.tokenizer, PROMPTS[1])
    head = _head(tiny_pair, 0.0)  # P(important) about 0.5 everywhere
    rates = [(_decode(tiny_pair, ids, 4, policy=JudgeRule(head, t))[1]) for t in (0.0, 0.4, 0.6)]
    assert rates[0].accepted < rates[2].accepted and rates[1].accepted == rates[0].accepted


def test_bad_arguments(tiny_pair):
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        JudgeRule(_head(tiny_pair, 0.0), 1.5)
    with pytest.raises(ValueError, match="eval.gamma"):
        _decode(tiny_pair, [1, 2], -1)
    with pytest.raises(ValueError, match="unknown policy 'medusa'"):
        build_policy("medusa", 1.0)


def test_sampling_keeps_target_distribution(cache_dir):
    """First token of speculative sampling ~ softmax(target/T), though the draft differs (TV test)."""
    from tests.conftest import _model_cfg

    pair = pair_from_mapping(_model_cfg(cache_dir, draft_noise=0.5))
    ids = format_prompt(pair.tokenizer, "how many apples")
    T = 0.5
    with torch.no_grad():
        p = torch.softmax(pair.target(torch.tensor([ids])).logits[0, -1, : pair.vocab_size] / T, -1)
        q = torch.softmax(pair.draft(torch.tensor([ids])).logits[0, -1, : pair.vocab_size] / T, -1)
    gen = torch.Generator().manual_seed(0)
    n = 2000
    counts = torch.zeros(pair.vocab_size)
    rejected = 0
    for _ in range(n):
        out, st = _decode(pair, ids, 1, n=2, temperature=T, generator=gen)
        counts[out[0]] += 1
        rejected += st.proposed - st.accepted
    emp = counts / n
    direct = torch.bincount(torch.multinomial(p, n, replacement=True, generator=gen), minlength=len(p)) / n
    tv_p = 0.5 * (emp - p).abs().sum()      # SD samples vs the target
    tv_noise = 0.5 * (direct - p).abs().sum()  # what n exact samples of the target give
    tv_q = 0.5 * (q - p).abs().sum()        # how far the draft is
    assert rejected > n * 0.05               # the correction path is exercised
    assert tv_p < 1.3 * tv_noise + 0.02 and tv_p < tv_q / 4, (float(tv_p), float(tv_noise), float(tv_q))
