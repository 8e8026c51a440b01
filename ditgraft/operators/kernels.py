"""GPU kernels behind the operators' fast paths, chosen per call by device and dtype. The PyTorch paths stay: they are
the reference every kernel is tested against and the path on any other device.

- Local softmax attention (``swa``, ``local2d``, ``clear``): torch's FlexAttention with a block mask built from the
  operator's own pattern (``flex_mask_mod``). Blocks of 128 x 128 (query, key) pairs that no window touches are
  skipped; the others evaluate the pattern per pair inside the kernel. Compiled with ``torch.compile`` (its fused
  forward and backward kernels); eager elsewhere, where it is a dense reference (CPU: forward only).
- Mamba-2's chunked scan: mamba_ssm's ``mamba_chunk_scan_combined`` (the fused SSD kernels of the Mamba-2 release),
  which takes the same ``x``, ``dt`` (after softplus), ``A``, ``B``, ``C`` and chunk size as ``mamba2.ssd_chunked``.
- Causal depthwise convolutions over tokens (Hyena's filters, Mamba-2's ``conv1d``): causal-conv1d's
  ``causal_conv1d_fn``, the kernel both releases call (widths 2 to 4).

mamba_ssm and causal-conv1d are optional; each is imported on first use, and a missing or broken install (no CUDA
build) means the PyTorch path. ``kernel_ready`` is the one test of whether a kernel runs a call; the operators
dispatch on it through their ``kernel_path`` methods, which ``ditgraft ops`` also prints, so the table shows the
path the forward takes.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import math
import warnings

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

FLEX, MAMBA_SSM, CAUSAL_CONV1D = "flex_attention", "mamba_ssm", "causal_conv1d"
# where each kernel's function lives (the package, for messages, is the first dotted part)
_SOURCES = {FLEX: ("torch.nn.attention.flex_attention", "flex_attention"),
            MAMBA_SSM: ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
            CAUSAL_CONV1D: ("causal_conv1d", "causal_conv1d_fn")}
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what all three kernels accept
CONV_WIDTHS = (2, 3, 4)  # causal_conv1d_fn's filter widths
FLEX_BLOCK = 128  # FlexAttention's default block size (queries and keys per block of the mask)

_STATE = {"enabled": True}


@contextlib.contextmanager
def kernels_disabled():
    """Inside this context every operator takes its PyTorch path, on any device (to time or test one against the
    other)."""
    before = _STATE["enabled"]
    _STATE["enabled"] = False
    try:
        yield
    finally:
        _STATE["enabled"] = before


@functools.cache
def kernel_function(kernel: str):
    """The kernel's function, or None where its package is missing or does not import (e.g. built without CUDA)."""
    module, name = _SOURCES[kernel]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, OSError, RuntimeError, AttributeError):
        return None


def kernel_ready(kernel: str, device, dtype: torch.dtype) -> bool:
    """Whether ``kernel`` runs a call on ``device`` with ``dtype``: kernels enabled, a CUDA device, a dtype the kernel
    takes, the package importable, and no Python dispatch mode active. Under such a mode (torch's FlopCounterMode in
    ``ditgraft.flops``, tracers) the PyTorch path runs: compiled FlexAttention cannot run under one, and the fused
    kernels would hide their work from a counter. The operators' own shape limits (e.g. conv widths) are checked by
    them."""
    return (_STATE["enabled"] and torch.device(device).type == "cuda" and dtype in KERNEL_DTYPES
            and _get_current_dispatch_mode() is None and kernel_function(kernel) is not None)


def fallback_note(kernel: str, device, dtype: torch.dtype) -> str:
    """Why ``kernel`` does not run on a CUDA device, for tables ('' on other devices or where it runs)."""
    if torch.device(device).type != "cuda" or kernel_ready(kernel, device, dtype):
        return ""
    if not _STATE["enabled"]:
        return "kernels disabled"
    if dtype not in KERNEL_DTYPES:
        return f"{kernel} does not take {dtype}"
    if kernel == FLEX:
        return f"no FlexAttention in torch {torch.__version__}"
    return f"{_SOURCES[kernel][0].split('.')[0]} not installed"


def describe_path(op, device, dtype: torch.dtype, tokens: int) -> str:
    """What ``op`` runs on ``device`` / ``dtype`` for ``tokens`` tokens, for tables: its ``kernel_path`` (operators
    without one: "torch" and their ``impl``), and why a kernel of its ``gpu_kernels`` does not run, e.g.
    "chunked + taps (mamba_ssm not installed; causal_conv1d not installed)"."""
    if not hasattr(op, "kernel_path"):
        return "torch" + (f" ({op.impl})" if isinstance(getattr(op, "impl", None), str) else "")
    path = op.kernel_path(device, dtype, tokens)
    notes = [fallback_note(k, device, dtype) for k in getattr(op, "gpu_kernels", ()) if k not in path]
    notes = [n for n in notes if n]
    return path + (f" ({'; '.join(notes)})" if notes else "")


# ---------------------------------------------------------------------------------------------------------------------
# FlexAttention for the local patterns of local_attention.py
# ---------------------------------------------------------------------------------------------------------------------
def flex_mask_mod(pattern, grid: tuple[int, ...]):
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for a local-attention pattern on ``grid`` (2-D or 3-D): raster
    token ids -> grid coordinates -> ``pattern(q, k)`` (True = may attend), the same function the dense reference mask
    and the tile plans evaluate."""
    sides = tuple(int(side) for side in grid)

    def coords(index):
        out = []
        for side in reversed(sides[1:]):
            out.append(index % side)
            index = index // side
        return (index, *reversed(out))

    def mask_mod(b, h, q_idx, kv_idx):
        return pattern(coords(q_idx), coords(kv_idx))

    return mask_mod


def flex_block_mask(pattern, grid: tuple[int, ...], device, block: int = FLEX_BLOCK):
    """The BlockMask of ``pattern`` on ``grid`` (any batch and head): which ``block`` x ``block`` tiles of (query,
    key) pairs hold an allowed pair, and which are entirely allowed."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = math.prod(int(side) for side in grid)
    return create_block_mask(flex_mask_mod(pattern, grid), None, None, n, n, device=device, BLOCK_SIZE=block)


_BLOCK_MASKS: dict = {}


def shared_block_mask(key: tuple, pattern, grid: tuple[int, int], device):
    """``flex_block_mask`` built once per pattern ``key`` (the operator and the values its pattern depends on), grid
    and device, and shared by every layer with that pattern: compiled FlexAttention recompiles for each new
    ``mask_mod`` function (and falls back to eager past dynamo's recompile limit), so the layers of a model with one
    pattern must hand it one function."""
    full = (key, tuple(grid), str(device))
    if full not in _BLOCK_MASKS:
        with torch.inference_mode(False):  # built in inference mode, it must still serve calls with autograd
            _BLOCK_MASKS[full] = flex_block_mask(pattern, grid, device)
    return _BLOCK_MASKS[full]


@functools.cache
def _compiled_flex():
    return torch.compile(kernel_function(FLEX), dynamic=False)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on [B, heads, N, d] under ``block_mask``; compiled on CUDA. Elsewhere FlexAttention
    runs eagerly (a dense evaluation: for checking the mask, not for speed; on CPU it has no backward)."""
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, block_mask=block_mask)
    with warnings.catch_warnings():  # the eager path warns that it is not compiled
        warnings.simplefilter("ignore")
        return kernel_function(FLEX)(q, k, v, block_mask=block_mask)


# ---------------------------------------------------------------------------------------------------------------------
# mamba_ssm and causal-conv1d
# ---------------------------------------------------------------------------------------------------------------------
def mamba_ssd(x, dt, A, B, C, chunk_size: int) -> torch.Tensor:
    """mamba_ssm's fused chunked scan: x [b, L, H, P], dt [b, L, H] (after softplus), A [H], B, C [b, L, G, n] ->
    y [b, L, H, P] without the D term, as ``mamba2.ssd_chunked``."""
    return kernel_function(MAMBA_SSM)(x, dt, A, B, C, chunk_size)


def causal_conv_tokens(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       activation: str | None = None) -> torch.Tensor:
    """causal-conv1d on tokens: x [B, N, C], weight [C, k] (tap k - 1 reads the current token), bias [C] ->
    [B, N, C], ``activation`` None or "silu" (applied after the bias). Same as
    ``common.reference_conv_tokens(x, weight, bias, left=k - 1)``. The kernel reads [B, C, N]; the transposed view of
    a token-major x is its channel-last layout, taken where C and the token stride are multiples of 8, else a
    contiguous copy."""
    xt = x.transpose(1, 2)
    if x.shape[-1] % 8 or x.stride(1) % 8 or x.stride(2) != 1:  # channel-last rows must be 8-aligned
        xt = xt.contiguous()
    return kernel_function(CAUSAL_CONV1D)(xt, weight, bias, activation=activation).transpose(1, 2)


def conv_path(impl: str, taps: int, causal: bool, device, dtype) -> str:
    """Path of a short convolution over tokens with the operator's ``impl``: CAUSAL_CONV1D, "taps"
    (``common.TapConvTokens``) or "reference"."""
    if impl == "reference":
        return "reference"
    if causal and taps in CONV_WIDTHS and kernel_ready(CAUSAL_CONV1D, device, dtype):
        return CAUSAL_CONV1D
    return "taps"
