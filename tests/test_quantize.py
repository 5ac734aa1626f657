"""``model.draft.quantize=int8``: the draft's linears become fbgemm int8 linears (close to fp32, not equal),
lossless SD with that draft still returns the target's greedy tokens (fp32), the pair records what ran, the
draft's fingerprint (and so every record keyed by it) says int8, and keys made before the option stay."""

from __future__ import annotations

import pytest
import torch

from selfjudge import kernels
from selfjudge.batch_decoding import decode_batch
from selfjudge.decoding import decode
from selfjudge.kernels import Int8Linear, quantize_int8
from selfjudge.models import format_prompt, model_key, pair_from_mapping

pytestmark = pytest.mark.skipif(kernels.int8_unavailable() is not None, reason="no fbgemm int8 linear here")

PROMPTS = ["how many apples", "janet sells eggs", "def sum list", "the total price of 3 books", "what is 12 * 7"]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (2, 9, 64)])
def test_int8_linear_is_close_to_the_fp32_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=bias)
    x = torch.randn(*shape, generator=g)
    ref = lin(x).detach()
    q = Int8Linear(lin)
    with torch.inference_mode():
        got = q(x)
        got_bf16 = q(x.bfloat16())
    assert got.shape == ref.shape and got.dtype == torch.float32 and got_bf16.dtype == torch.bfloat16
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.03  # int8 weights and 7-bit inputs: a few per cent, never exact
    assert q.weight.shape == lin.weight.shape and q.weight.device.type == "meta"


def test_a_token_keeps_its_precision_whatever_shares_its_call():
    """Every row stays within a few per cent of fp32 beside a row 1000x larger; fbgemm alone quantizes the whole
    call with the outlier's scale, and the small rows lose everything."""
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(64, 96)
    x = torch.randn(4, 64, generator=g)
    x[3] *= 1000
    q = Int8Linear(lin)
    with torch.inference_mode():
        got, ref = q(x), lin(x)
        plain = torch.ops.quantized.linear_dynamic(x, q._packed, True) + lin.bias  # one scale for the call
    rel = lambda a, b: ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()  # noqa: E731
    assert rel(got, ref) < 0.03
    assert rel(plain[:3], ref[:3]) > 0.3  # what the per-token scale prevents


@pytest.fixture(scope="module")
def int8_pair(tiny_model_cfg):
    cfg = dict(tiny_model_cfg, draft=dict(tiny_model_cfg["draft"], quantize="int8"))
    return pair_from_mapping(cfg)


def test_the_pair_records_the_int8_draft(int8_pair, tiny_pair):
    p = int8_pair
    assert (
        p.runtime["cpu_kernels"]["draft"] == "int8"
        and "model.draft.quantize=int8" in (p.runtime["cpu_kernels_reason"]["draft"])
    )
    assert not any(type(m) is torch.nn.Linear for m in p.draft.modules())
    assert sum(isinstance(m, Int8Linear) for m in p.draft.modules()) == sum(
        type(m) is torch.nn.Linear for m in tiny_pair.draft.modules()
    )
    assert p.draft_info.fingerprint == tiny_pair.draft_info.fingerprint + "+int8"
    assert p.target_info.fingerprint == tiny_pair.target_info.fingerprint
    assert p.vocab_size == tiny_pair.vocab_size
    ids = torch.tensor([format_prompt(p.tokenizer, PROMPTS[0])])
    with torch.inference_mode():
        a, b = tiny_pair.draft(ids).logits, p.draft(ids).logits
    assert not torch.equal(a, b) and ((a - b).norm() / a.norm()).item() < 0.1  # tiny pair: ~6 %


def _greedy(model, ids, n, eos):
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0,
        temperature=None, top_p=None, top_k=None,
    )  # fmt: skip
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("gamma", [1, 4, 8])
def test_lossless_sd_with_an_int8_draft_is_target_greedy(int8_pair, gamma):
    p = int8_pair
    for q in PROMPTS:
        ids = format_prompt(p.tokenizer, q)
        out, st = decode(p.target, p.draft, ids, gamma=gamma, max_new_tokens=32, eos_ids=p.eos_ids, vocab=p.vocab_size)
        assert out == _greedy(p.target, ids, 32, p.eos_ids), (q, gamma)
        assert st.accepted > 0


def test_batched_lossless_sd_with_an_int8_draft_is_target_greedy(int8_pair):
    p = int8_pair
    prompts = [format_prompt(p.tokenizer, q) for q in PROMPTS]
    rows = decode_batch(
        p.target, p.draft, prompts, gamma=4, max_new_tokens=24, eos_ids=p.eos_ids, vocab=p.vocab_size, pad_id=0
    )
    for ids, (out, _) in zip(prompts, rows):
        assert out == _greedy(p.target, ids, 24, p.eos_ids)


def test_bad_settings_name_the_key(tiny_model_cfg):
    cfg = dict(tiny_model_cfg)
    with pytest.raises(ValueError, match=r"model\.draft\.quantize 'int4' is not one of"):
        pair_from_mapping(dict(cfg, draft=dict(cfg["draft"], quantize="int4")))
    with pytest.raises(ValueError, match=r"model\.target\.quantize=int8: quantize the draft only"):
        pair_from_mapping(dict(cfg, target=dict(cfg["target"], quantize="int8")))
    m = torch.nn.Sequential(torch.nn.Linear(8, 8)).to("meta")
    with pytest.raises(ValueError, match=r"model\.draft\.quantize=int8 runs on the CPU only"):
        quantize_int8(m)


def test_model_key_leaves_out_a_null_quantize(tiny_model_cfg):
    """Runs made before the option keep their keys: a null quantize hashes like no key at all."""
    before = dict(tiny_model_cfg)
    null = dict(before, draft=dict(before["draft"], quantize=None))
    int8 = dict(before, draft=dict(before["draft"], quantize="int8"))
    assert model_key(null) == model_key(before) and "quantize" not in model_key(null)["draft"]
    assert model_key(int8)["draft"]["quantize"] == "int8" and model_key(int8) != model_key(before)
