"""Restructuring: sequential block pairs -> parallel units (half the depth), and block dropping (depth pruning).

The paper's third case study turns DiT-XL/2's 28 sequential blocks into 14 parallel units: blocks 2i and 2i+1 read
the same input x, and their residual updates are merged by a learned linear projection,

    unit(x, c) = x + merge(cat(delta_a, delta_b)),   delta_k = block_k(x, c) - x,

where ``delta_k`` is block k's whole residual update (its gated attention update followed by its gated MLP update,
the MLP reading x + the attention update as inside any DiT block). Both blocks keep their pretrained weights; the
merge is ``nn.Linear(2D, D)``, so a unit adds 2D^2 + D parameters (DiT-XL/2: 14 x 2,655,360 = 37,175,040, from
675,129,632 to 712,304,672, the paper's 712M).

Parameter names: unit u sits at ``blocks.{u}`` of the restructured DiT and holds the two original blocks under
``blocks.{u}.pair.0`` / ``blocks.{u}.pair.1`` with DiT's own names below (``blocks.{u}.pair.0.attn.qkv.weight``),
plus ``blocks.{u}.merge.weight`` / ``.bias``. A restructured checkpoint records the restructure in its metadata
(``restructure: {parallel_pairs, drop, merge_init}``, block indices of the original model), so
``graft.surgery.load_grafted`` rebuilds it from the file alone.

Merge initialisation (not published). With W = [W_a, W_b], bias 0:
- ``sum``      W = [I, I]:    x + delta_a(x) + delta_b(x), the first-order expansion of the sequential pair
  x + delta_a(x) + delta_b(x + delta_a(x)); exact when block b's update does not depend on block a's;
- ``average``  W = [I/2, I/2]: half of each update;
- ``first``    W = [I, 0]:    block a alone (block b is dropped until trained).
Measured at stage-1 step 0 on the shipped testbed teacher (8 blocks -> 4 units; 256 held-out noised inputs, t ~
U{0..999}; relative MSE = MSE / variance of the sequential pair's update (out - in) for a unit, MSE / variance of
the teacher's output for the whole model; ``python -m ditgraft.graft.restructure``):

    merge init | unit 0-1 | unit 2-3 | unit 4-5 | unit 6-7 | whole model
    sum        | 0.074    | 0.141    | 0.053    | 0.055    | 0.219
    average    | 0.282    | 0.190    | 0.225    | 0.244    | 0.438
    first      | 0.139    | 0.195    | 0.332    | 0.519    | 0.596

``sum`` is the default: the closest untrained parallel model, for every unit and for the whole model (a half
of the whole-model error of the next best).

Stage 1 (``run_unit_stage1``) regresses each unit's output onto the original sequential pair's output on the same
input: hooks on the teacher capture the input (and conditioning c) of block 2i and the output of block 2i+1, one
teacher forward feeding every unit. What trains is ``restructure.stage1_train``: ``unit`` (default: both blocks and
the merge; the blocks must change to absorb what a linear merge cannot: block b no longer sees block a's update) or
``merge`` (the merge alone, the blocks frozen at their pretrained weights). On the testbed, units trained whole
reached 2.5-5x lower relative MSE than merge-only training (docs/RESULTS.md).

Depth pruning: ``drop`` removes blocks; ``depth_pruned_spec`` is the baseline of the same depth as a parallel
model (each pair's second block dropped). Sampling latency only approaches the depth bound (half the teacher's)
where a unit's two blocks run concurrently: the plain forward here runs them one after the other.
"""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager

import torch
from torch import nn

MERGE_INITS = ("sum", "average", "first")


class ParallelPair(nn.Module):
    """Two DiT blocks reading the same input; their residual updates merged by ``merge: Linear(2D -> D)``."""

    def __init__(self, first: nn.Module, second: nn.Module, merge_init: str = "sum"):
        super().__init__()
        self.pair = nn.ModuleList([first, second])
        dim = first.norm1.normalized_shape[0]
        self.merge = nn.Linear(2 * dim, dim, bias=True)
        init_merge(self.merge, merge_init)

    @property
    def norm1(self) -> nn.Module:  # the width probe that model_dims reads from blocks[0]
        return self.pair[0].norm1

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        deltas = torch.cat([block(x, c) - x for block in self.pair], dim=-1)
        return x + self.merge(deltas)


def init_merge(merge: nn.Linear, how: str) -> None:
    """Set ``merge`` to one of MERGE_INITS (see the module doc), bias 0."""
    if how not in MERGE_INITS:
        raise ValueError(f"merge_init={how!r} is not allowed; use one of {MERGE_INITS}")
    dim = merge.out_features
    eye = torch.eye(dim, dtype=merge.weight.dtype, device=merge.weight.device)
    a, b = {"sum": (1.0, 1.0), "average": (0.5, 0.5), "first": (1.0, 0.0)}[how]
    with torch.no_grad():
        merge.weight.copy_(torch.cat([a * eye, b * eye], dim=1))
        merge.bias.zero_()


def resolve_restructure(spec, depth: int) -> dict:
    """A recipe's ``restructure`` section (or an equivalent dict) -> ``{parallel_pairs, drop, merge_init}`` with
    concrete block indices of a depth-``depth`` model; raises ValueError naming the field, value and what is allowed."""
    get = (lambda k, d=None: spec.get(k, d)) if isinstance(spec, dict) else (lambda k, d=None: getattr(spec, k, d))
    pairs = get("parallel_pairs")
    drop = list(get("drop") or [])
    merge_init = get("merge_init", "sum")
    if merge_init not in MERGE_INITS:
        raise ValueError(f"restructure.merge_init={merge_init!r} is not allowed; use one of {MERGE_INITS}")
    bad = [i for i in drop if not 0 <= i < depth]
    if bad:
        raise ValueError(f"restructure.drop={drop}: blocks {bad} are out of range for depth {depth} (0..{depth - 1})")
    if len(set(drop)) != len(drop):
        raise ValueError(f"restructure.drop={drop}: a block is listed twice")
    if pairs == "all":
        if depth % 2:
            raise ValueError(f"restructure.parallel_pairs='all' needs an even depth; the teacher has {depth} blocks")
        pairs = [[2 * i, 2 * i + 1] for i in range(depth // 2)]
    pairs = [list(p) for p in (pairs or [])]
    used: set[int] = set(drop)
    for p in pairs:
        if len(p) != 2 or p[1] != p[0] + 1 or not 0 <= p[0] < depth - 1:
            raise ValueError(f"restructure.parallel_pairs: {p} is not allowed; a pair is two adjacent blocks "
                             f"[i, i+1] with 0 <= i < {depth - 1}")
        clash = used & set(p)
        if clash:
            raise ValueError(f"restructure.parallel_pairs: {p} reuses block(s) {sorted(clash)} (already dropped "
                             f"or in another pair); each block may be in one pair and must not be dropped")
        used |= set(p)
    if not pairs and not drop:
        raise ValueError("restructure: give parallel_pairs and/or drop (both are empty)")
    if len(drop) >= depth:
        raise ValueError(f"restructure.drop={drop} removes every block of a depth-{depth} model")
    return {"parallel_pairs": sorted(pairs), "drop": sorted(drop), "merge_init": merge_init}


def unit_key(pair) -> str:
    return f"pair{pair[0]}_{pair[1]}"


def restructure(model: nn.Module, spec: dict) -> nn.Module:
    """Restructure ``model`` in place (its ``blocks`` list) by a resolved spec; returns it. Units keep the order of
    their first block; dropped blocks disappear. ``model.restructure`` records the spec."""
    first_of = {p[0]: p for p in spec["parallel_pairs"]}
    seconds = {p[1] for p in spec["parallel_pairs"]}
    drop = set(spec["drop"])
    new = []
    for i, block in enumerate(model.blocks):
        if i in drop or i in seconds:
            continue
        if i in first_of:
            j = first_of[i][1]
            new.append(ParallelPair(block, model.blocks[j], spec["merge_init"]).to(next(block.parameters()).device))
        else:
            new.append(block)
    model.blocks = nn.ModuleList(new)
    model.restructure = dict(spec)
    return model


def restructured_copy(model: nn.Module, spec: dict) -> nn.Module:
    """A restructured deep copy; ``model`` is untouched."""
    return restructure(copy.deepcopy(model), spec)


def unit_index(spec: dict, pair) -> int:
    """Position of the unit made from ``pair`` in the restructured ``blocks`` list."""
    seconds = {p[1] for p in spec["parallel_pairs"]}
    kept = [i for i in range(pair[0]) if i not in set(spec["drop"]) and i not in seconds]
    return len(kept)


def depth_pruned_spec(spec: dict) -> dict:
    """The depth-pruning baseline of the same depth: each parallel pair's second block is dropped instead."""
    return {"parallel_pairs": [], "drop": sorted(set(spec["drop"]) | {p[1] for p in spec["parallel_pairs"]}),
            "merge_init": spec["merge_init"]}


# ---------------------------------------------------------------------------------------------- stage 1 for units

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
    from ditgraft.models.adapters import model_dims

    d = model_dims(teacher)
    return n * (2 * d.grid[0] * d.grid[1] + 1) * d.dim * 4


def run_unit_stage1(teacher, spec: dict, cfg, rcfg, x0, y, x0_val, y_val, run_dir: str, seed: int, device,
                    progress: bool = True, log=print) -> dict:
    """Distil every parallel unit onto its sequential pair; best weights in run_dir/best/{key}.safetensors.

    ``cfg``: the recipe's stage1 section (samples, steps, lr, ...); ``rcfg``: its restructure section (loss,
    huber_delta, stage1_train). Activations are held in memory when they fit ``cfg.ram_budget_gb`` (and
    ``cfg.cache`` is not ``stream``), otherwise streamed from the teacher each step."""
    from ditgraft.diffusion.gaussian import GaussianDiffusion
    from ditgraft.graft.stage1 import BestKeeper, noised_inputs, regression_loss
    from ditgraft.train.loop import LoopConfig, train
    from ditgraft.utils import atomic_write_json

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

    loop = LoopConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                      warmup_steps=cfg.warmup_steps, schedule=cfg.schedule, ema_decay=None, grad_clip=cfg.grad_clip,
                      ckpt_every=cfg.eval_every, log_every=max(1, cfg.eval_every // 5), seed=seed, progress=progress)
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
    from safetensors.torch import load_file

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
    from ditgraft.graft.stage1 import noised_inputs

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
    import statistics
    import time

    from ditgraft.diffusion.samplers import SamplingConfig, sample

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


def main() -> None:
    """Print the merge-initialisation study on the shipped testbed teacher (the table in the module doc)."""
    from ditgraft.graft.pipeline import load_split
    from ditgraft.models.checkpoints import load_dit

    torch.set_num_threads(1)
    teacher, _ = load_dit("testbed")
    _, _, xv, yv = load_split("mnist5k", 1, 256, seed=0)
    res = merge_init_study(teacher, xv, yv, seed=2)
    keys = list(next(iter(res.values())))
    print("merge init | " + " | ".join(keys))
    for how, row in res.items():
        print(f"{how:10s} | " + " | ".join(f"{row[k]:.4f}" for k in keys))


if __name__ == "__main__":
    main()


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


def stage1_units(recipe, teacher, spec, run_dir: str, device, progress: bool, log, timed) -> None:
    """Stage 1 of the parallel units into run_dir/stage1_units (skipped when done or when there are none)."""
    from ditgraft.graft.pipeline import load_split

    out = os.path.join(run_dir, "stage1_units")
    if spec is None or not spec["parallel_pairs"] or not recipe.stage1.enabled or os.path.exists(
            os.path.join(out, "summary.json")):
        return
    c = recipe.stage1
    x, y, xv, yv = load_split(c.data, c.samples, c.val_samples, recipe.seed)
    timed("stage1_units", lambda: run_unit_stage1(teacher, spec, c, recipe.restructure, x, y, xv, yv, out,
                                                  recipe.seed, device, progress=progress, log=log))


def units_dir(recipe, spec, run_dir: str) -> str | None:
    if spec is None or not spec["parallel_pairs"] or not recipe.stage1.enabled:
        return None
    return os.path.join(run_dir, "stage1_units")


def accounting(base: dict, teacher, spec: dict, recipe, student, grafted: bool) -> dict:
    """The pipeline's FLOP accounting with the restructure added: unit training in stage 1 (3 x a unit's forward
    per sample and step, whether or not the blocks train; a second teacher pass when operator grafts took the
    first), stage 2 on the restructured student, and each baseline's matched stage-2 step count."""
    from ditgraft.flops import count_flops, dit_forward_flops_per_sample, dit_train_flops_per_sample
    from ditgraft.models.adapters import model_dims

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
    s2_step = dit_train_flops_per_sample(student) * s2.batch_size
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
    from ditgraft.models.dit import DiT

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


def train_baselines(recipe, teacher, teacher_meta, spec, run_dir: str, acc: dict, device, progress, log,
                    timed) -> None:
    """Each baseline of eval.baselines in BASELINES: stage 2 with the matched step count, saved as
    run_dir/baseline_{name}/student.safetensors (self-describing)."""
    from ditgraft.graft.pipeline import load_split
    from ditgraft.graft.stage2 import run_stage2
    from ditgraft.graft.surgery import save_grafted

    for name in BASELINES:
        if name not in recipe.eval.baselines:
            continue
        path = os.path.join(run_dir, f"baseline_{name}", "student.safetensors")
        if os.path.exists(path):
            continue
        steps = acc[f"{name}_stage2_steps"]
        decay = round(recipe.stage2.decay_steps * steps / recipe.stage2.steps)
        update = {"steps": steps, "decay_steps": min(decay, max(0, steps - recipe.stage2.warmup_steps))}
        if name == "from_scratch":
            update["lr"] = recipe.restructure.from_scratch_lr
        cfg = recipe.stage2.model_copy(update=update)
        log(f"{name} baseline: {steps} stage-2 steps at lr {cfg.lr} (the same total FLOPs)")
        model = baseline_model(name, teacher, spec, recipe.seed)
        x, y, _, _ = load_split(cfg.data, 10**9, recipe.stage1.val_samples, recipe.seed)
        model, _ = timed(f"baseline_{name}", lambda: run_stage2(
            model, cfg, x, y, os.path.join(run_dir, f"baseline_{name}", "stage2"), recipe.seed, progress))
        extra = {"baseline": name}
        if name == "depth_pruned":
            extra["restructure"] = depth_pruned_spec(spec)
        save_grafted(path, model, [], recipe.to_dict(), teacher_meta, extra=extra)


def evaluate_restructured(recipe, teacher, student, run_dir: str, protocol, device, progress) -> dict:
    """Baselines' quality under the run's protocol, and depth / params / FLOPs / sampling latency of every model
    measured side by side in this process (eval/latency.json)."""
    from ditgraft.eval.evaluate import sample_and_evaluate
    from ditgraft.flops import dit_forward_flops_per_sample
    from ditgraft.graft.surgery import load_grafted
    from ditgraft.utils import atomic_write_json

    evals, models = {}, {"teacher": teacher, "grafted": student}
    for name in BASELINES:
        path = os.path.join(run_dir, f"baseline_{name}", "student.safetensors")
        if name in recipe.eval.baselines and os.path.exists(path):
            models[name], _ = load_grafted(path, device)
            evals[name] = sample_and_evaluate(models[name], os.path.join(run_dir, "eval"), protocol, device,
                                              progress, tag=name)
    lat = sampling_latency(models, num=LATENCY_SAMPLES, steps=protocol.steps, cfg_scale=protocol.cfg_scale,
                           device=device)
    rows = {}
    for name, m in models.items():
        rows[name] = {"depth": len(m.blocks), "params": param_count(m),
                      "forward_flops": dit_forward_flops_per_sample(m), "latency_s": lat[name],
                      "latency_ratio": lat[name] / lat["teacher"]}
    info = {"num": LATENCY_SAMPLES, "steps": protocol.steps, "cfg_scale": protocol.cfg_scale,
            "threads": torch.get_num_threads(),
            "depth_bound": rows["grafted"]["depth"] / rows["teacher"]["depth"], "models": rows}
    atomic_write_json(os.path.join(run_dir, "eval", "latency.json"), info)
    return evals


def report_lines(run_dir: str, recipe, compute: dict, evals: dict) -> list[str]:
    """The report's restructuring section: depth, parameters, FLOPs, latency ratio next to FID."""
    from ditgraft.utils import read_json

    spec = None
    md = ["", "## Restructuring", ""]
    if recipe.restructure is not None:
        r = recipe.restructure
        spec = dict(parallel_pairs=r.parallel_pairs, drop=r.drop, merge_init=r.merge_init)
        md.append(f"parallel_pairs: {spec['parallel_pairs']}, drop: {spec['drop']}, merge init: {r.merge_init}; "
                  f"stage 1 trains: {r.stage1_train} ({r.loss} loss onto the sequential pair's output).")
    s1 = os.path.join(run_dir, "stage1_units", "summary.json")
    if os.path.exists(s1):
        units = read_json(s1)["units"]
        md += ["", "Stage 1 (units): relative MSE = validation MSE / variance of the sequential pair's update.", "",
               "| unit | best step | val MSE | relative MSE |", "|---|---|---|---|"]
        md += [f"| {k} | {u['step']} | {u['val_mse']:.4g} | {u['val_rel_mse']:.4g} |" for k, u in units.items()]
    lat_path = os.path.join(run_dir, "eval", "latency.json")
    if os.path.exists(lat_path):
        lat = read_json(lat_path)
        md += ["", f"Sampling latency: {lat['num']} samples, DDIM {lat['steps']}, cfg {lat['cfg_scale']}, "
               f"{lat['threads']} threads, all models in one process taking turns (median of 3). Depth bound "
               f"(latency ratio if time were proportional to depth): {lat['depth_bound']:.2f}.", "",
               "| model | depth | params | forward GFLOPs / sample | latency (s) | latency / teacher | FID | "
               "training steps (stage 2) |", "|---|---|---|---|---|---|---|---|"]
        steps = {"grafted": compute.get("stage2_flops") and recipe.stage2.steps,
                 "depth_pruned": compute.get("depth_pruned_stage2_steps"),
                 "from_scratch": compute.get("from_scratch_stage2_steps")}
        for name, row in lat["models"].items():
            fid = evals.get(name, {}).get("fid")
            label = "student (restructured)" if name == "grafted" else name
            md.append(f"| {label} | {row['depth']} | {row['params']:,} | {row['forward_flops'] / 1e9:.3f} | "
                      f"{row['latency_s']:.2f} | {row['latency_ratio']:.3f} | "
                      f"{'-' if fid is None else f'{fid:.3f}'} | {steps.get(name) or '-'} |")
    if compute.get("share_of_pretraining") is not None:
        md.append(f"\nEvery trained model above spends {100 * compute['share_of_pretraining']:.2f}% of the "
                  "teacher's pretraining FLOPs (the baselines on stage 2 alone).")
    return md
