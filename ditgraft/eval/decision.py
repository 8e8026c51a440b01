"""Decision protocol: several seeds pooled, paired against a baseline model, bootstrap intervals, verdicts.

The quick testbed protocol (one seed, 500 samples) is too noisy to decide whether a student is within a few percent
of its teacher. The decision protocol samples the model and its baseline (usually the teacher) at the same seeds
with the testbed protocol, so the samples at one (seed, index) share their label and initial noise (DDIM with eta 0
is then deterministic), pools the seeds, and reports for each model FID, FID excess over the real-data floor and
class accuracy; for the pair the FID ratio (model / baseline) and the accuracy gap (baseline - model), each with a
paired bootstrap 95% interval. The bootstrap resamples sample indices jointly for both models (the pairing removes
the noise the two share) and recomputes FID from the cached classifier features: features are computed once, each
resample only reweights their mean and covariance.

Intervals are basic (reverse-percentile) bootstrap intervals [2 t - q(1 - a/2), 2 t - q(a/2)], on the log scale for
FID and the FID ratio: FID from N samples is biased upwards, and by about the same amount again when N samples are
drawn with replacement; the basic interval subtracts that shift where the plain percentile interval would add it.
They estimate the quantity at infinitely many samples (what the paper's 50k-sample FIDs approximate), so an interval
need not contain its N-sample point estimate. On synthetic Gaussian features (tests/test_decision.py) the ratio's
95% interval covered the truth in about 91% of draws, the plain percentile interval in 5-50%.

A verdict compares an interval with a target on a lower-is-better quantity: "met" when the whole interval is at or
below the target, "missed" when the whole interval is above it, "inconclusive" when it straddles the target.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace

import numpy as np

from ditgraft.eval import adm, evaluate, metrics
from ditgraft.eval.classifier import testbed_features
from ditgraft.eval.evaluate import TESTBED_PROTOCOL, Protocol, sample_and_evaluate
from ditgraft.utils import atomic_write_json

DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_RESAMPLES = 500
LEVEL = 0.95


@dataclass(frozen=True)
class Targets:
    """Lower-is-better targets: FID ratio model / baseline, and accuracy gap baseline - model (None: no verdict)."""
    ratio: float | None = 1.25
    gap: float | None = 0.02


# ----------------------------------------------------------------------------------------------- statistics

def verdict(interval: tuple[float, float], target: float | None) -> str | None:
    """met / missed / inconclusive for a lower-is-better quantity whose interval is ``interval``."""
    if target is None:
        return None
    lo, hi = interval
    if hi <= target:
        return "met"
    if lo > target:
        return "missed"
    return "inconclusive"


def basic_interval(point: float, boot: np.ndarray, level: float = LEVEL, log: bool = False) -> tuple[float, float]:
    """Basic bootstrap interval of a statistic with value ``point`` and bootstrap replicates ``boot``; with
    ``log`` it is taken on the log scale (for positive statistics such as FID and FID ratios)."""
    a = (1 - level) / 2
    if log:
        lo, hi = basic_interval(np.log(point), np.log(boot), level)
        return float(np.exp(lo)), float(np.exp(hi))
    q_lo, q_hi = np.quantile(np.asarray(boot, dtype=np.float64), [a, 1 - a])
    return float(2 * point - q_hi), float(2 * point - q_lo)


def bootstrap_counts(n: int, resamples: int, seed: int = 0) -> np.ndarray:
    """[resamples, n] multiplicities of each index in ``resamples`` draws of n indices with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    return np.stack([np.bincount(row, minlength=n) for row in idx])


def weighted_stats(x: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (ddof 1, as ``metrics.feature_stats``) of the rows of x repeated ``counts`` times."""
    n = counts.sum()
    mu = counts @ x / n
    d = x - mu
    return mu, (d * counts[:, None]).T @ d / (n - 1)


def _fid(ref: tuple[np.ndarray, np.ndarray], mu: np.ndarray, sigma: np.ndarray) -> float:
    return metrics.frechet_distance(ref[0], ref[1], mu, sigma)


def _summary(point: float, boot: np.ndarray, level: float, log: bool) -> dict:
    lo, hi = basic_interval(point, boot, level, log)
    return {"value": float(point), "ci": [lo, hi]}


def compare_features(feats: np.ndarray, correct: np.ndarray | None, ref: tuple[np.ndarray, np.ndarray],
                     against_feats: np.ndarray | None = None, against_correct: np.ndarray | None = None,
                     targets: Targets = Targets(), resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                     level: float = LEVEL) -> dict:
    """Pooled statistics of one model (features [N, D], correct [N] bool) against the reference Gaussian ``ref``
    (mean, covariance), optionally paired with a baseline whose row i shares row i's label and noise.

    Returns {"model": {fid, accuracy}, "against": {...}, "ratio", "gap", "verdicts"}; every statistic is
    {"value", "ci"}. The bootstrap draws the same indices for both models. ``correct`` None (no classes, e.g.
    caption-conditioned models): FID and the FID ratio alone, no accuracy or gap.
    """
    feats = np.asarray(feats, dtype=np.float64)
    n = len(feats)
    scored = correct is not None
    correct = np.asarray(correct, dtype=np.float64) if scored else np.zeros(n)
    if not scored and against_feats is not None:
        against_correct = np.zeros(n)
    if n < 2 or correct.shape != (n,):
        raise ValueError(f"feats/correct: need >= 2 rows and one correctness flag per row, got {feats.shape} "
                         f"and {correct.shape}")
    paired = against_feats is not None
    if paired:
        against_feats = np.asarray(against_feats, dtype=np.float64)
        against_correct = np.asarray(against_correct, dtype=np.float64)
        if against_feats.shape != feats.shape or against_correct.shape != correct.shape:
            raise ValueError(f"against: the baseline's samples must pair one-to-one with the model's; got features "
                             f"{against_feats.shape} vs {feats.shape}")
    if resamples < 10:
        raise ValueError(f"resamples={resamples}: need at least 10 (500 or more for stable 95% intervals)")
    full = np.ones(n)
    counts = bootstrap_counts(n, resamples, seed)

    def fid_of(x, c):
        return _fid(ref, *weighted_stats(x, c))

    point = {"fid": fid_of(feats, full), "accuracy": correct.mean()}
    boot = {"fid": np.array([fid_of(feats, c) for c in counts]), "accuracy": counts @ correct / n}
    if paired:
        point["against_fid"] = fid_of(against_feats, full)
        point["against_accuracy"] = against_correct.mean()
        boot["against_fid"] = np.array([fid_of(against_feats, c) for c in counts])
        boot["against_accuracy"] = counts @ against_correct / n
        point["ratio"] = point["fid"] / point["against_fid"]
        boot["ratio"] = boot["fid"] / boot["against_fid"]
        point["gap"] = point["against_accuracy"] - point["accuracy"]
        boot["gap"] = boot["against_accuracy"] - boot["accuracy"]
    if not scored:
        for k in ("accuracy", "against_accuracy", "gap"):
            point.pop(k, None)
    s = {k: _summary(point[k], boot[k], level, log=k in ("fid", "against_fid", "ratio")) for k in point}
    out = {"num": n, "resamples": resamples, "level": level,
           "model": {"fid": s["fid"], "accuracy": s.get("accuracy")}}
    if paired:
        out["against"] = {"fid": s["against_fid"], "accuracy": s.get("against_accuracy")}
        out["ratio"], out["gap"] = s["ratio"], s.get("gap")
        out["targets"] = asdict(targets)
        out["verdicts"] = {"ratio": verdict(s["ratio"]["ci"], targets.ratio),
                           "gap": verdict(s["gap"]["ci"], targets.gap) if scored else None}
    return out


# ----------------------------------------------------------------------------------------------- testbed

def seed_tag(tag: str, seed: int, base_seed: int) -> str:
    """Sample files of one seed: the quick protocol's own tag at its seed (so its samples are reused), else
    ``{tag}_seed{seed}``."""
    return tag if seed == base_seed else f"{tag}_seed{seed}"


def pooled_samples(model, out_dir: str, seeds, protocol: Protocol = TESTBED_PROTOCOL, tag: str = "samples",
                   device="cpu", progress: bool = True,
                   hooks: dict | None = None) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """The protocol's samples at each seed (sampled once, then read back from ``out_dir``), concatenated; ``hooks``
    (``evaluate.eval_hooks``) decode, condition and score them, and compile the sampling (compiled once for the
    first seed, reused by the others)."""
    images, labels, rows = [], [], []
    for s in seeds:
        t = seed_tag(tag, s, protocol.seed)
        npz = os.path.join(out_dir, f"{t}.npz")
        metrics_path = os.path.join(out_dir, f"{t}_metrics.json")
        if not os.path.exists(npz) and os.path.exists(metrics_path):  # metrics without samples: sample again
            os.remove(metrics_path)
        rows.append(sample_and_evaluate(model, out_dir, replace(protocol, seed=s), device, progress, tag=t,
                                        **(hooks or {})))
        x, y = adm.load_samples_npz(npz)
        images.append(x)
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels), rows


def testbed_floor(n: int) -> dict:
    """The real-data floor (validation digits against the training digits) at n samples.

    The validation digits come from the training digits' distribution, so their FID is small-sample bias alone;
    only 500 exist, and the bias falls as 1/n, so the floor at n is FID(500 validation digits) * 500 / n.
    """
    val = evaluate._testbed_reference("val")
    f = metrics.fid_from_features(evaluate._testbed_reference("train")["features"], val["features"])
    m = len(val["features"])
    return {"fid": float(f * m / n), "fid_at_val_size": float(f), "val_size": m,
            "accuracy": float((val["pred"] == val["labels"]).mean())}


def decision_eval(model, out_dir: str, seeds=DEFAULT_SEEDS, protocol: Protocol = TESTBED_PROTOCOL,
                  against=None, against_dir: str | None = None, tag: str = "samples",
                  against_tag: str = "samples", targets: Targets = Targets(), resamples: int = DEFAULT_RESAMPLES,
                  device="cpu", progress: bool = True, name: str | None = None, hooks: dict | None = None,
                  net=None, reference: str | None = None) -> dict:
    """The decision protocol: writes ``{name or tag}_decision.json`` in out_dir and returns it (``name``: a
    comparison of the same samples with another baseline).

    Testbed models: testbed classifier features, class accuracy and the real-data floor. With ``net`` (an
    Inception-shaped network: ``extract(images)["pool"]``) and ``reference`` (an ADM reference batch .npz): FID
    and the FID ratio on the network's features against the reference's, no accuracy and no floor (the latent and
    caption-conditioned models); ``hooks`` (``evaluate.eval_hooks``: decode, captions, evaluate, compile) go to
    sampling, for the model and the baseline alike."""
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds}: need one or more distinct seeds")
    if (net is None) != (reference is None):
        raise ValueError("net and reference: give both (features against an ADM reference batch) or neither "
                         "(the testbed classifier)")
    if net is None:
        ref = metrics.feature_stats(evaluate._testbed_reference("train")["features"])
    else:
        ref = metrics.feature_stats(net.extract(adm.iter_npz_batches(reference, "arr_0", 250))["pool"])

    def features(m, d, t):
        images, labels, rows = pooled_samples(m, d, seeds, protocol, t, device, progress, hooks)
        if net is not None:
            return net.extract(images)["pool"], None, labels, rows
        f = testbed_features(images)
        return f["features"], f["pred"] == labels, labels, rows

    feats, correct, labels, rows = features(model, out_dir, tag)
    a_feats = a_correct = None
    if against is not None:
        a_feats, a_correct, a_labels, a_rows = features(against, against_dir or out_dir, against_tag)
        if not np.array_equal(labels, a_labels):
            raise ValueError("against: the baseline's samples do not share the model's labels; both must come from "
                             "the same protocol")
    out = compare_features(feats, correct, ref, a_feats, a_correct, targets, resamples)
    floor = testbed_floor(len(feats)) if net is None else None
    out["floor"] = floor
    excess = (lambda fid: fid["value"] - floor["fid"]) if floor else (lambda fid: None)
    out["model"]["fid_excess"] = excess(out["model"]["fid"])
    out["model"]["per_seed"] = [{"seed": s, "fid": r["fid"], "accuracy": r.get("accuracy")}
                                for s, r in zip(seeds, rows)]
    if against is not None:
        out["against"]["fid_excess"] = excess(out["against"]["fid"])
        out["against"]["per_seed"] = [{"seed": s, "fid": r["fid"], "accuracy": r.get("accuracy")}
                                      for s, r in zip(seeds, a_rows)]
    out["seeds"] = seeds
    out["model_sha256"] = rows[0].get("model_sha256")
    if against is not None:
        out["against_sha256"] = a_rows[0].get("model_sha256")
    out["protocol"] = {k: v for k, v in asdict(protocol).items() if k != "seed"}
    atomic_write_json(os.path.join(out_dir, f"{name or tag}_decision.json"), out)
    return out


def format_decision(result: dict, name: str = "model", against_name: str = "baseline") -> str:
    """A few lines for a terminal or a report."""
    def ci(s, digits=3):
        return f"{s['value']:.{digits}f} [{s['ci'][0]:.{digits}f}, {s['ci'][1]:.{digits}f}]"

    n, seeds = result["num"], ",".join(map(str, result["seeds"]))
    floor = result.get("floor")
    lines = [f"decision protocol: seeds {seeds} pooled, {n} samples per model, {result['resamples']} paired "
             f"bootstrap resamples, {int(100 * result['level'])}% intervals"
             + (f"; real-data floor FID {floor['fid']:.3f} at n={n}" if floor else "")]
    for key, label in (("model", name), ("against", against_name)):
        if key in result:
            r = result[key]
            lines.append(f"  {label}: FID {ci(r['fid'])}"
                         + (f" (excess {r['fid_excess']:.3f})" if r.get("fid_excess") is not None else "")
                         + (f", accuracy {ci(r['accuracy'])}" if r.get("accuracy") else ""))
    if "ratio" in result:
        t, v = result["targets"], result["verdicts"]
        lines.append(f"  FID ratio {name}/{against_name}: {ci(result['ratio'])}"
                     + (f" -> {v['ratio']} (target <= {t['ratio']})" if v["ratio"] else ""))
        if result.get("gap"):
            lines.append(f"  accuracy gap {against_name} - {name}: {ci(result['gap'])}"
                         + (f" -> {v['gap']} (target <= {t['gap']})" if v["gap"] else ""))
    return "\n".join(lines)
