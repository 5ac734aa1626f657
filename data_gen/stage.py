"""data_gen stage: turn the config into library calls; ranks from torchrun's environment."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from selfjudge import datagen
from selfjudge.features import FeatureSpec
from selfjudge.io import code_version, config_hash
from selfjudge.models import pair_from_mapping
from selfjudge.tasks import build_task


def settings_from(d: dict) -> datagen.DataGenSettings:
    tau = d["tau"]
    return datagen.DataGenSettings(
        max_new_tokens=int(d["max_new_tokens"]), batch_size=int(d["batch_size"]), window=int(d["window"]),
        score_variant=d["score_variant"], tau_mode=tau["mode"], tau_value=float(tau["value"]),
        tau_quantile=float(tau["quantile"]), features=FeatureSpec.from_mapping(d["features"]),
        feature_dtype=d["feature_dtype"], shard_size=int(d["shard_size"]), scorer=d["scorer"],
        max_prompt_tokens=int(d["max_prompt_tokens"]), max_packed_tokens=int(d["max_packed_tokens"]),
        autojudge=dict(d["autojudge"]),
    )


def _dist() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return rank, world


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def run(cfg: DictConfig, after_shard=None) -> dict[str, Any]:
    """Run data_gen for this rank; rank 0 finalizes. Returns the manifest's counts (rank 0)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    d = plain["data_gen"]
    s = settings_from(d)
    task = build_task(d["dataset"])
    examples = task.examples()
    rank, world = _dist()
    hashed = {"model": plain["model"], "data_gen": {k: v for k, v in d.items() if k not in ("overwrite", "output_dir")},
              "seed": plain["seed"]}
    h = config_hash(hashed)
    out = d["output_dir"]
    if rank == 0:
        datagen.check_output_dir(out, h, bool(d["overwrite"]))
    _barrier(world)
    torch.manual_seed(int(plain["seed"]))
    pair = pair_from_mapping(plain["model"])
    stats = datagen.run_rank(pair, task, examples, s, out, rank, world, after_shard)
    _barrier(world)
    result: dict[str, Any] = {"rank_stats": stats}
    if rank == 0:
        base = {
            "target_model": pair.target_info.as_dict(), "draft_model": pair.draft_info.as_dict(),
            "tokenizer": {"name_or_path": pair.tokenizer.name_or_path, "size": len(pair.tokenizer)},
            "feature_dim": s.features.dim(pair.target_info.hidden_size, pair.draft_info.hidden_size),
            "features": s.features.as_dict(), "feature_dtype": s.feature_dtype,
            "config_hash": h, "config": hashed, "seed": plain["seed"], "code_version": code_version(),
            "world_size": world, "label_sources": ["selfjudge"] + (["autojudge"] if s.autojudge.get("enabled") else []),
            "task": task.name,
        }
        manifest = datagen.finalize(out, world, s, base)
        result.update(counts=manifest["counts"], positive_rate=manifest["positive_rate"], tau=manifest["tau"])
        print(f"[data_gen] {json.dumps(result['counts'])} positive_rate={manifest['positive_rate']:.3f} "
              f"tau={manifest['tau']:.4f} -> {out}")
    _barrier(world)
    return result
