"""Where the graftable slots of a model family live, and how to read or replace them.

DiT (ditgraft / official): ``blocks[i].attn`` and ``blocks[i].mlp``; each slot is called as ``slot(x)`` on the
normalised, adaLN-modulated stream and its output is gated by the block, so a replacement is a drop-in module
following the operator contract. Dimensions come from the model: width, heads, token grid.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

SLOTS = ("attn", "mlp")


@dataclass(frozen=True)
class ModelDims:
    depth: int
    dim: int
    heads: int
    grid: tuple[int, int]


def model_dims(model: nn.Module) -> ModelDims:
    if hasattr(model, "blocks") and hasattr(model, "grid"):
        return ModelDims(len(model.blocks), model.blocks[0].norm1.normalized_shape[0], model.num_heads,
                         tuple(model.grid))
    raise TypeError(f"{type(model).__name__} is not a supported model family (DiT with .blocks and .grid)")


def _check(model: nn.Module, layer: int, slot: str) -> None:
    if slot not in SLOTS:
        raise ValueError(f"slot={slot!r} is not allowed; use one of {SLOTS}")
    depth = model_dims(model).depth
    if not 0 <= layer < depth:
        raise ValueError(f"layer={layer} is out of range for a depth-{depth} model")


def get_slot(model: nn.Module, layer: int, slot: str) -> nn.Module:
    _check(model, layer, slot)
    return getattr(model.blocks[layer], slot)


def set_slot(model: nn.Module, layer: int, slot: str, module: nn.Module) -> None:
    _check(model, layer, slot)
    setattr(model.blocks[layer], slot, module)

