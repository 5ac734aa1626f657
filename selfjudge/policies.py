"""Acceptance rules, interchangeable behind one signature: ``rule.accept(v) -> BoolTensor[γ]``.

The decoder keeps draft token ``d_j`` iff the standard (lossless) test accepts it OR the rule does,
so every rule can only add accepted tokens. Rules read the verify pass's distributions and hidden
states (``Verification``); none runs an extra forward pass.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from selfjudge.decoding import Verification
from selfjudge.features import FeatureSpec, judge_features
from selfjudge.judge import JudgeHead


class Policy:
    name = "lossless"
    threshold: float | None = None

    def accept(self, v: Verification) -> torch.Tensor:
        return torch.zeros_like(v.draft_tokens, dtype=torch.bool)


def _target_logp(v: Verification) -> torch.Tensor:  # [γ, V]: the target's distribution over d_j
    return F.log_softmax(v.target_logits[:-1], dim=-1)


class JudgeRule(Policy):
    """Accept a mismatch when the judge head says P(important | h_j) < threshold."""

    name = "judge"

    def __init__(self, head: JudgeHead, threshold: float, name: str = "judge"):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"{name} threshold must be in [0, 1], got {threshold} (eval.methods.{name})")
        self.head, self.threshold, self.name = head, float(threshold), name
        self.spec = FeatureSpec.from_mapping(head.config.features)

    def accept(self, v: Verification) -> torch.Tensor:
        feats = judge_features(v.target_hidden, self.spec, v.draft_hidden if self.spec.include_draft else None)
        return self.head.predict_proba(feats.to(self.head.mean.device)).to(v.draft_tokens.device) < self.threshold


class TopK(Policy):
    """Accept if d_j is among the target's top-k tokens (k=1 is lossless)."""

    name = "topk"

    def __init__(self, k: float):
        if k < 0 or int(k) != k:
            raise ValueError(f"topk threshold must be a non-negative integer, got {k} (eval.methods.topk)")
        self.threshold = int(k)

    def accept(self, v: Verification) -> torch.Tensor:
        if self.threshold == 0:
            return super().accept(v)
        top = v.target_logits[:-1].topk(min(self.threshold, v.target_logits.shape[-1]), dim=-1).indices
        return (top == v.draft_tokens[:, None]).any(-1)


class Typical(Policy):
    """Medusa typical acceptance: p(d_j) > min(ε, α·exp(−H(p))), with α = sqrt(ε)."""

    name = "typical"

    def __init__(self, eps: float):
        if not 0.0 < eps <= 1.0:
            raise ValueError(f"typical threshold (epsilon) must be in (0, 1], got {eps} (eval.methods.typical)")
        self.threshold = float(eps)

    def accept(self, v: Verification) -> torch.Tensor:
        logp = _target_logp(v)
        p_d = logp.gather(-1, v.draft_tokens[:, None])[:, 0].exp()
        ent = -(logp.exp() * logp).sum(-1)
        bar = torch.minimum(torch.full_like(ent, self.threshold), math.sqrt(self.threshold) * torch.exp(-ent))
        return p_d > bar


class LikelihoodGap(Policy):
    """Accept if log p(argmax) − log p(d_j) < δ (δ = 0 is lossless)."""

    name = "likelihood"

    def __init__(self, delta: float):
        if delta < 0:
            raise ValueError(f"likelihood threshold must be >= 0, got {delta} (eval.methods.likelihood)")
        self.threshold = float(delta)

    def accept(self, v: Verification) -> torch.Tensor:
        logp = _target_logp(v)
        return logp.max(-1).values - logp.gather(-1, v.draft_tokens[:, None])[:, 0] < self.threshold


class KLRule(Policy):
    """Sun et al. (2026): accept a mismatch if KL(target ‖ draft) at that position < δ, except where the
    target's top-1 probability exceeds ``confident`` (strict verification there)."""

    name = "kl"

    def __init__(self, delta: float, confident: float = 0.9):
        if delta < 0:
            raise ValueError(f"kl threshold must be >= 0, got {delta} (eval.methods.kl)")
        self.threshold, self.confident = float(delta), confident

    def accept(self, v: Verification) -> torch.Tensor:
        lp = _target_logp(v)
        lq = F.log_softmax(v.draft_logits, dim=-1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        return (kl < self.threshold) & (lp.max(-1).values.exp() <= self.confident)


RULES = {"topk": TopK, "typical": Typical, "likelihood": LikelihoodGap, "kl": KLRule}
POLICIES = ("lossless", "judge", "autojudge", *RULES)


def build_policy(name: str, threshold: Any, heads: dict[str, JudgeHead] | None = None) -> Policy:
    """A policy by name; ``judge``/``autojudge`` take their head from ``heads``."""
    if name == "lossless":
        return Policy()
    if name in ("judge", "autojudge"):
        if not heads or name not in heads:
            raise ValueError(f"policy '{name}' needs a head folder (eval.{'judge_dir' if name == 'judge' else 'autojudge_dir'})")
        return JudgeRule(heads[name], float(threshold), name)
    if name not in RULES:
        raise ValueError(f"unknown policy '{name}' (eval.methods); known: {list(POLICIES)}")
    return RULES[name](float(threshold))


def load_head(folder: str | Path, target_info: dict, feature_dim_fn) -> JudgeHead:
    """Load a head and check it fits the loaded target (model fingerprint and feature size)."""
    head = JudgeHead.from_pretrained(folder)
    spec = FeatureSpec.from_mapping(head.config.features)
    head.check_compatible(target_info, feature_dim_fn(spec))
    return head
