"""The paper's released grafted checkpoints: a release-format model.pt ({'ema': state_dict}) plus its YAML, built
offline from a tiny grafted DiT with random weights, imports, samples and evaluates like any ditgraft checkpoint."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import yaml

from helpers import tiny_dit


def _release(tmp_path, slot="attn", operator="hyena_x", release=("mha", "hyena_x"), options=None, layers=(1, 3)):
    from ditgraft.graft.surgery import ResolvedGraft, graft_model

    # DiT-S/2 has 6 heads; the weights give everything else (a tiny width and depth here)
    teacher = tiny_dit(depth=4, input_size=8, patch_size=2, in_channels=4, hidden_size=24, num_heads=6,
                       num_classes=1000, cfg_channels=3)
    grafts = [ResolvedGraft(slot, i, operator, dict(options or {})) for i in layers]
    student = graft_model(teacher, grafts, seed=3)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save({"ema": student.state_dict()}, tmp_path / "model.pt")
    cfg = {"operator": {"type": release[0], "name": release[1], "config_filepath": "configs/x.yaml"},
           "sample_config": {"init_type": "graft", "dit_model_name": "DiT-S/2", "image_size": 64,
                             "graft_indexes": list(layers)}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return student.eval(), str(tmp_path / "model.pt"), str(tmp_path / "config.yaml")


@pytest.mark.parametrize("slot,operator,release,options", [
    ("attn", "hyena_x", ("mha", "hyena_x"), {"kernel_size": 3}),
    ("attn", "hyena_y", ("mha", "hyena_y"), {}),
    ("mlp", "mlp", ("mlp", "mlp"), {"ratio": 3}),
    ("mlp", "mlp_hyena_x", ("mlp", "mlp_hyena_x"), {}),
    ("attn", "mamba2", ("mha", "mamba2"), {"d_state": 8, "headdim": 8}),
])
def test_release_checkpoint_imports_with_sizes_from_the_weights(tmp_path, slot, operator, release, options):
    from ditgraft.graft.surgery import load_any
    from ditgraft.graft.release import import_release

    student, model_pt, config = _release(tmp_path, slot, operator, release, options)
    out = import_release(model_pt, config, str(tmp_path / "student.safetensors"))
    model, meta = load_any(out)
    assert [g["layer"] for g in meta["grafts"]] == [1, 3] and meta["release"]["operator"] == release[1]
    assert model.cfg_channels == 3 and model.num_heads == 6
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 1000])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), student(x, t, y), atol=1e-6, rtol=0)
    if operator == "hyena_x":  # the Python API reads the release directly too
        import ditgraft

        direct = ditgraft.load_model(model_pt, release_config=config)
        assert direct.ditgraft_meta["grafts"] == meta["grafts"]
        with torch.no_grad():
            torch.testing.assert_close(direct(x, t, y), student(x, t, y), atol=1e-6, rtol=0)


def test_imported_release_samples_and_evaluates(tmp_path):
    from ditgraft.cli import main
    from ditgraft.eval import adm

    _, model_pt, config = _release(tmp_path)
    out = str(tmp_path / "student.safetensors")
    assert main(["import-release", model_pt, config, "--out", out]) == 0
    pytest.importorskip("diffusers")
    from helpers import tiny_vae
    from latent_helpers import TinyFeatures

    from ditgraft.eval.evaluate import evaluate_samples

    tiny_vae().save_pretrained(tmp_path / "vae")
    assert main(["sample", out, "--vae", str(tmp_path / "vae"), "--num-samples", "4", "--steps", "2",
                 "--batch-size", "4", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 0
    samples = os.path.join(tmp_path, "s", "samples.npz")
    images, labels = adm.load_samples_npz(samples)
    assert images.shape == (4, 16, 16, 3) and labels.tolist() == [0, 1, 2, 3]
    ref = adm.save_reference_batch(str(tmp_path / "ref.npz"), np.random.default_rng(0).integers(
        0, 256, (6, 16, 16, 3), dtype=np.uint8))
    m = evaluate_samples(samples, features="inception", reference=str(ref), net=TinyFeatures())
    assert m["num"] == 4 and np.isfinite(m["fid"]) and np.isfinite(m["sfid"])


def test_release_config_errors_name_the_field(tmp_path):
    from ditgraft.graft.release import import_release

    _, model_pt, config = _release(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"operator": {"type": "mha", "name": "hyena_z"},
                                   "sample_config": {"graft_indexes": [1]}}))
    with pytest.raises(ValueError, match="mha/hyena_z is not allowed"):
        import_release(model_pt, str(bad), str(tmp_path / "x.safetensors"))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({"operator": {"type": "mha", "name": "hyena_x"},
                                     "sample_config": {"dit_model_name": "DiT-S/2", "graft_indexes": [1, 2]}}))
    with pytest.raises(ValueError, match="blocks.2.attn.short_filter.weight"):
        import_release(model_pt, str(wrong), str(tmp_path / "x.safetensors"))
