"""``ditgraft bench model --family pixart``: a whole diffusers model of a family, teacher vs grafted, side by side.

For ``pixart`` the model is a randomly initialised ``PixArtTransformer2DModel`` of PixArt-Sigma XL/2's shape
(28 blocks, width 1152 = 16 heads x 72, patch 2, T5 captions of ``text_tokens`` x 4096); at 2048 x 2048 the latent
is 256 x 256 = 16,384 tokens and captions are 300 tokens. The candidate is the same model with ``operator`` in the
self-attention (``attn1``) of ``layers`` (the paper: 8, 10, ..., 18 and 20-27 for 28 blocks; otherwise the odd
blocks), grafted through the family seam exactly as a recipe does; cross-attention stays. Forward time is measured
with teacher and candidate interleaved (``common.round_robin``) under inference mode; the FLOP bound is the ratio of
the two models' FLOPs counted on one real forward (``ditgraft.flops.count_flops``, also the first warm-up round).
The embedders and final layer are included (the same in both; negligible).
"""
from __future__ import annotations

import copy

import torch

from ditgraft.bench.common import (check_counts, environment, param_count, resolve_clock, resolve_device_dtype,
                                   round_robin, summarize, synchronizer)
from ditgraft.flops import count_flops
from ditgraft.models.families import get_family
from ditgraft.operators import build_operator, operator_names

PAPER_PIXART_LAYERS = [8, 10, 12, 14, 16, 18, *range(20, 28)]  # Hyena-X, 14 of 28 (PixArt-Sigma 2048px)
FAMILIES = ("pixart",)


def pixart_shaped(blocks: int = 28, heads: int = 16, head_dim: int = 72, tokens: int = 16384,
                  caption_channels: int = 4096):
    """A PixArt-Sigma-shaped diffusers model (random weights) whose patch grid holds ``tokens`` tokens."""
    from diffusers import PixArtTransformer2DModel

    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise ValueError(f"tokens={tokens} must be a square number (a square latent): e.g. 4096 or 16384")
    dim = heads * head_dim
    return PixArtTransformer2DModel(
        sample_size=2 * side, patch_size=2, in_channels=4, out_channels=8, num_layers=blocks, num_attention_heads=heads,
        attention_head_dim=head_dim, caption_channels=caption_channels, cross_attention_dim=dim,
        norm_type="ada_norm_single", num_embeds_ada_norm=1000, use_additional_conditions=False)


def default_layers(blocks: int) -> list[int]:
    return list(PAPER_PIXART_LAYERS) if blocks == 28 else list(range(1, blocks, 2))


def bench_family(family: str = "pixart", blocks: int = 28, heads: int = 16, head_dim: int = 72, tokens: int = 16384,
                 text_tokens: int = 300, operator: str = "hyena_x", layers=None, batch: int = 1, repeats: int = 3,
                 warmup: int = 1, device: str = "cpu", dtype: str = "fp32", options: dict | None = None,
                 caption_channels: int = 4096, clock="wall", seed: int = 0) -> dict:
    """Teacher vs grafted forward time of a family-shaped model: ``{"config", "env", "rows": [one row]}``."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not benchmarked; allowed: {', '.join(FAMILIES)}")
    check_counts(blocks=(blocks, 1), heads=(heads, 1), head_dim=(head_dim, 1), tokens=(tokens, 1),
                 text_tokens=(text_tokens, 1), batch=(batch, 1), repeats=(repeats, 1), warmup=(warmup, 0))
    if operator not in operator_names("attn"):
        raise ValueError(f"operator={operator!r} is not a token mixer; allowed: {', '.join(operator_names('attn'))}")
    replaced = default_layers(blocks) if layers is None else sorted({int(i) for i in layers})
    if not replaced or replaced[0] < 0 or replaced[-1] >= blocks:
        raise ValueError(f"layers={layers!r} is not allowed: give indices in [0, {blocks - 1}] (blocks={blocks})")
    dev, dt = resolve_device_dtype(device, dtype)
    sync, timer = synchronizer(dev), resolve_clock(clock, dev)
    fam = get_family(family)
    torch.manual_seed(seed)
    teacher = pixart_shaped(blocks, heads, head_dim, tokens, caption_channels)
    dims = fam.dims(teacher)
    torch.manual_seed(seed + 1)
    candidate = copy.deepcopy(teacher)
    for i in replaced:
        fam.set_slot(candidate, i, "attn", build_operator(operator, dims.dim, dims.heads, dims.grid,
                                                          **(options or {})))
    models = {name: (m.to(dev) if dt == torch.float32 else m.to(dev, dt)).eval()
              for name, m in (("teacher", teacher), ("candidate", candidate))}
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(fam.sample_shape(teacher, batch), generator=gen).to(dev, dt)
    t = torch.full((batch,), 500, device=dev)
    cond = (torch.randn(batch, text_tokens, caption_channels, generator=gen).to(dev, dt),
            torch.ones(batch, text_tokens, device=dev))

    def forward_fn(model):
        def forward():
            with torch.inference_mode():
                fam.forward(model, x, t, cond)
        return forward

    flops = {}
    for name, model in models.items():  # the counted forward is also the first warm-up round
        with torch.no_grad():
            flops[name] = count_flops(fam.forward, model, x, t, cond)
        sync()
    # on CUDA the counted forward ran the PyTorch paths (GPU kernels do not run under the counter): no warm-up
    rounds = max(warmup - 1, 0) if dev.type == "cpu" else warmup
    times = round_robin({n: forward_fn(m) for n, m in models.items()}, repeats, rounds, sync=sync, clock=timer)
    t_ms = {name: summarize(times[name]) for name in models}
    speedup = t_ms["teacher"]["time_ms"] / t_ms["candidate"]["time_ms"]
    flop_speedup = flops["teacher"] / flops["candidate"]
    config = dict(family=family, blocks=blocks, dim=dims.dim, heads=heads, tokens=tokens, text_tokens=text_tokens,
                  operator=operator, options=dict(options or {}), replaced=replaced, batch=batch, repeats=repeats,
                  warmup=warmup, device=str(dev), dtype=dtype, clock=clock if isinstance(clock, str) else "custom")
    row = {"tokens": tokens, "grid": list(dims.grid), "candidate": operator, "replaced": replaced,
           "teacher_params": param_count(teacher), "candidate_params": param_count(candidate),
           "teacher_gflops": flops["teacher"] / 1e9, "candidate_gflops": flops["candidate"] / 1e9,
           "teacher_ms": t_ms["teacher"]["time_ms"], "candidate_ms": t_ms["candidate"]["time_ms"],
           "teacher_samples_ms": t_ms["teacher"]["samples_ms"], "candidate_samples_ms": t_ms["candidate"]["samples_ms"],
           "speedup": speedup, "flop_speedup": flop_speedup, "efficiency": speedup / flop_speedup}
    return {"config": config, "env": environment(dev), "rows": [row]}
