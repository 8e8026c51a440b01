"""Stage 2: lightweight end-to-end finetuning of the grafted student with the teacher's own objective (its
family's: DiT's IDDPM loss, or flow matching's velocity loss) in the shared loop.

All parameters train, or (``cfg.lora``) low-rank adapters through peft on the chosen modules plus the grafted
operators; the adapters are merged at the end, so the result is a plain model of the teacher's class.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ditgraft.diffusion.gaussian import GaussianDiffusion
from ditgraft.models.families import family_of, model_call
from ditgraft.models.families.base import cond_tuple
from ditgraft.recipe import Stage2
from ditgraft.train.loop import train
from ditgraft.train.lora import add_lora, merge_lora
from ditgraft.train.pretrain import diffusion_losses, diffusion_step_fn


def distill_step_fn(diffusion: GaussianDiffusion, teacher: nn.Module, weight: float,
                    diffusion_weight: float = 1.0):
    """DiT's training step with output distillation: loss = diffusion_weight * diffusion loss + weight * MSE(student
    output, teacher output), the frozen teacher seeing the student's noised input, timestep and conditioning (labels
    after label dropout where the family drops them inside the model), as CLEAR distils its linear-attention
    students. Both models are called through their family. Logged as "distill" and "diffusion"."""

    def step(model, batch):
        seen = {}
        call = model_call(model)
        table = family_of(model).dropped_labels_module(model)  # its input: the labels after dropout
        hook = table.register_forward_hook(lambda _m, args, _out: seen.__setitem__("y", args[0])) if table else None

        def student(x, t, y):
            seen["x"], seen["t"], seen["out"] = x, t, call(x, t, y)
            seen.setdefault("y", y)
            return seen["out"]

        try:
            terms = diffusion_losses(diffusion, student, batch)
        finally:
            if hook is not None:
                hook.remove()
        with torch.no_grad():
            target = model_call(teacher)(seen["x"], seen["t"], seen["y"])
        terms["distill"] = ((seen["out"] - target) ** 2).mean()
        terms["diffusion"] = terms["loss"].detach()
        terms["loss"] = diffusion_weight * terms["loss"] + weight * terms["distill"]
        return terms

    return step


def stage2_step_fn(diffusion: GaussianDiffusion, cfg: Stage2, teacher: nn.Module | None = None):
    """The diffusion loss, plus output distillation from ``teacher`` when ``cfg.distill_weight`` > 0 (each term
    weighted by its recipe weight; distillation alone with ``cfg.diffusion_weight`` = 0)."""
    if not cfg.distill_weight:
        return diffusion_step_fn(diffusion)
    if teacher is None:
        raise ValueError(f"stage2.distill_weight = {cfg.distill_weight} needs the teacher; pass teacher=")
    teacher.eval()  # no label dropout: it sees the labels the student saw
    return distill_step_fn(diffusion, teacher, cfg.distill_weight, cfg.diffusion_weight)


def run_stage2(student: nn.Module, cfg: Stage2, x0: torch.Tensor, y, run_dir: str, seed: int,
               progress: bool = True, teacher: nn.Module | None = None, grafts=None) -> tuple[nn.Module, list[dict]]:
    """Finetune the student on (x0, y) (y: labels or a tuple such as caption embeddings and masks); returns the
    weights to keep (EMA when enabled) and the loss history. ``teacher`` is needed when ``cfg.distill_weight`` > 0
    (output distillation). With ``cfg.lora`` the grafted slots in ``grafts`` train fully and the rest through LoRA
    adapters, merged into plain weights before returning."""
    family = family_of(student)
    diffusion = family.objective(student)
    lora = getattr(cfg, "lora", None)
    if lora is not None:
        student = add_lora(student, lora, trainable=[family.get_slot(student, g.layer, g.slot)
                                                     for g in (grafts or [])])
    else:
        student.requires_grad_(True)
        for p in family.frozen_parameters(student):
            p.requires_grad_(False)
    result = train(student, stage2_step_fn(diffusion, cfg, teacher), (x0, *cond_tuple(y)),
                   cfg.loop_config(seed, progress),
                   os.path.join(run_dir, "loop"), desc="stage2")
    out = result.ema if result.ema is not None else result.model
    if lora is not None:
        out = merge_lora(out)
    return out.eval(), result.history
