"""AutoJudge labels: swap, regenerate greedily, compare task scores; both search orders; stored beside SelfJudge."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from selfjudge import shards
from selfjudge.autojudge import (
    AutoJudgeSettings,
    Labelled,
    autojudge_labels,
    autojudge_labels_many,
    chosen,
    regenerate,
)
from selfjudge.data_gen.stage import run
from selfjudge.models import format_prompt
from selfjudge.scoring import score_response
from selfjudge.tasks import Example
from selfjudge.tasks.base import Task
from tests.tiny_config import tiny_config

TASK_CFG = {"system_prompt": None, "chat_template": True, "shuffle": False, "limit": None, "seed": 0}


def _checker(ex: Example, text: str) -> float:
    """A text-sensitive stand-in checker: swaps change its verdict about half of the time."""
    return float(sum(map(ord, text)) % 2)


def _case(pair, q: str, n: int = 24):
    ex = Example(id="q0", prompt=q, reference=None, task="toy")
    task = Task("toy", TASK_CFG, lambda: [ex], _checker)
    prompt = format_prompt(pair.tokenizer, q)
    out = pair.target.generate(torch.tensor([prompt]), max_new_tokens=n - 1, do_sample=False)[0, len(prompt) :]
    resp = out.tolist() + [pair.eos_ids[0]]  # a finished response (ends with EOS): only those get labels
    sc = score_response(pair.target, pair.draft, prompt, resp, pair.vocab_size, window=4)
    return task, ex, prompt, resp, sc.positions.tolist(), sc.draft_tokens.tolist()


def _by_hand(pair, task, ex, prompt, resp, i, d, budget):
    """The label of one swap, regenerating with unbatched ``generate``."""
    cap = budget - i - 1
    new = resp[:i] + [d]
    if cap > 0 and d not in pair.eos_ids:
        pre = prompt + new
        out = pair.target.generate(torch.tensor([pre]), max_new_tokens=cap, do_sample=False)[0, len(pre) :].tolist()
        new += out[: next((k + 1 for k, t in enumerate(out) if t in pair.eos_ids), len(out))]
    text = lambda ids: pair.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    return int(task.score(ex, text(new)) != task.score(ex, text(resp)))


def test_independent_labels_match_hand_regeneration(tiny_pair):
    task, ex, prompt, resp, pos, dr = _case(tiny_pair, "tom eats 3 eggs each day, how many in a week?")
    assert len(pos) >= 4
    s = AutoJudgeSettings(enabled=True, mode="independent", max_mismatches=6, max_new_tokens=24)
    got = autojudge_labels(tiny_pair, task, ex, prompt, resp, pos, dr, s, budget=24)
    want = [_by_hand(tiny_pair, task, ex, prompt, resp, i, d, 24) for i, d in zip(pos[:6], dr[:6])]
    assert got[:6] == want and all(x == -1 for x in got[6:])
    assert set(want) == {0, 1}  # the stand-in checker really separates swaps


def test_sequential_stops_at_first_kept_swap(tiny_pair):
    task, ex, prompt, resp, pos, dr = _case(tiny_pair, "tom eats 3 eggs each day, how many in a week?")
    s = AutoJudgeSettings(enabled=True, mode="sequential", max_mismatches=len(pos), max_new_tokens=24)
    got = autojudge_labels(tiny_pair, task, ex, prompt, resp, pos, dr, s, budget=24)
    want = [_by_hand(tiny_pair, task, ex, prompt, resp, i, d, 24) for i, d in zip(pos, dr)]
    stop = want.index(0) if 0 in want else len(want)
    assert got == want[: stop + 1] + [-1] * (len(pos) - stop - 1)


def test_a_response_cut_at_the_limit_gets_no_labels(tiny_pair):
    """A response without EOS has no final answer: its mismatches keep -1 unless finished_only=false."""
    task, ex, prompt, resp, pos, dr = _case(tiny_pair, "tom eats 3 eggs each day, how many in a week?")
    cut = resp[:-1]  # the same response, cut before its EOS
    pos_cut = [i for i in pos if i < len(cut)]
    s = AutoJudgeSettings(enabled=True, mode="independent", max_mismatches=4, max_new_tokens=24)
    assert autojudge_labels(tiny_pair, task, ex, prompt, cut, pos_cut, dr[: len(pos_cut)], s, budget=23) == [-1] * len(
        pos_cut
    )
    s = AutoJudgeSettings(enabled=True, mode="independent", max_mismatches=4, max_new_tokens=24, finished_only=False)
    got = autojudge_labels(tiny_pair, task, ex, prompt, cut, pos_cut, dr[: len(pos_cut)], s, budget=23)
    assert all(x in (0, 1) for x in got[:4])


def test_no_checker_gives_minus_one(tiny_pair):
    task, ex, prompt, resp, pos, dr = _case(tiny_pair, "hello there")
    task = Task("toy", TASK_CFG, lambda: [ex], None)
    s = AutoJudgeSettings(enabled=True, mode="independent", max_mismatches=8, max_new_tokens=8)
    assert autojudge_labels(tiny_pair, task, ex, prompt, resp, pos, dr, s, budget=24) == [-1] * len(pos)


def test_settings_errors():
    with pytest.raises(ValueError, match="data_gen.autojudge.mode"):
        AutoJudgeSettings.from_mapping({**GOOD, "mode": "x"})
    with pytest.raises(KeyError, match="data_gen.autojudge"):
        AutoJudgeSettings.from_mapping({"enabled": True})
    with pytest.raises(ValueError, match="data_gen.autojudge.select=spread needs data_gen.autojudge.mode=independent"):
        AutoJudgeSettings.from_mapping({**GOOD, "mode": "sequential", "select": "spread"})
    with pytest.raises(ValueError, match="data_gen.autojudge.select must be one of"):
        AutoJudgeSettings.from_mapping({**GOOD, "select": "last"})
    with pytest.raises(ValueError, match="data_gen.autojudge.batch_size must be >= 1"):
        AutoJudgeSettings.from_mapping({**GOOD, "batch_size": 0})


GOOD = {
    "enabled": True,
    "mode": "independent",
    "select": "first",
    "max_mismatches": 1,
    "max_new_tokens": 1,
    "batch_size": 4,
    "finished_only": True,
}


def test_chosen_first_and_spread():
    assert chosen(10, 3, "first") == [0, 1, 2]
    assert chosen(10, 3, "spread") == [0, 4, 9] or chosen(10, 3, "spread") == [0, 5, 9]
    assert chosen(9, 3, "spread") == [0, 4, 8]
    assert chosen(2, 5, "spread") == [0, 1] and chosen(7, 1, "spread") == [0] and chosen(0, 3, "first") == []
    assert chosen(100, 8, "spread")[-1] == 99 and len(chosen(100, 8, "spread")) == 8


QUESTIONS = ["tom eats 3 eggs each day, how many in a week?", "a shop sells 4 pens for 2 dollars", "hello there"]


@pytest.mark.parametrize("mode,select", [("independent", "first"), ("independent", "spread"), ("sequential", "first")])
def test_batched_across_responses_equals_each_alone(tiny_pair, mode, select):
    """Regenerations of several responses batched together (batch_size 3, rows of different
    responses in one batch) give each response the labels it gets alone, and those equal hand
    regeneration at the chosen mismatches (fp32)."""
    cases = [_case(tiny_pair, q) for q in QUESTIONS]
    s = AutoJudgeSettings(enabled=True, mode=mode, max_mismatches=4, max_new_tokens=24, select=select, batch_size=3)
    items = [Labelled(ex, prompt, resp, pos, dr) for task, ex, prompt, resp, pos, dr in cases]
    many = autojudge_labels_many(tiny_pair, cases[0][0], items, s, budget=24)
    for (task, ex, prompt, resp, pos, dr), got in zip(cases, many):
        assert got == autojudge_labels(tiny_pair, task, ex, prompt, resp, pos, dr, s, budget=24)
        if mode == "independent":
            pick = chosen(len(pos), 4, select)
            want = [-1] * len(pos)
            for j in pick:
                want[j] = _by_hand(tiny_pair, task, ex, prompt, resp, pos[j], dr[j], 24)
        else:  # in order, up to and including the first kept swap
            hand = [_by_hand(tiny_pair, task, ex, prompt, resp, i, d, 24) for i, d in zip(pos[:4], dr[:4])]
            want = hand[: hand.index(0) + 1] if 0 in hand else hand
            want = want + [-1] * (len(pos) - len(want))
        assert got == want
    assert sum(x != -1 for got in many for x in got) >= (6 if mode == "independent" else 3)


@pytest.mark.parametrize("mode,select", [("independent", "spread"), ("sequential", "first")])
def test_regenerations_cut_from_the_generation_cache_equal_fresh_prefills(tiny_pair, mode, select):
    """Each response's own cache of x ⊕ y_<T-1 (as the generation leaves it) stands in for the prefill of every
    regeneration's prefix x ⊕ y_<i: the continuations, and so the labels, equal those of a fresh prefill (fp32),
    with rows of different responses and prefix lengths in one batch."""
    cases = [_case(tiny_pair, q) for q in QUESTIONS]
    s = AutoJudgeSettings(enabled=True, mode=mode, max_mismatches=4, max_new_tokens=24, select=select, batch_size=3)
    plain = [Labelled(ex, prompt, resp, pos, dr) for task, ex, prompt, resp, pos, dr in cases]
    cached = []
    for it in plain:
        with torch.no_grad():
            out = tiny_pair.target(torch.tensor([it.prompt + it.response[:-1]]), use_cache=True)
        cached.append(it._replace(cache=out.past_key_values))
    want = autojudge_labels_many(tiny_pair, cases[0][0], plain, s, budget=24)
    assert autojudge_labels_many(tiny_pair, cases[0][0], cached, s, budget=24) == want
    swaps = [
        (it.prompt, it.response, i, d, None) for it in plain for i, d in zip(it.positions[:5], it.draft_tokens[:5])
    ]
    swaps_c = [(*sw[:4], c.cache) for sw, c in zip(swaps, [c for c in cached for _ in c.positions[:5]])]
    assert len({sw[2] for sw in swaps}) >= 4  # prefixes of several lengths
    assert regenerate(tiny_pair, swaps_c, s, 24) == regenerate(tiny_pair, swaps, s, 24)


def _stage_cfg(run_dir, cache_dir, *extra):
    return tiny_config(
        run_dir,
        cache_dir,
        "data_gen.max_new_tokens=12",
        "data_gen.dataset.limit=3",
        "data_gen.autojudge.enabled=true",
        "data_gen.autojudge.mode=independent",
        "data_gen.autojudge.max_mismatches=2",
        "data_gen.autojudge.finished_only=false",  # the tiny model's responses run to the limit
        *extra,
    )


def _aj_labels(data) -> list:
    man = shards.read_manifest(data)
    return [
        (r["prompt_id"], r["position"], r["autojudge_label"])
        for p in shards.list_shards(data, man)
        for r in pq.read_table(p).to_pylist()
    ]


def test_stage_stores_autojudge_beside_selfjudge(tmp_path, cache_dir, capsys):
    out = run(_stage_cfg(tmp_path, cache_dir))
    bar = capsys.readouterr().err  # a batch runs many minutes on a CPU: the bar names each step while it runs
    assert all(f"batch of 3: {step}" in bar for step in ("generating", "scoring", "AutoJudge regenerations", "done"))
    man = shards.read_manifest(tmp_path / "data")
    assert man["label_sources"] == ["selfjudge", "autojudge"]
    rows = [r for p in shards.list_shards(tmp_path / "data", man) for r in pq.read_table(p).to_pylist()]
    by_prompt: dict[str, list] = {}
    for r in rows:
        if r["substituted"]:
            by_prompt.setdefault(r["prompt_id"], []).append(r["autojudge_label"])
    for labels in by_prompt.values():  # the first two mismatches labelled (0/1), the rest not computed
        assert all(x in (0, 1) for x in labels[:2]) and all(x == -1 for x in labels[2:])
    assert out["counts"]["autojudge_labelled"] == sum(min(2, len(v)) for v in by_prompt.values()) > 0


def test_stage_regenerations_from_the_generation_cache_equal_the_naive_scorer_path(tmp_path, cache_dir):
    """The fast scorer hands the regenerations each response's cache; the naive one has none, so they prefill:
    the same AutoJudge labels (fp32)."""
    run(_stage_cfg(tmp_path / "fast", cache_dir))
    run(_stage_cfg(tmp_path / "naive", cache_dir, "data_gen.scorer=naive"))
    fast, naive = _aj_labels(tmp_path / "fast" / "data"), _aj_labels(tmp_path / "naive" / "data")
    assert fast == naive and sum(x[2] != -1 for x in fast) >= 3


def test_labels_of_an_earlier_run_are_taken_not_regenerated(tmp_path, cache_dir, monkeypatch):
    """The labels file (export_labels) of a folder, also one still being made, lets a run of the same config
    elsewhere skip those regenerations and store the same labels; another config's file is refused by key."""
    from selfjudge import autojudge, labelling
    from selfjudge.autojudge import export_labels, label_key, read_labels

    run(_stage_cfg(tmp_path / "first", cache_dir))
    first = _aj_labels(tmp_path / "first" / "data")
    labels = tmp_path / "labels.jsonl.gz"
    n = export_labels(tmp_path / "first" / "data", labels)
    man = shards.read_manifest(tmp_path / "first" / "data")
    h, lh = man["config_hash"], man["labels_hash"]
    rows = [r for p in shards.list_shards(tmp_path / "first" / "data") for r in pq.read_table(p).to_pylist()]
    want = {
        label_key(r["prompt_id"], r["response_ids"], r["position"], r["draft_token"]): r["autojudge_label"]
        for r in rows
        if r["substituted"] and r["autojudge_label"] >= 0
    }
    assert read_labels(labels, h, lh) == want and n == len(want) >= 3
    stamp = labels.stat().st_mtime_ns
    assert export_labels(tmp_path / "first" / "data", labels) == n and labels.stat().st_mtime_ns == stamp  # unchanged

    calls = []
    real = autojudge.regenerate
    monkeypatch.setattr(
        autojudge, "regenerate", lambda pair, swaps, *a: calls.append(len(swaps)) or real(pair, swaps, *a)
    )
    run(_stage_cfg(tmp_path / "second", cache_dir, f"data_gen.autojudge_labels_from={labels}"))
    assert sum(calls) == 0 and _aj_labels(tmp_path / "second" / "data") == first
    assert shards.read_manifest(tmp_path / "second" / "data")["config_hash"] == h  # the file is not in the key

    # a folder still being made: its shards so far; a run taking them regenerates only the rest
    class Killed(RuntimeError):
        pass

    def kill(index: int) -> None:
        raise Killed(index)

    with pytest.raises(Killed):
        run(
            _stage_cfg(tmp_path / "part", cache_dir, "data_gen.shard_prompts=1", "data_gen.batch_size=1"),
            after_shard=kill,
        )
    some = export_labels(tmp_path / "part" / "data", tmp_path / "part.jsonl.gz")
    assert 0 < some < n
    # a folder holding only some of a file's labels adds to it, never shrinks it
    assert export_labels(tmp_path / "part" / "data", labels) == n and read_labels(labels, h, lh) == want
    calls.clear()
    run(
        _stage_cfg(
            tmp_path / "third",
            cache_dir,
            "data_gen.batch_size=1",
            "data_gen.shard_prompts=1",
            f"data_gen.autojudge_labels_from={tmp_path / 'part.jsonl.gz'}",
        )
    )
    assert sum(calls) == n - some
    first_shard = pq.read_table(shards.list_shards(tmp_path / "third" / "data")[0]).column("prompt_id").to_pylist()
    taken = {k.split("|")[0] for k in read_labels(tmp_path / "part.jsonl.gz", h, lh)}
    assert taken and not taken & set(first_shard)  # the prompts still to label went first

    # another slice of the same dataset (one prompt more), other features and τ: the labels are the same labels
    calls.clear()
    run(
        _stage_cfg(
            tmp_path / "wider",
            cache_dir,
            "data_gen.dataset.limit=4",
            "data_gen.tau.value=0.5",
            "data_gen.features.layers=[-2]",
            f"data_gen.autojudge_labels_from={labels}",
        )
    )
    wider = _aj_labels(tmp_path / "wider" / "data")
    man4 = shards.read_manifest(tmp_path / "wider" / "data")
    assert man4["labels_hash"] == lh and man4["config_hash"] != h
    assert [x for x in wider if x[0] in {p for p, *_ in first}] == first  # taken, equal
    n4 = export_labels(tmp_path / "wider" / "data", tmp_path / "wider.jsonl.gz")
    assert 0 < sum(calls) == n4 - n  # only the new prompt's mismatches regenerated

    # another regeneration batch: the same labels hash, the file taken whole
    calls.clear()
    run(
        _stage_cfg(
            tmp_path / "batch1",
            cache_dir,
            "data_gen.autojudge.batch_size=1",
            f"data_gen.autojudge_labels_from={labels}",
        )
    )
    assert sum(calls) == 0 and _aj_labels(tmp_path / "batch1" / "data") == first
    assert shards.read_manifest(tmp_path / "batch1" / "data")["labels_hash"] == lh
    # a file written under the older labels hash (which held the regeneration batch): taken, and an export
    # rewrites it under the current hash with nothing lost
    older = tmp_path / "older.jsonl.gz"
    autojudge.write_labels(older, h, want, man["labels_hash_older"])
    assert man["labels_hash_older"] != lh and read_labels(older, h, lh, older=man["labels_hash_older"]) == want
    with pytest.raises(ValueError, match="holds the labels of another data_gen config"):
        read_labels(older, h, lh)
    calls.clear()
    run(_stage_cfg(tmp_path / "fourth", cache_dir, f"data_gen.autojudge_labels_from={older}"))
    assert sum(calls) == 0 and _aj_labels(tmp_path / "fourth" / "data") == first
    assert export_labels(tmp_path / "part" / "data", older) == n and read_labels(older, h, lh) == want

    # a file written before labels_hash existed: taken under the data's config hash only
    old = tmp_path / "old.jsonl.gz"
    autojudge.write_labels(old, h, want)
    assert read_labels(old, h, "any") == want
    with pytest.raises(ValueError, match="config_hash"):
        read_labels(old, "other", lh)

    with pytest.raises(
        ValueError, match="data_gen.autojudge_labels_from: .* holds the labels of another data_gen config"
    ):
        run(
            _stage_cfg(
                tmp_path / "other",
                cache_dir,
                "data_gen.autojudge.max_mismatches=3",
                f"data_gen.autojudge_labels_from={labels}",
            )
        )
    with pytest.raises(
        ValueError, match="data_gen.autojudge_labels_from is set but data_gen.autojudge.enabled is false"
    ):
        labelling.DataGenSettings.from_section(
            {
                **_plain_data_gen(tmp_path, cache_dir),
                "autojudge_labels_from": str(labels),
                "autojudge": {**_plain_data_gen(tmp_path, cache_dir)["autojudge"], "enabled": False},
            }
        )


def _plain_data_gen(tmp_path, cache_dir) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(_stage_cfg(tmp_path, cache_dir).data_gen, resolve=True)


def test_labels_of_another_response_are_regenerated_and_said(tiny_pair, caplog):
    """Taken labels apply to the same response only: a prompt whose file labels were made for other tokens (a run
    of other batches or dtype) is regenerated, with a warning naming it."""
    import dataclasses
    import logging

    from selfjudge.autojudge import label_key

    cases = [_case(tiny_pair, q) for q in QUESTIONS]
    s = AutoJudgeSettings(enabled=True, mode="independent", max_mismatches=4, max_new_tokens=24, batch_size=3)
    items = [  # one id per prompt
        Labelled(dataclasses.replace(ex, id=f"q{i}"), prompt, resp, pos, dr)
        for i, (task, ex, prompt, resp, pos, dr) in enumerate(cases)
    ]
    want = autojudge_labels_many(tiny_pair, cases[0][0], items, s, budget=24)
    k = next(i for i, w in enumerate(want) if any(x >= 0 for x in w))
    it = items[k]
    made = [(p, d, w) for p, d, w in zip(it.positions, it.draft_tokens, want[k]) if w >= 0]
    same = {label_key(it.example.id, it.response, p, d): w for p, d, w in made}
    other = {label_key(it.example.id, it.response[:-1], p, d): 1 - w for p, d, w in made}  # flipped: never taken
    with caplog.at_level(logging.WARNING, logger="selfjudge.autojudge"):
        assert autojudge_labels_many(tiny_pair, cases[0][0], items, s, budget=24, known=same) == want
        assert "differ" not in caplog.text
        assert autojudge_labels_many(tiny_pair, cases[0][0], items, s, budget=24, known=other) == want
    assert "1 response(s) of prompts with taken AutoJudge labels differ" in caplog.text and it.example.id in caplog.text


def test_responses_of_an_earlier_run_are_teacher_forced_not_generated(tmp_path, cache_dir, monkeypatch):
    """The responses file (export_responses) beside the labels: a run taking both generates no response it holds
    and regenerates no swap of them, and its records equal the first run's (fp32: a teacher-forced pass against
    the generation's own); a prompt whose entry was changed takes that response (its labels then do not apply:
    its swaps are regenerated); another model's or budget's file is refused, naming the key."""
    import gzip
    import json

    from selfjudge import autojudge, labelling
    from selfjudge.autojudge import export_labels
    from selfjudge.responses import export_responses, read_responses, responses_hash

    first = tmp_path / "first" / "data"
    run(_stage_cfg(tmp_path / "first", cache_dir))
    labels, resp_file = tmp_path / "labels.jsonl.gz", tmp_path / "responses.jsonl.gz"
    export_labels(first, labels)
    man = shards.read_manifest(first)
    rows = {
        (r["prompt_id"], r["position"], r["substituted"]): r
        for p in shards.list_shards(first, man)
        for r in pq.read_table(p).to_pylist()
    }
    made = {pid: r["response_ids"] for (pid, _, _), r in rows.items()}
    assert export_responses(first, resp_file) == len(made) == 3
    assert {k: v for k, (_, v) in read_responses(resp_file, responses_hash(man["config"])).items()} == made

    generated, regenerated = [], []
    real_gen, real_regen = labelling.greedy_batch_traced, autojudge.regenerate
    monkeypatch.setattr(
        labelling, "greedy_batch_traced", lambda m, ps, *a, **k: generated.append(len(ps)) or real_gen(m, ps, *a, **k)
    )
    monkeypatch.setattr(
        autojudge, "regenerate", lambda pair, sw, *a: regenerated.append(len(sw)) or real_regen(pair, sw, *a)
    )
    taking = (f"data_gen.autojudge_labels_from={labels}", f"data_gen.responses_from={resp_file}")
    run(_stage_cfg(tmp_path / "second", cache_dir, *taking))
    assert generated == [] and regenerated == []
    second = shards.read_manifest(tmp_path / "second" / "data")
    assert second["config_hash"] == man["config_hash"]  # the files are not in the key
    again = [r for p in shards.list_shards(tmp_path / "second" / "data") for r in pq.read_table(p).to_pylist()]
    assert len(again) == len(rows)
    for r in again:
        want = rows[(r["prompt_id"], r["position"], r["substituted"])]
        for k in ("response_ids", "draft_token", "target_token", "autojudge_label", "label"):
            assert r[k] == want[k], k
        assert r["ld"] == pytest.approx(want["ld"], abs=1e-5, nan_ok=True)
        assert torch.allclose(torch.tensor(r["features"]), torch.tensor(want["features"]), rtol=2e-3, atol=2e-3)

    # one entry changed (its last token): taken as it is, and its swaps regenerated (no label binds to it)
    lines = gzip.decompress(resp_file.read_bytes()).decode().splitlines()
    entry = json.loads(lines[1])
    entry["response"] = [*entry["response"][:-1], entry["response"][-1] + 1]  # the same mismatches, another hash
    edited = tmp_path / "edited.jsonl.gz"
    edited.write_bytes(gzip.compress("\n".join([lines[0], json.dumps(entry), *lines[2:]]).encode() + b"\n"))
    run(
        _stage_cfg(
            tmp_path / "third",
            cache_dir,
            f"data_gen.autojudge_labels_from={labels}",
            f"data_gen.responses_from={edited}",
        )
    )
    third = [r for p in shards.list_shards(tmp_path / "third" / "data") for r in pq.read_table(p).to_pylist()]
    assert {tuple(r["response_ids"]) for r in third if r["prompt_id"] == entry["id"]} == {tuple(entry["response"])}
    assert generated == [] and sum(regenerated) > 0

    with pytest.raises(ValueError, match="data_gen.responses_from: .* another model, dtype or data_gen.max_new_tokens"):
        run(
            _stage_cfg(
                tmp_path / "other", cache_dir, "data_gen.max_new_tokens=11", f"data_gen.responses_from={resp_file}"
            )
        )
    with pytest.raises(FileNotFoundError, match="data_gen.responses_from: .* does not exist"):
        run(_stage_cfg(tmp_path / "none", cache_dir, f"data_gen.responses_from={tmp_path / 'nope.jsonl.gz'}"))


def test_a_labelled_response_takes_its_labels_as_they_are(tiny_pair):
    """A response the file labels is not labelled again: a mismatch the file does not know (its draft proposed
    another token on the machine that made the labels) stays unlabelled instead of starting regenerations."""
    import dataclasses

    from selfjudge.autojudge import label_key

    cases = [_case(tiny_pair, q) for q in QUESTIONS]
    s = AutoJudgeSettings(enabled=True, mode="independent", max_mismatches=4, max_new_tokens=24, batch_size=3)
    items = [
        Labelled(dataclasses.replace(ex, id=f"q{i}"), prompt, resp, pos, dr)
        for i, (task, ex, prompt, resp, pos, dr) in enumerate(cases)
    ]
    want = autojudge_labels_many(tiny_pair, cases[0][0], items, s, budget=24)
    k = next(i for i, w in enumerate(want) if sum(x >= 0 for x in w) >= 2)
    it = items[k]
    made = [(p, d, w) for p, d, w in zip(it.positions, it.draft_tokens, want[k]) if w >= 0]
    known = {label_key(it.example.id, it.response, p, d): w for p, d, w in made[1:]}  # the first one unknown
    got = autojudge_labels_many(tiny_pair, cases[0][0], [it], s, budget=24, known=known)
    first = it.positions.index(made[0][0])
    assert got[0][first] == -1 and [x for j, x in enumerate(got[0]) if j != first] == [
        x for j, x in enumerate(want[k]) if j != first
    ]
