"""The ``ditgraft`` command: parse arguments, call one pipeline function, print where the results went."""
from __future__ import annotations

import argparse
import sys

import torch


def _threads(args) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def cmd_pretrain(args) -> None:
    from ditgraft.train.loop import LoopConfig
    from ditgraft.train.pretrain import PretrainConfig, pretrain
    from ditgraft.utils import resolve_device

    loop = LoopConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                      ema_decay=args.ema, grad_clip=args.grad_clip, ckpt_every=args.ckpt_every, seed=args.seed)
    out = pretrain(PretrainConfig(model=args.model, data=args.data, loop=loop), args.run_dir,
                   resolve_device(args.device))
    print(f"pretrained model (EMA weights): {out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ditgraft", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("pretrain", help="train a DiT from scratch (how the testbed teacher was made)")
    s.add_argument("--model", default="testbed", help="size name, e.g. testbed, DiT-S/4 (default testbed)")
    s.add_argument("--data", default="mnist5k", help="mnist5k, an image folder, or a latents .npy/.npz")
    s.add_argument("--run-dir", default="runs/pretrain")
    s.add_argument("--steps", type=int, default=5000)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--lr", type=float, default=5e-4)
    s.add_argument("--warmup", type=int, default=200)
    s.add_argument("--ema", type=float, default=0.999)
    s.add_argument("--grad-clip", type=float, default=1.0)
    s.add_argument("--ckpt-every", type=int, default=250)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.add_argument("--threads", type=int, default=None)
    s.set_defaults(fn=cmd_pretrain)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _threads(args)
    try:
        args.fn(args)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"ditgraft {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
