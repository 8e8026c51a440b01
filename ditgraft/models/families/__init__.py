"""Model families: one ``Family`` object per kind of diffusion transformer (see ``base.py``).

Adding a family: write ``families/<name>.py`` with a ``Family`` subclass (``matches``, ``dims``, the slot
locations, ``forward``, the conditioning and config hooks, what it ``supports``; diffusers transformers subclass
``DiffusersFamily``), then add one line to ``_FAMILIES`` below and a tiny model to tests/family_helpers.py.
"""
from __future__ import annotations

import json
import os

from torch import nn

from ditgraft.models.families.base import Family, ModelDims, SlotAdapter, unwrap
from ditgraft.models.families.diffusers_common import SCHEDULER_KEY, load_transformer
from ditgraft.models.families.diffusers_dit import DiffusersDiTFamily
from ditgraft.models.families.dit import DiTFamily
from ditgraft.models.families.flux import FluxFamily
from ditgraft.models.families.mmdit import MMDiTFamily
from ditgraft.models.families.pixart import PixArtFamily
from ditgraft.models.families.sd3 import SD3Family
from ditgraft.models.families.wan import WanFamily

_FAMILIES: dict[str, Family] = {f.name: f for f in (
    DiTFamily(),
    DiffusersDiTFamily(),
    PixArtFamily(),
    SD3Family(),
    FluxFamily(),
    WanFamily(),
    MMDiTFamily(),
)}


def family_names() -> list[str]:
    return list(_FAMILIES)


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise ValueError(f"family={name!r} is unknown; allowed: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def family_of(model: nn.Module) -> Family:
    model = unwrap(model)
    for family in _FAMILIES.values():
        if family.matches(model):
            return family
    raise TypeError(f"{type(model).__name__} is not a supported model family (known: {', '.join(_FAMILIES)})")


DIFFUSERS_PREFIX = "diffusers:"


def load_diffusers(source: str) -> nn.Module:
    """A diffusers transformer of a known family from a model or pipeline directory (or, with a network, a hub
    repo id): ``diffusers:<dir or repo>`` in a recipe's teacher.source. A pipeline's ``transformer/`` is used, and
    for a flow-matching family its ``scheduler/scheduler_config.json`` (the shift) is recorded in the model config,
    so the family's objective is the pipeline's."""
    from diffusers import AutoModel

    model = load_transformer(AutoModel, source)
    family = family_of(model)  # a clear error for a class no family handles
    scheduler = os.path.join(source, "scheduler", "scheduler_config.json")
    if SCHEDULER_KEY in getattr(family, "extra_config", ()) and os.path.isfile(scheduler):
        with open(scheduler) as f:  # the pipeline's sampler settings (its shift) become the family's objective
            model.register_to_config(**{SCHEDULER_KEY: {k: v for k, v in json.load(f).items()
                                                         if not k.startswith("_")}})
    return model.eval()


def diffusers_architecture(source: str) -> nn.Module | None:
    """The transformer of a diffusers ``source`` built on the meta device (no weights, no memory, no network) from
    its config: a local model folder's ``config.json`` or pipeline folder's ``transformer/config.json``, else the
    published architecture of a hub id in ``assets/diffusers/configs.json``; None when neither is known."""
    import torch

    from ditgraft.models.checkpoints import ASSETS

    config = None
    for path in (os.path.join(source, "config.json"), os.path.join(source, "transformer", "config.json")):
        if os.path.isfile(path):
            with open(path) as f:
                config = json.load(f)
            break
    if config is None:
        with open(os.path.join(ASSETS, "diffusers", "configs.json")) as f:
            config = json.load(f).get(source)
    if config is None:
        return None
    cls_name = config.get("_class_name")
    family = next((f for f in _FAMILIES.values() if getattr(f, "cls_name", None) == cls_name), None)
    if family is None:
        raise TypeError(f"{source}: {cls_name} is not a supported model family (known: {', '.join(_FAMILIES)})")
    with torch.device("meta"):
        return family.build({k: v for k, v in config.items() if not k.startswith("_")})


def model_call(model: nn.Module, compiled: bool = False):
    """``fn(x, t, cond)`` calling ``model`` (or its DDP wrapper) the way its family needs: ditgraft's model-fn
    convention for the diffusion code. ``compiled``: through the family's compiled forward
    (``Family.compiled_forward``), refused in one line for a family that does not support it."""
    family = family_of(model)
    forward = family.forward
    if compiled:
        family.require("compile", "compiled sampling")
        forward = family.compiled_forward()

    def fn(x, t, y):
        return forward(model, x, t, y)

    return fn


__all__ = ["DIFFUSERS_PREFIX", "Family", "ModelDims", "SlotAdapter", "diffusers_architecture", "family_names",
           "family_of", "get_family", "load_diffusers", "model_call"]
