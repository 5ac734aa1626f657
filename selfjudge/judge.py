"""The judge head: a tiny classifier on target hidden states, saved as a self-describing folder.

A head folder holds ``model.safetensors`` (weights plus the input standardization statistics) and
``judge_config.json`` (head kind, feature layout, the target model it was trained for, the label
source and the validation operating points). Eval loads nothing but this folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfjudge.io import write_json

HEAD_KINDS = ("logistic", "mlp")
CONFIG_NAME = "judge_config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class JudgeConfig:
    kind: str = "logistic"              # logistic | mlp
    feature_dim: int = 0                # input size (len(layers) * target hidden [+ draft hidden])
    hidden_dim: int = 256               # MLP width (ignored by logistic)
    dropout: float = 0.0                # MLP dropout
    features: dict = field(default_factory=lambda: {"layers": [-1], "include_draft": False})
    target_model: dict = field(default_factory=dict)   # ModelInfo.as_dict() of the target
    draft_model: dict = field(default_factory=dict)    # ModelInfo.as_dict() of the draft
    label_source: str = "selfjudge"     # selfjudge | autojudge
    thresholds: dict = field(default_factory=dict)     # operating points: name -> P(important) cut
    metrics: dict = field(default_factory=dict)        # validation metrics at save time
    extra: dict = field(default_factory=dict)          # anything else worth keeping (data manifest id, split)

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"judge.kind '{self.kind}' is not one of {HEAD_KINDS}")


class JudgeHead(nn.Module):
    """P(important | h) = sigmoid(f((h - mean) / std)), f linear or a one-hidden-layer MLP."""

    def __init__(self, config: JudgeConfig):
        super().__init__()
        self.config = config
        d = config.feature_dim
        if d <= 0:
            raise ValueError("judge feature_dim must be positive")
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("std", torch.ones(d))
        if config.kind == "logistic":
            self.net = nn.Linear(d, 1)
        else:
            self.net = nn.Sequential(
                nn.Linear(d, config.hidden_dim), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(config.hidden_dim, 1)
            )

    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean.float())
        self.std.copy_(std.float().clamp_min(1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of 'important' (reject). features: [..., D] -> [...]."""
        x = (features.to(self.mean.dtype) - self.mean) / self.std
        return self.net(x).squeeze(-1)

    @torch.no_grad()
    def predict_proba(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(features))

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        from selfjudge.offline import build_folder_atomically

        folder = Path(folder)
        state = {k: v.detach().cpu().contiguous().float() for k, v in self.state_dict().items()}

        def build(tmp: Path) -> None:
            save_file(state, str(tmp / WEIGHTS_NAME))
            write_json(tmp / CONFIG_NAME, asdict(self.config))

        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        return build_folder_atomically(folder, build)

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location: str = "cpu") -> "JudgeHead":
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg_path = folder / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(
                f"'{folder}' is not a judge head folder (no {CONFIG_NAME}); point judge path at the "
                f"'head' folder that the train stage wrote"
            )
        cfg = json.loads(cfg_path.read_text())
        head = cls(JudgeConfig(**cfg))
        head.load_state_dict(load_file(str(folder / WEIGHTS_NAME), device=map_location))
        head.eval()
        return head

    def check_compatible(self, target_info: dict[str, Any], feature_dim: int) -> None:
        """Fail clearly when this head was trained for another target model or feature size."""
        mine = self.config.target_model or {}
        if mine.get("fingerprint") and target_info.get("fingerprint") and mine["fingerprint"] != target_info["fingerprint"]:
            raise ValueError(
                f"judge head was trained for target '{mine.get('name')}' ({mine['fingerprint'][:23]}...), "
                f"but the loaded target is '{target_info.get('name')}' ({target_info['fingerprint'][:23]}...): "
                f"train a head for this target or load the matching model"
            )
        if self.config.feature_dim != feature_dim:
            raise ValueError(
                f"judge head expects {self.config.feature_dim} features, the target gives {feature_dim} "
                f"(hidden size {target_info.get('hidden_size')}, layers {self.config.features.get('layers')})"
            )
