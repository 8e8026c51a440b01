"""DiT, faithful to facebookresearch/DiT (models.py): same parameter names, shapes, initialisation and forward.

Attention and MLP are plain attributes of each block (``blocks[i].attn``, ``blocks[i].mlp``), which is what makes
grafting a matter of swapping a module. Both follow the operator contract ``op(x, grid=None)``.

Differences from upstream, all opt-in or invisible to the official configs:
- ``input_size`` may be a (H, W) pair (the official models are square; the sin-cos table is built the same way).
- ``cfg_channels``: how many output channels classifier-free guidance mixes. Upstream guides the first 3 channels
  regardless of ``in_channels`` (harmless for its 4-channel latents: it leaves one eps channel unguided). The official
  registry entries keep 3 to match upstream exactly; other models default to ``in_channels``.
- ``timestep_freq_shift`` and ``mlp_norm_eps``: the two places where diffusers' ``DiTTransformer2DModel`` computes
  differently from upstream for the same weights. diffusers' timestep sinusoids use ``downscale_freq_shift=1``
  (frequencies exp(-ln(1e4) i / (half - 1)); upstream divides by half: shift 0) and its pre-MLP LayerNorm uses
  ``norm_eps`` (1e-5 in converted checkpoints; upstream 1e-6). The defaults are upstream's; a model loaded from a
  diffusers folder sets diffusers' values, so it reproduces diffusers' output. Both are part of the config, so
  checkpoints carry them.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ditgraft.operators.attention import MHA
from ditgraft.operators.mlp import MLP


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


class PatchEmbed(nn.Module):
    """Image [B, C, H, W] -> tokens [B, N, D] via a strided conv (timm PatchEmbed, parameter name ``proj``)."""

    def __init__(self, img_size, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        h, w = _pair(img_size)
        if h % patch_size or w % patch_size:
            raise ValueError(f"input_size={(h, w)} must be divisible by patch_size={patch_size}")
        self.grid_size = (h // patch_size, w // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: int = 0):
        super().__init__()
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000, freq_shift: int = 0) -> torch.Tensor:
        """Sinusoid features [cos, sin] with freqs exp(-ln(max_period) * i / (half - freq_shift)), i < half
        (upstream DiT: shift 0; diffusers: 1)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                          / (half - freq_shift))
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift))


class LabelEmbedder(nn.Module):
    """Class embedding with label dropout to the null class ``num_classes`` (for classifier-free guidance)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += gate1 * attn(mod(norm1(x))); x += gate2 * mlp(mod(norm2(x)))."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, grid: tuple[int, int] = (0, 0),
                 mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = MHA(hidden_size, num_heads, grid=grid, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = MLP(hidden_size, grid=grid, hidden=int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer with adaLN-Zero conditioning. Constructor arguments are the config (``self.config``)."""

    def __init__(
        self,
        input_size=32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        cfg_channels: int | None = None,
        timestep_freq_shift: int = 0,
        mlp_norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.config = dict(
            input_size=list(_pair(input_size)) if not isinstance(input_size, int) else input_size,
            patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            num_classes=num_classes, learn_sigma=learn_sigma, cfg_channels=cfg_channels,
            timestep_freq_shift=timestep_freq_shift, mlp_norm_eps=mlp_norm_eps,
        )
        if timestep_freq_shift not in (0, 1):
            raise ValueError(f"timestep_freq_shift={timestep_freq_shift!r} is not allowed; "
                             "use 0 (DiT) or 1 (diffusers)")
        if not mlp_norm_eps > 0:
            raise ValueError(f"mlp_norm_eps={mlp_norm_eps!r} is not allowed; use a positive number (DiT 1e-6)")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.cfg_channels = in_channels if cfg_channels is None else cfg_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.grid = self.x_embedder.grid_size
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding, stored as a frozen parameter as upstream does (it is in the state dict).
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, grid=self.grid, mlp_norm_eps=mlp_norm_eps)
             for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.grad_checkpointing = False  # training only: recompute each block in backward instead of storing it
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, H, W]."""
        c, p = self.out_channels, self.patch_size
        h, w = self.grid
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [B, N, D] and conditioning vector c [B, D]."""
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        return tokens, c

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] noised input, t: [B] timesteps, y: [B] class labels -> [B, out_channels, H, W]."""
        tokens, c = self.embed(x, t, y)
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            tokens = checkpoint(block, tokens, c, use_reentrant=False) if recompute else block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Upstream's batched guidance: the batch is [cond half; uncond half]; both halves get the guided eps."""
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        k = self.cfg_channels
        eps, rest = model_out[:, :k], model_out[:, k:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size) -> np.ndarray:
    """Fixed 2-D sin-cos table [H*W, D] in raster order (first half of channels: column index, second: row)."""
    gh, gw = _pair(grid_size)
    grid_h = np.arange(gh, dtype=np.float32)
    grid_w = np.arange(gw, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first, as upstream
    grid = np.stack(grid, axis=0).reshape([2, 1, gh, gw])
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# Size registry: the official DiT sizes (x patch 2/4/8) and the shipped testbed.
_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
DIT_CONFIGS: dict[str, dict] = {
    f"DiT-{s}/{p}": dict(patch_size=p, cfg_channels=3, **kw) for s, kw in _SIZES.items() for p in (2, 4, 8)
}
# The testbed: 32x32x1 MNIST pixels, patch 4 -> 8x8 = 64 tokens, width 128, depth 8, 4 heads (~2.4M params).
DIT_CONFIGS["testbed"] = dict(
    input_size=32, patch_size=4, in_channels=1, hidden_size=128, depth=8, num_heads=4, num_classes=10,
)


def build_dit(name: str, **overrides) -> DiT:
    """Build a registered size, e.g. ``build_dit("DiT-XL/2", input_size=32)`` (latent size 32 = 256px images)."""
    if name not in DIT_CONFIGS:
        raise KeyError(f"model={name!r} is unknown; allowed: {', '.join(DIT_CONFIGS)}")
    return DiT(**{**DIT_CONFIGS[name], **overrides})
