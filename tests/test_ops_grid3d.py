"""Grid operators on a video's (frames, rows, columns) grid: local2d's 3-D window, CLEAR's ball, SWA's band, Hyena's
per-frame and 3-D filters, linear attention's per-frame conv. Each against a plain definition (brute-force masks,
per-frame 2-D runs), the fast paths against the references (outputs and gradients), and the FLOP counts against the
masks they count."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from ditgraft.operators import build_operator, operator_flops
from ditgraft.operators.common import grid_coords, projection_flops, raster_index
from ditgraft.operators.hyena import fast_conv_grid, reference_conv_grid
from ditgraft.operators.kernels import flex_mask_mod
from ditgraft.operators.local_attention import dense_mask

GRID = (3, 5, 6)  # frames, rows, columns: 90 tokens, every side different
N = 90


def _x(n=N, dim=16, seed=0):
    return torch.randn(2, n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _natten_start(i, length, k):
    return min(max(i - k // 2, 0), length - k)


def _brute_neighbourhood(grid, kernel):
    """Allowed (query, key) pairs of 3-D neighbourhood attention, by loops over raster ids."""
    cells = list(itertools.product(*(range(s) for s in grid)))
    mask = torch.zeros(len(cells), len(cells), dtype=torch.bool)
    for i, q in enumerate(cells):
        for j, k in enumerate(cells):
            mask[i, j] = all(_natten_start(qa, s, min(w, s)) <= ka < _natten_start(qa, s, min(w, s)) + min(w, s)
                             for qa, ka, s, w in zip(q, k, grid, kernel))
    return mask


def test_raster_ids_are_frame_major():
    coords = grid_coords(GRID)
    assert torch.equal(raster_index(coords, GRID), torch.arange(N))
    assert [int(c[37]) for c in coords] == [1, 1, 1]  # 37 = 1 * 30 + 1 * 6 + 1


@pytest.mark.parametrize("kernel", [3, [3, 3, 3], [1, 3, 5], [3, 5, 1]])
def test_local2d_3d_window_is_natten_on_every_axis(kernel):
    op = build_operator("local2d", 16, 2, GRID, kernel_size=kernel)
    sizes = [kernel] * 3 if isinstance(kernel, int) else kernel
    mask = op.mask(GRID)
    assert torch.equal(mask, _brute_neighbourhood(GRID, sizes))
    keys = 1
    for w, s in zip(sizes, GRID):
        keys *= min(w, s)
    assert (mask.sum(1) == keys).all()  # every query sees the same number of keys
    assert operator_flops("local2d", 16, 2, GRID, kernel_size=kernel) == projection_flops(N, 16) + 4 * int(mask.sum()) * 16


@pytest.mark.parametrize("name,options", [("local2d", {"kernel_size": [3, 3, 5]}), ("clear", {"radius": 2.2}),
                                          ("swa", {"window": 7})])
def test_tiled_matches_reference_on_a_video_grid(name, options):
    """Outputs, log-normalisers and gradients of the tiled path equal the dense-mask reference (tiles of 2 x 2 x 2:
    several tiles along every axis, a ragged last one)."""
    tile = {"block": 8} if name == "swa" else {"tile": 2}
    ref = build_operator(name, 16, 2, GRID, impl="reference", **options).double()
    tiled = build_operator(name, 16, 2, GRID, impl="tiled", **options, **tile).double()
    tiled.load_state_dict(ref.state_dict())
    x = _x().requires_grad_()
    xt = x.detach().clone().requires_grad_()
    out_r, out_t = ref(x, grid=GRID), tiled(xt, grid=GRID)
    torch.testing.assert_close(out_t, out_r)
    g = torch.randn_like(out_r)
    out_r.backward(g)
    out_t.backward(g)
    torch.testing.assert_close(xt.grad, x.grad)
    for a, b in zip(tiled.attend_with_lse(x.detach(), GRID), ref.attend_with_lse(x.detach(), GRID)):
        torch.testing.assert_close(a, b)


def test_local2d_with_a_one_frame_window_is_2d_attention_frame_by_frame():
    op3 = build_operator("local2d", 16, 2, GRID, kernel_size=[1, 3, 3]).double()
    op2 = build_operator("local2d", 16, 2, GRID[1:], kernel_size=3).double()
    op2.load_state_dict(op3.state_dict())
    x = _x()
    per_frame = op2(x.reshape(2 * GRID[0], N // GRID[0], 16), grid=GRID[1:]).reshape(2, N, 16)
    torch.testing.assert_close(op3(x, grid=GRID), per_frame)


def test_local2d_window_covering_the_video_is_full_attention():
    mha = build_operator("mha", 16, 2, GRID).double()
    op = build_operator("local2d", 16, 2, GRID, kernel_size=[3, 5, 7]).double()
    op.load_state_dict(mha.state_dict())
    x = _x()
    torch.testing.assert_close(op(x, grid=GRID), mha(x, grid=GRID))


def test_clear_is_a_ball_and_swa_a_raster_band_on_a_video_grid():
    clear = build_operator("clear", 16, 2, GRID, radius=2)
    cells = list(itertools.product(*(range(s) for s in GRID)))
    ball = torch.tensor([[sum((a - b) ** 2 for a, b in zip(q, k)) < 4 for k in cells] for q in cells])
    mask = clear.mask(GRID)
    assert torch.equal(mask, ball)
    assert int(mask[37].sum()) == 27  # the 3 x 3 x 3 cube around (1, 1, 1): squared distances 0..3 < 4, 4 is not
    assert operator_flops("clear", 16, 2, GRID, radius=2) == projection_flops(N, 16) + 4 * int(mask.sum()) * 16
    swa = build_operator("swa", 16, 2, GRID, window=4)
    band = (torch.arange(N)[:, None] - torch.arange(N)[None, :]).abs() <= 4
    assert torch.equal(swa.mask(GRID), band)
    assert operator_flops("swa", 16, 2, GRID, window=4) == operator_flops("swa", 16, 2, (1, N), window=4)


@pytest.mark.parametrize("name,options", [("local2d", {"kernel_size": [3, 1, 5]}), ("clear", {"radius": 1.5})])
def test_flex_mask_mod_unravels_video_ids(name, options):
    """FlexAttention's mask_mod (raster id -> (frame, row, column) -> pattern) gives the dense mask, evaluated here on
    CPU tensors (FlexAttention itself runs on CUDA)."""
    op = build_operator(name, 16, 2, GRID, **options)
    mod = flex_mask_mod(op._pattern(GRID), GRID)
    ids = torch.arange(N)
    assert torch.equal(mod(0, 0, ids[:, None], ids[None, :]), dense_mask(op._pattern(GRID), GRID))


def test_window_options_are_checked_against_the_grid():
    with pytest.raises(ValueError, match=r"kernel_size=\[3, 3\] has 2 sizes but the grid has 3 axes"):
        build_operator("local2d", 16, 2, GRID, kernel_size=[3, 3])
    with pytest.raises(ValueError, match=r"kernel_size=\[3, 4, 3\] is not allowed; use an odd integer >= 1"):
        build_operator("local2d", 16, 2, GRID, kernel_size=[3, 4, 3])
    with pytest.raises(ValueError, match=r"grid=\(3, 5, 6\) has 90 tokens but the input has N=60"):
        build_operator("clear", 16, 2, GRID)(_x(60).float(), grid=GRID)


# ------------------------------------------------------------------------------------------------------ Hyena
@pytest.mark.parametrize("direction", ["2d", "3d"])
@pytest.mark.parametrize("k", [3, 4])
def test_grid_convs_fast_match_reference_on_a_video_grid(direction, k):
    C = 5
    weight = torch.randn(C, *([k] * (2 if direction == "2d" else 3)), dtype=torch.float64, requires_grad=True)
    bias = torch.randn(C, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, N, C, dtype=torch.float64, requires_grad=True)
    outs, grads = [], []
    for f in (reference_conv_grid, fast_conv_grid):
        y = f(x, weight, bias, GRID)
        outs.append(y)
        grads.append(torch.autograd.grad((y * torch.arange(y.numel()).view_as(y).sin()).sum(), (x, weight, bias)))
    torch.testing.assert_close(outs[1], outs[0])
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b)


def test_hyena_2d_filters_each_frame_and_3d_reaches_across_frames():
    x = _x(dim=8)
    op2 = build_operator("hyena_x", 8, 1, GRID, direction="2d", kernel_size=3).double()
    flat = build_operator("hyena_x", 8, 1, GRID[1:], direction="2d", kernel_size=3).double()
    flat.load_state_dict(op2.state_dict())
    per_frame = flat(x.reshape(2 * GRID[0], N // GRID[0], 8), grid=GRID[1:]).reshape(2, N, 8)
    torch.testing.assert_close(op2(x, grid=GRID), per_frame)
    op3 = build_operator("hyena_x", 8, 1, GRID, direction="3d", kernel_size=3).double()
    assert op3.short_filter.weight.shape == (24, 1, 3, 3, 3)
    x2 = x.clone()
    x2[:, 37] += 1.0  # token (1, 1, 1): the 3-D filter reaches (0..2, 0..2, 0..2) only
    changed = (op3(x2, grid=GRID) - op3(x, grid=GRID)).abs().amax((0, 2)) > 0
    near = {int(raster_index((torch.tensor(t), torch.tensor(r), torch.tensor(c)), GRID))
            for t, r, c in itertools.product(range(3), repeat=3)}
    assert set(changed.nonzero().flatten().tolist()) == near
    assert (operator_flops("hyena_x", 8, 1, GRID, direction="3d", kernel_size=3)
            - operator_flops("hyena_x", 8, 1, GRID, direction="2d", kernel_size=3)) == 2 * (27 - 9) * 24 * N


def test_hyena_y_3d_inner_filter_starts_as_the_identity():
    op = build_operator("hyena_y", 8, 1, GRID, direction="3d", kernel_size=3).double()
    x = _x(dim=8)
    q, k, v = op.in_proj(x).split(8, dim=-1)
    torch.testing.assert_close(op(x, grid=GRID), op.out_proj(q * k * v))


def test_linear_attention_conv_filters_each_frame():
    """conv=3 adds a depthwise 3 x 3 conv of V computed frame by frame (projection set to the identity)."""
    op0 = build_operator("linear_attn", 8, 2, GRID).double()
    op3 = build_operator("linear_attn", 8, 2, GRID, conv=3).double()
    op3.load_state_dict(op0.state_dict(), strict=False)
    torch.nn.init.normal_(op3.dwconv.weight)
    torch.nn.init.normal_(op3.dwconv.bias)
    with torch.no_grad():
        for op in (op0, op3):
            op.proj.weight.copy_(torch.eye(8))
            op.proj.bias.zero_()
    x = _x(dim=8)
    v = op0.qkv(x)[..., 16:].reshape(2, GRID[0], GRID[1], GRID[2], 8)
    frames = v.reshape(-1, GRID[1], GRID[2], 8).permute(0, 3, 1, 2)
    expected = F.conv2d(frames, op3.dwconv.weight, op3.dwconv.bias, padding=1, groups=8)
    expected = expected.permute(0, 2, 3, 1).reshape(2, N, 8)
    torch.testing.assert_close(op3(x, grid=GRID) - op0(x, grid=GRID), expected)


def test_mamba2_scans_a_video_in_frame_major_order():
    """Mamba-2 is causal in the token order the model holds: frame-major on a video. A change at token 37 leaves
    tokens 0..36 alone (the earlier frames and the earlier rows of its own frame) and reaches the later ones."""
    op = build_operator("mamba2", 16, 1, GRID, d_state=8, headdim=8).double()
    x = _x()
    x2 = x.clone()
    x2[:, 37] += 1.0
    changed = (op(x2, grid=GRID) - op(x, grid=GRID)).abs().amax((0, 2)) > 0
    assert not changed[:37].any() and changed[37:].all()
