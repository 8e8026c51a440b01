"""Split slots for joint image-text attention (SD3's and FLUX's MMDiT blocks): only image queries over image keys go
through the new operator; every attention that involves text (image queries over text keys, text queries over all
keys) keeps the teacher's softmax and weights.

For one image query and head the joint softmax is a mix of two softmaxes, one over image keys (output A_img,
log-normaliser lse_img) and one over text keys (A_txt, lse_txt), weighted by their shares of the joint normaliser:
w = sigmoid(lse_img - lse_txt), output = w A_img + (1 - w) A_txt, then the output projection. The split keeps that
mix with the operator's A_img and lse_img, projected by the operator's own ``proj``, plus the teacher's text part
projected by the teacher's output weight; so an operator that reproduces the teacher's image-only attention
(``init: teacher``) reproduces the teacher. The operator reports both (``attend_with_lse(x, grid)``: ``rope_mha``,
the local attentions ``swa``, ``local2d``, ``clear``, and ``linear_attn``; or ``mha``). Linear attention's
"log-normaliser" is the log of its relu kernel sum, so the kernel sum over image keys and the exp sum over text keys
share one normaliser: EDiT's hybrid attention for MMDiTs.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ditgraft.models.families.base import SlotAdapter, cond_tuple, unwrap
from ditgraft.operators.attention import MHA
from ditgraft.operators.registry import get_spec, operator_names
from ditgraft.operators.rope_attention import RopeMHA, rotate


def softmax_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Softmax attention on [B, h, N, d] tensors and its log-normaliser [B, h, N] (logsumexp of the scores)."""
    scores = (q @ k.transpose(-2, -1)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse[..., None]) @ v, lse


def split_attend(op: nn.Module, x: torch.Tensor, grid: tuple[int, int]):
    """(per-head output [B, h, N, d] before the operator's ``proj``, log-normaliser [B, h, N]) of the image-only
    operator ``op``."""
    if hasattr(op, "attend_with_lse"):
        return op.attend_with_lse(x, grid)
    if isinstance(op, MHA):
        q, k, v = op.split_heads(x)
        return softmax_lse(q, k, v, op.head_dim ** -0.5)
    raise ValueError(f"a split attention slot needs an operator that reports its softmax normaliser; "
                     f"{type(op).__name__} does not (supported: {', '.join(split_operators())})")


def heads(x: torch.Tensor, h: int) -> torch.Tensor:
    B, N, C = x.shape
    return x.view(B, N, h, C // h).transpose(1, 2)


def merge(x: torch.Tensor) -> torch.Tensor:
    B, h, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, h * d)


class JointSplitAttention(SlotAdapter):
    """A joint image-text attention whose image-to-image part is the operator ``op``; ``joint`` is the teacher's
    diffusers attention (SD3's ``Attention`` or FLUX's ``FluxAttention``): its text projections, its image
    query/key/value projections for every attention that involves text, its qk-norms, its output projections.
    Called like it: ``(hidden_states, encoder_hidden_states[, image_rotary_emb])`` -> (image output, text output);
    ``image_rotary_emb`` is FLUX's (cos, sin) over [text; image] tokens."""

    def __init__(self, op: nn.Module, grid: tuple[int, int], joint: nn.Module):
        super().__init__(op, grid)
        self.joint = joint

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, image_rotary_emb=None, *args, **kwargs):
        a = self.joint
        if args or kwargs or attention_mask is not None:
            raise ValueError(f"a joint split attention slot takes hidden_states, encoder_hidden_states and "
                             f"image_rotary_emb only; got {len(args)} more positional arguments, attention_mask="
                             f"{'given' if attention_mask is not None else None} and {sorted(kwargs)} (IP-adapter "
                             "and other processor arguments are not supported)")
        if encoder_hidden_states is None:
            raise ValueError("a joint split attention slot was called without encoder_hidden_states (text tokens)")
        h, n, n_txt = a.heads, hidden_states.shape[1], encoder_hidden_states.shape[1]
        scale = getattr(a, "scale", None) or a.head_dim ** -0.5

        def project(lin, norm, x):
            y = heads(lin(x), h)
            return norm(y) if norm is not None else y

        q_img = project(a.to_q, a.norm_q, hidden_states)
        k_img = project(a.to_k, a.norm_k, hidden_states)
        v_img = heads(a.to_v(hidden_states), h)
        q_txt = project(a.add_q_proj, a.norm_added_q, encoder_hidden_states)
        k_txt = project(a.add_k_proj, a.norm_added_k, encoder_hidden_states)
        v_txt = heads(a.add_v_proj(encoder_hidden_states), h)
        if image_rotary_emb is not None:  # FLUX: RoPE over [text; image] positions
            cos, sin = image_rotary_emb
            q_txt, k_txt = rotate(q_txt, cos[:n_txt], sin[:n_txt]), rotate(k_txt, cos[:n_txt], sin[:n_txt])
            q_img, k_img = rotate(q_img, cos[n_txt:], sin[n_txt:]), rotate(k_img, cos[n_txt:], sin[n_txt:])

        # text queries over all keys: the teacher's joint softmax, unchanged
        txt, _ = softmax_lse(q_txt, torch.cat([k_txt, k_img], 2), torch.cat([v_txt, v_img], 2), scale)
        txt = merge(txt)
        if not a.context_pre_only:
            txt = a.to_add_out(txt)

        # image queries: image keys through the operator, text keys through the teacher's softmax, mixed by their
        # shares of the joint normaliser (per head)
        img_part, lse_img = split_attend(self.op, hidden_states, self.grid_for(n))
        txt_part, lse_txt = softmax_lse(q_img, k_txt, v_txt, scale)
        w = torch.sigmoid(lse_img - lse_txt)[..., None]
        img = self.op.proj(merge(w * img_part)) + F.linear(merge((1 - w) * txt_part), a.to_out[0].weight)
        return a.to_out[1](img), txt


def rope_mha_from_joint(attn: nn.Module, axes_dims=None, theta: float = 10000.0,
                        qk_norm: str = "rms_norm") -> RopeMHA:
    """The image-to-image part of a joint attention with qk-norm (SD3.5, FLUX), or a self-attention with qk-norm
    laid out the same way (Wan's ``attn1``), as a ditgraft ``rope_mha``: ``qkv`` = [to_q; to_k; to_v], ``proj`` =
    to_out.0, ``norm_q`` / ``norm_k`` the teacher's (``qk_norm``: per head, or "rms_norm_across_heads");
    ``axes_dims`` the teacher's RoPE split (None: no RoPE). An attention without an output projection
    (``pre_only``: FLUX's single-stream blocks, whose ``proj_out`` projects the attention together with the MLP
    branch) gets the identity as ``proj``."""
    dim, h = attn.to_q.in_features, attn.heads
    op = RopeMHA(dim, h, axes_dims=axes_dims, theta=theta, qk_norm=qk_norm, eps=attn.norm_q.eps,
                 qkv_bias=attn.to_q.bias is not None)
    with torch.no_grad():
        op.qkv.weight.copy_(torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
        if attn.to_q.bias is not None:
            op.qkv.bias.copy_(torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias]))
        if getattr(attn, "to_out", None) is not None:
            op.proj.load_state_dict(attn.to_out[0].state_dict())
        else:
            op.proj.weight.copy_(torch.eye(dim))
            op.proj.bias.zero_()
        op.norm_q.weight.copy_(attn.norm_q.weight)
        op.norm_k.weight.copy_(attn.norm_k.weight)
    return op.to(attn.to_q.weight.device)


class SplitAttentionSlots:
    """The slots of a family whose blocks hold a joint image-text attention (``transformer_blocks[i].attn``) and a
    feed-forward ``ff``: ``attn`` is the split slot (the image-to-image part), ``mlp`` the image stream's ``ff``.
    Mixed in before the family's base class (SD3, Flux)."""

    def slot_attr(self, slot: str) -> str:
        return {"attn": "attn", "mlp": "ff"}[slot]

    def is_split_slot(self, model: nn.Module, layer: int, slot: str) -> bool:
        return slot == "attn"

    def split_text(self, model: nn.Module, layer: int, cond) -> tuple[int, int]:
        """(tokens, width) of the text stream entering ``transformer_blocks[layer].attn`` for conditioning
        ``cond`` (the prompt embeddings come first; the context embedder keeps their token count)."""
        joint = self.joint_attention(model, layer)
        return cond_tuple(cond)[0].shape[1], joint.add_k_proj.in_features

    def joint_attention(self, model: nn.Module, layer: int) -> nn.Module:
        """The teacher's joint attention of ``transformer_blocks[layer]`` (also under a split graft)."""
        attn = unwrap(model).transformer_blocks[layer].attn
        return attn.joint if isinstance(attn, JointSplitAttention) else attn

    def joint_rotary(self, model: nn.Module, text_tokens: int, grid: tuple[int, int], device):
        """The ``image_rotary_emb`` the model passes its joint attentions for this text length and patch grid
        (None: no RoPE, as SD3)."""
        return None

    def split_attention(self, model: nn.Module, layer: int, op: nn.Module) -> SlotAdapter:
        """The split slot of ``layer`` with ``op`` as its image-to-image part, around the teacher's joint attention
        (what ``set_slot`` puts in the model and stage 1's ``SplitSlotUnit`` trains)."""
        return JointSplitAttention(op, self.dims(model).grid, self.joint_attention(model, layer))

    def hook_split_slot(self, model: nn.Module, layer: int, store: dict, key) -> list:
        """Forward hooks that put (image tokens, text tokens, image output) of the split slot's teacher attention
        at ``store[key]`` on each forward (``hook_joint_attention``); returns their handles."""
        return [hook_joint_attention(model, layer, store, key)]

    def set_slot(self, model: nn.Module, layer: int, slot: str, module: nn.Module) -> None:
        """``attn``: ``module`` into the image-to-image part of ``transformer_blocks[layer].attn`` (keeping the
        teacher's joint attention around it, also when the slot is grafted again)."""
        if slot != "attn":
            return super().set_slot(model, layer, slot, module)
        self.check(model, layer, "attn")
        self.adapt(model, module)  # registers the family's call-grid hook
        self.slot_parent(model, layer).attn = self.split_attention(model, layer, module)


def split_unit_ready(op: nn.Module | type) -> bool:
    """Whether operator ``op`` (or its class) can be a split slot's image-to-image part: it reports its softmax
    normaliser (``attend_with_lse``, or ``mha``)."""
    cls = op if isinstance(op, type) else type(op)
    return hasattr(cls, "attend_with_lse") or issubclass(cls, MHA)


def split_operators() -> list[str]:
    """The registered attention operators that can be a split slot's image-to-image part."""
    return [name for name in operator_names("attn") if split_unit_ready(get_spec(name).cls)]


def hook_joint_attention(model: nn.Module, layer: int, store: dict, key) -> torch.utils.hooks.RemovableHandle:
    """A forward hook on ``transformer_blocks[layer].attn`` that puts (hidden_states, encoder_hidden_states, image
    output) of each call at ``store[key]``: what a split slot's distillation regresses (the image-token outputs
    from both token streams)."""
    def hook(_module, args, kwargs, output):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        store[key] = (hs.detach(), ehs.detach(), output[0].detach())

    return unwrap(model).transformer_blocks[layer].attn.register_forward_hook(hook, with_kwargs=True)


@contextmanager
def capture_joint_attention(family, model: nn.Module, layers: list[int]):
    """``family``'s split-slot hooks (``hook_split_slot``) for each layer of ``model``; yields {layer: (image
    tokens, text tokens, image output) entering and leaving the teacher's attention}, filled by each forward."""
    store: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    handles = [h for layer in layers for h in family.hook_split_slot(model, layer, store, layer)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


class SplitSlotUnit(nn.Module):
    """What stage 1 trains for a split slot: the operator ``op`` as the image-to-image part of the joint attention
    of ``layer`` in ``teacher`` (of the family ``family``); every part that involves text stays the teacher's,
    frozen. Called on the captured (image tokens, text tokens), it returns the image-token output, the teacher's
    regression target. Only ``op`` is registered, so the unit's state dict is the operator's own (``op.*``) and
    the teacher's weights are never trained or saved with it; ``weights`` is the module whose weights go into the
    student's slot."""

    def __init__(self, op: nn.Module, family, teacher: nn.Module, layer: int):
        super().__init__()
        self.op = op
        self._teacher = (family, teacher)  # a tuple: not registered as a submodule
        self._split = (family.split_attention(teacher, layer, op),)
        self._rotary: dict = {}

    @property
    def weights(self) -> nn.Module:
        return self.op

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        family, teacher = self._teacher
        split = self._split[0]
        key = (encoder_hidden_states.shape[1], str(hidden_states.device))
        if key not in self._rotary:
            self._rotary[key] = family.joint_rotary(teacher, key[0], split.grid, hidden_states.device)
        return split(hidden_states, encoder_hidden_states, image_rotary_emb=self._rotary[key])[0]
