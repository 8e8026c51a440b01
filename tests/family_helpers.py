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

from helpers import tiny_dit


@dataclass(frozen=True)
class TinyFamily:
    build: Callable[..., nn.Module]  # (depth, seed) -> a tiny model with non-zero weights, in eval mode
    cond: Callable[[int, int], object]  # (n, seed) -> conditioning of n samples, as the family's forward takes it
    source_forward: Callable | None = None  # (model, x, t, cond) -> output, called as the source library calls it
    needs: tuple[str, ...] = ()  # optional packages the model needs (the tests skip without them)


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


TINY_FAMILIES: dict[str, TinyFamily] = {
    # ditgraft's own DiT; its parity with the upstream release is the recorded fixture of tests/test_dit.py
    "dit": TinyFamily(lambda depth, seed: tiny_dit(depth=depth, seed=seed).eval(), _labels(10)),
    "diffusers_dit": TinyFamily(_tiny_diffusers_dit, _labels(1000), _diffusers_dit_call, needs=("diffusers",)),
    "pixart": TinyFamily(_tiny_pixart, _captions, _pixart_call, needs=("diffusers",)),
}
