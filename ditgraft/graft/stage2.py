"""Stage 2: lightweight end-to-end finetuning of the grafted student with the DiT loss (the shared loop)."""
from __future__ import annotations

import os

import torch
from torch import nn

from ditgraft.diffusion.gaussian import GaussianDiffusion
from ditgraft.train.loop import LoopConfig, train
from ditgraft.train.pretrain import diffusion_step_fn


def stage2_loop_config(cfg, seed: int, progress: bool = True) -> LoopConfig:
    return LoopConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                      warmup_steps=cfg.warmup_steps, decay_steps=cfg.decay_steps, ema_decay=cfg.ema_decay,
                      grad_clip=cfg.grad_clip, ckpt_every=cfg.ckpt_every,
                      log_every=max(1, min(10, cfg.steps // 20)), seed=seed, progress=progress,
                      precision=cfg.precision, grad_accum_steps=cfg.grad_accum_steps,
                      activation_checkpointing=cfg.activation_checkpointing)


def run_stage2(student: nn.Module, cfg, x0: torch.Tensor, y: torch.Tensor, run_dir: str, seed: int,
               progress: bool = True) -> tuple[nn.Module, list[dict]]:
    """Finetune all parameters; returns the weights to keep (EMA when enabled) and the loss history."""
    diffusion = GaussianDiffusion.dit_default(learn_sigma=student.learn_sigma)
    student.requires_grad_(True)
    student.pos_embed.requires_grad_(False)  # fixed sin-cos table, as in DiT
    result = train(student, diffusion_step_fn(diffusion), (x0, y), stage2_loop_config(cfg, seed, progress),
                   os.path.join(run_dir, "loop"), desc="stage2")
    return (result.ema if result.ema is not None else result.model).eval(), result.history
