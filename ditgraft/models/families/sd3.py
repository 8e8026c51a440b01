"""diffusers ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5, MMDiT): trained with flow matching.

Conditioning is ``(prompt embeddings [B, L, joint_attention_dim], pooled embeddings [B, pooled_projection_dim])``;
the call is ``model(hidden_states=x, timestep=t, encoder_hidden_states=emb, pooled_projections=pooled).sample``
with t in 0..1000 (flow matching's t * 1000) and the output a velocity. The objective is rectified flow with
logit-normal t and SD3's static shift 3.0.

Each ``transformer_blocks[i]`` is a joint block: one attention ``attn`` over image and text tokens together (image
projections ``to_q/to_k/to_v/to_out``, text projections ``add_q_proj/add_k_proj/add_v_proj/to_add_out``), then
separate MLPs ``ff`` (image) and ``ff_context`` (text). The slots:
- ``mlp`` is the image stream's ``ff`` (a ``SlotAdapter``, as in the other diffusers families); ``ff_context`` stays.
- ``attn`` is a split slot (``JointSplitAttention``): only image queries over image keys go through the new
  operator; every attention involving text (image queries over text keys, text queries over all keys) keeps the
  teacher's softmax and weights. The two parts of an image query are combined as the joint softmax combines them:
  weights sigmoid(lse_image - lse_text) per head, from each part's log-normaliser, so an operator that reproduces
  the teacher's image-only attention (``init: teacher`` MHA) reproduces the teacher exactly. The operator has to
  report its per-head output before its output projection and its log-normaliser (``split_attend``; softmax MHA
  here). SD3.5's image-only ``attn2`` (``dual_attention_layers``) is not a slot and stays.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ditgraft.diffusion.flow_matching import FlowMatching
from ditgraft.models.families.base import SlotAdapter, cond_tuple, unwrap
from ditgraft.models.families.diffusers_common import DiffusersFamily, _mha_from_diffusers, _mlp_from_diffusers
from ditgraft.operators.attention import MHA

SD3_SHIFT = 3.0  # the shift in SD3 / SD3.5's FlowMatchEulerDiscreteScheduler config


def softmax_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Softmax attention on [B, h, N, d] tensors and its log-normaliser [B, h, N] (logsumexp of the scores)."""
    scores = (q @ k.transpose(-2, -1)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse[..., None]) @ v, lse


def split_attend(op: nn.Module, x: torch.Tensor, grid: tuple[int, int]):
    """(per-head output [B, h, N, d] before the operator's output projection, log-normaliser [B, h, N]) of the
    image-only operator ``op``; its ``proj`` maps the merged heads to the output."""
    if isinstance(op, MHA):
        q, k, v = op.split_heads(x)
        return softmax_lse(q, k, v, op.head_dim ** -0.5)
    raise ValueError(f"a split attention slot needs an operator that reports its softmax normaliser; "
                     f"{type(op).__name__} does not (supported: mha)")


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    B, N, C = x.shape
    return x.view(B, N, heads, C // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    B, h, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, h * d)


class JointSplitAttention(SlotAdapter):
    """A joint image-text attention whose image-to-image part is the operator ``op``; ``joint`` is the teacher's
    diffusers ``Attention`` (its text projections, its image query/key/value projections for every attention
    that involves text, its output projections). Called like it: ``(hidden_states, encoder_hidden_states)`` ->
    (image output, text output)."""

    def __init__(self, op: nn.Module, grid: tuple[int, int], joint: nn.Module):
        super().__init__(op, grid)
        self.joint = joint

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None, *args,
                **kwargs):
        a = self.joint
        if args or kwargs:
            raise ValueError(f"a joint split attention slot takes hidden_states and encoder_hidden_states only; got "
                             f"{len(args)} more positional arguments and {sorted(kwargs)} (IP-adapter and other "
                             "processor arguments are not supported)")
        if encoder_hidden_states is None:
            raise ValueError("a joint split attention slot was called without encoder_hidden_states (text tokens)")
        h, scale, n = a.heads, a.scale, hidden_states.shape[1]

        def project(lin, norm, x):
            y = _heads(lin(x), h)
            return norm(y) if norm is not None else y

        q_img, k_img, v_img = (project(a.to_q, a.norm_q, hidden_states), project(a.to_k, a.norm_k, hidden_states),
                               _heads(a.to_v(hidden_states), h))
        q_txt = project(a.add_q_proj, a.norm_added_q, encoder_hidden_states)
        k_txt = project(a.add_k_proj, a.norm_added_k, encoder_hidden_states)
        v_txt = _heads(a.add_v_proj(encoder_hidden_states), h)

        # text queries over all keys: the teacher's joint softmax, unchanged
        txt, _ = softmax_lse(q_txt, torch.cat([k_img, k_txt], 2), torch.cat([v_img, v_txt], 2), scale)
        txt = _merge(txt)
        if not a.context_pre_only:
            txt = a.to_add_out(txt)

        # image queries: image keys through the operator, text keys through the teacher's softmax, mixed as the
        # joint softmax mixes them (weight of each part = its share of the joint normaliser, per head)
        img_part, lse_img = split_attend(self.op, hidden_states, self.grid_for(n))
        txt_part, lse_txt = softmax_lse(q_img, k_txt, v_txt, scale)
        w = torch.sigmoid(lse_img - lse_txt)[..., None]
        img = self.op.proj(_merge(w * img_part)) + F.linear(_merge((1 - w) * txt_part), a.to_out[0].weight)
        return a.to_out[1](img), txt


@contextmanager
def capture_joint_attention(model: nn.Module, layers: list[int]):
    """Forward hooks on ``transformer_blocks[layer].attn`` for each layer; yields {layer: (hidden_states,
    encoder_hidden_states, image output)}, filled by each forward: what a split slot's distillation regresses
    (the image-token outputs from both token streams)."""
    store: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    handles = []
    for layer in layers:
        def hook(_module, args, kwargs, output, layer=layer):
            hs = kwargs.get("hidden_states", args[0] if args else None)
            ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            store[layer] = (hs.detach(), ehs.detach(), output[0].detach())

        handles.append(model.transformer_blocks[layer].attn.register_forward_hook(hook, with_kwargs=True))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


class SD3Family(DiffusersFamily):
    name = "sd3"
    cls_name = "SD3Transformer2DModel"

    def objective(self, model: nn.Module) -> FlowMatching:
        return FlowMatching(shift=SD3_SHIFT, timestep_sampling="logit_normal",
                            patch_size=unwrap(model).config.patch_size)

    def slot_attr(self, slot: str) -> str:
        return {"attn": "attn", "mlp": "ff"}[slot]

    def set_slot(self, model: nn.Module, layer: int, slot: str, module: nn.Module) -> None:
        if slot != "attn":
            return super().set_slot(model, layer, slot, module)
        self.check(model, layer, slot)
        block = model.transformer_blocks[layer]
        joint = block.attn.joint if isinstance(block.attn, JointSplitAttention) else block.attn
        self.adapt(model, module)  # the call-grid hook
        block.attn = JointSplitAttention(module, self.dims(model).grid, joint)

    def teacher_operator(self, model: nn.Module, layer: int, slot: str) -> nn.Module:
        """The image-to-image part of the joint attention as a ditgraft MHA (``to_q/to_k/to_v/to_out``), or the
        image stream's ``ff`` as a ditgraft MLP."""
        module = self.get_slot(model, layer, slot)
        if type(module).__module__.startswith("ditgraft."):
            return module
        if slot == "attn":
            return _mha_from_diffusers(module, where=f"transformer_blocks[{layer}].attn")
        return _mlp_from_diffusers(module, where=f"transformer_blocks[{layer}].ff")

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
