"""Layer planning: the grafts a recipe resolves to on its teacher (with the locality analysis and probe losses
its selectors need), kept in the run directory's plan.json."""
from __future__ import annotations

import os
from dataclasses import asdict

from ditgraft.analysis.locality import analyze_model, write_analysis_report
from ditgraft.distributed import on_main
from ditgraft.graft.data_split import eval_captions, stage1_split
from ditgraft.graft.stage1 import run_stage1
from ditgraft.graft.surgery import ResolvedGraft, graft_parameter_counts, resolve_grafts
from ditgraft.layers import selector_needs
from ditgraft.models.adapters import slot_depths
from ditgraft.recipe import Recipe
from ditgraft.train.memory import format_stage2_memory
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


def stage2_memory_line(recipe: Recipe, teacher, grafts: list[ResolvedGraft] | None, world: int, device=None) -> str:
    """``format_stage2_memory`` for the student that ``grafts`` make of ``teacher`` (the new operators' weights,
    their training state and, under output distillation, the frozen teacher beside it); ``grafts`` None: the
    teacher's parameter count (layer selectors that need the teacher's analysis are resolved by the run)."""
    added, new = graft_parameter_counts(teacher, grafts) if grafts else (0, 0)
    distill = sum(p.numel() for p in teacher.parameters())
    line = format_stage2_memory(teacher, recipe.stage2, world, device, added, new, distill)
    if grafts is None:
        return line + " (the student counted as the teacher: its layers are chosen by the run)"
    return line


def recipe_stage2_memory(recipe: Recipe, gpus: int) -> str | None:
    """The expected stage-2 memory per GPU of a recipe, as one line, from the teacher's architecture and the
    recipe's operators (built on the meta device: no memory, no weights); a recipe whose teacher names no size gets
    a line saying what to set; None when stage 2 is off."""
    import torch

    from ditgraft.models.checkpoints import SHIPPED_TEACHERS
    from ditgraft.models.dit import build_dit
    from ditgraft.models.families import DIFFUSERS_PREFIX, diffusers_architecture
    from ditgraft.train.pretrain import build_named

    t = recipe.teacher
    if not recipe.stage2.enabled:
        return None
    if t.source.startswith(DIFFUSERS_PREFIX):
        teacher = diffusers_architecture(t.source[len(DIFFUSERS_PREFIX):])
        if teacher is None:
            return (f"stage 2 memory: no architecture known offline for {t.source} (a local model or pipeline "
                    "folder's config.json, or a published one in ditgraft/assets/diffusers/configs.json)")
    elif t.source in SHIPPED_TEACHERS:
        with torch.device("meta"):
            teacher = build_named(t.source)
    else:
        if t.model is None:
            return "stage 2 memory: set teacher.model (a size name) to see the estimate"
        with torch.device("meta"):
            teacher = build_dit(t.model, **({"input_size": t.image_size // 8} if t.image_size else {}))
    grafts = None if any(selector_needs(g.layers) for g in recipe.grafts) else resolve_grafts(
        recipe, slot_depths(teacher))
    return stage2_memory_line(recipe, teacher, grafts, gpus)
