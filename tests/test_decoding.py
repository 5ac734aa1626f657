"""The decoder core: lossless SD is target greedy token for token (fp32), EOS inside a window stops
where greedy stops, the draft reads each token once, counters add up, sampling keeps the target's
distribution. ``device`` parametrizes CUDA runs (scripts/gpu_check.sh: pytest --device cuda)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from selfjudge.decoding import decode
from selfjudge.models import format_prompt
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


def _on(pair, device: str):
    pair.target.to(device), pair.draft.to(device)
    return pair


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


def _decode(pair, ids, gamma, n=40, eos=None, **kw):
    return decode(
        pair.target,
        pair.draft,
        ids,
        gamma=gamma,
        max_new_tokens=n,
        eos_ids=eos if eos is not None else pair.eos_ids,
        vocab=pair.vocab_size,
        **kw,
    )


@pytest.mark.parametrize("gamma", [1, 2, 3, 5, 8])
def test_lossless_equals_target_greedy(pair, gamma):
    for q in PROMPTS:
        ids = format_prompt(pair.tokenizer, q)
        out, st = _decode(pair, ids, gamma)
        assert out == _ref(pair.target, ids, 40, pair.eos_ids), (q, gamma)
        assert st.new_tokens == len(out) == 40
        assert st.rounds < 40 and st.accepted > 0  # the draft saved target passes
        assert sum(st.accept_hist) <= st.rounds  # a last short round may be a plain step
        assert st.new_tokens == st.accepted + st.rounds  # each round: n kept + 1 target token
        assert st.accepted_by_rule == 0


def test_target_and_draft_alone_equal_their_generate(pair):
    for q in PROMPTS[:4]:
        ids = format_prompt(pair.tokenizer, q)
        for model in (pair.target, pair.draft):
            out, st = decode(model, None, ids, gamma=0, max_new_tokens=30, eos_ids=pair.eos_ids, vocab=pair.vocab_size)
            assert out == _ref(model, ids, 30, pair.eos_ids)
            assert st.rounds == 30 and st.draft_forwards == 0 and st.proposed == 0


@pytest.mark.parametrize("which", ["tiny_pair", "llama_pair"])
def test_eos_inside_window_stops_where_greedy_stops(request, which, device):
    pair = _on(request.getfixturevalue(which), device)
    try:
        hits = 0
        for q in PROMPTS:
            ids = format_prompt(pair.tokenizer, q)
            full = _ref(pair.target, ids, 40, pair.eos_ids)
            for pos in (5, 13, 22):
                eos = [full[pos]]  # a token greedy emits: stop at its first occurrence
                ref = _ref(pair.target, ids, 40, eos)
                assert ref[-1] == eos[0] and len(ref) <= pos + 1
                for gamma in (1, 3, 8):
                    out, st = _decode(pair, ids, gamma, n=40, eos=eos)
                    assert out == ref, (q, pos, gamma)
                    hits += st.new_tokens < st.accepted + st.rounds  # the EOS cut a window short
        assert hits > 0
    finally:
        _on(pair, "cpu")


def test_max_new_tokens_exact(pair):
    ids = format_prompt(pair.tokenizer, PROMPTS[0])
    ref = _ref(pair.target, ids, 40, pair.eos_ids)
    for n in (1, 2, 7, 9):
        for gamma in (1, 4, 8):
            out, _ = _decode(pair, ids, gamma, n=n)
            assert out == ref[:n], (n, gamma)


def test_identical_draft_accepts_every_token(identical_pair, device):
    pair = _on(identical_pair, device)
    try:
        ids = format_prompt(pair.tokenizer, PROMPTS[0])
        out, st = _decode(pair, ids, 4, n=40)
        assert st.accepted == st.proposed and st.accept_hist[4] == st.rounds == 8
        assert st.new_tokens / st.rounds == 5.0  # γ kept + the bonus token per round
        assert out == _ref(pair.target, ids, 40, pair.eos_ids)
    finally:
        _on(pair, "cpu")


def test_each_model_reads_each_token_once(pair):
    """No pass of its own for the prompt: the first round's draft step reads the prompt and the target reads
    [prompt, window]. After it the draft reads only tokens it has not cached: one per step, plus the last draft
    token with the bonus token after a fully accepted window; the target reads [last, window] per round."""
    ids = format_prompt(pair.tokenizer, PROMPTS[1])
    with model_reads(pair) as reads:
        out, st = _decode(pair, ids, 4, n=40)
    P = len(ids)
    assert reads["draft"][0] == P and reads["target"][0] == P + 4  # round 1: the prompt, [prompt, d_1..d_4]
    d = reads["draft"][1:]
    assert len(reads["draft"]) == st.draft_forwards == st.proposed and set(d) <= {1, 2}
    # a 2-token read follows a fully accepted window (last draft token + bonus), never anything else
    assert st.accept_hist[4] - 1 <= d.count(2) <= st.accept_hist[4]
    assert len(reads["target"]) == st.rounds  # one target pass per round, none for the prompt
    assert sum(reads["target"]) == P - 1 + st.proposed + st.rounds  # [last, d_1..d_γ] per round, once


def _tiny_vocab_pair(seed: int = 0, V: int = 12):
    """Target and a clearly different draft over a 12-token vocabulary (exact distributions are cheap)."""
    cfg = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    t = Qwen2ForCausalLM(Qwen2Config(**cfg, initializer_range=0.3)).eval()
    torch.manual_seed(seed + 1)
    d = Qwen2ForCausalLM(Qwen2Config(**cfg, initializer_range=0.3)).eval()
    return t, d


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    from scipy.stats import chisquare

    n = counts.sum()
    keep = probs * n >= 5  # merge sparse cells into one
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]]).double()
    exp = torch.cat([probs[keep], probs[~keep].sum()[None]]).double() * n
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


@pytest.mark.parametrize("temperature", [0.8, pytest.param(1.3, marks=pytest.mark.slow)])
def test_sampling_keeps_target_distribution(temperature, device):
    """Speculative sampling's first two tokens follow the target's softmax exactly (chi-square), though
    the draft's distribution is far from it; the draft alone is rejected by the same test."""
    V = 12
    target, draft = _tiny_vocab_pair()
    prompt = [3, 7, 1]
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt])).logits[0, -1] / temperature, -1)  # [V]
        q1 = torch.softmax(draft(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        nxt = torch.softmax(target(torch.tensor([[*prompt, a] for a in range(V)])).logits[:, -1] / temperature, -1)
    joint = (p1[:, None] * nxt).flatten()  # [V*V] p(a, b)
    target.to(device), draft.to(device)
    gen = torch.Generator(device).manual_seed(1)
    n = 2000
    first, pairs, rejected = torch.zeros(V), torch.zeros(V * V), 0
    for _ in range(n):
        out, st = decode(
            target,
            draft,
            prompt,
            gamma=2,
            max_new_tokens=3,
            eos_ids=[],
            vocab=V,
            temperature=temperature,
            generator=gen,
        )
        first[out[0]] += 1
        pairs[out[0] * V + out[1]] += 1
        rejected += st.proposed - st.accepted
    assert rejected > 0.2 * n  # corrections from the residual are exercised
    assert 0.5 * (p1 - q1).abs().sum() > 0.2  # the draft really differs
    assert _chi2_pvalue(first, p1) > 1e-3
    assert _chi2_pvalue(pairs, joint) > 1e-3
    cpu_gen = torch.Generator().manual_seed(2)
    draft_only = torch.bincount(torch.multinomial(q1, n, replacement=True, generator=cpu_gen), minlength=V).float()
    assert _chi2_pvalue(draft_only, p1) < 1e-6  # the test has power against the draft's distribution


def test_sampling_is_reproducible_with_a_seed(pair, device):
    ids = format_prompt(pair.tokenizer, PROMPTS[2])
    runs = [
        _decode(pair, ids, 4, temperature=0.8, generator=torch.Generator(device).manual_seed(5))[0] for _ in range(2)
    ]
    other = _decode(pair, ids, 4, temperature=0.8, generator=torch.Generator(device).manual_seed(6))[0]
    assert runs[0] == runs[1] and runs[0] != other


def test_bad_arguments(tiny_pair):
    with pytest.raises(ValueError, match="gamma must be >= 1"):
        _decode(tiny_pair, [1, 2], 0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        _decode(tiny_pair, [1, 2], 2, n=0)
    with pytest.raises(ValueError, match="empty prompt"):
        _decode(tiny_pair, [], 2)
