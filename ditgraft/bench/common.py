"""Shared pieces of the benchmarks: device/dtype checks, grids, round-robin timing, profiling, environment record,
tables. (The command line is ``ditgraft.bench.cli``.)

Why round-robin: on a shared machine the speed drifts (other jobs, thermal state, caches). Timing operator A for all
repeats and then operator B puts the drift into the A/B ratio. Here every repeat runs each candidate once, in a
rotated order, so slow and fast periods hit all of them alike; the median over repeats then drops the outliers.
"""
from __future__ import annotations

import ctypes
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
    from ditgraft.utils import resolve_device

    dev = resolve_device(device)
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

_RETAINED = False  # whether retain_freed_memory() changed this process's allocator


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process instead of handing it back to the OS (process-wide, for
    the rest of the process): ``M_MMAP_MAX = 0`` (no allocation gets its own mmap) and a trim threshold of 2 GiB.

    By default glibc serves every block of 32 MiB or more with its own mmap and unmaps it on free, so the next tensor
    of that size page-faults all its pages in again: at N = 4096, D = 1152 every activation of a Mamba-2 or
    local-attention block is 38-80 MB, and the faults cost more than the elementwise work that fills the tensor
    (20 ms vs 3-5 ms for a product of two [4096, 2304] fp32 tensors on the 2-core VM). PyTorch's CUDA caching
    allocator never returns memory mid-run; this is the CPU counterpart (as jemalloc / tcmalloc are). Returns False,
    and changes nothing, where the C library is not glibc."""
    global _RETAINED
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    _RETAINED = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return _RETAINED


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


def cpu_with_children() -> float:
    """CPU time of this process and of its finished child processes (torch.compile runs the C++ compiler in them):
    the clock of work that is not all done in this process."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


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


def profile_call(fn, device: torch.device, row_limit: int = 15) -> dict:
    """One call of ``fn`` under torch.profiler: the top operators by self time (CPU time; device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
    events = prof.key_averages()
    key = "self_cpu_time_total"
    if device.type == "cuda":
        key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    table = events.table(sort_by=key, row_limit=row_limit)
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:row_limit]
    total = sum(getattr(e, key) for e in events) or 1.0
    return {
        "sort_by": key,
        "table": table,
        "top": [{"name": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3,
                 "share": getattr(e, key) / total} for e in top],
    }


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
        "malloc": "retain" if _RETAINED else "default",
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
    ("limit_gflop_per_s", "matmul limit GFLOP/s", "{:.1f}"),
    ("limit_share", "share of limit", "{:.0%}"),
    ("speedup", "speed-up", "{:.2f}x"),
    ("flop_speedup", "FLOP-bound speed-up", "{:.2f}x"),
    ("efficiency", "efficiency", "{:.0%}"),
    ("teacher_forward_ms", "teacher fwd ms", "{:.1f}"),
    ("parts_ms", "parts ms (teacher fwd + ops fwd+bwd)", "{:.1f}"),
    ("step_ms", "stage-1 step ms", "{:.1f}"),
    ("overhead", "overhead", "{:+.1%}"),
    ("first_s", "first call s", "{:.1f}"),
    ("compile_s", "compile s", "{:.1f}"),
    ("max_abs_diff", "max abs diff", "{:.1e}"),
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
