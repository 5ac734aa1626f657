"""What the real-pair benchmark scripts share: the config, the pair and the brief GSM-Symbolic prompts."""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from selfjudge.models import format_prompt, pair_from_mapping
from selfjudge.tasks import build_task, example_system_prompt

BRIEF = "Solve the problem step by step, briefly. End with: The answer is <number>."


def load_pair_and_prompts(overrides: list[str], n_prompts: int, gsm8k: str | None = None):
    """(plain config, model pair, load seconds, n prompt token lists) for hydra ``overrides``
    (default model=qwen_coder_offline): GSM-Symbolic problems with a brief-reasoning system prompt, or
    the GSM8K test problems of a local copy (``gsm8k``: its folder)."""
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        cfg = compose("selfjudge", overrides=["logger=none", *overrides])
    plain = OmegaConf.to_container(cfg, resolve=True)
    t0 = time.perf_counter()
    pair = pair_from_mapping(plain["model"])
    t_load = time.perf_counter() - t0
    source = {"name": "gsm8k", "split": "test", "path": gsm8k} if gsm8k else {"name": "gsm_symbolic", "seed": 1000000}
    task = build_task({**source, "limit": n_prompts, "chat_template": True, "system_prompt": BRIEF})
    prompts = [
        format_prompt(pair.tokenizer, ex.prompt, example_system_prompt(task, ex), task.chat_template)
        for ex in task.examples()
    ]
    return plain, pair, t_load, prompts


def cpu_flags() -> dict:
    """Model name and the SIMD flags that decide CPU matmul speed (lscpu-style)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = set((re.search(r"^flags\s*:\s*(.*)$", info, re.M) or [None, ""])[1].split())
    model = (re.search(r"^model name\s*:\s*(.*)$", info, re.M) or [None, platform.processor()])[1]
    want = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"model": model, "cpus": os.cpu_count(), "flags": sorted(f for f in want if f in flags)}


def run_facts(pair) -> dict:
    """What a benchmark's JSON records about the run beside its figures: dtype, threads, load, CPU flags, date."""
    import torch

    return {
        "dtype": str(next(pair.target.parameters()).dtype),
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "cpu": cpu_flags(),
        "date": time.strftime("%Y-%m-%d"),
    }


def write_result(path: str | None, res: dict) -> None:
    """The benchmark's JSON at ``path`` (atomically, folders made), when one is given."""
    from selfjudge.io import write_json

    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(path, res)
