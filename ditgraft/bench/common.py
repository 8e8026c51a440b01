"""Shared pieces of the benchmarks: device/dtype checks, grids, round-robin timing, environment record, tables.

Why round-robin: on a shared machine the speed drifts (other jobs, thermal state, caches). Timing operator A for all
repeats and then operator B puts the drift into the A/B ratio. Here every repeat runs each candidate once, in a
rotated order, so slow and fast periods hit all of them alike; the median over repeats then drops the outliers.
"""
from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import statistics
import time
from typing import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device_dtype(device: str = "cpu", dtype: str = "fp32") -> tuple[torch.device, torch.dtype]:
    """Validate ``device`` and ``dtype``. Half precision is refused on CPU: its matmuls are ~200x slower there than
    fp32, so any timing would measure the missing kernels, not the operator."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device={device!r} is not a valid torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available here; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported by the benchmarks; use 'cpu' or 'cuda[:i]'")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; use one of {tuple(DTYPES)}")
    if dev.type == "cpu" and dtype != "fp32":
        raise ValueError(f"dtype={dtype!r} is not allowed on device='cpu': half-precision matmuls are ~200x slower "
                         f"than fp32 on CPU, so the timing would be meaningless; use dtype='fp32' (or a CUDA device)")
    return dev, DTYPES[dtype]


def grid_for_tokens(tokens: int) -> tuple[int, int]:
    """(H, W) with H * W = tokens: square if possible, else the most square factorisation (H <= W)."""
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens={tokens!r} is not allowed: use an int >= 1")
    h = math.isqrt(tokens)
    while tokens % h:
        h -= 1
    return h, tokens // h


def check_counts(**fields: int) -> None:
    """Each named count must be an int of at least the given minimum: check_counts(repeats=(r, 1), ...)."""
    for name, (value, low) in fields.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}={value!r} is not allowed: use an int >= {low}")


def set_threads(threads: int | None) -> None:
    if threads is not None:
        check_counts(threads=(threads, 1))
        torch.set_num_threads(threads)


CLOCKS = ("wall", "cpu")


def resolve_clock(clock, device: torch.device) -> Callable[[], float]:
    """``"wall"``: time.perf_counter (latency; the default). ``"cpu"``: time.process_time, the CPU time this process
    used, CPU device only. On a machine shared with other jobs, wall time includes the time the scheduler gave to
    them; process CPU time does not, so with ``--threads 1`` it measures the work the operator needs. With more
    threads it sums all of them (and idle-spinning OpenMP workers), so it is no longer a latency. A callable is used
    as is (tests)."""
    if callable(clock):
        return clock
    if clock in (None, "wall"):
        return time.perf_counter
    if clock == "cpu":
        if device.type != "cpu":
            raise ValueError(f"clock='cpu' is not allowed on device={str(device)!r}: GPU work is not process CPU "
                             f"time; use clock='wall'")
        return time.process_time
    raise ValueError(f"clock={clock!r} is not allowed; use one of {CLOCKS}")


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What to call around a timed region so queued GPU work is included (no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def round_robin(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
                sync: Callable[[], None] = lambda: None,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Time every callable ``repeats`` times, interleaved: each repeat runs each callable once, starting one further
    along the list than the repeat before (so no callable always runs right after the same neighbour).
    ``warmup`` untimed rounds come first, in the same interleaved way. Returns seconds per call, per name."""
    check_counts(repeats=(repeats, 1), warmup=(warmup, 0))
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
        sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed call would be charged to whichever operator happened to trigger it
    try:
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                sync()
                start = clock()
                fns[name]()
                sync()
                times[name].append(clock() - start)
    finally:
        if was_enabled:
            gc.enable()
    return times


def summarize(seconds: list[float]) -> dict:
    """Median (the reported time), min and all samples, in milliseconds."""
    ms = [s * 1e3 for s in seconds]
    return {"time_ms": statistics.median(ms), "min_ms": min(ms), "samples_ms": ms}


def environment(device: torch.device) -> dict:
    """What the numbers depend on: versions, hardware, threads and how loaded the machine was."""
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):
        env["loadavg_1m"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parse_options(items: list[str] | None) -> dict[str, dict]:
    """CLI ``--option NAME.KEY=VALUE`` (repeatable) -> {NAME: {KEY: VALUE}}; VALUE is read as int, float, bool,
    None or a string, e.g. ``hyena_x.direction=2d``, ``swa.window=8``."""
    out: dict[str, dict] = {}
    for item in items or []:
        head, sep, raw = item.partition("=")
        name, dot, key = head.partition(".")
        if not sep or not dot or not name or not key:
            raise ValueError(f"--option {item!r} is not allowed: use NAME.KEY=VALUE, e.g. hyena_x.direction=2d")
        out.setdefault(name, {})[key] = _literal(raw)
    return out


def _literal(raw: str):
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


# ----------------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------------
# (row key, column header, format); a column appears when at least one row has the key.
COLUMNS = (
    ("operator", "operator", "{}"),
    ("candidate", "candidate", "{}"),
    ("tokens", "N", "{}"),
    ("grid", "grid", "{}"),
    ("mode", "mode", "{}"),
    ("replaced", "replaced blocks", "{}"),
    ("params", "params", "{:,}"),
    ("gflops", "GFLOPs", "{:.1f}"),
    ("time_ms", "time ms", "{:.1f}"),
    ("teacher_gflops", "teacher GFLOPs", "{:.1f}"),
    ("candidate_gflops", "candidate GFLOPs", "{:.1f}"),
    ("teacher_ms", "teacher ms", "{:.1f}"),
    ("candidate_ms", "candidate ms", "{:.1f}"),
    ("gflop_per_s", "GFLOP/s", "{:.1f}"),
    ("speedup", "speed-up", "{:.2f}x"),
    ("flop_speedup", "FLOP-bound speed-up", "{:.2f}x"),
    ("efficiency", "efficiency", "{:.0%}"),
    ("error", "error", "{}"),
)


def format_table(rows: list[dict]) -> str:
    """Markdown table of benchmark rows (``bench_ops`` rows or ``bench_model(...)["rows"]``)."""
    cols = [(key, head, fmt) for key, head, fmt in COLUMNS if any(key in r for r in rows)]
    lines = ["| " + " | ".join(head for _, head, _ in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            value = r.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append("-")
            elif isinstance(value, (list, tuple)):
                cells.append("x".join(map(str, value)) if key == "grid" else ",".join(map(str, value)))
            else:
                cells.append(fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Command line (the CLI module only wires these in: ``add_bench_arguments(sub.add_parser("bench"))``)
# ----------------------------------------------------------------------------------------------------------------------
def add_bench_arguments(parser) -> None:
    """Add the ``ops`` and ``model`` sub-commands to the ``bench`` parser; each sets ``fn=run_bench``."""
    sub = parser.add_subparsers(dest="bench_command", required=True)

    def shared(p, repeats: int) -> None:
        p.add_argument("--dim", type=int, default=1152, help="model width D (default 1152, DiT-XL/2)")
        p.add_argument("--heads", type=int, default=16)
        p.add_argument("--batch", type=int, default=1)
        p.add_argument("--repeats", type=int, default=repeats, help="timed calls per candidate (median reported)")
        p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
        p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:i or auto")
        p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="bf16/fp16 on CUDA only")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        p.add_argument("--clock", default="wall", choices=CLOCKS,
                       help="wall (latency, default) or cpu (process CPU time: robust on a shared machine with "
                            "--threads 1)")
        p.add_argument("--option", action="append", default=[], metavar="NAME.KEY=VALUE",
                       help="operator build option, repeatable, e.g. swa.window=8 or hyena_x.direction=2d")
        p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
        p.set_defaults(fn=run_bench)

    s = sub.add_parser("ops", help="time each token mixer against MHA at one shape (interleaved runs)")
    shared(s, repeats=5)
    s.add_argument("--tokens", type=int, nargs="+", default=[4096], help="sequence length(s) N (default 4096)")
    s.add_argument("--ops", nargs="+", default=None, help="operators (default: all token mixers); MHA always runs")
    s.add_argument("--backward", action="store_true", help="time forward + backward instead of forward only")

    m = sub.add_parser("model", help="DiT-XL/2-shaped block stack: all-MHA teacher vs grafted candidate")
    shared(m, repeats=3)
    m.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384], help="sequence lengths (default 4096 16384)")
    m.add_argument("--blocks", type=int, default=None, help="blocks (default 4; with --family its depth)")
    m.add_argument("--operator", default="hyena_x", help="operator put into the replaced blocks (default hyena_x)")
    m.add_argument("--layers", default="interleave",
                   help="interleave (odd blocks, 50%%), interleave75, all, or indices like 1,3")
    m.add_argument("--profile", action="store_true", help="print the top torch ops by self time for each stack")
    m.add_argument("--family", default=None, choices=["pixart"],
                   help="time a whole model of this family instead (pixart: PixArt-Sigma XL/2 shape, 28 blocks, "
                        "width 1152; --tokens N image tokens, --text-tokens caption tokens; layers: the paper's 14)")
    m.add_argument("--text-tokens", type=int, default=300, help="caption tokens with --family pixart (default 300)")


def run_bench(args) -> dict:
    """Run ``bench ops`` or ``bench model`` from parsed arguments: print the table(s), write JSON if asked."""
    from ditgraft.utils import atomic_write_json

    set_threads(args.threads)
    options = parse_options(args.option)
    if args.bench_command == "ops":
        from ditgraft.bench.ops import bench_ops

        rows, envs = [], []
        for n in args.tokens:
            part = bench_ops(args.dim, n, args.heads, args.ops, batch=args.batch, backward=args.backward,
                             repeats=args.repeats, warmup=args.warmup, device=args.device, dtype=args.dtype,
                             options=options, clock=args.clock)
            envs.append(part[0].pop("env"))
            for r in part[1:]:
                r.pop("env", None)
            rows += part
            print(format_table(part), flush=True)
        result = {"command": "bench ops", "env": envs, "rows": rows}
    elif getattr(args, "family", None):
        from ditgraft.bench.family import bench_family

        layers = None if args.layers == "interleave" else [int(i) for i in args.layers.split(",")]
        blocks = args.blocks or 28  # PixArt-Sigma XL/2's depth
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
        from ditgraft.bench.model import bench_model

        unknown = set(options) - {args.operator}
        if unknown:
            raise ValueError(f"--option for {sorted(unknown)}: bench model only builds --operator={args.operator!r}")
        layers = args.layers if not args.layers[:1].isdigit() else [int(i) for i in args.layers.split(",")]
        result = bench_model(args.dim, args.heads, args.blocks or 4, args.tokens, args.operator, layers,
                             batch=args.batch, repeats=args.repeats, warmup=args.warmup, device=args.device, dtype=args.dtype,
                             profile=args.profile, options=options.get(args.operator), clock=args.clock)
        result["command"] = "bench model"
        print(format_table(result["rows"]))
        for n, stacks in result.get("profile", {}).items():
            for name, prof in stacks.items():
                print(f"\n## profile N={n} {name} (top ops by {prof['sort_by']})\n{prof['table']}")
    if args.json:
        atomic_write_json(args.json, _finite(result))
        print(f"wrote {args.json}")
    return result


def _finite(obj):
    """JSON has no NaN/inf: replace them with None (recursively)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
