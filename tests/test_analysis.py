"""Attention locality / activation statistics (ditgraft.analysis.locality); the locality selectors read its analysis.json.

Hand-built attention patterns with analytic answers, the chunked accumulator against the plain reference, running
moments against numpy on the concatenated data and the full protocol on a tiny random DiT.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from ditgraft.analysis.locality import (
    ActivationAccumulator, AttentionAccumulator, RunningMoments, analyze_model, attention_statistics, curve_ks,
    default_band_k, default_window_k, local_layers, write_analysis_report,
)
from ditgraft.layers import select_layers
from ditgraft.models.dit import build_dit
from ditgraft.operators.attention import MHA
from helpers import randomize_weights


# ----------------------------------------------------------------------------------------------------------------------
# Analytic values
# ----------------------------------------------------------------------------------------------------------------------
def uniform_band_share(N: int, k: int) -> float:
    """(1/N) sum_i #{j : |i - j| <= k} / N."""
    return sum(min(i + k, N - 1) - max(i - k, 0) + 1 for i in range(N)) / N**2


def uniform_mean_distance(H: int, W: int) -> float:
    ys, xs = np.divmod(np.arange(H * W), W)
    return float(np.sqrt((ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2).mean())


def uniform_mha(dim: int, heads: int) -> MHA:
    """q = k = 0 for any input: every query attends uniformly."""
    mha = MHA(dim, heads, impl="reference")
    with torch.no_grad():
        mha.qkv.weight.zero_()
        mha.qkv.bias.zero_()
    return mha


@pytest.mark.parametrize("grid,band_k,window_k", [((8, 8), 8, 3), ((4, 6), 5, 3), ((5, 7), 2, 5), ((3, 4), 0, 7)])
def test_uniform_attention_is_analytic(grid, band_k, window_k):
    torch.manual_seed(0)
    H, W = grid
    N = H * W
    mha = uniform_mha(32, 4)
    # a small chunk budget forces several query chunks per call
    acc = AttentionAccumulator(grid, 4, band_k, window_k, chunk_elements=2 * 4 * 5 * N)
    for _ in range(3):
        acc.add_input(mha, torch.randn(2, N, 32))
    s = acc.summary()
    assert s["instances"] == 6
    kh, kw = min(window_k, H), min(window_k, W)
    for h in range(4):
        assert s["band_locality"][h] == pytest.approx(uniform_band_share(N, band_k), abs=1e-6)
        assert s["window_locality"][h] == pytest.approx(kh * kw / N, abs=1e-6)
        assert s["entropy"][h] == pytest.approx(math.log(N), abs=1e-5)
        assert s["distance"][h] == pytest.approx(uniform_mean_distance(H, W), abs=1e-5)
    # the band curve: L_k for every reported k
    for k, value in zip(curve_ks(N, band_k), s["band_curve"]):
        assert value == pytest.approx(uniform_band_share(N, k), abs=1e-6)


def test_sharply_diagonal_attention_is_local():
    N = 64
    mha = MHA(N, 1, impl="reference")
    with torch.no_grad():  # q = k = v = x; x = 10 * one-hot rows -> scores 12.5 on the diagonal, 0 elsewhere
        mha.qkv.weight.copy_(torch.cat([torch.eye(N)] * 3))
        mha.qkv.bias.zero_()
    acc = AttentionAccumulator((8, 8), 1, band_k=0, window_k=1)
    acc.add_input(mha, 10 * torch.eye(N)[None])
    s = acc.summary()
    z = math.exp(12.5) + 63
    diag, other = math.exp(12.5) / z, 1 / z  # each row: one diagonal entry, 63 others
    assert s["band_locality"][0] == pytest.approx(diag, abs=1e-6)
    assert s["window_locality"][0] == pytest.approx(diag, abs=1e-6)
    assert s["entropy"][0] == pytest.approx(-diag * math.log(diag) - 63 * other * math.log(other), rel=1e-4)
    assert s["entropy"][0] < 0.01
    assert s["distance"][0] == pytest.approx(other * 64 * uniform_mean_distance(8, 8), rel=1e-4)


def test_shifted_pattern_exact_values():
    """Every query looks at the token one row below (wrapping to row 0): raster distance W, grid distance 1."""
    H, W = 5, 4
    N = H * W
    probs = torch.zeros(1, 1, N, N)
    probs[0, 0, torch.arange(N), (torch.arange(N) + W) % N] = 1.0
    for k, expect in [(W - 1, 0.0), (W, (N - W) / N), (N - W, 1.0)]:
        stats = attention_statistics(probs, (H, W), band_k=k, window_k=3)
        assert float(stats["band"]) == pytest.approx(expect)
    stats = attention_statistics(probs, (H, W), band_k=W, window_k=3)
    assert float(stats["window"]) == pytest.approx((H - 1) / H)  # the last row wraps to row 0: outside its window
    assert float(stats["distance"]) == pytest.approx(((H - 1) * 1 + 1 * (H - 1)) / H)
    assert float(stats["entropy"]) == pytest.approx(0.0)
    acc = AttentionAccumulator((H, W), 1, band_k=W, window_k=3)
    acc.add_probs(probs[:, :, :7], 0)
    acc.add_probs(probs[:, :, 7:], 7, new_instances=False)
    s = acc.summary()
    assert s["band_locality"][0] == pytest.approx((N - W) / N)
    assert s["window_locality"][0] == pytest.approx((H - 1) / H)


def test_accumulator_matches_reference_on_random_attention():
    torch.manual_seed(1)
    grid, heads, N = (6, 5), 3, 30
    acc = AttentionAccumulator(grid, heads, band_k=4, window_k=3, chunk_elements=4 * heads * 7 * N)
    mha = MHA(24, heads, impl="reference")
    xs = [torch.randn(b, N, 24) * 3 for b in (2, 3)]
    ref = {"band": [], "window": [], "entropy": [], "distance": []}
    for x in xs:
        acc.add_input(mha, x)
        q, k, _ = mha.split_heads(x)
        probs = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1)
        for name, value in attention_statistics(probs, grid, band_k=4, window_k=3).items():
            ref[name].append(value)
    s = acc.summary()
    names = {"band": "band_locality", "window": "window_locality", "entropy": "entropy", "distance": "distance"}
    for name, key in names.items():
        expect = torch.cat(ref[name]).detach().mean(0)  # mean over the 5 instances, per head
        assert s[key] == pytest.approx(expect.tolist(), abs=1e-5)
        assert s[key + "_mean"] == pytest.approx(float(expect.mean()), abs=1e-5)
    assert s["band_locality_min"] <= s["band_locality_mean"] <= s["band_locality_max"]
    assert 0.0 < s["band_locality_mean"] < 1.0 and s["entropy_mean"] < math.log(N) - 0.05  # not uniform
    assert s["band_curve"][-1] == pytest.approx(1.0, abs=1e-6)


def test_defaults():
    assert default_band_k(256) == 32 and default_band_k(64) == 8
    assert default_window_k((16, 16), 32) == 5 and default_window_k((8, 8), 8) == 3
    with pytest.raises(ValueError, match="window_k"):
        AttentionAccumulator((8, 8), 1, band_k=8, window_k=4)
    with pytest.raises(ValueError, match="band_k"):
        AttentionAccumulator((8, 8), 1, band_k=-1, window_k=3)


# ----------------------------------------------------------------------------------------------------------------------
# Running statistics
# ----------------------------------------------------------------------------------------------------------------------
def test_running_moments_equal_numpy_on_concatenated_data():
    rng = np.random.default_rng(0)
    chunks = [rng.standard_t(4, size=n) * s + m for n, s, m in [(1000, 1.0, 1e3), (17, 5.0, 1e3 - 2), (3000, 0.3, 1e3)]]
    rm, a, b = RunningMoments(), RunningMoments(), RunningMoments()
    for i, c in enumerate(chunks):
        rm.update(torch.from_numpy(c).float().reshape(-1, 1))
        (a if i < 2 else b).update(torch.from_numpy(c).float())
    a.merge(b)
    data = np.concatenate([c.astype(np.float32).astype(np.float64) for c in chunks])
    for got in (rm.summary(), a.summary()):
        assert got["count"] == data.size
        assert got["mean"] == pytest.approx(data.mean(), rel=1e-12)
        assert got["var"] == pytest.approx(data.var(), rel=1e-9)
        assert got["skewness"] == pytest.approx(scipy.stats.skew(data), rel=1e-7)
        assert got["kurtosis"] == pytest.approx(scipy.stats.kurtosis(data), rel=1e-7)
        assert got["max_abs"] == pytest.approx(np.abs(data).max())
        assert got["max_over_std"] == pytest.approx(np.abs(data).max() / data.std(), rel=1e-9)
    assert RunningMoments().summary()["var"] is None


def test_outlier_share_per_sample_tensor():
    torch.manual_seed(0)
    acc = ActivationAccumulator()
    batches = [torch.randn(3, 10, 20), torch.randn(2, 10, 20)]
    batches[0][0, 1, 2] = 40.0
    batches[0][0, 5, 5] = -30.0
    batches[1][1, 0, 0] = 25.0
    expect = []
    for x in batches:
        acc.update(x)
        for s in x.double().reshape(x.shape[0], -1).numpy():
            expect.append(np.mean(np.abs(s - s.mean()) > 6 * s.std()))
    got = acc.summary()
    assert sum(expect) > 0
    assert got["outlier_share"] == pytest.approx(np.mean(expect))
    assert got["instances"] == 5
    assert got["count"] == 5 * 200


# ----------------------------------------------------------------------------------------------------------------------
# The protocol on a tiny random DiT
# ----------------------------------------------------------------------------------------------------------------------
class NotAttention(nn.Module):
    """A grafted-style operator with the slot contract but no attention matrix."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x, grid=None):
        return self.lin(x)


def tiny_dit(depth: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = build_dit("testbed", depth=depth, hidden_size=64, num_heads=4)
    return randomize_weights(model, 0.2)  # adaLN is zero-initialised: non-trivial attention needs random weights


def test_analyze_model_and_report(tmp_path):
    model = tiny_dit(3)
    with torch.no_grad():  # layer 1: uniform attention, known answers through the whole hook path
        model.blocks[1].attn.qkv.weight.zero_()
        model.blocks[1].attn.qkv.bias.zero_()
    model.blocks[2].attn = NotAttention(64)
    model.train()
    result = analyze_model(model, num_samples=4, steps=3, batch_size=3, seed=0)
    assert model.training  # mode restored
    assert all(not b.attn._forward_hooks and not b.mlp._forward_hooks for b in model.blocks)  # hooks removed
    s = result["settings"]
    assert (s["band_k"], s["window_k"], s["num_tokens"], s["branch"]) == (8, 3, 64, "cond")
    layers = result["layers"]
    assert [e["layer"] for e in layers] == [0, 1, 2]
    a0 = layers[0]["attention"]
    assert len(a0["band_locality"]) == 4 and a0["instances"] == 4 * 3  # conditional half only
    assert a0["entropy_mean"] < math.log(64) - 0.1  # randomised weights: far from uniform
    a1 = layers[1]["attention"]
    assert a1["band_locality"] == pytest.approx([uniform_band_share(64, 8)] * 4, abs=1e-6)
    assert a1["window_locality_mean"] == pytest.approx(9 / 64, abs=1e-6)
    assert a1["entropy_mean"] == pytest.approx(math.log(64), abs=1e-5)
    assert layers[2]["attention"] is None and layers[2]["attn_operator"] == "NotAttention"
    assert result["skipped"] == [{"layer": 2, "slot": "attn", "operator": "NotAttention",
                                  "reason": "not softmax attention (MHA): no attention matrix to measure"}]
    for e in layers:
        for slot in ("attn", "mlp"):
            act = e["activations"][slot]
            assert act["instances"] == 12 and act["count"] == 12 * 64 * 64
            assert act["var"] > 0 and act["max_over_std"] > 1 and 0 <= act["outlier_share"] < 0.01
    local, nonlocal_ = local_layers(result)
    assert sorted(local + nonlocal_) == [0, 1] and 1 in nonlocal_

    json.dumps(result, allow_nan=False)  # strict JSON: undefined statistics are None, never NaN
    paths = write_analysis_report(result, str(tmp_path))
    assert json.loads(open(paths["json"]).read())["settings"]["band_k"] == 8
    for name in ("locality", "locality_heatmap", "locality_vs_k", "activations"):
        with open(paths[name], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(paths["markdown"]).read()
    assert "| 2 | NotAttention |" in md and "Not local:" in md and "layer 2 (NotAttention)" in md
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    # analysis.json drives the selectors
    means = {e["layer"]: e["attention"]["band_locality_mean"] for e in layers[:2]}
    assert select_layers("least_local", 3, analysis=paths["json"], count=1) == [min(means, key=means.get)]
    assert select_layers("most_local", 3, analysis=paths["json"], count=1) == [max(means, key=means.get)]


def test_analyze_both_branches_and_errors():
    model = tiny_dit(1)
    result = analyze_model(model, num_samples=2, steps=2, batch_size=2, branch="both")
    assert result["layers"][0]["attention"]["instances"] == 2 * 2 * 2
    with pytest.raises(ValueError, match="branch"):
        analyze_model(model, num_samples=2, steps=1, branch="neither")
    with pytest.raises(ValueError, match="num_samples"):
        analyze_model(model, num_samples=0, steps=1)

    class Boom(nn.Module):
        def forward(self, x, grid=None):
            raise RuntimeError("boom")

    model.blocks[0].mlp = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        analyze_model(model, num_samples=1, steps=2)
    assert not model.blocks[0].attn._forward_hooks and not model.blocks[0].mlp._forward_hooks
