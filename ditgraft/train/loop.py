"""The one training loop: pretraining, stage 2 finetuning and per-operator stage 1 all run through ``train``.

AdamW, linear warmup then a constant (optionally ending in a linear decay to 0) or cosine learning rate, gradient
clipping, EMA, checkpoints every N steps, exact resume, a progress bar and a JSONL metrics log. Under torchrun
(gloo on CPU) the ranks split each global batch with DDP, or with FSDP2 (``sharding="fsdp"``, ``train/sharding.py``:
parameters, gradients and optimizer state sharded per block).

Exact resume without saving RNG state: every step seeds the global RNG and picks its batch from a function of
(seed, step) alone, so steps 0..k-1 then a restart from the checkpoint at k gives the same weights as one run.
Checkpoints are written to a temporary folder and renamed into place (old ones are renamed away before deletion);
readers take only complete ``step_NNNNNNN`` folders, so a kill at any point leaves a resumable run, and the
temporaries a kill leaves behind are removed when the next run starts.

Numerical guard: a non-finite loss or gradient norm stops the run with ``TrainingDiverged`` (naming the stage, the
step and the last good checkpoint); checkpoints are only ever written from finite weights, so the rotation can never
delete the last finite one.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

from ditgraft.train import sharding as fsdp2
from ditgraft.train import tracking
from ditgraft.utils import (UnsafePickle, atomic_write_text, non_finite_tensors, pause_inside_write,
                            remove_orphan_temporaries, torch_load_weights, writing)

CKPT_NAME = re.compile(r"step_(\d{7})$")


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm or the weights became non-finite; the run stopped at its last good checkpoint."""


PRECISIONS = ("fp32", "bf16")


@dataclass
class LoopConfig:
    steps: int
    batch_size: int
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "constant"  # or "cosine" (decays to 0 at the last step, after warmup)
    decay_steps: int = 0  # constant schedule only: decay linearly to 0 over the last decay_steps steps
    ema_decay: float | None = 0.9999
    grad_clip: float | None = None
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    progress: bool = True
    # scale settings (see ``_forward_backward``)
    precision: str = "fp32"  # or "bf16": bfloat16 autocast on CUDA (weights, gradients and Adam stay fp32)
    grad_accum_steps: int = 1  # each rank's share of the global batch runs as this many micro-batches
    activation_checkpointing: bool = False  # recompute each block in backward (DiT, diffusers transformers)
    sharding: str = "ddp"  # under torchrun: "ddp" (replicated weights) or "fsdp" (FSDP2, sharded per block)

    def __post_init__(self):
        for name in ("steps", "batch_size", "ckpt_every", "log_every", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("lr", "weight_decay", "ema_decay", "grad_clip"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name}={value} must be a finite number")
        if not all(math.isfinite(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={tuple(self.betas)} must be two finite numbers in [0, 1)")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip={self.grad_clip} must be > 0 or null")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule={self.schedule!r} is not allowed; use 'constant' or 'cosine'")
        if self.decay_steps < 0 or self.decay_steps > max(0, self.steps - self.warmup_steps):
            raise ValueError(f"decay_steps={self.decay_steps} must be in [0, steps - warmup_steps] "
                             f"= [0, {max(0, self.steps - self.warmup_steps)}]")
        if self.decay_steps and self.schedule != "constant":
            raise ValueError(f"decay_steps={self.decay_steps} applies to the constant schedule only, "
                             f"not schedule={self.schedule!r}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1) or null")
        self.betas = tuple(self.betas)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not allowed; use one of {PRECISIONS}")
        if int(self.grad_accum_steps) < 1:
            raise ValueError(f"grad_accum_steps={self.grad_accum_steps} must be >= 1")
        if self.sharding not in fsdp2.SHARDINGS:
            raise ValueError(f"sharding={self.sharding!r} is not allowed; use one of {fsdp2.SHARDINGS}")

    @classmethod
    def from_settings(cls, settings, **fixed) -> "LoopConfig":
        """The one rule from settings to the loop: every LoopConfig field that ``settings`` (a recipe stage, the
        pretrain command's options) has under the same name, then ``fixed`` (fields a caller sets itself)."""
        from dataclasses import fields

        named = {f.name: getattr(settings, f.name) for f in fields(cls) if hasattr(settings, f.name)}
        return cls(**{**named, **fixed})

    def lr_at(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "cosine":
            span = max(1, self.steps - self.warmup_steps)
            return self.lr * 0.5 * (1 + math.cos(math.pi * (step - self.warmup_steps) / span))
        left = self.steps - step  # steps still to run, this one included
        if left <= self.decay_steps:
            return self.lr * left / (self.decay_steps + 1)
        return self.lr


@dataclass
class LoopResult:
    model: nn.Module
    ema: nn.Module | None
    steps_run: int  # steps executed by this call (0 when the run was already complete)
    resumed_from: int
    history: list[dict] = field(default_factory=list)


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 12345) % (2**62)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Rows of step ``step``: epoch-wise permutations of range(n), drop-last, a pure function of (seed, step)."""
    if n < batch_size:
        g = torch.Generator().manual_seed(step_seed(seed, step))
        return torch.randint(0, n, (batch_size,), generator=g)
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(step_seed(seed, -1 - epoch))
    return torch.randperm(n, generator=g)[k * batch_size:(k + 1) * batch_size]


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        ema_params[name].mul_(decay).add_(p.detach(), alpha=1 - decay)


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _ckpt_dirs(run_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints (``step_NNNNNNN`` folders holding state.json), oldest first; temporaries are ignored."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        m = CKPT_NAME.match(name)
        if m and os.path.exists(os.path.join(path, "state.json")):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(run_dir: str) -> tuple[int, str] | None:
    dirs = _ckpt_dirs(run_dir)
    return dirs[-1] if dirs else None


def _state(model: nn.Module | dict) -> dict[str, torch.Tensor]:
    state = model if isinstance(model, dict) else model.state_dict()
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(run_dir: str, step: int, model, ema, opt, cfg: LoopConfig, keep: int) -> str:
    """Write ``checkpoints/step_NNNNNNN`` (temporary folder, then rename: the rename is the commit point), then drop
    all but the newest ``keep``. Refuses non-finite weights, so every checkpoint on disk is a finite one. ``model``
    and ``ema`` are modules or their (gathered) state dicts, ``opt`` an optimizer or its state dict."""
    bad = non_finite_tensors(model, ema)
    if bad:
        raise TrainingDiverged(f"refusing to checkpoint step {step}: non-finite weights in {bad[:3]}")
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:07d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(final):
        os.makedirs(tmp)
        save_file(_state(model), os.path.join(tmp, "model.safetensors"))
        if ema is not None:
            save_file(_state(ema), os.path.join(tmp, "ema.safetensors"))
        torch.save(opt if isinstance(opt, dict) else opt.state_dict(), os.path.join(tmp, "optim.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": step, "config": asdict(cfg)}, f, indent=1)
    pause_inside_write()
    _remove_dir(final)
    os.rename(tmp, final)  # the commit point: before it the previous checkpoints are untouched
    for _, old in _ckpt_dirs(run_dir)[:-max(1, keep)]:
        _remove_dir(old)
    return final


def _remove_dir(path: str) -> None:
    """Rename to a temporary name first, so a kill mid-delete never leaves a half-deleted ``step_`` folder."""
    if os.path.exists(path):
        doomed = path + ".del.tmp"
        shutil.rmtree(doomed, ignore_errors=True)
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


class CheckpointUnreadable(ValueError):
    """A checkpoint folder whose files are torn, truncated or corrupt (a full disk, a crash of the machine)."""


def read_checkpoint(path: str, ema: bool, opt: bool) -> dict:
    """Everything of one checkpoint in memory, or ``CheckpointUnreadable`` naming the damaged file; an optimizer
    file that is a pickle of Python code is refused (``UnsafePickle``)."""
    state_path = os.path.join(path, "state.json")
    try:
        with open(state_path) as f:
            out = {"step": int(json.load(f)["step"])}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointUnreadable(f"{state_path} is torn or not a checkpoint state ({err})") from None
    names = ["model"] + (["ema"] if ema else [])
    for name in names:
        file = os.path.join(path, f"{name}.safetensors")
        try:
            out[name] = load_file(file)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointUnreadable(f"{file} is truncated or corrupt ({err})") from None
    if opt:
        try:
            out["opt"] = torch_load_weights(os.path.join(path, "optim.pt"))
        except UnsafePickle:
            raise
        except ValueError as err:
            raise CheckpointUnreadable(str(err)) from None
    return out


def _same_shapes(module: nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    own = module.state_dict()
    wrong = [f"{k} {tuple(state[k].shape)} (this model: {tuple(v.shape)})" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state] + [k for k in state if k not in own]
    if wrong or missing:
        raise ValueError(f"{path} holds a different model ({'; '.join((wrong + missing)[:2])}): this run directory "
                         "was trained with another model size or graft; use another run directory")


def load_checkpoint(path: str, model, ema, opt) -> int:
    ck = read_checkpoint(path, ema is not None, opt is not None)
    _same_shapes(model, ck["model"], path)
    model.load_state_dict(ck["model"])
    if ema is not None:
        ema.load_state_dict(ck["ema"])
    if opt is not None:
        try:
            opt.load_state_dict(ck["opt"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise ValueError(f"{os.path.join(path, 'optim.pt')} does not fit this run's optimizer ({err}); "
                             "use another run directory") from None
    return ck["step"]


def resume(run_dir: str, model, ema, opt, desc: str = "train") -> int:
    """Load the newest readable checkpoint (0 when there is none). A damaged newest one (a full disk or a crash
    mid-write) is reported and the previous one that the rotation keeps is used; it is replaced when training
    reaches its step again."""
    found = _ckpt_dirs(run_dir)
    damaged = []
    for _, path in reversed(found):
        try:
            step = load_checkpoint(path, model, ema, opt)
        except CheckpointUnreadable as err:
            damaged.append(str(err))
            if dist_info()[0] == 0:
                print(f"{desc}: checkpoint {path} is damaged ({err}); falling back to the previous one",
                      file=sys.stderr)
            continue
        if damaged and dist_info()[0] == 0:
            print(f"{desc}: resuming from {path} (step {step})", file=sys.stderr)
        return step
    if damaged:
        raise ValueError(f"no readable checkpoint in {os.path.join(run_dir, 'checkpoints')} (newest: {damaged[0]}); "
                         "delete that folder to start this stage over")
    return 0


def _diverged(desc: str, step: int, what: str, run_dir: str) -> TrainingDiverged:
    last = latest_checkpoint(run_dir)
    kept = f"last good checkpoint: {last[1]} (step {last[0]})" if last else "no checkpoint was written yet"
    return TrainingDiverged(f"{desc}: training diverged at step {step}: {what}; {kept}. "
                            "Lower the learning rate (or clip the gradients) and run again")


def _check_finite(out: dict[str, torch.Tensor], desc: str, step: int, run_dir: str, world: int) -> None:
    """Stop before the optimiser step when any of ``out`` (loss, gradient norm) is NaN/Inf (on any rank)."""
    watched = list(out)
    flags = torch.stack([~torch.isfinite(out[k].detach().float()).all() for k in watched]).float()
    if world > 1:
        dist.all_reduce(flags)
    if bool(flags.any()):
        what = ", ".join(f"{k} = {float(out[k].detach().float().mean())}" for k, f in zip(watched, flags) if f)
        raise _diverged(desc, step, what or "non-finite on another rank", run_dir)


def _read_history(path: str, upto: int) -> list[dict]:
    """The metrics log up to step ``upto``. A torn last line (a kill or a full disk mid-write) is dropped; a torn
    line before it is an error naming the file and the line."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a metrics row")
        except ValueError as err:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not a metrics row ({err}); delete that line (or the file) "
                             "and run the same command again to resume") from None
        rows.append(row)
    return [r for r in rows if r["step"] <= upto]


StepFn = Callable[[nn.Module, tuple], dict]


def train(model: nn.Module, step_fn: StepFn, data: tuple[torch.Tensor, ...], cfg: LoopConfig, run_dir: str,
          params: Iterable[nn.Parameter] | None = None, desc: str = "train",
          clip_groups: list[list[nn.Parameter]] | None = None,
          evaluate: Callable[[nn.Module, int], dict] | None = None, eval_every: int | None = None) -> LoopResult:
    """Train ``model`` for ``cfg.steps`` steps, resuming from the newest checkpoint in ``run_dir`` if any.

    ``step_fn(model, batch)`` returns a dict of scalar tensors with key "loss" (the rest is logged).
    ``data`` is a tuple of tensors with equal first dimension; each step gets the rows of ``batch_indices``
    (under DDP each rank takes its share of the global batch). ``params``: what to optimise (default: all
    parameters that require grad). The model is trained in place; the EMA copy is returned beside it.
    ``clip_groups``: clip the gradient norm of each group separately (default: all params as one group), so
    modules trained side by side stay independent. ``evaluate(model, step) -> dict`` runs every ``eval_every``
    steps and at the end, on rank 0, in eval mode; its numbers are logged with an ``eval/`` prefix.
    """
    rank, world = dist_info()
    fsdp = world > 1 and cfg.sharding == "fsdp"
    if fsdp and evaluate is not None:
        raise ValueError("sharding='fsdp' runs no evaluation inside the loop (rank 0 alone cannot call a sharded "
                         "model); use sharding='ddp' for this stage")
    if cfg.batch_size % (world * cfg.grad_accum_steps):
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the world size {world} times "
                         f"grad_accum_steps={cfg.grad_accum_steps}")
    _apply_scale_settings(model, cfg, next(model.parameters()).device)
    n = len(data[0])
    if any(len(d) != n for d in data):
        raise ValueError("all data tensors must have the same length")
    os.makedirs(run_dir, exist_ok=True)
    if rank == 0:
        remove_orphan_temporaries(run_dir)
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = None if fsdp else torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    ema = None
    if cfg.ema_decay is not None:
        ema = copy.deepcopy(model).eval()
        ema.requires_grad_(False)
    start = resume(run_dir, model, ema, opt, desc)  # under FSDP the optimizer state is read once it is sharded
    log_path = os.path.join(run_dir, "metrics.jsonl")
    history = _read_history(log_path, start)
    if rank == 0:
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in history))
    if start >= cfg.steps:
        return LoopResult(model, ema, 0, start, history)

    device = next(model.parameters()).device
    net, ema_net = model, ema
    if fsdp:
        net, ema_net, opt, params, clip_groups = _shard(model, ema, params, clip_groups, cfg, run_dir, start)
    elif world > 1:
        net = nn.parallel.DistributedDataParallel(model)  # broadcasts rank 0's weights
        if ema is not None and start == 0:
            ema.load_state_dict(model.state_dict())
    net.train()
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=not cfg.progress or rank != 0,
               dynamic_ncols=True, leave=False)
    t0, samples_since = time.time(), 0
    log = open(log_path, "a") if rank == 0 else None
    try:
        for step in range(start, cfg.steps):
            torch.manual_seed(step_seed(cfg.seed, step) + rank)
            rows = batch_indices(n, cfg.batch_size, cfg.seed, step)
            rows = rows[rank::world]
            batch = tuple(d[rows].to(device) for d in data)
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(step)
            opt.zero_grad(set_to_none=True)
            out = _forward_backward(net, step_fn, batch, cfg, device)
            if cfg.grad_clip is not None:
                norms = [fsdp2.local(torch.nn.utils.clip_grad_norm_(g, cfg.grad_clip))
                         for g in (clip_groups or [params])]
                out["grad_norm"] = torch.stack(norms).max()
                grad_norm = out["grad_norm"]
            else:  # logged as well: the gradient norm before any clipping
                grad_norm = fsdp2.local(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
                out["grad_norm"] = grad_norm
            _check_finite({"loss": out["loss"], "grad_norm": grad_norm}, desc, step + 1, run_dir, world)
            opt.step()
            if ema_net is not None:
                update_ema(ema_net, net if fsdp else model, cfg.ema_decay)
            samples_since += cfg.batch_size
            done = step + 1
            if world > 1 and (done % cfg.log_every == 0 or done == cfg.steps):
                out = _mean_over_ranks(out)  # log the global batch's numbers, not rank 0's share
            if evaluate is not None and rank == 0 and (done % (eval_every or cfg.ckpt_every) == 0
                                                       or done == cfg.steps):
                model.eval()
                with torch.no_grad():
                    out.update({f"eval/{k}": torch.tensor(v) for k, v in evaluate(model, done).items()})
                model.train()
            if done % cfg.log_every == 0 or done == cfg.steps or any(k.startswith("eval/") for k in out):
                row = {"step": done, "lr": cfg.lr_at(step)}
                row.update({k: float(v.detach().mean()) for k, v in out.items()})
                row["samples_per_s"] = samples_since / max(time.time() - t0, 1e-9)
                t0, samples_since = time.time(), 0
                history.append(row)
                if log is not None:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    tracking.log_row(desc, row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            bar.update(1)
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                # under FSDP every rank takes part in gathering the full states; rank 0 writes them
                states = ((fsdp2.full_state(net), None if ema_net is None else fsdp2.full_state(ema_net),
                           fsdp2.full_optimizer_state(net, opt)) if fsdp else (model, ema, opt))
                if rank == 0:
                    bad = non_finite_tensors(*states[:2])
                    if bad:
                        raise _diverged(desc, done, f"non-finite weights ({', '.join(bad[:3])})", run_dir)
                    save_checkpoint(run_dir, done, *states, cfg, cfg.keep_checkpoints)
            if world > 1 and (done % cfg.ckpt_every == 0 or done == cfg.steps):
                dist.barrier()
    finally:
        bar.close()
        if log is not None:
            log.close()
    if fsdp:  # the trained weights back into the caller's (unsharded) model and EMA
        for plain, sharded in ((model, net), (ema, ema_net)):
            if plain is not None:
                plain.to(device).load_state_dict(fsdp2.full_state(sharded, everywhere=True))
    model.eval()
    return LoopResult(model, ema, cfg.steps - start, start, history)


def _shard(model, ema, params, clip_groups, cfg: LoopConfig, run_dir: str, start: int):
    """FSDP2 copies of the model and its EMA (from rank 0's weights), the optimizer over the sharded parameters (its
    state read from the checkpoint the run resumed from) and the trained parameters and clip groups mapped onto
    them. The caller's model and EMA wait on the CPU."""
    for module in (model, ema):
        if module is not None:
            for t in module.state_dict().values():  # fully_shard keeps each rank's own values: take rank 0's
                dist.broadcast(t.data, 0)
    if ema is not None and start == 0:
        ema.load_state_dict(model.state_dict())
    names = {id(p): n for n, p in model.named_parameters()}
    net = fsdp2.sharded_copy(model)
    ema_net = None if ema is None else fsdp2.sharded_copy(ema)
    for module in (model, ema):
        if module is not None:
            module.to("cpu")
    sharded = dict(net.named_parameters())
    params = [sharded[names[id(p)]] for p in params]
    if clip_groups is not None:
        clip_groups = [[sharded[names[id(p)]] for p in group] for group in clip_groups]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    if start:
        path = os.path.join(run_dir, "checkpoints", f"step_{start:07d}", "optim.pt")
        try:
            fsdp2.load_optimizer_state(net, opt, torch_load_weights(path))
        except (ValueError, KeyError, RuntimeError) as err:
            raise ValueError(f"{path} does not fit this run's sharded optimizer ({err}); a run resumes with the "
                             "sharding it was started with, or use another run directory") from None
    return net, ema_net, opt, params, clip_groups


def _apply_scale_settings(model: nn.Module, cfg: LoopConfig, device: torch.device) -> None:
    if cfg.precision == "bf16" and device.type != "cuda":
        raise ValueError(f"precision='bf16' needs a CUDA device, not {device.type!r}: bfloat16 matmuls are far "
                         "slower than fp32 on CPUs; use precision='fp32'")
    if cfg.activation_checkpointing:
        if hasattr(model, "grad_checkpointing"):  # ditgraft's DiT
            model.grad_checkpointing = True
        elif getattr(model, "_supports_gradient_checkpointing", False):  # a diffusers transformer recomputes its blocks
            model.enable_gradient_checkpointing()
        else:
            raise ValueError(f"activation_checkpointing=True needs a DiT or a diffusers transformer that supports "
                             f"gradient checkpointing (a model with blocks to recompute), not {type(model).__name__}")


def _forward_backward(net: nn.Module, step_fn: StepFn, batch: tuple, cfg: LoopConfig, device: torch.device) -> dict:
    """Forward and backward over this rank's share of the global batch, in ``grad_accum_steps`` micro-batches (under
    bf16 autocast when asked). Each micro-batch's numbers are weighted by its share of the rows, so the gradients
    and the returned numbers equal one pass over the whole share up to float rounding, for a step function that
    returns row means (every loss in ditgraft does). DDP all-reduces once, after the last micro-batch. A step
    function that draws t and noise makes its draws per micro-batch, so those are different draws."""
    n, k = len(batch[0]), cfg.grad_accum_steps
    totals: dict[str, torch.Tensor] = {}
    for i in range(k):
        lo, hi = n * i // k, n * (i + 1) // k
        last = i == k - 1
        sync = net.no_sync() if isinstance(net, nn.parallel.DistributedDataParallel) and not last else nullcontext()
        if isinstance(net, FSDPModule):
            fsdp2.set_gradient_sync(net, last)
        weight = (hi - lo) / n  # 1.0 without accumulation: the plain step, bit for bit
        with sync:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                out = step_fn(net, tuple(b[lo:hi] for b in batch))
            (out["loss"].float() * weight).backward()
        for key, v in out.items():
            totals[key] = totals.get(key, 0.0) + v.detach().float() * weight
    return totals


def _mean_over_ranks(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = sorted(out)
    flat = torch.stack([out[k].detach().float().mean() for k in keys])
    dist.all_reduce(flat)
    return dict(zip(keys, flat / dist.get_world_size()))
