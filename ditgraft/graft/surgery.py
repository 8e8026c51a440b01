"""Model surgery: build the student from the teacher and the resolved grafts.

The student is a deep copy of the teacher with new operators in place of the chosen ``attn`` / ``mlp`` slots;
everything else keeps the teacher's values. A grafted checkpoint is a safetensors file whose metadata holds the
teacher's model config (and its model family) and the resolved grafts (plus the recipe), so ``load_grafted``
rebuilds it alone; a grafted diffusers model rebuilds as its diffusers class with the operators in its slots.
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ditgraft.layers import resolve_layers
from ditgraft.graft.restructure import restructure
from ditgraft.models.adapters import model_dims, set_slot
from ditgraft.models.checkpoints import (build_checked, build_from_config, load_dit, load_state_strict,
                                         load_weights, read_metadata, save_safetensors, shipped_path)
from ditgraft.models.diffusers_dit import is_diffusers_source
from ditgraft.models.families import DIFFUSERS_PREFIX, family_of, get_family, load_diffusers
from ditgraft.models.families.joint import split_operators, split_unit_ready
from ditgraft.operators import build_operator
from ditgraft.operators.attention import MHA
from ditgraft.operators.rope_attention import RopeMHA


@dataclass(frozen=True)
class ResolvedGraft:
    slot: str
    layer: int
    operator: str
    options: dict = field(default_factory=dict)
    loss: str = "l1"
    huber_delta: float = 1.0
    init: str = "random"

    @property
    def key(self) -> str:
        return f"{self.slot}{self.layer}"


def resolve_grafts(recipe, depth: int | dict[str, int], analysis=None, probe_losses=None) -> list[ResolvedGraft]:
    """Expand every graft's layer selector against its slot's depth (``depth``: one number for every slot, or
    ``slot_depths(model)``: {slot: depth}); a slot may be grafted once."""
    out, seen = [], {}
    for gi, g in enumerate(recipe.grafts):
        probe = probe_losses.get(gi) if probe_losses else None
        n = depth[g.slot] if isinstance(depth, dict) else depth
        for layer in resolve_layers(g.layers, n, analysis=analysis, probe_losses=probe):
            key = (g.slot, layer)
            if key in seen:
                raise ValueError(f"grafts.{gi}: {g.slot} of block {layer} is already grafted by grafts.{seen[key]}")
            seen[key] = gi
            out.append(ResolvedGraft(g.slot, layer, g.operator, dict(g.options), g.loss, g.huber_delta, g.init))
    return sorted(out, key=lambda r: (r.layer, r.slot))


def init_from_teacher(new: nn.Module, old: nn.Module, options: dict | None = None) -> nn.Module:
    """The new operator started from the teacher operator's weights.

    Operators that declare ``from_mha`` (swa, local2d, clear, linear_attn, the Hyena mixers) take an MHA's or a
    ``rope_mha``'s weights through it (they know their own names, e.g. flash-attn's Wqkv; a teacher's qk-norm and
    RoPE are kept or dropped as their options say); otherwise tensors are copied where names and shapes agree
    (self-grafting, an MLP of the same ratio). Raises when the two share nothing.
    """
    if isinstance(old, (MHA, RopeMHA)) and hasattr(type(new), "from_mha"):
        return type(new).from_mha(old, **(options or {}))
    target = new.state_dict()
    shared = {k: v for k, v in old.state_dict().items() if k in target and target[k].shape == v.shape}
    if not shared:
        raise ValueError(f"init='teacher' is not possible: {type(new).__name__} shares no parameter "
                         f"(by name and shape) with {type(old).__name__}; use init: random")
    new.load_state_dict({**target, **shared})
    return new


def build_graft_operator(model: nn.Module, g: ResolvedGraft) -> nn.Module:
    dims = model_dims(model)
    return build_operator(g.operator, dims.dim, dims.heads, dims.grid, **g.options)


def check_operators(model: nn.Module, grafts: list[ResolvedGraft]) -> None:
    """Every graft's operator builds with its options at the model's sizes (on the meta device where its init
    allows): a bad option fails here, before a run directory records the recipe."""
    family = family_of(model)
    for g in grafts:
        try:
            try:
                with torch.device("meta"):
                    op = build_graft_operator(model, g)
            except (RuntimeError, NotImplementedError):  # an init that meta tensors cannot run
                op = build_graft_operator(model, g)
        except (TypeError, ValueError, KeyError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else err
            raise ValueError(f"grafts: operator {g.operator!r} for {g.slot} of block {g.layer} with options "
                             f"{g.options}: {msg}") from None
        if family.is_split_slot(model, g.layer, g.slot) and not split_unit_ready(op):
            raise ValueError(f"grafts: operator {g.operator!r} for {g.slot} of block {g.layer} cannot be the "
                             f"image-to-image part of the {family.name} family's joint attention (it reports no "
                             f"softmax normaliser); allowed: {', '.join(split_operators())}")


def graft_parameter_counts(model: nn.Module, grafts: list[ResolvedGraft]) -> tuple[int, int]:
    """(how many parameters the grafts add to ``model``, how many the new operators hold), from operators built on
    the meta device: a split slot keeps the teacher's joint attention around its operator, any other slot loses the
    module it replaces."""
    family, added, new = family_of(model), 0, 0
    for g in grafts:
        with torch.device("meta"):
            n = sum(p.numel() for p in build_graft_operator(model, g).parameters())
        old = 0 if family.is_split_slot(model, g.layer, g.slot) else sum(
            p.numel() for p in family.get_slot(model, g.layer, g.slot).parameters())
        added, new = added + n - old, new + n
    return added, new


def make_operators(teacher: nn.Module, grafts: list[ResolvedGraft], seed: int) -> dict[str, nn.Module]:
    """The new operator of every graft, initialised from ``seed`` (or from the teacher), on the teacher's device.
    Stage 1 and surgery both call this, so a student starts exactly where stage 1 started."""
    ops = {}
    device = next(teacher.parameters()).device
    state = torch.random.get_rng_state()
    try:
        for i, g in enumerate(grafts):
            torch.manual_seed(seed * 1000 + i)
            op = build_graft_operator(teacher, g)
            if g.init == "teacher":
                op = init_from_teacher(op, family_of(teacher).teacher_operator(teacher, g.layer, g.slot),
                                       g.options)
            ops[g.key] = op.to(device)
    finally:
        torch.random.set_rng_state(state)
    return ops


def graft_model(teacher: nn.Module, grafts: list[ResolvedGraft], seed: int = 0) -> nn.Module:
    """A new student (deep copy of the teacher with the new operators in place); the teacher is untouched."""
    student = copy.deepcopy(teacher)
    for g, op in zip(grafts, make_operators(teacher, grafts, seed).values()):
        set_slot(student, g.layer, g.slot, op)
    return student


def save_grafted(path: str, model: nn.Module, grafts: list[ResolvedGraft], recipe: dict | None,
                 teacher_meta: dict | None = None, extra: dict | None = None) -> None:
    family = family_of(model)
    meta = {"model_config": family.config(model), "family": family.name, "grafts": [asdict(g) for g in grafts],
            "recipe": recipe or {},
            "teacher": {k: v for k, v in (teacher_meta or {}).items() if k != "model_config"}}
    meta.update(extra or {})
    save_safetensors(path, model, meta)


def load_grafted(path: str, map_location="cpu") -> tuple[nn.Module, dict]:
    """Rebuild a grafted and/or restructured (or plain) ditgraft checkpoint from its file alone. The metadata is
    checked against the file's tensor shapes (``build_checked``) before the model is built."""
    meta = read_metadata(path)
    config, family = meta.get("model_config"), meta.get("family", "dit")
    if family != "dit" and not isinstance(config, dict):
        raise ValueError(f"{path}: its metadata has no model_config mapping (got {config!r})")
    try:
        grafts = [ResolvedGraft(**g) for g in meta.get("grafts", [])]
    except TypeError as err:
        raise ValueError(f"{path}: its grafts metadata is malformed ({err})") from None

    def build():
        model = build_from_config(config, path) if family == "dit" else get_family(family).build(config)
        try:
            for g in grafts:
                set_slot(model, g.layer, g.slot, build_graft_operator(model, g))
            if meta.get("restructure"):  # parallel units / dropped blocks, applied after the grafts
                restructure(model, meta["restructure"])
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else err
            raise ValueError(f"{path}: its grafts/restructure metadata does not fit its model ({msg})") from None
        return model

    try:
        model = build_checked(build, config, path, restructured=bool(meta.get("restructure")))
    except KeyError as err:  # an unknown family
        raise ValueError(f"{path}: {err.args[0] if err.args else err}") from None
    load_state_strict(model, load_weights(path, map_location), path)
    return model.eval(), meta


def load_any(source: str, map_location="cpu") -> tuple[nn.Module, dict]:
    """A teacher name/path or a grafted checkpoint or a run directory -> (model, metadata)."""
    if source.startswith(DIFFUSERS_PREFIX):
        return load_diffusers(source[len(DIFFUSERS_PREFIX):]).to(map_location), {}
    if os.path.isdir(source) and not is_diffusers_source(source):
        for name in ("student.safetensors", "model.safetensors"):
            if os.path.exists(os.path.join(source, name)):
                return load_any(os.path.join(source, name), map_location)
        raise FileNotFoundError(f"{source} holds no student.safetensors or model.safetensors")
    source = shipped_path(source)
    if source.endswith(".safetensors") and os.path.exists(source):
        meta = read_metadata(source)
        if (meta.get("grafts") or meta.get("restructure") or meta.get("recipe")
                or meta.get("family", "dit") != "dit"):  # a graft, or a plain model of another family (MMDiT)
            return load_grafted(source, map_location)
    return load_dit(source, map_location=map_location)
