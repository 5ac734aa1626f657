"""AutoJudge-style labels (Garipov et al., 2025) beside the SelfJudge labels, for tasks with a checker.

For a mismatch ``i`` of the response ``y`` (draft token ``d_i``): put ``d_i`` in place of ``y_i``, let the
target regenerate greedily from ``x ⊕ y_<i ⊕ d_i``, and label the mismatch important (1) iff the task
score of the regenerated answer differs from the score of ``y``. Two search orders:

- ``sequential`` (AutoJudge's search): mismatches in order from the first. An important swap is
  undone and the search goes on along ``y``; an unimportant one is kept, so the search would go on
  along the regenerated response. Its later mismatches are not mismatches of ``y`` (their prefix
  holds ``d_i``), so they have no SelfJudge row to sit beside: the search stops there.
- ``carry``: AutoJudge's whole search. As ``sequential``, but where a swap is kept the search goes on along
  the regenerated response ``y' = y_<i ⊕ d_i ⊕ greedy``: its mismatches after ``i`` are the target's own
  greedy continuation of an off-path prefix, so the data stage scores them as responses of their own (SelfJudge
  rows and features on ``y'``) and labels them the same way, until the prompt's ``max_mismatches`` labels are
  made (:func:`autojudge_labels_many`'s ``kept``; ``selfjudge.labelling``). A decode that accepts swaps moves
  off the target's path after its first one, and most swaps that turned an answer were made there
  (``scripts/flip_trace.py``): this labels such swaps.
- ``independent``: every chosen mismatch judged against the same ``y`` (no carrying forward).
  ``select`` chooses which: ``first`` (the first ``max_mismatches``) or ``spread`` (``max_mismatches``
  spaced evenly over the response's mismatches: a sample of every position, and shorter
  continuations on average than the first ones).

Labels outlive their data folder: :func:`export_labels` writes a folder's labels (also of a folder still being
made) to a small gzipped file keyed by :func:`label_key` and stamped with the hash of what decides a label
(model, dataset but not its slice, response budget, AutoJudge settings, checker revision), and a later run
(``data_gen.autojudge_labels_from``, e.g. on another machine, which has only the committed file) takes them instead
of regenerating, also for another slice of the prompts, other features or τ (:func:`read_labels`; a file of another
model, prompt format or AutoJudge setting is refused).

The regenerations dominate the cost. :func:`autojudge_labels_many` runs those of many responses
together, ``batch_size`` rows per greedy batch grouped by continuation length (sequential: step ``j``
of every response still searching), which keeps the CPU busier than a response's few rows alone.
In float32 each label equals the one of an unbatched regeneration. Mismatches not reached (budget
``max_mismatches``, not selected, or past the sequential stop) keep -1, and so do all mismatches of a
response that did not end with EOS (``finished_only``, the default): a response cut at the length limit has no final answer to change
(on the real pair at 256 new tokens, 60 % of GSM8K responses were cut, and 34 of 52 "changed" labels
came from them: a swap that let the answer fit in the budget, not a harmful one).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import DynamicCache

from selfjudge.batch_decoding import HoleCache
from selfjudge.decoding import PrefillMemo
from selfjudge.generation import fixed_batches, greedy_batch
from selfjudge.models import ModelPair
from selfjudge.tasks import Example, Task

log = logging.getLogger(__name__)
AUTOJUDGE_MODES = ("sequential", "independent", "carry")
AUTOJUDGE_SELECT = ("first", "spread")
KEYS = ("enabled", "mode", "select", "max_mismatches", "max_new_tokens", "batch_size", "finished_only")


@dataclass(frozen=True)
class AutoJudgeSettings:
    enabled: bool  # compute AutoJudge labels (tasks with a checker only)
    mode: str  # sequential | independent | carry
    max_mismatches: int  # regenerations per response (cost bound)
    max_new_tokens: int  # tokens regenerated after a swap (also capped by the response's own budget)
    select: str = "first"  # independent: first | spread (which mismatches get a label)
    batch_size: int = 16  # regenerations per greedy batch (across responses)
    finished_only: bool = True  # label only responses that ended with EOS (a cut one has no final answer)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> AutoJudgeSettings:
        if set(d) != set(KEYS):
            raise KeyError(f"data_gen.autojudge needs exactly the keys {sorted(KEYS)}, got {sorted(d)}")
        s = cls(
            bool(d["enabled"]),
            str(d["mode"]),
            int(d["max_mismatches"]),
            int(d["max_new_tokens"]),
            str(d["select"]),
            int(d["batch_size"]),
            bool(d["finished_only"]),
        )
        if s.mode not in AUTOJUDGE_MODES:
            raise ValueError(f"data_gen.autojudge.mode must be one of {AUTOJUDGE_MODES}, got '{s.mode}'")
        if s.select not in AUTOJUDGE_SELECT:
            raise ValueError(f"data_gen.autojudge.select must be one of {AUTOJUDGE_SELECT}, got '{s.select}'")
        if s.select == "spread" and s.mode != "independent":
            raise ValueError("data_gen.autojudge.select=spread needs data_gen.autojudge.mode=independent")
        if s.max_mismatches < 0 or s.max_new_tokens < 0:
            raise ValueError("data_gen.autojudge.max_mismatches and max_new_tokens must be >= 0")
        if s.batch_size < 1:
            raise ValueError(f"data_gen.autojudge.batch_size must be >= 1, got {s.batch_size}")
        return s


class Labelled(NamedTuple):
    """One response and its mismatches, the input of :func:`autojudge_labels_many`."""

    example: Example
    prompt: list[int]
    response: list[int]
    positions: list[int]
    draft_tokens: list[int]
    cache: DynamicCache | None = None  # the target's one-row cache of x ⊕ y_<T-1 (TargetTrace.cache), if kept
    limit: int | None = None  # mismatches to label at most (None: the settings' max_mismatches)


LABELS_FORMAT = "selfjudge-autojudge-labels/1"


def response_key(prompt_id: str, response: Sequence[int]) -> str:
    """The prompt and a hash of the response's token ids: the first part of :func:`label_key`."""
    sha = hashlib.sha256(json.dumps([int(t) for t in response]).encode()).hexdigest()[:16]
    return f"{prompt_id}|{sha}"


def label_key(prompt_id: str, response: Sequence[int], position: int, draft_token: int) -> str:
    """A labelled mismatch: prompt, a hash of the response's token ids, position and draft token (a label
    applies only where the target wrote the same response)."""
    return f"{response_key(prompt_id, response)}|{int(position)}|{int(draft_token)}"


def labelled_prompts(labels: Mapping[str, int]) -> set[str]:
    """The prompt ids that labels keyed by :func:`label_key` name."""
    return {key.split("|", 1)[0] for key in labels}


def write_labels(path: str | Path, config_hash: str, labels: Mapping[str, int], labels_hash: str | None = None) -> bool:
    """The labels file: a header line (format, the data's config hash, the labels' hash) then one {key, label}
    line each, sorted, gzipped without a timestamp (the same labels give the same bytes); written atomically, and
    only when its content changed (returns whether it was written)."""
    from selfjudge.io import write_jsonl_gz

    head = {"format": LABELS_FORMAT, "config_hash": config_hash}
    if labels_hash is not None:
        head["labels_hash"] = labels_hash
    return write_jsonl_gz(path, head, [{"key": k, "label": int(v)} for k, v in sorted(labels.items())])


def read_labels(
    path: str | Path,
    config_hash: str,
    labels_hash: str | None = None,
    key: str = "data_gen.autojudge_labels_from",
    older: str | None = None,
) -> dict[str, int]:
    """The labels of a file :func:`write_labels` wrote under ``labels_hash`` (what decides a label: the model, the
    dataset but not its slice, the response budget, the AutoJudge settings but the regeneration batch, the checker
    revision; ``older``: the hash a file of this config was written under before the batch left it) or, for a file
    without one, under ``config_hash``; any other file is an error naming ``key`` (the labels of another model,
    prompt or checker revision would be mixed in)."""
    from selfjudge.io import read_jsonl_gz

    p = Path(path)
    head, rows = read_jsonl_gz(p, LABELS_FORMAT, key, "an AutoJudge labels file")
    if "labels_hash" in head:  # ``older``: this config's labels hash as written before autojudge.batch_size left it
        same = head["labels_hash"] in {labels_hash, older} - {None}
    else:
        same = head.get("config_hash") == config_hash
    if not same:
        mine, theirs = ("labels_hash", labels_hash) if "labels_hash" in head else ("config_hash", config_hash)
        raise ValueError(
            f"{key}: '{p}' holds the labels of another data_gen config ({mine} {head.get(mine)} != {theirs}): "
            "use the file of this config, or none"
        )
    return {r["key"]: int(r["label"]) for r in rows}


def export_labels(data_dir: str | Path, path: str | Path) -> int:
    """Write the AutoJudge labels of a data folder (finished, or the shards written so far) to ``path`` (only
    when they changed), together with those ``path`` holds already where they are labels of the same kind (a run
    that took them back and has not yet redone their prompts keeps them all); a file of another config is
    replaced. Returns how many the file holds."""
    import pyarrow.parquet as pq

    from selfjudge import shards

    root = Path(data_dir)
    man = shards.read_manifest(root) if (root / shards.MANIFEST).is_file() else shards.snapshot_manifest(root)
    cols = ["substituted", "prompt_id", "response_ids", "position", "draft_token", "autojudge_label"]
    labels = {}
    for name in man["shards"]:
        t = pq.read_table(root / shards.SHARD_DIR / name, columns=cols).to_pydict()
        for sub, pid, resp, pos, tok, lab in zip(*(t[c] for c in cols)):
            if sub and lab >= 0:
                labels[label_key(pid, resp, pos, tok)] = lab
    kept: dict[str, int] = {}
    if Path(path).is_file():
        try:
            kept = read_labels(
                path, man["config_hash"], man.get("labels_hash"), key=str(path), older=man.get("labels_hash_older")
            )
        except ValueError:  # another config's labels: replaced
            pass
    labels = {**kept, **labels}
    write_labels(path, man["config_hash"], labels, man.get("labels_hash"))
    return len(labels)


def _finished(response: list[int], eos_ids) -> bool:
    return bool(response) and response[-1] in eos_ids


def chosen(n: int, k: int, select: str) -> list[int]:
    """Indices of the ``k`` of ``n`` mismatches that get a label: the first ``k`` or ``k`` spread evenly
    (first and last included)."""
    if k >= n:
        return list(range(n))
    if select == "first" or k <= 1:
        return list(range(k))
    return sorted({round(j * (n - 1) / (k - 1)) for j in range(k)})


def continue_greedy(
    pair: ModelPair,
    prefixes: list[list[int]],
    caps: list[int],
    batch_size: int,
    key: str,
    caches: list[Any] | None = None,
) -> list[list[int]]:
    """The target's greedy continuation of each token prefix (prompt included), at most ``caps[j]`` tokens (0: none),
    in batches of ``batch_size`` rows of similar cap (greedy is prefix-consistent: each row is cut to its own cap;
    ``key`` names the setting in an error). ``caches[j]``: a cache of the model over at least all but the last token
    of ``prefixes[j]`` (or None); where every row of a batch has one, the prefill is cut from them instead of computed
    again (on a CPU about 40 % of a regeneration's time)."""
    todo = [j for j, c in enumerate(caps) if c > 0]
    out: list[list[int]] = [[] for _ in prefixes]
    for b in fixed_batches([-caps[j] for j in todo], batch_size, key):
        rows = [todo[k] for k in b]
        memo = None
        if caches is not None and all(caches[j] is not None for j in rows):
            memo = PrefillMemo()
            cut = [(caches[j], len(prefixes[j]) - 1) for j in rows]  # prefill reads all but the last token
            memo.keep(pair.target, [prefixes[j] for j in rows], HoleCache.from_rows(pair.target, pair.vocab_size, cut))
        outs = greedy_batch(
            pair.target,
            [prefixes[j] for j in rows],
            max(caps[j] for j in rows),
            pair.eos_ids,
            pair.tokenizer.pad_token_id,
            pair.vocab_size,
            prefill_memo=memo,
        )
        for j, o in zip(rows, outs):
            out[j] = o[: caps[j]]
    return out


def regenerate(
    pair: ModelPair, swaps: list[tuple[list[int], list[int], int, int, Any]], s: AutoJudgeSettings, budget: int
):
    """Responses y_<i ⊕ d_i ⊕ greedy continuation for each (prompt, y, i, d_i, cache), at most ``budget`` tokens.
    ``cache``: the response's cache from its generation (x ⊕ y_<T-1), from which the prefill of x ⊕ y_<i is cut."""
    caps = [0 if d in pair.eos_ids else max(0, min(s.max_new_tokens, budget - i - 1)) for _, _, i, d, _ in swaps]
    prefixes = [x + y[:i] + [d] for x, y, i, d, _ in swaps]
    cont = continue_greedy(pair, prefixes, caps, s.batch_size, "data_gen.autojudge.batch_size", [c for *_, c in swaps])
    return [y[:i] + [d] + c for (_, y, i, d, _), c in zip(swaps, cont)]


@torch.no_grad()
def autojudge_labels_many(
    pair: ModelPair,
    task: Task,
    items: Sequence[Labelled],
    s: AutoJudgeSettings,
    budget: int,
    known: Mapping[str, int] | None = None,
    kept: dict[int, tuple[int, list[int]]] | None = None,
) -> list[list[int]]:
    """One label list per item (1 important, 0 not, -1 not computed), the regenerations of all items
    batched together. ``budget``: the response length limit of the run (data_gen.max_new_tokens), so a
    regenerated answer is never allowed more tokens than the original had. ``known``: labels of an earlier
    run of the same config by :func:`label_key` (:func:`read_labels`): taken instead of regenerated.
    ``kept`` (mode ``carry``): filled with {item: (mismatch index, regenerated response)} of each item whose search
    ended on a kept swap, the response the search goes on along (regenerated also where the label was taken)."""
    known = known or {}
    dec = pair.tokenizer.decode
    labels = [[-1] * len(it.positions) for it in items]
    base = [task.score(it.example, dec(it.response, skip_special_tokens=True)) for it in items]
    # per item: the mismatch indices to label, in search order
    plan = {
        k: chosen(len(it.positions), s.max_mismatches if it.limit is None else it.limit, s.select)
        for k, it in enumerate(items)
        if base[k] is not None and it.positions and (not s.finished_only or _finished(it.response, pair.eos_ids))
    }
    if known:  # a response the file labels takes those labels as they are, with no regeneration: on another
        # machine its draft may propose another token at a near-tie, so its mismatches (hence a spread plan)
        # can shift by one, and the labels made for this response are still its labels
        responses = {key.rsplit("|", 2)[0] for key in known}
        for k in list(plan):
            it = items[k]
            if response_key(it.example.id, it.response) in responses:
                mine = zip(it.positions, it.draft_tokens)
                labels[k] = [known.get(label_key(it.example.id, it.response, p, d), -1) for p, d in mine]
                del plan[k]
    made: dict[tuple[int, int], list[int]] = {}  # carry: the regenerations of kept swaps
    step = 0
    while plan:
        # independent: every planned swap at once; sequential: the next swap of each searching item
        jobs = [(k, j) for k, js in plan.items() for j in (js if s.mode == "independent" else js[step : step + 1])]
        for k, j in jobs:
            it = items[k]
            labels[k][j] = known.get(label_key(it.example.id, it.response, it.positions[j], it.draft_tokens[j]), -1)
        if known and step == 0:  # a prompt the file labels, none of whose swaps it knows: another response
            prompts = labelled_prompts(known)
            other = [k for k in plan if items[k].example.id in prompts and all(labels[k][j] < 0 for j in plan[k])]
            if other:
                log.warning(
                    "%d response(s) of prompts with taken AutoJudge labels differ from the labelled ones (e.g. %s): "
                    "regenerated; labels match only the same response, token for token (the data_gen.batch_size, "
                    "dtype and CPU kernels of the run that made them)",
                    len(other),
                    items[other[0]].example.id,
                )
        jobs = [(k, j) for k, j in jobs if labels[k][j] < 0]
        swaps = [(items[k].prompt, items[k].response, items[k].positions[j], items[k].draft_tokens[j]) for k, j in jobs]
        swaps = [(*sw, items[k].cache) for sw, (k, _) in zip(swaps, jobs)]
        for (k, j), new in zip(jobs, regenerate(pair, swaps, s, budget)):
            labels[k][j] = int(task.score(items[k].example, dec(new, skip_special_tokens=True)) != base[k])
            if s.mode == "carry" and labels[k][j] == 0:
                made[k, j] = new
        if s.mode == "independent":
            break
        step += 1  # sequential: an item stops at its first kept (label 0) swap or when its plan is done
        plan = {k: js for k, js in plan.items() if step < len(js) and labels[k][js[step - 1]] == 1}
    if s.mode == "carry" and kept is not None:
        ends = {k: labs.index(0) for k, labs in enumerate(labels) if 0 in labs}  # the search keeps one swap at most
        todo = [k for k, j in ends.items() if (k, j) not in made]  # labels taken from a file: the response made again
        swaps = [
            (items[k].prompt, items[k].response, items[k].positions[ends[k]], items[k].draft_tokens[ends[k]])
            for k in todo
        ]
        for k, new in zip(todo, regenerate(pair, [(*sw, items[k].cache) for sw, k in zip(swaps, todo)], s, budget)):
            made[k, ends[k]] = new
        kept.update({k: (j, made[k, j]) for k, j in ends.items()})
    return labels


def autojudge_labels(
    pair: ModelPair,
    task: Task,
    example: Example,
    prompt: list[int],
    response: list[int],
    positions: list[int],
    draft_tokens: list[int],
    s: AutoJudgeSettings,
    budget: int,
) -> list[int]:
    """The labels of one response (see :func:`autojudge_labels_many`)."""
    item = Labelled(example, prompt, response, list(positions), list(draft_tokens))
    return autojudge_labels_many(pair, task, [item], s, budget)[0]
