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


def test_dataset_ids_at_empty_keep_every_key_and_a_list_changes_only_the_data():
    """dataset.ids=[] is left out of the data, pipeline, labels and records keys (outputs made before the option
    keep theirs); a list of ids changes the data folder's key, never the AutoJudge labels' or the eval records'."""
    from selfjudge.data_gen.stage import hashes
    from selfjudge.eval.stage import settings
    from selfjudge.evaluation import records_key
    from selfjudge.pipeline.stage import stage_hashes

    overrides = ["dataset@data_gen.dataset=gsm8k_train", "dataset@eval.dataset=default_mix"]
    cfg = _compose(*overrides)
    before = OmegaConf.to_container(cfg, resolve=True)
    for ds in (before["data_gen"]["dataset"], before["eval"]["dataset"], *before["eval"]["dataset"]["sources"]):
        del ds["ids"]  # a config composed before dataset.ids existed
    assert stage_hashes(cfg) == stage_hashes(OmegaConf.create(before))
    now = OmegaConf.to_container(cfg, resolve=True)
    assert hashes(now)[1:] == hashes(before)[1:]
    picked = OmegaConf.to_container(_compose(*overrides, 'data_gen.dataset.ids=["gsm8k/train/3"]'), resolve=True)
    assert hashes(picked)[1] != hashes(now)[1] and hashes(picked)[2:] == hashes(now)[2:]

    def key(plain):
        s = settings(plain)
        return records_key(s, s.dataset_with_limit(), "t", "d", "float32", False)[0]

    assert key(now) == key(before)
    picked = OmegaConf.to_container(_compose(*overrides, 'eval.dataset.sources.0.ids=["x"]'), resolve=True)
    assert key(picked) != key(now)  # a source's own selection is a dataset of its own
