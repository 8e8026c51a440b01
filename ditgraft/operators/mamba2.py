"""Mamba-2 token mixer in pure PyTorch, with mamba_ssm's ``Mamba2`` parameter names, shapes, defaults and init.

Block (mamba_ssm ``Mamba2`` with ``rmsnorm=True, norm_before_gate=False, D_has_hdim=False, d_ssm=None``):

    z, xBC, dt = in_proj(u).split([d_inner, d_inner + 2*G*n, H])          # in_proj has no bias
    xBC = silu(causal depthwise conv1d(xBC))     (``conv1d``, bias, k = d_conv)
    x, B, C = xBC.split([d_inner, G*n, G*n]);  dt = softplus(dt + dt_bias);  A = -exp(A_log)
    per head h (head dim P, group g(h) = h // (H/G)), state S_h [P, n]:
        S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T;   y_t = S_t C_t + D_h x_t
    y = RMSNorm_groups(y * silu(z)) * norm.weight   (eps 1e-5, G groups);   out = out_proj(y)   # no bias

``impl="reference"`` runs that recurrence token by token (slow, obviously correct; small N only) and the gated norm as
written above. ``impl="fast"`` is the chunked SSD form (Mamba-2 paper, ``ssd_minimal``) with its own backward
(``SSDChunkScan``, the structure of mamba_ssm's kernels), and the short conv as a sum over its taps with its own
backward (``common.TapConvTokens``); the gated norm is ``GatedRMSNormFunction`` (same formula, own backward).

Chunked scan, per head (A < 0, dt >= 0). The sequence is zero-padded to a multiple of the chunk size Q. With
xd_t = dt_t x_t and, inside chunk k, a_l = sum_{r <= l in the chunk} dt_r A (so a is non-increasing), g_k = exp(a_last)
the whole-chunk decay, E_k the state entering chunk k (E_0 = 0) and e_s = exp(a_last - a_s):

    W_ls  = (C_l . B_s) M_ls,  M_ls = exp(a_l - a_s) for s <= l, else 0        (per chunk, [Q, Q])
    y_l   = sum_s W_ls xd_s + exp(a_l) C_l E_k                                   (intra-chunk + read-out)
    S_k   = sum_s B_s^T e_s xd_s,   E_{k+1} = g_k E_k + S_k                       (end states, carried over chunks)

The intra-chunk blocks are built a slab of chunks at a time (vectorised over heads), the end states and read-out are
wide matmuls over all heads of a group, and the carry is one in-place multiply-add per chunk (2 (N/Q) H P n FLOPs
instead of the (N/Q)^2 H P n of ``ssd_minimal``'s all-pairs-of-chunks einsum). Backward, given dy (G_k is the
gradient of E_k; dS_k = G_{k+1}):

    G_k    = C^T (exp(a) dy) over chunk k + g_k G_{k+1},  G_c = 0                 (reverse carry, in place)
    dxd_s  = sum_l W_ls dy_l + e_s B_s dS_k
    dC_l   = sum_s M_ls (dy_l . xd_s) B_s + exp(a_l) E_k dy_l                     (summed over a group's heads)
    dB_s   = sum_l M_ls (dy_l . xd_s) C_l + dS_k^T e_s xd_s
    da_l   = dy_l . y_l - xd_l . dxd_l   (+ sum dS_k * E_{k+1} at l = last)

The da line follows from the others: each exp(a_l - a_s), exp(a_l), e_s, g_k contributes (its gradient x its value)
with + for a_l and - for a_s; summed over the products they scale, the + terms give dy_l . y_l and the - terms
xd_s . dxd_s, and the terms in a_last (from e_s and g_k) give S_k + g_k E_k = E_{k+1}. Autograd then takes a back
through the cumulative sum and the product dt A (xd = dt x and the D skip are inside the Function: dx = dt dxd + D dy,
d dt = sum_P x dxd). Only the inputs, xd, y and the chunk boundary states are saved;
the [Q, Q] blocks are recomputed.

On CUDA (fp32/bf16/fp16) ``impl="fast"`` runs mamba_ssm's fused ``mamba_chunk_scan_combined`` in place of
``ssd_chunked`` (same x, dt, A, B, C and chunk size) and causal-conv1d's ``causal_conv1d_fn`` (with its SiLU) in place
of the taps, each where its package is installed (``kernels.py``); ``kernel_path`` names the paths a call takes.

Defaults follow the grafting release config (d_state 64, d_conv 4, expand 2, headdim 16) and mamba_ssm (ngroups 1,
A_init_range (1, 16), dt in [1e-3, 0.1] with floor 1e-4, D = 1, conv bias, no projection biases). ``chunk_size``
defaults to 32 here (mamba_ssm: 256); it changes rounding only. On CPU 32 balances the per-head Q x Q intra-chunk
buffers against the (N/Q) x n x d_inner chunk states (measured at N = 4096 and 16384: 32 beats 16 and 64 by 3-8%).

``direction="bidirectional"`` (beyond the paper): a second scan runs over the reversed sequence. It shares in_proj
(so z, dt and the raw x/B/C features), dt_bias, A_log, D, norm and out_proj, and has its own depthwise conv
``conv1d_rev`` (same shape/init as ``conv1d``; applied to the reversed sequence, i.e. anti-causal in the original
order). The two scan outputs (each with its own D skip) are summed before the gated norm. A causal checkpoint loads
with ``strict=False``; the only missing keys are ``conv1d_rev.*``.

The scan runs over the tokens in the order the model holds them: raster order on an image grid, and frame-major
(frames, then rows, then columns) on a video's grid, as Wan flattens its patches; the grid is not needed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ditgraft.operators.common import TapConvTokens, check_choice, grid_tokens, reference_conv_tokens
from ditgraft.operators.kernels import (CAUSAL_CONV1D, MAMBA_SSM, causal_conv_tokens, conv_path, kernel_ready,
                                        mamba_ssd)
from ditgraft.operators.registry import register

IMPLS = ("fast", "reference")
DIRECTIONS = ("causal", "bidirectional")


# ---------------------------------------------------------------------------------------------------------------------
# Scans. x [b, L, H, P], dt [b, L, H] (after softplus), A [H] (negative), B, C [b, L, G, n] -> y [b, L, H, P] (no D term)
# ---------------------------------------------------------------------------------------------------------------------
def ssd_reference(x, dt, A, B, C):
    """Token-by-token recurrence S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t."""
    b, L, H, P = x.shape
    G, n = B.shape[-2:]
    Bh = B.repeat_interleave(H // G, dim=2)  # [b, L, H, n]: head h reads group h // (H/G)
    Ch = C.repeat_interleave(H // G, dim=2)
    state = x.new_zeros(b, H, P, n)
    ys = []
    for t in range(L):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((state * Ch[:, t, :, None, :]).sum(-1))
    return torch.stack(ys, dim=1)


def decayed_cumsum_(t: torch.Tensor, decay: torch.Tensor, dim: int = -2, reverse: bool = False) -> torch.Tensor:
    """In place along the chunk axis ``dim``: ``t[i] += decay[i] * t[i - 1]`` for i = 1, 2, ... (``reverse``:
    ``t[i] += decay[i] * t[i + 1]`` for i = c-2, ..., 0); ``decay`` broadcasts against ``t``. Returns ``t``.

    Forward, on the chunks' own end states S_k with g_k = exp(a_last of chunk k), it gives I_k = S_k + g_k I_{k-1},
    the state leaving chunk k (= entering chunk k+1); reversed it carries the state gradients back.
    A loop over the c = N/Q chunks, one in-place multiply-add each (c = 512 at N = 16384, Q = 32). On CPU this
    measured 3-3.5x faster than a vectorised blocked scan (decay-matrix matmuls inside blocks of chunks, recursive
    across blocks), whose extra passes over the states cost more than the loop's per-step overhead. No autograd
    (used inside ``SSDChunkScan``)."""
    c = t.shape[dim]
    order = range(c - 2, -1, -1) if reverse else range(1, c)
    step = 1 if reverse else -1
    for i in order:
        t.select(dim, i).addcmul_(t.select(dim, i + step), decay.select(dim, i))
    return t


class _ChunkLayout:
    """Views of the scan's tensors in its two layouts (no copies). ``b, L, H, P, G, n, Q`` as in ``ssd_chunked``;
    c = L / Q chunks, hg = H / G heads per group.

    - head-major ``[b, G, hg, c, Q, .]`` for what differs per head (decays, the intra-chunk part);
    - token-major ``[b, G, c, Q, hg * P]`` where B or C (shared by a group's heads) multiply, so those products are
      wide matmuls over all heads of a group at once and B, C are never copied once per head."""

    def __init__(self, b, L, H, P, G, n, Q):
        self.b, self.c, self.Q, self.G, self.hg, self.P, self.n = b, L // Q, Q, G, H // G, P, n

    def heads(self, t):  # [b, L, H, P] -> [b, G, hg, c, Q, P]
        return t.view(self.b, self.c, self.Q, self.G, self.hg, self.P).permute(0, 3, 4, 1, 2, 5)

    def tokens(self, t):  # [b, L, H, P] -> [b, G, c, Q, hg * P]
        return t.view(self.b, self.c, self.Q, self.G, self.hg * self.P).permute(0, 3, 1, 2, 4)

    def groups(self, t):  # [b, L, G, n] -> [b, G, c, Q, n]
        return t.reshape(self.b, self.c, self.Q, self.G, self.n).permute(0, 3, 1, 2, 4)

    def per_token(self, s):  # a per-head scalar [b, G, hg, c, Q] -> [b, G, c, Q, hg, 1], to scale token-major rows
        return s.permute(0, 1, 3, 4, 2)[..., None]

    def scale_tokens(self, t, s):  # token-major t [b, G, c, Q, hg * P] times per-head s [b, G, hg, c, Q]
        return (t.unflatten(-1, (self.hg, self.P)) * self.per_token(s)).flatten(-2)

    def scale_tokens_into(self, out, t, s):  # the same into ``out`` (contiguous, t's shape)
        torch.mul(t.unflatten(-1, (self.hg, self.P)), self.per_token(s), out=out.unflatten(-1, (self.hg, self.P)))
        return out

    def scale_tokens_(self, t, s):  # the same in place (t contiguous)
        t.unflatten(-1, (self.hg, self.P)).mul_(self.per_token(s))
        return t

    def head_sum(self, t):  # token-major [b, G, c, Q, hg * P] -> summed over P, head-major [b, G, hg, c, Q]
        return t.unflatten(-1, (self.hg, self.P)).sum(-1).permute(0, 1, 4, 2, 3)

    def to_tokens(self, t):  # token-major [b, G, c, Q, hg * P] -> [b, L, H, P] (contiguous)
        return t.permute(0, 2, 3, 1, 4).reshape(self.b, self.c * self.Q, self.G * self.hg, self.P)

    def from_groups(self, t):  # [b, G, c, Q, n] -> [b, L, G, n]
        return t.permute(0, 2, 3, 1, 4).reshape(self.b, self.c * self.Q, self.G, self.n)


def _decay_blocks(a_cum: torch.Tensor) -> torch.Tensor:
    """M_ls = exp(a_l - a_s) inside each chunk: [..., Q] -> [..., Q, Q] (a_cum spans one chunk only, so the difference
    is accurate). Valid for s <= l; above the diagonal M is 1, and callers multiply by the lower-triangular C B^T.
    The exponent is clamped to [-80, 0]: a is non-increasing (dt >= 0, A < 0), so only the entries above the diagonal
    are raised, and exp(-80) ~ 2e-35 stands in for smaller decays because exp's underflow path is 4-10x slower on
    CPU than its normal one (a masked -inf costs the same)."""
    return (a_cum[..., :, None] - a_cum[..., None, :]).clamp_(-80.0, 0.0).exp_()


def _lower(Q: int, like: torch.Tensor) -> torch.Tensor:
    """[Q, Q] lower-triangular ones (s <= l)."""
    return torch.ones(Q, Q, dtype=like.dtype, device=like.device).tril_()


def _masked_cb(Bc: torch.Tensor, Cc: torch.Tensor) -> torch.Tensor:
    """(C_l . B_s) for s <= l, else 0, per chunk and group: [b, G, c, Q, n] -> [b, G, 1, c, Q, Q] (shared by the
    group's heads)."""
    return (Cc @ Bc.transpose(-1, -2)).mul_(_lower(Bc.shape[-2], Bc)).unsqueeze(2)


# Intra-chunk [Q, Q] blocks are built for a slab of chunks at a time, about this many elements (512 KiB in fp32): small
# enough to stay in a core's L2 cache across the few passes over them, and not one large allocation per pass.
SLAB_ELEMENTS = 1 << 17


class SSDChunkScan(torch.autograd.Function):
    """The chunked SSD scan with its own chunked backward (formulas in the module docstring), plus the D skip.

    Inputs: ``x`` [b, L, H, P], ``dt`` [b, L, H], ``a_cum`` [b, G, hg, c, Q] (the within-chunk cumulative sum of
    dt * A), ``B, C`` [b, L, G, n], ``D`` [H] or None; L a multiple of ``Q``; output y + D x [b, L, H, P]. The products
    xd = dt x and D x and their gradients (dx = dt dxd + D dy, d dt = sum_P x dxd, dD = sum x dy) are done here, so
    autograd keeps no extra full-size tensors for them. Saves the inputs, xd, the output and the chunk boundary states
    [b, G, c + 1, n, hg * P] (n P / Q^2 times the size of all the intra-chunk blocks: the same size at the defaults);
    the [Q, Q] decay blocks are recomputed in the backward, a slab of chunks at a time."""

    @staticmethod
    def forward(ctx, x, dt, a_cum, B, C, D, Q: int):
        b, L, H, P = x.shape
        G, n = B.shape[-2:]
        lay = _ChunkLayout(b, L, H, P, G, n, Q)
        xd = (x * dt[..., None]).contiguous()
        Bc, Cc = lay.groups(B), lay.groups(C)
        # 2. each chunk's own end state (from zero), S_k = sum_s B_s^T exp(a_last - a_s) xd_s, stored at index k + 1
        #    of ``bounds`` [b, G, c + 1, n, hg * P]; 3. carried in place: bounds[k] = E_k, the state entering chunk k
        bounds = xd.new_empty(b, G, lay.c + 1, n, lay.hg * P)
        bounds[:, :, 0] = 0
        y = torch.empty_like(lay.tokens(xd), memory_format=torch.contiguous_format)  # [b, G, c, Q, hg * P]
        lay.scale_tokens_into(y, lay.tokens(xd), torch.exp(a_cum[..., -1:] - a_cum))
        torch.matmul(Bc.transpose(-1, -2), y, out=bounds[:, :, 1:])
        decayed_cumsum_(bounds[:, :, 1:], _chunk_decay(a_cum, P)[..., None, :], dim=2)
        # 4. read the entering state out inside each chunk: exp(a_l) C_l . E_k, into the same buffer (a fresh
        #    activation-sized tensor costs more in page faults than the product that fills it)
        torch.matmul(Cc, bounds[:, :, :-1], out=y)
        lay.scale_tokens_(y, torch.exp(a_cum))
        # 1. plus within chunks: y_l += sum_{s <= l} W_ls xd_s with W = M * (C B^T)
        cb, xh, yv = _masked_cb(Bc, Cc), lay.heads(xd), y.unflatten(-1, (lay.hg, P))
        for k in _slabs(lay):
            w = _decay_blocks(a_cum[:, :, :, k]).mul_(cb[:, :, :, k])  # [b, G, hg, slab, Q, Q]
            yv[:, :, k] += (w @ xh[:, :, :, k]).permute(0, 1, 3, 4, 2, 5)
        y = lay.to_tokens(y)
        if D is not None:
            y.addcmul_(x, D[:, None])
        ctx.save_for_backward(x, dt, xd, a_cum, B, C, D, bounds, y)
        ctx.Q = Q
        return y

    @staticmethod
    def backward(ctx, dy):
        x, dt, xd, a_cum, B, C, D, bounds, y = ctx.saved_tensors
        b, L, H, P = xd.shape
        G, n = B.shape[-2:]
        lay = _ChunkLayout(b, L, H, P, G, n, ctx.Q)
        dy = dy.contiguous()
        Bc, Cc = lay.groups(B), lay.groups(C)
        # 4. read-out: dC_l = (exp(a_l) dy_l) E_k^T;  dE_k = sum_l C_l^T exp(a_l) dy_l, wanted for k >= 1 (E_0 = 0)
        dy_scaled = torch.empty_like(lay.tokens(xd), memory_format=torch.contiguous_format)  # reused below
        lay.scale_tokens_into(dy_scaled, lay.tokens(dy), torch.exp(a_cum))
        dC = dy_scaled @ bounds[:, :, :-1].transpose(-1, -2)  # [b, G, c, Q, n]
        # 3. reversed carry, in place: d_states[k] = dS_k = G_{k+1}, with G_k = dE_k + g_k G_{k+1} and G_c = 0
        d_states = xd.new_empty(b, G, lay.c, n, lay.hg * P)
        d_states[:, :, -1] = 0
        torch.matmul(Cc[:, :, 1:].transpose(-1, -2), dy_scaled[:, :, 1:], out=d_states[:, :, :-1])
        decay = _chunk_decay(a_cum, P)[..., None, :]
        decayed_cumsum_(d_states, torch.cat([decay[:, :, 1:], decay[:, :, -1:]], dim=2), dim=2, reverse=True)
        # 2. end states: d(e_s xd_s) = B_s dS_k,  dB_s = dS_k (e_s xd_s)^T,  with e_s = exp(a_last - a_s)
        to_end = torch.exp(a_cum[..., -1:] - a_cum)
        xd_end = lay.scale_tokens_into(dy_scaled, lay.tokens(xd), to_end)  # dy_scaled is no longer needed
        dB = xd_end @ d_states.transpose(-1, -2)  # [b, G, c, Q, n]
        del dy_scaled, xd_end
        dxd = lay.scale_tokens_(Bc @ d_states, to_end)  # token-major [b, G, c, Q, hg * P]
        # d a_last^k gets sum_{n,P} dS_k * E_{k+1} (carry and end state together)
        ends = d_states.mul_(bounds[:, :, 1:]).sum(-2)  # [b, G, c, hg * P]
        del d_states
        # 1. intra-chunk, W = M * (C B^T) recomputed per slab: dxd += W^T dy;  d(C B^T) = sum_heads (dy xd^T) * M
        cb, xh, dyh, dxv = _masked_cb(Bc, Cc), lay.heads(xd), lay.heads(dy), dxd.unflatten(-1, (lay.hg, P))
        d_cb = xd.new_empty(b, G, lay.c, ctx.Q, ctx.Q)
        for k in _slabs(lay):
            m = _decay_blocks(a_cum[:, :, :, k])  # [b, G, hg, slab, Q, Q]
            w = m * cb[:, :, :, k]
            dy_k, x_k = dyh[:, :, :, k].contiguous(), xh[:, :, :, k].contiguous()
            dxv[:, :, k] += (w.transpose(-1, -2) @ dy_k).permute(0, 1, 3, 4, 2, 5)
            torch.sum(torch.matmul(dy_k, x_k.transpose(-1, -2), out=w).mul_(m), 2, out=d_cb[:, :, k])
        d_cb.mul_(_lower(ctx.Q, d_cb))  # M is 1 above the diagonal (see _decay_blocks)
        dC += d_cb @ Bc
        dB += d_cb.transpose(-1, -2) @ Cc
        dxd = lay.to_tokens(dxd)  # [b, L, H, P]
        # d a_cum = sum_P (dy_l y_l - xd_l dxd_l) at every token (y without the D skip), + the end-state term at each
        # chunk's last token; sum_P xd dxd = dt * d dt, and y = y_scan + D x
        ddt = _dot_last(dxd, x)  # [b, L, H]
        da = _dot_last(dy, y).sub_(ddt * dt)
        dD = None
        if D is not None:
            dyx = _dot_last(dy, x)
            da.sub_(dyx * D)
            dD = dyx.sum((0, 1))
        dx = dxd.mul_(dt[..., None])
        if D is not None:
            dx.addcmul_(dy, D[:, None])
        da = da.view(b, lay.c, ctx.Q, G, lay.hg).permute(0, 3, 4, 1, 2)  # [b, G, hg, c, Q]
        da[..., -1] += ends.unflatten(-1, (lay.hg, P)).sum(-1).permute(0, 1, 3, 2)
        return dx, ddt, da, lay.from_groups(dB), lay.from_groups(dC), dD, None


def _dot_last(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over the last axis of a * b, as a batched product (torch.linalg.vecdot allocates the full product first)."""
    return torch.einsum("...p,...p->...", a, b)


def _slabs(lay: _ChunkLayout) -> list[slice]:
    """Consecutive ranges of chunks whose [b, G, hg, slab, Q, Q] blocks hold about SLAB_ELEMENTS values."""
    step = max(1, SLAB_ELEMENTS // (lay.b * lay.G * lay.hg * lay.Q * lay.Q))
    return [slice(k, min(k + step, lay.c)) for k in range(0, lay.c, step)]


def _chunk_decay(a_cum: torch.Tensor, P: int) -> torch.Tensor:
    """Each head's whole-chunk decay g = exp(a_last), spread over its P channels: [b, G, hg, c, Q] -> [b, G, c,
    hg * P]."""
    return torch.exp(a_cum[..., -1]).permute(0, 1, 3, 2).repeat_interleave(P, dim=-1)


def ssd_chunked(x, dt, A, B, C, chunk_size: int, D=None):
    """Chunked SSD scan; same result as ``ssd_reference`` (see the module docstring), plus D x when ``D`` [H] is given
    (the block's skip). The within-chunk cumulative sum of dt * A is left to autograd; the scan itself is
    ``SSDChunkScan``."""
    b, L, H, P = x.shape
    G = B.shape[-2]
    Q = chunk_size
    pad = (-L) % Q
    if pad:  # zero dt and inputs at the end: later tokens never affect earlier outputs
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c = (L + pad) // Q
    a_cum = (dt * A).reshape(b, c, Q, G, H // G).permute(0, 3, 4, 1, 2).cumsum(-1)  # [b, G, hg, c, Q]
    y = SSDChunkScan.apply(x, dt, a_cum, B, C, D, Q)
    return y[:, :L]


class GatedRMSNormFunction(torch.autograd.Function):
    """``GatedRMSNorm``'s fused path: out = rms_norm_groups(y * silu(z)) * weight, with its own backward.

    With g = y silu(z), r = (mean_group g^2 + eps)^(-1/2) per token and group, and t = dout * weight:

        dg = r t - g r^3 mean_group(g t),   dy = dg silu(z),   dz = dg y silu'(z),   dweight = sum_tokens dout g r

    Saves y, z, g and r (silu(z) is recomputed in the backward, into dy's buffer). Every activation-sized temporary
    is a fresh allocation, which on CPU costs more (page faults) than the arithmetic that fills it, so the sums run as
    batched products and products run in place."""

    @staticmethod
    def forward(ctx, y, z, weight, group_size: int, eps: float):
        g = F.silu(z).mul_(y)
        gv = g.unflatten(-1, (-1, group_size))
        r = torch.einsum("...c,...c->...", gv, gv).div_(group_size).add_(eps).rsqrt_()  # [..., G]
        out = (gv * r[..., None]).flatten(-2).mul_(weight)
        ctx.save_for_backward(y, z, g, r, weight)
        ctx.group_size = group_size
        return out

    @staticmethod
    def backward(ctx, dout):
        y, z, g, r, weight = ctx.saved_tensors
        gs = ctx.group_size
        gv = g.unflatten(-1, (-1, gs))
        buf = torch.empty_like(g)  # dout * g, then t = dout * weight, then dg, in one buffer
        dweight = None
        if ctx.needs_input_grad[2]:
            dog = torch.mul(dout, g, out=buf).unflatten(-1, (-1, gs))
            dweight = torch.einsum("...g,...gc->gc", r, dog).flatten()
        tv = torch.mul(dout, weight, out=buf).unflatten(-1, (-1, gs))
        coef = torch.einsum("...c,...c->...", gv, tv).mul_(r.pow(3)).div_(-gs)  # -r^3 mean_group(g t)
        dg = tv.mul_(r[..., None]).addcmul_(gv, coef[..., None]).flatten(-2)
        dy = F.silu(z).mul_(dg) if ctx.needs_input_grad[0] else None
        dz = torch.ops.aten.silu_backward(dg.mul_(y), z) if ctx.needs_input_grad[1] else None
        return dy, dz, dweight, None, None


class GatedRMSNorm(nn.Module):
    """mamba_ssm ``RMSNormGated`` with norm_before_gate=False: RMS-normalise ``y * silu(z)`` in groups, times weight.
    ``fused=True`` runs ``GatedRMSNormFunction`` (same numbers, fewer passes over the activations); the default is
    the plain formula with autograd."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        if dim % group_size != 0:
            raise ValueError(f"group_size={group_size} must divide dim={dim}")
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if fused:
            return GatedRMSNormFunction.apply(y, z, self.weight.to(y.dtype), self.group_size, self.eps)
        g = (y * F.silu(z)).unflatten(-1, (-1, self.group_size))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return g.flatten(-2) * self.weight


@register("mamba2", slot="attn", description="Mamba-2 (mamba_ssm names/defaults; d_state 64, headdim 16), causal scan")
class Mamba2(nn.Module):
    def __init__(self, dim: int, heads: int = 1, grid: tuple[int, int] = (0, 0), d_state: int = 64, d_conv: int = 4,
                 expand: int = 2, headdim: int = 16, ngroups: int = 1, chunk_size: int = 32,
                 direction: str = "causal", impl: str = "fast", A_init_range: tuple[float, float] = (1.0, 16.0),
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        check_choice("direction", direction, DIRECTIONS)
        check_choice("impl", impl, IMPLS)
        d_inner = expand * dim
        for field, value in (("d_state", d_state), ("d_conv", d_conv), ("expand", expand), ("headdim", headdim),
                             ("ngroups", ngroups), ("chunk_size", chunk_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}={value!r} is not allowed: use an int >= 1")
        if d_inner % headdim != 0:
            raise ValueError(f"headdim={headdim} must divide d_inner = expand * dim = {d_inner}")
        nheads = d_inner // headdim
        if nheads % ngroups != 0:
            raise ValueError(f"ngroups={ngroups} must divide the number of heads {nheads} (= d_inner / headdim)")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range={A_init_range} must satisfy 0 < low <= high")
        self.dim, self.grid, self.d_inner, self.d_state, self.d_conv = dim, tuple(grid), d_inner, d_state, d_conv
        self.headdim, self.nheads, self.ngroups, self.chunk_size = headdim, nheads, ngroups, chunk_size
        self.direction, self.impl = direction, impl

        # Same creation order and init as mamba_ssm, so a seed gives the same parameters.
        self.in_proj = nn.Linear(dim, 2 * d_inner + 2 * ngroups * d_state + nheads, bias=False)
        conv_dim = d_inner + 2 * ngroups * d_state
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=True)
        dt = torch.exp(torch.rand(nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.empty(nheads).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(d_inner, group_size=d_inner // ngroups, eps=1e-5)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        if direction == "bidirectional":
            self.conv1d_rev = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=True)

    gpu_kernels = (MAMBA_SSM, CAUSAL_CONV1D)  # the GPU kernels kernel_path may choose

    def paths(self, device, dtype) -> tuple[str, str]:
        """(conv, scan) paths of a call on ``device`` / ``dtype``: conv CAUSAL_CONV1D, "taps" or "reference"; scan
        MAMBA_SSM, "chunked" (``ssd_chunked``) or "reference" (``ssd_reference``)."""
        conv = conv_path(self.impl, self.d_conv, True, device, dtype)
        if self.impl == "reference":
            return conv, "reference"
        return conv, MAMBA_SSM if kernel_ready(MAMBA_SSM, device, dtype) else "chunked"

    def kernel_path(self, device, dtype, tokens: int | None = None) -> str:
        """The paths a call takes, "scan + conv", e.g. "mamba_ssm + causal_conv1d" or "chunked + taps"."""
        conv, scan = self.paths(device, dtype)
        return f"{scan} + {conv}"

    def scan(self, xBC: torch.Tensor, dt: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
        """Conv + SiLU + SSM + D skip on one direction; xBC [b, L, conv_dim], dt [b, L, H] -> [b, L, d_inner]."""
        b, L, _ = xBC.shape
        conv_kind, scan_kind = self.paths(xBC.device, xBC.dtype)
        # the conv's weights are read outside its own forward: cast to the activations' dtype, so that weights stored
        # in another dtype (diffusers' layerwise casting hooks only a layer's own forward) compute in xBC's
        weight, bias = conv.weight[:, 0].to(xBC.dtype), conv.bias.to(xBC.dtype)
        if conv_kind == CAUSAL_CONV1D:
            xBC = causal_conv_tokens(xBC, weight, bias, activation="silu")
        else:
            conv_fn = TapConvTokens.apply if conv_kind == "taps" else reference_conv_tokens
            xBC = F.silu(conv_fn(xBC, weight, bias, self.d_conv - 1))
        gn = self.ngroups * self.d_state
        x, B, C = xBC.split([self.d_inner, gn, gn], dim=-1)
        x = x.unflatten(-1, (self.nheads, self.headdim))
        B = B.unflatten(-1, (self.ngroups, self.d_state))
        C = C.unflatten(-1, (self.ngroups, self.d_state))
        A = -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))  # fp32 at least
        if scan_kind == MAMBA_SSM:
            y = mamba_ssd(x, dt, A, B, C, self.chunk_size)
        elif scan_kind == "chunked":
            return ssd_chunked(x, dt, A, B, C, self.chunk_size, D=self.D.to(x.dtype)).flatten(-2)  # with the D skip
        else:
            y = ssd_reference(x, dt, A, B, C)
        return torch.addcmul(y, x, self.D[:, None]).flatten(-2)  # + D skip

    def forward(self, u: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.d_inner + 2 * self.ngroups * self.d_state,
                                            self.nheads], dim=-1)
        dt = F.softplus(dt + self.dt_bias)
        y = self.scan(xBC, dt, self.conv1d)
        if self.direction == "bidirectional":
            y = y + self.scan(xBC.flip(1), dt.flip(1), self.conv1d_rev).flip(1)
        return self.out_proj(self.norm(y, z, fused=self.impl == "fast"))

    @staticmethod
    def flops(dim: int, heads: int, grid: tuple[int, int], d_state: int = 64, d_conv: int = 4, expand: int = 2,
              headdim: int = 16, ngroups: int = 1, chunk_size: int = 32, direction: str = "causal", **_) -> int:
        """Forward FLOPs of the fast path (multiply-add = 2; padded chunks counted in full)."""
        n_tok = grid_tokens(grid)
        d_inner = expand * dim
        H, P, n, G, Q = d_inner // headdim, headdim, d_state, ngroups, chunk_size
        conv_dim = d_inner + 2 * G * n
        chunks = -(-n_tok // Q)
        L = chunks * Q
        scan = (2 * d_conv * conv_dim * n_tok  # depthwise conv
                + L * d_inner  # dt * x
                + 2 * chunks * Q * Q * G * n  # C B^T per chunk and group
                + H * chunks * Q * Q  # times the decay mask
                + 2 * H * chunks * Q * Q * P  # @ (dt x)
                + H * L * P + 2 * H * L * P * n  # chunk end states
                + 2 * H * chunks * P * n  # carry across chunks (a multiply-add per state value and chunk)
                + 2 * H * L * n * P + 2 * H * L * P  # read-out with C, scaled, added
                + 2 * n_tok * d_inner)  # D skip
        directions = 2 if direction == "bidirectional" else 1
        flops = 2 * n_tok * dim * (2 * d_inner + 2 * G * n + H)  # in_proj
        flops += directions * scan + (directions - 1) * n_tok * d_inner
        flops += 5 * n_tok * d_inner  # gate and RMS norm
        flops += 2 * n_tok * d_inner * dim  # out_proj
        return flops
