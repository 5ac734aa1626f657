"""data_gen core: prompts -> responses -> scored mismatches -> shards, resumable and rank-sliced.

Each rank takes examples ``rank::world``, writes shards of whole prompts, and records the prompt ids
each written shard covers in its progress file, so a killed run restarts after the last shard and
produces exactly the records an uninterrupted run would. :func:`finalize` (rank 0, after all ranks)
sets τ over every LD, writes the labels into the shards and writes the manifest last.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from selfjudge import shards
from selfjudge.features import FeatureSpec
from selfjudge.generation import greedy_responses
from selfjudge.io import read_json, write_json
from selfjudge.models import ModelPair, format_prompt
from selfjudge.scoring import label_rule, score_response, score_response_naive, tau_from_rule
from selfjudge.tasks import Example, Task, example_system_prompt


@dataclass
class DataGenSettings:
    max_new_tokens: int = 256
    batch_size: int = 8
    window: int = 20
    score_variant: str = "continuation"
    tau_mode: str = "value"
    tau_value: float = 0.066
    tau_quantile: float = 0.6
    features: FeatureSpec = field(default_factory=FeatureSpec)
    feature_dtype: str = "float16"
    shard_size: int = 4096
    scorer: str = "fast"
    max_prompt_tokens: int = 2048
    max_packed_tokens: int = 2048
    autojudge: dict = field(default_factory=dict)


FEATURE_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def tokenize_examples(pair: ModelPair, task: Task, examples: list[Example], s: DataGenSettings) -> list[list[int]]:
    """Chat-formatted prompt ids, checked against the context before any long work starts."""
    limit = getattr(pair.target.config, "max_position_embeddings", None) or 10**9
    out = []
    for ex in examples:
        ids = format_prompt(pair.tokenizer, ex.prompt, example_system_prompt(task, ex), task.chat_template)
        if len(ids) > s.max_prompt_tokens or len(ids) + s.max_new_tokens > limit:
            raise ValueError(
                f"prompt '{ex.id}' has {len(ids)} tokens: over data_gen.max_prompt_tokens={s.max_prompt_tokens} "
                f"or, with data_gen.max_new_tokens={s.max_new_tokens}, over the target's context of {limit}"
            )
        out.append(ids)
    return out


def _rows_for(ex: Example, prompt: list[int], resp: list[int], sc, aj: list[int] | None) -> dict[str, list]:
    M = len(sc.positions)
    aj = aj if aj is not None else [-1] * M
    rows: dict[str, list] = {k: [] for k in ("prompt_id", "task", "prompt_ids", "response_ids", "position", "target_token",
                                              "draft_token", "substituted", "orig", "alt", "ld", "label",
                                              "autojudge_label", "features")}
    for j in range(M):
        for substituted in (True, False):
            rows["prompt_id"].append(ex.id)
            rows["task"].append(ex.task)
            rows["prompt_ids"].append(prompt)
            rows["response_ids"].append(resp)
            rows["position"].append(int(sc.positions[j]))
            rows["target_token"].append(int(sc.target_tokens[j]))
            rows["draft_token"].append(int(sc.draft_tokens[j]))
            rows["substituted"].append(substituted)
            rows["orig"].append(float(sc.orig[j]))
            rows["alt"].append(float(sc.alt[j]))
            rows["ld"].append(float(sc.ld[j]) if substituted else float("nan"))
            rows["label"].append(-1 if substituted else 0)  # set by finalize() once τ is known
            rows["autojudge_label"].append(int(aj[j]) if substituted else (0 if aj[j] != -1 else -1))
            rows["features"].append((sc.sub_features if substituted else sc.orig_features)[j].numpy())
    return rows


def _table(rows: dict[str, list], feature_dtype: str) -> pa.Table:
    feats = np.stack(rows["features"]) if rows["features"] else np.zeros((0, 1), np.float32)
    arr = pa.FixedSizeListArray.from_arrays(
        pa.array(feats.reshape(-1).astype(np.float16 if feature_dtype == "float16" else np.float32)), feats.shape[1])
    return pa.table({
        "prompt_id": pa.array(rows["prompt_id"], pa.string()),
        "task": pa.array(rows["task"], pa.string()),
        "prompt_ids": pa.array(rows["prompt_ids"], pa.list_(pa.int32())),
        "response_ids": pa.array(rows["response_ids"], pa.list_(pa.int32())),
        "position": pa.array(rows["position"], pa.int32()),
        "target_token": pa.array(rows["target_token"], pa.int32()),
        "draft_token": pa.array(rows["draft_token"], pa.int32()),
        "substituted": pa.array(rows["substituted"], pa.bool_()),
        "orig": pa.array(rows["orig"], pa.float32()),
        "alt": pa.array(rows["alt"], pa.float32()),
        "ld": pa.array(rows["ld"], pa.float32()),
        "label": pa.array(rows["label"], pa.int8()),
        "autojudge_label": pa.array(rows["autojudge_label"], pa.int8()),
        "features": arr,
    })


def run_rank(
    pair: ModelPair,
    task: Task,
    examples: list[Example],
    s: DataGenSettings,
    out_dir: str | Path,
    rank: int = 0,
    world: int = 1,
    after_shard: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Process this rank's slice of ``examples``, resuming after its last written shard."""
    if s.feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"data_gen.feature_dtype must be one of {sorted(FEATURE_DTYPES)}, got '{s.feature_dtype}'")
    mine = examples[rank::world]
    prompts = tokenize_examples(pair, task, mine, s)
    progress = shards.read_progress(out_dir, rank)
    done = set(progress["done_prompt_ids"])
    todo = [k for k, ex in enumerate(mine) if ex.id not in done]
    score = score_response if s.scorer == "fast" else score_response_naive
    if s.scorer not in ("fast", "naive"):
        raise ValueError(f"data_gen.scorer must be 'fast' or 'naive', got '{s.scorer}'")
    kw = {} if s.scorer == "naive" else {"max_packed_tokens": s.max_packed_tokens}
    aj_on = bool(s.autojudge.get("enabled")) and task.has_checker
    buf: dict[str, list] | None = None
    buf_ids: list[str] = []
    t0, n_tok = time.perf_counter(), 0
    bar = tqdm(total=len(todo), desc=f"data_gen rank {rank}", unit="prompt", disable=rank != 0)

    def flush() -> None:
        nonlocal buf, buf_ids
        index = len(progress["shards"])
        if buf and buf["prompt_id"]:
            path = shards.write_shard(out_dir, rank, index, _table(buf, s.feature_dtype))
            progress["shards"].append(path.name)
        progress["done_prompt_ids"].extend(buf_ids)
        shards.write_progress(out_dir, rank, progress)
        buf, buf_ids = None, []
        if after_shard:
            after_shard(index)

    sub_prompts = [prompts[k] for k in todo]
    for j, resp in greedy_responses(pair.target, sub_prompts, s.max_new_tokens, pair.eos_ids,
                                    pair.tokenizer.pad_token_id, s.batch_size):
        k = todo[j]
        ex, prompt = mine[k], prompts[k]
        sc = score(pair.target, pair.draft, prompt, resp, pair.vocab_size, s.window, s.score_variant, s.features, **kw)
        aj = None
        if aj_on:
            from selfjudge.autojudge import autojudge_labels

            aj = autojudge_labels(pair, task, ex, prompt, resp, sc.positions, sc.draft_tokens, s.autojudge)
        rows = _rows_for(ex, prompt, resp, sc, aj)
        if buf is None:
            buf = rows
        else:
            for key in buf:
                buf[key].extend(rows[key])
        buf_ids.append(ex.id)
        n_tok += len(resp)
        bar.update(1)
        bar.set_postfix(tok_s=f"{n_tok / (time.perf_counter() - t0):.1f}")
        if len(buf["prompt_id"]) >= s.shard_size:
            flush()
    if buf is not None or buf_ids:
        flush()
    bar.close()
    stats = {"rank": rank, "prompts": len(mine), "new_prompts": len(todo), "seconds": time.perf_counter() - t0,
             "response_tokens_this_run": n_tok}
    write_json(Path(out_dir) / shards.SHARD_DIR / f"rank{rank:03d}.done.json", stats)
    return stats


def finalize(out_dir: str | Path, world: int, s: DataGenSettings, manifest_base: dict) -> dict:
    """Rank 0, after every rank is done: set τ, write labels into the shards, write the manifest."""
    out_dir = Path(out_dir)
    missing = [r for r in range(world) if not (out_dir / shards.SHARD_DIR / f"rank{r:03d}.done.json").is_file()]
    if missing:
        raise RuntimeError(f"data_gen ranks {missing} have not finished; rerun data_gen to complete them")
    names = [n for r in range(world) for n in shards.read_progress(out_dir, r)["shards"]]
    paths = [out_dir / shards.SHARD_DIR / n for n in names]
    lds, resp_tokens, prompts_seen = [], 0, {}
    for p in paths:
        t = pq.read_table(p, columns=["prompt_id", "substituted", "ld", "response_ids"])
        sub = np.asarray(t["substituted"])
        lds.append(np.asarray(t["ld"])[sub])
        for pid, resp in zip(t["prompt_id"].to_pylist(), t["response_ids"].to_pylist()):
            prompts_seen.setdefault(pid, len(resp))
    all_ld = torch.tensor(np.concatenate(lds) if lds else np.zeros(0, np.float32))
    tau = tau_from_rule(all_ld, s.tau_mode, s.tau_value, s.tau_quantile)
    for p in paths:  # labels depend on τ over the whole run: write them now, shard by shard, atomically
        t = pq.read_table(p)
        ld = torch.tensor(np.nan_to_num(np.asarray(t["ld"]), nan=-math.inf))
        lab = torch.where(torch.tensor(np.asarray(t["substituted"])), label_rule(ld, tau), torch.zeros_like(ld, dtype=torch.int8))
        t = t.set_column(t.schema.get_field_index("label"), "label", pa.array(lab.numpy(), pa.int8()))
        rank, index = int(p.name[4:7]), int(p.name[8:13])
        shards.write_shard(out_dir, rank, index, t)
    resp_tokens = sum(prompts_seen.values())
    n_mis = int(all_ld.numel())
    pos = int((all_ld > tau).sum())
    hist_counts, hist_edges = np.histogram(all_ld.numpy(), bins=40) if n_mis else (np.zeros(0), np.zeros(0))
    records = 2 * n_mis
    manifest = {
        **manifest_base,
        "complete": True,
        "shards": names,
        "tau": tau,
        "score_variant": s.score_variant,
        "window": s.window,
        "counts": {"prompts": len(prompts_seen), "responses": len(prompts_seen), "response_tokens": resp_tokens,
                   "mismatches": n_mis, "positives": pos, "records": records,
                   "mismatches_per_response": n_mis / max(1, len(prompts_seen))},
        "positive_rate": pos / max(1, n_mis),
        "ld_histogram": {"edges": hist_edges.tolist(), "counts": hist_counts.astype(int).tolist()},
        "ld_quantiles": {str(q): float(torch.quantile(all_ld, q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)} if n_mis else {},
    }
    shards.write_manifest(out_dir, manifest)
    return manifest


def check_output_dir(out_dir: str | Path, cfg_hash: str, overwrite: bool) -> None:
    """Refuse a folder made by another config (unless overwrite): its records would mix with ours."""
    out_dir = Path(out_dir)
    stamp = out_dir / "config_stamp.json"
    if stamp.is_file():
        old = read_json(stamp)["config_hash"]
        if old != cfg_hash:
            if not overwrite:
                raise FileExistsError(
                    f"data_gen.output_dir '{out_dir}' was made by a different config (hash {old} != {cfg_hash}); "
                    f"choose another output_dir or set data_gen.overwrite=true to replace it"
                )
            import shutil

            shutil.rmtree(out_dir)
    elif out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"data_gen.output_dir '{out_dir}' is not empty and is not a data_gen output; "
                                  f"choose another folder or set data_gen.overwrite=true")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file():
        write_json(stamp, {"config_hash": cfg_hash})
