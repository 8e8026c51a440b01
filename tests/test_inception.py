"""Offline tests of the FID InceptionV3: layout of the state dict, strict loading, outputs, preprocessing."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from ditgraft.eval import inception as inc
from ditgraft.eval.inception import InceptionFeatures, find_inception_weights, resize_bilinear_tf1


def _scaled_random_model(seed=0):
    """Random weights with activations of order 1 (default init shrinks them to ~1e-8 over 94 layers)."""
    torch.manual_seed(seed)
    model = InceptionFeatures()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.1, 0.1)
    nn.init.normal_(model.fc.bias)
    return model


@pytest.fixture(scope="module")
def model():
    return _scaled_random_model()


@pytest.fixture(scope="module")
def weights_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / inc.WEIGHTS_FILENAME
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def base_out(model, images):
    """Features of `images` from the in-memory model (one forward pass shared by several tests)."""
    return model.extract(images)


def test_state_dict_layout_matches_weights_file():
    sd = InceptionFeatures().state_dict()
    assert len(sd) == inc.NUM_STATE_KEYS == 566
    expected = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_var": (32,),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert sum(k.endswith("num_batches_tracked") for k in sd) == 94
    # 23.9M floats: torch.save of this dict is 95.7 MB, the size of the real weights file
    assert sum(v.numel() for k, v in sd.items() if v.is_floating_point()) == 23_885_392


def test_from_file_strict_load_and_extract(model, weights_file, images, base_out):
    loaded = InceptionFeatures.from_file(weights_file)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    out = loaded.extract(images)
    assert {k: v.shape for k, v in out.items()} == {"pool": (2, 2048), "logits": (2, 1008), "spatial": (2, 2023)}
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in out.values())
    assert out["pool"].std() > 1e-3  # not a degenerate all-zero output
    for key, value in base_out.items():
        np.testing.assert_array_equal(out[key], value)


def test_from_file_via_env_var_and_without_batch_counters(model, weights_file, tmp_path, monkeypatch):
    monkeypatch.setenv(inc.ENV_VAR, str(weights_file))
    assert find_inception_weights() == weights_file
    # torch-fidelity's converter writes no num_batches_tracked (472 keys); strict loading still accepts it
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(sd) == 472
    torch.save(sd, tmp_path / "tf.pth")
    InceptionFeatures.from_file(tmp_path / "tf.pth")


def test_wrong_state_dict_is_a_clear_error(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="1 keys; expected the 566 keys"):
        InceptionFeatures.from_file(tmp_path / "bad.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        InceptionFeatures.from_file(tmp_path / "list.pth")


def test_missing_weights_error_says_what_where_and_how(tmp_path, monkeypatch):
    monkeypatch.delenv(inc.ENV_VAR, raising=False)
    monkeypatch.setattr(inc, "_hub_checkpoint_dir", lambda: tmp_path / "empty-hub")
    for call in (lambda: InceptionFeatures.from_file(tmp_path / "nope.pth"), lambda: find_inception_weights()):
        with pytest.raises(FileNotFoundError) as info:
            call()
        msg = str(info.value)
        for needle in ("pt_inception-2015-12-05-6726825d.pth", inc.WEIGHTS_URL, "--inception-weights",
                       "DITGRAFT_INCEPTION_WEIGHTS"):
            assert needle in msg
    monkeypatch.setenv(inc.ENV_VAR, str(tmp_path / "also-missing.pth"))
    with pytest.raises(FileNotFoundError, match="DITGRAFT_INCEPTION_WEIGHTS=.*also-missing.pth"):
        find_inception_weights()


def test_outputs_are_adm_pool_unbiased_logits_and_hwc_spatial(model, images):
    captured = {}
    handle = model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.setdefault("x", o.clone()))
    try:
        out = model.extract(images[:1])
    finally:
        handle.remove()
    conv = captured["x"]  # [1, 192, 17, 17]: TF "mixed_6/conv"
    assert tuple(conv.shape) == (1, 192, 17, 17)
    expected_spatial = conv[:, :7].permute(0, 2, 3, 1).reshape(1, -1).numpy()
    np.testing.assert_allclose(out["spatial"], expected_spatial, rtol=1e-5, atol=1e-6)
    logits = out["pool"].astype(np.float64) @ model.fc.weight.double().numpy().T  # no bias
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-4, atol=1e-4)
    assert not np.allclose(out["logits"], logits + model.fc.bias.numpy(), atol=1e-2)


def test_input_formats_agree(model, images, base_out):
    """Float NCHW in [0, 1], fed as an iterable of one-image batches, gives the features of uint8 NHWC."""
    as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    for key, value in model.extract(iter([as_float[:1], as_float[1:]]), batch_size=1).items():
        np.testing.assert_allclose(value, base_out[key], rtol=1e-4, atol=1e-5)
    gray = images[..., :1]
    assert torch.equal(model._to_nchw_255(gray), model._to_nchw_255(np.repeat(gray, 3, axis=3)))
    assert torch.equal(model._to_nchw_255(as_float[:, :1]), model._to_nchw_255(as_float[:, :1].repeat(1, 3, 1, 1)))


def test_input_errors(model):
    with pytest.raises(ValueError, match="NHWC with 1 or 3 channels"):
        model.extract(np.zeros((1, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        model.extract(torch.full((1, 3, 8, 8), 255.0))
    with pytest.raises(ValueError, match="dtype torch.int32"):
        model.extract(torch.zeros((1, 8, 8, 3), dtype=torch.int32))
    with pytest.raises(ValueError, match="no images given"):
        model.extract(iter([]))
    with pytest.raises(TypeError, match="item of type list"):
        model.extract([[1, 2, 3]])
    with pytest.raises(ValueError, match="preprocess"):
        InceptionFeatures(preprocess="clean-fid")


def _resize_tf1_loops(img, out_h, out_w):
    """Plain reference of TF1 resize_bilinear(align_corners=False) for one [H, W] image."""
    in_h, in_w = img.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        y = i * np.float32(in_h / out_h)
        y0 = int(np.floor(y)); y1 = min(y0 + 1, in_h - 1); dy = y - y0  # noqa: E702
        for j in range(out_w):
            x = j * np.float32(in_w / out_w)
            x0 = int(np.floor(x)); x1 = min(x0 + 1, in_w - 1); dx = x - x0  # noqa: E702
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * dx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * dx
            out[i, j] = top + (bottom - top) * dy
    return out


@pytest.mark.parametrize("in_hw,out_hw", [((5, 7), (11, 4)), ((9, 9), (4, 13)), ((6, 6), (6, 6))])
def test_resize_bilinear_tf1_matches_loop_reference(in_hw, out_hw):
    torch.manual_seed(0)
    x = torch.rand(2, 3, *in_hw, dtype=torch.float64) * 255
    got = resize_bilinear_tf1(x, out_hw)
    for n in range(2):
        for c in range(3):
            np.testing.assert_allclose(got[n, c].numpy(), _resize_tf1_loops(x[n, c].numpy(), *out_hw), rtol=1e-12)
    if in_hw == out_hw:
        assert torch.equal(got, x)


def test_fid_specific_pooling():
    """Average pools ignore padding (a constant map stays constant at the border); Mixed_7c max-pools."""
    const = torch.full((1, 4, 5, 5), 3.0)
    assert torch.equal(inc._avg_pool_tf(const), const)
    m = InceptionFeatures()
    assert m.Mixed_7b.pool == "avg" and m.Mixed_7c.pool == "max"
    block = inc.InceptionE(4, pool="max").eval().requires_grad_(False)
    nn.init.dirac_(block.branch_pool.conv.weight[:4])  # pool branch passes channels 0..3 through
    spike = torch.zeros(1, 4, 5, 5)
    spike[0, 0, 2, 2] = 9.0
    out = block(spike)[:, -192:][0, 0]  # first channel of the pool branch
    scale = float(block.branch_pool.bn(torch.ones(1, 192, 1, 1))[0, 0])  # BN of the default running stats
    expected = torch.zeros(5, 5)
    expected[1:4, 1:4] = 9.0 * scale  # max pool copies the spike to its 3x3 neighbourhood; avg would give 1.0
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-6)


def test_cli_eval_inception_runs_offline_with_user_weights(weights_file, tmp_path, capsys, monkeypatch):
    """`ditgraft eval --features inception` with a user-supplied weights file; without one, exit 2 naming the file."""
    import json

    from ditgraft.cli import main
    from ditgraft.eval.adm import save_reference_batch, save_samples_npz

    rng = np.random.default_rng(1)
    samples = save_samples_npz(tmp_path / "s.npz", rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))
    ref = save_reference_batch(tmp_path / "r.npz", rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8))
    args = ["eval", str(samples), "--features", "inception", "--ref", str(ref)]
    assert main(args + ["--inception-weights", str(weights_file)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert np.isfinite(out["fid"]) and np.isfinite(out["sfid"]) and out["num"] == 12
    monkeypatch.delenv("DITGRAFT_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(inc, "_hub_checkpoint_dir", lambda: tmp_path / "no_hub_cache")
    assert main(args) == 2
    assert inc.WEIGHTS_FILENAME in capsys.readouterr().err
