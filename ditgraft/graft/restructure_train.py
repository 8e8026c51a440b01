"""Training and measuring restructured models (the model side is ``graft.restructure``): stage 1 of the parallel
units (each regresses its sequential pair's output, one teacher forward feeding every unit), the depth-pruned and
from-scratch baselines at matched training FLOPs, the FLOP accounting, and side-by-side sampling latency."""
from __future__ import annotations

import copy
import os
import statistics
import time
from contextlib import contextmanager

import torch
from safetensors.torch import load_file
from torch import nn

from ditgraft.diffusion.gaussian import GaussianDiffusion
from ditgraft.diffusion.samplers import SamplingConfig, sample
from ditgraft.flops import count_flops, dit_forward_flops_per_sample, dit_train_flops_per_sample
from ditgraft.graft.restructure import (MERGE_INITS, ParallelPair, depth_pruned_spec, resolve_restructure,
                                        restructure, restructured_copy, unit_index, unit_key)
from ditgraft.graft.stage1 import BestKeeper, noised_inputs, regression_loss
from ditgraft.models.adapters import model_dims
from ditgraft.models.dit import DiT
from ditgraft.train.loop import train
from ditgraft.utils import atomic_write_json


@contextmanager
def capture_pairs(model: nn.Module, pairs):
    """Hooks on the (sequential) teacher: {key: (input x of block i, c, output of block i+1)} after each forward."""
    store: dict[str, list] = {}
    handles = []
    for p in pairs:
        key = unit_key(p)

        def pre(_m, args, key=key):
            store[key] = [args[0].detach(), args[1].detach(), None]

        def post(_m, _args, out, key=key):
            store[key][2] = out.detach()

        handles.append(model.blocks[p[0]].register_forward_pre_hook(pre))
        handles.append(model.blocks[p[1]].register_forward_hook(post))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def extract_pairs(teacher, pairs, inputs, batch_size: int, device) -> dict[str, tuple[torch.Tensor, ...]]:
    """One teacher pass over ``inputs`` (Stage1Inputs); every unit's (x, c, target) kept in memory on the CPU."""
    chunks: dict[str, list[list[torch.Tensor]]] = {unit_key(p): [[], [], []] for p in pairs}
    teacher.eval()
    with capture_pairs(teacher, pairs) as captured:
        for s in range(0, len(inputs.t), batch_size):
            sl = slice(s, s + batch_size)
            teacher(inputs.x_t[sl].to(device), inputs.t[sl].to(device), inputs.y[sl].to(device))
            for key, tensors in captured.items():
                for dst, src in zip(chunks[key], tensors):
                    dst.append(src.cpu())
    return {k: tuple(torch.cat(v) for v in lists) for k, lists in chunks.items()}


class UnitBank(nn.Module):
    """The parallel units side by side (``units[key]``), each trained on its own pair's activations."""

    def __init__(self, units: dict[str, nn.Module]):
        super().__init__()
        self.units = nn.ModuleDict(units)

    def forward(self, inputs: dict) -> dict:
        return {key: self.units[key](x, c) for key, (x, c) in inputs.items()}


def make_units(teacher, spec: dict) -> dict[str, ParallelPair]:
    """Fresh units from copies of the teacher's blocks (the same init stage 1 and surgery start from)."""
    return {unit_key(p): ParallelPair(copy.deepcopy(teacher.blocks[p[0]]), copy.deepcopy(teacher.blocks[p[1]]),
                                      spec["merge_init"]) for p in spec["parallel_pairs"]}


def unit_memory_bytes(teacher, n: int) -> int:
    d = model_dims(teacher)
    return n * (2 * d.grid[0] * d.grid[1] + 1) * d.dim * 4


def run_unit_stage1(teacher, spec: dict, cfg, rcfg, x0, y, x0_val, y_val, run_dir: str, seed: int, device,
                    progress: bool = True, log=print) -> dict:
    """Distil every parallel unit onto its sequential pair; best weights in run_dir/best/{key}.safetensors.

    ``cfg``: the recipe's stage1 section (samples, steps, lr, ...); ``rcfg``: its restructure section (loss,
    huber_delta, stage1_train). Activations are held in memory when they fit ``cfg.ram_budget_gb`` (and
    ``cfg.cache`` is not ``stream``), otherwise streamed from the teacher each step."""
    teacher = teacher.to(device).eval()
    teacher.requires_grad_(False)
    pairs = spec["parallel_pairs"]
    keys = [unit_key(p) for p in pairs]
    need = unit_memory_bytes(teacher, len(x0) + len(x0_val)) * len(pairs)
    mode = "stream" if cfg.cache == "stream" or need > cfg.ram_budget_gb * 2**30 else "memory"
    log(f"stage 1 (units): {len(pairs)} parallel units, {need / 2**30:.2f} GiB of activations -> {mode}; "
        f"training: {rcfg.stage1_train}")
    val = extract_pairs(teacher, pairs, noised_inputs(x0_val, y_val, seed=seed * 7 + 2), cfg.extract_batch_size,
                        device)
    upd_var = {k: float((out - x).var()) for k, (x, _, out) in val.items()}
    bank = UnitBank(make_units(teacher, spec)).to(device)
    bank.requires_grad_(True)  # the copied teacher blocks come frozen
    if rcfg.stage1_train == "merge":
        for unit in bank.units.values():
            unit.pair.requires_grad_(False)
    keeper = BestKeeper(os.path.join(run_dir, "best"))

    def evaluate(model, step):
        out = {}
        with torch.no_grad():
            for key, unit in model.units.items():
                x, c, target = val[key]
                se = 0.0
                for s in range(0, len(x), cfg.extract_batch_size):
                    sl = slice(s, s + cfg.extract_batch_size)
                    se += float((unit(x[sl].to(device), c[sl].to(device)) - target[sl].to(device)).square().sum())
                mse = se / target.numel()
                keeper.offer(key, unit, step, mse, mse / max(upd_var[key], 1e-12))
                out[f"{key}_mse"] = mse
        return out

    def losses(model, batches: dict) -> dict:
        preds = model({k: (x, c) for k, (x, c, _) in batches.items()})
        out, total = {}, 0.0
        for k, (_, _, target) in batches.items():
            loss = regression_loss(rcfg.loss, preds[k], target, rcfg.huber_delta)
            out["loss/" + k] = loss.detach()
            total = total + loss
        out["loss"] = total
        return out

    if mode == "stream":
        diffusion = GaussianDiffusion.dit_default()
        data = (x0, y)

        def step_fn(model, batch):
            xb, yb = batch
            t = torch.randint(0, diffusion.num_timesteps, (len(xb),), device=xb.device)
            with torch.no_grad(), capture_pairs(teacher, pairs) as captured:
                teacher(diffusion.q_sample(xb, t, torch.randn_like(xb)), t, yb)
            return losses(model, {k: tuple(captured[k]) for k in keys})
    else:
        acts = extract_pairs(teacher, pairs, noised_inputs(x0, y, seed=seed * 7 + 1), cfg.extract_batch_size, device)
        data = tuple(t for k in keys for t in acts[k])

        def step_fn(model, batch):
            return losses(model, {k: tuple(batch[3 * i:3 * i + 3]) for i, k in enumerate(keys)})

    loop = cfg.loop_config(seed, progress)
    clip_groups = [[p for p in u.parameters() if p.requires_grad] for u in bank.units.values()]
    result = train(bank, step_fn, data, loop, os.path.join(run_dir, "loop"), desc="stage1-units",
                   clip_groups=clip_groups, evaluate=evaluate, eval_every=cfg.eval_every)
    summary = {}
    for p, k in zip(pairs, keys):
        final = [r for r in result.history if "loss/" + k in r]
        summary[k] = dict(keeper.best[k], pair=p, loss=rcfg.loss, train=rcfg.stage1_train,
                          final_train_loss=final[-1]["loss/" + k] if final else None, update_var=upd_var[k])
    out = {"mode": mode, "samples": len(x0), "val_samples": len(x0_val), "units": summary}
    atomic_write_json(os.path.join(run_dir, "summary.json"), out)
    return out


def load_best_units(student, spec: dict, run_dir: str, skip_prefixes: tuple[str, ...] = ()) -> None:
    """Stage 1's best unit weights into the restructured student. Parameters under ``skip_prefixes`` (e.g.
    ``pair.1.attn.`` for an operator grafted into that block, trained by its own stage 1) keep the student's."""
    for p in spec["parallel_pairs"]:
        path = os.path.join(run_dir, "best", f"{unit_key(p)}.safetensors")
        if not os.path.exists(path):
            raise FileNotFoundError(f"stage 1 has no best weights for {unit_key(p)} in {run_dir}/best; run stage 1")
        unit = student.blocks[unit_index(spec, p)]
        state = unit.state_dict()
        state.update({k: v for k, v in load_file(path).items() if not k.startswith(skip_prefixes)})
        unit.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------ measurements

@torch.no_grad()
def merge_init_study(teacher, x0, y, seed: int = 0, inits=MERGE_INITS, batch_size: int = 128) -> dict:
    """Relative MSE at stage-1 step 0 of every unit (vs the sequential pair's update variance) and of the whole
    model's output (vs the teacher output's variance), for each merge initialisation; all pairs parallel."""
    depth = len(teacher.blocks)
    inputs = noised_inputs(x0, y, seed=seed)
    acts = extract_pairs(teacher, resolve_restructure({"parallel_pairs": "all"}, depth)["parallel_pairs"], inputs,
                         batch_size, "cpu")
    ref = torch.cat([teacher(inputs.x_t[s:s + batch_size], inputs.t[s:s + batch_size], inputs.y[s:s + batch_size])
                     for s in range(0, len(inputs.t), batch_size)])
    out = {}
    for how in inits:
        spec = resolve_restructure({"parallel_pairs": "all", "merge_init": how}, depth)
        units = make_units(teacher, spec)
        row = {}
        for k, (x, c, target) in acts.items():
            pred = torch.cat([units[k](x[s:s + batch_size], c[s:s + batch_size])
                              for s in range(0, len(x), batch_size)])
            row[k] = float((pred - target).square().mean() / (target - x).var())
        student = restructured_copy(teacher, spec).eval()
        pred = torch.cat([student(inputs.x_t[s:s + batch_size], inputs.t[s:s + batch_size],
                                  inputs.y[s:s + batch_size]) for s in range(0, len(inputs.t), batch_size)])
        row["model"] = float((pred - ref).square().mean() / ref.var())
        out[how] = row
    return out


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def sampling_latency(models: dict, num: int = 100, steps: int = 25, cfg_scale: float = 1.5, repeats: int = 3,
                     device="cpu") -> dict:
    """Seconds to draw ``num`` samples (DDIM ``steps``, cfg) with each model, measured side by side: the models
    take turns within each repeat (so load on a shared machine hits them alike); the median repeat is kept."""
    cfg = SamplingConfig(sampler="ddim", steps=steps, cfg_scale=cfg_scale)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for name, m in models.items():
            m = m.to(device).eval()
            h, w = m.grid[0] * m.patch_size, m.grid[1] * m.patch_size
            labels = torch.arange(num, device=device) % m.num_classes
            gen = torch.Generator().manual_seed(0)
            t0 = time.perf_counter()
            sample(m, labels, (num, m.in_channels, h, w), cfg, generator=gen)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------------- pipeline (graft RECIPE)

BASELINES = ("depth_pruned", "from_scratch")
LATENCY_SAMPLES = 20  # per model and repeat (x2 batch with guidance): the latency table's sampling batch


def recipe_spec(recipe, teacher) -> dict | None:
    """The recipe's resolved restructure (None without a restructure section)."""
    return resolve_restructure(recipe.restructure, len(teacher.blocks)) if recipe.restructure else None


def grafted_prefixes(spec: dict, grafts) -> tuple[str, ...]:
    """Unit-relative prefixes of slots grafted with new operators (their weights come from operator stage 1)."""
    out = []
    for p in spec["parallel_pairs"]:
        for g in grafts:
            if g.layer in p:
                out.append(f"pair.{p.index(g.layer)}.{g.slot}.")
    return tuple(out)


def restructure_student(student, spec: dict | None, grafts, units_dir: str | None):
    """Surgery's second half: restructure the (grafted) student, then stage 1's best units when ``units_dir``."""
    if spec is None:
        return student
    restructure(student, spec)
    if units_dir is not None and spec["parallel_pairs"]:
        load_best_units(student, spec, units_dir, skip_prefixes=grafted_prefixes(spec, grafts))
    return student


def units_dir(recipe, spec, run_dir: str) -> str | None:
    if spec is None or not spec["parallel_pairs"] or not recipe.stage1.enabled:
        return None
    return os.path.join(run_dir, "stage1_units")


def accounting(base: dict, teacher, spec: dict, recipe, student, grafted: bool) -> dict:
    """The pipeline's FLOP accounting with the restructure added: unit training in stage 1 (3 x a unit's forward
    per sample and step, whether or not the blocks train; a second teacher pass when operator grafts took the
    first), stage 2 on the restructured student, and each baseline's matched stage-2 step count."""
    out = dict(base)
    s1, s2 = recipe.stage1, recipe.stage2
    unit_train, extraction = 0, 0
    if s1.enabled and spec["parallel_pairs"]:
        d = model_dims(teacher)
        device = next(student.parameters()).device
        x = torch.randn(2, d.grid[0] * d.grid[1], d.dim, device=device)
        c = torch.randn(2, d.dim, device=device)
        for p in spec["parallel_pairs"]:
            with torch.no_grad():
                unit_train += 3 * count_flops(student.blocks[unit_index(spec, p)], x, c) // 2 * s1.steps * s1.batch_size
        if grafted:
            fwd = dit_forward_flops_per_sample(teacher)
            extraction = fwd * ((s1.steps * s1.batch_size) if s1.cache == "stream" else (s1.samples + s1.val_samples))
    s2_per_sample = dit_train_flops_per_sample(student)
    if s2.distill_weight > 0:  # output distillation: one teacher forward per sample (as compute_accounting)
        s2_per_sample += dit_forward_flops_per_sample(teacher)
    s2_step = s2_per_sample * s2.batch_size
    out["stage1_extraction_flops"] = base["stage1_extraction_flops"] + extraction
    out["stage1_operator_flops"] = base["stage1_operator_flops"] + unit_train
    out["stage2_flops"] = s2_step * s2.steps if s2.enabled else 0
    out["total_flops"] = out["stage1_extraction_flops"] + out["stage1_operator_flops"] + out["stage2_flops"]
    pre = out.get("teacher_pretrain_flops")
    out["share_of_pretraining"] = out["total_flops"] / pre if pre else None
    out["stage2_share_of_pretraining"] = out["stage2_flops"] / pre if pre else None
    out["random_init_stage2_steps"] = max(1, round(out["total_flops"] / s2_step))
    for name in BASELINES:
        m = baseline_model(name, teacher, spec, recipe.seed)
        out[f"{name}_stage2_steps"] = max(1, round(out["total_flops"] / (dit_train_flops_per_sample(m) *
                                                                         s2.batch_size)))
    return out


def baseline_model(name: str, teacher, spec: dict, seed: int):
    """depth_pruned: the teacher with each pair's second block dropped; from_scratch: a freshly initialised DiT of
    the teacher's config at the restructured depth."""
    if name == "depth_pruned":
        return restructured_copy(teacher, depth_pruned_spec(spec))
    if name == "from_scratch":
        depth = len(teacher.blocks) - len(spec["drop"]) - len(spec["parallel_pairs"])
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            return DiT(**{**teacher.config, "depth": depth}).to(next(teacher.parameters()).device)
        finally:
            torch.random.set_rng_state(state)
    raise ValueError(f"baseline={name!r} is not allowed; use one of {BASELINES}")


def baseline_stage2(recipe, name: str, steps: int):
    """A baseline's stage-2 settings: ``steps`` (its matched budget), the LR decay scaled alike, and for
    from_scratch the pretraining LR (restructure.from_scratch_lr)."""
    decay = round(recipe.stage2.decay_steps * steps / recipe.stage2.steps)
    update = {"steps": steps, "decay_steps": min(decay, max(0, steps - recipe.stage2.warmup_steps))}
    if name == "from_scratch":
        update["lr"] = recipe.restructure.from_scratch_lr
    return recipe.stage2.model_copy(update=update)


def latency_table(models: dict, protocol, device) -> dict:
    """Depth, parameters, forward FLOPs and sampling latency (ratio to ``models["teacher"]``) of every model,
    measured side by side in this process (the restructured student under ``grafted``)."""
    lat = sampling_latency(models, num=LATENCY_SAMPLES, steps=protocol.steps, cfg_scale=protocol.cfg_scale,
                           device=device)
    rows = {name: {"depth": len(m.blocks), "params": param_count(m),
                   "forward_flops": dit_forward_flops_per_sample(m), "latency_s": lat[name],
                   "latency_ratio": lat[name] / lat["teacher"]} for name, m in models.items()}
    return {"num": LATENCY_SAMPLES, "steps": protocol.steps, "cfg_scale": protocol.cfg_scale,
            "threads": torch.get_num_threads(),
            "depth_bound": rows["grafted"]["depth"] / rows["teacher"]["depth"], "models": rows}
