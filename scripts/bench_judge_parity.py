"""Parity of the logistic judge head with scikit-learn on real shards (same features, same prompt split).

    python scripts/bench_judge_parity.py runs/qwen/data                    # prints both AUCs, writes JSON
    python scripts/bench_judge_parity.py runs/qwen/data --device cuda --out docs/bench/judge_parity.json

Ours: the library trainer (DeepSpeed, AdamW, standardization from the training split) over a weight
decay grid, best epoch by validation ROC-AUC. Reference: StandardScaler + LogisticRegression (L2) over a
C grid (the authors' recipe). Both are scored by ``selfjudge.judge_metrics.roc_auc`` on the same rows.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


from selfjudge.io import write_json
from selfjudge.judge import JudgeConfig, JudgeHead
from selfjudge.judge_data import feature_stats, load_judge_data
from selfjudge.judge_metrics import roc_auc
from selfjudge.trainer import TrainSettings, shutdown, train_head


def train_settings(a: argparse.Namespace, weight_decay: float) -> TrainSettings:
    """The train stage's settings (conf/ defaults) with this script's arguments."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from selfjudge.train.stage import settings_from

    with initialize_config_module("selfjudge.conf", version_base="1.3"):
        cfg = compose(
            "selfjudge",
            overrides=[
                f"train.epochs={a.epochs}",
                f"train.lr={a.lr}",
                f"train.weight_decay={weight_decay}",
                f"seed={a.seed}",
                f"train.device={a.device}",
                "train.resume=false",
                f"train.batch_size={a.batch_size}",
                "train.log_every=1000000000",
                f"train.data_dir=[{','.join(a.data_dir)}]",
            ],
        )
    return settings_from(OmegaConf.to_container(cfg, resolve=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir", nargs="+", help="data_gen output folder(s) of one target model")
    ap.add_argument("--label-source", default="selfjudge", choices=["selfjudge", "autojudge"])
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decays", type=float, nargs="+", default=[0.0, 1e-3, 1e-2, 1e-1])
    ap.add_argument("--Cs", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", default=None, help="JSON path (default: <first data_dir>/../judge_parity.json)")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    data = load_judge_data(a.data_dir, a.label_source, True, a.val_fraction, a.seed)
    print(f"[parity] {data.split['n_train_rows']} train / {data.split['n_val_rows']} val rows, dim {data.feature_dim}")
    yv = data.val[:]["label"].numpy()

    ours = {}
    with tempfile.TemporaryDirectory() as tmp:
        for wd in a.weight_decays:
            head = JudgeHead(JudgeConfig(kind="logistic", feature_dim=data.feature_dim)).init_weights(a.seed)
            head.set_standardization(*feature_stats(data.train))
            s = train_settings(a, wd)
            t0 = time.perf_counter()
            train_head(head, data.train, data.val, s, Path(tmp) / f"wd{wd}")
            p = head.predict_proba(data.val[:]["features"]).numpy()
            ours[wd] = {"roc_auc": roc_auc(yv, p), "seconds": time.perf_counter() - t0}
            print(f"[parity] ours  weight_decay={wd:<8g} val ROC-AUC {ours[wd]['roc_auc']:.4f}")
    shutdown()

    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xt, yt = data.train[:]["features"].double().numpy(), data.train[:]["label"].numpy()
    xv = data.val[:]["features"].double().numpy()
    sc = StandardScaler().fit(xt)
    ref = {}
    for c in a.Cs:
        t0 = time.perf_counter()
        lr = LogisticRegression(C=c, max_iter=5000).fit(sc.transform(xt), yt)
        ref[c] = {"roc_auc": roc_auc(yv, lr.predict_proba(sc.transform(xv))[:, 1]), "seconds": time.perf_counter() - t0}
        print(f"[parity] sklearn C={c:<8g} val ROC-AUC {ref[c]['roc_auc']:.4f}")

    best_ours = max(ours.items(), key=lambda kv: kv[1]["roc_auc"])
    best_ref = max(ref.items(), key=lambda kv: kv[1]["roc_auc"])
    diff = best_ours[1]["roc_auc"] - best_ref[1]["roc_auc"]
    print(
        f"[parity] ours {best_ours[1]['roc_auc']:.4f} (weight_decay={best_ours[0]:g})  sklearn {best_ref[1]['roc_auc']:.4f} "
        f"(C={best_ref[0]:g})  difference {diff:+.4f}  {'OK' if abs(diff) <= 0.01 else 'OUTSIDE 0.01'}"
    )
    out = Path(a.out) if a.out else Path(a.data_dir[0]).resolve().parent / "judge_parity.json"
    write_json(
        out,
        {
            "data_dirs": a.data_dir,
            "split": {k: v for k, v in data.split.items() if k != "val_prompts"},
            "feature_dim": data.feature_dim,
            "ours": {str(k): v for k, v in ours.items()},
            "sklearn": {str(k): v for k, v in ref.items()},
            "best_ours": best_ours[1]["roc_auc"],
            "best_sklearn": best_ref[1]["roc_auc"],
            "difference": diff,
            "within_0.01": abs(diff) <= 0.01,
            "settings": {k: v for k, v in vars(a).items() if k != "data_dir"},
        },
    )
    print(f"[parity] -> {out}")


if __name__ == "__main__":
    main()
