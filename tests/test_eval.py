"""The eval stage on the real config (tiny pair): outputs, exactness of lossless SD, agreement scores
for tasks without a checker, resume after a cut, and config errors that name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from selfjudge import evaluation
from selfjudge.eval import stage
from selfjudge.io import config_hash, folder_hash
from selfjudge.judge import JudgeConfig, JudgeHead
from selfjudge.tasks import DatasetConfigError

PROMPTS = ["how many apples are left", "janet sells eggs at the market", "def sum of a list", "what is 12 * 7"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("eval-data") / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": q, "id": f"p{i}"}) + "\n" for i, q in enumerate(PROMPTS)))
    return p


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory, tiny_pair) -> Path:
    H = tiny_pair.target_info.hidden_size
    head = JudgeHead(
        JudgeConfig(feature_dim=H, target_model=tiny_pair.target_info.as_dict(), thresholds={"quantiles": [0.3, 0.6]})
    )
    folder = tmp_path_factory.mktemp("head") / "head"
    head.save_pretrained(folder)
    return folder


def _cfg(tmp_path: Path, cache_dir: Path, *extra: str):
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        return compose(
            "selfjudge",
            overrides=[
                "experiment=tiny",
                f"run_dir={tmp_path}",
                f"model.cache_dir={cache_dir}",
                "logger=none",
                "eval.max_new_tokens=16",
                "eval.gamma=3",
                "eval.warmup_tokens=4",
                "eval.dataset.limit=3",
                *extra,
            ],
        )


def _jsonl(cfg_extra, prompts_file):
    return ["dataset@eval.dataset=jsonl", f"eval.dataset.path={prompts_file}", "eval.dataset.id_field=id", *cfg_extra]


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "per_example.jsonl").read_text().splitlines()]


def test_eval_writes_everything_and_lossless_is_exact(tmp_path, cache_dir, prompts_file, head_dir):
    cfg = _cfg(
        tmp_path,
        cache_dir,
        *_jsonl(
            [
                f"eval.judge_dir={head_dir}",
                "eval.draft_only=true",
                "~eval.methods",
                "+eval.methods={judge:head_quantiles,topk:[2],kl:[0.5]}",
            ],
            prompts_file,
        ),
    )
    res = stage.run(cfg)
    out = tmp_path / "eval"
    for f in ("summary.json", "per_example.jsonl", "report.md", "pareto.png"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    names = [(r["method"], r["threshold"]) for r in summary["rows"]]
    assert names == [
        ("target", None),
        ("draft", None),
        ("lossless", None),
        ("judge", 0.3),
        ("judge", 0.6),
        ("topk", 2.0),
        ("kl", 0.5),
    ]
    recs = _records(out)
    assert len(recs) == 3 * len(names) and res["rows"] == len(names)
    by = {(r["method"], r["threshold"], r["prompt_id"]): r for r in recs}
    for pid in ("jsonl/p0", "jsonl/p1", "jsonl/p2"):
        t = by[("target", None, pid)]
        assert by[("lossless", None, pid)]["output_ids"] == t["output_ids"]  # fp32: exact
        assert t["score_source"] == "agreement" and t["score"] == 1.0  # no checker: agreement with target
        assert by[("lossless", None, pid)]["agree_exact"] == 1.0
        assert by[("draft", None, pid)]["rounds"] == by[("draft", None, pid)]["new_tokens"]
    rows = {(r["method"], r["threshold"]): r for r in summary["rows"]}
    assert rows[("target", None)]["speedup"] == pytest.approx(1.0)
    assert rows[("lossless", None)]["accuracy"] == 1.0 and rows[("lossless", None)]["mean_accepted_length"] > 1.0
    assert rows[("topk", 2.0)]["acceptance_rate"] >= rows[("lossless", None)]["acceptance_rate"]
    assert sum(rows[("lossless", None)]["accept_hist"]) > 0
    assert "| judge | 0.3 |" in (out / "report.md").read_text()
    for key in (("judge", 0.3), ("kl", 0.5)):  # the rule's own time is measured, inside the verify phase
        assert 0 < rows[key]["rule_share_of_verify"] < 1 and rows[key]["rule_ms_per_round"] > 0
    assert rows[("lossless", None)]["rule_share_of_verify"] == 0.0
    assert summary["runtime"]["dtype"] == "float32" and summary["runtime"]["dtype_reason"] == "model.dtype=float32"
    assert set(summary["runtime"]["cpu_kernels"]) == {"target", "draft"} and "float32" in summary["title"]


def test_eval_resumes_after_a_cut(tmp_path, cache_dir, prompts_file, monkeypatch):
    extra = _jsonl(["eval.judge_dir=null", "~eval.methods", "+eval.methods={topk:[2]}"], prompts_file)
    stage.run(_cfg(tmp_path, cache_dir, *extra))
    out = tmp_path / "eval"
    recs = _records(out)
    assert len(recs) == 3 * 3
    # cut the file inside the 8th record, as a kill would; the rerun decodes only what is missing
    lines = (out / "per_example.jsonl").read_text().splitlines(keepends=True)
    (out / "per_example.jsonl").write_text("".join(lines[:7]) + lines[7][:20])
    calls = []
    real = evaluation.decode
    monkeypatch.setattr(evaluation, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    stage.run(_cfg(tmp_path, cache_dir, *extra, "eval.warmup=0"))
    assert len(calls) == 2  # records 8 and 9 only
    again = _records(out)
    assert len(again) == 9 and again[:7] == recs[:7]
    assert {(r["method"], r["prompt_id"]) for r in again} == {(r["method"], r["prompt_id"]) for r in recs}
    # other decoding settings: the old records are not mixed in
    calls.clear()
    stage.run(_cfg(tmp_path, cache_dir, *extra, "eval.warmup=0", "eval.gamma=2"))
    assert len(calls) == 9
    aside = list(out.glob("per_example.*.jsonl"))  # ... and not lost either: moved aside
    assert len(aside) == 1 and _records(out) != again
    assert [json.loads(x) for x in aside[0].read_text().splitlines()] == again
    # eval.limit (fewer prompts of the same dataset) keeps the records: a report of the finished prefix
    calls.clear()
    res = stage.run(_cfg(tmp_path, cache_dir, *extra, "eval.warmup=0", "eval.gamma=2", "eval.limit=2"))
    assert calls == [] and res["examples"] == 2


def test_partial_report_of_a_stopped_eval(tmp_path, cache_dir, prompts_file, monkeypatch):
    """scripts/eval_report.py: the rows of the prompts every method finished, equal to the stage's own."""
    import runpy

    extra = _jsonl(["eval.judge_dir=null", "~eval.methods", "+eval.methods={topk:[2]}"], prompts_file)
    stage.run(_cfg(tmp_path, cache_dir, *extra, "eval.limit=2"))
    full = json.loads((tmp_path / "eval" / "summary.json").read_text())["rows"]
    stage.run(_cfg(tmp_path, cache_dir, *extra))  # 3 prompts; then cut inside the third prompt's methods
    lines = (tmp_path / "eval" / "per_example.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 9
    (tmp_path / "eval" / "per_example.jsonl").write_text("".join(lines[:7]) + lines[7][:20])
    monkeypatch.setattr("sys.argv", ["eval_report.py", str(tmp_path / "eval")])
    runpy.run_path(str(Path(__file__).resolve().parent.parent / "scripts" / "eval_report.py"), run_name="__main__")
    part = json.loads((tmp_path / "eval" / "partial" / "summary.json").read_text())
    assert part["complete"] is False and len(part["prompts"]) == 2
    for a, b in zip(part["rows"], full):
        assert (a["method"], a["threshold"], a["new_tokens"], a["accepted"]) == (
            b["method"],
            b["threshold"],
            b["new_tokens"],
            b["accepted"],
        )
    assert (tmp_path / "eval" / "partial" / "pareto.png").is_file()
    # a multi-rank eval still decoding: its records are in the ranks' files, none merged yet
    (tmp_path / "eval" / "per_example.jsonl").unlink()
    (tmp_path / "eval" / "per_example.rank000.jsonl").write_text("".join(lines[:3]) + "".join(lines[6:7]))
    (tmp_path / "eval" / "per_example.rank001.jsonl").write_text("".join(lines[3:6]) + lines[7][:20])
    runpy.run_path(str(Path(__file__).resolve().parent.parent / "scripts" / "eval_report.py"), run_name="__main__")
    ranked = json.loads((tmp_path / "eval" / "partial" / "summary.json").read_text())
    assert ranked["prompts"] == part["prompts"] and ranked["rows"] == part["rows"]


def test_batched_eval_equals_batch_one(tmp_path, cache_dir, prompts_file, head_dir):
    """eval.batch_size > 1: the same outputs and counts as one prompt at a time (fp32), records say the
    batch size, the report title too, and the batch size enters the resume key."""
    extra = _jsonl(
        [f"eval.judge_dir={head_dir}", "~eval.methods", "+eval.methods={judge:[0.5],kl:[0.5]}", "eval.dataset.limit=4"],
        prompts_file,
    )
    one, many = tmp_path / "one", tmp_path / "many"
    stage.run(_cfg(one, cache_dir, *extra))
    stage.run(_cfg(many, cache_dir, *extra, "eval.batch_size=3"))
    key = lambda r: (r["method"], r["threshold"], r["prompt_id"])  # noqa: E731
    a = {key(r): r for r in _records(one / "eval")}
    b = {key(r): r for r in _records(many / "eval")}
    assert a.keys() == b.keys() and len(a) == 4 * 4
    for k in a:
        for f in ("output_ids", "rounds", "accepted", "accepted_by_rule", "accept_hist", "score"):
            assert a[k][f] == b[k][f], (k, f)
    assert {r["batch_size"] for r in b.values()} == {3, 1} and {r["batch_size"] for r in a.values()} == {1}
    summary = json.loads((many / "eval" / "summary.json").read_text())
    assert "batch size 3" in summary["title"] and "batch size 3" in summary["engine"]
    assert json.loads((many / "eval" / "eval_key.json").read_text())["settings"]["batch_size"] == 3
    assert "batch_size" not in json.loads((one / "eval" / "eval_key.json").read_text())["settings"]


def test_gsm_task_scores_and_sampling(tmp_path, cache_dir):
    cfg = _cfg(
        tmp_path,
        cache_dir,
        "eval.judge_dir=null",
        "~eval.methods",
        "+eval.methods={likelihood:[1.0]}",
        "eval.temperature=0.8",
        "eval.dataset.limit=2",
    )
    stage.run(cfg)
    recs = _records(tmp_path / "eval")
    assert len(recs) == 2 * 3
    assert all(r["score_source"] == "task" and r["score"] in (0.0, 1.0) for r in recs)


def test_adaptive_schedule_is_its_own_row_and_key(tmp_path, cache_dir, prompts_file):
    """eval.schedule=adaptive adds lossless_adaptive (fp32: the target's tokens), keyed apart from fixed runs."""
    cfg = _cfg(
        tmp_path,
        cache_dir,
        *_jsonl(
            [
                "eval.judge_dir=null",
                "~eval.methods",
                "+eval.methods={}",
                "eval.schedule=adaptive",
                "eval.confidence_stop=0.4",
            ],
            prompts_file,
        ),
    )
    stage.run(cfg)
    out = tmp_path / "eval"
    recs = _records(out)
    assert sorted({r["method"] for r in recs}) == ["lossless", "lossless_adaptive", "target"]
    assert all(r["agree_exact"] == 1.0 for r in recs if r["method"] == "lossless_adaptive")
    key = json.loads((out / "eval_key.json").read_text())
    assert key["settings"]["schedule"] == "adaptive" and key["settings"]["confidence_stop"] == 0.4
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["target", "lossless", "lossless_adaptive"]


@pytest.mark.parametrize(
    "override,err,match",
    [
        ("eval.gamma=0", ValueError, "eval.gamma must be an integer >= 1"),
        ("eval.methods={medusa:[1]}", ValueError, "unknown policy 'medusa' in eval.methods.medusa"),
        ("eval.methods={judge:[1.5]}", ValueError, r"eval.methods.judge: judge threshold must be in \[0, 1\]"),
        ("eval.methods={topk:{policy:topk,thresholds:[2],k:3}}", ValueError, "eval.methods.topk must be"),
        ("eval.dataset.name=nope", DatasetConfigError, "unknown task 'nope'"),
        ("eval.temperature=-1", ValueError, "eval.temperature"),
        ("eval.batch_size=0", ValueError, "eval.batch_size must be an integer >= 1"),
        ("eval.schedule=fast", ValueError, "eval.schedule must be 'fixed' or 'adaptive'"),
        ("eval.confidence_stop=2", ValueError, "eval.confidence_stop must be null or a number in"),
        ("eval.policy_options.judge_strict_top1=0", ValueError, r"eval.policy_options.judge_strict_top1 must be null"),
        (
            "eval.methods={j:{policy:judge,thresholds:[0.5],options:{strict:1}}}",
            ValueError,
            r"unknown key 'eval.methods.j.options.strict'",
        ),
        (
            "eval.methods={j:{policy:judge,thresholds:[0.5],options:{judge_strict_top1:2}}}",
            ValueError,
            r"eval.methods.j.options.judge_strict_top1 must be null \(off\) or in \(0, 1\]",
        ),
        ("eval.methods={kl:{policy:kl,thresholds:[1],options:[1]}}", ValueError, "options must be a map"),
        (
            "eval.methods={k:{policy:kl,thresholds:[1],options:{strict_tokens:numbers}}}",
            ValueError,
            r"eval.methods.k.options.strict_tokens must be null \(off\) or one of \['digits'\]",
        ),
    ],
)
def test_config_errors_name_the_key(tmp_path, cache_dir, head_dir, override, err, match):
    if override.startswith("eval.methods="):
        override = ["~eval.methods", "+" + override]
    else:
        override = [override]
    with pytest.raises(err, match=match):
        stage.run(_cfg(tmp_path, cache_dir, f"eval.judge_dir={head_dir}", *override))


def test_head_for_another_target_is_refused(tmp_path, cache_dir, tiny_pair):
    info = {**tiny_pair.target_info.as_dict(), "name": "other", "fingerprint": "sha256:" + "1" * 64}
    JudgeHead(JudgeConfig(feature_dim=tiny_pair.target_info.hidden_size, target_model=info)).save_pretrained(
        tmp_path / "h"
    )
    with pytest.raises(ValueError, match="eval.judge_dir .*trained for target 'other'"):
        stage.run(_cfg(tmp_path, cache_dir, f"eval.judge_dir={tmp_path / 'h'}"))
    with pytest.raises(FileNotFoundError, match="eval.judge_dir: no judge head folder"):
        stage.run(_cfg(tmp_path, cache_dir, f"eval.judge_dir={tmp_path / 'nothing'}"))


def test_a_method_with_its_own_options_is_keyed_by_them(tmp_path, cache_dir, prompts_file, head_dir):
    """eval.methods.<name>.options: the same head with the KL rule's top-1 guard beside the plain judge, in one
    eval; adding it keeps every record already made, changing its options redecodes only its own rows."""
    base = [*_jsonl([], prompts_file), f"eval.judge_dir={head_dir}", "~eval.methods"]
    plain = "judge:head_quantiles,kl:[1.0]"
    stage.run(_cfg(tmp_path, cache_dir, *base, "+eval.methods={" + plain + "}"))
    out = tmp_path / "eval"
    first = (out / "per_example.jsonl").read_text()
    key = json.loads((out / "eval_key.json").read_text())["run_key"]
    assert "judge_strict_top1" not in json.loads((out / "eval_key.json").read_text())["settings"]["policy_options"]
    guarded = plain + ",judge_top1:{policy:judge,thresholds:head_quantiles,options:{judge_strict_top1:0.5}}"
    stage.run(_cfg(tmp_path, cache_dir, *base, "+eval.methods={" + guarded + "}"))
    now = (out / "per_example.jsonl").read_text()
    assert now.startswith(first) and json.loads((out / "eval_key.json").read_text())["run_key"] == key
    recs = _records(out)
    by = {(r["method"], r["threshold"], r["prompt_id"]): r for r in recs}
    tops = [r for r in recs if r["method"] == "judge_top1"]
    assert len(tops) == 6 and {r["threshold"] for r in tops} == {0.3, 0.6}
    own = f"{folder_hash(head_dir)}+options-{config_hash({'judge_strict_top1': 0.5})[:8]}"
    assert {r["head"] for r in tops} == {own}
    assert {r["head"] for r in recs if r["method"] == "judge"} == {folder_hash(head_dir)}
    assert sum(r["accepted_by_rule"] for r in tops) <= sum(
        by[("judge", r["threshold"], r["prompt_id"])]["accepted_by_rule"] for r in tops
    )
    # the guard at another value: only judge_top1's records are set aside and redone
    other = guarded.replace("judge_strict_top1:0.5", "judge_strict_top1:0.8")
    stage.run(_cfg(tmp_path, cache_dir, *base, "+eval.methods={" + other + "}"))
    aside = list(out.glob("per_example.heads-*.jsonl"))
    assert len(aside) == 1 and {json.loads(x)["method"] for x in aside[0].read_text().splitlines()} == {"judge_top1"}
    assert (out / "per_example.jsonl").read_text().startswith(first)


def test_strict_digits_rule_beside_the_plain_rule(tmp_path, cache_dir, prompts_file):
    """A rule with strict_tokens=digits in its own options decodes beside the plain rule (same records key, its
    rows keyed by its options); the rule itself is checked against its definition in test_policies."""
    methods = "kl:[4.0],kl_digits:{policy:kl,thresholds:[4.0],options:{strict_tokens:digits}}"
    stage.run(_cfg(tmp_path, cache_dir, *_jsonl([], prompts_file), "~eval.methods", "+eval.methods={" + methods + "}"))
    out = tmp_path / "eval"
    by = {(r["method"], r["prompt_id"]): r for r in _records(out)}
    ids = [p for m, p in by if m == "kl_digits"]
    assert len(ids) == 3
    assert {by[("kl_digits", p)]["head"] for p in ids} == {f"-+options-{config_hash({'strict_tokens': 'digits'})[:8]}"}
    assert {by[("kl", p)].get("head") for p in ids} == {None}
    assert "strict_tokens" not in json.loads((out / "eval_key.json").read_text())["settings"]["policy_options"]


def test_a_run_without_a_judges_head_keeps_that_judges_records(tmp_path, cache_dir, prompts_file, head_dir):
    """A rerun that skips a judge (no head folder set) leaves its records where they are, and a later run with the
    head again redoes nothing: only a method decoded now with another head has its records set aside."""
    base = [*_jsonl([], prompts_file), "~eval.methods", "+eval.methods={judge:head_quantiles,kl:[1.0]}"]
    stage.run(_cfg(tmp_path, cache_dir, *base, f"eval.judge_dir={head_dir}"))
    out = tmp_path / "eval"
    first = (out / "per_example.jsonl").read_text()
    assert {r["method"] for r in _records(out)} == {"target", "lossless", "judge", "kl"}
    stage.run(_cfg(tmp_path, cache_dir, *base, "eval.judge_dir=null"))  # judge skipped: no head folder set
    assert (out / "per_example.jsonl").read_text() == first
    assert not list(out.glob("per_example.heads-*.jsonl"))
    stage.run(_cfg(tmp_path, cache_dir, *base, f"eval.judge_dir={head_dir}"))
    assert (out / "per_example.jsonl").read_text() == first
