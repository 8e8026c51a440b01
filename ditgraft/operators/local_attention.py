"""Local softmax attention: the same softmax(QK^T / sqrt(d)) V as MHA, but each query sees only nearby keys.

Three patterns, one machinery:

* ``swa``     1-D band in raster order: query i sees keys j with |i - j| <= window (flash-attn window (w, w), as in
              the grafting release). Rows of the image are simply concatenated, so there are no vertical neighbours.
* ``local2d`` neighbourhood attention (NATTEN semantics, dilation 1): a k x k window (t x k x k on a video's
              (frames, rows, columns) grid) centred on the query and shifted inward at the borders, so every query
              sees the same number of keys.
* ``clear``   CLEAR (Liu et al. 2024): a circular window, keys with (dy^2 + dx^2) < radius^2 (a ball on a video
              grid), truncated (not shifted) at the borders.

Grids are (rows, columns) or (frames, rows, columns), tokens in raster order (frame-major for video, as Wan flattens
them); patterns, masks, tile plans and FLOP counts work on either.

Each operator has two paths that give the same numbers:
``impl="reference"`` builds the dense [N, N] boolean mask and calls ``reference_attention``;
``impl="tiled"`` cuts the grid into tiles of queries, gathers for each tile the small rectangle of keys that covers
all its queries' windows, and runs ``tiled_attention_packed`` (O(N * tile keys) memory, no N x N tensor).
``impl="auto"`` (default) takes the tiled path when N >= ``TILED_MIN_TOKENS`` (1024) and the reference below it,
where the dense mask is tiny and one big matmul is as fast. On CUDA (fp32/bf16/fp16) ``impl="auto"`` runs torch's
FlexAttention instead (``kernels.flex_attention``), with a block mask from the same pattern; ``kernel_path`` names
the path a call takes.

``attend_with_lse`` returns the per-head output and its log-normaliser over each query's window (both paths), so a
local operator can be the image-to-image part of a split joint image-text attention (SD3, Flux; CLEAR's setting).

Parameter names: ``swa`` keeps flash-attn's MHA names (``Wqkv``, ``out_proj``) like the grafting release;
``local2d`` and ``clear`` use DiT's (``qkv``, ``proj``) so an MHA state dict loads into them directly.
``from_mha(mha, **options)`` builds any of them from a teacher's attention weights.
"""
from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from ditgraft.operators.attention import MHA, TilePlan, reference_attention, tiled_attention, tiled_attention_packed
from ditgraft.operators.common import (check_choice, check_grid, check_heads, from_mha, grid_coords, grid_tokens,
                                      normed_heads, projection_flops, qk_norms, raster_index)
from ditgraft.operators.rope_attention import check_axes_dims, rope_qk
from ditgraft.operators.kernels import FLEX, flex_attention, kernel_ready, shared_block_mask
from ditgraft.operators.registry import register

LOCAL_IMPLS = ("auto", "tiled", "reference")
TILED_MIN_TOKENS = 1024  # impl="auto" uses the tiled path from this many tokens on


# ----------------------------------------------------------------------------------------------------------------------
# Patterns: which (query, key) pairs may interact, from grid coordinates. All arguments broadcast.
# ----------------------------------------------------------------------------------------------------------------------
def natten_window_start(index: torch.Tensor, length: int, kernel: int) -> torch.Tensor:
    """First index of NATTEN's window (dilation 1) along one axis: centred, shifted inward at the borders.

    ``kernel`` is already clamped to ``length``. Equivalent to NATTEN's get_window_start for dilation 1.
    """
    return (index - kernel // 2).clamp(min=0).clamp(max=length - kernel)


# A pattern is called as ``pattern(q, k)`` with q and k tuples of per-axis grid coordinates, (row, column) or
# (frame, row, column), broadcasting against each other.
def band_pattern(q, k, *, window: int):
    """swa: |i - j| <= window on raster indices (the grid is viewed as one row of tokens, so q and k are (0, i))."""
    return (q[-1] - k[-1]).abs() <= window


def neighborhood_pattern(q, k, *, grid: tuple[int, ...], kernel: tuple[int, ...]):
    """local2d: the key lies in the query's NATTEN window along every axis."""
    allowed = None
    for qa, ka, length, size in zip(q, k, grid, kernel):
        start = natten_window_start(qa, length, size)
        inside = (ka >= start) & (ka < start + size)
        allowed = inside if allowed is None else allowed & inside
    return allowed


def circle_pattern(q, k, *, radius: float):
    """clear: Euclidean distance on the grid strictly below the radius (as the CLEAR release's mask); on a 3-D grid
    a ball over (frame, row, column)."""
    return sum((qa - ka) ** 2 for qa, ka in zip(q, k)) < radius ** 2


def circle_reach(radius: float) -> int:
    """Largest integer offset m with m^2 < radius^2 (how far the circle reaches along one axis)."""
    return max(math.ceil(radius) - 1, 0)


def dense_mask(pattern, grid: tuple[int, ...], device=None) -> torch.Tensor:
    """Boolean [N, N] mask, True where query (row) may attend to key (column); tokens in raster order."""
    coords = grid_coords(grid, device)
    return pattern(tuple(c[:, None] for c in coords), tuple(c[None, :] for c in coords))


# ----------------------------------------------------------------------------------------------------------------------
# Tiling: which keys a tile of queries needs.
# ----------------------------------------------------------------------------------------------------------------------
def _axis_tiles(length: int, tile: int, reach: int):
    """Split one axis into tiles of ``tile`` queries; each tile's keys are a run of L = tile + 2*reach indices
    (clamped into the axis), which covers every window of reach ``reach`` around its queries, NATTEN's shifted
    windows included. Returns query indices [T, tile] (past-the-end slots repeat the last index), key indices [T, L] and
    which query slots are real [T, tile].
    """
    tile = min(tile, length)
    n_tiles = -(-length // tile)
    span = min(tile + 2 * reach, length)
    starts = torch.arange(n_tiles) * tile
    q = starts[:, None] + torch.arange(tile)
    real = q < length
    k = (starts - reach).clamp(min=0).clamp(max=length - span)[:, None] + torch.arange(span)
    return q.clamp(max=length - 1), k, real


def _tile_product(per_axis: list[torch.Tensor]) -> torch.Tensor:
    """Per-axis [T_a, S_a] tensors -> one [T_0 * T_1 * ..., S_0 * S_1 * ...] tensor per axis (returned stacked on a
    leading axis): tiles are ordered as the grid (last axis fastest), and so are the slots within a tile."""
    D = len(per_axis)
    tiles = [t.shape[0] for t in per_axis]
    slots = [t.shape[1] for t in per_axis]
    out = []
    for a, t in enumerate(per_axis):
        shape = [1] * (2 * D)
        shape[a], shape[D + a] = t.shape
        out.append(t.view(shape).expand(*tiles, *slots).reshape(math.prod(tiles), math.prod(slots)))
    return torch.stack(out)


def make_plan(pattern, grid: tuple[int, ...], tile: tuple[int, ...], reach: tuple[int, ...], device=None) -> TilePlan:
    """TilePlan for ``pattern`` on ``grid`` (2-D or 3-D): tiles of tile[0] x tile[1] (x tile[2]) queries, windows
    reaching reach[a] cells along axis a from their query (or shifted inward within that reach, as NATTEN does)."""
    axes = [_axis_tiles(length, t, r) for length, t, r in zip(grid, tile, reach)]
    q = _tile_product([a[0] for a in axes])  # [D, T, Q]
    k = _tile_product([a[1] for a in axes])  # [D, T, K]
    real = _tile_product([a[2] for a in axes]).all(0).flatten()  # each token has exactly one real slot
    allowed = pattern(tuple(c[:, :, None] for c in q), tuple(c[:, None, :] for c in k))
    q_idx, k_idx = raster_index(q, grid), raster_index(k, grid)
    n = grid_tokens(grid)
    flat = q_idx.flatten()
    inv = torch.empty(n, dtype=torch.long)
    inv[flat[real]] = torch.arange(flat.numel())[real]
    raster = torch.equal(flat[:n], torch.arange(n))
    assert bool(allowed.any(-1).all()), "every query must see at least one key"
    return TilePlan(q_idx.to(device), k_idx.to(device), (~allowed).to(device), inv.to(device), raster)


def _per_axis(field: str, value, dims: int) -> tuple[int, ...]:
    """An operator size given as one int (every axis) or one per axis of a ``dims``-sided grid."""
    sizes = (value,) * dims if isinstance(value, int) else tuple(value)
    if len(sizes) != dims:
        raise ValueError(f"{field}={list(value)} has {len(sizes)} sizes but the grid has {dims} axes; give one int "
                         f"or {dims} sizes")
    return sizes


class _LocalAttention(nn.Module):
    """Shared body: heads, impl choice, cached tile plans, the teacher's qk-norm and RoPE when asked for (options
    ``qk_norm`` and ``axes_dims`` / ``theta``, as ``rope_mha``: a local window inside FLUX's, SD3.5's or Wan's
    attention, CLEAR's setting). Subclasses define ``_pattern``, ``_tile``, ``_reach``."""

    gpu_kernels = (FLEX,)  # the GPU kernels kernel_path may choose

    def __init__(self, dim: int, heads: int, grid: tuple[int, ...], impl: str, qk_norm, axes_dims, theta):
        super().__init__()
        self.dim, self.heads, self.grid = dim, heads, tuple(grid)
        self.head_dim = check_heads(dim, heads)
        self.impl = check_choice("impl", impl, LOCAL_IMPLS)
        self.qk_norm, self.norm_q, self.norm_k = qk_norms(dim, heads, qk_norm, eps=1e-6)
        self.axes_dims, self.theta = check_axes_dims(axes_dims, self.head_dim), float(theta)
        self._plans: dict = {}  # (grid, device) -> TilePlan; not part of the state dict
        self._rope: dict = {}  # (grid, device) -> RoPE tables

    def _heads(self, qkv: torch.Tensor, grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, heads, N, d] of the packed qkv, with the qk-norm and RoPE the operator has."""
        q, k, v = normed_heads(qkv, self.heads, self.qk_norm, self.norm_q, self.norm_k)
        if self.axes_dims is not None:
            q, k = rope_qk(self._rope, q, k, grid, self.axes_dims, self.theta)
        return q, k, v

    def _pattern(self, grid):
        raise NotImplementedError

    def _tile(self, grid) -> tuple[int, int]:
        raise NotImplementedError

    def _reach(self, grid) -> tuple[int, int]:
        raise NotImplementedError

    def mask(self, grid: tuple[int, int] | None = None, device=None) -> torch.Tensor:
        """Dense boolean [N, N] mask of allowed (query, key) pairs (for the reference path, tests and analysis)."""
        grid = tuple(grid or self.grid)
        return dense_mask(self._pattern(grid), grid, device)

    def plan(self, grid: tuple[int, int], device) -> TilePlan:
        key = (tuple(grid), str(device))
        if key not in self._plans:
            with torch.inference_mode(False):  # a plan cached in inference mode also serves later calls with autograd
                self._plans[key] = make_plan(self._pattern(grid), grid, self._tile(grid), self._reach(grid),
                                             device)
        return self._plans[key]

    def block_mask(self, grid: tuple[int, int], device):
        """FlexAttention BlockMask of the pattern on ``grid``, one for all layers with this pattern (``kernels.
        shared_block_mask``; ``pattern_fields`` are the attributes the pattern depends on)."""
        key = (type(self).__name__,) + tuple(getattr(self, f) for f in self.pattern_fields)
        return shared_block_mask(key, self._pattern(grid), grid, device)

    def kernel_path(self, device, dtype, tokens: int) -> str:
        """The path a call on ``tokens`` tokens takes on ``device`` / ``dtype``: FLEX, "tiled" or "reference"."""
        if self.impl != "auto":
            return self.impl
        if kernel_ready(FLEX, device, dtype):
            return FLEX
        return "tiled" if tokens >= TILED_MIN_TOKENS else "reference"

    def _attend(self, qkv: torch.Tensor, grid) -> torch.Tensor:
        """[B, N, 3D] packed q, k, v (the output of the qkv linear) -> [B, N, D] attention output before out proj."""
        B, N, _ = qkv.shape
        plain = self.qk_norm is None and self.axes_dims is None
        if plain and self.kernel_path(qkv.device, qkv.dtype, N) == "tiled":  # packed in, merged out: no re-layout
            return tiled_attention_packed(qkv, self.heads, self.plan(check_grid(grid or self.grid, N), qkv.device))
        return self._attend_heads(qkv, grid).transpose(1, 2).reshape(B, N, self.dim)

    def _attend_heads(self, qkv: torch.Tensor, grid, return_lse: bool = False):
        """Per-head output [B, heads, N, d] (and with ``return_lse`` its log-normaliser [B, heads, N])."""
        N = qkv.shape[1]
        grid = check_grid(grid or self.grid, N)
        q, k, v = self._heads(qkv, grid)
        impl = self.kernel_path(qkv.device, qkv.dtype, N)
        lse = {"return_lse": True} if return_lse else {}
        if impl == FLEX and not return_lse:  # a split slot's log-normaliser comes from the PyTorch paths
            return flex_attention(q, k, v, self.block_mask(grid, qkv.device))
        if impl == "tiled" or (impl == FLEX and N >= TILED_MIN_TOKENS):
            return tiled_attention(q, k, v, self.plan(grid, qkv.device), **lse)
        return reference_attention(q, k, v, self.mask(grid, qkv.device), **lse)

    def attend_with_lse(self, x: torch.Tensor, grid: tuple[int, int]):
        """(per-head output [B, heads, N, d] before the output projection, log-normaliser [B, heads, N]) over each
        query's window: what a split image-text attention slot mixes with the teacher's attention over text keys."""
        return self._attend_heads(self.in_projection(x), grid, return_lse=True)

    def in_projection(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x)


@register("swa", slot="attn", description="sliding-window (band) attention in raster order, |i-j| <= window")
class SWA(_LocalAttention):
    """Bidirectional band attention on the raster token order (the grafting release's SWA, flash-attn window (w, w)).

    Options: ``window`` (default 4), ``impl`` ("auto" | "tiled" | "reference"), ``block`` (queries per tile of the
    tiled path; default max(32, 2*window+1): big enough for efficient matmuls, small enough to waste little).
    Parameters ``Wqkv`` (D -> 3D, bias) and ``out_proj`` (D -> D): 4D^2 + 4D = 5,313,024 at D = 1152.
    """

    def __init__(self, dim: int, heads: int, grid: tuple[int, ...] = (0, 0), window: int = 4, impl: str = "auto",
                 block: int | None = None, qk_norm: bool | str = False, axes_dims=None, theta: float = 10000.0):
        super().__init__(dim, heads, grid, impl, qk_norm, axes_dims, theta)
        if window < 0:
            raise ValueError(f"window={window} must be >= 0")
        self.window = int(window)
        self.block = int(block) if block is not None else max(32, 2 * self.window + 1)
        if self.block < 1:
            raise ValueError(f"block={block} must be >= 1")
        self.Wqkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    # SWA ignores the grid's layout (2-D or 3-D): it is viewed as one row of N tokens in raster order.
    pattern_fields = ("window",)

    def _pattern(self, grid):
        window = self.window
        return lambda q, k: band_pattern(q, k, window=window)

    def _tile(self, grid):
        return (1, self.block)

    def _reach(self, grid):
        return (0, self.window)

    def mask(self, grid=None, device=None):
        n = grid_tokens(grid or self.grid)
        return dense_mask(self._pattern((1, n)), (1, n), device)

    def plan(self, grid, device):
        return super().plan((1, grid_tokens(grid)), device)

    def block_mask(self, grid, device):
        return super().block_mask((1, grid_tokens(grid)), device)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        # Any N works for a band: without a grid, the sequence is one row.
        return self.out_proj(self._attend(self.Wqkv(x), grid or (1, x.shape[1])))

    def in_projection(self, x: torch.Tensor) -> torch.Tensor:
        return self.Wqkv(x)

    @property
    def proj(self) -> nn.Linear:
        """The output projection under ``mha``'s name (what a split joint-attention slot projects with)."""
        return self.out_proj

    @classmethod
    def from_mha(cls, mha: MHA, **options) -> "SWA":
        """SWA with the teacher's attention weights (qkv -> Wqkv, proj -> out_proj)."""
        return from_mha(cls, mha, {"qkv": "Wqkv", "proj": "out_proj"}, **options)

    @staticmethod
    def flops(dim: int, heads: int, grid: tuple[int, ...], window: int = 4, **_) -> int:
        n = grid_tokens(grid)
        reach = min(window, n - 1)
        pairs = n + 2 * sum(n - d for d in range(1, reach + 1))  # exact number of (i, j) with |i - j| <= window
        return projection_flops(n, dim) + 2 * 2 * pairs * dim


class _GridLocalAttention(_LocalAttention):
    """Local attention with DiT's parameter names (qkv / proj), so an MHA state dict loads strictly.

    ``tile``: the tile side of the tiled path, one int for every axis or one per axis of the grid."""

    def __init__(self, dim, heads, grid, impl, tile, qk_norm, axes_dims, theta):
        super().__init__(dim, heads, grid, impl, qk_norm, axes_dims, theta)
        self.tile = _sizes_option("tile", tile, odd=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _tile(self, grid):
        return _per_axis("tile", self.tile, len(grid))

    def forward(self, x: torch.Tensor, grid: tuple[int, ...] | None = None) -> torch.Tensor:
        return self.proj(self._attend(self.qkv(x), grid))

    @classmethod
    def from_mha(cls, mha: MHA, **options):
        """The operator with the teacher's attention weights (same parameter names, strict load)."""
        return from_mha(cls, mha, **options)


def _sizes_option(field: str, value, odd: bool):
    """A size option as given: one int >= 1 (every axis) or a list of them (one per axis), odd where ``odd``."""
    sizes = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    ok = isinstance(sizes, (list, tuple)) and 1 <= len(sizes) <= 3 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 and (v % 2 == 1 or not odd) for v in sizes)
    if not ok:
        kind = "an odd integer >= 1" if odd else "an integer >= 1"
        raise ValueError(f"{field}={value!r} is not allowed; use {kind}, or a list of them (one per grid axis)")
    return int(value) if isinstance(value, int) else tuple(int(v) for v in value)


def _check_axes(field: str, value, grid) -> None:
    """A per-axis size option must have one size per axis of a grid the operator is built for."""
    if not isinstance(value, int) and grid_tokens(grid) > 0:
        _per_axis(field, value, len(grid))


@register("local2d", slot="attn", description="neighbourhood attention, k x k (or t x k x k) window (NATTEN semantics)")
class Local2D(_GridLocalAttention):
    """Neighbourhood attention on the H x W grid, or the (frames, H, W) grid of a video: each query sees the window
    centred on it, shifted inward at the borders (NATTEN, dilation 1), so every query sees the same number of keys.

    Options: ``kernel_size`` (odd; one int for every axis or one per axis, e.g. [3, 9, 9] on a video grid: 3 frames
    x 9 x 9 patches; default 7), ``impl``, ``tile`` (tile side of the tiled path, default 8).
    Where a window exceeds a side of the grid, it is clamped to the whole axis (NATTEN raises an error instead); so a
    window at least as large as the grid is full attention, equal to MHA.
    """

    def __init__(self, dim: int, heads: int, grid: tuple[int, ...] = (0, 0), kernel_size: int | list = 7,
                 impl: str = "auto", tile: int | list = 8, qk_norm: bool | str = False, axes_dims=None,
                 theta: float = 10000.0):
        kernel_size = _sizes_option("kernel_size", kernel_size, odd=True)
        _check_axes("kernel_size", kernel_size, grid)
        _check_axes("tile", tile, grid)
        super().__init__(dim, heads, grid, impl, tile, qk_norm, axes_dims, theta)
        self.kernel_size = kernel_size

    pattern_fields = ("kernel_size",)

    def kernel(self, grid) -> tuple[int, ...]:
        return tuple(min(k, side) for k, side in zip(_per_axis("kernel_size", self.kernel_size, len(grid)), grid))

    def _pattern(self, grid):
        grid, kernel = tuple(grid), self.kernel(grid)
        return lambda q, k: neighborhood_pattern(q, k, grid=grid, kernel=kernel)

    def _reach(self, grid):
        return tuple(k // 2 for k in self.kernel(grid))

    @staticmethod
    def flops(dim: int, heads: int, grid: tuple[int, ...], kernel_size: int | list = 7, **_) -> int:
        n = grid_tokens(grid)
        sizes = _per_axis("kernel_size", kernel_size, len(grid))
        keys = math.prod(min(k, side) for k, side in zip(sizes, grid))
        return projection_flops(n, dim) + 2 * 2 * n * keys * dim


@register("clear", slot="attn", description="CLEAR circular local attention, (dy^2 + dx^2) < radius^2")
class CLEAR(_GridLocalAttention):
    """CLEAR's conv-like local attention: each query sees the keys within a circle on the grid, truncated at borders;
    on a (frames, H, W) video grid, a ball (dt^2 + dy^2 + dx^2) < radius^2.

    The release's mask is (dy^2 + dx^2) < window_size^2 (strict); ``radius`` is that window_size. Released FLUX
    models use 8, 16 (training default) and 32 on a 64 x 64 token grid; the default here, radius=4, is the training
    default scaled to DiT's 16 x 16 grid: 45 keys per interior query, close to local2d's 7 x 7 = 49.
    Options: ``radius`` (> 0, default 4), ``impl``, ``tile`` (tile side of the tiled path, default 8).
    """

    def __init__(self, dim: int, heads: int, grid: tuple[int, ...] = (0, 0), radius: float = 4,
                 impl: str = "auto", tile: int | list = 8, qk_norm: bool | str = False, axes_dims=None,
                 theta: float = 10000.0):
        if not radius > 0:
            raise ValueError(f"radius={radius} must be > 0")
        _check_axes("tile", tile, grid)
        super().__init__(dim, heads, grid, impl, tile, qk_norm, axes_dims, theta)
        self.radius = float(radius)

    pattern_fields = ("radius",)

    def _pattern(self, grid):
        radius = self.radius
        return lambda q, k: circle_pattern(q, k, radius=radius)

    def _reach(self, grid):
        return (circle_reach(self.radius),) * len(grid)

    @staticmethod
    def flops(dim: int, heads: int, grid: tuple[int, ...], radius: float = 4, **_) -> int:
        reach = circle_reach(radius)
        spans = [range(-min(reach, side - 1), min(reach, side - 1) + 1) for side in grid]
        pairs = 0  # exact number of allowed (query, key) pairs, windows truncated at the borders
        for offsets in itertools.product(*spans):
            if sum(o * o for o in offsets) < radius * radius:
                pairs += math.prod(side - abs(o) for side, o in zip(grid, offsets))
        return projection_flops(grid_tokens(grid), dim) + 2 * 2 * pairs * dim
