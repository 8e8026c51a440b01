"""Softmax attention operators.

``mha`` is DiT's attention (timm ``Attention`` parameter names ``qkv`` / ``proj``), used by the DiT model itself and
for self-grafting. ``impl="sdpa"`` is the fast path (torch scaled_dot_product_attention); ``impl="reference"``
is the plain softmax(QK^T / sqrt(d)) V that tests compare it with.

``tiled_attention`` is the shared fast path of the local operators (swa, local2d, clear in local_attention.py):
softmax attention under a sparse pattern, computed tile by tile so no N x N tensor is ever built.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ditgraft.operators.common import check_choice, check_heads, projection_flops, split_heads
from ditgraft.operators.registry import register

IMPLS = ("sdpa", "reference")


def check_impl(impl: str) -> str:
    return check_choice("impl", impl, IMPLS)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                        return_lse: bool = False):
    """Plain attention on [B, heads, N, d] tensors; ``mask`` is boolean [N, N], True = may attend. With
    ``return_lse``: (output, log-normaliser [B, heads, N], the logsumexp of each query's allowed scores)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if return_lse:
        lse = torch.logsumexp(scores, dim=-1)
        return torch.exp(scores - lse[..., None]) @ v, lse
    return scores.softmax(dim=-1) @ v


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention matrix [B, heads, N, N] (for analysis)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1)


@register("mha", slot="attn", description="multi-head softmax attention (DiT's own; self-grafting)")
class MHA(nn.Module):
    def __init__(self, dim: int, heads: int, grid: tuple[int, int] = (0, 0), qkv_bias: bool = True,
                 impl: str = "sdpa"):
        super().__init__()
        self.dim, self.heads, self.grid = dim, heads, tuple(grid)
        self.head_dim = check_heads(dim, heads)
        self.impl = check_impl(impl)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor):
        return split_heads(self.qkv(x), self.heads)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.split_heads(x)
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = reference_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    @staticmethod
    def flops(dim: int, heads: int, grid: tuple[int, int], **_) -> int:
        n = grid[0] * grid[1]
        return projection_flops(n, dim) + 2 * 2 * n * n * dim


# ----------------------------------------------------------------------------------------------------------------------
# Tiled attention: softmax attention under a sparse, local pattern without any N x N tensor.
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TilePlan:
    """Where each tile of queries looks. Built once per (grid, device) by the local-attention operators.

    ``q_idx`` [T, Q]: token ids of the queries of each tile; slots past the end repeat a real token (their outputs
    are dropped). ``k_idx`` [T, K]: token ids of the keys each tile may see (a superset of its queries' windows).
    ``blocked`` [T, Q, K]: True where the pattern forbids the pair; every row allows at least one key.
    ``inv`` [N]: position of each token in the flattened [T * Q] query list.
    ``raster``: the first N entries of ``q_idx`` are 0..N-1, so queries need no gather (pad + reshape instead).
    """

    q_idx: torch.Tensor
    k_idx: torch.Tensor
    blocked: torch.Tensor
    inv: torch.Tensor
    raster: bool


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: TilePlan, return_lse: bool = False):
    """Softmax attention on [B, heads, N, d] tensors where query i only sees the keys the plan allows.

    Each tile of Q queries attends to its own K gathered keys with a small [Q, K] mask, as one batched matmul over
    all tiles; memory and time are O(N * K) instead of O(N^2). Same result as
    ``reference_attention(q, k, v, dense_mask)`` for the dense mask the plan encodes (also with ``return_lse``).
    """
    B, h, N, d = q.shape
    T, Q = plan.q_idx.shape
    K = plan.k_idx.shape[1]
    if plan.raster:
        qt = F.pad(q, (0, 0, 0, T * Q - N)) if T * Q > N else q
        qt = qt.reshape(B, h, T, Q, d)
    else:
        qt = q.index_select(2, plan.q_idx.flatten()).view(B, h, T, Q, d)
    kt = k.index_select(2, plan.k_idx.flatten()).view(B, h, T, K, d)
    vt = v.index_select(2, plan.k_idx.flatten()).view(B, h, T, K, d)
    scores = qt @ kt.transpose(-2, -1)  # [B, h, T, Q, K]
    scores = scores.mul_(d ** -0.5).masked_fill_(plan.blocked, float("-inf"))
    if not return_lse:
        out = (scores.softmax(dim=-1) @ vt).view(B, h, T * Q, d)
        return out[:, :, :N] if plan.raster else out.index_select(2, plan.inv)
    lse = torch.logsumexp(scores, dim=-1)
    out = (torch.exp(scores - lse[..., None]) @ vt).view(B, h, T * Q, d)
    lse = lse.view(B, h, T * Q)
    if plan.raster:
        return out[:, :, :N], lse[:, :, :N]
    return out.index_select(2, plan.inv), lse.index_select(2, plan.inv)
