"""Resume keys that cover every input, strict configs and inputs checked where they enter (tiny pair).

Each test here failed before the fix it names: a rerun with another judge head reported the old head's
records, data regenerated in place resumed an old head's training, misspelt keys were ignored, a typo in
the pipeline moved finished data aside, bad eval settings failed only after data_gen and train had run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from selfjudge.judge import JudgeConfig, JudgeHead
from selfjudge.pipeline import stage as pipeline
from selfjudge.tasks import DatasetConfigError
from tests.judge_shards import make_shards

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["how many apples are left", "janet sells eggs at the market", "def sum of a list"]


def _compose(run_dir: Path, cache_dir: Path, *extra: str):
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        return compose(
            "selfjudge",
            overrides=["experiment=tiny", f"run_dir={run_dir}", f"model.cache_dir={cache_dir}", "logger=none", *extra],
        )


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("inputs") / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": q, "id": f"p{i}"}) + "\n" for i, q in enumerate(PROMPTS)))
    return p


def _eval_cfg(run_dir, cache_dir, prompts_file, *extra):
    return _compose(
        run_dir,
        cache_dir,
        "eval.max_new_tokens=12",
        "eval.gamma=3",
        "eval.warmup=0",
        "dataset@eval.dataset=jsonl",
        f"eval.dataset.path={prompts_file}",
        "eval.dataset.id_field=id",
        "~eval.methods",
        "+eval.methods={judge:[0.5],topk:[2]}",
        *extra,
    )


def _head(folder: Path, pair, bias: float) -> Path:
    """A logistic head that says P(important) ~ 1 (bias > 0: accepts nothing) or ~ 0 (bias < 0: accepts all)."""
    head = JudgeHead(
        JudgeConfig(
            feature_dim=pair.target_info.hidden_size,
            target_model=pair.target_info.as_dict(),
            thresholds={"quantiles": [0.5]},
        )
    )
    with torch.no_grad():
        head.net.weight.zero_()
        head.net.bias.fill_(bias)
    head.save_pretrained(folder)
    return folder


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "per_example.jsonl").read_text().splitlines()]


def test_eval_rerun_with_another_head_decodes_the_judge_again(tmp_path, cache_dir, prompts_file, tiny_pair):
    from selfjudge.eval import stage

    head = tmp_path / "head"
    _head(head, tiny_pair, bias=20.0)
    stage.run(_eval_cfg(tmp_path, cache_dir, prompts_file, f"eval.judge_dir={head}"))
    judged = [r for r in _records(tmp_path / "eval") if r["method"] == "judge"]
    assert len(judged) == 3 and all(r["accepted_by_rule"] == 0 for r in judged)
    _head(head, tiny_pair, bias=-20.0)  # same folder, another head (as train.select --out would write)
    stage.run(_eval_cfg(tmp_path, cache_dir, prompts_file, f"eval.judge_dir={head}"))
    recs = _records(tmp_path / "eval")
    judged = [r for r in recs if r["method"] == "judge"]
    assert len(judged) == 3 and all(r["accepted_by_rule"] > 0 for r in judged)  # decoded with the new head
    assert len(recs) == 3 * 4  # target, lossless, judge, topk: nothing mixed in, nothing twice
    assert list((tmp_path / "eval").glob("per_example.*.jsonl"))  # the old head's records kept aside


def test_train_refuses_to_resume_on_data_regenerated_in_place(tmp_path):
    from selfjudge.train.stage import run

    data = make_shards(tmp_path / "data", seed=0)
    args = ("logger=none", "train.epochs=2", "train.batch_size=64", "train.device=cpu")
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        cfg = compose("selfjudge", overrides=[f"run_dir={tmp_path}", *args])
    run(cfg)
    shutil.rmtree(data)
    make_shards(data, seed=1)  # regenerated in place: same folder, other records
    with pytest.raises(ValueError, match="another training setup"):
        run(cfg)


@pytest.mark.parametrize(
    "override,key,close",
    [
        ("+eval.gama=8", "eval.gama", "eval.gamma"),
        ("+train.epoch=5", "train.epoch", "train.epochs"),
        ("+data_gen.window_size=30", "data_gen.window_size", "data_gen.window"),
    ],
)
def test_unknown_keys_fail_before_work_naming_the_close_match(tmp_path, cache_dir, override, key, close):
    section = key.split(".")[0]
    runner = pipeline._stage_runner(section)
    with pytest.raises(ValueError, match=rf"unknown key '{key}'.*{close}"):
        runner(_compose(tmp_path, cache_dir, override, "train.data_dir=nowhere", "eval.judge_dir=null"))
    assert not (tmp_path / "data").exists() and not (tmp_path / "judge").exists()
    assert not (tmp_path / "eval" / "per_example.jsonl").exists()


def test_pipeline_typo_keeps_finished_data_and_bad_eval_settings_fail_first(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    pipeline.run(_compose(run_dir, cache_dir, "pipeline.stages=[data_gen]"))
    manifest = (run_dir / "data" / "manifest.json").read_text()
    with pytest.raises(ValueError, match="data_gen.window_size"):
        pipeline.run(_compose(run_dir, cache_dir, "pipeline.stages=[data_gen]", "+data_gen.window_size=30"))
    assert (run_dir / "data" / "manifest.json").read_text() == manifest
    assert not list(run_dir.glob("data.replaced-*"))

    fresh = tmp_path / "fresh"
    for bad, match in (
        ("eval.gamma=0", "eval.gamma"),
        ("eval.methods.kl=[-1]", "eval.methods.kl"),
        ("+eval.gama=8", "eval.gama"),
        ("+eval.dataset.limitt=2", "limitt"),
    ):
        with pytest.raises((ValueError, DatasetConfigError), match=match):
            pipeline.run(_compose(fresh, cache_dir, bad))
        assert not (fresh / "data").exists()


def test_pipeline_redoes_eval_when_the_head_changed(tmp_path, cache_dir, tiny_pair, caplog):
    caplog.set_level(logging.INFO)
    run_dir = tmp_path / "run"
    pipeline.run(_compose(run_dir, cache_dir))
    caplog.clear()
    _head(run_dir / "judge" / "head", tiny_pair, bias=-20.0)  # e.g. train.select --out run/judge/head
    pipeline.run(_compose(run_dir, cache_dir))
    printed = caplog.text
    assert "eval: running" in printed and printed.count("skipped") == 2


def test_malformed_record_line_is_named_by_its_number(tmp_path, cache_dir, prompts_file):
    from selfjudge.eval import stage

    stage.run(_eval_cfg(tmp_path, cache_dir, prompts_file, "eval.judge_dir=null"))
    per = tmp_path / "eval" / "per_example.jsonl"
    lines = per.read_text().splitlines()
    per.write_text("\n".join([lines[0], "{}", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"per_example.jsonl line 2"):
        stage.run(_eval_cfg(tmp_path, cache_dir, prompts_file, "eval.judge_dir=null"))


def test_eval_prompt_over_the_context_is_refused_by_id(tmp_path, cache_dir):
    from selfjudge.eval import stage

    p = tmp_path / "long.jsonl"
    p.write_text(
        json.dumps({"prompt": "short", "id": "ok"})
        + "\n"
        + json.dumps({"prompt": "apples and pears " * 800, "id": "too-long"})
        + "\n"
    )
    cfg = _compose(
        tmp_path,
        cache_dir,
        "dataset@eval.dataset=jsonl",
        f"eval.dataset.path={p}",
        "eval.dataset.id_field=id",
        "eval.judge_dir=null",
    )
    with pytest.raises(ValueError, match="prompt '.*too-long'.*context"):
        stage.run(cfg)
    assert not (tmp_path / "eval" / "per_example.jsonl").exists()


@pytest.mark.parametrize("stage_name", ["data_gen", "train", "eval", "pipeline"])
def test_unwritable_run_dir_is_named_before_hydra_makes_folders(tmp_path, stage_name):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [sys.executable, "-m", f"selfjudge.{stage_name}.main", "experiment=tiny", f"run_dir={blocker / 'run'}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "run_dir" in out and "cannot write" in out and "NotADirectoryError" not in out, out[-2000:]
