"""``ditgraft bench sample``: a model's protocol sampling, eager against compiled, side by side in one process.

One batch of the evaluation protocol (``eval.sampling.generate``: labels i % num_classes, the protocol's sampler,
steps, guidance and seed) is sampled eagerly and through the family's compiled forward (``compile=True``, see
``diffusion.samplers``). Both draw the same noise from the same seed, so they sample the same images:
``max_abs_diff`` is the largest difference between the two sample sets (float rounding only).

- Steady state: after their first calls both run interleaved (``common.round_robin``) ``repeats`` times; the
  median is reported, in process CPU time by default on a CPU (robust on a shared machine; with more than one
  thread it sums the threads) and wall time on a GPU. ``speedup`` = eager median / compiled median.
- First calls: each path's first call runs alone and is reported apart (``first_s``), on the same clock, except
  that CPU time includes the finished child processes (``common.cpu_with_children``: the compile runs the C++
  compiler there); the compiled one includes the compile. ``compile_s`` = first compiled call - compiled median:
  what the compile adds, paid once per process (a warm on-disk inductor cache, left by an earlier compile of the
  same model structure on this machine, shortens it). ``first_wall_s``: the first calls' wall time (what one waits
  on a loaded machine, so only a rough figure).
- ``gflop_per_s``: the model forwards' FLOPs (``flops.dit_forward_flops_per_sample`` x the batch, doubled under
  guidance, x steps) per second of the median call; the sampler's own arithmetic is not counted.
"""
from __future__ import annotations

import time

from ditgraft.bench.common import (check_counts, cpu_with_children, environment, resolve_clock, resolve_device_dtype,
                                   round_robin, summarize, synchronizer)
from ditgraft.diffusion.samplers import SamplingConfig
from ditgraft.eval.evaluate import TESTBED_PROTOCOL
from ditgraft.eval.sampling import decoding, generate
from ditgraft.flops import dit_forward_flops_per_sample
from ditgraft.models.families import family_of

CANDIDATES = ("eager", "compiled")  # sample(..., compile=False) and sample(..., compile=True)


def bench_sample(model="testbed", batch: int = TESTBED_PROTOCOL.batch_size, steps: int = TESTBED_PROTOCOL.steps,
                 sampler: str = TESTBED_PROTOCOL.sampler, cfg_scale: float = TESTBED_PROTOCOL.cfg_scale,
                 seed: int = TESTBED_PROTOCOL.seed, repeats: int = 3, warmup: int = 0, device: str = "cpu",
                 clock=None) -> dict:
    """Eager vs compiled sampling of one protocol batch: ``{"config", "env", "rows": [eager, compiled],
    "compile_s", "speedup", "max_abs_diff"}``. ``model``: a module, or a source ``ditgraft eval`` loads ("testbed",
    a checkpoint, a run directory). ``clock``: "cpu" / "wall" (default: cpu on a CPU, wall on a GPU) or a callable
    (tests)."""
    check_counts(batch=(batch, 1), steps=(steps, 1), repeats=(repeats, 1), warmup=(warmup, 0))
    dev, _ = resolve_device_dtype(device, "fp32")
    source = model if isinstance(model, str) else type(model).__name__
    if isinstance(model, str):
        from ditgraft.graft.surgery import load_any

        model, _ = load_any(model, map_location="cpu")
    model = model.to(dev).eval()
    family = family_of(model)
    family.require("compile", "bench sample")
    clock = clock or ("cpu" if dev.type == "cpu" else "wall")
    timer, sync = resolve_clock(clock, dev), synchronizer(dev)
    cfg = SamplingConfig(sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                         clip_denoised=decoding(model, need_decoder=False)[0])

    def call(compiled: bool):
        return lambda: generate(model, batch, cfg, seed=seed, batch_size=batch, device=dev, raw=True,
                                compile=compiled)

    calls = {name: call(name == "compiled") for name in CANDIDATES}
    first_timer = cpu_with_children if clock == "cpu" else timer
    first_s, first_wall_s, samples = {}, {}, {}
    for name, fn in calls.items():  # each first call alone: the compiled one compiles
        sync()
        start, wall = first_timer(), time.perf_counter()
        samples[name] = fn()[0]
        sync()
        first_s[name], first_wall_s[name] = first_timer() - start, time.perf_counter() - wall
    times = round_robin(calls, repeats, warmup, sync=sync, clock=timer)
    t_ms = {name: summarize(times[name]) for name in CANDIDATES}
    forwards = batch * (2 if cfg_scale > 1 else 1) * steps
    flops = dit_forward_flops_per_sample(model) * forwards
    max_abs_diff = float(abs(samples["compiled"] - samples["eager"]).max())
    speedup = t_ms["eager"]["time_ms"] / t_ms["compiled"]["time_ms"]
    rows = []
    for name in CANDIDATES:
        rows.append({"candidate": name, "gflops": flops / 1e9, "time_ms": t_ms[name]["time_ms"],
                     "min_ms": t_ms[name]["min_ms"], "samples_ms": t_ms[name]["samples_ms"], "first_s": first_s[name],
                     "first_wall_s": first_wall_s[name],
                     "gflop_per_s": flops / 1e9 / (t_ms[name]["time_ms"] / 1e3),
                     "speedup": t_ms["eager"]["time_ms"] / t_ms[name]["time_ms"]})
    rows[1].update(compile_s=first_s["compiled"] - t_ms["compiled"]["time_ms"] / 1e3, max_abs_diff=max_abs_diff)
    config = dict(model=source, family=family.name, batch=batch, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                  seed=seed, repeats=repeats, warmup=warmup, device=str(dev),
                  clock=clock if isinstance(clock, str) else "custom")
    return {"config": config, "env": environment(dev), "rows": rows, "compile_s": rows[1]["compile_s"],
            "speedup": speedup, "max_abs_diff": max_abs_diff}
