"""Training FLOPs of a graft run, every rule in one place (plan.json and the report's compute section).

- A training step costs 3 x the forward (backward = 2 x forward, as in ``flops.dit_train_flops_per_sample``).
- Stage 1: each stage-1 run (the operators of the grafted slots; the parallel units of a restructure) runs the
  teacher once per cached sample (training and validation rows) or, streaming, once per training row; each target's
  module trains on ``steps x batch_size`` rows, its forward counted on a batch of 2 of its inputs.
- Stage 2: the final student's training step, plus one teacher forward per row when output distillation is on
  (``stage2.distill_weight > 0``), times ``batch_size`` and ``steps``.
- Baselines spend the run's total on stage 2 alone, at their own step cost (same rule, same batch):
  ``random_init_stage2_steps`` (the operators from random init, no stage 1) and, with a restructure,
  ``depth_pruned_stage2_steps`` / ``from_scratch_stage2_steps``.
"""
from __future__ import annotations

import torch
from torch import nn

from ditgraft.flops import count_flops, dit_forward_flops_per_sample, dit_train_flops_per_sample
from ditgraft.graft.restructure import BASELINES, baseline_model, restructure, unit_index
from ditgraft.graft.stage1 import PairTarget, SlotTarget
from ditgraft.models.adapters import get_slot, model_dims
from ditgraft.models.families import family_of


def stage1_module_flops(module: nn.Module, target, dims) -> int:
    """Training FLOPs per row of a stage-1 module: 3 x its forward on random inputs of its target's shapes."""
    device = next(module.parameters()).device
    xs = [torch.randn(2, *shape, device=device) for shape in target.row_shapes(dims)[:-1]]
    with torch.no_grad():
        return 3 * count_flops(module, *xs) // 2


def stage2_step_flops(model: nn.Module, teacher: nn.Module, stage2) -> int:
    """One stage-2 step of ``model``: its training FLOPs per row (plus the teacher's forward when distilling)."""
    per_row = dit_train_flops_per_sample(model)
    if stage2.distill_weight > 0:  # output distillation: one teacher forward per row
        per_row += dit_forward_flops_per_sample(teacher)
    return per_row * stage2.batch_size


def matched_steps(total_flops: int, step_flops: int) -> int:
    """Stage-2 steps that spend ``total_flops`` at ``step_flops`` each (at least one)."""
    return max(1, round(total_flops / step_flops))


def compute_accounting(teacher: nn.Module, teacher_meta: dict, grafts, recipe, student: nn.Module,
                       spec: dict | None = None) -> dict:
    """Training FLOPs of stage 1 (teacher extraction forwards + module training) and stage 2, their share of the
    teacher's pretraining FLOPs (from its model card metadata) and each baseline's matched stage-2 steps.
    ``student``: the grafted teacher (``graft_model``), restructured here in place by ``spec`` when given."""
    s1, s2 = recipe.stage1, recipe.stage2
    dims = model_dims(teacher)
    pairs = spec["parallel_pairs"] if spec is not None else []
    extraction, module_train = 0, 0
    rows = s1.steps * s1.batch_size
    if s1.enabled:
        passes = bool(grafts) + bool(pairs)  # each stage-1 run has its own teacher pass
        fwd = dit_forward_flops_per_sample(teacher)
        extraction = passes * fwd * (rows if s1.cache == "stream" else (s1.samples + s1.val_samples))
        for g in grafts:
            module_train += stage1_module_flops(get_slot(student, g.layer, g.slot), SlotTarget(g), dims) * rows
    if spec is not None:
        restructure(student, spec)
        if s1.enabled:
            blocks = family_of(student).blocks(student)
            for p in pairs:
                module_train += stage1_module_flops(blocks[unit_index(spec, p)], PairTarget(p), dims) * rows
    s2_step = stage2_step_flops(student, teacher, s2)
    s2_flops = s2_step * s2.steps if s2.enabled else 0
    pre = (teacher_meta.get("pretrain") or {}).get("train_flops")
    total = extraction + module_train + s2_flops
    out = {"stage1_extraction_flops": extraction, "stage1_operator_flops": module_train, "stage2_flops": s2_flops,
           "total_flops": total, "teacher_pretrain_flops": pre,
           "share_of_pretraining": (total / pre) if pre else None,
           "stage2_share_of_pretraining": (s2_flops / pre) if pre else None,
           "random_init_stage2_steps": matched_steps(total, s2_step)}
    if spec is not None:
        for name in BASELINES:
            model = baseline_model(name, teacher, spec, recipe.seed)
            out[f"{name}_stage2_steps"] = matched_steps(total, stage2_step_flops(model, teacher, s2))
    return out
