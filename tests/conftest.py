"""Shared fixtures: a tiny random model pair with a real BPE tokenizer, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"

# a slow test runs the real pair or long multi-rank jobs: 2 h (the default suite's limit: 600 s, pyproject.toml)
SLOW_TIMEOUT = 7200


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


TINY_DEFAULT = {
    "seed": 0,
    "arch": "qwen2",
    "vocab_size": 512,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "intermediate_size": 128,
    "max_positions": 2048,
    "init_std": 0.1,
    "draft_noise": 0.05,
}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A model cache for the whole test session (never the user's)."""
    return tmp_path_factory.mktemp("selfjudge-cache")


def _model_cfg(cache_dir: Path, **tiny) -> dict:
    return {
        "target": {"source": "tiny", "name": "target", "revision": None, "adapter": None},
        "draft": {"source": "tiny", "name": "draft", "revision": None, "adapter": None},
        "dtype": "float32",
        "device": "cpu",
        "device_map": None,
        # torch's own kernels unless the run asks for another (SELFJUDGE_TEST_CPU_KERNELS=onednn: whole suite on oneDNN)
        "cpu_kernels": os.environ.get("SELFJUDGE_TEST_CPU_KERNELS", "default"),
        "cache_dir": str(cache_dir),
        "tiny": {**TINY_DEFAULT, **tiny},
    }


@pytest.fixture(scope="session")
def tiny_model_cfg(cache_dir) -> dict:
    """The plain-dict ``model`` config of the tiny pair (as conf/model/tiny.yaml, cache in tmp)."""
    return _model_cfg(cache_dir)


@pytest.fixture(scope="session")
def tiny_pair(tiny_model_cfg):
    """(ModelPair) tiny Qwen2 target, noisy-copy draft, shared BPE tokenizer; fp32, CPU."""
    from selfjudge.models import pair_from_mapping

    return pair_from_mapping(tiny_model_cfg)


@pytest.fixture(scope="session")
def identical_pair(cache_dir):
    """A tiny pair whose draft is exactly the target (every draft token should be accepted)."""
    from selfjudge.models import pair_from_mapping

    return pair_from_mapping(_model_cfg(cache_dir, draft_noise=0.0))


@pytest.fixture(scope="session")
def llama_pair(cache_dir):
    """The tiny pair in the Llama architecture."""
    from selfjudge.models import pair_from_mapping

    return pair_from_mapping(_model_cfg(cache_dir, arch="llama"))


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """The shared GSM8K copy beside the repo (tests may read it; the project never needs it)."""
    d = SHARED / "data" / "gsm8k"
    if not (d / "test.jsonl").is_file():
        pytest.skip("shared GSM8K copy not present")
    return d


@pytest.fixture
def device() -> str:
    """cpu by default; scripts/gpu_check.sh sets SELFJUDGE_TEST_DEVICE=cuda."""
    dev = os.environ.get("SELFJUDGE_TEST_DEVICE", "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("SELFJUDGE_TEST_DEVICE asks for CUDA, none available")
    return dev


@pytest.fixture
def pair(tiny_pair, device):
    """The tiny pair on the test device (moved back to the CPU afterwards)."""
    tiny_pair.target.to(device), tiny_pair.draft.to(device)
    yield tiny_pair
    tiny_pair.target.to("cpu"), tiny_pair.draft.to("cpu")
