"""Run the stages in order, skipping each whose finished output matches its config.

A stage is *finished* when its output folder holds ``.selfjudge-stage.json`` with the hash of the
config that made it (its own section, the model pair, and the hash of the stage before it). A stage
whose config changed is redone: its old output folder is renamed aside (never deleted). A stage that
was interrupted has no marker and runs again; the stages themselves resume their partial work.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from selfjudge.extras import check_installed
from selfjudge.io import check_writable, config_hash, read_json, write_json
from selfjudge.locks import stage_lock

log = logging.getLogger(__name__)

STAGES = ("data_gen", "train", "eval")
MARKER = ".selfjudge-stage.json"

# Config sections that decide each stage's output (logger and launch settings do not).
HASHED_SECTIONS = {
    "data_gen": ("model", "data_gen", "seed"),
    "train": ("train", "judge", "deepspeed", "seed"),
    "eval": ("model", "eval", "seed"),
}
# Keys inside a stage section that never change its result.
UNHASHED_KEYS = {"overwrite", "output_dir", "data_dir", "judge_dir", "num_workers", "log_every", "resume"}


def _output_dir(cfg: DictConfig, stage: str) -> Path:
    return Path(str(cfg[stage].output_dir))


def stage_hashes(cfg: DictConfig) -> dict[str, str]:
    """Chained hashes: each stage's hash covers its own sections and the previous stage's hash."""
    from selfjudge.models import model_key

    plain = OmegaConf.to_container(cfg, resolve=True)
    hashes: dict[str, str] = {}
    prev = ""
    for stage in STAGES:
        parts: dict[str, Any] = {"prev": prev}
        for sec in HASHED_SECTIONS[stage]:
            val = plain.get(sec)
            if sec == "model":  # dtype auto as resolved here; kernels change speed only
                val = model_key(val)
            if isinstance(val, dict) and sec == stage:
                val = {k: v for k, v in val.items() if k not in UNHASHED_KEYS}
            parts[sec] = val
        prev = hashes[stage] = config_hash(parts)
    return hashes


def is_finished(cfg: DictConfig, stage: str, h: str) -> bool:
    marker = _output_dir(cfg, stage) / MARKER
    if not marker.is_file():
        return False
    return read_json(marker).get("config_hash") == h


def _move_aside(folder: Path) -> Path | None:
    if not folder.exists() or not any(folder.iterdir()):
        return None
    dest = folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(folder, dest)
    return dest


def preflight(cfg: DictConfig, stages: list[str]) -> None:
    """Fail before any long work: unknown stages, missing packages, missing inputs, foreign judges,
    unwritable folders."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"pipeline.stages has unknown stage(s) {unknown}; choose from {list(STAGES)}")
    check_installed(OmegaConf.to_container(cfg, resolve=True), stages)
    check_writable(cfg.run_dir, "run_dir")
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
    from selfjudge.models import LoadOptions, ModelSpec, expected_fingerprint, same_model

    mcfg = OmegaConf.to_container(cfg.model, resolve=True)
    spec = ModelSpec.from_mapping(mcfg["target"], "model.target")
    opts = LoadOptions.from_mapping(
        {k: v for k, v in mcfg.items() if k not in ("target", "draft", "description")}, "model"
    )
    want = expected_fingerprint(spec, opts, "target")
    got = read_json(head / "judge_config.json").get("target_model", {})
    if got.get("fingerprint") and not same_model(got["fingerprint"], want):
        raise ValueError(
            f"the judge in eval.judge_dir '{head}' was trained for target '{got.get('name')}', not for "
            f"model.target '{spec.name}': retrain it (add train to pipeline.stages) or pick the matching model"
        )


def _stage_runner(stage: str) -> Callable[[DictConfig], dict]:
    if stage == "data_gen":
        from selfjudge.data_gen.stage import run
    elif stage == "train":
        from selfjudge.train.stage import run
    else:
        from selfjudge.eval.stage import run
    return run


@stage_lock(lambda cfg: cfg.run_dir, "run_dir")
def run(cfg: DictConfig) -> dict:
    """Run ``pipeline.stages`` in order; return {stage: summary or 'skipped'}."""
    started = time.perf_counter()
    stages = list(cfg.pipeline.stages)
    preflight(cfg, stages)
    from selfjudge.pipeline.budget import fit_to_budget

    budget = fit_to_budget(cfg, stages, started)  # pipeline.budget_minutes: may cut prompts/tokens, says what
    hashes = stage_hashes(cfg)
    results: dict[str, Any] = {}
    for stage in stages:
        h = hashes[stage]
        out = _output_dir(cfg, stage)
        if is_finished(cfg, stage, h) and not cfg.pipeline.force:
            print(f"[pipeline] {stage}: finished output in {out} matches the config; skipped")
            results[stage] = read_json(out / MARKER).get("summary", {})
            continue
        marker = out / MARKER
        if marker.is_file() or cfg.pipeline.force:
            moved = _move_aside(out)  # made by another config: keep it, out of the way
            if moved:
                print(f"[pipeline] {stage}: config changed; previous output kept at {moved}")
        est = f" (estimate {budget.seconds[stage] / 60:.1f} min from the warm-up rates)" if budget else ""
        print(f"[pipeline] {stage}: running -> {out}{est}", flush=True)
        t0 = time.perf_counter()
        summary = _stage_runner(stage)(cfg)
        print(f"[pipeline] {stage}: took {(time.perf_counter() - t0) / 60:.1f} min")
        write_json(marker, {"stage": stage, "config_hash": h, "seconds": time.perf_counter() - t0,
                            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary": summary})
        results[stage] = summary
    if "eval" in results:
        print_summary(cfg)
    return results


def print_summary(cfg: DictConfig) -> None:
    """A short closing summary: per method, its fastest setting (the full table is in report.md)."""
    out = Path(str(cfg.eval.output_dir))
    summary = out / "summary.json"
    if not summary.is_file():
        return
    rows = read_json(summary)["rows"]
    print(f"[pipeline] done. Report: {out / 'report.md'}  Plot: {out / 'pareto.png'}")
    best: dict[str, dict] = {}
    for r in rows:
        if r["method"] not in best or (r.get("speedup") or 0) > (best[r["method"]].get("speedup") or 0):
            best[r["method"]] = r
    for m, r in best.items():
        th = "" if r.get("threshold") is None else f"@{r['threshold']:g}"
        acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.3f}"
        print(f"[pipeline] {m + th:<16} speedup {r.get('speedup') or 0:5.2f}x  accepted length "
              f"{r['mean_accepted_length']:5.2f}  accuracy {acc}")
