"""Sweep files: a base recipe, axes over any recipe field by its dotted path, and how the axes combine.

    name: hyena_budget                  # default: the file's name
    base: testbed_hyena_x_50            # a recipe name or path (relative to this file first), or a mapping
    set: {eval.num: 200}                # fields set at every point (dotted paths)
    grid:                               # every combination of these axes
      grafts.0.operator: [hyena_x, swa]
      stage2.steps: [20, 60]
    zip:                                # axes stepped together (equal lengths), crossed with the grid
      stage1.steps: [100, 200]
      stage1.eval_every: [50, 100]
    points:                             # explicit points, added to the grid's (each a mapping of paths;
      - {grafts.0.operator: mamba2, grafts.0.options: {}}   #  `point: NAME` names one)
    baseline: teacher                   # what each point's quality is compared with: teacher or a point's name

A path walks the validated recipe (every field present with its default): mapping keys by name, list items by
index (``grafts.0.layers``). Each point is an ordinary recipe, validated before anything runs; its name is made of
its overrides (``operator=swa,steps=20``: the shortest path suffix that tells the sweep's axes apart).
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ditgraft.recipe import Recipe, find_recipe, parse_recipe, read_yaml_file, resolve_bases, resolved_recipe_dict

# recipe fields that only later stages read: points that differ in nothing else share stage 1 (and planning)
LATER_STAGE_FIELDS = ("name", "description", "stage2", "eval", "device")


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    description: str = ""
    base: str | dict
    set: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list] = Field(default_factory=dict)
    zip: dict[str, list] = Field(default_factory=dict)
    points: list[dict[str, Any]] = Field(default_factory=list)
    baseline: str = "teacher"


@dataclass(frozen=True)
class Point:
    name: str
    overrides: dict  # dotted path -> value, in axis order
    recipe: Recipe

    @property
    def stage1_key(self) -> str:
        """Equal for points whose stage 1 (and layer planning) is the same computation."""
        d = {k: v for k, v in self.recipe.to_dict().items() if k not in LATER_STAGE_FIELDS}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Sweep:
    name: str
    description: str
    spec: dict  # the sweep file as read (recorded in the sweep directory)
    base: dict  # the base recipe, resolved and validated, as a mapping
    axes: tuple[str, ...]  # every path that varies, in file order
    points: tuple[Point, ...]
    baseline: str

    def point(self, name: str) -> Point:
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(f"sweep {self.name!r} has no point {name!r}; its points: {[p.name for p in self.points]}")


def _err(source: str, msg: str) -> ValueError:
    return ValueError(f"invalid sweep {source}: {msg}")


def set_path(recipe: dict, path: str, value, source: str = "<sweep>") -> None:
    """Set the field at dotted ``path`` of a recipe mapping in place; refuses a path the recipe does not have."""
    if not isinstance(path, str) or not path or any(not p for p in path.split(".")):
        raise _err(source, f"field path {path!r} is not a dotted path like 'stage2.steps' or 'grafts.0.operator'")
    node, parts = recipe, path.split(".")
    for i, key in enumerate(parts):
        where = ".".join(parts[:i]) or "(top level)"
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise _err(source, f"field path {path!r}: {where} is a list of {len(node)} items; {key!r} is not an "
                                   f"index in 0..{len(node) - 1}")
            key = int(key)
        elif isinstance(node, dict):
            open_mapping = where.endswith("options") or where == "teacher.kwargs"
            if key not in node and not (open_mapping or (node is recipe and key == "restructure")):
                allowed = ", ".join(map(str, node)) or "none"
                raise _err(source, f"field path {path!r}: {key!r} is not a field of {where}; its fields: {allowed}")
            if node is recipe and key == "restructure" and not last and node.get(key) is None:
                node[key] = {}
        else:
            raise _err(source, f"field path {path!r}: {where} = {node!r} is a value, not a mapping or a list")
        if last:
            node[key] = copy.deepcopy(value)
        else:
            node = node[key]


def _value_text(v) -> str:
    if isinstance(v, dict):
        return "-".join(f"{k}-{_value_text(x)}" for k, x in v.items()) or "none"
    if isinstance(v, (list, tuple)):
        return "-".join(_value_text(x) for x in v) or "none"
    return str(v)


def _short_names(axes: tuple[str, ...]) -> dict[str, str]:
    """The shortest dotted suffix of each axis path that no other axis shares."""
    out = {}
    for a in axes:
        parts = a.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(b != a and (b == suffix or b.endswith("." + suffix)) for b in axes):
                out[a] = suffix
                break
        else:
            out[a] = a
    return out


def point_name(overrides: dict, short: dict[str, str]) -> str:
    text = ",".join(f"{short.get(k, k)}={_value_text(v)}" for k, v in overrides.items()) or "base"
    text = re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)
    if len(text) > 100:  # keep directory names short, still unique
        text = text[:90] + "~" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return text


def _combinations(f: SweepFile, source: str) -> list[tuple[str | None, dict]]:
    """(explicit name or None, overrides) of every point."""
    for kind in ("grid", "zip"):
        for path, values in getattr(f, kind).items():
            if not values:
                raise _err(source, f"{kind}.{path} = []: an axis needs at least one value")
    if f.zip:
        lengths = {p: len(v) for p, v in f.zip.items()}
        if len(set(lengths.values())) != 1:
            raise _err(source, f"zip axes must have equal lengths, got {lengths}")
    grid = [dict(zip(f.grid, vals)) for vals in itertools.product(*f.grid.values())] if f.grid else [{}]
    rows = [dict(zip(f.zip, vals)) for vals in zip(*f.zip.values())] if f.zip else [{}]
    combos = [(None, {**g, **r}) for g in grid for r in rows] if (f.grid or f.zip) else []
    for i, p in enumerate(f.points):
        p = dict(p)
        name = p.pop("point", None)
        if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=,+-]*", str(name)):
            raise _err(source, f"points[{i}].point = {name!r}: use letters, digits and . _ = , + -")
        if not p and name is None:
            raise _err(source, f"points[{i}] is empty; give at least one field path and value")
        combos.append((None if name is None else str(name), p))
    if not combos:
        raise _err(source, "no points: give grid or zip axes, or a points list")
    both = set(f.grid) & set(f.zip)
    if both:
        raise _err(source, f"axes {sorted(both)} are in both grid and zip; give each axis once")
    return combos


def build_sweep(data: dict, source: str = "<dict>", folder: str | None = None) -> Sweep:
    """Validate a sweep mapping and every point's recipe; raises ValueError (one message) before anything runs."""
    if not isinstance(data, dict):
        raise _err(source, f"the top level must be a mapping, got {type(data).__name__}")
    try:
        f = SweepFile.model_validate(data)
    except ValidationError as err:
        lines = [f"invalid sweep {source}:"]
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = "unknown field; allowed: " + ", ".join(SweepFile.model_fields) if e["type"] == "extra_forbidden" \
                else e["msg"]
            lines.append(f"  - {loc or '(top level)'} = {e.get('input')!r}: {msg}")
        raise ValueError("\n".join(lines)) from None
    if isinstance(f.base, str):
        base = resolved_recipe_dict(find_recipe(f.base, folder))
    else:
        base = resolve_bases(dict(f.base), folder, source)
    base.pop("abstract", None)
    base_recipe = parse_recipe(base, f"{source} (base)").model_dump(mode="json")  # every field, to walk paths
    name = f.name or (os.path.splitext(os.path.basename(source))[0] if source != "<dict>" else "sweep")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise _err(source, f"name = {name!r}: use letters, digits, '.', '_' and '-' (it names the sweep directory)")

    combos = _combinations(f, source)
    axes = tuple(dict.fromkeys(k for _, c in combos for k in c))
    short = _short_names(axes)
    points, seen = [], {}
    for given, overrides in combos:
        d = copy.deepcopy(base_recipe)
        for path, value in {**f.set, **overrides}.items():
            set_path(d, path, value, source)
        pname = given or point_name(overrides, short)
        d["name"] = re.sub(r"[^A-Za-z0-9._-]", "-", f"{name}.{pname}")[:100]  # a plain recipe name
        try:
            recipe = parse_recipe(d, f"{source}, point {pname}")
        except ValueError as err:
            raise ValueError(str(err).replace("invalid recipe", "invalid sweep")) from None
        key = json.dumps({k: v for k, v in recipe.to_dict().items() if k != "name"}, sort_keys=True)
        if pname in seen or key in seen.values():
            other = pname if pname in seen else next(k for k, v in seen.items() if v == key)
            raise _err(source, f"points {other!r} and {pname!r} are the same recipe (duplicate points)")
        seen[pname] = key
        points.append(Point(pname, overrides, recipe))
    if f.baseline != "teacher" and f.baseline not in seen:
        raise _err(source, f"baseline = {f.baseline!r}: use 'teacher' or one of the points: {list(seen)}")
    return Sweep(name, f.description, data, base_recipe, axes, tuple(points), f.baseline)


def load_sweeps(path: str) -> list[Sweep]:
    """The sweep file ``path``, or every ``*.yaml`` sweep file of the folder ``path`` in name order (a study: one
    sweep per table), all read and validated before any runs; their names must differ."""
    if not os.path.isdir(path):
        return [load_sweep(path)]
    files = sorted(f for f in os.listdir(path) if f.endswith((".yaml", ".yml")))
    if not files:
        raise FileNotFoundError(f"sweep folder {path!r}: no .yaml sweep files in it")
    sweeps = [load_sweep(os.path.join(path, f)) for f in files]
    names = [s.name for s in sweeps]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"sweep folder {path!r}: sweep names must differ; used twice: {', '.join(twice)}")
    return sweeps


def load_sweep(path: str) -> Sweep:
    """Read and validate a sweep file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sweep file {path!r}: no such file")
    return build_sweep(read_yaml_file(path, "sweep"), path, os.path.dirname(os.path.abspath(path)))
