"""``ditgraft search SEARCH.yaml``: choose an operator for every layer's slot under a cost budget, then verify.

    name: attn_search
    base: testbed_hyena_x_50        # recipe: teacher, stage-1 data and the settings verified designs are run with
    slot: attn
    candidates:                     # operator -> options; the teacher's own operator (mha, mlp) keeps the slot
      mha: {}
      hyena_x: {direction: 2d, kernel_size: 3}
      swa: {window: 4}
    budget: {cost: flops, share: 0.91}   # the design's slot cost / the teacher's (flops, or measured latency)
    probe: {steps: 100, samples: 1024, val_samples: 128, batch_size: 64}
    sensitivity_samples: 256
    signal: sensitivity             # what the choice minimises: sensitivity or probe_loss (both are reported)
    verify: 3                       # the best designs grafted in full, through a sweep
    compare: [base]                 # also verified: the base recipe's own grafts
    verify_set: {eval.protocol: decision}   # fields set for every verified design

Signals, cheapest first, all from the teacher alone:
- probe loss: every candidate distilled briefly into every layer (stage 1, one teacher forward per batch feeds the
  whole depth), its validation MSE relative to the target's variance;
- sensitivity: the teacher with that one layer replaced by its probe-trained candidate, the relative change of the
  model's noise prediction on held-out noised inputs (the end-to-end effect of that layer alone).
A design's predicted degradation is the sum over its replaced layers. The choice is exact: a mixed-integer program
(scipy's HiGHS) over one-hot layer choices with the budget as its one constraint, the next-best designs by excluding
the ones found. Verified designs run as one sweep (``explore/sweep.py``); the report sets predicted against measured
quality and gives each signal's Spearman rank correlation with it.
"""
from __future__ import annotations

import itertools
import os
import statistics
import time

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ditgraft.explore.spec import build_sweep
from ditgraft.recipe import Graft, find_recipe, parse_recipe, read_yaml_file, resolved_recipe_dict
from ditgraft.utils import atomic_write_json, atomic_write_text, ensure_writable, read_json, run_lock

SIGNALS = ("sensitivity", "probe_loss")
KEEP = {"attn": "mha", "mlp": "mlp"}  # the teacher's own operator of each slot: a candidate that changes nothing


class Budget(BaseModel):
    """``share`` of the teacher's slot cost a design may spend. ``part: mixing`` counts only the FLOPs above the
    teacher's attention projections (qkv and output, which every token mixer of the zoo keeps): the token-mixing
    work the paper's attention FLOPs stand for, which at the testbed's 64 tokens is a fifth of the slot's FLOPs."""
    model_config = ConfigDict(extra="forbid")
    cost: str = Field(default="flops", pattern="^(flops|latency)$")
    share: float = Field(gt=0)
    part: str = Field(default="slot", pattern="^(slot|mixing)$")

    @model_validator(mode="after")
    def _mixing_is_attention_flops(self):
        if self.part == "mixing" and self.cost != "flops":
            raise ValueError(f"part = mixing needs cost = flops (got cost = {self.cost}): only the FLOP formulas "
                             "split a slot into projections and mixing")
        return self


class Probe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(default=100, ge=1)
    samples: int = Field(default=1024, ge=1)
    val_samples: int = Field(default=128, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float | None = Field(default=None, gt=0)  # default: the base recipe's stage-1 LR


class SearchFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    description: str = ""
    base: str | dict
    slot: str = "attn"
    candidates: dict[str, dict] = Field(min_length=1)
    budget: Budget
    probe: Probe = Field(default_factory=Probe)
    sensitivity_samples: int = Field(default=256, ge=8)
    signal: str = Field(default="sensitivity", pattern="^(sensitivity|probe_loss)$")
    verify: int = Field(default=3, ge=0)
    compare: list[str] = Field(default_factory=lambda: ["base"])
    verify_set: dict = Field(default_factory=dict)


def load_search(path: str) -> tuple[SearchFile, dict, str]:
    """(the validated search file, its base recipe resolved and validated as a mapping, its name)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"search file {path!r}: no such file")
    data = read_yaml_file(path, "search")
    try:
        s = SearchFile.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(map(str, e["loc"]))
        msg = "unknown field; allowed: " + ", ".join(SearchFile.model_fields) if e["type"] == "extra_forbidden" \
            else e["msg"]
        raise ValueError(f"invalid search {path}: {loc} = {e.get('input')!r}: {msg}") from None
    folder = os.path.dirname(os.path.abspath(path))
    base = resolved_recipe_dict(find_recipe(s.base, folder)) if isinstance(s.base, str) else dict(s.base)
    base.pop("abstract", None)
    base = parse_recipe(base, f"{path} (base)").to_dict()
    if s.slot not in KEEP:
        raise ValueError(f"invalid search {path}: slot = {s.slot!r}; allowed: {', '.join(KEEP)}")
    for op, options in s.candidates.items():
        if op == KEEP[s.slot]:
            continue
        try:
            Graft(slot=s.slot, layers=[0], operator=op, options=options)
        except ValidationError as err:
            raise ValueError(f"invalid search {path}: candidates.{op}: "
                             f"{err.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    if all(op == KEEP[s.slot] for op in s.candidates):
        raise ValueError(f"invalid search {path}: candidates = {list(s.candidates)}: give at least one new operator")
    for c in s.compare:
        if c != "base":
            raise ValueError(f"invalid search {path}: compare = {c!r}; allowed: base")
    name = s.name or os.path.splitext(os.path.basename(path))[0]
    return s, base, name


# ----------------------------------------------------------------------------------------------- costs

def _slot_input(teacher, batch: int = 1) -> torch.Tensor:
    from ditgraft.models.adapters import model_dims
    from ditgraft.operators.common import grid_tokens

    d = model_dims(teacher)
    return torch.randn(batch, grid_tokens(d.grid), d.dim, device=next(teacher.parameters()).device)


def _candidate_module(teacher, slot: str, op: str, options: dict, layer: int = 0):
    from ditgraft.graft.surgery import ResolvedGraft, make_operators
    from ditgraft.models.adapters import get_slot

    if op == KEEP[slot]:
        return get_slot(teacher, layer, slot)
    return next(iter(make_operators(teacher, [ResolvedGraft(slot, layer, op, dict(options))], 0).values()))


@torch.no_grad()
def operator_costs(teacher, slot: str, candidates: dict, cost: str, part: str = "slot") -> dict[str, float]:
    """Each candidate's cost in one layer relative to the teacher's own operator: forward FLOPs by the operators'
    formulas (``ditgraft ops``: what the operator needs, e.g. a band for sliding-window attention, not what a dense
    fallback executes), or forward latency measured side by side (candidates take turns; median of 7). With
    ``part="mixing"`` the teacher's attention projections are taken off every candidate's FLOPs first."""
    from ditgraft.models.adapters import model_dims
    from ditgraft.operators.common import grid_tokens, projection_flops
    from ditgraft.operators.registry import operator_flops

    keep = KEEP[slot]
    if part == "mixing" and slot != "attn":
        raise ValueError(f"budget.part = mixing: only the attn slot has projections to take off (slot = {slot})")
    if cost == "flops":
        d = model_dims(teacher)
        kept = projection_flops(grid_tokens(d.grid), d.dim) if part == "mixing" else 0
        raw = {op: float(operator_flops(op, d.dim, d.heads, d.grid, **opts)) - kept
               for op, opts in {keep: {}, **candidates}.items()}
    else:
        mods = {op: _candidate_module(teacher, slot, op, opts).eval() for op, opts in {keep: {}, **candidates}.items()}
        x = _slot_input(teacher, batch=8)
        times: dict[str, list[float]] = {op: [] for op in mods}
        for m in mods.values():
            m(x)  # warm-up
        for _ in range(7):
            for op, m in mods.items():
                t0 = time.perf_counter()
                m(x)
                times[op].append(time.perf_counter() - t0)
        raw = {op: statistics.median(v) for op, v in times.items()}
    return {op: raw[op] / raw[keep] for op in candidates}


# ----------------------------------------------------------------------------------------------- the choice

def best_designs(score: np.ndarray, cost: np.ndarray, budget: float, k: int = 1) -> list[tuple[int, ...]]:
    """The ``k`` designs (one candidate index per layer) of least total ``score`` [L, C] whose mean ``cost``
    [L, C] is at most ``budget``: a mixed-integer program over one-hot choices, each next design found after
    excluding the ones before. Fewer than k when fewer designs fit."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    L, C = score.shape
    n = L * C
    rows = [np.kron(np.eye(L), np.ones(C))]  # one choice per layer
    lo, hi = [np.ones(L)], [np.ones(L)]
    rows.append(cost.reshape(1, n) / L)
    lo.append(np.array([-np.inf]))
    hi.append(np.array([budget + 1e-9]))
    found: list[tuple[int, ...]] = []
    for _ in range(k):
        A = np.vstack(rows + [_exclusion(d, C) for d in found])
        lower = np.concatenate(lo + [np.full(1, -np.inf)] * len(found))
        upper = np.concatenate(hi + [np.full(1, L - 1)] * len(found))
        res = milp(score.reshape(n), integrality=np.ones(n), bounds=Bounds(0, 1),
                   constraints=LinearConstraint(A, lower, upper))
        if res.status != 0 or res.x is None:
            break
        found.append(tuple(int(i) for i in np.round(res.x).reshape(L, C).argmax(axis=1)))
    return found


def _exclusion(design: tuple[int, ...], C: int) -> np.ndarray:
    """A row whose product with the choice vector counts the layers that agree with ``design``."""
    row = np.zeros(len(design) * C)
    for layer, c in enumerate(design):
        row[layer * C + c] = 1
    return row.reshape(1, -1)


def exhaustive_designs(score: np.ndarray, cost: np.ndarray, budget: float, k: int = 1) -> list[tuple[int, ...]]:
    """The same choice by trying every design (the reference for ``best_designs``; small depth only)."""
    L, C = score.shape
    fits = [d for d in itertools.product(range(C), repeat=L) if cost[range(L), d].mean() <= budget + 1e-9]
    fits.sort(key=lambda d: (score[range(L), d].sum(), d))
    return fits[:k]


# ----------------------------------------------------------------------------------------------- signals

def _signals(s: SearchFile, base: dict, out: str, device, log) -> dict:
    """Probe losses and sensitivities [layer][candidate] (cached in signals.json)."""
    from ditgraft.graft.data_split import stage1_split
    from ditgraft.graft.teacher import load_teacher
    from ditgraft.graft.stage1 import load_best_operators, noised_inputs, run_stage1
    from ditgraft.graft.surgery import ResolvedGraft, graft_model
    from ditgraft.models.adapters import slot_depths
    from ditgraft.models.families import model_call

    path = os.path.join(out, "signals.json")
    if os.path.exists(path):
        return read_json(path)
    recipe = parse_recipe(base)
    teacher, _ = load_teacher(recipe, device)
    depth = slot_depths(teacher)[s.slot]
    keep = KEEP[s.slot]
    cfg = recipe.stage1.model_copy(update={
        "steps": s.probe.steps, "samples": s.probe.samples, "val_samples": s.probe.val_samples,
        "batch_size": s.probe.batch_size, "eval_every": s.probe.steps, "lr": s.probe.lr or recipe.stage1.lr})
    x, y, xv, yv = stage1_split(cfg, recipe.seed)
    n = min(s.sensitivity_samples, len(xv))
    inputs = noised_inputs(xv[:n], yv[:n] if isinstance(yv, torch.Tensor) else yv, recipe.seed + 1)
    t0 = time.time()
    with torch.no_grad():
        ref = _predict(model_call(teacher), inputs, device)
    probe: dict[str, list[float]] = {}
    sens: dict[str, list[float]] = {}
    for op, opts in s.candidates.items():
        if op == keep:
            probe[op], sens[op] = [0.0] * depth, [0.0] * depth
            continue
        loss = Graft(slot=s.slot, layers=[0], operator=op, options=opts).loss
        grafts = [ResolvedGraft(s.slot, i, op, dict(opts), loss) for i in range(depth)]
        log(f"search: probing {op} in all {depth} {s.slot} slots ({cfg.steps} stage-1 steps)")
        res = run_stage1(teacher, grafts, cfg, x, y, xv, yv, os.path.join(out, "probes", op), recipe.seed, device,
                         progress=False, log=lambda *_: None)
        by_layer = {r["layer"]: r["val_rel_mse"] for r in res["operators"].values()}
        probe[op] = [float(by_layer[i]) for i in range(depth)]
        sens[op] = []
        for g in grafts:
            student = graft_model(teacher, [g], recipe.seed).to(device).eval()
            load_best_operators(student, [g], os.path.join(out, "probes", op))
            with torch.no_grad():
                pred = _predict(model_call(student), inputs, device)
            sens[op].append(float(((pred - ref) ** 2).mean() / ref.var()))
        log(f"  {op}: probe loss {_row(probe[op])}; sensitivity {_row(sens[op])}")
    result = {"depth": depth, "candidates": list(s.candidates), "probe_loss": probe, "sensitivity": sens,
              "probe": s.probe.model_dump(), "sensitivity_samples": n, "wall_s": time.time() - t0}
    atomic_write_json(path, result)
    return result


def _row(v: list[float]) -> str:
    return "[" + ", ".join(f"{x:.3g}" for x in v) + "]"


def _predict(fn, inputs, device, batch: int = 64) -> torch.Tensor:
    """The model's noise prediction (the first input-channels of its output) on noised inputs, in batches."""
    from ditgraft.models.families.base import cond_rows, cond_to

    outs = []
    for i in range(0, len(inputs.x_t), batch):
        xb = inputs.x_t[i:i + batch].to(device)
        yb = cond_to(cond_rows(inputs.y, slice(i, i + batch)), device)
        outs.append(fn(xb, inputs.t[i:i + batch].to(device), yb)[:, :xb.shape[1]].float().cpu())
    return torch.cat(outs)


# ----------------------------------------------------------------------------------------------- the search

def design_grafts(design: list[str], slot: str, candidates: dict) -> list[dict]:
    """A design (operator per layer) as recipe grafts: one graft per new operator, its layers listed."""
    keep = KEEP[slot]
    out = []
    for op in dict.fromkeys(design):
        if op != keep:
            out.append({"slot": slot, "layers": [i for i, o in enumerate(design) if o == op], "operator": op,
                        "options": dict(candidates[op])})
    return out


def _resolved(recipe: dict, depth: dict[str, int]) -> list[tuple]:
    """A recipe's grafts as sorted (slot, layer, operator, options): equal lists are the same design."""
    from ditgraft.graft.surgery import resolve_grafts

    return sorted((g.slot, g.layer, g.operator, sorted(g.options.items()))
                  for g in resolve_grafts(parse_recipe(recipe), depth))


def _base_design(base: dict, slot: str, depths: dict[str, int]) -> list[str]:
    design = [KEEP[slot]] * depths[slot]
    for g_slot, layer, op, _ in _resolved(base, depths):
        if g_slot == slot:
            design[layer] = op
    return design


def run_search(path: str, out: str | None = None, jobs: int = 1, device: str | None = None,
               threads: int | None = None, log=print) -> dict:
    """The whole search: costs and budget check (before anything is written), signals, the exact choice, the
    verification sweep and the report (``report.md``, ``report.json``)."""
    from ditgraft.explore.sweep import run_sweep
    from ditgraft.graft.teacher import load_teacher
    from ditgraft.models.adapters import slot_depths
    from ditgraft.utils import resolve_device

    s, base, name = load_search(path)
    out = out or os.path.join("searches", name)
    dev = resolve_device(device)
    teacher, _ = load_teacher(parse_recipe(base), dev)
    depths = slot_depths(teacher)
    depth = depths[s.slot]
    ops = list(s.candidates)
    rel = operator_costs(teacher, s.slot, s.candidates, s.budget.cost, s.budget.part)
    cheapest = min(rel, key=rel.get)
    if rel[cheapest] > s.budget.share + 1e-9:
        raise ValueError(f"budget.share = {s.budget.share}: no design fits; the cheapest ({cheapest} in every layer) "
                         f"costs {rel[cheapest]:.3f} of the teacher's {s.slot} {s.budget.cost} ({s.budget.part}) "
                         f"({', '.join(f'{o} {c:.3f}' for o, c in rel.items())})")
    ensure_writable(out, "search directory")
    with run_lock(out, f"ditgraft search {name}"):
        atomic_write_text(os.path.join(out, "search.yaml"), yaml.safe_dump(s.model_dump(), sort_keys=False))
        signals = _signals(s, base, out, dev, log)
        cost = np.array([[rel[o] for o in ops]] * depth)
        scores = {sig: np.array([[signals[sig][o][i] for o in ops] for i in range(depth)]) for sig in SIGNALS}
        found = best_designs(scores[s.signal], cost, s.budget.share, k=max(1, s.verify))
        designs = []
        for i, d in enumerate(found, 1):
            layers = [ops[c] for c in d]
            designs.append({"name": f"design{i}", "layers": layers, "cost": float(cost[range(depth), d].mean()),
                            **{f"predicted_{sig}": float(scores[sig][range(depth), d].sum()) for sig in SIGNALS}})
        base_layers = _base_design(base, s.slot, depths)
        base_row = None
        if "base" in s.compare:
            idx = [ops.index(o) if o in ops else None for o in base_layers]
            known = all(i is not None for i in idx)
            same = [d["name"] for d in designs[:s.verify] if _resolved(
                {**base, "grafts": design_grafts(d["layers"], s.slot, s.candidates)}, depths) == _resolved(base, depths)]
            base_row = {"name": "base", "layers": base_layers, "same_as": same[0] if same else None,
                        "cost": float(np.mean([rel.get(o, float("nan")) for o in base_layers])) if known else None,
                        **{f"predicted_{sig}": float(scores[sig][range(depth), idx].sum()) if known else None
                           for sig in SIGNALS}}
        atomic_write_json(os.path.join(out, "designs.json"), {"costs": rel, "designs": designs, "base": base_row})
        for d in designs:
            log(f"search: {d['name']}: {' '.join(d['layers'])} (cost {d['cost']:.3f}, predicted "
                f"{s.signal} {d['predicted_' + s.signal]:.4g})")
        verified = designs[:s.verify]
        table = None
        if verified or base_row:
            points = [{"point": d["name"], "grafts": design_grafts(d["layers"], s.slot, s.candidates)}
                      for d in verified]
            if base_row and not base_row["same_as"]:
                points.append({"point": "base"})
            sweep = build_sweep({"name": f"{name}_verify", "base": base, "set": s.verify_set, "points": points},
                                os.path.join(out, "verify.yaml"))
            atomic_write_text(os.path.join(out, "verify.yaml"), yaml.safe_dump(sweep.spec, sort_keys=False))
            table = run_sweep(sweep, os.path.join(out, "verify"), jobs=jobs, device=device, threads=threads, log=log)
        report = search_report(s, name, rel, signals, designs, base_row, table)
        atomic_write_json(os.path.join(out, "report.json"), report)
        atomic_write_text(os.path.join(out, "report.md"), report_markdown(report))
        log(f"search {name}: report {os.path.join(out, 'report.md')}")
        return report


def search_report(s: SearchFile, name: str, costs: dict, signals: dict, designs: list, base_row, table) -> dict:
    """Predicted and measured quality of every verified design, each signal's rank correlation with the
    measured FID ratio, and whether the best verified design beats the base recipe's."""
    from scipy.stats import spearmanr

    measured = {r["name"]: r for r in (table or {}).get("rows", []) if r["state"] == "done"}
    rows = []
    for d in designs + ([base_row] if base_row else []):
        m = measured.get(d.get("same_as") or d["name"], {})
        rows.append({**d, **{k: m.get(k) for k in ("ratio", "ratio_ci", "gap", "gap_ci", "fid", "accuracy",
                                                     "share_of_pretraining", "latency_ratio", "protocol")}})
    corr = {}
    usable = [r for r in rows if r["ratio"] is not None and not r.get("same_as")]  # each design counted once
    for sig in SIGNALS:
        pairs = [(r[f"predicted_{sig}"], r["ratio"]) for r in usable if r[f"predicted_{sig}"] is not None]
        if len(pairs) >= 3 and len({p for p, _ in pairs}) > 1:
            rho = spearmanr([p for p, _ in pairs], [m for _, m in pairs]).statistic
            corr[sig] = {"rho": float(rho), "n": len(pairs)}
        else:
            corr[sig] = {"rho": None, "n": len(pairs)}
    verdict = None
    found = [r for r in usable if r["name"] != "base"]
    base_m = next((r for r in usable if r["name"] == "base"), None)
    if found and base_m is not None:
        best = min(found, key=lambda r: r["ratio"])
        verdict = {"best": best["name"], "best_ratio": best["ratio"], "base_ratio": base_m["ratio"],
                   "best_cost": best["cost"], "base_cost": base_m["cost"],
                   "at_least_as_good": best["ratio"] <= base_m["ratio"],
                   "no_more_cost": base_m["cost"] is None or best["cost"] <= base_m["cost"] + 1e-9}
        lo_b, hi_b = best.get("ratio_ci") or (None, None)
        lo_a, hi_a = base_m.get("ratio_ci") or (None, None)
        if hi_b is not None and lo_a is not None:
            verdict["intervals_overlap"] = not (hi_b < lo_a or hi_a < lo_b)
    return {"search": name, "slot": s.slot, "signal": s.signal, "budget": s.budget.model_dump(), "costs": costs,
            "signals": signals, "rows": rows, "correlation": corr, "verdict": verdict}


def report_markdown(r: dict) -> str:
    def f(v, d=3):
        return "-" if v is None else f"{v:.{d}f}"

    def g(v):
        return "-" if v is None else f"{v:.4g}"

    lines = [f"# Search {r['search']}", "",
             f"Slot {r['slot']}; budget: {r['budget']['cost']} at most {r['budget']['share']:.3f} of the teacher's "
             f"({'token-mixing FLOPs, projections taken off' if r['budget'].get('part') == 'mixing' else 'whole slot'}); "
             f"designs chosen by least total {r['signal']} (exact, MILP). Cost per layer relative to the teacher's "
             "operator: " + ", ".join(f"{o} {c:.3f}" for o, c in r["costs"].items()) + ".", "",
             "## Signals per layer", "", "| signal | candidate | " + " | ".join(
                 f"L{i}" for i in range(r["signals"]["depth"])) + " |",
             "|---|---|" + "---|" * r["signals"]["depth"]]
    for sig in SIGNALS:
        for op, vals in r["signals"][sig].items():
            lines.append(f"| {sig} | {op} | " + " | ".join(f"{v:.3g}" for v in vals) + " |")
    lines += ["", "## Designs: predicted and measured", "",
              "| design | operator per layer | cost | predicted sensitivity | predicted probe loss | FID ratio | "
              "accuracy gap | share % | protocol |", "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        ratio = f(row["ratio"]) + (f" [{row['ratio_ci'][0]:.3f}, {row['ratio_ci'][1]:.3f}]" if row.get("ratio_ci")
                                   else "")
        gap = f(row["gap"]) + (f" [{row['gap_ci'][0]:.3f}, {row['gap_ci'][1]:.3f}]" if row.get("gap_ci") else "")
        share = row.get("share_of_pretraining")
        label = row["name"] + (f" (= {row['same_as']})" if row.get("same_as") else "")
        lines.append(f"| {label} | {' '.join(row['layers'])} | {f(row['cost'])} | "
                     f"{g(row['predicted_sensitivity'])} | {g(row['predicted_probe_loss'])} | {ratio} | {gap} | "
                     f"{f(None if share is None else 100 * share, 2)} | {row.get('protocol') or 'not verified'} |")
    lines += ["", "## Do the cheap signals rank designs?", ""]
    for sig, c in r["correlation"].items():
        lines.append(f"- {sig}: " + (f"Spearman rho {c['rho']:.2f} over {c['n']} verified designs"
                                     if c["rho"] is not None else f"not computable ({c['n']} verified designs)"))
    v = r["verdict"]
    if v:
        word = "at least as good as" if v["at_least_as_good"] else "worse than"
        lines += ["", f"Best verified design {v['best']}: FID ratio {v['best_ratio']:.3f}, {word} the base recipe's "
                      f"{v['base_ratio']:.3f}, at cost {f(v['best_cost'])} vs {f(v['base_cost'])}"
                      + (" (their intervals overlap: not a decided difference)." if v.get("intervals_overlap")
                         else ".")]
    return "\n".join(lines) + "\n"

