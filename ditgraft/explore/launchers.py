"""Where a sweep's points run: local processes, or a cluster scheduler through submitit (Slurm, or its local
executor). Either way a point is one ordinary command (``ditgraft graft RECIPE --run-dir DIR``, or the same under
``torchrun`` on GPUs) whose output goes to the point's ``sweep.log``; the launcher returns its exit code."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

LAUNCHERS = ("local", "submitit")
CLUSTERS = ("slurm", "local", "debug")  # submitit.AutoExecutor's cluster names
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class Job:
    name: str
    command: list[str]
    log_path: str
    threads: int | None  # CPU threads of the point's process (None: torch's choice)


def run_job(job: Job, running: dict | None = None) -> tuple[int, float]:
    """Run one point's command to its end; its output is appended to ``job.log_path``. Returns the exit code
    (negative: killed by that signal) and the seconds it ran; ``running`` (job name -> process) holds the process
    while it runs. A top-level function, so submitit can pickle it."""
    env = dict(os.environ)
    if job.threads:
        env.update({v: str(job.threads) for v in THREAD_VARS})
    os.makedirs(os.path.dirname(job.log_path), exist_ok=True)
    with open(job.log_path, "a") as log:
        log.write(f"$ {' '.join(job.command)}\n")
        log.flush()
        t0 = time.perf_counter()
        with subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT, env=env) as proc:
            if running is not None:
                running[job.name] = proc
            try:
                code = proc.wait()
            finally:
                if running is not None:
                    running.pop(job.name, None)
    return code, time.perf_counter() - t0


def point_command(recipe_path: str, run_dir: str, device: str | None = None, gpus: int = 0) -> list[str]:
    """The command that runs one point; with ``gpus`` > 1 a torchrun job over that many local GPUs."""
    graft = ["-m", "ditgraft.cli", "graft", recipe_path, "--run-dir", run_dir, "--quiet"]
    if device:
        graft += ["--device", device]
    if gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *graft]
    return [sys.executable, *graft]


def run_local(jobs: list[Job], workers: int, on_done) -> None:
    """Run ``jobs`` as local processes, ``workers`` at a time; ``on_done(job, exit_code, seconds)`` after each.
    Interrupted (Ctrl-C, SIGTERM), it starts no further job and stops the running ones (SIGTERM: they keep what
    they have and resume on the next run), then re-raises."""
    running: dict[str, subprocess.Popen] = {}

    def one(job: Job) -> None:
        on_done(job, *run_job(job, running))

    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        for f in [pool.submit(one, j) for j in jobs]:
            f.result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in list(running.values()):
            proc.terminate()
        raise
    finally:
        pool.shutdown(wait=True)


def run_submitit(jobs: list[Job], folder: str, on_done, cluster: str | None = None, **parameters) -> None:
    """Submit ``jobs`` through submitit (``cluster``: None picks Slurm where it exists, 'local' runs them as local
    processes, 'slurm' requires it); ``parameters`` go to ``executor.update_parameters`` (timeout_min,
    slurm_partition, gpus_per_node, cpus_per_task, ...). Waits for every job."""
    try:
        import submitit
    except ImportError:
        raise ValueError("launcher = 'submitit' needs the submitit package: pip install submitit") from None
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**parameters)
    submitted = [(job, executor.submit(run_job, job)) for job in jobs]
    for job, handle in submitted:
        try:
            code, seconds = handle.result()
        except Exception as err:  # the scheduler lost or killed the job: report it as the point's failure
            with open(job.log_path, "a") as log:
                log.write(f"submitit: {type(err).__name__}: {err}\n")
            code, seconds = 1, None
        on_done(job, code, seconds)
