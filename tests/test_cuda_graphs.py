"""Static KV caches (and, on CUDA, captured graphs) give the very tokens and counts of the default
decoder: lossless = target greedy (fp32), EOS inside a window, token limits, an identical draft (one
model in two roles), judge features from the verify pass, caches reused across prompts of other
lengths. On the CPU the static path runs eagerly; scripts/gpu_check.sh runs this file on CUDA."""

from __future__ import annotations

import pytest
import torch

from selfjudge import cuda_graphs
from selfjudge.decoding import decode
from selfjudge.judge import JudgeConfig, JudgeHead
from selfjudge.models import format_prompt
from selfjudge.policies import JudgeRule

PROMPTS = ["how many apples", "janet sells eggs and ducks every single morning", "def sum list", "what is 12 * 7"]
COUNTS = ("new_tokens", "rounds", "draft_forwards", "proposed", "accepted", "accepted_by_rule", "accept_hist")


def _ref(model, ids, n, eos):
    dev = next(model.parameters()).device
    out = model.generate(
        torch.tensor([ids], device=dev),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    return out[0, len(ids) :].tolist()


def _both(pair, ids, **kw):
    """(static tokens, static stats), (default tokens, default stats) of one decode."""
    args = dict(eos_ids=pair.eos_ids, vocab=pair.vocab_size, **kw)
    return (
        decode(pair.target, pair.draft, ids, static_cache=True, **args),
        decode(pair.target, pair.draft, ids, **args),
    )


def _same(a, b):
    (out_a, st_a), (out_b, st_b) = a, b
    assert out_a == out_b
    assert [getattr(st_a, k) for k in COUNTS] == [getattr(st_b, k) for k in COUNTS]


@pytest.mark.parametrize("which", ["tiny_pair", "llama_pair"])
def test_static_cache_equals_default_and_greedy(request, which, device):
    pair = request.getfixturevalue(which)
    pair.target.to(device), pair.draft.to(device)
    try:
        for q in PROMPTS:  # one cache per role, rewound for each prompt
            ids = format_prompt(pair.tokenizer, q)
            ref = _ref(pair.target, ids, 40, pair.eos_ids)
            for gamma in (1, 3, 8):
                s, d = _both(pair, ids, gamma=gamma, max_new_tokens=40)
                _same(s, d)
                assert s[0] == ref and s[1].accepted > 0, (q, gamma)
            eos = [ref[13]]  # EOS inside a window
            args = dict(vocab=pair.vocab_size, eos_ids=eos, gamma=8, max_new_tokens=40)
            s = decode(pair.target, pair.draft, ids, static_cache=True, **args)
            _same(s, decode(pair.target, pair.draft, ids, **args))
            assert s[0] == _ref(pair.target, ids, 40, eos)
            for n in (1, 2, 9):  # limits that cut windows
                _same(*_both(pair, ids, gamma=4, max_new_tokens=n))
            for model in (pair.target, pair.draft):  # target-only and draft-only
                out, _ = decode(
                    model,
                    None,
                    ids,
                    gamma=0,
                    max_new_tokens=30,
                    eos_ids=pair.eos_ids,
                    vocab=pair.vocab_size,
                    static_cache=True,
                )
                assert out == _ref(model, ids, 30, pair.eos_ids)
        for role, model in (("target", pair.target), ("draft", pair.draft)):
            st = cuda_graphs._STATES[model][role]  # the static path did run
            assert st.cache.layers[0].keys.device.type == torch.device(device).type
            if device.startswith("cuda"):  # ... and replayed captured graphs
                assert st.failure is None and st.graphs, st.failure
    finally:
        pair.target.to("cpu"), pair.draft.to("cpu")


def test_identical_draft_keeps_two_caches(identical_pair, device):
    pair = identical_pair
    pair.target.to(device), pair.draft.to(device)
    try:
        ids = format_prompt(pair.tokenizer, PROMPTS[0])
        (out, st), d = _both(pair, ids, gamma=4, max_new_tokens=40)
        _same((out, st), d)
        assert st.accepted == st.proposed and st.accept_hist[4] == st.rounds == 8
        if pair.draft is pair.target:  # one model in both roles: two static caches
            assert set(cuda_graphs._STATES[pair.target]) == {"target", "draft"}
    finally:
        pair.target.to("cpu"), pair.draft.to("cpu")


def test_judge_reads_the_same_features_on_the_static_path(pair):
    torch.manual_seed(0)
    head = JudgeHead(JudgeConfig(feature_dim=pair.target_info.hidden_size, target_model=pair.target_info.as_dict()))
    with torch.no_grad():
        head.net.weight.normal_(0, 0.3)
    head = head.to(next(pair.target.parameters()).device).eval()
    for t in (0.3, 0.6):
        for q in PROMPTS[:2]:
            ids = format_prompt(pair.tokenizer, q)
            s, d = _both(pair, ids, gamma=5, max_new_tokens=40, policy=JudgeRule(t, head))
            _same(s, d)
            assert s[1].accepted_by_rule > 0 or t == 0.3


def test_cache_grows_and_moves_with_the_model(tiny_pair):
    m = tiny_pair.target
    a = cuda_graphs.static_decoder(m, "probe", 10, graphs=False)
    assert cuda_graphs.static_decoder(m, "probe", 1500, graphs=False) is a and a.max_len == cuda_graphs.MIN_LEN
    b = cuda_graphs.static_decoder(m, "probe", cuda_graphs.MIN_LEN + 1, graphs=False)
    assert b is not a and b.max_len == cuda_graphs.MIN_LEN + cuda_graphs.ROUND
    m.hf_device_map = {"model.layers.0": 0, "model.layers.1": 1}  # spread over two GPUs: no graphs
    try:
        assert cuda_graphs.static_decoder(m, "probe", 10, graphs=True).graphs is None
    finally:
        del m.hf_device_map
    m.to(torch.float64)
    try:
        c = cuda_graphs.static_decoder(m, "probe", 10, graphs=False)
        assert c is not b
    finally:
        m.to(torch.float32)  # back, on new memory: graphs would read freed weights
    try:
        assert cuda_graphs.static_decoder(m, "probe", 10, graphs=False) not in (b, c)
    finally:
        del cuda_graphs._STATES[m]["probe"]


def test_sliding_window_models_are_refused():
    """A static cache cannot rewind a sliding-window layer whose window has filled: refused, clearly."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
    )
    model = Qwen2ForCausalLM(cfg).eval()
    with pytest.raises(ValueError, match="sliding-window or hybrid attention.*without static_cache"):
        decode(model, None, [1, 2, 3], gamma=0, max_new_tokens=4, eos_ids=[], vocab=64, static_cache=True)
    out, _ = decode(model, None, [1, 2, 3], gamma=0, max_new_tokens=4, eos_ids=[], vocab=64)  # the default path runs
    assert len(out) == 4
