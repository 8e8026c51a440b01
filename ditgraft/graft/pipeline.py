"""``ditgraft graft RECIPE``: stage 1 -> stage 2 -> sample -> eval -> report, in one run directory.

Run directory layout (every stage reads and writes here; a stage whose output is complete is skipped, and a stage
that was interrupted resumes from its last checkpoint, so re-running the command finishes the same run):
    recipe.yaml            the validated recipe            plan.json        resolved layers (and probe losses)
    stage1/                activation distillation (loop/, best/, summary.json)
    stage2/                finetuning (loop/), student.safetensors (grafted checkpoint, recipe embedded)
    baseline_random/       the same stage 2 budget from randomly initialised operators (when asked)
    stage1_units/          stage 1 of the parallel units (with a restructure section)
    baseline_depth_pruned/, baseline_from_scratch/   restructure baselines at the same total FLOPs (when asked)
    eval/                  samples, grids and metrics per model
    report.md, report.json, *.png

This module holds the run context (``Run``), the stages (``PIPELINE``) and ``run_graft``; the teacher
(graft/teacher.py), the data split (graft/data_split.py), layer planning (graft/plan.py), FLOP accounting
(graft/accounting.py) and what the directory records (graft/rundir.py) live in their own modules. A stage asked for
whose inputs are neither on disk nor written earlier in the same call is refused before any stage runs.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ditgraft.distributed import on_main, rank_world
from ditgraft.eval import evaluate as evaluation
from ditgraft.eval.decision import Targets, decision_eval, format_decision
from ditgraft.eval.evaluate import Protocol, eval_hooks, sample_and_evaluate
from ditgraft.diffusion.samplers import check_sampler
from ditgraft.eval.sampling import decoding
from ditgraft.graft.accounting import compute_accounting
from ditgraft.graft.data_split import check_data, eval_captions, load_split, stage1_split
from ditgraft.graft.plan import plan_grafts, stage2_memory_line
from ditgraft.graft.report import build_report, write_report
from ditgraft.layers import selector_needs
from ditgraft.graft.restructure import BASELINES, baseline_model, depth_pruned_spec
from ditgraft.graft.restructure_train import (baseline_stage2, latency_table, recipe_spec, restructure_student,
                                              units_dir)
from ditgraft.graft.rundir import evaluations_on_disk, record_recipe, start_recording
from ditgraft.graft.stage1 import load_best_operators, pair_targets, run_stage1
from ditgraft.graft.stage2 import run_stage2
from ditgraft.graft.surgery import ResolvedGraft, check_operators, graft_model, load_grafted, save_grafted
from ditgraft.graft.teacher import load_teacher, teacher_metrics, testbed_card_metrics
from ditgraft.models.families import family_of
from ditgraft.recipe import Recipe
from ditgraft.utils import (InputError, atomic_write_json, atomic_write_text, ensure_writable, read_json,
                            resolve_device, run_lock)

STAGES = ("stage1", "stage2", "eval", "report")






















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


def _none(r: Run) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class Stage:
    """One step of ``run_graft``. It runs when its name is among the requested stages (``--stages``), the recipe
    wants it and it is not complete. ``needs`` and ``writes`` are run-directory files (relative paths): what it reads
    from earlier stages, and what it leaves; it is complete when every file it writes exists (a stage that writes
    nothing, as eval and report, runs every time it is asked for)."""
    name: str  # one of STAGES
    wanted: Callable[[Run], bool]  # by the recipe (False: not asked for, which is not the same as complete)
    run: Callable[[Run], None]
    needs: Callable[[Run], tuple[str, ...]] = _none
    writes: Callable[[Run], tuple[str, ...]] = _none

    def complete(self, r: Run) -> bool:
        outputs = self.writes(r)
        return bool(outputs) and all(os.path.isfile(r.path(f)) and os.path.getsize(r.path(f)) > 0 for f in outputs)


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
        r.log(stage2_memory_line(r.recipe, r.teacher, r.grafts, rank_world()[1], r.device))
    stage1_dir = r.path("stage1") if _stage1_wanted(r) else None
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
        x, y, _, _ = load_split(cfg.data, cfg.samples, r.recipe.stage1.val_samples, r.recipe.seed)
        model, _ = r.timed(f"baseline_{name}", lambda: run_stage2(
            model, cfg, x, y, r.path(f"baseline_{name}", "stage2"), r.recipe.seed, r.progress, teacher=r.teacher))
        extra = {"baseline": name}
        if name == "depth_pruned":
            extra["restructure"] = depth_pruned_spec(r.spec)
        r.save_student(r.path(f"baseline_{name}", "student.safetensors"), model, [], extra=extra)
    return run


def _restructure_baseline_wanted(name: str) -> Callable[[Run], bool]:
    return lambda r: r.spec is not None and name in r.recipe.eval.baselines


def _evaluate(r: Run) -> None:
    out, ev = r.path("eval"), r.recipe.eval
    hooks = eval_hooks(r.teacher, vae=ev.vae, features=ev.features, reference=ev.reference,
                       inception_weights=ev.inception_weights, device=r.device, captions=eval_captions(r.recipe),
                       compile=ev.compile)
    student, _ = load_grafted(r.path("student.safetensors"), r.device)
    r.evals["grafted"] = r.timed("eval", lambda: sample_and_evaluate(student, out, r.protocol, r.device, r.progress,
                                                                      tag="grafted", **hooks))
    if "teacher" in ev.baselines:
        r.evals["teacher"] = teacher_metrics(r.teacher, r.recipe.teacher.source, r.protocol, r.run_dir, r.device,
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
        evals = evaluations_on_disk(r.run_dir, r.protocol)
        card = testbed_card_metrics(r.recipe.teacher.source, r.protocol)
        if "teacher" in r.recipe.eval.baselines and card is not None:
            evals["teacher"] = card
    s1_path = r.path("stage1", "summary.json")
    stage1 = read_json(s1_path) if os.path.exists(s1_path) else None
    r.report = build_report(r.recipe, r.grafts, stage1, evals, r.accounting, r.timings,
                            restructure=_restructure_numbers(r))
    on_main(lambda: write_report(r.run_dir, r.report))


STUDENT = "student.safetensors"
RANDOM_INIT = os.path.join("baseline_random", STUDENT)


def _stage1_wanted(r: Run) -> bool:
    return r.recipe.stage1.enabled and bool(r.grafts)


def _units_summary(r: Run) -> tuple[str, ...]:
    return () if r.units_dir is None else (os.path.join(os.path.relpath(r.units_dir, r.run_dir), "summary.json"),)


def _stage2_needs(r: Run) -> tuple[str, ...]:
    """stage 1's summary (its best operators sit beside it) and the units' stage 1, where the recipe has them."""
    return (os.path.join("stage1", "summary.json"),) * _stage1_wanted(r) + _units_summary(r)


def _eval_needs(r: Run) -> tuple[str, ...]:
    return (STUDENT,) + (RANDOM_INIT,) * ("random_init" in r.recipe.eval.baselines)


def _baseline_student(name: str) -> Callable[[Run], tuple[str, ...]]:
    return lambda r: (os.path.join(f"baseline_{name}", STUDENT),)


PIPELINE = (
    Stage("stage1", lambda r: r.units_dir is not None, _stage1_units, writes=_units_summary),
    Stage("stage1", _stage1_wanted, _stage1, writes=lambda r: (os.path.join("stage1", "summary.json"),)),
    Stage("stage2", lambda r: True, _stage2, needs=_stage2_needs, writes=lambda r: (STUDENT,)),
    Stage("stage2", lambda r: "random_init" in r.recipe.eval.baselines, _random_init_baseline,
          writes=lambda r: (RANDOM_INIT,)),
    *(Stage("stage2", _restructure_baseline_wanted(name), _restructure_baseline(name), writes=_baseline_student(name))
      for name in BASELINES),
    Stage("eval", lambda r: r.recipe.eval.enabled, _evaluate, needs=_eval_needs),
    Stage("report", lambda r: True, _report),
)


def stages_to_run(r: Run) -> list[Stage]:
    """The stages of ``PIPELINE`` this call runs: asked for, wanted by the recipe and not complete. Refuses (one
    line) a stage whose inputs neither exist nor come from a stage that runs before it in this call."""
    todo, coming = [], set()
    for stage in PIPELINE:
        if stage.name not in r.stages or not stage.wanted(r) or stage.complete(r):
            continue
        missing = [f for f in stage.needs(r) if f not in coming and not os.path.isfile(r.path(f))]
        if missing:
            makers = sorted({s.name for s in PIPELINE for f in missing if f in s.writes(r)})
            raise InputError(f"stages={','.join(r.stages)}: {stage.name} needs {', '.join(missing)}, not in "
                             f"{r.run_dir}; run {' and '.join(makers) or 'the earlier stages'} first (e.g. --stages "
                             f"{','.join(dict.fromkeys([*makers, stage.name]))})")
        todo.append(stage)
        coming.update(stage.writes(r))
    return todo


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
    check_sampler(teacher, e.sampler, "eval.sampler")
    if e.compile:
        family.require("compile", "eval.compile")
    if family.conditioning == "caption":
        if e.features == "testbed":
            raise ValueError(f"eval.features='testbed' does not apply to the {family.name} family (the testbed "
                             "classifier scores class-conditional digits); use eval.features: inception")
        if eval_captions(recipe) is None:
            raise ValueError(f"eval.captions is missing: the {family.name} family samples from captions and the "
                             "run's data is no caption .npz; name one")


def _run_graft(recipe: Recipe, run_dir: str, stages, dev, progress: bool, log) -> dict:
    recorded = start_recording(recipe, run_dir)
    torch.manual_seed(recipe.seed)
    teacher, teacher_meta = load_teacher(recipe, dev)
    check_supported(recipe, teacher)
    if not recorded:
        check_data(recipe, teacher)
        recipe_spec(recipe, teacher)  # a restructure that does not fit the teacher fails before recording
    grafts = plan_grafts(recipe, teacher, run_dir, dev, log)
    if not recorded:
        check_operators(teacher, grafts)  # a bad operator option fails before the directory is this recipe's
    timings_path = os.path.join(run_dir, "timings.json")
    timings = read_json(timings_path) if os.path.exists(timings_path) else {}
    run = Run(recipe, run_dir, tuple(stages), dev, progress, log, teacher, teacher_meta, grafts, timings)
    todo = on_main(lambda: _stages_or_refusal(run))  # rank 0's view of the directory, refusals on every rank
    if isinstance(todo, str):
        raise InputError(todo)
    if not recorded:
        on_main(lambda: record_recipe(recipe, run_dir))
    log("grafts: " + ", ".join(f"{g.slot}[{g.layer}]->{g.operator}" for g in grafts))
    if run.spec is not None:
        log(f"restructure: parallel pairs {run.spec['parallel_pairs']}, drop {run.spec['drop']}")
    for i in todo:
        PIPELINE[i].run(run)
    return run.report


def _stages_or_refusal(r: Run) -> list[int] | str:
    """Indices into ``PIPELINE`` of ``stages_to_run``, or its refusal's message."""
    try:
        todo = stages_to_run(r)
    except InputError as err:
        return str(err)
    return [i for i, s in enumerate(PIPELINE) if any(s is t for t in todo)]


def _decision(recipe: Recipe, run_dir: str, protocol: Protocol, student, teacher, dev, progress, log,
              hooks: dict | None = None) -> None:
    """The decision protocol over ``recipe.eval.seeds``: student vs teacher (with the recipe's targets) and, when
    asked, the random-init baseline vs the student and each restructure baseline vs the teacher and vs the student;
    results in eval/*_decision.json and eval/decision.txt.
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
    for name in BASELINES:  # restructuring's baselines at equal FLOPs: each against the teacher, and paired with
        path = os.path.join(run_dir, f"baseline_{name}", "student.safetensors")  # the restructured student
        if name in e.baselines and os.path.exists(path):
            base, _ = load_grafted(path, dev)
            res = decision_eval(base, out, against=teacher, tag=name, against_tag="teacher",
                                targets=Targets(e.target_ratio, e.target_gap), **kw)
            text.append(format_decision(res, name, "teacher"))
            res = decision_eval(student, out, against=base, tag="grafted", against_tag=name,
                                name=f"grafted_vs_{name}", targets=Targets(1.0, 0.0), **kw)
            text.append(format_decision(res, "grafted", name)
                        + f"\n  (the restructured student better than {name}, beyond doubt: both verdicts 'met')")
    on_main(lambda: atomic_write_text(os.path.join(out, "decision.txt"), "\n".join(text) + "\n"))
    log("\n".join(text))




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
    x, y, _, _ = load_split(c.data, c.samples, recipe.stage1.val_samples, recipe.seed)
    student, _ = r.timed(timing_key, lambda: run_stage2(student, c, x, y, os.path.join(out_dir, "stage2"),
                                                        recipe.seed, r.progress, teacher=r.teacher,
                                                        grafts=r.grafts))
    return student
