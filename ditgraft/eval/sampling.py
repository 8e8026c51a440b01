"""Class-conditional sample generation in fixed, seeded batches (the one entry point is diffusion.samplers.sample).

Batch b always gets labels (b*B + i) % num_classes and a generator seeded by (seed, b), so a set of samples is the
same however it is split: across ranks (rank r takes batches b with b % world == r) or across resumed runs.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from ditgraft.data.mnist5k import to_uint8
from ditgraft.diffusion.samplers import SamplingConfig, sample
from ditgraft.distributed import barrier, rank_world
from ditgraft.eval.adm import load_samples_npz, save_samples_npz
from ditgraft.utils import atomic_path


def batch_labels(b: int, batch_size: int, num: int, num_classes: int, device) -> torch.Tensor:
    start = b * batch_size
    return torch.arange(start, min(start + batch_size, num), device=device) % num_classes


@torch.no_grad()
def generate(model, num: int, cfg: SamplingConfig, seed: int = 0, batch_size: int = 100, device="cpu",
             rank: int = 0, world: int = 1, decode=None, progress: bool = False,
             raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Samples as uint8 NHWC with their labels. ``decode`` maps model-space samples to [-1, 1] images
    (e.g. a VAE decoder for latent models); the testbed is in pixel space and needs none. ``raw=True`` returns the
    model-space samples themselves (float32 NCHW, no decoding): synthetic training data."""
    from tqdm import tqdm

    from ditgraft.utils import check_seed

    for name, value in (("num", num), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be an integer >= 1")
    check_seed(seed, "seed")
    model.eval()
    num_batches = math.ceil(num / batch_size)
    c = model.in_channels
    h, w = model.grid[0] * model.patch_size, model.grid[1] * model.patch_size
    images, labels = [], []
    mine = [b for b in range(num_batches) if b % world == rank]
    for b in tqdm(mine, desc="sample", disable=not progress, leave=False):
        y = batch_labels(b, batch_size, num, model.num_classes, device)
        g = torch.Generator().manual_seed(seed * 100_003 + b)
        x = sample(model, y, (len(y), c, h, w), cfg, generator=g)
        if raw:
            images.append(x.cpu().numpy().astype(np.float32))
        else:
            images.append(to_uint8(x if decode is None else decode(x)))
        labels.append(y.cpu().numpy())
    if not images:
        empty = np.zeros((0, c, h, w), np.float32) if raw else np.zeros((0, h, w, c), np.uint8)
        return empty, np.zeros((0,), np.int64)
    return np.concatenate(images), np.concatenate(labels)


def gather_samples(out_dir: str, images: np.ndarray, labels: np.ndarray, batch_size: int):
    """Under torchrun, the batches of ``generate`` from every rank back in batch order on rank 0 (None on the
    others). Each rank writes ``part{rank}.npz`` in ``out_dir`` (no large objects through the process group);
    rank 0 merges and removes them. One process: (images, labels) as given."""
    rank, world = rank_world()
    if world == 1:
        return images, labels
    os.makedirs(out_dir, exist_ok=True)
    if len(images):  # a rank can have no batch (fewer batches than ranks)
        save_samples_npz(os.path.join(out_dir, f"part{rank}.npz"), images, labels)
    barrier()
    if rank != 0:
        barrier()  # rank 0 has read the parts
        return None
    files = [os.path.join(out_dir, f"part{r}.npz") for r in range(world)]
    parts = [load_samples_npz(f) if os.path.exists(f) else (images[:0], labels[:0]) for f in files]
    imgs, labs = [], []
    for b in range(sum(math.ceil(len(im) / batch_size) for im, _ in parts)):
        im, lb = parts[b % world]  # rank r generated batches r, r + world, ...
        chunk = slice((b // world) * batch_size, (b // world + 1) * batch_size)
        imgs.append(im[chunk])
        labs.append(lb[chunk])
    for f in files:
        if os.path.exists(f):
            os.remove(f)
    barrier()
    return np.concatenate(imgs), np.concatenate(labs)


def save_grid(path: str, images: np.ndarray, nrow: int = 10) -> None:
    """uint8 NHWC -> one PNG grid (matplotlib, no torchvision)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, h, w, c = images.shape
    rows = math.ceil(n / nrow)
    canvas = np.zeros((rows * (h + 2) + 2, nrow * (w + 2) + 2, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        canvas[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + col * (w + 2): 2 + col * (w + 2) + w] = images[i]
    img = canvas[..., 0] if c == 1 else canvas
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        plt.imsave(tmp, img, cmap="gray" if c == 1 else None, vmin=0, vmax=255, format="png")


def save_pngs(folder: str, images: np.ndarray, labels: np.ndarray | None = None, start: int = 0) -> int:
    """One PNG per image (``{index:06d}.png``, or ``{index:06d}_{label}.png``): the folder layout that torch-fidelity
    and clean-fid read. Returns the number written."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(images):
        name = f"{start + i:06d}" + ("" if labels is None else f"_{int(labels[i])}") + ".png"
        with atomic_path(os.path.join(folder, name)) as tmp:
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp, format="PNG")
    return len(images)
