"""DiT faithfulness: official parameter names/shapes/counts, golden outputs from upstream facebookresearch/DiT,
adaLN-Zero init, the timestep embedding, label dropout, classifier-free guidance and non-square inputs.

Golden files live in tests/fixtures (see its README for how they were produced from the upstream code).
"""
import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ditgraft.models.dit import DIT_CONFIGS, DiT, LabelEmbedder, TimestepEmbedder, build_dit, get_2d_sincos_pos_embed

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
OFFICIAL = [n for n in DIT_CONFIGS if n != "testbed"]
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def _shapes_fixture():
    with open(os.path.join(FIXTURES, "dit_official_shapes.json")) as f:
        return json.load(f)


def _golden_tiny(cfg_channels=3) -> DiT:
    """The tiny DiT of the fixture with its seeded-random weights (pos_embed: our own sin-cos table)."""
    path = os.path.join(FIXTURES, "tiny_dit.safetensors")
    with safe_open(path, framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    model = DiT(**config, cfg_channels=cfg_channels)
    state = {k: v.float() for k, v in load_file(path).items()}
    state["pos_embed"] = model.pos_embed.detach().clone()
    model.load_state_dict(state, strict=True)
    return model.eval()


def _random_weights(model: DiT, seed: int = 0, scale: float = 1.0) -> DiT:
    """Seeded normal weights everywhere (adaLN and final layer too), pos_embed kept."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                std = scale / math.sqrt(p[0].numel()) if p.ndim >= 2 else 0.1
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# ------------------------------------------------------------------------------------------- names, shapes, counts
def test_xl2_state_dict_equals_official():
    expected = [(k, tuple(s)) for k, s in _shapes_fixture()["dit_xl2_keys"]]
    with torch.device("meta"):
        model = build_dit("DiT-XL/2", input_size=32)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == expected  # same names, same order, same shapes
    n = sum(p.numel() for p in model.parameters())
    assert n == 675_129_632  # pos_embed (256 x 1152 = 294,912) included, as upstream counts it
    assert n - model.pos_embed.numel() == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert not model.pos_embed.requires_grad


@pytest.mark.parametrize("name", OFFICIAL)
def test_param_counts_equal_upstream(name):
    counts = _shapes_fixture()["param_counts_input32"]
    with torch.device("meta"):
        model = build_dit(name, input_size=32)
    assert sum(p.numel() for p in model.parameters()) == counts[name]
    assert model.cfg_channels == 3  # upstream guides the first 3 channels


def test_registry_covers_upstream_and_names_errors():
    assert set(OFFICIAL) == set(_shapes_fixture()["param_counts_input32"])
    with pytest.raises(KeyError, match="DiT-XL/2"):
        build_dit("DiT-XXL/2")
    assert build_dit("testbed").cfg_channels == DIT_CONFIGS["testbed"]["in_channels"]


# ------------------------------------------------------------------------------------------- golden outputs
def test_forward_matches_upstream_golden():
    torch.manual_seed(0)
    io = np.load(os.path.join(FIXTURES, "tiny_dit_io.npz"))
    model = _golden_tiny()
    x, t, y = (torch.from_numpy(io[k]) for k in ("x", "t", "y"))
    with torch.no_grad():
        out = model(x, t, y)
        out_cfg = model.forward_with_cfg(x, t, torch.from_numpy(io["y_cfg"]), 4.0)
    torch.testing.assert_close(out, torch.from_numpy(io["out"]), atol=1e-5, rtol=1e-5)
    # guidance scale 4 multiplies the conditional/unconditional difference, and with it float32 rounding
    torch.testing.assert_close(out_cfg, torch.from_numpy(io["out_cfg"]), atol=4e-5, rtol=4e-5)
    assert out.abs().max() > 1.0  # the golden output is not trivially zero


def test_pos_embed_matches_upstream_golden():
    io = np.load(os.path.join(FIXTURES, "tiny_dit_io.npz"))
    model = DiT(**TINY)
    np.testing.assert_allclose(model.pos_embed[0].numpy(), io["pos_embed"], atol=0, rtol=0)
    np.testing.assert_allclose(get_2d_sincos_pos_embed(64, 4), io["pos_embed"], atol=1e-7)


def test_timestep_embedding_matches_upstream_and_divides_by_half():
    io = np.load(os.path.join(FIXTURES, "tiny_dit_io.npz"))
    emb = TimestepEmbedder.timestep_embedding(torch.from_numpy(io["temb_t"]), 256)
    # float32 arguments t * freq near t = 999 are spaced 6.1e-5 apart, so two correct float32 sin/cos
    # implementations (vectorised or libm, chosen by the CPU) may differ by up to that much there
    torch.testing.assert_close(emb, torch.from_numpy(io["temb"]), atol=1e-4, rtol=0)
    # t = 1: the sin half is sin(freqs), freqs <= 1, so arcsin recovers the frequencies exactly
    freqs = torch.arcsin(TimestepEmbedder.timestep_embedding(torch.tensor([1.0]), 256)[0, 128:].double())
    expected = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    torch.testing.assert_close(freqs, expected, atol=1e-6, rtol=0)
    # /(half - 1) (diffusers) would make the last frequency exactly 1e-4; /half gives 10000^(-127/128)
    assert freqs[-1].item() == pytest.approx(10000 ** (-127 / 128), rel=1e-4)
    assert freqs[-1].item() != pytest.approx(1e-4, rel=1e-2)
    assert TimestepEmbedder.timestep_embedding(torch.tensor([3.0]), 7).shape == (1, 7)  # odd dim: zero pad


# ------------------------------------------------------------------------------------------- init
def test_adaln_zero_init_outputs_exact_zeros():
    torch.manual_seed(0)
    model = DiT(**TINY)
    x = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    y = torch.tensor([0, 5, 10])
    out = model(x, t, y)
    assert out.shape == (3, 8, 8, 8)
    assert torch.count_nonzero(out) == 0
    tokens, c = model.embed(x, t, y)
    for block in model.blocks:  # gates are zero: every block is the identity at init
        assert torch.equal(block(tokens, c), tokens)
    # and it learns: the gradient reaches the zero-initialised output layer
    loss = (model(x, t, y) - x.repeat(1, 2, 1, 1)).pow(2).mean()
    loss.backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- labels and guidance
def test_label_dropout_to_null_class():
    torch.manual_seed(0)
    emb = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.1)
    assert emb.embedding_table.num_embeddings == 11  # + the null class
    labels = torch.randint(0, 10, (20000,))
    dropped = emb.token_drop(labels)
    frac = (dropped == 10).float().mean().item()
    assert abs(frac - 0.1) < 0.015
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])
    # eval: no dropout; forced ids always drop
    assert torch.equal(emb(labels[:5], train=False), emb.embedding_table(labels[:5]))
    forced = emb(labels[:4], train=False, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert torch.equal(forced[0], emb.embedding_table.weight[10])
    assert torch.equal(forced[1], emb.embedding_table.weight[labels[1]])
    # a model in train mode with dropout 1.0 sees only the null class
    model = _random_weights(DiT(**{**TINY, "class_dropout_prob": 1.0}), seed=1).train()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 4])
    torch.testing.assert_close(model(x, t, torch.tensor([1, 2])), model(x, t, torch.tensor([10, 10])))
    assert LabelEmbedder(10, 8, 0.0).embedding_table.num_embeddings == 10  # no null row without dropout


def test_forward_with_cfg_semantics():
    torch.manual_seed(0)
    model = _golden_tiny()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 100])
    y = torch.tensor([3, 5])
    null = torch.full_like(y, 10)
    xx, tt, yy = torch.cat([x, torch.randn_like(x)]), torch.cat([t, t]), torch.cat([y, null])  # 2nd half ignored
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null)
        g1 = model.forward_with_cfg(xx, tt, yy, 1.0)
        g4 = model.forward_with_cfg(xx, tt, yy, 4.0)
    # cfg 1 = the conditional output on the guided channels, for both halves
    torch.testing.assert_close(g1[:2, :3], cond[:, :3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g1[2:, :3], cond[:, :3], atol=1e-5, rtol=1e-5)
    # guidance formula on the first 3 channels only; the rest is the raw output of each half
    torch.testing.assert_close(g4[:2, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(g4[:2, 3:], cond[:, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g4[2:, 3:], uncond[:, 3:], atol=1e-5, rtol=1e-5)
    # a model built directly (not from the registry) guides all in_channels
    full = _golden_tiny(cfg_channels=None)
    assert full.cfg_channels == 4
    with torch.no_grad():
        g4f = full.forward_with_cfg(xx, tt, yy, 4.0)
    torch.testing.assert_close(g4f[:2, 3], uncond[:, 3] + 4.0 * (cond[:, 3] - uncond[:, 3]), atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------------------- non-square inputs
def test_non_square_input():
    torch.manual_seed(0)
    model = _random_weights(DiT(**{**TINY, "input_size": (8, 12)}), seed=2).eval()
    assert model.grid == (4, 6) and model.pos_embed.shape == (1, 24, 64)
    out = model(torch.randn(2, 4, 8, 12), torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert out.shape == (2, 8, 8, 12) and torch.isfinite(out).all()
    assert json.loads(json.dumps(model.config))["input_size"] == [8, 12]
    # pos_embed rows in raster order: first half encodes the column, second half the row (upstream's convention)
    table = get_2d_sincos_pos_embed(64, (4, 6))
    one_d = lambda pos: np.concatenate([np.sin(pos / 10000 ** (np.arange(16) / 16.0)),  # noqa: E731
                                        np.cos(pos / 10000 ** (np.arange(16) / 16.0))])
    for r, c in [(0, 0), (1, 4), (3, 5)]:
        np.testing.assert_allclose(table[r * 6 + c], np.concatenate([one_d(c), one_d(r)]), atol=1e-6)


def test_patchify_unpatchify_locality_non_square():
    """Depth 0: each output patch depends only on its own input patch (checks token <-> pixel ordering)."""
    torch.manual_seed(0)
    model = _random_weights(DiT(**{**TINY, "input_size": (8, 12), "depth": 0}), seed=3).eval()
    x = torch.randn(1, 4, 8, 12)
    t, y = torch.tensor([10]), torch.tensor([1])
    base = model(x, t, y)
    x2 = x.clone()
    x2[0, :, 5, 9] += 1.0  # pixel (5, 9) -> patch (2, 4)
    changed = (model(x2, t, y) - base).abs().sum(dim=(0, 1)) > 0
    expected = torch.zeros(8, 12, dtype=torch.bool)
    expected[4:6, 8:10] = True
    assert torch.equal(changed, expected)


def test_diffusers_conventions_are_model_options():
    """timestep_freq_shift=1 divides by half - 1 (diffusers: the last frequency is exactly 1e-4); mlp_norm_eps is the
    pre-MLP LayerNorm's eps; both are in the config (so checkpoints carry them) and bad values are refused."""
    freqs = torch.arcsin(TimestepEmbedder.timestep_embedding(torch.tensor([1.0]), 256, freq_shift=1)[0, 128:].double())
    assert freqs[-1].item() == pytest.approx(1e-4, rel=1e-4)
    model = DiT(input_size=8, patch_size=4, in_channels=1, hidden_size=16, depth=2, num_heads=2, num_classes=3,
                timestep_freq_shift=1, mlp_norm_eps=1e-5)
    assert model.config["timestep_freq_shift"] == 1 and model.blocks[1].norm2.eps == 1e-5
    assert model.blocks[1].norm1.eps == 1e-6 and model.t_embedder.freq_shift == 1
    with pytest.raises(ValueError, match="timestep_freq_shift=2"):
        DiT(input_size=8, patch_size=4, in_channels=1, hidden_size=16, depth=2, num_heads=2, timestep_freq_shift=2)
