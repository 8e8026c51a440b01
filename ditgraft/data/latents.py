"""Precomputed latents (e.g. SD-VAE encodings of ImageNet) as training data.

Latent DiTs train on VAE latents, not pixels; encoding once and storing the result saves the VAE forward at every
step. Two file layouts are read:

- ``.npz`` with keys ``latents`` (or ``arr_0``) -> float array [N, C, H, W] and ``labels`` (or ``arr_1``) -> integer
  array [N]. Without a labels key every label is 0 (a warning says so). Other keys are ignored.
- ``.npy`` holding the float array [N, C, H, W] alone. Labels come from ``labels_path`` when given, else from a
  sibling file named ``<stem>_labels.npy`` (``train.npy`` -> ``train_labels.npy``) when it exists, else all 0
  (a warning says so).

Scale: DiT (and the grafting paper) train on SD-VAE latents multiplied by 0.18215 (``SD_VAE_SCALE``), which gives
them roughly unit variance. If a file holds *raw* VAE encoder outputs pass ``scale=SD_VAE_SCALE`` so they are
multiplied before use; files that are already scaled take the default ``scale=None`` (unchanged). Sampling
divides by the same factor before decoding.

``save_latents`` writes the ``.npz`` layout (atomically) so that ``load_latents`` reads it back unchanged.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from ditgraft.utils import atomic_path

__all__ = ["SD_VAE_SCALE", "LATENT_SUFFIXES", "load_latents", "save_latents", "sibling_labels_path"]

SD_VAE_SCALE = 0.18215
LATENT_SUFFIXES = (".npy", ".npz")
_LATENT_KEYS = ("latents", "arr_0")
_LABEL_KEYS = ("labels", "arr_1")


def sibling_labels_path(path: str) -> str:
    """``dir/name.npy`` -> ``dir/name_labels.npy`` (where labels of a bare .npy latents file are looked for)."""
    stem, _ = os.path.splitext(path)
    return stem + "_labels.npy"


def _check_latents(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.ndim != 4:
        raise ValueError(f"{where}: latents must be a 4-D array [N, C, H, W], got shape {arr.shape}")
    if arr.dtype == np.uint8 and arr.shape[-1] in (1, 3):
        raise ValueError(f"{where}: got uint8 array of shape {arr.shape}, which looks like images in the ADM "
                         "NHWC layout, not latents; put images in a folder and load that instead")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{where}: latents dtype {arr.dtype} is not allowed; use float16, float32 or float64")
    if arr.shape[0] == 0:
        raise ValueError(f"{where}: latents array is empty (shape {arr.shape})")
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}: latents contain NaN or inf values")
    return arr


def _check_labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
    if labels.ndim != 1:
        raise ValueError(f"{where}: labels must be a 1-D array [N], got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels dtype {labels.dtype} is not allowed; use an integer dtype (class ids)")
    if len(labels) != n:
        raise ValueError(f"{where}: {len(labels)} labels for {n} latents; the counts must match")
    if n and labels.min() < 0:
        raise ValueError(f"{where}: labels must be >= 0 class ids, found {int(labels.min())}")
    return labels


def _zeros_with_warning(n: int, path: str, hint: str) -> np.ndarray:
    warnings.warn(f"{path}: no labels found ({hint}); using label 0 for all {n} latents", stacklevel=3)
    return np.zeros(n, dtype=np.int64)


def load_latents(path: str, labels_path: str | None = None,
                 scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read latents and labels -> (float32 tensor [N, C, H, W], int64 tensor [N]). See the module docstring."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"latents file {path!r} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in LATENT_SUFFIXES:
        raise ValueError(f"latents file {path!r}: suffix {suffix!r} is not allowed; use .npy or .npz")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale)
                              or scale <= 0):
        raise ValueError(f"scale: got {scale!r}; use None (no change) or a positive number "
                         f"(e.g. {SD_VAE_SCALE} for raw SD-VAE latents)")

    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            lat_key = next((k for k in _LATENT_KEYS if k in f), None)
            if lat_key is None:
                raise ValueError(f"{path}: no latents array; expected key 'latents' or 'arr_0', found {keys}")
            latents = _check_latents(f[lat_key], f"{path}[{lat_key!r}]")
            lab_key = next((k for k in _LABEL_KEYS if k in f), None)
            if lab_key is not None:
                labels = _check_labels(f[lab_key], len(latents), f"{path}[{lab_key!r}]")
            elif labels_path is None:
                labels = _zeros_with_warning(len(latents), path, "no 'labels' or 'arr_1' key")
    else:
        latents = _check_latents(np.load(path, allow_pickle=False), path)
        lab_key = None
        if labels_path is None and os.path.isfile(sibling_labels_path(path)):
            labels_path = sibling_labels_path(path)
        if labels_path is None:
            labels = _zeros_with_warning(len(latents), path, f"no labels_path and no {sibling_labels_path(path)}")

    if labels_path is not None and lab_key is None:
        if not os.path.isfile(labels_path):
            raise FileNotFoundError(f"labels file {labels_path!r} does not exist")
        labels = _check_labels(np.load(labels_path, allow_pickle=False), len(latents), labels_path)
    elif labels_path is not None:
        raise ValueError(f"{path} already holds labels under {lab_key!r}; do not also pass labels_path={labels_path!r}")

    x = torch.from_numpy(np.ascontiguousarray(latents)).float()
    if scale is not None:
        x = x * float(scale)
    return x, torch.from_numpy(labels.astype(np.int64))


def save_latents(path: str, latents, labels=None, classes=None) -> None:
    """Write ``latents`` [N, C, H, W] (float) and ``labels`` [N] (int; default zeros) to an ``.npz`` file;
    ``classes`` (optional, strings): the name of every class id, stored as ``classes`` (readers ignore it)."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise ValueError(f"path {path!r}: save_latents writes .npz files; end the name with .npz")
    lat = latents.detach().cpu().numpy() if isinstance(latents, torch.Tensor) else np.asarray(latents)
    lat = _check_latents(lat, "latents")
    if labels is None:
        lab = np.zeros(len(lat), dtype=np.int64)
    else:
        lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        lab = _check_labels(lab, len(lat), "labels")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            extra = {} if classes is None else {"classes": np.asarray(classes, dtype=np.str_)}
            np.savez(f, latents=lat, labels=lab.astype(np.int64), **extra)
