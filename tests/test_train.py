"""The judge head and its DeepSpeed trainer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from hydra import compose, initialize_config_module

from selfjudge import shards
from selfjudge.judge import JudgeConfig, JudgeHead
from selfjudge.judge_metrics import operating_points, pr_auc, roc_auc

REPO = Path(__file__).resolve().parent.parent
DIM = 16


def make_shards(root: Path, n_prompts=40, per_prompt=20, seed=0, fingerprint="sha256:aa", dim=DIM, one_class=False):
    """A data_gen-format folder: features from two overlapping Gaussians, label 1 = important."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=dim)
    rows = {k: [] for k in ("prompt_id", "task", "prompt_ids", "response_ids", "position", "target_token", "draft_token",
                            "substituted", "orig", "alt", "ld", "label", "autojudge_label")}
    feats = []
    for p in range(n_prompts):
        for i in range(per_prompt):
            x = rng.normal(size=dim)
            lab = 0 if one_class else int(x @ w + rng.normal() * 1.5 > 0.5)
            feats.append(x)
            for k, v in (("prompt_id", f"p{p}"), ("task", "t"), ("prompt_ids", [1, 2]), ("response_ids", [3, 4, 5]),
                         ("position", i), ("target_token", 3), ("draft_token", 4), ("substituted", True), ("orig", -1.0),
                         ("alt", -1.5), ("ld", 0.5), ("label", lab), ("autojudge_label", lab if i % 2 else -1)):
                rows[k].append(v)
    f = np.stack(feats).astype(np.float32)
    table = pa.table({**{k: pa.array(v) for k, v in rows.items() if k not in ("label", "autojudge_label")},
                      "label": pa.array(rows["label"], pa.int8()), "autojudge_label": pa.array(rows["autojudge_label"], pa.int8()),
                      "features": pa.FixedSizeListArray.from_arrays(pa.array(f.reshape(-1)), dim)})
    half = len(table) // 2
    shards.write_shard(root, 0, 0, table.slice(0, half))
    shards.write_shard(root, 0, 1, table.slice(half))
    shards.write_manifest(root, {"complete": True, "shards": [shards.shard_name(0, 0), shards.shard_name(0, 1)],
                                 "feature_dim": dim, "features": {"layers": [-1], "include_draft": False},
                                 "target_model": {"name": "t", "fingerprint": fingerprint, "folder": "none"},
                                 "draft_model": {"name": "d"}, "config_hash": "x"})
    return root


def _cfg(tmp_path: Path, *extra: str):
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        return compose("selfjudge", overrides=[f"run_dir={tmp_path}", "logger=none", "train.epochs=4", "train.batch_size=64",
                                               "train.lr=0.05", *extra])


@pytest.fixture()
def data_dir(tmp_path):
    return make_shards(tmp_path / "data")


def test_every_head_parameter_changes(data_dir, tmp_path):
    from selfjudge.judge_data import feature_stats, load_judge_data
    from selfjudge.trainer import TrainSettings, train_head

    data = load_judge_data([str(data_dir)], "selfjudge", True, 0.25, 0)
    for kind in ("logistic", "mlp"):
        head = JudgeHead(JudgeConfig(kind=kind, feature_dim=DIM, hidden_dim=8))
        head.set_standardization(*feature_stats(data.train))
        before = {k: v.clone() for k, v in head.named_parameters()}
        buffers = {k: v.clone() for k, v in head.named_buffers()}
        train_head(head, data.train, data.val, TrainSettings(epochs=2, batch_size=32, lr=0.01), tmp_path / kind)
        for k, v in head.named_parameters():
            assert not torch.equal(v, before[k]), f"{kind}: {k} did not change"
        for k, v in head.named_buffers():
            assert torch.equal(v, buffers[k]), f"{kind}: buffer {k} changed in training"


def test_stage_writes_head_and_reloads_identically(data_dir, tmp_path):
    from selfjudge.train.stage import run

    res = run(_cfg(tmp_path))
    assert res["roc_auc"] > 0.75
    head = JudgeHead.from_pretrained(tmp_path / "judge" / "head")
    th = head.config.thresholds
    assert set(th) >= {"youden", "precision_at_recall_0.8", "quantiles"} and len(th["quantiles"]) == 11
    assert head.config.target_model["fingerprint"] == "sha256:aa"
    x = torch.randn(50, DIM)
    again = JudgeHead.from_pretrained(tmp_path / "judge" / "head")
    assert torch.equal(head.predict_proba(x), again.predict_proba(x))
    assert (tmp_path / "judge" / "metrics.json").is_file()


def test_logistic_matches_sklearn(data_dir, tmp_path):
    """Parity: validation AUC within 0.01 of scikit-learn's LogisticRegression at its best C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from selfjudge.judge_data import load_judge_data
    from selfjudge.train.stage import run

    ours = run(_cfg(tmp_path, "train.epochs=10", "train.weight_decay=0.0"))["roc_auc"]
    data = load_judge_data([str(data_dir)], "selfjudge", True, 0.2, 0)
    xt, yt = data.train[:]["features"].numpy(), data.train[:]["label"].numpy()
    xv, yv = data.val[:]["features"].numpy(), data.val[:]["label"].numpy()
    sc = StandardScaler().fit(xt)
    best = max(roc_auc(yv, LogisticRegression(C=c, max_iter=2000).fit(sc.transform(xt), yt).predict_proba(sc.transform(xv))[:, 1])
               for c in (0.001, 0.01, 0.1, 1.0, 10.0))
    assert abs(ours - best) <= 0.01, (ours, best)


def test_metrics_match_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.round(rng.random(500) * 0.5 + y * 0.3, 2)  # ties included
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-9)
    assert pr_auc(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-9)
    ops = operating_points(y, p, [0.1, 0.5, 0.9])
    assert 0 <= ops["youden"] <= 1 and len(ops["quantiles"]) == 3


def test_resume_continues_from_checkpoint(data_dir, tmp_path):
    from selfjudge.train.stage import run

    class Killed(Exception):
        pass

    def kill_after(epoch):
        if epoch == 1:
            raise Killed()

    with pytest.raises(Killed):
        run(_cfg(tmp_path), after_epoch=kill_after)
    seen = []
    run(_cfg(tmp_path), after_epoch=seen.append)
    assert seen == [2, 3]  # epochs 0 and 1 were not redone


def test_autojudge_labels_drop_uncomputed_rows(data_dir):
    from selfjudge.judge_data import load_judge_data

    sj = load_judge_data([str(data_dir)], "selfjudge", True, 0.2, 0)
    aj = load_judge_data([str(data_dir)], "autojudge", True, 0.2, 0)
    assert len(aj.train) + len(aj.val) == (len(sj.train) + len(sj.val)) // 2


def test_clear_errors(tmp_path):
    from selfjudge.judge_data import load_judge_data
    from selfjudge.train.stage import run

    one = make_shards(tmp_path / "one", one_class=True)
    with pytest.raises(ValueError, match="both classes"):
        load_judge_data([str(one)], "selfjudge", True, 0.2, 0)
    a, b = make_shards(tmp_path / "a"), make_shards(tmp_path / "b", fingerprint="sha256:bb")
    with pytest.raises(ValueError, match="different target models"):
        load_judge_data([str(a), str(b)], "selfjudge", True, 0.2, 0)
    bad = make_shards(tmp_path / "bad")
    m = shards.read_manifest(bad)
    m["feature_dim"] = 32
    shards.write_manifest(bad, m)
    with pytest.raises(ValueError, match="feature_dim=32"):
        load_judge_data([str(bad)], "selfjudge", True, 0.2, 0)
    empty = tmp_path / "empty"
    shards.write_manifest(empty, {"complete": True, "shards": []})
    with pytest.raises(ValueError, match="no records"):
        load_judge_data([str(empty)], "selfjudge", True, 0.2, 0)
    make_shards(tmp_path / "data")
    with pytest.raises(ValueError, match="deepspeed=zero0, zero1 or zero2"):
        run(_cfg(tmp_path, "deepspeed.zero_stage=3"))


def test_wandb_not_imported_with_logger_none(data_dir, tmp_path):
    code = (f"import sys; from tests.test_train import _cfg; from selfjudge.train.stage import run; "
            f"from pathlib import Path; run(_cfg(Path({str(tmp_path)!r}), 'train.epochs=1')); "
            f"assert 'wandb' not in sys.modules, 'wandb imported'")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("stage", ["zero1", "zero2"])
def test_zero_stages_train(data_dir, tmp_path, stage):
    from selfjudge.train.stage import run

    assert run(_cfg(tmp_path, f"deepspeed={stage}"))["roc_auc"] > 0.75


@pytest.mark.slow
def test_two_ranks_match_one(data_dir, tmp_path):
    """torchrun with 2 CPU ranks (gloo) reaches the metrics of 1 rank within tolerance."""
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    args = [f"run_dir={tmp_path}", "logger=none", "train.epochs=4", "train.batch_size=32", "train.lr=0.05"]
    one = subprocess.run([sys.executable, "-m", "selfjudge.train.main", *args, "train.output_dir=" + str(tmp_path / "one")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
                          "-m", "selfjudge.train.main", *args, "train.output_dir=" + str(tmp_path / "two")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())["final"]
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())["final"]
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    assert abs(m1["roc_auc"] - m2["roc_auc"]) < 0.03
