"""Helpers shared by the tests (fixtures live in conftest.py)."""
import os

import torch

from ditgraft.models.checkpoints import save_safetensors
from ditgraft.models.dit import DiT
from ditgraft.models.mmdit import MMDiT


def randomize_weights(model: torch.nn.Module, std: float, seed: int | None = None) -> torch.nn.Module:
    """Normal(0, std) values in every trainable parameter, drawn from a generator seeded with ``seed`` (or from the
    global generator): zero-initialised parts (adaLN-Zero, gates, dwconv) would otherwise make blocks identities or
    leave paths untested. Fixed tables stored as frozen parameters (DiT's pos_embed) keep their values."""
    g = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, std, generator=g)
    return model


def tiny_dit(depth: int = 2, seed: int = 0, **kw):
    """A small testbed-family DiT with non-zero weights everywhere (adaLN-Zero would make blocks identities)."""
    torch.manual_seed(seed)
    cfg = dict(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=depth, num_heads=2, num_classes=10)
    cfg.update(kw)
    return randomize_weights(DiT(**cfg), 0.05)


def tiny_mmdit(depth: int = 3, seed: int = 0, **kw):
    """A small flowbed-family MMDiT (16x16x1, 4x4 patch grid, 3 caption tokens) with non-zero weights everywhere."""
    torch.manual_seed(seed)
    cfg = dict(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=depth, num_heads=2, num_classes=10)
    cfg.update(kw)
    return randomize_weights(MMDiT(**cfg), 0.1).eval()


# Compiled sampling (torch.compile, tens of seconds per compile on a CPU): every test that compiles samples this one
# structure at this one batch, so a test process compiles once (models of the same structure and input shapes share
# the family's compiled forward) and those tests, marked slow, cost a few seconds each after the first.
COMPILE_BATCH = 10


def compile_dit(seed: int = 0):
    """The tiny DiT of the compiled-sampling tests: 32x32x1 images as the testbed (16 tokens), depth 1."""
    return tiny_dit(depth=1, input_size=32, patch_size=8, seed=seed)


def tiny_vae(seed: int = 0):
    """AutoencoderKL with 2 resolution levels: 16x16x3 images <-> 8x8x4 latents (the SD VAE divides by 8)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16).eval()


def save_mnist_teacher(directory: str) -> str:
    """A tiny mnist5k-shaped teacher (32x32x1, 16 tokens) saved as ``directory``/teacher.safetensors; its path."""
    model = tiny_dit(depth=2, input_size=32, patch_size=8)
    path = os.path.join(directory, "teacher.safetensors")
    save_safetensors(path, model, {"model_config": model.config, "pretrain": {"train_flops": 1e13}})
    return path


class Crash(RuntimeError):
    """Raised by ``crash_on_call`` to simulate a run killed mid-way."""


def crash_on_call(fn, at: int):
    """``fn`` that raises Crash on its ``at``-th call (1-based) and behaves normally otherwise."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise Crash
        return fn(*args, **kwargs)

    return wrapped
