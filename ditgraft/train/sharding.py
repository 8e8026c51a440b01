"""FSDP2 for the training loop: ``torch.distributed.fsdp.fully_shard``, the engine torch ships.

Under ``sharding="fsdp"`` (torchrun, world > 1) the loop trains a sharded copy of the model: every block of the
model's block lists (its top-level ``nn.ModuleList`` children: DiT's ``blocks``, diffusers' ``transformer_blocks``,
Flux's ``single_transformer_blocks``, Wan's ``blocks``) is one FSDP unit, the rest of the model the root unit. Each
rank holds 1 / world of every parameter, gradient and Adam moment; a block's parameters are all-gathered for its
forward and backward only. The caller's own model waits on the CPU meanwhile and receives the trained weights at the
end, so the code after training sees a plain module.

Checkpoints stay the loop's format for the weights (full ``model.safetensors`` / ``ema.safetensors``, gathered onto
rank 0); the optimizer file is the full optimizer state keyed by parameter name
(``torch.distributed.checkpoint.state_dict``), read back into the sharded optimizer on resume.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

SHARDINGS = ("ddp", "fsdp")


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    return [m for m in model.children() if isinstance(m, nn.ModuleList)]


def sharded_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (on its device) with FSDP2 applied per block and at the root."""
    from torch.distributed.fsdp import fully_shard

    net = copy.deepcopy(model)
    blocks = [b for lst in block_lists(net) for b in lst]
    if not blocks:
        raise ValueError(f"sharding='fsdp' needs a model with block lists (nn.ModuleList children) to shard; "
                         f"{type(model).__name__} has none: use sharding='ddp'")
    for block in blocks:
        fully_shard(block)
    fully_shard(net)
    return net


def _options(everywhere: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # everywhere: every rank gets the full tensors; else rank 0 alone gets them, on the CPU
    return StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)


def full_state(net: nn.Module, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded state dict of a sharded module (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_model_state_dict(net, options=_options(everywhere)).items()}


def full_optimizer_state(net: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The full optimizer state keyed by parameter name, on rank 0 (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(net, opt, options=_options(False))


def load_optimizer_state(net: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Shard a full optimizer state (every rank holds it) into ``opt``."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(net, opt, state, options=_options(True))


def local(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: the full value of a DTensor (a gradient norm, a loss), the tensor itself otherwise."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def set_gradient_sync(net: nn.Module, sync: bool) -> None:
    """FSDP2's equivalent of DDP's ``no_sync``: skip the reduce-scatter of micro-batches before the last."""
    net.set_requires_gradient_sync(sync)
