"""DeepSpeed training loop for the judge head (logging goes through a callback: no tracking imports).

Launch modes: plain ``python`` (one process; the rendezvous variables are filled in with a free port),
``torchrun --nproc_per_node=N`` and ``deepspeed --no_local_rank``. CPU uses gloo and fp32 and skips
DeepSpeed's shared-memory op build (a 75-90 s JIT compile); CUDA uses nccl and bf16 when asked. The
client optimizer is torch AdamW, so nothing is JIT-compiled. DeepSpeed trains ``head.net`` only: the
standardization buffers stay fp32 and untouched, and inputs are standardized before the engine.

Checkpoints (``engine.save_checkpoint``) go to ``ckpt_dir`` at every epoch end and every
``checkpoint_every`` optimizer steps; a new run with ``resume`` continues from the newest one, mid-epoch
included (the consumed micro-batches of that epoch's fixed order are skipped).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import pickle
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm.auto import tqdm

from selfjudge.io import read_json, sha256_file, write_json
from selfjudge.judge import JudgeHead
from selfjudge.judge_metrics import bce_loss, operating_points, precision_recall_at, summarize

logger = logging.getLogger(__name__)

ZERO_STAGES = (0, 1, 2)


def make_ds_config(batch_size: int = 256, grad_accum: int = 1, grad_clip: float = 1.0, zero_stage: int = 0) -> dict:
    """A DeepSpeed config like the ones in conf/deepspeed/ (for library users and tests)."""
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


@dataclass(frozen=True)
class TrainSettings:
    """What the trainer needs; the train stage builds it from train.*, judge and deepspeed (conf/ holds the
    defaults: no field has one here)."""

    epochs: int  # passes over the training split
    lr: float  # AdamW learning rate
    weight_decay: float  # AdamW (decoupled) weight decay
    betas: tuple  # AdamW betas
    eps: float  # AdamW epsilon
    seed: int  # data order, init and dropout
    num_workers: int  # DataLoader workers
    log_every: int  # optimizer steps between train-loss logs
    checkpoint_every: int  # optimizer steps between mid-epoch checkpoints (0: epoch ends only)
    keep_checkpoints: int  # newest checkpoints kept on disk
    resume: bool  # continue from the newest checkpoint in ckpt_dir
    device: str  # auto | cpu | cuda
    quantiles: tuple  # validation-probability quantiles for the eval sweep
    eval_batch_size: int  # rows per validation forward
    bf16_on_gpu: bool  # bf16 engine on CUDA (CPU is always fp32)
    deepspeed: dict  # the DeepSpeed config (conf/deepspeed/*.yaml: config)
    run_key: str  # identifies the training setup (data included); other keys are refused

    @property
    def batch_size(self) -> int:
        return int(self.deepspeed["train_micro_batch_size_per_gpu"])

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda, but CUDA is not available: use train.device=cpu or auto")
    return device


def init_distributed(device: str) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed for any launcher; returns (rank, world size).

    Plain ``python`` gets RANK=0, WORLD_SIZE=1 and a free MASTER_PORT. DeepSpeed's accelerator is chosen
    from ``device`` before deepspeed is first imported (on a GPU machine it would pick CUDA even for
    ``train.device=cpu``). On CPU the shared-memory communication op is marked incompatible, so DeepSpeed
    never JIT-builds it.
    """
    os.environ["DS_ACCELERATOR"] = device
    alone = "WORLD_SIZE" not in os.environ  # no launcher: one process, whose group needs no port (a file store)
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    import deepspeed
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != device:
        raise RuntimeError(
            f"DeepSpeed already runs on '{get_accelerator().device_name()}' in this process: "
            f"train.device={device} needs a fresh process"
        )
    if device == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip the 75-90 s JIT build of the shm op
    if not torch.distributed.is_initialized():
        # a free port can be taken again before the store listens (seen right after a torchrun job's sockets
        # closed: EADDRINUSE); one process rendezvouses through a file instead
        backend = "gloo" if device == "cpu" else "nccl"
        if alone:
            folder = tempfile.mkdtemp(prefix="selfjudge-dist-")
            atexit.register(shutil.rmtree, folder, True)  # the group lives as long as the process
            store = f"file://{folder}/store"
            deepspeed.init_distributed(dist_backend=backend, init_method=store, rank=0, world_size=1)
        else:
            deepspeed.init_distributed(dist_backend=backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


class _SkipSampler(Sampler):
    """A DistributedSampler's order for one epoch, minus the first ``skip`` indices (mid-epoch resume)."""

    def __init__(self, sampler: DistributedSampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.sampler)[self.skip :])

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


@torch.no_grad()
def predict(
    forward: Callable[[torch.Tensor], torch.Tensor], ds: Any, batch_size: int, device: str, with_ld: bool = False
) -> tuple[np.ndarray, ...]:
    """Outputs and labels (and LD with ``with_ld``) over ``ds`` in order. forward: features [B, D] -> [B]."""
    zs, ys, lds = [], [], []
    for start in range(0, len(ds), batch_size):
        b = ds[start : start + batch_size]
        zs.append(forward(b["features"].to(device)).float().cpu().numpy())
        ys.append(b["label"].numpy())
        if with_ld:
            lds.append(b["ld"].numpy())
    out = (np.concatenate(zs), np.concatenate(ys))
    return (*out, np.concatenate(lds)) if with_ld else out


def _evaluate(
    forward: Callable, ds: Any, s: TrainSettings, device: str, head: JudgeHead
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Validation metrics of P(important). A regress_ld head's σ is set here to the residual RMS of this
    split, so its P = Φ((pred − τ)/σ); its loss is the squared error of LD."""
    if head.config.objective == "regress_ld":
        z, y, ld = predict(forward, ds, s.eval_batch_size, device, with_ld=True)
        mse = float(np.mean((z.astype(np.float64) - ld) ** 2))
        head.config.ld_sigma = max(math.sqrt(mse), 1e-6)
        p = head.proba_from_output(torch.from_numpy(z.astype(np.float64))).double().numpy()
        return summarize(y, p, mse), y, p
    z, y = predict(forward, ds, s.eval_batch_size, device)
    p = torch.sigmoid(torch.from_numpy(z.astype(np.float64))).numpy()
    return summarize(y, p, bce_loss(y, z)), y, p


def _ckpt_tags(ckpt_dir: Path) -> list[Path]:
    tags = [p for p in ckpt_dir.glob("step*") if p.is_dir()]
    return sorted(tags, key=lambda p: int(p.name[4:]))


CKPT_HASHES = ".selfjudge-sha256.json"


def _ckpt_hashes(tag_dir: Path) -> dict[str, str]:
    return {
        str(f.relative_to(tag_dir)): sha256_file(f)
        for f in sorted(tag_dir.rglob("*"))
        if f.is_file() and f.name != CKPT_HASHES
    }


def _safe_checkpoint_loads(engine: Any) -> None:
    """Make the engine read checkpoints with ``torch.load(weights_only=True)`` (DeepSpeed 0.19.8 unpickles them
    in full), allowing only the three data classes its ZeRO optimizer states hold. A file that needs any other
    class is loaded in full only when the checkpoint folder still has the sha256 recorded when it was saved."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, ZeroStageEnum, fragment_address]

    def load(path: str, map_location: Any = None) -> Any:
        try:
            with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected pickle protocol")  # DeepSpeed saves protocol 4
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            tag_dir = Path(path).parent
            saved = tag_dir / CKPT_HASHES
            if not saved.is_file() or read_json(saved) != _ckpt_hashes(tag_dir):
                raise RuntimeError(
                    f"checkpoint file '{path}' holds objects that are not plain weights ({str(e).splitlines()[-3:]}) "
                    f"and its folder does not match the sha256 recorded when it was saved: it was changed or not "
                    f"written by this trainer; remove the checkpoints or set train.resume=false"
                ) from None
            return torch.load(path, map_location=map_location, weights_only=False)  # unchanged since saved

    engine.checkpoint_engine.load = load


def train_head(
    head: JudgeHead,
    train_ds: Any,
    val_ds: Any,
    s: TrainSettings,
    ckpt_dir: str | Path,
    log: Callable[[int, dict], None] | None = None,
    after_step: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Fit ``head.net`` with DeepSpeed; keep the epoch with the best validation ROC-AUC.

    ``log(step, metrics)`` is called on rank 0 only; ``after_step(epoch, global_step)`` after every optimizer
    step on every rank (tests use it to interrupt a run). Returns {"final", "history", "rank", "world",
    "global_steps", "resumed_from"}; ``final`` holds the validation metrics of the best epoch in fp32 and
    its operating points under ``thresholds``.
    """
    if s.zero_stage not in ZERO_STAGES:
        raise ValueError(
            f"ZeRO stage {s.zero_stage} is not supported by the judge trainer: choose deepspeed=zero0, zero1 or zero2"
        )
    device = resolve_device(s.device)
    rank, world = init_distributed(device)  # before the first deepspeed import: it fixes the accelerator
    import deepspeed

    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = f"cuda:{local}" if device == "cuda" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local)
    ckpt_dir = Path(ckpt_dir)
    if not s.resume and rank == 0 and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    torch.distributed.barrier()

    torch.manual_seed(s.seed)  # dropout masks
    head.to(dev)
    core = head.net
    opt = torch.optim.AdamW(core.parameters(), lr=s.lr, weight_decay=s.weight_decay, betas=tuple(s.betas), eps=s.eps)
    ds_cfg = {**s.deepspeed, "bf16": {"enabled": bool(device == "cuda" and s.bf16_on_gpu)}}
    engine, _, _, _ = deepspeed.initialize(model=core, optimizer=opt, config=ds_cfg)
    dtype = next(engine.module.parameters()).dtype

    def forward(x: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B] logits; standardized in fp32 outside the engine
        return engine(head.standardize(x).to(dtype)).squeeze(-1).float()

    regress = head.config.objective == "regress_ld"
    if regress and len(train_ds) and bool(torch.isnan(train_ds[:4096]["ld"]).any()):
        raise ValueError("a regress_ld head trains on mismatches only: set train.use_negatives=false")
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=s.seed, drop_last=False)
    epoch, batch_in_epoch, best, history, resumed_from, rng = 0, 0, {"roc_auc": -1.0}, [], None, None
    if s.resume and (ckpt_dir / "latest").is_file():
        _safe_checkpoint_loads(engine)
        path, client = engine.load_checkpoint(str(ckpt_dir))
        if path is None:
            raise RuntimeError(f"could not load the checkpoint in '{ckpt_dir}': remove it or set train.resume=false")
        if client.get("run_key") != s.run_key:
            raise ValueError(
                f"'{ckpt_dir}' holds checkpoints of another training setup (other data, or other train, "
                f"judge or deepspeed settings): set train.resume=false to start over, or choose another "
                f"train.output_dir"
            )
        epoch, batch_in_epoch = int(client["epoch"]), int(client["batch"])
        best, history, resumed_from = client["best"], client["history"], path
        rng = client["rng"]  # set once the epoch's loader iterator exists (making it draws from the global RNG)
        if rank == 0:
            logger.info(f"resumed from {path}: epoch {epoch}, micro-batch {batch_in_epoch}, step {engine.global_steps}")

    def save(ep: int, batch: int) -> None:
        client = {
            "epoch": ep,
            "batch": batch,
            "best": best,
            "history": history,
            "run_key": s.run_key,
            "rng": torch.get_rng_state(),
        }
        engine.save_checkpoint(str(ckpt_dir), tag=f"step{engine.global_steps}", client_state=client)
        torch.distributed.barrier()
        if rank == 0:
            tag_dir = ckpt_dir / f"step{engine.global_steps}"
            write_json(tag_dir / CKPT_HASHES, _ckpt_hashes(tag_dir))
            for old in _ckpt_tags(ckpt_dir)[: -max(s.keep_checkpoints, 1)]:
                shutil.rmtree(old, ignore_errors=True)

    t0 = time.perf_counter()
    while epoch < s.epochs:
        sampler.set_epoch(epoch)
        skip = batch_in_epoch * s.batch_size
        loader = DataLoader(
            train_ds, batch_size=s.batch_size, sampler=_SkipSampler(sampler, skip), num_workers=s.num_workers
        )
        engine.train()
        batches = iter(loader)
        if rng is not None:  # the dropout masks go on where the checkpoint left them
            torch.set_rng_state(rng)
            rng = None
        bar = tqdm(batches, total=len(loader), desc=f"epoch {epoch}", disable=rank != 0, leave=False)
        for batch in bar:
            out = forward(batch["features"].to(dev))  # [B]
            if regress:
                loss = F.mse_loss(out, batch["ld"].float().to(dev))
            else:
                loss = F.binary_cross_entropy_with_logits(out, batch["label"].float().to(dev))
            engine.backward(loss)
            engine.step()
            batch_in_epoch += 1
            if not engine.is_gradient_accumulation_boundary():
                continue
            step = engine.global_steps
            if rank == 0 and step % max(s.log_every, 1) == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", step=step)
                if log:
                    log(step, {"train/loss": loss.item(), "train/lr": opt.param_groups[0]["lr"], "train/epoch": epoch})
            if s.checkpoint_every > 0 and step % s.checkpoint_every == 0:
                save(epoch, batch_in_epoch)
            if after_step:
                after_step(epoch, step)
        engine.eval()
        m, _, _ = _evaluate(forward, val_ds, s, dev, head)
        m.update(epoch=epoch, step=engine.global_steps)
        history.append(m)
        if rank == 0:
            logger.info(f"epoch {epoch}: val loss {m['loss']:.4f} ROC-AUC {m['roc_auc']:.4f} PR-AUC {m['pr_auc']:.4f}")
            if log:
                log(engine.global_steps, {f"val/{k}": v for k, v in m.items()})
        if m["roc_auc"] > best["roc_auc"]:
            best = {**m, "state": {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}}
        epoch, batch_in_epoch = epoch + 1, 0
        save(epoch, 0)

    if "state" in best:
        core.load_state_dict(best["state"])
    head.float().cpu().eval()
    final, y, p = _evaluate(head, val_ds, s, "cpu", head)
    th = operating_points(y, p, list(s.quantiles))
    at = {
        name: dict(zip(("precision", "recall"), precision_recall_at(y, p, th[name])))
        for name in ("youden", "precision_at_recall_0.8")
    }
    final.update(
        best_epoch=best.get("epoch"),
        seconds=time.perf_counter() - t0,
        world_size=world,
        global_steps=int(engine.global_steps),
        thresholds=th,
        at_thresholds=at,
    )
    torch.distributed.barrier()
    return {
        "final": final,
        "history": history,
        "rank": rank,
        "world": world,
        "global_steps": int(engine.global_steps),
        "resumed_from": resumed_from,
    }


def shutdown() -> None:
    """Barrier, then tear a multi-rank process group down. A one-process group is kept: DeepSpeed caches
    its groups in module state, so a later run in the same process (the pipeline, sweeps, tests) reuses it."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        if torch.distributed.get_world_size() > 1:
            torch.distributed.destroy_process_group()
