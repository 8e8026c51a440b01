"""diffusers interop for plain DiTs: ``DiTTransformer2DModel`` folders / hub repos in, ``DiTPipeline`` folders out.

Parameter names (the inverse of diffusers' ``scripts/convert_dit_to_diffusers.py``):

    ditgraft                              diffusers
    x_embedder.proj                       pos_embed.proj            (the sin-cos table is rebuilt, not stored)
    t_embedder.mlp.0 / .2                 transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_1 / linear_2
    y_embedder.embedding_table            transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table
    blocks.{i}.adaLN_modulation.1         transformer_blocks.{i}.norm1.linear
    blocks.{i}.attn.qkv (q, k, v rows)    transformer_blocks.{i}.attn1.to_q / to_k / to_v
    blocks.{i}.attn.proj                  transformer_blocks.{i}.attn1.to_out.0
    blocks.{i}.mlp.fc1 / fc2              transformer_blocks.{i}.ff.net.0.proj / ff.net.2
    final_layer.adaLN_modulation.1        proj_out_1
    final_layer.linear                    proj_out_2

diffusers keeps one copy of the timestep / class embedder per block; they are copies of one shared embedder (the
conversion writes the same tensors into every block, and diffusers' forward conditions the final layer on block 0's).
Loading reads block 0's and checks that the others agree.

Numerics: diffusers' DiT computes the timestep sinusoids with ``downscale_freq_shift=1`` and its pre-MLP LayerNorm
with ``norm_eps`` (see models/dit.py). ``conventions="diffusers"`` (the default) builds the ditgraft model with those
two options, so it reproduces diffusers' output for the same weights; ``conventions="original"`` builds upstream DiT
(shift 0, eps 1e-6), the conventions the official DiT weights were trained with. Exporting writes ``norm_eps`` =
the model's ``mlp_norm_eps`` (exact); diffusers has no option for the timestep shift, so a model with shift 0 (e.g. the
official weights) runs in diffusers with shift 1 - ``ditgraft.export.diffusers_pipeline.export_diffusers`` warns
about it.
"""
from __future__ import annotations

import os

import torch

from ditgraft.models.dit import DiT
from ditgraft.models.families.diffusers_common import is_hub_id, load_transformer

__all__ = ["is_diffusers_source", "load_diffusers_dit", "to_diffusers_state_dict",
           "from_diffusers_state_dict"]

CONVENTIONS = ("diffusers", "original")
_BLOCK = [("adaLN_modulation.1", "norm1.linear"), ("attn.proj", "attn1.to_out.0"), ("mlp.fc1", "ff.net.0.proj"),
          ("mlp.fc2", "ff.net.2")]
_EMB = [("t_embedder.mlp.0", "norm1.emb.timestep_embedder.linear_1"),
        ("t_embedder.mlp.2", "norm1.emb.timestep_embedder.linear_2"),
        ("y_embedder.embedding_table", "norm1.emb.class_embedder.embedding_table")]
_TOP = [("x_embedder.proj", "pos_embed.proj"), ("final_layer.adaLN_modulation.1", "proj_out_1"),
        ("final_layer.linear", "proj_out_2")]


def _diffusers():
    try:
        import diffusers
    except ImportError as err:
        raise ImportError("diffusers interop needs diffusers, which is not installed: "
                          "pip install -e \".[diffusers]\"") from err
    return diffusers


def is_diffusers_source(source: str) -> bool:
    """A local diffusers folder (DiTTransformer2DModel or DiTPipeline) or a hub repo id ``owner/name``."""
    source = os.fspath(source)
    if os.path.isdir(source):
        return any(os.path.exists(os.path.join(source, *p)) for p in (("config.json",),
                                                                       ("transformer", "config.json")))
    return is_hub_id(source)


def _block_keys(i: int, j: int) -> list[tuple[str, str]]:
    return [(f"blocks.{i}.{a}", f"transformer_blocks.{j}.{b}") for a, b in _BLOCK]


def from_diffusers_state_dict(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """diffusers DiT state dict -> ditgraft DiT state dict (without ``pos_embed``, which ditgraft rebuilds)."""
    out = {}
    for a, b in _TOP:
        for s in ("weight", "bias"):
            out[f"{a}.{s}"] = sd[f"{b}.{s}"]
    for a, b in _EMB:
        for s in ("weight", "bias"):
            key = f"transformer_blocks.0.{b}.{s}"
            if key not in sd:
                continue
            out[f"{a}.{s}"] = sd[key]
            for i in range(1, depth):
                if not torch.equal(sd[f"transformer_blocks.{i}.{b}.{s}"], sd[key]):
                    raise ValueError(f"transformer_blocks.{i}.{b}.{s} differs from block 0's: ditgraft's DiT has one "
                                     "shared timestep/class embedder, as the original DiT")
    for i in range(depth):
        pre = f"transformer_blocks.{i}.attn1"
        for s in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{s}"] = torch.cat([sd[f"{pre}.to_{n}.{s}"] for n in "qkv"], dim=0)
            for a, b in _block_keys(i, i):
                out[f"{a}.{s}"] = sd[f"{b}.{s}"]
    return out


def to_diffusers_state_dict(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """ditgraft DiT state dict -> diffusers DiT state dict (the shared embedder copied into every block)."""
    out = {}
    for a, b in _TOP:
        for s in ("weight", "bias"):
            out[f"{b}.{s}"] = sd[f"{a}.{s}"]
    for i in range(depth):
        for a, b in _EMB:
            for s in ("weight", "bias"):
                if f"{a}.{s}" in sd:
                    out[f"transformer_blocks.{i}.{b}.{s}"] = sd[f"{a}.{s}"].clone()
        for s in ("weight", "bias"):
            q, k, v = sd[f"blocks.{i}.attn.qkv.{s}"].chunk(3, dim=0)
            for n, t in zip("qkv", (q, k, v)):
                out[f"transformer_blocks.{i}.attn1.to_{n}.{s}"] = t.clone()
            for a, b in _block_keys(i, i):
                out[f"{b}.{s}"] = sd[f"{a}.{s}"]
    return out


def load_diffusers_dit(source: str, conventions: str = "diffusers", map_location="cpu") -> tuple[DiT, dict]:
    """A ``DiTTransformer2DModel`` (folder, pipeline folder or hub repo id) as a ditgraft DiT, with metadata."""
    if conventions not in CONVENTIONS:
        raise ValueError(f"conventions={conventions!r} is not allowed; use one of {CONVENTIONS}")
    diffusers = _diffusers()
    tr = load_transformer(diffusers.DiTTransformer2DModel, source)
    c = tr.config
    problems = [f"{k}={getattr(c, k)!r} (ditgraft needs {v!r})" for k, v in
                (("norm_type", "ada_norm_zero"), ("activation_fn", "gelu-approximate"), ("attention_bias", True),
                 ("norm_elementwise_affine", False), ("upcast_attention", False)) if getattr(c, k) != v]
    out_channels = c.out_channels if c.out_channels is not None else c.in_channels
    if out_channels not in (c.in_channels, 2 * c.in_channels):
        problems.append(f"out_channels={out_channels} (ditgraft needs in_channels or 2 x in_channels)")
    if problems:
        raise ValueError(f"{source}: this DiTTransformer2DModel has no ditgraft equivalent: " + "; ".join(problems))
    sd = tr.state_dict()
    rows = sd["transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"].shape[0]
    config = dict(input_size=c.sample_size, patch_size=c.patch_size, in_channels=c.in_channels,
                  hidden_size=c.num_attention_heads * c.attention_head_dim, depth=c.num_layers,
                  num_heads=c.num_attention_heads, mlp_ratio=4.0,
                  class_dropout_prob=0.1 if rows == c.num_embeds_ada_norm + 1 else 0.0,
                  num_classes=c.num_embeds_ada_norm, learn_sigma=out_channels == 2 * c.in_channels,
                  timestep_freq_shift=1 if conventions == "diffusers" else 0,
                  mlp_norm_eps=c.norm_eps if conventions == "diffusers" else 1e-6)
    net = DiT(**config)
    state = from_diffusers_state_dict(sd, c.num_layers)
    state["pos_embed"] = net.pos_embed.detach().clone()
    net.load_state_dict(state, strict=True)
    return net.to(map_location).eval(), {"model_config": net.config, "source": source,
                                         "diffusers": {"conventions": conventions}}


def _scheduler():
    """DDIM over DiT's training process (linear betas 1e-4..0.02, 1000 steps), no clipping of latents."""
    return _diffusers().DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                      beta_end=0.02, clip_sample=False)
