"""Restructuring: sequential block pairs -> parallel units (half the depth), and block dropping (depth pruning).

The paper's third case study turns DiT-XL/2's 28 sequential blocks into 14 parallel units: blocks 2i and 2i+1 read
the same input x, and their residual updates are merged by a learned linear projection,

    unit(x, c) = x + merge(cat(delta_a, delta_b)),   delta_k = block_k(x, c) - x,

where ``delta_k`` is block k's whole residual update (its gated attention update followed by its gated MLP update,
the MLP reading x + the attention update as inside any DiT block). Both blocks keep their pretrained weights; the
merge is ``nn.Linear(2D, D)``, so a unit adds 2D^2 + D parameters (DiT-XL/2: 14 x 2,655,360 = 37,175,040, from
675,129,632 to 712,304,672, the paper's 712M).

Parameter names: unit u sits at ``blocks.{u}`` of the restructured DiT and holds the two original blocks under
``blocks.{u}.pair.0`` / ``blocks.{u}.pair.1`` with DiT's own names below (``blocks.{u}.pair.0.attn.qkv.weight``),
plus ``blocks.{u}.merge.weight`` / ``.bias``. A restructured checkpoint records the restructure in its metadata
(``restructure: {parallel_pairs, drop, merge_init}``, block indices of the original model), so
``graft.surgery.load_grafted`` rebuilds it from the file alone.

Merge initialisation (not published). With W = [W_a, W_b], bias 0:
- ``sum``      W = [I, I]:    x + delta_a(x) + delta_b(x), the first-order expansion of the sequential pair
  x + delta_a(x) + delta_b(x + delta_a(x)); exact when block b's update does not depend on block a's;
- ``average``  W = [I/2, I/2]: half of each update;
- ``first``    W = [I, 0]:    block a alone (block b is dropped until trained).
Measured at stage-1 step 0 on the shipped testbed teacher (8 blocks -> 4 units; 256 held-out noised inputs, t ~
U{0..999}; relative MSE = MSE / variance of the sequential pair's update (out - in) for a unit, MSE / variance of
the teacher's output for the whole model; ``python scripts/restructure_study.py``):

    merge init | unit 0-1 | unit 2-3 | unit 4-5 | unit 6-7 | whole model
    sum        | 0.074    | 0.141    | 0.053    | 0.055    | 0.219
    average    | 0.282    | 0.190    | 0.225    | 0.244    | 0.438
    first      | 0.139    | 0.195    | 0.332    | 0.519    | 0.596

``sum`` is the default: the closest untrained parallel model, for every unit and for the whole model (a half
of the whole-model error of the next best).

Stage 1 (``graft.stage1.run_stage1`` with a ``PairTarget`` per unit) regresses each unit's output onto the
original sequential pair's output on the same input: hooks on the teacher capture the input (and conditioning c) of
block 2i and the output of block 2i+1, one teacher forward feeding every unit. What trains is ``restructure.stage1_train``: ``unit`` (default: both blocks and
the merge; the blocks must change to absorb what a linear merge cannot: block b no longer sees block a's update) or
``merge`` (the merge alone, the blocks frozen at their pretrained weights). On the testbed, units trained whole
reached 2.5-5x lower relative MSE than merge-only training (docs/RESULTS.md).

Depth pruning: ``drop`` removes blocks; ``depth_pruned_spec`` is the baseline of the same depth as a parallel
model (each pair's second block dropped). Sampling latency only approaches the depth bound (half the teacher's)
where a unit's two blocks run concurrently: the plain forward runs them one after the other.

Fused execution (opt-in: ``fuse_parallel_units(model)``, or ``ParallelPair.fused = True``). Both blocks read the same
x, so a unit of two DiT blocks (MHA and MLP in each, one shape) can run as one block of twice the width:

- one adaLN matmul of the concatenated ``adaLN_modulation`` weights (both read c);
- one LayerNorm of x (no affine: the same for both), then each block's own modulation, stacked on a pair axis;
- each projection (``qkv``, ``proj``, ``fc1``, ``fc2``) as one batched matmul over the pair axis with the two blocks'
  weights stacked: the block-diagonal matmul of the concatenated inputs, without its zero blocks (the inputs differ
  by their modulations, so one concatenated qkv weight on a shared input would not be the same function);
- one attention call over both blocks' heads (the pair axis joins the batch).

The result is the sequential-parallel unit's up to rounding (tests: outputs and gradients). It is opt-in because
what it buys is GPU occupancy (one DiT-XL/2 block's matmuls at 256 tokens do not fill a GPU; two stacked do twice the
work per launch) while on CPU the matmuls are already compute-bound (measured: no gain, docs/BENCHMARKS.md), and
because it changes rounding, so default results stay bit-for-bit; the blocks' submodules are not called in it, so
hooks on them (activation capture, analysis) see nothing. Under ``torch.no_grad`` / inference the stacked
weights are cached (re-stacked when a parameter changes); with autograd they are stacked on every call.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

import torch.nn.functional as F

from ditgraft.models.dit import DiT, DiTBlock
from ditgraft.models.families import family_of
from ditgraft.operators.attention import MHA
from ditgraft.operators.common import split_heads
from ditgraft.operators.mlp import MLP

MERGE_INITS = ("sum", "average", "first")
BASELINES = ("depth_pruned", "from_scratch")  # restructure baselines of the same depth, at matched training FLOPs


class ParallelPair(nn.Module):
    """Two DiT blocks reading the same input; their residual updates merged by ``merge: Linear(2D -> D)``.
    ``fused``: run the two blocks as one (``fused_pair_forward``; set by ``fuse_parallel_units``)."""

    fused = False

    def __init__(self, first: nn.Module, second: nn.Module, merge_init: str = "sum"):
        super().__init__()
        self.pair = nn.ModuleList([first, second])
        dim = first.norm1.normalized_shape[0]
        self.merge = nn.Linear(2 * dim, dim, bias=True)
        init_merge(self.merge, merge_init)

    @property
    def norm1(self) -> nn.Module:  # the width probe that model_dims reads from blocks[0]
        return self.pair[0].norm1

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return fused_pair_forward(self, x, c)
        deltas = torch.cat([block(x, c) - x for block in self.pair], dim=-1)
        return x + self.merge(deltas)


# ---------------------------------------------------------------------------------------------------------------------
# Fused execution of a parallel unit (see the module doc)
# ---------------------------------------------------------------------------------------------------------------------
def can_fuse(unit: ParallelPair) -> bool:
    """Whether the unit's two blocks are DiT blocks that one fused forward computes: MHA (sdpa) and MLP of one shape
    in both, the same LayerNorms."""
    a, b = unit.pair
    if not (type(a) is DiTBlock and type(b) is DiTBlock):
        return False
    if not all(type(blk.attn) is MHA and blk.attn.impl == "sdpa" and type(blk.mlp) is MLP for blk in (a, b)):
        return False
    same = lambda f: f(a) == f(b)  # noqa: E731
    return (same(lambda k: (k.attn.dim, k.attn.heads, k.attn.qkv.bias is None, k.mlp.hidden))
            and same(lambda k: (k.norm1.eps, k.norm2.eps)) and a.norm1.eps == a.norm2.eps)


def fuse_parallel_units(model: nn.Module, enabled: bool = True) -> int:
    """Turn fused execution on (or off) in every parallel unit of ``model`` that ``can_fuse``; returns how many."""
    units = [m for m in model.modules() if isinstance(m, ParallelPair) and can_fuse(m)]
    for unit in units:
        unit.fused = enabled
    return len(units)


_FUSED_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _fused_weights(unit: ParallelPair, dtype: torch.dtype) -> dict:
    """The two blocks' weights stacked on a pair axis, in ``dtype``: ``{name: (weight^T [2, in, out], bias [2, 1, out]
    | None)}`` for the projections, and ``adaLN`` as one concatenated (weight [12D, D], bias [12D]). Cached while no
    autograd graph is recorded, keyed by the parameters' storage and version counters."""
    params = list(unit.pair.parameters())
    key = (dtype,) + tuple((p.data_ptr(), p._version) for p in params)
    cached = unit.__dict__.get("_fused_cache")
    if not torch.is_grad_enabled() and cached is not None and cached[0] == key:
        return cached[1]
    a, b = unit.pair
    out = {}
    for name in _FUSED_LAYERS:
        la, lb = a.get_submodule(name), b.get_submodule(name)
        bias = None if la.bias is None else torch.stack([la.bias, lb.bias]).to(dtype)[:, None]
        out[name] = (torch.stack([la.weight, lb.weight]).to(dtype).transpose(1, 2), bias)
    ada_a, ada_b = a.adaLN_modulation[1], b.adaLN_modulation[1]
    out["adaLN"] = (torch.cat([ada_a.weight, ada_b.weight]).to(dtype), torch.cat([ada_a.bias, ada_b.bias]).to(dtype))
    if not torch.is_grad_enabled():
        unit.__dict__["_fused_cache"] = (key, out)
    return out


def _pair_linear(h: torch.Tensor, weights: tuple) -> torch.Tensor:
    """[2, M, in] @ stacked [2, in, out] (+ bias): both blocks' projection in one batched matmul."""
    weight, bias = weights
    return torch.bmm(h, weight) if bias is None else torch.baddbmm(bias, h, weight)


def fused_pair_forward(unit: ParallelPair, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``unit(x, c)`` with the two blocks computed together (``can_fuse(unit)`` must hold). The blocks' submodules
    are not called (their weights are read, cast to x's dtype), so hooks on them do not run."""
    a = unit.pair[0]
    B, N, D = x.shape
    w = _fused_weights(unit, x.dtype)
    # [B, 12D] -> six [2, B, 1, D] modulations, one per (shift, scale, gate) x (attention, MLP), block on axis 0
    mods = F.linear(F.silu(c), *w["adaLN"]).view(B, 2, 6, 1, D).permute(2, 1, 0, 3, 4)
    shift1, scale1, gate1, shift2, scale2, gate2 = mods
    h = a.norm1(x)[None] * (1 + scale1) + shift1  # [2, B, N, D]: one norm, each block's modulation
    qkv = _pair_linear(h.reshape(2, B * N, D), w["attn.qkv"])
    q, k, v = split_heads(qkv.reshape(2 * B, N, 3 * D), a.attn.heads)  # both blocks' heads in one batch of 2B
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, B * N, D)
    xs = x + gate1 * _pair_linear(o, w["attn.proj"]).view(2, B, N, D)  # each block's x after its attention
    h = a.norm2(xs) * (1 + scale2) + shift2
    hidden = a.mlp.act(_pair_linear(h.reshape(2, B * N, D), w["mlp.fc1"]))
    out = xs + gate2 * _pair_linear(hidden, w["mlp.fc2"]).view(2, B, N, D)
    deltas = (out - x).permute(1, 2, 0, 3).reshape(B, N, 2 * D)  # [delta_a, delta_b] as the unfused unit's cat
    return x + unit.merge(deltas)


def init_merge(merge: nn.Linear, how: str) -> None:
    """Set ``merge`` to one of MERGE_INITS (see the module doc), bias 0."""
    if how not in MERGE_INITS:
        raise ValueError(f"merge_init={how!r} is not allowed; use one of {MERGE_INITS}")
    dim = merge.out_features
    eye = torch.eye(dim, dtype=merge.weight.dtype, device=merge.weight.device)
    a, b = {"sum": (1.0, 1.0), "average": (0.5, 0.5), "first": (1.0, 0.0)}[how]
    with torch.no_grad():
        merge.weight.copy_(torch.cat([a * eye, b * eye], dim=1))
        merge.bias.zero_()


def resolve_restructure(spec, depth: int) -> dict:
    """A recipe's ``restructure`` section (or an equivalent dict) -> ``{parallel_pairs, drop, merge_init}`` with
    concrete block indices of a depth-``depth`` model; raises ValueError naming the field, value and what is allowed."""
    get = (lambda k, d=None: spec.get(k, d)) if isinstance(spec, dict) else (lambda k, d=None: getattr(spec, k, d))
    pairs = get("parallel_pairs")
    drop = list(get("drop") or [])
    merge_init = get("merge_init", "sum")
    if merge_init not in MERGE_INITS:
        raise ValueError(f"restructure.merge_init={merge_init!r} is not allowed; use one of {MERGE_INITS}")
    bad = [i for i in drop if not 0 <= i < depth]
    if bad:
        raise ValueError(f"restructure.drop={drop}: blocks {bad} are out of range for depth {depth} (0..{depth - 1})")
    if len(set(drop)) != len(drop):
        raise ValueError(f"restructure.drop={drop}: a block is listed twice")
    if pairs == "all":
        if depth % 2:
            raise ValueError(f"restructure.parallel_pairs='all' needs an even depth; the teacher has {depth} blocks")
        pairs = [[2 * i, 2 * i + 1] for i in range(depth // 2)]
    pairs = [list(p) for p in (pairs or [])]
    used: set[int] = set(drop)
    for p in pairs:
        if len(p) != 2 or p[1] != p[0] + 1 or not 0 <= p[0] < depth - 1:
            raise ValueError(f"restructure.parallel_pairs: {p} is not allowed; a pair is two adjacent blocks "
                             f"[i, i+1] with 0 <= i < {depth - 1}")
        clash = used & set(p)
        if clash:
            raise ValueError(f"restructure.parallel_pairs: {p} reuses block(s) {sorted(clash)} (already dropped "
                             f"or in another pair); each block may be in one pair and must not be dropped")
        used |= set(p)
    if not pairs and not drop:
        raise ValueError("restructure: give parallel_pairs and/or drop (both are empty)")
    if len(drop) >= depth:
        raise ValueError(f"restructure.drop={drop} removes every block of a depth-{depth} model")
    return {"parallel_pairs": sorted(pairs), "drop": sorted(drop), "merge_init": merge_init}


def unit_key(pair) -> str:
    return f"pair{pair[0]}_{pair[1]}"


def restructure(model: nn.Module, spec: dict) -> nn.Module:
    """Restructure ``model`` in place (its ``blocks`` list) by a resolved spec; returns it. Units keep the order of
    their first block; dropped blocks disappear. ``model.restructure`` records the spec."""
    family = family_of(model)
    family.require("restructure")
    first_of = {p[0]: p for p in spec["parallel_pairs"]}
    seconds = {p[1] for p in spec["parallel_pairs"]}
    drop = set(spec["drop"])
    blocks = family.blocks(model)
    new = []
    for i, block in enumerate(blocks):
        if i in drop or i in seconds:
            continue
        if i in first_of:
            j = first_of[i][1]
            new.append(ParallelPair(block, blocks[j], spec["merge_init"]).to(next(block.parameters()).device))
        else:
            new.append(block)
    family.set_blocks(model, nn.ModuleList(new))
    model.restructure = dict(spec)
    return model


def restructured_copy(model: nn.Module, spec: dict) -> nn.Module:
    """A restructured deep copy; ``model`` is untouched."""
    return restructure(copy.deepcopy(model), spec)


def unit_index(spec: dict, pair) -> int:
    """Position of the unit made from ``pair`` in the restructured ``blocks`` list."""
    seconds = {p[1] for p in spec["parallel_pairs"]}
    kept = [i for i in range(pair[0]) if i not in set(spec["drop"]) and i not in seconds]
    return len(kept)


def depth_pruned_spec(spec: dict) -> dict:
    """The depth-pruning baseline of the same depth: each parallel pair's second block is dropped instead."""
    return {"parallel_pairs": [], "drop": sorted(set(spec["drop"]) | {p[1] for p in spec["parallel_pairs"]}),
            "merge_init": spec["merge_init"]}


def baseline_model(name: str, teacher, spec: dict, seed: int):
    """depth_pruned: the teacher with each pair's second block dropped; from_scratch: a freshly initialised DiT of
    the teacher's config at the restructured depth."""
    if name == "depth_pruned":
        return restructured_copy(teacher, depth_pruned_spec(spec))
    if name == "from_scratch":
        depth = family_of(teacher).dims(teacher).depth - len(spec["drop"]) - len(spec["parallel_pairs"])
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)
            return DiT(**{**teacher.config, "depth": depth}).to(next(teacher.parameters()).device)
        finally:
            torch.random.set_rng_state(state)
    raise ValueError(f"baseline={name!r} is not allowed; use one of {BASELINES}")
