"""The train stage and its DeepSpeed trainer on synthetic shards in data_gen's format (tests/judge_shards.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from selfjudge import shards
from selfjudge.judge import JudgeConfig, JudgeHead
from selfjudge.judge_data import feature_stats, load_judge_data
from selfjudge.judge_metrics import roc_auc
from selfjudge.trainer import train_head
from tests.judge_shards import DIM, make_shards

REPO = Path(__file__).resolve().parent.parent
DIST_VARS = ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _cfg(run_dir: Path, *extra: str):
    """A train config on the synthetic shards: the logistic head unless ``extra`` names one."""
    head = [] if any(x.startswith("judge=") for x in extra) else ["judge=logistic"]
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        return compose(
            "selfjudge",
            overrides=[
                f"run_dir={run_dir}",
                "logger=none",
                "train.epochs=3",
                "train.batch_size=64",
                "train.lr=0.05",
                "train.device=cpu",
                *head,
                *extra,
            ],
        )


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    return env


@pytest.fixture()
def data_dir(tmp_path):
    return make_shards(tmp_path / "data")


def _params(head: JudgeHead) -> dict:
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_every_head_parameter_changes_and_buffers_do_not(data_dir, tmp_path, kind):
    data = load_judge_data([str(data_dir)], "selfjudge", True, 0.25, 0)
    head = JudgeHead(JudgeConfig(kind=kind, feature_dim=DIM, hidden_dim=8, dropout=0.1)).init_weights(0)
    stats = feature_stats(data.train)
    head.set_standardization(*stats)
    before = _params(head)
    from selfjudge.train.stage import settings_from

    s = settings_from(
        OmegaConf.to_container(
            _cfg(tmp_path, "train.epochs=2", "train.lr=0.01", "train.batch_size=32", f"train.data_dir={data_dir}"),
            resolve=True,
        )
    )
    res = train_head(head, data.train, data.val, s, tmp_path / "ck")
    for k, v in head.named_parameters():
        assert not torch.equal(v, before[k]), f"{kind}: {k} did not change"
    assert torch.equal(head.mean, before["mean"]) and torch.equal(
        head.std, before["std"]
    )  # frozen: set only by standardization
    assert torch.equal(head.mean, stats[0]) and head.mean.dtype == torch.float32
    assert res["global_steps"] == 2 * -(-len(data.train) // 32) and res["final"]["roc_auc"] > 0.7


def test_streaming_stats_memory_mapped_data_and_prompt_split(data_dir):
    data = load_judge_data([str(data_dir)], "selfjudge", True, 0.25, 0)
    assert data.train.cache_files and data.val.cache_files  # Arrow files on disk, memory-mapped
    x = data.train[:]["features"].double().numpy()
    mean, std = feature_stats(data.train, batch_size=37)  # several streaming batches
    assert np.allclose(mean.numpy(), x.mean(0), rtol=1e-6, atol=1e-5)
    assert np.allclose(std.numpy(), x.std(0), rtol=1e-5)
    ds, _ = shards.open_dataset(data_dir)
    val = set(data.split["val_prompts"])
    tr = set(ds[:]["prompt_id"]) - val
    assert val and tr and data.split["n_val_prompts"] == len(val) and data.split["n_train_prompts"] == len(tr)
    assert len(data.train) + len(data.val) == len(ds) and len(data.val) == 20 * len(val)  # whole prompts on one side
    again = load_judge_data([str(data_dir)], "selfjudge", True, 0.25, 0)
    other = load_judge_data([str(data_dir)], "selfjudge", True, 0.25, 1)
    assert again.split["val_prompts"] == data.split["val_prompts"] != other.split["val_prompts"]


def test_label_source_and_negatives(data_dir):
    sj = load_judge_data([str(data_dir)], "selfjudge", True, 0.25, 0)
    aj = load_judge_data([str(data_dir)], "autojudge", True, 0.25, 0)
    pos = load_judge_data([str(data_dir)], "selfjudge", False, 0.25, 0)
    n = len(sj.train) + len(sj.val)
    assert len(aj.train) + len(aj.val) == n // 2  # rows with autojudge_label -1 dropped
    assert len(pos.train) + len(pos.val) == n // 2  # substituted rows only
    assert set(aj.train[:]["label"].tolist()) == {0, 1}


def test_stage_writes_head_metrics_and_reloads_identically(data_dir, tmp_path):
    from selfjudge.train.stage import run

    res = run(_cfg(tmp_path))
    assert res["roc_auc"] > 0.7 and res["global_steps"] > 0
    head = JudgeHead.from_pretrained(tmp_path / "judge" / "head")
    c = head.config
    assert (
        set(c.thresholds) >= {"youden", "precision_at_recall_0.8", "quantiles"} and len(c.thresholds["quantiles"]) == 11
    )
    assert c.thresholds["quantiles"] == sorted(c.thresholds["quantiles"])
    assert (
        c.target_model["fingerprint"] == "sha256:" + "a" * 64 and c.feature_dim == DIM and c.label_source == "selfjudge"
    )
    assert c.extra["split"]["val_prompts"] and c.metrics["roc_auc"] == res["roc_auc"]
    m = json.loads((tmp_path / "judge" / "metrics.json").read_text())
    assert len(m["history"]) == 3 and m["final"]["roc_auc"] == res["roc_auc"] and "at_thresholds" in m["final"]
    # the reloaded head reproduces the reported validation AUC
    data = load_judge_data([str(data_dir)], "selfjudge", True, 0.2, 0)
    p = head.predict_proba(data.val[:]["features"]).numpy()
    assert roc_auc(data.val[:]["label"].numpy(), p) == pytest.approx(res["roc_auc"], abs=1e-12)
    again = JudgeHead.from_pretrained(tmp_path / "judge" / "head")
    x = torch.randn(50, DIM) * 4
    assert torch.equal(head.predict_proba(x), again.predict_proba(x))


def test_ld_regression_head(data_dir, tmp_path):
    """judge=ld_mlp regresses LD on the mismatches; P(important) = Φ((pred − τ)/σ) with σ the validation
    residual RMS, and its AUC is the one reported (the synthetic LD separates the labels)."""
    from selfjudge.train.stage import run

    with pytest.raises(ValueError, match="train.use_negatives=false"):
        run(_cfg(tmp_path, "judge=ld_mlp", "train.use_negatives=true", f"train.output_dir={tmp_path / 'neg'}"))
    res = run(_cfg(tmp_path, "judge=ld_mlp", "train.lr=0.003", "train.epochs=10"))  # auto: mismatches only
    assert JudgeHead.from_pretrained(tmp_path / "judge" / "head").config.extra["use_negatives"] is False
    head = JudgeHead.from_pretrained(tmp_path / "judge" / "head")
    c = head.config
    assert c.objective == "regress_ld" and c.ld_tau == 0.1 and c.ld_sigma > 0 and res["roc_auc"] > 0.7
    data = load_judge_data([str(data_dir)], "selfjudge", False, 0.2, 0)
    x, ld = data.val[:]["features"], data.val[:]["ld"].double()
    with torch.no_grad():
        pred = head(x).double()
    assert c.ld_sigma == pytest.approx(float(((pred - ld) ** 2).mean().sqrt()), rel=1e-4)
    z = (pred - c.ld_tau) / c.ld_sigma
    torch.testing.assert_close(
        head.predict_proba(x).double(), 0.5 * (1 + torch.erf(z / math.sqrt(2))), atol=1e-6, rtol=0
    )
    assert roc_auc(data.val[:]["label"].numpy(), head.predict_proba(x).numpy()) == pytest.approx(
        res["roc_auc"], abs=1e-9
    )
    with pytest.raises(ValueError, match="regress_ld needs the SelfJudge label"):
        JudgeConfig(feature_dim=4, objective="regress_ld")


def test_seeded_runs_are_identical(data_dir, tmp_path):
    from selfjudge.train.stage import run

    run(_cfg(tmp_path, "judge=mlp", f"train.output_dir={tmp_path / 'a'}"))
    run(_cfg(tmp_path, "judge=mlp", f"train.output_dir={tmp_path / 'b'}"))
    a, b = (JudgeHead.from_pretrained(tmp_path / n / "head").state_dict() for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_run_resumes_from_its_checkpoint(data_dir, tmp_path):
    """Killed after step 13 (checkpoint at 12, mid-epoch 1): the rerun continues at step 13 and ends exactly
    where an uninterrupted run ends, dropout masks included (the MLP head, the default)."""
    from selfjudge.train.stage import run

    class Killed(Exception):
        pass

    def kill(epoch, step):
        if step == 13:
            raise Killed()

    args = ("train.checkpoint_every=4", "train.batch_size=32", "judge=mlp")
    with pytest.raises(Killed):
        run(_cfg(tmp_path, *args), after_step=kill)
    assert (tmp_path / "judge" / "checkpoints" / "latest").read_text().strip() == "step12"
    seen = []
    res = run(_cfg(tmp_path, *args), after_step=lambda e, s: seen.append((e, s)))
    steps_per_epoch = -(-json.loads((tmp_path / "judge" / "metrics.json").read_text())["split"]["n_train_rows"] // 32)
    assert seen[0] == (12 // steps_per_epoch, 13) and seen[-1][1] == 3 * steps_per_epoch
    assert res["resumed_from"] and res["global_steps"] == 3 * steps_per_epoch
    run(_cfg(tmp_path, *args, f"train.output_dir={tmp_path / 'straight'}"))
    a = JudgeHead.from_pretrained(tmp_path / "judge" / "head").state_dict()
    b = JudgeHead.from_pretrained(tmp_path / "straight" / "head").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="train.resume=false"):  # a checkpoint of another setup is refused
        run(_cfg(tmp_path, *args, "train.lr=0.01"))
    assert run(_cfg(tmp_path, *args, "train.lr=0.01", "train.resume=false"))["resumed_from"] is None


def test_logistic_matches_sklearn(tmp_path):
    """Parity: same features and split, validation AUC within 0.01 of LogisticRegression at its best C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from selfjudge.train.stage import run

    make_shards(tmp_path / "data", n_prompts=100, per_prompt=12, separation=1.0, seed=5)
    ours = run(_cfg(tmp_path, "train.epochs=8", "train.weight_decay=0.0", "train.lr=0.01"))["roc_auc"]
    data = load_judge_data([str(tmp_path / "data")], "selfjudge", True, 0.2, 0)
    xt, yt = data.train[:]["features"].double().numpy(), data.train[:]["label"].numpy()
    xv, yv = data.val[:]["features"].double().numpy(), data.val[:]["label"].numpy()
    sc = StandardScaler().fit(xt)
    best = max(
        roc_auc(
            yv, LogisticRegression(C=c, max_iter=5000).fit(sc.transform(xt), yt).predict_proba(sc.transform(xv))[:, 1]
        )
        for c in (1e-3, 1e-2, 0.1, 1.0, 10.0)
    )
    assert abs(ours - best) <= 0.01, (ours, best)


def test_data_dir_list_of_folders(tmp_path):
    from selfjudge.train.stage import run

    a = make_shards(tmp_path / "a", n_prompts=20, seed=1, prompt_prefix="a")
    b = make_shards(tmp_path / "b", n_prompts=20, seed=2, prompt_prefix="b")
    run(_cfg(tmp_path, f"train.data_dir=[{a},{b}]"))
    m = json.loads((tmp_path / "judge" / "metrics.json").read_text())
    assert m["split"]["n_train_rows"] + m["split"]["n_val_rows"] == 2 * 20 * 20 and m["data_dirs"] == [str(a), str(b)]


def test_clear_errors(tmp_path):
    from selfjudge.train.stage import run

    one = make_shards(tmp_path / "one", one_class=True)
    with pytest.raises(ValueError, match="both classes"):
        run(_cfg(tmp_path, f"train.data_dir={one}"))
    a, b = make_shards(tmp_path / "a"), make_shards(tmp_path / "b", fingerprint="sha256:" + "b" * 64)
    with pytest.raises(ValueError, match=r"train.data_dir mixes shards with different target models"):
        run(_cfg(tmp_path, f"train.data_dir=[{a},{b}]"))
    bad = make_shards(tmp_path / "bad")
    shards.write_manifest(bad, {**shards.read_manifest(bad), "feature_dim": 32})
    with pytest.raises(ValueError, match="size 16, but its manifest says feature_dim=32"):
        run(_cfg(tmp_path, f"train.data_dir={bad}"))
    layout = make_shards(tmp_path / "layout")
    shards.write_manifest(
        layout, {**shards.read_manifest(layout), "features": {"layers": [-1, -2], "include_draft": False}}
    )
    with pytest.raises(ValueError, match="feature_dim=16 does not match its features layout"):
        run(_cfg(tmp_path, f"train.data_dir={layout}"))
    empty = tmp_path / "empty"
    shards.write_manifest(empty, {"complete": True, "shards": []})
    with pytest.raises(ValueError, match="no records"):
        run(_cfg(tmp_path, f"train.data_dir={empty}"))
    nolabel = make_shards(tmp_path / "nolabel")
    with pytest.raises(ValueError, match="train.label_source"):
        load_judge_data([str(nolabel)], "human", True, 0.2, 0)
    with pytest.raises(ValueError, match="train.val_fraction"):
        load_judge_data([str(nolabel)], "selfjudge", True, 1.0, 0)
    for stage in (3, 7):
        with pytest.raises(
            ValueError, match="deepspeed.zero_stage=.* choose deepspeed=zero0, deepspeed=zero1, deepspeed=zero2"
        ):
            run(_cfg(tmp_path, f"train.data_dir={a}", f"deepspeed.zero_stage={stage}"))


@pytest.mark.parametrize("stage", ["zero1", "zero2"])
def test_zero_stages_train(data_dir, tmp_path, stage):
    from selfjudge.train.stage import run

    assert run(_cfg(tmp_path, f"deepspeed={stage}", "train.grad_accum=2"))["roc_auc"] > 0.7
    m = json.loads((tmp_path / "judge" / "metrics.json").read_text())
    assert m["zero_stage"] == int(stage[-1])


def test_deepspeed_config_is_interpolated_from_train():
    from omegaconf import OmegaConf

    cfg = _cfg(Path("x"), "deepspeed=zero2", "train.batch_size=48", "train.grad_accum=3", "train.lr=0.123")
    ds = OmegaConf.to_container(cfg.deepspeed, resolve=True)
    assert ds["config"]["train_micro_batch_size_per_gpu"] == 48 and ds["config"]["gradient_accumulation_steps"] == 3
    assert ds["config"]["zero_optimization"]["stage"] == 2 and ds["optimizer"]["lr"] == 0.123


def test_plain_python_launch_without_wandb(data_dir, tmp_path):
    """`python -m selfjudge.train.main` in a fresh process: sets its own rendezvous, DeepSpeed init is quick,
    and with logger=none wandb is never imported."""
    code = (
        "import runpy, sys, time; t = time.perf_counter(); "
        "sys.argv = ['main'] + sys.argv[1:]; runpy.run_module('selfjudge.train.main', run_name='__main__'); "
        "assert 'wandb' not in sys.modules, 'wandb imported'; print('SECONDS', time.perf_counter() - t)"
    )
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", code, f"run_dir={tmp_path}", "logger=none", "train.epochs=1", "train.device=cpu"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "judge" / "head" / "judge_config.json").is_file()
    assert time.perf_counter() - t < 60, "DeepSpeed init took too long (shared-memory op JIT?)"
    assert not list(tmp_path.glob("**/deepspeed_shm*"))
    assert list((tmp_path / "logs").glob("*-rank0")), "hydra run dir is named by rank"


def test_wandb_offline_logs_config_table_and_artifact(data_dir, tmp_path):
    from selfjudge.train.stage import run

    os.environ["WANDB_MODE"] = "offline"
    try:
        run(_cfg(tmp_path, "logger=wandb", "train.val_examples=5", "train.log_every=1"))
        import wandb

        wandb.teardown()  # the service writes the offline log asynchronously: flush it before reading
    finally:
        os.environ["WANDB_MODE"] = "disabled"
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = {p.name for p in runs[0].rglob("*")}
    table = next(runs[0].rglob("examples*.table.json"))
    t = json.loads(table.read_text())
    assert t["columns"][:3] == ["prompt_id", "context", "target_token"] and len(t["data"]) == 5
    log = next(runs[0].glob("*.wandb")).read_bytes()  # the offline run log: resolved config, metrics, artifact
    assert b"val_fraction" in log and b"val/" in log and b"roc_auc" in log and b"judge-head-selfjudge" in log, sorted(
        files
    )


def test_sweep_config_and_best_head_selection(data_dir, tmp_path):
    from selfjudge.train.select import select_best
    from selfjudge.train.stage import run

    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        cfg = compose("selfjudge", overrides=["+hparams_search=judge_grid"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert set(params) == {"train.weight_decay", "train.lr", "judge"} and "mlp" in params["judge"]
    sweep = tmp_path / "multirun" / "t"
    aucs = {}
    for i, wd in enumerate(("0.0", "1000.0")):  # huge weight decay: a worse head
        job = sweep / str(i)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- train.weight_decay={wd}\n")
        aucs[i] = run(
            _cfg(tmp_path, f"train.weight_decay={wd}", "train.epochs=2", f"train.output_dir={job / 'judge'}")
        )["roc_auc"]
    best = select_best(sweep, tmp_path / "judge" / "best")
    assert best["roc_auc"] == max(aucs.values()) and best["overrides"] == [
        f"train.weight_decay={'0.0' if aucs[0] >= aucs[1] else '1000.0'}"
    ]
    head = JudgeHead.from_pretrained(tmp_path / "judge" / "best")
    assert (
        head.config.metrics["roc_auc"] == best["roc_auc"] and (tmp_path / "judge" / "best" / "selected.json").is_file()
    )


@pytest.mark.slow
def test_two_ranks_match_one(data_dir, tmp_path):
    """torchrun and the deepspeed launcher with 2 CPU ranks (gloo) reach the metrics of 1 rank within tolerance."""
    args = [
        f"run_dir={tmp_path}",
        "logger=none",
        "train.epochs=4",
        "train.batch_size=32",
        "train.lr=0.05",
        "train.device=cpu",
    ]
    bindir = Path(sys.executable).parent
    launches = {
        "one": [sys.executable, "-m", "selfjudge.train.main"],
        "torchrun": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "selfjudge.train.main",
        ],
        "deepspeed": [
            str(bindir / "deepspeed"),
            "--no_local_rank",
            "--num_gpus",
            "2",
            "--master_port",
            str(_free_port()),
            "--module",
            "selfjudge.train.main",
        ],
    }
    env = {**_env(), "DS_ACCELERATOR": "cpu", "PATH": f"{bindir}:{os.environ['PATH']}"}
    m = {}
    for name, cmd in launches.items():
        r = subprocess.run(
            [*cmd, *args, f"train.output_dir={tmp_path / name}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"
        m[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert m["one"]["world_size"] == 1 and m["torchrun"]["world_size"] == 2 == m["deepspeed"]["world_size"]
    assert m["torchrun"]["final"]["global_steps"] * 2 == pytest.approx(m["one"]["final"]["global_steps"], abs=4)
    assert abs(m["one"]["final"]["roc_auc"] - m["torchrun"]["final"]["roc_auc"]) < 0.03
    assert m["torchrun"]["final"]["roc_auc"] == m["deepspeed"]["final"]["roc_auc"]  # same ranks, same seed: same run
    assert len(list((tmp_path / "logs").glob("*-rank1"))) == 2  # ranks do not share a hydra run dir


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
