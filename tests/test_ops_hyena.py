"""Hyena-SE / -X / -Y and MLP-Hyena-X: fast vs reference (outputs and every gradient), release names and counts,
identity init, causality, independent conv oracles."""
import pytest
import torch
import torch.nn.functional as F

from ditgraft.operators.common import TapConvTokens, reference_conv_tokens
from ditgraft.operators.hyena import fast_conv_grid, reference_conv_grid
from ditgraft.operators.registry import build_operator, get_spec, operator_flops

HYENAS = ("hyena_se", "hyena_x", "hyena_y")
DIRECTIONS = ("causal", "bidirectional", "2d")
GRIDS = ((5, 7), (3, 16), (4, 4))
TOL = 2e-5  # fp32 (fp64 depthwise convs are ~1000x slower on CPU torch); real bugs give O(1) errors


def randomise(op, seed=0):
    """Random values everywhere (identity / zero inits would hide bugs in the inner and reverse filters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in op.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return op


def run(op, x, grid, impl):
    op.impl = impl
    x = x.detach().clone().requires_grad_()
    op.zero_grad()
    y = op(x, grid)
    (y * torch.cos(torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape))).sum().backward()
    grads = {n: p.grad.clone() for n, p in op.named_parameters()}
    return y.detach(), x.grad.clone(), grads


def assert_close_scaled(a, b, tol, what=""):
    """max |a - b| <= tol * max |b| (fp32 rounding scales with the tensor's magnitude)."""
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    assert err <= tol * max(scale, 1e-6), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def assert_fast_matches_reference(op, x, grid, atol):
    y1, gx1, gp1 = run(op, x, grid, "fast")
    y2, gx2, gp2 = run(op, x, grid, "reference")
    assert_close_scaled(y1, y2, atol, "output")
    assert_close_scaled(gx1, gx2, atol, "input grad")
    assert gp1.keys() == gp2.keys()
    for name in gp1:
        assert_close_scaled(gp1[name], gp2[name], atol, name)


# ----------------------------------------------------------------------------------------------- conv building blocks
@pytest.mark.parametrize("k", [1, 2, 4, 5])
def test_causal_conv_matches_padded_conv1d(k):
    """Both paths equal nn.Conv1d(padding=k-1) trimmed to N (the release's Conv1d/causal_conv1d_fn semantics)."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 9, 6), torch.randn(6, k), torch.randn(6)
    want = F.conv1d(x.transpose(1, 2), w[:, None], b, padding=k - 1, groups=6)[..., :9].transpose(1, 2)
    # explicit y[t] = b + sum_j w[k-1-j] x[t-j]
    explicit = torch.stack([b + sum(w[:, k - 1 - j] * x[:, t - j] for j in range(k) if t - j >= 0)
                            for t in range(9)], dim=1)
    torch.testing.assert_close(want, explicit)
    torch.testing.assert_close(TapConvTokens.apply(x, w, b, k - 1), want)
    torch.testing.assert_close(reference_conv_tokens(x, w, b, left=k - 1), want)


def test_centred_conv_and_grid_conv_match_torch():
    torch.manual_seed(0)
    x, w = torch.randn(2, 11, 5), torch.randn(5, 7)
    want = F.conv1d(x.transpose(1, 2), w[:, None], None, padding=3, groups=5).transpose(1, 2)
    torch.testing.assert_close(TapConvTokens.apply(x, w, None, 3), want)
    torch.testing.assert_close(reference_conv_tokens(x, w, None, left=3), want)
    for k in (3, 4):
        x = torch.randn(2, 5 * 7, 3)
        w, b = torch.randn(3, k, k), torch.randn(3)
        before, after = (k - 1) // 2, k - 1 - (k - 1) // 2
        img = F.pad(x.reshape(2, 5, 7, 3).permute(0, 3, 1, 2), (before, after, before, after))
        want = F.conv2d(img, w[:, None], b, groups=3).permute(0, 2, 3, 1).reshape(2, 35, 3)
        torch.testing.assert_close(fast_conv_grid(x, w, b, (5, 7)), want)
        torch.testing.assert_close(reference_conv_grid(x, w, b, (5, 7)), want)


@pytest.mark.parametrize("shape", [(2, 9, 4), (1, 17, 6), (3, 5, 3)])
@pytest.mark.parametrize("taps,left", [(3, 2), (4, 3), (7, 3)])  # causal k = 3, 4; centred 2k - 1 = 7 (bidirectional)
@pytest.mark.parametrize("with_bias", [True, False])
def test_tap_conv_gradients_match_reference(shape, taps, left, with_bias):
    """The fast token conv's output and its gradients for x, weight and bias equal autograd through the reference
    (float64, strided x like a q/k/v split)."""
    g = torch.Generator().manual_seed(taps + shape[1])
    B, N, C = shape
    x = torch.randn(B, N, C + 2, generator=g, dtype=torch.float64)[..., 1:C + 1]
    weight = torch.randn(C, taps, generator=g, dtype=torch.float64)
    bias = torch.randn(C, generator=g, dtype=torch.float64) if with_bias else None
    dy = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    results = []
    for conv in (lambda *t: TapConvTokens.apply(*t, left), lambda *t: reference_conv_tokens(*t, left)):
        inputs = [t.clone().requires_grad_() for t in (x, weight) + ((bias,) if with_bias else ())]
        y = conv(*inputs) if with_bias else conv(*inputs, None)
        results.append((y.detach(), *torch.autograd.grad(y, inputs, dy)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------------------------- fast vs reference
@pytest.mark.parametrize("name", HYENAS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("grid", GRIDS)
def test_hyena_fast_matches_reference(name, direction, grid):
    torch.manual_seed(1)
    op = randomise(build_operator(name, 12, 2, grid, direction=direction))
    x = torch.randn(2, grid[0] * grid[1], 12)
    assert_fast_matches_reference(op, x, grid, atol=TOL)


@pytest.mark.parametrize("direction,k", [("causal", 2), ("causal", 5), ("bidirectional", 3), ("2d", 3), ("2d", 2)])
def test_hyena_other_kernel_sizes(direction, k):
    torch.manual_seed(2)
    op = randomise(build_operator("hyena_se", 8, 1, (3, 5), direction=direction, kernel_size=k))
    assert_fast_matches_reference(op, torch.randn(2, 15, 8), (3, 5), atol=TOL)


@pytest.mark.parametrize("grid", [(16, 16), (3, 16)])
def test_mlp_hyena_x_fast_matches_reference(grid):
    torch.manual_seed(4)
    op = randomise(build_operator("mlp_hyena_x", 12, 2, grid))
    assert_fast_matches_reference(op, torch.randn(2, grid[0] * grid[1], 12), grid, atol=TOL)


def test_mlp_hyena_x_matches_explicit_formula():
    """Token n: u = in_proj(x_n) (length 6D); u'[c] = b_n + sum_i w_n[i] u[c - (k-1) + i]; y = out_proj(q * k * v)."""
    torch.manual_seed(5)
    op = randomise(build_operator("mlp_hyena_x", 4, 1, (2, 3)))
    x = torch.randn(2, 6, 4)
    u = op.in_proj(x)
    w, b = op.short_filter.weight[:, 0], op.short_filter.bias
    L = u.shape[-1]
    conv = torch.stack([b + sum(w[:, i] * u[..., c - 3 + i] for i in range(4) if c - 3 + i >= 0)
                        for c in range(L)], dim=-1)
    q, k, v = conv.split(8, dim=-1)
    torch.testing.assert_close(op(x), op.out_proj(q * k * v))


# ----------------------------------------------------------------------------------------------- release fidelity
D, N_GRID = 1152, (16, 16)


def hyena_keys(featurizer, inner, dim=D, k=4):
    keys = {"in_proj.weight": (3 * dim, dim), "in_proj.bias": (3 * dim,),
            "out_proj.weight": (dim, dim), "out_proj.bias": (dim,)}
    if featurizer:
        keys.update({"short_filter.weight": (3 * dim, 1, k), "short_filter.bias": (3 * dim,)})
    if inner:
        keys.update({"inner_filter.weight": (dim, 1, k), "inner_filter.bias": (dim,)})
    return keys


@pytest.mark.parametrize("name,count,featurizer,inner", [("hyena_se", 5_336_064, True, True),
                                                        ("hyena_x", 5_330_304, True, False),
                                                        ("hyena_y", 5_318_784, False, True)])
def test_hyena_param_counts_and_release_names(name, count, featurizer, inner):
    op = build_operator(name, D, 16, N_GRID)
    assert sum(p.numel() for p in op.parameters()) == count
    assert {k: tuple(v.shape) for k, v in op.state_dict().items()} == hyena_keys(featurizer, inner)
    assert get_spec(name).slot == "attn"


def test_mlp_hyena_x_param_count_and_release_names():
    op = build_operator("mlp_hyena_x", D, 16, N_GRID)
    assert sum(p.numel() for p in op.parameters()) == 10_626_176
    assert {k: tuple(v.shape) for k, v in op.state_dict().items()} == {
        "in_proj.weight": (6 * D, D), "in_proj.bias": (6 * D,), "out_proj.weight": (D, 2 * D),
        "out_proj.bias": (D,), "short_filter.weight": (256, 1, 4), "short_filter.bias": (256,)}
    assert get_spec("mlp_hyena_x").slot == "mlp"


def test_bidirectional_and_2d_names():
    bi = build_operator("hyena_se", 8, 1, (2, 2), direction="bidirectional")
    extra = set(bi.state_dict()) - set(hyena_keys(True, True, dim=8))
    assert extra == {"short_filter_rev.weight", "inner_filter_rev.weight"}
    assert bi.short_filter_rev.weight.shape == (24, 1, 3) and not bi.short_filter_rev.weight.any()
    two = build_operator("hyena_se", 8, 1, (2, 2), direction="2d")
    assert {k: tuple(v.shape) for k, v in two.state_dict().items()} == {
        **hyena_keys(True, True, dim=8), "short_filter.weight": (24, 1, 4, 4), "inner_filter.weight": (8, 1, 4, 4)}


# ----------------------------------------------------------------------------------------------- init semantics
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_identity_inner_filter_se_equals_x(direction):
    torch.manual_seed(6)
    se = build_operator("hyena_se", 16, 2, (4, 5), direction=direction)
    w = se.inner_filter.weight
    assert w.sum().item() == 16 and w.abs().max().item() == 1 and not se.inner_filter.bias.any()
    x_op = build_operator("hyena_x", 16, 2, (4, 5), direction=direction)
    x_op.load_state_dict({k: v for k, v in se.state_dict().items() if not k.startswith("inner_filter")})
    x = torch.randn(2, 20, 16)
    torch.testing.assert_close(se(x), x_op(x), atol=1e-6, rtol=1e-6)
    for impl in ("fast", "reference"):
        se.impl = impl
        y_op = build_operator("hyena_y", 16, 2, (4, 5), direction=direction)
        y_op.load_state_dict({k: v for k, v in se.state_dict().items() if not k.startswith("short_filter")})
        q, k, v = y_op.in_proj(x).split(16, dim=-1)
        torch.testing.assert_close(y_op(x), y_op.out_proj(q * k * v), atol=1e-6, rtol=1e-6)


def test_identity_tap_is_current_token_in_release_layout():
    op = build_operator("hyena_y", 4, 1, (1, 6))
    assert op.inner_filter.weight[:, 0, 3].eq(1).all() and op.inner_filter.weight[:, 0, :3].eq(0).all()


def test_bidirectional_starts_equal_to_causal():
    torch.manual_seed(7)
    causal = build_operator("hyena_se", 16, 2, (3, 7))
    bi = build_operator("hyena_se", 16, 2, (3, 7), direction="bidirectional")
    missing = bi.load_state_dict(causal.state_dict(), strict=False).missing_keys
    assert set(missing) == {"short_filter_rev.weight", "inner_filter_rev.weight"}
    x = torch.randn(2, 21, 16)
    torch.testing.assert_close(bi(x), causal(x))


# ----------------------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("name", HYENAS)
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_causal_hyena_ignores_future_tokens(name, impl):
    torch.manual_seed(8)
    op = randomise(build_operator(name, 8, 1, (5, 7), impl=impl))
    x = torch.randn(2, 35, 8)
    for t in (0, 10, 33):
        x2 = x.clone()
        x2[:, t + 1:] += torch.randn_like(x2[:, t + 1:])
        y, y2 = op(x), op(x2)
        torch.testing.assert_close(y[:, :t + 1], y2[:, :t + 1])
        assert not torch.allclose(y[:, t + 1:], y2[:, t + 1:])


@pytest.mark.parametrize("direction", ["bidirectional", "2d"])
def test_non_causal_variants_see_the_future(direction):
    torch.manual_seed(9)
    op = randomise(build_operator("hyena_x", 8, 1, (5, 7), direction=direction))
    x = torch.randn(1, 35, 8)
    x2 = x.clone()
    x2[:, 20:] += 1.0
    assert not torch.allclose(op(x)[:, :20], op(x2)[:, :20])


def test_mlp_hyena_x_mixes_channels_only():
    torch.manual_seed(10)
    op = randomise(build_operator("mlp_hyena_x", 8, 1, (2, 4)))
    x = torch.randn(2, 8, 8)
    x2 = x.clone()
    x2[:, 5] += 1.0
    y, y2 = op(x), op(x2)
    keep = [i for i in range(8) if i != 5]
    torch.testing.assert_close(y[:, keep], y2[:, keep])


# ----------------------------------------------------------------------------------------------- errors and FLOPs
def test_errors_name_field_value_and_allowed():
    with pytest.raises(ValueError, match="direction='sideways'.*causal"):
        build_operator("hyena_x", 8, 1, (2, 2), direction="sideways")
    with pytest.raises(ValueError, match="impl='cuda'"):
        build_operator("hyena_x", 8, 1, (2, 2), impl="cuda")
    with pytest.raises(ValueError, match="kernel_size=1"):
        build_operator("hyena_x", 8, 1, (2, 2), direction="bidirectional", kernel_size=1)
    with pytest.raises(ValueError, match="grid=\\(2, 2\\) has 4 tokens but the input has N=5"):
        build_operator("hyena_x", 8, 1, (2, 2), direction="2d")(torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="direction='3d' filters a \\(frames, rows, columns\\) grid"):
        build_operator("hyena_x", 8, 1, (2, 2), direction="3d")(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="built for N=4"):
        build_operator("mlp_hyena_x", 8, 1, (2, 2))(torch.randn(1, 5, 8))


def test_flops():
    n = 256
    proj = 2 * n * D * 3 * D + 2 * n * D * D + 2 * n * D
    assert operator_flops("hyena_x", D, 16, N_GRID) == proj + 2 * 4 * 3 * D * n
    assert operator_flops("hyena_y", D, 16, N_GRID) == proj + 2 * 4 * D * n
    assert operator_flops("hyena_se", D, 16, N_GRID, direction="bidirectional") == proj + 2 * 7 * 4 * D * n
    assert operator_flops("hyena_se", D, 16, N_GRID, direction="2d", kernel_size=3) == proj + 2 * 9 * 4 * D * n
    assert operator_flops("mlp_hyena_x", D, 16, N_GRID) == (2 * n * D * 6 * D + 2 * 4 * 6 * D * n + 2 * n * 2 * D
                                                            + 2 * n * 2 * D * D)
    # sequence mixing is a small fraction: about 0.9x MHA's FLOPs at N=256, about 8x fewer at N=16384
    assert operator_flops("hyena_x", D, 16, (128, 128)) * 8 < operator_flops("mha", D, 16, (128, 128))
