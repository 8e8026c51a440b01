"""diffusers ``WanTransformer3DModel`` (Wan 2.1 text-to-video): flow matching over video latents.

Samples are video latents [B, C, frames, H, W]; the call is ``model(hidden_states=x, timestep=t,
encoder_hidden_states=emb).sample`` with t in 0..1000 and the output a velocity. Conditioning is the umT5 prompt
embeddings [B, L, text_dim] (one tensor; padded tokens are zeros, as WanPipeline pads them). The objective is
rectified flow with Wan's static ``flow_shift`` (3.0, its 480p setting; 5.0 for 720p) sampled over the
scheduler's training levels, as WanPipeline's FlowMatchEulerDiscreteScheduler does; training t is drawn uniformly
(then shifted). Caption data holds video latents and prompt_embeds; the family samples from a caption set but
does not evaluate (the image metrics do not score videos).

The model has no fixed video size: ``config["sample_size"]`` ([latent height, latent width], default 60 x 104 =
480 x 832 px) and ``config["num_frames"]`` (latent frames, default 21 = 81 video frames) set the token count that
stage 1 is built for (``register_to_config``). Until the operators take a (frames, height, width) grid, the patch
grid is reported as (frames x rows, columns): token order is frame-major, as the model flattens it.

Slots: ``mlp`` is ``blocks[i].ffn``. Video self-attention ``attn1`` applies RoPE over (frame, row, column) and
qk-norm across heads inside its softmax, which no ditgraft operator takes yet, so the ``attn`` slot is refused;
cross-attention ``attn2`` is never a slot.
"""
from __future__ import annotations

import torch
from torch import nn

from ditgraft.diffusion.flow_matching import FlowMatching
from ditgraft.models.families.base import ModelDims, cond_tuple, unwrap
from ditgraft.models.families.diffusers_common import SCHEDULER_KEY, DiffusersFamily, _mlp_from_diffusers

DEFAULT_LATENT_SIZE = (60, 104)  # 480 x 832 px through Wan's 8x spatial VAE
DEFAULT_LATENT_FRAMES = 21  # 81 frames through its 4x temporal VAE
WAN_SHIFT = 3.0


class WanFamily(DiffusersFamily):
    name = "wan"
    # protocol samples from a caption set (the umT5 embeddings of a caption .npz); no evaluation: the image
    # metrics do not score videos
    supports: frozenset[str] = frozenset({"sample"})
    conditioning = "caption"
    cls_name = "WanTransformer3DModel"
    extra_config = ("sample_size", "num_frames", SCHEDULER_KEY)

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ == self.cls_name and hasattr(model, "blocks")

    def objective(self, model: nn.Module) -> FlowMatching:
        return self.flow_objective(model, shift=WAN_SHIFT, timestep_sampling="uniform",
                                   patch_size=self.patch_size(unwrap(model)))

    def latent_size(self, model: nn.Module) -> tuple[int, int, int]:
        c = model.config
        size = c.get("sample_size", DEFAULT_LATENT_SIZE)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return c.get("num_frames", DEFAULT_LATENT_FRAMES), h, w

    def dims(self, model: nn.Module) -> ModelDims:
        c = model.config
        f, h, w = self.latent_size(model)
        pt, ph, pw = c.patch_size
        return ModelDims(len(model.blocks), c.num_attention_heads * c.attention_head_dim, c.num_attention_heads,
                         ((f // pt) * (h // ph), w // pw))

    def learn_sigma(self, model: nn.Module) -> bool:
        return False

    def patch_size(self, model: nn.Module) -> int:
        return model.config.patch_size[-1]

    def sample_shape(self, model: nn.Module, batch: int) -> tuple[int, ...]:
        return (batch, self.in_channels(model), *self.latent_size(model))

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return unwrap(model).blocks

    def check(self, model: nn.Module, layer: int, slot: str) -> None:
        super().check(model, layer, slot)
        if slot == "attn":
            raise ValueError("slot='attn' is not available for Wan: its video self-attention applies RoPE and "
                             "qk-norm inside the softmax and no ditgraft operator takes them yet; allowed: mlp")

    def slot_attr(self, slot: str) -> str:
        return {"mlp": "ffn"}[slot]

    def teacher_operator(self, model: nn.Module, layer: int, slot: str) -> nn.Module:
        module = self.get_slot(model, layer, slot)
        if type(module).__module__.startswith("ditgraft."):
            return module
        return _mlp_from_diffusers(module, where=f"blocks[{layer}].ffn")

    def caption_keys(self, model: nn.Module) -> tuple[str, ...]:
        return ("prompt_embeds",)

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        parts = cond_tuple(cond)
        if len(parts) != 1:
            raise ValueError(f"Wan conditioning is the prompt embeddings alone; got {len(parts)} tensors")
        return model(hidden_states=x, timestep=t, encoder_hidden_states=parts[0]).sample

    def null_cond(self, model: nn.Module, cond):
        raise ValueError("Wan has no null class: classifier-free guidance needs the negative prompt's embeddings "
                         "(pass null_cond=negative_prompt_embeds)")

    def example_cond(self, model: nn.Module, batch: int, device, tokens: int = 512):
        return torch.randn(batch, tokens, model.config.text_dim, device=device)

