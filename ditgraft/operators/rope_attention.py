"""Softmax attention with RMS qk-norm and axial rotary position embeddings over the patch grid: the attention
inside FLUX's and Wan's blocks, as a ditgraft operator.

Position ids are (frame, row, column): an image grid (rows, columns) is one frame, so its ids are (0, row, column),
Flux's image ids; a video grid (frames, rows, columns) numbers its frames, as Wan's ``WanRotaryPosEmbed`` does.
``axes_dims`` splits each head's channels between the three axes (FLUX.1: 16, 56, 56 of 128; Wan 2.1: 44, 42, 42
of 128) and every axis rotates its channel pairs by position x theta^(-2i / axis_dim), the pairs interleaved
(channels 2i and 2i + 1), as diffusers' ``FluxPosEmbed`` / ``apply_rotary_emb`` and Wan's attention processor
compute them. Without ``axes_dims`` there is no rotation.

``qk_norm``: RMSNorm of the queries and keys before the rotation; ``True`` or ``"rms_norm"`` normalises each head
(FLUX), ``"rms_norm_across_heads"`` normalises all heads of a token together (Wan's ``qk_norm``), ``False`` none.
Parameter names follow ``mha`` (``qkv``, ``proj``) plus ``norm_q`` / ``norm_k``, so an ``mha`` state dict loads
into it (strict=False) and a Flux or Wan teacher's attention maps onto it exactly.

``attend_with_lse`` gives the per-head output before ``proj`` and its log-normaliser: what a split image-text
attention slot needs to mix this operator's image-to-image part with the teacher's attention over text keys.
"""
from __future__ import annotations

import torch
from torch import nn

from ditgraft.operators.common import check_heads, grid_tokens, normed_heads, projection_flops, qk_norms
from ditgraft.operators.registry import register



def axial_rope(grid: tuple[int, ...], axes_dims: tuple[int, ...], theta: float, device) -> tuple[torch.Tensor, ...]:
    """(cos, sin), each [N, head_dim], for the tokens of ``grid`` (rows, columns) or (frames, rows, columns) in
    row-major order (frame-major for video), ids (frame, row, column); an image grid is frame 0."""
    if len(axes_dims) != 3:
        raise ValueError(f"axes_dims={tuple(axes_dims)} must give 3 axes (frame, row, column)")
    if len(grid) not in (2, 3):
        raise ValueError(f"grid={tuple(grid)} is not allowed; use (rows, columns) or (frames, rows, columns)")
    frames, rows, cols = (1, *grid) if len(grid) == 2 else grid
    ids = torch.stack(torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij"),
                      dim=-1).reshape(-1, 3)
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles = torch.outer(ids[:, axis].to(torch.float64), freqs)
        cos.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, dim=-1).to(device), torch.cat(sin, dim=-1).to(device)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of [B, heads, N, d] by the angles whose cos / sin are [N, d]."""
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    turned = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos + turned.float() * sin).to(x.dtype)


def check_axes_dims(axes_dims, head_dim: int) -> tuple[int, ...] | None:
    """``axes_dims`` as a tuple (None: no RoPE), after checking that it splits the head dim into even parts."""
    if axes_dims is None:
        return None
    axes_dims = tuple(int(a) for a in axes_dims)
    if sum(axes_dims) != head_dim or any(a % 2 for a in axes_dims):
        raise ValueError(f"axes_dims={axes_dims} must be even numbers summing to the head dim {head_dim}")
    return axes_dims


def rope_qk(cache: dict, q: torch.Tensor, k: torch.Tensor, grid: tuple[int, ...], axes_dims, theta: float):
    """q, k [B, heads, N, d] rotated by the axial RoPE of ``grid`` (tables kept in ``cache`` per grid and device)."""
    key = (tuple(grid), q.device)
    if key not in cache:
        cache[key] = axial_rope(grid, axes_dims, theta, q.device)
    cos, sin = cache[key]
    return rotate(q, cos, sin), rotate(k, cos, sin)


@register("rope_mha", slot="attn",
          description="softmax attention with RMS qk-norm and axial RoPE over the patch grid (Flux's and Wan's)")
class RopeMHA(nn.Module):
    def __init__(self, dim: int, heads: int, grid: tuple[int, ...] = (0, 0), axes_dims: tuple[int, ...] | None = None,
                 theta: float = 10000.0, qk_norm: bool | str = True, eps: float = 1e-6, qkv_bias: bool = True):
        super().__init__()
        self.dim, self.heads, self.grid = dim, heads, tuple(grid)
        self.head_dim = check_heads(dim, heads)
        self.axes_dims, self.theta = check_axes_dims(axes_dims, self.head_dim), float(theta)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.qk_norm, self.norm_q, self.norm_k = qk_norms(dim, heads, qk_norm, eps)
        self._rope: dict = {}

    def qkv_heads(self, x: torch.Tensor, grid: tuple[int, ...]):
        q, k, v = normed_heads(self.qkv(x), self.heads, self.qk_norm, self.norm_q, self.norm_k)
        if self.axes_dims is not None:
            q, k = rope_qk(self._rope, q, k, grid, self.axes_dims, self.theta)
        return q, k, v

    def attend_with_lse(self, x: torch.Tensor, grid: tuple[int, ...]):
        """(per-head output [B, heads, N, d] before ``proj``, log-normaliser [B, heads, N])."""
        q, k, v = self.qkv_heads(x, grid)
        scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
        lse = torch.logsumexp(scores, dim=-1)
        return torch.exp(scores - lse[..., None]) @ v, lse

    def forward(self, x: torch.Tensor, grid: tuple[int, ...] | None = None) -> torch.Tensor:
        B, N, C = x.shape
        grid = tuple(grid or self.grid)
        if grid_tokens(grid) != N:
            raise ValueError(f"rope_mha got {N} tokens for the grid {grid}")
        out = torch.nn.functional.scaled_dot_product_attention(*self.qkv_heads(x, grid))
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    @staticmethod
    def flops(dim: int, heads: int, grid: tuple[int, ...], **_) -> int:
        n = grid_tokens(grid)
        return projection_flops(n, dim) + 2 * 2 * n * n * dim
