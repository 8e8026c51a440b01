"""Pretraining from scratch with the shared loop (how the shipped testbed teachers were made): a DiT size
(``testbed``: IDDPM) or an MMDiT (``flowbed``: rectified flow); the objective is the model family's."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch

from ditgraft.data.images import check_data_fits, load_dataset
from ditgraft.diffusion.gaussian import GaussianDiffusion
from ditgraft.distributed import barrier, is_main
from ditgraft.flops import dit_train_flops_per_sample
from ditgraft.models.checkpoints import save_safetensors
from ditgraft.models.dit import DIT_CONFIGS, DiT, build_dit
from ditgraft.models.families import family_of, model_call
from ditgraft.models.mmdit import MMDIT_CONFIGS, MMDiT
from ditgraft.models.families.base import cond_pack
from ditgraft.train.loop import LoopConfig, latest_checkpoint, train
from ditgraft.utils import atomic_write_json, read_json, run_lock


def diffusion_losses(diffusion: GaussianDiffusion, fn, batch) -> dict:
    """The objective's training loss on a batch (x0, *cond) for the model function ``fn(x, t, y)``: for DiT's
    IDDPM t ~ U{0..T-1}, loss = MSE(eps) + VLB; for flow matching the velocity MSE at its sampled t."""
    x0, y = batch[0], cond_pack(batch[1:])
    t = diffusion.sample_t(x0)
    terms = diffusion.training_losses(fn, x0, t, model_kwargs=dict(y=y))
    return {k: v.mean() for k, v in terms.items()}


def diffusion_step_fn(diffusion: GaussianDiffusion):
    """DiT's training step; the model is called through its family (class labels, or caption embeddings and
    masks)."""

    def step(model, batch):
        return diffusion_losses(diffusion, model_call(model), batch)

    return step


def _settings(loop: dict) -> str:
    """Loop settings as they read back from pretrain_info.json (tuples become lists), progress bar aside."""
    return json.dumps({k: v for k, v in loop.items() if k != "progress"}, sort_keys=True)


def record_stage(info: dict, loop: dict, resumed_from: int) -> list[dict]:
    """The run's stages: each command whose loop settings differ from the previous one's starts a new stage.

    A crash and a resume with the same settings stay one stage; a resume with new settings (more steps, another
    LR schedule) is a second command, resumed from the first one's last checkpoint, and the card lists both.
    """
    stages = list(info.get("stages") or ([{"from_step": 0, "loop": info["loop"]}] if "loop" in info else []))
    if not stages or _settings(stages[-1]["loop"]) != _settings(loop):
        # the first stage starts at 0 even when this call resumed a crashed call of the same command
        stages.append({"from_step": resumed_from if stages else 0, "loop": json.loads(json.dumps(loop))})
    return stages


def build_named(name: str) -> DiT | MMDiT:
    """A model to pretrain by its registered name: a DiT size (``DIT_CONFIGS``) or an MMDiT (``MMDIT_CONFIGS``)."""
    if name in MMDIT_CONFIGS:
        return MMDiT(**MMDIT_CONFIGS[name])
    if name not in DIT_CONFIGS:
        raise KeyError(f"model={name!r} is unknown; allowed: {', '.join([*DIT_CONFIGS, *MMDIT_CONFIGS])}")
    return build_dit(name)


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
    """Train, then write ``run_dir/model.safetensors`` (EMA weights + metadata). Returns its path.

    ``run_dir`` is locked for the call. A run directory trained further than ``cfg.loop.steps``, or finished with
    other loop settings, is refused: its recorded metadata (steps, training FLOPs) stays what was measured."""
    with run_lock(run_dir, "ditgraft pretrain"):
        return _pretrain(cfg, run_dir, device)


def _refuse_rewrite(info: dict, loop: dict, run_dir: str) -> None:
    found = latest_checkpoint(run_dir)
    if found is None:
        return
    done = found[0]
    if done > loop["steps"]:
        raise ValueError(f"steps={loop['steps']}: {run_dir} is already trained to step {done}; allowed: "
                         f"steps >= {done} (continue the run) or another --run-dir (a new run)")
    if done == loop["steps"] and "loop" in info and _settings(info["loop"]) != _settings(loop):
        raise ValueError(f"{run_dir} finished at step {done} with other loop settings; nothing is left to train "
                         f"with these; allowed: steps > {done} (a new stage) or another --run-dir")


def stage_flops(stages: list[dict], per_sample: int) -> int:
    """Training FLOPs over the recorded stages: each stage's steps times its own batch size."""
    total = 0
    for i, st in enumerate(stages):
        end = stages[i + 1]["from_step"] if i + 1 < len(stages) else st["loop"]["steps"]
        total += per_sample * max(0, end - st["from_step"]) * st["loop"]["batch_size"]
    return total


def _pretrain(cfg: PretrainConfig, run_dir: str, device: torch.device) -> str:
    info_path = os.path.join(run_dir, "pretrain_info.json")
    info = read_json(info_path) if os.path.exists(info_path) else {}
    _refuse_rewrite(info, json.loads(json.dumps(asdict(cfg.loop))), run_dir)
    torch.manual_seed(cfg.loop.seed)
    model = build_named(cfg.model).to(device)
    # mnist5k -> its training split; an image folder is read at the model's size and channels
    size = model.config["input_size"]
    x, y = load_dataset(cfg.data, image_size=size if isinstance(size, int) else max(size),
                        channels=model.in_channels if model.in_channels in (1, 3) else 3)
    check_data_fits(x, y, model, cfg.data)
    diffusion = family_of(model).objective(model)  # DiT: IDDPM; MMDiT: rectified flow
    t0 = time.time()
    result = train(model, diffusion_step_fn(diffusion), (x, y), cfg.loop, run_dir, desc="pretrain")
    wall = time.time() - t0
    out = os.path.join(run_dir, "model.safetensors")
    if not is_main():  # rank 0 alone writes; the loop's logged loss is already the mean over ranks
        barrier()
        return out
    flops_per_sample = dit_train_flops_per_sample(model)
    info["stages"] = record_stage(info, asdict(cfg.loop), result.resumed_from)
    info.update({
        "model": cfg.model,
        "data": cfg.data,
        "loop": asdict(cfg.loop),
        "wall_seconds": info.get("wall_seconds", 0.0) + wall,
        "train_flops_per_sample": flops_per_sample,
        "train_flops": stage_flops(info["stages"], flops_per_sample),
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "objective": diffusion.name,
    })
    atomic_write_json(info_path, info)
    save_safetensors(out, result.ema if result.ema is not None else model,
                     {"model_config": model.config, "family": family_of(model).name, "pretrain": info})
    barrier()
    return out
