"""``model.dtype: auto``: bf16 where the machine computes it natively, fp32 on CPUs that would emulate it,
bf16 (or fp16) on CUDA; an explicit dtype wins; hashes and keys hold the resolved dtype."""

from __future__ import annotations

import json

import pytest
import torch

from selfjudge import models
from selfjudge.models import (
    model_key,
    pair_from_mapping,
    resolve_dtype,
    resolve_model_config,
)


def _cpu(monkeypatch, dispatch: str = "AVX512", **caps):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, **caps})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: dispatch)


def _cuda(monkeypatch, bf16: bool):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "FakeGPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_auto_on_a_cpu_without_native_bf16_is_fp32(monkeypatch):
    _cpu(monkeypatch)  # AVX2 only: bf16 would be emulated
    dtype, why = resolve_dtype("auto", "cpu")
    assert dtype == "float32" and "without native bf16" in why


@pytest.mark.parametrize("feature", ["avx512_bf16", "amx_bf16", "bf16", "sve_bf16"])
def test_auto_on_a_cpu_with_native_bf16_is_bf16(monkeypatch, feature):
    _cpu(monkeypatch, **{feature: True})
    dtype, why = resolve_dtype("auto", "cpu")
    assert dtype == "bfloat16" and feature in why


@pytest.mark.parametrize("feature", ["avx512_bf16", "amx_bf16"])
def test_x86_bf16_does_not_count_when_torch_dispatches_avx2(monkeypatch, feature):
    """ATEN_CPU_CAPABILITY=avx2 on an AVX512-BF16 CPU: torch computes as on an AVX2-only CPU."""
    _cpu(monkeypatch, dispatch="AVX2", **{feature: True})
    dtype, why = resolve_dtype("auto", "cpu")
    assert dtype == "float32" and "dispatch below AVX512" in why
    _cpu(monkeypatch, dispatch="AVX2", bf16=True)  # ARM's feature does not depend on x86 dispatch
    assert resolve_dtype("auto", "cpu")[0] == "bfloat16"


def test_a_false_capability_does_not_count(monkeypatch):
    _cpu(monkeypatch, avx512_bf16=False, amx_bf16=False)
    assert resolve_dtype("auto", "cpu")[0] == "float32"


@pytest.mark.parametrize("bf16, want", [(True, "bfloat16"), (False, "float16")])
def test_auto_on_cuda(monkeypatch, bf16, want):
    _cuda(monkeypatch, bf16)
    _cpu(monkeypatch)  # the CPU does not matter on CUDA
    for device in ("cuda", "cuda:1"):
        dtype, why = resolve_dtype("auto", device)
        assert dtype == want and "FakeGPU" in why


def test_auto_on_cuda_without_a_gpu_names_the_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="model.device"):
        resolve_dtype("auto", "cuda")


def test_explicit_dtype_wins(monkeypatch):
    _cpu(monkeypatch)
    assert resolve_dtype("bfloat16", "cpu") == ("bfloat16", "model.dtype=bfloat16")  # emulated, but asked for
    _cpu(monkeypatch, avx512_bf16=True)
    assert resolve_dtype("float32", "cpu")[0] == "float32"
    _cuda(monkeypatch, True)
    assert resolve_dtype("float16", "cuda")[0] == "float16"
    with pytest.raises(ValueError, match="model.dtype 'fp8'"):
        resolve_dtype("fp8", "cpu")


def test_keys_hold_the_resolved_dtype(monkeypatch, tiny_model_cfg):
    cfg = dict(tiny_model_cfg, dtype="auto", cpu_kernels="auto")
    _cpu(monkeypatch, avx512_bf16=True)
    assert resolve_model_config(cfg)["dtype"] == "bfloat16"
    # auto on a native-bf16 CPU keys like an explicit bf16 run; kernels do not enter the key
    assert model_key(cfg) == model_key(dict(cfg, dtype="bfloat16", cpu_kernels="default"))
    assert "cpu_kernels" not in model_key(cfg)
    _cpu(monkeypatch)
    assert model_key(cfg) == model_key(dict(cfg, dtype="float32")) != model_key(dict(cfg, dtype="bfloat16"))


@pytest.mark.parametrize("caps, want", [({}, torch.float32), ({"avx512_bf16": True}, torch.bfloat16)])
def test_load_pair_with_auto_records_dtype_and_why(monkeypatch, tiny_model_cfg, caps, want):
    _cpu(monkeypatch, **caps)
    pair = pair_from_mapping(dict(tiny_model_cfg, dtype="auto"))
    assert next(pair.target.parameters()).dtype == next(pair.draft.parameters()).dtype == want
    assert pair.runtime["dtype"] == str(want).removeprefix("torch.")
    assert pair.runtime["dtype_reason"].startswith("auto: CPU")
    assert pair.runtime["dtype"] in models.runtime_line(pair.runtime)


def test_eval_summary_says_auto_and_keys_the_resolved_dtype(monkeypatch, tmp_path, cache_dir):
    from hydra import compose, initialize_config_module

    from selfjudge.eval import stage

    _cpu(monkeypatch)  # no native bf16: auto -> float32, and the report says why
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        cfg = compose(
            "selfjudge",
            overrides=[
                "experiment=tiny",
                f"run_dir={tmp_path}",
                f"model.cache_dir={cache_dir}",
                "model.dtype=auto",
                "eval.judge_dir=null",
                "eval.dataset.limit=1",
                "eval.max_new_tokens=8",
                "eval.warmup=0",
                "~eval.methods",
                "+eval.methods={kl:[0.5]}",
            ],
        )
    stage.run(cfg)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["runtime"]["dtype"] == "float32" and summary["runtime"]["dtype_reason"].startswith(
        "auto: CPU without"
    )
    assert "auto: CPU without native bf16" in summary["title"]
