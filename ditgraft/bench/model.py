"""``ditgraft bench model``: a DiT-XL/2-shaped stack of blocks, all-MHA teacher vs a grafted candidate.

The stack is ``blocks`` DiT blocks (adaLN-Zero, MLP ratio 4) at width ``dim`` on a token grid of N tokens, without
the embedders and final layer (they cost the same in both models and are negligible). The candidate is the same stack
with ``blocks[i].attn`` replaced by ``operator`` in the chosen layers (default: the paper's interleaved 50%,
odd blocks).
Forward time is measured with teacher and candidate interleaved (``common.round_robin``), under inference mode;
``backward=True`` times forward + backward instead (a training step's compute: the stacks in train mode, the
gradient of a fixed random output cotangent w.r.t. the input and every parameter), after one untimed step each.

FLOP bound: FLOPs of the whole stacks counted by ``ditgraft.flops.count_flops`` (torch's FlopCounterMode: matmuls,
convolutions, attention) on one real forward under ``torch.no_grad``; that counted forward doubles as the first
warm-up round; with ``backward`` both stacks' FLOPs are 3 x that forward (a backward is two matmuls per forward
matmul; torch's counter overcounts depthwise-convolution backwards, see ``ditgraft.flops``), so the FLOP-bound
speed-up is the forward one. ``efficiency = speedup / flop_speedup`` (target: >= 0.9). ``flop_speedup_formula`` uses the
registry's formula for the replaced operators instead of what their implementation executes (the two differ where an
implementation does redundant work, e.g. the padded key tiles of local attention).

``profile=True`` adds, per N, a torch.profiler table of the top operators by self time for one timed call (forward,
or forward + backward) of each stack: where the time goes, the backward's included.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ditgraft.bench.common import (check_counts, environment, format_table, grid_for_tokens, param_count,
                                   profile_call, resolve_clock, resolve_device_dtype, round_robin, summarize,
                                   synchronizer)
from ditgraft.flops import count_flops
from ditgraft.layers import layers_from_text, selector_names
from ditgraft.models.dit import DiTBlock
from ditgraft.operators import build_operator, operator_flops, operator_names

# the recipes' selectors that need no analysis or probe run (``interleave75`` = ``interleave:0.75``)
LAYER_SETS = selector_names(needing_nothing=True) + ("interleave75",)

__all__ = ["bench_model", "select_layers", "BlockStack", "format_table", "LAYER_SETS"]


def select_layers(layers, blocks: int) -> list[int]:
    """Block indices to replace: a layer set of the recipes' selectors as ``ditgraft.layers.layers_from_text``
    reads it ("interleave": odd blocks, "interleave:0.75" or "interleave75", "all", "deepest:0.25", "1,3", ...) or an
    explicit list of indices."""
    if isinstance(layers, str):
        return layers_from_text("interleave:0.75" if layers == "interleave75" else layers, blocks)
    idx = sorted({int(i) for i in layers})
    if not idx or idx[0] < 0 or idx[-1] >= blocks:
        raise ValueError(f"layers={list(layers)!r} is not allowed: give indices in [0, {blocks - 1}] (blocks={blocks})")
    return idx


class BlockStack(nn.Module):
    """``blocks`` DiT blocks applied in sequence: forward(x [B, N, D], c [B, D]) -> [B, N, D]."""

    def __init__(self, dim: int, heads: int, blocks: int, grid: tuple[int, int], mlp_ratio: float = 4.0):
        super().__init__()
        self.blocks = nn.ModuleList([DiTBlock(dim, heads, mlp_ratio=mlp_ratio, grid=grid) for _ in range(blocks)])

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, c)
        return x


def graft(stack: BlockStack, operator: str, layers: list[int], dim: int, heads: int, grid: tuple[int, int],
          options: dict | None = None) -> BlockStack:
    """A copy of ``stack`` whose ``blocks[i].attn`` is a fresh ``operator`` for every i in ``layers``."""
    out = copy.deepcopy(stack)
    for i in layers:
        out.blocks[i].attn = build_operator(operator, dim, heads, grid, **(options or {}))
    return out


def check_stack_args(tokens, dim: int, heads: int, blocks: int, batch: int, repeats: int, warmup: int,
                     operator: str, layers) -> tuple[list[int], list[int]]:
    """The argument checks shared by the DiT-stack benches (``bench model``, ``bench stage1``): counts, a non-empty
    ``tokens``, ``heads`` dividing ``dim``, a token-mixer ``operator``. Returns (tokens as a list, replaced layers)."""
    tokens = [tokens] if isinstance(tokens, int) else list(tokens)
    check_counts(dim=(dim, 1), heads=(heads, 1), blocks=(blocks, 1), batch=(batch, 1),
                 repeats=(repeats, 1), warmup=(warmup, 0))
    if not tokens:
        raise ValueError("tokens=[] is not allowed: give at least one token count")
    if dim % heads:
        raise ValueError(f"dim={dim} must be divisible by heads={heads}")
    if operator not in operator_names("attn"):
        raise ValueError(f"operator={operator!r} is not a token mixer; allowed: {', '.join(operator_names('attn'))}")
    replaced = select_layers(layers, blocks)
    return tokens, replaced


def bench_model(dim: int = 1152, heads: int = 16, blocks: int = 4, tokens=(4096, 16384), operator: str = "hyena_x",
                layers="interleave", batch: int = 1, repeats: int = 3, warmup: int = 1, device: str = "cpu",
                dtype: str = "fp32", profile: bool = False, backward: bool = False, *, mlp_ratio: float = 4.0,
                options: dict | None = None, clock="wall", seed: int = 0) -> dict:
    """Teacher (all MHA) vs candidate (``operator`` in ``layers``) forward (or forward + backward) time at each N.

    Returns ``{"config", "env", "rows": [one per N], "profile": {N: {"teacher", "candidate"}}}`` (profile only when
    asked). ``warmup`` counts the FLOP-counting forward: at least one untimed forward of each stack always runs.
    ``clock``: "wall" (default), "cpu" (process CPU time; see ``common.resolve_clock``) or a callable (tests).
    """
    tokens, replaced = check_stack_args(tokens, dim, heads, blocks, batch, repeats, warmup, operator, layers)
    dev, dt = resolve_device_dtype(device, dtype)
    sync = synchronizer(dev)
    timer = resolve_clock(clock, dev)
    options = dict(options or {})
    config = dict(dim=dim, heads=heads, blocks=blocks, tokens=tokens, operator=operator, options=options,
                  layers=layers if isinstance(layers, str) else list(replaced), replaced=replaced, batch=batch,
                  repeats=repeats, warmup=warmup, device=str(dev), dtype=dtype, mlp_ratio=mlp_ratio,
                  mode="fwd+bwd" if backward else "fwd",
                  clock=clock if isinstance(clock, str) else "custom")
    result = {"config": config, "env": environment(dev), "rows": []}
    if profile:
        result["profile"] = {}

    for n in tokens:
        grid = grid_for_tokens(n)
        torch.manual_seed(seed)
        teacher = BlockStack(dim, heads, blocks, grid, mlp_ratio)
        torch.manual_seed(seed + 1)
        candidate = graft(teacher, operator, replaced, dim, heads, grid, options)
        stacks = {"teacher": teacher.to(dev, dt).train(backward), "candidate": candidate.to(dev, dt).train(backward)}
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, n, dim, generator=gen).to(dev, dt)
        c = torch.randn(batch, dim, generator=gen).to(dev, dt)

        def forward_fn(stack):
            def forward():
                with torch.inference_mode():
                    stack(x, c)
            return forward

        def step_fn(stack):
            xg = x.detach().clone().requires_grad_()
            grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 2)).to(dev, dt)

            def forward_backward():
                xg.grad = None
                stack.zero_grad(set_to_none=True)
                stack(xg, c).backward(grad_out)
            return forward_backward

        calls = {name: (step_fn if backward else forward_fn)(s) for name, s in stacks.items()}
        flops = {}
        for name, stack in stacks.items():  # the counted forward is also the first warm-up round
            with torch.no_grad():
                flops[name] = count_flops(stack, x, c)
            sync()
        if backward:
            for call in calls.values():  # the counted forward did not warm up the backward
                call()
            sync()
        # on CUDA the counted forward ran the PyTorch paths (GPU kernels do not run under the counter): it is a
        # warm-up round only on CPU or where the untimed step above ran the kernels
        rounds = max(warmup - 1, 0) if dev.type == "cpu" or backward else warmup
        times = round_robin(calls, repeats, rounds, sync=sync, clock=timer)
        t_ms = {name: summarize(times[name]) for name in stacks}

        # the formula bound: teacher FLOPs with the replaced MHAs' formula swapped for the operator's formula
        per_mha = operator_flops("mha", dim, heads, grid) * batch
        per_op = operator_flops(operator, dim, heads, grid, **options) * batch
        formula_candidate = flops["teacher"] + len(replaced) * (per_op - per_mha)

        speedup = t_ms["teacher"]["time_ms"] / t_ms["candidate"]["time_ms"]
        flop_speedup = flops["teacher"] / flops["candidate"]
        factor = 3 if backward else 1
        result["rows"].append({
            "tokens": n, "mode": config["mode"], "grid": list(grid), "candidate": operator, "replaced": replaced,
            "teacher_params": param_count(teacher), "candidate_params": param_count(candidate),
            "teacher_gflops": factor * flops["teacher"] / 1e9, "candidate_gflops": factor * flops["candidate"] / 1e9,
            "teacher_ms": t_ms["teacher"]["time_ms"], "candidate_ms": t_ms["candidate"]["time_ms"],
            "teacher_samples_ms": t_ms["teacher"]["samples_ms"],
            "candidate_samples_ms": t_ms["candidate"]["samples_ms"],
            "speedup": speedup, "flop_speedup": flop_speedup, "efficiency": speedup / flop_speedup,
            "flop_speedup_formula": flops["teacher"] / formula_candidate,
            "efficiency_formula": speedup / (flops["teacher"] / formula_candidate),
        })
        if profile:
            result["profile"][str(n)] = {name: profile_call(calls[name], dev) for name in stacks}
        del stacks, teacher, candidate, calls, x, c
    return result
