"""Plumbing shared by the operator families: option checks, the multi-head split, the FLOPs of the q/k/v and output
projections, starting from a teacher MHA's weights, and depthwise convolutions over the token axis."""
from __future__ import annotations

import inspect
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn


def check_choice(field: str, value, allowed: tuple):
    """``value`` if it is one of ``allowed``; otherwise a ValueError naming the field, the value and the choices."""
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not allowed; use one of {allowed}")
    return value


def check_heads(dim: int, heads: int) -> int:
    """The per-head width ``dim // heads``, after checking that the heads divide the width."""
    if isinstance(heads, bool) or not isinstance(heads, numbers.Integral) or heads < 1:
        raise ValueError(f"heads={heads!r} is not allowed; use an integer >= 1 that divides dim={dim}")
    if dim % heads != 0:
        raise ValueError(f"dim={dim} must be divisible by heads={heads}")
    return dim // heads


def grid_tokens(grid) -> int:
    """Tokens on a patch grid: the product of its sides, (rows, columns) or (frames, rows, columns)."""
    return math.prod(int(side) for side in grid)


def check_grid(grid, tokens: int) -> tuple[int, ...]:
    """``grid`` as a tuple of ints, after checking that it has 2 or 3 sides and holds exactly ``tokens`` tokens."""
    sides = tuple(int(side) for side in grid)
    if len(sides) not in (2, 3) or min(sides) < 1:
        raise ValueError(f"grid={tuple(grid)} is not allowed; use (rows, columns) or (frames, rows, columns), "
                         f"each side >= 1")
    if grid_tokens(sides) != tokens:
        raise ValueError(f"grid={sides} has {grid_tokens(sides)} tokens but the input has N={tokens}; pass the "
                         f"grid of the input")
    return sides


def raster_index(coords, grid) -> torch.Tensor:
    """Token ids (raster order: the last axis runs fastest, frame-major for video) of per-axis coordinates."""
    index = coords[0]
    for c, side in zip(coords[1:], grid[1:]):
        index = index * int(side) + c
    return index


def grid_coords(grid, device=None) -> tuple[torch.Tensor, ...]:
    """Per-axis coordinates of every token in raster order, one [N] tensor per side of ``grid``."""
    axes = torch.meshgrid(*(torch.arange(int(side), device=device) for side in grid), indexing="ij")
    return tuple(a.flatten() for a in axes)


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed [B, N, 3D] q, k, v (the output of a qkv linear) -> q, k, v, each [B, heads, N, D / heads]."""
    B, N, three_d = qkv.shape
    return qkv.reshape(B, N, 3, heads, three_d // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)


# RMSNorm of queries and keys (``norm_q`` / ``norm_k``): per head (FLUX, SD3.5: "rms_norm", or True) or over all
# heads of a token together (Wan: "rms_norm_across_heads"); False: none.
QK_NORMS = (True, False, "rms_norm", "rms_norm_across_heads")


def qk_norms(dim: int, heads: int, qk_norm, eps: float) -> tuple[str | None, nn.Module | None, nn.Module | None]:
    """(the qk-norm's mode, norm_q, norm_k) for option ``qk_norm`` (one of ``QK_NORMS``)."""
    check_choice("qk_norm", qk_norm, QK_NORMS)
    mode = {True: "rms_norm", False: None}.get(qk_norm, qk_norm)
    if mode is None:
        return None, None, None
    width = dim if mode == "rms_norm_across_heads" else check_heads(dim, heads)
    return mode, nn.RMSNorm(width, eps=eps), nn.RMSNorm(width, eps=eps)


def normed_heads(qkv: torch.Tensor, heads: int, mode: str | None, norm_q: nn.Module | None,
                 norm_k: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``split_heads`` of the packed qkv [B, N, 3D] with the queries and keys RMS-normalised as ``mode`` says."""
    if mode == "rms_norm_across_heads":  # over all D channels of a token, before the head split
        q, k, v = qkv.chunk(3, dim=-1)
        qkv = torch.cat([norm_q(q), norm_k(k), v], dim=-1)
    q, k, v = split_heads(qkv, heads)
    if mode == "rms_norm":
        q, k = norm_q(q), norm_k(k)
    return q, k, v


def projection_flops(tokens: int, dim: int) -> int:
    """Forward FLOPs of a D -> 3D input projection and a D -> D output projection on ``tokens`` tokens."""
    return 2 * tokens * dim * 3 * dim + 2 * tokens * dim * dim


def from_mha(cls: type, mha: nn.Module, rename: dict[str, str] | None = None, **options) -> nn.Module:
    """``cls`` built at the teacher attention's width, heads and grid (an ``mha``, or a ``rope_mha``: FLUX's,
    SD3.5's or Wan's attention), starting from its weights, on its device and dtype.

    ``rename`` maps the teacher's submodules (``qkv``, ``proj``) to the operator's names for them (e.g. flash-attn's
    ``Wqkv`` / ``out_proj``); without it they keep their names. A teacher's qk-norm and RoPE are kept or dropped as
    the options say, never silently: where ``cls`` has the option (``qk_norm``, ``axes_dims``) and the recipe does
    not set it, this refuses and names both choices; a kept qk-norm starts from the teacher's norms."""
    _check_kept(cls, mha, options)
    op = cls(mha.dim, mha.heads, mha.grid, **options).to(mha.proj.weight.device, mha.proj.weight.dtype)
    for theirs, ours in (rename or {"qkv": "qkv", "proj": "proj"}).items():
        getattr(op, ours).load_state_dict(getattr(mha, theirs).state_dict())
    if getattr(op, "norm_q", None) is not None and getattr(mha, "norm_q", None) is not None:
        op.norm_q.load_state_dict(mha.norm_q.state_dict())
        op.norm_k.load_state_dict(mha.norm_k.state_dict())
    return op


def _check_kept(cls: type, mha: nn.Module, options: dict) -> None:
    accepts = inspect.signature(cls.__init__).parameters
    name = cls.__name__
    theirs = getattr(mha, "qk_norm", None)
    if theirs and "qk_norm" in accepts:
        if "qk_norm" not in options:
            raise ValueError(f"init: teacher: the teacher's attention normalises q and k (qk_norm {theirs!r}); "
                             f"say whether {name} keeps it: options qk_norm: {theirs} (keep) or qk_norm: false "
                             f"(drop)")
        ours = {True: "rms_norm", False: None}.get(options["qk_norm"], options["qk_norm"])
        if ours is not None and ours != theirs:
            raise ValueError(f"qk_norm={options['qk_norm']!r} is not the teacher's qk-norm ({theirs!r}); use "
                             f"qk_norm: {theirs} or false")
    rope = getattr(mha, "axes_dims", None)
    if rope and "axes_dims" in accepts and "axes_dims" not in options:
        raise ValueError(f"init: teacher: the teacher's attention has RoPE (axes_dims {list(rope)}); say whether "
                         f"{name} keeps it: options axes_dims: {list(rope)} (keep) or axes_dims: null (drop)")


# ---------------------------------------------------------------------------------------------------------------------
# Depthwise convolutions over tokens. weight [C, T]: y[:, t, c] = bias[c] + sum_i weight[c, i] * x[:, t + i - left, c]
# (zeros outside the sequence). Causal k-tap conv: T = k, left = k - 1.
# ---------------------------------------------------------------------------------------------------------------------
def reference_conv_tokens(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, left: int) -> torch.Tensor:
    """Plain sum over taps of shifted copies of x [B, N, C]."""
    B, N, C = x.shape
    T = weight.shape[-1]
    xpad = F.pad(x, (0, 0, left, T - 1 - left))  # xpad[:, j] = x[:, j - left]
    y = sum(weight[:, i] * xpad[:, i:i + N] for i in range(T))
    return y if bias is None else y + bias


def _tap_spans(k: int, left: int, N: int) -> tuple[slice, slice]:
    """Tap k reads x[t + k - left] into y[t]: the output and input token ranges where both exist."""
    o = k - left
    return slice(max(0, -o), min(N, N - o)), slice(max(0, o), min(N, N + o))


class TapConvTokens(torch.autograd.Function):
    """Same as ``reference_conv_tokens`` (bias may be None): a grouped convolution forward, and a backward as a sum
    over the taps.

    The CPU depthwise convolution's backward costs 10-50x its forward (5.8 s vs 0.12 s at N = 16384, C = 3456); with a
    few taps these are a few multiply-adds per element each way:
    dx[t] = sum_k weight[:, k] * dy[t - k + left],  dweight[:, k] = sum_t dy[t] * x[t + k - left],  dbias = sum_t dy."""

    @staticmethod
    def forward(ctx, x, weight, bias, left: int):
        # the forward is one grouped conv2d on the channels-last view [B, C, 1, N] of x: as fast as the taps on the
        # CPU, and a convolution that FLOP counters see
        B, N, C = x.shape
        T = weight.shape[-1]
        pad = max(left, T - 1 - left)
        out = F.conv2d(x.transpose(1, 2).unsqueeze(2), weight.reshape(C, 1, 1, T), bias, padding=(0, pad), groups=C)
        ctx.save_for_backward(x, weight)
        ctx.left = left
        start = pad - left
        return out[:, :, 0, start:start + N].transpose(1, 2)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        N, T = x.shape[1], weight.shape[1]
        # dx's buffer first holds each tap's products for dweight: a fresh activation-sized tensor per tap would cost
        # more in page faults than the products themselves
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        dweight = torch.empty_like(weight)
        for k in range(T):
            out, inp = _tap_spans(k, ctx.left, N)
            dweight[:, k] = torch.mul(dy[:, out], x[:, inp], out=dx[:, : out.stop - out.start]).sum((0, 1))
        dx.zero_()
        for k in range(T):
            out, inp = _tap_spans(k, ctx.left, N)
            dx[:, inp].addcmul_(dy[:, out], weight[:, k])
        dbias = dy.sum((0, 1)) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None
