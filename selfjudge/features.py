"""Judge features: the one function that computes them, shared by data_gen and eval.

The feature of a token at position ``i`` is the target's hidden state at ``i`` (the position whose
*input* is that token), taken after the final norm for the last layer, concatenated over the chosen
layers, optionally followed by the draft's last hidden state at the same position (AutoJudge's
"draft+target" layout). In speculative decoding the verify pass computes exactly these states, so
the judge costs one small matmul per round and no extra forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch


@dataclass(frozen=True)
class FeatureSpec:
    layers: tuple[int, ...] = (-1,)  # indices into hidden_states (0 = embeddings, -1 = last layer, post-norm)
    include_draft: bool = False      # append the draft's last hidden state (draft+target layout)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> "FeatureSpec":
        d = dict(d or {})
        unknown = set(d) - {"layers", "include_draft"}
        if unknown:
            raise KeyError(f"unknown feature key(s) {sorted(unknown)}; allowed: ['include_draft', 'layers']")
        layers = tuple(int(x) for x in d.get("layers", (-1,)))
        if not layers:
            raise ValueError("features.layers must name at least one layer (e.g. [-1])")
        return cls(layers=layers, include_draft=bool(d.get("include_draft", False)))

    def as_dict(self) -> dict:
        return {"layers": list(self.layers), "include_draft": self.include_draft}

    def dim(self, target_hidden: int, draft_hidden: int | None = None) -> int:
        n = len(self.layers) * target_hidden
        if self.include_draft:
            if draft_hidden is None:
                raise ValueError("features.include_draft needs the draft's hidden size")
            n += draft_hidden
        return n

    @property
    def last_layer_only(self) -> bool:
        return self.layers == (-1,)


@dataclass
class ForwardOut:
    logits: torch.Tensor            # [B, T, V]
    hidden: torch.Tensor            # [B, T, F_target]: selected target layers, concatenated
    past_key_values: Any


def _cache_of(out: Any) -> Any:
    """The returned KV cache: ``cache`` in transformers >= 5.2x, ``past_key_values`` before."""
    fields = out if isinstance(out, dict) else vars(out)   # mapping access: no deprecated-property warning
    cache = fields.get("cache")
    return cache if cache is not None else fields.get("past_key_values")


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
    home = input_ids.device
    if spec.last_layer_only:
        body = getattr(model, model.base_model_prefix)
        out = body(input_ids=input_ids, **kwargs)
        h = out.last_hidden_state                                  # [B, T, H], post final norm
        logits = model.get_output_embeddings()(h)                  # [B, T, V]
        return ForwardOut(logits.to(home), h.to(home), _cache_of(out))
    out = model(input_ids=input_ids, output_hidden_states=True, **kwargs)
    hs = out.hidden_states                                         # L+1 x [B, T, H]
    h = torch.cat([hs[i].to(home) for i in spec.layers], dim=-1)   # [B, T, len(layers)*H]
    return ForwardOut(out.logits.to(home), h, _cache_of(out))


def judge_features(
    target_hidden: torch.Tensor,
    spec: FeatureSpec,
    draft_hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """Assemble judge features from the target's (and optionally the draft's) hidden states.

    ``target_hidden``: [..., F_target] from :func:`forward_with_hidden`; ``draft_hidden``: [..., H_draft]
    at the same positions. Returns [..., spec.dim(...)] in float32.
    """
    parts: Sequence[torch.Tensor] = [target_hidden]
    if spec.include_draft:
        if draft_hidden is None:
            raise ValueError("features.include_draft=true but no draft hidden states were given")
        parts = [target_hidden, draft_hidden.to(target_hidden.device)]
    return torch.cat([p.float() for p in parts], dim=-1)
