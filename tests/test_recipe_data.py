"""``data:`` in a recipe: a mapping whose options reach the loader (image folder with its size, latents with scale
and labels), validated at parse time; an image-folder recipe and a latents recipe run stage 1 and stage 2."""
import json
import os

import numpy as np
import pytest
import torch

from ditgraft.data.latents import save_latents
from ditgraft.graft.data_split import load_split
from ditgraft.graft.pipeline import run_graft
from ditgraft.models.checkpoints import save_safetensors
from ditgraft.recipe import Data, parse_recipe
from helpers import tiny_dit

GRAFT = [{"slot": "attn", "layers": [1], "operator": "hyena_x"}]


def _recipe(teacher: str, data) -> dict:
    return {"name": "tiny", "teacher": {"source": teacher}, "grafts": GRAFT,
            "stage1": {"data": data, "samples": 12, "val_samples": 4, "steps": 2, "batch_size": 4, "eval_every": 1},
            "stage2": {"data": data, "steps": 2, "batch_size": 4, "ckpt_every": 1},
            "eval": {"enabled": False, "baselines": []}}


def _teacher(tmp_path, **kw) -> str:
    model = tiny_dit(depth=2, **kw)
    path = str(tmp_path / "teacher.safetensors")
    save_safetensors(path, model, {"model_config": model.config})
    return path


def _image_folder(root, n_per_class=8, size=12):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(root / c)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return str(root)


@pytest.mark.parametrize("data, text", [
    ("mnist5k", "mnist5k"), ("mnist5k:all", "mnist5k:all"), ("runs/synth.npz", "runs/synth.npz"),
    ({"source": "latents", "path": "z.npy", "scale": 0.18215, "labels": "y.npy"}, None),
    ({"source": "images", "path": "imgs", "image_size": 32}, None),
])
def test_data_forms_round_trip(data, text):
    r = parse_recipe({"grafts": GRAFT, "stage1": {"data": data}})
    dumped = r.to_dict()["stage1"]["data"]
    assert r.stage1.data.text() == text
    assert dumped == (text if text is not None else {"channels": 3, **data} if data["source"] == "images" else data)
    assert parse_recipe({"grafts": GRAFT, "stage1": {"data": dumped}}).stage1.data == r.stage1.data


@pytest.mark.parametrize("data, needle", [
    ("imgs", "stage2.data = 'imgs': 'imgs' is not a data source"),
    ({"source": "images", "path": "imgs"}, "needs image_size"),
    ({"source": "images", "image_size": 8}, "needs path"),
    ({"source": "latents", "path": "z.npz", "image_size": 8}, "source='latents' takes no image_size"),
    ({"source": "latents", "path": "z.png"}, "latents are a .npy or .npz file"),
    ({"source": "latents", "path": "z.npz", "scale": 0}, "stage2.data.scale = 0"),
    ({"source": "webdataset", "path": "x"}, "stage2.data.source = 'webdataset'"),
    ({"source": "images", "path": "imgs", "image_size": 8, "channels": 2}, "stage2.data.channels = 2"),
])
def test_bad_data_is_refused_at_parse_time(data, needle):
    with pytest.raises(ValueError) as info:
        parse_recipe({"grafts": GRAFT, "stage2": {"data": data}})
    assert needle in str(info.value)


def test_image_folder_options_reach_the_loader(tmp_path):
    folder = _image_folder(tmp_path / "imgs", size=12)
    x, y, xv, yv = load_split(Data(source="images", path=folder, image_size=8, channels=1), 100, 4)
    assert x.shape == (12, 1, 8, 8) and xv.shape == (4, 1, 8, 8)
    assert sorted(set(y.tolist()) | set(yv.tolist())) == [0, 1]


def test_latents_options_reach_the_loader(tmp_path):
    z = torch.randn(10, 4, 4, 4)
    np.save(tmp_path / "z.npy", z.numpy())
    np.save(tmp_path / "y.npy", np.arange(10) % 3)
    x, y, xv, yv = load_split(Data(source="latents", path=str(tmp_path / "z.npy"), scale=2.0,
                                   labels=str(tmp_path / "y.npy")), 100, 2)
    torch.testing.assert_close(torch.cat([x, xv]), 2.0 * z)
    assert torch.cat([y, yv]).tolist() == [i % 3 for i in range(10)]


def _run_both_stages(recipe: dict, run: str) -> None:
    run_graft(parse_recipe(recipe), run, stages=("stage1", "stage2"), progress=False, log=lambda *_: None)
    summary = json.load(open(os.path.join(run, "stage1", "summary.json")))
    assert summary["plan"]["samples"] == 12 and summary["plan"]["val_samples"] == 4
    assert os.path.exists(os.path.join(run, "student.safetensors"))
    with open(os.path.join(run, "stage2", "loop", "metrics.jsonl")) as f:
        assert max(json.loads(line)["step"] for line in f) == 2


def test_image_folder_recipe_runs_stage1_and_stage2(tmp_path):
    folder = _image_folder(tmp_path / "imgs", size=20)  # 16 images of 20x24 pixels, centre-cropped to 16x16
    teacher = _teacher(tmp_path, input_size=16, patch_size=4, in_channels=3)
    _run_both_stages(_recipe(teacher, {"source": "images", "path": folder, "image_size": 16}), str(tmp_path / "run"))


def test_latents_recipe_runs_stage1_and_stage2(tmp_path):
    path = str(tmp_path / "latents.npz")
    save_latents(path, np.random.default_rng(0).standard_normal((16, 4, 8, 8)).astype(np.float32),
                 np.arange(16) % 10)
    teacher = _teacher(tmp_path, input_size=8, patch_size=2, in_channels=4)
    _run_both_stages(_recipe(teacher, {"source": "latents", "path": path, "scale": 0.5}), str(tmp_path / "run"))


def test_stage2_samples_draw_a_fixed_subset_and_a_too_large_one_is_refused(tmp_path):
    from ditgraft.graft.data_split import check_data
    from ditgraft.graft.teacher import load_teacher

    half, _, _, _ = load_split("mnist5k", 2250, 250, seed=0)
    again, _, _, _ = load_split("mnist5k", 2250, 250, seed=0)
    full, _, _, _ = load_split("mnist5k", None, 250, seed=0)
    assert len(half) == 2250 and len(full) == 4500 and torch.equal(half, again)
    recipe = parse_recipe({"name": "tiny", "teacher": {"source": "testbed"}, "grafts": GRAFT,
                           "stage2": {"samples": 4501}, "eval": {"enabled": False, "baselines": []}})
    teacher, _ = load_teacher(recipe, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"stage2.samples = 4501: .* only 4500 training rows"):
        check_data(recipe, teacher)
    assert "samples" not in parse_recipe({**recipe.to_dict(), "stage2": {}}).to_dict()["stage2"]
