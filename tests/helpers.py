"""Helpers shared by the tests (fixtures live in conftest.py)."""
import os

import torch

from ditgraft.models.checkpoints import save_safetensors
from ditgraft.models.dit import DiT


def tiny_dit(depth: int = 2, seed: int = 0, **kw):
    """A small testbed-family DiT with non-zero weights everywhere (adaLN-Zero would make blocks identities)."""
    torch.manual_seed(seed)
    cfg = dict(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=depth, num_heads=2, num_classes=10)
    cfg.update(kw)
    model = DiT(**cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model


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
