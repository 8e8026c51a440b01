"""Bad input, divergence, concurrent runs and kills: every expected failure is one clear line and exit code 2
(divergence: exit code 3 with the last finite checkpoint kept), never a traceback or a silently wrong result."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from helpers import tiny_dit
from ditgraft.cli import main
from ditgraft.models.checkpoints import save_safetensors


class Evil:
    """A pickle that would run a shell command when loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _recipe(path, teacher, **sections):
    body = {"name": "tiny", "teacher": {"source": teacher},
            "grafts": [{"slot": "attn", "layers": [1], "operator": "hyena_x"}],
            "stage1": {"samples": 16, "val_samples": 8, "steps": 2, "batch_size": 8, "eval_every": 1},
            "stage2": {"steps": 2, "batch_size": 8, "ckpt_every": 1},
            "eval": {"num": 10, "steps": 2, "baselines": []}}
    for key, value in sections.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    with open(path, "w") as f:
        json.dump(body, f)  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """A folder of bad inputs next to one good tiny model (mnist5k-shaped: 32x32x1, depth 2)."""
    root = tmp_path_factory.mktemp("bad")
    model = tiny_dit(depth=2, input_size=32, patch_size=8)
    good = str(root / "tiny.safetensors")
    save_safetensors(good, model, {"model_config": model.config})
    raw = open(good, "rb").read()
    (root / "empty.safetensors").write_bytes(b"")
    (root / "truncated.safetensors").write_bytes(raw[: len(raw) * 6 // 10])
    (root / "corrupt.safetensors").write_bytes(os.urandom(4096))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(root / "nometa.safetensors"))
    meta = {"ditgraft": json.dumps({"model_config": model.config})}
    save_file({k: v for k, v in state.items() if k != "final_layer.linear.bias"}, str(root / "missing_key.safetensors"),
              metadata=meta)
    save_file({**state, "y_embedder.embedding_table.weight": torch.zeros(12, 32)},
              str(root / "wrong_shape.safetensors"), metadata=meta)
    save_file(state, str(root / "badconfig.safetensors"), metadata={"ditgraft": json.dumps({"model_config": {"x": 1}})})
    with torch.no_grad():
        broken = tiny_dit(depth=2, input_size=32, patch_size=8)
        broken.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
    save_safetensors(str(root / "nan.safetensors"), broken, {"model_config": broken.config})
    torch.save({"w": Evil(str(root / "pwned"))}, str(root / "evil.pt"))
    (root / "corrupt.pt").write_bytes(os.urandom(2048))
    (root / "empty.pt").write_bytes(b"")
    torch.save([1, 2, 3], str(root / "notdict.pt"))
    os.makedirs(root / "emptydir")
    (root / "afile").write_text("a regular file where a folder is needed")
    rng = np.random.default_rng(0)
    np.savez(root / "wrongch.npz", latents=rng.standard_normal((16, 3, 32, 32)).astype(np.float32),
             labels=np.zeros(16, np.int64))
    np.savez(root / "badlabels.npz", latents=rng.standard_normal((16, 1, 32, 32)).astype(np.float32),
             labels=np.arange(16, dtype=np.int64) + 5)
    nan = rng.standard_normal((16, 1, 32, 32)).astype(np.float32)
    nan[3, 0, 0, 0] = np.nan
    np.savez(root / "nandata.npz", latents=nan, labels=np.zeros(16, np.int64))
    imgs = rng.integers(0, 255, (10, 32, 32, 1), dtype=np.uint8)
    np.savez(root / "samples_badlabels.npz", arr_0=imgs, arr_1=np.arange(10) + 7)
    np.savez(root / "samples_noarr0.npz", images=imgs)
    _recipe(root / "lr_inf.yaml", good, stage1={"lr": float("inf")})
    (root / "lr_inf_yaml.yaml").write_text((root / "lr_inf.yaml").read_text().replace("Infinity", ".inf"))
    _recipe(root / "lr_nan.yaml", good, stage2={"lr": float("nan")})
    _recipe(root / "layers99.yaml", good, grafts=[{"slot": "attn", "layers": [1, 99], "operator": "hyena_x"}])
    _recipe(root / "data_wrongch.yaml", good, stage2={"data": str(root / "wrongch.npz")})
    _recipe(root / "data_badlabels.yaml", good, stage1={"data": str(root / "badlabels.npz"), "val_samples": 4})
    _recipe(root / "teacher_missing.yaml", str(root / "nope.safetensors"))
    _recipe(root / "teacher_truncated.yaml", str(root / "truncated.safetensors"))
    _recipe(root / "good.yaml", good)
    for name in ("locked_run", "locked_out", "locked_pre"):
        os.makedirs(root / name)
        (root / name / ".ditgraft.lock").write_text(json.dumps({"pid": 1, "host": os.uname().nodename,
                                                                "command": "ditgraft graft other"}))
    (root / ".locked.npz.lock").write_text(json.dumps({"pid": 1, "host": os.uname().nodename, "command": "synth"}))
    return str(root)


SAMPLE = ["--num-samples", "2", "--steps", "1", "--device", "cpu"]
PRE = ["--steps", "2", "--batch-size", "2", "--device", "cpu"]

# (id, argv with {d} for the fixture folder, substrings the one-line error must contain)
CASES = [
    # option values (refused by argparse types before anything runs)
    ("batch-size-0", ["sample", "testbed", "--batch-size", "0"], ["--batch-size", "'0'", ">= 1"]),
    ("threads-neg", ["--threads", "-2", "ops"], ["--threads", "'-2'", ">= 1"]),
    ("cfg-nan", ["sample", "testbed", "--cfg", "nan"], ["--cfg", "'nan'", "finite"]),
    ("cfg-inf", ["synth", "testbed", "--cfg", "inf"], ["--cfg", "'inf'", "finite"]),
    ("cfg-below-1", ["sample", "testbed", "--cfg", "0.5"], ["--cfg", ">= 1"]),
    ("steps-0", ["sample", "testbed", "--steps", "0"], ["--steps", ">= 1"]),
    ("num-samples-neg", ["sample", "testbed", "--num-samples", "-1"], ["--num-samples", ">= 1"]),
    ("synth-batch-0", ["synth", "testbed", "--batch-size", "0"], ["--batch-size", ">= 1"]),
    ("seed-neg", ["sample", "testbed", "--seed", "-1"], ["--seed", "[0, 4294967295]"]),
    ("lr-nan", ["pretrain", "--lr", "nan"], ["--lr", "'nan'", "finite", "> 0"]),
    ("lr-inf", ["pretrain", "--lr", "inf"], ["--lr", "'inf'", "finite"]),
    ("lr-neg", ["pretrain", "--lr", "-1"], ["--lr", "> 0"]),
    ("ema-1.5", ["pretrain", "--ema", "1.5"], ["--ema", "< 1"]),
    ("grad-clip-0", ["pretrain", "--grad-clip", "0"], ["--grad-clip", "> 0"]),
    ("pretrain-steps-0", ["pretrain", "--steps", "0"], ["--steps", ">= 1"]),
    ("ckpt-every-0", ["pretrain", "--ckpt-every", "0"], ["--ckpt-every", ">= 1"]),
    ("warmup-neg", ["pretrain", "--warmup", "-1"], ["--warmup", ">= 0"]),
    ("steps-float", ["pretrain", "--steps", "1.5"], ["--steps", "'1.5'", "not an integer"]),
    ("eval-num-0", ["eval", "testbed", "--num-samples", "0"], ["--num-samples", ">= 1"]),
    ("eval-cfg-nan", ["eval", "testbed", "--cfg", "nan"], ["--cfg", "finite"]),
    ("band-k-0", ["analyze", "testbed", "--band-k", "0"], ["--band-k", ">= 1"]),
    ("ops-dim-0", ["ops", "--dim", "0"], ["--dim", ">= 1"]),
    ("sampler", ["sample", "testbed", "--sampler", "euler"], ["--sampler", "'euler'", "ddim"]),
    # devices
    ("device-cuda", ["sample", "{d}/tiny.safetensors", "--device", "cuda", "--out", "{d}/o1"],
     ["device='cuda'", "CUDA is not available"]),
    ("device-bogus", ["sample", "{d}/tiny.safetensors", "--device", "gpu0", "--out", "{d}/o1"],
     ["device='gpu0'", "not a valid torch device"]),
    ("pretrain-cuda3", ["pretrain", "--device", "cuda:3", "--run-dir", "{d}/p0"], ["device='cuda:3'"]),
    ("graft-cuda", ["graft", "{d}/good.yaml", "--device", "cuda", "--run-dir", "{d}/g0"], ["CUDA is not available"]),
    # model files
    ("st-empty", ["sample", "{d}/empty.safetensors", *SAMPLE], ["empty.safetensors", "empty", "0 bytes"]),
    ("st-truncated", ["sample", "{d}/truncated.safetensors", *SAMPLE], ["truncated.safetensors", "truncated"]),
    ("st-corrupt", ["synth", "{d}/corrupt.safetensors", *SAMPLE], ["corrupt.safetensors", "not a readable"]),
    ("st-nometa", ["sample", "{d}/nometa.safetensors", *SAMPLE], ["nometa.safetensors", "no ditgraft metadata"]),
    ("st-missing-key", ["sample", "{d}/missing_key.safetensors", *SAMPLE],
     ["missing_key.safetensors", "missing keys: final_layer.linear.bias"]),
    ("st-wrong-shape", ["analyze", "{d}/wrong_shape.safetensors", "--device", "cpu"],
     ["wrong_shape.safetensors", "wrong shapes: y_embedder.embedding_table.weight (12, 32) (expected (11, 32))"]),
    ("st-badconfig", ["sample", "{d}/badconfig.safetensors", *SAMPLE], ["badconfig.safetensors", "cannot build"]),
    ("st-nan-sample", ["sample", "{d}/nan.safetensors", *SAMPLE, "--out", "{d}/o2"],
     ["nan.safetensors", "non-finite weights", "blocks.0.mlp.fc1.weight"]),
    ("st-nan-eval", ["eval", "{d}/nan.safetensors", "--num-samples", "10", "--device", "cpu", "--out", "{d}/o3"],
     ["nan.safetensors", "non-finite weights"]),
    ("pt-evil", ["sample", "{d}/evil.pt", *SAMPLE], ["evil.pt", "refused", "pickle"]),
    ("pt-corrupt", ["sample", "{d}/corrupt.pt", *SAMPLE], ["corrupt.pt", "not a readable PyTorch checkpoint"]),
    ("pt-empty", ["synth", "{d}/empty.pt", *SAMPLE], ["empty.pt", "not a readable PyTorch checkpoint"]),
    ("pt-notdict", ["sample", "{d}/notdict.pt", *SAMPLE], ["notdict.pt", "not a DiT state dict"]),
    ("model-missing", ["sample", "{d}/nope.safetensors", *SAMPLE], ["nope.safetensors", "no such file"]),
    ("model-emptydir", ["sample", "{d}/emptydir", *SAMPLE], ["emptydir", "holds no student.safetensors"]),
    # outputs that cannot be written (checked before any sampling or training)
    ("out-sample", ["sample", "{d}/tiny.safetensors", *SAMPLE, "--out", "{d}/afile/sub"],
     ["--out", "afile/sub", "not writable"]),
    ("out-synth", ["synth", "{d}/tiny.safetensors", *SAMPLE, "--out", "{d}/afile/x.npz"],
     ["--out", "afile/x.npz", "not writable"]),
    ("out-eval", ["eval", "{d}/tiny.safetensors", "--device", "cpu", "--out", "{d}/afile/sub"],
     ["--out", "afile/sub", "not writable"]),
    ("out-analyze", ["analyze", "{d}/tiny.safetensors", "--device", "cpu", "--out", "{d}/afile/sub"],
     ["--out", "not writable"]),
    ("out-pretrain", ["pretrain", *PRE, "--run-dir", "{d}/afile/run"], ["--run-dir", "afile/run", "not writable"]),
    ("out-graft", ["graft", "{d}/good.yaml", "--run-dir", "{d}/afile/run"], ["run directory", "not writable"]),
    # data
    ("data-channels", ["pretrain", *PRE, "--data", "{d}/wrongch.npz", "--run-dir", "{d}/p1"],
     ["wrongch.npz", "(3, 32, 32)", "allowed: (1, 32, 32)"]),
    ("data-labels", ["pretrain", *PRE, "--data", "{d}/badlabels.npz", "--run-dir", "{d}/p2"],
     ["badlabels.npz", "labels span [5, 20]", "[0, 9]"]),
    ("data-nan", ["pretrain", *PRE, "--data", "{d}/nandata.npz", "--run-dir", "{d}/p3"], ["nandata.npz", "NaN"]),
    ("data-missing", ["pretrain", *PRE, "--data", "{d}/nope.npz", "--run-dir", "{d}/p4"], ["nope.npz"]),
    ("eval-labels", ["eval", "{d}/samples_badlabels.npz"], ["labels span [7, 16]", "[0, 9]"]),
    ("eval-noarr0", ["eval", "{d}/samples_noarr0.npz"], ["samples_noarr0.npz", "missing 'arr_0'"]),
    # recipes
    ("recipe-lr-inf", ["graft", "{d}/lr_inf.yaml", "--run-dir", "{d}/g1"], ["stage1.lr", "inf", "finite"]),
    ("recipe-lr-inf-yaml", ["graft", "{d}/lr_inf_yaml.yaml", "--run-dir", "{d}/g1"], ["stage1.lr", "finite"]),
    ("recipe-lr-nan", ["graft", "{d}/lr_nan.yaml", "--run-dir", "{d}/g2"], ["stage2.lr", "nan"]),
    ("recipe-layers-99", ["graft", "{d}/layers99.yaml", "--run-dir", "{d}/g3"], ["[99]", "out of range", "depth 2"]),
    ("recipe-data-channels", ["graft", "{d}/data_wrongch.yaml", "--run-dir", "{d}/g4"],
     ["stage2.data", "wrongch.npz", "allowed: (1, 32, 32)"]),
    ("recipe-data-labels", ["graft", "{d}/data_badlabels.yaml", "--run-dir", "{d}/g5"], ["stage1.data", "labels span"]),
    ("recipe-teacher-missing", ["graft", "{d}/teacher_missing.yaml", "--run-dir", "{d}/g6"], ["nope.safetensors"]),
    ("recipe-teacher-truncated", ["graft", "{d}/teacher_truncated.yaml", "--run-dir", "{d}/g7"],
     ["truncated.safetensors", "truncated"]),
    ("recipe-missing", ["graft", "{d}/nope.yaml"], ["nope.yaml", "no such file"]),
    ("graft-stage", ["graft", "{d}/good.yaml", "--stages", "stage3", "--run-dir", "{d}/g8"], ["stage='stage3'"]),
    # run directories in use by a live process (pid 1 of this host)
    ("locked-graft", ["graft", "{d}/good.yaml", "--run-dir", "{d}/locked_run"],
     ["locked_run is in use by pid 1", "ditgraft graft other"]),
    ("locked-sample", ["sample", "{d}/tiny.safetensors", *SAMPLE, "--out", "{d}/locked_out"],
     ["locked_out is in use by pid 1"]),
    ("locked-pretrain", ["pretrain", *PRE, "--run-dir", "{d}/locked_pre"], ["locked_pre is in use by pid 1"]),
    ("locked-synth", ["synth", "{d}/tiny.safetensors", *SAMPLE, "--out", "{d}/locked.npz"],
     ["locked.npz is in use by pid 1"]),
]


@pytest.mark.parametrize("argv,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_exit_2(d, argv, expected, capsys):
    before = sorted(os.listdir(d))
    code = main([a.replace("{d}", d) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err[err.rindex("error:"):]  # the message (a recipe lists one line per field)
    for text in expected:
        assert text.replace("{d}", d) in last, (text, last)
    assert not os.path.exists(os.path.join(d, "pwned"))  # the pickle never ran
    after = sorted(os.listdir(d))
    assert set(after) - set(before) <= {"o1", "o2", "o3", "p0", "p1", "p2", "p3", "p4", "g0", "g1", "g2", "g3", "g4",
                                        "g5", "g6", "g7", "g8"}
    for name in ("locked_run", "locked_out", "locked_pre"):  # a refused run touches nothing in a held folder
        assert os.listdir(os.path.join(d, name)) == [".ditgraft.lock"]


def test_help_prints_percent_signs_not_a_dict(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "50% attention" in out and "{'" not in out


def test_unexpected_error_shows_traceback_and_asks_for_a_bug_report(monkeypatch, capsys):
    import ditgraft.cli as cli

    def boom(args):
        raise ZeroDivisionError("internal")

    monkeypatch.setattr(cli, "cmd_ops", boom)
    assert main(["ops"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and "please report it" in err


# --- divergence -----------------------------------------------------------------------------------------------

def test_diverging_pretrain_exits_3_naming_stage_step_and_kept_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["pretrain", "--run-dir", str(run), "--steps", "30", "--batch-size", "4", "--ckpt-every", "2",
                 "--warmup", "0", "--lr", "1e3", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 3 and "Traceback" not in err
    assert "pretrain: training diverged at step" in err and "last good checkpoint" in err
    ckpts = sorted(os.listdir(run / "checkpoints"))
    assert ckpts and all(c.startswith("step_") and not c.endswith(".tmp") for c in ckpts)
    from safetensors.torch import load_file

    for c in ckpts:  # every checkpoint kept on disk is finite
        for t in load_file(str(run / "checkpoints" / c / "model.safetensors")).values():
            assert torch.isfinite(t).all()
    assert not (run / "model.safetensors").exists()
    assert not (run / ".ditgraft.lock").exists()  # released on the error exit


def test_loop_guard_stops_at_the_first_nan_and_keeps_the_finite_checkpoints(tmp_path):
    from ditgraft.train.loop import LoopConfig, TrainingDiverged, latest_checkpoint, train

    model = torch.nn.Linear(3, 1)
    x = torch.randn(32, 3)

    def step(m, batch):
        loss = m(batch[0]).square().mean()
        return {"loss": loss * float("nan") if torch.initial_seed() == _nan_seed else loss}

    from ditgraft.train.loop import step_seed

    _nan_seed = step_seed(0, 6)  # step index 6 = the 7th step
    cfg = LoopConfig(steps=20, batch_size=4, ckpt_every=2, keep_checkpoints=1, ema_decay=0.9, progress=False)
    with pytest.raises(TrainingDiverged, match=r"stage1: training diverged at step 7: loss = nan.*step_0000006"):
        train(model, step, (x,), cfg, str(tmp_path), desc="stage1")
    assert latest_checkpoint(str(tmp_path))[0] == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step never reached the optimiser


def test_loop_guard_watches_the_gradients_without_clipping(tmp_path):
    from ditgraft.train.loop import LoopConfig, TrainingDiverged, step_seed, train

    model = torch.nn.Linear(3, 1)
    bad_seed = step_seed(0, 2)

    def step(m, batch):
        loss = m(batch[0]).square().mean()
        if torch.initial_seed() == bad_seed:  # a finite loss (sqrt(0) = 0) whose gradient is NaN
            loss = loss + torch.sqrt((m.weight * 0).sum())
        return {"loss": loss}

    cfg = LoopConfig(steps=5, batch_size=4, grad_clip=None, ema_decay=None, progress=False)
    with pytest.raises(TrainingDiverged, match=r"pretrain: training diverged at step 3: grad_norm = nan; no check"):
        train(model, step, (torch.randn(16, 3),), cfg, str(tmp_path), desc="pretrain")


def test_loop_config_refuses_non_finite_numbers():
    from ditgraft.train.loop import LoopConfig

    for field, value in (("lr", float("inf")), ("lr", float("nan")), ("weight_decay", float("nan")),
                         ("grad_clip", float("inf")), ("ema_decay", float("nan")), ("betas", (0.9, float("nan")))):
        with pytest.raises(ValueError, match=field):
            LoopConfig(steps=2, batch_size=2, **{field: value})


def test_stage1_never_keeps_a_non_finite_best(tmp_path):
    from ditgraft.graft.stage1 import BestKeeper

    keeper = BestKeeper(str(tmp_path))
    op = torch.nn.Linear(2, 2)
    keeper.offer("attn_1", op, 1, float("inf"), float("inf"))
    keeper.offer("attn_1", op, 2, float("nan"), float("nan"))
    assert "attn_1" not in keeper.best and not os.listdir(tmp_path)
    keeper.offer("attn_1", op, 3, 0.5, 0.1)
    keeper.offer("attn_1", op, 4, float("nan"), float("nan"))
    assert keeper.best["attn_1"]["step"] == 3


def test_diverging_graft_exits_3_and_writes_no_student(d, tmp_path, capsys):
    recipe = _recipe(tmp_path / "r.yaml", os.path.join(d, "tiny.safetensors"),
                     stage1={"enabled": False}, stage2={"lr": 1e6, "grad_clip": None, "steps": 20, "ckpt_every": 1})
    code = main(["graft", str(recipe), "--run-dir", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "stage2: training diverged at step" in err
    assert not (tmp_path / "run" / "student.safetensors").exists()


def test_restructure_unit_never_finite_exits_3_and_writes_no_student(d, tmp_path, capsys, monkeypatch):
    """A parallel unit whose validation output is non-finite (its training loss stays finite) never gets a best
    checkpoint: stage 1 stops with the divergence error naming the unit, exit code 3, and stage 2 never starts."""
    from ditgraft.graft.restructure import ParallelPair

    forward = ParallelPair.forward

    def nan_in_eval(self, x, c):
        out = forward(self, x, c)
        return out if self.training else out * float("nan")

    monkeypatch.setattr(ParallelPair, "forward", nan_in_eval)
    recipe = _recipe(tmp_path / "r.yaml", os.path.join(d, "tiny.safetensors"), grafts=[],
                     restructure={"parallel_pairs": "all"})
    code = main(["graft", str(recipe), "--run-dir", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "stage1-units: pair0_1 never reached a finite validation MSE in 2 steps" in err
    assert "Traceback" not in err
    assert os.path.exists(tmp_path / "run" / "stage1_units" / "loop")  # it trained, and kept no best weights
    assert not os.listdir(tmp_path / "run" / "stage1_units" / "best")
    assert not (tmp_path / "run" / "student.safetensors").exists()


# --- recording and re-runs -------------------------------------------------------------------------------------

def test_failed_graft_does_not_block_its_corrected_rerun(d, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["graft", os.path.join(d, "layers99.yaml"), "--run-dir", run, "--stages", "stage1"]) == 2
    assert not os.path.exists(os.path.join(run, "recipe.yaml"))
    fixed = _recipe(tmp_path / "fixed.yaml", os.path.join(d, "tiny.safetensors"))
    assert main(["graft", str(fixed), "--run-dir", run, "--stages", "stage1", "--quiet"]) == 0, capsys.readouterr().err
    assert os.path.exists(os.path.join(run, "recipe.yaml"))
    assert not os.path.exists(os.path.join(run, "recipe.pending.yaml"))


def test_pretrain_rerun_with_fewer_steps_refuses_and_keeps_the_metadata(tmp_path, capsys):
    run = str(tmp_path / "run")
    base = ["pretrain", "--run-dir", run, "--batch-size", "2", "--ckpt-every", "2", "--warmup", "0", "--device", "cpu"]
    assert main(base + ["--steps", "4"]) == 0
    info = open(os.path.join(run, "pretrain_info.json")).read()
    meta = open(os.path.join(run, "model.safetensors"), "rb").read()
    assert main(base + ["--steps", "2"]) == 2
    assert "already trained to step 4" in capsys.readouterr().err
    assert main(base + ["--steps", "4", "--lr", "1e-3"]) == 2
    assert "finished at step 4 with other loop settings" in capsys.readouterr().err
    assert open(os.path.join(run, "pretrain_info.json")).read() == info
    assert open(os.path.join(run, "model.safetensors"), "rb").read() == meta
    assert main(base + ["--steps", "6"]) == 0  # a longer run is a new recorded stage
    got = json.load(open(os.path.join(run, "pretrain_info.json")))
    assert [s["from_step"] for s in got["stages"]] == [0, 4]
    assert got["train_flops"] == got["train_flops_per_sample"] * 6 * 2


# --- checkpoints and locks -------------------------------------------------------------------------------------

def test_kill_between_state_and_rename_resumes_and_orphans_are_cleaned(tmp_path):
    from ditgraft.train.loop import LoopConfig, latest_checkpoint, train

    def step(m, batch):
        return {"loss": m(batch[0]).square().mean()}

    x = torch.randn(32, 3)
    cfg = LoopConfig(steps=6, batch_size=4, ckpt_every=2, ema_decay=0.9, progress=False)
    torch.manual_seed(0)
    full = train(torch.nn.Linear(3, 1), step, (x,), cfg, str(tmp_path / "full"))
    run = tmp_path / "killed"
    torch.manual_seed(0)
    train(torch.nn.Linear(3, 1), step, (x,), LoopConfig(**{**cfg.__dict__, "steps": 4}), str(run))
    # what a SIGKILL leaves behind: a complete temp folder of step 6 (state.json written, never renamed), an
    # atomic_path temporary and a half-deleted rotation folder
    os.makedirs(run / "checkpoints" / "step_0000006.tmp")
    (run / "checkpoints" / "step_0000006.tmp" / "state.json").write_text('{"step": 6}')
    (run / ".metrics.jsonl.abc123xy.tmp").write_text("partial")
    os.makedirs(run / "checkpoints" / "step_0000002.del.tmp")
    assert latest_checkpoint(str(run))[0] == 4
    torch.manual_seed(0)
    resumed = train(torch.nn.Linear(3, 1), step, (x,), cfg, str(run))
    assert resumed.resumed_from == 4
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    leftovers = [f for _, dirs, files in os.walk(run) for f in dirs + files if f.endswith(".tmp")]
    assert leftovers == []


def test_orphan_cleanup_removes_only_its_own_temporaries(tmp_path):
    from ditgraft.utils import remove_orphan_temporaries

    mine = ["step_0000060.tmp", "a/step_0000002.del.tmp", ".model.safetensors.k2j4h5g6.tmp"]
    theirs = ["notes.tmp", "a/build.tmp", ".cache.tmp", "step_60.tmp"]
    for rel in mine[:2] + theirs[1:2]:
        os.makedirs(tmp_path / rel)
    for rel in mine[2:] + theirs[:1] + theirs[2:]:
        (tmp_path / rel).write_text("x")
    removed = remove_orphan_temporaries(str(tmp_path))
    assert sorted(os.path.relpath(p, tmp_path) for p in removed) == sorted(mine)
    assert all((tmp_path / rel).exists() for rel in theirs)


def test_orphan_cleanup_spares_another_ranks_write_probe(tmp_path, monkeypatch):
    """Under torchrun every rank checks the run folder while rank 0 sweeps it: the sweep must not take a probe."""
    import tempfile

    from ditgraft import utils

    probes = []
    real_mkstemp = tempfile.mkstemp

    def mkstemp_then_sweep(*args, **kwargs):
        fd, path = real_mkstemp(*args, **kwargs)
        probes.append(path)
        utils.remove_orphan_temporaries(str(tmp_path))  # rank 0's sweep lands between create and remove
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_sweep)
    utils.ensure_writable(str(tmp_path), "--run-dir")
    assert len(probes) == 1 and not os.path.exists(probes[0])


def test_orphan_cleanup_spares_another_ranks_sample_part(tmp_path, monkeypatch):
    """Under torchrun rank 0 sweeps the locked sample folder while another rank writes its part file: the sweep
    must spare a live writer's temporary (the name records its pid)."""
    import numpy as np

    from ditgraft import utils
    from ditgraft.eval import adm

    real_savez = np.savez

    def savez_after_sweep(f, **arrays):
        utils.remove_orphan_temporaries(str(tmp_path))  # rank 0's sweep lands inside the write
        return real_savez(f, **arrays)

    monkeypatch.setattr(adm.np, "savez", savez_after_sweep)
    path = adm.save_samples_npz(str(tmp_path / "part1.npz"), np.zeros((2, 4, 4, 3), np.uint8), np.arange(2))
    assert sorted(os.listdir(tmp_path)) == ["part1.npz"] and adm.load_samples_npz(str(path))[0].shape == (2, 4, 4, 3)


@pytest.mark.parametrize("garbage", [b"\x80\x02e.", b"\x80\x02t.", b"\x80\x02h\x05.", b"\x80\x021."],
                         ids=["appends-on-empty-stack", "tuple-without-mark", "unknown-memo", "pop-mark"])
def test_garbage_pickles_are_named_as_corrupt(tmp_path, garbage):
    """Random bytes reach the unpickler's stack and memo operations in any state (IndexError, KeyError, ...): each
    is the one "not a readable PyTorch checkpoint" error, never a bug report."""
    from ditgraft.utils import torch_load_weights

    path = tmp_path / "garbage.pt"
    path.write_bytes(garbage)
    with pytest.raises(ValueError, match="garbage.pt is not a readable PyTorch checkpoint"):
        torch_load_weights(str(path))


def test_stale_lock_of_a_dead_process_is_reported_and_taken_over(d, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".ditgraft.lock").write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "command": "sample"}))
    (out / ".samples.npz.x1y2z3w4.tmp").write_text("orphan of the killed run")
    assert main(["sample", os.path.join(d, "tiny.safetensors"), *SAMPLE, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"stale lock of sample (pid {pid}" in err
    assert sorted(os.listdir(out)) == ["samples.npz", "samples.png"]  # lock released, orphan removed


def test_second_concurrent_run_is_refused_and_the_first_finishes_intact(d, tmp_path, capsys):
    """A pretrain in another process holds the run directory: a second one here exits 2 at once and touches nothing;
    the first finishes with complete logs and metadata."""
    run = str(tmp_path / "run")
    import ditgraft

    root = os.path.dirname(os.path.dirname(ditgraft.__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root, DITGRAFT_TEST_WRITE_PAUSE="0.2")
    cmd = [sys.executable, "-m", "ditgraft.cli", "--threads", "1", "pretrain", "--run-dir", run, "--steps", "6",
           "--batch-size", "2", "--ckpt-every", "2", "--warmup", "0", "--device", "cpu"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = os.path.join(run, ".ditgraft.lock")
    import time

    t0 = time.time()
    while not os.path.exists(lock) and time.time() - t0 < 60:
        time.sleep(0.05)
    assert main(cmd[3:]) == 2
    second = capsys.readouterr().err
    out, err = first.communicate(timeout=300)
    assert f"is in use by pid {first.pid}" in second and "Traceback" not in second
    assert first.returncode == 0, err
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [6]  # log_every 10: the last step only, written once
    assert json.load(open(os.path.join(run, "pretrain_info.json")))["loop"]["steps"] == 6
    assert not os.path.exists(lock)


# --- the recipe parser never fails with anything but a ValueError ------------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=12), st.sampled_from(["attn", "mlp", "hyena_x", "interleave", "1:8:2", "all",
                                                             "auto", "cosine", "testbed", "stream", ".inf"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                       max_leaves=12)
_keys = st.sampled_from(["name", "teacher", "grafts", "stage1", "stage2", "eval", "seed", "device", "slot",
                         "layers", "operator", "options", "lr", "steps", "select", "fraction", "count", "source"])
_recipes = st.one_of(_values, st.dictionaries(_keys, _values, max_size=6), st.fixed_dictionaries({
    "grafts": st.lists(st.dictionaries(_keys, _values, max_size=5), max_size=3),
    "stage1": st.dictionaries(_keys, _values, max_size=3)}))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_recipes)
def test_parse_recipe_returns_a_recipe_or_raises_a_value_error(data):
    from ditgraft.recipe import Recipe, parse_recipe

    try:
        out = parse_recipe(data, "fuzz.yaml")
    except ValueError as err:
        assert str(err).startswith("invalid recipe fuzz.yaml")
    else:
        assert isinstance(out, Recipe)
        pickle.dumps(out.to_dict())
