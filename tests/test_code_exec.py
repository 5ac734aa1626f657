"""Generated code runs in another process: pass/fail by a sentinel after the program, time and memory limits, isolation."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

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


def _running(tag: str) -> list[int]:
    """Host pids of live (not zombie) processes whose command line holds ``tag``."""
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if (
                p.name.isdigit()
                and tag.encode() in (p / "cmdline").read_bytes()
                and (p / "stat").read_text().rsplit(") ", 1)[1][0] != "Z"
            ):
                pids.append(int(p.name))
        except (OSError, IndexError):
            continue
    return pids


def _gone(tag: str, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while _running(tag):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_timeout_kills_processes_the_program_started():
    tag = f"selfjudge-test-{os.getpid()}-{time.time_ns()}"
    src = (
        "import subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', {tag!r}])\n"
        "print(p.pid, flush=True)\n"
        "p.wait()\n"
    )
    res = run_program(src, timeout=2.0)
    assert res.timed_out
    assert _gone(tag), f"grandchild {_running(tag)} survived the timeout"


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


def test_exit_zero_before_the_tests_is_not_a_pass():
    # generated code that leaves before its asserts ran: exit status 0, but the tests never ran
    res = run_program("import sys\nsys.exit(0)\nassert 1 == 2\n", timeout=10)
    assert res.returncode == 0 and not res.passed
    res = run_program("import os\nos._exit(0)\n", timeout=10)
    assert res.returncode == 0 and not res.passed
    # printing something that looks like a pass does not help: the sentinel is random per run
    res = run_program("print('SELFJUDGE-PASS')\nimport sys\nsys.exit(0)\n", timeout=10)
    assert not res.passed


def test_hostile_program_is_blocked_or_killed(tmp_path):
    """Network, a write outside its folder and a background child that leaves the process group."""
    from selfjudge.code_exec import isolation

    outside = tmp_path / "outside.txt"
    tag = f"selfjudge-test-{os.getpid()}-{time.time_ns()}"
    src = textwrap.dedent(f"""\
        import os, socket, subprocess, sys, time
        try:
            socket.create_connection(('1.1.1.1', 53), timeout=2).close()
            print('NET:open', flush=True)
        except OSError as e:
            print('NET:blocked', type(e).__name__, flush=True)
        try:
            open({str(outside)!r}, 'w').write('escaped')
            print('WRITE:done', flush=True)
        except OSError as e:
            print('WRITE:blocked', type(e).__name__, flush=True)
        # children that outlive the program: one in its own session (out of the process group), one forked
        p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', {tag!r}], start_new_session=True)
        pid = os.fork()
        if pid == 0:
            os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(600)', {tag!r}])
        time.sleep(0.3)
        print('CHILD', p.pid, pid, flush=True)
        """)
    res = run_program(src, timeout=20)
    assert res.passed, res.output
    assert res.isolation == isolation()
    assert "CHILD" in res.output
    assert _gone(tag), f"background children {_running(tag)} survived the run"
    if res.isolation == "rlimits-only":
        pytest.skip(
            "no isolation tool works here (bwrap / unshare missing or refused): network and writes "
            "outside the folder are not blocked; process-group kill and rlimits checked above"
        )
    assert "NET:blocked" in res.output
    if res.isolation == "unshare":
        pytest.skip("unshare isolates network and processes, not the file system: install bubblewrap (bwrap)")
    assert "WRITE:blocked" in res.output or "WRITE:done" in res.output
    assert not outside.exists(), "a write outside the program's folder reached the host"
