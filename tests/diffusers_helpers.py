"""Tiny random diffusers models and caption data for the model-family tests (built from kwargs, offline)."""
from __future__ import annotations

import diffusers
import torch

from helpers import randomize_weights

CAPTION_DIM, TOKENS = 16, 6


def tiny_pixart(depth: int = 4, seed: int = 0):
    model = diffusers.PixArtTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=depth, num_attention_heads=2,
        attention_head_dim=8, caption_channels=CAPTION_DIM, cross_attention_dim=16, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000)
    return randomize_weights(model, 0.1, seed).eval()


def tiny_diffusers_dit(depth: int = 4, seed: int = 0):
    model = diffusers.DiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=depth, num_attention_heads=2,
        attention_head_dim=8, num_embeds_ada_norm=1000)  # DiTPipeline assumes 1000 classes
    return randomize_weights(model, 0.1, seed).eval()


def captions(n: int, seed: int):
    """Caption embeddings and masks with padded tails (1..TOKENS real tokens)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, TOKENS, CAPTION_DIM, generator=g)
    lengths = torch.randint(1, TOKENS + 1, (n,), generator=g)
    mask = (torch.arange(TOKENS)[None] < lengths[:, None]).float()
    return emb, mask


def latents(n: int, seed: int):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
