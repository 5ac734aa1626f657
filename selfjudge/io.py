"""Atomic writes, JSON helpers, run identities (what made an output) and the code version in every output.

One writer: :func:`atomic_path` (a temporary name in the same folder, fsync, then rename) and the helpers
built on it; :func:`atomic_folder` does the same for a whole folder. One run identity: :func:`identity`
(named config sections minus excluded keys, plus the hashes of input folders), hashed by :func:`config_hash`
and stamped into an output folder by :func:`write_marker` once the stage that wrote it has finished.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selfjudge import __version__


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error the file is fsynced and
    renamed to ``path`` (readers see the old file or the whole new one, never a part), else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``folder``; when the block ends without error it replaces ``folder``
    (an existing one is moved out of the way first and removed after), else it is removed."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    old = folder.parent / f".{folder.name}.old"
    try:
        yield tmp
        if old.exists():
            shutil.rmtree(old)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        _fsync_dir(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_jsonl_gz(path: str | os.PathLike, head: Mapping[str, Any], rows: list[Mapping[str, Any]]) -> bool:
    """A small committed file: a header line then one JSON line per row, gzipped without a timestamp (the same
    content gives the same bytes); written atomically and only when its content changed (returns whether)."""
    import gzip

    lines = [json.dumps(dict(head))] + [json.dumps(dict(r)) for r in rows]
    data = gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)
    if Path(path).is_file() and Path(path).read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True


def read_jsonl_gz(path: str | os.PathLike, fmt: str, key: str, what: str) -> tuple[dict, list[dict]]:
    """(header, rows) of a :func:`write_jsonl_gz` file whose header's ``format`` is ``fmt``; a missing file or
    another format is an error naming the config ``key`` that gave the path."""
    import gzip

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{key}: '{p}' does not exist")
    rows = [json.loads(x) for x in gzip.decompress(p.read_bytes()).decode().splitlines() if x.strip()]
    head = rows[0] if rows else {}
    if head.get("format") != fmt:
        raise ValueError(f"{key}: '{p}' is not {what} ({fmt})")
    return head, rows[1:]


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_hash(obj: Any) -> str:
    """Stable short hash of a JSON-able config, used to tell whether an output was made by it."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def folder_hash(folder: str | os.PathLike) -> str | None:
    """Content hash of a folder's files (relative names and bytes; hidden files left out); None if absent."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(
        p for p in folder.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.relative_to(folder).parts)
    ):
        h.update(str(f.relative_to(folder)).encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()[:16]


# Keys added after outputs were made with the behaviour of one value: left out of identities while they hold
# it, so those outputs keep their keys (a trained head is not retrained for a new option it does not use).
NEUTRAL: dict[str, dict[str, Any]] = {"train": {"features": None}}
# the same for the keys of a section's ``dataset`` (and of a mix's sources)
DATASET_NEUTRAL: dict[str, Any] = {"ids": []}


def neutral_dataset(ds: Any) -> Any:
    """A dataset config without the keys at their :data:`DATASET_NEUTRAL` value (its sources' too)."""
    if not isinstance(ds, Mapping):
        return ds
    out = {k: v for k, v in ds.items() if not (k in DATASET_NEUTRAL and v == DATASET_NEUTRAL[k])}
    if isinstance(out.get("sources"), list):
        out["sources"] = [neutral_dataset(s) for s in out["sources"]]
    return out


def identity(plain: Mapping[str, Any], sections: Mapping[str, tuple[str, ...]], **inputs: Any) -> dict:
    """What decides an output: each named config section minus its excluded keys (and keys at their
    :data:`NEUTRAL` value; its dataset's at :data:`DATASET_NEUTRAL`), plus ``inputs`` (the hashes of input
    folders, an earlier stage's key).
    ``sections``: {section: keys left out}. Hash it with :func:`config_hash`; every stage, and the pipeline,
    name their output this way."""
    out: dict[str, Any] = {}
    for sec, excluded in sections.items():
        val, neutral = plain.get(sec), NEUTRAL.get(sec, {})
        if isinstance(val, Mapping):
            val = {k: v for k, v in val.items() if k not in excluded and not (k in neutral and v == neutral[k])}
            if "dataset" in val:
                val["dataset"] = neutral_dataset(val["dataset"])
        out[sec] = val
    return {**out, **inputs}


MARKER = ".selfjudge-stage.json"  # in a stage's output folder once the stage finished: {"stage", "config_hash", ...}


def read_marker(folder: str | os.PathLike) -> dict | None:
    p = Path(folder) / MARKER
    return read_json(p) if p.is_file() else None


def write_marker(folder: str | os.PathLike, stage: str, key: str, **info: Any) -> None:
    write_json(Path(folder) / MARKER, {"stage": stage, "config_hash": key, **info})


def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        commit = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def check_writable(folder: str | os.PathLike, what: str) -> Path:
    """Create ``folder`` if needed and fail early, naming ``what``, if it cannot be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".writable.", delete=True)
        probe.close()
    except OSError as e:
        raise PermissionError(f"{what}: cannot write to '{folder}' ({e.strerror}); choose another folder") from e
    return folder


def stop_process(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """Stop a child that is still running: SIGTERM (a launcher passes it on to its ranks), then SIGKILL after
    ``grace`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


BARRIER_TIMEOUT = datetime.timedelta(days=7)


def ranks() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; a gloo group (for barriers only) when there are several."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        # a rank that finished waits at a barrier for the slowest one, which may decode for hours (the default
        # 30 min timeout stopped a whole eval); a rank that dies ends the job through torchrun, not this timeout
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return rank, world


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
