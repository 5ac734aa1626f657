"""The whole pipeline on the tiny pair: end to end, skip/resume, and bad input caught before work starts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from selfjudge.pipeline import stage as pipeline


def _cfg(run_dir: Path, cache_dir: Path, *extra: str):
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        return compose(
            "selfjudge",
            overrides=["experiment=tiny", f"run_dir={run_dir}", f"model.cache_dir={cache_dir}", "logger=none", *extra],
        )


def _rows(run_dir: Path) -> int:
    return json.loads((run_dir / "data" / "manifest.json").read_text())["counts"]["records"]


def test_tiny_pipeline_end_to_end_then_skips(tmp_path, cache_dir, caplog):
    caplog.set_level(logging.INFO)
    run_dir = tmp_path / "run"
    cfg = _cfg(run_dir, cache_dir)
    out = pipeline.run(cfg)
    assert set(out) == {"data_gen", "train", "eval"}
    for f in ("summary.json", "per_example.jsonl", "report.md", "pareto.png"):
        assert (run_dir / "eval" / f).is_file(), f
    assert (run_dir / "judge" / "head" / "judge_config.json").is_file()
    printed = caplog.text
    assert "lossless" in printed and "judge" in printed
    caplog.clear()
    markers = {
        s: (run_dir / p / pipeline.MARKER).stat().st_mtime
        for s, p in (("data_gen", "data"), ("train", "judge"), ("eval", "eval"))
    }

    again = pipeline.run(_cfg(run_dir, cache_dir))
    assert set(again) == {"data_gen", "train", "eval"}
    printed = caplog.text
    assert printed.count("skipped") == 3
    for s, p in (("data_gen", "data"), ("train", "judge"), ("eval", "eval")):
        assert (run_dir / p / pipeline.MARKER).stat().st_mtime == markers[s]


def test_interrupted_stage_resumes_without_redoing_finished_ones(tmp_path, cache_dir, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    run_dir = tmp_path / "run"
    real_runner = pipeline._stage_runner

    def failing(stage):
        if stage == "train":

            def boom(cfg):
                raise KeyboardInterrupt("killed in train")

            return boom
        return real_runner(stage)

    monkeypatch.setattr(pipeline, "_stage_runner", failing)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(_cfg(run_dir, cache_dir))
    rows = _rows(run_dir)
    data_marker = (run_dir / "data" / pipeline.MARKER).stat().st_mtime
    assert not (run_dir / "judge" / pipeline.MARKER).exists()

    monkeypatch.setattr(pipeline, "_stage_runner", real_runner)
    pipeline.run(_cfg(run_dir, cache_dir))
    assert (run_dir / "data" / pipeline.MARKER).stat().st_mtime == data_marker
    assert _rows(run_dir) == rows
    assert (run_dir / "eval" / pipeline.MARKER).is_file()
    assert "data_gen: finished output" in caplog.text


def test_changed_config_redoes_stage_and_keeps_old_output(tmp_path, cache_dir, caplog):
    caplog.set_level(logging.INFO)
    run_dir = tmp_path / "run"
    pipeline.run(_cfg(run_dir, cache_dir, "pipeline.stages=[data_gen]"))
    pipeline.run(_cfg(run_dir, cache_dir, "pipeline.stages=[data_gen]", "data_gen.window=3"))
    assert "config changed" in caplog.text
    assert list(run_dir.glob("data.replaced-*"))


def test_eval_with_a_method_added_keeps_the_records_of_the_others(tmp_path, cache_dir, caplog):
    caplog.set_level(logging.INFO)
    run_dir = tmp_path / "run"
    common = ("pipeline.stages=[eval]", "eval.judge_dir=null", "eval.dataset.limit=2", "~eval.methods")

    def records():
        lines = (run_dir / "eval" / "per_example.jsonl").read_text().splitlines()
        return sorted((json.loads(x) for x in lines), key=lambda r: (r["method"], r["prompt_id"]))

    pipeline.run(_cfg(run_dir, cache_dir, *common, "+eval.methods={kl:[0.5]}"))
    first = records()
    assert {r["method"] for r in first} == {"target", "lossless", "kl"}
    pipeline.run(_cfg(run_dir, cache_dir, *common, "+eval.methods={kl:[0.5],likelihood:[1.0]}"))
    assert "config changed" in caplog.text and "copied back" in caplog.text
    moved = list(run_dir.glob("eval.replaced-*"))
    assert len(moved) == 1 and (moved[0] / "per_example.jsonl").is_file()  # the old output is kept whole
    again = records()
    assert [r for r in again if r["method"] != "likelihood"] == first  # not decoded again: same timings too
    assert sorted(r["prompt_id"] for r in again if r["method"] == "likelihood") == sorted(
        r["prompt_id"] for r in first if r["method"] == "lossless"
    )


def test_missing_stage_output_fails_before_work(tmp_path, cache_dir):
    with pytest.raises(FileNotFoundError, match="train.data_dir"):
        pipeline.run(_cfg(tmp_path / "empty", cache_dir, "pipeline.stages=[train,eval]"))


def test_judge_from_another_pair_fails_before_work(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    pipeline.run(_cfg(run_dir, cache_dir, "pipeline.stages=[data_gen,train]"))
    with pytest.raises(ValueError, match="trained for target"):
        pipeline.run(_cfg(run_dir, cache_dir, "pipeline.stages=[eval]", "model.tiny.seed=1"))


def test_unwritable_output_folder_fails_before_work(tmp_path, cache_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="run_dir"):
        pipeline.run(_cfg(blocker / "run", cache_dir))


def test_pipeline_under_several_ranks_is_refused_before_work(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="launch each stage under torchrun"):
        pipeline.run(_cfg(tmp_path / "run", cache_dir))
    assert not (tmp_path / "run" / "data").exists()


def test_unknown_stage_named(tmp_path, cache_dir):
    with pytest.raises(ValueError, match="pipeline.stages"):
        pipeline.run(_cfg(tmp_path / "r", cache_dir, "pipeline.stages=[data_gen,trian]"))


def test_a_revised_answer_checker_rescores_a_finished_eval_without_decoding(tmp_path, cache_dir, monkeypatch, caplog):
    """Scores made by an earlier revision of a checker are never kept silently: the finished eval is redone as
    a re-scoring of its kept texts (no decode), and its records and summary hold the scores of now."""
    from selfjudge import evaluation
    from selfjudge.tasks import answers

    caplog.set_level(logging.INFO)
    rows = tmp_path / "q.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"question {i}", "id": f"q{i}", "a": "A"}) + "\n" for i in range(2)))
    run_dir = tmp_path / "run"
    common = (
        "pipeline.stages=[eval]",
        "eval.judge_dir=null",
        "~eval.methods",
        "+eval.methods={kl:[0.5]}",
        "dataset@eval.dataset=jsonl",
        f"eval.dataset.path={rows}",
        "eval.dataset.id_field=id",
        "eval.dataset.answer_field=a",
        "eval.dataset.scorer=letter",
    )
    with monkeypatch.context() as m:  # the checker's first version, which called every output right
        m.delitem(answers.CHECKER_REVISIONS, "letter")
        m.setitem(answers.SCORERS, "letter", lambda text, ref: 1.0)
        pipeline.run(_cfg(run_dir, cache_dir, *common))
    first = [json.loads(x) for x in (run_dir / "eval" / "per_example.jsonl").read_text().splitlines()]
    assert {r["score"] for r in first} == {1.0}
    calls = []
    real = evaluation.decode_batch
    monkeypatch.setattr(evaluation, "decode", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(evaluation, "decode_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    pipeline.run(_cfg(run_dir, cache_dir, *common, "eval.warmup=0"))
    assert calls == [] and "config changed" in caplog.text and "re-scored" in caplog.text
    again = [json.loads(x) for x in (run_dir / "eval" / "per_example.jsonl").read_text().splitlines()]
    assert [{**r, "score": None} for r in again] == [{**r, "score": None} for r in first]  # same decodes
    assert [r["score"] for r in again] == [answers.score_letter(r["text"], "A") for r in again]
    assert {r["score"] for r in again} != {1.0}  # the tiny model's outputs name no letter
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert all(row["accuracy"] == 0.0 for row in summary["rows"])


def test_revised_checkers_enter_the_hashes_of_outputs_holding_their_scores(tmp_path, cache_dir, monkeypatch):
    """eval on a task whose checker was revised, and data_gen where it makes AutoJudge labels with it; a task
    scored by first versions keeps its hashes (and so every output made before revisions existed)."""
    from selfjudge.tasks import answers

    def hashes(*extra):
        return pipeline.stage_hashes(_cfg(tmp_path, cache_dir, *extra))

    mmlu = ("dataset@eval.dataset=mmlu", "dataset@data_gen.dataset=mmlu")
    aj = ("data_gen.autojudge.enabled=true",)
    now = {x: hashes(*mmlu, *x) for x in ((), aj)}
    plain_now = hashes()
    monkeypatch.delitem(answers.CHECKER_REVISIONS, "letter")
    before = {x: hashes(*mmlu, *x) for x in ((), aj)}
    assert now[()]["eval"] != before[()]["eval"] and now[()]["data_gen"] == before[()]["data_gen"]
    assert now[aj]["data_gen"] != before[aj]["data_gen"]  # its AutoJudge labels were scored by the checker
    assert hashes() == plain_now  # the tiny experiment's task: nothing revised, hashes as they were


def test_pipeline_runs_data_gen_and_eval_as_ranks_and_equals_one_process(tmp_path, cache_dir, caplog):
    """pipeline.nproc_per_node=2: data_gen and eval as two torchrun ranks (each a slice of the prompts), train in
    this process; markers as usual (a rerun skips every stage), and the same labels and eval records as one
    process. The ranks build a cold model cache (a rank other than 0 once left it without weights)."""
    import os
    import subprocess
    import sys

    from tests.test_cli import TIMING

    caplog.set_level(logging.INFO)
    common = ["experiment=tiny", "logger=none", "data_gen.dataset.limit=6", "eval.dataset.limit=3"]
    common += ["eval.max_new_tokens=12", "eval.warmup=0"]
    one = tmp_path / "one"
    pipeline.run(_cfg(one, cache_dir, *common[1:]))
    two, cold = tmp_path / "two", tmp_path / "cold-cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "selfjudge.pipeline.main", *common, f"run_dir={two}", f"model.cache_dir={cold}"]
    cmd.append("pipeline.nproc_per_node=2")
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "data_gen: 2 ranks" in out and "eval: 2 ranks" in out and "train: 2 ranks" not in out
    assert sorted(p.name for p in (two / "data" / "shards").glob("*.parquet"))[:2] == [
        "rank000-00000.parquet",
        "rank001-00000.parquet",
    ]
    manifest = lambda run: json.loads((run / "data" / "manifest.json").read_text())  # noqa: E731
    assert manifest(two)["world_size"] == 2 and manifest(two)["counts"] == manifest(one)["counts"]
    for stage_dir in ("data", "judge", "eval"):
        assert (two / stage_dir / pipeline.MARKER).is_file(), stage_dir

    def records(run: Path) -> list[str]:
        lines = (run / "eval" / "per_example.jsonl").read_text().splitlines()
        keep = TIMING | {"head_hash", "judge_seconds"}
        rows = [{k: v for k, v in json.loads(x).items() if k not in keep} for x in lines]
        return sorted(json.dumps(r, sort_keys=True) for r in rows if r["method"] != "judge")

    assert records(two) == records(one) and len(records(one)) == 3 * 7  # 3 prompts x the rules and baselines
    assert not list((two / "eval").glob("per_example.rank*"))  # merged by rank 0
    again = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and (again.stdout + again.stderr).count("matches the config; skipped") == 3
    assert "ranks:" not in again.stdout + again.stderr


def test_ranks_need_the_command_line_and_no_budget(tmp_path, cache_dir):
    with pytest.raises(ValueError, match="pipeline.nproc_per_node must be a whole number >= 1, got 0"):
        pipeline.run(_cfg(tmp_path / "a", cache_dir, "pipeline.nproc_per_node=0"))
    with pytest.raises(ValueError, match="pipeline.budget_minutes .* pipeline.nproc_per_node"):
        pipeline.run(_cfg(tmp_path / "b", cache_dir, "pipeline.nproc_per_node=2", "pipeline.budget_minutes=5"))
    with pytest.raises(RuntimeError, match="run it as selfjudge-pipeline"):
        pipeline.run(_cfg(tmp_path / "c", cache_dir, "pipeline.nproc_per_node=2"))
    assert not (tmp_path / "c" / "data" / "shards").exists()  # refused before any work


def test_a_stopped_pipeline_stops_its_ranks(tmp_path, cache_dir):
    """SIGTERM to selfjudge-pipeline (a scheduler's stop) while its ranks decode: they stop with it, none is
    left running (they used to go on, orphaned, and hold the run's folders)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "selfjudge.pipeline.main", "experiment=tiny", "logger=none", f"run_dir={run_dir}"]
    cmd += [f"model.cache_dir={cache_dir}", "pipeline.nproc_per_node=2", "pipeline.stages=[data_gen]"]
    cmd += ["data_gen.dataset.limit=400", "data_gen.max_new_tokens=64"]  # long enough to be stopped mid-way
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def ranks_alive() -> list[int]:
        pids = []
        for d in Path("/proc").iterdir():
            try:
                line = (d / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if d.name.isdigit() and "selfjudge.data_gen.main" in line and str(run_dir) in line:
                pids.append(int(d.name))
        return pids

    deadline = time.monotonic() + 120
    while not (run_dir / "data" / "shards").is_dir() and time.monotonic() < deadline:
        time.sleep(0.5)  # the ranks have started writing
    assert ranks_alive(), "the ranks never started"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    deadline = time.monotonic() + 60
    while ranks_alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ranks_alive(), out[-3000:]
    assert not (run_dir / "data" / "manifest.json").exists()  # stopped, not finished
