"""Stage 2: lightweight end-to-end finetuning of the grafted student with the DiT loss (the shared loop)."""
from __future__ import annotations

import os

import torch
from torch import nn

from ditgraft.diffusion.gaussian import GaussianDiffusion
from ditgraft.recipe import Stage2
from ditgraft.train.loop import train
from ditgraft.train.pretrain import diffusion_step_fn


def run_stage2(student: nn.Module, cfg: Stage2, x0: torch.Tensor, y: torch.Tensor, run_dir: str, seed: int,
               progress: bool = True) -> tuple[nn.Module, list[dict]]:
    """Finetune all parameters; returns the weights to keep (EMA when enabled) and the loss history."""
    diffusion = GaussianDiffusion.dit_default(learn_sigma=student.learn_sigma)
    student.requires_grad_(True)
    student.pos_embed.requires_grad_(False)  # fixed sin-cos table, as in DiT
    result = train(student, diffusion_step_fn(diffusion), (x0, y), cfg.loop_config(seed, progress),
                   os.path.join(run_dir, "loop"), desc="stage2")
    return (result.ema if result.ema is not None else result.model).eval(), result.history
