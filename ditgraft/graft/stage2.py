"""Stage 2: lightweight end-to-end finetuning of the grafted student with the DiT loss (the shared loop).

All parameters train, or (``cfg.lora``) low-rank adapters through peft on the chosen modules plus the grafted
operators; the adapters are merged at the end, so the result is a plain model of the teacher's class.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ditgraft.diffusion.gaussian import GaussianDiffusion
from ditgraft.models.families import family_of
from ditgraft.models.families.base import cond_tuple
from ditgraft.train.loop import LoopConfig, train
from ditgraft.train.pretrain import diffusion_step_fn


def stage2_loop_config(cfg, seed: int, progress: bool = True) -> LoopConfig:
    return LoopConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                      warmup_steps=cfg.warmup_steps, decay_steps=cfg.decay_steps, ema_decay=cfg.ema_decay,
                      grad_clip=cfg.grad_clip, ckpt_every=cfg.ckpt_every,
                      log_every=max(1, min(10, cfg.steps // 20)), seed=seed, progress=progress)


def run_stage2(student: nn.Module, cfg, x0: torch.Tensor, y, run_dir: str, seed: int,
               progress: bool = True, grafts=None) -> tuple[nn.Module, list[dict]]:
    """Finetune the student on (x0, y) (y: labels or a tuple such as caption embeddings and masks); returns the
    weights to keep (EMA when enabled) and the loss history. With ``cfg.lora`` the grafted slots in ``grafts``
    train fully and the rest through LoRA adapters, merged into plain weights before returning."""
    family = family_of(student)
    diffusion = GaussianDiffusion.dit_default(learn_sigma=family.learn_sigma(student))
    lora = getattr(cfg, "lora", None)
    if lora is not None:
        from ditgraft.train.lora import add_lora, merge_lora

        student = add_lora(student, lora, trainable=[family.get_slot(student, g.layer, g.slot)
                                                     for g in (grafts or [])])
    else:
        student.requires_grad_(True)
        for p in family.frozen_parameters(student):
            p.requires_grad_(False)
    result = train(student, diffusion_step_fn(diffusion), (x0, *cond_tuple(y)), stage2_loop_config(cfg, seed, progress),
                   os.path.join(run_dir, "loop"), desc="stage2")
    out = result.ema if result.ema is not None else result.model
    if lora is not None:
        out = merge_lora(out)
    return out.eval(), result.history
