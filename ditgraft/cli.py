"""The ``ditgraft`` command: parse arguments, call one pipeline function, print where the results went.

    ditgraft demo                      graft the shipped testbed teacher (50% attention -> Hyena-X), evaluate, report
    ditgraft graft RECIPE              run a recipe (stage 1 -> stage 2 -> eval -> report) in a run directory
    ditgraft pretrain                  train a DiT from scratch (how the testbed teacher was made)
    ditgraft sample MODEL              class-conditional samples: PNG grid + ADM .npz
    ditgraft eval SAMPLES.npz|MODEL    FID/KID/precision/recall/accuracy (testbed) or Inception metrics
    ditgraft analyze MODEL             attention locality, entropy and activation statistics per layer
    ditgraft synth MODEL               synthetic training data from a teacher (samples + labels; or captions)
    ditgraft ops                       operator table: parameters and FLOPs at (dim, tokens)
    ditgraft bench ops|model           side-by-side timings with FLOP-bound ratios
    ditgraft recipes                   list the bundled recipes
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def _device(args):
    from ditgraft.utils import resolve_device

    return resolve_device(getattr(args, "device", None))


def _load_model(source: str, device):
    from ditgraft.graft.surgery import load_any

    model, meta = load_any(source, map_location="cpu")
    return model.to(device).eval(), meta


def cmd_pretrain(args) -> None:
    from ditgraft.train.loop import LoopConfig
    from ditgraft.train.pretrain import PretrainConfig, pretrain

    loop = LoopConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                      ema_decay=args.ema, grad_clip=args.grad_clip, ckpt_every=args.ckpt_every, seed=args.seed,
                      decay_steps=args.decay_steps)
    out = pretrain(PretrainConfig(model=args.model, data=args.data, loop=loop), args.run_dir, _device(args))
    print(f"pretrained model (EMA weights): {out}")


def cmd_graft(args) -> None:
    from ditgraft.graft.pipeline import STAGES, run_graft
    from ditgraft.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    run_dir = args.run_dir or os.path.join("runs", recipe.name)
    stages = tuple(args.stages.split(",")) if args.stages else STAGES
    run_graft(recipe, run_dir, stages=stages, device=args.device, progress=not args.quiet)
    _print_summary(run_dir)


def _print_summary(run_dir: str) -> None:
    path = os.path.join(run_dir, "report.json")
    if os.path.exists(path):
        with open(path) as f:
            rep = json.load(f)
        for name, row in rep.get("eval", {}).items():
            acc = row.get("accuracy")
            print(f"  {name:12s} FID {row['fid']:8.2f}  KIDx1000 {row['kid_x1000']:7.2f}  "
                  f"accuracy {acc if acc is None else f'{acc:.3f}'}")
        share = rep["compute"].get("share_of_pretraining")
        if share is not None:
            print(f"  grafting cost: {100 * share:.2f}% of the teacher's pretraining FLOPs")
    print(f"report: {os.path.join(run_dir, 'report.md')}")


def cmd_demo(args) -> None:
    args.recipe = "testbed_hyena_x_50"
    args.run_dir = args.run_dir or os.path.join("runs", "demo")
    args.stages = None
    cmd_graft(args)


def cmd_recipes(args) -> None:
    from ditgraft.recipe import bundled_recipes, load_recipe

    for name in bundled_recipes():
        r = load_recipe(name)
        print(f"{name:32s} {r.description.splitlines()[0] if r.description else ''}")


def cmd_sample(args) -> None:
    from ditgraft.diffusion.samplers import SamplingConfig
    from ditgraft.eval.adm import save_samples_npz
    from ditgraft.eval.sampling import generate, save_grid
    from ditgraft.train.loop import dist_info

    device = _device(args)
    model, _ = _load_model(args.model, device)
    cfg = SamplingConfig(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg, clip_denoised=args.clip)
    if model.in_channels not in (1, 3):
        raise ValueError(f"model has {model.in_channels} channels (latent space): decode with a VAE before saving "
                         "images; ditgraft samples pixel-space models directly")
    rank, world = dist_info()
    images, labels = generate(model, args.num_samples, cfg, seed=args.seed, batch_size=args.batch_size, device=device,
                              rank=rank, world=world, progress=True)
    os.makedirs(args.out, exist_ok=True)
    if world > 1:
        import torch.distributed as dist

        save_samples_npz(os.path.join(args.out, f"part{rank}.npz"), images, labels)
        dist.barrier()
        if rank != 0:
            return
        images, labels = _merge_parts(args.out, world, args.batch_size)
    path = save_samples_npz(os.path.join(args.out, "samples.npz"), images, labels)
    order = labels[:100].argsort(kind="stable")
    save_grid(os.path.join(args.out, "samples.png"), images[:100][order])
    print(f"{len(images)} samples: {path} and {os.path.join(args.out, 'samples.png')}")


def _merge_parts(out: str, world: int, batch_size: int):
    """Rank r holds batches r, r+world, ...; put them back in batch order."""
    import numpy as np

    from ditgraft.eval.adm import load_samples_npz

    parts = [load_samples_npz(os.path.join(out, f"part{r}.npz")) for r in range(world)]
    imgs, labs = [], []
    b = 0
    while True:
        r, k = b % world, b // world
        im, lb = parts[r]
        chunk = slice(k * batch_size, (k + 1) * batch_size)
        if chunk.start >= len(im):
            break
        imgs.append(im[chunk])
        labs.append(lb[chunk])
        b += 1
    for r in range(world):
        os.remove(os.path.join(out, f"part{r}.npz"))
    return np.concatenate(imgs), np.concatenate(labs)


def cmd_eval(args) -> None:
    from ditgraft.eval.evaluate import evaluate_samples, protocol_for, real_data_floor, sample_and_evaluate

    if args.floor:
        result = real_data_floor()
    elif args.target.endswith(".npz"):
        result = evaluate_samples(args.target, features=args.features, reference=args.ref,
                                  inception_weights=args.inception_weights)
    else:
        device = _device(args)
        model, _ = _load_model(args.target, device)
        out = args.out or os.path.join("runs", "eval", os.path.basename(args.target.rstrip("/")).split(".")[0])
        protocol = protocol_for(cfg_scale=args.cfg, num=args.num_samples, seed=args.seed)
        result = sample_and_evaluate(model, out, protocol, device)
        print(f"samples and metrics in {out}")
    print(json.dumps(result, indent=2))


def cmd_analyze(args) -> None:
    from ditgraft.eval.analysis import analyze_model, write_analysis_report

    device = _device(args)
    model, _ = _load_model(args.model, device)
    result = analyze_model(model, num_samples=args.num_samples, steps=args.steps, cfg_scale=args.cfg,
                           band_k=args.band_k, seed=args.seed, device=device, progress=True)
    files = write_analysis_report(result, args.out)
    print(f"local layers (band-k > 50%): {result['local_layers']}; non-local: {result['nonlocal_layers']}")
    print("written: " + ", ".join(files.values()))


def cmd_synth(args) -> None:
    import numpy as np

    if args.prompts:
        return _synth_captions(args)

    from ditgraft.diffusion.samplers import SamplingConfig, sample
    from ditgraft.eval.sampling import batch_labels
    from ditgraft.utils import atomic_path

    device = _device(args)
    model, _ = _load_model(args.model, device)
    cfg = SamplingConfig(sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg, clip_denoised=args.clip)
    h, w = model.grid[0] * model.patch_size, model.grid[1] * model.patch_size
    xs, ys = [], []
    for b in range((args.num_samples + args.batch_size - 1) // args.batch_size):
        y = batch_labels(b, args.batch_size, args.num_samples, model.num_classes, device)
        g = torch.Generator().manual_seed(args.seed * 100_003 + b)
        xs.append(sample(model, y, (len(y), model.in_channels, h, w), cfg, generator=g).cpu().numpy())
        ys.append(y.cpu().numpy())
    out = args.out if args.out.endswith(".npz") else args.out + ".npz"
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, latents=np.concatenate(xs).astype(np.float32), labels=np.concatenate(ys))
    print(f"{args.num_samples} synthetic samples (model space, with labels): {out}; use it as `data:` in a recipe")


def _synth_captions(args) -> None:
    from ditgraft.data.captions import load_t2i_pipeline, read_prompts, synth_captions

    prompts = read_prompts(args.prompts)
    pipe = load_t2i_pipeline(args.model, _device(args))
    out = args.out if args.out.endswith(".npz") else args.out + ".npz"
    synth_captions(pipe, prompts, out, num_samples=args.num_samples, steps=args.steps, guidance_scale=args.cfg,
                   batch_size=args.batch_size, seed=args.seed, max_sequence_length=args.max_tokens)
    print(f"synthetic image-caption pairs (latents + caption embeddings): {out}; use it as `data:` in a recipe")


def cmd_ops(args) -> None:
    from ditgraft.operators.table import format_ops_table, ops_table

    rows = ops_table(args.dim, args.tokens, args.heads)
    print(format_ops_table(rows, args.dim, args.tokens))


def cmd_bench(args) -> None:
    from ditgraft.bench.common import run_bench

    run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ditgraft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help_):
        s = sub.add_parser(name, help=help_)
        s.set_defaults(fn=fn)
        return s

    s = add("demo", cmd_demo, "graft the shipped testbed teacher: 50% attention -> Hyena-X, both stages, report")
    s.add_argument("--run-dir", default=None, help="default runs/demo")
    s.add_argument("--device", default=None)
    s.add_argument("--quiet", action="store_true")

    s = add("graft", cmd_graft, "run a grafting recipe")
    s.add_argument("recipe", help="a recipe .yaml path or a bundled recipe name (see `ditgraft recipes`)")
    s.add_argument("--run-dir", default=None, help="default runs/<recipe name>")
    s.add_argument("--stages", default=None, help="comma list of stage1,stage2,eval,report (default all)")
    s.add_argument("--device", default=None, help="overrides the recipe's device")
    s.add_argument("--quiet", action="store_true")

    add("recipes", cmd_recipes, "list bundled recipes")

    s = add("pretrain", cmd_pretrain, "train a DiT from scratch (how the testbed teacher was made)")
    s.add_argument("--model", default="testbed", help="size name, e.g. testbed, DiT-S/4 (default testbed)")
    s.add_argument("--data", default="mnist5k", help="mnist5k, an image folder, or latents .npy/.npz")
    s.add_argument("--run-dir", default="runs/pretrain")
    s.add_argument("--steps", type=int, default=4000)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--lr", type=float, default=5e-4)
    s.add_argument("--warmup", type=int, default=200)
    s.add_argument("--decay-steps", type=int, default=0,
                   help="decay the LR linearly to 0 over the last N steps (default 0: constant after warmup)")
    s.add_argument("--ema", type=float, default=0.999)
    s.add_argument("--grad-clip", type=float, default=1.0)
    s.add_argument("--ckpt-every", type=int, default=250)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")

    def sampling_args(s, num=100):
        s.add_argument("--num-samples", type=int, default=num)
        s.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
        s.add_argument("--steps", type=int, default=25)
        s.add_argument("--cfg", type=float, default=1.5)
        s.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                       help="clip predicted x0 to [-1, 1] (pixel models; use --no-clip for latents)")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--batch-size", type=int, default=100)
        s.add_argument("--device", default="auto")

    s = add("sample", cmd_sample, "class-conditional samples: samples.png + samples.npz (ADM layout)")
    s.add_argument("model", help="testbed, a .safetensors/.pt file, hf://..., or a run directory")
    s.add_argument("--out", default="runs/samples")
    sampling_args(s)

    s = add("synth", cmd_synth, "synthetic data from a teacher (class-conditional samples with labels, or "
                                 "image-caption pairs from a text-to-image pipeline with --prompts)")
    s.add_argument("model", help="a class-conditional model, or with --prompts a diffusers pipeline (PixArt)")
    s.add_argument("--out", default="runs/synth.npz")
    s.add_argument("--prompts", default=None,
                   help="text file, one prompt per line: caption latents + embeddings (cycled to --num-samples)")
    s.add_argument("--max-tokens", type=int, default=300, help="caption tokens with --prompts (PixArt-Sigma: 300)")
    sampling_args(s, num=1000)

    s = add("eval", cmd_eval, "metrics of a sample .npz, or run the testbed protocol on a model")
    s.add_argument("target", nargs="?", default="testbed", help="samples .npz, or a model (default testbed)")
    s.add_argument("--features", default="testbed", choices=["testbed", "inception"])
    s.add_argument("--ref", default=None, help="ADM reference batch .npz (inception features)")
    s.add_argument("--inception-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (or env DITGRAFT_INCEPTION_WEIGHTS)")
    s.add_argument("--floor", action="store_true", help="the real-data floor: validation digits vs training")
    s.add_argument("--cfg", type=float, default=None, help="protocol cfg scale (default 1.5)")
    s.add_argument("--num-samples", type=int, default=500)
    s.add_argument("--seed", type=int, default=0, help="protocol seed (default 0); others show the sampling spread")
    s.add_argument("--out", default=None)
    s.add_argument("--device", default="auto")

    s = add("analyze", cmd_analyze, "attention locality and activation statistics per layer")
    s.add_argument("model")
    s.add_argument("--num-samples", type=int, default=250)
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--cfg", type=float, default=1.5)
    s.add_argument("--band-k", type=int, default=None, help="default N/8 (32 at N=256)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="runs/analysis")
    s.add_argument("--device", default="auto")

    s = add("ops", cmd_ops, "operator table: params and FLOPs per operator")
    s.add_argument("--dim", type=int, default=1152)
    s.add_argument("--tokens", type=int, default=256)
    s.add_argument("--heads", type=int, default=16)

    s = add("bench", cmd_bench, "benchmarks: `bench ops` or `bench model`")
    from ditgraft.bench.common import add_bench_arguments

    add_bench_arguments(s)
    return p


def _init_distributed() -> None:
    """Under torchrun (WORLD_SIZE > 1) join the process group: nccl with CUDA, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _init_distributed()
    try:
        args.fn(args)
    except (ValueError, KeyError, FileNotFoundError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"ditgraft {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
