"""Kill each long ditgraft command with SIGKILL at random points, resume it, and compare with an uninterrupted run.

    python scripts/killtest.py [--kills 3] [--seed 0] [--work /tmp/killtest] [--only pretrain,stage1,...]

Targets (tiny settings, CPU): ``pretrain`` (the testbed DiT), graft ``stage1`` and ``stage2`` (a tiny teacher
saved by this script, mnist5k), ``synth`` and ``sample``. For each target:
1. the reference: the command run once, uninterrupted, in its own folder;
2. trial 0, kills inside writes: with DITGRAFT_TEST_WRITE_PAUSE set, the command is killed as soon as a checkpoint
   temporary (``step_NNNNNNN.tmp``, state.json already written) or an ``atomic_path`` temporary (best operator
   weights, the student, samples) appears, i.e. between writing and renaming; one such kill per pattern, in turn;
3. trials 1..``--kills``, random kills: each in a fresh folder, SIGKILLed once after a random delay (training
   targets: process start-up, timed by a run with nothing left to do, plus a uniform share of the training time;
   sampling targets: uniform over the reference's wall time);
4. every trial then runs to completion and is compared with the reference: the max abs difference of every weight
   (or sample), the temporaries left behind, and whether the run lock was released.
Exit status 0 when every target resumed to the reference exactly (max abs diff 0), 1 otherwise.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24  # training steps of every training target


def _env(pause: float = 0.0) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    if pause:
        env["DITGRAFT_TEST_WRITE_PAUSE"] = str(pause)
    return env


def _cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "ditgraft.cli", "--threads", "1", *args]


def run(args: list[str]) -> float:
    t0 = time.time()
    out = subprocess.run(_cmd(args), env=_env(), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return time.time() - t0


def _temporaries(folder: str) -> list[str]:
    found = glob.glob(os.path.join(folder, "**", "*.tmp"), recursive=True)
    found += glob.glob(os.path.join(folder, "**", ".*.tmp"), recursive=True)
    return sorted(set(found))


def kill_after(args: list[str], delay: float) -> str:
    """Start, SIGKILL after ``delay`` seconds; returns 'killed' or 'finished' (it ended before the kill)."""
    proc = subprocess.Popen(_cmd(args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
        return "finished"
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return "killed"


def kill_inside_write(args: list[str], folder: str, limit: float, pattern: str = "") -> str:
    """Start with writes paused before their rename; SIGKILL as soon as a temporary whose name contains
    ``pattern`` (``step_``: a checkpoint) shows up in ``folder``."""
    before = set(_temporaries(folder))
    proc = subprocess.Popen(_cmd(args), env=_env(pause=1.0), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < limit:
        new = [t for t in _temporaries(folder) if t not in before and pattern in os.path.basename(t)]
        if new:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return "killed inside write of " + os.path.relpath(new[0], folder)
        time.sleep(0.005)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return "killed (no write seen)"
    return "finished before a matching write was seen"


def max_abs_diff(a: str, b: str) -> float:
    import numpy as np
    from safetensors.numpy import load_file

    if a.endswith(".npz"):
        x, y = np.load(a), np.load(b)
        pairs = [(x[k], y[k]) for k in x.files]
    else:
        x, y = load_file(a), load_file(b)
        assert x.keys() == y.keys(), (a, b)
        pairs = [(x[k], y[k]) for k in x]
    return max(float(np.abs(p.astype(np.float64) - q.astype(np.float64)).max()) if p.size else 0.0
               for p, q in pairs)


def tiny_teacher(path: str) -> None:
    import torch

    from ditgraft.models.checkpoints import save_safetensors
    from ditgraft.models.dit import DiT

    torch.manual_seed(0)
    model = DiT(input_size=32, patch_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    save_safetensors(path, model, {"model_config": model.config, "pretrain": {"train_flops": 1e13}})


def recipe(path: str, teacher: str) -> None:
    body = {"name": "killtest", "teacher": {"source": teacher},
            "grafts": [{"slot": "attn", "layers": [1], "operator": "hyena_x"}],
            "stage1": {"samples": 64, "val_samples": 16, "steps": STEPS, "batch_size": 8, "eval_every": 4},
            "stage2": {"steps": STEPS, "batch_size": 8, "ckpt_every": 4, "ema_decay": 0.99},
            "eval": {"enabled": False, "baselines": []}}
    with open(path, "w") as f:
        json.dump(body, f)


def targets(work: str) -> dict:
    teacher = os.path.join(work, "teacher.safetensors")
    rec = os.path.join(work, "recipe.yaml")
    tiny_teacher(teacher)
    recipe(rec, teacher)
    sampling = ["--num-samples", "40", "--batch-size", "8", "--steps", "6", "--device", "cpu"]

    def pretrain(d):
        return ["pretrain", "--run-dir", d, "--steps", str(STEPS), "--batch-size", "4", "--ckpt-every", "4",
                "--warmup", "4", "--device", "cpu"]

    def graft(stages):
        return lambda d: ["graft", rec, "--run-dir", d, "--stages", stages, "--quiet"]

    def best(d):
        return sorted(glob.glob(os.path.join(d, "stage1", "best", "*.safetensors")))

    # args: the command; out: files compared with the reference; writes: name patterns of the temporaries to kill
    # inside; loop: the training loop's folder (for the step a resume starts from); prepare: run uncut first
    return {
        "pretrain": dict(args=pretrain, out=lambda d: [os.path.join(d, "model.safetensors")],
                         writes=["step_", ""], loop=lambda d: d),
        "stage1": dict(args=graft("stage1"), out=best, writes=["step_", ".safetensors"],
                       loop=lambda d: os.path.join(d, "stage1", "loop")),
        "stage2": dict(args=graft("stage1,stage2"), prepare=graft("stage1"),
                       out=lambda d: [os.path.join(d, "student.safetensors")], writes=["step_", "student"],
                       loop=lambda d: os.path.join(d, "stage2", "loop")),
        "synth": dict(args=lambda d: ["synth", teacher, "--out", os.path.join(d, "synth.npz"), *sampling],
                      out=lambda d: [os.path.join(d, "synth.npz")], mkdir=True),
        "sample": dict(args=lambda d: ["sample", teacher, "--out", d, *sampling],
                       out=lambda d: [os.path.join(d, "samples.npz")]),
    }


def _fresh(target: dict, folder: str) -> str:
    """A new folder for one run of ``target`` (stage 2: with stage 1 already run uncut)."""
    if target.get("mkdir"):
        os.makedirs(folder, exist_ok=True)
    if "prepare" in target:
        run(target["prepare"](folder))
    return folder


def _state(target: dict, folder: str) -> str:
    """What a resume would start from: the newest complete checkpoint of the target's training loop."""
    from ditgraft.train.loop import latest_checkpoint

    if "loop" not in target:
        return ""
    found = latest_checkpoint(target["loop"](folder))
    return f"; resumes from step {found[0]}" if found else "; resumes from step 0"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=3, help="random kills per target (plus one inside a write)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/ditgraft-killtest")
    p.add_argument("--only", default=None, help="comma list of pretrain,stage1,stage2,synth,sample")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    rng = random.Random(args.seed)
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    todo = targets(args.work)
    names = args.only.split(",") if args.only else list(todo)
    ok = True
    for name in names:
        t = todo[name]
        ref = os.path.join(args.work, name, "ref")
        wall = run(t["args"](_fresh(t, ref)))
        startup, work = 0.0, wall
        if "loop" in t:  # aim the kills at the training, not at process start: time a run with nothing left to do
            scratch = os.path.join(args.work, name, "noop")
            shutil.copytree(ref, scratch)
            startup = run(t["args"](scratch))
            work = max(wall - startup, 1.0)
        print(f"{name}: reference {wall:.1f}s (start-up {startup:.1f}s)", flush=True)
        # trial 0: kills inside writes, one after another in one folder; trials 1..k: one random kill each
        trials = [("in writes", t.get("writes", [""]))] + [("random", None)] * args.kills
        for i, (kind, patterns) in enumerate(trials):
            cut = _fresh(t, os.path.join(args.work, name, f"trial{i}"))
            if patterns is not None:
                events = [kill_inside_write(t["args"](cut), cut, 4 * wall + 30, pat) + _state(t, cut)
                          for pat in patterns]
            else:
                delay = startup + rng.uniform(0.0, 1.0) * work if "loop" in t else rng.uniform(0.0, wall)
                events = [f"{kill_after(t['args'](cut), delay)} at {delay:.1f}s" + _state(t, cut)]
            run(t["args"](cut))
            diffs = [max_abs_diff(a, b) for a, b in zip(t["out"](ref), t["out"](cut), strict=True)]
            left = _temporaries(cut)
            locks = glob.glob(os.path.join(cut, "**", ".*.lock"), recursive=True)
            diff = max(diffs) if diffs else float("nan")
            passed = bool(diffs) and diff == 0.0 and not left and not locks
            ok &= passed
            print(f"  {'PASS' if passed else 'FAIL'} {kind}: {'; '.join(events)} -> resumed; {len(diffs)} file(s), "
                  f"max abs diff {diff:g}, temporaries left {len(left)}, locks left {len(locks)}", flush=True)
    print("all targets resumed exactly" if ok else "SOME TARGETS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
