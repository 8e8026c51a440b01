"""Which blocks to graft: the layer selectors, registered by name with what they need.

A selector is one function ``fn(ctx: Selection) -> list[int]`` registered with ``@selector(name, needs=...)``.
``needs`` names the inputs the graft pipeline must prepare before the selector can run: ``"analysis"`` (the
teacher's attention locality, ``ditgraft analyze``) and/or ``"probe_losses"`` (a short stage-1 distillation of the
candidate operator in every layer). The recipe's allowed values, the pipeline's preparation and the benchmark's
``--layers`` all read this registry, so a new selector is one function here.

The number of layers is ``count`` when given, else ``round(fraction * depth)`` (halves round up: 3.5 -> 4; the
default fraction is 0.5). Every selector returns block indices in [0, depth).

* ``interleave``   spread the kept-out blocks evenly from block 0: with m = depth - count, block floor(j * depth / m)
                   for j < m stays, every other block is selected. This reproduces the paper's sets exactly:
                   50% = odd blocks 1, 3, ..., depth-1; 75% = all but 0, 4, 8, ...; 100% = all.
* ``all``          every block (fraction and count are ignored).
* ``deepest``      the last ``count`` blocks.
* ``most_local``   the ``count`` blocks with the highest mean band-k attention locality in an analysis result
                   (``analyze_model``); ties go to the lower index. Blocks the analysis could not measure (grafted
                   non-attention operators) are never chosen.
* ``least_local``  the ``count`` blocks with the lowest mean band-k locality; ties go to the lower index.
* ``auto``         rank layers by the probe's stage-1 validation error of the candidate operator (relative MSE:
                   val MSE / variance of the target) and keep the ``count`` easiest; with ``by: locality`` it is
                   ``most_local``.

Besides selectors, a graft's ``layers`` may be a list of block indices (negative ones count from the end) or a
Python slice string ``"1:8:2"``; ``resolve_layers`` turns any of these into sorted block indices.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable, Iterable

NEEDS = ("analysis", "probe_losses")


@dataclass(frozen=True)
class Selection:
    """What a selector sees: the model depth, the number of layers to choose and the prepared inputs."""
    depth: int
    count: int
    analysis: dict | None = None
    probe_losses: dict[int, float] | None = None
    by: str = "stage1_loss"


@dataclass(frozen=True)
class SelectorSpec:
    name: str
    fn: Callable[[Selection], list[int]]
    needs: Callable[[str], frozenset]  # by -> the inputs needed
    sized: bool  # False: fraction and count are ignored (``all``)
    description: str


_SELECTORS: dict[str, SelectorSpec] = {}


def selector(name: str, needs: Iterable[str] | Callable[[str], Iterable[str]] = (), sized: bool = True,
             description: str = "") -> Callable:
    """Register ``fn(ctx: Selection) -> list[int]`` as the layer selector ``name``.

    ``needs``: some of ``NEEDS``, or a function of the selector's ``by`` option returning them."""
    need_fn = needs if callable(needs) else (lambda _by, fixed=tuple(needs): fixed)

    def wrap(fn):
        if name in _SELECTORS:
            raise ValueError(f"layer selector {name!r} is registered twice")
        for by in ("stage1_loss", "locality"):
            bad = set(need_fn(by)) - set(NEEDS)
            if bad:
                raise ValueError(f"selector {name!r}: needs={sorted(bad)} is not allowed; use some of {NEEDS}")
        _SELECTORS[name] = SelectorSpec(name, fn, lambda by: frozenset(need_fn(by)), sized,
                                        description or (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return wrap


def selector_names(needing_nothing: bool = False) -> tuple[str, ...]:
    """Registered selector names (in registration order); ``needing_nothing``: only those that need no input."""
    return tuple(n for n, s in _SELECTORS.items()
                 if not needing_nothing or not (s.needs("stage1_loss") or s.needs("locality")))


def get_selector(name: str) -> SelectorSpec:
    if name not in _SELECTORS:
        raise ValueError(f"selector={name!r} is not allowed; use one of {selector_names()}")
    return _SELECTORS[name]


def selector_needs(layers) -> frozenset:
    """The inputs (``NEEDS``) a graft's ``layers`` needs prepared: none for indices and slices."""
    if isinstance(layers, (list, str)):
        return frozenset()
    return get_selector(layers.select).needs(layers.by)


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


def load_analysis(analysis: dict | str | None) -> dict | None:
    """An ``analyze_model`` result, given as the dict itself or the path of its analysis.json."""
    if isinstance(analysis, str):
        with open(analysis) as f:
            return json.load(f)
    return analysis


def locality_ranking(analysis: dict, depth: int) -> list[tuple[float, int]]:
    """(mean band-k locality, layer) for each measured layer of an analysis result, after checking its depth."""
    layers = analysis.get("layers") if isinstance(analysis, dict) else None
    if not isinstance(layers, list):
        raise ValueError("analysis must be a result of ditgraft.analysis.locality.analyze_model (a dict with "
                         "'layers') or the path of its analysis.json")
    if len(layers) != depth:
        raise ValueError(f"analysis has {len(layers)} layers but depth={depth}; analyse the model being grafted")
    ranking = []
    for e in layers:
        att = e.get("attention")
        if att is not None:
            ranking.append((float(att["band_locality_mean"]), int(e["layer"])))
    return ranking


def _by_locality(ctx: Selection, most: bool) -> list[int]:
    ranking = locality_ranking(ctx.analysis, ctx.depth)
    if ctx.count > len(ranking):
        raise ValueError(f"selector={'most_local' if most else 'least_local'!r} wants count={ctx.count} layers but "
                         f"the analysis measured attention in only {len(ranking)} of {ctx.depth}")
    sign = -1.0 if most else 1.0
    return [layer for _, layer in sorted(ranking, key=lambda r: (sign * r[0], r[1]))[:ctx.count]]


@selector("all", sized=False)
def select_all(ctx: Selection) -> list[int]:
    """every block"""
    return list(range(ctx.depth))


@selector("interleave")
def select_interleave(ctx: Selection) -> list[int]:
    """count blocks spread evenly (the paper's 50% / 75% / 100% sets)"""
    return interleave(ctx.depth, ctx.count)


@selector("deepest")
def select_deepest(ctx: Selection) -> list[int]:
    """the last count blocks"""
    return list(range(ctx.depth - ctx.count, ctx.depth))


@selector("most_local", needs=("analysis",))
def select_most_local(ctx: Selection) -> list[int]:
    """the count blocks with the most local attention"""
    return _by_locality(ctx, most=True)


@selector("least_local", needs=("analysis",))
def select_least_local(ctx: Selection) -> list[int]:
    """the count blocks with the least local attention"""
    return _by_locality(ctx, most=False)


@selector("auto", needs=lambda by: ("analysis",) if by == "locality" else ("probe_losses",))
def select_auto(ctx: Selection) -> list[int]:
    """the count blocks where a short stage-1 probe of the operator reaches the lowest error"""
    if ctx.by == "locality":
        return _by_locality(ctx, most=True)
    return sorted(range(ctx.depth), key=lambda i: (ctx.probe_losses[i], i))[:ctx.count]


def select_layers(name: str, depth: int, analysis: dict | str | None = None, fraction: float = 0.5,
                  count: int | None = None, probe_losses: dict[int, float] | None = None,
                  by: str = "stage1_loss") -> list[int]:
    """Sorted block indices chosen by the selector ``name`` (rules in the module docstring).

    ``analysis``: an ``analyze_model`` result or the path of its analysis.json, for the selectors that need it;
    ``probe_losses``: relative validation MSE per layer, for ``auto``."""
    spec = get_selector(name)
    n = layer_count(depth, fraction, count) if spec.sized else layer_count(depth, 1.0)
    needs = spec.needs(by)
    if "analysis" in needs and analysis is None:
        raise ValueError(f"selector={name!r} needs analysis= (run `ditgraft analyze` on the teacher and pass "
                         "its analysis.json)")
    if "probe_losses" in needs and probe_losses is None:
        raise ValueError(f"layers: {name} (by {by}) needs the probe losses; run it through the graft pipeline")
    ctx = Selection(depth, n, load_analysis(analysis) if "analysis" in needs else None, probe_losses, by)
    return sorted(spec.fn(ctx))


def parse_slice(text: str, depth: int) -> list[int]:
    parts = [int(p) if p.strip() else None for p in text.split(":")]
    return list(range(depth))[slice(*parts)]


def resolve_layers(layers, depth: int, analysis: dict | str | None = None,
                   probe_losses: dict[int, float] | None = None) -> list[int]:
    """Concrete sorted block indices for a graft's ``layers`` (a list of indices, a slice string or a selector with
    ``select``, ``fraction``, ``count``, ``by``) against a model of ``depth`` blocks."""
    if isinstance(layers, list):
        bad = [i for i in layers if not -depth <= i < depth]
        if bad:
            raise ValueError(f"layers={layers}: indices {bad} are out of range for depth {depth} (0..{depth - 1})")
        out = sorted({i % depth for i in layers})
    elif isinstance(layers, str):
        out = parse_slice(layers, depth)
    else:
        out = select_layers(layers.select, depth, analysis=analysis,
                            fraction=layers.fraction if layers.fraction is not None else 0.5, count=layers.count,
                            probe_losses=probe_losses, by=layers.by)
    if not out:
        raise ValueError(f"layers={layers!r} selects no block of a depth-{depth} model")
    return out


def layers_from_text(text: str, depth: int) -> list[int]:
    """A layer set written on a command line: a selector that needs no input (``interleave``, ``deepest``, ...),
    optionally with a fraction (``interleave:0.75``), a slice (``1:8:2``) or comma-separated indices (``1,3``)."""
    name, _, frac = text.partition(":")
    if name in _SELECTORS:
        if name not in selector_names(needing_nothing=True):
            raise ValueError(f"layers={text!r}: selector {name!r} needs "
                             f"{'/'.join(sorted(get_selector(name).needs('stage1_loss')))}; "
                             f"use one of {selector_names(needing_nothing=True)}")
        try:
            fraction = float(frac) if frac else 0.5
        except ValueError:
            raise ValueError(f"layers={text!r}: {frac!r} is not a fraction in (0, 1]") from None
        return select_layers(name, depth, fraction=fraction)
    try:
        if ":" in text:
            return resolve_layers(text, depth)
        return resolve_layers([int(i) for i in text.split(",")], depth)
    except ValueError as err:
        raise ValueError(f"layers={text!r} is not allowed ({err}); use a selector "
                         f"{selector_names(needing_nothing=True)} [':fraction'], a slice 'a:b:c' or indices "
                         "like 1,3") from None
