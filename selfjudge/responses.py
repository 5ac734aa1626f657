"""The target's responses of a data_gen run as a small file, so that a run on another machine takes them.

A bf16 greedy response depends on the machine's arithmetic (a near-tie between two tokens can go either way on
another CPU or GPU), and AutoJudge labels bind to a response token for token (:func:`selfjudge.autojudge.label_key`):
on a new machine a third or more of the committed labels would no longer apply and would be regenerated, the
costliest part of a run. With the responses file (``data_gen.responses_from``) the run teacher-forces the very
responses the labels were made for: no generation, no regeneration for them, only the target's pass over each
response and the scoring. The file holds, per prompt id, a hash of the prompt's token ids (a prompt formatted
otherwise is not taken) and the response's token ids; its header holds the hash of what decides a response (the
model and its dtype, the response budget). One gzipped JSON line each, sorted, no timestamp: the same responses
give the same bytes, so a file is rewritten only when it changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

RESPONSES_FORMAT = "selfjudge-responses/1"
KEY = "data_gen.responses_from"


def responses_hash(hashed: Mapping) -> str:
    """What decides a response, from a data_gen run's identity (``manifest["config"]``): the model section (its
    dtype resolved, kernels left out) and the response budget."""
    from selfjudge.io import config_hash

    return config_hash({"model": hashed["model"], "max_new_tokens": hashed["data_gen"]["max_new_tokens"]})


def prompt_sha(prompt: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps([int(t) for t in prompt]).encode()).hexdigest()[:16]


def write_responses(path: str | Path, responses_hash: str, entries: Mapping[str, tuple[str, list[int]]]) -> bool:
    """``entries``: prompt id -> (prompt sha, response ids); written atomically, only when the content changed
    (returns whether it was written)."""
    from selfjudge.io import write_jsonl_gz

    head = {"format": RESPONSES_FORMAT, "responses_hash": responses_hash}
    rows = [
        {"id": i, "prompt_sha": sha, "response": [int(t) for t in resp]} for i, (sha, resp) in sorted(entries.items())
    ]
    return write_jsonl_gz(path, head, rows)


def read_responses(path: str | Path, responses_hash: str, key: str = KEY) -> dict[str, tuple[str, list[int]]]:
    """The responses of a file :func:`write_responses` wrote under ``responses_hash``; a missing file, another
    format or the responses of another model, dtype or response budget is an error naming ``key``."""
    from selfjudge.io import read_jsonl_gz

    p = Path(path)
    head, rows = read_jsonl_gz(p, RESPONSES_FORMAT, key, "a responses file")
    if head.get("responses_hash") != responses_hash:
        raise ValueError(
            f"{key}: '{p}' holds the responses of another model, dtype or data_gen.max_new_tokens "
            f"(responses_hash {head.get('responses_hash')} != {responses_hash}): use the file of this config, or none"
        )
    return {r["id"]: (r["prompt_sha"], [int(t) for t in r["response"]]) for r in rows}


def export_responses(data_dir: str | Path, path: str | Path) -> int:
    """Write the responses of a data folder (finished, or the shards written so far) to ``path`` (only when they
    changed), with those ``path`` already holds under the same hash (a file of another config is replaced).
    A prompt whose response had no mismatch has no record, so no entry: a run taking the file generates it.
    Returns how many responses the file holds."""
    import pyarrow.parquet as pq

    from selfjudge import shards

    root = Path(data_dir)
    man = shards.read_manifest(root) if (root / shards.MANIFEST).is_file() else shards.snapshot_manifest(root)
    h = responses_hash(man["config"])
    entries: dict[str, tuple[str, list[int]]] = {}
    for name in man["shards"]:
        t = pq.read_table(root / shards.SHARD_DIR / name, columns=["prompt_id", "prompt_ids", "response_ids"])
        ids = t.column("prompt_id").to_pylist()
        first = [k for k, pid in enumerate(ids) if pid not in entries and (k == 0 or ids[k - 1] != pid)]
        for k in first:
            entries.setdefault(ids[k], (prompt_sha(t["prompt_ids"][k].as_py()), t["response_ids"][k].as_py()))
    kept: dict[str, tuple[str, list[int]]] = {}
    if Path(path).is_file():
        try:
            kept = read_responses(path, h, key=str(path))
        except ValueError:  # another config's responses: replaced
            pass
    entries = {**kept, **entries}
    write_responses(path, h, entries)
    return len(entries)
