"""scripts/judge_evidence.py: the issue-12 evidence chain composes valid stage configs, archives and restores eval
records, and (slow) runs end to end on the tiny pair, skips everything on a rerun and resumes a deleted eval."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from selfjudge import shards
from selfjudge.autojudge import read_labels
from selfjudge.features import SCALARS, FeatureSpec
from selfjudge.pipeline import stage as pipeline
from selfjudge.responses import read_responses, responses_hash
from tests.scripts import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "judge_evidence.py"


def _script():
    return load_script("judge_evidence")


def _eval_folder(folder: Path, path: str | None) -> bytes:
    folder.mkdir(parents=True)
    recs = b"".join(json.dumps({"prompt_id": f"p{i}", "method": "lossless"}).encode() + b"\n" for i in range(3))
    (folder / "per_example.jsonl").write_bytes(recs)
    (folder / "eval_key.json").write_text(json.dumps({"run_key": "k1", "dataset": {"name": "gsm8k", "path": path}}))
    return recs


def test_archive_then_restore_round_trip(tmp_path):
    je = _script()
    ev, bench = tmp_path / "run" / "eval", tmp_path / "bench"
    recs = _eval_folder(ev, "data/gsm8k")
    je.archive(ev, bench, "evidence_x")
    gz, key = je.bench_files(bench, "evidence_x")
    assert gzip.decompress(gz.read_bytes()) == recs
    assert json.loads(key.read_text())["run_key"] == "k1"
    stamp = gz.stat().st_mtime_ns
    je.archive(ev, bench, "evidence_x")  # same records: the file is left alone (and equal bytes anyway)
    assert gz.stat().st_mtime_ns == stamp and gzip.compress(recs, mtime=0) == gz.read_bytes()

    assert not je.restore(ev, bench, "evidence_x", "data/gsm8k")  # the folder has records: kept as they are
    for f in ev.iterdir():
        f.unlink()
    ev.rmdir()
    assert je.restore(ev, bench, "evidence_x", "data/gsm8k")
    assert (ev / "per_example.jsonl").read_bytes() == recs
    assert json.loads((ev / "eval_key.json").read_text())["run_key"] == "k1"
    assert not je.restore(tmp_path / "other" / "eval", bench, "evidence_none", None)  # nothing committed


def test_restore_refuses_what_the_eval_would_set_aside(tmp_path):
    je = _script()
    ev, bench = tmp_path / "run" / "eval", tmp_path / "bench"
    _eval_folder(ev, "data/gsm8k")
    je.archive(ev, bench, "evidence_x")
    with pytest.raises(SystemExit, match="--gsm8k-dir data/gsm8k"):
        je.restore(tmp_path / "fresh" / "eval", bench, "evidence_x", "other/gsm8k")
    je.bench_files(bench, "evidence_x")[1].unlink()
    with pytest.raises(SystemExit, match="eval_key.json"):
        je.restore(tmp_path / "fresh" / "eval", bench, "evidence_x", "data/gsm8k")
    with pytest.raises(SystemExit, match="--judge-prompts"):
        je.parse_args(["--judge-prompts", "2000"])


def test_real_pair_commands_are_valid_stage_configs(tmp_path):
    """Every command of the default (real pair) chain composes and passes the pipeline's checks, before any work."""
    je = _script()
    plan = je.Plan(je.parse_args(["--run-root", str(tmp_path / "root"), "--gsm8k-dir", "data/gsm8k"]))
    steps = [*plan.judges(), *plan.studies()] + [(n, o) for n, (_, o) in plan.evals().items()]
    picked = [
        "eval.methods.kl=[0.5,1.0]",
        "eval.methods.judge_gsm8k.thresholds=[0.3]",
        "~eval.methods.typical",
    ]  # pick_thresholds' override forms
    seen = {}
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        for name, overrides in steps:
            cfg = compose(
                "selfjudge", overrides=[*plan.base, *overrides, *(picked if name.startswith("eval_") else [])]
            )
            pipeline.preflight(cfg, list(cfg.pipeline.stages))
            seen[name] = cfg
    gsm8k, mix = seen["judge_gsm8k"].data_gen, seen["judge_mix"].data_gen
    assert gsm8k.dataset.name == "gsm8k" and gsm8k.dataset.split == "train" and gsm8k.dataset.limit == 512
    assert not gsm8k.autojudge.enabled and gsm8k.tau.mode == "value" and list(gsm8k.features.scalars)
    assert {seen[n].judge.kind for n in ("judge_gsm8k", "autojudge_gsm8k", "judge_mix")} == {"mlp"}
    data_steps = ("judge_gsm8k", "autojudge_gsm8k", "judge_mix", "study_mmlu")
    assert {seen[n].data_gen.shard_prompts for n in data_steps} == {gsm8k.batch_size}  # a stop loses one batch
    assert list(seen["judge_mix"].train.quantiles) == [0.05, 0.1, 0.2, 0.3, 0.4]  # five sweep rows per judge
    auto = seen["autojudge_gsm8k"]  # the same problems, its own data folder: the SelfJudge head never waits for it
    assert auto.train.label_source == "autojudge" and auto.data_gen.autojudge.enabled
    assert list(auto.train.quantiles) == [0.2, 0.35, 0.5, 0.65, 0.8]  # its rare label: a sweep reaching further
    assert auto.data_gen.autojudge.max_mismatches == 8 and auto.data_gen.dataset == gsm8k.dataset
    # its folder stores the study's superset; its head reads the other judges' layout (train.features)
    assert auto.data_gen.features.include_draft and list(auto.data_gen.features.scalars) == list(SCALARS)
    head_layout = FeatureSpec.from_mapping(OmegaConf.to_container(auto.train.features))
    assert head_layout == FeatureSpec.from_mapping(OmegaConf.to_container(gsm8k.features))
    assert seen["judge_gsm8k"].train.features is None and seen["judge_mix"].data_gen.features == gsm8k.features
    assert (
        auto.data_gen.output_dir != gsm8k.output_dir and auto.train.output_dir != seen["judge_gsm8k"].train.output_dir
    )
    assert "mmlu" not in json.dumps([s.name for s in mix.dataset.sources]) and not seen["judge_mix"].train.use_negatives
    # the MMLU signal-study data: its own questions (none a sweep or eval decodes), autojudge_gsm8k's layout and labels
    study = seen["study_mmlu"]
    assert list(study.pipeline.stages) == ["data_gen"] and study.data_gen.dataset.name == "mmlu"
    assert (study.data_gen.dataset.offset, study.data_gen.dataset.limit) == (1280, 256)
    assert study.data_gen.features == auto.data_gen.features and study.data_gen.autojudge == auto.data_gen.autojudge
    assert "letter" in study.data_gen.dataset.system_prompt and study.data_gen.tau == gsm8k.tau
    assert study.data_gen.output_dir not in (auto.data_gen.output_dir, gsm8k.output_dir)
    with pytest.raises(SystemExit, match="--study-prompts 769 would reach the MMLU validation questions"):
        je.parse_args(["--study-prompts", "769"])
    val, test = seen["val_gsm8k"].eval, seen["eval_gsm8k"].eval
    assert (val.dataset.split, val.dataset.offset, val.dataset.limit) == ("train", 1024, 64)
    assert (test.dataset.split, test.dataset.offset, test.dataset.limit) == ("test", 0, 256)
    assert val.dataset.path == test.dataset.path == "data/gsm8k"  # the string the records key hashes, as given
    assert seen["val_mmlu"].eval.dataset.offset == 2048 and "letter" in seen["eval_mmlu"].eval.dataset.system_prompt
    assert set(val.methods) == {"kl", "likelihood", "typical", "judge_gsm8k", "autojudge_gsm8k", "judge_mix"}
    assert list(test.methods.kl) == [0.5, 1.0] and "typical" not in test.methods
    assert list(test.methods.judge_gsm8k.thresholds) == [0.3] and val.methods.judge_gsm8k.thresholds == "head_quantiles"
    assert {s.eval.gamma for n, s in seen.items() if n[:4] in ("val_", "eval")} == {8}
    # the MMLU sweep reaches stricter likelihood and typical points than GSM8K's; a flag sets both
    mmlu = seen["val_mmlu"].eval.methods
    assert list(mmlu.likelihood) == [0.5, 1, 2, 3] and list(mmlu.typical) == [0.03, 0.1, 0.3, 1]
    assert list(val.methods.likelihood) == [1, 2, 3] and list(mmlu.kl) == list(val.methods.kl)
    flagged = je.Plan(je.parse_args(["--run-root", str(tmp_path), "--typical", "0.3,1"]))
    assert flagged.grid("val_mmlu")["typical"] == flagged.grid("eval_gsm8k")["typical"] == "0.3,1"
    # --guard: each judge also as <judge>_top1, the same head with the KL rule's top-1 guard
    args = ["--run-root", str(tmp_path / "root"), "--gsm8k-dir", "data/gsm8k", "--judges", "judge_gsm8k"]
    plan = je.Plan(je.parse_args([*args, "--guard", "0.9", "--only", "val_gsm8k"]))
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        cfg = compose("selfjudge", overrides=[*plan.base, *plan.evals()["val_gsm8k"][1]])
        pipeline.preflight(cfg, list(cfg.pipeline.stages))
    guarded = cfg.eval.methods.judge_gsm8k_top1
    assert guarded.policy == "judge" and guarded.thresholds == "head_quantiles"
    assert guarded.head_dir == cfg.eval.methods.judge_gsm8k.head_dir and guarded.options.judge_strict_top1 == 0.9
    assert "options" not in cfg.eval.methods.judge_gsm8k and list(plan.judge_methods) == [
        "judge_gsm8k",
        "judge_gsm8k_top1",
    ]
    with pytest.raises(SystemExit, match=r"--guard must be a top-1 probability in \(0, 1\], got 1.5"):
        je.parse_args([*args, "--guard", "1.5"])


def test_the_carried_autojudge_judge_is_chosen_by_name(tmp_path):
    """autojudge_carry (not a default judge): autojudge_gsm8k's problems, layout, head and train labels, labelled by
    AutoJudge's whole search (mode=carry, in order), starting from autojudge_gsm8k's committed responses."""
    je = _script()
    args = ["--run-root", str(tmp_path / "root"), "--gsm8k-dir", "data/gsm8k"]
    assert "autojudge_carry" not in je.Plan(je.parse_args(args)).heads
    plan = je.Plan(je.parse_args([*args, "--judges", "autojudge_gsm8k,autojudge_carry"]))
    steps = dict(plan.judges())
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        auto, carry = (compose("selfjudge", overrides=[*plan.base, *steps[n]]) for n in plan.heads)
        pipeline.preflight(carry, list(carry.pipeline.stages))
    aj, cj = auto.data_gen.autojudge, carry.data_gen.autojudge
    assert (cj.mode, cj.select, cj.max_mismatches) == ("carry", "first", aj.max_mismatches) and aj.mode == "independent"
    assert carry.data_gen.dataset == auto.data_gen.dataset and carry.data_gen.features == auto.data_gen.features
    assert carry.train.features == auto.train.features and carry.train.label_source == "autojudge"
    assert carry.data_gen.output_dir != auto.data_gen.output_dir
    # the search starts from the (committed) responses autojudge_gsm8k's labels were made for
    assert carry.data_gen.responses_from == "docs/bench/evidence_autojudge_gsm8k.responses.jsonl.gz"


def test_rules_only_and_only_pick_the_steps_and_leave_the_judges_out(tmp_path):
    je = _script()
    args = ["--run-root", str(tmp_path / "root"), "--gsm8k-dir", "data/gsm8k"]
    plan = je.Plan(je.parse_args([*args, "--rules-only", "--only", "val_gsm8k,eval_gsm8k,judge_mix"]))
    assert plan.judges() == [] and set(plan.evals()) == {"val_gsm8k", "eval_gsm8k"}
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        cfg = compose("selfjudge", overrides=[*plan.base, *plan.evals()["val_gsm8k"][1]])
        pipeline.preflight(cfg, list(cfg.pipeline.stages))  # no head folder needed
    assert set(cfg.eval.methods) == {"kl", "likelihood", "typical"}
    plan = je.Plan(je.parse_args([*args, "--only", "judge_mix,val_mmlu"]))
    assert [n for n, _ in plan.judges()] == ["judge_mix"] and set(plan.evals()) == {"val_mmlu"}
    plan = je.Plan(je.parse_args([*args, "--judges", "judge_gsm8k", "--only", "judge_gsm8k,judge_mix,val_gsm8k"]))
    assert [n for n, _ in plan.judges()] == ["judge_gsm8k"] and list(plan.heads) == ["judge_gsm8k"]
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        cfg = compose("selfjudge", overrides=[*plan.base, *plan.evals()["val_gsm8k"][1]])
    assert set(cfg.eval.methods) == {"kl", "likelihood", "typical", "judge_gsm8k"}
    for bad, says in (
        (["--only", "val_gsm8k,nope"], "--only nope: unknown name"),
        (["--judges", "judge_gsm8k,nope"], "--judges nope: unknown name"),
        (["--rules-only", "--only", "judge_mix"], "nothing"),
        (["--judges", "judge_gsm8k", "--only", "judge_mix"], "nothing"),
        (["--rules-only", "--judges", "judge_mix"], "give one of them"),
    ):
        with pytest.raises(SystemExit, match=says):
            je.parse_args([*args, *bad])
    plan = je.Plan(je.parse_args([*args, "--judges", "judge_gsm8k,judge_mix", "--only", "judge_mix,val_gsm8k"]))
    with pytest.raises(SystemExit, match="judge_gsm8k: no trained head .* add judge_gsm8k to --only"):
        je.execute(plan, tmp_path / "bench", plan.evals())  # judge_mix trains here; judge_gsm8k has no head
    with pytest.raises(SystemExit, match="run the step val_gsm8k first"):  # an eval before its sweep finished
        je.pick(plan, "val_gsm8k")


def _drive(root: Path, cache_dir: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--run-root", str(root), "--", f"model.cache_dir={cache_dir}"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    return out


@pytest.mark.slow  # about 2 minutes on one busy core: three runs of the chain (ten pipeline calls each)
def test_tiny_chain_end_to_end_then_skipped_then_resumed_from_committed_records(tmp_path, cache_dir):
    root = tmp_path / "root"
    evals = ("val_gsm8k", "val_mmlu", "eval_gsm8k", "eval_mmlu")
    out = _drive(root, cache_dir)
    for name in evals:
        assert (root / name / "eval" / "summary.json").is_file(), name
        gz = root / "bench" / f"evidence_{name}_g4_b4.per_example.jsonl.gz"
        assert gzip.decompress(gz.read_bytes()) == (root / name / "eval" / "per_example.jsonl").read_bytes()
        assert (root / "bench" / f"evidence_{name}_g4_b4.eval_key.json").is_file()
    for head in ("judge_gsm8k/judge", "autojudge_gsm8k/judge", "judge_mix/judge"):
        assert (root / head / "head" / "judge_config.json").is_file(), head
    assert (
        json.loads((root / "autojudge_gsm8k/judge/head/judge_config.json").read_text())["label_source"] == "autojudge"
    )
    final = [json.loads(x) for x in (root / "eval_mmlu/eval/per_example.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (root / "val_mmlu/eval/per_example.jsonl").read_text().splitlines()]
    assert {r["method"] for r in final} <= {r["method"] for r in val}
    assert len({(r["method"], r["threshold"]) for r in final}) < len({(r["method"], r["threshold"]) for r in val})
    assert "Overrides for the eval" in out  # pick_thresholds ran on the sweeps
    labels = root / "bench" / "evidence_autojudge_gsm8k.autojudge_labels.jsonl.gz"  # its regenerations, kept
    data = root / "autojudge_gsm8k" / "data"
    man = json.loads((data / "manifest.json").read_text())
    assert len(read_labels(labels, man["config_hash"], man["labels_hash"])) > 0
    responses = root / "bench" / "evidence_autojudge_gsm8k.responses.jsonl.gz"  # the responses they bind to
    taken = read_responses(responses, responses_hash(man["config"]))
    rows = [
        r for f in shards.list_shards(data) for r in pq.read_table(f, columns=["prompt_id", "response_ids"]).to_pylist()
    ]
    assert taken and {r["prompt_id"]: r["response_ids"] for r in rows} == {k: v for k, (_, v) in taken.items()}
    study = json.loads((root / "study_mmlu" / "data" / "manifest.json").read_text())  # the MMLU study's data
    assert study["complete"] and study["counts"]["prompts"] == 4

    files = sorted(p for p in root.rglob("*") if p.is_file() and "logs" not in p.parts)
    stamps = {
        p: p.stat().st_mtime_ns for p in files if p.name in (pipeline.MARKER, "per_example.jsonl") or ".gz" in p.name
    }
    again = _drive(root, cache_dir)
    assert again.count("matches the config; skipped") == 11  # 2 stages x 3 judges + 4 evals + study_mmlu
    assert "running ->" not in again
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    ev = root / "eval_mmlu" / "eval"
    records = (ev / "per_example.jsonl").read_bytes()
    for f in ev.iterdir():
        f.unlink()
    ev.rmdir()
    third = _drive(root, cache_dir)
    assert "eval_mmlu_g4_b4: restored" in third and third.count("running ->") == 1
    assert (ev / "per_example.jsonl").read_bytes() == records  # every record kept, none decoded again
    assert (ev / "summary.json").is_file() and (ev / pipeline.MARKER).is_file()


def test_status_reads_what_is_here_and_what_is_committed(tmp_path, capsys):
    je = _script()
    root, bench = tmp_path / "root", tmp_path / "bench"
    args = ["--run-root", str(root), "--bench-dir", str(bench), "--gsm8k-dir", "data/gsm8k", "--rules-only"]
    _eval_folder(root / "val_gsm8k" / "eval", "data/gsm8k")  # 3 lossless records here
    _eval_folder(tmp_path / "elsewhere", None)
    je.archive(tmp_path / "elsewhere", bench, "evidence_val_mmlu_g8_b64")  # committed from another machine
    (root / "eval_mmlu" / "eval").mkdir(parents=True)
    (root / "eval_mmlu" / "eval" / pipeline.MARKER).write_text("{}")
    capsys.readouterr()
    je.main([*args, "--status"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("val_gsm8k: partial, 3 records of 64 prompts each: lossless 3")
    assert out[1].startswith("val_mmlu: partial, 3 records") and "(committed; restored at the next run)" in out[1]
    assert out[2] == "eval_gsm8k: not started (thresholds from val_gsm8k)"
    assert out[3].startswith("eval_mmlu: finished")
    assert not (root / "val_mmlu").exists()  # nothing written
    # a sweep finished before its grid grew says what a rerun decodes
    (root / "val_gsm8k" / "eval" / pipeline.MARKER).write_text("{}")
    rows = [
        {"method": m, "threshold": t}
        for m, ts in (("kl", [0.5, 1]), ("likelihood", [1]), ("typical", [0.3]))
        for t in ts
    ]
    with open(root / "val_gsm8k" / "eval" / "per_example.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    je.main([*args, "--status", "--kl", "0.5,1", "--likelihood", "1,2", "--typical", "0.3"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("finished (" + str(root / "val_gsm8k" / "eval") + "); not yet decoded: likelihood@2 "
                           "(a rerun decodes only those)")  # fmt: skip
    with_judge = [a for a in args if a != "--rules-only"] + ["--judges", "judge_gsm8k", "--only", "val_gsm8k"]
    je.main([*with_judge, "--status", "--kl", "0.5,1", "--likelihood", "1", "--typical", "0.3"])
    out = capsys.readouterr().out.splitlines()  # a judge added after the sweep finished: its rows are to come
    assert out[-1].endswith("; not yet decoded: judge_gsm8k (a rerun decodes only those)")
    # the judges: data_gen progress from the shards' progress files, then a finished folder, then a head
    from selfjudge import shards

    shards.write_progress(root / "judge_gsm8k" / "data", 0, {"shards": ["a"], "done_prompt_ids": ["p1", "p2", "p3"]})
    (root / "judge_mix" / "data").mkdir(parents=True)
    (root / "judge_mix" / "data" / shards.MANIFEST).write_text("{}")
    (root / "autojudge_gsm8k" / "judge" / "head").mkdir(parents=True)
    (root / "autojudge_gsm8k" / "judge" / "head" / "judge_config.json").write_text("{}")
    je.main([a for a in args if a != "--rules-only"] + ["--status", "--only", "judge_gsm8k,autojudge_gsm8k,judge_mix"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("judge_gsm8k: data_gen 3 of 512 prompts in shards (")
    assert out[1].startswith("autojudge_gsm8k: trained") and out[2].startswith("judge_mix: data finished, not trained")
    # the AutoJudge labels kept beside the records are counted
    from selfjudge.autojudge import write_labels

    (root / "autojudge_gsm8k" / "judge" / "head" / "judge_config.json").unlink()
    write_labels(bench / "evidence_autojudge_gsm8k.autojudge_labels.jsonl.gz", "h", {"a|b|1|2": 1, "a|b|3|4": 0})
    je.main([a for a in args if a != "--rules-only"] + ["--status", "--only", "autojudge_gsm8k"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        "autojudge_gsm8k: not started; 2 AutoJudge labels in evidence_autojudge_gsm8k.autojudge_labels.jsonl.gz "
        "(taken back by a run without the data folder)"
    )
    # the study's data: progress, then finished
    study = ["--status", "--only", "study_mmlu"]
    shards.write_progress(root / "study_mmlu" / "data", 0, {"shards": ["a"], "done_prompt_ids": ["q1", "q2"]})
    je.main([*args, *study])
    assert capsys.readouterr().out.startswith("study_mmlu: data_gen 2 of 256 prompts in shards (")
    (root / "study_mmlu" / "data" / shards.MANIFEST).write_text("{}")
    je.main([*args, *study])
    assert capsys.readouterr().out == f"study_mmlu: data finished ({root / 'study_mmlu' / 'data'})\n"


def test_records_are_archived_while_the_eval_runs_and_only_whole_lines(tmp_path):
    je = _script()
    ev, bench = tmp_path / "eval", tmp_path / "bench"
    recs = _eval_folder(ev, "data/gsm8k")
    with open(ev / "per_example.jsonl", "ab") as f:
        f.write(b'{"prompt_id": "p3", "meth')  # a line the eval is writing right now
    ticks = []
    je.run("sleepy", [sys.executable, "-c", "import time; time.sleep(1.5)"], tick=lambda: ticks.append(1), every=0.2)
    assert ticks  # called while the command ran
    je.archive(ev, bench, "evidence_x")
    assert gzip.decompress(je.bench_files(bench, "evidence_x")[0].read_bytes()) == recs


def test_ranks_records_are_archived_while_they_decode_and_kept_over_the_committed(tmp_path):
    """With pipeline.nproc_per_node each rank appends its own file until rank 0 merges them: the archive holds
    them (whole lines), and a folder with rank files is not overwritten by the committed records."""
    je = _script()
    ev, bench = tmp_path / "eval", tmp_path / "bench"
    recs = _eval_folder(ev, "data/gsm8k")
    rank1 = json.dumps({"prompt_id": "p9", "method": "lossless"}).encode() + b"\n"
    (ev / "per_example.rank001.jsonl").write_bytes(rank1 + b'{"prompt_id": "p1')  # a line being written
    (ev / "per_example.rank000.jsonl").write_bytes(b"")
    je.archive(ev, bench, "evidence_x")
    assert gzip.decompress(je.bench_files(bench, "evidence_x")[0].read_bytes()) == recs + rank1
    (ev / "per_example.jsonl").unlink()
    assert not je.restore(ev, bench, "evidence_x", "data/gsm8k")  # the ranks' files are newer: the run merges them
    assert not (ev / "per_example.jsonl").exists()


def _sweep_record(method: str, t, pid: int, score: float = 1.0) -> dict:
    return {"prompt_id": f"v{pid}", "method": method, "policy": method.split("_")[0], "threshold": t,
            "score": score, "rounds": 10, "new_tokens": 20 if t is None else 24, "accepted_by_rule": 1,
            "seconds": 1.0, "output_ids": [], "proposed": 0, "accepted": 0, "accept_hist": [],
            "draft_forwards": 0}  # fmt: skip


def test_thresholds_are_picked_on_a_sweep_still_decoding_another_judge(tmp_path, capsys):
    """A judge added to a finished sweep takes its marker away while it decodes; an eval that needs only the
    rules (or finished judges) picks on the finished points, and one that needs an unfinished point is refused
    with the points named."""
    je = _script()
    root = tmp_path / "root"
    args = ["--run-root", str(root), "--bench-dir", str(tmp_path / "bench"), "--gsm8k-dir", "data/gsm8k",
            "--val-prompts", "3", "--kl", "0.5,1", "--likelihood", "1", "--typical", "0.3"]  # fmt: skip
    head = root / "judge_gsm8k" / "judge" / "head"
    head.mkdir(parents=True)
    (head / "judge_config.json").write_text(json.dumps({"thresholds": {"quantiles": [0.1, 0.2]}}))
    recs = [_sweep_record(m, None, i) for m in ("target", "lossless") for i in range(3)]
    recs += [_sweep_record(m, t, i) for m, t in (("kl", 0.5), ("kl", 1.0), ("likelihood", 1.0)) for i in range(3)]
    recs += [_sweep_record("typical", 0.3, i, score=float(i > 0)) for i in range(3)]  # loses a prompt: no pick
    recs += [_sweep_record("judge_gsm8k", 0.1, i) for i in range(3)] + [_sweep_record("judge_gsm8k", 0.2, 0)]
    val = root / "val_gsm8k" / "eval"
    val.mkdir(parents=True)
    (val / "per_example.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))

    rules = je.Plan(je.parse_args([*args, "--rules-only"]))
    overrides = je.pick(rules, "val_gsm8k")
    assert overrides == ["eval.methods.kl=[0.5]", "eval.methods.likelihood=[1.0]", "~eval.methods.typical"]
    assert "other methods are still being decoded there" in capsys.readouterr().out
    judged = je.Plan(je.parse_args([*args, "--judges", "judge_gsm8k"]))
    with pytest.raises(SystemExit, match=r"not a finished validation sweep for this run's methods \(not yet "
                       r"decoded for all 3 prompts: judge_gsm8k@0.2\): run the step val_gsm8k first"):  # fmt: skip
        je.pick(judged, "val_gsm8k")
    assert je.sweep_missing(judged, recs[4:], 3, "val_gsm8k") == [
        "lossless",
        "judge_gsm8k@0.2",
    ]  # lossless lost a prompt
    assert je.sweep_missing(judged, recs, None, "val_gsm8k") == []  # a finished sweep's status: every point present
    (val / "per_example.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:-1]))
    assert je.sweep_missing(judged, recs[:-1], None, "val_gsm8k") == ["judge_gsm8k@0.2"]
    (val / pipeline.MARKER).write_text("{}")  # finished before the judge's grid was known: still refused
    with pytest.raises(SystemExit, match=r"\(not yet decoded for all 3 prompts: judge_gsm8k@0.2\)"):
        je.pick(judged, "val_gsm8k")
    assert je.pick(rules, "val_gsm8k")[0] == "eval.methods.kl=[0.5]"


def test_no_labels_file_before_the_first_shard(tmp_path):
    """A data step that has written no shard yet leaves no (empty) labels file to commit."""
    je = _script()
    data = tmp_path / "data"
    (data / "shards").mkdir(parents=True)
    (data / "shards" / "run_info.json").write_text("{}")
    je.archive_labels(data, tmp_path / "x.autojudge_labels.jsonl.gz", "study_mmlu")
    assert not list(tmp_path.glob("*.gz"))  # neither labels nor responses


def test_labelled_only_takes_the_prompts_of_the_responses_file(tmp_path, monkeypatch):
    """--labelled-only: autojudge_gsm8k's data step names exactly the prompts its responses file holds
    (data_gen.dataset.ids), in a run root of its own, and the command composes and selects those prompts."""
    from selfjudge.responses import write_responses
    from selfjudge.tasks import build_task

    je = _script()
    bench = tmp_path / "bench"
    args = ["--judges", "autojudge_gsm8k", "--only", "autojudge_gsm8k", "--gsm8k-dir", "data/gsm8k"]
    a = je.parse_args([*args, "--labelled-only"])
    assert a.run_root == "runs/judge_evidence_labelled" and a.bench_dir == "docs/bench"
    assert je.parse_args([*args, "--labelled-only", "--run-root", "r"]).run_root == "r"  # one given is kept
    plan = je.Plan(je.parse_args([*args, "--labelled-only", "--run-root", str(tmp_path / "root")]))
    ((name, overrides),) = plan.judges()
    with pytest.raises(SystemExit, match="--labelled-only: no responses file"):
        je.make_data(plan, bench, name, overrides)
    ids = ["gsm8k/train/7", "gsm8k/train/3", "gsm8k/train/12"]
    write_responses(bench / "evidence_autojudge_gsm8k.responses.jsonl.gz", "h", {i: ("sha", [1, 2]) for i in ids})
    ran = []
    monkeypatch.setattr(je, "run", lambda step, cmd, tick=None: ran.append(cmd))
    je.make_data(plan, bench, name, overrides)
    cmd = ran[0]
    assert 'data_gen.dataset.ids=["gsm8k/train/12","gsm8k/train/3","gsm8k/train/7"]' in cmd
    assert any(c.startswith("data_gen.responses_from=") for c in cmd)
    stage_overrides = cmd[cmd.index("selfjudge.pipeline.main") + 1 :]
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        cfg = compose("selfjudge", overrides=stage_overrides)
    ds = OmegaConf.to_container(cfg.data_gen.dataset, resolve=True)
    rows = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(20)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds["path"] = str(tmp_path)  # the same ids in a local GSM8K-format folder
    assert sorted(ex.id for ex in build_task(ds).examples()) == sorted(ids)
