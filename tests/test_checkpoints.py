"""Checkpoint I/O: ditgraft safetensors round trip, official DiT .pt files (plain state dict and train.py checkpoints),
strict loading, and hf:// sources resolved offline from a hand-made Hugging Face cache (real huggingface_hub code).
"""
import argparse
import json
import os
import socket

import pytest
import torch
from safetensors.torch import save_file

from ditgraft.models.checkpoints import (
    load_dit,
    load_official_state_dict,
    read_metadata,
    resolve_hub,
    save_safetensors,
)
from ditgraft.models.dit import DiT, build_dit

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _inputs():
    torch.manual_seed(0)
    return torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 10])


# ------------------------------------------------------------------------------------------- ditgraft safetensors
@pytest.mark.parametrize("input_size", [8, (8, 12)])
def test_safetensors_round_trip(tmp_path, input_size):
    model = _randomise(DiT(**{**TINY, "input_size": input_size}), seed=1).eval()
    path = str(tmp_path / "dit.safetensors")
    meta = {"model_config": model.config, "note": "round trip"}
    save_safetensors(path, model, meta)
    assert read_metadata(path) == json.loads(json.dumps(meta))
    loaded, got_meta = load_dit(path)
    assert isinstance(loaded, DiT) and not loaded.training
    assert _same_state(model, loaded) and loaded.config == json.loads(json.dumps(model.config))
    assert got_meta["model_config"] == json.loads(json.dumps(model.config))
    if input_size == 8:
        x, t, y = _inputs()
        with torch.no_grad():
            assert torch.equal(model(x, t, y), loaded(x, t, y))
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []  # atomic write left nothing behind


def test_safetensors_cfg_channels_survive(tmp_path):
    model = DiT(**TINY, cfg_channels=3)  # as the official registry entries
    path = str(tmp_path / "c3.safetensors")
    save_safetensors(path, model, {"model_config": model.config})
    assert load_dit(path)[0].cfg_channels == 3


def test_safetensors_without_metadata_or_with_recipe(tmp_path):
    model = DiT(**TINY)
    plain = str(tmp_path / "plain.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, plain)
    with pytest.raises(ValueError, match="no ditgraft metadata"):
        load_dit(plain)
    grafted = str(tmp_path / "grafted.safetensors")
    save_safetensors(grafted, model, {"model_config": model.config, "recipe": {"name": "x"}})
    with pytest.raises(ValueError, match="grafted"):
        load_dit(grafted)


# ------------------------------------------------------------------------------------------- official .pt files
@pytest.fixture(scope="module")
def s8_state():
    """A DiT-S/8 (64x64 images -> 8x8 latents) state dict, official names; seeded init (xavier, distinct per seed)."""
    torch.manual_seed(2)
    state = build_dit("DiT-S/8", input_size=8).state_dict()
    state["final_layer.linear.bias"] += 0.5  # nonzero where a fresh model has zeros
    return state


def _equals(model: torch.nn.Module, state: dict) -> bool:
    got = model.state_dict()
    return list(got) == list(state) and all(torch.equal(got[k], state[k]) for k in state)


def test_official_plain_state_dict(tmp_path, s8_state):
    path = str(tmp_path / "DiT-S-8-64x64.pt")
    torch.save(s8_state, path)
    model, meta = load_dit(path, model="DiT-S/8", image_size=64)
    assert _equals(model, s8_state) and model.config["input_size"] == 8 and meta["source"] == path
    assert model.cfg_channels == 3 and not model.training


def _train_checkpoint(path, state, args):
    """What DiT's train.py writes: {model, ema, opt, args}; here ema != model. Returns the ema state."""
    ema = {k: v + 0.01 for k, v in state.items()}
    params = [torch.nn.Parameter(v) for v in state.values()]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0)  # optimizer state_dict layout (no step: small file)
    torch.save({"model": state, "ema": ema, "opt": opt.state_dict(), "args": args}, path)
    return ema


def test_official_training_checkpoint_loads_ema(tmp_path, s8_state):
    path = str(tmp_path / "0050000.pt")
    ema = _train_checkpoint(path, s8_state, args={"model": "DiT-S/8", "image_size": 64})
    loaded, _ = load_dit(path, model="DiT-S/8", image_size=64)
    assert _equals(loaded, ema) and not _equals(loaded, s8_state)


def test_official_training_checkpoint_with_namespace_args(tmp_path, s8_state):
    path = str(tmp_path / "0100000.pt")
    ema = _train_checkpoint(path, s8_state, args=argparse.Namespace(model="DiT-S/8", image_size=64, epochs=1400))
    loaded, _ = load_dit(path, model="DiT-S/8", image_size=64)
    assert _equals(loaded, ema)


def test_official_wrong_keys_or_shapes_fail_strictly(tmp_path, s8_state):
    renamed = {k.replace("attn.qkv", "attn.to_qkv"): v for k, v in s8_state.items()}
    path = str(tmp_path / "renamed.pt")
    torch.save(renamed, path)
    with pytest.raises(ValueError, match=r"missing keys: .*attn\.qkv.*unexpected keys: .*attn\.to_qkv"):
        load_dit(path, model="DiT-S/8", image_size=64)
    path2 = str(tmp_path / "s8.pt")
    torch.save(s8_state, path2)
    with pytest.raises(ValueError, match=r"wrong shapes: pos_embed \(1, 1, 384\) \(expected \(1, 4, 384\)\)"):
        load_dit(path2, model="DiT-S/8", image_size=128)  # pos_embed has 4 tokens there, 1 in the file
    with pytest.raises(ValueError, match="wrong shapes: .*x_embedder"):
        load_dit(path2, model="DiT-S/4", image_size=32)  # patch 4: other x_embedder / final_layer shapes


def test_official_bad_arguments(tmp_path, s8_state):
    path = str(tmp_path / "s8.pt")
    torch.save(s8_state, path)
    with pytest.raises(ValueError, match="image_size=60"):
        load_dit(path, model="DiT-S/8", image_size=60)
    with pytest.raises(KeyError, match="DiT-Q/8"):
        load_dit(path, model="DiT-Q/8", image_size=64)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_dit(str(tmp_path / "missing.pt"))
    junk = str(tmp_path / "junk.pt")
    torch.save({"step": 3, "weights": [1, 2]}, junk)
    with pytest.raises(ValueError, match="not a DiT state dict"):
        load_official_state_dict(junk)


# ------------------------------------------------------------------------------------------- hf:// offline
def _fake_hub_cache(root, repo_id, filename, payload_writer, commit="0123456789abcdef0123456789abcdef01234567"):
    """The Hugging Face cache layout: models--owner--repo/{refs/main, snapshots/<commit>/<filename>}."""
    repo_dir = os.path.join(root, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(commit)
    target = os.path.join(repo_dir, "snapshots", commit, *filename.split("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    payload_writer(target)
    return target


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_CACHE + HF_HUB_OFFLINE=1, also patched into huggingface_hub.constants (read once at import)."""
    from huggingface_hub import constants

    cache = str(tmp_path / "hub")
    os.makedirs(cache)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return cache


def test_hf_source_resolves_offline_from_cache(offline_hub):
    model = _randomise(DiT(**TINY), seed=5)
    target = _fake_hub_cache(offline_hub, "someone/tiny-dit", "weights/dit.safetensors",
                             lambda p: save_safetensors(p, model, {"model_config": model.config}))
    assert os.path.realpath(resolve_hub("hf://someone/tiny-dit/weights/dit.safetensors")) == os.path.realpath(target)
    loaded, meta = load_dit("hf://someone/tiny-dit/weights/dit.safetensors")
    assert _same_state(model, loaded) and meta["model_config"]["hidden_size"] == 32


def test_hf_official_pt_offline(offline_hub, s8_state):
    _fake_hub_cache(offline_hub, "facebook/DiT-S-8", "DiT-S-8-64x64.pt", lambda p: torch.save(s8_state, p))
    loaded, _ = load_dit("hf://facebook/DiT-S-8/DiT-S-8-64x64.pt", model="DiT-S/8", image_size=64)
    assert _equals(loaded, s8_state)


def test_hf_source_errors_offline(offline_hub):
    with pytest.raises(ValueError, match="hf://owner/repo"):
        resolve_hub("hf://only-owner/file.safetensors")
    from huggingface_hub.errors import LocalEntryNotFoundError

    _fake_hub_cache(offline_hub, "someone/other", "a.safetensors", lambda p: open(p, "wb").close())
    with pytest.raises(LocalEntryNotFoundError):
        load_dit("hf://someone/other/missing.safetensors")
