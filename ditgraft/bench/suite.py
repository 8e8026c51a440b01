"""A benchmark suite in one call: ``python -m ditgraft.bench.suite --out DIR [--preset gpu|tiny] [--dry-run]``
(``scripts/gpu_bench.sh`` installs what it needs and runs the ``gpu`` preset).

Sections, each a list of rows in ``results.json`` and a table in ``results.md`` (``common.format_table``, the
docs/BENCHMARKS.md format):

- ``paths``: the path each operator takes on the device (``ditgraft ops``'s column);
- ``ops_fwd`` / ``ops_fwd_bwd``: ``bench ops`` at width D, every local / Hyena / Mamba-2 operator against MHA, with the
  GPU kernels and, at the largest N, without them (``kernels.kernels_disabled``: the PyTorch paths), marked
  ``[torch]``;
- ``model``: ``bench model``, DiT-XL/2's 28 blocks at 256 tokens, the paper's interleaved 50% of each operator;
- ``pixart``: ``bench model --family pixart``, PixArt-Sigma XL/2 at 2048 px (16,384 tokens), Hyena-X in the paper's
  14 layers;
- ``sampling``: one denoising step of whole DiT-XL/2 models with classifier-free guidance (``forward_with_cfg``, the
  batch doubled), the teacher against the grafted model, the restructured 14-unit model and the same with its
  units fused (``restructure.fuse_parallel_units``); ``sample_s`` is the time of ``steps`` such steps.

The ``gpu`` preset is sized to finish in under ten minutes on one recent GPU (bf16); ``tiny`` runs every section at toy
sizes on the CPU in seconds (to check the suite itself). A section that fails is recorded with its error and the rest
still run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
import traceback

import torch

from ditgraft.bench.common import (DTYPES, environment, format_table, resolve_clock, resolve_device_dtype,
                                   round_robin, summarize, synchronizer)

PRESETS = {
    "gpu": dict(device="cuda", dtype="bf16", dim=1152, heads=16, ops=["swa", "local2d", "clear", "hyena_x",
                                                                      "hyena_se", "mamba2"],
                op_tokens=[4096, 16384], bwd_tokens=[16384], repeats=10, warmup=2,
                model_blocks=28, model_tokens=256, model_batch=8, model_ops=["hyena_x", "swa", "local2d", "mamba2"],
                pixart=dict(blocks=28, heads=16, head_dim=72, tokens=16384, text_tokens=300, caption_channels=4096),
                sample=dict(input_size=32, batch=8, steps=250)),
    "tiny": dict(device="cpu", dtype="fp32", dim=32, heads=2, ops=["swa", "local2d", "hyena_x", "mamba2"],
                 op_tokens=[64], bwd_tokens=[64], repeats=1, warmup=0,
                 model_blocks=2, model_tokens=64, model_batch=1, model_ops=["hyena_x"],
                 pixart=dict(blocks=2, heads=2, head_dim=16, tokens=64, text_tokens=8, caption_channels=32),
                 sample=dict(input_size=8, batch=1, steps=250)),
}


def _ops_rows(p: dict, backward: bool, tokens: list[int]) -> list[dict]:
    from ditgraft.bench.ops import bench_ops
    from ditgraft.operators.kernels import kernels_disabled

    rows = []
    for n in tokens:
        runs = [("", contextlib.nullcontext)]
        if n == tokens[-1] and p["device"] != "cpu":  # the PyTorch paths beside the kernels (on CPU they are one)
            runs.append((" [torch]", kernels_disabled))
        for tag, context in runs:
            with context():
                part = bench_ops(p["dim"], n, p["heads"], p["ops"], backward=backward, repeats=p["repeats"],
                                 warmup=p["warmup"], device=p["device"], dtype=p["dtype"])
            for r in part:
                r.pop("env", None)
                r["operator"] += tag
            rows += part
    return rows


def _model_rows(p: dict) -> list[dict]:
    from ditgraft.bench.model import bench_model

    rows = []
    for op in p["model_ops"]:
        result = bench_model(p["dim"], p["heads"], p["model_blocks"], [p["model_tokens"]], op, "interleave",
                             batch=p["model_batch"], repeats=p["repeats"], warmup=p["warmup"], device=p["device"],
                             dtype=p["dtype"])
        rows += result["rows"]
    return rows


def _pixart_rows(p: dict) -> list[dict]:
    from ditgraft.bench.family import bench_family

    q = p["pixart"]
    layers = None if q["blocks"] == 28 else list(range(1, q["blocks"], 2))
    return bench_family("pixart", operator="hyena_x", layers=layers, repeats=p["repeats"], warmup=p["warmup"],
                        device=p["device"], dtype=p["dtype"], **q)["rows"]


def sampling_rows(dim: int, heads: int, depth: int, input_size: int, batch: int, steps: int, device: str = "cpu",
                  dtype: str = "fp32", repeats: int = 3, warmup: int = 1, operator: str = "hyena_x",
                  seed: int = 0) -> list[dict]:
    """One classifier-free-guidance denoising step (``forward_with_cfg`` on 2 x ``batch``) of a DiT of this shape:
    the teacher, ``operator`` in the odd blocks, the restructured model (all pairs parallel) and the same fused. One
    row per model: ``time_ms`` per step, ``sample_s`` for ``steps`` steps, ``speedup`` against the teacher."""
    from ditgraft.graft.restructure import fuse_parallel_units, resolve_restructure, restructured_copy
    from ditgraft.models.dit import DiT
    from ditgraft.operators import build_operator

    dev, dt = resolve_device_dtype(device, dtype)
    sync, clock = synchronizer(dev), resolve_clock("wall", dev)
    torch.manual_seed(seed)
    teacher = DiT(input_size=input_size, hidden_size=dim, depth=depth, num_heads=heads)
    grafted = copy.deepcopy(teacher)
    for i in range(1, depth, 2):
        block = grafted.blocks[i]
        block.attn = build_operator(operator, dim, heads, block.attn.grid)
    parallel = restructured_copy(teacher, resolve_restructure({"parallel_pairs": "all"}, depth))
    fused = copy.deepcopy(parallel)
    fuse_parallel_units(fused)
    models = {"teacher": teacher, f"{operator} (odd blocks)": grafted, f"parallel {depth // 2} units": parallel,
              f"parallel {depth // 2} units, fused": fused}
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * batch, teacher.in_channels, input_size, input_size, generator=gen).to(dev, dt)
    t = torch.full((2 * batch,), 500, device=dev)
    y = torch.cat([torch.randint(0, 1000, (batch,), generator=gen), torch.full((batch,), 1000)]).to(dev)

    def step(model):
        model = model.to(dev, dt).eval()

        def call():
            with torch.inference_mode():
                model.forward_with_cfg(x, t, y, 1.5)
        return call

    calls = {name: step(m) for name, m in models.items()}
    for call in calls.values():  # a first call outside the timing (compilation, lazy init)
        call()
    sync()
    times = round_robin(calls, repeats, warmup, sync=sync, clock=clock)
    base = summarize(times["teacher"])["time_ms"]
    rows = []
    for name in models:
        ms = summarize(times[name])["time_ms"]
        rows.append({"candidate": name, "tokens": (input_size // 2) ** 2, "mode": f"cfg step, batch {batch}",
                     "time_ms": ms, "steps": steps, "sample_s": ms * steps / 1e3, "speedup": base / ms,
                     "params": sum(p.numel() for p in models[name].parameters())})
    return rows


def _paths_rows(p: dict) -> list[dict]:
    from ditgraft.operators.table import ops_table

    rows = ops_table(p["dim"], p["op_tokens"][-1], p["heads"], device=p["device"], dtype=DTYPES[p["dtype"]])
    return [{"operator": r["operator"] + (f" {r['options']}" if r["options"] else ""), "path": r["path"]}
            for r in rows]


def run_suite(out: str, preset: str = "gpu", dry_run: bool = False, sections: list[str] | None = None) -> dict:
    """Run the preset's sections (default all) and write ``out/results.json`` and ``out/results.md``; returns the
    results. ``dry_run``: only the plan (sections and sizes), nothing run or written."""
    from ditgraft.bench.cli import _finite
    from ditgraft.utils import atomic_write_json, atomic_write_text

    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not allowed; use one of {tuple(PRESETS)}")
    p = PRESETS[preset]
    s = p["sample"]
    plan = {
        "paths": lambda: _paths_rows(p),
        "ops_fwd": lambda: _ops_rows(p, False, p["op_tokens"]),
        "ops_fwd_bwd": lambda: _ops_rows(p, True, p["bwd_tokens"]),
        "model": lambda: _model_rows(p),
        "pixart": lambda: _pixart_rows(p),
        "sampling": lambda: sampling_rows(p["dim"], p["heads"], p["model_blocks"], s["input_size"], s["batch"],
                                          s["steps"], p["device"], p["dtype"], p["repeats"], p["warmup"]),
    }
    chosen = list(plan) if sections is None else sections
    for name in chosen:
        if name not in plan:
            raise ValueError(f"section={name!r} is not allowed; use some of {tuple(plan)}")
    if dry_run:
        return {"preset": preset, "settings": p, "sections": chosen}
    resolve_device_dtype(p["device"], p["dtype"])  # fail before any work on a machine without the device
    # each operator pattern, shape and mode compiles FlexAttention once; the suite runs more of them than dynamo's
    # default recompile limit (8), past which it would silently run eagerly
    dynamo = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, max(getattr(dynamo, name), 64))
    results = {"preset": preset, "settings": p, "env": environment(torch.device(p["device"])), "sections": {}}
    lines = [f"# Benchmark suite, preset {preset} ({p['device']}, {p['dtype']}, D={p['dim']})", ""]
    for name in chosen:
        start = time.perf_counter()
        try:
            rows, error = plan[name](), None
        except Exception as err:  # noqa: BLE001 - one failing section (a missing package, OOM) must not lose the rest
            rows, error = [], f"{type(err).__name__}: {err}"
            traceback.print_exc()
        seconds = time.perf_counter() - start
        results["sections"][name] = {"rows": rows, "error": error, "seconds": round(seconds, 1)}
        lines += [f"## {name} ({seconds:.0f} s)", ""]
        lines += [f"error: {error}"] if error else [_table(name, rows)]
        lines.append("")
        print(f"{name}: {len(rows)} rows in {seconds:.1f} s" + (f" ({error})" if error else ""), flush=True)
        atomic_write_json(f"{out}/results.json", _finite(results))  # after every section: a partial run keeps its part
        atomic_write_text(f"{out}/results.md", "\n".join(lines))
    return results


def _table(name: str, rows: list[dict]) -> str:
    if name == "paths":
        return "\n".join(["| operator | path |", "|---|---|"] + [f"| {r['operator']} | {r['path']} |" for r in rows])
    table = format_table(rows)
    if name == "sampling":  # the steps' total is not one of the shared columns
        table += "\n\n" + "\n".join(f"- {r['candidate']}: {r['sample_s']:.2f} s for {r['steps']} steps" for r in rows)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ditgraft.bench.suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_suite", help="folder for results.json and results.md")
    parser.add_argument("--preset", default="gpu", choices=tuple(PRESETS))
    parser.add_argument("--sections", nargs="+", default=None, help="a subset of the sections (default all)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan only")
    args = parser.parse_args(argv)
    result = run_suite(args.out, args.preset, args.dry_run, args.sections)
    if args.dry_run:
        print(json.dumps(result, indent=1))
    else:
        print(f"wrote {args.out}/results.json and {args.out}/results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
