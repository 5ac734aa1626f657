"""DeepSpeed training loop for the judge head (logging goes through a callback: no tracking imports).

Launch modes: plain ``python`` (one process; the rendezvous variables are filled in with a free port),
``torchrun --nproc_per_node=N`` and ``deepspeed --no_local_rank``. CPU uses gloo and fp32 and skips
DeepSpeed's shared-memory op build; CUDA uses nccl and bf16 when the deepspeed config asks for it.
The client optimizer is torch AdamW, so nothing is JIT-compiled.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from selfjudge.judge import JudgeHead
from selfjudge.judge_metrics import operating_points, summarize

ZERO_STAGES = (0, 1, 2)


@dataclass
class TrainSettings:
    epochs: int = 20
    batch_size: int = 256
    grad_accum: int = 1
    grad_clip: float = 1.0
    lr: float = 3e-3
    weight_decay: float = 1e-2
    seed: int = 0
    num_workers: int = 0
    log_every: int = 50
    resume: bool = True
    device: str = "auto"
    quantiles: tuple = (0.1, 0.3, 0.5, 0.7, 0.9)
    zero_stage: int = 0
    bf16_on_gpu: bool = True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed for any launcher; returns (rank, world)."""
    import deepspeed

    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip the 75-90 s JIT build of the shm op
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, got '{device}'")
    return device


def deepspeed_config(s: TrainSettings, device: str) -> dict[str, Any]:
    if s.zero_stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage {s.zero_stage} is not defined here: choose deepspeed=zero0, zero1 or zero2")
    return {
        "train_micro_batch_size_per_gpu": s.batch_size,
        "gradient_accumulation_steps": s.grad_accum,
        "gradient_clipping": s.grad_clip,
        "zero_optimization": {"stage": s.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bool(device == "cuda" and s.bf16_on_gpu)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@torch.no_grad()
def predict(model: torch.nn.Module, ds, batch_size: int, device: str) -> tuple[np.ndarray, np.ndarray, float]:
    """Probabilities, labels and mean BCE loss over ``ds`` (every rank computes the same)."""
    ps, ys, loss, n = [], [], 0.0, 0
    for start in range(0, len(ds), batch_size):
        b = ds[start : start + batch_size]
        x, y = b["features"].to(device), b["label"].float().to(device)
        logits = model(x.to(next(model.parameters()).dtype)).float()
        loss += float(F.binary_cross_entropy_with_logits(logits, y, reduction="sum"))
        n += len(y)
        ps.append(torch.sigmoid(logits).cpu().numpy())
        ys.append(y.cpu().numpy())
    return np.concatenate(ps), np.concatenate(ys), loss / max(n, 1)


def train_head(
    head: JudgeHead,
    train_ds,
    val_ds,
    s: TrainSettings,
    ckpt_dir: str | Path,
    log: Callable[[int, dict], None] | None = None,
    after_epoch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Fit ``head`` with DeepSpeed; keeps the best epoch by validation ROC-AUC. Returns the metrics."""
    import deepspeed

    device = resolve_device(s.device)
    rank, world = init_distributed(device)
    torch.manual_seed(s.seed)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = f"cuda:{local}" if device == "cuda" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local)
    opt = torch.optim.AdamW(head.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=head, optimizer=opt, config=deepspeed_config(s, device))
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=s.seed, drop_last=False)
    loader = DataLoader(train_ds, batch_size=s.batch_size, sampler=sampler, num_workers=s.num_workers)
    ckpt_dir = Path(ckpt_dir)
    start_epoch, best = 0, {"roc_auc": -1.0}
    if s.resume and (ckpt_dir / "latest").is_file():
        _, client = engine.load_checkpoint(str(ckpt_dir))
        start_epoch = int(client["epoch"]) + 1
        best = client.get("best", best)
        if rank == 0:
            print(f"[train] resumed from {ckpt_dir} at epoch {start_epoch}")
    history = []
    t0 = time.perf_counter()
    for epoch in range(start_epoch, s.epochs):
        sampler.set_epoch(epoch)
        engine.train()
        for batch in tqdm(loader, desc=f"train epoch {epoch}", disable=rank != 0 or None, leave=False):
            x = batch["features"].to(dev).to(next(engine.module.parameters()).dtype)
            y = batch["label"].float().to(dev)
            loss = F.binary_cross_entropy_with_logits(engine(x).float(), y)
            engine.backward(loss)
            engine.step()
            if log and rank == 0 and engine.global_steps % s.log_every == 0 and engine.is_gradient_accumulation_boundary():
                log(engine.global_steps, {"train/loss": float(loss)})
        engine.eval()
        p, y, vloss = predict(engine.module, val_ds, 4096, dev)
        m = summarize(y, p, vloss)
        m["epoch"] = epoch
        history.append(m)
        if log and rank == 0:
            log(engine.global_steps, {f"val/{k}": v for k, v in m.items()})
        if m["roc_auc"] > best["roc_auc"]:
            best = {**m, "state": {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}}
        engine.save_checkpoint(str(ckpt_dir), tag=f"epoch{epoch}", client_state={"epoch": epoch, "best": best})
        if after_epoch:
            after_epoch(epoch)
    if "state" in best:
        head.load_state_dict(best["state"])
    head.float().cpu().eval()
    p, y, vloss = predict(head, val_ds, 4096, "cpu")
    final = summarize(y, p, vloss)
    final.update(best_epoch=best.get("epoch"), seconds=time.perf_counter() - t0, world_size=world,
                 thresholds=operating_points(y, p, list(s.quantiles)))
    torch.distributed.barrier()
    return {"final": final, "history": history, "rank": rank, "world": world}


def shutdown() -> None:
    """Barrier, then tear a multi-rank process group down. A one-process group is kept: DeepSpeed caches
    its groups in module state, so a later run in the same process (the pipeline, tests) reuses it."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        if torch.distributed.get_world_size() > 1:
            torch.distributed.destroy_process_group()
