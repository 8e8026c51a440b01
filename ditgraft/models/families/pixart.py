"""diffusers ``PixArtTransformer2DModel`` (PixArt-Alpha / -Sigma text-to-image, adaLN-single).

Conditioning is ``(caption embeddings [B, L, caption_channels], caption mask [B, L])`` (T5 tokens; padded tokens
have mask 0 and do not change the output). The call is ``model(x, encoder_hidden_states=emb,
encoder_attention_mask=mask, timestep=t, added_cond_kwargs=...).sample``; PixArt-Alpha's resolution and
aspect-ratio micro-conditions (``use_additional_conditions``) come from the sample size (image = latent x 8),
PixArt-Sigma has none. Only self-attention (``attn1``) and ``ff`` are slots; cross-attention ``attn2`` stays.
"""
from __future__ import annotations

import torch
from torch import nn

from ditgraft.models.families.base import cond_tuple, unwrap
from ditgraft.models.families.diffusers_common import DiffusersFamily

VAE_SCALE = 8


class PixArtFamily(DiffusersFamily):
    name = "pixart"
    cls_name = "PixArtTransformer2DModel"
    conditioning = "caption"

    def caption_keys(self, model: nn.Module) -> tuple[str, ...]:
        return ("prompt_embeds", "prompt_attention_mask")

    def added_cond_kwargs(self, model: nn.Module, x: torch.Tensor) -> dict:
        if not unwrap(model).use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        h, w = x.shape[-2] * VAE_SCALE, x.shape[-1] * VAE_SCALE
        b = x.shape[0]
        return {"resolution": torch.tensor([[h, w]], dtype=x.dtype, device=x.device).repeat(b, 1),
                "aspect_ratio": torch.tensor([[h / w]], dtype=x.dtype, device=x.device).repeat(b, 1)}

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        parts = cond_tuple(cond)
        if len(parts) != 2:
            raise ValueError(f"PixArt conditioning is (caption embeddings, caption mask); got {len(parts)} tensors")
        emb, mask = parts
        return model(x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t,
                     added_cond_kwargs=self.added_cond_kwargs(model, x)).sample

    def null_cond(self, model: nn.Module, cond):
        raise ValueError("PixArt has no null class: classifier-free guidance needs the negative prompt's embeddings "
                         "(pass null_cond=(negative_embeds, negative_mask), e.g. from a synth .npz)")

    def example_cond(self, model: nn.Module, batch: int, device, tokens: int = 300):
        c = model.config
        return (torch.randn(batch, tokens, c.caption_channels, device=device),
                torch.ones(batch, tokens, device=device))
