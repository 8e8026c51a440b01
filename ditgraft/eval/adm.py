"""Read and write the npz files of the ADM evaluator (guided-diffusion `evaluations/evaluator.py`).

Sample batch (what the DiT / guided-diffusion sample scripts write, uncompressed np.savez):
    arr_0  uint8 [N, H, W, C]  images, NHWC, 0..255. C = 3 (RGB) for the ADM evaluator; C = 1 (grayscale)
                               is also accepted here for the MNIST testbed (the Inception extractor repeats it).
    arr_1  integer [N]         class labels, optional (written by class-conditional sampling).
Reference batch (e.g. VIRTUAL_imagenet256_labeled.npz):
    arr_0  as above; optional arr_1 labels; optional precomputed statistics
    mu [D], sigma [D, D]        of Inception pool_3 features (D = 2048), used for FID
    mu_s [Ds], sigma_s [Ds, Ds] of spatial features (Ds = 2023), used for sFID.

Writes are atomic: the npz goes to a temporary file in the destination folder, then os.replace() moves it
into place, so a crash never leaves a truncated file under the final name. np.savez appends ".npz" to names
without it; the writers here do the same explicitly and return the path actually written.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

__all__ = [
    "save_samples_npz",
    "load_samples_npz",
    "save_reference_batch",
    "load_reference_batch",
    "iter_npz_batches",
    "validate_images",
]

ALLOWED_CHANNELS = (1, 3)
STAT_PAIRS = (("mu", "sigma"), ("mu_s", "sigma_s"))


# ----------------------------------------------------------------------------------------------- validation

def validate_images(images, field: str = "images") -> np.ndarray:
    """Check an image batch is a uint8 [N, H, W, C] numpy array with C in (1, 3); return it unchanged."""
    if not isinstance(images, np.ndarray):
        raise TypeError(f"{field}: expected a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(f"{field}: dtype {images.dtype} is not allowed; images must be uint8 (0..255). "
                         "Convert with np.clip(np.round(x * 255), 0, 255).astype(np.uint8) from [0, 1] floats")
    if images.ndim != 4:
        raise ValueError(f"{field}: shape {images.shape} is not allowed; expected 4-D [N, H, W, C] (NHWC)")
    n, h, w, c = images.shape
    if c not in ALLOWED_CHANNELS:
        raise ValueError(f"{field}: shape {images.shape} has {c} channels in the last axis; allowed: "
                         f"{ALLOWED_CHANNELS} (NHWC layout; an NCHW array would show C in axis 1)")
    if n < 1 or h < 1 or w < 1:
        raise ValueError(f"{field}: shape {images.shape} is empty; need N, H, W >= 1")
    return images


def _validate_labels(labels, n: int, field: str) -> np.ndarray:
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{field}: dtype {labels.dtype} is not allowed; labels must be integers")
    if labels.shape != (n,):
        raise ValueError(f"{field}: shape {labels.shape} is not allowed; expected ({n},), one label per image")
    return labels


def _validate_stats(stats: dict, source: str) -> None:
    """mu/sigma (and mu_s/sigma_s) come in pairs: mu 1-D floating [D], sigma [D, D] floating and finite."""
    for mu_key, sigma_key in STAT_PAIRS:
        mu, sigma = stats.get(mu_key), stats.get(sigma_key)
        if (mu is None) != (sigma is None):
            missing = sigma_key if sigma is None else mu_key
            raise ValueError(f"{source}: {mu_key!r} and {sigma_key!r} must be given together; {missing!r} is missing")
        if mu is None:
            continue
        for key, arr, ndim in ((mu_key, mu, 1), (sigma_key, sigma, 2)):
            if not np.issubdtype(arr.dtype, np.floating):
                raise ValueError(f"{source}: {key!r} has dtype {arr.dtype}; must be floating point")
            if arr.ndim != ndim:
                raise ValueError(f"{source}: {key!r} has shape {arr.shape}; expected {ndim}-D")
            if not np.isfinite(arr).all():
                raise ValueError(f"{source}: {key!r} contains NaN or inf values")
        d = mu.shape[0]
        if sigma.shape != (d, d):
            raise ValueError(f"{source}: {sigma_key!r} has shape {sigma.shape}; expected ({d}, {d}) to match "
                             f"{mu_key!r} of shape {mu.shape}")


# ----------------------------------------------------------------------------------------------- writing

def _npz_path(path) -> Path:
    path = Path(path)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def _atomic_savez(path, arrays: dict) -> Path:
    """np.savez (uncompressed, like the ADM sample scripts) into ``atomic_path``'s temporary beside `path` (its name
    records the writer's pid, so a run lock's orphan sweep spares it while this process lives), then renamed."""
    from ditgraft.utils import atomic_path

    path = _npz_path(path)
    with atomic_path(str(path)) as tmp:
        with open(tmp, "wb") as f:  # a file object, so np.savez does not touch the name
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
    return path


def save_samples_npz(path, images_uint8: np.ndarray, labels=None) -> Path:
    """Write an ADM sample batch: arr_0 = images uint8 [N, H, W, C], arr_1 = labels [N] if given.

    ".npz" is appended to `path` when missing (as np.savez would); returns the path written.
    """
    images = validate_images(images_uint8, "images_uint8")
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = _validate_labels(labels, images.shape[0], "labels")
    return _atomic_savez(path, arrays)


def save_reference_batch(path, images: np.ndarray, mu=None, sigma=None, mu_s=None, sigma_s=None,
                         labels=None) -> Path:
    """Write an ADM reference batch: arr_0 images, optional arr_1 labels and FID/sFID statistics.

    mu/sigma and mu_s/sigma_s must each be given as a pair; they are stored as float64. Returns the path written.
    """
    images = validate_images(images, "images")
    stats = {k: (None if v is None else np.asarray(v, dtype=np.float64))
             for k, v in (("mu", mu), ("sigma", sigma), ("mu_s", mu_s), ("sigma_s", sigma_s))}
    _validate_stats(stats, "save_reference_batch")
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = _validate_labels(labels, images.shape[0], "labels")
    arrays.update({k: v for k, v in stats.items() if v is not None})
    return _atomic_savez(path, arrays)


# ----------------------------------------------------------------------------------------------- reading

def _open_npz(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable npz file ({e})") from e


def load_samples_npz(path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an ADM sample batch; returns (images uint8 [N, H, W, C], labels [N] or None)."""
    with _open_npz(path) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path}: missing 'arr_0' (the images); keys present: {sorted(data.files)}")
        images = validate_images(data["arr_0"], f"{path}: arr_0")
        labels = None
        if "arr_1" in data.files:
            labels = _validate_labels(data["arr_1"], images.shape[0], f"{path}: arr_1")
    return images, labels


def load_reference_batch(path, load_images: bool = True) -> dict:
    """Read an ADM reference batch into a dict keyed like the file, holding only the keys the file has.

    Keys: "arr_0" (uint8 [N, H, W, C] images), "arr_1" (labels [N]), "mu", "sigma", "mu_s", "sigma_s" (float
    FID / sFID statistics); other members are ignored. With load_images=False, "arr_0" and "arr_1" are skipped
    (npz members are read lazily, so an ImageNet reference's 2 GB of images is never read) - for when only the
    precomputed statistics are needed. Everything returned is validated (dtype, shapes, mu/sigma pairing).
    """
    out = {}
    with _open_npz(path) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path}: missing 'arr_0' (the images); keys present: {sorted(data.files)}")
        if load_images:
            out["arr_0"] = validate_images(data["arr_0"], f"{path}: arr_0")
            if "arr_1" in data.files:
                out["arr_1"] = _validate_labels(data["arr_1"], out["arr_0"].shape[0], f"{path}: arr_1")
        for key in ("mu", "sigma", "mu_s", "sigma_s"):
            if key in data.files:
                out[key] = data[key]
    _validate_stats(out, str(path))
    return out


def iter_npz_batches(path, key: str = "arr_0", batch_size: int = 500) -> Iterator[np.ndarray]:
    """Yield consecutive slices of one npz member without loading it whole (a 50k x 256 x 256 x 3 batch is 9.8 GB).

    Streams rows from the .npy inside the zip (works for np.savez and np.savez_compressed files); yields
    writable arrays. Arrays stored in Fortran order (or with unusual headers) are loaded whole, then sliced.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size!r}; must be an integer >= 1")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    with zipfile.ZipFile(path) as zf:
        member = f"{key}.npy"
        if member not in zf.namelist():
            raise ValueError(f"{path}: missing {key!r}; keys present: "
                             f"{sorted(n[:-4] for n in zf.namelist() if n.endswith('.npy'))}")
        with zf.open(member) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # rare header versions: no public streaming reader, load whole
                shape, fortran_order, dtype = None, True, None
            if fortran_order or dtype.hasobject or len(shape) == 0:
                arr = np.load(path, allow_pickle=False)[key]
                for start in range(0, arr.shape[0], batch_size):
                    yield arr[start:start + batch_size]
                return
            row_items = int(np.prod(shape[1:], dtype=np.int64))
            for start in range(0, shape[0], batch_size):
                rows = min(batch_size, shape[0] - start)
                nbytes = rows * row_items * dtype.itemsize
                buf = f.read(nbytes)
                if len(buf) != nbytes:
                    raise ValueError(f"{path}: {key!r} is truncated (expected {nbytes} bytes at row {start}, "
                                     f"got {len(buf)})")
                yield np.frombuffer(bytearray(buf), dtype=dtype).reshape((rows, *shape[1:]))
