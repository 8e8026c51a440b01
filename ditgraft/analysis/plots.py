"""PNG plots of an analysis result (``ditgraft.analysis.locality.analyze_model``).

Figures are built with the object API (``matplotlib.figure.Figure``, Agg canvas), never pyplot, so importing this
module changes no global matplotlib state and needs no display. Every file is written atomically.
"""
from __future__ import annotations

import math
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ditgraft.utils import atomic_path

DPI = 120

__all__ = ["plot_analysis", "plot_locality", "plot_locality_heatmap", "plot_activation_stats", "plot_locality_vs_k"]


def _save(fig: Figure, path: str) -> str:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _measured(result: dict) -> list[dict]:
    return [e for e in result["layers"] if e.get("attention") is not None]


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


def plot_locality(result: dict, path: str) -> str:
    """Band-k locality per layer: mean over heads (line), each head (dots), 2-D window share (dashed), 50% line."""
    k, wk = result["settings"]["band_k"], result["settings"]["window_k"]
    thr = result["settings"].get("local_threshold", 0.5)
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    layers = _measured(result)
    for e in layers:
        heads = e["attention"]["band_locality"]
        ax.scatter([e["layer"]] * len(heads), heads, s=10, color="tab:blue", alpha=0.4, linewidths=0)
    xs = [e["layer"] for e in layers]
    ax.plot(xs, [e["attention"]["band_locality_mean"] for e in layers], "o-", color="tab:blue",
            label=f"band |i-j| <= {k}: mean over heads (dots: heads)")
    ax.plot(xs, [e["attention"]["window_locality_mean"] for e in layers], "s--", color="tab:orange",
            label=f"2-D {wk}x{wk} window: mean over heads")
    ax.axhline(thr, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("layer")
    ax.set_ylabel("attention mass")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(range(len(result["layers"])))
    ax.set_title("Attention locality per layer")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_locality_heatmap(result: dict, path: str) -> str:
    """Layer x head heatmap of band-k locality (blank rows: layers without attention)."""
    depth = len(result["layers"])
    heads = max((len(e["attention"]["band_locality"]) for e in _measured(result)), default=1)
    grid = np.full((depth, heads), np.nan)
    for e in _measured(result):
        vals = e["attention"]["band_locality"]
        grid[e["layer"], : len(vals)] = vals
    fig = Figure(figsize=(max(4, 0.4 * heads + 2), max(3, 0.3 * depth + 1.5)))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, label=f"band-{result['settings']['band_k']} locality")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_yticks(range(depth))
    ax.set_xticks(range(heads))
    ax.set_title("Band locality per layer and head")
    return _save(fig, path)


def plot_activation_stats(result: dict, path: str) -> str:
    """Per layer, attn vs mlp outputs (before the gate): variance and max|x|/std on log axes."""
    fig = Figure(figsize=(10, 4))
    xs = [e["layer"] for e in result["layers"]]
    for j, (key, label) in enumerate((("var", "variance"), ("max_over_std", "max|x| / std"))):
        ax = fig.add_subplot(1, 2, j + 1)
        for slot, style in (("attn", "o-"), ("mlp", "s-")):
            ys = [_nan(e["activations"][slot][key]) for e in result["layers"]]
            ys = [y if y > 0 else float("nan") for y in ys]
            ax.plot(xs, ys, style, label=f"{slot} output")
        if any(math.isfinite(_nan(e["activations"][s][key])) and _nan(e["activations"][s][key]) > 0
               for e in result["layers"] for s in ("attn", "mlp")):
            ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_title(label)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_locality_vs_k(result: dict, path: str) -> str:
    """Band locality L_k (mean over heads) as a function of k, one curve per layer (dark = early, light = deep)."""
    s = result["settings"]
    ks = s["curve_k"]
    layers = _measured(result)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    depth = max(len(result["layers"]) - 1, 1)
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for e in layers:
        ax.plot(ks, e["attention"]["band_curve"], color=cmap(e["layer"] / depth), lw=1,
                label=f"layer {e['layer']}" if len(layers) <= 12 else None)
    ax.axvline(s["band_k"], color="gray", lw=0.8, ls="--")
    ax.axhline(s.get("local_threshold", 0.5), color="gray", lw=0.8, ls=":")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, max(ks[-1], 1))
    ax.set_xlabel("band half-width k (raster tokens)")
    ax.set_ylabel("attention mass with |i-j| <= k")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Locality vs k (dashed: k = {s['band_k']})")
    if len(layers) <= 12:
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_analysis(result: dict, out_dir: str) -> dict[str, str]:
    """All plots into ``out_dir``; returns {name: path}. Locality plots are left out when no layer has attention."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    if _measured(result):
        paths["locality"] = plot_locality(result, os.path.join(out_dir, "locality.png"))
        paths["locality_heatmap"] = plot_locality_heatmap(result, os.path.join(out_dir, "locality_heatmap.png"))
        paths["locality_vs_k"] = plot_locality_vs_k(result, os.path.join(out_dir, "locality_vs_k.png"))
    paths["activations"] = plot_activation_stats(result, os.path.join(out_dir, "activations.png"))
    return paths
