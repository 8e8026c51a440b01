"""diffusers ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5, MMDiT): trained with flow matching.

Conditioning is ``(prompt embeddings [B, L, joint_attention_dim], pooled embeddings [B, pooled_projection_dim])``;
the call is ``model(hidden_states=x, timestep=t, encoder_hidden_states=emb, pooled_projections=pooled).sample``
with t in 0..1000 (flow matching's t * 1000) and the output a velocity. The objective is rectified flow with
logit-normal t and SD3's static shift 3.0. Training data and protocol samples take that conditioning from a caption
.npz (``caption_keys``: prompt_embeds, pooled_prompt_embeds; the negative prompt's for guidance).

Each ``transformer_blocks[i]`` is a joint block: one attention ``attn`` over image and text tokens together (image
projections ``to_q/to_k/to_v/to_out``, text projections ``add_q_proj/add_k_proj/add_v_proj/to_add_out``), then
separate MLPs ``ff`` (image) and ``ff_context`` (text). The slots:
- ``mlp`` is the image stream's ``ff`` (a ``SlotAdapter``, as in the other diffusers families); ``ff_context`` stays.
- ``attn`` is a split slot (``joint.JointSplitAttention``): only image queries over image keys go through the new
  operator, every attention involving text keeps the teacher's softmax and weights, mixed as the joint softmax
  mixes them, so ``init: teacher`` with ``mha`` reproduces the teacher (SD3.5's qk-norm: ``rope_mha`` without
  ``axes_dims``). SD3.5's image-only ``attn2`` (``dual_attention_layers``) is not a slot and stays.
"""
from __future__ import annotations

import torch
from torch import nn

from ditgraft.diffusion.flow_matching import FlowMatching
from ditgraft.models.families.base import cond_tuple, unwrap
from ditgraft.models.families.diffusers_common import (SCHEDULER_KEY, DiffusersFamily, _mha_from_diffusers,
                                                       _mlp_from_diffusers)
from ditgraft.models.families.joint import SplitAttentionSlots, rope_mha_from_joint

SD3_SHIFT = 3.0  # the shift in SD3 / SD3.5's FlowMatchEulerDiscreteScheduler config
SD3_TEXT_TOKENS = 77 + 256  # StableDiffusion3Pipeline: CLIP tokens + T5 tokens (max_sequence_length=256)


class SD3Family(SplitAttentionSlots, DiffusersFamily):
    name = "sd3"
    supports: frozenset[str] = frozenset({"sample", "eval"})  # protocol samples from a caption set (a caption .npz)
    conditioning = "caption"
    cls_name = "SD3Transformer2DModel"
    extra_config = (SCHEDULER_KEY,)

    def objective(self, model: nn.Module) -> FlowMatching:
        return self.flow_objective(model, shift=SD3_SHIFT, timestep_sampling="logit_normal",
                                   patch_size=unwrap(model).config.patch_size)

    def teacher_operator(self, model: nn.Module, layer: int, slot: str) -> nn.Module:
        """The image-to-image part of the joint attention as a ditgraft ``mha`` (``to_q/to_k/to_v/to_out``; a
        ``rope_mha`` without RoPE where the teacher has qk-norm, SD3.5), or the image stream's ``ff`` as an MLP."""
        module = self.get_slot(model, layer, slot)
        if type(module).__module__.startswith("ditgraft."):
            return module
        if slot == "attn" and module.norm_q is not None:
            return rope_mha_from_joint(module)
        if slot == "attn":
            return _mha_from_diffusers(module, where=f"transformer_blocks[{layer}].attn")
        return _mlp_from_diffusers(module, where=f"transformer_blocks[{layer}].ff")

    def activation_layout(self, model: nn.Module) -> tuple[int, int]:
        """Image tokens plus StableDiffusion3Pipeline's text tokens (77 CLIP + max_sequence_length 256 T5)."""
        tokens, depth = super().activation_layout(model)
        return tokens + SD3_TEXT_TOKENS, depth

    def caption_keys(self, model: nn.Module) -> tuple[str, ...]:
        return ("prompt_embeds", "pooled_prompt_embeds")

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        parts = cond_tuple(cond)
        if len(parts) != 2:
            raise ValueError(f"SD3 conditioning is (prompt embeddings, pooled embeddings); got {len(parts)} tensors")
        emb, pooled = parts
        return model(hidden_states=x, timestep=t, encoder_hidden_states=emb, pooled_projections=pooled).sample

    def null_cond(self, model: nn.Module, cond):
        raise ValueError("SD3 has no null class: classifier-free guidance needs the negative prompt's embeddings "
                         "(pass null_cond=(negative_prompt_embeds, negative_pooled_prompt_embeds))")

    def example_cond(self, model: nn.Module, batch: int, device, tokens: int = 77):
        c = model.config
        return (torch.randn(batch, tokens, c.joint_attention_dim, device=device),
                torch.randn(batch, c.pooled_projection_dim, device=device))
