"""train stage: shards -> DeepSpeed-trained judge head folder + metrics.json (+ wandb when enabled).

``run(cfg)`` resolves the config to plain values and calls the library (``selfjudge.judge_data``,
``selfjudge.trainer``). Rank 0 writes ``${train.output_dir}/head`` (a JudgeHead folder) and
``metrics.json``; checkpoints live in ``${train.output_dir}/checkpoints``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from selfjudge.extras import check_installed
from selfjudge.features import FeatureSpec
from selfjudge.io import code_version, config_hash, identity, sha256_file, write_json
from selfjudge.judge import JudgeConfig, JudgeHead
from selfjudge.judge_data import JudgeData, feature_stats, folder_list, load_judge_data
from selfjudge.locks import stage_lock
from selfjudge.settings import build, check_keys, is_int, require
from selfjudge.trainer import ZERO_STAGES, TrainSettings, shutdown, train_head

log = logging.getLogger("selfjudge.train")  # hydra's console and per-rank log file show it

# keys of train.* that do not change what is trained (a checkpoint made under other values still fits)
_RUN_ONLY_KEYS = (
    "epochs",
    "output_dir",
    "num_workers",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "resume",
    "eval_batch_size",
    "val_examples",
    "quantiles",
    "device",
    "data_dir",
)


@dataclass(frozen=True)
class TrainSection:
    """The ``train`` config section (conf/train/default.yaml documents each key)."""

    data_dir: Any  # a data_gen output folder, or a list of them
    output_dir: str
    epochs: int
    batch_size: int
    grad_accum: int
    grad_clip: float
    lr: float
    weight_decay: float
    val_fraction: float
    label_source: str
    use_negatives: Any  # true | false | auto (true unless the head reads scalars or regresses LD)
    seed: int
    num_workers: int
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    resume: bool
    device: str
    eval_batch_size: int
    val_examples: int
    quantiles: list
    features: Any = None  # None: the data folder's layout; a mapping like data_gen.features: a subset of it

    def __post_init__(self) -> None:
        if self.features is not None:
            require(
                isinstance(self.features, dict), "train.features", "null or a mapping of feature keys", self.features
            )
            try:
                FeatureSpec.from_mapping(self.features)
            except (KeyError, ValueError) as e:
                raise ValueError(f"train.features: {e.args[0]}") from None
        neg = self.use_negatives
        require(isinstance(neg, bool) or neg == "auto", "train.use_negatives", "true, false or auto", neg)
        for key in ("epochs", "batch_size", "grad_accum", "log_every", "eval_batch_size"):
            require(is_int(getattr(self, key), 1), f"train.{key}", "an integer >= 1", getattr(self, key))
        for key in ("num_workers", "checkpoint_every", "keep_checkpoints", "val_examples"):
            require(is_int(getattr(self, key), 0), f"train.{key}", "an integer >= 0", getattr(self, key))
        require(isinstance(self.lr, (int, float)) and self.lr > 0, "train.lr", "> 0", self.lr)
        require(
            isinstance(self.quantiles, list)
            and all(isinstance(q, (int, float)) and 0 <= q <= 1 for q in self.quantiles),
            "train.quantiles",
            "a list of numbers in [0, 1]",
            self.quantiles,
        )


def deepspeed_options() -> dict[str, int]:
    """conf/deepspeed/ option name -> its ZeRO stage."""
    from omegaconf import OmegaConf as _O

    folder = resources.files("selfjudge.conf") / "deepspeed"
    return {
        f.name[:-5]: int(_O.create(f.read_text())["zero_stage"]) for f in folder.iterdir() if f.name.endswith(".yaml")
    }


def settings(plain: dict) -> TrainSection:
    """train, judge and deepspeed sections checked (unknown keys, values) without reading any data."""
    t = build(TrainSection, plain["train"], "train")
    check_keys(plain["judge"], ["kind", "hidden_dim", "dropout", "objective"], "judge", required=False)
    check_keys(plain["deepspeed"], ["zero_stage", "bf16_on_gpu", "optimizer", "config"], "deepspeed")
    check_keys(plain["deepspeed"]["optimizer"], ["lr", "weight_decay", "betas", "eps"], "deepspeed.optimizer")
    options = deepspeed_options()
    ds = plain["deepspeed"]
    stage = int(ds["zero_stage"])
    if (
        stage not in options.values()
        or stage not in ZERO_STAGES
        or int(ds["config"]["zero_optimization"]["stage"]) != stage
    ):
        names = ", ".join(f"deepspeed={k}" for k in sorted(options))
        raise ValueError(f"deepspeed.zero_stage={stage} is not a stage the config defines: choose {names}")
    return t


def data_hashes(data_dirs: list[str]) -> list[str | None]:
    """Content hash of each data folder's manifest: data regenerated in place gets another training key."""
    return [
        sha256_file(Path(d) / "manifest.json") if (Path(d) / "manifest.json").is_file() else None for d in data_dirs
    ]


def settings_from(plain: dict) -> TrainSettings:
    """TrainSettings from the resolved config (train.*, judge and the deepspeed group), checked strictly."""
    t = settings(plain)
    ds = plain["deepspeed"]
    opt = ds["optimizer"]
    run_key = config_hash(
        identity(
            plain, {"train": _RUN_ONLY_KEYS, "judge": (), "deepspeed": ()}, data=data_hashes(folder_list(t.data_dir))
        )
    )
    return TrainSettings(
        epochs=t.epochs,
        lr=float(opt["lr"]),
        weight_decay=float(opt["weight_decay"]),
        betas=tuple(float(b) for b in opt["betas"]),
        eps=float(opt["eps"]),
        seed=t.seed,
        num_workers=t.num_workers,
        log_every=t.log_every,
        checkpoint_every=t.checkpoint_every,
        keep_checkpoints=t.keep_checkpoints,
        resume=bool(t.resume),
        device=str(t.device),
        quantiles=tuple(float(q) for q in t.quantiles),
        eval_batch_size=t.eval_batch_size,
        bf16_on_gpu=bool(ds["bf16_on_gpu"]),
        deepspeed=dict(ds["config"]),
        run_key=run_key,
    )


def build_head(plain: dict, data: JudgeData) -> JudgeHead:
    """A fresh head for ``data`` (seeded init, standardization from the training split)."""
    t, j, man = plain["train"], plain["judge"], data.manifest
    head = JudgeHead(
        JudgeConfig(
            kind=j["kind"],
            feature_dim=data.feature_dim,
            hidden_dim=int(j["hidden_dim"]),
            dropout=float(j["dropout"]),
            objective=str(j.get("objective", "classify")),
            ld_tau=float(man["tau"]) if j.get("objective") == "regress_ld" and "tau" in man else None,
            features=data.features.as_dict(),
            target_model=man["target_model"],
            draft_model=man.get("draft_model") or {},
            label_source=t["label_source"],
            extra={
                "data_dirs": folder_list(t["data_dir"]),
                "data_config_hash": man.get("config_hash"),
                "tau": man.get("tau"),
                "tokenizer": man.get("tokenizer"),
                "split": data.split,
                "use_negatives": data.use_negatives,
                "train": {k: t[k] for k in ("epochs", "batch_size", "grad_accum", "lr", "weight_decay", "seed")},
                "zero_stage": plain["deepspeed"]["zero_stage"],
                "code_version": code_version(),
            },
        )
    )
    head.init_weights(int(t["seed"]))
    head.set_standardization(*feature_stats(data.train))
    return head


def negatives(value: bool | str, judge: dict) -> bool | None:
    """train.use_negatives: auto is false for an LD regressor (mismatches only) and else left to the data's
    layout (None: :func:`selfjudge.judge_data.load_judge_data` decides)."""
    if value != "auto":
        return bool(value)
    return False if judge.get("objective") == "regress_ld" else None


@stage_lock(lambda cfg: cfg.train.output_dir, "train.output_dir")
def run(cfg: DictConfig, after_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Train the judge head; returns the final validation metrics and the written paths."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    check_installed(plain, ["train"])
    t = plain["train"]
    s = settings_from(plain)
    out = Path(t["output_dir"])
    data = load_judge_data(
        folder_list(t["data_dir"]),
        t["label_source"],
        negatives(t["use_negatives"], plain["judge"]),
        float(t["val_fraction"]),
        int(t["seed"]),
        features=None if t.get("features") is None else FeatureSpec.from_mapping(t["features"]),
    )
    head = build_head(plain, data)
    tracker = _Tracker(plain) if plain["logger"]["name"] == "wandb" and int(os.environ.get("RANK", "0")) == 0 else None
    try:
        res = train_head(
            head,
            data.train,
            data.val,
            s,
            out / "checkpoints",
            log=tracker.log if tracker else None,
            after_step=after_step,
        )
        final = res["final"]
        if res["rank"] == 0:
            head.config.thresholds = final["thresholds"]
            head.config.metrics = {k: v for k, v in final.items() if k not in ("thresholds",)}
            head.save_pretrained(out / "head")
            write_json(
                out / "metrics.json",
                {
                    "final": final,
                    "history": res["history"],
                    "split": data.split,
                    "head_dir": str(out / "head"),
                    "data_dirs": folder_list(t["data_dir"]),
                    "label_source": t["label_source"],
                    "judge": plain["judge"],
                    "lr": s.lr,
                    "weight_decay": s.weight_decay,
                    "zero_stage": s.zero_stage,
                    "world_size": res["world"],
                    "resumed_from": res["resumed_from"],
                    "run_key": s.run_key,
                    "code_version": code_version(),
                },
            )
            log.info(
                f"val ROC-AUC {final['roc_auc']:.4f}  PR-AUC {final['pr_auc']:.4f}  positive rate "
                f"{final['positive_rate']:.3f}  best epoch {final['best_epoch']}  ({final['seconds']:.1f} s) -> {out / 'head'}"
            )
            if tracker:
                tracker.finish(head, data, out)
    finally:
        if tracker:
            tracker.close()
        shutdown()
    return {
        "roc_auc": final["roc_auc"],
        "pr_auc": final["pr_auc"],
        "positive_rate": final["positive_rate"],
        "best_epoch": final["best_epoch"],
        "global_steps": res["global_steps"],
        "seconds": final["seconds"],
        "head_dir": str(out / "head"),
        "metrics": str(out / "metrics.json"),
        "resumed_from": res["resumed_from"],
    }


class _Tracker:
    """wandb logging on rank 0, in the run :func:`selfjudge.pipeline.tracking.start_run` opens."""

    def __init__(self, plain: dict):
        import wandb

        from selfjudge.pipeline.tracking import start_run

        self.wandb = wandb
        self.n_examples = int(plain["train"]["val_examples"])
        self.run = start_run(plain, "train")

    def log(self, step: int, metrics: dict) -> None:
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def finish(self, head: JudgeHead, data: JudgeData, out: Path) -> None:
        m = head.config.metrics
        self.run.summary.update({f"final/{k}": v for k, v in m.items() if isinstance(v, (int, float))})
        self.run.summary.update(
            {f"threshold/{k}": v for k, v in head.config.thresholds.items() if isinstance(v, float)}
        )
        cols, rows = validation_examples(head, data, self.n_examples)
        self.run.log({"val/examples": self.wandb.Table(columns=cols, data=rows)})
        art = self.wandb.Artifact(
            f"judge-head-{head.config.label_source}",
            type="model",
            metadata={k: v for k, v in m.items() if isinstance(v, (int, float))},
        )
        art.add_dir(str(out / "head"))
        art.add_file(str(out / "metrics.json"))
        self.run.log_artifact(art)

    def close(self) -> None:
        self.run.finish()


def _decoder(manifest: dict) -> Callable[[list[int]], str]:
    """Decode with the tokenizer the manifest names when it loads offline; else show the token ids."""
    name = (manifest.get("tokenizer") or {}).get("name_or_path")
    if name:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
            return lambda ids: tok.decode(ids)
        except (OSError, ValueError, KeyError) as e:
            log.warning(
                f"tokenizer '{name}' did not load offline ({type(e).__name__}); the examples table shows token ids"
            )
    return lambda ids: json.dumps(list(ids))


def validation_examples(head: JudgeHead, data: JudgeData, n: int) -> tuple[list[str], list[list]]:
    """(columns, rows) of the first ``n`` validation rows: context, target/draft token, label, P(important)."""
    import torch

    ds = data.val.with_format(None)
    rows = ds.select(range(min(n, len(ds))))
    dec = _decoder(data.manifest)
    cols = ["prompt_id", "context", "target_token", "draft_token", "substituted", "label", "p_important"]
    out = []
    for r in rows:
        i = int(r["position"])
        x = r["features"] if data.columns is None else [r["features"][c] for c in data.columns]
        p = float(head.predict_proba(torch.tensor([x], dtype=torch.float32))[0])
        out.append(
            [
                r["prompt_id"],
                dec(r["response_ids"][max(0, i - 16) : i]),
                dec([r["target_token"]]),
                dec([r["draft_token"]]),
                bool(r["substituted"]),
                int(r["label"]),
                p,
            ]
        )
    return cols, out
