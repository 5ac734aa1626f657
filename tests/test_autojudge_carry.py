"""AutoJudge's whole search (``data_gen.autojudge.mode=carry``): after a kept swap the search goes on along the
regenerated response, whose later mismatches are scored and labelled as a response of its own."""

from __future__ import annotations

from dataclasses import replace

import pyarrow.parquet as pq
import torch

from selfjudge import shards
from selfjudge.autojudge import AutoJudgeSettings, Labelled, autojudge_labels_many
from selfjudge.data_gen.stage import run
from selfjudge.labelling import autojudge_rows
from selfjudge.scoring import score_response, score_response_naive
from tests.test_autojudge import QUESTIONS, _by_hand, _case, _stage_cfg

BUDGET = 24


def _greedy(pair, prefix: list[int], n: int) -> list[int]:
    if n <= 0:
        return []
    out = pair.target.generate(torch.tensor([prefix]), max_new_tokens=n, do_sample=False)[0, len(prefix) :].tolist()
    return out[: next((k + 1 for k, t in enumerate(out) if t in pair.eos_ids), len(out))]


def test_carried_search_labels_equal_their_definition(tiny_pair):
    """Round one equals the sequential search; each carried response is y_<i ⊕ d_i ⊕ the target's greedy
    continuation after the kept swap (unbatched ``generate``), holds only its mismatches after i, scored as
    ``score_response`` scores it, and is labelled by hand regeneration against its own answer, in order up to its
    first kept swap; no prompt gets more than max_mismatches labels (fp32)."""
    cases = [_case(tiny_pair, q) for q in QUESTIONS]
    task = cases[0][0]
    s = AutoJudgeSettings(
        enabled=True, mode="carry", max_mismatches=5, max_new_tokens=BUDGET, batch_size=3, finished_only=False
    )
    items = [Labelled(ex, prompt, resp, pos, dr) for _, ex, prompt, resp, pos, dr in cases]

    def score_one(prompt, resp, after=-1):
        args = (tiny_pair.target, tiny_pair.draft, prompt, resp, tiny_pair.vocab_size)
        return score_response(*args, window=4, after=after)

    def args(it):
        return tiny_pair.target, tiny_pair.draft, it.prompt, it.response, tiny_pair.vocab_size

    scored = [score_one(it.prompt, it.response) for it in items]
    rows = autojudge_rows(tiny_pair, task, items, scored, s, BUDGET, score_one)
    seq = autojudge_labels_many(tiny_pair, task, items, replace(s, mode="sequential"), BUDGET)
    assert [lab for _, _, lab in rows[: len(items)]] == seq
    by_response = {(tuple(it.prompt), tuple(it.response)): (it, lab) for it, _, lab in rows}
    carried = 0
    for it, sc, lab in rows[len(items) :]:
        carried += 1
        parents = [(p, pl) for p, pl in by_response.values() if p.prompt == it.prompt and 0 in pl and p is not it]
        made = []
        for p, pl in parents:
            j = pl.index(0)
            i, d = p.positions[j], p.draft_tokens[j]
            head = p.response[:i] + [d]
            if it.response[: i + 1] == head:
                made.append((i, head + _greedy(tiny_pair, p.prompt + head, BUDGET - i - 1)))
        i, regen = max(made)  # the latest kept swap on its path (an earlier one's response is a prefix of it)
        assert it.response == regen  # y' is the kept swap's regeneration
        full = score_one(it.prompt, it.response)  # every mismatch of y', and the naive oracle's after i
        keep = full.positions > i
        naive = score_response_naive(*args(it), window=4, after=i)
        assert it.positions == full.positions[keep].tolist() == naive.positions.tolist() and keep.any()
        assert torch.allclose(sc.sub_features, full.sub_features[keep], atol=1e-5)
        assert torch.allclose(sc.ld, full.ld[keep], atol=1e-5) and torch.allclose(sc.ld, naive.ld, atol=1e-4)
        hand = []
        for q, d in zip(it.positions[: it.limit], it.draft_tokens[: it.limit]):
            hand.append(_by_hand(tiny_pair, task, it.example, it.prompt, it.response, q, d, BUDGET))
            if hand[-1] == 0:
                break
        assert lab == hand + [-1] * (len(it.positions) - len(hand))
    assert carried >= 1  # the stand-in checker keeps some swaps: the search went off the target's path
    for prompt in {tuple(it.prompt) for it in items}:  # (the cases share an example id: told apart by prompt)
        assert 0 < sum(x >= 0 for it, _, lab in rows if tuple(it.prompt) == prompt for x in lab) <= s.max_mismatches


def test_stage_stores_the_carried_rows(tmp_path, cache_dir, capsys):
    """data_gen with mode=carry: each prompt's rows of its own response are the sequential search's, the rows
    of responses carried on along sit after a kept swap of their prompt, with SelfJudge and AutoJudge labels, and
    no prompt gets more than max_mismatches AutoJudge labels."""
    cfg = ("data_gen.autojudge.max_mismatches=4",)
    run(_stage_cfg(tmp_path / "seq", cache_dir, "data_gen.autojudge.mode=sequential", *cfg))
    run(_stage_cfg(tmp_path / "carry", cache_dir, "data_gen.autojudge.mode=carry", *cfg))
    assert "AutoJudge regenerations, carried round 1 (" in capsys.readouterr().err  # the bar names each round

    def rows(d):
        man = shards.read_manifest(d)
        return [r for p in shards.list_shards(d, man) for r in pq.read_table(p).to_pylist() if r["substituted"]]

    seq, carry = rows(tmp_path / "seq" / "data"), rows(tmp_path / "carry" / "data")
    own = {r["prompt_id"]: r["response_ids"] for r in seq}
    key = lambda r: (r["prompt_id"], r["position"], r["draft_token"], r["autojudge_label"])  # noqa: E731
    assert [key(r) for r in carry if r["response_ids"] == own[r["prompt_id"]]] == [key(r) for r in seq]
    off = [r for r in carry if r["response_ids"] != own[r["prompt_id"]]]
    assert off and all(r["autojudge_label"] in (0, 1, -1) and r["label"] in (0, 1) for r in off)
    for r in off:  # after the kept swap: the response agrees with its prompt's own response before it
        kept = [s for s in carry if s["prompt_id"] == r["prompt_id"] and s["autojudge_label"] == 0]
        assert any(r["response_ids"][: s["position"]] == s["response_ids"][: s["position"]] for s in kept)
    for pid in own:
        assert sum(r["autojudge_label"] >= 0 for r in carry if r["prompt_id"] == pid) <= 4
