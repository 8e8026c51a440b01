"""Experiment tracking: one adapter over TensorBoard, Weights & Biases or trackio, chosen by one option
(``log: tensorboard | wandb | trackio | none`` in a recipe, ``--log`` on the long commands; default none).

While a ``session(kind, run_dir)`` is open, every row the training loop writes to ``metrics.jsonl`` also goes to the
tracker as ``{stage}/{key}`` at the loop's step (losses per target, learning rate, gradient norm, samples per
second, ``eval/...`` validation numbers), and at the end the run's evaluation (FID etc., with intervals where the
protocol gave them) and its sample grids (``eval/*.png``). The tracker's run is named after the run directory;
TensorBoard writes its event files to ``<run_dir>/tensorboard``, wandb its files under ``<run_dir>`` (offline with
``WANDB_MODE=offline``), trackio its local store. The libraries are optional extras, imported only when chosen.
"""
from __future__ import annotations

import glob
import os
from contextlib import contextmanager

TRACKERS = ("tensorboard", "wandb", "trackio", "none")
PROJECT = "ditgraft"

_active = None  # the open tracker, or None


class Tracker:
    """What the loop and the end of a run call; subclasses adapt one library."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.name = os.path.basename(os.path.normpath(os.path.abspath(run_dir)))

    def log(self, metrics: dict[str, float], step: int | None, stage: str | None = None) -> None:
        """Numbers at ``step`` of loop ``stage`` (each stage counts its own steps); ``step`` None: the run's end."""
        raise NotImplementedError

    def image(self, tag: str, path: str, step: int) -> None:
        """A PNG sample grid (adapters that take no images skip it)."""

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: str):
        super().__init__(run_dir)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError("log: tensorboard needs the tensorboard package: pip install tensorboard") from err
        self.writer = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))

    def log(self, metrics, step, stage=None):
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def image(self, tag, path, step):
        import numpy as np
        from PIL import Image

        self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, run_dir: str):
        super().__init__(run_dir)
        try:
            import wandb
        except ImportError as err:
            raise ImportError("log: wandb needs the wandb package: pip install wandb") from err
        self.wandb = wandb
        self.run = wandb.init(project=PROJECT, name=self.name, dir=run_dir)
        self.stages: set[str] = set()

    def log(self, metrics, step, stage=None):
        # wandb's own step only grows, and every stage counts from 1: each stage gets its own x axis
        if stage is not None and step is not None:
            if stage not in self.stages:
                self.run.define_metric(f"{stage}/step")
                self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
                self.stages.add(stage)
            metrics = {**metrics, f"{stage}/step": step}
        self.run.log(dict(metrics))

    def image(self, tag, path, step):
        self.run.log({tag: self.wandb.Image(path)})

    def close(self):
        self.run.finish()


class TrackioTracker(Tracker):
    def __init__(self, run_dir: str):
        super().__init__(run_dir)
        try:
            import trackio
        except ImportError as err:
            raise ImportError("log: trackio needs the trackio package: pip install trackio") from err
        self.trackio = trackio
        self.run = trackio.init(project=PROJECT, name=self.name)

    def log(self, metrics, step, stage=None):
        self.trackio.log(dict(metrics), step=step)

    def image(self, tag, path, step):
        if hasattr(self.trackio, "Image"):
            self.trackio.log({tag: self.trackio.Image(path)}, step=step)

    def close(self):
        self.trackio.finish()


ADAPTERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker}


def check_kind(kind: str | None) -> str:
    kind = kind or "none"
    if kind not in TRACKERS:
        raise ValueError(f"log={kind!r} is not allowed; use one of {TRACKERS}")
    return kind


@contextmanager
def session(kind: str | None, run_dir: str):
    """Open the tracker ``kind`` for ``run_dir`` (nothing for none, or off rank 0) while the block runs."""
    global _active
    kind = check_kind(kind)
    rank = int(os.environ.get("RANK", "0"))
    if kind == "none" or rank != 0 or _active is not None:  # an outer session keeps logging
        yield _active
        return
    _active = ADAPTERS[kind](run_dir)
    try:
        yield _active
    finally:
        tracker, _active = _active, None
        tracker.close()


def log_row(stage: str, row: dict) -> None:
    """The training loop's hook: one metrics.jsonl row (``step`` and numbers) of loop ``stage``."""
    if _active is None:
        return
    step = int(row["step"])
    _active.log({f"{stage}/{k}": float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))},
                step, stage)


def log_results(report: dict | None, run_dir: str) -> None:
    """The end of a run: the evaluation's numbers (``eval/{model}/{metric}``; an interval's bounds as ``_lo`` /
    ``_hi``) and the sample grids in ``<run_dir>/eval``."""
    if _active is None:
        return
    flat: dict[str, float] = {}
    for model, row in ((report or {}).get("eval") or {}).items():
        for k, v in row.items():
            if isinstance(v, bool):
                continue
            if isinstance(v, (int, float)):
                flat[f"eval/{model}/{k}"] = float(v)
            elif isinstance(v, dict) and isinstance(v.get("value"), (int, float)):  # {"value", "ci": [lo, hi]}
                flat[f"eval/{model}/{k}"] = float(v["value"])
                if isinstance(v.get("ci"), (list, tuple)) and len(v["ci"]) == 2:
                    flat[f"eval/{model}/{k}_lo"], flat[f"eval/{model}/{k}_hi"] = map(float, v["ci"])
    if flat:
        _active.log(flat, None)
    for path in sorted(glob.glob(os.path.join(run_dir, "eval", "*.png"))):
        _active.image(f"samples/{os.path.splitext(os.path.basename(path))[0]}", path, None)
