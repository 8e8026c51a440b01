"""The ``ditgraft`` commands under ``torchrun --standalone --nproc_per_node 2`` (gloo on this CPU): pretrain (and its
resume), ``graft`` through every stage, and ``sample``; rank 0 alone writes, and a 2-rank run matches one process
where it must (stage 1's operators and parallel units, the sample set). Each torchrun start costs ~20 s, so the
file has five."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import save_mnist_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(*args: str, cwd) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ditgraft.cli", "--threads", "1", *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a timeout ends the workers too
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(args)} timed out:\n{out}\n{err}")
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{out}\n{err}"
    return out


def rows(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """2-rank pretraining of the testbed size for 4 steps, then a 2-rank resume to 6 steps."""
    run = tmp_path_factory.mktemp("pretrain") / "run"
    common = ["pretrain", "--run-dir", str(run), "--batch-size", "8", "--ckpt-every", "2", "--warmup", "0",
              "--device", "cpu"]
    torchrun(*common, "--steps", "4", cwd=run.parent)
    first = json.loads((run / "pretrain_info.json").read_text())
    torchrun(*common, "--steps", "6", cwd=run.parent)
    return run, first


def test_pretrain_rank0_writes_and_resumes(pretrained):
    run, first = pretrained
    info = json.loads((run / "pretrain_info.json").read_text())
    log = rows(run / "metrics.jsonl")
    assert [r["step"] for r in log] == [4, 6]  # one writer (logs every 10 steps and at the end), resumed at 4
    # the recorded loss is the one rank 0 logged: the mean over both ranks' shares of the global batch
    assert first["final_loss"] == log[0]["loss"] and info["final_loss"] == log[1]["loss"]
    assert [s["from_step"] for s in info["stages"]] == [0, 4]
    assert sorted(os.listdir(run / "checkpoints")) == ["step_0000004", "step_0000006"]
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]


def test_sample_shards_seeds_and_matches_one_process(pretrained, tmp_path):
    from ditgraft.diffusion.samplers import SamplingConfig
    from ditgraft.eval.adm import load_samples_npz
    from ditgraft.eval.sampling import generate
    from ditgraft.graft.surgery import load_any

    run, _ = pretrained
    model_path = str(run / "model.safetensors")
    torchrun("sample", model_path, "--out", str(tmp_path / "s"), "--num-samples", "6", "--batch-size", "2",
             "--steps", "2", "--device", "cpu", cwd=tmp_path)
    assert sorted(os.listdir(tmp_path / "s")) == ["samples.npz", "samples.png"]  # the per-rank parts are merged
    images, labels = load_samples_npz(str(tmp_path / "s" / "samples.npz"))
    model, _ = load_any(model_path, map_location="cpu")
    want, want_labels = generate(model, 6, SamplingConfig(sampler="ddim", steps=2, cfg_scale=1.5), seed=0,
                                 batch_size=2)
    np.testing.assert_array_equal(labels, want_labels)  # 3 batches: rank 0 made 0 and 2, rank 1 made 1
    assert np.abs(images.astype(int) - want.astype(int)).max() <= 1  # uint8 rounding of float-level differences


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    return save_mnist_teacher(str(tmp_path_factory.mktemp("teacher")))


def recipe_dict(teacher_file: str, cache: str, grad_accum_steps: int = 1) -> dict:
    return {
        "name": "tiny", "teacher": {"source": teacher_file}, "device": "cpu",
        "grafts": [{"slot": "attn", "layers": [0, 1], "operator": "hyena_x"}],
        "stage1": {"samples": 33, "val_samples": 7, "steps": 6, "batch_size": 8, "eval_every": 3, "cache": cache,
                   "grad_accum_steps": grad_accum_steps},
        "stage2": {"steps": 3, "batch_size": 8, "ckpt_every": 2, "ema_decay": 0.9, "sharding": "fsdp"},
        "eval": {"num": 10, "steps": 2, "baselines": ["teacher"]},
    }


def test_graft_all_stages_and_stage1_matches_one_process(teacher_file, tmp_path):
    """Stage 1 on 2 ranks (extraction of 33 training samples sharded into the disk cache, of 7 validation samples
    sharded and all-gathered; the 2 operators data parallel, each rank's 4 rows of a step in 2 micro-batches) gives
    the same operator weights as one process with the same global batch, the memory cache and no accumulation:
    measured max abs difference 3.0e-8 (7.5e-8 without the accumulation; float reduction order; asserted
    1e-5), and the same validation MSEs. Stage 2 runs sharded (FSDP2) and rank 0 writes the gathered student."""
    import yaml

    from ditgraft.graft.pipeline import run_graft
    from ditgraft.recipe import parse_recipe

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(teacher_file, "disk", grad_accum_steps=2)))
    out = torchrun("graft", str(path), "--run-dir", str(tmp_path / "ddp"), "--quiet", cwd=tmp_path)
    assert out.count("report:") == 1  # rank 0 alone prints
    ddp = tmp_path / "ddp"
    for name in ("recipe.yaml", "plan.json", "timings.json", "stage1/summary.json", "student.safetensors",
                 "eval/grafted_metrics.json", "eval/teacher_metrics.json", "report.md", "report.json"):
        assert (ddp / name).exists(), name
    assert not [n for n in os.listdir(ddp / "eval") if n.startswith("part")]
    report = json.loads((ddp / "report.json").read_text())
    assert set(report["eval"]) == {"grafted", "teacher"} and report["eval"]["grafted"]["num"] == 10
    summary = json.loads((ddp / "stage1" / "summary.json").read_text())["operators"]
    assert set(summary) == {"attn0", "attn1"}

    one = tmp_path / "one"
    run_graft(parse_recipe(recipe_dict(teacher_file, "memory")), str(one), stages=("stage1",), progress=False,
              log=lambda *_: None)
    a = load_file(str(ddp / "stage1" / "loop" / "checkpoints" / "step_0000006" / "model.safetensors"))
    b = load_file(str(one / "stage1" / "loop" / "checkpoints" / "step_0000006" / "model.safetensors"))
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"stage 1, 2 ranks vs 1: max abs weight difference {diff:.3g}")
    assert diff < 1e-5
    # the logged loss is the global batch's on both
    la, lb = rows(ddp / "stage1" / "loop" / "metrics.jsonl"), rows(one / "stage1" / "loop" / "metrics.jsonl")
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    assert la[-1]["loss"] == pytest.approx(lb[-1]["loss"], rel=1e-5)
    best = json.loads((one / "stage1" / "summary.json").read_text())["operators"]
    for key in summary:
        assert summary[key]["step"] == best[key]["step"]
        assert summary[key]["val_mse"] == pytest.approx(best[key]["val_mse"], rel=1e-5)
    assert (ddp / "stage1" / "cache" / "complete.json").exists()
    assert torch.tensor([r["loss"] for r in la]).isfinite().all()


def test_restructure_stage1_and_stage2_on_two_ranks_match_one_process(teacher_file, tmp_path):
    """Restructuring (the teacher's 2 blocks -> 1 parallel unit) on 2 ranks: the unit's stage 1 (extraction of the
    unit's input, conditioning and target sharded into the disk cache, 2 micro-batches per rank) matches one
    process with the memory cache and the same global batch (weights at the last step, best step and validation
    MSE); every rank reads the best unit back for stage 2, which runs data parallel on the restructured student,
    and rank 0 alone writes the student. Stage 2 draws its noise per rank (the loop seeds each rank apart), so its
    weights match the one-process run's up to what two small steps from the same start can move them. Measured
    unit stage-1 difference: 2.5e-6 (L1 loss, lr 3e-3; float reduction order; asserted 1e-5)."""
    import yaml

    from ditgraft.graft.pipeline import run_graft
    from ditgraft.graft.surgery import load_any
    from ditgraft.recipe import parse_recipe

    def recipe(cache: str, accum: int) -> dict:
        return {"name": "tiny_parallel", "teacher": {"source": teacher_file}, "device": "cpu",
                "restructure": {"parallel_pairs": "all"},
                "stage1": {"samples": 33, "val_samples": 7, "steps": 4, "batch_size": 8, "eval_every": 2,
                           "cache": cache, "grad_accum_steps": accum, "lr": 3e-3},
                "stage2": {"steps": 2, "batch_size": 8, "ckpt_every": 2},
                "eval": {"enabled": False, "baselines": []}}

    path = tmp_path / "parallel.yaml"
    path.write_text(yaml.safe_dump(recipe("disk", 2)))
    torchrun("graft", str(path), "--run-dir", str(tmp_path / "ddp"), "--quiet", cwd=tmp_path)
    ddp = tmp_path / "ddp"
    assert (ddp / "stage1_units" / "cache" / "complete.json").exists()
    assert sorted(n for n in os.listdir(ddp / "stage1_units" / "cache") if n.endswith(".npy")) == [
        "pair0_1_c.npy", "pair0_1_in.npy", "pair0_1_out.npy"]
    one = tmp_path / "one"
    run_graft(parse_recipe(recipe("memory", 1)), str(one), stages=("stage1", "stage2"), progress=False,
              log=lambda *_: None)
    ckpt = os.path.join("stage1_units", "loop", "checkpoints", "step_0000004", "model.safetensors")
    a, b = load_file(str(ddp / ckpt)), load_file(str(one / ckpt))
    assert a.keys() == b.keys() and any(".merge." in k for k in a)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"unit stage 1, 2 ranks vs 1: max abs weight difference {diff:.3g}")
    assert diff < 1e-5
    units = json.loads((ddp / "stage1_units" / "summary.json").read_text())["units"]
    want = json.loads((one / "stage1_units" / "summary.json").read_text())["units"]
    assert list(units) == ["pair0_1"]
    assert units["pair0_1"]["step"] == want["pair0_1"]["step"]
    assert units["pair0_1"]["val_mse"] == pytest.approx(want["pair0_1"]["val_mse"], rel=1e-5)
    # stage 2 ran on both ranks from the best unit and rank 0 wrote the restructured student once
    assert [r["step"] for r in rows(ddp / "stage2" / "loop" / "metrics.jsonl")][-1] == 2
    student, meta = load_any(str(ddp / "student.safetensors"))
    reference, _ = load_any(str(one / "student.safetensors"))
    assert meta["restructure"]["parallel_pairs"] == [[0, 1]] and len(student.blocks) == 1
    # 2 Adam steps at lr 1e-4 move a weight by about 2e-4 from the same start; stage 1 moved the merge further
    # (so a student that missed the best unit would be off by more)
    eye = torch.eye(student.blocks[0].merge.out_features)
    assert (reference.blocks[0].merge.weight - torch.cat([eye, eye], 1)).abs().max() > 2e-3
    for (k, v), w in zip(student.state_dict().items(), reference.state_dict().values()):
        assert torch.isfinite(v).all() and (v - w).abs().max() < 1e-3, k


def test_fsdp2_on_two_ranks_matches_one_process_and_resumes(tmp_path):
    """The loop under FSDP2 (``sharding="fsdp"``, gloo, 2 ranks; per-block shards, EMA, clipping, 2 micro-batches
    per rank) gives the weights of one process with the same global batch (deterministic step), those of DDP, and
    the same weights when stopped at step 2 and resumed (the sharded optimizer state through its checkpoint)."""
    worker = os.path.join(ROOT, "tests", "fsdp_worker.py")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, worker, str(tmp_path)], env=env, check=True, timeout=300)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           worker, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, fsdp = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "fsdp.safetensors"))
    assert one.keys() == fsdp.keys() and any(k.startswith("ema.") for k in one)
    from fsdp_worker import tiny_dit

    init = tiny_dit().state_dict()
    assert max(float((one[f"model.{k}"] - v).abs().max()) for k, v in init.items()) > 1e-3  # it trained
    for other, tol in (("fsdp", 1e-5), ("ddp", 1e-5), ("fsdp_resumed", 1e-6)):
        b = load_file(str(tmp_path / f"{other}.safetensors"))
        ref = one if other != "fsdp_resumed" else fsdp
        diff = max(float((ref[k] - b[k]).abs().max()) for k in ref)
        print(f"{other} vs {'one process' if ref is one else 'fsdp'}: max abs difference {diff:.3g}")
        assert diff < tol, other
    ck = load_file(str(tmp_path / "fsdp" / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in ck.items()} == {k[6:]: tuple(v.shape) for k, v in one.items()
                                                         if k.startswith("model.")}  # full, unsharded weights
