"""Mamba-2: chunked SSD vs token-by-token recurrence vs the explicit matrix form; the whole block fast vs reference
(outputs and every gradient), mamba_ssm names/counts/init, causality, bidirectional variant."""
import math

import pytest
import torch
import torch.nn.functional as F

from ditgraft.operators.common import TapConvTokens, reference_conv_tokens
from ditgraft.operators.mamba2 import (GatedRMSNorm, GatedRMSNormFunction, SSDChunkScan, decayed_cumsum_, ssd_chunked,
                                      ssd_reference)
from ditgraft.operators.registry import build_operator, get_spec, operator_flops

TOL = 3e-5  # fp32 (fp64 depthwise convs are ~1000x slower on CPU torch); real bugs give O(1) errors


def assert_close_scaled(a, b, tol, what=""):
    """max |a - b| <= tol * max |b| (fp32 rounding scales with the tensor's magnitude)."""
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= tol * max(scale, 1e-6), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def ssd_inputs(b=2, L=23, H=4, P=3, G=2, n=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, H, P, generator=g, dtype=dtype)
    dt = F.softplus(torch.randn(b, L, H, generator=g, dtype=dtype))  # large steps: strong decay inside a chunk
    A = -torch.rand(H, generator=g, dtype=dtype) * 3 - 0.1
    B = torch.randn(b, L, G, n, generator=g, dtype=dtype)
    C = torch.randn(b, L, G, n, generator=g, dtype=dtype)
    return x, dt, A, B, C


# ----------------------------------------------------------------------------------------------- the scan itself
def test_reference_scan_matches_explicit_matrix_form():
    """y_t = sum_{s<=t} (C_t . B_s) exp(A sum_{r=s+1..t} dt_r) dt_s x_s, head h reading group h // (H/G)."""
    x, dt, A, B, C = ssd_inputs(L=9)
    H, G = x.shape[2], B.shape[2]
    group = torch.arange(H) // (H // G)
    cb = torch.einsum("btgn,bsgn->btsg", C, B)[..., group]  # [b, t, s, H]
    cs = dt.cumsum(1)
    decay = torch.exp(A * (cs[:, :, None] - cs[:, None, :]))  # exp(A sum_{r=s+1..t} dt_r)
    mask = torch.ones(9, 9, dtype=torch.bool).tril()[None, :, :, None]
    M = torch.where(mask, cb * decay * dt[:, None], 0)
    torch.testing.assert_close(ssd_reference(x, dt, A, B, C), torch.einsum("btsh,bshp->bthp", M, x))


@pytest.mark.parametrize("chunk,L", [(1, 23), (4, 23), (7, 23), (23, 23), (64, 23), (1, 300), (3, 200)])
def test_chunked_scan_matches_recurrence(chunk, L):
    """Includes one chunk, a partial last chunk, and hundreds of chunks carried across."""
    inputs = ssd_inputs(L=L)
    torch.testing.assert_close(ssd_chunked(*inputs, chunk_size=chunk), ssd_reference(*inputs))


@pytest.mark.parametrize("c", [1, 2, 7])
@pytest.mark.parametrize("reverse", [False, True])
def test_decayed_cumsum_matches_closed_form(c, reverse):
    """out[i] = sum_{j<=i} exp(sum_{r=j+1..i} ld[r]) t[j]; reversed: sum_{j>=i} exp(sum_{r=i..j-1} ld[r]) t[j]
    (per feature, decays broadcast over rows), in place."""
    g = torch.Generator().manual_seed(c)
    states = torch.randn(2, 3, c, 5, generator=g, dtype=torch.float64)
    ld = -torch.rand(2, 1, c, 5, generator=g, dtype=torch.float64) * 2
    want = torch.zeros_like(states)
    for i in range(c):
        for j in (range(i, c) if reverse else range(i + 1)):
            span = ld[..., i:j, :] if reverse else ld[..., j + 1:i + 1, :]
            want[..., i, :] += torch.exp(span.sum(-2)) * states[..., j, :]
    out = decayed_cumsum_(states, torch.exp(ld), reverse=reverse)
    assert out is states
    torch.testing.assert_close(out, want)


def test_chunked_scan_without_autograd_matches_recurrence():
    """Without autograd the intra-chunk product runs in place; same result."""
    inputs = ssd_inputs(L=50, seed=4)
    with torch.inference_mode():
        torch.testing.assert_close(ssd_chunked(*inputs, chunk_size=8), ssd_reference(*inputs))


def test_chunked_scan_gradients_match_recurrence():
    inputs = [t.requires_grad_() for t in ssd_inputs(L=40, seed=1)]
    w = torch.randn(2, 40, 4, 3, dtype=torch.float64)
    g1 = torch.autograd.grad((ssd_chunked(*inputs, chunk_size=2) * w).sum(), inputs)  # 20 chunks carried across
    g2 = torch.autograd.grad((ssd_reference(*inputs) * w).sum(), inputs)
    for a, b, name in zip(g1, g2, "x dt A B C".split()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("b,L,H,P,G,n,chunk", [
    (1, 3, 1, 1, 1, 1, 4),  # shorter than one chunk
    (2, 23, 4, 3, 2, 5, 7),  # partial last chunk, two groups
    (1, 64, 6, 2, 3, 4, 16),  # exact multiple, three groups
    (2, 37, 4, 3, 1, 6, 1),  # one token per chunk: everything goes through the carry
    (1, 40, 8, 2, 2, 3, 8),
])
@pytest.mark.parametrize("decay_scale", [1.0, 5.0])
def test_chunked_scan_every_gradient_matches_recurrence(b, L, H, P, G, n, chunk, decay_scale):
    """float64; decay_scale 5 drives the within-chunk log-decay far below the -80 floor of the decay blocks."""
    x, dt, A, B, C = ssd_inputs(b=b, L=L, H=H, P=P, G=G, n=n, seed=L)
    inputs = [t.requires_grad_() for t in (x, dt * decay_scale, A, B, C)]
    w = torch.randn(b, L, H, P, dtype=torch.float64)
    y1 = ssd_chunked(*inputs, chunk_size=chunk)
    y2 = ssd_reference(*inputs)
    torch.testing.assert_close(y1, y2)
    g1 = torch.autograd.grad((y1 * w).sum(), inputs)
    g2 = torch.autograd.grad((y2 * w).sum(), inputs)
    for a, ref, name in zip(g1, g2, "x dt A B C".split()):
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(a, ref, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("with_d", [True, False])
def test_scan_function_passes_gradcheck(with_d):
    """SSDChunkScan's hand-written backward against finite differences (float64, decays away from the clamp), with
    and without the D skip; dt and a_cum are independent inputs here (the block derives a_cum from dt)."""
    b, L, H, P, G, n, Q = 1, 12, 4, 2, 2, 3, 4
    g = torch.Generator().manual_seed(7)
    x = torch.randn(b, L, H, P, generator=g, dtype=torch.float64)
    dt = torch.rand(b, L, H, generator=g, dtype=torch.float64) + 0.1
    step = -torch.rand(b, G, H // G, L // Q, Q, generator=g, dtype=torch.float64) - 0.05
    a_cum = step.cumsum(-1)
    B = torch.randn(b, L, G, n, generator=g, dtype=torch.float64)
    C = torch.randn(b, L, G, n, generator=g, dtype=torch.float64)
    D = torch.randn(H, generator=g, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, dt, a_cum, B, C) + ((D,) if with_d else ()))
    if with_d:
        assert torch.autograd.gradcheck(lambda *t: SSDChunkScan.apply(*t, Q), inputs)
    else:
        assert torch.autograd.gradcheck(lambda *t: SSDChunkScan.apply(*t, None, Q), inputs)


def test_chunked_scan_d_skip_adds_d_times_x():
    x, dt, A, B, C = ssd_inputs(L=13)
    D = torch.randn(x.shape[2], dtype=x.dtype)
    torch.testing.assert_close(ssd_chunked(x, dt, A, B, C, 4, D=D),
                               ssd_reference(x, dt, A, B, C) + x * D[:, None])


@pytest.mark.parametrize("left", [0, 1, 3])
def test_tap_conv_matches_reference_conv_and_gradcheck(left):
    """Causal (left = T-1, Mamba-2's), centred and anti-causal taps; output and gradients."""
    g = torch.Generator().manual_seed(left)
    x = torch.randn(2, 9, 5, generator=g, dtype=torch.float64)[..., :4].requires_grad_()  # strided, like a split
    weight = torch.randn(4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(TapConvTokens.apply(x, weight, bias, left), reference_conv_tokens(x, weight, bias, left))
    assert torch.autograd.gradcheck(lambda *t: TapConvTokens.apply(*t, left), (x, weight, bias))


def test_chunked_scan_long_sequence_is_stable():
    x, dt, A, B, C = ssd_inputs(b=1, L=300, seed=2)
    y = ssd_chunked(x, dt * 5, A, B, C, chunk_size=64)  # cumulative log-decay reaches ~ -1e4 within a chunk
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ssd_reference(x, dt * 5, A, B, C))


# ----------------------------------------------------------------------------------------------- the block
def randomise(op, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in op.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        op.dt_bias.add_(1.0)  # dt ~ softplus(1 + noise): decays well away from 1
    return op


def run(op, x, impl):
    op.impl = impl
    x = x.detach().clone().requires_grad_()
    op.zero_grad()
    y = op(x)
    (y * torch.cos(torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape))).sum().backward()
    return y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in op.named_parameters()}


SMALL = dict(d_state=8, headdim=4, expand=2)


@pytest.mark.parametrize("direction", ["causal", "bidirectional"])
@pytest.mark.parametrize("grid,chunk,ngroups", [((5, 7), 8, 1), ((3, 16), 16, 2), ((4, 4), 64, 1), ((3, 5), 4, 4)])
def test_block_fast_matches_reference(direction, grid, chunk, ngroups):
    torch.manual_seed(3)
    op = randomise(build_operator("mamba2", 16, 2, grid, chunk_size=chunk, ngroups=ngroups, direction=direction,
                                  **SMALL))
    x = torch.randn(2, grid[0] * grid[1], 16)
    y1, gx1, gp1 = run(op, x, "fast")
    y2, gx2, gp2 = run(op, x, "reference")
    assert_close_scaled(y1, y2, TOL, "output")
    assert_close_scaled(gx1, gx2, TOL, "input grad")
    assert gp1.keys() == gp2.keys() and len(gp1) == (10 if direction == "bidirectional" else 8)
    for name in gp1:
        assert gp2[name].abs().max() > 0, name
        assert_close_scaled(gp1[name], gp2[name], TOL, name)


def test_block_at_default_init_fast_matches_reference():
    torch.manual_seed(4)
    op = build_operator("mamba2", 32, 2, (5, 7), headdim=16, d_state=16, chunk_size=8)
    x = torch.randn(2, 35, 32)
    assert_close_scaled(run(op, x, "fast")[0], run(op, x, "reference")[0], TOL)


def test_chunk_size_changes_rounding_only():
    torch.manual_seed(5)
    op = randomise(build_operator("mamba2", 16, 2, (5, 7), chunk_size=3, **SMALL))
    x = torch.randn(2, 35, 16)
    y3 = op(x)
    op.chunk_size = 64
    assert_close_scaled(y3, op(x), TOL)


def test_d_skip_adds_d_times_conv_output():
    """y_t = C_t S_t + D_h x_t with x_t the post-conv, post-SiLU features (not scaled by dt)."""
    torch.manual_seed(11)
    op = randomise(build_operator("mamba2", 16, 2, (3, 5), **SMALL))
    xBC, dt = torch.randn(2, 15, 32 + 16), F.softplus(torch.randn(2, 15, 8))
    with torch.no_grad():
        op.D.zero_()
        y0 = op.scan(xBC, dt, op.conv1d)
        op.D.copy_(torch.arange(8.0))
        y1 = op.scan(xBC, dt, op.conv1d)
    x = F.silu(F.conv1d(xBC.transpose(1, 2), op.conv1d.weight, op.conv1d.bias, padding=3, groups=48)[..., :15])
    x = x.transpose(1, 2)[..., :32].unflatten(-1, (8, 4))
    assert_close_scaled(y1 - y0, (x * torch.arange(8.0)[:, None]).flatten(-2), TOL)


def test_gated_norm_matches_mamba_ssm_formula():
    """rmsnorm_fn(y, z, norm_before_gate=False, group_size=d/G): normalise y*silu(z) per group, times weight."""
    torch.manual_seed(6)
    op = randomise(build_operator("mamba2", 16, 2, (2, 2), ngroups=2, **SMALL))
    y, z = torch.randn(3, 32), torch.randn(3, 32)
    g = (y * F.silu(z)).reshape(3, 2, 16)
    want = (g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(3, 32) * op.norm.weight
    torch.testing.assert_close(op.norm(y, z), want)


@pytest.mark.parametrize("groups", [1, 2])
def test_fused_gated_norm_matches_formula_and_gradcheck(groups):
    """GatedRMSNormFunction (the fast path's norm): output and gradients of y, z and weight, in float64."""
    g = torch.Generator().manual_seed(groups)
    y, z = (torch.randn(2, 3, 8, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.randn(8, generator=g, dtype=torch.float64)
    norm = GatedRMSNorm(8, 8 // groups).double()
    with torch.no_grad():
        norm.weight.copy_(w)
    torch.testing.assert_close(norm(y, z, fused=True), norm(y, z, fused=False))
    inputs = tuple(t.clone().requires_grad_() for t in (y, z, w))
    assert torch.autograd.gradcheck(lambda *t: GatedRMSNormFunction.apply(*t, 8 // groups, 1e-5), inputs)


# ----------------------------------------------------------------------------------------------- mamba_ssm fidelity
MAMBA_KEYS = {"in_proj.weight": (4880, 1152), "conv1d.weight": (2432, 1, 4), "conv1d.bias": (2432,),
              "dt_bias": (144,), "A_log": (144,), "D": (144,), "norm.weight": (2304,), "out_proj.weight": (1152, 2304)}


def test_param_count_names_and_init_at_dit_xl():
    torch.manual_seed(7)
    op = build_operator("mamba2", 1152, 16, (16, 16))
    assert get_spec("mamba2").slot == "attn"
    assert sum(p.numel() for p in op.parameters()) == 8_290_864
    assert {k: tuple(v.shape) for k, v in op.state_dict().items()} == MAMBA_KEYS
    A = torch.exp(op.A_log.detach())
    assert A.min() >= 1 and A.max() <= 16 and A.std() > 1
    dt = F.softplus(op.dt_bias.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert math.log(dt.max() / dt.min()) > 3  # log-uniform over [1e-3, 0.1]
    assert op.D.eq(1).all() and op.norm.weight.eq(1).all()
    assert op.nheads == 144 and op.d_inner == 2304


def test_bidirectional_adds_only_a_reverse_conv():
    torch.manual_seed(8)
    causal = build_operator("mamba2", 16, 2, (3, 5), **SMALL)
    bi = build_operator("mamba2", 16, 2, (3, 5), direction="bidirectional", **SMALL)
    missing = bi.load_state_dict(causal.state_dict(), strict=False).missing_keys
    assert set(missing) == {"conv1d_rev.weight", "conv1d_rev.bias"}
    assert bi.conv1d_rev.weight.shape == bi.conv1d.weight.shape


# ----------------------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_causal_block_ignores_future_tokens(impl):
    torch.manual_seed(9)
    op = randomise(build_operator("mamba2", 16, 2, (5, 7), chunk_size=8, impl=impl, **SMALL))
    x = torch.randn(2, 35, 16)
    y = op(x)
    for t in (0, 7, 8, 20, 33):
        x2 = x.clone()
        x2[:, t + 1:] += torch.randn_like(x2[:, t + 1:])
        y2 = op(x2)
        torch.testing.assert_close(y[:, :t + 1], y2[:, :t + 1])
        assert not torch.allclose(y[:, t + 1:], y2[:, t + 1:])


def test_bidirectional_block_sees_both_sides():
    torch.manual_seed(10)
    op = randomise(build_operator("mamba2", 16, 2, (5, 7), chunk_size=8, direction="bidirectional", **SMALL))
    x = torch.randn(1, 35, 16)
    for sl, other in ((slice(20, None), slice(None, 20)), (slice(None, 10), slice(10, None))):
        x2 = x.clone()
        x2[:, sl] += 1.0
        assert not torch.allclose(op(x)[:, other], op(x2)[:, other])


# ----------------------------------------------------------------------------------------------- errors and FLOPs
def test_errors_name_field_value_and_allowed():
    with pytest.raises(ValueError, match="direction='2d'"):
        build_operator("mamba2", 16, 2, (2, 2), direction="2d")
    with pytest.raises(ValueError, match="headdim=5"):
        build_operator("mamba2", 16, 2, (2, 2), headdim=5)
    with pytest.raises(ValueError, match="ngroups=3"):
        build_operator("mamba2", 16, 2, (2, 2), headdim=4, ngroups=3)
    with pytest.raises(ValueError, match="chunk_size=0"):
        build_operator("mamba2", 16, 2, (2, 2), chunk_size=0)


def test_flops():
    D, n = 1152, 256
    f = operator_flops("mamba2", D, 16, (16, 16))
    proj = 2 * n * D * 4880 + 2 * n * 2304 * D
    assert proj < f < 1.1 * proj  # the scan is a few percent at N=256
    bi = operator_flops("mamba2", D, 16, (16, 16), direction="bidirectional")
    assert f < bi < f + 0.1 * proj
    # linear in N: doubling the tokens (a multiple of the chunk size) doubles the FLOPs, up to the O(1) terms
    f2 = operator_flops("mamba2", D, 16, (16, 32))
    assert abs(f2 / f - 2) < 1e-2
