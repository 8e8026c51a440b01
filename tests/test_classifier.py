"""The testbed evaluator: shipped classifier accuracy, feature API, input layouts, and a tiny training run."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ditgraft.data.mnist5k import load_mnist5k, to_uint8
from ditgraft.eval.classifier import (
    CLASSIFIER_PATH,
    FEATURE_DIM,
    TestbedClassifier,
    load_testbed_classifier,
    testbed_features,
    to_model_input,
)
from ditgraft.eval.metrics import fid_from_features
from ditgraft.train.classifier import augment, train_classifier


@pytest.fixture(scope="module")
def val():
    return load_mnist5k("val")


@pytest.fixture(scope="module")
def model():
    return load_testbed_classifier()


def test_shipped_file_and_metadata(model):
    assert os.path.getsize(CLASSIFIER_PATH) < 2 * 1024 * 1024
    meta = model.metadata
    assert meta["feature_dim"] == FEATURE_DIM and meta["val_accuracy"] >= 0.98
    for key in ("epochs", "seed", "num_train", "lr"):
        assert key in meta
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_shipped_classifier_val_accuracy(model, val):
    x, y = val
    out = testbed_features(x, model=model)
    acc = float((out["pred"] == y.numpy()).mean())
    assert acc >= 0.97, acc
    assert abs(acc - model.metadata["val_accuracy"]) < 1e-9  # the stored number is reproducible


def test_features_shapes_determinism_and_batch_independence(model, val):
    x = val[0][::8]  # 63 digits of every class (the split is sorted by class)
    a = testbed_features(x, model=model)
    assert a["features"].shape == (63, FEATURE_DIM) and a["features"].dtype == np.float64
    assert a["probs"].shape == (63, 10) and a["pred"].shape == (63,) and a["pred"].dtype == np.int64
    assert np.allclose(a["probs"].sum(1), 1.0) and np.array_equal(a["pred"], a["probs"].argmax(1))
    assert (a["features"] >= 0).all()  # post-ReLU activations
    b = testbed_features(x, model=model)
    assert np.array_equal(a["features"], b["features"])
    c = testbed_features(x, batch_size=7, model=model)  # eval-mode BatchNorm: no dependence on the batch
    assert np.allclose(a["features"], c["features"], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(model(x), model.head(model.features(x)))
    empty = testbed_features(x[:0], model=model)
    assert empty["features"].shape == (0, FEATURE_DIM)


def test_uint8_and_float_inputs_agree(model, val):
    x = val[0][::10]
    u = to_uint8(x)  # ADM layout [N, 32, 32, 1] uint8
    assert u.shape == (50, 32, 32, 1)
    f_float = testbed_features(x, model=model)["features"]
    f_u8 = testbed_features(u, model=model)["features"]
    f_u8_tensor = testbed_features(torch.from_numpy(u), model=model)["features"]
    f_np_float = testbed_features(x.numpy(), model=model)["features"]
    assert np.allclose(f_float, f_u8, atol=1e-6) and np.array_equal(f_u8, f_u8_tensor)
    assert np.array_equal(f_float, f_np_float)


def test_features_tell_real_from_corrupted(model, val):
    """FID on classifier features: real vs real is far smaller than real vs noisy digits."""
    torch.manual_seed(0)
    x_val = val[0]
    x_train = load_mnist5k("train")[0][::9]  # 500 digits, 50 per class (the file is sorted by class)
    noisy = (x_val + 0.6 * torch.randn_like(x_val)).clamp(-1, 1)
    f_val = testbed_features(x_val, model=model)["features"]
    fid_real = fid_from_features(f_val, testbed_features(x_train, model=model)["features"])
    fid_noisy = fid_from_features(f_val, testbed_features(noisy, model=model)["features"])
    assert fid_noisy > 5 * fid_real, (fid_real, fid_noisy)


def test_input_errors(tmp_path):
    with pytest.raises(ValueError, match=r"NHWC \[N, 32, 32, 1\].*got shape \(2, 1, 32, 32\)"):
        to_model_input(np.zeros((2, 1, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"NCHW \[N, 1, 32, 32\].*got shape \(2, 3, 32, 32\)"):
        to_model_input(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="dtype torch.int64 is not allowed"):
        to_model_input(torch.zeros(2, 1, 32, 32, dtype=torch.int64))
    with pytest.raises(TypeError, match="list"):
        to_model_input([[0.0]])
    with pytest.raises(ValueError, match="batch_size"):
        testbed_features(torch.zeros(1, 1, 32, 32), batch_size=0)
    missing = str(tmp_path / "none.safetensors")
    with pytest.raises(FileNotFoundError, match="none.safetensors"):
        load_testbed_classifier(path=missing)


def test_augment_keeps_background_and_range():
    g = torch.Generator().manual_seed(0)
    x = load_mnist5k("val")[0][::31]
    out = augment(x, g)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert (out[:, :, 0, :] == -1).float().mean() > 0.9  # the border stays background
    assert not torch.equal(out, x)
    same = augment(x, g, max_degrees=0, max_shift_px=0, scale_range=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)  # identity transform reproduces the input


def test_tiny_training_run_lowers_loss_and_is_reproducible(tmp_path):
    out = str(tmp_path / "clf.safetensors")
    r1 = train_classifier(1, seed=0, out_path=out, num_train=500, batch_size=32, log=lambda *_: None)
    assert r1["loss_after"] < r1["loss_before"] - 0.2, (r1["loss_before"], r1["loss_after"])
    assert len(r1["epoch_losses"]) == 1 and 0 <= r1["val_acc"] <= 1
    loaded = load_testbed_classifier(path=out)
    assert loaded.metadata["num_train"] == 500 and loaded.metadata["epochs"] == 1
    for k, v in r1["model"].state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    r2 = train_classifier(1, seed=0, out_path=None, num_train=500, batch_size=32, log=lambda *_: None)
    for k, v in load_file(out).items():
        assert torch.equal(r2["model"].state_dict()[k], v), k  # same seed -> same weights
    assert isinstance(r2["model"], TestbedClassifier)
