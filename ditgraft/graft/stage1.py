"""Stage 1, activation distillation: each new operator learns to reproduce the teacher operator it replaces.

How it is done (unlike the released extraction script):
- inputs are noised latents x_t = q_sample(x_0, t, eps) with t ~ U{0..999}, and the teacher is called with its own
  conditioning y (class labels, or caption embeddings and masks) through its model family;
- forward hooks capture each grafted slot's input (the normalised, modulated stream) and its output before the gate;
- one teacher forward per batch feeds every grafted slot;
- every operator regresses its own target from the original teacher (never a partly grafted model). The operators are
  batched side by side in one loop, but their parameters, losses, gradient clipping and best checkpoints are
  separate, so each is trained exactly as if alone (AdamW is per parameter);
- a held-out validation set (different images, their own t and noise) gives the MSE used to keep the best weights.

Activations are cached (in memory, or as .npy shards on disk when the plan exceeds the RAM budget) or streamed from
the teacher each step (``cache: stream``: no memory beyond one batch, a teacher forward per step).

Under torchrun (DDP) every operator is trained data-parallel on all ranks, not one operator per rank: the shared loop
gives each rank its share ``rows[rank::world]`` of every global batch and DDP averages the gradients, so N ranks
train exactly what one rank trains with the same global batch (up to float reduction order), whatever the number of
operators. The extraction is sharded: each rank runs the teacher on its contiguous share of the cached samples (and
of the validation samples), then the shares are gathered so that every rank holds every row (memory cache: an
all-gather; disk cache: each rank writes its rows into the shared .npy files). In stream mode each rank runs the
teacher on its own share of each global batch, with its own t and noise. Validation and the best weights are rank
0's; it alone writes files, the other ranks read the best weights back from disk after the loop's last barrier.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ditgraft.diffusion.gaussian import GaussianDiffusion
from ditgraft.distributed import all_gather_rows, barrier, on_main, rank_world, shard_bounds
from ditgraft.graft.surgery import ResolvedGraft, make_operators
from ditgraft.models.adapters import get_slot, model_dims
from ditgraft.models.families import family_of, model_call
from ditgraft.models.families.base import cond_len, cond_pack, cond_rows, cond_to, cond_tuple
from ditgraft.recipe import Stage1
from ditgraft.train.loop import TrainingDiverged, train
from ditgraft.utils import atomic_path, atomic_write_json


def regression_loss(kind: str, pred: torch.Tensor, target: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "l2":
        return F.mse_loss(pred, target)
    if kind == "huber":
        return F.huber_loss(pred, target, delta=delta)
    raise ValueError(f"loss={kind!r} is not allowed; use l1, l2 or huber")


@contextmanager
def capture_slots(model: nn.Module, grafts: list[ResolvedGraft]):
    """Forward hooks on each grafted slot of ``model``; yields {key: (input, output)} filled by each forward."""
    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for g in grafts:
        def hook(_module, args, output, key=g.key):
            store[key] = (args[0].detach(), output.detach())

        handles.append(get_slot(model, g.layer, g.slot).register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@dataclass
class Stage1Inputs:
    """Noised teacher inputs: x_t, model timestep t, conditioning y (labels, or a tuple such as caption embeddings
    and masks; a fixed set for caching and validation)."""
    x_t: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor | tuple


def drop_cond(y, null, p: float, generator: torch.Generator | None = None):
    """``y`` with each row replaced by the unconditional ``null`` row with probability ``p``: the teacher's own
    label dropout, so that the new operators also learn the activations of classifier-free guidance's
    unconditional branch (which the sampler weighs by 1 - cfg_scale)."""
    if not p:
        return y
    drop = torch.rand(cond_len(y), generator=generator) < p
    return cond_pack(torch.where(drop.to(c.device).view(-1, *[1] * (c.dim() - 1)), n, c)
                     for c, n in zip(cond_tuple(y), cond_tuple(null), strict=True))


def noised_inputs(x0: torch.Tensor, y, seed: int, null=None, cond_dropout: float = 0.0,
                  objective=None) -> Stage1Inputs:
    """Each sample gets its own t and noise from a generator seeded by ``seed``, noised the way the teacher was
    trained (``objective``, its family's: IDDPM's t ~ U{0..999} by default, or flow matching's path); with
    ``cond_dropout`` a share of the rows gets the unconditional conditioning ``null`` instead of its own
    (``drop_cond``)."""
    objective = objective or GaussianDiffusion.dit_default()
    g = torch.Generator().manual_seed(seed)
    t = objective.sample_t(x0, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return Stage1Inputs(objective.q_sample(x0, t, noise), objective.model_t(t), drop_cond(y, null, cond_dropout, g))


@dataclass(frozen=True)
class MemoryPlan:
    """Where stage 1 keeps the activations it distils from (summary.json holds it as a mapping)."""
    mode: str  # memory | disk | stream
    bytes_per_slot: int  # one slot's input and output for every train and validation sample
    bytes_total: int
    budget_bytes: int
    slots: int
    samples: int
    val_samples: int
    dtype: str  # of the cached activations: float32 | float16
    copies: int = 1  # processes on this host holding the in-memory cache (torchrun ranks)


def memory_plan(grafts: list[ResolvedGraft], dims, samples: int, val_samples: int, dtype: str,
                budget_gb: float, mode: str, copies: int = 1) -> MemoryPlan:
    """Bytes needed to cache every slot's input and output; picks memory or disk when mode is 'auto'.
    ``copies``: processes on this host that each hold the whole in-memory cache (torchrun's ranks per node; the
    disk cache is one set of files whose pages they share)."""
    el = 2 if dtype == "float16" else 4
    per_slot = (samples + val_samples) * dims.grid[0] * dims.grid[1] * dims.dim * 2 * el
    total = per_slot * len(grafts)
    chosen = mode
    if mode == "auto":
        chosen = "memory" if total * copies <= budget_gb * 2**30 else "disk"
    return MemoryPlan(chosen, per_slot, total, int(budget_gb * 2**30), len(grafts), samples, val_samples, dtype,
                      copies)


def format_plan(plan: MemoryPlan) -> str:
    gb = 2**30
    copies = f" x {plan.copies} ranks on this host in memory" if plan.copies > 1 else ""
    return (f"stage 1 plan: {plan.slots} slots x {plan.samples}+{plan.val_samples} samples, "
            f"{plan.bytes_per_slot / gb:.2f} GiB per slot ({plan.dtype}), {plan.bytes_total / gb:.2f} GiB "
            f"in all{copies} vs budget {plan.budget_bytes / gb:.2f} GiB -> {plan.mode}")


@torch.no_grad()
def extract(teacher: nn.Module, grafts: list[ResolvedGraft], inputs: Stage1Inputs, batch_size: int,
            out_dir: str | None, dtype: torch.dtype, device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run the teacher once over ``inputs`` and keep every grafted slot's (input, output).

    With ``out_dir`` the arrays are .npy files (memory-mapped, written batch by batch, marked complete at the end,
    reused when complete); otherwise tensors in memory. Under torchrun each rank runs the teacher on its contiguous
    share of the rows (``shard_bounds``): into the shared .npy files (rank 0 creates them), or in memory followed
    by an all-gather, so that every rank ends with all rows.
    """
    dims = model_dims(teacher)
    n, shape = len(inputs.t), (len(inputs.t), dims.grid[0] * dims.grid[1], dims.dim)
    if cond_len(inputs.y) != n:
        raise ValueError(f"conditioning has {cond_len(inputs.y)} rows for {n} samples")
    rank, world = rank_world()
    lo, hi = shard_bounds(n, rank, world)
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    done_marker = os.path.join(out_dir, "complete.json") if out_dir else None
    if done_marker and on_main(lambda: os.path.exists(done_marker)):
        return _open_cache(out_dir, grafts)
    store = {}
    if out_dir:
        def create():
            os.makedirs(out_dir, exist_ok=True)
            for g in grafts:
                for io in ("in", "out"):
                    np.lib.format.open_memmap(os.path.join(out_dir, f"{g.key}_{io}.npy"), mode="w+",
                                              dtype=np_dtype, shape=shape).flush()

        on_main(create)
        for g in grafts:
            store[g.key] = tuple(np.load(os.path.join(out_dir, f"{g.key}_{io}.npy"), mmap_mode="r+")
                                 for io in ("in", "out"))
    else:
        local = (hi - lo,) + shape[1:]
        store = {g.key: (torch.empty(local, dtype=dtype), torch.empty(local, dtype=dtype)) for g in grafts}
    teacher.eval()
    call = model_call(teacher)
    with capture_slots(teacher, grafts) as captured:
        for s in range(lo, hi, batch_size):
            sl = slice(s, min(s + batch_size, hi))
            call(inputs.x_t[sl].to(device), inputs.t[sl].to(device), cond_to(cond_rows(inputs.y, sl), device))
            for key, (a, b) in captured.items():
                for dst, src in zip(store[key], (a, b)):
                    if out_dir:
                        dst[sl] = src.cpu().numpy().astype(np_dtype)
                    else:
                        dst[sl.start - lo:sl.stop - lo] = src.cpu().to(dtype)
    if out_dir:
        for arrays in store.values():
            for arr in arrays:
                arr.flush()
        barrier()  # every rank's rows are on disk
        on_main(lambda: atomic_write_json(done_marker, {"samples": n, "slots": [g.key for g in grafts]}))
        return _open_cache(out_dir, grafts)
    return {key: tuple(all_gather_rows(t, n) for t in pair) for key, pair in store.items()}


def _open_cache(out_dir: str, grafts: list[ResolvedGraft]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for g in grafts:
        arrs = [np.load(os.path.join(out_dir, f"{g.key}_{io}.npy"), mmap_mode="r") for io in ("in", "out")]
        with warnings.catch_warnings():  # read-only views are intended: rows are copied when indexed
            warnings.simplefilter("ignore", UserWarning)
            out[g.key] = tuple(torch.from_numpy(a) for a in arrs)
    return out


class OperatorBank(nn.Module):
    """The new operators side by side (``ops[key]``), trained on their own slot's activations."""

    def __init__(self, ops: dict[str, nn.Module]):
        super().__init__()
        self.ops = nn.ModuleDict(ops)

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: self.ops[key](x) for key, x in inputs.items()}


class BestKeeper:
    """Per-operator best validation MSE and weights, persisted as best/{key}.safetensors + best/{key}.json."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.best: dict[str, dict] = {}
        for name in os.listdir(folder):
            if name.endswith(".json"):
                with open(os.path.join(folder, name)) as f:
                    self.best[name[:-5]] = json.load(f)

    def offer(self, key: str, module: nn.Module, step: int, val_mse: float, rel: float) -> None:
        if not math.isfinite(val_mse):  # a diverged operator is never the best one
            return
        if key in self.best and val_mse >= self.best[key]["val_mse"]:
            return
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        with atomic_path(os.path.join(self.folder, f"{key}.safetensors")) as tmp:
            save_file(state, tmp)
        self.best[key] = {"step": step, "val_mse": val_mse, "val_rel_mse": rel}
        atomic_write_json(os.path.join(self.folder, f"{key}.json"), self.best[key])

    def load_into(self, key: str, module: nn.Module) -> None:
        module.load_state_dict(load_file(os.path.join(self.folder, f"{key}.safetensors")))


def run_stage1(teacher: nn.Module, grafts: list[ResolvedGraft], cfg: Stage1, x0: torch.Tensor, y,
               x0_val: torch.Tensor, y_val, run_dir: str, seed: int, device,
               progress: bool = True, log=print) -> dict:
    """Distil every grafted operator; returns {key: best stats} and leaves the best weights in run_dir/best.
    ``y`` / ``y_val``: the teacher's conditioning per sample (labels, or a tuple of tensors)."""
    teacher = teacher.to(device).eval()
    teacher.requires_grad_(False)
    dims = model_dims(teacher)
    plan = memory_plan(grafts, dims, len(x0), len(x0_val), cfg.cache_dtype, cfg.ram_budget_gb, cfg.cache,
                       copies=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # set by torchrun
    log(format_plan(plan))
    dtype = torch.float16 if cfg.cache_dtype == "float16" else torch.float32
    family = family_of(teacher)
    for g in grafts:
        family.check_distillable(teacher, g.layer, g.slot)
    null = (lambda cond: family.null_cond(teacher, cond)) if cfg.cond_dropout else (lambda cond: None)
    objective = family.objective(teacher)
    val_inputs = noised_inputs(x0_val, y_val, seed=seed * 7 + 2, null=null(y_val), cond_dropout=cfg.cond_dropout,
                               objective=objective)
    val = extract(teacher, grafts, val_inputs, cfg.extract_batch_size, None, torch.float32, device)
    val_var = {k: float(out.var()) for k, (_, out) in val.items()}
    bank = OperatorBank(make_operators(teacher, grafts, seed)).to(device)
    losses = {g.key: (g.loss, g.huber_delta) for g in grafts}
    keeper = BestKeeper(os.path.join(run_dir, "best"))

    def evaluate(model: OperatorBank, step: int) -> dict:
        out = {}
        for key, op in model.ops.items():
            xin, target = val[key]
            se, count = 0.0, 0
            for s in range(0, len(xin), cfg.extract_batch_size):
                pred = op(xin[s:s + cfg.extract_batch_size].to(device))
                se += float((pred - target[s:s + cfg.extract_batch_size].to(device)).square().sum())
                count += pred.numel()
            mse = se / count
            keeper.offer(key, op, step, mse, mse / max(val_var[key], 1e-12))
            out[f"{key}_mse"] = mse
        return out

    keys = [g.key for g in grafts]
    if plan.mode == "stream":
        data = (x0, *cond_tuple(y))
        call = model_call(teacher)

        def step_fn(model, batch):
            xb, yb = batch[0], cond_pack(batch[1:])
            yb = drop_cond(yb, null(yb), cfg.cond_dropout)
            t = objective.sample_t(xb)
            x_t = objective.q_sample(xb, t, torch.randn_like(xb))
            with torch.no_grad(), capture_slots(teacher, grafts) as captured:
                call(x_t, objective.model_t(t), yb)
            return _bank_losses(model, {k: captured[k] for k in keys}, losses)
    else:
        train_inputs = noised_inputs(x0, y, seed=seed * 7 + 1, null=null(y), cond_dropout=cfg.cond_dropout,
                                     objective=objective)
        cache_dir = os.path.join(run_dir, "cache") if plan.mode == "disk" else None
        acts = extract(teacher, grafts, train_inputs, cfg.extract_batch_size, cache_dir, dtype, device)
        data = tuple(t for k in keys for t in acts[k])

        def step_fn(model, batch):
            pairs = {k: (batch[2 * i].float(), batch[2 * i + 1].float()) for i, k in enumerate(keys)}
            return _bank_losses(model, pairs, losses)

    loop = cfg.loop_config(seed, progress)
    clip_groups = [list(op.parameters()) for op in bank.ops.values()]
    result = train(bank, step_fn, data, loop, os.path.join(run_dir, "loop"), desc="stage1",
                   clip_groups=clip_groups, evaluate=evaluate, eval_every=cfg.eval_every)
    keeper = BestKeeper(keeper.folder)  # rank 0 evaluated and wrote best/; every rank reads it back
    summary = {}
    for g in grafts:
        if g.key not in keeper.best:
            raise TrainingDiverged(f"stage1: {g.key} never reached a finite validation MSE in {loop.steps} steps; "
                                   "lower stage1.lr and run again")
        final = [r for r in result.history if "loss/" + g.key in r]
        summary[g.key] = dict(keeper.best[g.key], slot=g.slot, layer=g.layer, operator=g.operator, loss=g.loss,
                              final_train_loss=final[-1]["loss/" + g.key] if final else None,
                              target_var=val_var[g.key])
    on_main(lambda: atomic_write_json(os.path.join(run_dir, "summary.json"),
                                      {"plan": asdict(plan), "operators": summary}))
    return {"plan": asdict(plan), "operators": summary, "history": result.history}


def _bank_losses(model, pairs: dict, losses: dict) -> dict:
    """Each operator's own regression loss; their sum is what backward sees (parameters are disjoint)."""
    preds = model({key: xin for key, (xin, _) in pairs.items()})
    out, total = {}, 0.0
    for key, (_, target) in pairs.items():
        kind, delta = losses[key]
        loss = regression_loss(kind, preds[key], target, delta)
        out["loss/" + key] = loss.detach()
        total = total + loss
    out["loss"] = total
    return out


def load_best_operators(student: nn.Module, grafts: list[ResolvedGraft], run_dir: str) -> None:
    """Put stage 1's best operator weights into the student's grafted slots."""
    keeper = BestKeeper(os.path.join(run_dir, "best"))
    for g in grafts:
        if g.key not in keeper.best:
            raise FileNotFoundError(f"stage 1 has no best weights for {g.key} in {run_dir}/best; run stage 1 first")
        keeper.load_into(g.key, get_slot(student, g.layer, g.slot))
