"""diffusers' layerwise casting (weights stored in bf16 / fp8, upcast to fp32 for each layer's forward) on a tiny
PixArt with each registered operator grafted in its slot: the forward runs and stays close to the uncast one."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers_helpers import captions, latents, tiny_pixart  # noqa: E402
from helpers import randomize_weights  # noqa: E402

from ditgraft.graft.surgery import ResolvedGraft, graft_model  # noqa: E402
from ditgraft.models.families import family_of  # noqa: E402
from ditgraft.operators import get_spec, operator_names  # noqa: E402

# Max abs diff relative to the output's max |value|, measured over all operators on this tiny 2-block PixArt
# (weights of std 0.1): bf16 storage (8 mantissa bits) <= 5.2e-4, fp8 e4m3 (3 bits) <= 8.3e-3. The bounds leave ~5x.
TOLERANCE = {torch.bfloat16: 3e-3, torch.float8_e4m3fn: 4e-2}


def _grafted(name: str):
    teacher = tiny_pixart(depth=2)
    student = graft_model(teacher, [ResolvedGraft(get_spec(name).slot, 1, name)], seed=0)
    return randomize_weights(student, 0.1, 1).eval()


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("name", operator_names())
def test_layerwise_casting_with_each_operator_grafted(name, storage):
    model = _grafted(name)
    fam = family_of(model)
    x, t, cond = latents(2, 0), torch.tensor([10, 700]), captions(2, 1)
    with torch.no_grad():
        ref = fam.forward(model, x, t, cond)
        model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
        stored = {p.dtype for n, p in model.named_parameters() if "transformer_blocks.1" in n}
        out = fam.forward(model, x, t, cond)
    assert storage in stored, f"{name}: no parameter of the grafted block is stored in {storage}"
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    diff = (out - ref).abs().max().item()
    assert diff <= TOLERANCE[storage] * ref.abs().max().item(), f"{name} {storage}: max abs diff {diff:.3g}"
