"""What the diffusers transformer families share: ``transformer_blocks[i].attn1`` (self-attention) and ``.ff`` are
the slots, a grafted operator sits in a ``SlotAdapter``, and the config is the model's diffusers config
(``model.config`` / ``cls.from_config``), so a grafted model stays an instance of its diffusers class.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ditgraft.diffusion.flow_matching import FlowMatching
from ditgraft.models.families.base import Family, ModelDims, SlotAdapter, unwrap
from ditgraft.operators.attention import MHA
from ditgraft.operators.mlp import MLP

SLOT_ATTRS = {"attn": "attn1", "mlp": "ff"}
SCHEDULER_KEY = "ditgraft_scheduler"  # the teacher pipeline's scheduler config, kept in the model config


def is_hub_id(source: str) -> bool:
    """``owner/name`` that is no local path and has no checkpoint file's suffix."""
    return (source.count("/") == 1 and not source.startswith((".", "/", "~")) and not os.path.exists(source)
            and not source.endswith((".pt", ".pth", ".safetensors", ".npz", ".yaml")))


def load_transformer(cls, source: str) -> nn.Module:
    """``cls.from_pretrained`` on the transformer of ``source``: a model folder (its ``config.json``), a pipeline
    folder (its ``transformer/``) or, with a network, a hub repo id (its ``transformer/`` when it is a pipeline)."""
    source = os.fspath(source)
    if os.path.isdir(source):
        if os.path.exists(os.path.join(source, "config.json")):
            return cls.from_pretrained(source)
        if os.path.exists(os.path.join(source, "transformer", "config.json")):
            return cls.from_pretrained(source, subfolder="transformer")
        raise FileNotFoundError(f"{source!r} is not a diffusers model folder: no config.json (a model's "
                                "save_pretrained output) and no transformer/config.json (a pipeline folder)")
    if not is_hub_id(source):
        raise FileNotFoundError(f"{source!r}: no such diffusers folder, and not a hub repo id (owner/name)")
    try:
        return cls.from_pretrained(source, subfolder="transformer")
    except OSError:
        try:
            return cls.from_pretrained(source)
        except OSError as err:
            raise FileNotFoundError(f"{source!r}: no such local path, and loading it as a hub repo id failed "
                                    f"({err})") from err


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
    # keys a family reads from the model config that are not constructor arguments (a model without a fixed sample
    # size records the one it is grafted for with ``register_to_config``); ``build`` registers them again
    extra_config: tuple[str, ...] = ()
    # forward pre-hook on the model that tells its slot adapters the patch grid of each call (from its input)
    grid_hook = staticmethod(_set_call_grid)

    def flow_objective(self, model: nn.Module, **defaults):
        """A flow-matching family's objective: ``defaults`` (the published training and sampling settings), with
        the scheduler fields of the teacher's own scheduler config where the model carries one
        (``config[SCHEDULER_KEY]``, recorded by ``load_diffusers`` from a pipeline folder)."""
        scheduler = unwrap(model).config.get(SCHEDULER_KEY)
        if scheduler:
            return FlowMatching.from_scheduler_config(dict(scheduler), **defaults)
        return FlowMatching(**defaults)

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

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return unwrap(model).transformer_blocks

    def slot_attr(self, slot: str) -> str:
        return SLOT_ATTRS[slot]

    def adapt(self, model: nn.Module, op: nn.Module) -> nn.Module:
        if not getattr(model, "_ditgraft_grid_hook", False):
            model.register_forward_pre_hook(self.grid_hook, with_kwargs=True)
            model._ditgraft_grid_hook = True
        return SlotAdapter(op, self.dims(model).grid)

    def teacher_operator(self, model: nn.Module, layer: int, slot: str) -> nn.Module:
        """diffusers self-attention -> ditgraft MHA (``qkv`` = [to_q; to_k; to_v], ``proj`` = to_out.0);
        a tanh-GELU FeedForward -> ditgraft MLP (``fc1`` = net.0.proj, ``fc2`` = net.2). Same function, so
        operators with ``from_mha`` (and self-grafting) start from the teacher's weights."""
        module = self.get_slot(model, layer, slot)
        if isinstance(module, SlotAdapter) or type(module).__module__.startswith("ditgraft."):
            return module
        if slot == "attn":
            return _mha_from_diffusers(module, where=f"transformer_blocks[{layer}].attn1")
        return _mlp_from_diffusers(module, where=f"transformer_blocks[{layer}].ff")

    def config(self, model: nn.Module) -> dict:
        return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}

    def build(self, config: dict) -> nn.Module:
        model = self.model_class().from_config({k: v for k, v in config.items() if k not in self.extra_config})
        extra = {k: config[k] for k in self.extra_config if k in config}
        if extra:
            model.register_to_config(**extra)
        return model


def _mha_from_diffusers(attn: nn.Module, where: str) -> nn.Module:
    plain = (not attn.is_cross_attention and attn.norm_q is None and attn.norm_k is None
             and not attn.residual_connection and attn.rescale_output_factor == 1.0 and attn.spatial_norm is None
             and abs(attn.scale - (attn.inner_dim // attn.heads) ** -0.5) < 1e-12 and attn.to_out[0].bias is not None)
    if not plain:
        raise ValueError(f"{where}: this diffusers attention is not plain softmax self-attention; use init: random")
    dim, heads = attn.to_q.in_features, attn.heads
    has_bias = attn.to_q.bias is not None
    mha = MHA(dim, heads, qkv_bias=has_bias)
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
        if has_bias:
            mha.qkv.bias.copy_(torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias]))
        mha.proj.load_state_dict(attn.to_out[0].state_dict())
    return mha.to(attn.to_q.weight.device)


def _mlp_from_diffusers(ff: nn.Module, where: str) -> nn.Module:
    from diffusers.models.activations import GELU

    act = ff.net[0]
    if not (isinstance(act, GELU) and act.approximate == "tanh" and len(ff.net) == 3):
        raise ValueError(f"{where}: only a tanh-GELU FeedForward maps onto ditgraft's mlp; use init: random")
    fc1, fc2 = act.proj, ff.net[2]
    mlp = MLP(fc1.in_features, hidden=fc1.out_features)
    with torch.no_grad():
        mlp.fc1.load_state_dict(fc1.state_dict())
        mlp.fc2.load_state_dict(fc2.state_dict())
    return mlp.to(fc1.weight.device)
