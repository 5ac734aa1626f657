"""Labelling (the data_gen stage's library): prompts -> responses -> LD-scored mismatches -> labelled shards.

Resumable and rank-sliced.

The run's prompts are cut once into fixed batches of similar prompt length, dealt out whole: batch k to rank
k % world (:func:`rank_batches`), so N ranks make the very batches, hence the very records, of one rank.
A stopped run resumes with any number of ranks (a smaller or larger allocation): at each start the batches
no rank has finished are dealt out again (the layout in ``config_stamp.json``; :func:`check_output_dir`), so
no rank idles while another works through the rest of its old share, and
every rank's earlier shards stay; as shards hold whole batches, the records equal an uninterrupted run's.
After each finished batch its records join a buffer; once the buffer holds ``shard_size`` records (or
``shard_prompts`` prompts, so that a stop of a slow run loses little) it is written as one shard and the
rank's progress file records the prompt ids that shard covers. A killed run restarts after its last
recorded batch with the very same batches, so it produces exactly the records of an uninterrupted run:
nothing twice, nothing lost. :func:`finalize` (rank 0, once every
rank is done) sets τ over every LD of the run, writes the labels into the shards, and writes the
manifest last; a folder without ``"complete": true`` is never read as finished.
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from selfjudge import shards
from selfjudge.autojudge import KEYS as AUTOJUDGE_KEYS
from selfjudge.autojudge import AutoJudgeSettings, Labelled, autojudge_labels_many, labelled_prompts
from selfjudge.cards import write_dataset_card
from selfjudge.features import FEATURE_KEYS, FeatureSpec
from selfjudge.generation import fixed_batches, greedy_batch, greedy_batch_traced
from selfjudge.io import read_json, write_json
from selfjudge.judge_metrics import quantile
from selfjudge.models import ModelPair, format_prompt
from selfjudge.responses import prompt_sha
from selfjudge.scoring import (
    SCORE_VARIANTS,
    ScoredResponse,
    label_rule,
    score_response,
    score_response_naive,
    tau_from_rule,
)
from selfjudge.settings import build, check_keys, is_int, require
from selfjudge.tasks import Example, Task, example_system_prompt

FEATURE_DTYPES = {"float16": np.float16, "float32": np.float32}
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: larger features are stored as float32
SCORERS = ("fast", "naive")
COLUMNS = (
    "prompt_id",
    "task",
    "prompt_ids",
    "response_ids",
    "position",
    "target_token",
    "draft_token",
    "substituted",
    "orig",
    "alt",
    "ld",
    "label",
    "autojudge_label",
    "features",
)


# Arrow types of a data shard's record columns (the features column is added beside them)
RECORD_TYPES = {
    "prompt_id": pa.string(),
    "task": pa.string(),
    "prompt_ids": pa.list_(pa.int32()),
    "response_ids": pa.list_(pa.int32()),
    "position": pa.int32(),
    "target_token": pa.int32(),
    "draft_token": pa.int32(),
    "substituted": pa.bool_(),
    "orig": pa.float32(),
    "alt": pa.float32(),
    "ld": pa.float32(),
    "label": pa.int8(),
    "autojudge_label": pa.int8(),
}


def _tau(d: Any, prefix: str) -> dict:
    check_keys(d, ["mode", "value", "quantile"], prefix)
    return dict(d)


def _features(d: Any, prefix: str) -> FeatureSpec:
    check_keys(d, FEATURE_KEYS, prefix, required=False)  # missing keys: FeatureSpec's layout of older heads
    return FeatureSpec.from_mapping(d)


def _autojudge(d: Any, prefix: str) -> AutoJudgeSettings:
    check_keys(d, AUTOJUDGE_KEYS, prefix)
    return AutoJudgeSettings.from_mapping(d)


@dataclass(frozen=True)
class DataGenSettings:
    """The ``data_gen`` config section (conf/data_gen/default.yaml documents each key)."""

    output_dir: str  # shards + manifest.json
    overwrite: bool  # replace an output_dir made by another config or rank count
    dataset: dict  # the prompts (selfjudge.tasks.build_task checks it)
    max_new_tokens: int  # response length limit
    batch_size: int  # prompts per greedy generation batch
    window: int  # N of LD_N
    score_variant: str  # continuation | max_logprob
    tau: dict  # {mode: value|quantile, value, quantile}
    features: FeatureSpec  # judge feature layout
    feature_dtype: str  # float16 | float32 (stored)
    shard_size: int  # records per shard (memory bound)
    shard_prompts: int  # also close a shard after this many prompts (0: by shard_size only)
    scorer: str  # fast | naive
    max_prompt_tokens: int  # longer prompts are an error
    max_packed_tokens: int  # window tokens per packed scoring pass
    autojudge: AutoJudgeSettings  # AutoJudge labels (optional)
    autojudge_labels_from: str | None = None  # labels of an earlier run of this config (autojudge.write_labels)
    responses_from: str | None = None  # the target's responses of an earlier run (selfjudge.responses)

    def __post_init__(self) -> None:
        require(
            self.score_variant in SCORE_VARIANTS,
            "data_gen.score_variant",
            f"one of {SCORE_VARIANTS}",
            self.score_variant,
        )
        require(self.scorer in SCORERS, "data_gen.scorer", f"one of {SCORERS}", self.scorer)
        require(
            self.feature_dtype in FEATURE_DTYPES,
            "data_gen.feature_dtype",
            f"one of {sorted(FEATURE_DTYPES)}",
            self.feature_dtype,
        )
        require(
            self.tau.get("mode") in ("value", "quantile"),
            "data_gen.tau.mode",
            "'value' or 'quantile'",
            self.tau.get("mode"),
        )
        for key in ("window", "max_new_tokens", "batch_size", "shard_size", "max_packed_tokens", "max_prompt_tokens"):
            require(is_int(getattr(self, key), 1), f"data_gen.{key}", "an integer >= 1", getattr(self, key))
        require(is_int(self.shard_prompts, 0), "data_gen.shard_prompts", "an integer >= 0", self.shard_prompts)
        if self.autojudge_labels_from is not None and not self.autojudge.enabled:
            raise ValueError("data_gen.autojudge_labels_from is set but data_gen.autojudge.enabled is false")

    @classmethod
    def from_section(cls, d: Mapping[str, Any]) -> DataGenSettings:
        """From the plain ``data_gen`` dict: every key required, no other allowed."""
        return build(cls, d, "data_gen", {"tau": _tau, "features": _features, "autojudge": _autojudge})


def tokenize_examples(pair: ModelPair, task: Task, examples: list[Example], s: DataGenSettings) -> list[list[int]]:
    """Chat-formatted prompt ids of every example, checked against the context before any long work."""
    if not examples:
        raise ValueError("data_gen.dataset gave no prompts: check data_gen.dataset (limit, path, filters)")
    context = getattr(pair.target.config, "max_position_embeddings", None) or math.inf
    out = []
    for ex in examples:
        ids = format_prompt(pair.tokenizer, ex.prompt, example_system_prompt(task, ex), task.chat_template)
        if len(ids) > s.max_prompt_tokens:
            raise ValueError(
                f"prompt '{ex.id}' has {len(ids)} tokens, over data_gen.max_prompt_tokens="
                f"{s.max_prompt_tokens}: raise it or drop the prompt"
            )
        if len(ids) + s.max_new_tokens > context:
            raise ValueError(
                f"prompt '{ex.id}' has {len(ids)} tokens; with data_gen.max_new_tokens={s.max_new_tokens} "
                f"it exceeds the target's context of {context} tokens"
            )
        out.append(ids)
    return out


def records(ex: Example, prompt: list[int], resp: list[int], sc: ScoredResponse, aj: list[int]) -> list[dict]:
    """Two records per mismatch: the substituted token and the original-token negative (label 0)."""
    rows = []
    for j in range(len(sc.positions)):
        for substituted in (True, False):
            rows.append(
                {
                    "prompt_id": ex.id,
                    "task": ex.task,
                    "prompt_ids": prompt,
                    "response_ids": resp,
                    "position": int(sc.positions[j]),
                    "target_token": int(sc.target_tokens[j]),
                    "draft_token": int(sc.draft_tokens[j]),
                    "substituted": substituted,
                    "orig": float(sc.orig[j]),
                    "alt": float(sc.alt[j]),
                    "ld": float(sc.ld[j]) if substituted else math.nan,
                    "label": -1 if substituted else 0,  # set by finalize() once τ is known
                    "autojudge_label": aj[j] if substituted or aj[j] == -1 else 0,
                    "features": (sc.sub_features if substituted else sc.orig_features)[j].numpy(),
                }
            )
    return rows


def to_table(rows: list[dict], feature_dtype: str, feature_dim: int) -> pa.Table:
    """Records -> an Arrow table with the shard column types (selfjudge.shards) (features: fixed-size list)."""
    feats = np.stack([r["features"] for r in rows]) if rows else np.zeros((0, feature_dim), np.float32)
    bad = np.nonzero(~np.isfinite(feats).all(axis=1))[0]
    if len(bad):
        r = rows[int(bad[0])]
        raise ValueError(
            f"{len(bad)} record(s) have non-finite features (NaN/inf), first: prompt '{r['prompt_id']}' "
            f"position {r['position']}: the model's hidden states overflowed; run it in float32 "
            f"(model.dtype=float32)"
        )
    if feature_dtype == "float16" and len(feats) and float(np.abs(feats).max()) > FLOAT16_MAX:
        warnings.warn(
            f"features up to {float(np.abs(feats).max()):.4g} exceed float16's range ({FLOAT16_MAX:g}): "
            f"this run stores them as float32 (data_gen.feature_dtype=float32 avoids the check)",
            stacklevel=2,
        )
        feature_dtype = "float32"
    flat = pa.array(feats.reshape(-1).astype(FEATURE_DTYPES[feature_dtype]))
    cols = {k: pa.array([r[k] for r in rows], t) for k, t in RECORD_TYPES.items()}
    cols["features"] = pa.FixedSizeListArray.from_arrays(flat, feature_dim)
    return pa.table({k: cols[k] for k in COLUMNS})


def run_rank(
    pair: ModelPair,
    task: Task,
    examples: list[Example],
    prompts: list[list[int]],
    s: DataGenSettings,
    out_dir: str | Path,
    rank: int = 0,
    world: int = 1,
    after_shard: Callable[[int], None] | None = None,
    known: Mapping[str, int] | None = None,
    pending: list[str] | None = None,
    given: Mapping[str, tuple[str, list[int]]] | None = None,
) -> dict[str, Any]:
    """Process this rank's batches, ``rank::world`` of the run's (:func:`rank_batches`), resuming after its last
    written shard. ``known``: AutoJudge labels of an earlier run of this config (taken, not regenerated).
    ``pending``: the ids the rank layout deals out (:func:`read_layout`; None: all examples). ``given``: the
    target's responses of an earlier run (:func:`selfjudge.responses.read_responses`): a prompt found there with
    the same prompt tokens takes its response (teacher-forced, not generated)."""
    batches = rank_batches(
        [len(p) for p in prompts], s.batch_size, rank, world, pending and _indices(examples, pending)
    )
    mine = [i for b in batches for i in b]
    progress = shards.read_progress(out_dir, rank)
    progress.setdefault("response_tokens", 0)
    done = set(progress["done_prompt_ids"])
    todo = [b for b in batches if not all(examples[i].id in done for i in b)]
    assert all(examples[i].id not in done for b in todo for i in b), "progress covers part of a batch"
    if known:  # batches whose AutoJudge labels are known go last: new labels (the costly part, kept) come first
        labelled = labelled_prompts(known)
        todo.sort(key=lambda b: sum(examples[i].id in labelled for i in b))  # stable; each batch's rows unchanged
    score = score_response if s.scorer == "fast" else score_response_naive
    kw = {"max_packed_tokens": s.max_packed_tokens} if s.scorer == "fast" else {}
    use_aj = s.autojudge.enabled and task.has_checker
    dim = s.features.dim(pair.target_info.hidden_size, pair.draft_info.hidden_size)
    buf: list[dict] = []
    buf_ids: list[str] = []
    buf_tokens = 0
    t0, n_new = time.perf_counter(), 0
    bar = tqdm(
        total=len(mine),
        initial=len(mine) - sum(map(len, todo)),
        desc=f"data_gen rank {rank}",
        unit="prompt",
        disable=rank != 0,
        smoothing=0,  # a generation batch of prompts lands at once: the mean rate gives a sane ETA
    )

    def flush() -> None:
        nonlocal buf, buf_ids, buf_tokens
        index = len(progress["shards"])
        if buf:
            progress["shards"].append(
                shards.write_shard(out_dir, rank, index, to_table(buf, s.feature_dtype, dim)).name
            )
        progress["done_prompt_ids"].extend(buf_ids)
        progress["response_tokens"] += buf_tokens
        shards.write_progress(out_dir, rank, progress)  # after the shard: a kill in between redoes the shard
        buf, buf_ids, buf_tokens = [], [], 0
        if after_shard is not None:
            after_shard(index)

    def score_one(prompt: list[int], resp: list[int], trace: Any = None, after: int = -1) -> ScoredResponse:
        extra = {"trace": trace} if trace is not None else {}
        args = (pair.target, pair.draft, prompt, resp, pair.vocab_size, s.window, s.score_variant, s.features)
        return score(*args, **kw, **extra, after=after)

    def phase(rows: int, what: str) -> None:  # a batch runs many minutes on a CPU: the bar names its step
        rate = f", {n_new / (time.perf_counter() - t0):.1f} tok/s" if n_new else ""
        bar.set_postfix_str(f"batch of {rows}: {what}{rate}")

    for batch in todo:
        taken = taken_responses(batch, examples, prompts, given or {}, s.max_new_tokens)
        gen = [i for i in batch if i not in taken]
        resps, traces = [taken.get(i) for i in batch], [None] * len(batch)
        if gen:
            phase(len(batch), f"generating {len(gen)}" + (f", {len(taken)} taken" if taken else ""))
            gen_args = (
                [prompts[i] for i in gen],
                s.max_new_tokens,
                pair.eos_ids,
                pair.tokenizer.pad_token_id,
                pair.vocab_size,
            )
            if s.scorer == "fast":  # the fast scorer reads the target's pass over x ⊕ y from the generation
                made, made_traces = greedy_batch_traced(pair.target, *gen_args, spec=s.features)
            else:
                made, made_traces = greedy_batch(pair.target, *gen_args), [None] * len(gen)
            where = {i: k for k, i in enumerate(batch)}
            for i, resp, tr in zip(gen, made, made_traces):
                resps[where[i]], traces[where[i]] = resp, tr
        phase(len(batch), "scoring" + (f" ({len(taken)} taken responses)" if taken else ""))
        scored = [score_one(prompts[i], resp, trace) for i, resp, trace in zip(batch, resps, traces)]
        items = [  # with the fast scorer, each response's cache: the regenerations cut their prefill from it
            Labelled(examples[i], prompts[i], resp, sc.positions.tolist(), sc.draft_tokens.tolist(), tr and tr.cache)
            for i, resp, sc, tr in zip(batch, resps, scored, traces if use_aj else [None] * len(batch))
        ]
        traces = None
        if use_aj:  # the regenerations of the whole batch run together
            phase(len(batch), "AutoJudge regenerations")

            def on_round(step: int, n: int, rows: int = len(batch)) -> None:  # a carried search's rounds
                if step:
                    phase(rows, f"AutoJudge regenerations, carried round {step} ({n} responses)")

            args = (s.autojudge, s.max_new_tokens, score_one, known, on_round)
            labelled = autojudge_rows(pair, task, items, scored, *args)
        else:
            labelled = [(it, sc, [-1] * len(it.positions)) for it, sc in zip(items, scored)]
        for it, sc, aj in labelled:
            buf.extend(records(it.example, it.prompt, it.response, sc, aj))
        for it in items:
            buf_ids.append(it.example.id)
            buf_tokens += len(it.response)
            n_new += len(it.response)
            bar.update(1)
        phase(len(batch), "done")
        scored = items = labelled = None
        if len(buf) >= s.shard_size or (s.shard_prompts and len(buf_ids) >= s.shard_prompts):
            flush()
    if buf_ids:
        flush()
    bar.close()
    stats = {
        "rank": rank,
        "world_size": world,
        "prompts": len(mine),
        "prompts_this_run": sum(map(len, todo)),
        "response_tokens_this_run": n_new,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(Path(out_dir) / shards.SHARD_DIR / f"rank{rank:03d}.done.json", stats)
    return stats


def autojudge_rows(
    pair: ModelPair,
    task: Task,
    items: list[Labelled],
    scored: list[ScoredResponse],
    s: AutoJudgeSettings,
    budget: int,
    score_one: Callable[..., ScoredResponse],
    known: Mapping[str, int] | None = None,
    on_round: Callable[[int, int], None] | None = None,
) -> list[tuple[Labelled, ScoredResponse, list[int]]]:
    """(item, its scores, its AutoJudge labels) of a batch's responses and, with ``data_gen.autojudge.mode=carry``,
    of every response the search goes on along after a kept swap: ``y' = y_<i ⊕ d_i ⊕ greedy``, scored as a response
    of its own (``score_one(prompt, response, after=i)``): its mismatches after ``i``, searched the same way until
    the prompt has ``max_mismatches`` labels (each round keeps one swap per response at most, so this ends).
    ``on_round(round, responses)``: called as each round starts (progress)."""
    out: list[tuple[Labelled, ScoredResponse, list[int]]] = []
    left = [s.max_mismatches] * len(items)  # labels still to make, per prompt of the batch
    origin = list(range(len(items)))
    step = 0
    while items:
        if on_round is not None:
            on_round(step, len(items))
        step += 1
        kept: dict[int, tuple[int, list[int]]] | None = {} if s.mode == "carry" else None
        labels = autojudge_labels_many(pair, task, items, s, budget, known, kept)
        out += zip(items, scored, labels)
        nxt: list[tuple[int, Labelled, ScoredResponse]] = []
        for k, (j, resp) in sorted((kept or {}).items()):
            o, it = origin[k], items[k]
            left[o] -= sum(x >= 0 for x in labels[k])
            if left[o] > 0:
                sc = score_one(it.prompt, resp, after=it.positions[j])
                if len(sc.positions):  # no mismatch after the kept swap: the search ends there
                    pos, drafts = sc.positions.tolist(), sc.draft_tokens.tolist()
                    nxt.append((o, Labelled(it.example, it.prompt, resp, pos, drafts, None, left[o]), sc))
        origin, items, scored = [o for o, _, _ in nxt], [it for _, it, _ in nxt], [sc for *_, sc in nxt]
    return out


def taken_responses(
    batch: list[int],
    examples: list[Example],
    prompts: list[list[int]],
    given: Mapping[str, tuple[str, list[int]]],
    budget: int,
) -> dict[int, list[int]]:
    """The prompts of ``batch`` (indices) whose response ``given`` holds for the same prompt tokens: index ->
    response. A response over the budget is an error (the file's hash covers the budget: only an edited file)."""
    out = {}
    for i in batch:
        sha, resp = given.get(examples[i].id, (None, None))
        if resp is not None and sha == prompt_sha(prompts[i]):
            if not 0 < len(resp) <= budget:
                raise ValueError(
                    f"data_gen.responses_from: the response of '{examples[i].id}' has {len(resp)} tokens, "
                    f"not 1 to data_gen.max_new_tokens={budget}: the file was edited; use the file a run wrote"
                )
            out[i] = list(resp)
    return out


def rank_batches(
    lengths: list[int], batch_size: int, rank: int, world: int, pending: list[int] | None = None
) -> list[list[int]]:
    """The batches of ``rank``: the run's prompts (prompt lengths ``lengths``) are cut once into fixed batches
    (:func:`selfjudge.generation.fixed_batches`) and dealt out whole, batch k to rank k % world, so that a batch
    holds the same prompts whatever the rank count and its records (and the AutoJudge labels bound to each
    response, token for token) equal one rank's. ``pending``: a new layout's indices (:func:`read_layout`);
    the batches keep only those, so the unfinished batches of an earlier layout dealt this way stay whole."""
    keep = None if pending is None else set(pending)
    cut = fixed_batches(lengths, batch_size)
    left = cut if keep is None else [kept for b in cut if (kept := [i for i in b if i in keep])]
    return left[rank::world]


def _indices(examples: list[Example], ids: list[str]) -> list[int]:
    where = {e.id: i for i, e in enumerate(examples)}
    unknown = [x for x in ids if x not in where]
    if unknown:  # the stamp's config hash covers the dataset, so only a hand-edited stamp gets here
        raise RuntimeError(f"config_stamp.json lists prompt ids this dataset lacks: {unknown[:3]}")
    return sorted(where[x] for x in ids)


def _progresses(out_dir: Path) -> list[dict]:
    """Every rank's progress, of this layout and earlier ones (a resumed run may have had other ranks)."""
    return [read_json(p) for p in sorted((out_dir / shards.SHARD_DIR).glob("rank*.progress.json"))]


def finalize(
    out_dir: str | Path, world: int, s: DataGenSettings, manifest_base: dict, expected: list[str] | None = None
) -> dict:
    """Rank 0, after every rank is done: set τ, write the labels into the shards, write the manifest.
    ``expected``: the run's prompt ids; each must be done exactly once (else nothing is written)."""
    out_dir = Path(out_dir)
    missing = [r for r in range(world) if not (out_dir / shards.SHARD_DIR / f"rank{r:03d}.done.json").is_file()]
    if missing:
        raise RuntimeError(f"data_gen ranks {missing} have not finished; rerun data_gen to complete them")
    progresses = _progresses(out_dir)
    if expected is not None:
        done = [x for p in progresses for x in p["done_prompt_ids"]]
        twice, left = len(done) - len(set(done)), set(expected) - set(done)
        if twice or left or len(done) != len(expected):
            raise RuntimeError(
                f"data_gen output '{out_dir}' covers {len(set(done) & set(expected))} of {len(expected)} prompts "
                f"({len(left)} missing, {twice} twice): not finalized; rerun data_gen to complete it"
            )
    names = [n for p in progresses for n in p["shards"]]
    paths = [out_dir / shards.SHARD_DIR / n for n in names]
    lds, aj_pos, aj_n = [], 0, 0
    for p in paths:
        t = pq.read_table(p, columns=["substituted", "ld", "autojudge_label"])
        sub = np.asarray(t["substituted"])
        lds.append(np.asarray(t["ld"])[sub])
        aj = np.asarray(t["autojudge_label"])[sub]
        aj_pos, aj_n = aj_pos + int((aj == 1).sum()), aj_n + int((aj != -1).sum())
    all_ld = torch.from_numpy(np.concatenate(lds)) if lds else torch.zeros(0)
    # a shard whose features overflowed float16 was stored as float32: then every shard is (one schema)
    wide = any(pq.read_schema(p).field("features").type.value_type == pa.float32() for p in paths)
    feature_dtype = "float32" if wide else s.feature_dtype
    tau = tau_from_rule(all_ld, s.tau["mode"], float(s.tau["value"]), float(s.tau["quantile"]))
    for name, p in zip(names, paths):  # τ depends on the whole run: labels go in now, shard by shard, atomically
        t = pq.read_table(p)
        if wide:
            f = t.schema.get_field_index("features")
            t = t.set_column(
                f, "features", t["features"].cast(pa.list_(pa.float32(), t.schema.field(f).type.list_size))
            )
        ld = torch.from_numpy(np.nan_to_num(np.asarray(t["ld"]), nan=-math.inf))
        lab = label_rule(ld, tau).numpy()  # negatives carry LD NaN -> -inf -> 0
        t = t.set_column(t.schema.get_field_index("label"), "label", pa.array(lab, pa.int8()))
        rank, index = (int(x) for x in name.removeprefix("rank").removesuffix(".parquet").split("-"))
        shards.write_shard(out_dir, rank, index, t)
    n_mis = int(all_ld.numel())
    positives = int((all_ld > tau).sum())
    n_prompts = sum(len(p["done_prompt_ids"]) for p in progresses)
    counts, edges = np.histogram(all_ld.numpy(), bins=40) if n_mis else (np.zeros(0), np.zeros(0))
    manifest = {
        **manifest_base,
        "complete": True,
        "feature_dtype": feature_dtype,
        "shards": names,
        "tau": tau,
        "tau_rule": dict(s.tau),
        "score_variant": s.score_variant,
        "window": s.window,
        "counts": {
            "prompts": n_prompts,
            "responses": n_prompts,
            "response_tokens": sum(p["response_tokens"] for p in progresses),
            "mismatches": n_mis,
            "positives": positives,
            "records": 2 * n_mis,
            "autojudge_labelled": aj_n,
            "autojudge_positives": aj_pos,
        },
        "positive_rate": positives / n_mis if n_mis else 0.0,
        "ld_histogram": {"bins": edges.tolist(), "counts": counts.astype(int).tolist()},
        "ld_quantiles": {str(q): quantile(all_ld, q) for q in (0.1, 0.25, 0.5, 0.75, 0.9)} if n_mis else {},
    }
    write_dataset_card(out_dir, manifest)  # README.md: datasets.load_dataset(out_dir) reads the shards
    shards.write_manifest(out_dir, manifest)
    return manifest


STAMP = "config_stamp.json"


def check_output_dir(
    out_dir: str | Path, cfg_hash: str, world: int, overwrite: bool, ids: list[str] | None = None
) -> str | None:
    """Refuse a folder made by another config (unless overwrite): records would mix. A stopped folder (or one
    started with another number of ranks) gets a new layout: the prompts of ``ids`` that no rank has finished,
    whose batches are dealt out again (:func:`read_layout`, :func:`rank_batches`). Rank 0 only, before the other ranks start.
    Returns a line saying so, or None."""
    out_dir = Path(out_dir)
    stamp = out_dir / STAMP
    fix = "choose another data_gen.output_dir or set data_gen.overwrite=true to replace it"
    if stamp.is_file():
        old = read_json(stamp)
        if old["config_hash"] != cfg_hash:
            problem = f"was made by a different config (config_hash {old['config_hash']} != {cfg_hash})"
            if not overwrite:
                raise FileExistsError(f"data_gen.output_dir '{out_dir}' {problem}; {fix}")
            shutil.rmtree(out_dir)
        else:
            if ids is None:
                raise ValueError("check_output_dir: dealing a stopped run's batches out needs the run's prompt ids")
            done = {x for p in _progresses(out_dir) for x in p["done_prompt_ids"]}
            pending = [x for x in ids if x not in done]
            # a stopped run's unfinished batches are dealt out again at every start, so no rank idles while
            # another works through the rest of an old share (records do not depend on the dealing)
            if old["world_size"] != world or (done and pending):
                for f in (out_dir / shards.SHARD_DIR).glob("rank*.done.json"):  # the old layout's: not this one's
                    f.unlink()
                write_json(stamp, {"config_hash": cfg_hash, "world_size": world, "pending": pending})
                before = f"was run with {old['world_size']} rank(s)" if old["world_size"] != world else "was stopped"
                return (
                    f"data_gen.output_dir '{out_dir}' {before}: its {len(done)} finished prompts stay, "
                    f"the {len(pending)} others are dealt out to {world} rank(s)"
                )
    elif out_dir.is_dir() and any(out_dir.iterdir()):  # never deleted, even with overwrite: not ours
        raise FileExistsError(
            f"data_gen.output_dir '{out_dir}' is not empty and is not a data_gen output; "
            f"choose another data_gen.output_dir"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file():
        write_json(stamp, {"config_hash": cfg_hash, "world_size": world})
    return None


def read_layout(out_dir: str | Path) -> list[str] | None:
    """The prompt ids the current rank layout deals out (None: all, the layout the run started with)."""
    return read_json(Path(out_dir) / STAMP).get("pending")
