"""The testbed evaluator: a small CNN trained on the mnist5k digits, the testbed's stand-in for InceptionV3.

Its penultimate activations (``features``, 128-d, after ReLU) play the role of Inception pool_3 for FID,
precision/recall and KID on testbed samples; its softmax plays the role of Inception's for the Inception Score
and gives a class-accuracy check of class-conditional samples ("does label 3 draw a 3?").

Architecture (``TestbedClassifier``), input [N, 1, 32, 32] in [-1, 1]:
    3 blocks, each Conv3x3 -> BatchNorm -> ReLU -> MaxPool2, widths 32, 64, 128
    (32x32 -> 16 -> 8 -> 4), global average pool -> Linear(128, 128) -> ReLU  (= ``features``)
    -> Linear(128, 10)  (= ``forward``, the logits).
BatchNorm is always used in eval mode here, so features of an image do not depend on the rest of its batch.

The shipped weights live in ditgraft/assets/testbed/classifier.safetensors (made by
``ditgraft.train.classifier.train_classifier``; see CLASSIFIER.md beside them). Nothing is downloaded.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ditgraft.models.checkpoints import read_metadata

__all__ = [
    "TestbedClassifier",
    "CLASSIFIER_PATH",
    "FEATURE_DIM",
    "NUM_CLASSES",
    "load_testbed_classifier",
    "testbed_features",
    "to_model_input",
]

CLASSIFIER_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "testbed",
                               "classifier.safetensors")
FEATURE_DIM = 128
NUM_CLASSES = 10
IMAGE_SHAPE = (1, 32, 32)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class TestbedClassifier(nn.Module):
    """Small CNN for 1x32x32 digits in [-1, 1]: ``features(x)`` -> [N, feature_dim], ``forward(x)`` -> [N, 10]."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), feature_dim: int = FEATURE_DIM,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        self.widths = tuple(widths)
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.blocks = nn.Sequential(_block(1, widths[0]), _block(widths[0], widths[1]), _block(widths[1], widths[2]))
        self.fc = nn.Linear(widths[2], feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [N, feature_dim] (the testbed "FID features")."""
        h = self.blocks(x).mean(dim=(2, 3))
        return F.relu(self.fc(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [N, num_classes]."""
        return self.head(self.features(x))


def load_testbed_classifier(device: str | torch.device = "cpu", path: str | None = None) -> TestbedClassifier:
    """The shipped classifier in eval mode with frozen parameters (``path`` overrides the shipped file)."""
    path = path or CLASSIFIER_PATH
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"testbed classifier weights not found at {path}; they ship with ditgraft "
            "(reinstall the package) or can be rebuilt with "
            "`python -m ditgraft.train.classifier --out <path>`")
    meta = read_metadata(path)
    model = TestbedClassifier(widths=tuple(meta.get("widths", (32, 64, 128))),
                              feature_dim=int(meta.get("feature_dim", FEATURE_DIM)),
                              num_classes=int(meta.get("num_classes", NUM_CLASSES)))
    model.load_state_dict(load_file(path), strict=True)
    model.metadata = meta
    model.requires_grad_(False)
    return model.eval().to(device)


def to_model_input(images) -> torch.Tensor:
    """Images -> float32 tensor [N, 1, 32, 32] in [-1, 1].

    Accepted: float tensors/arrays [N, 1, 32, 32] in [-1, 1] (the training layout), or uint8 tensors/arrays
    [N, 32, 32, 1] in 0..255 (the ADM sample layout, e.g. ``arr_0`` of a sample .npz or ``mnist5k.to_uint8``).
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: got {type(images).__name__}; use a torch.Tensor or numpy.ndarray")
    if images.dtype == torch.uint8:
        if images.ndim != 4 or tuple(images.shape[1:]) != (32, 32, 1):
            raise ValueError(f"images: uint8 input must be NHWC [N, 32, 32, 1] (the ADM sample layout), "
                             f"got shape {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if not images.is_floating_point():
        raise ValueError(f"images: dtype {images.dtype} is not allowed; use uint8 NHWC [N, 32, 32, 1] "
                         "or float NCHW [N, 1, 32, 32] in [-1, 1]")
    if images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"images: float input must be NCHW [N, 1, 32, 32] in [-1, 1], got shape {tuple(images.shape)}")
    return images.float()


@torch.no_grad()
def testbed_features(images, batch_size: int = 500, model: TestbedClassifier | None = None,
                     device: str | torch.device | None = None) -> dict[str, np.ndarray]:
    """Run the testbed classifier over ``images`` (see ``to_model_input`` for the accepted layouts).

    Returns ``features`` [N, F] float64 (penultimate activations), ``probs`` [N, 10] float64 (softmax) and
    ``pred`` [N] int64 (argmax). ``model`` defaults to the shipped classifier on ``device`` (default cpu).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size!r}; must be an integer >= 1")
    x = to_model_input(images)
    if model is None:
        model = load_testbed_classifier(device or "cpu")
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    feats, probs = [], []
    for start in range(0, x.shape[0], batch_size):
        f = model.features(x[start:start + batch_size].to(dev))
        feats.append(f.double().cpu())
        probs.append(torch.softmax(model.head(f).double(), dim=1).cpu())
    model.train(was_training)
    n_feat = model.feature_dim
    features = torch.cat(feats).numpy() if feats else np.zeros((0, n_feat))
    p = torch.cat(probs).numpy() if probs else np.zeros((0, model.head.out_features))
    return {"features": features, "probs": p, "pred": p.argmax(axis=1).astype(np.int64)}


testbed_features.__test__ = False  # its name starts with "test"; keep pytest from collecting it
