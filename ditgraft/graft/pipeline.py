"""``ditgraft graft RECIPE``: stage 1 -> stage 2 -> sample -> eval -> report, in one run directory.

Run directory layout (every stage reads and writes here; a stage whose output is complete is skipped, and a stage
that was interrupted resumes from its last checkpoint, so re-running the command finishes the same run):
    recipe.yaml            the validated recipe            plan.json        resolved layers, FLOP accounting
    stage1/                activation distillation (loop/, best/, summary.json)
    stage2/                finetuning (loop/), student.safetensors (grafted checkpoint, recipe embedded)
    baseline_random/       the same stage 2 budget from randomly initialised operators (when asked)
    eval/                  samples, grids and metrics per model
    report.md, report.json, *.png
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict

import torch
import yaml

from ditgraft.eval.evaluate import Protocol, sample_and_evaluate
from ditgraft.flops import count_flops, dit_forward_flops_per_sample, dit_train_flops_per_sample
from ditgraft.graft.stage1 import load_best_operators, run_stage1
from ditgraft.graft.stage2 import run_stage2
from ditgraft.graft.surgery import ResolvedGraft, graft_model, load_grafted, resolve_grafts, save_grafted
from ditgraft.models.adapters import get_slot, model_dims
from ditgraft.models.checkpoints import load_dit
from ditgraft.models.families import DIFFUSERS_PREFIX, family_of, load_diffusers
from ditgraft.models.families.base import cond_rows
from ditgraft.recipe import LayerSelector, Recipe
from ditgraft.utils import atomic_write_json, atomic_write_text, read_json, resolve_device

STAGES = ("stage1", "stage2", "eval", "report")


def load_teacher(recipe: Recipe, device) -> tuple[torch.nn.Module, dict]:
    t = recipe.teacher
    if t.source.startswith(DIFFUSERS_PREFIX):
        return load_diffusers(t.source[len(DIFFUSERS_PREFIX):]).to(device).eval(), {}
    model, meta = load_dit(t.source, model=t.model, image_size=t.image_size)
    return model.to(device).eval(), meta


def load_split(spec: str, n_train: int, n_val: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(x, y, x_val, y_val): the testbed uses its fixed split; other data holds out its last n_val rows.
    Subsets are seeded random draws, never prefixes (mnist5k is stored sorted by class). y is labels, or a tuple
    (caption embeddings, masks) for caption data."""
    from ditgraft.data.images import load_dataset

    if spec == "mnist5k":
        (x, y), (xv, yv) = load_dataset("mnist5k:train"), load_dataset("mnist5k:val")
    else:
        x_all, y_all = load_dataset(spec)
        if len(x_all) <= n_val:
            raise ValueError(f"data={spec!r} has {len(x_all)} samples; need more than val_samples={n_val}")
        x, y = x_all[:-n_val], cond_rows(y_all, slice(None, -n_val))
        xv, yv = x_all[-n_val:], cond_rows(y_all, slice(len(x_all) - n_val, None))
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(x), generator=g)[:n_train].sort().values
    keep_val = torch.randperm(len(xv), generator=g)[:n_val].sort().values
    return x[keep], cond_rows(y, keep), xv[keep_val], cond_rows(yv, keep_val)


def _needs(recipe: Recipe, *selects: str) -> bool:
    return any(isinstance(g.layers, LayerSelector) and g.layers.select in selects for g in recipe.grafts)


def _analysis(teacher, run_dir: str, device, log) -> dict:
    from ditgraft.eval.analysis import analyze_model, write_analysis_report

    path = os.path.join(run_dir, "analysis", "analysis.json")
    if os.path.exists(path):
        return read_json(path)
    log("analysis: attention locality of the teacher (for the layer selectors)")
    result = analyze_model(teacher, num_samples=50, steps=10, device=device)
    write_analysis_report(result, os.path.join(run_dir, "analysis"))
    return result


def _probe_losses(recipe: Recipe, teacher, run_dir: str, device, log) -> dict[int, dict[int, float]]:
    """auto selector: distil the candidate operator into every layer briefly; relative val MSE per layer."""
    out = {}
    depth = model_dims(teacher).depth
    for gi, g in enumerate(recipe.grafts):
        if not (isinstance(g.layers, LayerSelector) and g.layers.select == "auto" and g.layers.by == "stage1_loss"):
            continue
        probe = [ResolvedGraft(g.slot, i, g.operator, dict(g.options), g.loss, g.huber_delta, g.init)
                 for i in range(depth)]
        cfg = recipe.stage1.model_copy(update={"steps": g.layers.probe_steps,
                                               "eval_every": g.layers.probe_steps})
        x, y, xv, yv = load_split(cfg.data, cfg.samples, cfg.val_samples, recipe.seed)
        log(f"auto selector: probing {g.operator} in all {depth} {g.slot} slots for {cfg.steps} steps")
        res = run_stage1(teacher, probe, cfg, x, y, xv, yv, os.path.join(run_dir, f"probe{gi}"), recipe.seed,
                         device, log=log)
        out[gi] = {s["layer"]: s["val_rel_mse"] for s in res["operators"].values()}
    return out


def plan_grafts(recipe: Recipe, teacher, run_dir: str, device, log=print) -> list[ResolvedGraft]:
    path = os.path.join(run_dir, "plan.json")
    if os.path.exists(path):
        return [ResolvedGraft(**g) for g in read_json(path)["grafts"]]
    analysis = _analysis(teacher, run_dir, device, log) if _needs(recipe, "most_local", "least_local") or any(
        isinstance(g.layers, LayerSelector) and g.layers.select == "auto" and g.layers.by == "locality"
        for g in recipe.grafts) else None
    probes = _probe_losses(recipe, teacher, run_dir, device, log) if _needs(recipe, "auto") else None
    grafts = resolve_grafts(recipe, model_dims(teacher).depth, analysis=analysis, probe_losses=probes)
    atomic_write_json(path, {"grafts": [asdict(g) for g in grafts], "probe_losses": probes})
    return grafts


def compute_accounting(teacher, teacher_meta: dict, grafts, recipe: Recipe, student) -> dict:
    """Training FLOPs of stage 1 (teacher extraction forwards + operator training) and stage 2, and their share
    of the teacher's pretraining FLOPs (from its model card metadata)."""
    dims = model_dims(teacher)
    s1 = recipe.stage1
    extraction = 0
    op_train = 0
    if s1.enabled:
        fwd = dit_forward_flops_per_sample(teacher)
        stream = s1.cache == "stream"
        extraction = fwd * ((s1.steps * s1.batch_size) if stream else (s1.samples + s1.val_samples))
        for g in grafts:
            op = get_slot(student, g.layer, g.slot)
            x = torch.randn(2, dims.grid[0] * dims.grid[1], dims.dim, device=next(op.parameters()).device)
            with torch.no_grad():
                per = 3 * count_flops(op, x) // 2  # training = 3 x forward, as for the DiT
            op_train += per * s1.steps * s1.batch_size
    s2_step = dit_train_flops_per_sample(student) * recipe.stage2.batch_size
    s2 = s2_step * recipe.stage2.steps if recipe.stage2.enabled else 0
    pre = (teacher_meta.get("pretrain") or {}).get("train_flops")
    total = extraction + op_train + s2
    return {"stage1_extraction_flops": extraction, "stage1_operator_flops": op_train, "stage2_flops": s2,
            "total_flops": total, "teacher_pretrain_flops": pre,
            "share_of_pretraining": (total / pre) if pre else None,
            "stage2_share_of_pretraining": (s2 / pre) if pre else None,
            # the random-init baseline (no stage 1) spends the same total on stage 2: more steps, same batch
            "random_init_stage2_steps": max(1, round(total / s2_step))}


def _testbed_card_metrics(source: str, protocol: Protocol) -> dict | None:
    """The shipped testbed teacher's metrics under ``protocol``, from its model card (None for another teacher or
    a protocol the card did not measure)."""
    from ditgraft.models.checkpoints import ASSETS

    if source != "testbed":
        return None

    card = os.path.join(ASSETS, "testbed", "teacher_metrics.json")
    if os.path.exists(card):
        for row in read_json(card).get("evaluations", []):
            if row.get("protocol") == asdict(protocol):
                return row
    return None


def _teacher_metrics(teacher, source: str, protocol: Protocol, run_dir: str, device, progress: bool) -> dict:
    """The teacher under the same protocol; the shipped testbed teacher's numbers are read from its card."""
    row = _testbed_card_metrics(source, protocol)
    if row is not None:
        return row
    return sample_and_evaluate(teacher, os.path.join(run_dir, "eval"), protocol, device, progress, tag="teacher")


def run_graft(recipe: Recipe, run_dir: str, stages=STAGES, device: str | None = None, progress: bool = True,
              log=print) -> dict:
    """Run the recipe's stages in ``run_dir``; returns the report dict."""
    for s in stages:
        if s not in STAGES:
            raise ValueError(f"stage={s!r} is not allowed; use some of {STAGES}")
    dev = resolve_device(device or recipe.device)
    os.makedirs(run_dir, exist_ok=True)
    recipe_path = os.path.join(run_dir, "recipe.yaml")
    if os.path.exists(recipe_path):
        with open(recipe_path) as f:
            previous = yaml.safe_load(f)
        if previous != recipe.to_dict():
            raise ValueError(f"{run_dir} holds a run of a different recipe ({recipe_path}); use another --run-dir")
    else:
        atomic_write_text(recipe_path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    torch.manual_seed(recipe.seed)
    teacher, teacher_meta = load_teacher(recipe, dev)
    grafts = plan_grafts(recipe, teacher, run_dir, dev, log)
    log("grafts: " + ", ".join(f"{g.slot}[{g.layer}]->{g.operator}" for g in grafts))
    timings = read_json(os.path.join(run_dir, "timings.json")) if os.path.exists(
        os.path.join(run_dir, "timings.json")) else {}
    student_path = os.path.join(run_dir, "student.safetensors")

    def timed(name, fn):
        t0 = time.time()
        out = fn()
        timings[name] = timings.get(name, 0.0) + time.time() - t0
        atomic_write_json(os.path.join(run_dir, "timings.json"), timings)
        return out

    @functools.cache
    def accounting() -> dict:  # one surgery + FLOP count, shared by the random-init baseline and the report
        return compute_accounting(teacher, teacher_meta, grafts, recipe, graft_model(teacher, grafts, recipe.seed))

    s1_dir = os.path.join(run_dir, "stage1")
    if "stage1" in stages and recipe.stage1.enabled and not os.path.exists(os.path.join(s1_dir, "summary.json")):
        c = recipe.stage1
        x, y, xv, yv = load_split(c.data, c.samples, c.val_samples, recipe.seed)
        timed("stage1", lambda: run_stage1(teacher, grafts, c, x, y, xv, yv, s1_dir, recipe.seed, dev,
                                           progress=progress, log=log))
    if "stage2" in stages and not os.path.exists(student_path):
        student = _train_student(recipe, teacher, grafts, run_dir, dev, progress,
                                 s1_dir if recipe.stage1.enabled else None, timed, "stage2")
        save_grafted(student_path, student, grafts, recipe.to_dict(), teacher_meta)
    if "random_init" in recipe.eval.baselines and "stage2" in stages:
        path = os.path.join(run_dir, "baseline_random", "student.safetensors")
        if not os.path.exists(path):
            steps = accounting()["random_init_stage2_steps"]
            log(f"random-init baseline: {steps} stage-2 steps (the grafted run's stage 1 + stage 2 FLOPs)")
            student = _train_student(recipe, teacher, grafts, os.path.join(run_dir, "baseline_random"), dev,
                                     progress, None, timed, "baseline_random", steps=steps)
            save_grafted(path, student, grafts, recipe.to_dict(), teacher_meta)
    evals = {}
    protocol = Protocol(num=recipe.eval.num, sampler=recipe.eval.sampler, steps=recipe.eval.steps,
                        cfg_scale=recipe.eval.cfg_scale, seed=recipe.eval.seed)
    if "eval" not in stages:  # e.g. the report alone: use the evaluations already on disk
        evals = _evaluations_on_disk(run_dir, protocol)
        card = _testbed_card_metrics(recipe.teacher.source, protocol)
        if "teacher" in recipe.eval.baselines and card is not None:
            evals["teacher"] = card
    if "eval" in stages and recipe.eval.enabled and os.path.exists(student_path):
        if family_of(teacher).in_channels(teacher) not in (1, 3):
            log("eval: latent-space model; sample with `ditgraft sample` and a VAE, then `ditgraft eval`")
        else:
            student, _ = load_grafted(student_path, dev)
            evals["grafted"] = timed("eval", lambda: sample_and_evaluate(
                student, os.path.join(run_dir, "eval"), protocol, dev, progress, tag="grafted"))
            if "teacher" in recipe.eval.baselines:
                evals["teacher"] = _teacher_metrics(teacher, recipe.teacher.source, protocol, run_dir, dev, progress)
            if "random_init" in recipe.eval.baselines:
                base, _ = load_grafted(os.path.join(run_dir, "baseline_random", "student.safetensors"), dev)
                evals["random_init"] = sample_and_evaluate(base, os.path.join(run_dir, "eval"), protocol, dev,
                                                           progress, tag="random_init")
    report = {}
    if "report" in stages:
        from ditgraft.graft.report import write_report

        report = write_report(run_dir, recipe, grafts, evals, accounting(), timings)
    return report


def _evaluations_on_disk(run_dir: str, protocol: Protocol) -> dict:
    """The metrics files that ``sample_and_evaluate`` left in ``run_dir/eval`` for this protocol, by tag."""
    out = {}
    for tag in ("grafted", "teacher", "random_init"):
        path = os.path.join(run_dir, "eval", f"{tag}_metrics.json")
        row = read_json(path) if os.path.exists(path) else {}
        if row.get("protocol") == asdict(protocol):
            out[tag] = row
    return out


def _train_student(recipe, teacher, grafts, out_dir: str, dev, progress, stage1_dir: str | None, timed,
                   timing_key: str, steps: int | None = None):
    """Student = surgery (+ stage 1's best operators when ``stage1_dir``), then stage 2 in ``out_dir/stage2``
    (``steps`` overrides the recipe's stage-2 step count: the random-init baseline's matched budget)."""
    student = graft_model(teacher, grafts, recipe.seed).to(dev)
    if stage1_dir is not None:
        load_best_operators(student, grafts, stage1_dir)
    if not recipe.stage2.enabled:
        return student.eval()
    c = recipe.stage2 if steps is None else recipe.stage2.model_copy(update={"steps": steps})
    x, y, _, _ = load_split(c.data, 10**9, recipe.stage1.val_samples, recipe.seed)
    student, _ = timed(timing_key, lambda: run_stage2(student, c, x, y, os.path.join(out_dir, "stage2"),
                                                      recipe.seed, progress, grafts=grafts))
    return student
