"""ReLU-kernel linear attention (SANA / LiT style), bidirectional, per head.

    out_i = sum_j phi(q_i).phi(k_j) v_j / (sum_j phi(q_i).phi(k_j) + eps),   phi = relu

No softmax and no 1/sqrt(d) scale (a scale on q cancels in the ratio). The fast path computes phi(K)^T [V, 1]
first, a [d, d+1] matrix per head, so time and memory are O(N d^2): the extra column of ones carries the normaliser
through the same matmuls (as SANA does). The reference builds the explicit [N, N] kernel matrix.
The kernel part runs in at least fp32 (half-precision inputs are upcast), since the normaliser sums N terms.
Precision note: gradients scale like 1/den, so queries whose relu features barely overlap any key's (den near 0)
are ill-conditioned in fp32 whatever the evaluation order; the eps guard bounds this.

Option ``conv`` in {0, 3, 5}: a depthwise k x k convolution of V over the 2-D grid (zero padding; on a video's
(frames, rows, columns) grid, over each frame), added to the attention output before the output projection, as in
LiT and FLatten Transformer (linear attention alone is low-rank; the conv restores local detail). It is named ``dwconv`` and starts at zero (weight and bias), so conv=0
and conv>0 compute the same function at initialisation and both start from MHA's weights via ``from_mha``.

Parameter names ``qkv`` / ``proj`` are MHA's (same shapes), so an MHA state dict loads into it (strict when conv=0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditgraft.operators.attention import MHA
from ditgraft.operators.common import (check_choice, check_grid, check_heads, from_mha, grid_tokens, normed_heads,
                                       projection_flops, qk_norms)
from ditgraft.operators.registry import register

LINEAR_IMPLS = ("fast", "reference")
CONV_SIZES = (0, 3, 5)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are computed in fp32; fp32 and fp64 stay as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _result(num: torch.Tensor, den: torch.Tensor, eps: float, dtype, return_lse: bool):
    out = (num / (den + eps)).to(dtype)
    return (out, torch.log(den[..., 0] + eps)) if return_lse else out


def relu_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, return_lse: bool = False):
    """Fast path on [B, heads, N, d] tensors: relu features, phi(K)^T [V, 1] first, O(N d^2). With ``return_lse``
    also log(normaliser + eps) [B, heads, N] (in at least fp32)."""
    dtype, work = q.dtype, _work_dtype(q.dtype)
    q, k, v = F.relu(q.to(work)), F.relu(k.to(work)), v.to(work)
    v1 = F.pad(v, (0, 1), value=1.0)  # [B, h, N, d+1]; the last column gives the normaliser
    kv = k.transpose(-2, -1) @ v1  # [B, h, d, d+1]
    num_den = q @ kv  # [B, h, N, d+1]
    return _result(num_den[..., :-1], num_den[..., -1:], eps, dtype, return_lse)


def reference_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float,
                               return_lse: bool = False):
    """Plain definition: explicit [N, N] kernel matrix A_ij = relu(q_i).relu(k_j), out = A V / (A 1 + eps)."""
    dtype, work = q.dtype, _work_dtype(q.dtype)
    a = F.relu(q.to(work)) @ F.relu(k.to(work)).transpose(-2, -1)
    return _result(a @ v.to(work), a.sum(dim=-1, keepdim=True), eps, dtype, return_lse)


@register("linear_attn", slot="attn", description="ReLU linear attention (SANA/LiT), optional depthwise conv on V")
class LinearAttention(nn.Module):
    """Options: ``conv`` (0, 3 or 5: depthwise conv kernel on V, 0 = none), ``eps`` (normaliser guard, default 1e-6:
    bounds 1/den by 1e6 where a query's features barely overlap any key's), ``impl`` ("fast" | "reference"),
    ``qk_norm`` (RMSNorm of q and k before the features, ``norm_q`` / ``norm_k`` as ``rope_mha``: "rms_norm" per
    head, "rms_norm_across_heads", or False, the default; ``init: teacher`` from a ``rope_mha`` teacher, SD3.5's or
    FLUX's image attention, copies its norms where they are of the same kind: same names and shapes).

    ``attend_with_lse`` gives the per-head output before ``proj`` and log(normaliser + eps): as the image-to-image
    part of a split image-text attention slot (SD3.5, EDiT's hybrid attention), the relu kernel sum over image keys
    and the softmax's exp sum over text keys then share one normaliser."""

    def __init__(self, dim: int, heads: int, grid: tuple[int, ...] = (0, 0), conv: int = 0, eps: float = 1e-6,
                 impl: str = "fast", qk_norm: bool | str = False):
        super().__init__()
        head_dim = check_heads(dim, heads)
        check_choice("conv", conv, CONV_SIZES)
        check_choice("impl", impl, LINEAR_IMPLS)
        if not eps > 0:
            raise ValueError(f"eps={eps} must be > 0")
        self.dim, self.heads, self.grid = dim, heads, tuple(grid)
        self.head_dim = head_dim
        self.conv, self.eps, self.impl = int(conv), float(eps), impl
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.qk_norm, self.norm_q, self.norm_k = qk_norms(dim, heads, qk_norm, eps=1e-6)
        if self.conv:
            self.dwconv = nn.Conv2d(dim, dim, self.conv, padding=self.conv // 2, groups=dim)
            nn.init.zeros_(self.dwconv.weight)
            nn.init.zeros_(self.dwconv.bias)

    def _heads_out(self, x: torch.Tensor, grid, return_lse: bool):
        """Per-head output [B, heads, N, d] before ``proj`` (with the conv of V, if any), and with ``return_lse``
        log(normaliser + eps) [B, heads, N] (else None)."""
        B, N, C = x.shape
        qkv = self.qkv(x)
        q, k, v = normed_heads(qkv, self.heads, self.qk_norm, self.norm_q, self.norm_k)
        attend = relu_linear_attention if self.impl == "fast" else reference_linear_attention
        out = attend(q, k, v, self.eps, return_lse=return_lse)
        out, lse = out if return_lse else (out, None)
        if self.conv:
            *frames, H, W = check_grid(grid or self.grid, N)
            F_ = frames[0] if frames else 1  # a video's frames are convolved one by one
            v_img = qkv[..., 2 * C:].reshape(B * F_, H * W, C).transpose(1, 2).reshape(B * F_, C, H, W)
            local = self.dwconv(v_img).flatten(2).transpose(1, 2).reshape(B, N, C)  # channel c = head * d + j
            out = out + local.view(B, N, self.heads, self.head_dim).transpose(1, 2)
        return out, lse

    def forward(self, x: torch.Tensor, grid: tuple[int, ...] | None = None) -> torch.Tensor:
        B, N, C = x.shape
        out, _ = self._heads_out(x, grid, return_lse=False)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def attend_with_lse(self, x: torch.Tensor, grid: tuple[int, ...]):
        """(per-head output [B, heads, N, d] before ``proj``, log(normaliser + eps) [B, heads, N])."""
        return self._heads_out(x, grid, return_lse=True)

    @classmethod
    def from_mha(cls, mha: MHA, **options) -> "LinearAttention":
        """Linear attention with the teacher's qkv / proj weights (dwconv, if any, stays at its zero init)."""
        return from_mha(cls, mha, {"qkv": "qkv", "proj": "proj"}, **options)

    @staticmethod
    def flops(dim: int, heads: int, grid: tuple[int, int], conv: int = 0, **_) -> int:
        n = grid_tokens(grid)
        d = dim // heads
        projections = projection_flops(n, dim)
        kernel = 2 * 2 * n * dim * (d + 1)  # phi(K)^T [V, 1] and phi(Q) (that), per head: 2 * N * d * (d+1) each
        return projections + kernel + 2 * n * dim * conv * conv
