"""Experiment tracking: what the training loop and the end of a run log, read back from TensorBoard's event files,
and the wandb / trackio adapters against stand-ins of their libraries (the same calls the real ones take)."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from ditgraft.train import tracking
from ditgraft.train.loop import LoopConfig, train


def _train(run_dir, steps=6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    data = (x, x.sum(1, keepdim=True).sin())

    def step(m, batch):
        pred = m(batch[0])
        return {"loss": (pred - batch[1]).square().mean(), "loss/attn3": (pred - batch[1]).abs().mean()}

    cfg = LoopConfig(steps=steps, batch_size=8, lr=1e-2, warmup_steps=2, ema_decay=None, ckpt_every=3, log_every=2,
                     progress=False)
    return train(model, step, data, cfg, str(run_dir), desc="stage1",
                 evaluate=lambda m, s: {"attn3_mse": 0.5 / s}, eval_every=3)


REPORT = {"eval": {"grafted": {"fid": 2.5, "accuracy": 0.95, "fid_ratio": {"value": 1.2, "ci": [1.1, 1.3]},
                               "protocol": {"num": 500}}}}


def _grid(path):
    from PIL import Image

    Image.fromarray((np.arange(8 * 12 * 3) % 255).astype(np.uint8).reshape(8, 12, 3)).save(path)


def test_tensorboard_gets_every_logged_row_and_the_results(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "my_run"
    (run_dir / "eval").mkdir(parents=True)
    _grid(run_dir / "eval" / "grafted.png")
    with tracking.session("tensorboard", str(run_dir)):
        result = _train(run_dir)
        tracking.log_results(REPORT, str(run_dir))
    assert tracking._active is None  # closed
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"stage1/loss", "stage1/loss/attn3", "stage1/lr", "stage1/grad_norm", "stage1/samples_per_s",
            "stage1/eval/attn3_mse", "eval/grafted/fid", "eval/grafted/fid_ratio_lo",
            "eval/grafted/fid_ratio_hi"} <= tags
    history = result.history
    assert [e.step for e in acc.Scalars("stage1/loss")] == [r["step"] for r in history]
    assert [e.value for e in acc.Scalars("stage1/loss")] == pytest.approx([r["loss"] for r in history])
    assert [e.value for e in acc.Scalars("stage1/lr")] == pytest.approx([r["lr"] for r in history])
    assert acc.Scalars("eval/grafted/fid_ratio_hi")[0].value == pytest.approx(1.3)
    assert acc.Tags()["images"] == ["samples/grafted"]
    assert acc.Images("samples/grafted")[0].width == 12


def test_none_logs_nothing_and_bad_kinds_are_refused(tmp_path):
    with tracking.session("none", str(tmp_path)) as t:
        assert t is None
        _train(tmp_path / "r", steps=2)
    assert not (tmp_path / "r" / "tensorboard").exists()
    with pytest.raises(ValueError, match=r"log='mlflow' is not allowed; use one of \('tensorboard'"):
        with tracking.session("mlflow", str(tmp_path)):
            pass


def test_recipe_log_option_is_validated():
    from ditgraft.recipe import Recipe

    graft = [{"slot": "attn", "layers": [1], "operator": "hyena_x"}]
    assert Recipe(grafts=graft).log == "none"
    assert Recipe(grafts=graft, log="wandb").log == "wandb"
    with pytest.raises(ValueError, match="log"):
        Recipe(grafts=graft, log="mlflow")


class _Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return self

        return call


def test_wandb_adapter_logs_each_stage_on_its_own_axis(tmp_path, monkeypatch):
    run = _Recorder()
    fake = types.ModuleType("wandb")
    inits = []
    fake.init = lambda **kw: inits.append(kw) or run
    fake.Image = lambda path: ("image", path)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run_dir = tmp_path / "demo"
    (run_dir / "eval").mkdir(parents=True)
    _grid(run_dir / "eval" / "teacher.png")
    with tracking.session("wandb", str(run_dir)):
        result = _train(run_dir)
        tracking.log_results(REPORT, str(run_dir))
    assert inits == [{"project": "ditgraft", "name": "demo", "dir": str(run_dir)}]
    logs = [c[1][0] for c in run.calls if c[0] == "log"]
    rows = [r for r in logs if "stage1/loss" in r]
    assert [r["stage1/step"] for r in rows] == [r["step"] for r in result.history]
    assert rows[0]["stage1/loss/attn3"] == pytest.approx(result.history[0]["loss/attn3"])
    assert ("define_metric", ("stage1/*",), {"step_metric": "stage1/step"}) in run.calls
    assert any(r.get("eval/grafted/fid") == 2.5 for r in logs)
    assert {"samples/teacher": ("image", str(run_dir / "eval" / "teacher.png"))} in logs
    assert run.calls[-1][0] == "finish"


def test_trackio_adapter(tmp_path, monkeypatch):
    fake = _Recorder()
    mod = types.ModuleType("trackio")
    for name in ("init", "log", "finish"):
        setattr(mod, name, getattr(fake, name))
    monkeypatch.setitem(sys.modules, "trackio", mod)
    with tracking.session("trackio", str(tmp_path / "run7")):
        result = _train(tmp_path / "run7", steps=4)
    assert fake.calls[0] == ("init", (), {"project": "ditgraft", "name": "run7"})
    logged = [(c[1][0], c[2]["step"]) for c in fake.calls if c[0] == "log"]
    assert [s for _, s in logged] == [r["step"] for r in result.history]
    assert logged[0][0]["stage1/lr"] == pytest.approx(result.history[0]["lr"])
    assert fake.calls[-1][0] == "finish"


def test_missing_library_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        with tracking.session("wandb", str(tmp_path)):
            pass


def test_cli_pretrain_logs_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ditgraft.cli import main

    run_dir = tmp_path / "pre"
    assert main(["pretrain", "--steps", "2", "--batch-size", "4", "--ckpt-every", "2", "--run-dir", str(run_dir),
                 "--log", "tensorboard"]) == 0
    acc = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert {"pretrain/loss", "pretrain/lr", "pretrain/grad_norm"} <= set(acc.Tags()["scalars"])
