"""train stage: shards -> DeepSpeed-trained judge head folder + metrics.json (+ wandb when enabled)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from selfjudge.features import FeatureSpec
from selfjudge.io import code_version, write_json
from selfjudge.judge import JudgeConfig, JudgeHead
from selfjudge.judge_data import feature_stats, folder_list, load_judge_data
from selfjudge.trainer import TrainSettings, shutdown, train_head


def settings_from(t: dict, ds: dict) -> TrainSettings:
    stage = ds.get("zero_stage")
    return TrainSettings(
        epochs=int(t["epochs"]), batch_size=int(ds["train_micro_batch_size_per_gpu"]),
        grad_accum=int(ds["gradient_accumulation_steps"]), grad_clip=float(ds["gradient_clipping"]),
        lr=float(t["lr"]), weight_decay=float(t["weight_decay"]), seed=int(t["seed"]),
        num_workers=int(t["num_workers"]), log_every=int(t["log_every"]), resume=bool(t["resume"]),
        device=t["device"], quantiles=tuple(t["quantiles"]), zero_stage=int(stage) if stage is not None else -1,
        bf16_on_gpu=bool(ds["bf16_on_gpu"]),
    )


def run(cfg: DictConfig, after_epoch=None) -> dict[str, Any]:
    plain = OmegaConf.to_container(cfg, resolve=True)
    t, j = plain["train"], plain["judge"]
    s = settings_from(t, plain["deepspeed"])
    out = Path(t["output_dir"])
    data = load_judge_data(folder_list(t["data_dir"]), t["label_source"], bool(t["use_negatives"]),
                           float(t["val_fraction"]), int(t["seed"]))
    man = data.manifest
    head = JudgeHead(JudgeConfig(
        kind=j["kind"], feature_dim=data.feature_dim, hidden_dim=int(j["hidden_dim"]) or 256, dropout=float(j["dropout"]),
        features=FeatureSpec.from_mapping(man["features"]).as_dict(), target_model=man["target_model"],
        draft_model=man["draft_model"], label_source=t["label_source"],
        extra={"data_dirs": folder_list(t["data_dir"]), "data_config_hash": man["config_hash"], "split": data.split,
               "code_version": code_version()},
    ))
    head.set_standardization(*feature_stats(data.train))
    tracker = _Tracker(plain) if plain["logger"]["name"] == "wandb" else None
    try:
        res = train_head(head, data.train, data.val, s, out / "checkpoints",
                         log=tracker.log if tracker else None, after_epoch=after_epoch)
        final = res["final"]
        if res["rank"] == 0:
            head.config.thresholds = final["thresholds"]
            head.config.metrics = {k: v for k, v in final.items() if k != "thresholds"}
            head.save_pretrained(out / "head")
            write_json(out / "metrics.json", {"final": final, "history": res["history"], "split": data.split,
                                              "train_rows": len(data.train), "val_rows": len(data.val)})
            print(f"[train] val ROC-AUC {final['roc_auc']:.4f}  PR-AUC {final['pr_auc']:.4f}  "
                  f"positive rate {final['positive_rate']:.3f}  ({final['seconds']:.1f} s) -> {out / 'head'}")
            if tracker:
                tracker.finish(head, data, out / "head", man)
    finally:
        shutdown()
    return {"roc_auc": final["roc_auc"], "pr_auc": final["pr_auc"], "positive_rate": final["positive_rate"],
            "seconds": final["seconds"]}


class _Tracker:
    """wandb logging for rank 0 (imported only when logger=wandb)."""

    def __init__(self, plain: dict):
        import os

        import wandb

        self.wandb = wandb
        lg = plain["logger"]
        self.run = None
        if int(os.environ.get("RANK", "0")) == 0:
            self.run = wandb.init(project=lg["project"], entity=lg["entity"], mode=lg["mode"], config=plain,
                                  tags=list(lg["tags"]) + ["train"], dir=plain["run_dir"], job_type="train")

    def log(self, step: int, metrics: dict) -> None:
        if self.run:
            self.run.log(metrics, step=step)

    def finish(self, head: JudgeHead, data, head_dir: Path, manifest: dict) -> None:
        if not self.run:
            return
        self.run.summary.update({f"final/{k}": v for k, v in head.config.metrics.items() if isinstance(v, (int, float))})
        rows = _validation_examples(head, data, manifest)
        self.run.log({"val/examples": self.wandb.Table(columns=["context", "target", "draft", "label", "p_important"], data=rows)})
        art = self.wandb.Artifact("judge-head", type="model", metadata=head.config.metrics)
        art.add_dir(str(head_dir))
        self.run.log_artifact(art)
        self.run.finish()


def _validation_examples(head: JudgeHead, data, manifest: dict, n: int = 50) -> list[list]:
    import torch

    ds = data.val.with_format(None)
    rows = ds.select(range(min(n, len(ds))))
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(manifest["target_model"]["folder"])
        dec = lambda ids: tok.decode(ids)  # noqa: E731
    except (OSError, ValueError):
        dec = lambda ids: json.dumps(ids)  # noqa: E731
    out = []
    for r in rows:
        i = r["position"]
        ctx = dec(r["response_ids"][max(0, i - 12) : i])
        p = float(head.predict_proba(torch.tensor([r["features"]], dtype=torch.float32))[0])
        out.append([ctx, dec([r["target_token"]]), dec([r["draft_token"]]), int(r["label"]), p])
    return out
