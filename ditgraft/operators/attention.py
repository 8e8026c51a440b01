"""Softmax attention operators.

``mha`` is DiT's attention (timm ``Attention`` parameter names ``qkv`` / ``proj``), used by the DiT model itself and
for self-grafting. ``impl="sdpa"`` is the fast path (torch scaled_dot_product_attention); ``impl="reference"``
is the plain softmax(QK^T / sqrt(d)) V that tests compare it with.

``tiled_attention`` is softmax attention under a sparse pattern, computed tile by tile so no N x N tensor is ever
built (plain autograd). ``tiled_attention_packed`` computes the same from the packed qkv projection with its own
backward (``TiledAttention``): the shared fast path of the local operators (swa, local2d, clear in
local_attention.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ditgraft.operators.common import check_choice, check_heads, grid_tokens, projection_flops, split_heads
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
        n = grid_tokens(grid)
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


# Tiles are processed a slab at a time, with about this many attention scores per slab (4 MiB in fp32): the gathered
# keys, values and scores of a slab stay in cache and under the size from which glibc's malloc maps (and page-faults)
# every allocation afresh.
TILE_SLAB_SCORES = 1 << 20


def _tile_slabs(plan: TilePlan, scores_per_tile: int) -> list[slice]:
    T = plan.q_idx.shape[0]
    step = max(1, TILE_SLAB_SCORES // scores_per_tile)
    return [slice(t, min(t + step, T)) for t in range(0, T, step)]


def _slab_probs(q, k, v, plan: TilePlan, sl: slice):
    """Gathered q_t (times d^-1/2), k_t, v_t and the probabilities p of the tiles in ``sl``: [B, h, tiles, ., .]."""
    B, h, _, d = q.shape
    n, Q = plan.q_idx[sl].shape
    K = plan.k_idx.shape[1]
    qt = q.index_select(2, plan.q_idx[sl].flatten()).view(B, h, n, Q, d).mul_(d ** -0.5)
    kt = k.index_select(2, plan.k_idx[sl].flatten()).view(B, h, n, K, d)
    vt = v.index_select(2, plan.k_idx[sl].flatten()).view(B, h, n, K, d)
    p = _softmax_(torch.matmul(qt, kt.transpose(-2, -1)).masked_fill_(plan.blocked[sl], float("-inf")))
    return qt, kt, vt, p


class TiledAttention(torch.autograd.Function):
    """``tiled_attention`` on the packed qkv [B, N, 3D] -> [B, N, D] (heads merged), with its own backward.

    Forward, per tile: q_t (gathered, times d^-1/2), k_t, v_t (gathered keys); p = softmax(q_t k_t^T, blocked = -inf);
    o_t = p v_t. Backward, given do_t (the output gradient gathered into tile slots; zero in the padding slots, whose
    outputs the forward dropped):

        dv_t = p^T do_t,   ds = p * (do_t v_t^T - rowsum(do_t * o_t)),   dq_t = d^-1/2 ds k_t,   dk_t = ds^T q_t

    then dq is read back from each token's one real slot and dk, dv are summed over the tiles that gathered each key.
    Without gradients (inference) the tiles run a slab at a time (``TILE_SLAB_SCORES``) and nothing is kept: no
    tensor of the size of all gathered keys or all scores is allocated (on CPU each such allocation page-faults its
    memory in again, which costs more than the arithmetic on it). With gradients all tiles run at once and q_t, k_t,
    v_t, p and the output are saved (recomputing them in the backward, as flash attention does, measured no faster
    here). The gradients land in one packed [B, N, 3, heads, d] buffer, the layout of the qkv projection's output, so
    nothing is stacked or re-laid out afterwards."""

    @staticmethod
    def forward(ctx, qkv, heads: int, plan: TilePlan):
        B, N, three_d = qkv.shape
        d = three_d // (3 * heads)
        T, Q = plan.q_idx.shape
        K = plan.k_idx.shape[1]
        q, k, v = (qkv.view(B, N, 3, heads, d)[:, :, i].transpose(1, 2) for i in range(3))  # [B, h, N, d] views
        if ctx.needs_input_grad[0]:
            qt, kt, vt, p = _slab_probs(q, k, v, plan, slice(0, T))
            ot = p @ vt
        else:
            ot = qkv.new_empty(B, heads, T, Q, d)
            for sl in _tile_slabs(plan, B * heads * Q * K):
                _, _, vt, p = _slab_probs(q, k, v, plan, sl)
                ot[:, :, sl] = p @ vt
        out = ot.view(B, heads, T * Q, d).transpose(1, 2).index_select(1, plan.inv)  # [B, N, h, d]
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(qt, kt, vt, p, out)
            ctx.plan = plan
        return out.view(B, N, heads * d)

    @staticmethod
    def backward(ctx, dout):
        qt, kt, vt, p, out = ctx.saved_tensors
        plan = ctx.plan
        B, N, h, d = out.shape
        T, Q = plan.q_idx.shape
        K = plan.k_idx.shape[1]
        do = dout.reshape(B, N, h, d)
        dot = dout.new_zeros(B, h, T * Q, d)  # the output gradient in tile slots; padding slots stay zero
        dot.index_copy_(2, plan.inv, do.transpose(1, 2))
        dot = dot.view(B, h, T, Q, d)
        # rowsum(do_t * o_t) = rowsum(dp * p), per token and head from the merged output, then into tile slots
        delta = dout.new_zeros(B, h, T * Q)
        delta.index_copy_(2, plan.inv, torch.einsum("bnhd,bnhd->bhn", do, out))
        keys = plan.k_idx.flatten()
        dqkv = dout.new_empty(B, N, 3, h, d)
        dvt = (p.transpose(-2, -1) @ dot).view(B, h, T * K, d)
        dqkv[:, :, 2] = dout.new_zeros(B, h, N, d).index_add_(2, keys, dvt).transpose(1, 2)
        del dvt
        ds = torch.matmul(dot, vt.transpose(-2, -1)).sub_(delta.view(B, h, T, Q, 1)).mul_(p)  # [B, h, T, Q, K]
        dqt = (ds @ kt).mul_(d ** -0.5).view(B, h, T * Q, d)
        dqkv[:, :, 0] = dqt.transpose(1, 2).index_select(1, plan.inv)
        del dqt
        dkt = (ds.transpose(-2, -1) @ qt).view(B, h, T * K, d)
        dqkv[:, :, 1] = dout.new_zeros(B, h, N, d).index_add_(2, keys, dkt).transpose(1, 2)
        return dqkv.view(B, N, 3 * h * d), None, None


def _softmax_(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis, in place (rows hold at least one finite score). No autograd."""
    s.sub_(s.amax(dim=-1, keepdim=True)).exp_()
    return s.div_(s.sum(dim=-1, keepdim=True))


def tiled_attention_packed(qkv: torch.Tensor, heads: int, plan: TilePlan) -> torch.Tensor:
    """Packed q, k, v [B, N, 3D] (the qkv projection's output) -> attention output [B, N, D] (heads merged), where
    query i only sees the keys the plan allows. Same result as ``tiled_attention`` on ``split_heads(qkv, heads)``,
    merged; its backward is ``TiledAttention``'s."""
    return TiledAttention.apply(qkv, heads, plan)
