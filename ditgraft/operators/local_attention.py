"""Local softmax attention: the same softmax(QK^T / sqrt(d)) V as MHA, but each query sees only nearby keys.

Three patterns, one machinery:

* ``swa``     1-D band in raster order: query i sees keys j with |i - j| <= window (flash-attn window (w, w), as in
              the grafting release). Rows of the image are simply concatenated, so there are no vertical neighbours.
* ``local2d`` 2-D neighbourhood attention (NATTEN semantics, dilation 1): a k x k window centred on the query and
              shifted inward at the borders, so every query sees exactly k*k keys.
* ``clear``   CLEAR (Liu et al. 2024): a circular window, keys with (dy^2 + dx^2) < radius^2, truncated (not shifted)
              at the borders.

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

import math

import torch
from torch import nn

from ditgraft.operators.attention import MHA, TilePlan, reference_attention, tiled_attention, tiled_attention_packed
from ditgraft.operators.common import check_choice, check_heads, from_mha, projection_flops, split_heads
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


def band_pattern(qy, qx, ky, kx, *, width: int, window: int):
    """swa: |i - j| <= window on raster indices i = y * width + x."""
    return ((qy * width + qx) - (ky * width + kx)).abs() <= window


def neighborhood_pattern(qy, qx, ky, kx, *, grid: tuple[int, int], kernel: tuple[int, int]):
    """local2d: the key lies in the query's NATTEN window along both axes."""
    (H, W), (kh, kw) = grid, kernel
    y0, x0 = natten_window_start(qy, H, kh), natten_window_start(qx, W, kw)
    return (ky >= y0) & (ky < y0 + kh) & (kx >= x0) & (kx < x0 + kw)


def circle_pattern(qy, qx, ky, kx, *, radius: float):
    """clear: Euclidean distance on the grid strictly below the radius (as the CLEAR release's mask)."""
    return (qy - ky) ** 2 + (qx - kx) ** 2 < radius ** 2


def circle_reach(radius: float) -> int:
    """Largest integer offset m with m^2 < radius^2 (how far the circle reaches along one axis)."""
    return max(math.ceil(radius) - 1, 0)


def dense_mask(pattern, grid: tuple[int, int], device=None) -> torch.Tensor:
    """Boolean [N, N] mask, True where query (row) may attend to key (column); tokens in raster order."""
    H, W = grid
    ys, xs = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return pattern(ys[:, None], xs[:, None], ys[None, :], xs[None, :])


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


def make_plan(pattern, grid: tuple[int, int], tile: tuple[int, int], reach: tuple[int, int], device=None) -> TilePlan:
    """TilePlan for ``pattern`` on ``grid``: tiles of tile[0] x tile[1] queries, windows reaching reach[0] rows
    and reach[1] columns from their query (or shifted inward within that reach, as NATTEN does)."""
    (H, W), (th, tw) = grid, tile
    qr, kr, real_r = _axis_tiles(H, th, reach[0])  # [Ty, th'], [Ty, Ly]
    qc, kc, real_c = _axis_tiles(W, tw, reach[1])  # [Tx, tw'], [Tx, Lx]
    Ty, Tx = qr.shape[0], qc.shape[0]
    # query and key coordinates of every tile, shaped [Ty, Tx, rows, cols]
    q_y = qr[:, None, :, None].expand(Ty, Tx, qr.shape[1], qc.shape[1])
    q_x = qc[None, :, None, :].expand_as(q_y)
    k_y = kr[:, None, :, None].expand(Ty, Tx, kr.shape[1], kc.shape[1])
    k_x = kc[None, :, None, :].expand_as(k_y)
    T = Ty * Tx
    q_y, q_x = q_y.reshape(T, -1), q_x.reshape(T, -1)
    k_y, k_x = k_y.reshape(T, -1), k_x.reshape(T, -1)
    allowed = pattern(q_y[:, :, None], q_x[:, :, None], k_y[:, None, :], k_x[:, None, :])
    q_idx, k_idx = q_y * W + q_x, k_y * W + k_x
    real = (real_r[:, None, :, None] & real_c[None, :, None, :]).flatten()  # each token has exactly one real slot
    flat = q_idx.flatten()
    inv = torch.empty(H * W, dtype=torch.long)
    inv[flat[real]] = torch.arange(flat.numel())[real]
    raster = torch.equal(flat[: H * W], torch.arange(H * W))
    assert bool(allowed.any(-1).all()), "every query must see at least one key"
    return TilePlan(q_idx.to(device), k_idx.to(device), (~allowed).to(device), inv.to(device), raster)


def _check_grid(grid, n: int) -> tuple[int, int]:
    H, W = int(grid[0]), int(grid[1])
    if H * W != n:
        raise ValueError(f"grid={tuple(grid)} has {H * W} tokens but the input has N={n}; pass the right grid=(H, W)")
    return H, W


class _LocalAttention(nn.Module):
    """Shared body: heads, impl choice, cached tile plans. Subclasses define ``_pattern``, ``_tile``, ``_reach``."""

    gpu_kernels = (FLEX,)  # the GPU kernels kernel_path may choose

    def __init__(self, dim: int, heads: int, grid: tuple[int, int], impl: str):
        super().__init__()
        self.dim, self.heads, self.grid = dim, heads, tuple(grid)
        self.head_dim = check_heads(dim, heads)
        self.impl = check_choice("impl", impl, LOCAL_IMPLS)
        self._plans: dict = {}  # (grid, device) -> TilePlan; not part of the state dict

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
        if self.kernel_path(qkv.device, qkv.dtype, N) == "tiled":  # packed in, merged out: no re-layout
            return tiled_attention_packed(qkv, self.heads, self.plan(_check_grid(grid or self.grid, N), qkv.device))
        return self._attend_heads(qkv, grid).transpose(1, 2).reshape(B, N, self.dim)

    def _attend_heads(self, qkv: torch.Tensor, grid, return_lse: bool = False):
        """Per-head output [B, heads, N, d] (and with ``return_lse`` its log-normaliser [B, heads, N])."""
        N = qkv.shape[1]
        grid = _check_grid(grid or self.grid, N)
        q, k, v = split_heads(qkv, self.heads)
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

    def __init__(self, dim: int, heads: int, grid: tuple[int, int] = (0, 0), window: int = 4, impl: str = "auto",
                 block: int | None = None):
        super().__init__(dim, heads, grid, impl)
        if window < 0:
            raise ValueError(f"window={window} must be >= 0")
        self.window = int(window)
        self.block = int(block) if block is not None else max(32, 2 * self.window + 1)
        if self.block < 1:
            raise ValueError(f"block={block} must be >= 1")
        self.Wqkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    # SWA ignores the 2-D layout: the grid is viewed as one row of N tokens.
    pattern_fields = ("window",)

    def _pattern(self, grid):
        n, window = grid[0] * grid[1], self.window
        return lambda qy, qx, ky, kx: band_pattern(qy, qx, ky, kx, width=n, window=window)

    def _tile(self, grid):
        return (1, self.block)

    def _reach(self, grid):
        return (0, self.window)

    def mask(self, grid=None, device=None):
        grid = tuple(grid or self.grid)
        n = grid[0] * grid[1]
        return dense_mask(self._pattern(grid), (1, n), device)

    def plan(self, grid, device):
        n = grid[0] * grid[1]
        return super().plan((1, n), device)

    def block_mask(self, grid, device):
        n = grid[0] * grid[1]
        return super().block_mask((1, n), device)

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
    def flops(dim: int, heads: int, grid: tuple[int, int], window: int = 4, **_) -> int:
        n = grid[0] * grid[1]
        reach = min(window, n - 1)
        pairs = n + 2 * sum(n - d for d in range(1, reach + 1))  # exact number of (i, j) with |i - j| <= window
        return projection_flops(n, dim) + 2 * 2 * pairs * dim


class _GridLocalAttention(_LocalAttention):
    """Local attention with DiT's parameter names (qkv / proj), so an MHA state dict loads strictly."""

    def __init__(self, dim, heads, grid, impl, tile):
        super().__init__(dim, heads, grid, impl)
        self.tile = int(tile)
        if self.tile < 1:
            raise ValueError(f"tile={tile} must be >= 1")
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _tile(self, grid):
        return (self.tile, self.tile)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        return self.proj(self._attend(self.qkv(x), grid))

    @classmethod
    def from_mha(cls, mha: MHA, **options):
        """The operator with the teacher's attention weights (same parameter names, strict load)."""
        return from_mha(cls, mha, **options)


@register("local2d", slot="attn", description="2-D neighbourhood attention, k x k window (NATTEN semantics)")
class Local2D(_GridLocalAttention):
    """Neighbourhood attention on the H x W grid: each query sees the k x k window centred on it, shifted inward at
    the borders (NATTEN, dilation 1), so every query sees exactly k*k keys.

    Options: ``kernel_size`` (odd, default 7), ``impl``, ``tile`` (tile side of the tiled path, default 8).
    Where k exceeds a side of the grid, the window along that axis is clamped to the whole axis (NATTEN raises an
    error instead); so k >= max(H, W) is full attention, equal to MHA.
    """

    def __init__(self, dim: int, heads: int, grid: tuple[int, int] = (0, 0), kernel_size: int = 7,
                 impl: str = "auto", tile: int = 8):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size} must be an odd integer >= 1")
        super().__init__(dim, heads, grid, impl, tile)
        self.kernel_size = int(kernel_size)

    pattern_fields = ("kernel_size",)

    def kernel(self, grid) -> tuple[int, int]:
        return (min(self.kernel_size, grid[0]), min(self.kernel_size, grid[1]))

    def _pattern(self, grid):
        kernel = self.kernel(grid)
        return lambda qy, qx, ky, kx: neighborhood_pattern(qy, qx, ky, kx, grid=grid, kernel=kernel)

    def _reach(self, grid):
        kh, kw = self.kernel(grid)
        return (kh // 2, kw // 2)

    @staticmethod
    def flops(dim: int, heads: int, grid: tuple[int, int], kernel_size: int = 7, **_) -> int:
        n = grid[0] * grid[1]
        keys = min(kernel_size, grid[0]) * min(kernel_size, grid[1])
        return projection_flops(n, dim) + 2 * 2 * n * keys * dim


@register("clear", slot="attn", description="CLEAR circular local attention, (dy^2 + dx^2) < radius^2")
class CLEAR(_GridLocalAttention):
    """CLEAR's conv-like local attention: each query sees the keys within a circle on the grid, truncated at borders.

    The release's mask is (dy^2 + dx^2) < window_size^2 (strict); ``radius`` is that window_size. Released FLUX
    models use 8, 16 (training default) and 32 on a 64 x 64 token grid; the default here, radius=4, is the training
    default scaled to DiT's 16 x 16 grid: 45 keys per interior query, close to local2d's 7 x 7 = 49.
    Options: ``radius`` (> 0, default 4), ``impl``, ``tile`` (tile side of the tiled path, default 8).
    """

    def __init__(self, dim: int, heads: int, grid: tuple[int, int] = (0, 0), radius: float = 4,
                 impl: str = "auto", tile: int = 8):
        if not radius > 0:
            raise ValueError(f"radius={radius} must be > 0")
        super().__init__(dim, heads, grid, impl, tile)
        self.radius = float(radius)

    pattern_fields = ("radius",)

    def _pattern(self, grid):
        radius = self.radius
        return lambda qy, qx, ky, kx: circle_pattern(qy, qx, ky, kx, radius=radius)

    def _reach(self, grid):
        reach = circle_reach(self.radius)
        return (reach, reach)

    @staticmethod
    def flops(dim: int, heads: int, grid: tuple[int, int], radius: float = 4, **_) -> int:
        H, W = grid
        reach = circle_reach(radius)
        pairs = 0  # exact number of allowed (query, key) pairs, windows truncated at the borders
        for dy in range(-min(reach, H - 1), min(reach, H - 1) + 1):
            for dx in range(-min(reach, W - 1), min(reach, W - 1) + 1):
                if dy * dy + dx * dx < radius * radius:
                    pairs += (H - abs(dy)) * (W - abs(dx))
        n = H * W
        return projection_flops(n, dim) + 2 * 2 * pairs * dim
