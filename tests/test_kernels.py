"""``model.cpu_kernels``: packed oneDNN linears give the default path's outputs up to fp32 rounding and the
same greedy and lossless-SD tokens on the tiny pair; ``auto`` keeps whichever kernel measures faster."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from selfjudge import kernels
from selfjudge.decoding import decode
from selfjudge.kernels import (
    OneDNNLinear,
    apply_cpu_kernels,
    resolve_cpu_kernels,
    use_onednn,
)
from selfjudge.models import format_prompt, pair_from_mapping

pytestmark = pytest.mark.skipif(not kernels.onednn_available(), reason="torch built without oneDNN")

PROMPTS = ["how many apples", "janet sells eggs", "def sum list", "the total price of 3 books", "what is 12 * 7"]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (2, 9, 64), (64, 64)])
def test_onednn_linear_matches_torch_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=bias)
    x = torch.randn(*shape, generator=g)
    ref = lin(x)
    fast = OneDNNLinear(lin)
    with torch.inference_mode():
        got = fast(x)
    # oneDNN sums in another order: fp32 rounding, not an exact match (see selfjudge.kernels)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-5)
    assert fast.weight.shape == lin.weight.shape


@pytest.mark.skipif(
    kernels.onednn_supports(torch.bfloat16) is not None, reason="this CPU has no oneDNN bf16 kernel (AVX2 only)"
)
def test_bf16_onednn_linear_matches():
    lin = torch.nn.Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(OneDNNLinear(lin)(x), F.linear(x, lin.weight, lin.bias), rtol=2e-2, atol=2e-2)


@pytest.fixture(scope="module")
def pairs(tiny_model_cfg):
    """The tiny pair twice: torch's default kernels, and packed oneDNN linears."""
    return pair_from_mapping(dict(tiny_model_cfg, cpu_kernels="default")), pair_from_mapping(
        dict(tiny_model_cfg, cpu_kernels="onednn")
    )


def _greedy(model, ids, n, eos):
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    return out[0, len(ids) :].tolist()


def test_onednn_pair_records_what_ran(pairs):
    plain, fast = pairs
    assert plain.runtime["cpu_kernels"] == {"target": "default", "draft": "default"}
    assert fast.runtime["cpu_kernels"] == {"target": "onednn", "draft": "onednn"}
    n_lin = sum(isinstance(m, OneDNNLinear) for m in fast.target.modules())
    assert n_lin == 2 * 7 + 1  # q k v o gate up down per layer, and the LM head
    assert not any(type(m) is torch.nn.Linear for m in fast.target.modules())


def test_onednn_logits_close_and_greedy_tokens_equal(pairs):
    plain, fast = pairs
    for q in PROMPTS:
        ids = torch.tensor([format_prompt(plain.tokenizer, q)])
        with torch.inference_mode():
            a, b = plain.target(ids).logits, fast.target(ids).logits
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        assert _greedy(fast.target, ids[0].tolist(), 24, plain.eos_ids) == _greedy(
            plain.target, ids[0].tolist(), 24, plain.eos_ids
        ), q


@pytest.mark.parametrize("gamma", [1, 4, 8])
def test_lossless_sd_with_onednn_equals_default_target_greedy(pairs, gamma):
    plain, fast = pairs
    for q in PROMPTS:
        ids = format_prompt(plain.tokenizer, q)
        want = _greedy(plain.target, ids, 32, plain.eos_ids)  # torch's default path, target alone
        out, st = decode(
            fast.target, fast.draft, ids, gamma=gamma, max_new_tokens=32, eos_ids=fast.eos_ids, vocab=fast.vocab_size
        )
        assert out == want, (q, gamma)
        assert st.accepted > 0


def _lin(device="cpu"):
    return torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 32)).to(device)


@pytest.mark.parametrize("default_ms, onednn_ms, want", [(3.0, 1.0, "onednn"), (1.0, 3.0, "default")])
def test_auto_keeps_the_faster_kernel(monkeypatch, default_ms, onednn_ms, want):
    seen = []

    def fake(w, rows=(1, 5), reps=5):
        seen.append(tuple(w.shape))
        return {"default": default_ms, "onednn": onednn_ms}

    monkeypatch.setattr(kernels, "measure_linear", fake)
    m = _lin()
    got, why = apply_cpu_kernels("auto", m)
    assert got == want and f"{default_ms:.2f} ms default" in why
    assert seen == [(48, 32)]  # measured on the model's own (largest) weight
    assert isinstance(m[0], OneDNNLinear) == (want == "onednn")


def test_auto_measures_for_real():
    got, why = resolve_cpu_kernels("auto", _lin())
    assert got in ("default", "onednn") and "oneDNN-packed" in why


def test_explicit_choices_and_errors():
    assert resolve_cpu_kernels("default", _lin()) == ("default", "model.cpu_kernels=default")
    assert resolve_cpu_kernels("onednn", _lin())[0] == "onednn"
    meta = _lin("meta")  # not a CPU: auto keeps torch's path, onednn is refused
    assert resolve_cpu_kernels("auto", meta) == ("default", "not a CPU (meta)")
    with pytest.raises(ValueError, match="model.cpu_kernels=onednn needs model.device=cpu"):
        resolve_cpu_kernels("onednn", meta)
    with pytest.raises(ValueError, match="model.cpu_kernels 'mkl'"):
        resolve_cpu_kernels("mkl", _lin())


def test_onednn_on_a_dtype_this_cpu_cannot_pack_is_refused_naming_the_keys(monkeypatch):
    bf16 = _lin().to(torch.bfloat16)
    if kernels.onednn_supports(torch.bfloat16) is None:  # a CPU with oneDNN bf16: explicit onednn is kept
        assert resolve_cpu_kernels("onednn", bf16)[0] == "onednn"
    else:  # AVX2 only: explicit onednn is refused, auto falls back to torch's path
        with pytest.raises(ValueError, match=r"model.cpu_kernels=onednn: oneDNN has no bfloat16 .*model.dtype=float32"):
            resolve_cpu_kernels("onednn", bf16)
        assert resolve_cpu_kernels("auto", bf16)[0] == "default"
    # the refusal itself, on any CPU: a dtype oneDNN reports it cannot pack
    monkeypatch.setattr(kernels, "onednn_supports", lambda dtype: "no kernel for this dtype")
    with pytest.raises(ValueError, match="oneDNN has no float32 linear kernel on this CPU .no kernel for this dtype"):
        resolve_cpu_kernels("onednn", _lin())


def test_use_onednn_counts_and_keeps_shapes():
    m = _lin()
    assert use_onednn(m) == 2 and m[1].weight.shape == (32, 48) and m[1].bias is not None
