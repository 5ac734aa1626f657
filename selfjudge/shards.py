"""Sharded record storage: Parquet shards named by (rank, index) plus a ``manifest.json``.

Layout of a data folder::

    manifest.json                  # written last, atomically; "complete": true only when all ranks finished
    shards/rank000-00000.parquet   # each shard written to a temp name and renamed: never read half-written
    shards/rank000.progress.json   # per rank: shards written and the prompt ids they cover (for resume)
    shards/run_info.json           # what all shards share (models, features, config): the manifest less
                                   # what the end of the run adds; a snapshot of a run in progress reads it

Readers open the shards memory-mapped through ``datasets`` (Arrow), never all in RAM.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from selfjudge.io import atomic_path, read_json, write_json

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
RUN_INFO = "run_info.json"


def shard_name(rank: int, index: int) -> str:
    return f"rank{rank:03d}-{index:05d}.parquet"


def progress_path(root: Path, rank: int) -> Path:
    return Path(root) / SHARD_DIR / f"rank{rank:03d}.progress.json"


def write_shard(root: str | Path, rank: int, index: int, table: pa.Table) -> Path:
    """Write one shard durably and atomically: a temp file in the same folder, fsync, rename, fsync the folder
    (``io.atomic_path``)."""
    final = Path(root) / SHARD_DIR / shard_name(rank, index)
    with atomic_path(final) as tmp:  # fsynced before the rename
        pq.write_table(table, tmp)
    return final


def read_progress(root: str | Path, rank: int) -> dict:
    p = progress_path(Path(root), rank)
    return read_json(p) if p.is_file() else {"shards": [], "done_prompt_ids": []}


def write_progress(root: str | Path, rank: int, progress: dict) -> None:
    write_json(progress_path(Path(root), rank), progress)


def read_manifest(root: str | Path) -> dict:
    p = Path(root) / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"'{root}' has no {MANIFEST}: it is not a finished data_gen output")
    return read_json(p)


def write_manifest(root: str | Path, manifest: dict) -> None:
    write_json(Path(root) / MANIFEST, manifest)


def list_shards(root: str | Path, manifest: dict | None = None) -> list[Path]:
    """The shards a complete manifest names (never stray or temporary files)."""
    manifest = manifest if manifest is not None else read_manifest(root)
    names: Iterable[str] = manifest.get("shards", [])
    paths = [Path(root) / SHARD_DIR / n for n in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"manifest of '{root}' names shards that are missing: {missing[:3]}")
    return paths


def write_run_info(root: str | Path, info: dict) -> None:
    write_json(Path(root) / SHARD_DIR / RUN_INFO, info)


def snapshot_manifest(root: str | Path) -> dict:
    """The manifest of a data folder still being made: its run info, the shards every rank has recorded as
    written, ``complete`` False. τ is known only where set by value (``tau`` None otherwise: by quantile it
    depends on the whole run), and the SelfJudge ``label`` column is not filled yet (-1): read LD > τ."""
    root = Path(root)
    info = root / SHARD_DIR / RUN_INFO
    if not info.is_file():
        raise FileNotFoundError(
            f"'{root}' has neither {MANIFEST} nor {SHARD_DIR}/{RUN_INFO}: not a data_gen output in progress "
            "(a run started by an older version writes its run info when data_gen resumes it)"
        )
    base = read_json(info)
    progress = [read_json(p) for p in sorted((root / SHARD_DIR).glob("rank*.progress.json"))]
    rule = base.get("tau_rule") or {}
    return {
        **base,
        "complete": False,
        "shards": [n for p in progress for n in p["shards"]],
        "tau": float(rule["value"]) if rule.get("mode") == "value" else None,
        "counts": {"prompts": sum(len(p["done_prompt_ids"]) for p in progress)},
    }


def open_dataset(root: str | Path, partial: bool = False) -> tuple[Any, dict]:
    """Open a data_gen output as a memory-mapped ``datasets.Dataset`` plus its manifest. ``partial``: also a
    folder still being made, as its snapshot (:func:`snapshot_manifest`; ``manifest["complete"]`` False), for
    readers that report on the prompts done so far (never for training)."""
    import datasets

    if partial and not (Path(root) / MANIFEST).is_file():
        manifest = snapshot_manifest(root)
    else:
        manifest = read_manifest(root)
    if not partial and not manifest.get("complete", False):
        raise RuntimeError(
            f"data folder '{root}' is incomplete (a data_gen run was interrupted): rerun data_gen with the "
            f"same config to finish it"
        )
    files = [str(p) for p in list_shards(root, manifest)]
    if not files:
        raise ValueError(f"data folder '{root}' has no records (0 shards): nothing to train on")
    ds = datasets.Dataset.from_parquet(files, keep_in_memory=False)
    return ds, manifest
