"""Evaluation: the method grid, the records file (resume key, schema) and the decode loop over prompts.

The eval stage is a thin driver over this module: :class:`EvalSettings` from the ``eval`` section (strict),
:func:`build_grid` for the (method, threshold) pairs, :class:`RecordsFile` for ``per_example.jsonl`` and
:func:`evaluate` for the decodes. For each prompt (or batch of prompts, ``batch_size`` > 1) all methods run
back to back, target-only first, so drifts of machine load hit every method alike.

Records are kept across runs only when they were made under the same *records key*: the decoding
settings, the dataset (its slice aside), the model fingerprints and dtype, and, per method that uses a
judge head, the head folder's content hash. Records of another key are moved aside, never mixed in.

Three different "scores" meet here; a record's ``score`` is the *task score* of its output (1/0 from the
task's answer checker, or prefix agreement with the target's output when the task has none,
``score_source``). The judge's output is P(important), and the LD score belongs to data_gen.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from selfjudge.batch_decoding import decode_batch
from selfjudge.decoding import PrefillMemo, decode
from selfjudge.generation import fixed_batches
from selfjudge.io import atomic_write_text, config_hash, folder_hash, neutral_dataset, read_json, write_json
from selfjudge.judge import JudgeHead
from selfjudge.metrics import prefix_agreement, unique_records
from selfjudge.policies import (
    OPTION_DEFAULTS,
    OPTION_NEUTRAL,
    POLICIES,
    Policy,
    build_policy,
    check_strict_tokens,
    judge_guard,
)
from selfjudge.schedule import AdaptiveWindow
from selfjudge.settings import build, check_keys, is_int, require
from selfjudge.tasks import Example, Task, build_task

log = logging.getLogger(__name__)

OPTIONS_KEY = "eval.policy_options"  # how eval names the shared policy options in messages
BASELINES = ("target", "draft", "lossless", "lossless_adaptive")  # method names taken by the always-run methods
HEAD_DIR_KEYS = {"judge": "judge_dir", "autojudge": "autojudge_dir"}  # judge policy -> its default head key
RECORDS = "per_example.jsonl"
KEY_FILE = "eval_key.json"
# keys every record holds (summaries read them); records written by this version hold RECORD_KEYS
REQUIRED_KEYS = (
    "prompt_id",
    "method",
    "threshold",
    "output_ids",
    "score",
    "rounds",
    "new_tokens",
    "proposed",
    "accepted",
    "seconds",
)


@dataclass(frozen=True)
class MethodSpec:
    """One eval.methods entry, checked (heads not loaded yet)."""

    name: str  # key in eval.methods
    policy: str  # registry name in selfjudge.policies
    thresholds: Any  # a list of numbers, or "head_quantiles"
    head_key: str | None  # eval.* key of its head folder (judge rules), e.g. judge_dir, methods.x.head_dir
    options: tuple[tuple[str, Any], ...] = ()  # its own policy options (over eval.policy_options), sorted


@dataclass(frozen=True)
class Method:
    """One column of the grid: a method at one threshold."""

    name: str  # key in eval.methods (or a baseline name)
    policy: str  # registry name in selfjudge.policies (target/draft: plain decoding)
    threshold: float | None  # the rule's threshold (None: no rule)
    head_key: str | None = None  # eval.* key of the head folder (judge rules)
    options: tuple[tuple[str, Any], ...] = ()  # the method's own policy options (MethodSpec.options)


def method_options(
    name: str, shared: Mapping[str, Any] | None, own: Mapping[str, Any] | tuple
) -> tuple[dict[str, Any], str]:
    """(policy options of method ``name``: eval.policy_options overlaid with its own, how messages name them)."""
    own = dict(own)
    return {**(shared or {}), **own}, f"eval.methods.{name}.options" if own else OPTIONS_KEY


def parse_methods(methods: Mapping[str, Any] | None, options: Mapping[str, Any]) -> tuple[MethodSpec, ...]:
    """eval.methods -> specs; every threshold that needs no head is checked here (before any model loads)."""
    out = []
    for name, spec in (methods or {}).items():
        if name in BASELINES:
            raise ValueError(f"eval.methods.{name}: '{name}' always runs; remove it from eval.methods")
        head_key, own = None, {}
        if isinstance(spec, Mapping):
            if set(spec) - {"policy", "thresholds", "head_dir", "options"} or "thresholds" not in spec:
                raise ValueError(
                    f"eval.methods.{name} must be a threshold list or a map with keys policy, thresholds "
                    f"(and head_dir for judge rules, options for its own policy options); got keys {sorted(spec)}"
                )
            policy, ths = spec.get("policy", name), spec["thresholds"]
            if spec.get("head_dir"):
                head_key = f"methods.{name}.head_dir"
            own = spec.get("options") or {}
            if not isinstance(own, Mapping):
                raise ValueError(f"eval.methods.{name}.options must be a map of policy options, got {own!r}")
            check_keys(own, list(OPTION_DEFAULTS), f"eval.methods.{name}.options", required=False)
        else:
            policy, ths = name, spec
        if policy not in POLICIES or policy == "lossless":
            raise ValueError(
                f"unknown policy '{policy}' in eval.methods.{name}; known: "
                f"{sorted(p for p in POLICIES if p != 'lossless')}"
            )
        if policy in HEAD_DIR_KEYS and head_key is None:
            head_key = HEAD_DIR_KEYS.get(name, HEAD_DIR_KEYS[policy])
        if ths != "head_quantiles" and not isinstance(ths, (list, tuple, int, float)):
            raise ValueError(
                f"eval.methods.{name}: thresholds must be a list of numbers or head_quantiles, got {ths!r}"
            )
        if ths == "head_quantiles" and policy not in HEAD_DIR_KEYS:
            raise ValueError(f"eval.methods.{name}: head_quantiles needs a judge policy with a head folder")
        opts, opts_key = method_options(name, options, own)
        check_strict_tokens(opts.get("strict_tokens"), opts_key)  # its mask is built once the tokenizer loads
        opts = {k: v for k, v in opts.items() if k != "strict_tokens"}
        if policy in HEAD_DIR_KEYS:  # checked before the head loads
            judge_guard(opts.get("judge_strict_top1"), opts_key)
        if ths != "head_quantiles":
            for t in ths if isinstance(ths, (list, tuple)) else [ths]:
                if policy in HEAD_DIR_KEYS:  # the head is loaded later; its threshold range is known now
                    if not (isinstance(t, (int, float)) and not isinstance(t, bool) and 0.0 <= t <= 1.0):
                        raise ValueError(
                            f"eval.methods.{name}: judge threshold must be in [0, 1] (a P(important) cut), got {t!r}"
                        )
                else:
                    build_policy(policy, t, options=opts, key=f"eval.methods.{name}", options_key=opts_key)
        out.append(MethodSpec(name, policy, ths, head_key, tuple(sorted(own.items()))))
    return tuple(out)


@dataclass(frozen=True)
class EvalSettings:
    """The ``eval`` config section (conf/eval/default.yaml documents each key)."""

    output_dir: str
    judge_dir: str | None
    autojudge_dir: str | None
    gamma: int
    max_new_tokens: int
    temperature: float
    limit: int | None
    batch_size: int
    warmup: int
    warmup_tokens: int
    seed: int
    device: str
    draft_only: bool
    schedule: str
    confidence_stop: float | None
    cuda_graphs: bool
    profile: bool
    resume: bool
    methods: dict
    policy_options: dict
    dataset: dict

    def __post_init__(self) -> None:
        require(is_int(self.gamma, 1), "eval.gamma", "an integer >= 1 (draft tokens per round)", self.gamma)
        require(is_int(self.max_new_tokens, 1), "eval.max_new_tokens", "an integer >= 1", self.max_new_tokens)
        require(
            isinstance(self.temperature, (int, float)) and self.temperature >= 0,
            "eval.temperature",
            ">= 0 (0: greedy)",
            self.temperature,
        )
        require(
            is_int(self.batch_size, 1), "eval.batch_size", "an integer >= 1 (prompts decoded together)", self.batch_size
        )
        for key in ("warmup", "warmup_tokens"):
            require(is_int(getattr(self, key), 0), f"eval.{key}", "an integer >= 0", getattr(self, key))
        require(self.limit is None or is_int(self.limit, 1), "eval.limit", "null or an integer >= 1", self.limit)
        require(self.schedule in ("fixed", "adaptive"), "eval.schedule", "'fixed' or 'adaptive'", self.schedule)
        cs = self.confidence_stop
        require(
            cs is None or (isinstance(cs, (int, float)) and not isinstance(cs, bool) and 0 <= cs <= 1),
            "eval.confidence_stop",
            "null or a number in [0, 1]",
            cs,
        )
        check_keys(self.policy_options or {}, list(OPTION_DEFAULTS), "eval.policy_options", required=False)
        object.__setattr__(self, "specs", parse_methods(self.methods, self.policy_options or {}))

    @classmethod
    def from_section(cls, d: Mapping[str, Any]) -> EvalSettings:
        return build(cls, d, "eval")

    def head_dir(self, key: str) -> str | None:
        """The folder an eval.* head key names (``judge_dir``, ``methods.x.head_dir``)."""
        if key.startswith("methods."):
            return self.methods[key.split(".")[1]].get("head_dir")
        return getattr(self, key)

    def head_dirs(self) -> dict[str, str]:
        """eval.* head key -> folder, for every method whose head folder is set."""
        return {
            s.head_key: self.head_dir(s.head_key)
            for s in self.specs
            if s.head_key is not None and self.head_dir(s.head_key)
        }

    def dataset_with_limit(self) -> dict:
        ds = dict(self.dataset)
        if self.limit is not None:
            ds["limit"] = self.limit if ds.get("limit") is None else min(ds["limit"], self.limit)
        return ds


def strict_kinds(s: EvalSettings) -> set[str]:
    """The strict_tokens classes the eval's policies use (eval.policy_options and methods' own options)."""
    kinds = {(s.policy_options or {}).get("strict_tokens")} | {dict(m.options).get("strict_tokens") for m in s.specs}
    return {k for k in kinds if k is not None}


def build_grid(
    s: EvalSettings, heads: Mapping[str, JudgeHead], strict_masks: Mapping[str, torch.Tensor] | None = None
) -> list[Method]:
    """Target-only, lossless (and draft-only), then every method's thresholds; judge methods whose head
    folder is null are skipped. Thresholds are validated here, before any decoding."""
    grid = [Method("target", "target", None), Method("lossless", "lossless", None)]
    if s.schedule == "adaptive":  # its own row: the rule comparisons keep the fixed window
        grid.append(Method("lossless_adaptive", "lossless", None))
    if s.draft_only:
        grid.insert(1, Method("draft", "draft", None))
    for spec in s.specs:
        if spec.head_key is not None and spec.head_key not in heads:
            continue
        ths = spec.thresholds
        if ths == "head_quantiles":
            ths = list(heads[spec.head_key].config.thresholds.get("quantiles") or [])
            if not ths:
                raise ValueError(
                    f"eval.methods.{spec.name}=head_quantiles, but the head in eval.{spec.head_key} "
                    "stores no thresholds.quantiles: list thresholds explicitly"
                )
        for t in ths if isinstance(ths, (list, tuple)) else [ths]:
            opts, opts_key = method_options(spec.name, s.policy_options, spec.options)
            build_policy(
                spec.policy,
                t,
                head=heads.get(spec.head_key),
                options=opts,
                key=f"eval.methods.{spec.name}",
                options_key=opts_key,
                strict_masks=strict_masks,
            )
            grid.append(Method(spec.name, spec.policy, float(t), spec.head_key, spec.options))
    return grid


def check_prompt_lengths(
    examples: list[Example], prompts: list[list[int]], s: EvalSettings, context: int | None
) -> None:
    """Refuse, by id, a prompt whose decode could run past the target's context (prompt + max_new_tokens +
    one window of γ + 1 positions), before anything is decoded."""
    limit = context or math.inf
    for ex, ids in zip(examples, prompts):
        need = len(ids) + s.max_new_tokens + s.gamma + 1
        if need > limit:
            raise ValueError(
                f"prompt '{ex.id}' has {len(ids)} tokens; with eval.max_new_tokens={s.max_new_tokens} "
                f"and eval.gamma={s.gamma} it needs {need} positions, over the target's context of "
                f"{context}: drop the prompt (eval.dataset) or lower eval.max_new_tokens"
            )


def records_key(
    s: EvalSettings,
    dataset: Mapping[str, Any],
    target_fp: str | None,
    draft_fp: str | None,
    dtype: str,
    graphs: bool,
    cpu_kernels: Mapping[str, str] | None = None,
) -> tuple[str, dict]:
    """(key, settings it covers) of the records a rerun may keep (heads are keyed per record)."""
    key_cfg = {k: getattr(s, k) for k in ("gamma", "max_new_tokens", "temperature", "seed")}
    key_cfg["policy_options"] = {  # an option added later, at its neutral value: older records keep their key
        k: v for k, v in (s.policy_options or {}).items() if k not in OPTION_NEUTRAL or v != OPTION_NEUTRAL[k]
    }
    if s.batch_size != 1:  # timings (and bf16 rounding) depend on it; left out at 1 so older runs keep their key
        key_cfg["batch_size"] = s.batch_size
    if graphs:  # timings depend on it (tokens do not); only where it acts, so that other runs keep their key
        key_cfg["cuda_graphs"] = True
    if s.schedule != "fixed":  # the adaptive row's timings and rounds depend on these; fixed keeps older keys
        key_cfg.update(schedule=s.schedule, confidence_stop=s.confidence_stop)
    if cpu_kernels and set(cpu_kernels.values()) != {"default"}:  # the same: timings, not tokens
        key_cfg["cpu_kernels"] = dict(cpu_kernels)
    # (limit, offset and ids are left out: records are per prompt id, so another slice reuses the ones it shares)
    ds_key = neutral_dataset({k: v for k, v in dataset.items() if k not in ("limit", "offset", "ids")})
    key = config_hash({**key_cfg, "dataset": ds_key, "target": target_fp, "draft": draft_fp, "dtype": dtype})
    return key, key_cfg


class RecordsFile:
    """``per_example.jsonl`` of one output folder: the records of one key, one line per finished decode.

    :meth:`open` keeps the records made under ``key`` and, for methods with a judge head, the current head
    (``heads``: method name -> head content hash); any other records go to ``per_example.<key>.jsonl``
    beside it. Records of a method this run does not decode (``decoded``: the methods it does; None: all) are
    kept as they are: a run without one judge's head folder leaves that judge's records alone. A line cut by
    a kill at the end of the file is dropped (and redone); any other line that is not a whole record is an
    error naming its line number.
    """

    def __init__(self, out_dir: str | Path, rank: int | None = None):
        self.dir = Path(out_dir)
        self.key_path = self.dir / KEY_FILE
        # several ranks: each appends its own file; rank 0 merges them (merge_ranks) into per_example.jsonl
        self.path = self.dir / (RECORDS if rank is None else f"per_example.rank{rank:03d}.jsonl")

    def merge_ranks(self) -> list[dict]:
        """Append the records of every rank's file to per_example.jsonl (atomically), remove the rank files
        and return every record."""
        parts = sorted(self.dir.glob("per_example.rank*.jsonl"))
        records = self.read()
        extra = [r for p in parts for r in self.read(p, repair=False)]
        if parts:
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in records + extra))
            for p in parts:
                p.unlink()
        return records + extra

    def open(
        self,
        key: str,
        info: Mapping[str, Any],
        heads: Mapping[str, str | None],
        resume: bool,
        decoded: Collection[str] | None = None,
    ) -> list[dict]:
        self.merge_ranks()  # records a killed multi-rank run left in its rank files
        old_key = read_json(self.key_path).get("run_key") if self.key_path.is_file() else None
        if not resume or old_key != key:
            if self.path.is_file() and self.path.stat().st_size:
                why = "eval.resume=false" if not resume else "decoding settings changed"
                self._aside(self.read(), str(old_key or "unknown")[:12], why)
            write_json(self.key_path, {"run_key": key, **info})
        records = self.read()
        now = set(decoded) if decoded is not None else {r["method"] for r in records}
        fresh = [r["method"] not in now or r.get("head") == heads.get(r["method"]) for r in records]
        stale = [r for r, ok in zip(records, fresh) if not ok]
        if stale:
            keep = [r for r, ok in zip(records, fresh) if ok]
            names = sorted({r["method"] for r in stale})
            self._aside(
                stale,
                "heads-" + config_hash(sorted({str(r.get("head")) for r in stale}))[:8],
                f"the head or options of {names} changed",
                keep=keep,
            )
            records = keep
        return records

    def write(self, records: list[dict]) -> None:
        """Replace the records file with ``records`` (atomically)."""
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))

    def _aside(self, recs: list[dict], tag: str, why: str, keep: list[dict] | None = None) -> None:
        aside = self.dir / f"per_example.{tag}.jsonl"
        earlier = self.read(aside) if aside.is_file() else []
        atomic_write_text(aside, "".join(json.dumps(r) + "\n" for r in earlier + recs))
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep or []))
        log.info("%s: %d earlier records moved to %s; those decodes are redone", why, len(recs), aside)

    def read(self, path: Path | None = None, repair: bool = True) -> list[dict]:
        """Whole, distinct records; with ``repair`` the file is rewritten without a duplicate or a line cut by a
        kill at its end
        (readers beside a running eval, such as scripts/eval_report.py, pass repair=False)."""
        path = path or self.path
        if not path.is_file():
            return []
        raw = path.read_bytes()
        lines = raw.decode("utf-8").splitlines()
        recs = []
        for i, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) and not raw.endswith(b"\n"):
                    break  # cut by a kill while being written: redone
                raise ValueError(
                    f"{path} line {i} is not a JSON record: remove the line (its decode is redone)"
                ) from None
            missing = [k for k in REQUIRED_KEYS if k not in rec] if isinstance(rec, dict) else list(REQUIRED_KEYS)
            if missing:
                raise ValueError(
                    f"{path} line {i} is not an eval record (missing {missing}): remove the line (its decode is redone)"
                )
            recs.append(rec)
        recs = unique_records(recs)  # a second writer's copies (before folders were locked): dropped
        if repair and path == self.path and (len(recs) != len(lines) or (lines and not raw.endswith(b"\n"))):
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in recs))
        return recs


def rescore(records: list[dict], task: Task, examples: list[Example]) -> int:
    """Score the kept records' texts again with the task's checker, in place (a record keeps its tokens and
    text, so a revised checker needs no decoding); returns how many scores changed. Records of prompts not in
    ``examples`` and those scored by agreement (tasks without a checker) are left as they are."""
    by_id = {ex.id: ex for ex in examples}
    changed = 0
    for r in records:
        ex = by_id.get(r["prompt_id"])
        if ex is None or r.get("score_source", "task") != "task" or "text" not in r:
            continue
        new = task.score(ex, r["text"])
        if new is not None and new != r["score"]:
            r["score"], changed = new, changed + 1
    return changed


def folder_task(out: RecordsFile) -> Task | None:
    """The task an eval folder's records were made on (the dataset its eval_key.json names), or None."""
    ds = read_json(out.key_path).get("dataset") if out.key_path.is_file() else None
    return build_task(ds) if ds else None


def rescore_read(out: RecordsFile, records: list[dict]) -> int:
    """:func:`rescore` for records read from an eval folder by a reader (pick_thresholds, eval_report), in
    memory, where the folder's task has a revised checker (a folder the eval stage has not run on since keeps
    the scores of the earlier revision). Returns the count."""
    task = folder_task(out)
    return rescore(records, task, task.examples()) if task is not None and task.checker else 0


def head_hashes(s: EvalSettings, heads: Mapping[str, JudgeHead]) -> dict[str, str | None]:
    """Method name -> what its records depend on beyond the records key: the content hash of the head folder
    it decodes with, and its own policy options (eval.methods.<name>.options) where it has any (methods with
    neither: absent). A record made with another value is set aside, as for a changed head."""
    out = {}
    for spec in s.specs:
        head = folder_hash(s.head_dir(spec.head_key)) if spec.head_key in heads else None
        if spec.options:
            out[spec.name] = f"{head or '-'}+options-{config_hash(dict(spec.options))[:8]}"
        elif spec.head_key in heads:
            out[spec.name] = head
    return out


def _seed(base: int, prompt_id: str) -> int:
    return (int(base) * 1_000_003 + zlib.crc32(prompt_id.encode())) % (2**63)


def record(
    ex: Example,
    m: Method,
    ids: list[int],
    toks: list[int],
    text: str,
    st: Any,
    ref: list[int],
    task: Task,
    eos_ids: list[int],
    batch: int,
    head: str | None,
) -> dict:
    """The per_example.jsonl record of one decode (``ref``: the target-only output of the same prompt)."""
    score, source = task.score(ex, text), "task"
    if score is None:  # no checker: agreement with the target's own answer
        score, source = prefix_agreement(toks, ref), "agreement"
    rec = {
        "prompt_id": ex.id,
        "task": ex.task,
        "method": m.name,
        "policy": m.policy,
        "threshold": m.threshold,
        "prompt_tokens": len(ids),
        "output_ids": toks,
        "text": text,
        "score": score,
        "score_source": source,
        "agree_exact": float(toks == ref),
        "agree_prefix": prefix_agreement(toks, ref),
        "stopped_at_eos": bool(toks) and toks[-1] in eos_ids,
        "batch_size": batch,
        "rounds": st.rounds,
        "new_tokens": st.new_tokens,
        "draft_forwards": st.draft_forwards,
        "proposed": st.proposed,
        "accepted": st.accepted,
        "accepted_by_rule": st.accepted_by_rule,
        "accept_hist": st.accept_hist,
        "seconds": st.seconds,
        "prefill_seconds": st.prefill_seconds,
        "draft_seconds": st.draft_seconds,
        "verify_seconds": st.verify_seconds,
        "rule_seconds": st.rule_seconds,
    }
    if head is not None:
        rec["head"] = head
    return rec


def evaluate(
    pair: Any,
    task: Task,
    examples: list[Example],
    prompts: list[list[int]],
    s: EvalSettings,
    grid: list[Method],
    heads: Mapping[str, JudgeHead],
    records: list[dict],
    out: RecordsFile,
    graphs: bool = False,
    head_of: Mapping[str, str | None] | None = None,
    rank: int = 0,
    world: int = 1,
    strict_masks: Mapping[str, torch.Tensor] | None = None,
) -> list[dict]:
    """Decode every (prompt, method) of ``grid`` not in ``records``, appending each record to ``out`` as it
    finishes; returns every record (earlier ones first). With several ranks this rank takes every
    ``world``-th group of prompts from ``rank`` on (the same groups as one rank would make)."""
    dev = next(pair.target.parameters()).device
    head_of = dict(head_of or {})
    bs = s.batch_size
    done = {(r["method"], r["threshold"], r["prompt_id"]) for r in records}
    target_out = {r["prompt_id"]: r["output_ids"] for r in records if r["method"] == "target"}

    def policy_of(m: Method) -> Policy | None:
        if m.policy in BASELINES:
            return None
        opts, opts_key = method_options(m.name, s.policy_options, m.options)
        return build_policy(
            m.policy,
            m.threshold,
            head=heads.get(m.head_key),
            options=opts,
            key=f"eval.methods.{m.name}",
            options_key=opts_key,
            strict_masks=strict_masks,
        )

    adaptive = AdaptiveWindow(s.gamma)  # one schedule for the run: its costs carry over from the warm-up
    memo = PrefillMemo()  # batched: a batch's prefill runs once per model for all methods (charged to each)

    def run_group(m: Method, items: list, n: int, on_tokens=None) -> list:
        """(tokens, stats) per (example, prompt ids) of items: batch-1 decodes, or one batched decode."""
        model, draft = {"target": (pair.target, None), "draft": (pair.draft, None)}.get(
            m.policy, (pair.target, pair.draft)
        )
        common = dict(
            gamma=s.gamma,
            max_new_tokens=n,
            eos_ids=pair.eos_ids,
            vocab=pair.vocab_size,
            policy=policy_of(m),
            temperature=float(s.temperature),
        )
        if m.name == "lossless_adaptive":
            common.update(schedule=adaptive, confidence_stop=s.confidence_stop)
        seed = _seed(s.seed, ",".join(ex.id for ex, _ in items))
        gen = torch.Generator(device=dev).manual_seed(seed) if s.temperature > 0 else None
        if bs == 1:
            return [decode(model, draft, items[0][1], generator=gen, profile=s.profile, static_cache=graphs, **common)]
        return decode_batch(
            model,
            draft,
            [ids for _, ids in items],
            pad_id=pair.tokenizer.pad_token_id or 0,
            generator=gen,
            on_tokens=on_tokens,
            prefill_memo=memo,
            **common,
        )

    # prompts grouped for decoding: one by one, or batches of similar length (always the same batches)
    groups = (
        [[(examples[i], prompts[i]) for i in idx] for idx in fixed_batches([len(p) for p in prompts], bs)]
        if bs > 1
        else [[x] for x in zip(examples, prompts)]
    )
    if rank == 0 and world > len(groups):
        log.warning(
            "%d ranks for %d batch(es) of eval.batch_size=%d prompts: %d rank(s) have nothing to decode (ranks take "
            "whole batches); fewer ranks would do the same work",
            world,
            len(groups),
            bs,
            world - len(groups),
        )
    groups = groups[rank::world]
    todo = [
        (items, m)
        for group in groups
        for m in grid
        if (items := [(ex, ids) for ex, ids in group if (m.name, m.threshold, ex.id) not in done])
    ]
    if todo and groups and s.warmup and s.warmup_tokens:  # one decode per kind of method, excluded from the results
        kinds = {(m.policy, m.head_key, m.name == "lossless_adaptive"): m for m in grid}
        # batched: one batch of the first eval.warmup prompts (through the batched engine); else one by one
        warm = [groups[0][: s.warmup]] if bs > 1 else groups[: s.warmup]
        for m in tqdm(list(kinds.values()), desc="eval warm-up", unit="decode", leave=False):
            for items in warm:
                run_group(m, items, min(s.warmup_tokens, s.max_new_tokens))
    with (
        open(out.path, "a", encoding="utf-8") as f,
        tqdm(
            total=sum(len(items) for items, _ in todo),
            desc=f"eval rank {rank}" if world > 1 else "eval",
            unit="decode",
            disable=rank != 0,
            smoothing=0,  # whole batches land at once: the mean rate, not the last burst, gives a sane ETA
        ) as bar,
    ):
        for items, m in todo:
            label = f"{m.name}{'' if m.threshold is None else f'@{m.threshold:g}'}"
            results = run_group(m, items, s.max_new_tokens, batch_progress(bar, label, len(items)))
            for (ex, ids), (toks, st) in zip(items, results):
                text = pair.tokenizer.decode(toks, skip_special_tokens=True)
                if m.name == "target":
                    target_out[ex.id] = toks
                rec = record(
                    ex, m, ids, toks, text, st, target_out[ex.id], task, pair.eos_ids, len(items), head_of.get(m.name)
                )
                f.write(json.dumps(rec) + "\n")
                records.append(rec)
            f.flush()
            tps = sum(st.new_tokens for _, st in results) / max(sum(st.seconds for _, st in results), 1e-9)
            bar.set_postfix_str(f"{label} {tps:.1f} tok/s")
            bar.update(len(items))
    return records


def batch_progress(bar: Any, label: str, rows: int, every: float = 10.0) -> Callable[[list[int]], None] | None:
    """A batched decode's progress on ``bar`` (a batch of 64 rows at 512 tokens runs many minutes on a CPU):
    tokens committed so far, at most every ``every`` seconds, and until the first round the prefill under way
    (the two models' prefill of 64 long prompts alone can run a quarter of an hour on one core). None at batch 1
    (the bar moves per decode)."""
    if rows == 1:
        return None
    bar.set_postfix_str(f"{label}: prefill of {rows} prompts")
    state = {"tokens": 0, "shown": time.monotonic()}

    def on_tokens(toks: list[int]) -> None:
        state["tokens"] += len(toks)
        if time.monotonic() - state["shown"] >= every:
            state["shown"] = time.monotonic()
            bar.set_postfix_str(f"{label}: {state['tokens']} tokens over {rows} prompts")

    return on_tokens


def engine_name(bs: int, graphs: bool) -> str:
    return (
        "batch size 1, static KV cache + CUDA graphs"
        if graphs
        else "batch size 1, DynamicCache rollback"
        if bs == 1
        else f"batch size {bs}, masked KV holes for rejected tokens"
    ) + ", one verify pass per round"
