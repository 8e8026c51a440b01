"""ditgraft's own MMDiT (``models/mmdit.py``, the flow-matching testbed teacher): trained with rectified flow.

The model is called ``model(x, t, y)`` with class labels ``y`` (each the caption "a handwritten <digit>"; the null
class is the empty caption), t in 0..1000, and returns the velocity. Protocol samples are class-balanced (caption
of class i % 10), so the testbed classifier's features and class accuracy apply as for the DiT testbed.

Slots: ``attn`` is the split slot of ``joint.py`` (only image queries over image keys go through the new operator;
every attention involving text keeps the teacher's softmax and weights), ``mlp`` is the image stream's ``ff``, an
operator as it is (called ``ff(x)``); ``ff_context`` stays.
"""
from __future__ import annotations

import torch
from torch import nn

from ditgraft.diffusion.flow_matching import FlowMatching
from ditgraft.models.families.base import Family, ModelDims, cond_tuple, unwrap
from ditgraft.models.families.joint import SplitAttentionSlots
from ditgraft.models.mmdit import JointAttention, MMDiT
from ditgraft.operators.attention import MHA


class MMDiTFamily(SplitAttentionSlots, Family):
    name = "mmdit"
    supports = frozenset({"sample", "eval"})

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, MMDiT)

    def dims(self, model: nn.Module) -> ModelDims:
        model = unwrap(model)
        return ModelDims(len(model.transformer_blocks), model.config["hidden_size"], model.num_heads,
                         tuple(model.grid))

    def learn_sigma(self, model: nn.Module) -> bool:
        return False

    def in_channels(self, model: nn.Module) -> int:
        return unwrap(model).in_channels

    def patch_size(self, model: nn.Module) -> int:
        return unwrap(model).patch_size

    def num_classes(self, model: nn.Module) -> int:
        return unwrap(model).num_classes

    def objective(self, model: nn.Module) -> FlowMatching:
        """Rectified flow with SD3's logit-normal t and the model's static shift (1.0 for 64 image tokens)."""
        model = unwrap(model)
        return FlowMatching(shift=model.config["shift"], timestep_sampling="logit_normal",
                            patch_size=model.patch_size)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return unwrap(model).transformer_blocks

    def teacher_operator(self, model: nn.Module, layer: int, slot: str) -> nn.Module:
        """The image-to-image part of the joint attention as a ditgraft ``mha`` (qkv = [to_q; to_k; to_v], proj =
        to_out.0); the MLP slot is a ditgraft MLP already."""
        module = self.get_slot(model, layer, slot)
        if not isinstance(module, JointAttention):
            return module
        dim = module.to_q.in_features
        mha = MHA(dim, module.heads, grid=self.dims(model).grid)
        with torch.no_grad():
            mha.qkv.weight.copy_(torch.cat([module.to_q.weight, module.to_k.weight, module.to_v.weight]))
            mha.qkv.bias.copy_(torch.cat([module.to_q.bias, module.to_k.bias, module.to_v.bias]))
            mha.proj.load_state_dict(module.to_out[0].state_dict())
        return mha.to(module.to_q.weight.device)

    def split_text(self, model: nn.Module, layer: int, cond) -> tuple[int, int]:
        """(tokens, width) of the text stream entering a joint attention: the caption tokens, whatever ``cond`` (the
        class labels) holds (what split-slot distillation needs where stage 1 supports it)."""
        model = unwrap(model)
        return model.config["caption_length"], model.config["hidden_size"]

    def dropped_labels_module(self, model: nn.Module) -> nn.Module:
        return unwrap(model).caption_embedder.tokens

    def frozen_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [unwrap(model).pos_embed]  # fixed sin-cos table, as in DiT

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return model(x, t, *cond_tuple(cond))

    def null_cond(self, model: nn.Module, cond):
        (y,) = cond_tuple(cond)
        return torch.full_like(y, unwrap(model).num_classes)  # the empty caption

    def example_cond(self, model: nn.Module, batch: int, device):
        return torch.randint(0, unwrap(model).num_classes, (batch,), device=device)

    def config(self, model: nn.Module) -> dict:
        return dict(unwrap(model).config)

    def build(self, config: dict) -> nn.Module:
        return MMDiT(**config)

