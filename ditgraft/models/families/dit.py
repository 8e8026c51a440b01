"""ditgraft's own DiT (and so the official DiT checkpoints): slots ``blocks[i].attn`` and ``blocks[i].mlp``.

Each slot is called as ``slot(x)`` on the normalised, adaLN-modulated stream and its output is gated by the block,
so a replacement operator goes in as it is. The model is called ``model(x, t, y)`` with class labels ``y``.
"""
from __future__ import annotations

import torch
from torch import nn

from ditgraft.models.dit import DiT
from ditgraft.models.families.base import Family, ModelDims, cond_tuple, unwrap


class DiTFamily(Family):
    name = "dit"
    supports = frozenset({"sample", "eval", "analysis", "restructure", "compile"})

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, DiT) or (hasattr(model, "blocks") and hasattr(model, "grid")
                                          and hasattr(model, "num_heads"))

    def dims(self, model: nn.Module) -> ModelDims:
        return ModelDims(len(model.blocks), model.blocks[0].norm1.normalized_shape[0], model.num_heads,
                         tuple(model.grid))

    def learn_sigma(self, model: nn.Module) -> bool:
        return model.learn_sigma

    def in_channels(self, model: nn.Module) -> int:
        return model.in_channels

    def cfg_channels(self, model: nn.Module) -> int:
        return getattr(model, "cfg_channels", model.in_channels)

    def patch_size(self, model: nn.Module) -> int:
        return model.patch_size

    def num_classes(self, model: nn.Module) -> int:
        return unwrap(model).num_classes

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return unwrap(model).blocks

    def set_blocks(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        unwrap(model).blocks = blocks

    def slot_attr(self, slot: str) -> str:
        return slot

    def dropped_labels_module(self, model: nn.Module) -> nn.Module:
        return unwrap(model).y_embedder.embedding_table

    def frozen_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [model.pos_embed]  # fixed sin-cos table, as in DiT

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return model(x, t, *cond_tuple(cond))

    def null_cond(self, model: nn.Module, cond):
        (y,) = cond_tuple(cond)
        return torch.full_like(y, unwrap(model).num_classes)

    def example_cond(self, model: nn.Module, batch: int, device):
        return torch.randint(0, model.num_classes, (batch,), device=device)

    def config(self, model: nn.Module) -> dict:
        return dict(model.config)

    def build(self, config: dict) -> nn.Module:
        return DiT(**config)
