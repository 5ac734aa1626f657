"""Run generated code against tests in a separate, time-limited process (never in the caller)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass


@dataclass
class ExecResult:
    passed: bool
    timed_out: bool
    output: str


def _limits() -> None:  # runs in the child before exec
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # 2 GiB of address space
        resource.setrlimit(resource.RLIMIT_FSIZE, (10 << 20, 10 << 20))  # 10 MiB files
    except (ImportError, ValueError, OSError):
        pass


def run_program(source: str, timeout: float = 10.0) -> ExecResult:
    """Execute ``source`` with ``python -I`` in a temporary folder; pass = exit code 0 within ``timeout``."""
    with tempfile.TemporaryDirectory(prefix="selfjudge-exec-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        try:
            proc = subprocess.run(
                [sys.executable, "-I", path], cwd=tmp, capture_output=True, text=True, timeout=timeout,
                preexec_fn=_limits if os.name == "posix" else None, env={"PATH": os.environ.get("PATH", "")},
            )
        except subprocess.TimeoutExpired:
            return ExecResult(False, True, "timeout")
        return ExecResult(proc.returncode == 0, False, (proc.stdout + proc.stderr)[-2000:])


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program that checks a HumanEval completion: prompt + completion + tests + check(entry)."""
    body = completion if f"def {entry_point}" in completion else prompt + completion
    return f"{body}\n\n{test}\n\ncheck({entry_point})\n"
