"""Generated code runs in another process: pass/fail by exit status, time and memory limits, isolation."""

from __future__ import annotations

import os
import time

import pytest

from selfjudge.code_exec import run_program


def test_passing_and_failing_programs():
    ok = run_program("print(6 * 7)\n", timeout=10)
    assert ok.passed and not ok.timed_out and ok.returncode == 0
    assert ok.output.strip() == "42"
    bad = run_program("assert 1 == 2, 'nope'\n", timeout=10)
    assert not bad.passed and not bad.timed_out and bad.returncode == 1
    assert "AssertionError: nope" in bad.output
    syntax = run_program("def f(:\n", timeout=10)
    assert not syntax.passed and "SyntaxError" in syntax.output


def test_infinite_loop_times_out_without_hanging_the_caller():
    t0 = time.monotonic()
    res = run_program("while True:\n    pass\n", timeout=1.0)
    assert res.timed_out and not res.passed and res.returncode is None
    assert time.monotonic() - t0 < 8


def test_timeout_kills_processes_the_program_started():
    src = (
        "import subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print(p.pid, flush=True)\n"
        "p.wait()\n"
    )
    res = run_program(src, timeout=2.0)
    assert res.timed_out
    pid = int(res.output.split()[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"grandchild {pid} survived the timeout")


def test_memory_limit_stops_a_runaway_allocation():
    res = run_program("x = bytearray(1 << 31)\nprint('allocated')\n", timeout=10, memory_mb=512)
    assert not res.passed and not res.timed_out
    assert "MemoryError" in res.output and "allocated" not in res.output


def test_child_is_isolated_from_caller_environment_and_folder(monkeypatch):
    monkeypatch.setenv("SELFJUDGE_SECRET_TEST_VAR", "x")
    src = (
        "import os, sys\n"
        "assert 'SELFJUDGE_SECRET_TEST_VAR' not in os.environ\n"
        "assert not os.path.exists('pyproject.toml')\n"
        "assert sys.flags.isolated == 1\n"
        "open('scratch.txt', 'w').write('ok')\n"
    )
    res = run_program(src, timeout=10)
    assert res.passed, res.output


def test_bad_timeout_is_an_error():
    with pytest.raises(ValueError, match="timeout"):
        run_program("pass\n", timeout=0)
