"""`ditgraft ops`: every registered operator's parameters and forward FLOPs at a given width and token count, and the
path (GPU kernel or PyTorch implementation) its forward takes on a device (``kernels.describe_path``)."""
from __future__ import annotations

import math

import torch

from ditgraft.operators.kernels import describe_path
from ditgraft.operators.registry import build_operator, get_spec, operator_flops, operator_names

# Variants shown beside the defaults (the paper's MLP ratios; the beyond-paper directions).
VARIANTS: dict[str, list[dict]] = {
    "mlp": [{"ratio": 3}, {"ratio": 4}, {"ratio": 6}],
}


def _grid(tokens: int) -> tuple[int, int]:
    h = int(math.isqrt(tokens))
    while tokens % h:
        h -= 1
    return (h, tokens // h)


def _build(name: str, dim: int, heads: int, grid, options: dict):
    try:
        with torch.device("meta"):
            return build_operator(name, dim, heads, grid, **options)
    except (RuntimeError, NotImplementedError):  # an init that meta tensors cannot run
        return build_operator(name, dim, heads, grid, **options)


MAX_DIM, MAX_TOKENS = 1 << 16, 1 << 20  # 4x DiT-XL's width, 4096x its tokens: far past any model in the table


def ops_table(dim: int = 1152, tokens: int = 256, heads: int = 16, device: str = "cpu",
              dtype: torch.dtype = torch.float32) -> list[dict]:
    """One row per operator (and variant): params, forward FLOPs, ratio to the slot's baseline, and ``path``, what its
    forward runs on ``device`` (a name like "cuda"; no such device needs to be present) in ``dtype``."""
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not allowed; use a torch.dtype such as torch.bfloat16")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device={device!r} is not a device name ({err}); use e.g. 'cpu' or 'cuda'") from None
    for name, value, high in (("dim", dim, MAX_DIM), ("tokens", tokens, MAX_TOKENS), ("heads", heads, dim)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise ValueError(f"{name}={value!r} is out of range; allowed: integers 1..{high}")
    grid = _grid(tokens)
    rows = []
    for name in operator_names():
        for options in VARIANTS.get(name, [{}]):
            spec = get_spec(name)
            op = _build(name, dim, heads, grid, options)
            rows.append({"operator": name, "options": options, "slot": spec.slot,
                         "params": sum(p.numel() for p in op.parameters()),
                         "path": describe_path(op, device, dtype, tokens), "device": str(device),
                         "flops": operator_flops(name, dim, heads, grid, **options),
                         "description": spec.description})
    base = {"attn": operator_flops("mha", dim, heads, grid), "mlp": operator_flops("mlp", dim, heads, grid, ratio=4)}
    for r in rows:
        r["flops_vs_baseline"] = r["flops"] / base[r["slot"]]
    return rows


def format_ops_table(rows: list[dict], dim: int, tokens: int) -> str:
    grid = _grid(tokens)
    device = rows[0]["device"] if rows else "cpu"
    lines = [f"Operators at D={dim}, N={tokens} (grid {grid[0]}x{grid[1]}); FLOPs per sample, forward; "
             "ratio vs MHA (attn slot) or MLP r=4 (mlp slot)", "",
             f"| {'operator':24s} | slot | {'params':>12s} | {'GFLOPs':>9s} | {'vs base':>8s} | path on {device} | "
             "description |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in sorted(rows, key=lambda r: (r["slot"], r["operator"], str(r["options"]))):
        label = r["operator"] + ("(" + ",".join(f"{k}={v}" for k, v in r["options"].items()) + ")"
                                 if r["options"] else "")
        lines.append(f"| {label:24s} | {r['slot']:4s} | {r['params']:12,d} | {r['flops'] / 1e9:9.3f} | "
                     f"{r['flops_vs_baseline']:8.3f} | {r['path']} | {r['description']} |")
    return "\n".join(lines)
