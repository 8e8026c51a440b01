"""Stage 1, activation distillation: each new module learns to reproduce the part of the teacher it replaces.

One engine (``run_stage1``) distils a list of *targets*. A target knows which (input, output) it captures from one
teacher forward and how to build its trainable module; the engine does the rest (noising, caching, sharding,
training side by side, validation, best keeping, divergence, summary, resume) once for every kind. Three kinds:
- ``SlotTarget``: a grafted slot; the new operator regresses the slot's output from its input;
- ``SplitSlotTarget``: the image-to-image part of a joint image-text attention (SD3, Flux); the operator, inside
  the teacher's frozen joint attention (every part that involves text keeps the teacher's softmax), regresses the
  joint attention's image-token output from the image and text token streams that enter it;
- ``PairTarget``: a parallel unit of two adjacent blocks (``graft.restructure``); the unit reads block i's input
  (and the conditioning c) and regresses block i+1's output, the sequential pair's.

How it is done (unlike the released extraction script):
- inputs are noised latents x_t = q_sample(x_0, t, eps) with t ~ U{0..999}, and the teacher is called with its own
  conditioning y (class labels, or caption embeddings and masks) through its model family;
- forward hooks capture each target's tensors (a grafted slot: its input, the normalised, modulated stream, and its
  output before the gate);
- one teacher forward per batch feeds every target;
- every module regresses its own target from the original teacher (never a partly grafted model). The modules are
  batched side by side in one loop, but their parameters, losses, gradient clipping and best checkpoints are
  separate, so each is trained exactly as if alone (AdamW is per parameter);
- a held-out validation set (different images, their own t and noise) gives the MSE used to keep the best weights.

Activations are cached (in memory, or as .npy shards on disk when the plan exceeds the RAM budget) or streamed from
the teacher each step (``cache: stream``: no memory beyond one batch, a teacher forward per step).

Under torchrun (DDP) every module is trained data-parallel on all ranks, not one module per rank: the shared loop
gives each rank its share ``rows[rank::world]`` of every global batch and DDP averages the gradients, so N ranks
train exactly what one rank trains with the same global batch (up to float reduction order), whatever the number of
targets. The extraction is sharded: each rank runs the teacher on its contiguous share of the cached samples (and
of the validation samples), then the shares are gathered so that every rank holds every row (memory cache: an
all-gather; disk cache: each rank writes its rows into the shared .npy files). In stream mode each rank runs the
teacher on its own share of each global batch, with its own t and noise. Validation and the best weights are rank
0's; it alone writes files, the other ranks read the best weights back from disk after the loop's last barrier.
"""
from __future__ import annotations

import copy
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
from ditgraft.graft.restructure import ParallelPair, unit_key
from ditgraft.graft.surgery import ResolvedGraft, make_operators
from ditgraft.models.adapters import get_slot, model_dims
from ditgraft.models.families import family_of, model_call
from ditgraft.models.families.base import cond_len, cond_pack, cond_rows, cond_to, cond_tuple
from ditgraft.models.families.joint import SplitSlotUnit, split_operators, split_unit_ready
from ditgraft.operators.common import grid_tokens
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


# ------------------------------------------------------------------------------------------------- targets
# A target: ``key``; ``arrays`` (names of the captured tensors, the module's inputs first, its regression target
# last; the disk cache's file suffixes); ``row_shapes(dims)`` (each array's shape per sample); ``hook(model,
# store)`` (forward hooks that put the captured tuple at ``store[key]``; returns their handles); ``loss`` and
# ``huber_delta``; ``group`` (its section of summary.json) with ``describe()`` (its fields there) and ``var_name``
# / ``target_var(arrays)`` (the variance its relative MSE divides by); and the class method
# ``build(teacher, targets, seed) -> {key: module}`` making the trainable modules of its kind.

class SlotTarget:
    """A grafted slot: its input and output in the teacher; the new operator (``make_operators``) regresses the
    output."""
    arrays = ("in", "out")
    group = "operators"
    var_name = "target_var"

    def __init__(self, graft: ResolvedGraft):
        self.graft = graft
        self.key, self.loss, self.huber_delta = graft.key, graft.loss, graft.huber_delta

    def row_shapes(self, dims) -> tuple[tuple[int, ...], ...]:
        tokens = grid_tokens(dims.grid)
        return (tokens, dims.dim), (tokens, dims.dim)

    def hook(self, model: nn.Module, store: dict) -> list:
        def fn(_module, args, output):
            store[self.key] = (args[0].detach(), output.detach())

        return [get_slot(model, self.graft.layer, self.graft.slot).register_forward_hook(fn)]

    def target_var(self, arrays) -> float:
        return float(arrays[-1].var())

    def describe(self) -> dict:
        g = self.graft
        return {"slot": g.slot, "layer": g.layer, "operator": g.operator, "loss": g.loss}

    @staticmethod
    def build(teacher: nn.Module, targets: list[SlotTarget], seed: int) -> dict[str, nn.Module]:
        return make_operators(teacher, [t.graft for t in targets], seed)


class SplitSlotTarget(SlotTarget):
    """A split joint-attention slot: the image tokens and text tokens entering the teacher's joint attention of
    ``graft.layer`` and its image-token output. The module is a ``SplitSlotUnit``: the new operator inside the
    teacher's joint attention (text parts frozen, not saved), so what it learns is exactly the student's slot.
    ``text`` = (tokens, width) of the text stream (``Family.split_text``)."""
    arrays = ("in", "text", "out")

    def __init__(self, graft: ResolvedGraft, text: tuple[int, int]):
        super().__init__(graft)
        self.text = tuple(text)

    def row_shapes(self, dims) -> tuple[tuple[int, ...], ...]:
        tokens = grid_tokens(dims.grid)
        return (tokens, dims.dim), self.text, (tokens, dims.dim)

    def hook(self, model: nn.Module, store: dict) -> list:
        return family_of(model).hook_split_slot(model, self.graft.layer, store, self.key)

    @staticmethod
    def build(teacher: nn.Module, targets: list[SplitSlotTarget], seed: int) -> dict[str, nn.Module]:
        ops = make_operators(teacher, [t.graft for t in targets], seed)
        for t in targets:
            if not split_unit_ready(ops[t.key]):
                raise ValueError(f"grafts: operator={t.graft.operator!r} at {t.key} cannot be the image-to-image part "
                                 "of a joint attention (it reports no softmax normaliser); allowed: "
                                 f"{', '.join(split_operators())}")
        family = family_of(teacher)
        return {t.key: SplitSlotUnit(ops[t.key], family, teacher, t.graft.layer) for t in targets}


class PairTarget:
    """A parallel unit of the adjacent blocks ``pair`` = [i, i+1]: it reads block i's input x and the conditioning
    c, and regresses block i+1's output (the sequential pair's). Its module is a ``ParallelPair`` of copies of the
    two teacher blocks; ``train``: "unit" (blocks and merge) or "merge" (the merge alone, the blocks frozen)."""
    arrays = ("in", "c", "out")
    group = "units"
    var_name = "update_var"

    def __init__(self, pair, merge_init: str = "sum", loss: str = "l1", huber_delta: float = 1.0,
                 train: str = "unit"):
        self.pair, self.merge_init, self.train = list(pair), merge_init, train
        self.key, self.loss, self.huber_delta = unit_key(pair), loss, huber_delta

    def row_shapes(self, dims) -> tuple[tuple[int, ...], ...]:
        tokens = grid_tokens(dims.grid)
        return (tokens, dims.dim), (dims.dim,), (tokens, dims.dim)

    def hook(self, model: nn.Module, store: dict) -> list:
        def pre(_module, args):
            store[self.key] = (args[0].detach(), args[1].detach())

        def post(_module, _args, output):
            store[self.key] = (*store[self.key], output.detach())

        blocks = family_of(model).blocks(model)
        return [blocks[self.pair[0]].register_forward_pre_hook(pre),
                blocks[self.pair[1]].register_forward_hook(post)]

    def target_var(self, arrays) -> float:  # of the sequential pair's update, out - x
        return float((arrays[-1] - arrays[0]).var())

    def describe(self) -> dict:
        return {"pair": self.pair, "loss": self.loss, "train": self.train}

    @staticmethod
    def build(teacher: nn.Module, targets: list[PairTarget], seed: int) -> dict[str, nn.Module]:
        """Units from copies of the teacher's blocks (the init that surgery's restructure also starts from)."""
        out = {}
        for t in targets:
            a, b = (copy.deepcopy(family_of(teacher).blocks(teacher)[i]) for i in t.pair)
            unit = ParallelPair(a, b, t.merge_init).to(next(a.parameters()).device)
            unit.requires_grad_(True)  # the copied teacher blocks come frozen
            if t.train == "merge":
                unit.pair.requires_grad_(False)
            out[t.key] = unit
        return out


def slot_targets(grafts: list[ResolvedGraft]) -> list[SlotTarget]:
    return [SlotTarget(g) for g in grafts]


def teacher_targets(teacher: nn.Module, targets, y) -> list:
    """``as_targets`` for this teacher and conditioning ``y``: a graft of a split joint-attention slot becomes its
    ``SplitSlotTarget`` (the text stream's shape from ``y``), any other graft its ``SlotTarget``."""
    family = family_of(teacher)
    out = []
    for t in targets:
        if isinstance(t, ResolvedGraft) and family.is_split_slot(teacher, t.layer, t.slot):
            t = SplitSlotTarget(t, family.split_text(teacher, t.layer, y))
        out.append(t)
    return as_targets(out)


def pair_targets(spec: dict, rcfg) -> list[PairTarget]:
    """The parallel units of a resolved restructure ``spec``, trained as the recipe's ``restructure`` section says
    (loss, huber_delta, stage1_train)."""
    return [PairTarget(p, spec["merge_init"], rcfg.loss, rcfg.huber_delta, rcfg.stage1_train)
            for p in spec["parallel_pairs"]]


def as_targets(targets) -> list:
    """Targets as given; a ``ResolvedGraft`` stands for its ``SlotTarget``."""
    return [SlotTarget(t) if isinstance(t, ResolvedGraft) else t for t in targets]


def build_modules(teacher: nn.Module, targets: list, seed: int) -> dict[str, nn.Module]:
    """Every target's fresh trainable module, in the order of ``targets`` (each kind builds its own together)."""
    built: dict[str, nn.Module] = {}
    for kind in dict.fromkeys(type(t) for t in targets):
        built.update(kind.build(teacher, [t for t in targets if type(t) is kind], seed))
    return {t.key: built[t.key] for t in targets}


@contextmanager
def capture(model: nn.Module, targets: list):
    """Forward hooks for every target; yields {key: captured tuple} filled by each forward of ``model``."""
    store: dict[str, tuple[torch.Tensor, ...]] = {}
    handles = [h for t in targets for h in t.hook(model, store)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def capture_slots(model: nn.Module, grafts: list[ResolvedGraft]):
    """``capture`` of grafted slots: yields {key: (input, output)}."""
    return capture(model, slot_targets(grafts))


# ------------------------------------------------------------------------------------------------- noising

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


def noised_batch(x0: torch.Tensor, y, null=None, cond_dropout: float = 0.0, objective=None) -> Stage1Inputs:
    """One streamed batch, noised like ``noised_inputs`` from the global RNG (the loop seeds it per step and rank)
    on ``x0``'s device."""
    objective = objective or GaussianDiffusion.dit_default()
    y = drop_cond(y, null, cond_dropout)
    t = objective.sample_t(x0)
    return Stage1Inputs(objective.q_sample(x0, t, torch.randn_like(x0)), objective.model_t(t), y)


# ------------------------------------------------------------------------------------------- memory plan

@dataclass(frozen=True)
class MemoryPlan:
    """Where stage 1 keeps the activations it distils from (summary.json holds it as a mapping)."""
    mode: str  # memory | disk | stream
    bytes_per_slot: int  # the largest target's arrays for every train and validation sample
    bytes_total: int
    budget_bytes: int
    slots: int  # targets
    samples: int
    val_samples: int
    dtype: str  # of the cached activations: float32 | float16
    copies: int = 1  # processes on this host holding the in-memory cache (torchrun ranks)


def memory_plan(targets: list, dims, samples: int, val_samples: int, dtype: str,
                budget_gb: float, mode: str, copies: int = 1) -> MemoryPlan:
    """Bytes needed to cache every target's arrays; picks memory or disk when mode is 'auto'.
    ``copies``: processes on this host that each hold the whole in-memory cache (torchrun's ranks per node; the
    disk cache is one set of files whose pages they share)."""
    el = 2 if dtype == "float16" else 4
    per = [(samples + val_samples) * sum(math.prod(s) for s in t.row_shapes(dims)) * el for t in as_targets(targets)]
    total = sum(per)
    chosen = mode
    if mode == "auto":
        chosen = "memory" if total * copies <= budget_gb * 2**30 else "disk"
    return MemoryPlan(chosen, max(per), total, int(budget_gb * 2**30), len(per), samples, val_samples, dtype,
                      copies)


def format_plan(plan: MemoryPlan) -> str:
    gb = 2**30
    copies = f" x {plan.copies} ranks on this host in memory" if plan.copies > 1 else ""
    return (f"stage 1 plan: {plan.slots} targets x {plan.samples}+{plan.val_samples} samples, "
            f"{plan.bytes_per_slot / gb:.2f} GiB per target ({plan.dtype}), {plan.bytes_total / gb:.2f} GiB "
            f"in all{copies} vs budget {plan.budget_bytes / gb:.2f} GiB -> {plan.mode}")


# --------------------------------------------------------------------------------------------- extraction

@torch.no_grad()
def extract(teacher: nn.Module, targets: list, inputs: Stage1Inputs, batch_size: int,
            out_dir: str | None, dtype: torch.dtype, device) -> dict[str, tuple[torch.Tensor, ...]]:
    """Run the teacher once over ``inputs`` and keep every target's captured arrays (``target.arrays``).

    With ``out_dir`` the arrays are .npy files (memory-mapped, written batch by batch, marked complete at the end,
    reused when complete); otherwise tensors in memory. Under torchrun each rank runs the teacher on its contiguous
    share of the rows (``shard_bounds``): into the shared .npy files (rank 0 creates them), or in memory followed
    by an all-gather, so that every rank ends with all rows.
    """
    targets = as_targets(targets)
    dims = model_dims(teacher)
    n = len(inputs.t)
    if cond_len(inputs.y) != n:
        raise ValueError(f"conditioning has {cond_len(inputs.y)} rows for {n} samples")
    rank, world = rank_world()
    lo, hi = shard_bounds(n, rank, world)
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    done_marker = os.path.join(out_dir, "complete.json") if out_dir else None
    if done_marker and on_main(lambda: os.path.exists(done_marker)):
        return _open_cache(out_dir, targets)
    store = {}
    if out_dir:
        def create():
            os.makedirs(out_dir, exist_ok=True)
            for tg in targets:
                for name, shape in zip(tg.arrays, tg.row_shapes(dims)):
                    np.lib.format.open_memmap(os.path.join(out_dir, f"{tg.key}_{name}.npy"), mode="w+",
                                              dtype=np_dtype, shape=(n, *shape)).flush()

        on_main(create)
        for tg in targets:
            store[tg.key] = tuple(np.load(os.path.join(out_dir, f"{tg.key}_{name}.npy"), mmap_mode="r+")
                                  for name in tg.arrays)
    else:
        store = {tg.key: tuple(torch.empty((hi - lo, *shape), dtype=dtype) for shape in tg.row_shapes(dims))
                 for tg in targets}
    teacher.eval()
    call = model_call(teacher)
    with capture(teacher, targets) as captured:
        for s in range(lo, hi, batch_size):
            sl = slice(s, min(s + batch_size, hi))
            call(inputs.x_t[sl].to(device), inputs.t[sl].to(device), cond_to(cond_rows(inputs.y, sl), device))
            for key, arrays in captured.items():
                for dst, src in zip(store[key], arrays, strict=True):
                    if out_dir:
                        dst[sl] = src.cpu().numpy().astype(np_dtype)
                    else:
                        dst[sl.start - lo:sl.stop - lo] = src.cpu().to(dtype)
    if out_dir:
        for arrays in store.values():
            for arr in arrays:
                arr.flush()
        barrier()  # every rank's rows are on disk
        on_main(lambda: atomic_write_json(done_marker, {"samples": n, "slots": [tg.key for tg in targets]}))
        return _open_cache(out_dir, targets)
    return {key: tuple(all_gather_rows(t, n) for t in arrays) for key, arrays in store.items()}


def _open_cache(out_dir: str, targets: list) -> dict[str, tuple[torch.Tensor, ...]]:
    out = {}
    for tg in targets:
        arrs = [np.load(os.path.join(out_dir, f"{tg.key}_{name}.npy"), mmap_mode="r") for name in tg.arrays]
        with warnings.catch_warnings():  # read-only views are intended: rows are copied when indexed
            warnings.simplefilter("ignore", UserWarning)
            out[tg.key] = tuple(torch.from_numpy(a) for a in arrs)
    return out


# ----------------------------------------------------------------------------------------------- training

class OperatorBank(nn.Module):
    """The trainable modules side by side (``ops[key]``), each called on its own target's inputs."""

    def __init__(self, ops: dict[str, nn.Module]):
        super().__init__()
        self.ops = nn.ModuleDict(ops)

    def forward(self, inputs: dict[str, tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
        return {key: self.ops[key](*args) for key, args in inputs.items()}


class BestKeeper:
    """Per-module best validation MSE and weights, persisted as best/{key}.safetensors + best/{key}.json."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.best: dict[str, dict] = {}
        for name in os.listdir(folder):
            if name.endswith(".json"):
                with open(os.path.join(folder, name)) as f:
                    self.best[name[:-5]] = json.load(f)

    def offer(self, key: str, module: nn.Module, step: int, val_mse: float, rel: float) -> None:
        if not math.isfinite(val_mse):  # a diverged module is never the best one
            return
        if key in self.best and val_mse >= self.best[key]["val_mse"]:
            return
        state = {k: v.detach().contiguous().cpu() for k, v in trained_weights(module).state_dict().items()}
        with atomic_path(os.path.join(self.folder, f"{key}.safetensors")) as tmp:
            save_file(state, tmp)
        self.best[key] = {"step": step, "val_mse": val_mse, "val_rel_mse": rel}
        atomic_write_json(os.path.join(self.folder, f"{key}.json"), self.best[key])

    def load_into(self, key: str, module: nn.Module) -> None:
        trained_weights(module).load_state_dict(load_file(os.path.join(self.folder, f"{key}.safetensors")))


def trained_weights(module: nn.Module) -> nn.Module:
    """The part of a stage-1 module whose weights are kept: the operator of a ``SplitSlotUnit`` (what goes into
    the student's slot), else the module itself."""
    return module.weights if isinstance(module, SplitSlotUnit) else module


def run_stage1(teacher: nn.Module, targets: list, cfg: Stage1, x0: torch.Tensor, y,
               x0_val: torch.Tensor, y_val, run_dir: str, seed: int, device,
               progress: bool = True, log=print, desc: str = "stage1") -> dict:
    """Distil every target (``SlotTarget``, ``PairTarget``; a ``ResolvedGraft`` stands for its slot); returns
    {"plan", <group>: {key: best stats}, "history"} and leaves the best weights in run_dir/best and the same
    summary (without the history) in run_dir/summary.json. ``y`` / ``y_val``: the teacher's conditioning per
    sample (labels, or a tuple of tensors). ``desc``: the loop's name (progress bar, divergence errors)."""
    teacher = teacher.to(device).eval()
    teacher.requires_grad_(False)
    targets = teacher_targets(teacher, targets, y)
    dims = model_dims(teacher)
    plan = memory_plan(targets, dims, len(x0), len(x0_val), cfg.cache_dtype, cfg.ram_budget_gb, cfg.cache,
                       copies=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # set by torchrun
    log(format_plan(plan))
    dtype = torch.float16 if cfg.cache_dtype == "float16" else torch.float32
    family = family_of(teacher)
    want = tuple(family.sample_shape(teacher, 1)[1:])
    for name, xs in (("x0", x0), ("x0_val", x0_val)):
        if tuple(xs.shape[1:]) != want:
            raise ValueError(f"stage 1 {name}: samples of shape {tuple(xs.shape[1:])}; the teacher's activations are "
                             f"distilled on its configured patch grid {dims.grid}, so samples must be {want}")
    for t in targets:
        if isinstance(t, SlotTarget):
            family.check_distillable(teacher, t.graft.layer, t.graft.slot)
    null = (lambda cond: family.null_cond(teacher, cond)) if cfg.cond_dropout else (lambda cond: None)
    objective = family.objective(teacher)
    val_inputs = noised_inputs(x0_val, y_val, seed=seed * 7 + 2, null=null(y_val), cond_dropout=cfg.cond_dropout,
                               objective=objective)
    val = extract(teacher, targets, val_inputs, cfg.extract_batch_size, None, torch.float32, device)
    val_var = {t.key: t.target_var(val[t.key]) for t in targets}
    bank = OperatorBank(build_modules(teacher, targets, seed)).to(device)
    losses = {t.key: (t.loss, t.huber_delta) for t in targets}
    keeper = BestKeeper(os.path.join(run_dir, "best"))

    def evaluate(model: OperatorBank, step: int) -> dict:
        out = {}
        for key, op in model.ops.items():
            *xin, target = val[key]
            se, count = 0.0, 0
            for s in range(0, len(target), cfg.extract_batch_size):
                pred = op(*(a[s:s + cfg.extract_batch_size].to(device) for a in xin))
                se += float((pred - target[s:s + cfg.extract_batch_size].to(device)).square().sum())
                count += pred.numel()
            mse = se / count
            keeper.offer(key, op, step, mse, mse / max(val_var[key], 1e-12))
            out[f"{key}_mse"] = mse
        return out

    keys = [t.key for t in targets]
    if plan.mode == "stream":
        data = (x0, *cond_tuple(y))
        call = model_call(teacher)

        def step_fn(model, batch):
            yb = cond_pack(batch[1:])
            inp = noised_batch(batch[0], yb, null(yb), cfg.cond_dropout, objective)
            with torch.no_grad(), capture(teacher, targets) as captured:
                call(inp.x_t, inp.t, inp.y)
            return _bank_losses(model, {k: captured[k] for k in keys}, losses)
    else:
        train_inputs = noised_inputs(x0, y, seed=seed * 7 + 1, null=null(y), cond_dropout=cfg.cond_dropout,
                                     objective=objective)
        cache_dir = os.path.join(run_dir, "cache") if plan.mode == "disk" else None
        acts = extract(teacher, targets, train_inputs, cfg.extract_batch_size, cache_dir, dtype, device)
        data = tuple(a for k in keys for a in acts[k])
        spans, start = [], 0
        for t in targets:
            spans.append(slice(start, start + len(t.arrays)))
            start += len(t.arrays)

        def step_fn(model, batch):
            arrays = {k: tuple(a.float() for a in batch[sp]) for k, sp in zip(keys, spans)}
            return _bank_losses(model, arrays, losses)

    loop = cfg.loop_config(seed, progress)
    clip_groups = [[p for p in op.parameters() if p.requires_grad] for op in bank.ops.values()]
    result = train(bank, step_fn, data, loop, os.path.join(run_dir, "loop"), desc=desc,
                   clip_groups=clip_groups, evaluate=evaluate, eval_every=cfg.eval_every)
    keeper = BestKeeper(keeper.folder)  # rank 0 evaluated and wrote best/; every rank reads it back
    summary: dict = {"plan": asdict(plan)}
    for t in targets:
        if t.key not in keeper.best:
            raise TrainingDiverged(f"{desc}: {t.key} never reached a finite validation MSE in {loop.steps} steps; "
                                   "lower stage1.lr and run again")
        final = [r for r in result.history if "loss/" + t.key in r]
        summary.setdefault(t.group, {})[t.key] = dict(
            keeper.best[t.key], **t.describe(), final_train_loss=final[-1]["loss/" + t.key] if final else None,
            **{t.var_name: val_var[t.key]})
    on_main(lambda: atomic_write_json(os.path.join(run_dir, "summary.json"), summary))
    return {**summary, "history": result.history}


def _bank_losses(model, arrays: dict, losses: dict) -> dict:
    """Each module's own regression loss on its target's arrays (inputs..., target); their sum is what backward
    sees (parameters are disjoint)."""
    preds = model({key: a[:-1] for key, a in arrays.items()})
    out, total = {}, 0.0
    for key, a in arrays.items():
        kind, delta = losses[key]
        loss = regression_loss(kind, preds[key], a[-1], delta)
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
