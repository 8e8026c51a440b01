"""The DiT-XL/2 path in miniature: images -> VAE latents -> stage 1 -> stage 2 -> decoded samples -> metrics."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from helpers import tiny_dit  # noqa: E402
from helpers import tiny_vae  # noqa: E402
from latent_helpers import TinyFeatures, write_image_folder  # noqa: E402


@pytest.fixture(scope="module")
def latent_setup(tmp_path_factory):
    from ditgraft.cli import main
    from ditgraft.models.checkpoints import save_safetensors

    root = tmp_path_factory.mktemp("latent")
    vae_dir = str(root / "vae")
    tiny_vae().save_pretrained(vae_dir)
    images = write_image_folder(str(root / "images"))
    lat = str(root / "latents.npz")
    assert main(["encode", images, "--vae", vae_dir, "--out", lat, "--image-size", "16", "--flip",
                 "--batch-size", "3", "--device", "cpu"]) == 0
    teacher = tiny_dit(depth=2, input_size=8, patch_size=2, in_channels=4, num_classes=2)
    teacher_path = str(root / "teacher.safetensors")
    save_safetensors(teacher_path, teacher, {"model_config": teacher.config})
    return dict(root=root, vae=vae_dir, images=images, latents=lat, teacher=teacher_path)


def test_encode_writes_the_latents_file_stage1_reads(latent_setup):
    from ditgraft.data.images import ImageFolderDataset
    from ditgraft.data.latents import SD_VAE_SCALE, load_latents
    from ditgraft.data.vae import encode_images, load_vae

    x, y = load_latents(latent_setup["latents"])
    assert x.shape == (16, 4, 8, 8) and torch.isfinite(x).all()
    assert y.tolist() == [0] * 8 + [1] * 8  # folder names, sorted; each image followed by its flip
    with np.load(latent_setup["latents"]) as f:
        assert f["classes"].tolist() == ["cat", "dog"]
    # rows 0 and 1: image 0 and its mirror image, through the VAE with the same posterior draw as `encode`
    ds = ImageFolderDataset(latent_setup["images"], 16)
    vae = load_vae(latent_setup["vae"])
    img = ds[0][0]
    pair = torch.stack([img, img.flip(-1)])
    want = encode_images(vae, pair, seeds=[0, 1])  # seed 0: rows 0 and 1 draw with seeds 0 and 1
    torch.testing.assert_close(x[:2], want, atol=1e-6, rtol=0)
    # the scale is DiT's: raw posterior sample x 0.18215
    post = vae.encode(pair[:1]).latent_dist
    raw = post.mean + post.std * torch.randn(post.mean.shape[1:], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(want[:1], raw * SD_VAE_SCALE, atol=1e-6, rtol=0)
    assert not torch.allclose(want[0], post.mean[0] * SD_VAE_SCALE)  # a draw, not the mean
    # --per-class 2: images 0, 1 of "cat" and 4, 5 (the first two of "dog"), rows seeded by their new positions
    from ditgraft.data.vae import encode_folder

    sub = encode_folder(latent_setup["images"], vae, str(latent_setup["root"] / "sub.npz"), image_size=16,
                        per_class=2)
    xs, ys = load_latents(sub)
    assert ys.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(xs[2:3], encode_images(vae, ds[4][0][None], seeds=[2]), atol=1e-6, rtol=0)


def test_latent_recipe_runs_stage1_stage2_sampling_and_inception_eval(latent_setup, tmp_path, monkeypatch):
    from ditgraft.cli import main
    from ditgraft.data.images import load_image_folder
    from ditgraft.eval import adm, evaluate
    from ditgraft.graft.pipeline import run_graft
    from ditgraft.recipe import parse_recipe
    from ditgraft.utils import read_json

    s = latent_setup
    x_img, _ = load_image_folder(s["images"], 16)
    ref = adm.save_reference_batch(str(tmp_path / "ref.npz"),
                                   ((x_img + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    net = TinyFeatures()
    monkeypatch.setattr(evaluate, "inception_network", lambda weights=None, device="cpu": net)
    recipe = parse_recipe({
        "name": "latent", "teacher": {"source": s["teacher"]},
        "grafts": [{"slot": "attn", "layers": [1], "operator": "hyena_x"}],
        "stage1": {"data": s["latents"], "samples": 8, "val_samples": 4, "steps": 3, "batch_size": 4,
                   "eval_every": 3, "extract_batch_size": 4},
        "stage2": {"data": s["latents"], "steps": 2, "batch_size": 4, "ckpt_every": 2},
        "eval": {"num": 10, "steps": 2, "vae": s["vae"], "features": "inception", "reference": str(ref)},
        "device": "cpu"})
    run = str(tmp_path / "run")
    report = run_graft(recipe, run, progress=False, log=lambda *a: None)
    for tag in ("grafted", "teacher"):
        row = report["eval"][tag] if "eval" in report else None
        with np.load(os.path.join(run, "eval", f"{tag}.npz")) as f:
            assert f["arr_0"].shape == (10, 16, 16, 3) and f["arr_0"].dtype == np.uint8  # decoded RGB images
        m = read_json(os.path.join(run, "eval", f"{tag}_metrics.json"))
        assert m["num"] == 10 and np.isfinite(m["fid"]) and m["fid"] > 0 and "sfid" in m and "inception_score" in m
        assert row is None or row["fid"] == m["fid"]
        assert m["protocol"]["clip_denoised"] is False  # latents are not clipped

    # sampling a grafted latent model decodes with the VAE and writes the ADM npz and a PNG folder
    out, pngs = str(tmp_path / "samples"), str(tmp_path / "pngs")
    assert main(["sample", os.path.join(run, "student.safetensors"), "--vae", s["vae"], "--num-samples", "6",
                 "--steps", "2", "--batch-size", "4", "--out", out, "--png-dir", pngs, "--device", "cpu"]) == 0
    images, labels = adm.load_samples_npz(os.path.join(out, "samples.npz"))
    assert images.shape == (6, 16, 16, 3) and labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert sorted(os.listdir(pngs))[:2] == ["000000_0.png", "000001_1.png"] and len(os.listdir(pngs)) == 6
    from PIL import Image

    np.testing.assert_array_equal(np.array(Image.open(os.path.join(pngs, "000003_1.png"))), images[3])

    # eval streams the npz: the same metrics from the file as from the images in memory
    got = evaluate.evaluate_samples(os.path.join(out, "samples.npz"), features="inception", reference=str(ref),
                                    net=net)
    want = evaluate.inception_metrics(images, str(ref), net=net)
    assert got == pytest.approx(want) and got["num"] == 6


def test_latent_model_needs_a_vae(latent_setup, tmp_path, capsys):
    from ditgraft.cli import main

    assert main(["sample", latent_setup["teacher"], "--num-samples", "2", "--steps", "1", "--out",
                 str(tmp_path / "s"), "--device", "cpu"]) == 2
    assert "--vae is missing" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no such folder"):
        from ditgraft.data.vae import load_vae

        load_vae(str(tmp_path / "nope"))
