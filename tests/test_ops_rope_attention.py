"""rope_mha: softmax attention with RMS qk-norm and axial RoPE over the patch grid (FLUX's attention)."""
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


def test_options_are_checked():
    with pytest.raises(ValueError, match="axes_dims=\\(2, 2, 2\\) must be even numbers summing to the head dim 8"):
        build_operator("rope_mha", 32, 4, (4, 4), axes_dims=(2, 2, 2))
    op = build_operator("rope_mha", 32, 4, (4, 4))
    with pytest.raises(ValueError, match="rope_mha got 15 tokens for the grid \\(4, 4\\)"):
        op(torch.randn(1, 15, 32), (4, 4))
