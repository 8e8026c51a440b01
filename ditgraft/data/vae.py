"""Images <-> SD-VAE latents with diffusers' ``AutoencoderKL`` (the optional extra ``pip install -e ".[diffusers]"``).

DiT-XL/2 and the grafting paper work on the latents of the Stable Diffusion VAE (``stabilityai/sd-vae-ft-ema`` or
``-mse``): 256x256x3 images in [-1, 1] -> 32x32x4 latents, multiplied by 0.18215 (``SD_VAE_SCALE``) for training;
samples are divided by it before decoding.

- ``load_vae(source)``: a local folder (``AutoencoderKL.save_pretrained`` output, or a snapshot with a ``vae/``
  subfolder) or a hub id such as ``stabilityai/sd-vae-ft-ema`` (downloaded by diffusers / huggingface_hub).
- ``encode_folder``: an image folder (class subfolders -> labels, see data/images.py) through DiT's centre crop and
  the encoder, into the latents ``.npz`` that ``load_latents`` reads (keys ``latents``, ``labels`` and ``classes``, the
  class folder names). As DiT's ``extract_features`` it draws from the posterior (seeded per row of the file, so
  the file is the same however the work is split).
  ``flip=True`` also stores the horizontally flipped copy of every image, right after it (as fast-DiT's feature
  extraction does), so the file holds 2N rows. ``per_class`` keeps the first N images of every class (the paper's
  stage 2 uses 10% of ImageNet). Under torchrun (WORLD_SIZE > 1) rank r encodes images r, r + world, ... into a
  part file; rank 0 merges the parts in image order and writes the file.
- ``latent_decoder(vae)``: model-space samples -> images in [-1, 1], the ``decode`` hook of sampling and evaluation.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ditgraft.data.images import ImageFolderDataset
from ditgraft.data.latents import SD_VAE_SCALE, save_latents
from ditgraft.utils import atomic_path

__all__ = ["load_vae", "encode_images", "decode_latents", "latent_decoder", "encode_folder"]


def _autoencoder_cls():
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ImportError("the VAE needs diffusers, which is not installed: pip install -e \".[diffusers]\"") from err
    return AutoencoderKL


def load_vae(source: str, device="cpu", dtype: torch.dtype = torch.float32):
    """``AutoencoderKL.from_pretrained(source)``: a local folder (a VAE's, or a pipeline's with ``vae/``) or a hub id
    (``owner/name``: a VAE repository, or a pipeline's ``vae/``), in eval mode."""
    cls = _autoencoder_cls()
    source = os.fspath(source)
    if os.path.isdir(source):
        sub = "vae" if not os.path.exists(os.path.join(source, "config.json")) and os.path.isdir(
            os.path.join(source, "vae")) else None
        vae = cls.from_pretrained(source, subfolder=sub, torch_dtype=dtype)
    elif os.path.exists(source):
        raise ValueError(f"vae={source!r} is a file; give the folder that holds config.json and the weights "
                         "(AutoencoderKL.save_pretrained output) or a hub id such as stabilityai/sd-vae-ft-ema")
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")):  # a hub id: a VAE, or a pipeline's vae/
        try:
            vae = cls.from_pretrained(source, torch_dtype=dtype)
        except OSError:
            vae = cls.from_pretrained(source, subfolder="vae", torch_dtype=dtype)
    else:
        raise FileNotFoundError(f"vae={source!r}: no such folder, and not a hub id (owner/name, e.g. "
                                "stabilityai/sd-vae-ft-ema)")
    return vae.to(device).eval().requires_grad_(False)


def _first_param(vae) -> torch.nn.Parameter:
    return next(vae.parameters())


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, seeds: list[int] | None = None) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] -> scaled latents [N, 4, H/8, W/8] (float32, on the VAE's device).

    ``seeds``: one per image; image i's posterior draw is mean + std * noise with the noise from
    ``torch.Generator().manual_seed(seeds[i])`` (on the CPU), so a latent does not depend on the batch, the rank or
    the device it was encoded in. None: the posterior mean."""
    p = _first_param(vae)
    dist = vae.encode(images.to(device=p.device, dtype=p.dtype)).latent_dist
    if seeds is None:
        z = dist.mean
    else:
        if len(seeds) != len(images):
            raise ValueError(f"seeds: {len(seeds)} seeds for {len(images)} images; give one per image")
        noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                             for s in seeds])
        z = dist.mean + dist.std * noise.to(device=dist.mean.device, dtype=dist.mean.dtype)
    return ((z - latent_shift(vae)) * latent_scale(vae)).float()


def latent_scale(vae) -> float:
    """The VAE's own latent scale (``config.scaling_factor``: 0.18215 for the SD VAE that DiT uses, 0.13025 for
    the SDXL VAE of PixArt-Sigma), ``SD_VAE_SCALE`` where the VAE records none."""
    config = getattr(vae, "config", None)
    scale = getattr(config, "scaling_factor", None)
    return float(scale) if scale else SD_VAE_SCALE


def latent_shift(vae) -> float:
    """The VAE's latent shift (``config.shift_factor``: 0.0609 for SD3's VAE, 0.1159 for FLUX's; 0 where the VAE
    records none): model latents are (z - shift) * scale, as the SD3 and Flux pipelines hand them over."""
    config = getattr(vae, "config", None)
    return float(getattr(config, "shift_factor", None) or 0.0)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Model latents ((z - shift) * scale) -> images in [-1, 1] (float32, same device as the latents)."""
    p = _first_param(vae)
    z = latents.to(device=p.device, dtype=p.dtype) / latent_scale(vae) + latent_shift(vae)
    out = vae.decode(z).sample
    return out.float().clamp(-1, 1).to(latents.device)


def latent_decoder(vae):
    """The ``decode`` hook of ``eval.sampling.generate``: model samples (scaled latents) -> images in [-1, 1]."""
    return lambda z: decode_latents(vae, z)


def _encode_positions(ds, vae, chosen: list[int], positions: list[int], flip: bool, batch_size: int, seed: int,
                      progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and labels of the images ``chosen[p]`` for p in ``positions`` (image p fills rows p, or 2p and 2p + 1
    with its mirror image when ``flip``; each row's posterior draw is seeded by its row number)."""
    from tqdm import tqdm

    lat, lab = [], []
    for start in tqdm(range(0, len(positions), batch_size), desc="encode", disable=not progress, leave=False):
        chunk = positions[start:start + batch_size]
        x = torch.stack([ds[chosen[p]][0] for p in chunk])
        if flip:
            x = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)
        rows = [p * 2 + k for p in chunk for k in range(2)] if flip else chunk
        lat.append(encode_images(vae, x, seeds=[seed * 1_000_003 + r for r in rows]).cpu())
        labels = [ds.labels[chosen[p]] for p in chunk]
        lab.extend([y for y in labels for _ in range(2)] if flip else labels)
    return torch.cat(lat), torch.tensor(lab, dtype=torch.int64)


def _first_per_class(labels: list[int], per_class: int) -> list[int]:
    count: dict[int, int] = {}
    keep = []
    for i, y in enumerate(labels):
        if count.get(y, 0) < per_class:
            count[y] = count.get(y, 0) + 1
            keep.append(i)
    return keep


def encode_folder(image_dir: str, vae, out: str, image_size: int = 256, flip: bool = False, batch_size: int = 32,
                  seed: int = 0, per_class: int | None = None, rank: int = 0, world: int = 1,
                  progress: bool = False) -> str | None:
    """Encode the images of ``image_dir`` (all, or the first ``per_class`` of every class in file-name order, e.g.
    130 for the paper's 10% of ImageNet) into ``out`` (.npz); see the module docstring. Returns the path written
    (on rank 0; other ranks return None once rank 0 has written it)."""
    out = os.fspath(out)
    if not out.endswith(".npz"):
        raise ValueError(f"out={out!r}: the latents file is an .npz; end the name with .npz")
    for field, value in (("batch_size", batch_size), ("per_class", 1 if per_class is None else per_class)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{field}={value!r} is not allowed; use an integer >= 1")
    ds = ImageFolderDataset(image_dir, image_size, channels=3)
    chosen = list(range(len(ds))) if per_class is None else _first_per_class(ds.labels, per_class)
    mine = list(range(rank, len(chosen), world))
    if world == 1:
        lat, lab = _encode_positions(ds, vae, chosen, mine, flip, batch_size, seed, progress)
        _save(out, lat, lab, ds.classes)
        return out
    import torch.distributed as dist

    if mine:
        lat, lab = _encode_positions(ds, vae, chosen, mine, flip, batch_size, seed, progress)
    else:
        lat, lab = torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    with atomic_path(f"{out}.part{rank}.pt") as tmp:
        torch.save({"latents": lat, "labels": lab}, tmp)
    dist.barrier()
    if rank != 0:
        dist.barrier()  # rank 0 merges
        return None
    parts = [torch.load(f"{out}.part{r}.pt", weights_only=True) for r in range(world)]
    rows = 2 if flip else 1
    lat = torch.empty((len(chosen) * rows, *parts[0]["latents"].shape[1:]), dtype=torch.float32)
    lab = torch.empty(len(chosen) * rows, dtype=torch.int64)
    for r, part in enumerate(parts):  # rank r holds positions r, r + world, ...
        if not len(part["labels"]):
            continue
        idx = torch.tensor([p * rows + k for p in range(r, len(chosen), world) for k in range(rows)])
        lat[idx], lab[idx] = part["latents"], part["labels"]
    _save(out, lat, lab, ds.classes)
    for r in range(world):
        os.remove(f"{out}.part{r}.pt")
    dist.barrier()
    return out


def _save(out: str, latents: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> None:
    save_latents(out, latents, labels, classes=np.array(classes or [], dtype=np.str_))
