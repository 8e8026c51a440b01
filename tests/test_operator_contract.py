"""The contract every registered operator keeps, checked for each name in the registry (a new operator is covered
here with no edit): ``op(x [B, N, D], grid) -> [B, N, D]`` built by name from ``(dim, heads, grid, **options)``;
each fast ``impl`` against ``impl="reference"`` (outputs, input gradients and every parameter gradient); the FLOP
formula against a counted forward; save and reload through safetensors."""
from __future__ import annotations

import inspect
import sys

import pytest
import torch

from ditgraft.flops import count_flops
from ditgraft.models.checkpoints import load_state_strict, load_weights, save_safetensors
from ditgraft.operators import build_operator, get_spec, operator_flops, operator_names
from helpers import randomize_weights

DIM, HEADS, GRID = 16, 2, (4, 4)
OTHER_GRID = (2, 8)  # same token count, another layout
# Options under which the tiny grid exercises more of the operator: windows smaller than the grid, several tiles,
# several scan chunks. An operator not listed here is tested with its defaults.
TINY_OPTIONS = {
    "swa": {"window": 2, "block": 3},
    "local2d": {"kernel_size": 3, "tile": 3},
    "clear": {"radius": 2, "tile": 3},
    "mamba2": {"chunk_size": 6},
}
NAMES = operator_names()


def fast_impls(name: str) -> tuple[str, ...]:
    """The operator's ``impl`` choices other than "reference" (the module's ``*IMPLS`` tuple), or () without one."""
    cls = get_spec(name).cls
    if "impl" not in inspect.signature(cls).parameters:
        return ()
    module = sys.modules[cls.__module__]
    choices = [v for k, v in vars(module).items() if k.endswith("IMPLS") and isinstance(v, tuple)]
    assert len(choices) == 1 and "reference" in choices[0], (
        f"{name}: an operator with an impl option declares its choices, 'reference' among them, in one *IMPLS "
        f"tuple of {cls.__module__}; found {choices}")
    return tuple(i for i in choices[0] if i != "reference")


def build(name: str, seed: int = 0, grid=GRID, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_operator(name, DIM, HEADS, grid, **{**TINY_OPTIONS.get(name, {}), **options})


def tokens(n: int, batch: int = 2, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, n, DIM, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("name", NAMES)
def test_shape_and_grid_contract(name):
    op = randomize_weights(build(name), 0.3, seed=1)
    x = tokens(16)
    with torch.no_grad():
        out = op(x, GRID)
        assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
        torch.testing.assert_close(op(x), out, rtol=0, atol=0)  # the build grid is forward's default
        torch.testing.assert_close(op(x[1:], GRID), out[1:])  # samples do not mix
        assert op(x, OTHER_GRID).shape == x.shape  # any layout of the built token count
        y = tokens(18)
        try:  # another token count: supported, or refused with an error naming the token count
            assert op(y, (3, 6)).shape == y.shape
        except ValueError as err:
            assert "N=" in str(err), err


def run(op, x, grid):
    """Output, input gradient and every parameter's gradient for a fixed random upstream gradient."""
    op.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = op(x, grid)
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)).sum().backward()
    grads = {n: p.grad for n, p in op.named_parameters()}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no gradient reaches {missing}"
    return out.detach(), x.grad, grads


FAST = [(name, impl) for name in NAMES for impl in fast_impls(name)]


@pytest.mark.parametrize("name,impl", FAST, ids=[f"{n}-{i}" for n, i in FAST])
@pytest.mark.parametrize("grid", [GRID, OTHER_GRID], ids=lambda g: f"{g[0]}x{g[1]}")
def test_fast_impl_matches_reference_forward_and_backward(name, impl, grid):
    """In float64, so any difference beyond rounding is a bug, not fp32 noise."""
    ref = randomize_weights(build(name, impl="reference"), 0.3, seed=1).double()
    fast = build(name, impl=impl).double()
    fast.load_state_dict(ref.state_dict())
    x = tokens(16, dtype=torch.float64)
    (out_r, dx_r, grads_r), (out_f, dx_f, grads_f) = run(ref, x, grid), run(fast, x, grid)
    tol = dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out_f, out_r, **tol)
    torch.testing.assert_close(dx_f, dx_r, **tol)
    for n in grads_r:
        torch.testing.assert_close(grads_f[n], grads_r[n], **tol, msg=lambda m, n=n: f"grad of {n}: {m}")


# The formula counts the operator's ideal computation: the dense matmuls it needs, and for a local pattern only the
# (query, key) pairs the pattern allows. FlopCounterMode counts matmuls and convolutions (not elementwise work).
FLOP_DIM, FLOP_GRID = 32, (16, 16)


@pytest.mark.parametrize("name", NAMES)
def test_flop_formula_against_a_counted_forward(name):
    formula = operator_flops(name, FLOP_DIM, HEADS, FLOP_GRID)
    n = FLOP_GRID[0] * FLOP_GRID[1]
    x = torch.randn(1, n, FLOP_DIM)

    def counted(**options):
        torch.manual_seed(0)
        op = build_operator(name, FLOP_DIM, HEADS, FLOP_GRID, **options)
        with torch.no_grad():
            return count_flops(op, x, FLOP_GRID)

    op = build_operator(name, FLOP_DIM, HEADS, FLOP_GRID)
    if not hasattr(op, "mask"):
        # what runs by default (the fast path where there is one) is the computation the formula counts
        assert counted() == pytest.approx(formula, rel=0.03)
        return
    # A local pattern: the reference path runs dense N x N attention under the mask; the formula is that count
    # with the masked-out pairs taken away (QK^T and PV, 2 FLOPs per multiply-add, D channels each), exactly.
    dense = counted(impl="reference")
    blocked = n * n - int(op.mask(FLOP_GRID).sum())
    assert blocked > 0, f"{name}: the default pattern covers the whole {FLOP_GRID} grid; nothing local is tested"
    assert formula == dense - 2 * 2 * blocked * FLOP_DIM
    # The tiled paths gather rectangles of keys that cover each tile's windows: more pairs than the pattern allows
    # (1.4x to 2.6x the formula at this size), never fewer, and fewer than the dense path.
    for impl in fast_impls(name):
        if impl != "auto":
            assert formula <= counted(impl=impl) <= dense, impl


@pytest.mark.parametrize("name", NAMES)
def test_save_and_reload_gives_the_same_output(name, tmp_path):
    op = randomize_weights(build(name), 0.3, seed=1)
    path = str(tmp_path / f"{name}.safetensors")
    save_safetensors(path, op, {"operator": name, "options": TINY_OPTIONS.get(name, {})})
    fresh = build(name, seed=5)
    x = tokens(16)
    with torch.no_grad():
        expected = op(x, GRID)
        assert not torch.allclose(fresh(x, GRID), expected)  # a fresh build differs: the reload below does work
        load_state_strict(fresh, load_weights(path), path)
        torch.testing.assert_close(fresh(x, GRID), expected, rtol=0, atol=0)
