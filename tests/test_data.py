"""Data loaders: the mnist5k testbed, image folders (Pillow) and precomputed latents (.npy / .npz)."""

import os

import numpy as np
import pytest
import torch

from ditgraft.data.images import ImageFolderDataset, center_crop_arr, load_dataset, load_image_folder
from ditgraft.data.latents import SD_VAE_SCALE, load_latents, save_latents, sibling_labels_path
from ditgraft.data.mnist5k import load_mnist5k, to_uint8

# ----------------------------------------------------------------------------------------------- mnist5k


def test_mnist5k_splits_balance_range_padding():
    x_tr, y_tr = load_mnist5k("train")
    x_va, y_va = load_mnist5k("val")
    x_all, y_all = load_mnist5k("all")
    assert x_tr.shape == (4500, 1, 32, 32) and x_va.shape == (500, 1, 32, 32) and x_all.shape == (5000, 1, 32, 32)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert torch.bincount(y_tr, minlength=10).tolist() == [450] * 10
    assert torch.bincount(y_va, minlength=10).tolist() == [50] * 10
    for x in (x_tr, x_va):
        assert x.min() == -1.0 and x.max() == 1.0
    # the digit sits in the central 28x28: a 2-pixel border of background (-1) all round
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x_all[:, 0][:, border] == -1).all()
    assert (x_all[:, 0, 2:30, 2:30] > -1).flatten(1).any(1).all()  # every image has ink
    # train and val are disjoint and together make the whole file
    assert len(set(map(bytes, to_uint8(x_tr))) & set(map(bytes, to_uint8(x_va)))) < 5  # (MNIST has rare duplicates)
    assert torch.equal(torch.sort(torch.cat([y_tr, y_va])).values, torch.sort(y_all).values)


def test_mnist5k_uint8_round_trip_and_bad_split():
    x, _ = load_mnist5k("val")
    u = to_uint8(x)
    assert u.shape == (500, 32, 32, 1) and u.dtype == np.uint8
    back = torch.from_numpy(u).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(back, x)
    with pytest.raises(ValueError, match="split='test'"):
        load_mnist5k("test")


def test_load_dataset_mnist5k_specs():
    x, y = load_dataset("mnist5k")
    assert x.shape == (4500, 1, 32, 32)
    x, y = load_dataset("mnist5k:val", limit=7)
    assert x.shape == (7, 1, 32, 32) and y.shape == (7,)
    with pytest.raises(ValueError, match="not allowed"):
        load_dataset("mnist5k:bogus")


# ----------------------------------------------------------------------------------------------- image folders

try:
    from PIL import Image as PIL
except ImportError:  # pragma: no cover - the folder tests need Pillow (pip install pillow)
    PIL = None
needs_pil = pytest.mark.skipif(PIL is None, reason="Pillow not installed (pip install pillow)")


def _write(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.fromarray(arr).save(path)


def _solid(h, w, rgb):
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (h, w, 3)).copy()


@needs_pil
def test_image_folder_class_layout_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    a0 = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    a1 = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    b0 = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    _write(str(tmp_path / "cat" / "a0.png"), a0)
    _write(str(tmp_path / "cat" / "sub" / "a1.png"), a1)  # nested files inside a class folder count
    _write(str(tmp_path / "bird" / "b0.PNG"), b0)  # suffix case does not matter
    (tmp_path / "bird" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(str(tmp_path), image_size=8)
    assert ds.classes == ["bird", "cat"] and len(ds) == 3 and ds.labels == [0, 1, 1]
    x, y = load_image_folder(str(tmp_path), image_size=8)
    assert x.shape == (3, 3, 8, 8) and x.dtype == torch.float32 and y.tolist() == [0, 1, 1]
    # same size -> no resampling: exact pixels back
    for got, want in zip(x, [b0, a0, a1]):
        assert torch.equal(got, torch.from_numpy(want).permute(2, 0, 1).float() / 127.5 - 1)
    item, label = ds[1]
    assert torch.equal(item, x[1]) and label == 1
    # load_dataset dispatches a folder to the same loader
    x2, y2 = load_dataset(str(tmp_path), image_size=8)
    assert torch.equal(x2, x) and torch.equal(y2, y)


@needs_pil
def test_image_folder_flat_grey_and_resize(tmp_path):
    _write(str(tmp_path / "one.png"), _solid(20, 30, (200, 200, 200)))
    _write(str(tmp_path / "two.jpg"), _solid(64, 64, (0, 0, 0)))
    x, y = load_image_folder(str(tmp_path), image_size=8, channels=1)
    assert x.shape == (2, 1, 8, 8) and y.tolist() == [0, 0]
    assert torch.allclose(x[0], torch.full((1, 8, 8), 200 / 127.5 - 1), atol=1.5 / 127.5)  # constant stays constant
    assert torch.allclose(x[1], torch.full((1, 8, 8), -1.0), atol=2 / 127.5)
    assert x.min() >= -1 and x.max() <= 1


@needs_pil
def test_center_crop_arr_keeps_the_centre():
    # wide 16x48 image: left third red, middle green, right blue -> the centre square is green
    arr = np.concatenate([_solid(16, 16, (255, 0, 0)), _solid(16, 16, (0, 255, 0)), _solid(16, 16, (0, 0, 255))], 1)
    out = center_crop_arr(PIL.fromarray(arr), 8)  # short side 16 = 2 * 8: one BOX halving, then exact size
    assert out.shape == (8, 8, 3)
    assert (out[:, 2:6, 1] == 255).all() and (out[:, 2:6, 0] == 0).all() and (out[:, 2:6, 2] == 0).all()
    tall = center_crop_arr(PIL.fromarray(np.ascontiguousarray(arr.transpose(1, 0, 2))), 5)  # non-integer ratio
    assert tall.shape == (5, 5, 3)


@needs_pil
def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "missing"), 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolderDataset(str(tmp_path / "empty"), 8)
    mixed = tmp_path / "mixed"
    _write(str(mixed / "top.png"), _solid(4, 4, (1, 2, 3)))
    _write(str(mixed / "cls" / "x.png"), _solid(4, 4, (1, 2, 3)))
    with pytest.raises(ValueError, match="both images"):
        ImageFolderDataset(str(mixed), 4)
    hollow = tmp_path / "hollow"
    _write(str(hollow / "a" / "x.png"), _solid(4, 4, (1, 2, 3)))
    (hollow / "b").mkdir()
    with pytest.raises(ValueError, match="class folder .*b' holds no images"):
        ImageFolderDataset(str(hollow), 4)
    with pytest.raises(ValueError, match="channels"):
        ImageFolderDataset(str(hollow / "a"), 4, channels=2)
    with pytest.raises(ValueError, match="image_size"):
        ImageFolderDataset(str(hollow / "a"), 0)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="could not read image .*bad.png"):
        load_image_folder(str(broken), 4)
    with pytest.raises(ValueError, match="pass image_size"):
        load_dataset(str(hollow / "a"))
    with pytest.raises(FileNotFoundError, match="allowed: 'mnist5k"):
        load_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(ValueError, match="not .npy/.npz"):
        load_dataset(str(tmp_path / "data.csv"))


# ----------------------------------------------------------------------------------------------- latents


def _latents(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 4, 4, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_latents_npz_round_trip_and_scale(tmp_path):
    lat, lab = _latents()
    path = str(tmp_path / "lat.npz")
    save_latents(path, lat, lab)
    x, y = load_latents(path)
    assert torch.equal(x, lat) and torch.equal(y, lab) and x.dtype == torch.float32 and y.dtype == torch.int64
    x, _ = load_latents(path, scale=SD_VAE_SCALE)
    assert torch.allclose(x, lat * SD_VAE_SCALE)
    # ADM-style positional keys arr_0 / arr_1, float16 storage
    np.savez(tmp_path / "pos.npz", lat.numpy().astype(np.float16), lab.numpy().astype(np.int32))
    x, y = load_dataset(str(tmp_path / "pos.npz"))
    assert torch.allclose(x, lat, atol=1e-2) and torch.equal(y, lab)
    # no labels key -> zeros, with a warning
    np.savez(tmp_path / "nolab.npz", latents=lat.numpy())
    with pytest.warns(UserWarning, match="label 0"):
        _, y = load_latents(str(tmp_path / "nolab.npz"))
    assert torch.equal(y, torch.zeros(6, dtype=torch.int64))


def test_latents_npy_labels_sibling_explicit_or_zeros(tmp_path):
    lat, lab = _latents()
    path = str(tmp_path / "train.npy")
    np.save(path, lat.numpy())
    with pytest.warns(UserWarning, match="train_labels.npy"):
        x, y = load_latents(path)
    assert torch.equal(x, lat) and torch.equal(y, torch.zeros(6, dtype=torch.int64))
    other = str(tmp_path / "other.npy")
    np.save(other, lab.numpy()[::-1].copy())
    _, y = load_latents(path, labels_path=other)
    assert torch.equal(y, lab.flip(0))
    assert sibling_labels_path(path) == str(tmp_path / "train_labels.npy")
    np.save(sibling_labels_path(path), lab.numpy())
    x, y = load_dataset(path, latent_scale=2.0)
    assert torch.equal(y, lab) and torch.allclose(x, 2 * lat)


def test_latents_errors(tmp_path):
    lat, lab = _latents()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_latents(str(tmp_path / "missing.npz"))
    np.save(tmp_path / "three_d.npy", lat.numpy()[0])
    with pytest.raises(ValueError, match=r"4-D array \[N, C, H, W\], got shape \(4, 4, 4\)"):
        load_latents(str(tmp_path / "three_d.npy"))
    np.save(tmp_path / "ints.npy", np.zeros((2, 4, 4, 4), dtype=np.int32))
    with pytest.raises(ValueError, match="dtype int32 is not allowed"):
        load_latents(str(tmp_path / "ints.npy"))
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="looks like images"):
        load_latents(str(tmp_path / "images.npz"))
    np.savez(tmp_path / "wrongkey.npz", x=lat.numpy())
    with pytest.raises(ValueError, match="expected key 'latents' or 'arr_0', found \\['x'\\]"):
        load_latents(str(tmp_path / "wrongkey.npz"))
    np.savez(tmp_path / "count.npz", latents=lat.numpy(), labels=lab.numpy()[:5])
    with pytest.raises(ValueError, match="5 labels for 6 latents"):
        load_latents(str(tmp_path / "count.npz"))
    np.savez(tmp_path / "neg.npz", latents=lat.numpy(), labels=-lab.numpy() - 1)
    with pytest.raises(ValueError, match=">= 0"):
        load_latents(str(tmp_path / "neg.npz"))
    np.savez(tmp_path / "floatlab.npz", latents=lat.numpy(), labels=lab.numpy().astype(np.float32))
    with pytest.raises(ValueError, match="labels dtype float32"):
        load_latents(str(tmp_path / "floatlab.npz"))
    bad = lat.numpy().copy()
    bad[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", latents=bad, labels=lab.numpy())
    with pytest.raises(ValueError, match="NaN"):
        load_latents(str(tmp_path / "nan.npz"))
    save_latents(str(tmp_path / "ok.npz"), lat, lab)
    with pytest.raises(ValueError, match="already holds labels"):
        load_latents(str(tmp_path / "ok.npz"), labels_path=str(tmp_path / "x.npy"))
    with pytest.raises(ValueError, match="scale"):
        load_latents(str(tmp_path / "ok.npz"), scale=-1.0)
    with pytest.raises(ValueError, match="end the name with .npz"):
        save_latents(str(tmp_path / "out.npy"), lat, lab)
