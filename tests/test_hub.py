"""Sharing a run: the judge head through huggingface_hub's ModelHubMixin (folder with a model card), and
a data_gen folder that ``datasets.load_dataset`` reads through its dataset card."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from huggingface_hub import ModelCard, ModelHubMixin
from hydra import compose, initialize_config_module

from selfjudge import shards
from selfjudge.judge import CONFIG_NAME, WEIGHTS_NAME, JudgeConfig, JudgeHead

D = 10
TGT = {
    "name": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
    "source": "hub",
    "fingerprint": "sha256:" + "ab" * 32,
    "hidden_size": D,
    "model_type": "qwen2",
    "num_layers": 28,
    "vocab_size": 151936,
}
DRF = {**TGT, "name": "Qwen/Qwen2.5-Coder-0.5B-Instruct", "fingerprint": "sha256:" + "cd" * 32}


def _head() -> JudgeHead:
    head = JudgeHead(
        JudgeConfig(
            kind="mlp",
            feature_dim=D,
            hidden_dim=6,
            target_model=TGT,
            draft_model=DRF,
            label_source="selfjudge",
            thresholds={
                "youden": 0.41,
                "precision_at_recall_0.8": 0.23,
                "quantiles": [0.1, 0.5, 0.9],
                "quantile_levels": [0.05, 0.5, 0.95],
            },
            metrics={
                "roc_auc": 0.8125,
                "pr_auc": 0.61,
                "at_thresholds": {"youden": {"precision": 0.7, "recall": 0.66}},
            },
            extra={"tau": 0.2675},
        )
    )
    head.init_weights(5)
    head.set_standardization(torch.linspace(-1, 1, D), torch.linspace(0.5, 2, D))
    return head.eval()


def test_save_then_from_pretrained_through_the_mixin_with_a_card(tmp_path):
    head = _head()
    assert isinstance(head, ModelHubMixin) and callable(head.push_to_hub)
    head.save_pretrained(tmp_path / "h")
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    card = ModelCard.load(tmp_path / "h" / "README.md")
    assert card.data.library_name == "selfjudge" and card.data.license == "apache-2.0"
    assert card.data.base_model == TGT["name"] and "speculative-decoding" in card.data.tags
    for fact in (
        TGT["fingerprint"],
        DRF["fingerprint"],
        "label source: `selfjudge`",
        "layers [-1]",
        "0.2675",
        "| roc_auc | 0.8125 |",
        "| youden | 0.41 | 0.7 | 0.66 |",
        "precision_at_recall_0.8",
    ):
        assert fact in card.text, fact
    again = JudgeHead.from_pretrained(tmp_path / "h")  # ModelHubMixin.from_pretrained, local folder
    assert again.config == head.config and not again.training
    x = torch.randn(32, D) * 3
    assert torch.equal(again.predict_proba(x), head.predict_proba(x))
    assert JudgeHead.from_pretrained(str(tmp_path / "h"), map_location="cpu").config == head.config


def test_folders_written_before_the_card_still_load(tmp_path):
    head = _head()
    head.save_pretrained(tmp_path / "h")
    (tmp_path / "h" / "README.md").unlink()  # the layout of earlier runs
    assert JudgeHead.from_pretrained(tmp_path / "h").config == head.config


def test_missing_heads_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a judge head folder"):
        JudgeHead.from_pretrained(tmp_path)  # a folder without the two files
    with pytest.raises(FileNotFoundError, match="no judge head folder at"):
        JudgeHead.from_pretrained(tmp_path / "runs" / "x" / "judge" / "head")
    with pytest.raises(FileNotFoundError, match="no hub repo of that id could be read"):
        JudgeHead.from_pretrained("nobody-here/no-such-judge")  # HF_HUB_OFFLINE=1 in tests: not cached


def test_load_dataset_reads_every_record_of_a_data_folder(tmp_path, cache_dir):
    datasets = pytest.importorskip("datasets")
    from selfjudge.data_gen.stage import run

    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        cfg = compose(
            "selfjudge",
            overrides=[
                "experiment=tiny",
                f"run_dir={tmp_path}",
                f"model.cache_dir={cache_dir}",
                "logger=none",
                "data_gen.max_new_tokens=12",
                "data_gen.window=6",
                "data_gen.batch_size=3",
                "data_gen.shard_size=16",
                "data_gen.dataset.limit=5",
                "data_gen.feature_dtype=float32",
            ],
        )
    run(cfg)
    data = tmp_path / "data"
    man = shards.read_manifest(data)
    assert len(man["shards"]) >= 2
    card = (data / "README.md").read_text()
    assert "path: shards/*.parquet" in card and man["target_model"]["fingerprint"] in card
    # a copy elsewhere (as a hub download would be): the card alone tells datasets what to read
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    # a private datasets cache: the global one is keyed by the folder name, and would serve an earlier run's rows
    ds = datasets.load_dataset(str(copy), split="train", cache_dir=str(tmp_path / "hf-datasets-cache"))
    ref = [r for p in shards.list_shards(data, man) for r in pq.read_table(p).to_pylist()]
    assert ds.num_rows == len(ref) == man["counts"]["records"]
    key = lambda r: (r["prompt_id"], r["position"], r["substituted"])  # noqa: E731
    got = sorted(ds.to_list(), key=key)
    ref = sorted(ref, key=key)
    assert [key(r) for r in got] == [key(r) for r in ref]
    assert [r["label"] for r in got] == [r["label"] for r in ref]
    np.testing.assert_array_equal(np.asarray([r["features"] for r in got]), np.asarray([r["features"] for r in ref]))
    assert ds.features["features"].feature.dtype == "float32" and ds.features["label"].dtype == "int8"
    assert set(ds.column_names) == set(pq.read_schema(data / "shards" / man["shards"][0]).names)
    assert json.loads((data / "manifest.json").read_text())["complete"]
