"""The FID InceptionV3 (TensorFlow graph of 2015-12-05) in plain torch, for FID / sFID / IS / precision-recall.

This is the network behind the ADM evaluator, pytorch-fid and torch-fidelity. It differs from torchvision's
InceptionV3 in three places, all reproduced here:
- 1008 output classes (fc 2048 -> 1008);
- the 3x3 average pools inside the A, C and first E blocks ignore zero padding (count_include_pad=False),
  as TensorFlow's average pool does;
- the pool branch of the last E block (Mixed_7c) uses max pooling instead of average pooling.

Weights: the converted state dict `pt_inception-2015-12-05-6726825d.pth` (95.7 MB, 566 tensors; pytorch-fid's
release, torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` holds the same values). Module names
below are exactly that file's keys so `load_state_dict(strict=True)` works. Nothing is ever downloaded: pass
`--inception-weights PATH` on the command line or set `DITGRAFT_INCEPTION_WEIGHTS`.

Outputs of `InceptionFeatures.extract` (names of the TF graph in brackets):
  pool     [N, 2048]  average pool of Mixed_7c ("pool_3") - FID, KID, precision/recall.
  logits   [N, 1008]  pool @ fc.weight.T WITHOUT the bias - exactly what the ADM evaluator feeds to its softmax
                      for the Inception Score (torch-fidelity's default "logits_unbiased" too).
  spatial  [N, 2023]  first 7 channels of Mixed_6d.branch1x1 ("mixed_6/conv", after BN+ReLU) on the 17x17
                      grid, flattened in H, W, C order as the ADM evaluator's NHWC reshape does - sFID.

Preprocessing (`preprocess=`):
  "adm" (default): TF1 legacy bilinear resize to 299x299 (align_corners=False, source = dest * in/out, no
          half-pixel shift) of the 0..255 image, then (x - 128) / 128. This is what the TF graph does inside
          (ResizeBilinear, Sub, Mul), hence ADM evaluator and torch-fidelity numbers.
  "pytorch-fid": x / 255, torch bilinear resize (align_corners=False, half-pixel centres), then 2x - 1.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "InceptionFeatures",
    "find_inception_weights",
    "resize_bilinear_tf1",
    "WEIGHTS_FILENAME",
    "WEIGHTS_URL",
    "ENV_VAR",
    "CLI_FLAG",
    "NUM_STATE_KEYS",
]

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
TORCH_FIDELITY_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + TORCH_FIDELITY_FILENAME
ENV_VAR = "DITGRAFT_INCEPTION_WEIGHTS"
CLI_FLAG = "--inception-weights"
NUM_STATE_KEYS = 566          # 94 conv+BN units x 6 tensors (incl. num_batches_tracked) + fc weight and bias
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7          # ADM keeps mixed_6/conv[..., :7] -> 17 * 17 * 7 = 2023 features
PREPROCESS_MODES = ("adm", "pytorch-fid")


# ----------------------------------------------------------------------------------------------- blocks

class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TF's value) -> ReLU. Keys: conv.weight, bn.{weight,bias,running_*}."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x):
    """3x3 stride-1 average pool that, like TensorFlow, averages only over real (unpadded) pixels."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], dim=1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b/c/d/e) with factorised 7x7 convolutions: 1x1 | 7x7 | double 7x7 | avgpool-1x1."""

    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = conv(b7d)
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b7, b7d, bp], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b/c) with split 1x3 / 3x1 heads. `pool` is "avg" (7b) or "max" (7c, the FID graph's quirk)."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool: got {pool!r}; allowed: 'avg', 'max'")
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], dim=1)
        pooled = _avg_pool_tf(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3d, bp], dim=1)


# ----------------------------------------------------------------------------------------------- preprocessing

def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of [N, C, H, W] as TensorFlow 1.x `resize_bilinear(align_corners=False)` computes it.

    Output pixel i samples the input at i * (in / out) (no half-pixel offset, unlike torch's align_corners=False),
    between floor and floor + 1 (clamped to the last pixel). Positions are float32 as in TF's kernel.
    """
    if x.ndim != 4 or not torch.is_floating_point(x):
        raise ValueError(f"x: expected a floating [N, C, H, W] tensor, got dtype {x.dtype} shape {tuple(x.shape)}")
    out_h, out_w = size

    def axis(in_size: int, out_size: int):
        scale = torch.tensor(in_size / out_size, dtype=torch.float32)
        pos = torch.arange(out_size, dtype=torch.float32) * scale
        lo = pos.floor().long().clamp(max=in_size - 1)
        hi = (lo + 1).clamp(max=in_size - 1)
        frac = (pos - lo.float()).to(device=x.device, dtype=x.dtype)
        return lo.to(x.device), hi.to(x.device), frac

    lo_x, hi_x, fx = axis(x.shape[3], out_w)
    lo_y, hi_y, fy = axis(x.shape[2], out_h)
    left, right = x.index_select(3, lo_x), x.index_select(3, hi_x)
    rows = left + (right - left) * fx                     # interpolate along width: [N, C, H_in, W_out]
    top, bottom = rows.index_select(2, lo_y), rows.index_select(2, hi_y)
    return top + (bottom - top) * fy[:, None]             # then along height: [N, C, H_out, W_out]


# ----------------------------------------------------------------------------------------------- weights

def _weights_help() -> str:
    return (f"The FID InceptionV3 weights file {WEIGHTS_FILENAME} (95.7 MB, {NUM_STATE_KEYS} tensors) is needed. "
            f"Download it on a machine with network access from {WEIGHTS_URL} (pytorch-fid's release; "
            f"torch-fidelity's copy {TORCH_FIDELITY_URL} works too), then pass {CLI_FLAG} PATH or set the "
            f"environment variable {ENV_VAR}=PATH, or put it in {_hub_checkpoint_dir()}. "
            "ditgraft never downloads it itself.")


def _hub_checkpoint_dir() -> Path:
    """Where pytorch-fid / torch-fidelity downloads land (torch hub cache), checked as a last resort."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_inception_weights(path=None) -> Path:
    """Locate the FID Inception weights: `path`, else $DITGRAFT_INCEPTION_WEIGHTS, else the torch hub cache.

    Raises FileNotFoundError saying which file is expected, where to get it and how to point ditgraft at it.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"Inception weights not found at {CLI_FLAG} {p}. " + _weights_help())
        return p
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"Inception weights not found at {ENV_VAR}={p}. " + _weights_help())
        return p
    for name in (WEIGHTS_FILENAME, TORCH_FIDELITY_FILENAME):
        p = _hub_checkpoint_dir() / name
        if p.is_file():
            return p
    raise FileNotFoundError("Inception weights not given (no path, " + ENV_VAR + " unset, nothing in the torch "
                            "hub cache). " + _weights_help())


# ----------------------------------------------------------------------------------------------- the network

class InceptionFeatures(nn.Module):
    """FID InceptionV3 returning pool_3, bias-free logits and ADM's spatial features. See the module docstring.

    Build with `InceptionFeatures.from_file(path)` for real use; `InceptionFeatures()` gives random weights
    (tests). `forward` takes float [N, 3, H, W] in 0..255; `extract` takes user-facing arrays in batches.
    """

    def __init__(self, preprocess: str = "adm"):
        super().__init__()
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess: got {preprocess!r}; allowed: {PREPROCESS_MODES}")
        self.preprocess = preprocess
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        self.eval()
        self.requires_grad_(False)

    @classmethod
    def from_file(cls, path=None, device="cpu", preprocess: str = "adm",
                  dtype: torch.dtype = torch.float32) -> "InceptionFeatures":
        """Load the converted TF weights strictly (torch.load with weights_only=True). See find_inception_weights."""
        p = find_inception_weights(path)
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"{p}: could not read as a torch state dict ({e}). " + _weights_help()) from e
        if not isinstance(state, dict):
            raise ValueError(f"{p}: expected a state dict (mapping name -> tensor), got {type(state).__name__}")
        model = cls(preprocess=preprocess)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{p}: not the FID Inception state dict ({len(state)} keys; expected the "
                             f"{NUM_STATE_KEYS} keys of {WEIGHTS_FILENAME}): {e}") from e
        return model.to(device=device, dtype=dtype).eval()

    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        size = (INPUT_SIZE, INPUT_SIZE)
        if self.preprocess == "adm":
            if tuple(x.shape[2:]) != size:
                x = resize_bilinear_tf1(x, size)
            return (x - 128.0) / 128.0
        x = x / 255.0
        if tuple(x.shape[2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: float [N, 3, H, W] with values in 0..255. Returns dict(pool, logits, spatial) as in the module doc."""
        x = self._preprocess(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))   # 147x147
        x = F.max_pool2d(x, kernel_size=3, stride=2)                          # 73x73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                         # 71x71
        x = F.max_pool2d(x, kernel_size=3, stride=2)                          # 35x35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))                     # 17x17
        # TF "mixed_6/conv" is the 1x1 branch of Mixed_6d; recomputing it here costs < 1% of the forward pass
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS]
        x = self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))                     # 8x8
        x = self.Mixed_7c(self.Mixed_7b(x))
        pool = x.mean(dim=(2, 3))                                             # [N, 2048]
        return {
            "pool": pool,
            "logits": pool @ self.fc.weight.T,                                # no bias, as ADM's IS
            "spatial": spatial.permute(0, 2, 3, 1).reshape(spatial.shape[0], -1),  # NHWC flatten, as ADM
        }

    @staticmethod
    def _to_nchw_255(images) -> torch.Tensor:
        """uint8 [N, H, W, C] (0..255, ADM layout) or floating [N, C, H, W] in [0, 1] -> float [N, 3, H, W] 0..255."""
        if isinstance(images, np.ndarray):
            t = torch.from_numpy(np.array(images))  # a copy: inputs may be read-only (np.load, streaming reads)
        elif isinstance(images, torch.Tensor):
            t = images
        else:
            raise TypeError(f"images: expected a numpy array or torch tensor, got {type(images).__name__}")
        if t.ndim != 4:
            raise ValueError(f"images: shape {tuple(t.shape)} is not allowed; expected 4-D "
                             "(uint8 NHWC, or floating NCHW in [0, 1])")
        if t.dtype == torch.uint8:
            if t.shape[3] not in (1, 3):
                raise ValueError(f"images: uint8 input must be NHWC with 1 or 3 channels, got shape {tuple(t.shape)}")
            t = t.permute(0, 3, 1, 2).float()
        elif torch.is_floating_point(t):
            if t.shape[1] not in (1, 3):
                raise ValueError(f"images: floating input must be NCHW with 1 or 3 channels, got shape "
                                 f"{tuple(t.shape)}")
            lo, hi = float(t.min()), float(t.max())
            if lo < -1e-3 or hi > 1 + 1e-3:
                raise ValueError(f"images: floating input must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
            t = t.float() * 255.0
        else:
            raise ValueError(f"images: dtype {t.dtype} is not allowed; use uint8 (NHWC) or floating (NCHW, [0, 1])")
        if t.shape[1] == 1:  # grayscale (MNIST testbed): replicate to RGB
            t = t.expand(-1, 3, -1, -1)
        return t

    def extract(self, images, batch_size: int = 64, progress: bool = False) -> dict[str, np.ndarray]:
        """Features for images, computed `batch_size` at a time without gradients.

        images: uint8 [N, H, W, C] (ADM sample-file layout, C in 1 or 3) or floating [N, C, H, W] in [0, 1]
        (numpy or torch; any H, W - resized to 299), or an iterable of such arrays, e.g.
        `adm.iter_npz_batches(path)`, so a 50k-sample file never has to sit in memory. Inputs are converted to
        float one batch at a time. Returns float32 numpy arrays
        {"pool": [N, 2048], "logits": [N, 1008], "spatial": [N, 2023]}.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: got {batch_size!r}; must be an integer >= 1")
        sources = [images] if isinstance(images, (np.ndarray, torch.Tensor)) else images
        param = next(self.parameters())
        outs: dict[str, list] = {"pool": [], "logits": [], "spatial": []}
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(desc="inception", unit="img")
        with torch.inference_mode():
            for source in sources:
                if not isinstance(source, (np.ndarray, torch.Tensor)):
                    raise TypeError(f"images: expected arrays or tensors, got an item of type {type(source).__name__}")
                for start in range(0, len(source), batch_size):
                    chunk = self._to_nchw_255(source[start:start + batch_size])
                    for key, value in self(chunk.to(device=param.device, dtype=param.dtype)).items():
                        outs[key].append(value.float().cpu().numpy())
                    if bar is not None:
                        bar.update(len(chunk))
        if bar is not None:
            bar.close()
        if not outs["pool"]:
            raise ValueError("images: no images given (empty array or iterable)")
        return {k: np.concatenate(v, axis=0) for k, v in outs.items()}
