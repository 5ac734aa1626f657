"""One writer per output folder and per cache entry: advisory file locks (``filelock``, ``flock`` on POSIX).

The lock file sits *beside* the folder it guards (``.<name>.selfjudge-lock``), so that renaming the
folder aside or deleting it never frees the lock while its holder runs. The holder writes who it is
(pid, host, command, since when) to ``.<name>.selfjudge-lock.json``; a second run on the same folder
is refused with that information, or waits for it when ``SELFJUDGE_LOCK_WAIT`` (seconds; ``inf`` for
no limit) says so. The kernel drops the lock when its holder dies (even by ``kill -9``): a lock is
never stale.

Stages take the lock with ``@stage_lock(...)`` on their ``run``; under ``torchrun`` rank 0 holds it for
the whole job (the other ranks write only after a barrier that follows rank 0's start).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from selfjudge.io import check_writable, read_json, write_json

log = logging.getLogger(__name__)

WAIT_ENV = "SELFJUDGE_LOCK_WAIT"


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock."""


def lock_paths(folder: str | os.PathLike) -> tuple[Path, Path]:
    """(lock file, holder info file) of ``folder``: beside it, or inside it when its parent is read-only."""
    folder = Path(folder).absolute()
    parent = folder.parent
    if not os.access(parent, os.W_OK) and folder.is_dir():
        base = folder / ".selfjudge-lock"
    else:
        base = parent / f".{folder.name}.selfjudge-lock"
    return base, base.with_name(base.name + ".json")


def env_wait() -> float:
    """Seconds to wait for a busy folder, from ``SELFJUDGE_LOCK_WAIT`` (unset or 0: refuse at once)."""
    raw = os.environ.get(WAIT_ENV, "0").strip().lower()
    try:
        value = math.inf if raw in ("inf", "forever", "-1") else float(raw)
    except ValueError:
        raise ValueError(
            f"{WAIT_ENV}={raw!r}: give seconds to wait for a busy folder (0: refuse, inf: no limit)"
        ) from None
    return value if value >= 0 else math.inf


def _holder(info: Path) -> str:
    try:
        h = read_json(info)
    except (OSError, ValueError):
        return "another process (it has not said who it is yet)"
    return f"pid {h.get('pid')} on host {h.get('host')}, command '{h.get('command')}', since {h.get('since')}"


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str, wait: float | None = None) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block; ``what`` names the setting in messages (e.g. ``eval.output_dir``).

    ``wait``: seconds to wait for another holder (None: from ``SELFJUDGE_LOCK_WAIT``; ``math.inf``: no
    limit). Raises :class:`FolderBusy`, naming the holder, when the folder stays busy.
    """
    lock_file, info = lock_paths(folder)
    check_writable(lock_file.parent, what)
    wait = env_wait() if wait is None else wait
    lock = FileLock(str(lock_file), is_singleton=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if wait <= 0:
            raise FolderBusy(
                f"{what} '{folder}' is in use by {_holder(info)}: wait for that run to finish (or stop it), "
                f"choose another folder, or set {WAIT_ENV}=<seconds> to wait for it"
            ) from None
        log.warning("%s '%s' is in use by %s; waiting for it", what, folder, _holder(info))
        try:
            lock.acquire(timeout=-1 if math.isinf(wait) else wait)
        except Timeout:
            raise FolderBusy(
                f"{what} '{folder}' is still in use by {_holder(info)} after {wait:g} s "
                f"({WAIT_ENV}); try again later or choose another folder"
            ) from None
    try:
        write_json(
            info,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": shlex.join(sys.argv),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "folder": str(folder),
            },
        )
        yield lock_file
    finally:
        info.unlink(missing_ok=True)
        lock.release()


def stage_lock(folder_of: Callable[[Any], Any], what: str) -> Callable:
    """Decorator for a stage's ``run(cfg, ...)``: hold the lock of ``folder_of(cfg)`` while it runs (rank 0)."""

    def wrap(run: Callable) -> Callable:
        @functools.wraps(run)
        def locked(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            if int(os.environ.get("RANK", "0")) != 0:
                return run(cfg, *args, **kwargs)
            with folder_lock(str(folder_of(cfg)), what):
                return run(cfg, *args, **kwargs)

        return locked

    return wrap
