"""A small MMDiT (SD3's joint image-text transformer; Esser et al. 2024) for the offline flow-matching testbed.

Image patch tokens and a few text tokens each keep their own weights (projections, MLPs, adaLN-Zero modulation)
and meet in one joint softmax attention per block. Text is the caption of the class asked for, "a handwritten
seven": a fixed table of tokenised words (``CAPTION_WORDS``), embedded by a learned word table plus learned
positions, so no text encoder is needed; the empty caption (all padding) is the null conditioning that
classifier-free guidance mixes in. As in SD3 the timestep embedding is summed with a pooled text embedding (here the
mean of the caption's word embeddings through a small MLP) to modulate every block.

The model is called ``model(x, t, y)`` with class labels ``y`` (``num_classes`` = the empty caption), t in 0..1000
(flow matching's t * 1000) and returns the velocity. Names follow diffusers' ``SD3Transformer2DModel`` where grafting
reads them: ``transformer_blocks[i].attn`` holds ``to_q/to_k/to_v/to_out`` (image) and ``add_q_proj/add_k_proj/
add_v_proj/to_add_out`` (text), ``ff`` and ``ff_context`` are the MLPs, and the last block is ``context_pre_only``
(its text stream ends in the attention); so the joint split slots of ``families/joint.py`` apply to it unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditgraft.models.dit import FinalLayer, PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed, modulate
from ditgraft.operators.mlp import MLP

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PAD = "<pad>"
CAPTION_WORDS = (PAD, "a", "handwritten") + DIGIT_WORDS  # the vocabulary: index = token id


def caption(label: int) -> str:
    """The caption of class ``label`` (a digit): "a handwritten seven"; the null class is the empty caption."""
    return f"a handwritten {DIGIT_WORDS[label]}" if 0 <= label < len(DIGIT_WORDS) else ""


def tokenize(text: str, length: int) -> list[int]:
    """Word token ids of ``text`` padded to ``length`` (every word must be in ``CAPTION_WORDS``)."""
    words = text.split()
    unknown = [w for w in words if w not in CAPTION_WORDS]
    if unknown or len(words) > length:
        raise ValueError(f"caption {text!r}: words {unknown} are not in the vocabulary {CAPTION_WORDS}, or it has more "
                         f"than {length} words")
    return [CAPTION_WORDS.index(w) for w in words] + [0] * (length - len(words))


class CaptionTokens(nn.Module):
    """Class labels [B] (``num_classes`` = the empty caption) -> token ids [B, L] of their captions. Its input is the
    labels after the model's caption dropout (what output distillation must show the teacher)."""

    def __init__(self, num_classes: int, length: int):
        super().__init__()
        table = [tokenize(caption(c), length) for c in range(num_classes)] + [tokenize("", length)]
        self.register_buffer("table", torch.tensor(table, dtype=torch.long), persistent=False)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.table[labels]


class CaptionEmbedder(nn.Module):
    """Captions of class labels -> text tokens [B, L, D] and a pooled embedding [B, D]; in training, a label is
    replaced by the empty caption with probability ``dropout_prob`` (for classifier-free guidance)."""

    def __init__(self, num_classes: int, hidden_size: int, length: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.tokens = CaptionTokens(num_classes, length)
        self.word_embedding = nn.Embedding(len(CAPTION_WORDS), hidden_size)
        self.pos_embedding = nn.Parameter(torch.zeros(1, length, hidden_size))
        self.pooled = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, labels: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        words = self.word_embedding(self.tokens(labels))
        return words + self.pos_embedding, self.pooled(words.mean(dim=1))


class JointAttention(nn.Module):
    """One softmax attention over [image; text] tokens with separate projections per stream (SD3's joint attention,
    diffusers' names; no qk-norm). Returns (image output, text output); a ``context_pre_only`` block's text output
    is not projected (nothing reads it)."""

    def __init__(self, dim: int, heads: int, context_pre_only: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_size={dim} must be divisible by num_heads={heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.context_pre_only = context_pre_only
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.to_add_out = None if context_pre_only else nn.Linear(dim, dim)
        self.norm_q = self.norm_k = self.norm_added_q = self.norm_added_k = None  # no qk-norm (SD3, not SD3.5)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        return x.view(B, N, self.heads, C // self.heads).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor):
        n = hidden_states.shape[1]
        q = self._heads(torch.cat([self.to_q(hidden_states), self.add_q_proj(encoder_hidden_states)], 1))
        k = self._heads(torch.cat([self.to_k(hidden_states), self.add_k_proj(encoder_hidden_states)], 1))
        v = self._heads(torch.cat([self.to_v(hidden_states), self.add_v_proj(encoder_hidden_states)], 1))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(hidden_states.shape[0], -1, q.shape[1] * q.shape[3])
        img, txt = out[:, :n], out[:, n:]
        return self.to_out[1](self.to_out[0](img)), (txt if self.to_add_out is None else self.to_add_out(txt))


class JointBlock(nn.Module):
    """SD3's joint block with adaLN-Zero per stream: x += g * attn(mod(norm(x))) for image and text tokens from the
    one joint attention, then each stream's own MLP. A ``context_pre_only`` block keeps only the text modulation
    the attention needs (shift, scale) and has no text MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, grid: tuple[int, int], context_pre_only: bool):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm1_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.adaLN_modulation_context = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if context_pre_only else 6) * dim))
        self.attn = JointAttention(dim, heads, context_pre_only)
        self.ff = MLP(dim, grid=grid, hidden=int(dim * mlp_ratio))
        if not context_pre_only:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff_context = MLP(dim, hidden=int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor, c: torch.Tensor):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        mod_c = self.adaLN_modulation_context(c).chunk(2 if self.context_pre_only else 6, dim=1)
        img, txt = self.attn(hidden_states=modulate(self.norm1(x), shift_msa, scale_msa),
                             encoder_hidden_states=modulate(self.norm1_context(context), mod_c[0], mod_c[1]))
        x = x + gate_msa.unsqueeze(1) * img
        x = x + gate_mlp.unsqueeze(1) * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))
        if self.context_pre_only:
            return x, None
        _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = mod_c
        context = context + c_gate_msa.unsqueeze(1) * txt
        context = context + c_gate_mlp.unsqueeze(1) * self.ff_context(
            modulate(self.norm2_context(context), c_shift_mlp, c_scale_mlp))
        return x, context


class MMDiT(nn.Module):
    """Class-captioned MMDiT predicting the rectified-flow velocity. Constructor arguments are the config."""

    def __init__(self, input_size: int = 32, patch_size: int = 4, in_channels: int = 1, hidden_size: int = 128,
                 depth: int = 6, num_heads: int = 4, mlp_ratio: float = 4.0, num_classes: int = 10,
                 caption_length: int = 3, caption_dropout_prob: float = 0.1, shift: float = 1.0):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth={depth} must be >= 1")
        if not 1 <= num_classes <= len(DIGIT_WORDS):
            raise ValueError(f"num_classes={num_classes}: captions exist for 1..{len(DIGIT_WORDS)} digit classes")
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           num_classes=num_classes, caption_length=caption_length,
                           caption_dropout_prob=caption_dropout_prob, shift=shift)
        self.in_channels = self.out_channels = in_channels
        self.patch_size, self.num_heads, self.num_classes = patch_size, num_heads, num_classes
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.grid = self.x_embedder.grid_size
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.caption_embedder = CaptionEmbedder(num_classes, hidden_size, caption_length, caption_dropout_prob)
        self.transformer_blocks = nn.ModuleList(
            [JointBlock(hidden_size, num_heads, mlp_ratio, self.grid, context_pre_only=i == depth - 1)
             for i in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid))
                                  .float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.caption_embedder.word_embedding.weight, std=0.02)
        nn.init.normal_(self.caption_embedder.pos_embedding, std=0.02)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        zero = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]  # adaLN-Zero
        for block in self.transformer_blocks:
            zero += [block.adaLN_modulation[-1], block.adaLN_modulation_context[-1]]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c, p, (h, w) = self.out_channels, self.patch_size, self.grid
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] on the flow path, t: [B] in 0..1000, y: [B] class labels -> velocity [B, C, H, W]."""
        tokens = self.x_embedder(x) + self.pos_embed
        context, pooled = self.caption_embedder(y, self.training)
        c = self.t_embedder(t) + pooled
        for block in self.transformer_blocks:
            tokens, context = block(tokens, context, c)
        return self.unpatchify(self.final_layer(tokens, c))


# The flow-matching testbed: 32x32x1 digits, patch 4 -> 8x8 = 64 image tokens plus 3 caption tokens, width 128,
# 6 joint blocks, 4 heads.
MMDIT_CONFIGS: dict[str, dict] = {"flowbed": dict(input_size=32, patch_size=4, in_channels=1, hidden_size=128, depth=6,
                                                  num_heads=4, num_classes=10)}
