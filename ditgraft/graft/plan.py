"""Layer planning: the grafts a recipe resolves to on its teacher (with the locality analysis and probe losses
its selectors need), kept in the run directory's plan.json."""
from __future__ import annotations

import os
from dataclasses import asdict

from ditgraft.analysis.locality import analyze_model, write_analysis_report
from ditgraft.distributed import on_main
from ditgraft.graft.data_split import eval_captions, stage1_split
from ditgraft.graft.stage1 import run_stage1
from ditgraft.graft.surgery import ResolvedGraft, resolve_grafts
from ditgraft.layers import selector_needs
from ditgraft.models.adapters import slot_depths
from ditgraft.recipe import Recipe
from ditgraft.utils import atomic_write_json, read_json


def _needs(recipe: Recipe, need: str) -> bool:
    """Whether some graft's layer selector needs ``need`` (``ditgraft.layers.NEEDS``) prepared."""
    return any(need in selector_needs(g.layers) for g in recipe.grafts)


def _analysis(teacher, run_dir: str, device, log, captions=None) -> dict:
    path = os.path.join(run_dir, "analysis", "analysis.json")

    def run() -> dict:  # rank 0's analysis, shared with the other ranks
        if os.path.exists(path):
            return read_json(path)
        log("analysis: attention locality of the teacher (for the layer selectors)")
        result = analyze_model(teacher, num_samples=50, steps=10, device=device, captions=captions)
        write_analysis_report(result, os.path.join(run_dir, "analysis"))
        return result

    return on_main(run)


def _probe_losses(recipe: Recipe, teacher, run_dir: str, device, log) -> dict[int, dict[int, float]]:
    """Selectors that need probe losses: distil the candidate operator into every layer briefly; relative val MSE
    per layer."""
    out = {}
    for gi, g in enumerate(recipe.grafts):
        if "probe_losses" not in selector_needs(g.layers):
            continue
        depth = slot_depths(teacher)[g.slot]
        probe = [ResolvedGraft(g.slot, i, g.operator, dict(g.options), g.loss, g.huber_delta, g.init)
                 for i in range(depth)]
        cfg = recipe.stage1.model_copy(update={"steps": g.layers.probe_steps,
                                               "eval_every": g.layers.probe_steps})
        x, y, xv, yv = stage1_split(cfg, recipe.seed)
        log(f"{g.layers.select} selector: probing {g.operator} in all {depth} {g.slot} slots for {cfg.steps} steps")
        res = run_stage1(teacher, probe, cfg, x, y, xv, yv, os.path.join(run_dir, f"probe{gi}"), recipe.seed,
                         device, log=log)
        out[gi] = {s["layer"]: s["val_rel_mse"] for s in res["operators"].values()}
    return out


def plan_grafts(recipe: Recipe, teacher, run_dir: str, device, log=print) -> list[ResolvedGraft]:
    path = os.path.join(run_dir, "plan.json")
    if on_main(lambda: os.path.exists(path)):
        return [ResolvedGraft(**g) for g in read_json(path)["grafts"]]
    analysis = (_analysis(teacher, run_dir, device, log, eval_captions(recipe)) if _needs(recipe, "analysis")
                else None)
    probes = _probe_losses(recipe, teacher, run_dir, device, log) if _needs(recipe, "probe_losses") else None
    grafts = resolve_grafts(recipe, slot_depths(teacher), analysis=analysis, probe_losses=probes)
    on_main(lambda: atomic_write_json(path, {"grafts": [asdict(g) for g in grafts], "probe_losses": probes}))
    return grafts
