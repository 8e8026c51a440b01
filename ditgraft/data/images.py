"""Image folders as training data, and ``load_dataset``: one entry point from a data spec string to (x, y).

Folder layouts (``ImageFolderDataset``):
- class subfolders, the ImageNet layout: ``root/<class>/**/<image>``; classes are the subfolder names sorted, so
  label i is the i-th name (``n01440764`` -> 0, ... for ImageNet). Every class folder must hold an image.
- a flat folder: ``root/<image>`` with every label 0 (unconditional data).
A folder with both top-level images and class subfolders is refused (ambiguous). Image suffixes (any case):
.png .jpg .jpeg .bmp .gif .webp; names starting with '.' are skipped.

Preprocessing is ADM's ``center_crop_arr`` (guided-diffusion, used by DiT): halve the image with a BOX filter while
its short side is at least twice the target, resize with BICUBIC so the short side equals the target, then crop
the centre square. Pixels become float32 in [-1, 1], channels first: [C, H, W] with C = 3 (RGB) or 1 (grey).

Pillow reads the files; it is optional (``pip install pillow``) and imported only when a folder is read.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ditgraft.data.captions import is_caption_file, load_caption_latents
from ditgraft.data.latents import load_latents
from ditgraft.data.mnist5k import load_mnist5k
from ditgraft.models.families import family_of
from ditgraft.models.families.base import cond_len

__all__ = ["IMAGE_SUFFIXES", "ImageFolderDataset", "center_crop_arr", "load_image_folder", "load_dataset"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _pil():
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError("reading image folders needs Pillow, which is not installed: pip install pillow") from err
    return Image


def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
    """ADM centre crop: BOX-halve while short side >= 2 * image_size, BICUBIC to short side = image_size, crop.

    Returns a uint8 array [image_size, image_size] or [image_size, image_size, C].
    """
    Image = _pil()
    while min(pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    ratio = image_size / min(pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * ratio) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)  # a writable copy
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def _images_under(folder: str) -> list[str]:
    """All image files below ``folder`` (recursively), sorted by relative path for a stable order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return sorted(found, key=lambda p: os.path.relpath(p, folder))


def to_8bit(img, path: str = "image"):
    """A PIL image with 8 bits per channel. 16-bit greyscale (modes I;16*, and I holding 16-bit values) is scaled
    by 255 / 65535, never clipped (PIL's own convert('L') saturates every value above 255); palette, CMYK and
    alpha modes are converted by PIL afterwards; float images are refused."""
    Image = _pil()
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"image {path!r}: 32-bit integer pixels span [{arr.min()}, {arr.max()}]; allowed: "
                             "8-bit or 16-bit images")
        return Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    if img.mode == "F":
        raise ValueError(f"image {path!r}: floating-point pixels (mode F); allowed: 8-bit or 16-bit images")
    return img


def _check_class_folders(root: str, subdirs: list[str]) -> None:
    """Class folders (symlinks included) must lie inside the root, apart from each other: a link back to the root or
    an ancestor (a loop: a phantom class of every image), outside the root, or to another class is refused."""
    top = os.path.realpath(root)
    seen: dict[str, str] = {}
    for name in subdirs:
        real = os.path.realpath(os.path.join(root, name))
        if not real.startswith(top + os.sep):
            raise ValueError(f"class folder {os.path.join(root, name)!r} links to {real!r}: the image folder "
                             f"{top!r} itself (a loop), above it or outside it; allowed: class folders inside the image folder")
        for other_real, other in seen.items():
            if real == other_real or real.startswith(other_real + os.sep) or other_real.startswith(real + os.sep):
                raise ValueError(f"class folders {other!r} and {name!r} of {root!r} overlap ({other_real!r}, "
                                 f"{real!r}); each class needs its own folder")
        seen[real] = name


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of a folder (class subfolders or flat, see the module docstring) -> (tensor [C, S, S] in [-1, 1], label).

    Attributes: ``files`` (paths), ``labels`` (ints), ``classes`` (subfolder names; ``[]`` for a flat folder).
    """

    def __init__(self, root: str, image_size: int, channels: int = 3):
        root = os.fspath(root)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size: got {image_size!r}; must be an integer >= 1 (pixels per side)")
        if channels not in (1, 3):
            raise ValueError(f"channels: got {channels!r}; use 3 (RGB) or 1 (greyscale)")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist or is not a folder")
        self.root, self.image_size, self.channels = root, image_size, channels
        entries = sorted(os.listdir(root))
        top_images = [e for e in entries if _is_image(e) and os.path.isfile(os.path.join(root, e))]
        subdirs = [e for e in entries if not e.startswith(".") and os.path.isdir(os.path.join(root, e))]
        self.files: list[str] = []
        self.labels: list[int] = []
        self.classes: list[str] = []
        if subdirs and top_images:
            raise ValueError(f"image folder {root!r} holds both images ({top_images[0]!r}, ...) and subfolders "
                             f"({subdirs[0]!r}, ...); use either class subfolders <root>/<class>/<image> "
                             "or a flat folder of images")
        if subdirs:
            _check_class_folders(root, subdirs)
            for label, name in enumerate(subdirs):
                files = _images_under(os.path.join(root, name))
                if not files:
                    raise ValueError(f"class folder {os.path.join(root, name)!r} holds no images "
                                     f"(allowed suffixes: {', '.join(IMAGE_SUFFIXES)})")
                self.classes.append(name)
                self.files.extend(files)
                self.labels.extend([label] * len(files))
        else:
            self.files = [os.path.join(root, e) for e in top_images]
            self.labels = [0] * len(self.files)
        if not self.files:
            raise ValueError(f"image folder {root!r} holds no images (allowed suffixes: {', '.join(IMAGE_SUFFIXES)})")

    def __len__(self) -> int:
        return len(self.files)

    def load_array(self, index: int) -> np.ndarray:
        """uint8 HWC array of image ``index`` after the centre crop."""
        Image = _pil()
        path = self.files[index]
        try:
            with Image.open(path) as img:
                img.load()  # the pixels stay in memory after the file is closed
        except Exception as err:  # PIL raises several types for unreadable files
            raise ValueError(f"could not read image {path!r}: {err}") from err
        img = to_8bit(img, path).convert("RGB" if self.channels == 3 else "L")
        arr = center_crop_arr(img, self.image_size)
        return arr[:, :, None] if arr.ndim == 2 else arr

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        arr = self.load_array(index)
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div(127.5).sub(1.0)
        return x, self.labels[index]


def load_image_folder(root: str, image_size: int, channels: int = 3,
                      limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole image folder in memory: (float32 [N, C, S, S] in [-1, 1], int64 labels [N]); ``limit`` keeps the first N."""
    ds = ImageFolderDataset(root, image_size, channels)
    n = len(ds) if limit is None else min(len(ds), int(limit))
    arrs = np.stack([ds.load_array(i) for i in range(n)])
    x = torch.from_numpy(arrs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()
    return x, torch.tensor(ds.labels[:n], dtype=torch.int64)


def load_dataset(spec: str, image_size: int | None = None, channels: int = 3, latent_scale: float | None = None,
                 labels_path: str | None = None, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Data spec -> (x [N, C, H, W] float32, y [N] int64).

    ``spec`` is one of:
      ``mnist5k`` / ``mnist5k:train`` / ``mnist5k:val`` / ``mnist5k:all``  the testbed digits ([-1, 1], 1x32x32);
      a folder                      images (``image_size`` required, ``channels`` 3 or 1), see ImageFolderDataset;
      a ``.npy`` or ``.npz`` file   precomputed latents (``latent_scale``, ``labels_path``), see data/latents.py;
      a caption ``.npz``            latents with caption embeddings: y is (embeddings, masks), see data/captions.py.
    """
    spec = os.fspath(spec)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit: got {limit!r}; use None (everything) or an integer >= 1")
    if spec == "mnist5k" or spec.startswith("mnist5k:"):
        x, y = load_mnist5k(spec.partition(":")[2] or "train")
    elif os.path.isdir(spec):
        if image_size is None:
            raise ValueError(f"data {spec!r} is an image folder: pass image_size (pixels per side, e.g. 256)")
        return load_image_folder(spec, image_size, channels, limit)
    elif spec.lower().endswith(".npz") and is_caption_file(spec):
        x, y = load_caption_latents(spec)  # y = (caption embeddings, masks)
        if limit is not None:
            x, y = x[:limit], tuple(c[:limit] for c in y)
        return x, y
    elif spec.lower().endswith((".npy", ".npz")):
        x, y = load_latents(spec, labels_path=labels_path, scale=latent_scale)
    elif os.path.exists(spec):
        raise ValueError(f"data {spec!r} is a file but not .npy/.npz; allowed: 'mnist5k[:train|val|all]', "
                         "an image folder, or a .npy/.npz latents file")
    else:
        raise FileNotFoundError(f"data {spec!r} not found; allowed: 'mnist5k[:train|val|all]', "
                                "an existing image folder, or a .npy/.npz latents file")
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y


def check_data_fits(x: torch.Tensor, y, model, spec: str) -> None:
    """Refuse data a model cannot train on (before any step): [N, C, H, W] with the model's channels and size
    (families that take any size: a multiple of the patch size), finite values, one conditioning row per sample,
    and integer labels in [0, num_classes) for a class-conditional model."""
    family = family_of(model)
    want = tuple(family.sample_shape(model, 1)[1:])
    p = family.patch_size(model)
    fits = x.ndim == len(want) + 1 and x.shape[1] == want[0] and (
        tuple(x.shape[2:]) == want[1:] if family.name == "dit" else x.shape[-2] % p == 0 and x.shape[-1] % p == 0)
    if not fits:
        raise ValueError(f"data {spec!r}: samples of shape {tuple(x.shape[1:])} do not fit the model; allowed: "
                         f"{want} (its channels, {'frames, ' if len(want) == 4 else ''}height, width)")
    if cond_len(y) != len(x):
        raise ValueError(f"data {spec!r}: {cond_len(y)} labels for {len(x)} samples; one label per sample is needed")
    num_classes = getattr(model, "num_classes", None) if isinstance(y, torch.Tensor) else None
    if num_classes is not None and len(y) and (y.is_floating_point() or int(y.min()) < 0
                                               or int(y.max()) >= num_classes):
        raise ValueError(f"data {spec!r}: labels span [{y.min().item()}, {y.max().item()}]; allowed: integers in "
                         f"[0, {num_classes - 1}] (the model's {num_classes} classes)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"data {spec!r}: holds NaN/Inf values")
