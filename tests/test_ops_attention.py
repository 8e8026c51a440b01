"""Attention-family operators: fast paths against references (outputs and every gradient), names, shapes, semantics."""
from __future__ import annotations

import math

import pytest
import torch

from ditgraft.operators import build_operator, operator_flops
from ditgraft.operators import local_attention as la
from ditgraft.operators.attention import MHA
from ditgraft.operators.linear_attention import LinearAttention, reference_linear_attention, relu_linear_attention
from ditgraft.operators.local_attention import CLEAR, SWA, Local2D

TOL = dict(rtol=1e-5, atol=1e-5)
GRIDS = [(5, 7), (8, 8), (3, 16)]
# (name, options, fast impl); small tiles/blocks so that several tiles and padded tiles occur on these grids
CASES = [
    ("swa", {}, "tiled"),
    ("swa", {"window": 2, "block": 3}, "tiled"),
    ("swa", {"window": 9, "block": 4}, "tiled"),
    ("local2d", {"kernel_size": 3, "tile": 2}, "tiled"),
    ("local2d", {"kernel_size": 5, "tile": 3}, "tiled"),
    ("local2d", {}, "tiled"),  # k=7 exceeds the 5x7 and 3x16 grids: clamped windows
    ("clear", {"radius": 2, "tile": 3}, "tiled"),
    ("clear", {"radius": 1.5, "tile": 2}, "tiled"),
    ("clear", {}, "tiled"),
    ("linear_attn", {}, "fast"),
    ("linear_attn", {"conv": 3}, "fast"),
    ("linear_attn", {"conv": 5}, "fast"),
]
DIM, HEADS = 16, 2
MHA_KEYS = {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}


def close(actual, expected, what=""):
    """fp32 comparison at ~1e-5 relative to the tensor's scale (sums of many terms lose a few ulps)."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def randomise(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Random values in every parameter (dwconv starts at zero; the tests must exercise it)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, scale)


def run(op, x, grid):
    """Output and gradients of the input and of every parameter for a fixed random upstream gradient."""
    op.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = op(x, grid)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * g).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in op.named_parameters()}


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("name,options,fast", CASES, ids=lambda c: str(c))
def test_fast_path_matches_reference(name, options, fast, grid):
    torch.manual_seed(0)
    op = build_operator(name, DIM, HEADS, grid, impl=fast, **options)
    randomise(op)
    if name == "linear_attn":
        # fp32 gradients scale like 1/den; keep q.k overlaps away from 0 here (float64 test below covers any weights)
        with torch.no_grad():
            op.qkv.bias[: 2 * DIM] += 1.0
    x = torch.randn(2, grid[0] * grid[1], DIM)
    out_f, gx_f, gp_f = run(op, x, grid)
    op.impl = "reference"
    out_r, gx_r, gp_r = run(op, x, grid)
    close(out_f, out_r, "output")
    close(gx_f, gx_r, "grad of the input")
    assert gp_f.keys() == gp_r.keys()
    for n in gp_f:
        close(gp_f[n], gp_r[n], f"grad of {n}")


@pytest.mark.parametrize("conv", [0, 3])
def test_linear_attention_fast_matches_reference_in_float64(conv):
    torch.manual_seed(0)
    grid = (5, 7)
    op = LinearAttention(DIM, HEADS, grid, conv=conv).double()
    randomise(op)
    x = torch.randn(2, 35, DIM, dtype=torch.float64)
    out_f, gx_f, gp_f = run(op, x, grid)
    op.impl = "reference"
    out_r, gx_r, gp_r = run(op, x, grid)
    for a, b in [(out_f, out_r), (gx_f, gx_r)] + [(gp_f[n], gp_r[n]) for n in gp_f]:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,options,fast", CASES[::3], ids=lambda c: str(c))
def test_fast_path_on_cuda_matches_cpu_reference(name, options, fast):
    torch.manual_seed(0)
    grid = (5, 7)
    op = build_operator(name, DIM, HEADS, grid, impl="reference", **options)
    randomise(op)
    x = torch.randn(2, 35, DIM)
    ref = op(x)
    op.cuda().impl = fast
    torch.testing.assert_close(op(x.cuda()).cpu(), ref, **TOL)


def test_registry_builds_each_operator_by_name():
    classes = {"swa": SWA, "local2d": Local2D, "clear": CLEAR, "linear_attn": LinearAttention}
    for name, cls in classes.items():
        op = build_operator(name, DIM, HEADS, (4, 4))
        assert type(op) is cls and op.grid == (4, 4)
        assert operator_flops(name, DIM, HEADS, (4, 4)) > 0
    with pytest.raises(ValueError, match="unknown option 'kernel_size'; allowed: window, impl, block"):
        build_operator("swa", DIM, HEADS, (4, 4), kernel_size=3)


def test_param_counts_and_state_dict_names_at_dit_xl_width():
    with torch.device("meta"):
        ops = {name: build_operator(name, 1152, 16, (16, 16)) for name in ("mha", "swa", "local2d", "clear",
                                                                          "linear_attn")}
        conv3 = build_operator("linear_attn", 1152, 16, (16, 16), conv=3)
    counts = {name: sum(p.numel() for p in op.parameters()) for name, op in ops.items()}
    assert counts == dict.fromkeys(ops, 5_313_024)
    assert sum(p.numel() for p in conv3.parameters()) == 5_313_024 + 1152 * 9 + 1152
    assert set(ops["swa"].state_dict()) == {"Wqkv.weight", "Wqkv.bias", "out_proj.weight", "out_proj.bias"}
    for name in ("local2d", "clear", "linear_attn"):
        assert set(ops[name].state_dict()) == MHA_KEYS
    assert set(conv3.state_dict()) == MHA_KEYS | {"dwconv.weight", "dwconv.bias"}
    assert conv3.dwconv.weight.shape == (1152, 1, 3, 3)


def mha_and_input(grid, seed=0):
    torch.manual_seed(seed)
    mha = MHA(DIM, HEADS, grid)
    randomise(mha)
    return mha, torch.randn(2, grid[0] * grid[1], DIM)


@pytest.mark.parametrize("impl", ["tiled", "reference"])
def test_full_windows_equal_mha(impl):
    grid = (5, 7)
    mha, x = mha_and_input(grid)
    want = mha(x)
    ops = [SWA.from_mha(mha, window=35, impl=impl, block=4),
           Local2D.from_mha(mha, kernel_size=7, impl=impl, tile=3),  # 7 >= max(5, 7): the whole grid
           CLEAR.from_mha(mha, radius=9, impl=impl, tile=2)]  # 4^2 + 6^2 < 81
    for op in ops:
        torch.testing.assert_close(op(x), want, **TOL)


def test_from_mha_copies_weights_and_mha_state_dict_loads_strictly():
    mha, x = mha_and_input((4, 4))
    swa = SWA.from_mha(mha)
    assert torch.equal(swa.Wqkv.weight, mha.qkv.weight) and torch.equal(swa.out_proj.bias, mha.proj.bias)
    for cls in (Local2D, CLEAR, LinearAttention):
        op = cls(DIM, HEADS, (4, 4))
        op.load_state_dict(mha.state_dict())  # strict
        assert torch.equal(op.qkv.weight, mha.qkv.weight)
    lin0 = LinearAttention.from_mha(mha)
    lin3 = LinearAttention.from_mha(mha, conv=3)  # zero-initialised conv: same function as conv=0
    torch.testing.assert_close(lin3(x), lin0(x))


def test_local2d_corner_and_edge_queries_match_hand_computed_windows():
    grid, k = (5, 6), 3
    op = Local2D(DIM, HEADS, grid, kernel_size=k, impl="tiled", tile=2)
    mask = op.mask()
    expected = {  # query (y, x) -> window rows, cols (shifted inward at the borders, always 3 x 3)
        (0, 0): (range(0, 3), range(0, 3)),
        (4, 5): (range(2, 5), range(3, 6)),
        (2, 0): (range(1, 4), range(0, 3)),
        (0, 3): (range(0, 3), range(2, 5)),
        (2, 3): (range(1, 4), range(2, 5)),
    }
    for (y, x), (rows, cols) in expected.items():
        keys = {r * 6 + c for r in rows for c in cols}
        assert set(mask[y * 6 + x].nonzero().flatten().tolist()) == keys
    assert (mask.sum(1) == k * k).all()

    # the fast path's output for the corner query is softmax over exactly those keys
    torch.manual_seed(0)
    randomise(op)
    x = torch.randn(1, 30, DIM)
    q, kk, v = op.qkv(x).reshape(1, 30, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
    keys = sorted(r * 6 + c for r in range(3) for c in range(3))
    w = ((q[0, :, 0:1] @ kk[0, :, keys].transpose(-1, -2)) / math.sqrt(DIM // HEADS)).softmax(-1)
    head_out = (w @ v[0, :, keys])[:, 0]  # [heads, d]
    want = op.proj(head_out.reshape(1, DIM))[0]
    torch.testing.assert_close(op(x)[0, 0], want, **TOL)


def natten_start_literal(i: int, length: int, k: int) -> int:
    """NATTEN's get_window_start for dilation 1, written as in its CPU kernels."""
    r = k // 2
    return max(i - r, 0) + (i + r >= length) * (length - i - r - 1)


def test_window_start_matches_natten_formula():
    for length in range(1, 13):
        for k in range(1, length + 1, 2):
            got = la.natten_window_start(torch.arange(length), length, k).tolist()
            assert got == [natten_start_literal(i, length, k) for i in range(length)], (length, k)


def test_local2d_clamps_large_kernels_and_rejects_even_ones():
    op = Local2D(DIM, HEADS, (3, 16), kernel_size=7)
    assert op.kernel((3, 16)) == (3, 7)
    assert (op.mask().sum(1) == 21).all()
    with pytest.raises(ValueError, match="kernel_size=4"):
        Local2D(DIM, HEADS, (8, 8), kernel_size=4)


def test_swa_is_a_raster_band_that_wraps_rows():
    op = SWA(DIM, HEADS, (4, 4), window=2)
    mask = op.mask()
    assert set(mask[3].nonzero().flatten().tolist()) == {1, 2, 3, 4, 5}  # end of row 0 sees the start of row 1
    assert set(mask[0].nonzero().flatten().tolist()) == {0, 1, 2}
    assert not mask[0, 4]  # the vertical neighbour is outside the band


def test_clear_circle_is_truncated_at_borders():
    op = CLEAR(DIM, HEADS, (16, 16))  # radius 4: (dy^2 + dx^2) < 16
    mask = op.mask()
    assert mask[8 * 16 + 8].sum() == 45  # interior: 7 + 2*7 + 2*7 + 2*5
    assert mask[0].sum() == 15  # corner: the quarter disc, not shifted inward
    assert not mask[8 * 16 + 8, 12 * 16 + 8] and mask[8 * 16 + 8, 11 * 16 + 8]  # distance 4 excluded, 3 included


def test_tiled_plans_have_no_quadratic_tensors():
    grid = (64, 64)
    n = grid[0] * grid[1]
    for op in (SWA(DIM, HEADS, grid), Local2D(DIM, HEADS, grid), CLEAR(DIM, HEADS, grid)):
        plan = op.plan(grid, "cpu")
        assert plan.blocked.numel() <= 8 * 49 * n  # keys per tile times queries, far from n * n
        assert plan.k_idx.max() < n and plan.q_idx.max() < n
        assert torch.equal(plan.inv.sort().values, plan.inv.unique())  # one output slot per token


def test_auto_picks_tiled_from_threshold(monkeypatch):
    from ditgraft.operators import attention as att

    calls = []
    monkeypatch.setattr(la, "reference_attention", lambda *a: calls.append("ref") or att.reference_attention(*a))
    monkeypatch.setattr(la, "tiled_attention_packed",
                        lambda *a: calls.append("tiled") or att.tiled_attention_packed(*a))
    small, big = (8, 8), (32, 32)
    assert big[0] * big[1] >= la.TILED_MIN_TOKENS > small[0] * small[1]
    op = SWA(8, 2, small)
    op(torch.randn(1, 64, 8))
    op(torch.randn(1, 1024, 8), big)
    assert calls == ["ref", "tiled"]


def test_grid_mismatch_and_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match=r"grid=\(4, 4\) has 16 tokens but the input has N=15"):
        Local2D(DIM, HEADS, (4, 4))(torch.randn(1, 15, DIM))
    with pytest.raises(ValueError, match="conv=4"):
        LinearAttention(DIM, HEADS, (4, 4), conv=4)
    with pytest.raises(ValueError, match="impl='flash'"):
        CLEAR(DIM, HEADS, (4, 4), impl="flash")
    with pytest.raises(ValueError, match="radius=0"):
        CLEAR(DIM, HEADS, (4, 4), radius=0)


def test_linear_attention_normaliser():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 12, 4).unbind(0)
    eps = 1e-6
    out = relu_linear_attention(q, k, v, eps)
    # one query by hand: weights relu(q_i).relu(k_j), divided by their sum
    w = torch.stack([torch.relu(q[1, 1, 5]) @ torch.relu(k[1, 1, j]) for j in range(12)])
    torch.testing.assert_close(out[1, 1, 5], (w[:, None] * v[1, 1]).sum(0) / (w.sum() + eps), **TOL)
    # constant values pass through (the weights sum to one) wherever some key overlaps the query
    ones = relu_linear_attention(q, k, torch.full_like(v, 3.0), eps)
    den = torch.relu(q) @ torch.relu(k).sum(2, keepdim=True).transpose(-1, -2)
    torch.testing.assert_close(ones, (3.0 * den / (den + eps)).expand_as(ones), **TOL)
    # a query with no positive feature sees nothing: output 0, not NaN
    q[0, 0, 0] = -1.0
    assert torch.equal(relu_linear_attention(q, k, v, eps)[0, 0, 0], torch.zeros(4))
    torch.testing.assert_close(relu_linear_attention(q, k, v, eps), reference_linear_attention(q, k, v, eps), **TOL)


def test_linear_attention_keeps_low_precision_dtype():
    q, k, v = torch.randn(3, 1, 2, 8, 4, dtype=torch.bfloat16).unbind(0)
    assert relu_linear_attention(q, k, v, 1e-6).dtype == torch.bfloat16


def test_flops_count_the_allowed_pairs():
    dim, heads = 1152, 16
    proj = lambda n: 8 * n * dim * dim  # noqa: E731  (qkv + out projections)
    for grid in [(16, 16), (5, 7)]:
        n = grid[0] * grid[1]
        mha = MHA.flops(dim, heads, grid)
        for name, options in [("swa", {}), ("swa", {"window": 9}), ("local2d", {}), ("local2d", {"kernel_size": 3}),
                              ("clear", {}), ("clear", {"radius": 2.5})]:
            op = build_operator(name, 8, 2, grid, **options)
            pairs = int(op.mask().sum())
            assert operator_flops(name, dim, heads, grid, **options) == proj(n) + 4 * pairs * dim, (name, options)
        assert operator_flops("swa", dim, heads, grid, window=n) == mha
        assert operator_flops("local2d", dim, heads, grid, kernel_size=2 * max(grid) + 1) == mha
        assert operator_flops("clear", dim, heads, grid, radius=2 * max(grid)) == mha
    n, d = 256, dim // heads
    assert operator_flops("linear_attn", dim, heads, (16, 16)) == proj(n) + 4 * n * dim * (d + 1)
    assert operator_flops("linear_attn", dim, heads, (16, 16), conv=3) == proj(n) + 4 * n * dim * (d + 1) + 18 * n * dim
    # DiT-XL/2 at 256 px: swa's attention core is 4 * (N*9 - 20) * D
    assert operator_flops("swa", dim, heads, (16, 16)) == proj(n) + 4 * (n * 9 - 20) * dim


@pytest.mark.parametrize("slab_scores", [1, 100, 1 << 20])  # one tile per slab, a few, all tiles in one slab
@pytest.mark.parametrize("grid,tile", [((5, 7), 3), ((4, 4), 2)])
def test_packed_tiled_attention_matches_split_and_gradcheck(grid, tile, slab_scores, monkeypatch):
    """TiledAttention (packed qkv in, merged heads out, own backward; tiles in slabs when no gradient is needed)
    against tiled_attention on split heads, with padded tiles on the 5 x 7 grid; float64 gradcheck of its backward."""
    from ditgraft.operators import attention as att
    from ditgraft.operators.attention import TiledAttention, tiled_attention, tiled_attention_packed
    from ditgraft.operators.common import split_heads

    monkeypatch.setattr(att, "TILE_SLAB_SCORES", slab_scores)

    op = Local2D(8, 2, grid, kernel_size=3, tile=tile)
    plan = op.plan(grid, "cpu")
    n = grid[0] * grid[1]
    qkv = torch.randn(2, n, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = tiled_attention(*split_heads(qkv, 2), plan).transpose(1, 2).reshape(2, n, 8)
    torch.testing.assert_close(tiled_attention_packed(qkv, 2, plan), want)  # no gradient: tiles in slabs
    assert torch.autograd.gradcheck(lambda t: TiledAttention.apply(t, 2, plan), (qkv.requires_grad_(),))


@pytest.mark.parametrize("qk_norm", [False, "rms_norm", "rms_norm_across_heads"])
def test_linear_attention_normaliser_and_qk_norm(qk_norm):
    """attend_with_lse: the per-head output and log(kernel sum + eps), fast == reference (outputs and gradients), and
    the output projection of the per-head output is the forward; qk-norms are rope_mha's."""
    from ditgraft.operators import build_operator

    torch.manual_seed(0)
    fast = build_operator("linear_attn", 16, 2, (3, 4), conv=3, qk_norm=qk_norm).double()
    ref = build_operator("linear_attn", 16, 2, (3, 4), conv=3, qk_norm=qk_norm, impl="reference").double()
    torch.nn.init.normal_(fast.dwconv.weight)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 12, 16, dtype=torch.float64, requires_grad=True)
    (out_f, lse_f), (out_r, lse_r) = fast.attend_with_lse(x, (3, 4)), ref.attend_with_lse(x, (3, 4))
    torch.testing.assert_close(out_f, out_r)
    torch.testing.assert_close(lse_f, lse_r)
    g_f = torch.autograd.grad((out_f.sin().sum() + lse_f.sum()), x)[0]
    g_r = torch.autograd.grad((out_r.sin().sum() + lse_r.sum()), x)[0]
    torch.testing.assert_close(g_f, g_r)
    torch.testing.assert_close(fast.proj(out_f.transpose(1, 2).reshape(2, 12, 16)), fast(x, (3, 4)))
    q, k, _ = fast.qkv(x).view(2, 12, 3, 2, 8).permute(2, 0, 3, 1, 4)
    if qk_norm == "rms_norm":
        q, k = fast.norm_q(q), fast.norm_k(k)
    elif qk_norm:
        q = fast.norm_q(q.transpose(1, 2).reshape(2, 12, 16)).view(2, 12, 2, 8).transpose(1, 2)
        k = fast.norm_k(k.transpose(1, 2).reshape(2, 12, 16)).view(2, 12, 2, 8).transpose(1, 2)
    den = (torch.relu(q) @ torch.relu(k).transpose(-2, -1)).sum(-1)
    torch.testing.assert_close(lse_f, torch.log(den + fast.eps))
    assert (fast.norm_q is None) == (not qk_norm)
