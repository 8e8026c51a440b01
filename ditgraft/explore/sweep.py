"""``ditgraft sweep SWEEP.yaml``: every point of a sweep as an ordinary run directory, then one table.

Sweep directory (default ``sweeps/NAME``):
    sweep.yaml        the sweep file as given        code.json     ditgraft / torch version and git commit
    points.json       every point: name, overrides, stage-1 group, the point whose stage 1 it reuses
    recipes/NAME.yaml each point's resolved recipe (what its run directory was run with)
    points/NAME/      the point's run directory (every ditgraft command works on it), plus
                      sweep.log (its output), sweep_point.json (done / failed and why), sweep_measure.json
                      (parameters, forward FLOPs, sampling latency measured beside the teacher)
    results.md, results.csv, results.json, pareto.png, budget.png   the table and plots (``explore/table.py``)

Points run in two waves: first one point of every stage-1 group (points whose recipes differ only in stage 2 or
evaluation form a group), then the rest, each starting from a copy of its group's stage 1 (a stage-2 budget curve
trains stage 1 once). A finished point is skipped, an interrupted one resumes (the run directory's own resume), a
failed one is recorded with its error and retried on the next call; the others go on either way.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
import time

import torch
import yaml

import ditgraft
from ditgraft.explore.launchers import LAUNCHERS, Job, point_command, run_local, run_submitit
from ditgraft.explore.points import STATES, point_dir, point_state
from ditgraft.explore.spec import Point, Sweep
from ditgraft.explore.table import compare_with_baseline, measure_points, write_table
from ditgraft.utils import atomic_write_json, atomic_write_text, ensure_writable, read_json, run_lock

INTERRUPTED = (130, 143, -2, -9, -15)  # Ctrl-C, SIGTERM, SIGKILL: resumable, not failures
SHARED = ("plan.json", "analysis", "stage1", "stage1_units")  # what a point's group shares (stage 1, planning)
NOT_SHARED = ("checkpoints", "cache", "*.lock", "*.tmp")  # resume state and activation caches stay behind


def default_dir(sweep: Sweep) -> str:
    return os.path.join("sweeps", sweep.name)


def leaders(sweep: Sweep) -> dict[str, str | None]:
    """For every point, the earlier point whose stage 1 it reuses (None: it runs its own)."""
    first: dict[str, str] = {}
    out = {}
    for p in sweep.points:
        shares = p.recipe.stage1.enabled and (p.recipe.grafts or p.recipe.restructure is not None)
        key = p.stage1_key
        out[p.name] = first[key] if shares and key in first else None
        first.setdefault(key, p.name)
    return out


def code_version() -> dict:
    """The code a sweep ran with: ditgraft's version, torch's, and the git commit of ditgraft's source tree."""
    out = {"ditgraft": ditgraft.__version__, "torch": torch.__version__, "git_commit": None, "git_dirty": None}
    src = os.path.dirname(os.path.dirname(os.path.abspath(ditgraft.__file__)))
    try:
        out["git_commit"] = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True,
                                           timeout=10, check=True).stdout.strip()
        out["git_dirty"] = bool(subprocess.run(["git", "-C", src, "status", "--porcelain", "--untracked-files=no"],
                                               capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def record(sweep: Sweep, sweep_dir: str) -> None:
    """The sweep file, the resolved recipe of every point and the code version, in the sweep directory."""
    atomic_write_text(os.path.join(sweep_dir, "sweep.yaml"), yaml.safe_dump(sweep.spec, sort_keys=False))
    lead = leaders(sweep)
    atomic_write_json(os.path.join(sweep_dir, "points.json"), {
        "name": sweep.name, "description": sweep.description, "baseline": sweep.baseline, "axes": list(sweep.axes),
        "points": [{"name": p.name, "overrides": p.overrides, "stage1_group": p.stage1_key,
                    "stage1_from": lead[p.name]} for p in sweep.points]})
    for p in sweep.points:
        path = os.path.join(sweep_dir, "recipes", f"{p.name}.yaml")
        text = yaml.safe_dump(p.recipe.to_dict(), sort_keys=False)
        if not os.path.exists(path) or open(path).read() != text:
            atomic_write_text(path, text)
    atomic_write_json(os.path.join(sweep_dir, "code.json"), code_version())


def share_stage1(src: str, dst: str) -> bool:
    """Copy stage 1 and planning results of the run directory ``src`` into a fresh run directory ``dst`` (never
    into one that has started: its own files win). True when something was copied."""
    if not os.path.exists(os.path.join(src, "recipe.yaml")) or os.path.exists(os.path.join(dst, "recipe.yaml")):
        return False
    done = [n for n in ("stage1", "stage1_units") if os.path.exists(os.path.join(src, n, "summary.json"))]
    if not done:
        return False
    os.makedirs(dst, exist_ok=True)
    ignore = shutil.ignore_patterns(*NOT_SHARED)
    for name in SHARED:
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s) and not os.path.exists(d):
            shutil.copytree(s, d + ".copying", ignore=ignore, dirs_exist_ok=True)
            os.replace(d + ".copying", d)
        elif os.path.isfile(s) and not os.path.exists(d):
            shutil.copyfile(s, d + ".copying")
            os.replace(d + ".copying", d)
    timings = os.path.join(src, "timings.json")
    if os.path.exists(timings) and not os.path.exists(os.path.join(dst, "timings.json")):
        atomic_write_json(os.path.join(dst, "timings.json"),
                          {k: v for k, v in read_json(timings).items() if k in done})
    atomic_write_json(os.path.join(dst, "sweep_shared.json"), {"stage1_from": os.path.basename(src)})
    return True


def _eval_key(p: Point) -> str:
    """Points with equal keys evaluate the same teacher with the same protocol (their teacher samples agree)."""
    r = p.recipe
    return hashlib.sha256(json.dumps([r.teacher.model_dump(mode="json"), r.eval.model_dump(mode="json")],
                                     sort_keys=True).encode()).hexdigest()[:16]


def share_teacher_eval(sweep_dir: str, p: Point, finished: bool) -> None:
    """The teacher's evaluation files (``eval/teacher*``: samples and metrics, per seed) are the same for every
    point with the same teacher and protocol: a finished point leaves them in ``teacher_eval/KEY``, a point about to
    run starts from them (files it already has win)."""
    shared = os.path.join(sweep_dir, "teacher_eval", _eval_key(p))
    own = os.path.join(point_dir(sweep_dir, p.name), "eval")
    src, dst = (own, shared) if finished else (shared, own)
    if not os.path.isdir(src):
        return
    for f in sorted(os.listdir(src)):
        if f.startswith("teacher") and not f.endswith(".tmp") and not os.path.exists(os.path.join(dst, f)):
            os.makedirs(dst, exist_ok=True)
            shutil.copyfile(os.path.join(src, f), os.path.join(dst, f + ".copying"))
            os.replace(os.path.join(dst, f + ".copying"), os.path.join(dst, f))


def _error_of(log_path: str) -> str:
    """The error line of a failed point's log (its last lines when there is none)."""
    try:
        with open(log_path) as f:
            lines = [ln.rstrip() for ln in f if ln.strip()]
    except OSError:
        return "no log"
    for ln in reversed(lines):
        if ": error: " in ln or ln.startswith("ditgraft: this is a bug"):
            return ln
    return " | ".join(lines[-3:])


def run_sweep(sweep: Sweep, sweep_dir: str | None = None, jobs: int = 1, launcher: str = "local",
              device: str | None = None, threads: int | None = None, gpus: int = 0, cluster: str | None = None,
              scheduler: dict | None = None, log=print) -> dict:
    """Run every unfinished point of ``sweep`` (``jobs`` at a time with the local launcher), compare with the
    baseline, measure, and write the table; returns the table (``explore.table.build_table``)."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher = {launcher!r} is not allowed; use one of {', '.join(LAUNCHERS)}")
    sweep_dir = sweep_dir or default_dir(sweep)
    ensure_writable(sweep_dir, "sweep directory")
    with run_lock(sweep_dir, f"ditgraft sweep {sweep.name}"):
        record(sweep, sweep_dir)
        lead = leaders(sweep)
        per_job = max(1, (threads or os.cpu_count() or 1) // max(1, jobs)) if launcher == "local" else threads
        t0 = time.time()
        for wave, points in enumerate(([p for p in sweep.points if lead[p.name] is None],
                                       [p for p in sweep.points if lead[p.name] is not None]), 1):
            todo = [p for p in points if point_state(sweep_dir, p.name)[0] != "done"]
            if not todo:
                continue
            for p in todo:
                _prepare(sweep_dir, p, lead[p.name])
            log(f"sweep {sweep.name}: wave {wave}: {len(todo)} point(s) to run ({launcher}, "
                f"{jobs if launcher == 'local' else len(todo)} at a time)")
            batch = [_job(sweep_dir, p, device, per_job, gpus) for p in todo]
            recorder = _Recorder(sweep, sweep_dir, log)
            if launcher == "local":
                run_local(batch, jobs, recorder)
            else:
                params = dict(scheduler or {})
                if per_job:
                    params.setdefault("cpus_per_task", per_job)
                if gpus:
                    params.setdefault("gpus_per_node", gpus)
                run_submitit(batch, os.path.join(sweep_dir, "submitit"), recorder, cluster=cluster, **params)
        compare_with_baseline(sweep, sweep_dir, device, log)
        measure_points(sweep, sweep_dir, device, log)
        table = write_table(sweep_dir)
        states = [point_state(sweep_dir, p.name)[0] for p in sweep.points]
        log(f"sweep {sweep.name}: {states.count('done')}/{len(states)} points done, {states.count('failed')} "
            f"failed ({time.time() - t0:.0f} s); table: {os.path.join(sweep_dir, 'results.md')}")
        return table


def _prepare(sweep_dir: str, p: Point, leader: str | None) -> None:
    """Before a point runs: its group's stage 1 and the teacher's evaluation copied in, an old failure forgotten
    (a failed point is tried again)."""
    if leader is not None:
        share_stage1(point_dir(sweep_dir, leader), point_dir(sweep_dir, p.name))
    share_teacher_eval(sweep_dir, p, finished=False)
    status = os.path.join(point_dir(sweep_dir, p.name), "sweep_point.json")
    if os.path.exists(status):
        os.remove(status)


class _Recorder:
    """Called by a launcher (from its worker threads) when a point's command ends: records done / failed, or
    leaves an interrupted point to be resumed."""

    def __init__(self, sweep: Sweep, sweep_dir: str, log):
        self.sweep, self.sweep_dir, self.log = sweep, sweep_dir, log
        self.lock = threading.Lock()

    def __call__(self, job: Job, code: int, wall: float | None) -> None:
        with self.lock:
            status = os.path.join(point_dir(self.sweep_dir, job.name), "sweep_point.json")
            if code == 0:
                share_teacher_eval(self.sweep_dir, self.sweep.point(job.name), finished=True)
                atomic_write_json(status, {"state": "done", "wall_s": wall, "command": job.command})
                self.log(f"  {job.name}: done" + ("" if wall is None else f" ({wall:.0f} s)"))
            elif code in INTERRUPTED:
                self.log(f"  {job.name}: interrupted (exit {code}); run the sweep again to resume it")
            else:
                err = _error_of(job.log_path)
                atomic_write_json(status, {"state": "failed", "exit_code": code, "error": err, "wall_s": wall,
                                           "command": job.command})
                self.log(f"  {job.name}: FAILED (exit {code}): {err}")


def _job(sweep_dir: str, p: Point, device, threads, gpus) -> Job:
    recipe = os.path.abspath(os.path.join(sweep_dir, "recipes", f"{p.name}.yaml"))
    run_dir = os.path.abspath(point_dir(sweep_dir, p.name))
    return Job(p.name, point_command(recipe, run_dir, device, gpus), os.path.join(run_dir, "sweep.log"), threads)


def sweep_status(sweep: Sweep, sweep_dir: str | None = None) -> list[dict]:
    """Every point's state (STATES) and, for a failed one, its error; reads the directory only."""
    sweep_dir = sweep_dir or default_dir(sweep)
    lead = leaders(sweep)
    rows = []
    for p in sweep.points:
        state, status = point_state(sweep_dir, p.name)
        rows.append({"name": p.name, "state": state, "stage1_from": lead[p.name], "error": status.get("error"),
                     "wall_s": status.get("wall_s")})
    return rows


def format_status(rows: list[dict]) -> str:
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    lines = [", ".join(f"{v} {k}" for k, v in counts.items() if v)]
    for r in rows:
        extra = f" ({r['wall_s']:.0f} s)" if r["state"] == "done" and r["wall_s"] is not None else ""
        if r["state"] == "failed":
            extra = f": {r['error']}"
        elif r["stage1_from"] and r["state"] != "done":
            extra = f" (stage 1 from {r['stage1_from']})"
        lines.append(f"  {r['state']:8s} {r['name']}{extra}")
    return "\n".join(lines)

