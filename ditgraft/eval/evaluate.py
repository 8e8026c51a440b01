"""Evaluation: the fixed testbed protocol, and metrics over any sample set (testbed or Inception features).

Testbed protocol (every testbed comparison in ditgraft uses it; see docs/RESULTS.md):
    500 class-balanced samples (50 per digit, labels i % 10), DDIM 25 steps (eta 0), cfg 1.5, clip x0 to [-1, 1],
    seed 0, fp32. Features: the shipped testbed classifier (128-d). Reference: the 4,500 training digits.
    Metrics: FID, KID (x1000), Inception-style score of the classifier, precision/recall (k=3), class accuracy.
    The real-data floor is the same metrics for the 500 validation digits against the same reference.
500 samples keep one evaluation around a minute on a 2-core CPU; FID from 500 samples is biased upwards, so compare
only numbers from this same protocol (the floor shows the bias).
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ditgraft.diffusion.samplers import SamplingConfig
from ditgraft.eval import adm, metrics
from ditgraft.eval.sampling import generate, save_grid
from ditgraft.utils import atomic_write_json


@dataclass(frozen=True)
class Protocol:
    num: int = 500
    sampler: str = "ddim"
    steps: int = 25
    cfg_scale: float = 1.5
    clip_denoised: bool = True
    seed: int = 0
    batch_size: int = 250

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(sampler=self.sampler, steps=self.steps, cfg_scale=self.cfg_scale,
                              clip_denoised=self.clip_denoised)


TESTBED_PROTOCOL = Protocol()
FEATURES = ("testbed", "inception")


@functools.lru_cache(maxsize=2)
def _testbed_reference(split: str = "train") -> dict:
    from ditgraft.data.mnist5k import load_mnist5k
    from ditgraft.eval.classifier import testbed_features

    x, y = load_mnist5k(split)
    out = testbed_features(x)
    out["labels"] = y.numpy()
    return out


def testbed_metrics(images: np.ndarray, labels: np.ndarray | None) -> dict:
    """Metrics of uint8 NHWC testbed images against the training digits."""
    from ditgraft.eval.classifier import NUM_CLASSES, testbed_features

    if labels is not None and len(labels) and (np.min(labels) < 0 or np.max(labels) >= NUM_CLASSES):
        raise ValueError(f"labels span [{np.min(labels)}, {np.max(labels)}]; allowed: [0, {NUM_CLASSES - 1}] (the "
                         f"testbed classifier's {NUM_CLASSES} classes; the class accuracy would be meaningless)")

    ref = _testbed_reference("train")
    got = testbed_features(images)
    out = {
        "num": int(len(images)),
        "fid": metrics.fid_from_features(ref["features"], got["features"]),
        "kid_x1000": 1000 * metrics.kid(ref["features"], got["features"], subsets=50,
                                        subset_size=min(500, len(images)))[0],
        "classifier_score": metrics.inception_score(got["probs"], splits=1)[0],
    }
    out["precision"], out["recall"] = metrics.precision_recall(ref["features"], got["features"], k=3)
    if labels is not None:
        out["accuracy"] = float((got["pred"] == np.asarray(labels)).mean())
    return out


def real_data_floor() -> dict:
    """The testbed metrics of the 500 real validation digits (what a perfect model would score, same bias)."""
    from ditgraft.data.mnist5k import load_mnist5k, to_uint8

    x, y = load_mnist5k("val")
    return testbed_metrics(to_uint8(x), y.numpy())


def inception_metrics(images: np.ndarray, reference: str, weights: str | None = None, device="cpu") -> dict:
    """FID, sFID, IS, precision/recall of RGB uint8 images against an ADM reference batch (its arr_0 images)."""
    from ditgraft.eval.inception import InceptionFeatures

    net = InceptionFeatures.from_file(weights, device=device)
    ref = adm.load_reference_batch(reference)
    if "arr_0" not in ref:
        raise ValueError(f"reference={reference!r} has no arr_0 images; ditgraft computes reference features itself")
    a, b = net.extract(ref["arr_0"]), net.extract(images)
    pr = metrics.precision_recall(a["pool"], b["pool"], k=3)
    return {
        "num": int(len(images)),
        "fid": metrics.fid_from_features(a["pool"], b["pool"]),
        "sfid": metrics.fid_from_features(a["spatial"], b["spatial"]),
        "inception_score": metrics.inception_score(metrics.probs_from_logits(b["logits"]))[0],
        "kid_x1000": 1000 * metrics.kid(a["pool"], b["pool"])[0],
        "precision": pr[0],
        "recall": pr[1],
    }


def evaluate_samples(path: str, features: str = "testbed", reference: str | None = None,
                     inception_weights: str | None = None) -> dict:
    """Metrics of a sample .npz (ADM layout: arr_0 images, arr_1 labels)."""
    if features not in FEATURES:
        raise ValueError(f"features={features!r} is not allowed; use one of {FEATURES}")
    images, labels = adm.load_samples_npz(path)
    if features == "testbed":
        return testbed_metrics(images, labels)
    if reference is None:
        raise ValueError("features='inception' needs reference=PATH (an ADM reference batch .npz)")
    return inception_metrics(images, reference, inception_weights)


def sample_and_evaluate(model, out_dir: str, protocol: Protocol = TESTBED_PROTOCOL, device="cpu",
                        progress: bool = True, tag: str = "samples") -> dict:
    """Run the protocol: write ``{tag}.npz``, ``{tag}.png`` (first 100) and ``{tag}_metrics.json`` in out_dir.
    Skipped (metrics read back) when the metrics file exists for the same protocol."""
    os.makedirs(out_dir, exist_ok=True)
    metrics_path = os.path.join(out_dir, f"{tag}_metrics.json")
    if os.path.exists(metrics_path):
        from ditgraft.utils import read_json

        cached = read_json(metrics_path)
        if cached.get("protocol") == asdict(protocol):
            return cached
    t0 = time.time()
    images, labels = generate(model, protocol.num, protocol.sampling(), seed=protocol.seed,
                              batch_size=protocol.batch_size, device=device, progress=progress)
    wall = time.time() - t0
    adm.save_samples_npz(os.path.join(out_dir, f"{tag}.npz"), images, labels)
    order = np.argsort(labels[:100] if len(labels) >= 100 else labels, kind="stable")
    save_grid(os.path.join(out_dir, f"{tag}.png"), images[:100][order])
    result = testbed_metrics(images, labels)
    result.update({"protocol": asdict(protocol), "sampling_seconds": wall})
    atomic_write_json(metrics_path, result)
    return result


def protocol_for(cfg_scale: float | None = None, **overrides) -> Protocol:
    kw = asdict(TESTBED_PROTOCOL)
    if cfg_scale is not None:
        kw["cfg_scale"] = cfg_scale
    kw.update(overrides)
    return Protocol(**kw)

