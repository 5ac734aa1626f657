"""Run the stages in order, skipping each whose finished output matches its config.

A stage is *finished* when its output folder holds the completion marker (``selfjudge.io.MARKER``) with
the hash of what made it: its config sections, the hash of the stage before it, and for eval the content
of the judge head folders it reads (a head replaced by ``train.select --out`` redoes eval). Every stage's
settings are checked before the first stage runs. A stage whose config changed is redone: its old output
folder is renamed aside (never deleted), only once every setting has been checked; eval gets its records
back in the new folder (``CARRIED``), since it keys them per record and keeps only those its new config still
holds (a method added or a threshold re-picked decodes only what changed). A stage that was interrupted has no
marker and runs again; the stages themselves resume their partial work.

``pipeline.nproc_per_node=N`` runs data_gen and eval as N ranks (``torch.distributed.run``, each rank a slice of
the prompts, e.g. one per GPU or CPU core) under the same overrides; this process keeps the run folder's lock,
the markers and the moving aside, and train stays one process (the judge head is small).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from selfjudge.extras import check_installed
from selfjudge.io import (
    MARKER,
    atomic_write_bytes,
    check_writable,
    config_hash,
    folder_hash,
    identity,
    read_json,
    read_marker,
    stop_process,
    write_marker,
)
from selfjudge.locks import stage_lock
from selfjudge.settings import build
from selfjudge.tasks import build_task, checker_key

log = logging.getLogger("selfjudge.pipeline")  # hydra's console and per-rank log file show it

STAGES = ("data_gen", "train", "eval")
# What decides each stage's whole output: config sections minus keys that never change it (logger and
# launch settings are not hashed). The stages' own resume keys are narrower (see each stage).
IDENTITY = {
    "data_gen": {
        "model": (),
        "data_gen": ("overwrite", "output_dir", "shard_prompts", "autojudge_labels_from", "responses_from"),
        "seed": (),
    },
    "train": {
        "train": ("output_dir", "data_dir", "num_workers", "log_every", "resume"),
        "judge": (),
        "deepspeed": (),
        "seed": (),
    },
    "eval": {"model": (), "eval": ("output_dir", "judge_dir", "autojudge_dir", "resume"), "seed": ()},
}
# Files a redone stage takes back from its output moved aside: eval's records and their key
# (selfjudge.evaluation.RECORDS / KEY_FILE); RecordsFile.open sets aside those another config made.
CARRIED = {"eval": ("per_example.jsonl", "eval_key.json")}
RANKED = ("data_gen", "eval")  # the stages that pipeline.nproc_per_node splits over ranks
SUMMARY_ENV = "SELFJUDGE_STAGE_SUMMARY"  # a stage's entry point under the pipeline's launcher: rank 0's summary here


@dataclass(frozen=True)
class PipelineSettings:
    """The ``pipeline`` config section (conf/pipeline/default.yaml)."""

    stages: list  # subset of STAGES, in order
    force: bool  # redo stages even when their output is complete
    budget_minutes: float | None  # fit the run to this many minutes (selfjudge.pipeline.budget; null: no cuts)
    nproc_per_node: int = 1  # ranks of data_gen and eval (torch.distributed.run); 1: in this process

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"pipeline.stages has unknown stage(s) {unknown}; choose from {list(STAGES)}")
        if not isinstance(self.nproc_per_node, int) or self.nproc_per_node < 1:
            raise ValueError(f"pipeline.nproc_per_node must be a whole number >= 1, got {self.nproc_per_node!r}")
        if self.nproc_per_node > 1 and self.budget_minutes is not None:
            raise ValueError(
                "pipeline.budget_minutes cuts the run in this process, which pipeline.nproc_per_node > 1 ranks do "
                "not see: set one of them (budget_minutes=null, or nproc_per_node=1)"
            )


def _output_dir(cfg: DictConfig, stage: str) -> Path:
    return Path(str(cfg[stage].output_dir))


def stage_hashes(cfg: DictConfig) -> dict[str, str]:
    """Chained hashes: each stage's hash covers its own sections and the previous stage's hash."""
    from selfjudge.models import model_key

    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["model"] = model_key(plain["model"])  # dtype auto as resolved here; kernels change speed only
    hashes: dict[str, str] = {}
    prev = ""
    for stage in STAGES:
        prev = hashes[stage] = config_hash(identity(plain, IDENTITY[stage], prev=prev, **scored_by(plain, stage)))
    return hashes


def scored_by(plain: dict, stage: str) -> dict[str, str]:
    """The revised answer checker a stage's output holds scores of (eval records; data_gen's AutoJudge labels),
    so that revising it redoes the stage (eval: a re-scoring of the kept records)."""
    if stage == "eval":
        return checker_key(plain["eval"]["dataset"])
    if stage == "data_gen" and plain["data_gen"]["autojudge"]["enabled"]:
        return checker_key(plain["data_gen"]["dataset"])
    return {}


def eval_hash(cfg: DictConfig, chained: str) -> str:
    """The eval stage's hash: its chained config hash and the content of every head folder it reads."""
    from selfjudge.eval.stage import settings

    s = settings(OmegaConf.to_container(cfg, resolve=True))
    return config_hash({"config": chained, "heads": {k: folder_hash(d) for k, d in sorted(s.head_dirs().items())}})


def is_finished(cfg: DictConfig, stage: str, h: str) -> bool:
    marker = read_marker(_output_dir(cfg, stage))
    return marker is not None and marker.get("config_hash") == h


def _move_aside(folder: Path) -> Path | None:
    if not folder.exists() or not any(folder.iterdir()):
        return None
    dest = folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(folder, dest)
    return dest


def _carry(old: Path, new: Path, names: tuple[str, ...], stage: str) -> None:
    """Copy ``names`` from the moved-aside output into the new one (the moved folder keeps its copies)."""
    names = tuple(n for n in names if (old / n).is_file())
    if names:
        new.mkdir(parents=True, exist_ok=True)
        for n in names:
            atomic_write_bytes(new / n, (old / n).read_bytes())
        say(f"{stage}: {', '.join(names)} copied back; the records its new config still holds are kept")


def preflight(cfg: DictConfig, stages: list[str]) -> None:
    """Fail before any long work: unknown stages, missing packages, invalid settings, missing inputs, foreign
    judges, unwritable folders."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would move, carry and mark the same folders
        raise RuntimeError(
            f"selfjudge-pipeline runs as one process (WORLD_SIZE={os.environ['WORLD_SIZE']}): start it without "
            "torchrun and set pipeline.nproc_per_node=N to run its data_gen and eval as N ranks, or launch each "
            "stage under torchrun (selfjudge.data_gen.main, selfjudge.train.main, selfjudge.eval.main; README "
            "'Scaling out', scripts/slurm_pipeline.sbatch)"
        )
    build(PipelineSettings, OmegaConf.to_container(cfg.pipeline, resolve=True), "pipeline")
    check_installed(OmegaConf.to_container(cfg, resolve=True), stages)
    check_writable(cfg.run_dir, "run_dir")
    plain = OmegaConf.to_container(cfg, resolve=True)
    for s in stages:  # every stage's settings, before the first stage runs or any output is moved aside
        _stage_module(s).settings(plain)
        if s in ("data_gen", "eval"):
            build_task(plain[s]["dataset"])  # dataset keys and names (the data itself loads later)
    for s in stages:
        check_writable(_output_dir(cfg, s), f"{s}.output_dir")
    if "train" in stages and "data_gen" not in stages:
        data = Path(str(cfg.train.data_dir))
        manifest = data / "manifest.json"
        if not manifest.is_file() or not read_json(manifest).get("complete", False):
            raise FileNotFoundError(
                f"train.data_dir '{data}' holds no finished data_gen output; add data_gen to "
                f"pipeline.stages or point train.data_dir at a finished data folder"
            )
    if "eval" in stages and "train" not in stages and cfg.eval.get("judge_dir"):
        head = Path(str(cfg.eval.judge_dir))
        if not (head / "judge_config.json").is_file():
            raise FileNotFoundError(
                f"eval.judge_dir '{head}' holds no judge head; add train to pipeline.stages or point "
                f"eval.judge_dir at a head folder written by the train stage"
            )
        _check_judge_matches_target(cfg, head)


def _check_judge_matches_target(cfg: DictConfig, head: Path) -> None:
    from selfjudge.models import expected_fingerprint, model_parts, same_model

    spec, _, opts = model_parts(OmegaConf.to_container(cfg.model, resolve=True))
    want = expected_fingerprint(spec, opts, "target")
    got = read_json(head / "judge_config.json").get("target_model", {})
    if got.get("fingerprint") and not same_model(got["fingerprint"], want):
        raise ValueError(
            f"the judge in eval.judge_dir '{head}' was trained for target '{got.get('name')}', not for "
            f"model.target '{spec.name}': retrain it (add train to pipeline.stages) or pick the matching model"
        )


def _stage_module(stage: str):
    if stage == "data_gen":
        from selfjudge.data_gen import stage as module
    elif stage == "train":
        from selfjudge.train import stage as module
    else:
        from selfjudge.eval import stage as module
    return module


def _stage_runner(stage: str) -> Callable[[DictConfig], dict]:
    return _stage_module(stage).run


def launch_ranks(stage: str, nproc: int, overrides: list[str], run_dir: Path) -> dict:
    """``stage`` as ``nproc`` ranks: ``torch.distributed.run -m selfjudge.<stage>.main <overrides>`` (the same
    config tree and overrides as this command); rank 0's summary comes back through a file."""
    out = run_dir / f".{stage}.ranks-summary.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", f"selfjudge.{stage}.main", *overrides]
    say(f"{stage}: {nproc} ranks: {' '.join(cmd[1:])}")
    proc = subprocess.Popen(cmd, env={**os.environ, SUMMARY_ENV: str(out)})
    main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    previous = signal.signal(signal.SIGTERM, _stopped) if main else None  # a scheduler's stop: the ranks stop too
    try:
        rc = proc.wait()
    except BaseException:
        stop_process(proc)  # torchrun passes it on to its ranks; each stage resumes from what it wrote
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    if rc:
        raise RuntimeError(
            f"{stage}: its {nproc} ranks failed (exit status {rc}); their messages are above. The stage resumes "
            "when the same command is run again"
        )
    summary = json.loads(out.read_text())
    out.unlink()
    return summary


def _stopped(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def write_rank_summary(summary: dict) -> None:
    """In a stage's entry point: rank 0 hands its summary to the pipeline that launched the ranks."""
    path = os.environ.get(SUMMARY_ENV)
    if path and os.environ.get("RANK", "0") == "0":
        atomic_write_bytes(Path(path), json.dumps(summary, default=str).encode())


@stage_lock(lambda cfg: cfg.run_dir, "run_dir")
def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Run ``pipeline.stages`` in order; return {stage: summary or 'skipped'}. ``overrides``: the command line's
    (hydra's task overrides), which ranks launched by ``pipeline.nproc_per_node`` compose again."""
    started = time.perf_counter()
    stages = list(cfg.pipeline.stages)
    preflight(cfg, stages)
    nproc = int(cfg.pipeline.get("nproc_per_node") or 1)
    if nproc > 1 and overrides is None and any(s in RANKED for s in stages):
        raise RuntimeError(
            "pipeline.nproc_per_node > 1 launches the stages with this command's overrides: run it as "
            "selfjudge-pipeline (or python -m selfjudge.pipeline.main), not through pipeline.run(cfg)"
        )
    from selfjudge.pipeline.budget import fit_to_budget

    budget = fit_to_budget(cfg, stages, started)  # pipeline.budget_minutes: may cut prompts/tokens, says what
    hashes = stage_hashes(cfg)
    results: dict[str, Any] = {}
    for stage in stages:
        h = eval_hash(cfg, hashes[stage]) if stage == "eval" else hashes[stage]  # heads: as train left them
        out = _output_dir(cfg, stage)
        if is_finished(cfg, stage, h) and not cfg.pipeline.force:
            say(f"{stage}: finished output in {out} matches the config; skipped")
            results[stage] = read_json(out / MARKER).get("summary", {})
            continue
        if (out / MARKER).is_file() or cfg.pipeline.force:
            moved = _move_aside(out)  # made by another config: keep it, out of the way
            if moved:
                say(f"{stage}: config changed; previous output kept at {moved}")
                _carry(moved, out, CARRIED.get(stage, ()), stage)
        est = f" (estimate {budget.seconds[stage] / 60:.1f} min from the warm-up rates)" if budget else ""
        say(f"{stage}: running -> {out}{est}")
        t0 = time.perf_counter()
        if nproc > 1 and stage in RANKED:
            summary = launch_ranks(stage, nproc, list(overrides or ()), Path(str(cfg.run_dir)))
        else:
            summary = _stage_runner(stage)(cfg)
        say(f"{stage}: took {(time.perf_counter() - t0) / 60:.1f} min")
        write_marker(
            out,
            stage,
            h,
            seconds=time.perf_counter() - t0,
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
            summary=summary,
        )
        results[stage] = summary
    if "eval" in results:
        print_summary(cfg)
    return results


def say(msg: str) -> None:
    """A pipeline message (hydra's console and per-rank log file show it)."""
    log.info(msg)


def print_summary(cfg: DictConfig) -> None:
    """A short closing summary: per method, its fastest setting (the full table is in report.md)."""
    out = Path(str(cfg.eval.output_dir))
    summary = out / "summary.json"
    if not summary.is_file():
        return
    rows = read_json(summary)["rows"]
    say(f"done. Report: {out / 'report.md'}  Plot: {out / 'pareto.png'}")
    best: dict[str, dict] = {}
    for r in rows:
        if r["method"] not in best or (r.get("speedup") or 0) > (best[r["method"]].get("speedup") or 0):
            best[r["method"]] = r
    for m, r in best.items():
        th = "" if r.get("threshold") is None else f"@{r['threshold']:g}"
        acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.3f}"
        say(
            f"{m + th:<16} speedup {r.get('speedup') or 0:5.2f}x  accepted length "
            f"{r['mean_accepted_length']:5.2f}  accuracy {acc}"
        )
