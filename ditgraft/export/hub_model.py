"""The diffusers-facing model classes of an exported folder: a ditgraft model (plain, grafted or restructured) as a
``ModelMixin`` / ``ConfigMixin`` whose config rebuilds it, called the way its diffusers pipeline calls a transformer.

These classes are ordinary ditgraft code (usable and tested in-process); ``ditgraft.export.hf`` copies them, with the
model classes and exactly the operators the model uses, into the folder's ``modeling_ditgraft.py``
(``ditgraft.export.source``), where ``OPERATORS`` becomes a plain dict of those operator classes. The config is the
grafted checkpoint's metadata: the base model's config, the resolved grafts (``layer``, ``slot``, ``operator``,
``options``), for DiT the restructure spec, and ``auto_map`` (where diffusers' ``AutoModel`` finds the class: kept in
the config so that saving writes it); the weights are the ditgraft state dict under ``model.``.

- ``DitgraftDiT``: ditgraft's DiT, called as ``DiTTransformer2DModel`` is in ``DiTPipeline``:
  ``model(x, timestep=t, class_labels=y).sample``. ``DiTPipeline`` always asks for class 1000 as the null class
  (ImageNet's); a model with another number of classes reads label 1000 as its own null class.
- ``DitgraftDiffusersModel``: a diffusers transformer (``PixArtTransformer2DModel``, ``DiTTransformer2DModel``) with
  the grafted operators in its self-attention / MLP slots (each in a ``SlotAdapter``), called exactly as the
  diffusers class (``PixArtSigmaPipeline``, ``DiTPipeline``).
"""
from __future__ import annotations

import diffusers
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

from ditgraft.graft.restructure import restructure
from ditgraft.models.dit import DiT
from ditgraft.models.families.base import SlotAdapter
from ditgraft.models.families.diffusers_common import SLOT_ATTRS, _set_call_grid
from ditgraft.operators.registry import get_spec

DIFFUSERS_NULL_CLASS = 1000  # the null class DiTPipeline passes for classifier-free guidance


class _RegisteredOperators(dict):
    """Operator name -> class, read from ditgraft's registry (the exported module has a plain dict instead)."""

    def __missing__(self, name: str) -> type:
        import ditgraft.operators  # noqa: F401  (fills the registry)

        return get_spec(name).cls


OPERATORS = _RegisteredOperators()


def build_graft(graft: dict, dim: int, heads: int, grid) -> torch.nn.Module:
    """A graft's operator (``{"operator", "options"}``) at the model's width, heads and patch grid."""
    return OPERATORS[graft["operator"]](dim=dim, heads=heads, grid=tuple(grid), **dict(graft.get("options") or {}))


class DitgraftDiT(ModelMixin, ConfigMixin):
    """ditgraft's DiT with its grafts and restructure, in diffusers' ``DiTTransformer2DModel`` calling convention."""

    @register_to_config
    def __init__(self, model_config: dict, grafts: list | None = None, restructure_spec: dict | None = None,
                 sample_size: int | None = None, in_channels: int | None = None, out_channels: int | None = None,
                 auto_map: dict | None = None):
        super().__init__()
        self.model = DiT(**model_config)
        dim, heads = self.model.config["hidden_size"], self.model.num_heads
        for g in grafts or []:
            setattr(self.model.blocks[g["layer"]], g["slot"], build_graft(g, dim, heads, self.model.grid))
        if restructure_spec:
            restructure(self.model, restructure_spec)
        # what DiTPipeline reads from a transformer's config (square latents)
        self.register_to_config(sample_size=self.model.grid[0] * self.model.patch_size,
                                in_channels=self.model.in_channels, out_channels=self.model.out_channels)

    def forward(self, hidden_states: torch.Tensor, timestep, class_labels: torch.Tensor, return_dict: bool = True):
        t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=hidden_states.device)
        t = t.reshape(-1).expand(hidden_states.shape[0]) if t.numel() == 1 else t
        y = class_labels
        if self.model.num_classes != DIFFUSERS_NULL_CLASS:
            y = torch.where(y == DIFFUSERS_NULL_CLASS, torch.full_like(y, self.model.num_classes), y)
        out = self.model(hidden_states, t, y)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class DitgraftDiffusersModel(ModelMixin, ConfigMixin):
    """A diffusers transformer (``base_class``: PixArt, DiT, ...) with ditgraft operators in its grafted slots."""

    @register_to_config
    def __init__(self, base_class: str, transformer_config: dict, grafts: list | None = None,
                 sample_size: int | None = None, in_channels: int | None = None, out_channels: int | None = None,
                 auto_map: dict | None = None):
        super().__init__()
        self.model = getattr(diffusers, base_class).from_config(transformer_config)
        c = self.model.config
        side = c.sample_size // c.patch_size
        dim, heads = c.num_attention_heads * c.attention_head_dim, c.num_attention_heads
        for g in grafts or []:
            op = build_graft(g, dim, heads, (side, side))
            setattr(self.model.transformer_blocks[g["layer"]], SLOT_ATTRS[g["slot"]], SlotAdapter(op, (side, side)))
        if grafts:
            self.model.register_forward_pre_hook(_set_call_grid, with_kwargs=True)
        out = c.out_channels if c.out_channels is not None else c.in_channels
        self.register_to_config(sample_size=c.sample_size, in_channels=c.in_channels, out_channels=out)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)
