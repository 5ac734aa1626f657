"""scripts/bench_signals.py on tiny data folders: scores read from the stored features equal their
definitions, LD ranks the SelfJudge label perfectly, heads are cross-fitted or trained on another folder."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from selfjudge.data_gen.stage import run as data_gen
from selfjudge.features import SCALARS
from selfjudge.shards import open_dataset
from tests.scripts import load_script
from tests.tiny_config import tiny_config

FEATURES = [
    "data_gen.features.state_offsets=[-1,0]",
    f"data_gen.features.scalars=[{','.join(SCALARS)}]",
    "data_gen.autojudge.enabled=true",
    "data_gen.autojudge.mode=independent",
]


def _script():
    return load_script("bench_signals")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, cache_dir) -> dict[str, Path]:
    out = {}
    for name, offset in (("a", 0), ("b", 12)):
        run_dir = tmp_path_factory.mktemp(f"sig_{name}")
        cfg = tiny_config(
            run_dir,
            cache_dir,
            "data_gen.tau.mode=value",
            "data_gen.tau.value=0.3",
            f"data_gen.dataset.offset={offset}",
            *FEATURES,
        )
        data_gen(cfg)
        out[name] = run_dir / "data"
    return out


def test_signal_table_on_the_tiny_pair(folders, tmp_path):
    bs = _script()
    res = bs.main(
        [
            "--data",
            f"tiny={folders['a']}",
            "--sets",
            "h_i",
            "scalars",
            "h_i-1,h_i+scalars",
            "--heads",
            "logistic",
            "ld_reg",
            "--folds",
            "2",
            "--bootstrap",
            "20",
            "--epochs",
            "2",
            "--dump",
            "--out",
            str(tmp_path / "sig"),
        ]
    )
    assert json.loads((tmp_path / "sig.json").read_text())["domains"]["tiny"]["mismatches"] > 20
    assert "| rule:kl |" in (tmp_path / "sig.md").read_text()
    with gzip.open(tmp_path / "sig.rows.jsonl.gz", "rt") as f:
        dumped = [json.loads(line) for line in f]
    assert len(dumped) == res["domains"]["tiny"]["mismatches"] and {"selfjudge", "answer", "kl", "ld"} <= set(dumped[0])
    sj = res["domains"]["tiny"]["results"]["selfjudge"]
    assert sj["rule:ld"]["roc_auc"] == 1.0  # the label is LD > τ
    # the likelihood-gap score equals its definition recomputed from the shards' own columns
    ds, man = open_dataset(folders["a"])
    rows = ds.filter(lambda r: r["substituted"]).with_format("numpy")[:]
    cols = bs.FeatureSpec.from_mapping(man["features"]).columns(64, 64)
    x = np.asarray(rows["features"], dtype=np.float64)
    gap = x[:, cols["target_top1_logp"].start] - x[:, cols["target_logp"].start]
    assert sj["rule:likelihood_gap"]["roc_auc"] == pytest.approx(roc_auc_score(rows["label"], gap), abs=1e-3)
    # harm curves: LD ranks its own label perfectly, so accepting up to the negatives' share lets none through
    harm, shares = np.array(sj["rule:ld"]["accepted_harm"]), np.array(bs.SHARES)
    neg_share = 1 - sj["rule:ld"]["positives"] / sj["rule:ld"]["n"]
    assert (harm[shares <= neg_share] == 0).all() and harm[-1] == pytest.approx(1 - neg_share)
    lo, hi = np.array(sj["rule:kl"]["accepted_harm_ci"])  # pointwise prompt-bootstrap band
    assert lo.shape == shares.shape and (0 <= lo).all() and (lo <= hi).all() and (hi <= 1).all()
    assert (tmp_path / "sig.png").stat().st_size > 10_000 and "change the answer" in (tmp_path / "sig.md").read_text()
    lo, hi = sj["rule:kl"]["roc_ci"]
    assert lo <= sj["rule:kl"]["roc_auc"] <= hi
    heads = {k for k in sj if k.startswith("judge:")}
    assert {"judge:h_i:logistic:selfjudge", "judge:scalars:ld_reg:selfjudge"} <= heads
    assert all(0.0 <= sj[k]["roc_auc"] <= 1.0 for k in heads)
    # the combined rule: the best head by validation AUC and KL, their rank shares averaged
    combos = [k for k in sj if k.startswith("combo:")]
    assert len(combos) == 1 and combos[0].endswith(":selfjudge+kl")  # the answer label has one class here
    assert 0.0 <= sj[combos[0]]["roc_auc"] <= 1.0
    paired = res["domains"]["tiny"]["paired"]  # the best head per label minus each rule, paired intervals
    assert [p["label"] for p in paired] == ["selfjudge"] and "rule:ld" not in paired[0]["vs"]
    d = paired[0]["vs"]["rule:kl"]
    assert d["ci"][0] <= d["delta"] <= d["ci"][1] and "minus each rule" in (tmp_path / "sig.md").read_text()
    abl = {(a["features"], a["head"]) for a in res["ablation"]}
    assert ("h_i-1,h_i+scalars", "logistic") in abl and len(abl) == 6
    # the random tiny target never answers right, so no swap changes the score: the answer label has one class
    assert math.isnan(res["domains"]["tiny"]["results"]["answer"]["rule:kl"]["roc_auc"])
    # each row's response score is its response's text scored by the task's checker (the harm label's base)
    from transformers import AutoTokenizer

    from selfjudge.tasks import build_task

    task = build_task(man["config"]["data_gen"]["dataset"])
    ex = {e.id: e for e in task.examples()}
    tok = AutoTokenizer.from_pretrained(man["tokenizer"]["name_or_path"])
    want = [
        task.score(ex[p], tok.decode(r, skip_special_tokens=True)) if len(r) < man["max_new_tokens"] else None
        for p, r in zip(rows["prompt_id"], ds.filter(lambda r: r["substituted"])["response_ids"])
    ]
    assert [d["base"] for d in dumped] == want and any(w is not None for w in want)
    fl = res["domains"]["tiny"]["answer_flips"]
    assert fl["right_to_wrong"] == fl["wrong_to_right"] == 0 and fl["from_right"] + fl["from_wrong"] > 0
    assert set(res["domains"]["tiny"]["results"]) == {"selfjudge", "answer", "harm"}


def test_paired_delta_is_the_auc_difference_with_an_interval_over_the_same_resamples():
    bs = _script()
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 50)
    groups = np.repeat(np.arange(25), 4)
    good, noise = y + rng.normal(0, 0.8, 100), rng.normal(0, 1, 100)
    r = bs.paired_delta(y, good, noise, groups, 200, 0)
    assert r["delta"] == pytest.approx(roc_auc_score(y, good) - roc_auc_score(y, noise))
    assert 0 < r["ci"][0] < r["delta"] < r["ci"][1] and r["n"] == 100
    same = bs.paired_delta(y, noise, noise, groups, 50, 0)
    assert same["delta"] == 0 and same["ci"] == [0.0, 0.0]  # paired: identical scores differ by exactly 0


def test_the_combined_rule_averages_rank_shares():
    bs = _script()
    scores = {"rule:kl": np.array([0.1, 0.2, 0.3, np.inf]), "judge:a:mlp:answer": np.array([0.9, 0.1, 0.5, 0.2])}
    abl = [{"features": "a", "head": "mlp", "train_label": "answer", "val_roc_auc": 0.7}]
    got = bs.combined(scores, abl)
    assert list(got) == ["combo:a:mlp:answer+kl"]
    np.testing.assert_allclose(
        got["combo:a:mlp:answer+kl"], [(0.25 + 1.0) / 2, (0.5 + 0.25) / 2, (0.75 + 0.75) / 2, (1.0 + 0.5) / 2]
    )


def test_the_harm_label_counts_only_swaps_that_turn_a_right_answer_wrong():
    bs = _script()
    aj = np.array([1, 0, 1, 0, -1, 1])
    base = np.array([1.0, 1.0, 0.0, 0.0, 1.0, np.nan])  # right, right, wrong, wrong, right (unlabelled), no answer
    d = {"sj": np.zeros(6, int), "aj": aj, "base": base}
    assert bs.label_of(d, "harm").tolist() == [1, 0, 0, 0, -1, -1]
    assert bs.label_of(d, "answer") is aj
    assert bs.flips(d) == {"from_right": 2, "right_to_wrong": 1, "from_wrong": 2, "wrong_to_right": 1}


def test_heads_trained_on_another_folder(folders, tmp_path):
    bs = _script()
    res = bs.main(
        [
            "--data",
            f"held={folders['b']}",
            "--train",
            str(folders["a"]),
            "--sets",
            "scalars",
            "--heads",
            "mlp",
            "--bootstrap",
            "0",
            "--epochs",
            "2",
            "--out",
            str(tmp_path / "t"),
        ]
    )
    r = res["domains"]["held"]["results"]["selfjudge"]["judge:scalars:mlp:selfjudge"]
    assert 0.0 <= r["roc_auc"] <= 1.0 and r["n"] == res["domains"]["held"]["mismatches"]
    both = bs.load_domain(f"{folders['a']},{folders['b']}")  # one domain collected in two chunks
    assert len(both["sj"]) == len(bs.load_folder(str(folders["a"]))["sj"]) + res["domains"]["held"]["mismatches"]


def test_folder_without_the_scalars_is_refused(tmp_path, cache_dir):
    cfg = tiny_config(tmp_path, cache_dir, "data_gen.dataset.limit=3")
    data_gen(cfg)
    with pytest.raises(ValueError, match="lacks the scalar features .*data_gen.features.scalars"):
        _script().main(
            ["--data", f"x={tmp_path / 'data'}", "--heads", "logistic", "--sets", "h_i", "--out", str(tmp_path / "x")]
        )


def test_earlier_rows_fill_answer_labels_and_join_the_pooled_table(folders, tmp_path):
    """A later run takes an earlier dump's answer-change labels for the same mismatches (key: prompt,
    response, position, draft token) and pools the earlier rows of other prompts for the rule scores."""
    bs = _script()
    common = ["--sets", "scalars", "--heads", "logistic", "--bootstrap", "0", "--epochs", "1", "--folds", "2"]
    bs.main(["--data", f"tiny={folders['a']}", *common, "--dump", "--out", str(tmp_path / "first")])
    with gzip.open(tmp_path / "first.rows.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    for k, r in enumerate(rows):  # pretend an earlier run labelled every mismatch of finished responses
        r["answer"], r["finished"] = k % 2, True
    with gzip.open(tmp_path / "earlier.rows.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    live = bs.load_folder(str(folders["a"]))
    unlabelled = int((live["aj"] < 0).sum())
    assert unlabelled > 0 and len(set(live["key"])) == len(live["key"])
    res = bs.main(
        [
            "--data",
            f"tiny={folders['a']}",
            *common,
            "--rows",
            str(tmp_path / "earlier.rows.jsonl.gz"),
            "--out",
            str(tmp_path / "s"),
        ]
    )
    dom = res["domains"]["tiny"]
    assert dom["answer_labels_from_earlier_rows"] == unlabelled and dom["answer_labelled"] == len(rows)
    assert dom["pooled"]["earlier_rows"] == 0  # the same prompts: nothing is counted twice
    res = bs.main(
        [
            "--data",
            f"tiny={folders['b']}",
            *common,
            "--rows",
            str(tmp_path / "earlier.rows.jsonl.gz"),
            "--out",
            str(tmp_path / "p"),
        ]
    )
    dom = res["domains"]["tiny"]
    assert dom["answer_labels_from_earlier_rows"] == 0  # other prompts: no key matches
    pooled = dom["pooled"]
    assert pooled["earlier_rows"] == len(rows)
    assert pooled["results"]["selfjudge"]["rule:kl"]["n"] == dom["mismatches"] + len(rows)
    assert pooled["results"]["answer"]["rule:kl"]["n"] == dom["answer_labelled"] + len(rows)
    assert 0.0 <= pooled["results"]["answer"]["rule:kl"]["roc_auc"] <= 1.0
    assert "earlier rows" in (tmp_path / "p.md").read_text()


def test_answer_labels_of_an_earlier_checker_revision_do_not_count(folders, tmp_path, monkeypatch):
    """A folder (or dump row) whose answer-change labels were scored by another revision of the task's checker
    than today's keeps its SelfJudge labels but no answer label; the report counts what was dropped."""
    from selfjudge.tasks import answers

    bs = _script()
    common = ["--sets", "scalars", "--heads", "logistic", "--bootstrap", "0", "--epochs", "1", "--folds", "2"]
    bs.main(["--data", f"tiny={folders['a']}", *common, "--dump", "--out", str(tmp_path / "first")])
    with gzip.open(tmp_path / "first.rows.jsonl.gz", "rt") as f:
        rows = [{**json.loads(line), "answer": 1, "finished": True} for line in f]
    made = bs.load_folder(str(folders["a"]))
    assert made["checker"] is None and made["answer_dropped_checker"] == 0
    assert all(bs.answer_counts(r, None) for r in rows)
    monkeypatch.setitem(answers.CHECKER_REVISIONS, "number", 2)  # the GSM-Symbolic checker revised since
    now = bs.load_folder(str(folders["a"]))
    assert now["checker"] == "number@2" and (now["aj"] < 0).all()
    assert now["answer_dropped_checker"] == int((made["aj"] >= 0).sum()) > 0
    assert np.array_equal(now["sj"], made["sj"])  # the SelfJudge label needs no checker
    assert not any(bs.answer_counts(r, now["checker"]) for r in rows)
    res = bs.main(["--data", f"tiny={folders['a']}", *common, "--out", str(tmp_path / "s")])
    assert res["domains"]["tiny"]["answer_labels_dropped_checker"] == now["answer_dropped_checker"]
    assert res["domains"]["tiny"]["answer_labelled"] == 0


def test_a_folder_still_being_made_is_read_only_when_asked(tmp_path, cache_dir):
    """``--partial``: the shards a stopped (or running) data_gen has written, τ by value, the SelfJudge labels
    those the finished run gives the same rows; never mistaken for a finished folder."""
    from selfjudge import shards

    class Killed(RuntimeError):
        pass

    def kill(index: int) -> None:
        raise Killed(f"stopped after shard {index}")

    args = ["data_gen.tau.mode=value", "data_gen.tau.value=0.3", "data_gen.shard_prompts=4", *FEATURES]
    run_dir = tmp_path / "part"
    with pytest.raises(Killed):
        data_gen(tiny_config(run_dir, cache_dir, *args), after_shard=kill)
    folder = run_dir / "data"
    with pytest.raises(FileNotFoundError, match="not a finished data_gen output"):
        open_dataset(folder)
    ds, man = open_dataset(folder, partial=True)
    assert man["complete"] is False and man["tau"] == 0.3 and len(man["shards"]) == 1
    assert man["counts"]["prompts"] == 4 and man["features"]["scalars"] == list(SCALARS)
    bs = _script()
    common = ["--sets", "scalars", "--heads", "logistic", "--bootstrap", "0", "--epochs", "1", "--folds", "2"]
    with pytest.raises(FileNotFoundError, match="not a finished data_gen output"):
        bs.main(["--data", f"tiny={folder}", *common, "--out", str(tmp_path / "s")])
    res = bs.main(["--data", f"tiny={folder}", *common, "--partial", "--out", str(tmp_path / "s")])
    dom = res["domains"]["tiny"]
    assert dom["complete"] is False and dom["prompts"] == 4
    assert "data still being made" in (tmp_path / "s.md").read_text()
    part = bs.load_folder(str(folder), partial=True)
    data_gen(tiny_config(run_dir, cache_dir, *args))  # finish it: the labels of the rows seen before are the same
    done = bs.load_folder(str(folder))
    ds, _ = open_dataset(folder)
    assert np.array_equal(done["sj"], np.asarray(ds.filter(lambda r: r["substituted"])["label"]))
    label = dict(zip(done["key"], done["sj"]))
    assert [label[k] for k in part["key"]] == part["sj"].tolist() and done["complete"]
    assert set(part["key"]) < set(done["key"])
    # by quantile, τ (and every label) waits for the whole run
    q = tmp_path / "q"
    with pytest.raises(Killed):
        data_gen(tiny_config(q, cache_dir, *FEATURES, "data_gen.shard_prompts=4"), after_shard=kill)
    with pytest.raises(SystemExit, match="sets τ by quantile"):
        bs.load_folder(str(q / "data"), partial=True)
    assert shards.snapshot_manifest(q / "data")["tau"] is None


def test_rows_off_the_target_path_are_studied_apart(folders, tmp_path, cache_dir):
    """``--path``: the rows of a carried AutoJudge search (data_gen.autojudge.mode=carry) split into those of the
    prompts' own responses and those of the responses the search went on along; together they are all rows,
    and a folder without carried rows says so."""
    import pyarrow.parquet as pq

    from selfjudge import shards

    run_dir = tmp_path / "carry"
    args = ["data_gen.tau.mode=value", "data_gen.tau.value=0.3", *FEATURES[:-1], "data_gen.autojudge.mode=carry"]
    data_gen(tiny_config(run_dir, cache_dir, *args, "data_gen.autojudge.finished_only=false"))
    folder = run_dir / "data"
    bs = _script()
    common = ["--sets", "scalars", "--heads", "logistic", "--bootstrap", "0", "--epochs", "1", "--folds", "2"]
    n = {p: bs.main(["--data", f"t={folder}", *common, "--path", p, "--out", str(tmp_path / p)]) for p in bs.PATHS}
    count = {p: r["domains"]["t"]["mismatches"] for p, r in n.items()}
    assert count["own"] > 0 and count["carried"] > 0 and count["own"] + count["carried"] == count["all"]
    rows = [r for p in shards.list_shards(folder) for r in pq.read_table(p).to_pylist() if r["substituted"]]
    first: dict[str, list] = {}
    for r in rows:  # a prompt's own response is written before the ones its search carried on along
        first.setdefault(r["prompt_id"], r["response_ids"])
    assert count["carried"] == sum(r["response_ids"] != first[r["prompt_id"]] for r in rows)
    assert "off the target's path only" in (tmp_path / "carried.md").read_text()
    with pytest.raises(SystemExit, match="mode=carry"):
        bs.main(["--data", f"t={folders['a']}", *common, "--path", "carried", "--out", str(tmp_path / "x")])
