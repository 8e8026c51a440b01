"""Hyena-family operators from the grafting paper: short explicit convolutions plus multiplicative gates.

Token mixers (slot ``attn``), all ``in_proj: D -> 3D``, split into q, k, v, ``y = q * conv(k * v)``, ``out_proj: D -> D``:

- ``hyena_se``: featurizer conv over all 3D channels (``short_filter``) and inner conv on ``k * v`` (``inner_filter``).
- ``hyena_x``:  featurizer only.
- ``hyena_y``:  inner conv only.

Channel mixer (slot ``mlp``):

- ``mlp_hyena_x``: ``in_proj: D -> 3 * 2D``, a causal conv along the *channel* axis with one filter per token (so the
  conv has N channels and the operator is tied to the grid it was built for), ``q * (k * v)``, ``out_proj: 2D -> D``.

Parameter names and shapes follow the release (keshik6/grafting ``src/operators``) so its checkpoints load strictly:
``in_proj``/``out_proj`` are biased Linears, ``short_filter``/``inner_filter`` are depthwise Conv1d weights ``(C, 1, k)``
with a bias. The release computes its convs with ``causal_conv1d_fn``: ``y[t] = bias + sum_i w[i] * x[t - (k-1) + i]``,
so tap ``k - 1`` multiplies the current token; the inner filter starts as the identity (that tap 1, the rest 0, bias 0).

``direction`` (beyond the paper; ``"causal"`` is the paper's operator):

- ``"causal"``: as above.
- ``"bidirectional"``: each conv also gets a strictly anti-causal part ``<name>_rev`` of ``k - 1`` taps and no bias,
  ``<name>_rev.weight[c, 0, m - 1]`` multiplying token ``t + m``. The sum is a centred filter of ``2k - 1`` taps whose causal
  half keeps the release's name and shape. The ``_rev`` weights start at zero, so at init the operator equals the causal
  one and a causal checkpoint loads with ``strict=False`` (missing keys are exactly the ``_rev`` ones).
- ``"2d"``: depthwise ``k x k`` convs over the ``H x W`` grid (weights ``(C, 1, k, k)``, same names) with "same" padding:
  ``(k - 1) // 2`` before, the rest after (for even k the window reaches one more row/column forward). The inner filter's
  identity tap is the centre ``[(k - 1) // 2, (k - 1) // 2]``. On a video's (frames, H, W) grid each frame is filtered
  alone (the same ``k x k`` filter in every frame).
- ``"3d"``: depthwise ``k x k x k`` convs over a video's (frames, H, W) grid (weights ``(C, 1, k, k, k)``), padded and
  initialised as ``"2d"``.

``impl="fast"`` runs the token-axis convs as ``TapConvTokens`` (a multiply-add per tap with its own backward: the CPU
depthwise conv's backward costs ~50x its forward at N = 16384, C = 3456) and the 2-D convs as one grouped ``F.conv2d``
on a channels-last view of the ``[B, N, C]`` activations (no transposes copied); ``impl="reference"`` is a plain sum
over taps of shifted copies. Tests compare both, outputs and gradients. On CUDA (fp32/bf16/fp16) the causal convs
of ``impl="fast"`` run causal-conv1d's ``causal_conv1d_fn`` where it is installed (widths 2-4, ``kernels.py``), as
in the release; ``kernel_path`` names the path a call takes.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ditgraft.operators.common import (TapConvTokens, check_choice, check_grid, from_mha, grid_tokens,
                                      projection_flops, reference_conv_tokens)
from ditgraft.operators.kernels import CAUSAL_CONV1D, causal_conv_tokens, conv_path
from ditgraft.operators.registry import register

IMPLS = ("fast", "reference")
DIRECTIONS = ("causal", "bidirectional", "2d", "3d")
GRID_DIRECTIONS = {"2d": 2, "3d": 3}  # the grid directions and how many axes their filters span


# ---------------------------------------------------------------------------------------------------------------------
# Depthwise k x k convolutions over the token grid (the token-axis ones are in common.py).
# ---------------------------------------------------------------------------------------------------------------------
def grid_pads(k: int) -> tuple[int, int]:
    """'Same' padding for a k-tap window: (before, after)."""
    return (k - 1) // 2, k - 1 - (k - 1) // 2


def _filter_view(x: torch.Tensor, weight: torch.Tensor, grid) -> tuple[torch.Tensor, tuple[int, ...]]:
    """x [B, N, C] as [B', *sides, C] over the axes the filter spans (the last ``weight.dim() - 1`` of the grid; the
    others, a video's frames under a k x k filter, are folded into the batch), and those sides."""
    axes = weight.dim() - 1
    sides = tuple(int(side) for side in grid[len(grid) - axes:])
    return x.reshape(-1, *sides, x.shape[-1]), sides


def reference_conv_grid(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grid: tuple[int, ...]):
    """Depthwise conv of x [B, N, C] on the grid, as a sum over taps, 'same' padding: weight [C, k, k] over rows and
    columns (on a 3-D grid, each frame alone) or [C, k, k, k] over frames, rows and columns."""
    B, N, C = x.shape
    k = weight.shape[-1]
    xs, sides = _filter_view(x, weight, grid)
    before, after = grid_pads(k)
    xpad = F.pad(xs, (0, 0) + (before, after) * len(sides))
    y = sum(weight[(slice(None), *taps)] * xpad[(slice(None), *(slice(t, t + n) for t, n in zip(taps, sides)))]
            for taps in itertools.product(range(k), repeat=len(sides)))
    y = y.reshape(B, N, C)
    return y if bias is None else y + bias


def fast_conv_grid(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, grid: tuple[int, ...]):
    """Same as ``reference_conv_grid`` with one grouped conv2d (conv3d) on the channels-last view of x."""
    B, N, C = x.shape
    k = weight.shape[-1]
    xs, sides = _filter_view(x, weight, grid)
    before, after = grid_pads(k)
    pad = max(before, after)
    conv = F.conv2d if len(sides) == 2 else F.conv3d
    channels_first = (0, len(sides) + 1, *range(1, len(sides) + 1))
    out = conv(xs.permute(channels_first), weight.reshape(C, 1, *weight.shape[1:]), bias, padding=pad, groups=C)
    s = pad - before
    out = out[(slice(None), slice(None), *(slice(s, s + n) for n in sides))]
    return out.permute(0, *range(2, len(sides) + 2), 1).reshape(B, N, C)


# ---------------------------------------------------------------------------------------------------------------------
# Hyena token mixers
# ---------------------------------------------------------------------------------------------------------------------
class _Hyena(nn.Module):
    """Shared body of Hyena-SE / -X / -Y; subclasses set which of the two convs exist."""

    has_featurizer = True
    has_inner = True

    def __init__(self, dim: int, heads: int = 1, grid: tuple[int, int] = (0, 0), kernel_size: int = 4,
                 direction: str = "causal", impl: str = "fast"):
        super().__init__()
        check_choice("direction", direction, DIRECTIONS)
        check_choice("impl", impl, IMPLS)
        min_k = 2 if direction == "bidirectional" else 1
        if not isinstance(kernel_size, int) or kernel_size < min_k:
            raise ValueError(f"kernel_size={kernel_size!r} is not allowed for direction={direction!r}: "
                             f"use an int >= {min_k}")
        self.dim, self.grid, self.kernel_size = dim, tuple(grid), kernel_size
        self.direction, self.impl = direction, impl
        # Creation order as in the release (out_proj before in_proj), so a seed gives the same init.
        self.out_proj = nn.Linear(dim, dim)
        self.in_proj = nn.Linear(dim, 3 * dim)
        if self.has_featurizer:
            self.short_filter = self._make_conv(3 * dim)
        if self.has_inner:
            self.inner_filter = self._make_conv(dim)
        if self.has_featurizer and direction == "bidirectional":
            self.short_filter_rev = self._make_rev_conv(3 * dim)
        if self.has_inner:
            self.reset_inner_filter()
            if direction == "bidirectional":
                self.inner_filter_rev = self._make_rev_conv(dim)

    @classmethod
    def from_mha(cls, mha: nn.Module, **options) -> "_Hyena":
        """Built from a teacher's attention (``init: teacher``): ``in_proj`` takes MHA's ``qkv`` (q, k, v in the
        same order and shapes) and ``out_proj`` its ``proj``; the convolutions keep their own init."""
        return from_mha(cls, mha, {"qkv": "in_proj", "proj": "out_proj"}, **options)

    def _make_conv(self, channels: int) -> nn.Module:
        k = self.kernel_size
        if self.direction in GRID_DIRECTIONS:
            conv = nn.Conv2d if self.direction == "2d" else nn.Conv3d
            return conv(channels, channels, k, groups=channels, padding=grid_pads(k)[0])
        return nn.Conv1d(channels, channels, k, groups=channels, padding=k - 1)

    def _make_rev_conv(self, channels: int) -> nn.Module:
        conv = nn.Conv1d(channels, channels, self.kernel_size - 1, groups=channels, bias=False)
        nn.init.zeros_(conv.weight)
        return conv

    @torch.no_grad()
    def reset_inner_filter(self) -> None:
        """Identity init of the inner filter (release: weight zero except the current-token tap; bias zero)."""
        w = self.inner_filter.weight
        w.zero_()
        if self.direction in GRID_DIRECTIONS:
            c = grid_pads(self.kernel_size)[0]
            w[(slice(None), 0) + (c,) * GRID_DIRECTIONS[self.direction]] = 1.0
        else:
            w[:, 0, self.kernel_size - 1] = 1.0
        self.inner_filter.bias.zero_()

    def conv(self, x: torch.Tensor, name: str, grid: tuple[int, int]) -> torch.Tensor:
        """Apply the conv ``name`` ('short_filter' or 'inner_filter') to x [B, N, C] in the chosen direction."""
        # the filters' weights are read here, not through the Conv1d's own forward: they are cast to x's dtype, so
        # that weights stored in another dtype (diffusers' layerwise casting hooks only a layer's own forward) compute
        # in x's
        filt = getattr(self, name)
        fast = self.impl == "fast"
        w, bias = filt.weight[:, 0].to(x.dtype), filt.bias.to(x.dtype)
        if self.direction in GRID_DIRECTIONS:
            f = fast_conv_grid if fast else reference_conv_grid
            return f(x, w, bias, grid)
        k = self.kernel_size
        if self.direction == "causal":
            path = conv_path(self.impl, k, True, x.device, x.dtype)
            if path == CAUSAL_CONV1D:
                return causal_conv_tokens(x, w, bias)
            if fast:
                return TapConvTokens.apply(x, w, bias, k - 1)
            return reference_conv_tokens(x, w, bias, left=k - 1)
        w_rev = getattr(self, name + "_rev").weight[:, 0].to(x.dtype)
        if fast:  # one centred conv of 2k - 1 taps: offsets -(k-1)..0 from w, 1..k-1 from w_rev
            return TapConvTokens.apply(x, torch.cat([w, w_rev], dim=1), bias, k - 1)
        causal = reference_conv_tokens(x, w, bias, left=k - 1)
        anti = reference_conv_tokens(x, torch.cat([torch.zeros_like(w_rev[:, :1]), w_rev], dim=1), None, left=0)
        return causal + anti

    gpu_kernels = (CAUSAL_CONV1D,)  # the GPU kernel kernel_path may choose

    def kernel_path(self, device, dtype, tokens: int | None = None) -> str:
        """The path of the short convs in a call: CAUSAL_CONV1D or "taps" (causal), "conv2d" (2d), "conv3d" (3d),
        "taps" (bidirectional: a centred filter), or "reference"."""
        if self.impl == "reference":
            return "reference"
        if self.direction in GRID_DIRECTIONS:
            return "conv" + self.direction
        return conv_path(self.impl, self.kernel_size, self.direction == "causal", device, dtype)

    def resolve_grid(self, n: int, grid: tuple[int, ...] | None) -> tuple[int, ...]:
        grid = self.grid if grid is None else tuple(grid)
        if self.direction in GRID_DIRECTIONS:
            grid = check_grid(grid, n)
            if len(grid) < GRID_DIRECTIONS[self.direction]:
                raise ValueError(f"direction={self.direction!r} filters a (frames, rows, columns) grid; got "
                                 f"grid={grid}: use direction='2d' on an image grid")
        return grid

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        grid = self.resolve_grid(x.shape[1], grid)
        u = self.in_proj(x)
        if self.has_featurizer:
            u = self.conv(u, "short_filter", grid)
        q, k, v = u.split(self.dim, dim=-1)
        v = k * v
        if self.has_inner:
            v = self.conv(v, "inner_filter", grid)
        return self.out_proj(q * v)

    @classmethod
    def _flops(cls, dim: int, grid: tuple[int, int], kernel_size: int = 4, direction: str = "causal") -> int:
        n = grid_tokens(grid)
        taps = {"causal": kernel_size, "bidirectional": 2 * kernel_size - 1, "2d": kernel_size ** 2,
                "3d": kernel_size ** 3}[direction]
        flops = projection_flops(n, dim)  # in_proj, out_proj
        flops += 2 * n * dim  # the two gates
        if cls.has_featurizer:
            flops += 2 * taps * 3 * dim * n
        if cls.has_inner:
            flops += 2 * taps * dim * n
        return flops


@register("hyena_se", slot="attn", description="Hyena-SE: in_proj, short conv featurizer, q*conv(k*v), out_proj")
class HyenaSE(_Hyena):
    has_featurizer, has_inner = True, True

    @staticmethod
    def flops(dim: int, heads: int, grid: tuple[int, int], kernel_size: int = 4, direction: str = "causal", **_):
        return HyenaSE._flops(dim, grid, kernel_size, direction)


@register("hyena_x", slot="attn", description="Hyena-X: in_proj, short conv featurizer, q*k*v, out_proj")
class HyenaX(_Hyena):
    has_featurizer, has_inner = True, False

    @staticmethod
    def flops(dim: int, heads: int, grid: tuple[int, int], kernel_size: int = 4, direction: str = "causal", **_):
        return HyenaX._flops(dim, grid, kernel_size, direction)


@register("hyena_y", slot="attn", description="Hyena-Y: in_proj, q*conv(k*v) (no featurizer), out_proj")
class HyenaY(_Hyena):
    has_featurizer, has_inner = False, True

    @staticmethod
    def flops(dim: int, heads: int, grid: tuple[int, int], kernel_size: int = 4, direction: str = "causal", **_):
        return HyenaY._flops(dim, grid, kernel_size, direction)


# ---------------------------------------------------------------------------------------------------------------------
# MLP-Hyena-X channel mixer
# ---------------------------------------------------------------------------------------------------------------------
@register("mlp_hyena_x", slot="mlp",
          description="MLP-Hyena-X: in_proj D->3*2D, causal conv along channels (one filter per token), q*k*v, out_proj")
class MLPHyenaX(nn.Module):
    """The release's ``MLP_Hyena_X``: the conv treats the N tokens as conv channels and slides along the 3 * rD features
    (q, k and v concatenated, so taps cross the q/k and k/v boundaries exactly as in the release). N is fixed at build."""

    def __init__(self, dim: int, heads: int = 1, grid: tuple[int, int] = (0, 0), expansion_ratio: int = 2,
                 kernel_size: int = 4, impl: str = "fast"):
        super().__init__()
        check_choice("impl", impl, IMPLS)
        n = grid_tokens(grid)
        if n <= 0:
            raise ValueError(f"grid={tuple(grid)} gives N={n} tokens; mlp_hyena_x needs the grid (one filter per token)")
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size={kernel_size!r} is not allowed: use an int >= 1")
        hidden = int(dim * expansion_ratio)
        if hidden <= 0:
            raise ValueError(f"expansion_ratio={expansion_ratio} gives hidden={hidden}; it must be > 0")
        self.dim, self.grid, self.tokens, self.hidden = dim, tuple(grid), n, hidden
        self.kernel_size, self.impl = kernel_size, impl
        self.in_proj = nn.Linear(dim, 3 * hidden)
        self.out_proj = nn.Linear(hidden, dim)
        self.short_filter = nn.Conv1d(n, n, kernel_size, groups=n, padding=kernel_size - 1)

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        if x.shape[1] != self.tokens:
            raise ValueError(f"mlp_hyena_x was built for N={self.tokens} tokens (grid={self.grid}); got N={x.shape[1]}")
        u = self.in_proj(x)  # [B, N, 3*hidden]: N conv channels, 3*hidden conv positions
        k = self.kernel_size
        # the filter's weights are read outside its own forward: cast to u's dtype (as in _Hyena.conv)
        w, bias = self.short_filter.weight.to(u.dtype), self.short_filter.bias.to(u.dtype)
        if self.impl == "fast":
            u = F.conv1d(u, w, bias, padding=k - 1, groups=self.tokens)
            u = u[..., :3 * self.hidden]
        else:  # the token-axis reference applied to the transposed tensor: channels <-> positions swapped
            u = reference_conv_tokens(u.transpose(1, 2), w[:, 0], bias, left=k - 1).transpose(1, 2)
        q, kk, v = u.split(self.hidden, dim=-1)
        return self.out_proj(q * (kk * v))

    @staticmethod
    def flops(dim: int, heads: int, grid: tuple[int, int], expansion_ratio: int = 2, kernel_size: int = 4, **_) -> int:
        n = grid_tokens(grid)
        hidden = int(dim * expansion_ratio)
        return 2 * n * dim * 3 * hidden + 2 * kernel_size * 3 * hidden * n + 2 * n * hidden + 2 * n * hidden * dim
