"""``ditgraft bench ops``: time token-mixing operators against MHA at one shape and compare with their FLOP counts.

For each operator: median time of ``repeats`` calls after ``warmup`` untimed rounds, all operators interleaved in one
run (see ``common.round_robin``). Columns:

- ``speedup``      = MHA time / operator time (measured)
- ``flop_speedup`` = MHA FLOPs / operator FLOPs (the registry's per-sample forward formula; the best a FLOP-bound
                     implementation could do)
- ``efficiency``   = speedup / flop_speedup (1.0 = the operator is as fast as its FLOPs promise, relative to MHA)
- ``gflop_per_s``  = achieved throughput (FLOPs / time), which shows whether an operator is compute- or
                     memory/overhead-bound
- ``limit_gflop_per_s`` = the matmul limit: this machine's fp32 (or ``dtype``) matmul throughput, measured in the same
                     interleaved run on the shape of an attention block's qkv projection, [batch * N, D] @ [D, 3D]
                     (with ``backward=True``: the three products of that linear layer's forward and backward, y = x W,
                     dx = dy W^T, dW = x^T dy, the same 3 x convention)
- ``limit_share``  = gflop_per_s / limit_gflop_per_s: how close the operator runs to the speed of one large matmul

With ``backward=True`` each call is forward + backward with respect to the input and all parameters; FLOPs are then
taken as 3 x forward (the usual rule: backward of a matmul costs twice its forward), so the FLOP-bound speed-up is the
forward one. Forward-only calls run under ``torch.inference_mode``.
"""
from __future__ import annotations

import math

import torch

from ditgraft.bench.common import (check_counts, environment, format_table, grid_for_tokens, param_count,
                                   profile_call, resolve_clock, resolve_device_dtype, round_robin, summarize,
                                   synchronizer)
from ditgraft.operators import build_operator, operator_flops, operator_names
from ditgraft.operators.common import check_grid

BASELINE = "mha"
LIMIT = "(matmul limit)"  # the round-robin name of the reference matmul; no operator name has brackets

__all__ = ["bench_ops", "format_table", "BASELINE"]


def _resolve_ops(ops: list[str] | None) -> list[str]:
    """Baseline first, then the asked operators (default: every token mixer), without duplicates."""
    known = operator_names("attn")
    names = known if ops is None else list(ops)
    for name in names:
        if name not in known:
            raise ValueError(f"operator={name!r} is not a token mixer; allowed: {', '.join(known)}")
    return [BASELINE] + [n for i, n in enumerate(names) if n != BASELINE and n not in names[:i]]


def _make_call(op: torch.nn.Module, x: torch.Tensor, grid: tuple[int, ...], backward: bool, grad_out: torch.Tensor):
    """A no-argument callable running one timed step of ``op``."""
    if not backward:
        def forward():
            with torch.inference_mode():
                op(x, grid=grid)
        return forward

    xg = x.detach().clone().requires_grad_()

    def forward_backward():
        xg.grad = None
        op.zero_grad(set_to_none=True)
        op(xg, grid=grid).backward(grad_out)
    return forward_backward


def matmul_limit_call(rows: int, dim: int, backward: bool, device: torch.device, dtype: torch.dtype,
                      gen: torch.Generator):
    """The reference matmul of the limit column: (a no-argument callable, its FLOPs). [rows, D] @ [D, 3D] into a
    preallocated output (no allocation timed); with ``backward`` also dx = dy W^T and dW = x^T dy, as a linear layer's
    backward computes them."""
    x = torch.randn(rows, dim, generator=gen).to(device, dtype)
    w = torch.randn(dim, 3 * dim, generator=gen).to(device, dtype) / math.sqrt(dim)
    y = torch.empty(rows, 3 * dim, device=device, dtype=dtype)
    flops = 2 * rows * dim * 3 * dim
    if not backward:
        return (lambda: torch.mm(x, w, out=y)), flops
    dx, dw = torch.empty_like(x), torch.empty_like(w)

    def forward_backward():
        torch.mm(x, w, out=y)
        torch.mm(y, w.t(), out=dx)  # y stands in for the output gradient: same shape, same cost
        torch.mm(x.t(), y, out=dw)
    return forward_backward, 3 * flops


def bench_ops(dim: int, tokens: int, heads: int, ops: list[str] | None = None, batch: int = 1, backward: bool = False,
              repeats: int = 5, warmup: int = 1, device: str = "cpu", dtype: str = "fp32",
              options: dict[str, dict] | None = None, *, grid: tuple[int, ...] | None = None,
              clock="wall", seed: int = 0, profile: bool = False) -> list[dict]:
    """Time MHA and ``ops`` (default: all token mixers) at one shape; one row per operator, MHA first.

    ``options`` maps an operator name to its build options, e.g. ``{"swa": {"window": 8}}``. ``grid`` ((rows,
    columns) or a video's (frames, rows, columns)) defaults to ``grid_for_tokens(tokens)``. An operator that fails to
    build or run gets a row with ``error`` and no times
    (the baseline failing is an error). ``clock``: "wall" (default), "cpu" (process CPU time, for loaded machines;
    see ``common.resolve_clock``) or a callable returning seconds (tests). ``profile=True`` adds to each timed row
    ``profile``: a torch.profiler table of the top aten operators by self time in one more call (with ``backward``,
    where the backward's time goes).
    """
    check_counts(dim=(dim, 1), tokens=(tokens, 1), heads=(heads, 1), batch=(batch, 1))
    check_counts(repeats=(repeats, 1), warmup=(warmup, 0))
    if dim % heads:
        raise ValueError(f"dim={dim} must be divisible by heads={heads}")
    dev, dt = resolve_device_dtype(device, dtype)
    options = dict(options or {})
    names = _resolve_ops(ops)
    for name in options:
        if name not in names:
            raise ValueError(f"options given for operator={name!r}, which is not benchmarked; ops: {', '.join(names)}")
    grid = check_grid(grid, tokens) if grid is not None else grid_for_tokens(tokens)
    sync = synchronizer(dev)
    timer = resolve_clock(clock, dev)
    env = environment(dev)

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, dim, generator=gen).to(dev, dt)
    grad_out = torch.randn(batch, tokens, dim, generator=gen).to(dev, dt) if backward else None

    common = dict(tokens=tokens, grid=list(grid), dim=dim, heads=heads, batch=batch, dtype=dtype, device=str(dev),
                  mode="fwd+bwd" if backward else "fwd", repeats=repeats, warmup=warmup,
                  clock=clock if isinstance(clock, str) else "custom")
    rows: dict[str, dict] = {}
    calls = {}
    for name in names:
        opts = options.get(name, {})
        row = {"operator": name, **common, "options": opts}
        rows[name] = row
        try:
            torch.manual_seed(seed)
            op = build_operator(name, dim, heads, grid, **opts).to(dev, dt)
            op.train(backward)
            row["params"] = param_count(op)
            flops = operator_flops(name, dim, heads, grid, **opts) * batch * (3 if backward else 1)
            row["gflops"] = flops / 1e9
            call = _make_call(op, x, grid, backward, grad_out)
            call()  # a first call outside the timing loop: a broken operator is reported, not fatal
            sync()
            calls[name] = call
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as err:
            if name == BASELINE:
                raise
            row["error"] = f"{type(err).__name__}: {err}"

    limit_call, limit_flops = matmul_limit_call(batch * tokens, dim, backward, dev, dt, gen)
    limit_call()
    sync()
    calls[LIMIT] = limit_call
    times = round_robin(calls, repeats, warmup, sync=sync, clock=timer)
    limit_s = summarize(times.pop(LIMIT))["time_ms"] / 1e3
    limit = limit_flops / 1e9 / limit_s if limit_s > 0 else math.nan

    base = summarize(times[BASELINE])["time_ms"]
    base_gflops = rows[BASELINE]["gflops"]
    for name, row in rows.items():
        if name not in times:
            continue
        row.update(summarize(times[name]))
        row["gflop_per_s"] = row["gflops"] / (row["time_ms"] / 1e3) if row["time_ms"] > 0 else math.nan
        row["speedup"] = base / row["time_ms"] if row["time_ms"] > 0 else math.nan
        row["flop_speedup"] = base_gflops / row["gflops"]
        row["efficiency"] = row["speedup"] / row["flop_speedup"]
        row["limit_gflop_per_s"] = limit
        row["limit_share"] = row["gflop_per_s"] / limit
        row["env"] = env
        if profile:
            row["profile"] = profile_call(calls[name], dev)
    for row in rows.values():
        row.setdefault("env", env)
    return list(rows.values())
