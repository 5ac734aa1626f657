"""The stage commands as a user runs them: --help names each stage's keys; wandb runs of a pipeline share a group."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "stage,words",
    [
        (
            "data_gen",
            ["selfjudge-data-gen", "data_gen.* keys", "window:", "score_variant:", "dataset@data_gen.dataset="],
        ),
        ("train", ["selfjudge-train", "train.* keys", "epochs:", "label_source:", "hparams_search"]),
        ("eval", ["selfjudge-eval", "eval.* keys", "gamma:", "methods:", "dataset@eval.dataset="]),
        ("pipeline", ["selfjudge-pipeline", "pipeline.* keys", "stages:", "experiment=tiny"]),
    ],
)
def test_help_shows_purpose_section_keys_and_examples(tmp_path, stage, words):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [sys.executable, "-m", f"selfjudge.{stage}.main", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    for w in words:
        assert w in p.stdout, (w, p.stdout[:1500])
    assert not (tmp_path / "runs").exists()  # --help makes no folders


def _has_field(log: bytes, field: str, value: str) -> bool:
    """Whether a wandb run log holds RunRecord.<field> = value (its protobuf encoding: tag, length, bytes)."""
    from wandb.proto import wandb_internal_pb2

    num = wandb_internal_pb2.RunRecord.DESCRIPTOR.fields_by_name[field].number
    return bytes([(num << 3) | 2, len(value)]) + value.encode() in log


def test_pipeline_wandb_runs_share_a_group(tmp_path, cache_dir):
    from selfjudge.pipeline import stage as pipeline

    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        cfg = compose(
            "selfjudge",
            overrides=[
                "experiment=tiny",
                f"run_dir={tmp_path}",
                f"model.cache_dir={cache_dir}",
                "logger=wandb",
                "experiment_name=grouped",
            ],
        )
    os.environ["WANDB_MODE"] = "offline"
    try:
        pipeline.run(cfg)
        import wandb

        wandb.teardown()  # the service writes the offline logs asynchronously: flush before reading
    finally:
        os.environ["WANDB_MODE"] = "disabled"
    logs = [p.read_bytes() for p in tmp_path.glob("wandb/offline-run-*/*.wandb")]
    assert len(logs) == 3 and all(_has_field(x, "run_group", "grouped") for x in logs)
    assert sorted(j for j in ("data_gen", "train", "eval") for x in logs if _has_field(x, "job_type", j)) == [
        "data_gen",
        "eval",
        "train",
    ]
    eval_log = next(p for p in tmp_path.glob("wandb/offline-run-*/*.wandb") if b"eval/results" in p.read_bytes())
    assert b"judge-head-selfjudge" in eval_log.read_bytes()  # the judge head it used (an artifact link online)


TIMING = {"seconds", "prefill_seconds", "draft_seconds", "verify_seconds", "rule_seconds"}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_eval_on_two_ranks_equals_one(tmp_path, cache_dir, tiny_pair):
    """torchrun with 2 CPU ranks (gloo): each rank decodes half the prompts into its own file, rank 0 merges
    and reports; the records and the summary's counts equal a one-rank eval's."""
    import json

    from selfjudge.eval import stage

    overrides = [
        "experiment=tiny",
        f"model.cache_dir={cache_dir}",
        "logger=none",
        "eval.judge_dir=null",
        "eval.dataset.limit=3",
        "eval.max_new_tokens=12",
        "eval.warmup=0",
    ]
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        stage.run(compose("selfjudge", overrides=[*overrides, f"run_dir={tmp_path / 'one'}"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "selfjudge.eval.main",
        *overrides,
        f"run_dir={tmp_path / 'two'}",
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def records(run: str) -> list[dict]:
        lines = (tmp_path / run / "eval" / "per_example.jsonl").read_text().splitlines()
        return sorted(
            json.dumps({k: v for k, v in json.loads(x).items() if k not in TIMING}, sort_keys=True) for x in lines
        )

    assert records("two") == records("one") and len(records("one")) == 3 * 7  # 3 prompts x 7 methods and thresholds
    assert not list((tmp_path / "two" / "eval").glob("per_example.rank*"))  # merged by rank 0

    def rows(run: str) -> list[tuple]:
        summary = json.loads((tmp_path / run / "eval" / "summary.json").read_text())
        return [(r["method"], r["threshold"], r["new_tokens"], r["accepted"], r["accuracy"]) for r in summary["rows"]]

    assert rows("two") == rows("one")


def test_ranks_beyond_the_batches_are_named(tmp_path, cache_dir, monkeypatch, caplog):
    """Ranks take whole batches: more ranks than batches leave some idle, and the run says so (rank 0 here
    as one of 4: it decodes its one batch of 2 prompts)."""
    import logging

    from selfjudge.eval import stage

    monkeypatch.setattr(stage, "ranks", lambda: (0, 4))
    monkeypatch.setattr(stage, "barrier", lambda world: None)
    overrides = ["experiment=tiny", f"model.cache_dir={cache_dir}", "logger=none", "eval.judge_dir=null"]
    overrides += ["eval.dataset.limit=3", "eval.max_new_tokens=4", "eval.warmup=0", "eval.batch_size=2"]
    overrides += ["~eval.methods", "+eval.methods={}", f"run_dir={tmp_path}"]
    caplog.set_level(logging.WARNING)
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        stage.run(compose("selfjudge", overrides=overrides))
    assert "4 ranks for 2 batch(es) of eval.batch_size=2 prompts: 2 rank(s) have nothing to decode" in caplog.text


def test_ranks_wait_for_the_slowest_rank_for_hours(monkeypatch):
    """A rank that finished its prompts waits at a barrier for the slowest: gloo's default 30 min stopped a whole
    eval whose other rank decoded one batch for longer."""
    import datetime

    import torch.distributed as dist

    from selfjudge import io

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    assert io.ranks() == (1, 2)
    assert seen["backend"] == "gloo" and seen["timeout"] >= datetime.timedelta(days=1)
