"""`ditgraft ops`: every registered operator's parameters and forward FLOPs at a given width and token count."""
from __future__ import annotations

import math

import torch

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


def _params(name: str, dim: int, heads: int, grid, options: dict) -> int:
    try:
        with torch.device("meta"):
            op = build_operator(name, dim, heads, grid, **options)
    except (RuntimeError, NotImplementedError):  # an init that meta tensors cannot run
        op = build_operator(name, dim, heads, grid, **options)
    return sum(p.numel() for p in op.parameters())


MAX_DIM, MAX_TOKENS = 1 << 16, 1 << 20  # 4x DiT-XL's width, 4096x its tokens: far past any model in the table


def ops_table(dim: int = 1152, tokens: int = 256, heads: int = 16) -> list[dict]:
    for name, value, high in (("dim", dim, MAX_DIM), ("tokens", tokens, MAX_TOKENS), ("heads", heads, dim)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise ValueError(f"{name}={value!r} is out of range; allowed: integers 1..{high}")
    grid = _grid(tokens)
    rows = []
    for name in operator_names():
        for options in VARIANTS.get(name, [{}]):
            spec = get_spec(name)
            rows.append({"operator": name, "options": options, "slot": spec.slot,
                         "params": _params(name, dim, heads, grid, options),
                         "flops": operator_flops(name, dim, heads, grid, **options),
                         "description": spec.description})
    base = {"attn": operator_flops("mha", dim, heads, grid), "mlp": operator_flops("mlp", dim, heads, grid, ratio=4)}
    for r in rows:
        r["flops_vs_baseline"] = r["flops"] / base[r["slot"]]
    return rows


def format_ops_table(rows: list[dict], dim: int, tokens: int) -> str:
    grid = _grid(tokens)
    lines = [f"Operators at D={dim}, N={tokens} (grid {grid[0]}x{grid[1]}); FLOPs per sample, forward; "
             "ratio vs MHA (attn slot) or MLP r=4 (mlp slot)", "",
             f"| {'operator':24s} | slot | {'params':>12s} | {'GFLOPs':>9s} | {'vs base':>8s} | description |",
             "|---|---|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["slot"], r["operator"], str(r["options"]))):
        label = r["operator"] + ("(" + ",".join(f"{k}={v}" for k, v in r["options"].items()) + ")"
                                 if r["options"] else "")
        lines.append(f"| {label:24s} | {r['slot']:4s} | {r['params']:12,d} | {r['flops'] / 1e9:9.3f} | "
                     f"{r['flops_vs_baseline']:8.3f} | {r['description']} |")
    return "\n".join(lines)
