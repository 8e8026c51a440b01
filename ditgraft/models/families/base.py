"""The model-family seam: what grafting needs to know about one kind of diffusion transformer.

A ``Family`` knows a model's blocks and slots (list, get, set), how to call the model the way ditgraft's diffusion
code does (``forward(model, x_t, t, cond)``), the conditioning a forward takes, the sample shape, whether the model
learns its variance, the objective it was trained with (``objective``: IDDPM or flow matching, which stage 1's
noising, stage 2's loss and the sampler take), how to count its FLOPs and how to save and rebuild its config.
Everything else in ditgraft (stage 1, stage 2, sampling, evaluation, the locality analysis, restructuring, FLOP
accounting, the grafted-model loader) reaches a model through its family. A family declares in ``supports`` which
of sampling, evaluation, analysis, restructuring and compiled sampling it takes part in; asking for another is
refused in one line (``require``) before any work.

Conditioning (``cond``) is one tensor (class labels) or a tuple of tensors with the batch first (caption
embeddings and their mask); ``cond_tuple`` / ``cond_cat`` / ``cond_rows`` treat both alike.

Slots use ditgraft's vocabulary: ``attn`` (token mixer) and ``mlp`` (channel mixer). An operator follows the
contract ``op(x: [B, N, D], grid) -> [B, N, D]``; a family whose slots are called differently (diffusers calls
``attn1(hidden_states, encoder_hidden_states=None, attention_mask=None, **kw)``) puts a ``SlotAdapter`` around it.
``get_slot`` returns the operator itself (never the adapter), so its state dict is the operator's own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ditgraft.diffusion.gaussian import GaussianDiffusion
from ditgraft.operators.common import grid_tokens
from ditgraft.slots import SLOTS

Cond = torch.Tensor | tuple


@dataclass(frozen=True)
class ModelDims:
    depth: int
    dim: int
    heads: int
    grid: tuple[int, ...]  # the patch grid: (rows, columns), or (frames, rows, columns) for video


def cond_tuple(cond) -> tuple:
    return tuple(cond) if isinstance(cond, (tuple, list)) else (cond,)


def cond_pack(tensors) -> Cond:
    """Inverse of ``cond_tuple``: one tensor stays a tensor."""
    tensors = tuple(tensors)
    return tensors[0] if len(tensors) == 1 else tensors


def cond_rows(cond, rows) -> Cond:
    return cond_pack(c[rows] for c in cond_tuple(cond))


def cond_to(cond, device) -> Cond:
    return cond_pack(c.to(device) for c in cond_tuple(cond))


def cond_cat(a, b) -> Cond:
    return cond_pack(torch.cat([x, y], dim=0) for x, y in zip(cond_tuple(a), cond_tuple(b), strict=True))


def cond_len(cond) -> int:
    return len(cond_tuple(cond)[0])


def unwrap(model: nn.Module) -> nn.Module:
    """The model under a DistributedDataParallel (or similar ``.module``) wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class SlotAdapter(nn.Module):
    """Lets an operator ``op(x, grid)`` sit where the family calls ``slot(hidden_states, *args, **kwargs)``.

    Extra arguments (``encoder_hidden_states=None``, ``attention_mask=None``, processor kwargs) are those of a
    self-attention call and carry nothing the operator needs. The grid is the patch grid of the current model call
    (``call_grid``, set by the family's pre-hook on the model), else the build-time grid when the token count
    matches it, else (for an image grid) the square grid of N tokens. A video family's grids are (frames, rows,
    columns).
    """

    def __init__(self, op: nn.Module, grid: tuple[int, ...]):
        super().__init__()
        self.op = op
        self.grid = tuple(grid)
        self.call_grid: tuple[int, ...] | None = None  # the patch grid of the current model call, when known

    def grid_for(self, n: int) -> tuple[int, ...]:
        for grid in (self.call_grid, self.grid):
            if grid is not None and n == grid_tokens(grid):
                return grid
        side = int(round(n ** 0.5))
        if len(self.grid) != 2 or side * side != n:
            raise ValueError(f"a grafted slot got {n} tokens: neither the model's grid {self.grid} nor a square grid")
        return (side, side)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        encoder_hidden_states = kwargs.get("encoder_hidden_states", args[0] if args else None)
        if encoder_hidden_states is not None:
            raise ValueError("a grafted self-attention slot was called with encoder_hidden_states (cross-attention)")
        return self.op(hidden_states, grid=self.grid_for(hidden_states.shape[1]))


FEATURES = ("sample", "eval", "analysis", "restructure", "compile")  # what a family can declare in ``supports``


class Family:
    """Base class; subclasses fill in the model-specific parts (see ``dit.py`` and ``diffusers_common.py``)."""

    name: str = ""
    # what ditgraft can do with the family's models beyond grafting (stage 1 and 2): ``sample`` and ``eval``
    # (protocol sampling and metrics), ``analysis`` (the attention-locality protocol), ``restructure`` (parallel
    # pairs and dropped blocks, which rebuild the block list), ``compile`` (sampling through ``compiled_forward``;
    # declared where a test has compared compiled and eager samples)
    supports: frozenset[str] = frozenset({"sample", "eval", "analysis"})
    # what a protocol sample is conditioned on: "class" (labels i % num_classes) or "caption" (caption i % n of a
    # caption set: embeddings and mask)
    conditioning: str = "class"

    def require(self, feature: str, where: str = "") -> None:
        """Refuse, in one line naming the family and the feature, what the family does not support."""
        if feature not in FEATURES:
            raise ValueError(f"feature={feature!r} is not allowed; use one of {FEATURES}")
        if feature not in self.supports:
            raise ValueError(f"{where + ': ' if where else ''}the {self.name} family does not support {feature} "
                             f"(it supports: {', '.join(sorted(self.supports)) or 'grafting only'})")

    # ---- recognising and describing a model -----------------------------------------------------------------
    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def dims(self, model: nn.Module) -> ModelDims:
        raise NotImplementedError

    def learn_sigma(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def in_channels(self, model: nn.Module) -> int:
        raise NotImplementedError

    def objective(self, model: nn.Module):
        """The teacher's training objective: a ``GaussianDiffusion`` (IDDPM, DiT's 1000-step linear schedule, the
        default) or a ``FlowMatching``. Stage 1 noises its inputs with it, stage 2 trains with its loss and the
        sampler follows it."""
        return GaussianDiffusion.dit_default(learn_sigma=self.learn_sigma(unwrap(model)))

    def cfg_channels(self, model: nn.Module) -> int:
        """Output channels that classifier-free guidance mixes (the eps channels)."""
        return self.in_channels(model)

    def sample_shape(self, model: nn.Module, batch: int) -> tuple[int, ...]:
        dims = self.dims(model)
        p = self.patch_size(model)
        return (batch, self.in_channels(model), dims.grid[0] * p, dims.grid[1] * p)

    def patch_size(self, model: nn.Module) -> int:
        raise NotImplementedError

    def num_classes(self, model: nn.Module) -> int:
        """Classes of a class-conditional model (the null class, when there is one, is not counted)."""
        raise ValueError(f"the {self.name} family is conditioned on {self.conditioning}s, not class labels")

    def activation_layout(self, model: nn.Module) -> tuple[int, int]:
        """(tokens, blocks) that keep activations for backward in training (the memory plan): the patch tokens and
        the grafted block list by default; joint image-text families add their text tokens and extra blocks."""
        dims = self.dims(model)
        return grid_tokens(dims.grid), dims.depth

    def caption_keys(self, model: nn.Module) -> tuple[str, ...]:
        """A caption-conditioned family's conditioning as caption-data arrays (``ditgraft.data.captions``): the
        keys, in its forward's order (PixArt: prompt_embeds, prompt_attention_mask)."""
        raise ValueError(f"the {self.name} family is conditioned on {self.conditioning}s, not caption embeddings")

    def protocol_cond(self, model: nn.Module, rows: torch.Tensor, device, captions=None) -> Cond:
        """The conditioning of protocol samples ``rows`` (their indices in the sample set): class ``i %
        num_classes`` (class-balanced); caption families take caption ``i % n`` of ``captions`` (the arrays of
        ``caption_keys``, n rows each)."""
        if self.conditioning == "class":
            return rows.to(device) % self.num_classes(model)
        keys = self.caption_keys(model)
        if captions is None:
            raise ValueError(f"captions are missing: {self.name} samples are conditioned on caption embeddings "
                             f"({', '.join(keys)}); pass a caption set (a caption .npz such as the run's training "
                             "data, or those tensors)")
        parts = cond_tuple(captions)
        if len(parts) != len(keys) or any(len(p) != len(parts[0]) for p in parts):
            raise ValueError(f"captions: the {self.name} family needs ({', '.join(keys)}) with one row per caption; "
                             f"got shapes {[tuple(p.shape) for p in parts]}")
        rows = rows.cpu() % len(parts[0])
        return cond_pack(p[rows].to(device) for p in parts)

    # ---- blocks and slots -----------------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The model's list of transformer blocks, in order."""
        raise NotImplementedError

    def set_blocks(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        """Replace the block list (restructuring); only families that support ``restructure``."""
        self.require("restructure")
        raise NotImplementedError

    def slot_parent(self, model: nn.Module, layer: int) -> nn.Module:
        return self.blocks(model)[layer]

    def slot_attr(self, slot: str) -> str:
        raise NotImplementedError

    def slot_depth(self, model: nn.Module, slot: str) -> int:
        """How many ``slot`` slots the model has (``layer`` runs over 0..slot_depth - 1): one per block by default;
        a family with more attentions than blocks (FLUX's single-stream blocks) counts them here."""
        return self.dims(model).depth

    def check(self, model: nn.Module, layer: int, slot: str) -> None:
        if slot not in SLOTS:
            raise ValueError(f"slot={slot!r} is not allowed; use one of {SLOTS}")
        depth = self.slot_depth(model, slot)
        if not isinstance(layer, int) or not 0 <= layer < depth:
            raise ValueError(f"layer={layer} is out of range for a depth-{depth} model")

    def get_slot(self, model: nn.Module, layer: int, slot: str) -> nn.Module:
        self.check(model, layer, slot)
        module = getattr(self.slot_parent(model, layer), self.slot_attr(slot))
        return module.op if isinstance(module, SlotAdapter) else module

    def set_slot(self, model: nn.Module, layer: int, slot: str, module: nn.Module) -> None:
        self.check(model, layer, slot)
        setattr(self.slot_parent(model, layer), self.slot_attr(slot), self.adapt(model, module))

    def teacher_operator(self, model: nn.Module, layer: int, slot: str) -> nn.Module:
        """The slot's current module as a ditgraft operator (what ``init: teacher`` copies from)."""
        return self.get_slot(model, layer, slot)

    def adapt(self, model: nn.Module, op: nn.Module) -> nn.Module:
        """The module that goes into a slot for operator ``op`` (the operator itself where the contracts agree)."""
        return op

    def check_distillable(self, model: nn.Module, layer: int, slot: str) -> None:
        """Raise where stage 1 cannot distil this slot from captured (input, output) pairs of one tensor each."""

    def is_split_slot(self, model: nn.Module, layer: int, slot: str) -> bool:
        """Whether the slot is the image-to-image part of a joint image-text attention (``joint.py``): stage 1
        then captures both token streams and regresses the joint attention's image-token output."""
        return False

    def dropped_labels_module(self, model: nn.Module) -> nn.Module | None:
        """The module whose input is the class labels after the model's own label dropout (so output distillation
        shows the teacher what the student saw), or None where conditioning reaches the model as given."""
        return None

    def frozen_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters that never train (fixed tables stored as parameters)."""
        return []

    # ---- calling the model ----------------------------------------------------------------------------------
    def forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The model output [B, out_channels, H, W] for noised input ``x``, timesteps ``t`` (0..999), ``cond``."""
        raise NotImplementedError

    def compiled_forward(self):
        """``forward`` compiled by torch.compile, for sampling (``supports`` has "compile"). One compiled function per
        family and process, created on first use; the model is its first argument, so torch's guards tell models
        apart: the first call for a model structure and input shape compiles (tens of seconds on a CPU), every later
        one (each batch and seed of a protocol, another model of the same structure) reuses it. torch compiles one
        function for at most ``torch._dynamo.config.recompile_limit`` (8) structures and shapes; beyond that it runs
        the forward eagerly (the same samples, at eager speed). A family that only compiles part of its model
        overrides this."""
        if getattr(self, "_compiled", None) is None:
            self._compiled = torch.compile(self.forward)
        return self._compiled

    def null_cond(self, model: nn.Module, cond):
        """The unconditional ``cond`` for classifier-free guidance (same batch as ``cond``)."""
        raise NotImplementedError

    def example_cond(self, model: nn.Module, batch: int, device) -> Cond:
        """Random conditioning of the right shapes (FLOP counting, benchmarks)."""
        raise NotImplementedError

    # ---- saving and rebuilding ------------------------------------------------------------------------------
    def config(self, model: nn.Module) -> dict:
        raise NotImplementedError

    def build(self, config: dict) -> nn.Module:
        raise NotImplementedError
