"""scripts/flip_trace.py: the swaps of a decoded response and the greedy continuations after each (tiny pair, fp32)."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from selfjudge.eval import stage
from selfjudge.features import FeatureSpec
from selfjudge.judge import JudgeConfig, JudgeHead
from tests import test_eval
from tests.scripts import load_script
from tests.test_eval import _cfg, _jsonl

prompts_file, head_dir = test_eval.prompts_file, test_eval.head_dir  # the eval tests' fixtures


def _second_best(pair, ids: list[int]) -> int:
    with torch.no_grad():
        return int(pair.target(torch.tensor([ids])).logits[0, -1].topk(2).indices[1])


def test_swaps_their_features_and_the_continuations_after_each(tiny_pair):
    ft = load_script("flip_trace")
    pair = tiny_pair
    prompt = pair.tokenizer("janet sells eggs at the market")["input_ids"]
    budget, a, b = 20, 4, 10
    # a response with two accepted swaps: greedy, the 2nd-best token at a, greedy, the 2nd-best at b, greedy
    y0 = ft.continue_all(pair, [(prompt, [], budget)], 8)[0]
    y1 = ft.continue_all(pair, [(prompt, y0[:a] + [_second_best(pair, prompt + y0[:a])], budget)], 8)[0]
    y = ft.continue_all(pair, [(prompt, y1[:b] + [_second_best(pair, prompt + y1[:b])], budget)], 8)[0]
    assert len(y0) == len(y1) == len(y) == budget and y1[:a] == y0[:a] and y[:b] == y1[:b]

    spec = FeatureSpec(layers=[-1], state_offsets=[-1, 0], scalars=["target_logp", "kl"])
    H = pair.target_info.hidden_size
    head = JudgeHead(
        JudgeConfig(feature_dim=spec.dim(H), target_model=pair.target_info.as_dict(), features=spec.as_dict())
    )
    torch.manual_seed(0)
    with torch.no_grad():
        head.net.weight.normal_(0, 0.3)
    sw = ft.swaps_of(pair, prompt, y, head.eval())
    assert [s["position"] for s in sw] == [a, b]
    assert [s["draft"] for s in sw] == [pair.tokenizer.decode([y[a]]), pair.tokenizer.decode([y[b]])]

    # by hand, from the models' own forward (hidden_states[-1] is after the final norm)
    P = len(prompt)
    with torch.no_grad():
        t_out = pair.target(torch.tensor([prompt + y]), output_hidden_states=True)
        q = F.log_softmax(pair.draft(torch.tensor([prompt + y])).logits[0].float(), -1)
    h, lp = t_out.hidden_states[-1][0], F.log_softmax(t_out.logits[0].float(), -1)
    for s in sw:
        i = P + s["position"]  # input position of the swapped token; i - 1 gave the distribution over it
        d = (prompt + y)[i]
        kl = float((q[i - 1].exp() * (q[i - 1] - lp[i - 1])).sum())
        assert s["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-6)
        assert s["target_top1_p"] == pytest.approx(float(lp[i - 1].max().exp()), rel=1e-5)
        assert s["gap"] == pytest.approx(float(lp[i - 1].max() - lp[i - 1, d]), rel=1e-5) and s["gap"] > 0
        x = torch.cat([h[i - 1], h[i], torch.stack([lp[i - 1, d], torch.tensor(kl)])])
        with torch.no_grad():
            assert s["p_important"] == pytest.approx(float(head.predict_proba(x[None])[0]), rel=1e-4)

    # continuations: before the first swap the target's own response, after swap j the response as built
    cont = ft.continue_all(
        pair, [(prompt, y[:a], budget), (prompt, y[: a + 1], budget), (prompt, y[: b + 1], budget)], 2
    )
    assert cont == [y0, y1, y]
    eos = pair.eos_ids[0]
    assert ft.continue_all(pair, [(prompt, y[:3] + [eos], budget)], 2) == [y[:3] + [eos]]  # an answer as it stands


@pytest.mark.parametrize(
    "scores, bisect, scan_all",
    [
        ([1, 1, 1, 0, 0, 0], 3, 3),
        ([1, 0, 0, 0], 1, 1),
        ([1, 0, 1, 1, 1, 1, 0, 0, 0], 6, 1),  # not monotone: the bisection ends on a later flipping swap
        ([1, 0, 1], None, 1),  # the last swap's continuation scores as j = 0: no flip replays
    ],
)
def test_bisection_and_scan_name_a_swap_whose_continuation_flips(scores, bisect, scan_all):
    ft = load_script("flip_trace")
    made = [None] * len(scores)
    rounds = 0
    while todo := ft.probes(made, "bisect"):
        for j in todo:
            made[j] = scores[j]
        rounds += 1
    assert ft.culprit(made, "bisect") == bisect
    assert rounds <= 2 + (len(scores) - 1).bit_length()
    if bisect is not None:
        assert made[bisect] != made[0] and made[bisect - 1] == made[0]
    assert ft.probes([None] * len(scores), "all") == list(range(len(scores)))
    assert ft.culprit(scores, "all") == scan_all


def test_main_reads_committed_eval_records(tmp_path, cache_dir, prompts_file, head_dir):
    jsonl = _cfg(tmp_path / "plain", cache_dir, *_jsonl(["~eval.methods", "+eval.methods={kl:[0.5]}"], prompts_file))
    jsonl.eval.dataset.limit = 1
    stage.run(jsonl)
    cfg = _cfg(tmp_path, cache_dir, "~eval.methods", "+eval.methods={kl:[0.5],judge:[0.9]}")  # GSM-Symbolic: a checker
    cfg.eval.judge_dir = str(head_dir)
    cfg.eval.dataset.limit = 2
    stage.run(cfg)
    recs = [json.loads(x) for x in (tmp_path / "eval" / "per_example.jsonl").read_text().splitlines()]
    for r in recs:  # the tiny pair's text has no answer: make the judge "break" both target answers
        r["score"] = 1.0 if r["method"] == "target" else 0.0
    prefix = tmp_path / "bench" / "val"
    prefix.parent.mkdir()
    with gzip.open(f"{prefix}.per_example.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    shutil.copy(tmp_path / "eval" / "eval_key.json", f"{prefix}.eval_key.json")

    ft = load_script("flip_trace")
    over = ["--", "model=tiny", f"model.cache_dir={cache_dir}"]
    res = ft.main(
        [
            str(prefix),
            "--method",
            "judge@0.9",
            "--head",
            f"judge={head_dir}",
            "--scan",
            "all",
            "--out",
            str(tmp_path / "ft"),
            *over,
        ]
    )
    s = res["methods"]["judge@0.9"]
    assert s["flips"] == 2 and s["replayed"] == 0 and s["with_culprit"] == 0  # no answers: every continuation scores 0
    judged = {r["prompt_id"]: r for r in recs if r["method"] == "judge"}
    target = {r["prompt_id"]: r for r in recs if r["method"] == "target"}
    for t in res["traces"]["judge@0.9"]:
        assert len(t["scores"]) == len(t["swaps"]) + 1 and None not in t["scores"]
        assert t["accepted_by_rule"] == judged[t["prompt_id"]]["accepted_by_rule"]
        # every swap is a token the rule accepted past the standard test (which also counts the matches after a
        # swap), each below the cut; an output other than the target's has at least one
        assert len(t["swaps"]) <= t["accepted_by_rule"] and all(sw["p_important"] < 0.9 for sw in t["swaps"])
        assert bool(t["swaps"]) == (judged[t["prompt_id"]]["output_ids"] != target[t["prompt_id"]]["output_ids"])
    written = json.loads((tmp_path / "ft.json").read_text())
    assert written["continuations"] == sum(len(t["swaps"]) + 1 for t in res["traces"]["judge@0.9"])
    assert "output_ids" not in written["traces"]["judge@0.9"][0]
    assert "| judge@0.9 (rw) | 2 |" in (tmp_path / "ft.md").read_text()
    assert (tmp_path / "ft.png").stat().st_size > 0
    # the eval folder itself reads the same (its records hold the real scores: nothing flips there)
    folder = ft.main([str(tmp_path / "eval"), "--method", "judge@0.9", *over])
    assert folder["methods"]["judge@0.9"]["flips"] == 0 and folder["traces"]["judge@0.9"] == []
    with pytest.raises(SystemExit, match=r"no records of --method kl@2.0; the file holds .*'kl', 0.5"):
        ft.main([str(prefix), "--method", "kl@2", *over])
    # records of a task without a checker (prompts from a JSONL file) cannot flip: said, not looped on
    plain = tmp_path / "bench" / "plain"
    recs = [json.loads(x) for x in (tmp_path / "plain" / "eval" / "per_example.jsonl").read_text().splitlines()]
    with gzip.open(f"{plain}.per_example.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({**r, "score": float(r["method"] == "target")}) + "\n" for r in recs))
    shutil.copy(tmp_path / "plain" / "eval" / "eval_key.json", f"{plain}.eval_key.json")
    with pytest.raises(SystemExit, match="task 'jsonl' has no answer checker"):
        ft.main([str(plain), "--method", "kl@0.5", *over])
