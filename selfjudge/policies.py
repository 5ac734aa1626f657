"""Acceptance policies behind one signature, chosen by name from a registry.

A policy's ``accept(v: Verification) -> BoolTensor[γ] | None`` says which draft tokens its rule
accepts (``[B, γ]`` when the batched decoder passes B proposals at once); the decoder keeps ``d_j``
iff the standard (lossless) test accepts it OR the rule does, so a rule can only add accepted tokens,
and with sampling the speculative-sampling test still runs first. Rules are position-wise: each token's
verdict reads its own position only, so the decoder asks only about the tokens the test rejects
(``selfjudge.decoding.apply_rule``); a rule that reads whole proposals sets ``positionwise = False``.
Rules read the verify pass's distributions and hidden states; none runs an extra forward pass. With
temperature T > 0 the distributions compared are the tempered ones (logits / T).

| name | threshold | strictest (= lossless) | loosest (accepts all) |
|---|---|---|---|
| lossless | none | - | - |
| judge / autojudge | P(important) cut in [0, 1]: accept iff P < cut | 0 | 1 |
| topk | k >= 1: accept iff d_j is in the target's top k | 1 | vocab size |
| typical | ε >= 0: accept iff p(d_j) > min(ε, α·exp(−H(p))), α = sqrt(ε) | inf | 0 |
| likelihood | δ >= 0: accept iff log p(argmax) − log p(d_j) < δ | 0 | inf |
| kl | δ >= 0: accept iff KL(q ‖ p) < δ and top-1 p <= kl_strict_top1 | 0 | inf (with kl_strict_top1 >= 1) |
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from selfjudge.decoding import Verification
from selfjudge.features import FeatureSpec, judge_features, scalar_features
from selfjudge.judge import JudgeHead

# policy options with their defaults (conf/eval/default.yaml policy_options lists the same keys)
OPTION_DEFAULTS: dict[str, Any] = {
    "typical_alpha": None,
    "kl_strict_top1": 0.9,
    "judge_strict_top1": None,
    "strict_tokens": None,
}
# options added after records were made: at this value they are left out of the eval's records key
OPTION_NEUTRAL: dict[str, Any] = {"judge_strict_top1": None, "strict_tokens": None}
# strict_tokens: token classes every lossy rule verifies strictly (the draft token or the target's choice in it)
STRICT_TOKENS: dict[str, Callable[[str], bool]] = {"digits": lambda text: any(c.isdigit() for c in text)}


def strict_token_mask(kind: str, tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """[vocab_size] bool: the token ids of a ``strict_tokens`` class, by each id's decoded text."""
    if kind not in STRICT_TOKENS:
        raise ValueError(f"strict_tokens must be null or one of {sorted(STRICT_TOKENS)}, got {kind!r}")
    test, known = STRICT_TOKENS[kind], len(tokenizer)
    return torch.tensor([i < known and test(tokenizer.decode([i])) for i in range(vocab_size)], dtype=torch.bool)


def check_strict_tokens(value: Any, options_key: str = "policy_options") -> str | None:
    if value is not None and value not in STRICT_TOKENS:
        raise ValueError(
            f"{options_key}.strict_tokens must be null (off) or one of {sorted(STRICT_TOKENS)}, got {value!r}"
        )
    return value


class Policy:
    """Base policy = lossless: the rule accepts nothing beyond the standard test."""

    name = "lossless"
    threshold: float | None = None
    needs_draft_logits = False  # the rule reads the draft's distributions
    needs_draft_hidden = False  # the rule reads the draft's hidden states
    positionwise = True  # each verdict reads its token's position only (the decoder passes rejected tokens)
    feature_spec = FeatureSpec()  # target hidden states the verify pass must return

    def accept(self, v: Verification) -> torch.Tensor | None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, threshold={self.threshold})"


POLICIES: dict[str, Callable[..., Policy]] = {}


def register(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        POLICIES[name] = cls
        return cls

    return deco


register("lossless")(Policy)


def _at(scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """scores [..., γ, V] at the draft tokens [..., γ] -> [..., γ]."""
    return scores.gather(-1, tokens[..., None])[..., 0]


def _num(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{what} must be a number, got {x!r}")
    if math.isnan(x):
        raise ValueError(f"{what} must not be NaN")
    return float(x)


def judge_guard(value: Any, options_key: str = "policy_options") -> float | None:
    """The judge_strict_top1 option, checked: None (off) or a top-1 probability in (0, 1]."""
    if value is None:
        return None
    g = _num(value, f"{options_key}.judge_strict_top1")
    if not 0.0 < g <= 1.0:
        raise ValueError(
            f"{options_key}.judge_strict_top1 must be null (off) or in (0, 1] (a top-1 probability), got {g}"
        )
    return g


@register("judge")
class JudgeRule(Policy):
    """Accept a draft token when the judge head says P(important | features_j) < threshold
    (threshold 1 accepts every token). ``autojudge`` is the same rule with an AutoJudge-labelled head.

    ``judge_strict_top1`` (None: off) adds the KL rule's guard: strict verification where the target's top-1
    probability exceeds it, whatever the head says."""

    name = "judge"

    def __init__(
        self,
        threshold: float,
        head: JudgeHead | None = None,
        name: str = "judge",
        key: str | None = None,
        judge_strict_top1: float | None = None,
        options_key: str = "policy_options",
        **_: Any,
    ):
        key = key or name
        t = _num(threshold, f"{key} threshold")
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"{key}: judge threshold must be in [0, 1] (a P(important) cut), got {t}")
        if head is None:
            raise ValueError(f"{key}: policy '{name}' needs a judge head (a head folder trained by the train stage)")
        self.head, self.threshold, self.name = head, t, name
        self.strict_top1 = judge_guard(judge_strict_top1, options_key)
        self.feature_spec = FeatureSpec.from_mapping(head.config.features)
        self.needs_draft_hidden = self.feature_spec.include_draft
        self.needs_draft_logits = self.feature_spec.needs_draft_logits

    def accept(self, v: Verification) -> torch.Tensor | None:
        if self.threshold <= 0.0:
            return None
        if self.threshold >= 1.0:
            ok = torch.ones_like(v.draft_tokens, dtype=torch.bool)
        else:
            ok = self.head.predict_proba(verify_features(v, self.feature_spec)) < self.threshold
        if self.strict_top1 is not None:
            ok = ok & (v.target_logp.max(-1).values.exp() <= self.strict_top1)
        return ok


register("autojudge")(JudgeRule)


def verify_features(v: Verification, spec: FeatureSpec) -> torch.Tensor:
    """The judge features of every proposed token from the verify pass: [(B,) γ, D] float32.

    Scalars read the untempered logits (the head was trained on greedy data), also when sampling."""
    sc = (
        scalar_features(spec.scalars, v.target_logits[..., :-1, :], v.draft_tokens, v.draft_logits)
        if spec.scalars
        else None
    )
    return judge_features(v.target_hidden, spec, v.draft_hidden, prev_hidden=v.prev_hidden, scalars=sc)


@register("topk")
class TopK(Policy):
    """Accept d_j if it is among the target's k most likely tokens (k = 1: lossless)."""

    name = "topk"

    def __init__(self, threshold: float, key: str = "topk", **_: Any):
        k = _num(threshold, f"{key} threshold")
        if k < 1 or (not math.isinf(k) and int(k) != k):
            raise ValueError(f"{key}: k must be an integer >= 1, got {threshold}")
        self.threshold = k

    def accept(self, v: Verification) -> torch.Tensor | None:
        V = v.target_logits.shape[-1]
        if self.threshold <= 1:
            return None
        if self.threshold >= V:
            return torch.ones_like(v.draft_tokens, dtype=torch.bool)
        lg = v.target_logits[..., :-1, :]  # [γ, V]
        kth = lg.topk(int(self.threshold), dim=-1).values[..., -1]  # [γ] k-th largest logit
        return _at(lg, v.draft_tokens) >= kth


@register("typical")
class Typical(Policy):
    """Medusa typical acceptance: p(d_j) > min(ε, α·exp(−H(p))), α = sqrt(ε) unless typical_alpha is set."""

    name = "typical"

    def __init__(
        self,
        threshold: float,
        typical_alpha: float | None = None,
        key: str = "typical",
        options_key: str = "policy_options",
        **_: Any,
    ):
        eps = _num(threshold, f"{key} threshold")
        if eps < 0:
            raise ValueError(f"{key}: epsilon must be >= 0, got {eps}")
        self.threshold = eps
        self.alpha = math.sqrt(eps) if typical_alpha is None else _num(typical_alpha, f"{options_key}.typical_alpha")

    def accept(self, v: Verification) -> torch.Tensor | None:
        if math.isinf(self.threshold) and math.isinf(self.alpha):
            return None
        logp = v.target_logp  # [γ, V]
        ent = -(logp.exp() * logp).sum(-1)  # [γ] H(p)
        bar = torch.clamp(self.alpha * torch.exp(-ent), max=self.threshold)  # [γ] min(ε, α e^-H)
        return _at(logp, v.draft_tokens).exp() > bar


@register("likelihood")
class LikelihoodGap(Policy):
    """Training-free likelihood rule: accept if log p(argmax) − log p(d_j) < δ (δ = 0: lossless)."""

    name = "likelihood"

    def __init__(self, threshold: float, key: str = "likelihood", **_: Any):
        d = _num(threshold, f"{key} threshold")
        if d < 0:
            raise ValueError(f"{key}: delta must be >= 0, got {d}")
        self.threshold = d

    def accept(self, v: Verification) -> torch.Tensor | None:
        if self.threshold == 0:
            return None
        lg = v.target_logits[..., :-1, :].float() / v.scale  # the gap needs no normalisation:
        return lg.max(-1).values - _at(lg, v.draft_tokens) < self.threshold  # log p(a) - log p(d) = (l_a - l_d)/T


@register("kl")
class KLRule(Policy):
    """Sun et al. (2026): accept a mismatch if KL(q ‖ p) (draft vs target next-token distributions at
    that position) < δ, but keep strict verification where the target's top-1 probability exceeds
    ``kl_strict_top1`` (0.9)."""

    name = "kl"
    needs_draft_logits = True

    def __init__(
        self,
        threshold: float,
        kl_strict_top1: float = 0.9,
        key: str = "kl",
        options_key: str = "policy_options",
        **_: Any,
    ):
        d = _num(threshold, f"{key} threshold")
        if d < 0:
            raise ValueError(f"{key}: delta must be >= 0, got {d}")
        self.threshold = d
        self.strict_top1 = _num(kl_strict_top1, f"{options_key}.kl_strict_top1")

    def accept(self, v: Verification) -> torch.Tensor | None:
        if self.threshold == 0:
            return None
        lp, lq = v.target_logp, v.draft_logp  # [γ, V] each
        kl = (lq.exp() * (lq - lp)).sum(-1)  # [γ] KL(q || p)
        return (kl < self.threshold) & (lp.max(-1).values.exp() <= self.strict_top1)


def build_policy(
    name: str,
    threshold: Any = None,
    *,
    head: JudgeHead | None = None,
    options: Mapping[str, Any] | None = None,
    key: str | None = None,
    options_key: str = "policy_options",
    strict_masks: Mapping[str, torch.Tensor] | None = None,
) -> Policy:
    """A policy by registry name. ``head``: the judge head (judge/autojudge); ``options``: shared policy
    options (``OPTION_DEFAULTS``). ``key`` / ``options_key``: how the caller names the threshold's and the
    options' settings in error messages (default: the policy name and ``policy_options``). ``strict_masks``:
    ``strict_token_mask`` per class, needed when ``strict_tokens`` is set."""
    key = key or name
    if name not in POLICIES:
        raise ValueError(f"{key}: unknown policy '{name}'; known: {sorted(POLICIES)}")
    opts = {**OPTION_DEFAULTS, **dict(options or {})}
    unknown = sorted(set(opts) - set(OPTION_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown {options_key} key(s) {unknown}; known: {sorted(OPTION_DEFAULTS)}")
    if name == "lossless":
        return Policy()
    kind = check_strict_tokens(opts["strict_tokens"], options_key)
    if POLICIES[name] is JudgeRule:
        rule = JudgeRule(
            threshold,
            head=head,
            name=name,
            key=key,
            judge_strict_top1=opts["judge_strict_top1"],
            options_key=options_key,
        )
    else:
        rule = POLICIES[name](threshold, key=key, options_key=options_key, **opts)
    if kind is None:
        return rule
    if not strict_masks or kind not in strict_masks:
        raise ValueError(
            f"{options_key}.strict_tokens={kind} needs the tokenizer's {kind} mask (strict_token_mask): the "
            "caller passes strict_masks"
        )
    return StrictTokens(rule, strict_masks[kind], kind)


class StrictTokens(Policy):
    """A rule whose extra acceptances stop where the draft token or the target's own choice is in a token
    class (``strict_tokens``, e.g. digits): there only the standard test accepts."""

    def __init__(self, rule: Policy, mask: torch.Tensor, kind: str):
        self.rule, self.mask, self.kind = rule, mask, kind
        self.name, self.threshold = rule.name, rule.threshold
        self.needs_draft_logits, self.needs_draft_hidden = rule.needs_draft_logits, rule.needs_draft_hidden
        self.positionwise = rule.positionwise  # the decoder passes what the wrapped rule reads
        self.feature_spec = rule.feature_spec
        self.head = getattr(rule, "head", None)

    def accept(self, v: Verification) -> torch.Tensor | None:
        ok = self.rule.accept(v)
        if ok is None:
            return None
        if self.mask.device != v.draft_tokens.device:
            self.mask = self.mask.to(v.draft_tokens.device)
        return ok & ~(self.mask[v.draft_tokens] | self.mask[v.target_argmax[..., :-1]])

    def __repr__(self) -> str:
        return f"StrictTokens({self.rule!r}, {self.kind})"


def load_head(
    folder: str | Path,
    target_info: Mapping[str, Any],
    target_hidden: int,
    draft_hidden: int,
    device: torch.device | str = "cpu",
    key: str = "eval.judge_dir",
) -> JudgeHead:
    """Load a head folder and check it fits the loaded target (model fingerprint, feature size)."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{key}: no judge head folder at '{folder}' (run the train stage, or set {key})")
    head = JudgeHead.from_pretrained(folder)
    spec = FeatureSpec.from_mapping(head.config.features)
    try:
        head.check_compatible(dict(target_info), spec.dim(target_hidden, draft_hidden))
    except ValueError as e:
        raise ValueError(f"{key} '{folder}': {e}") from e
    return head.to(device).eval()
