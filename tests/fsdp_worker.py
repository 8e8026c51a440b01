"""Run by tests/test_torchrun.py (``torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT``, or plainly for one
process): the training loop on a tiny DiT with a deterministic regression step (fixed noised inputs and targets,
so one process and two ranks see the same global batch and nothing random), EMA, clipping and two micro-batches
per rank. Under torchrun: FSDP2 for 4 steps; FSDP2 for 2 steps then resumed to 4; DDP for 4 steps. One process:
4 steps. Rank 0 saves each run's final weights and EMA as OUT/<run>.safetensors."""
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ditgraft.models.dit import DiT
from ditgraft.train.loop import LoopConfig, train


def tiny_dit() -> DiT:
    torch.manual_seed(0)
    return DiT(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
               learn_sigma=False, class_dropout_prob=0.0)  # no label dropout: nothing random in a step


def data(n: int = 24) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 10, (n,), generator=g), torch.randn(n, 1, 8, 8, generator=g))


def regression_step(model, batch):
    x, t, y, target = batch
    return {"loss": (model(x, t, y) - target).pow(2).mean()}


def run(out: str, name: str, steps: int, sharding: str) -> None:
    model = tiny_dit()
    cfg = LoopConfig(steps=steps, batch_size=8, lr=1e-2, ema_decay=0.9, grad_clip=0.5, ckpt_every=2, log_every=1,
                     progress=False, grad_accum_steps=2, sharding=sharding)
    res = train(model, regression_step, data(), cfg, os.path.join(out, name))
    if not dist.is_initialized() or dist.get_rank() == 0:
        state = {f"model.{k}": v for k, v in res.model.state_dict().items()}
        state.update({f"ema.{k}": v for k, v in res.ema.state_dict().items()})
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, f"{name}.safetensors"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = sys.argv[1]
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
        run(out, "fsdp", 4, "fsdp")
        run(out, "fsdp_resumed", 2, "fsdp")
        run(out, "fsdp_resumed", 4, "fsdp")
        run(out, "ddp", 4, "ddp")
        dist.destroy_process_group()
    else:
        run(out, "one", 4, "ddp")
