"""data_gen stage: the config turned into library calls; ranks from torchrun's environment."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from selfjudge import datagen
from selfjudge.extras import check_installed
from selfjudge.io import code_version, config_hash
from selfjudge.locks import stage_lock
from selfjudge.models import model_key, pair_from_mapping, runtime_line
from selfjudge.tasks import build_task

STAGE_KEYS = ("output_dir", "overwrite", "dataset")  # data_gen keys that are not DataGenSettings


def _dist() -> tuple[int, int]:
    """(rank, world size); a gloo group (for barriers only) when torchrun started several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return rank, world


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


@stage_lock(lambda cfg: cfg.data_gen.output_dir, "data_gen.output_dir")
def run(cfg: DictConfig, after_shard: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run data_gen for this rank; rank 0 finalizes. Returns a summary (counts, positive rate, τ on rank 0).

    ``after_shard(index)`` is called after each written shard (tests use it to simulate a kill).
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    check_installed(plain, ["data_gen"])
    d = plain["data_gen"]
    s = datagen.DataGenSettings.from_mapping({k: v for k, v in d.items() if k not in STAGE_KEYS})
    task = build_task(d["dataset"])               # unknown dataset keys fail here
    examples = task.examples()
    rank, world = _dist()
    hashed = {"model": model_key(plain["model"]),  # dtype auto as resolved on this machine
              "data_gen": {k: v for k, v in d.items() if k not in ("overwrite", "output_dir")}, "seed": plain["seed"]}
    h = config_hash(hashed)
    pair = pair_from_mapping(plain["model"])      # pairs with different vocabularies fail here
    if rank == 0:
        print(f"[data_gen] {runtime_line(pair.runtime)}")
    prompts = datagen.tokenize_examples(pair, task, examples, s)  # empty sets and long prompts fail here
    out = d["output_dir"]
    if rank == 0:
        datagen.check_output_dir(out, h, world, bool(d["overwrite"]))
    _barrier(world)
    torch.manual_seed(int(plain["seed"]))
    stats = datagen.run_rank(pair, task, examples, prompts, s, out, rank, world, after_shard)
    _barrier(world)
    result: dict[str, Any] = {"output_dir": out, "rank_stats": stats}
    if rank == 0:
        base = {
            "target_model": pair.target_info.as_dict(), "draft_model": pair.draft_info.as_dict(),
            "tokenizer": {"name_or_path": pair.tokenizer.name_or_path, "len": len(pair.tokenizer),
                          "vocab_size": pair.vocab_size},
            "feature_dim": s.features.dim(pair.target_info.hidden_size, pair.draft_info.hidden_size),
            "features": s.features.as_dict(), "feature_dtype": s.feature_dtype, "runtime": pair.runtime,
            "config_hash": h, "config": hashed, "seed": plain["seed"], "code_version": code_version(),
            "world_size": world, "task": task.name, "max_new_tokens": s.max_new_tokens,
            "label_sources": ["selfjudge"] + (["autojudge"] if s.autojudge.enabled and task.has_checker else []),
        }
        manifest = datagen.finalize(out, world, s, base)
        result.update(counts=manifest["counts"], positive_rate=manifest["positive_rate"], tau=manifest["tau"])
        print(f"[data_gen] {json.dumps(manifest['counts'])} positive_rate={manifest['positive_rate']:.3f} "
              f"tau={manifest['tau']:.4f} -> {out}")
    _barrier(world)
    return result
