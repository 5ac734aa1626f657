"""The project config for a stage test on the tiny pair: ``experiment=tiny`` in ``run_dir``, models cached in
``cache_dir``, no logger, then the test's own overrides."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import DictConfig


def tiny_config(run_dir: Path, cache_dir: Path, *extra: str) -> DictConfig:
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        return compose(
            "selfjudge",
            overrides=["experiment=tiny", f"run_dir={run_dir}", f"model.cache_dir={cache_dir}", "logger=none", *extra],
        )
