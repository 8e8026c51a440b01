"""diffusers ``FluxTransformer2DModel`` (FLUX.1): flow matching with a resolution-dependent shift, RoPE.

ditgraft's samples are latents [B, C, H, W]; the family packs each 2 x 2 patch into a token ([B, H/2 * W/2, 4C],
as ``FluxPipeline`` packs its latents), passes the image tokens' (0, row, column) position ids and zero text ids,
the timestep t / 1000 (the model scales it back) and unpacks the output velocity. Conditioning is
``(prompt embeddings [B, L, joint_attention_dim], pooled embeddings [B, pooled_projection_dim])``, plus the
distilled guidance scale per sample ``[B]`` for guidance-embedding models (FLUX.1-dev, ``guidance_embeds=True``:
the scale is an input, classifier-free guidance is not run). The objective: rectified flow with logit-normal t,
the exponential resolution shift (mu from the token count) and the sigmas 1, ..., 1/steps that FluxPipeline
samples with. Caption data holds prompt_embeds, pooled_prompt_embeds (and guidance for guidance-embedding models).

The model has no fixed sample size; ``config["sample_size"]`` (a latent side, default 128 = 1024 px) sets the
patch grid that stage 1 and the operators are built for (``register_to_config(sample_size=...)``).

Slots. ``attn`` layers count every attention of the model: 0..D-1 are the double-stream blocks
``transformer_blocks`` (D = 19 in FLUX.1), D..D+S-1 the single-stream blocks ``single_transformer_blocks`` (S = 38),
so ``select: all``, ``fraction`` and index lists cover all 57; ``mlp`` layers are the double-stream blocks only
(``Family.slot_depth``; ``dims().depth`` stays D, the block list).
- ``mlp`` is the image stream's ``transformer_blocks[i].ff`` (``ff_context`` stays). A single-stream block's MLP
  (``proj_mlp``, then the MLP columns of the ``proj_out`` it shares with the attention) is not a slot: asking for one
  is refused.
- ``attn`` of a double-stream block is a split slot of the joint attention (``joint.JointSplitAttention``): image
  queries over image keys go through the new operator, attention involving text keeps the teacher's qk-norm, RoPE
  and softmax.
- ``attn`` of a single-stream block is a split slot too (``SingleStreamSplitAttention``): one attention over the
  [text; image] tokens with projections shared by both; image queries over image keys go through the operator,
  text queries over all tokens and image queries over text keys keep the teacher's shared projections, qk-norm,
  RoPE and softmax. Its output stays the attention's own (the block concatenates it with the MLP branch and
  ``proj_out`` projects both), so the operator's ``proj`` is one linear more than the teacher has there.
The teacher's image-to-image part is a ``rope_mha`` with ``axes_dims`` = the model's ``axes_dims_rope`` (in a
single-stream block with the identity as ``proj``); ``init: teacher`` with those options reproduces the teacher. The
patch grid of each call comes from ``img_ids``; a single-stream slot takes the image tokens (the last ones) from it.
Stage 1 captures a single-stream attention's input split into its text and image tokens (the block's text length)
and regresses its image-token output.
"""
from __future__ import annotations

import torch
from torch import nn

from ditgraft.diffusion.flow_matching import FlowMatching
from ditgraft.models.families.base import ModelDims, SlotAdapter, cond_tuple, unwrap
from ditgraft.models.families.diffusers_common import SCHEDULER_KEY, DiffusersFamily, _mlp_from_diffusers
from ditgraft.models.families.joint import (SplitAttentionSlots, heads, merge, rope_mha_from_joint, softmax_lse,
                                            split_attend)
from ditgraft.operators.rope_attention import rotate

DEFAULT_LATENT_SIDE = 128  # 1024 px through FLUX's 8x VAE
PACK = 2  # FluxPipeline packs 2 x 2 latent patches into one token
FLUX_TEXT_TOKENS = 512  # FluxPipeline's T5 max_sequence_length (FLUX.1-dev)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    B, C, H, W = x.shape
    return x.view(B, C, H // PACK, PACK, W // PACK, PACK).permute(0, 2, 4, 1, 3, 5).reshape(
        B, (H // PACK) * (W // PACK), C * PACK * PACK)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    B, _, D = tokens.shape
    C = D // (PACK * PACK)
    return tokens.view(B, height // PACK, width // PACK, C, PACK, PACK).permute(0, 3, 1, 4, 2, 5).reshape(
        B, C, height, width)


def image_ids(rows: int, cols: int, device, dtype) -> torch.Tensor:
    """[rows * cols, 3] position ids (0, row, column) of the packed image tokens, row-major."""
    ids = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :]
    return ids.reshape(rows * cols, 3)


def _set_call_grid_from_ids(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: the patch grid of this call from the image position ids (rows, columns)."""
    ids = kwargs.get("img_ids")
    if ids is None:
        return
    ids = ids[0] if ids.ndim == 3 else ids
    grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
    for m in model.modules():
        if isinstance(m, SlotAdapter):
            m.call_grid = grid


class SingleStreamSplitAttention(SlotAdapter):
    """The attention of a FLUX single-stream block with its image-to-image part through the operator ``op``;
    ``joint`` is the teacher's ``FluxAttention`` (``pre_only``: shared ``to_q/to_k/to_v`` for text and image tokens,
    qk-norm, no output projection). Text queries over all keys and image queries over text keys keep the teacher's
    softmax; image queries over image keys go through ``op``, mixed by their shares of the joint normaliser as in
    ``joint.JointSplitAttention``. The image output is ``op.proj(w A_img) + (1 - w) A_txt``: in the attention's own
    output space, which the block concatenates with its MLP branch and projects by ``proj_out`` (the teacher's
    image-to-image part is a ``rope_mha`` whose ``proj`` is the identity).

    Called as the block calls it, ``(hidden_states=[text; image] tokens, image_rotary_emb)`` -> the output of every
    token (the image token count from the call's patch grid); called with ``encoder_hidden_states`` (stage 1's
    ``SplitSlotUnit``: the two streams apart) -> (image output, text output)."""

    def __init__(self, op: nn.Module, grid: tuple[int, int], joint: nn.Module):
        super().__init__(op, grid)
        self.joint = joint

    def image_grid(self, tokens: int) -> tuple[int, int]:
        """The patch grid of this call's image tokens among ``tokens`` text and image tokens."""
        for grid in (self.call_grid, self.grid):
            if grid is not None and 0 < grid[0] * grid[1] < tokens:
                return grid
        raise ValueError(f"a single-stream split attention slot got {tokens} tokens: fewer than the image tokens of "
                         f"the call's grid {self.call_grid} and of the model's grid {self.grid} plus text")

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, image_rotary_emb=None, *args, **kwargs):
        if args or kwargs or attention_mask is not None:
            raise ValueError(f"a single-stream split attention slot takes hidden_states and image_rotary_emb only; "
                             f"got {len(args)} more positional arguments, attention_mask="
                             f"{'given' if attention_mask is not None else None} and {sorted(kwargs)} (IP-adapter "
                             "and other processor arguments are not supported)")
        if encoder_hidden_states is not None:
            return self.streams(hidden_states, encoder_hidden_states, image_rotary_emb)
        grid = self.image_grid(hidden_states.shape[1])
        n_txt = hidden_states.shape[1] - grid[0] * grid[1]
        img, txt = self.streams(hidden_states[:, n_txt:], hidden_states[:, :n_txt], image_rotary_emb)
        return torch.cat([txt, img], dim=1)

    def streams(self, img: torch.Tensor, txt: torch.Tensor, image_rotary_emb=None):
        """(image output, text output) for image tokens ``img`` and text tokens ``txt``; ``image_rotary_emb`` is
        FLUX's (cos, sin) over [text; image] tokens."""
        a, n_txt = self.joint, txt.shape[1]
        x = torch.cat([txt, img], dim=1)
        q, k, v = a.norm_q(heads(a.to_q(x), a.heads)), a.norm_k(heads(a.to_k(x), a.heads)), heads(a.to_v(x), a.heads)
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        scale = a.head_dim ** -0.5
        # text queries over all keys: the teacher's softmax, unchanged
        txt_out, _ = softmax_lse(q[:, :, :n_txt], k, v, scale)
        # image queries: image keys through the operator, text keys through the teacher's softmax, mixed per head
        img_part, lse_img = split_attend(self.op, img, self.grid_for(img.shape[1]))
        txt_part, lse_txt = softmax_lse(q[:, :, n_txt:], k[:, :, :n_txt], v[:, :, :n_txt], scale)
        w = torch.sigmoid(lse_img - lse_txt)[..., None]
        return self.op.proj(merge(w * img_part)) + merge((1 - w) * txt_part), merge(txt_out)


def _hook_single_stream(block: nn.Module, store: dict, key) -> list:
    """Hooks on a single-stream block and its attention that put (image tokens, text tokens, image output) of each
    call of the attention at ``store[key]`` (the block's text length splits its concatenated stream)."""
    text = {}

    def pre(_module, args, kwargs):
        ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        text["tokens"] = ehs.shape[1]

    def post(_module, args, kwargs, output):
        hs, n = kwargs.get("hidden_states", args[0] if args else None), text["tokens"]
        store[key] = (hs[:, n:].detach(), hs[:, :n].detach(), output[:, n:].detach())

    return [block.register_forward_pre_hook(pre, with_kwargs=True),
            block.attn.register_forward_hook(post, with_kwargs=True)]


class FluxFamily(SplitAttentionSlots, DiffusersFamily):
    name = "flux"
    supports: frozenset[str] = frozenset({"sample", "eval"})  # protocol samples from a caption set (a caption .npz)
    conditioning = "caption"
    cls_name = "FluxTransformer2DModel"
    extra_config = ("sample_size", SCHEDULER_KEY)

    def objective(self, model: nn.Module) -> FlowMatching:
        return self.flow_objective(model, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                   base_image_seq_len=256, max_image_seq_len=4096, timestep_sampling="logit_normal",
                                   patch_size=PACK, sampling_grid="uniform")

    def dims(self, model: nn.Module) -> ModelDims:
        c = model.config
        side = c.get("sample_size", DEFAULT_LATENT_SIDE) // PACK
        return ModelDims(len(model.transformer_blocks), c.num_attention_heads * c.attention_head_dim,
                         c.num_attention_heads, (side, side))

    def slot_depth(self, model: nn.Module, slot: str) -> int:
        """``attn``: the 19 double-stream blocks, then the 38 single-stream blocks (FLUX.1); ``mlp``: the
        double-stream blocks only."""
        model = unwrap(model)
        double = len(model.transformer_blocks)
        return double + len(model.single_transformer_blocks) if slot == "attn" else double

    def single_stream(self, model: nn.Module, layer: int) -> nn.Module | None:
        """``single_transformer_blocks[layer - double-stream blocks]`` for an attention layer past the
        double-stream blocks, else None."""
        model = unwrap(model)
        double = len(model.transformer_blocks)
        return model.single_transformer_blocks[layer - double] if layer >= double else None

    def check(self, model: nn.Module, layer: int, slot: str) -> None:
        double, depth = len(unwrap(model).transformer_blocks), self.slot_depth(model, "attn")
        if slot == "mlp" and isinstance(layer, int) and double <= layer < depth:
            raise ValueError(f"layer={layer} for slot='mlp' is a single-stream block, whose MLP runs in parallel "
                             f"with the attention into one proj_out and is not a slot; mlp layers are "
                             f"0..{double - 1} (the double-stream blocks)")
        super().check(model, layer, slot)

    def slot_parent(self, model: nn.Module, layer: int) -> nn.Module:
        single = self.single_stream(model, layer)
        return single if single is not None else super().slot_parent(model, layer)

    def joint_attention(self, model: nn.Module, layer: int) -> nn.Module:
        single = self.single_stream(model, layer)
        if single is None:
            return super().joint_attention(model, layer)
        return single.attn.joint if isinstance(single.attn, SingleStreamSplitAttention) else single.attn

    def split_attention(self, model: nn.Module, layer: int, op: nn.Module) -> SlotAdapter:
        if self.single_stream(model, layer) is None:
            return super().split_attention(model, layer, op)
        return SingleStreamSplitAttention(op, self.dims(model).grid, self.joint_attention(model, layer))

    def hook_split_slot(self, model: nn.Module, layer: int, store: dict, key) -> list:
        single = self.single_stream(model, layer)
        if single is None:
            return super().hook_split_slot(model, layer, store, key)
        return _hook_single_stream(single, store, key)

    def split_text(self, model: nn.Module, layer: int, cond) -> tuple[int, int]:
        """(tokens, width) of the text tokens entering the attention of ``layer``: the prompt's tokens, at the
        context embedder's width (a single-stream block's text tokens have the model's inner width)."""
        if self.single_stream(model, layer) is None:
            return super().split_text(model, layer, cond)
        return cond_tuple(cond)[0].shape[1], self.joint_attention(model, layer).to_k.in_features

    def learn_sigma(self, model: nn.Module) -> bool:
        return False

    def in_channels(self, model: nn.Module) -> int:
        return unwrap(model).config.in_channels // (PACK * PACK)

    def patch_size(self, model: nn.Module) -> int:
        return PACK * model.config.patch_size

    def adapt(self, model: nn.Module, op: nn.Module) -> nn.Module:
        if not getattr(model, "_ditgraft_grid_hook", False):
            model.register_forward_pre_hook(_set_call_grid_from_ids, with_kwargs=True)
            model._ditgraft_grid_hook = True
        return SlotAdapter(op, self.dims(model).grid)

    def teacher_operator(self, model: nn.Module, layer: int, slot: str) -> nn.Module:
        """The image-to-image part of the attention as a ``rope_mha`` (RoPE split ``axes_dims_rope``; in a
        single-stream block its ``proj`` is the identity), or the image stream's ``ff`` as a ditgraft MLP."""
        module = self.get_slot(model, layer, slot)
        if type(module).__module__.startswith("ditgraft."):
            return module
        if slot == "attn":
            return rope_mha_from_joint(module, axes_dims=tuple(model.config.axes_dims_rope), theta=10000.0)
        return _mlp_from_diffusers(module, where=f"transformer_blocks[{layer}].ff")

    def activation_layout(self, model: nn.Module) -> tuple[int, int]:
        """Image plus FluxPipeline's T5 tokens (max_sequence_length 512) through every block, the single-stream
        blocks included."""
        tokens, depth = super().activation_layout(model)
        return tokens + FLUX_TEXT_TOKENS, depth + len(unwrap(model).single_transformer_blocks)

    def caption_keys(self, model: nn.Module) -> tuple[str, ...]:
        """Prompt and pooled embeddings, and the distilled guidance scale for guidance-embedding models."""
        guided = bool(unwrap(model).config.guidance_embeds)
        return ("prompt_embeds", "pooled_prompt_embeds") + (("guidance",) if guided else ())

    def joint_rotary(self, model: nn.Module, text_tokens: int, grid: tuple[int, int], device):
        """FLUX's (cos, sin) over [text; image] positions: zero text ids, then the image ids of ``grid``."""
        ids = torch.cat([torch.zeros(text_tokens, 3, device=device), image_ids(*grid, device, torch.float32)])
        return unwrap(model).pos_embed(ids)

    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        parts = cond_tuple(cond)
        guided = bool(unwrap(model).config.guidance_embeds)
        if len(parts) != 2 + guided:
            want = "(prompt embeddings, pooled embeddings" + (", guidance scale per sample)" if guided else ")")
            raise ValueError(f"Flux conditioning is {want}; got {len(parts)} tensors")
        emb, pooled = parts[0], parts[1]
        H, W = x.shape[-2:]
        out = model(hidden_states=pack_latents(x), encoder_hidden_states=emb, pooled_projections=pooled,
                    timestep=t / 1000, img_ids=image_ids(H // PACK, W // PACK, x.device, x.dtype),
                    txt_ids=torch.zeros(emb.shape[1], 3, device=x.device, dtype=x.dtype),
                    guidance=parts[2] if guided else None, return_dict=False)[0]
        return unpack_latents(out, H, W)

    def null_cond(self, model: nn.Module, cond):
        raise ValueError("Flux has no null class: true classifier-free guidance needs the negative prompt's "
                         "embeddings (pass null_cond=(negative_prompt_embeds, negative_pooled_prompt_embeds"
                         "[, guidance]))")

    def example_cond(self, model: nn.Module, batch: int, device, tokens: int = 512):
        c = model.config
        cond = (torch.randn(batch, tokens, c.joint_attention_dim, device=device),
                torch.randn(batch, c.pooled_projection_dim, device=device))
        return cond + ((torch.full((batch,), 3.5, device=device),) if c.guidance_embeds else ())
