"""Evaluation: the fixed testbed protocol, and metrics over any sample set (testbed or Inception features).

Testbed protocol (every testbed comparison in ditgraft uses it; see docs/RESULTS.md):
    500 class-balanced samples (50 per digit, labels i % 10), DDIM 25 steps (eta 0), cfg 1.5, clip x0 to [-1, 1],
    seed 0, fp32. Features: the shipped testbed classifier (128-d). Reference: the 4,500 training digits.
    Metrics: FID, KID (x1000), Inception-style score of the classifier, precision/recall (k=3), class accuracy.
    The real-data floor is the same metrics for the 500 validation digits against the same reference.
500 samples keep one evaluation around a minute on a 2-core CPU; FID from 500 samples is biased upwards, so compare
only numbers from this same protocol (the floor shows the bias).

Compiled sampling (``compile=True``: the family's compiled forward, see ``diffusion.samplers``) is how the protocol
is run, not part of it: compiled and eager samples agree to float rounding (tests/test_compiled_sampling.py
compares them), as samples on two machines or thread counts do, so a cached result is reused whichever way it was
sampled; the metrics file records which (``compiled``).
"""
from __future__ import annotations

import functools
import hashlib
import os
import time
import zipfile
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ditgraft.data.mnist5k import load_mnist5k, to_uint8
from ditgraft.diffusion.samplers import SamplingConfig, default_sampler
from ditgraft.distributed import on_main, rank_world
from ditgraft.eval import adm, metrics
from ditgraft.eval.classifier import CLASSIFIER_PATH, NUM_CLASSES, testbed_features
from ditgraft.eval.inception import InceptionFeatures
from ditgraft.eval.sampling import decoding, gather_samples, generate, save_grid
from ditgraft.models.checkpoints import model_fingerprint
from ditgraft.models.families import family_of
from ditgraft.utils import atomic_path, atomic_write_json, read_json


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
# The paper's ImageNet protocol (DiT, ADM): 50k samples, 250 DDPM steps, cfg 1.5, no clipping of latents.
ADM_PROTOCOL = Protocol(num=50_000, sampler="ddpm", steps=250, cfg_scale=1.5, clip_denoised=False, batch_size=125)
FEATURES = ("testbed", "inception")


def cache_dir() -> str:
    """Where ditgraft keeps derived data that any run may reuse: $DITGRAFT_CACHE, else ~/.cache/ditgraft."""
    return os.environ.get("DITGRAFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ditgraft")


@functools.lru_cache(maxsize=2)
def _testbed_reference(split: str = "train") -> dict:
    """The testbed classifier's outputs on the real digits of ``split``, computed once per machine: kept in the
    cache folder under a key of the classifier's weights and the digits themselves, so a changed classifier or
    data set never reads stale features."""
    x, y = load_mnist5k(split)
    h = hashlib.sha256(x.numpy().tobytes())
    with open(CLASSIFIER_PATH, "rb") as f:
        h.update(f.read())
    path = os.path.join(cache_dir(), f"testbed_reference_{split}_{h.hexdigest()[:16]}.npz")
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        pass  # not cached yet, or unreadable: compute it again
    out = testbed_features(x)
    out["labels"] = y.numpy()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **out)
    except OSError:
        pass  # a read-only home: compute it each time
    return out


def testbed_metrics(images: np.ndarray, labels: np.ndarray | None) -> dict:
    """Metrics of uint8 NHWC testbed images against the training digits."""
    if not isinstance(images, np.ndarray) or images.ndim != 4 or len(images) < 2:
        raise ValueError(f"images: got {getattr(images, 'shape', type(images).__name__)}; allowed: a uint8 array "
                         "[N, H, W, C] with N >= 2")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"labels: {len(labels)} labels for {len(images)} images; one label per image is needed")
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
    x, y = load_mnist5k("val")
    return testbed_metrics(to_uint8(x), y.numpy())


def inception_network(weights: str | None = None, device="cpu"):
    """The FID Inception network from the user's weights file (see eval/inception.py), on ``device``."""
    return InceptionFeatures.from_file(weights, device=device)


def inception_metrics(images, reference: str, weights: str | None = None, device="cpu", net=None,
                      batch_size: int = 250) -> dict:
    """FID, sFID, IS, precision/recall of RGB uint8 images against an ADM reference batch (its arr_0 images).

    ``images``: uint8 NHWC array, or an iterable of such batches (``adm.iter_npz_batches``: a 50k-sample file is
    never held in memory); the reference images are streamed the same way. ``net``: any network with
    ``extract(images) -> {"pool", "logits", "spatial"}`` (default: the FID Inception from ``weights`` on ``device``).
    """
    if net is None:
        net = inception_network(weights, device)
    a = net.extract(adm.iter_npz_batches(reference, "arr_0", batch_size))
    return inception_scores(a, net.extract(images if isinstance(images, np.ndarray) else iter(images)))


def inception_scores(a: dict, b: dict) -> dict:
    """The metrics from reference features ``a`` and sample features ``b`` (``extract`` outputs)."""
    pr = metrics.precision_recall(a["pool"], b["pool"], k=3)
    return {
        "num": int(len(b["pool"])),
        "fid": metrics.fid_from_features(a["pool"], b["pool"]),
        "sfid": metrics.fid_from_features(a["spatial"], b["spatial"]),
        "inception_score": metrics.inception_score(metrics.probs_from_logits(b["logits"]),
                                                   splits=min(10, len(b["logits"])))[0],
        "kid_x1000": 1000 * metrics.kid(a["pool"], b["pool"], subset_size=min(1000, len(a["pool"]),
                                                                              len(b["pool"])))[0],
        "precision": pr[0],
        "recall": pr[1],
    }


def evaluate_samples(path: str, features: str = "testbed", reference: str | None = None,
                     inception_weights: str | None = None, device="cpu", net=None) -> dict:
    """Metrics of a sample .npz (ADM layout: arr_0 images, arr_1 labels). Inception features stream the file."""
    if features not in FEATURES:
        raise ValueError(f"features={features!r} is not allowed; use one of {FEATURES}")
    if features == "testbed":
        images, labels = adm.load_samples_npz(path)
        return testbed_metrics(images, labels)
    if reference is None:
        raise ValueError("features='inception' needs reference=PATH (an ADM reference batch .npz)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"samples file {path!r} does not exist")
    return inception_metrics(adm.iter_npz_batches(path, "arr_0", 250), reference, inception_weights, device, net)


def eval_hooks(model, vae: str | None = None, features: str = "testbed", reference: str | None = None,
               inception_weights: str | None = None, device="cpu", net=None, captions=None,
               compile: bool = False) -> dict:
    """``decode`` / ``evaluate`` / ``captions`` / ``compile`` for ``sample_and_evaluate``: latent models (channels
    other than 1 or 3) decode with the VAE; ``features='inception'`` scores against an ADM reference batch (``net``:
    any network with ``extract``, default the FID Inception); caption-conditioned families (PixArt) sample the
    caption set ``captions`` (see ``sampling.caption_set``); ``compile`` samples through the family's compiled
    forward (refused here for a family that cannot be compiled). Empty for the testbed sampled eagerly."""
    family = family_of(model)
    family.require("eval")
    hooks = {}
    if compile:
        family.require("compile", "eval.compile")
        hooks["compile"] = True
    if family.conditioning == "caption":
        if captions is None:
            raise ValueError(f"eval captions are missing: the {family.name} family samples from captions; name a "
                             "caption .npz (the run's training data is used by ditgraft graft)")
        if features == "testbed":
            raise ValueError(f"features='testbed' does not apply to the {family.name} family (the testbed "
                             "classifier scores class-conditional 32x32 digits); use features='inception'")
        hooks["captions"] = captions
    _, decode = decoding(model, vae, device=device, option="eval.vae")
    if decode is not None:
        hooks["decode"] = decode
    if features not in FEATURES:
        raise ValueError(f"features={features!r} is not allowed; use one of {FEATURES}")
    if features == "inception":
        if reference is None:
            raise ValueError("eval.reference is missing: inception features need an ADM reference batch .npz")
        if net is None:
            net = inception_network(inception_weights, device)
        ref: dict = {}

        def evaluate(images, labels):  # the reference features once for every model evaluated
            if not ref:
                ref.update(net.extract(adm.iter_npz_batches(reference, "arr_0", 250)))
            return inception_scores(ref, net.extract(images))

        hooks["evaluate"] = evaluate
    return hooks


def sample_and_evaluate(model, out_dir: str, protocol: Protocol = TESTBED_PROTOCOL, device="cpu",
                        progress: bool = True, tag: str = "samples", decode=None, evaluate=None,
                        captions=None, compile: bool = False) -> dict:
    """Run the protocol: write ``{tag}.npz``, ``{tag}.png`` (first 100) and ``{tag}_metrics.json`` in out_dir.
    Skipped (metrics read back) when the metrics file exists for the same protocol. ``decode`` (latents -> images)
    and ``evaluate`` ((images, labels) -> metrics; default the testbed metrics) come from ``eval_hooks``. Under
    torchrun the sample batches are shared out over the ranks and gathered on rank 0, which alone writes; every rank
    returns the metrics. ``captions``: the caption set of a caption-conditioned model (``generate``). ``compile``:
    sample through the family's compiled forward; not part of the cache key (see the module docstring)."""
    os.makedirs(out_dir, exist_ok=True)
    metrics_path = os.path.join(out_dir, f"{tag}_metrics.json")
    fingerprint = model_fingerprint(model)

    def cached() -> dict | None:  # the same model (by content, never by path) under the same protocol
        row = read_metrics(metrics_path) if os.path.exists(metrics_path) else {}
        return row if row.get("protocol") == asdict(protocol) and row.get("model_sha256") == fingerprint else None

    done = on_main(cached)
    if done is not None:
        return done
    rank, world = rank_world()
    t0 = time.time()
    images, labels = generate(model, protocol.num, protocol.sampling(), seed=protocol.seed,
                              batch_size=protocol.batch_size, device=device, rank=rank, world=world, decode=decode,
                              progress=progress and rank == 0, captions=captions, compile=compile)
    wall = time.time() - t0
    gathered = gather_samples(out_dir, images, labels, protocol.batch_size)
    return on_main(lambda: _write_evaluation(out_dir, tag, *gathered, protocol, wall, evaluate, fingerprint,
                                             compile))


def read_metrics(path: str) -> dict:
    """A metrics file; a torn or foreign one reads as empty (its model is sampled again)."""
    try:
        row = read_json(path)
    except (OSError, ValueError):
        return {}
    return row if isinstance(row, dict) else {}


def other_model_results(out_dir: str, fingerprint: str) -> str | None:
    """The first metrics/decision file in ``out_dir`` that records a model other than ``fingerprint`` (or records
    none: written before results were keyed by content), else None."""
    if not os.path.isdir(out_dir):
        return None
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(("_metrics.json", "_decision.json")):
            if read_metrics(os.path.join(out_dir, name)).get("model_sha256") != fingerprint:
                return os.path.join(out_dir, name)
    return None


def _write_evaluation(out_dir: str, tag: str, images: np.ndarray, labels: np.ndarray, protocol: Protocol,
                      wall: float, evaluate=None, fingerprint: str | None = None, compiled: bool = False) -> dict:
    metrics_path = os.path.join(out_dir, f"{tag}_metrics.json")
    adm.save_samples_npz(os.path.join(out_dir, f"{tag}.npz"), images, labels)
    order = np.argsort(labels[:100] if len(labels) >= 100 else labels, kind="stable")
    save_grid(os.path.join(out_dir, f"{tag}.png"), images[:100][order])
    result = (evaluate or testbed_metrics)(images, labels)
    result.update({"protocol": asdict(protocol), "model_sha256": fingerprint, "sampling_seconds": wall,
                   "compiled": bool(compiled)})
    atomic_write_json(metrics_path, result)
    return result


def protocol_for(cfg_scale: float | None = None, model=None, **overrides) -> Protocol:
    """The testbed protocol with ``cfg_scale`` and ``overrides``; for a ``model`` trained with flow matching (the
    flowbed MMDiT) its sampler is Euler (``default_sampler``), the same steps, scale and seeds."""
    kw = asdict(TESTBED_PROTOCOL)
    if model is not None:
        kw["sampler"] = default_sampler(model)
    if cfg_scale is not None:
        kw["cfg_scale"] = cfg_scale
    kw.update(overrides)
    return Protocol(**kw)

