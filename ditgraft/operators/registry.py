"""Name -> builder registry for token-mixing and channel-mixing operators.

Every operator shares one contract: ``op(x: [B, N, D], grid=(H, W)) -> [B, N, D]``. It is built by name from
``(dim, heads, grid, **options)``; the grid given at build time is the default for ``forward``.
Each registered class also provides ``flops(dim, heads, grid, **options) -> int``: forward FLOPs for one sample
(a multiply-add counts as 2), so tables and benchmarks can print FLOP ratios.

This module is a leaf: operator modules import ``register`` from it, and ``ditgraft.operators`` imports every
operator module once, so that importing the package fills the registry.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from torch import nn

from ditgraft.slots import SLOTS


@dataclass(frozen=True)
class OperatorSpec:
    name: str
    cls: type
    slot: str  # one of ditgraft.models.adapters.SLOTS: "attn" (token mixer) or "mlp" (channel mixer)
    description: str


_REGISTRY: dict[str, OperatorSpec] = {}


def register(name: str, slot: str, description: str) -> Callable[[type], type]:
    if slot not in SLOTS:
        raise ValueError(f"slot={slot!r} is not allowed; use one of {SLOTS}")

    def wrap(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"operator {name!r} is registered twice")
        _REGISTRY[name] = OperatorSpec(name, cls, slot, description)
        return cls

    return wrap


def operator_names(slot: str | None = None) -> list[str]:
    return sorted(n for n, s in _REGISTRY.items() if slot is None or s.slot == slot)


def get_spec(name: str) -> OperatorSpec:
    if name not in _REGISTRY:
        raise KeyError(f"operator={name!r} is unknown; allowed: {', '.join(operator_names())}")
    return _REGISTRY[name]


def operator_options(name: str) -> list[str] | None:
    """The option names an operator's builder takes beyond (dim, heads, grid); None when it takes any."""
    params = inspect.signature(get_spec(name).cls.__init__).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name not in ("self", "dim", "heads", "grid")
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def build_operator(name: str, dim: int, heads: int, grid: tuple[int, int], **options) -> nn.Module:
    spec = get_spec(name)
    allowed = operator_options(name)
    unknown = sorted(set(options) - set(allowed)) if allowed is not None else []
    if unknown:
        raise ValueError(f"operator {name!r}: unknown option{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))}; allowed: {', '.join(allowed) or 'none'}")
    try:
        return spec.cls(dim=dim, heads=heads, grid=tuple(grid), **options)
    except TypeError as err:
        raise ValueError(f"operator {name!r}: bad options {options!r} ({err})") from err


def operator_flops(name: str, dim: int, heads: int, grid: tuple[int, int], **options) -> int:
    return int(get_spec(name).cls.flops(dim=dim, heads=heads, grid=tuple(grid), **options))
