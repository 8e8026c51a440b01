"""The model-family seam end to end for a caption-conditioned family: a tiny PixArt teacher through stage 1,
stage 2, protocol sampling, the quick and the decision evaluation (tiny VAE, tiny feature network) and the
locality analysis;
features a family does not support are refused in one line before any work."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers_helpers import CAPTION_DIM, tiny_pixart  # noqa: E402
from helpers import tiny_vae  # noqa: E402
from latent_helpers import TinyFeatures  # noqa: E402


def _caption_data(path: str, n: int = 12, tokens: int = 5) -> str:
    from ditgraft.data.captions import save_caption_latents

    g = torch.Generator().manual_seed(0)
    mask = torch.ones(n, tokens, dtype=torch.long)
    mask[::2, -2:] = 0  # padded captions
    neg_mask = torch.zeros(1, tokens, dtype=torch.long)
    neg_mask[:, 0] = 1
    save_caption_latents(path, torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, tokens, CAPTION_DIM, generator=g),
                         mask, torch.randn(1, tokens, CAPTION_DIM, generator=g), neg_mask)
    return path


@pytest.fixture(scope="module")
def pixart_setup(tmp_path_factory):
    from ditgraft.eval import adm

    d = tmp_path_factory.mktemp("seam")
    tiny_pixart().save_pretrained(str(d / "teacher"))
    tiny_vae().save_pretrained(str(d / "vae"))
    rng = np.random.default_rng(0)
    ref = adm.save_reference_batch(str(d / "ref.npz"), rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
    return {"teacher": f"diffusers:{d / 'teacher'}", "vae": str(d / "vae"), "ref": str(ref),
            "data": _caption_data(str(d / "pairs.npz"))}


def _recipe(s, **eval_kw):
    from ditgraft.recipe import parse_recipe

    return parse_recipe({
        "name": "seam_pixart", "teacher": {"source": s["teacher"]},
        "grafts": [{"slot": "attn", "layers": [1], "operator": "hyena_x"}],
        "stage1": {"data": s["data"], "samples": 8, "val_samples": 4, "steps": 2, "batch_size": 4, "eval_every": 2,
                   "extract_batch_size": 4},
        "stage2": {"data": s["data"], "steps": 2, "batch_size": 4, "ckpt_every": 2},
        "eval": {"num": 10, "steps": 2, "vae": s["vae"], "features": "inception", "reference": s["ref"], **eval_kw},
        "device": "cpu"}, "test")


def test_pixart_grafts_samples_evaluates_and_analyses(pixart_setup, tmp_path, monkeypatch):
    from ditgraft.analysis.locality import analyze_model
    from ditgraft.api import sample
    from ditgraft.data.captions import load_caption_latents
    from ditgraft.eval import evaluate
    from ditgraft.eval.sampling import generate
    from ditgraft.diffusion.samplers import SamplingConfig
    from ditgraft.graft.pipeline import run_graft
    from ditgraft.graft.surgery import load_grafted
    from ditgraft.utils import read_json

    s = pixart_setup
    net = TinyFeatures()
    monkeypatch.setattr(evaluate, "inception_network", lambda weights=None, device="cpu": net)
    run = str(tmp_path / "run")
    report = run_graft(_recipe(s, protocol="decision", seeds=[0, 1], resamples=20), run, progress=False,
                       log=lambda *a: None)
    assert report
    decision = read_json(os.path.join(run, "eval", "grafted_decision.json"))
    assert decision["num"] == 20 and decision["floor"] is None and decision["model"]["accuracy"] is None
    assert np.isfinite(decision["ratio"]["value"]) and decision["verdicts"]["gap"] is None
    assert "FID ratio grafted/teacher" in open(os.path.join(run, "eval", "decision.txt")).read()
    for tag in ("grafted", "teacher"):
        with np.load(os.path.join(run, "eval", f"{tag}.npz")) as f:
            assert f["arr_0"].shape == (10, 16, 16, 3) and f["arr_0"].dtype == np.uint8  # VAE-decoded RGB
            assert f["arr_1"].tolist() == list(range(10))  # caption indices: caption i for sample i
        m = read_json(os.path.join(run, "eval", f"{tag}_metrics.json"))
        assert m["num"] == 10 and np.isfinite(m["fid"]) and m["protocol"]["clip_denoised"] is False

    student, _ = load_grafted(os.path.join(run, "student.safetensors"))
    # sampling: caption i % n conditions sample i, so a split run gives the same samples
    _, (emb, mask) = load_caption_latents(s["data"])
    cfg = SamplingConfig(steps=2, cfg_scale=1.0)
    raw, labels = generate(student, 14, cfg, seed=3, batch_size=5, raw=True, captions=(emb, mask))
    assert raw.shape == (14, 4, 8, 8) and labels.tolist() == [i % 12 for i in range(14)]
    part, _ = generate(student, 14, cfg, seed=3, batch_size=5, raw=True, captions=(emb, mask), rank=1, world=2)
    np.testing.assert_array_equal(part, raw[5:10])
    images, _ = sample(student, 4, steps=2, cfg_scale=1.5, batch_size=4, vae=s["vae"], captions=s["data"])
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    with pytest.raises(ValueError, match="captions are missing"):
        generate(student, 2, cfg)

    # analysis: the teacher's diffusers self-attention is measured through its MHA conversion; the grafted
    # Hyena slot has no attention matrix
    res = analyze_model(student, num_samples=4, steps=2, batch_size=4, captions=s["data"])
    assert [row["layer"] for row in res["layers"]] == [0, 1, 2, 3]
    assert res["layers"][0]["attention"] is not None and res["layers"][1]["attention"] is None
    assert [k["layer"] for k in res["skipped"]] == [1]


def test_pixart_refusals_name_family_and_feature(pixart_setup, tmp_path):
    from ditgraft.graft.pipeline import run_graft
    from ditgraft.recipe import parse_recipe

    s = pixart_setup
    run = str(tmp_path / "run")
    with pytest.raises(ValueError, match="features='testbed' does not apply to the pixart family"):
        run_graft(_recipe(s, features="testbed", reference=None), run, progress=False, log=lambda *a: None)
    assert not os.path.exists(os.path.join(run, "stage1"))
    r = _recipe(s).to_dict()
    r["restructure"] = {"parallel_pairs": [[0, 1]]}
    with pytest.raises(ValueError, match="recipe restructure: the pixart family does not support restructure"):
        run_graft(parse_recipe(r, "test"), run, progress=False, log=lambda *a: None)
    assert not os.path.exists(os.path.join(run, "stage1"))


def test_a_selector_needing_analysis_is_refused_for_a_family_without_it(tmp_path):
    """``layers: most_local`` on an SD3 teacher: one line naming the family and the feature, before any work."""
    from diffusers_helpers import tiny_sd3

    from ditgraft.graft.pipeline import run_graft
    from ditgraft.recipe import parse_recipe

    tiny_sd3().save_pretrained(str(tmp_path / "sd3"))
    recipe = parse_recipe({
        "name": "sd3_local", "teacher": {"source": f"diffusers:{tmp_path / 'sd3'}"},
        "grafts": [{"slot": "mlp", "layers": {"select": "most_local", "count": 1}, "operator": "mlp",
                    "options": {"ratio": 3}}],
        "stage1": {"data": "unused.npz"}, "stage2": {"data": "unused.npz"}, "eval": {"enabled": False},
        "device": "cpu"}, "test")
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^grafts layers: most_local: the sd3 family does not support analysis "):
        run_graft(recipe, str(run), progress=False, log=lambda *a: None)
    assert not (run / "analysis").exists() and not (run / "plan.json").exists()
