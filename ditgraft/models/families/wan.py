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
stage 1 is built for (``register_to_config``). The patch grid is (frames, rows, columns) (Wan 2.1 1.3B: 21 x 30 x
52 = 32,760 tokens), frame-major as the model flattens its tokens; the grid of each call comes from the 5-D
``hidden_states`` (any frame count and size WanPipeline asks for).

Slots: ``mlp`` is ``blocks[i].ffn``; ``attn`` is the video self-attention ``blocks[i].attn1`` (video tokens only:
the new operator replaces it; the cross-attention ``attn2`` to the umT5 tokens is never a slot and stays, as do
the norms, the timestep modulation and the RoPE table the model computes, which a grafted slot ignores). The
teacher's ``attn1`` is a ``rope_mha`` with qk-norm across heads (``qk_norm: rms_norm_across_heads``, Wan's RMSNorm
over all heads of a token) and the 3-axis RoPE of ``WanRotaryPosEmbed`` (``axes_dims`` = head channels for
frame, row, column: 44, 42, 42 of 128; theta 10000; interleaved pairs), so ``init: teacher`` with ``rope_mha``
and those options reproduces it; other operators with ``init: teacher`` (``mha``, ``local2d``, ``linear_attn``)
start from its q/k/v and output projections.
"""
from __future__ import annotations

import torch
from torch import nn

from ditgraft.diffusion.flow_matching import FlowMatching
from ditgraft.models.families.base import ModelDims, SlotAdapter, cond_tuple, unwrap
from ditgraft.models.families.diffusers_common import SCHEDULER_KEY, DiffusersFamily, _mlp_from_diffusers
from ditgraft.models.families.joint import rope_mha_from_joint

DEFAULT_LATENT_SIZE = (60, 104)  # 480 x 832 px through Wan's 8x spatial VAE
DEFAULT_LATENT_FRAMES = 21  # 81 frames through its 4x temporal VAE
WAN_SHIFT = 3.0
WAN_ROPE_THETA = 10000.0  # WanRotaryPosEmbed's theta (the model does not configure it)


def video_grid(model: nn.Module, video: torch.Tensor) -> tuple[int, int, int]:
    """The patch grid (frames, rows, columns) of latent video [B, C, frames, H, W]."""
    pt, ph, pw = model.config.patch_size
    f, h, w = video.shape[-3:]
    return f // pt, h // ph, w // pw


def _set_call_grid_from_video(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: tell every slot adapter the (frames, rows, columns) patch grid of this call."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    if x is None or x.ndim != 5:
        return
    grid = video_grid(model, x)
    for m in model.modules():
        if isinstance(m, SlotAdapter):
            m.call_grid = grid


class WanFamily(DiffusersFamily):
    name = "wan"
    # protocol samples from a caption set (the umT5 embeddings of a caption .npz); no evaluation: the image
    # metrics do not score videos
    supports: frozenset[str] = frozenset({"sample"})
    conditioning = "caption"
    cls_name = "WanTransformer3DModel"
    extra_config = ("sample_size", "num_frames", SCHEDULER_KEY)
    grid_hook = staticmethod(_set_call_grid_from_video)

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
                         (f // pt, h // ph, w // pw))

    def learn_sigma(self, model: nn.Module) -> bool:
        return False

    def patch_size(self, model: nn.Module) -> int:
        return model.config.patch_size[-1]

    def sample_shape(self, model: nn.Module, batch: int) -> tuple[int, ...]:
        return (batch, self.in_channels(model), *self.latent_size(model))

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return unwrap(model).blocks

    def slot_attr(self, slot: str) -> str:
        return {"attn": "attn1", "mlp": "ffn"}[slot]

    def teacher_operator(self, model: nn.Module, layer: int, slot: str) -> nn.Module:
        """``attn1`` as a ``rope_mha`` (qk-norm across heads, the model's RoPE split over frame, row, column), or
        ``ffn`` as a ditgraft MLP."""
        module = self.get_slot(model, layer, slot)
        if type(module).__module__.startswith("ditgraft."):
            return module
        if slot == "attn":
            return _rope_mha_from_wan(unwrap(model), module, where=f"blocks[{layer}].attn1")
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


def _rope_mha_from_wan(model: nn.Module, attn: nn.Module, where: str) -> nn.Module:
    """Wan's video self-attention (``WanAttnProcessor``: RMSNorm of q and k over all heads, RoPE on frame, row and
    column, softmax) as a ``rope_mha`` with the same weights."""
    plain = (type(attn.processor).__name__ == "WanAttnProcessor" and not attn.is_cross_attention
             and attn.add_k_proj is None and tuple(attn.norm_q.normalized_shape) == (attn.inner_dim,))
    if not plain:
        raise ValueError(f"{where}: this attention is not Wan's video self-attention (WanAttnProcessor, qk-norm "
                         "across heads, no image keys); use init: random")
    rope = model.rope
    return rope_mha_from_joint(attn, axes_dims=(rope.t_dim, rope.h_dim, rope.w_dim), theta=WAN_ROPE_THETA,
                               qk_norm="rms_norm_across_heads")
