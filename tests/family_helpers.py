"""One tiny model per registered model family, for the family contract tests (tests/test_family_contract.py).

A new family adds one entry to ``TINY_FAMILIES``: a builder of a tiny model with non-zero weights from kwargs
(offline, well under a second), conditioning for it and, where the family wraps a source library, that library's
own call of the model (for the forward parity check) and the optional packages it needs. Nothing else in the contract tests names a family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from helpers import tiny_dit, tiny_mmdit


@dataclass(frozen=True)
class TinyFamily:
    build: Callable[..., nn.Module]  # (depth, seed) -> a tiny model with non-zero weights, in eval mode
    cond: Callable[[int, int], object]  # (n, seed) -> conditioning of n samples, as the family's forward takes it
    source_forward: Callable | None = None  # (model, x, t, cond) -> output, called as the source library calls it
    needs: tuple[str, ...] = ()  # optional packages the model needs (the tests skip without them)
    # slots whose module reads one token stream (the operator contract); a joint attention's split slot reads two
    plain_slots: tuple[str, ...] = ("attn", "mlp")
    graft: tuple[str, str, dict] = ("attn", "hyena_x", {})  # (slot, operator, options) of the save/load check


def _labels(classes: int):
    return lambda n, seed: torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def _captions(n: int, seed: int):
    from diffusers_helpers import captions

    return captions(n, seed)


def _tiny_pixart(depth: int, seed: int):
    from diffusers_helpers import tiny_pixart

    return tiny_pixart(depth=depth, seed=seed)


def _tiny_diffusers_dit(depth: int, seed: int):
    from diffusers_helpers import tiny_diffusers_dit

    return tiny_diffusers_dit(depth=depth, seed=seed)


def _pixart_call(model, x, t, cond):
    emb, mask = cond  # PixArtSigmaPipeline's call (no resolution micro-conditions)
    return model(x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t,
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


def _diffusers_dit_call(model, x, t, y):
    return model(x, timestep=t, class_labels=y, return_dict=False)[0]  # DiTPipeline's call


def _tiny(name: str):
    def build(depth: int, seed: int):
        import diffusers_helpers

        return getattr(diffusers_helpers, f"tiny_{name}")(depth=depth, seed=seed)

    return build


def _sd3_cond(n: int, seed: int):
    from diffusers_helpers import sd3_prompts

    return sd3_prompts(n, seed)


def _flux_cond(n: int, seed: int):
    emb, pooled = _sd3_cond(n, seed)
    return emb, pooled, torch.full((n,), 3.5)  # distilled guidance scale per sample


def _wan_cond(n: int, seed: int):
    from diffusers_helpers import CAPTION_DIM, TOKENS

    return torch.randn(n, TOKENS, CAPTION_DIM, generator=torch.Generator().manual_seed(seed))


TINY_FAMILIES: dict[str, TinyFamily] = {
    # ditgraft's own DiT; its parity with the upstream release is the recorded fixture of tests/test_dit.py
    "dit": TinyFamily(lambda depth, seed: tiny_dit(depth=depth, seed=seed).eval(), _labels(10)),
    "diffusers_dit": TinyFamily(_tiny_diffusers_dit, _labels(1000), _diffusers_dit_call, needs=("diffusers",)),
    "pixart": TinyFamily(_tiny_pixart, _captions, _pixart_call, needs=("diffusers",)),
    # the flow-matching families: their parity with diffusers' pipelines is in tests/test_family_{sd3,flux,wan}.py
    "sd3": TinyFamily(_tiny("sd3"), _sd3_cond, needs=("diffusers",), plain_slots=("mlp",),
                      graft=("mlp", "mlp", {"ratio": 3})),
    "flux": TinyFamily(_tiny("flux"), _flux_cond, needs=("diffusers",), plain_slots=("mlp",),
                       graft=("mlp", "mlp", {"ratio": 3})),
    "wan": TinyFamily(_tiny("wan"), _wan_cond, needs=("diffusers",)),  # attn: the video self-attention attn1
    # ditgraft's own MMDiT (the flowbed teacher); its split attention slot is checked in tests/test_flowbed.py
    "mmdit": TinyFamily(lambda depth, seed: tiny_mmdit(depth=depth, seed=seed), _labels(10), plain_slots=("mlp",),
                        graft=("mlp", "mlp", {"ratio": 3})),
}
