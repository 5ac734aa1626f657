"""Run generated code in a separate, time-limited process (never in the evaluating process).

``run_program`` writes the source to a fresh temporary folder and runs ``python -I`` there (isolated
mode: no user site, no PYTHON* variables, script folder not trusted) in its own session, with a
minimal environment and, on POSIX, limits on address space, CPU time, file size and core dumps. On
timeout the whole process group is killed. This guards against hangs and runaway memory, not against
malicious code: run untrusted models inside a container.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ExecResult:
    passed: bool        # exit status 0 within the time limit
    timed_out: bool     # killed at the time limit
    returncode: int | None
    output: str         # the last 2,000 characters of stdout + stderr


def _limit_child(timeout: float, memory_mb: int) -> None:
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


def run_program(source: str, timeout: float = 10.0, memory_mb: int = 2048) -> ExecResult:
    """Execute ``source`` as a script with ``python -I`` in a temporary folder; pass = exit 0 in time."""
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    with tempfile.TemporaryDirectory(prefix="selfjudge-exec-") as tmp:
        prog = Path(tmp) / "program.py"
        prog.write_text(source, encoding="utf-8")
        log_path = Path(tmp) / "output.txt"
        env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
               "HOME": tmp, "TMPDIR": tmp}
        posix = os.name == "posix"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-I", str(prog)], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=posix,
                preexec_fn=(lambda: _limit_child(timeout, memory_mb)) if posix else None,
            )
            try:
                code: int | None = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out, code = True, None
                if posix:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it started
                    except ProcessLookupError:
                        pass
                else:
                    proc.kill()
                proc.wait()
        output = log_path.read_bytes()[-4000:].decode("utf-8", errors="replace")[-2000:]
    return ExecResult(passed=code == 0 and not timed_out, timed_out=timed_out, returncode=code,
                      output=output + ("\n[timeout]" if timed_out else ""))
