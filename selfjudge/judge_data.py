"""Training data for the judge: data_gen shards, memory-mapped, split by prompt, standardized in a stream.

The shards are opened through ``selfjudge.shards.open_dataset`` (Arrow, memory-mapped); filters and the
split only build index mappings, so the features are never all in RAM. The validation side is chosen per
*prompt* (a hash of the prompt id with the seed), never per token. A head may read a subset of the stored
features (``train.features``): one data folder with a wide layout serves heads of several feature sets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from selfjudge.features import FeatureSpec
from selfjudge.shards import open_dataset

LABEL_SOURCES = ("selfjudge", "autojudge")
TORCH_COLUMNS = ["features", "label", "ld"]  # ld: the target of regress_ld heads (NaN on negatives)


@dataclass
class JudgeData:
    train: Any  # datasets.Dataset, torch format: features [D] (float16/32), label int
    val: Any  # same, validation prompts only
    feature_dim: int
    manifest: dict  # of the first folder (all folders share the target model and layout)
    split: dict  # seed, fraction, validation prompt ids, row and prompt counts
    features: FeatureSpec  # the head's layout: the folder's, or the subset train.features chose
    columns: list[int] | None = None  # where the head's features sit in a stored row (None: all of it)
    use_negatives: bool = True  # whether the original-token rows (label 0) are in (train.use_negatives, resolved)


class FeatureColumns:
    """A dataset view whose ``features`` are some of the stored columns, in a given order (``train.features``);
    rows come as the underlying torch-format dataset gives them (index, slice, or a DataLoader's batch)."""

    def __init__(self, ds: Any, columns: list[int]):
        self.ds, self.columns = ds, torch.as_tensor(columns, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.ds)

    def _cut(self, row: dict) -> dict:
        return {**row, "features": row["features"][..., self.columns]}

    def __getitem__(self, key: Any) -> dict:
        return self._cut(self.ds[key])

    def __getitems__(self, keys: list[int]) -> list[dict]:
        return [self._cut(r) for r in self.ds.__getitems__(keys)]


def folder_list(data_dir: str | Path | Sequence[str | Path]) -> list[str]:
    """``train.data_dir`` as a list of folders (one folder or a list)."""
    dirs = [data_dir] if isinstance(data_dir, (str, Path)) else list(data_dir)
    if not dirs:
        raise ValueError("train.data_dir is empty: give a data_gen output folder or a list of them")
    return [str(d) for d in dirs]


def is_val_prompt(prompt_id: str, seed: int, fraction: float) -> bool:
    """Prompt-level split: a stable hash of (seed, prompt_id) below ``fraction`` -> validation."""
    h = int(hashlib.sha256(f"{seed}:{prompt_id}".encode()).hexdigest()[:12], 16)
    return h / float(16**12) < fraction


def _check_folder(folder: str, ds: Any, man: dict) -> int:
    """Feature size: the column, the manifest's feature_dim and its layout x hidden sizes must agree."""
    if "features" not in ds.column_names:
        raise ValueError(f"'{folder}' has no 'features' column: not a data_gen output (train.data_dir)")
    dim = int(man.get("feature_dim", -1))
    col = getattr(ds.features["features"], "length", -1)
    if col == -1 and len(ds):
        col = len(ds[0]["features"])
    if col != dim:
        raise ValueError(
            f"features in '{folder}' have size {col}, but its manifest says feature_dim={dim}: "
            f"the folder is inconsistent, regenerate it with data_gen (train.data_dir)"
        )
    tgt, drf = man.get("target_model") or {}, man.get("draft_model") or {}
    if "features" in man and tgt.get("hidden_size"):
        spec = FeatureSpec.from_mapping(man["features"])
        want = spec.dim(int(tgt["hidden_size"]), drf.get("hidden_size"))
        if want != dim:
            raise ValueError(
                f"'{folder}': manifest feature_dim={dim} does not match its features layout "
                f"{spec.as_dict()} with target hidden size {tgt['hidden_size']} (= {want})"
            )
    return dim


def _same(manifests: list[dict], dirs: list[str], key: str, what: str, get) -> None:
    vals = {d: get(m) for d, m in zip(dirs, manifests)}
    if len({repr(v) for v in vals.values()}) > 1:
        raise ValueError(
            f"train.data_dir mixes shards with different {what}: "
            + "; ".join(f"'{d}': {v}" for d, v in vals.items())
            + f" ({key}): train one judge per target and layout"
        )


def load_judge_data(
    data_dirs: Sequence[str],
    label_source: str,
    use_negatives: bool | None,
    val_fraction: float,
    seed: int,
    features: FeatureSpec | None = None,
) -> JudgeData:
    """Open, check, filter and split the shards of one or more data_gen folders (same target model); with
    ``features``, rows carry only that subset of the stored layout (train.features). ``use_negatives`` None
    (train.use_negatives=auto): the original-token rows are in unless the head's layout holds a scalar, where
    such a row (gap 0, log p(d) = the top-1's) is trivially label 0."""
    import datasets

    if label_source not in LABEL_SOURCES:
        raise ValueError(f"train.label_source must be one of {LABEL_SOURCES}, got '{label_source}'")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"train.val_fraction must be in (0, 1), got {val_fraction}")
    dirs = folder_list(data_dirs)
    parts, manifests = [], []
    for d in dirs:
        ds, man = open_dataset(d)
        _check_folder(d, ds, man)
        parts.append(ds)
        manifests.append(man)
    _same(
        manifests,
        dirs,
        "target_model.fingerprint",
        "target models",
        lambda m: (m.get("target_model") or {}).get("fingerprint"),
    )
    _same(manifests, dirs, "feature_dim", "feature sizes", lambda m: m["feature_dim"])
    _same(
        manifests, dirs, "features", "feature layouts", lambda m: FeatureSpec.from_mapping(m.get("features")).as_dict()
    )
    if label_source == "autojudge" and "autojudge" not in manifests[0].get("label_sources", ["autojudge"]):
        raise ValueError(
            f"train.label_source=autojudge, but '{dirs[0]}' has no AutoJudge labels "
            f"(manifest label_sources {manifests[0].get('label_sources')}): enable them in data_gen"
        )
    stored = FeatureSpec.from_mapping(manifests[0].get("features"))
    if use_negatives is None:
        use_negatives = not (features or stored).scalars
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if label_source == "autojudge":  # rows without an AutoJudge label (-1) are dropped
        ds = ds.filter(lambda a: [x != -1 for x in a], input_columns="autojudge_label", batched=True, batch_size=65536)
        ds = ds.remove_columns("label").rename_column("autojudge_label", "label")
    if not use_negatives:
        ds = ds.filter(lambda s: list(s), input_columns="substituted", batched=True, batch_size=65536)
    if len(ds) == 0:
        raise ValueError(
            f"train.data_dir {dirs} has no rows with {label_source} labels "
            f"(train.label_source={label_source}, train.use_negatives={use_negatives}): nothing to train on"
        )
    labels = ds.with_format("numpy", columns=["label"])[:]["label"]  # [N] int8 (small: no features)
    if labels.min() == labels.max():
        raise ValueError(
            f"all {len(labels)} rows have label {int(labels[0])}: the judge needs both classes "
            f"(check data_gen.tau, train.label_source or train.use_negatives)"
        )
    pids = ds.select_columns(["prompt_id"])[:]["prompt_id"]  # [N] str
    uniq = sorted(set(pids))
    val_ids = {p for p in uniq if is_val_prompt(p, seed, val_fraction)}
    if not val_ids or len(val_ids) == len(uniq):
        if len(uniq) < 2:
            raise ValueError("train.data_dir has a single prompt: a prompt-level split needs at least two")
        val_ids = {uniq[-1]} if not val_ids else set(uniq[1:])  # too few prompts for the hash: keep both sides
    val_mask = np.fromiter((p in val_ids for p in pids), dtype=bool, count=len(pids))
    for side, mask in (("training", ~val_mask), ("validation", val_mask)):
        if len(np.unique(labels[mask])) < 2:
            raise ValueError(
                f"the {side} split has only one class ({int(mask.sum())} rows): change train.val_fraction "
                f"or train.seed, or generate more data"
            )
    train = ds.select(np.nonzero(~val_mask)[0]).with_format("torch", columns=TORCH_COLUMNS)
    val = ds.select(np.nonzero(val_mask)[0]).with_format("torch", columns=TORCH_COLUMNS)
    dim, columns = int(manifests[0]["feature_dim"]), None
    if features is not None and features != stored:
        tgt, drf = manifests[0].get("target_model") or {}, manifests[0].get("draft_model") or {}
        if not tgt.get("hidden_size"):
            raise ValueError(f"'{dirs[0]}': its manifest has no target hidden size, so train.features cannot slice it")
        try:
            columns = features.columns_in(stored, int(tgt["hidden_size"]), drf.get("hidden_size"))
        except ValueError as e:
            raise ValueError(f"train.features: {e}") from None
        train, val, dim = FeatureColumns(train, columns), FeatureColumns(val, columns), len(columns)
    split = {
        "seed": seed,
        "val_fraction": val_fraction,
        "val_prompts": sorted(val_ids),
        "n_train_prompts": len(uniq) - len(val_ids),
        "n_val_prompts": len(val_ids),
        "n_train_rows": int((~val_mask).sum()),
        "n_val_rows": int(val_mask.sum()),
        "train_positive_rate": float(labels[~val_mask].mean()),
        "val_positive_rate": float(labels[val_mask].mean()),
    }
    return JudgeData(train, val, dim, manifests[0], split, features or stored, columns, use_negatives)


@torch.no_grad()
def feature_stats(ds: Any, batch_size: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std ([D] each, float32) of the features in one streaming pass (float64, shifted sums)."""
    n, s, ss, shift = 0, None, None, None
    for start in tqdm(range(0, len(ds), batch_size), desc="feature stats", leave=False, disable=len(ds) <= batch_size):
        x = ds[start : start + batch_size]["features"].double()  # [b, D]
        shift = x[0].clone() if shift is None else shift  # shifting keeps the variance precise
        x = x - shift
        s = x.sum(0) if s is None else s + x.sum(0)
        ss = (x * x).sum(0) if ss is None else ss + (x * x).sum(0)
        n += x.shape[0]
    if n == 0:
        raise ValueError("no training rows to compute standardization statistics from")
    m = s / n
    var = (ss / n - m * m).clamp_min(0)
    return (m + shift).float(), var.sqrt().float()
