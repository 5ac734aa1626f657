"""A data_gen-format shards folder for the judge tests (the columns of labelling.to_table), built with ``selfjudge.shards``.

Per prompt, ``per_prompt`` mismatches; each gives a substituted row (label 1 with probability ``pos_rate``)
and an original-token negative (label 0). Features are drawn from two Gaussians (class means differ
along one direction), offset and scaled per dimension like hidden states, so standardization matters.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from selfjudge import shards
from selfjudge.labelling import RECORD_TYPES

DIM = 16
COLUMN_TYPES = RECORD_TYPES  # the one schema data_gen writes


def make_shards(
    root: Path,
    n_prompts: int = 40,
    per_prompt: int = 10,
    seed: int = 0,
    fingerprint: str = "sha256:" + "a" * 64,
    dim: int = DIM,
    one_class: bool = False,
    separation: float = 1.2,
    pos_rate: float = 0.4,
    feature_dtype: str = "float16",
    shard_rows: int = 300,
    tokenizer: str | None = None,
    prompt_prefix: str = "p",
) -> Path:
    """Write the folder and return it. ``one_class``: every label 0."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    offset, scale = rng.normal(0, 5, size=dim), rng.uniform(0.5, 4.0, size=dim)
    rows, feats = [], []
    for p in range(n_prompts):
        resp = rng.integers(5, 500, size=per_prompt + 4).astype(np.int32).tolist()
        for i in range(per_prompt):
            imp = 0 if one_class else int(rng.random() < pos_rate)
            aj = -1 if i % 2 else (imp if rng.random() < 0.9 else 1 - imp)  # half computed, mostly agreeing
            ld = 0.2 * imp + rng.normal(0, 0.05)
            for sub in (True, False):
                lab = imp if sub else 0
                x = rng.normal(size=dim) + separation * (lab - 0.5) * direction
                feats.append(offset + scale * x)
                rows.append(
                    {
                        "prompt_id": f"{prompt_prefix}{p}",
                        "task": "synthetic",
                        "prompt_ids": [1, 2, 3 + p],
                        "response_ids": resp,
                        "position": i,
                        "target_token": resp[i],
                        "draft_token": resp[i] + 1,
                        "substituted": sub,
                        "orig": -1.0,
                        "alt": -1.0 - ld,
                        "ld": ld if sub else math.nan,
                        "label": lab,
                        "autojudge_label": aj if sub or aj == -1 else 0,
                    }
                )
    f = np.stack(feats).astype(feature_dtype)
    table = pa.table(
        {
            **{k: pa.array([r[k] for r in rows], t) for k, t in COLUMN_TYPES.items()},
            "features": pa.FixedSizeListArray.from_arrays(pa.array(f.reshape(-1)), dim),
        }
    )
    names = []
    for k, start in enumerate(range(0, len(table), shard_rows)):
        shards.write_shard(root, 0, k, table.slice(start, shard_rows))
        names.append(shards.shard_name(0, k))
    n_mis = len(rows) // 2
    positives = sum(r["label"] for r in rows if r["substituted"])
    target = {
        "role": "target",
        "source": "synthetic",
        "name": "synthetic-target",
        "folder": "none",
        "fingerprint": fingerprint,
        "model_type": "qwen2",
        "num_layers": 2,
        "hidden_size": dim,
        "vocab_size": 512,
        "adapter": None,
    }
    shards.write_manifest(
        root,
        {
            "complete": True,
            "shards": names,
            "feature_dim": dim,
            "features": {"layers": [-1], "include_draft": False},
            "target_model": target,
            "draft_model": {**target, "role": "draft", "name": "synthetic-draft", "fingerprint": "sha256:d"},
            "tokenizer": {"name_or_path": tokenizer, "len": 512} if tokenizer else {"name_or_path": None, "len": 512},
            "config_hash": f"synthetic{seed}",
            "config": {},
            "seed": seed,
            "code_version": "test",
            "counts": {"prompts": n_prompts, "mismatches": n_mis, "positives": positives, "records": len(rows)},
            "positive_rate": positives / n_mis,
            "ld_histogram": {"bins": [], "counts": []},
            "tau": 0.1,
            "score_variant": "continuation",
            "window": 8,
            "label_sources": ["selfjudge", "autojudge"],
        },
    )
    return root
