"""Expected GPU memory of training a DiT with the shared loop: weights, gradients, AdamW state, EMA and the
activations kept for backward, per GPU, for a given micro-batch, precision and activation checkpointing.

Activation bytes per token, channel and block were measured with ``torch.autograd.graph.saved_tensors_hooks`` on
ditgraft's DiT (CPU, 2026-11-25; the weights that linear layers save are subtracted): 84 in fp32, 50 under bf16
autocast (matmul and attention inputs kept in bf16, the residual stream and norms in fp32). With activation
checkpointing a block keeps only its input (4 bytes: the residual stream stays fp32), and one block at a time is
recomputed with its full activations. Under FSDP2 (``sharding: fsdp``) weights, gradients, Adam moments and EMA are
split over the GPUs, and two blocks' weights are gathered in full at a time (the one computing, the one prefetched). It is an estimate: the allocator's fragmentation, cuDNN/flash workspaces
and the CUDA context (~0.5-1 GiB) come on top.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ditgraft.models.families import family_of

ACT_BYTES_PER_TOKEN_CHANNEL_BLOCK = {"fp32": 84, "bf16": 50}
CHECKPOINTED_BYTES_PER_TOKEN_CHANNEL_BLOCK = 4
GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # fp32 weights, and their bf16 copies cached by autocast
    grads: int
    adam: int  # AdamW's two fp32 moments
    ema: int
    activations: int
    teacher: int = 0  # the frozen fp32 teacher that output distillation runs beside the student (not sharded)

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.adam + self.ema + self.activations + self.teacher

    def format(self, unit: str = "GPU") -> str:
        names = ("weights", "grads", "adam", "ema", "activations") + (("teacher",) if self.teacher else ())
        parts = ", ".join(f"{name} {getattr(self, name) / GIB:.1f}" for name in names)
        return f"{self.total / GIB:.1f} GiB per {unit} ({parts})"


def dit_training_memory(params: int, trainable: int, tokens: int, dim: int, depth: int, micro_batch: int,
                        precision: str = "fp32", activation_checkpointing: bool = False,
                        ema: bool = False, shards: int = 1, block_params: int = 0) -> MemoryEstimate:
    """Bytes on one GPU while training a DiT of ``params`` weights (``trainable`` of them trained) on
    ``micro_batch`` samples of ``tokens`` x ``dim`` at a time (global batch / GPUs / grad_accum_steps); FSDP2 over
    ``shards`` GPUs with blocks of ``block_params`` weights each."""
    if precision not in ACT_BYTES_PER_TOKEN_CHANNEL_BLOCK:
        allowed = tuple(ACT_BYTES_PER_TOKEN_CHANNEL_BLOCK)
        raise ValueError(f"precision={precision!r} is not allowed; use one of {allowed}")
    if micro_batch < 1:
        raise ValueError(f"micro_batch={micro_batch} must be >= 1")
    per_block = ACT_BYTES_PER_TOKEN_CHANNEL_BLOCK[precision] * micro_batch * tokens * dim
    if activation_checkpointing:
        acts = depth * CHECKPOINTED_BYTES_PER_TOKEN_CHANNEL_BLOCK * micro_batch * tokens * dim + per_block
    else:
        acts = depth * per_block
    per_weight = 4 + (2 if precision == "bf16" else 0)
    gathered = 2 * block_params * per_weight if shards > 1 else 0
    return MemoryEstimate(weights=params * per_weight // shards + gathered, grads=4 * trainable // shards,
                          adam=8 * trainable // shards, ema=4 * params // shards if ema else 0, activations=acts)


def lora_parameters(model, rank: int, target_modules) -> int:
    """Parameters of rank-``rank`` LoRA adapters on the linear layers named by ``target_modules`` (peft's rule: a
    module whose name is, or ends with ``.`` + , one of them)."""
    targets = list(target_modules)
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))


def stage2_memory(model, cfg, world: int, added_params: int = 0, operator_params: int = 0,
                  distill_params: int = 0) -> tuple[MemoryEstimate, int]:
    """The estimate for a recipe's stage 2 (``cfg``) on ``world`` GPUs; also returns the micro-batch per GPU.
    ``model`` is the teacher (or its architecture on the meta device); the grafts change its parameter count by
    ``added_params`` (the new operators' ``operator_params``, which always train, also beside LoRA, less the
    modules they replace), and ``distill_params`` is the frozen teacher of output distillation (0: none)."""
    family = family_of(model)
    dims = family.dims(model)
    tokens, depth = family.activation_layout(model)
    micro = max(1, cfg.batch_size // (world * cfg.grad_accum_steps))
    params = sum(p.numel() for p in model.parameters()) + added_params
    trainable = params - sum(p.numel() for p in family.frozen_parameters(model))  # e.g. DiT's sin-cos table
    if getattr(cfg, "lora", None) is not None:  # the adapters and the grafted operators train
        trainable = lora_parameters(model, cfg.lora.rank, cfg.lora.target_modules) + operator_params
    shards = world if cfg.sharding == "fsdp" else 1
    block = max(sum(p.numel() for p in b.parameters()) for b in family.blocks(model))
    est = dit_training_memory(params, trainable, tokens, dims.dim, depth, micro,
                              cfg.precision, cfg.activation_checkpointing, ema=cfg.ema_decay is not None,
                              shards=shards, block_params=block)
    if cfg.distill_weight > 0:
        est = replace(est, teacher=4 * distill_params)
    return est, micro


def format_stage2_memory(model, cfg, world: int, device: torch.device | None = None, added_params: int = 0,
                         operator_params: int = 0, distill_params: int = 0) -> str:
    """One line for the log, per rank: "GPU" when ``device`` is CUDA or None (planning for GPUs), else "CPU
    process" (or the device type's name). The counts are ``stage2_memory``'s."""
    unit = "GPU" if device is None or device.type == "cuda" else f"{device.type.upper()} process"
    est, micro = stage2_memory(model, cfg, world, added_params, operator_params, distill_params)
    return (f"stage 2 expected memory: {est.format(unit)}; micro-batch {micro} = batch {cfg.batch_size} / {world} "
            f"{unit}(s) / grad_accum_steps {cfg.grad_accum_steps}, {cfg.precision}, activation checkpointing "
            f"{'on' if cfg.activation_checkpointing else 'off'}, {cfg.sharding}")
