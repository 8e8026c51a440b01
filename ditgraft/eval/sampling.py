"""Protocol sample generation in fixed, seeded batches (the one entry point is diffusion.samplers.sample).

Sample i is conditioned as its family says (``Family.protocol_cond``): class i % num_classes for class-conditional
families, caption i % n of a caption set for caption-conditioned ones (PixArt). Batch b gets a generator seeded by
(seed, b), so a set of samples is the same however it is split: across ranks (rank r takes batches b with
b % world == r) or across resumed runs. ``decoding`` is the one home of the rule that a latent model needs a VAE.
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
from ditgraft.models.families import family_of
from ditgraft.utils import atomic_path


def is_latent(model) -> bool:
    """Whether the model works on latents (channels other than 1 or 3), whose samples a VAE decodes."""
    return family_of(model).in_channels(model) not in (1, 3)


def decoding(model, vae=None, clip: bool | None = None, device="cpu", option: str = "vae",
             need_decoder: bool = True) -> tuple[bool, object]:
    """(clip_denoised, decode) for sampling ``model``: a pixel model (1 or 3 channels) is clipped to [-1, 1] and
    needs no decoder; a latent model is not clipped (as DiT) and decodes with ``vae`` (an AutoencoderKL, or its
    folder or hub id), refused when it is missing unless ``need_decoder`` is False (raw latents, e.g. synthetic
    data). ``clip`` overrides the default; ``option`` names the setting in the error (``--vae``, ``eval.vae``)."""
    latent = is_latent(model)
    decode = None
    if latent and need_decoder:
        if vae is None:
            raise ValueError(f"{option} is missing: the model works on {family_of(model).in_channels(model)}-channel "
                             "latents, so its samples must be decoded; name the VAE that decodes them (a folder or "
                             "a hub id, e.g. stabilityai/sd-vae-ft-ema)")
        from ditgraft.data.vae import latent_decoder, load_vae

        decode = latent_decoder(load_vae(vae, device=device) if isinstance(vae, (str, os.PathLike)) else vae)
    return ((not latent) if clip is None else bool(clip)), decode


def caption_set(captions, keys: tuple[str, ...] = ("prompt_embeds", "prompt_attention_mask")
                ) -> tuple[tuple | None, tuple | None]:
    """(captions, negative) of a protocol caption set for a family whose conditioning is the caption arrays
    ``keys`` (``Family.caption_keys``): a caption .npz (``ditgraft.data.captions``: its conditioning arrays, and its
    negative prompt's for guidance when stored; refused when they are not ``keys``) or the tensors as given, with
    an optional negative ([1, ...] each) after them. None: (None, None)."""
    if captions is None:
        return None, None
    if isinstance(captions, (str, os.PathLike)):
        from ditgraft.data.captions import caption_keys, load_caption_latents, load_negative

        path = os.fspath(captions)
        held = caption_keys(path) if os.path.isfile(path) else None
        if held is not None and held != tuple(keys):
            raise ValueError(f"captions={path!r} holds {', '.join(held) or 'no caption embeddings'}; this model's "
                             f"conditioning is {', '.join(keys)}")
        return load_caption_latents(path)[1], load_negative(path)
    parts = tuple(captions) if isinstance(captions, (tuple, list)) else (captions,)
    n = len(keys)
    if len(parts) not in (n, 2 * n):
        raise ValueError(f"captions: need ({', '.join(keys)}), optionally followed by the negative prompt's; got "
                         f"{len(parts)} tensors")
    return parts[:n], (parts[n:] or None)


def frames_side_by_side(x: torch.Tensor) -> torch.Tensor:
    """A video sample [B, C, F, H, W] as one image [B, C, H, F * W] (its frames left to right); images unchanged."""
    if x.ndim != 5:
        return x
    B, C, F, H, W = x.shape
    return x.permute(0, 1, 3, 2, 4).reshape(B, C, H, F * W)


@torch.no_grad()
def generate(model, num: int, cfg: SamplingConfig, seed: int = 0, batch_size: int = 100, device="cpu",
             rank: int = 0, world: int = 1, decode=None, progress: bool = False,
             raw: bool = False, captions=None, compile: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Samples as uint8 NHWC with their labels. ``decode`` maps model-space samples to [-1, 1] images
    (e.g. a VAE decoder for latent models, see ``decoding``); the testbed is in pixel space and needs none.
    ``raw=True`` returns the model-space samples themselves (float32 NCHW, no decoding): synthetic training data.

    Class-conditional models: sample i has class i % num_classes (its label). Caption-conditioned models (PixArt)
    need ``captions`` (see ``caption_set``; the protocol's caption set is the caption file the model was grafted
    on, i.e. the run's training data): sample i takes caption i % n and its label is that caption's index;
    guidance (cfg > 1) uses the stored negative prompt. ``compile``: sample through the family's compiled forward
    (``diffusion.samplers``; compiled once, reused by every batch)."""
    from tqdm import tqdm

    from ditgraft.utils import check_seed

    for name, value in (("num", num), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be an integer >= 1")
    check_seed(seed, "seed")
    family = family_of(model)
    family.require("sample")
    keys = family.caption_keys(model) if family.conditioning == "caption" else ()
    captions, negative = caption_set(captions, keys) if keys else caption_set(captions)
    model.eval()
    num_batches = math.ceil(num / batch_size)
    shape = family.sample_shape(model, 1)[1:]
    images, labels = [], []
    mine = [b for b in range(num_batches) if b % world == rank]
    for b in tqdm(mine, desc="sample", disable=not progress, leave=False):
        rows = torch.arange(b * batch_size, min((b + 1) * batch_size, num))
        y = family.protocol_cond(model, rows, device, captions)
        null = None if negative is None else tuple(n.expand(len(rows), *n.shape[1:]).to(device) for n in negative)
        g = torch.Generator().manual_seed(seed * 100_003 + b)
        x = sample(model, y, (len(rows), *shape), cfg, generator=g, null_cond=null, compile=compile)
        if raw:
            images.append(x.cpu().numpy().astype(np.float32))
        else:
            images.append(to_uint8(frames_side_by_side(x if decode is None else decode(x))))
        labels.append((y if family.conditioning == "class" else rows % len(captions[0])).cpu().numpy())
    if not images:
        c, *_, h, w = shape
        w = w * (shape[1] if len(shape) == 4 and not raw else 1)  # a video's frames side by side
        empty = np.zeros((0, *shape), np.float32) if raw else np.zeros((0, h, w, c), np.uint8)
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
