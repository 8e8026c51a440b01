"""Training and measuring restructured models (the model side is ``graft.restructure``): loading stage 1's best
parallel units into the student (stage 1 itself is ``graft.stage1`` with ``PairTarget`` targets), the baselines'
stage-2 settings, the merge-init study and side-by-side sampling latency. The FLOP accounting is
``graft.accounting``."""
from __future__ import annotations

import os
import statistics
import time

import torch
from safetensors.torch import load_file
from torch import nn

from ditgraft.diffusion.samplers import SamplingConfig
from ditgraft.eval.sampling import generate
from ditgraft.flops import dit_forward_flops_per_sample
from ditgraft.graft.restructure import (MERGE_INITS, resolve_restructure, restructure, restructured_copy, unit_index,
                                        unit_key)
from ditgraft.graft.stage1 import PairTarget, build_modules, extract, noised_inputs
from ditgraft.models.families import family_of


def make_units(teacher, spec: dict) -> dict:
    """Fresh units of a resolved ``spec`` from copies of the teacher's blocks: stage 1's starting point."""
    return build_modules(teacher, [PairTarget(p, spec["merge_init"]) for p in spec["parallel_pairs"]], 0)


def load_best_units(student, spec: dict, run_dir: str, skip_prefixes: tuple[str, ...] = ()) -> None:
    """Stage 1's best unit weights into the restructured student. Parameters under ``skip_prefixes`` (e.g.
    ``pair.1.attn.`` for an operator grafted into that block, trained by its own stage 1) keep the student's."""
    for p in spec["parallel_pairs"]:
        path = os.path.join(run_dir, "best", f"{unit_key(p)}.safetensors")
        if not os.path.exists(path):
            raise FileNotFoundError(f"stage 1 has no best weights for {unit_key(p)} in {run_dir}/best; run stage 1")
        unit = family_of(student).blocks(student)[unit_index(spec, p)]
        state = unit.state_dict()
        state.update({k: v for k, v in load_file(path).items() if not k.startswith(skip_prefixes)})
        unit.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------ measurements

@torch.no_grad()
def merge_init_study(teacher, x0, y, seed: int = 0, inits=MERGE_INITS, batch_size: int = 128) -> dict:
    """Relative MSE at stage-1 step 0 of every unit (vs the sequential pair's update variance) and of the whole
    model's output (vs the teacher output's variance), for each merge initialisation; all pairs parallel."""
    depth = family_of(teacher).dims(teacher).depth
    inputs = noised_inputs(x0, y, seed=seed)
    pairs = resolve_restructure({"parallel_pairs": "all"}, depth)["parallel_pairs"]
    acts = extract(teacher, [PairTarget(p) for p in pairs], inputs, batch_size, None, torch.float32, "cpu")
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


def sampling_latency(models: dict, num: int = 100, steps: int = 25, cfg_scale: float = 1.5, repeats: int = 3,
                     device="cpu") -> dict:
    """Seconds to draw ``num`` samples (DDIM ``steps``, cfg; one batch of ``eval.sampling.generate``) with each
    model, measured side by side: the models take turns within each repeat (so load on a shared machine hits them
    alike); the median repeat is kept."""
    cfg = SamplingConfig(sampler="ddim", steps=steps, cfg_scale=cfg_scale)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for name, m in models.items():
            m = m.to(device)
            t0 = time.perf_counter()
            generate(m, num, cfg, seed=0, batch_size=num, device=device, raw=True)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------------- pipeline (graft RECIPE)

LATENCY_SAMPLES = 20  # per model and repeat (x2 batch with guidance): the latency table's sampling batch


def recipe_spec(recipe, teacher) -> dict | None:
    """The recipe's resolved restructure (None without a restructure section); refused in one line for a teacher
    whose family does not support restructuring."""
    if not recipe.restructure:
        return None
    family = family_of(teacher)
    family.require("restructure", "recipe restructure")
    return resolve_restructure(recipe.restructure, family.dims(teacher).depth)


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
    rows = {name: {"depth": len(family_of(m).blocks(m)), "params": param_count(m),
                   "forward_flops": dit_forward_flops_per_sample(m), "latency_s": lat[name],
                   "latency_ratio": lat[name] / lat["teacher"]} for name, m in models.items()}
    return {"num": LATENCY_SAMPLES, "steps": protocol.steps, "cfg_scale": protocol.cfg_scale,
            "threads": torch.get_num_threads(),
            "depth_bound": rows["grafted"]["depth"] / rows["teacher"]["depth"], "models": rows}
