"""diffusers ``DiTTransformer2DModel`` (class-conditional, adaLN-Zero): called
``model(x, timestep=t, class_labels=y).sample``; the null class is ``num_embeds_ada_norm``."""
from __future__ import annotations

import torch
from torch import nn

from ditgraft.models.families.base import cond_tuple, unwrap
from ditgraft.models.families.diffusers_common import DiffusersFamily


class DiffusersDiTFamily(DiffusersFamily):
    name = "diffusers_dit"
    cls_name = "DiTTransformer2DModel"

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        (y,) = cond_tuple(cond)
        return model(x, timestep=t, class_labels=y).sample

    def num_classes(self, model: nn.Module) -> int:
        return unwrap(model).config.num_embeds_ada_norm

    def null_cond(self, model: nn.Module, cond):
        (y,) = cond_tuple(cond)
        return torch.full_like(y, unwrap(model).config.num_embeds_ada_norm)

    def example_cond(self, model: nn.Module, batch: int, device):
        return torch.randint(0, model.config.num_embeds_ada_norm, (batch,), device=device)
