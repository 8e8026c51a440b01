"""GPU kernel paths (ditgraft.operators.kernels) against the operators' references.

On CPU: FlexAttention's masks equal the operators' dense reference masks (element by element and block by block),
eager FlexAttention equals reference attention, dispatch follows device, dtype, ``impl`` and ``kernels_disabled``, and
each dispatch branch, fed a stand-in kernel with the documented semantics, equals the reference (layouts and argument
order). On CUDA: each real kernel, outputs and gradients, against ``impl="reference"``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ditgraft.operators import build_operator, kernels, local_attention, mamba2
from ditgraft.operators.attention import reference_attention
from ditgraft.operators.common import split_heads
from ditgraft.operators.kernels import CAUSAL_CONV1D, FLEX, MAMBA_SSM, kernels_disabled

DIM, HEADS = 16, 2
# local patterns with windows small enough that some 128 x 128 blocks are skipped on the larger grids
LOCAL = [("swa", {}), ("swa", {"window": 130}), ("local2d", {"kernel_size": 3}), ("local2d", {}),
         ("clear", {"radius": 2}), ("clear", {"radius": 4.5})]
GRIDS = [(5, 7), (16, 24), (20, 20)]
SMALL_MAMBA = dict(d_state=8, headdim=4, chunk_size=8)


def randomise(module, scale=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module


def pattern_grid(op, grid):
    """The grid the operator's pattern is defined on (swa: one row of N tokens)."""
    return (1, grid[0] * grid[1]) if op.__class__.__name__ == "SWA" else grid


# ---------------------------------------------------------------------------------------------------------------------
# FlexAttention masks and eager results, on CPU
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("name,options", LOCAL, ids=str)
def test_flex_mask_equals_the_reference_mask(name, options, grid):
    from torch.nn.attention.flex_attention import create_mask

    op = build_operator(name, DIM, HEADS, grid, **options)
    n = grid[0] * grid[1]
    ref = op.mask(grid)
    block = op.block_mask(grid, "cpu")
    dense = create_mask(block.mask_mod, None, None, n, n, device="cpu")[0, 0]
    assert torch.equal(dense, ref)
    # block level: a block is computed exactly when the reference mask allows a pair in it
    size = kernels.FLEX_BLOCK
    nb = -(-n // size)
    padded = F.pad(ref, (0, nb * size - n, 0, nb * size - n))
    wanted = padded.reshape(nb, size, nb, size).any(3).any(1)
    assert torch.equal(block.to_dense()[0, 0].bool(), wanted)
    if n > 2 * size and options.get("window") != 130:
        assert not bool(wanted.all())  # blocks are skipped (a band of 130 reaches every block at N = 384)


def test_layers_with_one_pattern_share_one_block_mask():
    # compiled FlexAttention recompiles per mask_mod function: a model's layers must hand it one
    grid = (16, 24)
    a, b = (build_operator("local2d", DIM, HEADS, grid) for _ in range(2))
    assert a.block_mask(grid, "cpu") is b.block_mask(grid, "cpu")
    other = build_operator("local2d", DIM, HEADS, grid, kernel_size=3)
    assert other.block_mask(grid, "cpu") is not a.block_mask(grid, "cpu")
    assert build_operator("swa", DIM, HEADS, grid).block_mask(grid, "cpu") is not a.block_mask(grid, "cpu")


@pytest.mark.parametrize("impl", ["tiled", "flex"])
def test_masks_and_plans_cached_in_inference_mode_serve_autograd(impl):
    grid = (16, 24)
    op = build_operator("clear", DIM, HEADS, grid, radius=3.5, impl="tiled")
    with torch.inference_mode():
        cached = op.plan(grid, "cpu") if impl == "tiled" else op.block_mask(grid, "cpu")
    tensors = [cached.blocked] if impl == "tiled" else [cached.kv_num_blocks, cached.kv_indices]
    assert not any(t.is_inference() for t in tensors)
    x = torch.randn(1, 384, DIM, requires_grad=True)
    op(x, grid).sum().backward()  # the tiled path saves the cached mask for its backward
    assert x.grad is not None


@pytest.mark.parametrize("name,options", LOCAL, ids=str)
def test_eager_flex_attention_equals_reference_attention(name, options):
    grid = (16, 24)
    op = randomise(build_operator(name, DIM, HEADS, grid, impl="reference", **options))
    x = torch.randn(2, grid[0] * grid[1], DIM)
    with torch.no_grad():
        q, k, v = split_heads((op.Wqkv if name == "swa" else op.qkv)(x), HEADS)
        out = kernels.flex_attention(q, k, v, op.block_mask(grid, "cpu"))
        ref = reference_attention(q, k, v, op.mask(grid))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Dispatch: device, dtype, impl, kernels_disabled (no CUDA device needed to ask about one)
# ---------------------------------------------------------------------------------------------------------------------
def test_local_attention_paths_follow_device_dtype_and_impl():
    op = build_operator("local2d", DIM, HEADS, (4, 4))
    assert op.kernel_path("cpu", torch.float32, 256) == "reference"
    assert op.kernel_path("cpu", torch.float32, 4096) == "tiled"
    assert op.kernel_path("cuda", torch.bfloat16, 256) == FLEX
    assert op.kernel_path("cuda", torch.float64, 4096) == "tiled"  # FlexAttention takes fp32/bf16/fp16
    with kernels_disabled():
        assert op.kernel_path("cuda", torch.bfloat16, 4096) == "tiled"
    assert op.kernel_path("cuda", torch.bfloat16, 4096) == FLEX
    for impl in ("reference", "tiled"):  # an explicit impl is what runs, kernel or not
        op.impl = impl
        assert op.kernel_path("cuda", torch.bfloat16, 4096) == impl


def test_under_a_flop_counter_the_pytorch_paths_run():
    # compiled FlexAttention cannot run under a dispatch mode, and fused kernels would hide their FLOPs from it
    from torch.utils.flop_counter import FlopCounterMode

    op = build_operator("swa", DIM, HEADS, (4, 4))
    assert op.kernel_path("cuda", torch.float32, 4096) == FLEX
    with FlopCounterMode(display=False):
        assert op.kernel_path("cuda", torch.float32, 4096) == "tiled"


def test_mamba2_and_hyena_paths_without_and_with_the_packages(monkeypatch):
    m = build_operator("mamba2", DIM, 1, (4, 4), **SMALL_MAMBA)
    h = build_operator("hyena_x", DIM, 1, (4, 4))
    monkeypatch.setattr(kernels, "kernel_function", lambda kernel: None)  # neither package importable
    assert m.paths("cuda", torch.bfloat16) == ("taps", "chunked")
    assert kernels.describe_path(m, "cuda", torch.bfloat16, 16) == \
        "chunked + taps (mamba_ssm not installed; causal_conv1d not installed)"
    assert kernels.describe_path(m, "cpu", torch.float32, 16) == "chunked + taps"
    monkeypatch.setattr(kernels, "kernel_function", lambda kernel: (lambda *a, **k: None))  # both installed
    assert m.paths("cuda", torch.bfloat16) == (CAUSAL_CONV1D, MAMBA_SSM)
    assert m.paths("cpu", torch.float32) == ("taps", "chunked")
    assert h.kernel_path("cuda", torch.float16) == CAUSAL_CONV1D
    assert kernels.describe_path(h, "cuda", torch.float16, 16) == CAUSAL_CONV1D
    m.impl = h.impl = "reference"
    assert m.paths("cuda", torch.bfloat16) == ("reference", "reference")
    assert h.kernel_path("cuda", torch.bfloat16) == "reference"
    wide = build_operator("hyena_x", DIM, 1, (4, 4), kernel_size=5)  # causal_conv1d takes widths 2-4
    bidir = build_operator("hyena_x", DIM, 1, (4, 4), direction="bidirectional")
    assert wide.kernel_path("cuda", torch.bfloat16) == bidir.kernel_path("cuda", torch.bfloat16) == "taps"


def test_ops_table_shows_the_path_on_the_asked_device():
    from ditgraft.operators.table import format_ops_table, ops_table

    rows = {r["operator"]: r for r in ops_table(64, 4096, 4, device="cuda", dtype=torch.bfloat16)}
    assert rows["swa"]["path"] == rows["local2d"]["path"] == rows["clear"]["path"] == FLEX
    assert rows["mamba2"]["path"].startswith("mamba_ssm" if kernels.kernel_function(MAMBA_SSM) else "chunked + taps (mamba_ssm not installed")
    assert rows["mha"]["path"] == "torch (sdpa)"
    cpu = ops_table(64, 4096, 4)
    assert {r["operator"]: r["path"] for r in cpu}["swa"] == "tiled"
    assert "| path on cpu |" in format_ops_table(cpu, 64, 4096)
    with pytest.raises(ValueError, match="dtype='bf16'"):
        ops_table(64, 256, 4, dtype="bf16")
    with pytest.raises(ValueError, match="device='gpu'"):
        ops_table(64, 256, 4, device="gpu")


# ---------------------------------------------------------------------------------------------------------------------
# Each dispatch branch on CPU with a stand-in kernel of the documented semantics
# ---------------------------------------------------------------------------------------------------------------------
def causal_conv1d_standin(x, weight, bias=None, activation=None):
    """causal_conv1d_fn's documented contract: x [B, C, N], weight [C, k], tap k - 1 on the current token."""
    assert x.shape[1] == weight.shape[0] and activation in (None, "silu")
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=weight.shape[1] - 1, groups=weight.shape[0])[..., :x.shape[-1]]
    return F.silu(out) if activation == "silu" else out


def mamba_chunk_scan_standin(x, dt, A, B, C, chunk_size):
    assert x.dim() == 4 and dt.shape == x.shape[:3] and A.shape == x.shape[2:3] and B.shape == C.shape
    return mamba2.ssd_reference(x, dt, A, B, C)


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """Every kernel 'ready' on CPU, run by its stand-in (FlexAttention by itself, eagerly)."""
    standins = {CAUSAL_CONV1D: causal_conv1d_standin, MAMBA_SSM: mamba_chunk_scan_standin,
                FLEX: kernels.kernel_function(FLEX)}
    ready = lambda kernel, device, dtype: True  # noqa: E731
    monkeypatch.setattr(kernels, "kernel_function", standins.get)
    for module in (kernels, local_attention, mamba2):
        monkeypatch.setattr(module, "kernel_ready", ready)


@pytest.mark.parametrize("name,options", [("hyena_se", {}), ("hyena_y", {"kernel_size": 2}),
                                          ("mamba2", SMALL_MAMBA), ("mamba2", dict(SMALL_MAMBA, ngroups=2)),
                                          ("mamba2", dict(SMALL_MAMBA, direction="bidirectional"))], ids=str)
def test_conv_and_scan_branches_equal_the_reference(kernels_on_cpu, name, options):
    grid = (5, 7)  # float64: the branches and the reference differ by rounding alone, far below the tolerance
    op = randomise(build_operator(name, DIM, 2, grid, **options)).double()
    assert kernels.describe_path(op, "cpu", torch.float64, 35).startswith(MAMBA_SSM if name == "mamba2"
                                                                          else CAUSAL_CONV1D)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 35, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    out = op(x, grid)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (dx,) = torch.autograd.grad((out * g).sum(), x)
    op.impl = "reference"
    ref = op(x, grid)
    (dx_ref,) = torch.autograd.grad((ref * g).sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,options", LOCAL[::2], ids=str)
def test_flex_branch_equals_the_reference(kernels_on_cpu, name, options):
    grid = (16, 24)
    op = randomise(build_operator(name, DIM, HEADS, grid, **options))
    assert op.kernel_path("cpu", torch.float32, 384) == FLEX
    x = torch.randn(2, 384, DIM)
    with torch.no_grad():  # eager FlexAttention has no backward on CPU
        out = op(x, grid)
        op.impl = "reference"
        ref = op(x, grid)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# The real kernels, where CUDA is
# ---------------------------------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def outputs_and_grads(op, x, grid, g):
    op.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = op(x, grid)
    (out * g).sum().backward()
    return [out.detach(), x.grad] + [p.grad for _, p in sorted(op.named_parameters())]


def check_kernel_against_reference(op, grid, path, atol):
    op = randomise(op).cuda()
    n = grid[0] * grid[1]
    assert path in kernels.describe_path(op, "cuda", torch.float32, n)
    x = torch.randn(2, n, op.dim, device="cuda")
    g = torch.randn(2, n, op.dim, device="cuda")
    fast = outputs_and_grads(op, x, grid, g)
    op.impl = "reference"
    ref = outputs_and_grads(op, x, grid, g)
    for a, b in zip(fast, ref):
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol * scale)


@cuda
@pytest.mark.parametrize("name,options", LOCAL, ids=str)
def test_cuda_flex_attention_matches_reference(name, options):
    # DiT's head dim (72) is not a power of two; FlexAttention must handle it
    grid = (16, 24)
    op = build_operator(name, 144, 2, grid, **options)
    check_kernel_against_reference(op, grid, FLEX, atol=2e-4)


@cuda
def test_cuda_flex_attention_in_bf16_is_close():
    grid = (32, 32)
    op = randomise(build_operator("local2d", 144, 2, grid)).cuda()
    x = torch.randn(1, 1024, 144, device="cuda")
    op.impl = "reference"
    ref = op(x, grid)
    op.impl = "auto"
    out = op.to(torch.bfloat16)(x.bfloat16(), grid).float()
    assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())


@cuda
@pytest.mark.parametrize("options", [{}, {"direction": "bidirectional"}, {"ngroups": 2}], ids=str)
def test_cuda_mamba_ssm_scan_matches_reference(options):
    pytest.importorskip("mamba_ssm")
    grid = (8, 9)
    op = build_operator("mamba2", 64, 1, grid, d_state=16, headdim=16, chunk_size=16, **options)
    check_kernel_against_reference(op, grid, MAMBA_SSM, atol=1e-3)


@cuda
@pytest.mark.parametrize("name,options", [("hyena_se", {}), ("hyena_x", {"kernel_size": 3}), ("mamba2", {})],
                         ids=str)
def test_cuda_causal_conv1d_matches_reference(name, options):
    pytest.importorskip("causal_conv1d")
    grid = (8, 9)
    op = build_operator(name, 64, 1, grid, **options)
    check_kernel_against_reference(op, grid, CAUSAL_CONV1D, atol=1e-3)

