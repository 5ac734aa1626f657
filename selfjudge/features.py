"""Judge features: the one function that computes them, shared by data_gen and eval.

The features of a draft token ``d`` at response position ``i``, in this order (each part optional):

1. ``state_offsets`` 0: the target's hidden state at ``i`` (the position whose *input* is ``d``);
   -1: the state at ``i-1``, the one whose output is the distribution ``p`` over ``d``. Each is taken
   over the chosen ``layers`` (last layer after the final norm), concatenated;
2. ``include_draft``: the draft's last hidden state that proposed ``d`` (AutoJudge's "draft+target");
3. ``scalars``: what the training-free rules read, from ``p`` (the target's next-token distribution at
   ``i-1``, untempered) and ``q`` (the draft's): ``target_logp`` log p(d), ``target_top1_logp``
   max log p, ``target_gap`` max log p - log p(d), ``target_entropy`` H(p), ``target_log_rank``
   log(1 + #{v : p(v) > p(d)}), ``draft_logp`` log q(d), ``kl`` KL(q || p).

In speculative decoding the verify pass computes all of these inputs (its logits and states, and the
draft's logits when the policy asks for them), so the judge costs a few reductions over the vocabulary
and one small matmul per round, and no extra forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from selfjudge.forward import lm_forward

SCALARS = ("target_logp", "target_top1_logp", "target_gap", "target_entropy", "target_log_rank", "draft_logp", "kl")
DRAFT_SCALARS = ("draft_logp", "kl")  # need the draft's logits
STATE_OFFSETS = (-1, 0)  # i-1: produced p(. | prefix); i: reads d
FEATURE_KEYS = ("layers", "include_draft", "state_offsets", "scalars")


@dataclass(frozen=True)
class FeatureSpec:
    layers: tuple[int, ...] = (-1,)  # indices into hidden_states (0 = embeddings, -1 = last layer, post-norm)
    include_draft: bool = False  # append the draft's last hidden state (draft+target layout)
    state_offsets: tuple[int, ...] = (0,)  # target states read: 0 at i (input d), -1 at i-1 (output p); () none
    scalars: tuple[str, ...] = ()  # rule quantities appended (SCALARS), in the order given

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> FeatureSpec:
        """From a config mapping; keys missing (a head saved before they existed) take the defaults."""
        d = dict(d or {})
        unknown = set(d) - set(FEATURE_KEYS)
        if unknown:
            raise KeyError(f"unknown feature key(s) {sorted(unknown)}; allowed: {sorted(FEATURE_KEYS)}")
        layers = tuple(int(x) for x in d.get("layers", (-1,)))
        offsets = tuple(int(x) for x in d.get("state_offsets", (0,)))
        scalars = tuple(str(x) for x in d.get("scalars", ()))
        if not layers:
            raise ValueError("features.layers must name at least one layer (e.g. [-1])")
        if not set(offsets) <= set(STATE_OFFSETS) or len(set(offsets)) != len(offsets):
            raise ValueError(
                f"features.state_offsets must be distinct values from {list(STATE_OFFSETS)}, got {list(offsets)}"
            )
        bad = [x for x in scalars if x not in SCALARS]
        if bad or len(set(scalars)) != len(scalars):
            raise ValueError(f"features.scalars must be distinct names from {list(SCALARS)}, got {list(scalars)}")
        spec = cls(
            layers=layers, include_draft=bool(d.get("include_draft", False)), state_offsets=offsets, scalars=scalars
        )
        if not offsets and not spec.include_draft and not scalars:
            raise ValueError("features select nothing: give features.state_offsets, include_draft or scalars")
        return spec

    def as_dict(self) -> dict:
        return {
            "layers": list(self.layers),
            "include_draft": self.include_draft,
            "state_offsets": list(self.state_offsets),
            "scalars": list(self.scalars),
        }

    def dim(self, target_hidden: int, draft_hidden: int | None = None) -> int:
        return sum(s.stop - s.start for s in self.columns(target_hidden, draft_hidden).values())

    def columns(self, target_hidden: int, draft_hidden: int | None = None) -> dict[str, slice]:
        """Name -> column slice of the feature vector: ``state@0``, ``state@-1``, ``draft``, each scalar."""
        out, at = {}, 0
        for off in self.state_offsets:
            out[f"state@{off}"] = slice(at, at + len(self.layers) * target_hidden)
            at = out[f"state@{off}"].stop
        if self.include_draft:
            if draft_hidden is None:
                raise ValueError("features.include_draft needs the draft's hidden size")
            out["draft"] = slice(at, at + draft_hidden)
            at += draft_hidden
        for k, name in enumerate(self.scalars):
            out[name] = slice(at + k, at + k + 1)
        return out

    def columns_in(self, stored: FeatureSpec, target_hidden: int, draft_hidden: int | None = None) -> list[int]:
        """Where this layout's columns sit in a vector of the ``stored`` layout (a superset of it), in this
        layout's order: a head trained on a subset of a data folder's features (``train.features``). Every
        part must be stored (the same layer indices, offsets, draft state and scalars), else ValueError."""
        have = stored.columns(target_hidden, draft_hidden)
        missing = [f"layers {x}" for x in self.layers if self.state_offsets and x not in stored.layers]
        missing += [f"state_offsets {x}" for x in self.state_offsets if x not in stored.state_offsets]
        missing += ["include_draft"] if self.include_draft and not stored.include_draft else []
        missing += [f"scalars {x}" for x in self.scalars if x not in stored.scalars]
        if missing:
            raise ValueError(
                f"features {self.as_dict()} are not all in the stored layout {stored.as_dict()}: missing "
                f"{', '.join(missing)} (choose a subset of the data folder's features, or regenerate it with them)"
            )
        out: list[int] = []
        for off in self.state_offsets:
            start = have[f"state@{off}"].start
            for layer in self.layers:
                at = start + stored.layers.index(layer) * target_hidden
                out.extend(range(at, at + target_hidden))
        if self.include_draft:
            out.extend(range(have["draft"].start, have["draft"].stop))
        for name in self.scalars:
            out.append(have[name].start)
        return out

    @property
    def needs_draft_logits(self) -> bool:
        return any(x in DRAFT_SCALARS for x in self.scalars)

    @property
    def needs_logits(self) -> bool:
        return bool(self.scalars)

    @property
    def last_layer_only(self) -> bool:
        return self.layers == (-1,)


@dataclass
class ForwardOut:
    logits: torch.Tensor  # [B, T, V]
    hidden: torch.Tensor  # [B, T, F_target]: selected target layers, concatenated
    past_key_values: Any


def forward_with_hidden(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    spec: FeatureSpec = FeatureSpec(),
    **kwargs: Any,
) -> ForwardOut:
    """One forward pass returning logits and the hidden states the judge reads.

    With the default spec (last layer only) the decoder body runs once and the LM head is applied to
    its output, so no per-layer states are kept. ``kwargs`` go to the model (``past_key_values``,
    ``attention_mask``, ``position_ids``, ``use_cache``, ...; caches go in as ``cache=``). Outputs come
    back on ``input_ids``' device, also when ``device_map`` spreads the layers over several devices.
    """
    out = lm_forward(model, input_ids, layers=spec.layers, **kwargs)
    return ForwardOut(out.logits, out.features, out.cache)


def scalar_features(
    names: Sequence[str],
    target_logits: torch.Tensor,
    tokens: torch.Tensor,
    draft_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """The named rule quantities (see the module docstring) of ``tokens`` [...].

    ``target_logits``/``draft_logits``: [..., V] untempered next-token logits at the position that
    proposed each token (any float dtype; computed in float32). Only the reductions the names need run,
    straight from the logits (log p(d) = l_d - logsumexp(l), H = logsumexp(l) - sum p*l,
    KL(q || p) = sum q*(m - l) - logsumexp(m) + logsumexp(l) for draft logits m): no [.., V] log-softmax
    is kept. Returns [..., len(names)] float32.
    """
    bad = [n for n in names if n not in SCALARS]
    if bad:
        raise ValueError(f"unknown scalar feature(s) {bad}; known: {list(SCALARS)}")
    if any(n in DRAFT_SCALARS for n in names) and draft_logits is None:
        raise ValueError(
            f"features {[n for n in names if n in DRAFT_SCALARS]} need the draft's logits, none were given"
        )
    want = set(names)
    l = target_logits.float()  # [..., V]
    tok = tokens[..., None].long()
    l_d = l.gather(-1, tok)[..., 0]  # [...] logit of d
    val: dict[str, torch.Tensor] = {}
    lse = (
        torch.logsumexp(l, -1)
        if want & {"target_logp", "target_top1_logp", "target_entropy", "kl", "draft_logp"}
        else None
    )
    if want & {"target_top1_logp", "target_gap"}:
        top = l.max(-1).values
        val["target_top1_logp"] = top - lse if lse is not None else top
        val["target_gap"] = top - l_d
    if "target_logp" in want:
        val["target_logp"] = l_d - lse
    if "target_entropy" in want:
        val["target_entropy"] = lse - (torch.softmax(l, -1) * l).sum(-1)
    if "target_log_rank" in want:
        val["target_log_rank"] = torch.log1p((l > l_d[..., None]).sum(-1).float())
    if want & set(DRAFT_SCALARS):
        m = draft_logits.float()
        lse_q = torch.logsumexp(m, -1)
        val["draft_logp"] = m.gather(-1, tok)[..., 0] - lse_q
        if "kl" in want:
            val["kl"] = (torch.softmax(m, -1) * (m - l)).sum(-1) - lse_q + lse
    if not names:
        return l.new_zeros(*l.shape[:-1], 0)
    return torch.stack([val[n] for n in names], -1)


def judge_features(
    target_hidden: torch.Tensor | None,
    spec: FeatureSpec,
    draft_hidden: torch.Tensor | None = None,
    *,
    prev_hidden: torch.Tensor | None = None,
    scalars: torch.Tensor | None = None,
) -> torch.Tensor:
    """Assemble judge features in the layout of ``spec`` (see :meth:`FeatureSpec.columns`).

    ``target_hidden``: [..., F_target] from :func:`forward_with_hidden` at ``i`` (input ``d``);
    ``prev_hidden``: the same at ``i-1``; ``draft_hidden``: [..., H_draft]; ``scalars``: [..., k] from
    :func:`scalar_features` with ``spec.scalars``. Only the parts the spec selects are read.
    Returns [..., spec.dim(...)] in float32.
    """
    given = {0: target_hidden, -1: prev_hidden}
    parts: list[torch.Tensor] = []
    for off in spec.state_offsets:
        if given[off] is None:
            raise ValueError(f"features.state_offsets has {off} but no target state at i{off or ''} was given")
        parts.append(given[off])
    if spec.include_draft:
        if draft_hidden is None:
            raise ValueError("features.include_draft=true but no draft hidden states were given")
        parts.append(draft_hidden)
    if spec.scalars:
        if scalars is None or scalars.shape[-1] != len(spec.scalars):
            raise ValueError(
                f"features.scalars={list(spec.scalars)} but {None if scalars is None else scalars.shape[-1]} "
                f"scalar columns were given"
            )
        parts.append(scalars)
    dev = parts[0].device
    return torch.cat([p.to(dev).float() for p in parts], dim=-1)
