"""One forward pass of a causal LM: run the decoder body, apply the LM head only where logits are needed.

Every caller that wants logits and hidden states (decoding, the judge features, scoring) goes through
:func:`lm_forward`, so the head never runs over positions nobody reads and the hidden states come from
the same pass as the logits.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch


@dataclass
class LMOut:
    logits: torch.Tensor  # [B, K, V] at the kept positions (K dropped for an integer ``keep``)
    hidden: torch.Tensor  # [B, K, H] last-layer state after the final norm (the LM head's input)
    features: torch.Tensor  # [B, K, len(layers) * H] the requested layers' states, concatenated
    cache: Any  # the KV cache the body returned (None without one)


@cache
def _cache_kwarg(forward) -> str:
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(module: torch.nn.Module) -> str:
    """The keyword a model takes its KV cache by: ``cache`` in transformers >= 5.2x (where
    ``past_key_values`` warns), ``past_key_values`` in 5.20, which the pins still allow."""
    return _cache_kwarg(type(module).forward)


def returned_cache(out: Any) -> Any:
    """The KV cache a model returned: field ``cache`` (transformers >= 5.2x) or ``past_key_values`` (5.20)."""
    fields = out if isinstance(out, dict) else vars(out)  # mapping access: no deprecated-property warning
    c = fields.get("cache")
    return c if c is not None else fields.get("past_key_values")


def lm_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    keep: Any = slice(None),
    layers: Sequence[int] = (-1,),
    cache: Any = None,
    **kwargs: Any,
) -> LMOut:
    """Run ``model``'s body over ``input_ids`` [B, T] and its LM head over positions ``keep`` (an index
    or slice of the T axis: ``-1`` is the last position only). ``layers`` index the hidden states
    (0 = embeddings, -1 = last layer after the final norm); other layers than ``(-1,)`` ask the body
    for every layer's states. ``cache`` is passed under the model's own keyword; ``kwargs`` (attention
    mask, position ids, ``use_cache``...) go to the body unchanged. Outputs come back on
    ``input_ids``' device, also when ``device_map`` spreads the layers over several devices."""
    home = input_ids.device
    body = getattr(model, model.base_model_prefix)
    if cache is not None:
        kwargs[cache_kwarg(body)] = cache
    deep = tuple(layers) != (-1,)
    if deep:
        kwargs["output_hidden_states"] = True
    out = body(input_ids=input_ids, **kwargs)
    h = out.last_hidden_state[:, keep]
    logits = model.get_output_embeddings()(h).to(home)
    h = h.to(home)
    feats = torch.cat([out.hidden_states[i][:, keep].to(home) for i in layers], dim=-1) if deep else h
    return LMOut(logits, h, feats, returned_cache(out))
