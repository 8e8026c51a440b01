"""Stage 2: lightweight end-to-end finetuning of the grafted student with the DiT loss (the shared loop)."""
from __future__ import annotations

import os

import torch
from torch import nn

from ditgraft.diffusion.gaussian import GaussianDiffusion
from ditgraft.recipe import Stage2
from ditgraft.train.loop import train
from ditgraft.train.pretrain import diffusion_step_fn


def distill_step_fn(diffusion: GaussianDiffusion, teacher: nn.Module, weight: float):
    """DiT's training step plus output distillation: loss = diffusion loss + weight * MSE(student output, teacher
    output), the frozen teacher seeing the student's noised input, timestep and labels (after label dropout), as
    CLEAR distils its linear-attention students. Logged as "distill"."""
    base = diffusion_step_fn(diffusion)

    def step(model, batch):
        seen = {}
        table = getattr(model, "module", model).y_embedder.embedding_table  # its input: the labels after dropout
        hook = table.register_forward_hook(lambda _m, args, _out: seen.__setitem__("y", args[0]))

        def student(x, t, **kwargs):
            seen["x"], seen["t"], seen["out"] = x, t, model(x, t, **kwargs)
            return seen["out"]

        try:
            terms = base(student, batch)
        finally:
            hook.remove()
        with torch.no_grad():
            target = teacher(seen["x"], seen["t"], seen["y"])
        terms["distill"] = ((seen["out"] - target) ** 2).mean()
        terms["loss"] = terms["loss"] + weight * terms["distill"]
        return terms

    return step


def stage2_step_fn(diffusion: GaussianDiffusion, cfg: Stage2, teacher: nn.Module | None = None):
    """The diffusion loss, plus output distillation from ``teacher`` when ``cfg.distill_weight`` > 0."""
    if not cfg.distill_weight:
        return diffusion_step_fn(diffusion)
    if teacher is None:
        raise ValueError(f"stage2.distill_weight = {cfg.distill_weight} needs the teacher; pass teacher=")
    teacher.eval()  # no label dropout: it sees the labels the student saw
    return distill_step_fn(diffusion, teacher, cfg.distill_weight)


def run_stage2(student: nn.Module, cfg: Stage2, x0: torch.Tensor, y: torch.Tensor, run_dir: str, seed: int,
               progress: bool = True, teacher: nn.Module | None = None) -> tuple[nn.Module, list[dict]]:
    """Finetune all parameters; returns the weights to keep (EMA when enabled) and the loss history.
    ``teacher`` is needed when ``cfg.distill_weight`` > 0 (output distillation)."""
    diffusion = GaussianDiffusion.dit_default(learn_sigma=student.learn_sigma)
    student.requires_grad_(True)
    student.pos_embed.requires_grad_(False)  # fixed sin-cos table, as in DiT
    result = train(student, stage2_step_fn(diffusion, cfg, teacher), (x0, y), cfg.loop_config(seed, progress),
                   os.path.join(run_dir, "loop"), desc="stage2")
    return (result.ema if result.ema is not None else result.model).eval(), result.history
