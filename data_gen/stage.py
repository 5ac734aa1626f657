"""data_gen stage: the config turned into library calls; ranks from torchrun's environment."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from selfjudge import labelling, shards
from selfjudge.autojudge import read_labels
from selfjudge.extras import check_installed
from selfjudge.io import barrier, code_version, config_hash, identity, neutral_dataset, ranks
from selfjudge.locks import stage_lock
from selfjudge.models import model_key, pair_from_mapping, runtime_line
from selfjudge.responses import read_responses, responses_hash
from selfjudge.tasks import build_task, checker_key

log = logging.getLogger("selfjudge.data_gen")  # hydra's console and per-rank log file show it

# what decides the data: these config sections, minus the keys named (they never change a record)
IDENTITY = {
    "model": (),
    "data_gen": ("overwrite", "output_dir", "shard_prompts", "autojudge_labels_from", "responses_from"),
    "seed": (),
}
# what decides one AutoJudge label, whose key already names the prompt, the response's tokens, the position and the
# draft token: not which slice of the dataset was taken, nor the features, τ, scoring or shard sizes
LABEL_SLICE = ("ids", "limit", "offset", "shuffle", "seed")
LABEL_KEYS = ("dataset", "max_new_tokens", "autojudge")


def hashes(plain: dict) -> tuple[dict, str, str, str]:
    """(what decides the data, its config hash, the hash of its AutoJudge labels, that hash as written before
    ``autojudge.batch_size`` left it) from the resolved config; dtype auto as resolved here; with AutoJudge labels,
    the answer checker's revision. The regeneration batch changes a label by rounding at most (none in float32),
    so a faster machine may take a file made with another batch."""
    model = model_key(plain["model"])
    checker = checker_key(plain["data_gen"]["dataset"]) if plain["data_gen"]["autojudge"]["enabled"] else {}
    hashed = identity({**plain, "model": model}, IDENTITY, **checker)
    dg = plain["data_gen"]

    def labels(drop: tuple[str, ...]) -> str:
        return config_hash(
            {
                "model": model,
                "seed": plain["seed"],
                "data_gen": {
                    **{k: dg[k] for k in LABEL_KEYS},
                    "autojudge": {k: v for k, v in dg["autojudge"].items() if k not in drop},
                    "dataset": neutral_dataset({k: v for k, v in dg["dataset"].items() if k not in LABEL_SLICE}),
                },
                **checker,
            }
        )

    return hashed, config_hash(hashed), labels(("batch_size",)), labels(())


def settings(plain: dict) -> labelling.DataGenSettings:
    """The data_gen section checked (unknown keys, values) without loading anything."""
    return labelling.DataGenSettings.from_section(plain["data_gen"])


@stage_lock(lambda cfg: cfg.data_gen.output_dir, "data_gen.output_dir")
def run(cfg: DictConfig, after_shard: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run data_gen for this rank; rank 0 finalizes. Returns a summary (counts, positive rate, τ on rank 0).

    ``after_shard(index)`` is called after each written shard (tests use it to simulate a kill).
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    check_installed(plain, ["data_gen"])
    s = settings(plain)
    task = build_task(s.dataset)  # unknown dataset keys fail here
    examples = task.examples()
    # the pair before the process group: a cache entry one rank converts is written whole (save_pretrained writes
    # nothing on a rank other than 0 once torch.distributed is initialized)
    pair = pair_from_mapping(plain["model"])  # pairs with different vocabularies fail here
    rank, world = ranks()
    hashed, h, labels_h, labels_older = hashes(plain)
    if rank == 0:
        log.info(runtime_line(pair.runtime))
    prompts = labelling.tokenize_examples(pair, task, examples, s)  # empty sets and long prompts fail here
    out = s.output_dir
    if rank == 0:
        relaid = labelling.check_output_dir(out, h, world, s.overwrite, [e.id for e in examples])
        if relaid:
            log.info(relaid)
    base = {  # what every shard shares: the manifest less what finalize adds
        "target_model": pair.target_info.as_dict(),
        "draft_model": pair.draft_info.as_dict(),
        "tokenizer": {
            "name_or_path": pair.tokenizer.name_or_path,
            "len": len(pair.tokenizer),
            "vocab_size": pair.vocab_size,
        },
        "feature_dim": s.features.dim(pair.target_info.hidden_size, pair.draft_info.hidden_size),
        "features": s.features.as_dict(),
        "feature_dtype": s.feature_dtype,
        "runtime": pair.runtime,
        "config_hash": h,
        "labels_hash": labels_h,  # AutoJudge labels: another slice of the same dataset may take them
        "labels_hash_older": labels_older,  # a labels file written under the older hash is taken too
        "config": hashed,
        "seed": plain["seed"],
        "code_version": code_version(),
        "world_size": world,
        "task": task.name,
        "max_new_tokens": s.max_new_tokens,
        "label_sources": ["selfjudge"] + (["autojudge"] if s.autojudge.enabled and task.has_checker else []),
    }
    if rank == 0:
        shards.write_run_info(out, {**base, "tau_rule": dict(s.tau)})  # a snapshot of the run reads it
    barrier(world)
    pending = labelling.read_layout(out)  # after the barrier: rank 0 has set the layout
    torch.manual_seed(int(plain["seed"]))
    known = read_labels(s.autojudge_labels_from, h, labels_h, older=labels_older) if s.autojudge_labels_from else None
    if known is not None and rank == 0:
        log.info(
            "%d AutoJudge labels of an earlier run from %s: taken, not regenerated", len(known), s.autojudge_labels_from
        )
    given = read_responses(s.responses_from, responses_hash(hashed)) if s.responses_from else None
    if given is not None and rank == 0:
        log.info("%d responses of an earlier run from %s: taken, not generated", len(given), s.responses_from)
    stats = labelling.run_rank(
        pair, task, examples, prompts, s, out, rank, world, after_shard, known, pending, given=given
    )
    pair.release()  # a finished rank waits at the barrier without its models
    barrier(world)
    result: dict[str, Any] = {"output_dir": out, "rank_stats": stats}
    if rank == 0:
        manifest = labelling.finalize(out, world, s, base, [e.id for e in examples])
        result.update(counts=manifest["counts"], positive_rate=manifest["positive_rate"], tau=manifest["tau"])
        if plain["logger"]["name"] == "wandb":
            _log_wandb(plain, manifest)
        log.info(
            "%s positive_rate=%.3f tau=%.4f -> %s",
            json.dumps(manifest["counts"]),
            manifest["positive_rate"],
            manifest["tau"],
            out,
        )
    barrier(world)
    return result


def _log_wandb(plain: dict, manifest: dict) -> None:
    """The run's counts, positive rate, τ and LD histogram (rank 0, after finalize)."""
    import numpy as np
    import wandb

    from selfjudge.pipeline.tracking import start_run

    run = start_run(plain, "data_gen")
    hist = manifest["ld_histogram"]
    if hist["counts"]:
        run.log({"data_gen/ld": wandb.Histogram(np_histogram=(np.asarray(hist["counts"]), np.asarray(hist["bins"])))})
    run.summary.update({f"data_gen/{k}": v for k, v in manifest["counts"].items()})
    run.summary.update({"data_gen/positive_rate": manifest["positive_rate"], "data_gen/tau": manifest["tau"]})
    run.finish()
