"""Channel-mixing operators: DiT's MLP (timm ``Mlp`` names ``fc1`` / ``fc2``, tanh-GELU) at any expansion ratio."""
from __future__ import annotations

import torch
from torch import nn

from ditgraft.operators.common import grid_tokens
from ditgraft.operators.registry import register


@register("mlp", slot="mlp", description="Linear D->rD, tanh-GELU, Linear rD->D (any ratio r)")
class MLP(nn.Module):
    def __init__(self, dim: int, heads: int = 1, grid: tuple[int, int] = (0, 0), ratio: float = 4.0,
                 hidden: int | None = None):
        super().__init__()
        hidden = int(hidden if hidden is not None else dim * ratio)
        if hidden <= 0:
            raise ValueError(f"ratio={ratio} gives hidden={hidden}; it must be > 0")
        self.dim, self.hidden, self.grid = dim, hidden, tuple(grid)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    @staticmethod
    def flops(dim: int, heads: int, grid: tuple[int, int], ratio: float = 4.0, hidden: int | None = None, **_) -> int:
        hidden = int(hidden if hidden is not None else dim * ratio)
        return 2 * 2 * grid_tokens(grid) * dim * hidden
