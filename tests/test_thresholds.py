"""Thresholds picked on a validation eval (selfjudge.thresholds, scripts/pick_thresholds.py): exact choices on
hand-made records (a rule that never reaches lossless, ties), a running eval's file, errors that name the fix,
and a tiny eval whose picked overrides compose into a second eval's settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from selfjudge import thresholds as th
from selfjudge.eval import stage
from selfjudge.judge import JudgeConfig, JudgeHead
from selfjudge.metrics import finished_by_all
from tests.scripts import load_script

N = 50  # prompts: accuracy differences in steps of 0.02
LOSSLESS_WRONG = 10  # lossless gets prompts 0-9 wrong: accuracy 0.8

# method -> (policy, [(threshold, accepted length, accuracy difference to lossless in prompts)])
GRID = {
    "kl": ("kl", [(0.25, 1.5, 0), (0.5, 2.0, -1), (1.0, 2.5, -3), (2.0, 3.0, -10)]),
    "likelihood": ("likelihood", [(1.0, 1.5, -2), (2.0, 2.0, -5)]),  # never within 2 points
    "typical": ("typical", [(0.3, 1.4, -1), (0.1, 1.8, -4)]),  # within, never at lossless
    "topk": ("topk", [(2, 2.0, 0), (4, 2.0, 1), (6, 2.0, 1), (8, 2.0, -1)]),  # one accepted length: ties
    "judge_mlp": ("judge", [(0.1, 1.2, 1), (0.3, 1.6, 0), (0.6, 2.2, -2), (0.8, 2.2, -3), (0.9, 2.6, -20)]),
}
EXPECTED = {  # (at_lossless, within_loss, looser, chosen)
    "kl": (0.25, 0.5, 1.0, [0.25, 0.5, 1.0]),
    "likelihood": (None, None, None, []),
    "typical": (None, 0.3, 0.1, [0.1, 0.3]),
    "topk": (4.0, 4.0, None, [4.0]),  # equal length: the higher difference, then the lower threshold
    "judge_mlp": (0.3, 0.3, 0.6, [0.3, 0.6]),  # looser: of the two at 2.2, the one losing less
}


def _rec(method: str, t, pid: int, score: float, length: float, policy: str | None = None) -> dict:
    return {
        "prompt_id": f"p{pid:02d}",
        "method": method,
        "policy": policy or method,
        "threshold": t,
        "output_ids": [],
        "score": score,
        "rounds": 100,
        "new_tokens": round(100 * length),
        "draft_forwards": 0,
        "proposed": 0,
        "accepted": 0,
        "accepted_by_rule": 0,
        "accept_hist": [],
        "seconds": 1.0,
    }


def _scores(k: int) -> list[float]:
    """Per-prompt scores whose difference to lossless sums to k prompts."""
    s = [0.0 if i < LOSSLESS_WRONG else 1.0 for i in range(N)]
    for i in range(abs(k)):
        s[i if k > 0 else LOSSLESS_WRONG + i] = 1.0 if k > 0 else 0.0
    return s


def _records() -> list[dict]:
    recs = [_rec("target", None, i, s, 1.0) for i, s in enumerate(_scores(0))]
    recs += [_rec("lossless", None, i, s, 1.25) for i, s in enumerate(_scores(0))]
    for method, (policy, sweep) in GRID.items():
        for t, length, k in sweep:
            recs += [_rec(method, t, i, s, length, policy) for i, s in enumerate(_scores(k))]
    return recs


def _script():
    return load_script("pick_thresholds")


def test_choices_on_known_accuracies():
    rows = th.threshold_rows(_records())
    assert rows[0]["method"] == "lossless" and rows[0]["accuracy"] == pytest.approx(0.8) and rows[0]["n"] == N
    kl = {r["threshold"]: r for r in rows if r["method"] == "kl"}
    assert kl[0.5]["accuracy"] == pytest.approx(0.78) and kl[0.5]["accuracy_vs_lossless"] == pytest.approx(-0.02)
    assert kl[0.5]["mean_accepted_length"] == pytest.approx(2.0) and kl[0.5]["n"] == N
    assert kl[0.5]["accepted_length_vs_lossless"] == pytest.approx(2.0 / 1.25)
    assert kl[0.5]["accuracy_vs_lossless_se"] == pytest.approx(0.02)  # one prompt of 50 differs
    choices = th.choose(rows)
    assert list(choices) == list(GRID)  # rows of rules only, lossless and target are references
    for method, (at, within, looser, chosen) in EXPECTED.items():
        c = choices[method]
        assert (c["at_lossless"], c["within_loss"], c["looser"], c["chosen"]) == (at, within, looser, chosen), method
    assert choices["kl"]["why"] == {"0.25": ["at_lossless"], "0.5": ["within_loss"], "1.0": ["looser"]}
    assert choices["topk"]["why"] == {"4.0": ["at_lossless", "within_loss"]}
    assert choices["kl"]["notes"] == []
    assert choices["likelihood"]["notes"] == [
        "likelihood: no threshold reaches lossless accuracy (paired difference >= 0)",
        "likelihood: no threshold is within 0.02 of lossless accuracy: evaluate stricter thresholds",
    ]
    assert choices["typical"]["notes"] == ["typical: no threshold reaches lossless accuracy (paired difference >= 0)"]
    assert "no evaluated threshold is looser than 4" in choices["topk"]["notes"][0]
    assert th.overrides(choices) == [
        "eval.methods.kl=[0.25,0.5,1.0]",
        "eval.methods.typical=[0.1,0.3]",
        "eval.methods.topk=[4.0]",
        "eval.methods.judge_mlp.thresholds=[0.3,0.6]",  # policy judge under another name: a map in eval.methods
    ]
    assert th.overrides(choices, mapped={"kl"})[0] == "eval.methods.kl.thresholds=[0.25,0.5,1.0]"
    # a wider budget moves the within-loss pick (and its looser neighbour) out; the order of records is irrelevant
    wide = th.choose(th.threshold_rows(_records()[::-1]), max_loss=0.06)
    assert (wide["kl"]["within_loss"], wide["kl"]["looser"]) == (1.0, 2.0)
    assert wide["likelihood"]["within_loss"] == 1.0 and wide["likelihood"]["at_lossless"] is None


def test_running_file_thresholds_and_errors():
    recs = _records()
    extra = _rec("kl", 0.5, N, 1.0, 2.0)  # a prompt only one method has finished: left out
    kept, done, started = finished_by_all([*recs, extra])
    assert len(done) == N and started == N + 1 and extra not in kept and len(kept) == len(recs)
    assert th.threshold_value("0.5") == 0.5 and th.threshold_value(2) == 2.0
    with pytest.raises(ValueError, match="threshold 'q0.9' is not a number"):
        th.threshold_value("q0.9")
    with pytest.raises(ValueError, match="no lossless records"):
        th.threshold_rows([r for r in recs if r["method"] != "lossless"])
    with pytest.raises(ValueError, match="kl at threshold 0.5 has no prompt that lossless also decoded"):
        th.threshold_rows([*(r for r in recs if r["method"] == "lossless"), {**extra, "prompt_id": "other"}])
    with pytest.raises(ValueError, match="max_loss must be a number >= 0"):
        th.choose([], max_loss=-0.1)
    assert th.quantile_levels({"quantiles": [0.3, 0.6], "quantile_levels": [0.5, 0.9]}) == {0.3: 0.5, 0.6: 0.9}
    assert th.quantile_levels({"quantiles": [0.3]}) == {}


def test_script_on_a_running_file(tmp_path, capsys):
    pick = _script()
    with pytest.raises(SystemExit, match="per_example.jsonl does not exist: pass the validation eval's output"):
        pick.main([str(tmp_path)])
    lines = [json.dumps(r) + "\n" for r in _records()]
    (tmp_path / "per_example.jsonl").write_text("".join(lines) + lines[-1][:25])  # a running eval's last line
    res = pick.main([str(tmp_path), "--out", str(tmp_path / "val.json")])
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "val.json").read_text()) == json.loads(json.dumps(res))
    assert res["overrides"][0] == "eval.methods.kl=[0.25,0.5,1.0]" and len(res["prompts"]) == N
    assert "| kl | 0.5 | 50 | 0.780 | -0.020 ± 0.020 | 2.00 | 1.60x | yes: within 0.02 |" in out
    assert "| likelihood | 2 | 50 | 0.700 | -0.100 ± 0.043 | 2.00 | 1.60x | - |" in out
    assert "'eval.methods.kl=[0.25,0.5,1.0]' 'eval.methods.typical=[0.1,0.3]'" in out
    assert "likelihood: nothing chosen; keep its thresholds or leave it out with '~eval.methods.likelihood'" in out
    # --methods: only those are picked; another method's unfinished prompts no longer hold the others back
    unfinished = [_rec("judge_late", 0.1, i, 1.0, 3.0, "judge") for i in range(3)]
    (tmp_path / "per_example.jsonl").write_text("".join(lines) + "".join(json.dumps(r) + "\n" for r in unfinished))
    assert len(pick.main([str(tmp_path)])["prompts"]) == 3  # every method: only 3 prompts finished by all
    only = pick.main([str(tmp_path), "--methods", "kl,typical", "--out", str(tmp_path / "only.json")])
    assert len(only["prompts"]) == N and list(only["choices"]) == ["kl", "typical"]
    assert only["overrides"] == ["eval.methods.kl=[0.25,0.5,1.0]", "eval.methods.typical=[0.1,0.3]"]
    assert {r["method"] for r in only["rows"]} == {"lossless", "kl", "typical"}  # target: no row of its own
    with pytest.raises(SystemExit, match="--methods klx: no records in .* \\(it has judge_late, judge_mlp, kl,"):
        pick.main([str(tmp_path), "--methods", "kl,klx"])
    with pytest.raises(SystemExit, match="--head 'x=y': expected NAME=DIR with NAME one of"):
        pick.main([str(tmp_path), "--head", "x=y"])
    with pytest.raises(SystemExit, match="no judge_config.json in"):
        pick.main([str(tmp_path), "--head", f"judge_mlp={tmp_path}"])


def _compose(run_dir: Path, cache_dir: Path, *extra: str):
    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        return compose(
            "selfjudge",
            overrides=["experiment=tiny", f"run_dir={run_dir}", f"model.cache_dir={cache_dir}", "logger=none", *extra],
        )


def test_tiny_validation_eval_to_overrides(tmp_path, cache_dir, tiny_pair, capsys):
    prompts = tmp_path / "val.jsonl"
    qs = ["how many apples are left", "janet sells eggs at the market", "what is 12 * 7"]
    prompts.write_text("".join(json.dumps({"prompt": q, "id": f"v{i}"}) + "\n" for i, q in enumerate(qs)))
    H = tiny_pair.target_info.hidden_size
    levels = {"quantiles": [0.3, 0.6], "quantile_levels": [0.5, 0.9]}
    head_dir = tmp_path / "head"
    JudgeHead(
        JudgeConfig(feature_dim=H, target_model=tiny_pair.target_info.as_dict(), thresholds=levels)
    ).save_pretrained(head_dir)
    sweep = {"judge": [0.3, 0.6], "kl": [0.5, 2.0], "likelihood": [1.0, 3.0]}
    val = tmp_path / "val"
    stage.run(
        _compose(
            val,
            cache_dir,
            "eval.max_new_tokens=12",
            "eval.gamma=3",
            "eval.warmup=0",
            "dataset@eval.dataset=jsonl",
            f"eval.dataset.path={prompts}",
            "eval.dataset.id_field=id",
            f"eval.judge_dir={head_dir}",
            "~eval.methods",
            "+eval.methods={judge:head_quantiles,kl:[0.5,2.0],likelihood:[1.0,3.0]}",
        )
    )
    # a 100-point budget: every rule gets a pick on 3 random-model prompts
    res = _script().main([str(val / "eval"), "--max-loss", "1"])
    out = capsys.readouterr().out
    assert "| judge | 0.3 (q0.5) | 3 |" in out and "| judge | 0.6 (q0.9) | 3 |" in out  # head from summary.json
    assert {r["method"] for r in res["rows"]} == {"lossless", *sweep} and len(res["overrides"]) == 3
    picked = {}
    for o in res["overrides"]:
        key, _, value = o.partition("=")
        picked[key.removeprefix("eval.methods.")] = [float(x) for x in value.strip("[]").split(",")]
    assert picked.keys() == sweep.keys() and all(set(v) <= set(sweep[m]) for m, v in picked.items())
    assert (val / "eval" / "thresholds.json").is_file()
    # the eval on the evaluation problems: the overrides compose and pass its settings' checks (no decode)
    cfg = _compose(tmp_path / "test", cache_dir, f"eval.judge_dir={head_dir}", *res["overrides"])
    s = stage.settings(OmegaConf.to_container(cfg, resolve=True))
    for m, v in picked.items():
        assert s.methods[m] == v


def test_scores_of_an_earlier_checker_revision_are_redone_before_picking(tmp_path, capsys):
    """A sweep scored by an earlier revision of its task's checker (the eval stage has not run on it since) is
    re-scored in memory from its texts: the picks see the scores of now, and the file is left as it was."""
    rows = tmp_path / "q.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q{i}", "id": f"q{i}", "a": "A"}) + "\n" for i in range(4)))
    ds = {"name": "jsonl", "path": str(rows), "id_field": "id", "answer_field": "a", "scorer": "letter"}
    (tmp_path / "eval_key.json").write_text(json.dumps({"run_key": "k", "dataset": ds}))
    walk = "A. one\nB. two\n\nTherefore, the answer is \\boxed{B}."  # revision 1 read the first line: 'A'
    recs = [
        {**_rec(m, t, i, 1.0, 1.5), "prompt_id": f"jsonl/q{i}", "text": text, "score_source": "task"}
        for m, t, text in (("lossless", None, "The answer is A."), ("kl", 0.5, walk), ("kl", 0.25, "Answer: A"))
        for i in range(4)
    ]
    stored = "".join(json.dumps(r) + "\n" for r in recs)
    (tmp_path / "per_example.jsonl").write_text(stored)
    res = _script().main([str(tmp_path), "--out", str(tmp_path / "val.json")])
    assert "4 records scored by an earlier revision of the answer checker: re-scored here" in capsys.readouterr().out
    kl = {r["threshold"]: r for r in res["rows"] if r["method"] == "kl"}
    assert kl[0.5]["accuracy"] == 0.0 and kl[0.25]["accuracy"] == 1.0 and res["choices"]["kl"]["chosen"] == [0.25]
    assert (tmp_path / "per_example.jsonl").read_text() == stored  # a reader: the file is not touched

    # scripts/rescore_eval.py: the same re-scoring as a table of what changed (records untouched)
    rows = {(r["method"], r["threshold"]): r for r in load_script("rescore_eval").main([str(tmp_path)])}
    assert rows[("kl", 0.5)]["stored_accuracy"] == 1.0 and rows[("kl", 0.5)]["new_accuracy"] == 0.0
    assert rows[("kl", 0.5)]["changed"] == 4 and rows[("lossless", None)]["changed"] == 0
    assert (tmp_path / "per_example.jsonl").read_text() == stored
