"""The ``ditgraft bench`` command line: ``ops``, ``model``, ``stage1`` and ``sample`` sub-commands. The CLI module only
wires these in: ``add_bench_arguments(sub.add_parser("bench"))``; ``run_bench(args)`` runs one, prints its table(s)
and writes JSON if asked."""
from __future__ import annotations

import math

from ditgraft.bench.common import CLOCKS, DTYPES, format_table, retain_freed_memory, set_threads
from ditgraft.bench.model import LAYER_SETS


def add_bench_arguments(parser) -> None:
    """Add the ``ops``, ``model``, ``stage1`` and ``sample`` sub-commands to the ``bench`` parser; each sets
    ``fn=run_bench``."""
    sub = parser.add_subparsers(dest="bench_command", required=True)

    from ditgraft.argtypes import add_device, patch_grid, positive_int
    from ditgraft.bench.family import FAMILIES

    def shared(p, repeats: int) -> None:
        p.add_argument("--dim", type=int, default=1152, help="model width D (default 1152, DiT-XL/2)")
        p.add_argument("--heads", type=int, default=16)
        p.add_argument("--batch", type=int, default=1)
        p.add_argument("--repeats", type=int, default=repeats, help="timed calls per candidate (median reported)")
        p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
        add_device(p, default="cpu")  # a timing runs where it is told: never on a GPU by default
        p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="bf16/fp16 on CUDA only")
        p.add_argument("--threads", type=positive_int, default=None,
                       help="torch CPU threads (default: torch's choice)")
        p.add_argument("--clock", default="wall", choices=CLOCKS,
                       help="wall (latency, default) or cpu (process CPU time: robust on a shared machine with "
                            "--threads 1)")
        p.add_argument("--retain-memory", action="store_true",
                       help="CPU: keep freed memory in the process (glibc malloc without per-block mmap), so that "
                            "large temporaries are not page-faulted in again on every allocation; see "
                            "docs/BENCHMARKS.md")
        p.add_argument("--option", action="append", default=[], metavar="NAME.KEY=VALUE",
                       help="operator build option, repeatable, e.g. swa.window=8 or hyena_x.direction=2d")
        p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
        p.set_defaults(fn=run_bench)

    def stack(p, tokens: list[int]) -> None:
        p.add_argument("--tokens", type=int, nargs="+", default=tokens, help=f"sequence lengths (default {tokens})")
        p.add_argument("--blocks", type=int, default=None, help="blocks (default 4; with --family its depth)")
        p.add_argument("--operator", default="hyena_x", help="operator put into the replaced blocks (default hyena_x)")
        p.add_argument("--layers", default="interleave",
                       help="blocks to replace: a selector (" + ", ".join(LAYER_SETS) + "; e.g. interleave:0.75 or "
                       "deepest:0.25) or indices like 1,3 or a slice 1:8:2")

    s = sub.add_parser("ops", help="time each token mixer against MHA at one shape (interleaved runs)")
    shared(s, repeats=5)
    s.add_argument("--tokens", type=int, nargs="+", default=[4096], help="sequence length(s) N (default 4096)")
    s.add_argument("--grid", type=patch_grid, nargs="+", default=None, metavar="HxW|FxHxW",
                   help="patch grid(s) instead of --tokens, e.g. 64x64 or a video's 21x30x52 (frames x rows x "
                        "columns); without it each N runs on its most square H x W grid")
    s.add_argument("--ops", nargs="+", default=None, help="operators (default: all token mixers); MHA always runs")
    s.add_argument("--backward", action="store_true", help="time forward + backward instead of forward only")
    s.add_argument("--profile", action="store_true",
                   help="print each operator's top torch ops by self time (with --backward: where the backward's "
                        "time goes)")

    m = sub.add_parser("model", help="DiT-XL/2-shaped block stack: all-MHA teacher vs grafted candidate")
    shared(m, repeats=3)
    stack(m, [4096, 16384])
    m.add_argument("--backward", action="store_true", help="time forward + backward (a training step's compute)")
    m.add_argument("--profile", action="store_true", help="print the top torch ops by self time for each stack")
    m.add_argument("--family", default=None, choices=FAMILIES,
                   help="time a whole model of this family instead (pixart: PixArt-Sigma XL/2 shape, 28 blocks, "
                        "width 1152; --tokens N image tokens, --text-tokens caption tokens; default layers: the "
                        "paper's 14)")
    m.add_argument("--text-tokens", type=int, default=300, help="caption tokens with --family pixart (default 300)")

    t = sub.add_parser("stage1", help="a stage-1 training step (stream mode) vs teacher forward + each operator's "
                                      "fwd+bwd alone: the engine's overhead")
    shared(t, repeats=3)
    stack(t, [4096])

    from ditgraft.argtypes import finite_float, nonneg_int, seed_int
    from ditgraft.diffusion.samplers import SAMPLERS
    from ditgraft.eval.evaluate import TESTBED_PROTOCOL as P

    p = sub.add_parser("sample", help="a model's protocol sampling, eager vs compiled (torch.compile) side by side: "
                                      "first-call compile cost and steady-state speed-up")
    p.add_argument("--model", default="testbed", help="testbed, a checkpoint or a run directory (default testbed)")
    p.add_argument("--batch", type=positive_int, default=P.batch_size,
                   help=f"samples per sampling call (default {P.batch_size}, the protocol's batch)")
    p.add_argument("--steps", type=positive_int, default=P.steps, help=f"sampling steps (default {P.steps})")
    p.add_argument("--sampler", default=P.sampler, choices=SAMPLERS, help=f"default {P.sampler}")
    p.add_argument("--cfg", type=finite_float(1), default=P.cfg_scale, help=f"cfg scale (default {P.cfg_scale})")
    p.add_argument("--seed", type=seed_int, default=P.seed)
    p.add_argument("--repeats", type=positive_int, default=3, help="timed calls of each, interleaved (median reported)")
    p.add_argument("--warmup", type=nonneg_int, default=0, help="untimed interleaved rounds after the first calls")
    add_device(p, default="cpu")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--clock", default=None, choices=CLOCKS,
                   help="cpu (process CPU time, first calls with their child processes: the compiler; the default "
                        "on a CPU) or wall (the default on a GPU)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.set_defaults(fn=run_bench)


def run_bench(args) -> dict:
    """Run ``bench ops``, ``bench model``, ``bench stage1`` or ``bench sample`` from parsed arguments: print the
    table(s), write JSON if asked. Sizes whose tensors cannot be allocated are a ValueError naming them (not a crash)."""
    import torch

    try:
        return _run_bench(args)
    except (RuntimeError, MemoryError) as err:
        text = str(err)
        if not (isinstance(err, (MemoryError, torch.OutOfMemoryError))
                or any(t in text for t in ("can't allocate memory", "out of memory", "size calculation overflowed"))):
            raise
        sizes = ", ".join(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("dim", "heads", "tokens", "batch",
                                                                                   "blocks")
                          if getattr(args, k, None) is not None)
        raise ValueError(f"bench {args.bench_command}: {sizes} do not fit in memory on {args.device} ("
                         f"{text.strip().splitlines()[0][:160]}); use smaller sizes") from None


def _run_bench(args) -> dict:
    from ditgraft.utils import atomic_write_json

    set_threads(args.threads)
    if getattr(args, "retain_memory", False) and not retain_freed_memory():
        raise ValueError("--retain-memory is not allowed here: it needs glibc's malloc (Linux)")
    options = parse_options(getattr(args, "option", None))
    if args.bench_command == "sample":
        from ditgraft.bench.sample import bench_sample

        result = bench_sample(args.model, batch=args.batch, steps=args.steps, sampler=args.sampler,
                              cfg_scale=args.cfg, seed=args.seed, repeats=args.repeats, warmup=args.warmup,
                              device=args.device, clock=args.clock)
        result["command"] = "bench sample"
        print(format_table(result["rows"]))
    elif args.bench_command == "ops":
        from ditgraft.bench.ops import bench_ops

        from ditgraft.operators.common import grid_tokens

        rows, envs = [], []
        shapes = [(grid_tokens(g), g) for g in args.grid] if args.grid else [(n, None) for n in args.tokens]
        for n, grid in shapes:
            part = bench_ops(args.dim, n, args.heads, args.ops, batch=args.batch, backward=args.backward,
                             repeats=args.repeats, warmup=args.warmup, device=args.device, dtype=args.dtype,
                             options=options, grid=grid, clock=args.clock, profile=args.profile)
            envs.append(part[0].pop("env"))
            for r in part[1:]:
                r.pop("env", None)
            rows += part
            print(format_table(part), flush=True)
            for r in part:
                if "profile" in r:
                    print(f"\n## profile N={n} {r['operator']} {r['mode']} (top ops by {r['profile']['sort_by']})\n"
                          f"{r['profile']['table']}")
        result = {"command": "bench ops", "env": envs, "rows": rows}
    elif getattr(args, "family", None):
        from ditgraft.bench.family import bench_family
        from ditgraft.bench.model import select_layers

        blocks = args.blocks or 28  # PixArt-Sigma XL/2's depth
        layers = None if args.layers == "interleave" else select_layers(args.layers, blocks)
        rows = []
        for n in args.tokens:
            part = bench_family(args.family, blocks=blocks, heads=args.heads, head_dim=args.dim // args.heads,
                                tokens=n, text_tokens=args.text_tokens, operator=args.operator, layers=layers,
                                batch=args.batch, repeats=args.repeats, warmup=args.warmup, device=args.device,
                                dtype=args.dtype, options=options.get(args.operator), clock=args.clock)
            rows += part["rows"]
            print(format_table(part["rows"]), flush=True)
        result = {"command": "bench model --family", "config": part["config"], "env": part["env"], "rows": rows}
    else:
        unknown = set(options) - {args.operator}
        if unknown:
            raise ValueError(f"--option for {sorted(unknown)}: bench {args.bench_command} only builds "
                             f"--operator={args.operator!r}")
        layers, blocks = args.layers, args.blocks or 4
        common = dict(batch=args.batch, repeats=args.repeats, warmup=args.warmup, device=args.device,
                      dtype=args.dtype, options=options.get(args.operator), clock=args.clock)
        if args.bench_command == "model":
            from ditgraft.bench.model import bench_model

            result = bench_model(args.dim, args.heads, blocks, args.tokens, args.operator, layers,
                                 profile=args.profile, backward=args.backward, **common)
        else:
            from ditgraft.bench.stage1 import bench_stage1

            result = bench_stage1(args.dim, args.heads, blocks, args.tokens, args.operator, layers, **common)
        result["command"] = f"bench {args.bench_command}"
        print(format_table(result["rows"]))
        for n, stacks in result.get("profile", {}).items():
            for name, prof in stacks.items():
                print(f"\n## profile N={n} {name} (top ops by {prof['sort_by']})\n{prof['table']}")
    if args.json:
        atomic_write_json(args.json, _finite(result))
        print(f"wrote {args.json}")
    return result


def parse_options(items: list[str] | None) -> dict[str, dict]:
    """CLI ``--option NAME.KEY=VALUE`` (repeatable) -> {NAME: {KEY: VALUE}}; VALUE is read as int, float, bool,
    None or a string, or a comma-separated list of them, e.g. ``hyena_x.direction=2d``, ``swa.window=8``,
    ``local2d.kernel_size=3,9,9`` (or ``[3,9,9]``)."""
    out: dict[str, dict] = {}
    for item in items or []:
        head, sep, raw = item.partition("=")
        name, dot, key = head.partition(".")
        if not sep or not dot or not name or not key:
            raise ValueError(f"--option {item!r} is not allowed: use NAME.KEY=VALUE, e.g. hyena_x.direction=2d")
        out.setdefault(name, {})[key] = _literal(raw)
    return out


def _literal(raw: str):
    if "," in raw:
        return [_literal(part.strip()) for part in raw.strip("[]").split(",")]
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw



def _finite(obj):
    """JSON has no NaN/inf: replace them with None (recursively)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
