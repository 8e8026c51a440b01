"""Where the graftable slots of a model live, and how to read or replace them: a facade over the model families
(``ditgraft.models.families``), which know each kind of model (ditgraft's DiT, diffusers DiT, PixArt).

DiT (ditgraft / official): ``blocks[i].attn`` and ``blocks[i].mlp``; each slot is called as ``slot(x)`` on the
normalised, adaLN-modulated stream and its output is gated by the block, so a replacement is a drop-in module
following the operator contract. Dimensions come from the model: width, heads, token grid.
"""
from __future__ import annotations

from torch import nn

from ditgraft.models.families import family_of
from ditgraft.models.families.base import SLOTS, ModelDims

__all__ = ["SLOTS", "ModelDims", "get_slot", "model_dims", "set_slot", "slot_depths"]


def model_dims(model: nn.Module) -> ModelDims:
    return family_of(model).dims(model)


def slot_depths(model: nn.Module) -> dict[str, int]:
    """{slot: how many slots of that kind the model has} (what layer selectors resolve against; ``Family.slot_depth``:
    one per block, except FLUX's attention, which also counts the single-stream blocks)."""
    family = family_of(model)
    return {slot: family.slot_depth(model, slot) for slot in SLOTS}


def get_slot(model: nn.Module, layer: int, slot: str) -> nn.Module:
    """The operator in a slot (for a diffusers model, the operator inside its slot adapter once grafted)."""
    return family_of(model).get_slot(model, layer, slot)


def set_slot(model: nn.Module, layer: int, slot: str, module: nn.Module) -> None:
    family_of(model).set_slot(model, layer, slot, module)
