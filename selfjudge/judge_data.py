"""Training data for the judge: data_gen shards, memory-mapped, split by prompt, standardized in a stream."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfjudge.shards import open_dataset


@dataclass
class JudgeData:
    train: Any                 # datasets.Dataset (torch format: features, label)
    val: Any
    feature_dim: int
    manifest: dict             # of the first folder (all folders share the target model)
    split: dict                # prompt ids per side, for the record


def _is_val(prompt_id: str, seed: int, fraction: float) -> bool:
    h = int(hashlib.sha256(f"{seed}:{prompt_id}".encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def load_judge_data(data_dirs: list[str], label_source: str, use_negatives: bool, val_fraction: float,
                    seed: int) -> JudgeData:
    import datasets

    if label_source not in ("selfjudge", "autojudge"):
        raise ValueError(f"train.label_source must be 'selfjudge' or 'autojudge', got '{label_source}'")
    parts, manifests = [], []
    for d in data_dirs:
        ds, man = open_dataset(d)
        feat = ds.features["features"]
        size = getattr(feat, "length", -1)
        if size != man["feature_dim"]:
            raise ValueError(f"features in '{d}' have size {size}, but its manifest says feature_dim={man['feature_dim']}")
        parts.append(ds)
        manifests.append(man)
    fps = {m["target_model"]["fingerprint"] for m in manifests}
    if len(fps) > 1:
        raise ValueError(f"train.data_dir mixes shards from different target models ({sorted(fps)}): "
                         f"train one judge per target")
    dims = {m["feature_dim"] for m in manifests}
    if len(dims) > 1:
        raise ValueError(f"train.data_dir folders have different feature sizes {sorted(dims)}")
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if label_source == "autojudge":
        ds = ds.filter(lambda a: [x != -1 for x in a], input_columns="autojudge_label", batched=True)
        ds = ds.remove_columns("label").rename_column("autojudge_label", "label")
    if not use_negatives:
        ds = ds.filter(lambda s: list(s), input_columns="substituted", batched=True)
    if len(ds) == 0:
        raise ValueError(f"train.data_dir {data_dirs} has no rows with {label_source} labels: nothing to train on")
    labels = np.asarray(ds["label"])
    if labels.min() == labels.max():
        raise ValueError(f"all {len(labels)} rows have label {int(labels[0])}: the judge needs both classes "
                         f"(check data_gen.tau or train.label_source)")
    pids = ds["prompt_id"]
    val_mask = np.array([_is_val(p, seed, val_fraction) for p in pids])
    if val_fraction > 0 and (val_mask.all() or not val_mask.any()):
        val_mask[:] = False  # too few prompts for a hash split: hold out the last prompt
        last = pids[-1]
        val_mask = np.array([p == last for p in pids])
    train = ds.select(np.nonzero(~val_mask)[0]).with_format("torch", columns=["features", "label"])
    val = ds.select(np.nonzero(val_mask)[0]).with_format("torch", columns=["features", "label"])
    split = {"val_fraction": val_fraction, "seed": seed,
             "val_prompts": sorted({p for p, v in zip(pids, val_mask) if v}),
             "train_prompts": len({p for p, v in zip(pids, val_mask) if not v})}
    return JudgeData(train, val, int(manifests[0]["feature_dim"]), manifests[0], split)


@torch.no_grad()
def feature_stats(ds, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the features, one streaming pass (float64 sums)."""
    n, s, ss = 0, None, None
    for start in range(0, len(ds), batch_size):
        x = ds[start : start + batch_size]["features"].double()
        s = x.sum(0) if s is None else s + x.sum(0)
        ss = (x * x).sum(0) if ss is None else ss + (x * x).sum(0)
        n += x.shape[0]
    mean = s / n
    var = (ss / n - mean * mean).clamp_min(0)
    return mean.float(), var.sqrt().float()


def folder_list(data_dir: str | list[str]) -> list[str]:
    dirs = [data_dir] if isinstance(data_dir, (str, Path)) else list(data_dir)
    if not dirs:
        raise ValueError("train.data_dir is empty")
    return [str(d) for d in dirs]
