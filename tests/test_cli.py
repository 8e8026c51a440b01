"""The command line: clear errors with exit code 2, ops table, and sampling sharded over ranks with torchrun."""
import os
import subprocess
import sys

import numpy as np
import pytest

from ditgraft.cli import main


def test_bad_recipe_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    bad.write_text("grafts:\n  - {slot: attn, layers: [1], operator: hyena_z}\n")
    assert main(["graft", str(bad), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "grafts.0.operator = 'hyena_z'" in err and "allowed:" in err
    assert not (tmp_path / "run").exists()  # nothing written for an invalid recipe


def test_ops_table_prints_paper_counts(capsys):
    assert main(["ops", "--dim", "1152", "--tokens", "256"]) == 0
    out = capsys.readouterr().out
    for count in ("5,330,304", "8,290,864", "10,626,176", "5,313,024"):
        assert count in out


@pytest.mark.slow
def test_sample_sharded_with_torchrun_equals_single_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["sample", "testbed", "--num-samples", "12", "--batch-size", "4", "--steps", "2", "--device", "cpu"]
    subprocess.run([sys.executable, "-m", "ditgraft.cli", *common, "--out", str(tmp_path / "one")], check=True,
                   env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                    "ditgraft.cli", *common, "--out", str(tmp_path / "two")], check=True, env=env,
                   capture_output=True)
    a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert a["arr_0"].shape == (12, 32, 32, 1)
    assert (a["arr_0"] == b["arr_0"]).all() and (a["arr_1"] == b["arr_1"]).all()
    assert sorted(os.listdir(tmp_path / "two")) == ["samples.npz", "samples.png"]  # rank parts cleaned up


def test_eval_model_with_seed_changes_only_the_sampling(tmp_path):
    """`ditgraft eval MODEL --seed S`: the protocol records the seed; another seed draws other samples."""
    import json

    runs = {}
    for seed in (0, 5):
        out = tmp_path / f"s{seed}"
        assert main(["eval", "testbed", "--num-samples", "10", "--seed", str(seed), "--out", str(out),
                     "--device", "cpu"]) == 0
        runs[seed] = json.loads((out / "samples_metrics.json").read_text())
        assert runs[seed]["protocol"]["seed"] == seed and runs[seed]["num"] == 10
    assert runs[0]["fid"] != runs[5]["fid"]


def test_synth_is_the_sampling_entry_point_in_model_space(tmp_path):
    """`ditgraft synth` writes the raw samples of `generate` (seed formula, batches and labels included), and the
    images `generate` returns for the same seed are exactly those samples, quantised."""
    import torch

    from ditgraft.data.latents import load_latents
    from ditgraft.data.mnist5k import to_uint8
    from ditgraft.diffusion.samplers import SamplingConfig
    from ditgraft.eval.sampling import generate
    from ditgraft.models.checkpoints import load_dit

    out = tmp_path / "synth.npz"
    assert main(["synth", "testbed", "--num-samples", "5", "--batch-size", "2", "--steps", "2", "--seed", "3",
                 "--out", str(out), "--device", "cpu"]) == 0
    x, y = load_latents(str(out))
    assert x.shape == (5, 1, 32, 32) and y.tolist() == [0, 1, 2, 3, 4]
    model, _ = load_dit("testbed")
    images, labels = generate(model, 5, SamplingConfig(steps=2, clip_denoised=True), seed=3, batch_size=2)
    assert (labels == y.numpy()).all()
    assert (to_uint8(x) == images).all()
    other, _ = generate(model, 5, SamplingConfig(steps=2, clip_denoised=True), seed=4, batch_size=2, raw=True)
    assert not torch.equal(torch.from_numpy(other), x)


def test_eval_compile_is_refused_where_nothing_is_sampled(capsys):
    assert main(["eval", "--floor", "--compile"]) == 2
    assert "--compile: not used with --floor" in capsys.readouterr().err
    assert main(["eval", "samples.npz", "--compile"]) == 2
    assert "--compile: not used with a samples .npz" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_compile_samples_through_the_compiled_forward(tmp_path, capsys):
    """`ditgraft eval MODEL --compile` and `--seeds ... --against ... --compile`: the metrics record compiled
    sampling, for the model and its baseline (the tiny structure every compiling test shares)."""
    import json

    from helpers import COMPILE_BATCH, compile_dit
    from ditgraft.models.checkpoints import save_safetensors

    paths = []
    for seed in (1, 2):
        m = compile_dit(seed=seed)
        paths.append(str(tmp_path / f"m{seed}.safetensors"))
        save_safetensors(paths[-1], m, {"model_config": m.config})
    common = ["--num-samples", str(COMPILE_BATCH), "--device", "cpu", "--compile"]
    assert main(["eval", paths[0], "--out", str(tmp_path / "quick")] + common) == 0
    assert json.loads((tmp_path / "quick" / "samples_metrics.json").read_text())["compiled"] is True
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["eval", paths[0], "--seeds", "0,1", "--against", paths[1], "--out", str(a), "--against-out", str(b),
                 "--resamples", "20"] + common) == 0
    assert "FID ratio" in capsys.readouterr().out
    for d in (a, b):
        assert json.loads((d / "samples_seed1_metrics.json").read_text())["compiled"] is True
