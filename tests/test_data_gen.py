"""The data_gen stage on the tiny pair: records and manifest, resume after a kill, ranks, bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_module

from selfjudge import shards
from selfjudge.data_gen.stage import run
from selfjudge.models import VocabMismatch, pair_from_mapping
from selfjudge.scoring import score_response_naive

REPO = Path(__file__).resolve().parent.parent
SMALL = [
    "data_gen.max_new_tokens=16",
    "data_gen.window=6",
    "data_gen.batch_size=3",
    "data_gen.shard_size=40",
    "data_gen.dataset.limit=7",
]


def _overrides(out: Path, cache_dir: Path, *extra: str) -> list[str]:
    return ["experiment=tiny", f"run_dir={out}", f"model.cache_dir={cache_dir}", "logger=none", *SMALL, *extra]


def _cfg(out: Path, cache_dir: Path, *extra: str):
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        return compose("selfjudge", overrides=_overrides(out, cache_dir, *extra))


def _records(data: Path) -> list[dict]:
    """All rows of a finished folder, in a canonical order (prompt, position, substituted)."""
    man = shards.read_manifest(data)
    assert man["complete"]
    rows = [r for p in shards.list_shards(data, man) for r in pq.read_table(p).to_pylist()]
    return sorted(rows, key=lambda r: (r["prompt_id"], r["position"], r["substituted"]))


def _same_records(a: list[dict], b: list[dict], exact: bool = True) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for k in x:
            if k in ("orig", "alt", "ld", "features") and not exact:
                # features are stored in float16: a last-bit difference in fp32 can round to the next float16
                # (one ulp, 2**-10 relative), so they get that much beside the absolute tolerance
                rtol = 2**-10 if k == "features" else 0
                np.testing.assert_allclose(
                    np.asarray(x[k], float), np.asarray(y[k], float), rtol=rtol, atol=1e-4, equal_nan=True
                )
            elif k == "ld":
                assert (x[k] == y[k]) or (np.isnan(x[k]) and np.isnan(y[k]))
            else:
                assert x[k] == y[k], k


def test_records_manifest_and_scores(tmp_path, cache_dir, tiny_pair):
    # the paper's layout (the state at i), which the naive oracle below computes; tests/test_features.py checks
    # the default layout (states at i-1 and i, scalars) against its definitions
    paper = ("data_gen.features.state_offsets=[0]", "data_gen.features.scalars=[]")
    out = run(_cfg(tmp_path, cache_dir, "data_gen.feature_dtype=float32", *paper))
    data = tmp_path / "data"
    man = shards.read_manifest(data)
    rows = _records(data)
    assert len(man["shards"]) >= 2 and out["counts"] == man["counts"]
    c = man["counts"]
    assert c["prompts"] == c["responses"] == 7 and c["records"] == len(rows) == 2 * c["mismatches"] > 0
    assert 0 < c["response_tokens"] <= 7 * 16
    assert man["feature_dim"] == 64 and man["features"] == {
        "layers": [-1],
        "include_draft": False,
        "state_offsets": [0],
        "scalars": [],
    }
    assert man["runtime"]["dtype"] == "float32" and man["runtime"]["cpu_kernels"]["target"] in ("default", "onednn")
    assert man["target_model"]["fingerprint"] and man["tokenizer"]["len"] == len(tiny_pair.tokenizer)
    assert man["tau_rule"]["mode"] == "quantile" and sum(man["ld_histogram"]["counts"]) == c["mismatches"]
    assert len(man["ld_histogram"]["bins"]) == len(man["ld_histogram"]["counts"]) + 1
    sub = [r for r in rows if r["substituted"]]
    neg = [r for r in rows if not r["substituted"]]
    assert c["positives"] == sum(r["label"] for r in sub) and man["positive_rate"] == pytest.approx(
        c["positives"] / len(sub)
    )
    assert all(r["label"] == int(r["ld"] > man["tau"]) for r in sub)
    assert all(r["label"] == 0 and np.isnan(r["ld"]) and r["autojudge_label"] == -1 for r in neg)
    assert all(len(r["features"]) == 64 for r in rows)
    # the records equal the naive oracle on the stored prompt/response (window 6)
    by_prompt = {}
    for r in sub:
        by_prompt.setdefault(r["prompt_id"], (r["prompt_ids"], r["response_ids"], []))[2].append(r)
    for prompt, resp, rs in by_prompt.values():
        ref = score_response_naive(tiny_pair.target, tiny_pair.draft, prompt, resp, tiny_pair.vocab_size, window=6)
        assert [r["position"] for r in rs] == ref.positions.tolist()
        assert [r["draft_token"] for r in rs] == ref.draft_tokens.tolist()
        np.testing.assert_allclose([r["ld"] for r in rs], ref.ld.numpy(), atol=1e-5)
        np.testing.assert_allclose([r["features"] for r in rs], ref.sub_features.numpy(), atol=1e-4)
    # responses are the target's greedy responses, stopped at max_new_tokens
    r0 = rows[0]
    ref = tiny_pair.target.generate(torch.tensor([r0["prompt_ids"]]), max_new_tokens=16, do_sample=False)
    assert r0["response_ids"] == ref[0, len(r0["prompt_ids"]) :].tolist()[: len(r0["response_ids"])]


def test_killed_and_resumed_equals_uninterrupted(tmp_path, cache_dir):
    full = tmp_path / "full"
    run(_cfg(full, cache_dir))

    class Killed(RuntimeError):
        pass

    def kill(index: int) -> None:
        raise Killed(f"simulated kill after shard {index}")

    part = tmp_path / "part"
    with pytest.raises(Killed):
        run(_cfg(part, cache_dir), after_shard=kill)
    assert not (part / "data" / "manifest.json").exists()  # nothing that looks complete
    progress = shards.read_progress(part / "data", 0)
    assert len(progress["shards"]) == 1 and 0 < len(progress["done_prompt_ids"]) < 7
    resumed = run(_cfg(part, cache_dir))
    assert resumed["rank_stats"]["prompts_this_run"] == 7 - len(progress["done_prompt_ids"])
    _same_records(_records(full / "data"), _records(part / "data"))
    a, b = (json.loads((p / "data" / "manifest.json").read_text()) for p in (full, part))
    assert a["counts"] == b["counts"] and a["tau"] == b["tau"] and a["shards"] == b["shards"]
    again = run(_cfg(part, cache_dir))  # a finished folder: nothing to redo
    assert again["rank_stats"]["prompts_this_run"] == 0 and again["counts"] == a["counts"]


def test_a_stopped_run_resumes_with_another_number_of_ranks(tmp_path, cache_dir, monkeypatch):
    """One rank stopped after its first shard; resumed by two ranks (in turn here, as torchrun's would between
    the barriers): the batches not done are dealt out again whole, nothing twice, nothing lost, the very
    records of the uninterrupted one-rank run (the same batches, so equal to the bit)."""
    from selfjudge.data_gen import stage

    full = tmp_path / "full"
    run(_cfg(full, cache_dir))

    def kill(index: int) -> None:
        raise KeyboardInterrupt

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(part, cache_dir, "data_gen.shard_prompts=3"), after_shard=kill)
    first = shards.read_progress(part / "data", 0)["done_prompt_ids"]
    assert len(first) == 3  # one batch
    monkeypatch.setattr(stage, "barrier", lambda world: None)
    monkeypatch.setattr(stage, "ranks", lambda: (0, 2))
    with pytest.raises(RuntimeError, match=r"ranks \[1\] have not finished"):  # rank 0's half done, rank 1's not
        run(_cfg(part, cache_dir, "data_gen.shard_prompts=3"))
    stamp = json.loads((part / "data" / "config_stamp.json").read_text())
    assert (
        stamp["world_size"] == 2 and len(set(stamp["pending"]) | set(first)) == len(stamp["pending"]) + len(first) == 7
    )
    monkeypatch.setattr(stage, "ranks", lambda: (1, 2))
    one = run(_cfg(part, cache_dir, "data_gen.shard_prompts=3"))["rank_stats"]
    assert one["prompts"] == 1 == one["prompts_this_run"]  # batches of 3, 3, 1: rank 1 takes the second left
    monkeypatch.setattr(stage, "ranks", lambda: (0, 2))
    done = run(_cfg(part, cache_dir, "data_gen.shard_prompts=3"))  # rank 0 again: nothing left, finalize
    assert done["rank_stats"]["prompts_this_run"] == 0 and done["counts"]["prompts"] == 7
    _same_records(_records(full / "data"), _records(part / "data"))
    man = shards.read_manifest(part / "data")
    assert man["world_size"] == 2 and {n[:7] for n in man["shards"]} == {"rank000", "rank001"}
    assert man["counts"] == shards.read_manifest(full / "data")["counts"]
    assert man["tau"] == shards.read_manifest(full / "data")["tau"]
    # back to one rank on the finished folder: nothing to redo
    monkeypatch.setattr(stage, "ranks", lambda: (0, 1))
    assert run(_cfg(part, cache_dir, "data_gen.shard_prompts=3"))["rank_stats"]["prompts_this_run"] == 0


def test_a_stopped_run_deals_its_unfinished_batches_out_again(tmp_path, cache_dir, monkeypatch):
    """Two ranks, batches of one prompt (7 batches: rank 0 takes 4, rank 1 takes 3); rank 0 stopped after 3, rank 1
    never started. Resumed with the same two ranks, the 4 batches left are dealt out again, 2 each (kept, rank 0 would
    have 1 and rank 1 all 3, so rank 0 would idle); the records equal an uninterrupted one-rank run's."""
    from selfjudge.data_gen import stage

    extra = ("data_gen.batch_size=1", "data_gen.shard_prompts=1")
    full = tmp_path / "full"
    run(_cfg(full, cache_dir, *extra))
    written = []

    def kill(index: int) -> None:
        written.append(index)
        if len(written) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(stage, "barrier", lambda world: None)
    monkeypatch.setattr(stage, "ranks", lambda: (0, 2))
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(part, cache_dir, *extra), after_shard=kill)
    assert len(shards.read_progress(part / "data", 0)["done_prompt_ids"]) == 3
    with pytest.raises(RuntimeError, match=r"ranks \[1\] have not finished"):  # rank 0 takes 2 of the 4 left
        run(_cfg(part, cache_dir, *extra))
    assert len(shards.read_progress(part / "data", 0)["done_prompt_ids"]) == 5
    assert len(json.loads((part / "data" / "config_stamp.json").read_text())["pending"]) == 4
    monkeypatch.setattr(stage, "ranks", lambda: (1, 2))
    assert run(_cfg(part, cache_dir, *extra))["rank_stats"]["prompts_this_run"] == 2
    monkeypatch.setattr(stage, "ranks", lambda: (0, 2))
    done = run(_cfg(part, cache_dir, *extra))  # nothing left: no new dealing (rank 1's done mark stays), finalize
    assert done["rank_stats"]["prompts_this_run"] == 0 and done["counts"]["prompts"] == 7
    _same_records(_records(full / "data"), _records(part / "data"))


def test_ranks_take_whole_batches_of_the_one_rank_cut():
    from selfjudge.labelling import rank_batches

    lengths = [5, 1, 4, 1, 9, 2, 7]  # one rank's batches of 3: by length, ties by index
    one = rank_batches(lengths, 3, 0, 1)
    assert one == [[1, 3, 5], [2, 0, 6], [4]]
    assert [rank_batches(lengths, 3, r, 2) for r in (0, 1)] == [[one[0], one[2]], [one[1]]]
    assert rank_batches(lengths, 3, 3, 4) == []  # more ranks than batches: one waits
    # a new layout keeps what is left of each batch: whole batches stay whole, a partly done one shrinks
    assert rank_batches(lengths, 3, 0, 1, pending=[2, 0, 6, 4]) == [[2, 0, 6], [4]]
    assert rank_batches(lengths, 3, 1, 2, pending=[3, 2, 0, 6, 4]) == [[2, 0, 6]]
    assert rank_batches(lengths, 3, 0, 1, pending=[]) == []


def test_finalize_refuses_a_folder_that_misses_or_repeats_prompts(tmp_path):
    from selfjudge.io import write_json
    from selfjudge.labelling import finalize

    d = tmp_path / "data"
    shards.write_progress(d, 0, {"shards": [], "done_prompt_ids": ["p0", "p1"], "response_tokens": 0})
    shards.write_progress(d, 1, {"shards": [], "done_prompt_ids": ["p1"], "response_tokens": 0})
    write_json(d / "shards" / "rank000.done.json", {})
    for expected, says in ((["p0", "p1", "p2"], "1 missing, 1 twice"), (["p0", "p1"], "0 missing, 1 twice")):
        with pytest.raises(RuntimeError, match=f"covers 2 of {len(expected)} prompts \\({says}\\): not finalized"):
            finalize(d, 1, None, {}, expected)
    assert not (d / "manifest.json").exists()


def test_shard_prompts_closes_shards_early_and_keeps_the_key(tmp_path, cache_dir):
    """data_gen.shard_prompts closes a shard after that many prompts (whole batches) although shard_size is not
    reached; the records are those of a run without it, and a folder made with one value resumes with another
    (it is not in the config key)."""
    big = "data_gen.shard_size=100000"
    a = run(_cfg(tmp_path / "a", cache_dir, big, "data_gen.shard_prompts=0"))
    b = run(_cfg(tmp_path / "b", cache_dir, big, "data_gen.shard_prompts=3"))
    na, nb = (len(shards.read_manifest(tmp_path / x / "data")["shards"]) for x in "ab")
    assert na == 1 and nb == 3  # 7 prompts in batches of 3: shards after 3, 6 and 7 prompts
    _same_records(_records(tmp_path / "a" / "data"), _records(tmp_path / "b" / "data"))
    assert a["counts"] == b["counts"]
    again = run(_cfg(tmp_path / "b", cache_dir, big, "data_gen.shard_prompts=5"))
    assert again["rank_stats"]["prompts_this_run"] == 0
    with pytest.raises(ValueError, match="data_gen.shard_prompts"):
        run(_cfg(tmp_path / "c", cache_dir, "data_gen.shard_prompts=-1"))


def test_value_tau_and_max_logprob(tmp_path, cache_dir):
    run(
        _cfg(
            tmp_path,
            cache_dir,
            "data_gen.tau.mode=value",
            "data_gen.tau.value=0.3",
            "data_gen.score_variant=max_logprob",
            "data_gen.scorer=naive",
        )
    )
    man = shards.read_manifest(tmp_path / "data")
    sub = [r for r in _records(tmp_path / "data") if r["substituted"]]
    assert man["tau"] == 0.3 and man["score_variant"] == "max_logprob"
    assert [r["label"] for r in sub] == [int(r["ld"] > 0.3) for r in sub]


def test_bad_input(tmp_path, cache_dir, tiny_model_cfg):
    with pytest.raises(ValueError, match="data_gen.max_prompt_tokens"):
        run(_cfg(tmp_path / "a", cache_dir, "data_gen.max_prompt_tokens=8"))
    assert not (tmp_path / "a" / "data").exists()  # failed before writing anything
    with pytest.raises(ValueError, match="max_new_tokens=4000.*context of 2048"):
        run(_cfg(tmp_path / "a", cache_dir, "data_gen.max_new_tokens=4000"))
    with pytest.raises(ValueError, match="dataset.no_such_key"):
        run(_cfg(tmp_path / "a", cache_dir, "+data_gen.dataset.no_such_key=1"))
    with pytest.raises(ValueError, match="data_gen.score_variant"):
        run(_cfg(tmp_path / "a", cache_dir, "data_gen.score_variant=mean"))
    with pytest.raises(ValueError, match="data_gen.autojudge.mode"):
        run(_cfg(tmp_path / "a", cache_dir, "data_gen.autojudge.mode=random"))
    other = pair_from_mapping({**tiny_model_cfg, "tiny": {**tiny_model_cfg["tiny"], "vocab_size": 400}})
    with pytest.raises(VocabMismatch, match="do not share a tokenizer"):
        run(_cfg(tmp_path / "a", cache_dir, "model.draft.source=local", f"model.draft.name={other.draft_info.folder}"))
    assert not (tmp_path / "a" / "data").exists()
    run(_cfg(tmp_path / "b", cache_dir, "data_gen.dataset.limit=2"))
    with pytest.raises(FileExistsError, match="different config.*data_gen.overwrite=true"):
        run(_cfg(tmp_path / "b", cache_dir, "data_gen.dataset.limit=2", "data_gen.window=3"))
    out = run(
        _cfg(tmp_path / "b", cache_dir, "data_gen.dataset.limit=2", "data_gen.window=3", "data_gen.overwrite=true")
    )
    assert shards.read_manifest(tmp_path / "b" / "data")["window"] == 3 and out["counts"]["prompts"] == 2
    (tmp_path / "c" / "data").mkdir(parents=True)
    (tmp_path / "c" / "data" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a data_gen output"):
        run(_cfg(tmp_path / "c", cache_dir, "data_gen.overwrite=true"))
    assert (tmp_path / "c" / "data" / "notes.txt").is_file()


def test_empty_prompt_set(tiny_pair):
    from selfjudge import labelling
    from selfjudge.tasks import build_task

    task = build_task({"name": "gsm_symbolic", "limit": 1})
    with pytest.raises(ValueError, match="data_gen.dataset gave no prompts"):
        labelling.tokenize_examples(tiny_pair, task, [], None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, out: Path, cache_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "selfjudge.data_gen.main",
        *_overrides(out, cache_dir, *extra),
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path, cache_dir):
    run(_cfg(tmp_path / "one", cache_dir))
    _torchrun(tmp_path, tmp_path / "two", cache_dir)
    man = shards.read_manifest(tmp_path / "two" / "data")
    assert man["world_size"] == 2 and {n[:7] for n in man["shards"]} == {"rank000", "rank001"}
    _same_records(_records(tmp_path / "one" / "data"), _records(tmp_path / "two" / "data"), exact=False)
    one = shards.read_manifest(tmp_path / "one" / "data")
    assert man["counts"] == one["counts"] and man["tau"] == pytest.approx(one["tau"], abs=1e-5)

    # a one-rank run stopped after its first shard, finished by torchrun's two ranks
    def kill(index: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(_cfg(tmp_path / "grown", cache_dir, "data_gen.shard_prompts=3"), after_shard=kill)
    proc = _torchrun(tmp_path, tmp_path / "grown", cache_dir, "data_gen.shard_prompts=3")
    assert "its 3 finished prompts stay, the 4 others are dealt out to 2 rank(s)" in proc.stdout + proc.stderr
    _same_records(_records(tmp_path / "one" / "data"), _records(tmp_path / "grown" / "data"), exact=False)
