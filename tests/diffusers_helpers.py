"""Tiny random diffusers models and caption data for the model-family tests (built from kwargs, offline)."""
from __future__ import annotations

import diffusers
import torch

from helpers import randomize_weights

CAPTION_DIM, TOKENS = 16, 6
POOLED_DIM = 16


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


def tiny_sd3(depth: int = 2, seed: int = 0):
    """SD3 MMDiT: joint image-text attention; the last block is context_pre_only."""
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=depth, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=CAPTION_DIM, caption_projection_dim=16, pooled_projection_dim=POOLED_DIM, out_channels=4)
    return randomize_weights(model, 0.1, seed).eval()


def tiny_flux(depth: int = 2, single: int = 1, guidance: bool = True, seed: int = 0):
    """FLUX: double-stream and single-stream blocks, RoPE over (0, row, column) ids; 4-channel 8 x 8 latents
    packed into 16 tokens of 16 channels."""
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=depth, num_single_layers=single, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=CAPTION_DIM, pooled_projection_dim=POOLED_DIM,
        guidance_embeds=guidance, axes_dims_rope=(2, 2, 4))
    model.register_to_config(sample_size=8)  # the latent side the family builds the patch grid for
    return randomize_weights(model, 0.1, seed).eval()


def tiny_wan(depth: int = 2, seed: int = 0):
    """Wan 2.1: video self-attention with RoPE and qk-norm, cross-attention to text; 16-channel latents of 3 frames
    x 4 x 4 (9 frames of 32 x 32 px through the tiny Wan VAE) -> 12 tokens."""
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16,
        text_dim=CAPTION_DIM, freq_dim=32, ffn_dim=32, num_layers=depth, rope_max_seq_len=32)
    model.register_to_config(sample_size=[4, 4], num_frames=3)  # the latent video the family builds for
    return randomize_weights(model, 0.1, seed).eval()


def sd3_prompts(n: int, seed: int):
    """(prompt embeddings [n, TOKENS, CAPTION_DIM], pooled embeddings [n, POOLED_DIM])."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, TOKENS, CAPTION_DIM, generator=g), torch.randn(n, POOLED_DIM, generator=g)


def captions(n: int, seed: int):
    """Caption embeddings and masks with padded tails (1..TOKENS real tokens)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, TOKENS, CAPTION_DIM, generator=g)
    lengths = torch.randint(1, TOKENS + 1, (n,), generator=g)
    mask = (torch.arange(TOKENS)[None] < lengths[:, None]).float()
    return emb, mask


def latents(n: int, seed: int):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
