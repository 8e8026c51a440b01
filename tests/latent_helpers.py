"""Tiny stand-ins for the real DiT-XL/2 path: an image folder and an Inception-shaped feature network, built
offline in well under a second (the tiny AutoencoderKL is ``helpers.tiny_vae``)."""
from __future__ import annotations

import os

import numpy as np
import torch


def write_image_folder(root: str, classes=("cat", "dog"), per_class: int = 4, size: int = 20, seed: int = 0) -> str:
    """<root>/<class>/<i>.png: random RGB images (non-square, so the centre crop has work to do)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size, size + 6, 3), dtype=np.uint8)
            Image.fromarray(arr).save(os.path.join(root, c, f"{i}.png"))
    return root


class TinyFeatures:
    """Inception-shaped features (``extract`` -> pool / logits / spatial, like eval.inception.InceptionFeatures)
    from a fixed random projection of 8x8 average-pooled pixels."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w_pool = torch.randn(192, 16, generator=g) / 14
        self.w_logits = torch.randn(16, 10, generator=g)
        self.w_spatial = torch.randn(192, 12, generator=g) / 14

    def extract(self, images, batch_size: int = 64) -> dict[str, np.ndarray]:
        sources = [images] if isinstance(images, np.ndarray) else images
        feats = []
        for src in sources:
            x = torch.from_numpy(np.array(src)).permute(0, 3, 1, 2).float() / 255
            feats.append(torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1))
        f = torch.cat(feats)
        pool = torch.tanh(f @ self.w_pool)
        return {"pool": pool.numpy(), "logits": (pool @ self.w_logits).numpy(),
                "spatial": torch.tanh(f @ self.w_spatial).numpy()}
