"""The judge head: a tiny classifier on target hidden states, saved as a self-describing folder.

A head folder holds ``model.safetensors`` (weights plus the input standardization statistics),
``judge_config.json`` (head kind, feature size and layout, the target model it was trained for, the
label source, the validation operating points and metrics) and ``README.md``, a model card made from
that config. Eval loads nothing but this folder. ``save_pretrained`` / ``from_pretrained`` /
``push_to_hub`` come from ``huggingface_hub``'s ``ModelHubMixin``: ``from_pretrained`` takes a folder or
a hub repo id. Label 1 = important = reject the draft token; the head outputs the logit of P(important).

A head with ``objective: regress_ld`` predicts LD_N itself (trained by squared error on the mismatches)
and reads it as P(important) = P(LD > τ) = Φ((pred − τ) / σ): the residual LD − pred taken as Gaussian
with the validation residual's root-mean-square σ; τ is the training data's. Eval's P cut c is then the
LD cut pred < τ + σ·Φ⁻¹(c), so one head serves any label threshold.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelHubMixin, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, OfflineModeIsEnabled
from torch import nn

from selfjudge.cards import judge_model_card
from selfjudge.io import atomic_folder, write_json

HEAD_KINDS = ("logistic", "mlp")
OBJECTIVES = ("classify", "regress_ld")
CONFIG_NAME = "judge_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


@dataclass
class JudgeConfig:
    kind: str = "logistic"  # logistic | mlp
    feature_dim: int = 0  # input size (len(layers) * target hidden [+ draft hidden])
    hidden_dim: int = 256  # MLP width (ignored by logistic)
    dropout: float = 0.0  # MLP dropout (ignored by logistic)
    features: dict = field(default_factory=lambda: {"layers": [-1], "include_draft": False})  # FeatureSpec.as_dict()
    target_model: dict = field(
        default_factory=dict
    )  # ModelInfo.as_dict() of the target (fingerprint, hidden_size, ...)
    draft_model: dict = field(default_factory=dict)  # ModelInfo.as_dict() of the draft
    label_source: str = "selfjudge"  # selfjudge | autojudge
    thresholds: dict = field(
        default_factory=dict
    )  # operating points on P(important): youden, precision_at_recall_0.8, quantiles
    metrics: dict = field(default_factory=dict)  # validation metrics at save time
    extra: dict = field(default_factory=dict)  # provenance: data folders, split, training settings
    format_version: int = FORMAT_VERSION  # folder layout version
    objective: str = "classify"  # classify (logit of P(important)) | regress_ld (predicts LD_N)
    ld_tau: float | None = None  # regress_ld: the label threshold τ of the training data
    ld_sigma: float | None = None  # regress_ld: residual RMS of LD on validation (set after training)

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"judge.kind '{self.kind}' is not one of {HEAD_KINDS}")
        if self.feature_dim <= 0:
            raise ValueError(f"judge feature_dim must be positive, got {self.feature_dim}")
        if self.kind == "mlp" and self.hidden_dim <= 0:
            raise ValueError(f"judge.hidden_dim must be positive for an mlp head, got {self.hidden_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"judge.dropout must be in [0, 1), got {self.dropout}")
        if self.label_source not in ("selfjudge", "autojudge"):
            raise ValueError(f"label_source must be selfjudge or autojudge, got '{self.label_source}'")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"judge.objective '{self.objective}' is not one of {OBJECTIVES}")
        if self.objective == "regress_ld" and (self.ld_tau is None or self.label_source != "selfjudge"):
            raise ValueError(
                "judge.objective=regress_ld needs the SelfJudge label (train.label_source=selfjudge) and its τ (ld_tau)"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JudgeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{CONFIG_NAME} has unknown keys {unknown}: written by a newer selfjudge?")
        return cls(**d)


class JudgeHead(
    nn.Module,
    ModelHubMixin,
    library_name="selfjudge",
    license="apache-2.0",
    tags=["speculative-decoding", "selfjudge", "judge-head"],
):
    """P(important | h) = sigmoid(f((h - mean) / std)), f linear or Linear-GELU-Dropout-Linear.

    ``mean``/``std`` are buffers (never trained); standardization always runs in fp32 so that large
    hidden-state values keep their precision even when ``net`` runs in bf16.
    """

    def __init__(self, config: JudgeConfig):
        super().__init__()
        self.config = config
        self._hub_mixin_config = None  # the mixin writes no config.json: judge_config.json is the one config
        d = config.feature_dim
        self.register_buffer("mean", torch.zeros(d))  # [D]
        self.register_buffer("std", torch.ones(d))  # [D]
        if config.kind == "logistic":
            self.net: nn.Module = nn.Linear(d, 1)
        else:
            self.net = nn.Sequential(
                nn.Linear(d, config.hidden_dim), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(config.hidden_dim, 1)
            )

    def init_weights(self, seed: int) -> JudgeHead:
        """Re-initialise ``net`` from ``seed`` alone (independent of the global RNG state)."""
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for m in self.net.modules():
                if isinstance(m, nn.Linear):
                    bound = 1.0 / m.in_features**0.5  # PyTorch's default uniform range
                    m.weight.copy_(torch.empty_like(m.weight, device="cpu").uniform_(-bound, bound, generator=g))
                    m.bias.copy_(torch.empty_like(m.bias, device="cpu").uniform_(-bound, bound, generator=g))
        return self

    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the training features' mean and std ([D] each); std is floored at 1e-6."""
        if mean.shape != self.mean.shape or std.shape != self.std.shape:
            raise ValueError(
                f"standardization stats have shape {tuple(mean.shape)}, the head expects ({self.config.feature_dim},)"
            )
        self.mean.copy_(mean.float())
        self.std.copy_(std.float().clamp_min(1e-6))

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        """(features - mean) / std in fp32. features: [..., D] -> [..., D] float32."""
        if features.shape[-1] != self.config.feature_dim:
            raise ValueError(f"judge head expects {self.config.feature_dim} features, got {features.shape[-1]}")
        return (features.float() - self.mean.float()) / self.std.float()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of 'important' (reject). features: [..., D] -> [...]."""
        x = self.standardize(features)
        w = next(self.net.parameters())
        return self.net(x.to(w.dtype)).squeeze(-1).float()

    @torch.no_grad()
    def predict_proba(self, features: torch.Tensor) -> torch.Tensor:
        """P(important). features: [..., D] -> [...] float32."""
        return self.proba_from_output(self.forward(features))

    def proba_from_output(self, out: torch.Tensor) -> torch.Tensor:
        """P(important) from :meth:`forward`'s output: sigmoid of the logit, or Φ((pred − τ)/σ) for LD."""
        if self.config.objective == "classify":
            return torch.sigmoid(out)
        if not self.config.ld_sigma or self.config.ld_sigma <= 0:
            raise ValueError(
                "this regress_ld head has no residual scale (ld_sigma): it was saved before training ended"
            )
        z = (out.double() - float(self.config.ld_tau)) / float(self.config.ld_sigma)
        return (0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))).float()

    # ------------------------------------------------------------------ persistence (ModelHubMixin)
    def save_pretrained(self, save_directory: str | Path, **hub_kwargs: Any) -> Path:
        """Write the folder (weights, ``judge_config.json``, model card) atomically: built beside it, then
        swapped in, so readers never see half a head. ``push_to_hub=True, repo_id=...`` also uploads it."""
        folder = Path(save_directory)
        push = hub_kwargs.pop("push_to_hub", False)
        with atomic_folder(folder) as tmp:
            ModelHubMixin.save_pretrained(self, tmp, model_card_kwargs=hub_kwargs.pop("model_card_kwargs", None))
        if push:
            self.push_to_hub(repo_id=hub_kwargs.pop("repo_id", None) or folder.name, **hub_kwargs)
        return folder

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().float().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(save_directory / WEIGHTS_NAME), metadata={"format": "pt", "kind": self.config.kind})
        write_json(save_directory / CONFIG_NAME, asdict(self.config))

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The README.md of the folder: what the head is for, read from its config (selfjudge.cards)."""
        return judge_model_card(asdict(self.config), self._hub_mixin_info.model_card_data, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> JudgeHead:
        """Load a head folder written by ``save_pretrained`` (a local path, or a hub repo id) in fp32, eval mode.
        Keyword arguments: ``map_location`` (default cpu) and the mixin's hub options (revision, token, ...)."""
        name = str(pretrained_model_name_or_path)
        if not os.path.isdir(name) and not _looks_like_repo_id(name):
            raise FileNotFoundError(f"no judge head folder at '{name}' (and it is not a hub repo id 'owner/name')")
        mixin_log = logging.getLogger("huggingface_hub.hub_mixin")
        quiet = _DropConfigJsonNotice()  # a head keeps its config in judge_config.json, not config.json
        mixin_log.addFilter(quiet)
        try:
            return super().from_pretrained(name, **kwargs)
        except (EntryNotFoundError, OfflineModeIsEnabled):  # the config.json probe, offline: the cache may hold it
            hub = {k: kwargs.pop(k, None) for k in ("revision", "cache_dir", "token")}
            return cls._from_pretrained(model_id=name, force_download=False, local_files_only=True, **hub, **kwargs)
        finally:
            mixin_log.removeFilter(quiet)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        **_: Any,
    ) -> JudgeHead:
        from safetensors.torch import load_file

        folder = Path(model_id)
        if folder.is_dir():
            cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
            if not cfg_path.is_file() or not w_path.is_file():
                raise FileNotFoundError(
                    f"'{folder}' is not a judge head folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}); point the "
                    f"judge path at the 'head' folder that the train stage wrote"
                )
        else:
            try:
                cfg_path, w_path = (
                    Path(
                        hf_hub_download(
                            model_id,
                            f,
                            revision=revision,
                            cache_dir=cache_dir,
                            force_download=force_download,
                            token=token,
                            local_files_only=local_files_only,
                        )
                    )
                    for f in (CONFIG_NAME, WEIGHTS_NAME)
                )
            except Exception as e:
                raise FileNotFoundError(
                    f"no judge head folder at '{model_id}', and no hub repo of that id could be "
                    f"read ({CONFIG_NAME}, {WEIGHTS_NAME}): {type(e).__name__}: {e}"
                ) from e
        head = cls(JudgeConfig.from_dict(json.loads(cfg_path.read_text())))
        head.load_state_dict(load_file(str(w_path), device=map_location))
        head.eval()
        return head

    def check_compatible(self, target_info: dict[str, Any], feature_dim: int) -> None:
        """Fail clearly when this head was trained for another target model or feature size."""
        mine = self.config.target_model or {}
        if (
            mine.get("fingerprint")
            and target_info.get("fingerprint")
            and mine["fingerprint"] != target_info["fingerprint"]
        ):
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


def _looks_like_repo_id(name: str) -> bool:
    """'owner/name' or 'name' as the hub spells repo ids (no path separators beyond one slash, no dots first)."""
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(
        p and not p.startswith(".") and p.replace("-", "").replace("_", "").replace(".", "").isalnum() for p in parts
    )


class _DropConfigJsonNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("config.json not found")
