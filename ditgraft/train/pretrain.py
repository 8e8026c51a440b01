"""Pretraining a DiT from scratch with the shared loop (how the shipped testbed teacher was made)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch

from ditgraft.data.images import load_dataset
from ditgraft.diffusion.gaussian import GaussianDiffusion
from ditgraft.flops import dit_train_flops_per_sample
from ditgraft.models.checkpoints import save_safetensors
from ditgraft.models.dit import build_dit
from ditgraft.models.families import model_call
from ditgraft.models.families.base import cond_pack
from ditgraft.train.loop import LoopConfig, train
from ditgraft.utils import atomic_write_json


def diffusion_step_fn(diffusion: GaussianDiffusion):
    """DiT's training step: t ~ U{0..T-1}, loss = MSE(eps) + VLB, on a batch (x0, *cond); the model is called
    through its family (class labels, or caption embeddings and masks)."""

    def step(model, batch):
        x0, y = batch[0], cond_pack(batch[1:])
        t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), device=x0.device)
        terms = diffusion.training_losses(model_call(model), x0, t, model_kwargs=dict(y=y))
        return {k: v.mean() for k, v in terms.items()}

    return step


def record_stage(info: dict, loop: dict, resumed_from: int) -> list[dict]:
    """The run's stages: each command whose loop settings differ from the previous one's starts a new stage.

    A crash and a resume with the same settings stay one stage; a resume with new settings (more steps, another
    LR schedule) is a second command, resumed from the first one's last checkpoint, and the card lists both.
    """
    def settings(d: dict) -> str:  # as they read back from pretrain_info.json (tuples become lists)
        return json.dumps({k: v for k, v in d.items() if k != "progress"}, sort_keys=True)

    stages = list(info.get("stages") or ([{"from_step": 0, "loop": info["loop"]}] if "loop" in info else []))
    if not stages or settings(stages[-1]["loop"]) != settings(loop):
        # the first stage starts at 0 even when this call resumed a crashed call of the same command
        stages.append({"from_step": resumed_from if stages else 0, "loop": json.loads(json.dumps(loop))})
    return stages


@dataclass
class PretrainConfig:
    model: str = "testbed"
    data: str = "mnist5k"
    loop: LoopConfig = None  # type: ignore[assignment]

    def __post_init__(self):
        if self.loop is None:
            self.loop = LoopConfig(steps=5000, batch_size=128, lr=5e-4, warmup_steps=200, ema_decay=0.999,
                                   grad_clip=1.0, ckpt_every=250)


def pretrain(cfg: PretrainConfig, run_dir: str, device: torch.device) -> str:
    """Train, then write ``run_dir/model.safetensors`` (EMA weights + metadata). Returns its path."""
    torch.manual_seed(cfg.loop.seed)
    model = build_dit(cfg.model).to(device)
    x, y = load_dataset(cfg.data)  # mnist5k -> its training split
    diffusion = GaussianDiffusion.dit_default(learn_sigma=model.learn_sigma)
    t0 = time.time()
    result = train(model, diffusion_step_fn(diffusion), (x, y), cfg.loop, run_dir, desc="pretrain")
    wall = time.time() - t0
    info_path = os.path.join(run_dir, "pretrain_info.json")
    info = {}
    if os.path.exists(info_path):
        from ditgraft.utils import read_json

        info = read_json(info_path)
    flops_per_sample = dit_train_flops_per_sample(model)
    info["stages"] = record_stage(info, asdict(cfg.loop), result.resumed_from)
    info.update({
        "model": cfg.model,
        "data": cfg.data,
        "loop": asdict(cfg.loop),
        "wall_seconds": info.get("wall_seconds", 0.0) + wall,
        "train_flops_per_sample": flops_per_sample,
        "train_flops": flops_per_sample * cfg.loop.steps * cfg.loop.batch_size,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "device": str(device),
        "torch": torch.__version__,
        "final_loss": result.history[-1]["loss"] if result.history else None,
    })
    atomic_write_json(info_path, info)
    out = os.path.join(run_dir, "model.safetensors")
    save_safetensors(out, result.ema if result.ema is not None else model,
                     {"model_config": model.config, "pretrain": info})
    return out
