"""One way from a config section to settings: a frozen dataclass built strictly from a plain mapping.

Every stage's settings class is a frozen dataclass with no defaults (the YAML under ``conf/`` is the only
source of defaults). :func:`build` takes the section's plain dict and the key prefix to name in errors
(``"eval"``, ``"data_gen"``): a missing key or an unknown one (a typo such as ``eval.gama``) is an error
naming ``prefix.key`` and the closest known key, raised before any work starts. Nested sections are
converted by the class's ``_nested`` map of field -> ``convert(value, prefix)``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def check_keys(d: Mapping[str, Any], known: set[str] | list[str], prefix: str, required: bool = True) -> None:
    """Unknown keys of ``d`` (and, when ``required``, missing ones) are a ValueError naming ``prefix.key``."""
    known = set(known)
    for k in sorted(set(d) - known):
        close = difflib.get_close_matches(k, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean '{prefix}.{close[0]}'?" if close else f"; known keys: {sorted(known)}"
        raise ValueError(f"unknown key '{prefix}.{k}'{hint}")
    missing = sorted(known - set(d)) if required else []
    if missing:
        raise ValueError(
            f"missing key(s) {[f'{prefix}.{k}' for k in missing]}: the config section '{prefix}' lacks "
            "them (an old or hand-written config?); take them from conf/"
        )


def build(
    cls: type[T], d: Mapping[str, Any], prefix: str, nested: Mapping[str, Callable[[Any, str], Any]] | None = None
) -> T:
    """``cls(**d)`` with every field required and no other key allowed; ``nested``: field -> convert(value,
    prefix.field). The class's own ``__post_init__`` checks the values."""
    if not isinstance(d, Mapping):
        raise ValueError(f"config section '{prefix}' must be a mapping, got {type(d).__name__}")
    check_keys(d, [f.name for f in fields(cls)], prefix)
    conv = dict(nested or {})
    return cls(**{k: conv[k](v, f"{prefix}.{k}") if k in conv else v for k, v in d.items()})


def require(ok: bool, key: str, what: str, value: Any) -> None:
    """A ValueError ``key must be what, got value`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{key} must be {what}, got {value!r}")


def is_int(v: Any, low: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low)
