"""Which blocks to graft: the layer selectors recipes name (the recipe module adds ``auto`` on top of these).

Every selector returns a sorted list of distinct block indices in [0, depth). The number of layers is ``count`` when
given, else ``round(fraction * depth)`` (halves round up: 3.5 -> 4).

* ``interleave``   spread the kept-out blocks evenly from block 0: with m = depth - count, block floor(j * depth / m)
                   for j < m stays, every other block is selected. This reproduces the paper's sets exactly
                   (REFERENCE 4): 50% = odd blocks 1, 3, ..., depth-1; 75% = all but 0, 4, 8, ...; 100% = all.
* ``all``          every block (fraction and count are ignored).
* ``most_local``   the ``count`` blocks with the highest mean band-k attention locality in an analysis result
                   (``analyze_model``); ties go to the lower index. Blocks the analysis could not measure (grafted
                   non-attention operators) are never chosen.
* ``least_local``  the ``count`` blocks with the lowest mean band-k locality; ties go to the lower index.
* ``deepest``      the last ``count`` blocks.
"""
from __future__ import annotations

import json
import math

SELECTORS = ("interleave", "all", "most_local", "least_local", "deepest")
ANALYSIS_SELECTORS = ("most_local", "least_local")

__all__ = ["SELECTORS", "select_layers", "layer_count", "interleave", "locality_ranking"]


def layer_count(depth: int, fraction: float = 0.5, count: int | None = None) -> int:
    """``count`` if given, else round(fraction * depth) with halves rounded up; checked to lie in [1, depth]."""
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth={depth!r} must be an int >= 1")
    if count is None:
        if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"fraction={fraction!r} must be a number in (0, 1]")
        count = int(math.floor(fraction * depth + 0.5))
        if count < 1:
            raise ValueError(f"fraction={fraction} of depth={depth} selects no layer; raise fraction or give count")
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= depth:
        raise ValueError(f"count={count!r} must be an int in [1, depth={depth}]")
    return count


def interleave(depth: int, count: int) -> list[int]:
    """``count`` of ``depth`` blocks, interleaved: block floor(j * depth / m), j < m = depth - count, is kept out."""
    m = depth - count
    kept_out = {j * depth // m for j in range(m)} if m else set()
    return [i for i in range(depth) if i not in kept_out]


def _load(analysis):
    if isinstance(analysis, str):
        with open(analysis) as f:
            return json.load(f)
    return analysis


def locality_ranking(analysis: dict, depth: int) -> list[tuple[float, int]]:
    """(mean band-k locality, layer) for each measured layer of an analysis result, after checking its depth."""
    layers = analysis.get("layers") if isinstance(analysis, dict) else None
    if not isinstance(layers, list):
        raise ValueError("analysis must be a result of ditgraft.eval.analysis.analyze_model (a dict with 'layers') "
                         "or the path of its analysis.json")
    if len(layers) != depth:
        raise ValueError(f"analysis has {len(layers)} layers but depth={depth}; analyse the model being grafted")
    ranking = []
    for e in layers:
        att = e.get("attention")
        if att is not None:
            ranking.append((float(att["band_locality_mean"]), int(e["layer"])))
    return ranking


def select_layers(selector: str, depth: int, analysis: dict | str | None = None, fraction: float = 0.5,
                  count: int | None = None) -> list[int]:
    """Block indices chosen by ``selector`` (one of ``SELECTORS``; rules in the module docstring).

    ``analysis``: an ``analyze_model`` result or the path of its analysis.json; required by ``most_local`` and
    ``least_local``, ignored by the others. Returns a sorted list.
    """
    if selector not in SELECTORS:
        raise ValueError(f"selector={selector!r} is not allowed; use one of {SELECTORS}")
    if selector == "all":
        layer_count(depth, 1.0)  # validates depth
        return list(range(depth))
    n = layer_count(depth, fraction, count)
    if selector == "interleave":
        return interleave(depth, n)
    if selector == "deepest":
        return list(range(depth - n, depth))
    if analysis is None:
        raise ValueError(f"selector={selector!r} needs analysis= (run `ditgraft analyze` on the teacher and pass "
                         "its analysis.json)")
    ranking = locality_ranking(_load(analysis), depth)
    if n > len(ranking):
        raise ValueError(f"selector={selector!r} wants count={n} layers but the analysis measured attention in only "
                         f"{len(ranking)} of {depth}")
    sign = -1.0 if selector == "most_local" else 1.0
    chosen = sorted(ranking, key=lambda r: (sign * r[0], r[1]))[:n]
    return sorted(layer for _, layer in chosen)
