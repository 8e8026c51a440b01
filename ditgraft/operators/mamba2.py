"""Mamba-2 token mixer in pure PyTorch, with mamba_ssm's ``Mamba2`` parameter names, shapes, defaults and init.

Block (mamba_ssm ``Mamba2`` with ``rmsnorm=True, norm_before_gate=False, D_has_hdim=False, d_ssm=None``):

    z, xBC, dt = in_proj(u).split([d_inner, d_inner + 2*G*n, H])          # in_proj has no bias
    xBC = silu(causal depthwise conv1d(xBC))     (``conv1d``, bias, k = d_conv)
    x, B, C = xBC.split([d_inner, G*n, G*n]);  dt = softplus(dt + dt_bias);  A = -exp(A_log)
    per head h (head dim P, group g(h) = h // (H/G)), state S_h [P, n]:
        S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T;   y_t = S_t C_t + D_h x_t
    y = RMSNorm_groups(y * silu(z)) * norm.weight   (eps 1e-5, G groups);   out = out_proj(y)   # no bias

``impl="reference"`` runs that recurrence token by token (slow, obviously correct; small N only) and the gated norm as
written above. ``impl="fast"`` is the chunked SSD form (Mamba-2 paper, ``ssd_minimal``): the sequence is zero-padded to
a multiple of ``chunk_size`` Q; inside each chunk the output is a masked "attention" ``(C B^T * decay) @ (dt x)``,
vectorised over all chunks and heads; each chunk's end state is likewise computed for all chunks at once; the states
are then carried across chunk boundaries by a loop over chunks (``carry_states``: one multiply-add of the states per
chunk, 2 * (N/Q) * H*P*n FLOPs instead of the (N/Q)^2 * H*P*n of ``ssd_minimal``'s all-pairs-of-chunks einsum), and
finally read out with C; the gated norm uses the fused ``F.rms_norm``.

Defaults follow the grafting release config (d_state 64, d_conv 4, expand 2, headdim 16) and mamba_ssm (ngroups 1,
A_init_range (1, 16), dt in [1e-3, 0.1] with floor 1e-4, D = 1, conv bias, no projection biases). ``chunk_size``
defaults to 32 here (mamba_ssm: 256); it changes rounding only. On CPU 32 balances the per-head Q x Q intra-chunk
buffers against the (N/Q) x n x d_inner chunk states (measured at N = 4096 and 16384: 32 beats 16 and 64 by 3-8%).

``direction="bidirectional"`` (beyond the paper): a second scan runs over the reversed sequence. It shares in_proj
(so z, dt and the raw x/B/C features), dt_bias, A_log, D, norm and out_proj, and has its own depthwise conv
``conv1d_rev`` (same shape/init as ``conv1d``; applied to the reversed sequence, i.e. anti-causal in the original
order). The two scan outputs (each with its own D skip) are summed before the gated norm. A causal checkpoint loads
with ``strict=False``; the only missing keys are ``conv1d_rev.*``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ditgraft.operators.common import check_choice, fast_conv_tokens, reference_conv_tokens
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


def carry_states(states: torch.Tensor, log_decay: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """Exclusive decayed scan over the chunk axis ``dim``: ``out[i] = sum_{j<i} exp(sum_{r=j+1..i-1} log_decay[r])
    states[j]``, i.e. the state entering chunk i; ``log_decay`` broadcasts against ``states``.

    A loop over the c = N/Q chunks, one fused multiply-add of the states each (c = 512 at N = 16384, Q = 32). On CPU
    this measured 3-3.5x faster than a vectorised blocked scan (decay-matrix matmuls inside blocks of chunks, recursive
    across blocks), whose extra passes over the states cost more than the loop's per-step overhead."""
    decay = torch.exp(log_decay)
    carry = torch.zeros_like(states.select(dim, 0))
    entering = []
    for i in range(states.shape[dim]):
        entering.append(carry)
        carry = torch.addcmul(states.select(dim, i), carry, decay.select(dim, i))
    return torch.stack(entering, dim=dim)


def ssd_chunked(x, dt, A, B, C, chunk_size: int):
    """Chunked SSD scan; same result as ``ssd_reference``, vectorised over chunks and heads (see module docstring)."""
    b, L, H, P = x.shape
    G, n = B.shape[-2:]
    hg, Q = H // G, chunk_size
    pad = (-L) % Q
    if pad:  # zero dt and inputs at the end: later tokens never affect earlier outputs
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c = (L + pad) // Q
    # Two layouts: head-major [b, G, hg, c, Q, ...] for what differs per head (decays, the intra-chunk part), and
    # token-major [b, G, c, Q, hg * P] where B or C (shared by a group's heads) multiply, so those products are wide
    # matmuls over all heads of a group at once and B, C are never copied once per head.
    a_cum = (dt * A).reshape(b, c, Q, G, hg).permute(0, 3, 4, 1, 2).cumsum(-1)  # [b, G, hg, c, Q]
    xd = (x * dt[..., None]).reshape(b, c, Q, G, hg, P)
    xd_heads = xd.permute(0, 3, 4, 1, 2, 5)  # [b, G, hg, c, Q, P]
    xd_tok = xd.permute(0, 3, 1, 2, 4, 5)  # [b, G, c, Q, hg, P]
    Bc = B.reshape(b, c, Q, G, n).permute(0, 3, 1, 2, 4)  # [b, G, c, Q, n]
    Cc = C.reshape(b, c, Q, G, n).permute(0, 3, 1, 2, 4)

    def token_major(t):  # [b, G, hg, c, Q, k] -> [b, G, c, Q, hg, k]
        return t.permute(0, 1, 3, 4, 2, 5)

    # 1. within chunks: y_l = sum_{s <= l} (C_l . B_s) exp(a_cum_l - a_cum_s) dt_s x_s
    #    (a_cum spans one chunk only, so the difference is accurate). The [.., Q, Q] per-head buffer is the largest
    #    here: mask, exp and (without autograd, which needs exp's output) the C B^T product are done in place.
    upper = torch.ones(Q, Q, dtype=torch.bool, device=x.device).triu(1)
    w = (a_cum[..., :, None] - a_cum[..., None, :]).masked_fill_(upper, float("-inf")).exp_()
    cb = (Cc @ Bc.transpose(-1, -2)).unsqueeze(2)  # [b, G, 1, c, Q, Q]: shared by a group's heads
    w = w * cb if w.requires_grad or cb.requires_grad else w.mul_(cb)
    y_diag = w @ xd_heads  # [b, G, hg, c, Q, P]

    # 2. each chunk's own end state (from zero): sum_s B_s^T exp(a_cum_last - a_cum_s) dt_s x_s -> [b, G, c, n, hg*P]
    to_end = token_major(torch.exp(a_cum[..., -1:] - a_cum)[..., None])  # [b, G, c, Q, hg, 1]
    states = Bc.transpose(-1, -2) @ (xd_tok * to_end).flatten(-2)

    # 3. state entering each chunk, carried across chunk boundaries with each head's whole-chunk decay
    chunk_decay = a_cum[..., -1].permute(0, 1, 3, 2).repeat_interleave(P, dim=-1)  # [b, G, c, hg*P]
    entering = carry_states(states, chunk_decay[..., None, :], dim=2)  # [b, G, c, n, hg*P]

    # 4. read the entering state out inside each chunk: exp(a_cum_l) C_l . S, then add the intra-chunk part
    y = (Cc @ entering).unflatten(-1, (hg, P)) * token_major(torch.exp(a_cum)[..., None])  # [b, G, c, Q, hg, P]
    y = y.add_(token_major(y_diag))  # in place on a product's output: autograd-safe
    return y.permute(0, 2, 3, 1, 4, 5).reshape(b, c * Q, H, P)[:, :L]


class GatedRMSNorm(nn.Module):
    """mamba_ssm ``RMSNormGated`` with norm_before_gate=False: RMS-normalise ``y * silu(z)`` in groups, times weight."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        if dim % group_size != 0:
            raise ValueError(f"group_size={group_size} must divide dim={dim}")
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor, fused: bool = False) -> torch.Tensor:
        y = y * F.silu(z)
        g = y.unflatten(-1, (-1, self.group_size))
        if fused:
            g = F.rms_norm(g, (self.group_size,), eps=self.eps)
        else:
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

    def scan(self, xBC: torch.Tensor, dt: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
        """Conv + SiLU + SSM + D skip on one direction; xBC [b, L, conv_dim], dt [b, L, H] -> [b, L, d_inner]."""
        b, L, _ = xBC.shape
        conv_fn = fast_conv_tokens if self.impl == "fast" else reference_conv_tokens
        xBC = F.silu(conv_fn(xBC, conv.weight[:, 0], conv.bias, left=self.d_conv - 1))
        gn = self.ngroups * self.d_state
        x, B, C = xBC.split([self.d_inner, gn, gn], dim=-1)
        x = x.unflatten(-1, (self.nheads, self.headdim))
        B = B.unflatten(-1, (self.ngroups, self.d_state))
        C = C.unflatten(-1, (self.ngroups, self.d_state))
        A = -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))  # fp32 at least
        if self.impl == "fast":
            y = ssd_chunked(x, dt, A, B, C, self.chunk_size)
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
        n_tok = grid[0] * grid[1]
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
