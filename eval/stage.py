"""eval stage: the config turned into library calls (``selfjudge.evaluation``), models loaded once.

Records go to per_example.jsonl as they finish; a rerun with the same settings (and the same judge heads)
skips what is there. summary.json, report.md and pareto.png are written at the end, atomically;
summary.json exists only for a complete run.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from selfjudge import evaluation as ev
from selfjudge.code_exec import isolation
from selfjudge.extras import check_installed
from selfjudge.io import barrier, check_writable, code_version, folder_hash, ranks, write_json
from selfjudge.judge import JudgeHead
from selfjudge.locks import stage_lock
from selfjudge.metrics import summary_rows
from selfjudge.models import format_prompt, pair_from_mapping, runtime_line
from selfjudge.policies import load_head, strict_token_mask
from selfjudge.report import COLUMNS as REPORT_COLUMNS
from selfjudge.report import write_report
from selfjudge.tasks import build_task, example_system_prompt

log = logging.getLogger("selfjudge.eval")  # hydra's console and per-rank log file show it


def settings(plain: dict) -> ev.EvalSettings:
    """The eval section checked (unknown keys, values, methods) without loading anything."""
    return ev.EvalSettings.from_section(plain["eval"])


@stage_lock(lambda cfg: cfg.eval.output_dir, "eval.output_dir")
def run(cfg: DictConfig) -> dict[str, Any]:
    plain = OmegaConf.to_container(cfg, resolve=True)
    check_installed(plain, ["eval"])
    s = settings(plain)  # config errors before anything loads
    out_dir = check_writable(s.output_dir, "eval.output_dir")
    ds = s.dataset_with_limit()
    task = build_task(ds)
    pair = pair_from_mapping(dict(plain["model"], device=s.device))  # dtype auto: resolved (and why) in runtime
    log.info(runtime_line(pair.runtime))
    dev = next(pair.target.parameters()).device
    tinfo = pair.target_info.as_dict()
    heads = {
        key: load_head(folder, tinfo, pair.target_info.hidden_size, pair.draft_info.hidden_size, dev, key=f"eval.{key}")
        for key, folder in s.head_dirs().items()
    }
    vocab = max(m.get_output_embeddings().weight.shape[0] for m in (pair.target, pair.draft))  # every id indexed
    strict_masks = {k: strict_token_mask(k, pair.tokenizer, vocab) for k in sorted(ev.strict_kinds(s))}
    grid = ev.build_grid(s, heads, strict_masks)
    skipped = [x.name for x in s.specs if x.head_key is not None and x.head_key not in heads]
    if skipped:
        log.info("skipping %s: no head folder set (eval.judge_dir / eval.autojudge_dir)", skipped)
    examples = task.examples()
    prompts = [
        format_prompt(pair.tokenizer, ex.prompt, example_system_prompt(task, ex), task.chat_template) for ex in examples
    ]
    ev.check_prompt_lengths(examples, prompts, s, getattr(pair.target.config, "max_position_embeddings", None))

    graphs = bool(s.cuda_graphs) and s.batch_size == 1 and dev.type == "cuda"
    key, key_cfg = ev.records_key(
        s,
        ds,
        tinfo.get("fingerprint"),
        pair.draft_info.as_dict().get("fingerprint"),
        pair.runtime["dtype"],
        graphs,
        pair.runtime["cpu_kernels"],
    )
    head_of = ev.head_hashes(s, heads)
    rank, world = ranks()  # torchrun: each rank decodes a slice of the prompts into its own records file
    out = ev.RecordsFile(out_dir)
    if rank == 0:
        (out_dir / "summary.json").unlink(missing_ok=True)  # only a finished run has one
        decoded = [x.name for x in s.specs if x.name not in skipped]
        records = out.open(key, {"settings": key_cfg, "dataset": ds, "heads": head_of}, head_of, s.resume, decoded)
        rescored = ev.rescore(records, task, examples)
        if rescored:  # made before the answer checker was revised: their texts are kept, so only scores move
            out.write(records)
            log.info("%d kept records re-scored with the answer checker of now (%s)", rescored, task.checker)
    barrier(world)
    if rank != 0:
        records = out.read(repair=False)
    mine = ev.RecordsFile(out_dir, rank) if world > 1 else out
    records = ev.evaluate(
        pair, task, examples, prompts, s, grid, heads, records, mine, graphs, head_of, rank, world, strict_masks
    )
    pair.release()  # the rest needs only the infos; a finished rank waits at the barrier without its models
    barrier(world)
    if rank != 0:
        return {"rank": rank, "output_dir": str(out_dir)}
    if world > 1:
        records = out.merge_ranks()

    ids_wanted = {ex.id for ex in examples}
    records = [r for r in records if r["prompt_id"] in ids_wanted]
    rows = [
        {**row, "policy": m.policy}
        for m, row in zip(grid, summary_rows(records, [(m.name, m.threshold) for m in grid]))
    ]
    base = next(r for r in rows if r["method"] == "target")
    title = (
        f"{task.name}: {len(examples)} prompts, gamma={s.gamma}, max_new_tokens={s.max_new_tokens}, "
        f"T={s.temperature}, batch size {s.batch_size}, target {pair.target_info.name}, draft "
        f"{pair.draft_info.name}, {runtime_line(pair.runtime)} on {dev}"
    )
    text = write_report(rows, out_dir, title)
    write_json(
        out_dir / "summary.json",
        {
            "complete": True,
            "title": title,
            "task": task.name,
            "examples": len(examples),
            "gamma": s.gamma,
            "baseline_tokens_per_s": base["tokens_per_s"],
            "rows": rows,
            "code_version": code_version(),
            "target_model": tinfo,
            "draft_model": pair.draft_info.as_dict(),
            "config": plain["eval"],
            "heads": head_of,
            "runtime": pair.runtime,
            "code_isolation": isolation() if any(ex.task.startswith("humaneval") for ex in examples) else None,
            "engine": ev.engine_name(s.batch_size, graphs),
        },
    )
    if plain["logger"]["name"] == "wandb":
        _log_wandb(plain, rows, s.head_dirs())
    log.info("%s", text)
    lossless = next(r for r in rows if r["method"] == "lossless")
    return {
        "examples": len(examples),
        "rows": len(rows),
        "output_dir": str(out_dir),
        "baseline_tokens_per_s": base["tokens_per_s"],
        "lossless_speedup": lossless["speedup"],
        "best_speedup": {
            r["method"]: max(x["speedup"] or 0.0 for x in rows if x["method"] == r["method"]) for r in rows
        },
    }


def _log_wandb(plain: dict, rows: list[dict], head_dirs: dict[str, str]) -> None:
    import wandb

    from selfjudge.pipeline.tracking import start_run

    run = start_run(plain, "eval")
    for key, folder in head_dirs.items():  # lineage: the judge heads this eval used (same content: same artifact)
        name = f"judge-head-{JudgeHead.from_pretrained(folder).config.label_source}"
        run.summary[f"eval/heads/{key}"] = {
            "artifact": name,
            "folder": str(folder),
            "content_hash": folder_hash(folder),
        }
        if not run.offline:  # wandb links artifacts only online; offline runs keep the name and hash above
            art = wandb.Artifact(name, type="model", metadata={"eval_key": f"eval.{key}"})
            art.add_dir(str(folder))
            run.use_artifact(art)
    cols = [*REPORT_COLUMNS, "accept_hist"]  # the report's columns, plus the histogram
    run.log(
        {
            "eval/results": wandb.Table(
                columns=cols, data=[[r[c] if c != "accept_hist" else str(r[c]) for c in cols] for r in rows]
            )
        }
    )
    run.summary.update({f"eval/{r['method']}@{r['threshold']}/speedup": r["speedup"] for r in rows})
    run.finish()
