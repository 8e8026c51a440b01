"""What the diffusers transformer families share: ``transformer_blocks[i].attn1`` (self-attention) and ``.ff`` are
the slots, a grafted operator sits in a ``SlotAdapter``, and the config is the model's diffusers config
(``model.config`` / ``cls.from_config``), so a grafted model stays an instance of its diffusers class.
"""
from __future__ import annotations

from torch import nn

from ditgraft.models.families.base import Family, ModelDims, SlotAdapter, unwrap

SLOT_ATTRS = {"attn": "attn1", "mlp": "ff"}


def _set_call_grid(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: tell every slot adapter the patch grid of this call (any aspect ratio)."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    if x is None or x.ndim != 4:
        return
    p = model.config.patch_size
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    for m in model.modules():
        if isinstance(m, SlotAdapter):
            m.call_grid = grid


class DiffusersFamily(Family):
    cls_name: str = ""  # the diffusers class this family handles

    def model_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.cls_name)

    def matches(self, model: nn.Module) -> bool:
        return type(model).__name__ == self.cls_name and hasattr(model, "transformer_blocks")

    def dims(self, model: nn.Module) -> ModelDims:
        c = model.config
        side = c.sample_size // c.patch_size
        return ModelDims(len(model.transformer_blocks), c.num_attention_heads * c.attention_head_dim,
                         c.num_attention_heads, (side, side))

    def learn_sigma(self, model: nn.Module) -> bool:
        c = unwrap(model).config
        return c.out_channels == 2 * c.in_channels

    def in_channels(self, model: nn.Module) -> int:
        return unwrap(model).config.in_channels

    def patch_size(self, model: nn.Module) -> int:
        return model.config.patch_size

    def slot_parent(self, model: nn.Module, layer: int) -> nn.Module:
        return model.transformer_blocks[layer]

    def slot_attr(self, slot: str) -> str:
        return SLOT_ATTRS[slot]

    def adapt(self, model: nn.Module, op: nn.Module) -> nn.Module:
        if not getattr(model, "_ditgraft_grid_hook", False):
            model.register_forward_pre_hook(_set_call_grid, with_kwargs=True)
            model._ditgraft_grid_hook = True
        return SlotAdapter(op, self.dims(model).grid)

    def config(self, model: nn.Module) -> dict:
        return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}

    def build(self, config: dict) -> nn.Module:
        return self.model_class().from_config(config)
