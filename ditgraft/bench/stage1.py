"""``ditgraft bench stage1``: one stage-1 training step against the sum of its parts: the engine's own overhead.

The model is a DiT (adaLN-Zero blocks, patch 2, 4 latent channels) of ``blocks`` blocks at width ``dim`` on a latent
whose patch grid has N tokens; ``operator`` is grafted into the attention slot of ``layers`` (default: the paper's
interleaved 50%). The step is the one ``ditgraft.graft.stage1`` runs in stream mode, built from its own pieces:

    noise a latent batch (q_sample, t ~ U{0..999}); one teacher forward under no_grad with ``capture_slots`` hooks;
    every new operator on its slot's captured input (``OperatorBank``), each against its own target
    (``_bank_losses``); one backward of the summed loss; per-operator gradient clipping; AdamW step.

(The training loop's logging, EMA and checkpointing are not part of it.) The parts, each timed alone in the same
interleaved run (``common.round_robin``): the teacher forward (no_grad, no hooks), and each operator's forward +
backward with its regression loss on a fixed captured input. ``overhead = step / sum(parts) - 1``: hooks, noising,
the optimizer and clipping, and whatever running the parts together costs beyond running them alone.
"""
from __future__ import annotations

import torch

from ditgraft.bench.common import (environment, format_table, grid_for_tokens, param_count,
                                   resolve_clock, resolve_device_dtype, round_robin, summarize, synchronizer)
from ditgraft.bench.model import check_stack_args
from ditgraft.diffusion.gaussian import GaussianDiffusion
from ditgraft.graft.stage1 import OperatorBank, _bank_losses, capture_slots
from ditgraft.graft.surgery import ResolvedGraft, make_operators
from ditgraft.models.dit import DiT

__all__ = ["bench_stage1", "format_table"]


def bench_stage1(dim: int = 1152, heads: int = 16, blocks: int = 4, tokens=(4096,), operator: str = "hyena_x",
                 layers="interleave", batch: int = 1, repeats: int = 3, warmup: int = 1, device: str = "cpu",
                 dtype: str = "fp32", *, options: dict | None = None, clock="wall", seed: int = 0,
                 grad_clip: float = 1.0, lr: float = 1e-4) -> dict:
    """A measured stage-1 step vs its parts at each N in ``tokens``; one row per N (see the module docstring).
    ``warmup`` untimed rounds come after one untimed call of each (so the optimizer state exists)."""
    tokens, replaced = check_stack_args(tokens, dim, heads, blocks, batch, repeats, warmup, operator, layers)
    dev, dt = resolve_device_dtype(device, dtype)
    if dt != torch.float32:
        raise ValueError(f"dtype={dtype!r} is not allowed for bench stage1: stage 1 trains in fp32; use dtype='fp32'")
    sync = synchronizer(dev)
    timer = resolve_clock(clock, dev)
    options = dict(options or {})
    config = dict(dim=dim, heads=heads, blocks=blocks, tokens=tokens, operator=operator, options=options,
                  layers=layers if isinstance(layers, str) else list(replaced), replaced=replaced, batch=batch,
                  repeats=repeats, warmup=warmup, device=str(dev), dtype=dtype, grad_clip=grad_clip, lr=lr,
                  clock=clock if isinstance(clock, str) else "custom")
    result = {"config": config, "env": environment(dev), "rows": []}
    diffusion = GaussianDiffusion.dit_default()

    for n in tokens:
        grid = grid_for_tokens(n)
        torch.manual_seed(seed)
        teacher = DiT(input_size=(2 * grid[0], 2 * grid[1]), patch_size=2, in_channels=4, hidden_size=dim,
                      depth=blocks, num_heads=heads, num_classes=10).to(dev).eval()
        teacher.requires_grad_(False)
        grafts = [ResolvedGraft("attn", i, operator, options) for i in replaced]
        keys = [g.key for g in grafts]
        losses = {g.key: (g.loss, g.huber_delta) for g in grafts}
        bank = OperatorBank(make_operators(teacher, grafts, seed)).to(dev)
        opt = torch.optim.AdamW(bank.parameters(), lr=lr)
        clip_groups = [list(op.parameters()) for op in bank.ops.values()]
        gen = torch.Generator().manual_seed(seed)
        x0 = torch.randn(batch, 4, 2 * grid[0], 2 * grid[1], generator=gen).to(dev)
        y = torch.randint(0, 10, (batch,), generator=gen).to(dev)

        def step():
            opt.zero_grad(set_to_none=True)
            t = torch.randint(0, diffusion.num_timesteps, (batch,), device=dev)
            x_t = diffusion.q_sample(x0, t, torch.randn_like(x0))
            with torch.no_grad(), capture_slots(teacher, grafts) as captured:
                teacher(x_t, t, y)
            _bank_losses(bank, {k: captured[k] for k in keys}, losses)["loss"].backward()
            for group in clip_groups:
                torch.nn.utils.clip_grad_norm_(group, grad_clip)
            opt.step()

        t_fixed = torch.full((batch,), diffusion.num_timesteps // 2, device=dev)
        x_fixed = diffusion.q_sample(x0, t_fixed, torch.randn(x0.shape, generator=gen).to(dev))
        with torch.no_grad(), capture_slots(teacher, grafts) as captured:
            teacher(x_fixed, t_fixed, y)
        pairs = {k: captured[k] for k in keys}

        def teacher_forward():
            with torch.no_grad():
                teacher(x_fixed, t_fixed, y)

        def operator_step(key):
            def forward_backward():
                bank.ops[key].zero_grad(set_to_none=True)
                _bank_losses(bank, {key: pairs[key]}, losses)["loss"].backward()
            return forward_backward

        calls = {"step": step, "teacher_forward": teacher_forward}
        calls.update({f"operator:{k}": operator_step(k) for k in keys})
        for call in calls.values():
            call()
        sync()
        times = round_robin(calls, repeats, warmup, sync=sync, clock=timer)
        t_ms = {name: summarize(times[name]) for name in calls}
        parts_ms = sum(t_ms[name]["time_ms"] for name in calls if name != "step")
        result["rows"].append({
            "tokens": n, "grid": list(grid), "candidate": operator, "replaced": replaced,
            "teacher_params": param_count(teacher), "operator_params": param_count(bank),
            "step_ms": t_ms["step"]["time_ms"], "teacher_forward_ms": t_ms["teacher_forward"]["time_ms"],
            "operators_ms": {k: t_ms[f"operator:{k}"]["time_ms"] for k in keys},
            "parts_ms": parts_ms, "overhead": t_ms["step"]["time_ms"] / parts_ms - 1,
            "samples_ms": {name: t_ms[name]["samples_ms"] for name in calls},
        })
        del teacher, bank, opt, calls, pairs
    return result
