"""Every config composes: the root, and the root with each option of each group."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parent.parent / "conf"

# group folder -> the override target (the dataset group is mounted twice)
GROUPS = {
    "model": ["model"],
    "dataset": ["dataset@data_gen.dataset", "dataset@eval.dataset"],
    "judge": ["judge"],
    "deepspeed": ["deepspeed"],
    "logger": ["logger"],
    "experiment": ["experiment"],
    "data_gen": ["data_gen"],
    "train": ["train"],
    "eval": ["eval"],
    "pipeline": ["pipeline"],
}


def _options() -> list[str]:
    out = []
    for group, targets in GROUPS.items():
        for f in sorted((CONF / group).glob("*.yaml")):
            for t in targets:
                out.append(f"{t}={f.stem}")
    return out


def _compose(*overrides: str):
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        return compose("selfjudge", overrides=list(overrides))


def test_root_composes_and_resolves():
    cfg = _compose()
    assert cfg.model.target.name == "qwen2.5-coder-1.5b-instruct"
    assert str(cfg.data_gen.output_dir).startswith(str(cfg.run_dir))
    OmegaConf.to_container(cfg.model, resolve=True)


@pytest.mark.parametrize("override", _options())
def test_every_group_option_composes(override):
    cfg = _compose(override)
    assert cfg.model.target.source in ("hub", "local", "gguf", "packaged", "tiny")


def test_unknown_model_config_names_the_choices():
    with pytest.raises(MissingConfigException, match="model/qwen_nope") as e:
        _compose("model=qwen_nope")
    assert "tiny" in str(e.value)


def test_every_yaml_key_has_a_comment():
    """House rule: each key in conf/ carries a one-line comment (on its line or the line above)."""
    missing = []
    for f in sorted(CONF.rglob("*.yaml")):
        lines = f.read_text().splitlines()
        documented = {ln.strip().split(":", 1)[0] for ln in lines if "#" in ln and ":" in ln.split("#")[0]}
        for i, line in enumerate(lines):
            s = line.strip()
            if not s or s.startswith("#") or s.startswith("- ") or ":" not in s:
                continue
            key = s.split(":", 1)[0]
            if " " in key or key.startswith(("-", "{", "[", "$")) or s.endswith(":"):
                continue  # block headers (their children carry the comments)
            above = lines[i - 1].strip() if i else ""
            if "#" not in line and not above.startswith("#") and key not in documented:  # a repeat of a documented key
                missing.append(f"{f.relative_to(CONF)}:{i + 1}: {s[:50]}")
    assert not missing, "keys without a comment:\n" + "\n".join(missing[:40])
