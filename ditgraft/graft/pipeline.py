"""``ditgraft graft RECIPE``: stage 1 -> stage 2 -> sample -> eval -> report, in one run directory.

Run directory layout (every stage reads and writes here; a stage whose output is complete is skipped, and a stage
that was interrupted resumes from its last checkpoint, so re-running the command finishes the same run):
    recipe.yaml            the validated recipe            plan.json        resolved layers, FLOP accounting
    stage1/                activation distillation (loop/, best/, summary.json)
    stage2/                finetuning (loop/), student.safetensors (grafted checkpoint, recipe embedded)
    baseline_random/       the same stage 2 budget from randomly initialised operators (when asked)
    stage1_units/          stage 1 of the parallel units (with a restructure section)
    baseline_depth_pruned/, baseline_from_scratch/   restructure baselines at the same total FLOPs (when asked)
    eval/                  samples, grids and metrics per model
    report.md, report.json, *.png
"""
from __future__ import annotations

import functools
import glob
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
import yaml

from ditgraft.analysis.locality import analyze_model, write_analysis_report
from ditgraft.data.captions import is_caption_file
from ditgraft.data.images import check_data_fits, load_dataset
from ditgraft.distributed import on_main, rank_world
from ditgraft.eval import evaluate as evaluation
from ditgraft.eval.decision import Targets, decision_eval, format_decision
from ditgraft.eval.evaluate import Protocol, eval_hooks, sample_and_evaluate
from ditgraft.eval.sampling import decoding
from ditgraft.graft.accounting import compute_accounting
from ditgraft.graft.layers import selector_needs
from ditgraft.graft.report import build_report, write_report
from ditgraft.graft.restructure import BASELINES, baseline_model, depth_pruned_spec
from ditgraft.graft.restructure_train import (baseline_stage2, latency_table, recipe_spec, restructure_student,
                                              units_dir)
from ditgraft.graft.stage1 import load_best_operators, pair_targets, run_stage1
from ditgraft.graft.stage2 import run_stage2
from ditgraft.graft.surgery import (ResolvedGraft, check_operators, graft_model, load_grafted, resolve_grafts,
                                   save_grafted)
from ditgraft.models.adapters import model_dims
from ditgraft.models.checkpoints import ASSETS, load_dit
from ditgraft.models.families import DIFFUSERS_PREFIX, family_of, load_diffusers
from ditgraft.models.families.base import cond_rows
from ditgraft.recipe import Data, Recipe, recipe_diff
from ditgraft.train.memory import format_stage2_memory
from ditgraft.utils import (atomic_write_json, atomic_write_text, ensure_writable, read_json, resolve_device,
                            run_lock)

STAGES = ("stage1", "stage2", "eval", "report")


def load_teacher(recipe: Recipe, device) -> tuple[torch.nn.Module, dict]:
    t = recipe.teacher
    if t.source.startswith(DIFFUSERS_PREFIX):
        return load_diffusers(t.source[len(DIFFUSERS_PREFIX):]).to(device).eval(), {}
    model, meta = load_dit(t.source, model=t.model, image_size=t.image_size)
    return model.to(device).eval(), meta


def load_data(data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    """All samples (x, y) of a recipe's ``data``, its options passed to the loader."""
    if data.source == "mnist5k":
        return load_dataset(data.text())
    return load_dataset(data.path, image_size=data.image_size, channels=data.channels, latent_scale=data.scale,
                        labels_path=data.labels)


def load_split(data: Data | str, n_train: int, n_val: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(x, y, x_val, y_val): the testbed uses its fixed split; other data holds out its last n_val rows.
    Subsets are seeded random draws, never prefixes (mnist5k is stored sorted by class). y is labels, or a tuple
    (caption embeddings, masks) for caption data."""
    data = Data.model_validate(data)
    if data.source == "mnist5k" and data.split is None:
        (x, y), (xv, yv) = load_dataset("mnist5k:train"), load_dataset("mnist5k:val")
    else:
        x_all, y_all = load_data(data)
        if len(x_all) <= n_val:
            raise ValueError(f"data={data.text() or data.path!r} has {len(x_all)} samples; need more than "
                             f"val_samples={n_val}")
        x, y = x_all[:-n_val], cond_rows(y_all, slice(None, -n_val))
        xv, yv = x_all[-n_val:], cond_rows(y_all, slice(len(x_all) - n_val, None))
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(x), generator=g)[:n_train].sort().values
    keep_val = torch.randperm(len(xv), generator=g)[:n_val].sort().values
    return x[keep], cond_rows(y, keep), xv[keep_val], cond_rows(yv, keep_val)


def stage1_split(cfg, seed: int, log=None) -> tuple[torch.Tensor, ...]:
    """Stage 1's (x, y, x_val, y_val): ``cfg.samples`` training rows. When the data holds fewer images, every image
    appears more than once (the draw cycles through them), and each copy gets its own timestep and noise in stage
    1, so the paper's 8k noised samples can come from a smaller set of images."""
    x, y, xv, yv = load_split(cfg.data, cfg.samples, cfg.val_samples, seed)
    if cfg.samples > len(x):
        if log is not None:
            log(f"stage 1: {cfg.samples} noised samples from {len(x)} images ({cfg.samples / len(x):.2f} noised "
                "copies of each, each copy with its own timestep and noise)")
        rows = torch.arange(cfg.samples) % len(x)
        x, y = x[rows], cond_rows(y, rows)
    return x, y, xv, yv


def _needs(recipe: Recipe, need: str) -> bool:
    """Whether some graft's layer selector needs ``need`` (``ditgraft.graft.layers.NEEDS``) prepared."""
    return any(need in selector_needs(g.layers) for g in recipe.grafts)


def _analysis(teacher, run_dir: str, device, log, captions=None) -> dict:
    path = os.path.join(run_dir, "analysis", "analysis.json")

    def run() -> dict:  # rank 0's analysis, shared with the other ranks
        if os.path.exists(path):
            return read_json(path)
        log("analysis: attention locality of the teacher (for the layer selectors)")
        result = analyze_model(teacher, num_samples=50, steps=10, device=device, captions=captions)
        write_analysis_report(result, os.path.join(run_dir, "analysis"))
        return result

    return on_main(run)


def _probe_losses(recipe: Recipe, teacher, run_dir: str, device, log) -> dict[int, dict[int, float]]:
    """Selectors that need probe losses: distil the candidate operator into every layer briefly; relative val MSE
    per layer."""
    out = {}
    depth = model_dims(teacher).depth
    for gi, g in enumerate(recipe.grafts):
        if "probe_losses" not in selector_needs(g.layers):
            continue
        probe = [ResolvedGraft(g.slot, i, g.operator, dict(g.options), g.loss, g.huber_delta, g.init)
                 for i in range(depth)]
        cfg = recipe.stage1.model_copy(update={"steps": g.layers.probe_steps,
                                               "eval_every": g.layers.probe_steps})
        x, y, xv, yv = stage1_split(cfg, recipe.seed)
        log(f"{g.layers.select} selector: probing {g.operator} in all {depth} {g.slot} slots for {cfg.steps} steps")
        res = run_stage1(teacher, probe, cfg, x, y, xv, yv, os.path.join(run_dir, f"probe{gi}"), recipe.seed,
                         device, log=log)
        out[gi] = {s["layer"]: s["val_rel_mse"] for s in res["operators"].values()}
    return out


def plan_grafts(recipe: Recipe, teacher, run_dir: str, device, log=print) -> list[ResolvedGraft]:
    path = os.path.join(run_dir, "plan.json")
    if on_main(lambda: os.path.exists(path)):
        return [ResolvedGraft(**g) for g in read_json(path)["grafts"]]
    analysis = (_analysis(teacher, run_dir, device, log, eval_captions(recipe)) if _needs(recipe, "analysis")
                else None)
    probes = _probe_losses(recipe, teacher, run_dir, device, log) if _needs(recipe, "probe_losses") else None
    grafts = resolve_grafts(recipe, model_dims(teacher).depth, analysis=analysis, probe_losses=probes)
    on_main(lambda: atomic_write_json(path, {"grafts": [asdict(g) for g in grafts], "probe_losses": probes}))
    return grafts


def _testbed_card_metrics(source: str, protocol: Protocol) -> dict | None:
    """The shipped testbed teacher's metrics under ``protocol``, from its model card (None for another teacher or
    a protocol the card did not measure)."""
    if source != "testbed":
        return None

    card = os.path.join(ASSETS, "testbed", "teacher_metrics.json")
    if os.path.exists(card):
        for row in read_json(card).get("evaluations", []):
            if row.get("protocol") == asdict(protocol):
                return row
    return None


def _teacher_metrics(teacher, source: str, protocol: Protocol, run_dir: str, device, progress: bool,
                     **hooks) -> dict:
    """The teacher under the same protocol; the shipped testbed teacher's numbers are read from its card."""
    row = _testbed_card_metrics(source, protocol)
    if row is not None:
        return row
    return sample_and_evaluate(teacher, os.path.join(run_dir, "eval"), protocol, device, progress, tag="teacher",
                               **hooks)


@dataclass
class Run:
    """What the stages of one run share: the recipe, its run directory, the teacher and the resolved grafts."""
    recipe: Recipe
    run_dir: str
    stages: tuple[str, ...]
    device: torch.device
    progress: bool
    log: Callable
    teacher: torch.nn.Module
    teacher_meta: dict
    grafts: list[ResolvedGraft]
    timings: dict
    evals: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        return os.path.join(self.run_dir, *parts)

    def timed(self, name: str, fn: Callable):
        """``fn()``, its wall time added to timings.json under ``name``."""
        t0 = time.time()
        out = fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.time() - t0
        on_main(lambda: atomic_write_json(self.path("timings.json"), self.timings))
        return out

    @functools.cached_property
    def spec(self) -> dict | None:
        """The recipe's resolved restructure (block indices of the teacher), None without one."""
        return recipe_spec(self.recipe, self.teacher)

    @functools.cached_property
    def units_dir(self) -> str | None:
        """Where stage 1 of the parallel units leaves its best weights (None when there is no such stage 1)."""
        return units_dir(self.recipe, self.spec, self.run_dir)

    @functools.cached_property
    def accounting(self) -> dict:  # one surgery + FLOP count, shared by the baselines and the report
        student = graft_model(self.teacher, self.grafts, self.recipe.seed)
        return compute_accounting(self.teacher, self.teacher_meta, self.grafts, self.recipe, student, self.spec)

    def save_student(self, path: str, model, grafts, extra: dict | None = None) -> None:
        """A self-describing checkpoint (recipe, teacher, restructure embedded), written by rank 0."""
        if self.spec is not None and extra is None:
            extra = {"restructure": self.spec}
        on_main(lambda: save_grafted(path, model, grafts, self.recipe.to_dict(), self.teacher_meta, extra=extra))

    @property
    def protocol(self) -> Protocol:
        e = self.recipe.eval
        return Protocol(num=e.num, sampler=e.sampler, steps=e.steps, cfg_scale=e.cfg_scale, seed=e.seed,
                        batch_size=e.batch_size, clip_denoised=decoding(self.teacher, need_decoder=False)[0])


@dataclass(frozen=True)
class Stage:
    """One step of ``run_graft``: it runs when its name is among the requested stages and ``done`` is False."""
    name: str  # one of STAGES
    done: Callable[[Run], bool]  # complete on disk, or not asked for by the recipe
    run: Callable[[Run], None]


def _stage1(r: Run) -> None:
    c = r.recipe.stage1
    x, y, xv, yv = stage1_split(c, r.recipe.seed, r.log)
    r.timed("stage1", lambda: run_stage1(r.teacher, r.grafts, c, x, y, xv, yv, r.path("stage1"), r.recipe.seed,
                                         r.device, progress=r.progress, log=r.log))


def _stage1_units(r: Run) -> None:
    c = r.recipe.stage1
    x, y, xv, yv = stage1_split(c, r.recipe.seed, r.log)
    targets = pair_targets(r.spec, r.recipe.restructure)
    r.timed("stage1_units", lambda: run_stage1(r.teacher, targets, c, x, y, xv, yv, r.units_dir, r.recipe.seed,
                                               r.device, progress=r.progress, log=r.log, desc="stage1-units"))


def _stage2(r: Run) -> None:
    if r.recipe.stage2.enabled:
        r.log(format_stage2_memory(r.teacher, r.recipe.stage2, rank_world()[1], r.device))
    stage1_dir = r.path("stage1") if r.recipe.stage1.enabled and r.grafts else None
    student = _train_student(r, r.run_dir, stage1_dir, "stage2", units=r.units_dir)
    r.save_student(r.path("student.safetensors"), student, r.grafts)


def _random_init_baseline(r: Run) -> None:
    """The same operators from random initialisation (also where the recipe starts them from the teacher's
    weights), no stage 1, stage 2 with the grafted run's total FLOPs."""
    steps = r.accounting["random_init_stage2_steps"]
    r.log(f"random-init baseline: {steps} stage-2 steps (the grafted run's stage 1 + stage 2 FLOPs)")
    grafts = [replace(g, init="random") for g in r.grafts]
    student = _train_student(r, r.path("baseline_random"), None, "baseline_random", steps=steps, grafts=grafts)
    r.save_student(r.path("baseline_random", "student.safetensors"), student, grafts)


def _restructure_baseline(name: str) -> Callable[[Run], None]:
    """depth_pruned / from_scratch: stage 2 alone with the restructured run's total training FLOPs."""
    def run(r: Run) -> None:
        cfg = baseline_stage2(r.recipe, name, r.accounting[f"{name}_stage2_steps"])
        r.log(f"{name} baseline: {cfg.steps} stage-2 steps at lr {cfg.lr} (the same total FLOPs)")
        model = baseline_model(name, r.teacher, r.spec, r.recipe.seed)
        x, y, _, _ = load_split(cfg.data, 10**9, r.recipe.stage1.val_samples, r.recipe.seed)
        model, _ = r.timed(f"baseline_{name}", lambda: run_stage2(
            model, cfg, x, y, r.path(f"baseline_{name}", "stage2"), r.recipe.seed, r.progress, teacher=r.teacher))
        extra = {"baseline": name}
        if name == "depth_pruned":
            extra["restructure"] = depth_pruned_spec(r.spec)
        r.save_student(r.path(f"baseline_{name}", "student.safetensors"), model, [], extra=extra)
    return run


def _restructure_baseline_done(name: str) -> Callable[[Run], bool]:
    return lambda r: (r.spec is None or name not in r.recipe.eval.baselines
                      or os.path.exists(r.path(f"baseline_{name}", "student.safetensors")))


def _evaluate(r: Run) -> None:
    out, ev = r.path("eval"), r.recipe.eval
    hooks = eval_hooks(r.teacher, vae=ev.vae, features=ev.features, reference=ev.reference,
                       inception_weights=ev.inception_weights, device=r.device, captions=eval_captions(r.recipe))
    student, _ = load_grafted(r.path("student.safetensors"), r.device)
    r.evals["grafted"] = r.timed("eval", lambda: sample_and_evaluate(student, out, r.protocol, r.device, r.progress,
                                                                      tag="grafted", **hooks))
    if "teacher" in ev.baselines:
        r.evals["teacher"] = _teacher_metrics(r.teacher, r.recipe.teacher.source, r.protocol, r.run_dir, r.device,
                                              r.progress, **hooks)
    if "random_init" in ev.baselines:
        base, _ = load_grafted(r.path("baseline_random", "student.safetensors"), r.device)
        r.evals["random_init"] = sample_and_evaluate(base, out, r.protocol, r.device, r.progress, tag="random_init",
                                                     **hooks)
    if r.spec is not None:
        _evaluate_restructured(r, student, hooks)
    if ev.protocol == "decision":
        r.timed("eval_decision", lambda: _decision(r.recipe, r.run_dir, r.protocol, student, r.teacher, r.device,
                                                   r.progress, r.log, hooks))


def _evaluate_restructured(r: Run, student, hooks: dict) -> None:
    """The restructure baselines' quality under the run's protocol, and depth / params / FLOPs / sampling latency
    of every model measured side by side in this process (eval/latency.json)."""
    models = {"teacher": r.teacher, "grafted": student}
    for name in BASELINES:
        path = r.path(f"baseline_{name}", "student.safetensors")
        if name in r.recipe.eval.baselines and os.path.exists(path):
            models[name], _ = load_grafted(path, r.device)
            r.evals[name] = sample_and_evaluate(models[name], r.path("eval"), r.protocol, r.device, r.progress,
                                                tag=name, **hooks)
    table = latency_table(models, r.protocol, r.device)
    on_main(lambda: atomic_write_json(r.path("eval", "latency.json"), table))


def _restructure_numbers(r: Run) -> dict | None:
    """The report's restructure inputs on disk: stage 1 of the units and the latency table."""
    if r.spec is None:
        return None
    units, latency = r.path("stage1_units", "summary.json"), r.path("eval", "latency.json")
    return {"spec": r.spec, "stage1_units": read_json(units)["units"] if os.path.exists(units) else None,
            "latency": read_json(latency) if os.path.exists(latency) else None}


def _report(r: Run) -> None:
    evals = r.evals
    if "eval" not in r.stages:  # e.g. the report alone: use the evaluations already on disk
        evals = _evaluations_on_disk(r.run_dir, r.protocol)
        card = _testbed_card_metrics(r.recipe.teacher.source, r.protocol)
        if "teacher" in r.recipe.eval.baselines and card is not None:
            evals["teacher"] = card
    s1_path = r.path("stage1", "summary.json")
    stage1 = read_json(s1_path) if os.path.exists(s1_path) else None
    r.report = build_report(r.recipe, r.grafts, stage1, evals, r.accounting, r.timings,
                            restructure=_restructure_numbers(r))
    on_main(lambda: write_report(r.run_dir, r.report))


PIPELINE = (
    Stage("stage1", lambda r: r.units_dir is None or os.path.exists(r.path("stage1_units", "summary.json")),
          _stage1_units),
    Stage("stage1", lambda r: not r.recipe.stage1.enabled or not r.grafts
          or os.path.exists(r.path("stage1", "summary.json")), _stage1),
    Stage("stage2", lambda r: os.path.exists(r.path("student.safetensors")), _stage2),
    Stage("stage2", lambda r: "random_init" not in r.recipe.eval.baselines
          or os.path.exists(r.path("baseline_random", "student.safetensors")), _random_init_baseline),
    *(Stage("stage2", _restructure_baseline_done(name), _restructure_baseline(name)) for name in BASELINES),
    Stage("eval", lambda r: not r.recipe.eval.enabled or not os.path.exists(r.path("student.safetensors")),
          _evaluate),
    Stage("report", lambda r: False, _report),
)


def run_graft(recipe: Recipe, run_dir: str, stages=STAGES, device: str | None = None, progress: bool = True,
              log=print) -> dict:
    """Run the recipe's stages (``PIPELINE``, those named in ``stages``) in ``run_dir``, locked for the call;
    returns the report dict.

    Under torchrun every rank runs this: the training stages are data parallel, sampling is shared out, and rank 0
    alone writes files (and holds the lock) while the others wait (``on_main``); whether a stage is complete is
    rank 0's view of the run directory, so every rank skips or resumes the same stages."""
    for s in stages:
        if s not in STAGES:
            raise ValueError(f"stage={s!r} is not allowed; use some of {STAGES}")
    dev = resolve_device(device or recipe.device)
    ensure_writable(run_dir, "run directory")
    with run_lock(run_dir, f"ditgraft graft {recipe.name}"):
        return _run_graft(recipe, run_dir, stages, dev, progress, log)


def _yaml_file(path: str):
    with open(path) as f:
        return yaml.safe_load(f)


def _start_recording(recipe: Recipe, run_dir: str) -> bool:
    """True when ``run_dir`` already records this recipe; refuses a different one. An unrecorded directory (a
    failed or killed first attempt) keeps its planning results only if they were made for this same recipe."""
    recipe_path = os.path.join(run_dir, "recipe.yaml")
    if os.path.exists(recipe_path):
        recorded = _yaml_file(recipe_path)
        if recorded != recipe.to_dict():
            fields = recipe_diff(recorded, recipe.to_dict())
            raise ValueError(f"{run_dir} holds a run of a different recipe ({recipe_path}; fields that differ: "
                             f"{', '.join(fields[:8])}{' ...' if len(fields) > 8 else ''}); use another --run-dir")
        return True
    on_main(lambda: _forget_other_attempt(recipe, run_dir))
    return False


def _forget_other_attempt(recipe: Recipe, run_dir: str) -> None:
    """Drop the planning results of an unrecorded attempt with another recipe; note this recipe as pending."""
    pending = os.path.join(run_dir, "recipe.pending.yaml")
    if os.path.exists(pending) and _yaml_file(pending) != recipe.to_dict():
        for stale in [os.path.join(run_dir, "plan.json"), os.path.join(run_dir, "analysis"),
                      *glob.glob(os.path.join(run_dir, "probe*"))]:
            if os.path.isdir(stale):
                shutil.rmtree(stale)
            elif os.path.exists(stale):
                os.remove(stale)
    atomic_write_text(pending, yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def _record_recipe(recipe: Recipe, run_dir: str) -> None:
    """Layers, teacher and data resolved: only now is the run directory this recipe's."""
    atomic_write_text(os.path.join(run_dir, "recipe.yaml"), yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    os.remove(os.path.join(run_dir, "recipe.pending.yaml"))


def _check_data(recipe: Recipe, teacher) -> None:
    """Every dataset the recipe trains on loads and fits the teacher (channels, size, labels)."""
    for name, c, n_train in (("stage1", recipe.stage1, recipe.stage1.samples), ("stage2", recipe.stage2, 10**9)):
        if c.enabled:
            x, y, xv, yv = load_split(c.data, n_train, recipe.stage1.val_samples, recipe.seed)
            check_data_fits(x, y, teacher, f"{name}.data = {c.data}")
            check_data_fits(xv, yv, teacher, f"{name}.data = {c.data} (validation rows)")


def eval_captions(recipe: Recipe) -> str | None:
    """The caption set a caption-conditioned teacher is evaluated on: ``eval.captions``, else the caption .npz the
    run trains on (stage 2's data, else stage 1's)."""
    if recipe.eval.captions is not None:
        return recipe.eval.captions
    for c in (recipe.stage2, recipe.stage1):
        path = Data.model_validate(c.data).path
        if path is not None and is_caption_file(path):
            return path
    return None


def check_supported(recipe: Recipe, teacher) -> None:
    """Refuse, before any work and in one line naming the family and the feature, what the recipe asks of a
    teacher whose family does not support it."""
    family = family_of(teacher)
    for g in recipe.grafts:
        if "analysis" in selector_needs(g.layers):
            family.require("analysis", f"grafts layers: {g.layers.select}")
    if recipe.restructure:
        family.require("restructure", "recipe restructure")
    e = recipe.eval
    if not e.enabled:
        return
    family.require("eval", "eval.enabled")
    if family.conditioning == "caption":
        if e.features == "testbed":
            raise ValueError(f"eval.features='testbed' does not apply to the {family.name} family (the testbed "
                             "classifier scores class-conditional digits); use eval.features: inception")
        if eval_captions(recipe) is None:
            raise ValueError(f"eval.captions is missing: the {family.name} family samples from captions and the "
                             "run's data is no caption .npz; name one")


def _run_graft(recipe: Recipe, run_dir: str, stages, dev, progress: bool, log) -> dict:
    recorded = _start_recording(recipe, run_dir)
    torch.manual_seed(recipe.seed)
    teacher, teacher_meta = load_teacher(recipe, dev)
    check_supported(recipe, teacher)
    if not recorded:
        _check_data(recipe, teacher)
        recipe_spec(recipe, teacher)  # a restructure that does not fit the teacher fails before recording
    grafts = plan_grafts(recipe, teacher, run_dir, dev, log)
    if not recorded:
        check_operators(teacher, grafts)  # a bad operator option fails before the directory is this recipe's
        on_main(lambda: _record_recipe(recipe, run_dir))
    log("grafts: " + ", ".join(f"{g.slot}[{g.layer}]->{g.operator}" for g in grafts))
    timings_path = os.path.join(run_dir, "timings.json")
    timings = read_json(timings_path) if os.path.exists(timings_path) else {}
    run = Run(recipe, run_dir, tuple(stages), dev, progress, log, teacher, teacher_meta, grafts, timings)
    if run.spec is not None:
        log(f"restructure: parallel pairs {run.spec['parallel_pairs']}, drop {run.spec['drop']}")
    for stage in PIPELINE:
        if stage.name in run.stages and not on_main(lambda: stage.done(run)):
            stage.run(run)
    return run.report


def _decision(recipe: Recipe, run_dir: str, protocol: Protocol, student, teacher, dev, progress, log,
              hooks: dict | None = None) -> None:
    """The decision protocol over ``recipe.eval.seeds``: student vs teacher (with the recipe's targets) and, when
    asked, the random-init baseline vs the student; results in eval/*_decision.json and eval/decision.txt.
    ``hooks`` (``eval_hooks``) sample and score as the quick protocol did; inception features are compared against
    ``eval.reference``."""
    e, out = recipe.eval, os.path.join(run_dir, "eval")
    kw = dict(seeds=e.seeds, protocol=protocol, against_dir=out, resamples=e.resamples, device=dev,
              progress=progress, hooks=hooks)
    if e.features == "inception":
        kw.update(net=evaluation.inception_network(e.inception_weights, dev), reference=e.reference)
    res = decision_eval(student, out, against=teacher, tag="grafted", against_tag="teacher",
                        targets=Targets(e.target_ratio, e.target_gap), **kw)
    text = [format_decision(res, "grafted", "teacher")]
    if "random_init" in e.baselines:
        base, _ = load_grafted(os.path.join(run_dir, "baseline_random", "student.safetensors"), dev)
        res = decision_eval(base, out, against=student, tag="random_init", against_tag="grafted",
                            targets=Targets(1.0, 0.0), **kw)
        text.append(format_decision(res, "random_init", "grafted")
                    + "\n  (random init worse than grafting, beyond doubt: both verdicts 'missed')")
    on_main(lambda: atomic_write_text(os.path.join(out, "decision.txt"), "\n".join(text) + "\n"))
    log("\n".join(text))


def _evaluations_on_disk(run_dir: str, protocol: Protocol) -> dict:
    """The metrics files that ``sample_and_evaluate`` left in ``run_dir/eval`` for this protocol, by tag."""
    out = {}
    for tag in ("grafted", "teacher", "random_init", *BASELINES):
        path = os.path.join(run_dir, "eval", f"{tag}_metrics.json")
        row = read_json(path) if os.path.exists(path) else {}
        if row.get("protocol") == asdict(protocol):
            out[tag] = row
    return out


def _train_student(r: Run, out_dir: str, stage1_dir: str | None, timing_key: str, steps: int | None = None,
                   units: str | None = None, grafts: list[ResolvedGraft] | None = None):
    """Student = surgery (+ stage 1's best operators when ``stage1_dir``), restructured (+ stage 1's best units
    when ``units``), then stage 2 in ``out_dir/stage2`` (``steps`` overrides the recipe's stage-2 step count: the
    random-init baseline's matched budget; ``grafts`` overrides the run's grafts)."""
    recipe = r.recipe
    grafts = r.grafts if grafts is None else grafts
    student = graft_model(r.teacher, grafts, recipe.seed).to(r.device)
    if stage1_dir is not None:
        load_best_operators(student, grafts, stage1_dir)
    student = restructure_student(student, r.spec, grafts, units)
    if not recipe.stage2.enabled:
        return student.eval()
    c = recipe.stage2 if steps is None else recipe.stage2.model_copy(update={"steps": steps})
    x, y, _, _ = load_split(c.data, 10**9, recipe.stage1.val_samples, recipe.seed)
    student, _ = r.timed(timing_key, lambda: run_stage2(student, c, x, y, os.path.join(out_dir, "stage2"),
                                                        recipe.seed, r.progress, teacher=r.teacher,
                                                        grafts=r.grafts))
    return student
