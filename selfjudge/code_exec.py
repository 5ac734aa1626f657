"""Run generated code in a separate, isolated, time-limited process (never in the evaluating process).

``run_program`` writes the source to a fresh temporary folder and runs ``python -I`` there (isolated
mode: no user site, no PYTHON* variables, script folder not trusted) with a minimal environment, its
own session, and limits on CPU time, address space, file size, processes and core dumps.

- **Pass**: exit status 0 *and* a random sentinel, printed by a line appended after the program, in
  its output. A program that leaves early (``sys.exit(0)`` before its asserts) does not pass.
- **Isolation** (:func:`isolation`, the first that works on this machine): ``bwrap`` (bubblewrap: no
  network, private process/IPC namespaces, the whole file system read-only except the program's
  folder, which is also its home), else ``unshare`` (no network, private process namespace; the file
  system stays writable), else ``rlimits-only``. ``SELFJUDGE_CODE_ISOLATION`` forces one.
- **Cleanup**: after every run (pass, fail or timeout) the whole process group is killed, and so is
  every process that still carries the run's token in its environment (children that left the group
  with ``setsid``); in a process namespace the kernel kills them all when its first process ends.

Isolation lowers the risk of running model output; it is not a security boundary against code written
to escape: evaluate untrusted models inside a container or VM as well.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ISOLATIONS = ("bwrap", "unshare", "rlimits-only")
_TOKEN_VAR = "SELFJUDGE_EXEC_TOKEN"


@dataclass
class ExecResult:
    passed: bool  # exit status 0, in time, and the sentinel after the program was printed
    timed_out: bool  # killed at the time limit
    returncode: int | None
    output: str  # the last 2,000 characters of stdout + stderr (sentinel removed)
    isolation: str = "rlimits-only"  # bwrap | unshare | rlimits-only


def _bwrap_prefix(folder: str) -> list[str]:
    return [
        "bwrap",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--bind",
        folder,
        folder,
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--chdir",
        folder,
    ]


def _unshare_prefix(folder: str) -> list[str]:
    del folder
    return [
        "unshare",
        "--user",
        "--map-root-user",
        "--net",
        "--pid",
        "--mount",
        "--fork",
        "--kill-child",
        "--mount-proc",
    ]


_PREFIXES = {"bwrap": _bwrap_prefix, "unshare": _unshare_prefix, "rlimits-only": lambda folder: []}


def _works(kind: str) -> bool:
    """Whether ``kind`` can start a Python here (user namespaces may be refused inside containers)."""
    if kind != "rlimits-only" and shutil.which(kind) is None:
        return False
    with tempfile.TemporaryDirectory(prefix="selfjudge-probe-") as tmp:
        try:
            out = subprocess.run(
                [*_PREFIXES[kind](tmp), sys.executable, "-I", "-c", "print('ok')"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.SubprocessError):
            return False
    return out.returncode == 0 and out.stdout.strip() == "ok"


@functools.cache
def isolation() -> str:
    """The isolation generated code runs under here: bwrap, unshare or rlimits-only (probed once)."""
    forced = os.environ.get("SELFJUDGE_CODE_ISOLATION")
    if forced:
        if forced not in ISOLATIONS:
            raise ValueError(f"SELFJUDGE_CODE_ISOLATION={forced!r}: choose one of {ISOLATIONS}")
        if not _works(forced):
            raise RuntimeError(
                f"SELFJUDGE_CODE_ISOLATION={forced} does not work on this machine "
                f"(install bubblewrap, or allow user namespaces)"
            )
        return forced
    return next(k for k in ISOLATIONS if _works(k))


def _user_processes() -> int:
    uid, n = os.getuid(), 0
    for p in Path("/proc").iterdir():
        try:
            n += p.name.isdigit() and p.stat().st_uid == uid
        except OSError:
            pass
    return n


def _limit_child(timeout: float, memory_mb: int, nproc: int) -> None:
    """Resource limits applied in the child between fork and exec (POSIX only)."""
    import resource

    def cap(kind: int, value: int) -> None:
        soft, hard = resource.getrlimit(kind)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(kind, (value, value))

    cap(resource.RLIMIT_AS, memory_mb << 20)
    cap(resource.RLIMIT_CPU, int(timeout) + 2)
    cap(resource.RLIMIT_FSIZE, 16 << 20)
    cap(resource.RLIMIT_CORE, 0)
    cap(resource.RLIMIT_NPROC, nproc)  # counts the user's processes; not enforced for root


def _kill_all(pgid: int, token: str) -> None:
    """SIGKILL the process group and every process whose environment carries ``token``."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    needle = f"{_TOKEN_VAR}={token}".encode()
    for _ in range(5):  # again while some are found: one may have forked during the sweep
        found = 0
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == os.getpid():
                continue
            try:
                if needle in (p / "environ").read_bytes().split(b"\0"):
                    os.kill(int(p.name), signal.SIGKILL)
                    found += 1
            except (OSError, ValueError):
                continue
        if not found:
            return
        time.sleep(0.05)


def run_program(source: str, timeout: float = 10.0, memory_mb: int = 2048) -> ExecResult:
    """Execute ``source`` with ``python -I`` in a temporary folder, isolated; pass = ran to its end, exit 0."""
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    posix = os.name == "posix"
    kind = isolation() if posix else "rlimits-only"
    token = secrets.token_hex(16)
    sentinel = f"SELFJUDGE-RAN-TO-END-{token}"
    # reached only when every line of the program (its tests included) ran; os.write: not print (may be replaced)
    tail = (
        f"\n\n# selfjudge: reached only when everything above ran\nimport os as _sj_os, sys as _sj_sys\n"
        f"_sj_sys.stdout.flush(); _sj_sys.stderr.flush()\n_sj_os.write(1, b'\\n{sentinel}\\n')\n"
    )
    with tempfile.TemporaryDirectory(prefix="selfjudge-exec-") as tmp:
        prog = Path(tmp) / "program.py"
        prog.write_text(source + tail, encoding="utf-8")
        log_path = Path(tmp) / "output.txt"
        env = {
            "PATH": os.environ.get("PATH", ""),
            "OMP_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": tmp,
            "TMPDIR": tmp,
            _TOKEN_VAR: token,
        }
        nproc = _user_processes() + 256 if posix else 0
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [*_PREFIXES[kind](tmp), sys.executable, "-I", str(prog)],
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=posix,
                preexec_fn=(lambda: _limit_child(timeout, memory_mb, nproc)) if posix else None,
            )
            try:
                code: int | None = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out, code = True, None
            if posix:
                _kill_all(proc.pid, token)  # always: children it left behind die with it
            else:
                proc.kill()
            proc.wait()
        raw = log_path.read_bytes()
    ran_to_end = f"\n{sentinel}\n".encode() in raw
    text = raw.replace(f"\n{sentinel}\n".encode(), b"")[-4000:].decode("utf-8", errors="replace")[-2000:]
    return ExecResult(
        passed=code == 0 and ran_to_end and not timed_out,
        timed_out=timed_out,
        returncode=code,
        output=text + ("\n[timeout]" if timed_out else ""),
        isolation=kind,
    )
