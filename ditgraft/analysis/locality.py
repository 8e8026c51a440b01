"""Attention locality and activation statistics of a DiT, measured the way the grafting paper does (section 6).

Protocol (``analyze_model``): draw ``num_samples`` samples with DDIM (``steps`` steps, classifier-free guidance
``cfg_scale``) while forward hooks on every layer's ``attn`` and ``mlp`` slot (found through the model's family)
watch each model call. Every
statistic is an average over (sample, sampling timestep) pairs with equal weight. Nothing of size N x N is kept:
the hooks fold each call into running sums.

Attention (only for slots that hold an ``MHA``, or softmax self-attention the family converts to one, such as
diffusers' ``attn1``; grafted operators are skipped and listed in ``skipped``): the
probabilities are recomputed per head from the slot's input (``split_heads`` + ``attention_probs``), in query chunks
so no [B, heads, N, N] tensor is ever built for large N. Per layer and head, with A one row-stochastic N x N matrix:

* band-k locality  L_k = (1/N) sum_ij A_ij [|i - j| <= k] on the 1-D raster order (the paper's measure; the band is
  truncated, not shifted, at the sequence ends). Default k = N // 8 (32 at N = 256, 8 at N = 64). It is derived from
  the attention mass per raster distance |i - j|, so the curve L_k for every k comes for free (``band_curve``).
* 2-D window locality: mass inside a ``window_k`` x ``window_k`` window centred on the query on the token grid,
  shifted inward at the borders (NATTEN / ``local2d`` semantics, so every query's window holds exactly
  min(k, H) * min(k, W) keys: the share is what a local2d operator of that kernel would keep). Default: the window
  reaches as many rows up and down as the band does, window_k = 2 * max(1, round(band_k / W)) + 1
  (5 on the 16 x 16 DiT-XL/2 grid with k = 32, 3 on the 8 x 8 testbed grid with k = 8).
* entropy: -sum_j A_ij log A_ij in nats, averaged over queries (log N = uniform, 0 = one key).
* mean attention distance: sum_j A_ij * ||pos_i - pos_j||_2 on the grid, in tokens, averaged over queries.

Activations: outputs of ``blocks[i].attn`` and ``blocks[i].mlp`` (the raw operator output, before the adaLN gate),
for every slot whatever operator it holds. Moments pool all elements (samples x timesteps x tokens x channels) with
float64 running moments (Chan / Pebay merges): mean, variance, std, skewness, excess kurtosis, max|x| / std.
``outlier_share`` is the share of elements with |x - mean| > 6 std where mean and std are those of the one sample's
activation tensor [N, D] at that timestep, averaged over samples and timesteps (a pooled threshold would need a
second sampling pass; per tensor is also what one regression target or one quantised tensor sees).

CFG branch: with cfg_scale > 1 the model sees a [cond; uncond] batch. By default (``branch="cond"``) only the
conditional half counts: those are the forward passes of the samples we draw, and counting the unconditional half
too would mix in a second, label-free distribution. ``branch="both"`` or ``"uncond"`` are available.
"""
from __future__ import annotations

import math
import os
import time
from types import SimpleNamespace

import torch
from torch import nn

from ditgraft.diffusion.samplers import SamplingConfig, sample
from ditgraft.eval.sampling import caption_set
from ditgraft.models.families import family_of
from ditgraft.operators.attention import MHA, attention_probs
from ditgraft.operators.local_attention import natten_window_start
from ditgraft.utils import atomic_write_json, atomic_write_text, resolve_device

BRANCHES = ("cond", "uncond", "both")
OUTLIER_SIGMAS = 6.0
LOCAL_THRESHOLD = 0.5
CHUNK_ELEMENTS = 1 << 24  # probabilities per query chunk (64 MB in fp32)

__all__ = [
    "BRANCHES", "default_band_k", "default_window_k", "curve_ks", "locality_masks", "attention_statistics",
    "AttentionAccumulator", "RunningMoments", "ActivationAccumulator", "analyze_model", "local_layers",
    "analysis_markdown", "write_analysis_report",
]


# ----------------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------------
def default_band_k(num_tokens: int) -> int:
    """The paper's band: k = N / 8 (32 at N = 256), at least 1."""
    return max(1, int(num_tokens) // 8)


def default_window_k(grid: tuple[int, int], band_k: int) -> int:
    """Odd window side whose vertical reach equals the band's: 2 * max(1, round(band_k / W)) + 1."""
    return 2 * max(1, int(round(band_k / grid[1]))) + 1


def curve_ks(num_tokens: int, band_k: int) -> list[int]:
    """The k values at which ``band_curve`` is reported: 0, powers of two, multiples of N/16, band_k (all < N)."""
    n = int(num_tokens)
    ks = {0, min(band_k, n - 1), n - 1}
    ks.update(2**p for p in range(int(math.log2(max(n - 1, 1))) + 1) if 2**p < n)
    ks.update(n * j // 16 for j in range(1, 16))
    return sorted(k for k in ks if 0 <= k < n)


def _check_grid(grid, num_tokens: int | None = None) -> tuple[int, int]:
    grid = (int(grid[0]), int(grid[1]))
    if grid[0] < 1 or grid[1] < 1:
        raise ValueError(f"grid={grid} must be two positive ints (token rows, columns)")
    if num_tokens is not None and grid[0] * grid[1] != num_tokens:
        raise ValueError(f"grid={grid} holds {grid[0] * grid[1]} tokens but the attention has N={num_tokens}")
    return grid


def _check_ks(grid: tuple[int, int], band_k: int, window_k: int) -> None:
    if not isinstance(band_k, int) or band_k < 0:
        raise ValueError(f"band_k={band_k!r} must be an int >= 0 (raster distance |i - j| kept in the band)")
    if not isinstance(window_k, int) or window_k < 1 or window_k % 2 == 0:
        raise ValueError(f"window_k={window_k!r} must be an odd int >= 1 (side of the window centred on the query)")


def locality_masks(grid: tuple[int, int], window_k: int, device=None):
    """[N, N] tensors for grid tokens in raster order: raster distance |i - j| (long), 2-D window membership
    (bool, NATTEN window shifted inward at the borders) and Euclidean grid distance in tokens (float32)."""
    H, W = _check_grid(grid)
    idx = torch.arange(H * W, device=device)
    ys, xs = idx // W, idx % W
    raster = (idx[:, None] - idx[None, :]).abs()
    kh, kw = min(window_k, H), min(window_k, W)
    y0, x0 = natten_window_start(ys, H, kh), natten_window_start(xs, W, kw)
    window = ((ys[None, :] >= y0[:, None]) & (ys[None, :] < y0[:, None] + kh)
              & (xs[None, :] >= x0[:, None]) & (xs[None, :] < x0[:, None] + kw))
    dist = ((ys[:, None] - ys[None, :]).float() ** 2 + (xs[:, None] - xs[None, :]).float() ** 2).sqrt()
    return raster, window, dist


# ----------------------------------------------------------------------------------------------------------------------
# Attention statistics
# ----------------------------------------------------------------------------------------------------------------------
def attention_statistics(probs: torch.Tensor, grid: tuple[int, int], band_k: int, window_k: int) -> dict:
    """Plain reference on a full attention tensor [B, heads, N, N] -> dict of [B, heads] float64 tensors:
    ``band`` (L_k), ``window`` (2-D window share), ``entropy`` (nats) and ``distance`` (tokens), each averaged over
    queries. ``AttentionAccumulator`` computes the same numbers chunk by chunk."""
    N = probs.shape[-1]
    grid = _check_grid(grid, N)
    _check_ks(grid, band_k, window_k)
    raster, window, dist = locality_masks(grid, window_k, probs.device)
    p = probs.double()
    return {
        "band": (p * (raster <= band_k)).sum((-1, -2)) / N,
        "window": (p * window).sum((-1, -2)) / N,
        "entropy": torch.special.entr(p).sum((-1, -2)) / N,
        "distance": (p * dist.double()).sum((-1, -2)) / N,
    }


class AttentionAccumulator:
    """Running sums of the attention statistics of one layer, per head, over (sample, timestep) instances.

    ``add_probs(probs)`` takes [B, heads, Q, N] rows ``row_start .. row_start + Q`` of attention matrices;
    ``add_input(mha, x)`` recomputes them from an MHA's input x [B, N, D] in query chunks of at most
    ``chunk_elements`` probabilities. ``summary()`` returns per-head lists and their mean / min / max.
    """

    def __init__(self, grid: tuple[int, int], heads: int, band_k: int, window_k: int,
                 chunk_elements: int = CHUNK_ELEMENTS, device=None):
        self.grid = _check_grid(grid)
        _check_ks(self.grid, band_k, window_k)
        self.N = self.grid[0] * self.grid[1]
        self.heads, self.band_k, self.window_k = int(heads), band_k, window_k
        self.chunk_elements = int(chunk_elements)
        self.raster, self.window, self.dist = locality_masks(self.grid, window_k, device)
        f64 = dict(dtype=torch.float64, device=device)
        self.hist = torch.zeros(self.heads, self.N, **f64)  # attention mass per raster distance |i - j|
        self.window_sum = torch.zeros(self.heads, **f64)
        self.entropy_sum = torch.zeros(self.heads, **f64)
        self.distance_sum = torch.zeros(self.heads, **f64)
        self.count = 0  # (sample, timestep) instances, each an N x N matrix per head

    def _to(self, device) -> None:
        if self.hist.device != torch.device(device):
            for name in ("raster", "window", "dist", "hist", "window_sum", "entropy_sum", "distance_sum"):
                setattr(self, name, getattr(self, name).to(device))

    @torch.no_grad()
    def add_probs(self, probs: torch.Tensor, row_start: int = 0, new_instances: bool = True) -> None:
        """Fold rows [row_start, row_start + Q) of B attention matrices [B, heads, Q, N] into the sums.
        ``new_instances``: count the B matrices (pass False for the later chunks of the same matrices)."""
        B, h, Q, N = probs.shape
        if h != self.heads or N != self.N:
            raise ValueError(f"probs shape {tuple(probs.shape)} does not match heads={self.heads}, N={self.N}")
        self._to(probs.device)
        p = probs.float()
        rows = slice(row_start, row_start + Q)
        index = self.raster[rows].reshape(1, 1, Q * N).expand(B, h, Q * N)
        hist = torch.zeros(B, h, N, dtype=p.dtype, device=p.device).scatter_add_(-1, index, p.reshape(B, h, Q * N))
        self.hist += hist.double().sum(0)
        self.window_sum += torch.einsum("bhqn,qn->h", p, self.window[rows].to(p.dtype)).double()
        self.entropy_sum += torch.special.entr(p).sum((0, 2, 3)).double()
        self.distance_sum += torch.einsum("bhqn,qn->h", p, self.dist[rows]).double()
        if new_instances:
            self.count += B

    @torch.no_grad()
    def add_input(self, mha: MHA, x: torch.Tensor) -> None:
        """Recompute the attention probabilities of ``mha`` on its input x [B, N, D] and fold them in."""
        if x.shape[0] == 0:
            return
        q, k, _ = mha.split_heads(x)
        q, k = q.float(), k.float()
        B, h, N, _ = q.shape
        rows = max(1, self.chunk_elements // max(1, B * h * N))
        for start in range(0, N, rows):
            self.add_probs(attention_probs(q[:, :, start:start + rows], k), start, new_instances=start == 0)

    def band_locality(self, k: int | None = None) -> torch.Tensor:
        """Per-head L_k (float64 [heads]) for any k (default: the accumulator's band_k)."""
        k = self.band_k if k is None else k
        cum = self.hist.cumsum(-1)
        return cum[:, min(k, self.N - 1)] / (max(self.count, 1) * self.N)

    def summary(self) -> dict:
        if self.count == 0:
            raise RuntimeError("no attention was recorded for this layer (did the model run?)")
        norm = self.count * self.N
        per_head = {
            "band_locality": self.band_locality(),
            "window_locality": self.window_sum / norm,
            "entropy": self.entropy_sum / norm,
            "distance": self.distance_sum / norm,
        }
        out = {}
        for name, values in per_head.items():
            vals = [float(v) for v in values.cpu()]
            out[name] = vals
            out[name + "_mean"] = sum(vals) / len(vals)
            out[name + "_min"] = min(vals)
            out[name + "_max"] = max(vals)
        ks = curve_ks(self.N, self.band_k)
        cum = (self.hist.cumsum(-1) / norm).mean(0).cpu()
        out["band_curve"] = [float(cum[k]) for k in ks]
        out["instances"] = self.count
        return out


# ----------------------------------------------------------------------------------------------------------------------
# Activation statistics
# ----------------------------------------------------------------------------------------------------------------------
class RunningMoments:
    """Count, mean and central moments M2..M4 of a stream of tensors (all elements pooled), plus max|x|.

    Each batch's moments are computed in float64 around its own mean and merged with the pairwise formulas of Chan et
    al. / Pebay (2008), which stay accurate where naive sums of x^k cancel. State lives on the data's device as
    0-d float64 tensors, so updates never wait for the host.
    """

    def __init__(self):
        self.n = 0
        self.mean = self.m2 = self.m3 = self.m4 = self.absmax = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().reshape(-1)
        nb = x.numel()
        if nb == 0:
            return
        mb = x.mean()
        d = x - mb
        d2 = d * d
        stats = (nb, mb, d2.sum(), (d2 * d).sum(), (d2 * d2).sum(), x.abs().max())
        self._merge(*stats)

    def _merge(self, nb, mb, m2b, m3b, m4b, absb) -> None:
        if self.n == 0:
            self.n, self.mean, self.m2, self.m3, self.m4, self.absmax = nb, mb, m2b, m3b, m4b, absb
            return
        na, ma, m2a, m3a, m4a = self.n, self.mean, self.m2, self.m3, self.m4
        n = na + nb
        delta = mb - ma
        self.mean = ma + delta * (nb / n)
        self.m2 = m2a + m2b + delta**2 * (na * nb / n)
        self.m3 = (m3a + m3b + delta**3 * (na * nb * (na - nb) / n**2)
                   + 3 * delta * (na * m2b - nb * m2a) / n)
        self.m4 = (m4a + m4b + delta**4 * (na * nb * (na * na - na * nb + nb * nb) / n**3)
                   + 6 * delta**2 * (na * na * m2b + nb * nb * m2a) / n**2
                   + 4 * delta * (na * m3b - nb * m3a) / n)
        self.absmax = torch.maximum(self.absmax, absb)
        self.n = n

    def merge(self, other: "RunningMoments") -> None:
        """Fold another stream's moments into this one (as if its data had been appended)."""
        if other.n:
            self._merge(other.n, other.mean, other.m2, other.m3, other.m4, other.absmax)

    def summary(self) -> dict:
        """Population statistics (ddof = 0) of everything seen; None where undefined (no data, zero variance)."""
        if self.n == 0:
            return {"count": 0, "mean": None, "var": None, "std": None, "max_abs": None, "max_over_std": None,
                    "skewness": None, "kurtosis": None}
        n = self.n
        mean, m2, m3, m4, absmax = (float(v) for v in (self.mean, self.m2, self.m3, self.m4, self.absmax))
        var = m2 / n
        std = math.sqrt(var)
        ok = var > 0
        return {
            "count": n, "mean": mean, "var": var, "std": std, "max_abs": absmax,
            "max_over_std": absmax / std if ok else None,
            "skewness": (m3 / n) / var**1.5 if ok else None,
            "kurtosis": (m4 / n) / var**2 - 3.0 if ok else None,  # excess kurtosis: 0 for a Gaussian
        }


class ActivationAccumulator:
    """Statistics of one slot's output [B, N, D] over (sample, timestep) instances: pooled ``RunningMoments`` and
    the per-instance outlier share (|x - mean| > ``sigmas`` std of that sample's tensor), averaged."""

    def __init__(self, sigmas: float = OUTLIER_SIGMAS):
        self.sigmas = float(sigmas)
        self.moments = RunningMoments()
        self.outlier_sum = None
        self.instances = 0

    @torch.no_grad()
    def update(self, out: torch.Tensor) -> None:
        if out.shape[0] == 0:
            return
        x = out.detach().double().reshape(out.shape[0], -1)
        self.moments.update(x)
        mean = x.mean(1, keepdim=True)
        std = x.std(1, correction=0, keepdim=True)
        share = ((x - mean).abs() > self.sigmas * std).double().mean(1).sum()
        self.outlier_sum = share if self.outlier_sum is None else self.outlier_sum + share
        self.instances += x.shape[0]

    def summary(self) -> dict:
        out = self.moments.summary()
        out["outlier_share"] = float(self.outlier_sum) / self.instances if self.instances else None
        out["instances"] = self.instances
        return out


# ----------------------------------------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------------------------------------
def _sample_labels(num_samples: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Classes drawn without replacement, cycling through fresh permutations: balanced, and all distinct when
    num_samples <= num_classes (250 different ImageNet classes for the paper's setting)."""
    reps = -(-num_samples // num_classes)
    return torch.cat([torch.randperm(num_classes, generator=generator) for _ in range(reps)])[:num_samples]


def _branch_slice(batch: int, guided: bool, branch: str) -> slice:
    if not guided or branch == "both":
        return slice(0, batch)
    half = batch // 2
    return slice(0, half) if branch == "cond" else slice(half, batch)


def analyze_model(model: nn.Module, num_samples: int = 250, steps: int = 50, cfg_scale: float = 1.5,
                  band_k: int | None = None, window_k: int | None = None, seed: int = 0, batch_size: int = 50,
                  device: str | None = None, branch: str = "cond", progress: bool = False, captions=None) -> dict:
    """Run the paper's analysis protocol on a DiT and return a JSON-serialisable dict.

    ``model``: a model of a family that supports analysis (``ditgraft.models.families``: its slots, grid and
    conditioning), teacher or grafted. Samples come from DDIM with ``steps`` steps and guidance ``cfg_scale`` (noise
    and labels from ``seed``; the draws depend on ``batch_size`` too). Class-conditional models sample balanced
    classes; caption-conditioned ones (PixArt) captions of ``captions`` (a caption .npz or (embeddings, mask),
    drawn the same way; guidance uses its negative prompt). A self-attention slot that is not ditgraft's MHA is
    measured through the family's conversion to MHA (``teacher_operator``) where one exists. ``device``: None =
    wherever the model is, otherwise the model is moved there. The model is put in eval mode for the run and its mode restored after; hooks are always
    removed, even on error.

    Returns ``{"settings", "layers", "local_layers", "nonlocal_layers", "skipped", "elapsed_s"}``; each entry of
    ``layers`` is ``{"layer", "attn_operator", "mlp_operator", "attention" (None when skipped), "activations":
    {"attn": ..., "mlp": ...}}`` (see the module docstring for the definitions).
    """
    for name, value in (("num_samples", num_samples), ("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    if branch not in BRANCHES:
        raise ValueError(f"branch={branch!r} is not allowed; use one of {BRANCHES}")
    cfg = SamplingConfig(sampler="ddim", steps=steps, cfg_scale=cfg_scale)
    guided = cfg.cfg_scale > 1.0
    if branch == "uncond" and not guided:
        raise ValueError("branch='uncond' needs cfg_scale > 1 (without guidance there is no unconditional half)")
    if device is not None:
        model.to(resolve_device(device))
    dev = next(model.parameters()).device
    family = family_of(model)
    family.require("analysis")
    captions, negative = caption_set(captions)
    grid = _check_grid(family.dims(model).grid)
    N = grid[0] * grid[1]
    band_k = default_band_k(N) if band_k is None else band_k
    window_k = default_window_k(grid, band_k) if window_k is None else window_k
    _check_ks(grid, band_k, window_k)
    depth = family.dims(model).depth
    blocks = [SimpleNamespace(attn=family.get_slot(model, i, "attn"), mlp=family.get_slot(model, i, "mlp"))
              for i in range(depth)]

    attn_acc: list[AttentionAccumulator | None] = []
    act_acc = [{"attn": ActivationAccumulator(), "mlp": ActivationAccumulator()} for _ in range(depth)]
    skipped = []
    measured = []  # the MHA whose attention matrix stands for each slot's (None: not softmax attention)
    for i, block in enumerate(blocks):
        mha = block.attn
        if not isinstance(mha, MHA):
            try:
                mha = family.teacher_operator(model, i, "attn")
            except ValueError:
                mha = None
        measured.append(mha if isinstance(mha, MHA) else None)
        if measured[i] is not None:
            attn_acc.append(AttentionAccumulator(grid, measured[i].heads, band_k, window_k, device=dev))
        else:
            attn_acc.append(None)
            skipped.append({"layer": i, "slot": "attn", "operator": type(block.attn).__name__,
                            "reason": "not softmax attention (MHA): no attention matrix to measure"})

    def attn_hook(i):
        def hook(module, args, output):
            sel = _branch_slice(output.shape[0], guided, branch)
            if attn_acc[i] is not None:
                attn_acc[i].add_input(measured[i], args[0][sel])
            act_acc[i]["attn"].update(output[sel])
        return hook

    def mlp_hook(i):
        def hook(module, args, output):
            act_acc[i]["mlp"].update(output[_branch_slice(output.shape[0], guided, branch)])
        return hook

    generator = torch.Generator().manual_seed(int(seed))
    choices = family.num_classes(model) if captions is None else len(captions[0])
    labels = _sample_labels(num_samples, int(choices), generator)
    was_training = model.training
    handles = []
    start = time.perf_counter()
    try:
        for i, block in enumerate(blocks):
            handles.append(block.attn.register_forward_hook(attn_hook(i)))
            handles.append(block.mlp.register_forward_hook(mlp_hook(i)))
        model.eval()
        batches = range(0, num_samples, batch_size)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="analyze", unit="batch")
        for b0 in batches:
            rows = labels[b0:b0 + batch_size]
            y = family.protocol_cond(model, rows, dev, captions)
            null = None if negative is None else tuple(n.expand(len(rows), *n.shape[1:]).to(dev) for n in negative)
            sample(model, y, family.sample_shape(model, len(rows)), cfg=cfg, generator=generator,
                   learn_sigma=family.learn_sigma(model), null_cond=null)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    elapsed = time.perf_counter() - start

    layers = []
    for i, block in enumerate(blocks):
        layers.append({
            "layer": i,
            "attn_operator": type(block.attn).__name__,
            "mlp_operator": type(block.mlp).__name__,
            "attention": attn_acc[i].summary() if attn_acc[i] is not None else None,
            "activations": {slot: acc.summary() for slot, acc in act_acc[i].items()},
        })
    result = {
        "settings": {
            "num_samples": num_samples, "sampler": "ddim", "steps": steps, "cfg_scale": float(cfg.cfg_scale),
            "branch": branch if guided else "cond (no guidance: one branch)", "seed": int(seed),
            "batch_size": batch_size, "device": str(dev), "num_tokens": N, "grid": list(grid), "depth": depth,
            "band_k": band_k, "window_k": window_k, "window_rule": "k x k centred, shifted inward at borders (NATTEN)",
            "distance": "euclidean on the token grid, in tokens", "entropy_unit": "nats",
            "outlier_sigmas": OUTLIER_SIGMAS, "local_threshold": LOCAL_THRESHOLD,
            "curve_k": curve_ks(N, band_k),
            "model_config": family.config(model),
        },
        "layers": layers,
        "skipped": skipped,
        "elapsed_s": round(elapsed, 3),
    }
    local, nonlocal_ = local_layers(result)
    result["local_layers"], result["nonlocal_layers"] = local, nonlocal_
    return result


def local_layers(result: dict, threshold: float = LOCAL_THRESHOLD) -> tuple[list[int], list[int]]:
    """(local, non-local) layer indices: local = mean band-k locality over heads > threshold (the paper's 50%).
    Layers without attention statistics are in neither list."""
    local, nonlocal_ = [], []
    for entry in result["layers"]:
        att = entry.get("attention")
        if att is None:
            continue
        (local if att["band_locality_mean"] > threshold else nonlocal_).append(entry["layer"])
    return local, nonlocal_


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------
def _fmt(v, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (abs(v) >= 1e4 or (0 < abs(v) < 1e-3)):
        return f"{v:.2e}"
    return format(v, spec)


def analysis_markdown(result: dict, images: dict[str, str] | None = None) -> str:
    """The markdown report: settings, one table row per layer, the local / non-local sentence, plot links."""
    s = result["settings"]
    k, N = s["band_k"], s["num_tokens"]
    lines = [
        "# Attention locality and activation statistics", "",
        f"{s['num_samples']} samples, {s['sampler'].upper()} {s['steps']} steps, cfg {s['cfg_scale']}, "
        f"branch {s['branch']}, seed {s['seed']}; statistics averaged over samples and all sampling timesteps. "
        f"N = {N} tokens on a {s['grid'][0]} x {s['grid'][1]} grid; band k = {k}; 2-D window "
        f"{s['window_k']} x {s['window_k']}; entropy in nats; distance in tokens; outliers |x - mean| > "
        f"{s['outlier_sigmas']:g} std. Time {result.get('elapsed_s', 0):.1f} s on {s['device']}.", "",
        f"| layer | attn op | band-{k} mean | min head | max head | 2-D window | entropy | distance "
        "| attn var | attn max/std | attn kurt | attn outl. | mlp var | mlp max/std | mlp kurt | mlp outl. |",
        "|" + "---|" * 16,
    ]
    for e in result["layers"]:
        a = e["attention"] or {}
        ac, mc = e["activations"]["attn"], e["activations"]["mlp"]
        lines.append("| " + " | ".join([
            str(e["layer"]), e["attn_operator"], _fmt(a.get("band_locality_mean")), _fmt(a.get("band_locality_min")),
            _fmt(a.get("band_locality_max")), _fmt(a.get("window_locality_mean")), _fmt(a.get("entropy_mean")),
            _fmt(a.get("distance_mean"), ".2f"),
            _fmt(ac["var"]), _fmt(ac["max_over_std"], ".1f"), _fmt(ac["kurtosis"], ".2f"), _fmt(ac["outlier_share"]),
            _fmt(mc["var"]), _fmt(mc["max_over_std"], ".1f"), _fmt(mc["kurtosis"], ".2f"), _fmt(mc["outlier_share"]),
        ]) + " |")
    local, nonlocal_ = local_layers(result, s.get("local_threshold", LOCAL_THRESHOLD))
    measured = len(local) + len(nonlocal_)
    thr = s.get("local_threshold", LOCAL_THRESHOLD)
    lines += ["", f"At k = {k} (N/{N / k:g}), {len(local)} of {measured} measured layers keep more than "
                  f"{thr:.0%} of their attention mass in the band (local): {_join(local)}. "
                  f"Not local: {_join(nonlocal_)}."]
    if result.get("skipped"):
        lines.append("Not measured (no attention matrix): " + ", ".join(
            f"layer {x['layer']} ({x['operator']})" for x in result["skipped"]) + ".")
    if images:
        lines += [""] + [f"![{name}]({os.path.basename(path)})" for name, path in images.items()]
    return "\n".join(lines) + "\n"


def _join(ids: list[int]) -> str:
    return ", ".join(map(str, ids)) if ids else "none"


def write_analysis_report(result: dict, out_dir: str) -> dict[str, str]:
    """Write analysis.json, analysis.md and the PNG plots into ``out_dir`` (each file atomically).
    Returns {name: path} of everything written."""
    from ditgraft.analysis import plots

    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "analysis.json")}
    atomic_write_json(paths["json"], result)
    images = plots.plot_analysis(result, out_dir)
    paths["markdown"] = os.path.join(out_dir, "analysis.md")
    atomic_write_text(paths["markdown"], analysis_markdown(result, images))
    paths.update(images)
    return paths
