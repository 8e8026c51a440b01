"""rope_mha: softmax attention with RMS qk-norm and axial RoPE over the patch grid (FLUX's and Wan's attention)."""
from __future__ import annotations

import pytest
import torch

from ditgraft.operators import build_operator
from ditgraft.operators.attention import MHA
from ditgraft.operators.rope_attention import axial_rope, rotate

diffusers = pytest.importorskip("diffusers")


def test_rope_is_fluxs_on_image_ids():
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    axes, grid = (4, 6, 6), (3, 5)
    ids = FluxPipeline._prepare_latent_image_ids(1, *grid, "cpu", torch.float32)
    cos_ref, sin_ref = FluxPosEmbed(theta=10000, axes_dim=list(axes))(ids)
    cos, sin = axial_rope(grid, axes, 10000.0, "cpu")
    assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)
    x = torch.randn(2, 3, 15, 16)  # [B, heads, N, d]
    ref = apply_rotary_emb(x.transpose(1, 2), (cos_ref, sin_ref), sequence_dim=1).transpose(1, 2)
    assert torch.equal(rotate(x, cos, sin), ref)


def test_fast_path_matches_the_plain_reference_and_its_gradients():
    torch.manual_seed(0)
    op = build_operator("rope_mha", 32, 4, (4, 6), axes_dims=(2, 2, 4))
    x = torch.randn(2, 24, 32, requires_grad=True)
    out = op(x, grid=(4, 6))
    heads, lse = op.attend_with_lse(x, (4, 6))
    ref = op.proj(heads.transpose(1, 2).reshape(2, 24, 32))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *op.parameters()], g)
    grads_ref = torch.autograd.grad(ref, [x, *op.parameters()], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert lse.shape == (2, 4, 24)


def test_without_norm_and_rope_it_is_mha():
    torch.manual_seed(0)
    mha = MHA(32, 4)
    op = build_operator("rope_mha", 32, 4, (4, 4), qk_norm=False)
    op.load_state_dict(mha.state_dict())
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(op(x, (4, 4)), mha(x), atol=1e-6, rtol=0)
    missing = build_operator("rope_mha", 32, 4, (4, 4)).load_state_dict(mha.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["norm_k.weight", "norm_q.weight"]


def test_rope_is_wans_on_a_video_grid():
    """(frames, rows, columns) ids as WanRotaryPosEmbed numbers them (head dim 12: 4 + 4 + 4, patch 1 x 2 x 2); an
    image grid is the one-frame video grid (Flux's (0, row, column) ids)."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    rope = WanRotaryPosEmbed(12, (1, 2, 2), max_seq_len=16)
    axes, grid = (rope.t_dim, rope.h_dim, rope.w_dim), (3, 4, 5)
    cos_ref, sin_ref = rope(torch.zeros(1, 1, 3, 8, 10))  # [1, N, 1, d]
    cos, sin = axial_rope(grid, axes, 10000.0, "cpu")
    assert axes == (4, 4, 4) and cos.shape == (60, 12)
    assert torch.equal(cos, cos_ref[0, :, 0]) and torch.equal(sin, sin_ref[0, :, 0])
    for a, b in zip(axial_rope((4, 5), axes, 10000.0, "cpu"), axial_rope((1, 4, 5), axes, 10000.0, "cpu")):
        assert torch.equal(a, b)


def test_qk_norm_across_heads_and_3d_rope_are_wans_attention():
    """rope_mha(qk_norm="rms_norm_across_heads", axes_dims=Wan's split) on a (frames, rows, columns) grid with a Wan
    self-attention's weights computes that attention (WanAttnProcessor, fed the model's RoPE table)."""
    from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, WanRotaryPosEmbed

    from ditgraft.models.families.joint import rope_mha_from_joint

    torch.manual_seed(0)
    attn = WanAttention(dim=24, heads=2, dim_head=12, eps=1e-6, processor=WanAttnProcessor()).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.3 * torch.randn_like(p))  # norm weights away from 1
    rope = WanRotaryPosEmbed(12, (1, 2, 2), max_seq_len=16)
    op = rope_mha_from_joint(attn, axes_dims=(rope.t_dim, rope.h_dim, rope.w_dim), qk_norm="rms_norm_across_heads")
    assert op.norm_q.weight.shape == (24,) and op.qk_norm == "rms_norm_across_heads"
    x = torch.randn(2, 3 * 4 * 5, 24)
    with torch.no_grad():
        ref = attn(x, None, None, rope(torch.zeros(1, 1, 3, 8, 10)))
        out = op(x, (3, 4, 5))
        per_head = build_operator("rope_mha", 24, 2, (3, 4, 5), axes_dims=(4, 4, 4))
    diff = float((out - ref).abs().max())
    print(f"rope_mha vs WanAttnProcessor: max abs diff {diff:.1e}")
    assert diff < 1e-6, diff
    assert per_head.norm_q.weight.shape == (12,) and per_head.qk_norm == "rms_norm"  # FLUX's default: per head


def test_options_are_checked():
    with pytest.raises(ValueError, match="axes_dims=\\(2, 2, 2\\) must be even numbers summing to the head dim 8"):
        build_operator("rope_mha", 32, 4, (4, 4), axes_dims=(2, 2, 2))
    op = build_operator("rope_mha", 32, 4, (4, 4))
    with pytest.raises(ValueError, match="rope_mha got 15 tokens for the grid \\(4, 4\\)"):
        op(torch.randn(1, 15, 32), (4, 4))
    with pytest.raises(ValueError, match="qk_norm='layer_norm' is not allowed; use one of \\(True, False, 'rms_norm', "
                                         "'rms_norm_across_heads'\\)"):
        build_operator("rope_mha", 32, 4, (4, 4), qk_norm="layer_norm")
    with pytest.raises(ValueError, match="rope_mha got 16 tokens for the grid \\(2, 2, 2\\)"):
        op(torch.randn(1, 16, 32), (2, 2, 2))
    rope = build_operator("rope_mha", 32, 4, (4, 4), axes_dims=(2, 2, 4))
    with pytest.raises(ValueError, match="grid=\\(1, 2, 2, 4\\) is not allowed; use \\(rows, columns\\) or "
                                         "\\(frames, rows, columns\\)"):
        rope(torch.randn(1, 16, 32), (1, 2, 2, 4))
