"""The ``ditgraft`` command: parse arguments, call one pipeline function, print where the results went.

    ditgraft demo                      graft the shipped testbed teacher (50% attention -> Hyena-X), evaluate, report
    ditgraft graft RECIPE              run a recipe (stage 1 -> stage 2 -> eval -> report) in a run directory
    ditgraft pretrain                  train a DiT or MMDiT from scratch (how the testbed teachers were made)
    ditgraft sample MODEL              class-conditional samples: PNG grid + ADM .npz (latent models: --vae)
    ditgraft encode IMAGE_DIR --vae V  SD-VAE latents of an image folder (the data file of latent recipes)
    ditgraft import-release MODEL.pt CONFIG.yaml   a released grafted DiT-XL/2 as a ditgraft checkpoint
    ditgraft export MODEL --out DIR    a folder diffusers loads without ditgraft (AutoModel, trust_remote_code)
    ditgraft push DIR OWNER/NAME       upload an exported folder to the hub (private unless --public)
    ditgraft eval SAMPLES.npz|MODEL    FID/KID/precision/recall/accuracy (testbed) or Inception metrics
    ditgraft analyze MODEL             attention locality, entropy and activation statistics per layer
    ditgraft synth MODEL               synthetic training data from a teacher (samples + labels; or captions)
    ditgraft ops                       operator table: parameters and FLOPs at (dim, tokens)
    ditgraft bench ops|model|stage1|sample   side-by-side timings (FLOP-bound ratios; eager vs compiled sampling)
    ditgraft recipes                   list the bundled recipes
    ditgraft sweep SWEEP.yaml          a sweep over recipe fields: every point a run directory, one table and plots
    ditgraft search SEARCH.yaml        an operator per layer under a cost budget: cheap signals, exact choice, verify

Exit codes: 0 done; 2 bad input (one line naming the input, the value and what is allowed) or a run directory in
use, or a write that failed for want of space (a full disk or quota: what was committed is kept, run the same
command again to resume); 3 training diverged (non-finite loss or gradients; the last finite checkpoint is kept);
130 / 143 interrupted (Ctrl-C / SIGTERM: locks released, run the same command again to resume); 141 the reader of
stdout went away (`ditgraft ... | head`: stopped quietly); 1 an unexpected error (a bug: the traceback is printed,
please report it).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback

import torch

BUG_REPORT = "ditgraft: this is a bug, not a problem with your input; please report it with the traceback above"


def _device(args):
    """The --device (``resolve_device``: under torchrun with CUDA each rank takes its own GPU, LOCAL_RANK)."""
    from ditgraft.utils import resolve_device

    return resolve_device(getattr(args, "device", None), "--device")


def _load_model(source: str, device):
    from ditgraft.graft.surgery import load_any
    from ditgraft.models.checkpoints import require_finite

    model, meta = load_any(source, map_location="cpu")
    require_finite(model, source)
    return model.to(device).eval(), meta


from ditgraft.argtypes import add_device, finite_float, nonneg_int, positive_int, seed_int  # noqa: E402,F401


def cmd_pretrain(args) -> None:
    from ditgraft.train.loop import LoopConfig
    from ditgraft.train.pretrain import PretrainConfig, pretrain

    loop = LoopConfig.from_settings(args, warmup_steps=args.warmup, ema_decay=args.ema)
    from ditgraft.distributed import is_main
    from ditgraft.utils import ensure_writable

    device = _device(args)
    ensure_writable(args.run_dir, "--run-dir")
    from ditgraft.train import tracking

    with tracking.session(args.log, args.run_dir):
        out = pretrain(PretrainConfig(model=args.model, data=args.data, loop=loop), args.run_dir, device)
    if is_main():
        print(f"pretrained model (EMA weights): {out}")


def cmd_graft(args) -> None:
    from ditgraft.distributed import is_main
    from ditgraft.graft.pipeline import STAGES, run_graft
    from ditgraft.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    run_dir = args.run_dir or os.path.join("runs", recipe.name)
    stages = tuple(args.stages.split(",")) if args.stages else STAGES
    main = is_main()  # under torchrun rank 0 alone prints (and writes)
    from ditgraft.train import tracking

    with tracking.session(args.log or recipe.log, run_dir):
        report = run_graft(recipe, run_dir, stages=stages, device=args.device, progress=not args.quiet and main,
                           log=print if main else lambda *_: None)
        tracking.log_results(report, run_dir)
    if main:
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


def cmd_sweep(args) -> None:
    from ditgraft.explore.spec import load_sweeps
    from ditgraft.explore.sweep import default_dir, format_status, run_sweep, sweep_status
    from ditgraft.explore.table import write_table

    sweeps = load_sweeps(args.sweep)
    folder = os.path.isdir(args.sweep)
    for sweep in sweeps:  # a folder of sweep files: one after the other, each in OUT/<its name>
        out = (os.path.join(args.out, sweep.name) if folder else args.out) if args.out else default_dir(sweep)
        if folder:
            print(f"== sweep {sweep.name} ({out})")
        if args.status:
            print(format_status(sweep_status(sweep, out)))
            continue
        if args.table:
            if not os.path.exists(os.path.join(out, "points.json")):
                raise FileNotFoundError(f"{out}: no sweep directory (points.json); run `ditgraft sweep {args.sweep}` "
                                        "first")
            write_table(out)
        else:
            scheduler = {k: v for k, v in (("timeout_min", args.timeout_min), ("slurm_partition", args.partition))
                         if v is not None}
            run_sweep(sweep, out, jobs=args.jobs, launcher=args.launcher, device=args.device, threads=args.threads,
                      gpus=args.gpus_per_point, cluster=args.cluster, scheduler=scheduler)
        print(f"table: {os.path.join(out, 'results.md')}")


def cmd_search(args) -> None:
    from ditgraft.explore.search import run_search

    run_search(args.search, args.out, jobs=args.jobs, device=args.device, threads=args.threads)


def cmd_demo(args) -> None:
    args.recipe = "testbed_hyena_x_50"
    args.run_dir = args.run_dir or os.path.join("runs", "demo")
    args.stages = None
    cmd_graft(args)


def cmd_recipes(args) -> None:
    import yaml

    from ditgraft.recipe import bundled_recipes, load_recipe

    if args.show:
        from ditgraft.graft.plan import recipe_stage2_memory

        recipe = load_recipe(args.show)
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        line = recipe_stage2_memory(recipe, args.gpus)
        if line:
            print("# " + line)
        return
    for name in bundled_recipes():
        r = load_recipe(name)
        print(f"{name:32s} {r.description.splitlines()[0] if r.description else ''}")


def cmd_sample(args) -> None:
    from ditgraft.diffusion.samplers import SamplingConfig
    from ditgraft.eval.sampling import decoding
    from ditgraft.utils import check_output_kind, ensure_writable, run_lock

    device = _device(args)
    model, _ = _load_model(args.model, device)
    if args.fuse_units:
        from ditgraft.graft.restructure import fuse_parallel_units

        if not fuse_parallel_units(model):
            raise ValueError(f"--fuse-units: model {args.model!r} has no parallel unit of two DiT blocks to fuse "
                             "(only a restructured model's units, `restructure: parallel_pairs` in a recipe, fuse)")
    clip, decode = decoding(model, args.vae or None, clip=args.clip, device=device, option="--vae")
    cfg = SamplingConfig(sampler=_sampler(args, model), steps=args.steps, cfg_scale=args.cfg, clip_denoised=clip)
    args.out = args.out or _model_dir("samples", args.model, model)
    outputs = [(args.out, "--out")] + ([(args.png_dir, "--png-dir")] if args.png_dir else [])
    for path, option in outputs:
        check_output_kind(path, option)
    for path, option in outputs:
        ensure_writable(path, option)
    with run_lock(args.out, "ditgraft sample"):
        _sample(args, model, cfg, device, decode)


def _sampler(args, model) -> str:
    """--sampler, or the model's objective's default; refused when it does not sample the model's objective."""
    from ditgraft.diffusion.samplers import check_sampler, default_sampler

    sampler = args.sampler or default_sampler(model)
    check_sampler(model, sampler, "--sampler")
    return sampler


def _sample(args, model, cfg, device, decode) -> None:
    from ditgraft.distributed import rank_world
    from ditgraft.eval.adm import save_samples_npz
    from ditgraft.eval.sampling import gather_samples, generate, save_grid, save_pngs

    rank, world = rank_world()
    images, labels = generate(model, args.num_samples, cfg, seed=args.seed, batch_size=args.batch_size, device=device,
                              rank=rank, world=world, decode=decode, progress=rank == 0, captions=args.captions)
    gathered = gather_samples(args.out, images, labels, args.batch_size)
    if gathered is None:  # not rank 0: rank 0 writes the files
        return
    images, labels = gathered
    path = save_samples_npz(os.path.join(args.out, "samples.npz"), images, labels)
    order = labels[:100].argsort(kind="stable")
    save_grid(os.path.join(args.out, "samples.png"), images[:100][order])
    print(f"{len(images)} samples: {path} and {os.path.join(args.out, 'samples.png')}")
    if args.png_dir:
        save_pngs(args.png_dir, images, labels)
        print(f"{len(images)} PNGs in {args.png_dir}")


def cmd_encode(args) -> None:
    from ditgraft.data.vae import encode_folder, load_vae
    from ditgraft.distributed import rank_world

    device = _device(args)
    rank, world = rank_world()
    vae = load_vae(args.vae, device=device)
    out = encode_folder(args.image_dir, vae, args.out, image_size=args.image_size, flip=args.flip,
                        batch_size=args.batch_size, seed=args.seed, per_class=args.per_class, rank=rank, world=world,
                        progress=rank == 0)
    if out:
        print(f"latents: {out} (x {0.18215}; keys latents, labels, classes)")


def cmd_import_release(args) -> None:
    from ditgraft.graft.release import import_release

    out = import_release(args.model, args.config, args.out, num_heads=args.num_heads)
    print(f"grafted checkpoint: {out}")


def cmd_export(args) -> None:
    from ditgraft.utils import ensure_empty_folder

    ensure_empty_folder(args.out, "--out", args.overwrite)
    if args.native:  # a plain DiT as diffusers' own DiTTransformer2DModel (no remote code)
        from ditgraft.export.diffusers_pipeline import export_diffusers

        model, _ = _load_model(args.model, "cpu")
        print(f"diffusers pipeline folder: {export_diffusers(model, args.out, vae=args.vae)}")
        return
    from ditgraft.api import export_model

    out = export_model(args.model, args.out, vae=args.vae, run_dir=args.run_dir)
    print(f"exported: {out} (diffusers.AutoModel.from_pretrained({out!r}, trust_remote_code=True); "
          f"model card {os.path.join(out, 'README.md')})")


def cmd_push(args) -> None:
    from ditgraft.export.push import push

    url = push(args.folder, args.repo_id, public=args.public, token=args.token, overwrite=args.overwrite)
    print(f"uploaded {args.folder} to {url} ({'public' if args.public else 'private'})")


def cmd_eval(args) -> None:
    from ditgraft.distributed import is_main
    from ditgraft.eval.evaluate import evaluate_samples, protocol_for, real_data_floor, sample_and_evaluate
    from ditgraft.eval.sampling import is_latent
    from ditgraft.models.families import family_of

    decision = args.seeds is not None or args.against is not None
    if args.floor:
        _refuse_ignored(args, "--floor", ["--features", "--ref", "--inception-weights", "--cfg", "--num-samples",
                                          "--seed", "--out", "--seeds", "--against", "--against-out",
                                          "--target-ratio", "--target-gap", "--resamples", "--overwrite",
                                          "--allow-self", "--compile"])
        result = real_data_floor()
    elif args.target.endswith(".npz"):
        _refuse_ignored(args, "a samples .npz (its metrics only; sample a model to use the protocols)",
                        ["--cfg", "--num-samples", "--seed", "--out", "--seeds", "--against", "--against-out",
                         "--target-ratio", "--target-gap", "--resamples", "--overwrite", "--allow-self", "--compile"]
                        + ([] if args.features == "inception" else ["--ref", "--inception-weights"]))
        result = evaluate_samples(args.target, features=args.features, reference=args.ref,
                                  inception_weights=args.inception_weights, device=_device(args))
    else:
        from ditgraft.utils import ensure_writable, run_lock

        # a model runs the testbed protocol (testbed features); Inception metrics are for a samples .npz
        _refuse_ignored(args, "a model (the testbed protocol; for Inception metrics sample it with `ditgraft "
                              "sample`, then `ditgraft eval SAMPLES.npz --features inception --ref REF.npz`)",
                        ["--features", "--ref", "--inception-weights"] + ([] if decision else ["--resamples"]))
        if args.against is None:
            _refuse_ignored(args, "no --against", ["--against-out", "--target-ratio", "--target-gap",
                                                   "--allow-self"])
        device = _device(args)
        model, _ = _load_model(args.target, device)
        protocol = protocol_for(cfg_scale=args.cfg, model=model, num=args.num_samples or 500, seed=args.seed or 0)
        if is_latent(model):
            raise ValueError(f"{args.target} is a latent model: the testbed protocol does not apply; sample it with "
                             "`ditgraft sample MODEL --vae V`, then `ditgraft eval SAMPLES.npz --features inception`")
        if args.compile:
            family_of(model).require("compile", "--compile")
        fingerprint = _fingerprint(model)
        out = args.out or _eval_dir(args.target, fingerprint)
        _check_eval_out(out, fingerprint, args.target, "--out", args.overwrite)
        if decision:
            return _decision_eval(args, model, fingerprint, out, protocol, device)
        ensure_writable(out, "--out")
        with run_lock(out, "ditgraft eval"):
            # under torchrun: seeds shared out, rank 0 writes
            result = sample_and_evaluate(model, out, protocol, device, compile=args.compile)
        if is_main():
            print(f"samples and metrics in {out}")
    if is_main():
        print(json.dumps(result, indent=2))


def _refuse_ignored(args, mode: str, options: list[str]) -> None:
    """Options that have no effect in a mode are refused by name (never silently ignored)."""
    given = [o for o in options if getattr(args, o[2:].replace("-", "_")) not in (None, False)
             and not (o == "--features" and args.features == "testbed")]
    if given:
        raise ValueError(f"{', '.join(given)}: not used with {mode}; remove "
                         + ("it" if len(given) == 1 else "them"))


def _fingerprint(model) -> str:
    from ditgraft.models.checkpoints import model_fingerprint

    return model_fingerprint(model)


def _eval_dir(source: str, fingerprint: str, kind: str = "eval") -> str:
    """runs/KIND/NAME-HASH: two models of the same file name never share a folder."""
    return os.path.join("runs", kind, os.path.basename(source.rstrip("/")).split(".")[0] + "-" + fingerprint[:10])


def _model_dir(kind: str, source: str, model) -> str:
    return _eval_dir(source, _fingerprint(model), kind)


def _check_eval_out(out: str, fingerprint: str, source: str, option: str, overwrite: bool) -> None:
    from ditgraft.eval.evaluate import other_model_results

    from ditgraft.eval.evaluate import read_metrics

    other = other_model_results(out, fingerprint)
    if other is not None and not overwrite:
        whose = ("results that name no model (written before results were keyed by the weights' hash)"
                 if read_metrics(other).get("model_sha256") is None else "the results of another model")
        raise ValueError(f"{option}={out!r} holds {whose} ({other}), not of {source}; choose another folder, or "
                         "pass --overwrite to replace them")


def _decision_eval(args, model, fingerprint: str, out: str, protocol, device) -> None:
    from ditgraft.eval.decision import DEFAULT_SEEDS, DEFAULT_RESAMPLES, Targets, decision_eval, format_decision
    from ditgraft.models.families import family_of
    from ditgraft.utils import ensure_writable, run_lock

    seeds = DEFAULT_SEEDS if args.seeds is None else _int_list(args.seeds, "--seeds")
    against = against_dir = None
    ensure_writable(out, "--out")
    if args.against is not None:
        against, _ = _load_model(args.against, device)
        if args.compile:
            family_of(against).require("compile", "--compile (the --against model)")
        a_fingerprint = _fingerprint(against)
        if a_fingerprint == fingerprint and not args.allow_self:
            raise ValueError(f"--against={args.against!r} is the same model as {args.target!r} (same weights, "
                             f"sha256 {fingerprint[:12]}): the ratio would be 1 by construction; pass --allow-self "
                             "to compare a model with itself")
        against_dir = args.against_out or _eval_dir(args.against, a_fingerprint)
        if os.path.abspath(against_dir) == os.path.abspath(out) and a_fingerprint != fingerprint:
            raise ValueError(f"--against-out={against_dir!r} is the model's --out too; the two models need "
                             "separate folders")
        _check_eval_out(against_dir, a_fingerprint, args.against, "--against-out", args.overwrite)
        ensure_writable(against_dir, "--against-out")
    targets = Targets(1.25 if args.target_ratio is None else args.target_ratio,
                      0.02 if args.target_gap is None else args.target_gap)
    with run_lock(out, "ditgraft eval"):
        result = decision_eval(model, out, seeds, protocol, against, against_dir, targets=targets,
                               resamples=args.resamples or DEFAULT_RESAMPLES, device=device,
                               hooks={"compile": True} if args.compile else None)
    print(format_decision(result, os.path.basename(args.target), os.path.basename(args.against or "baseline")))
    print(f"samples in {out}" + (f" and {against_dir}" if against_dir else "")
          + f"; decision in {os.path.join(out, 'samples_decision.json')}")


def _int_list(text: str, name: str) -> list[int]:
    from ditgraft.utils import check_seed

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    for v in values:
        check_seed(v, name)
    return values


def cmd_analyze(args) -> None:
    from ditgraft.analysis.locality import analyze_model, write_analysis_report

    from ditgraft.utils import ensure_writable

    device = _device(args)
    model, _ = _load_model(args.model, device)
    args.out = args.out or _model_dir("analysis", args.model, model)
    ensure_writable(args.out, "--out")
    result = analyze_model(model, num_samples=args.num_samples, steps=args.steps, cfg_scale=args.cfg,
                           band_k=args.band_k, seed=args.seed, device=device, progress=True)
    files = write_analysis_report(result, args.out)
    print(f"local layers (band-k > 50%): {result['local_layers']}; non-local: {result['nonlocal_layers']}")
    print("written: " + ", ".join(files.values()))


def cmd_synth(args) -> None:
    if args.prompts:
        return _synth_captions(args)

    from ditgraft.diffusion.samplers import SamplingConfig
    from ditgraft.eval.sampling import decoding
    from ditgraft.utils import run_lock

    device = _device(args)
    model, _ = _load_model(args.model, device)
    clip, _ = decoding(model, clip=args.clip, need_decoder=False)  # raw latents: no decoder
    cfg = SamplingConfig(sampler=_sampler(args, model), steps=args.steps, cfg_scale=args.cfg, clip_denoised=clip)
    out = _npz_out(args.out)
    with run_lock(out, "ditgraft synth"):
        _synth(args, model, cfg, device, out)


def _npz_out(path: str) -> str:
    """The synth output file (``.npz`` added when missing); a folder (existing, or ending in '/') is refused."""
    from ditgraft.utils import ensure_writable

    ensure_writable(path, "--out", folder=False)
    out = path if path.endswith(".npz") else path + ".npz"
    ensure_writable(out, "--out", folder=False)
    return out


def _synth(args, model, cfg, device, out: str) -> None:
    from ditgraft.data.latents import save_latents
    from ditgraft.eval.sampling import generate

    latents, labels = generate(model, args.num_samples, cfg, seed=args.seed, batch_size=args.batch_size,
                               device=device, raw=True)
    save_latents(out, latents, labels)
    print(f"{args.num_samples} synthetic samples (model space, with labels): {out}; use it as `data:` in a recipe")


def _synth_captions(args) -> None:
    from ditgraft.data.captions import load_t2i_pipeline, read_prompts, synth_captions
    from ditgraft.utils import run_lock

    prompts = read_prompts(args.prompts)
    out = _npz_out(args.out)
    with run_lock(out, "ditgraft synth"):
        pipe = load_t2i_pipeline(args.model, _device(args))
        synth_captions(pipe, prompts, out, num_samples=args.num_samples, steps=args.steps, guidance_scale=args.cfg,
                       batch_size=args.batch_size, seed=args.seed, max_sequence_length=args.max_tokens,
                       height=args.height, width=args.width, num_frames=args.frames)
    print(f"synthetic image-caption pairs (latents + caption embeddings): {out}; use it as `data:` in a recipe")


def cmd_ops(args) -> None:
    from ditgraft.bench.common import DTYPES
    from ditgraft.operators.table import format_ops_table, ops_table

    # the paths of a device that need not be here: only the default (auto) asks this machine
    device = args.device if args.device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
    rows = ops_table(args.dim, args.tokens, args.heads, device=device, dtype=DTYPES[args.dtype])
    print(format_ops_table(rows, args.dim, args.tokens))


def cmd_bench(args) -> None:
    from ditgraft.bench.cli import run_bench

    run_bench(args)


class _Parser(argparse.ArgumentParser):
    """argparse, with bad command-line input reported in one line (the option, its value, what is allowed) instead
    of the usage block followed by that line; ``--help`` still shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ditgraft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_, arguments, aliases in COMMANDS:
        s = sub.add_parser(name, help=help_, aliases=list(aliases))
        s.set_defaults(fn=globals()["cmd_" + name.replace("-", "_")])
        arguments(s)
    return p


def _tracker(s, default: str) -> None:
    from ditgraft.train.tracking import TRACKERS

    s.add_argument("--log", choices=TRACKERS, default=None, help=f"experiment tracker (default {default})")


def _demo_args(s) -> None:
    s.add_argument("--run-dir", default=None, help="default runs/demo")
    add_device(s, unset="the recipe's device")
    s.add_argument("--quiet", action="store_true")
    _tracker(s, "the recipe's log")


def _graft_args(s) -> None:
    from ditgraft.graft.pipeline import STAGES

    s.add_argument("recipe", help="a recipe .yaml path or a bundled recipe name (see `ditgraft recipes`)")
    s.add_argument("--run-dir", default=None, help="default runs/<recipe name>")
    s.add_argument("--stages", default=None, help=f"comma list of {','.join(STAGES)} (default all)")
    add_device(s, unset="the recipe's device")
    s.add_argument("--quiet", action="store_true")
    _tracker(s, "the recipe's log")


def _sweep_args(s) -> None:
    from ditgraft.explore.launchers import CLUSTERS, LAUNCHERS

    s.add_argument("sweep", help="the sweep .yaml (base recipe, grid / zip / points, baseline), or a folder of them "
                                 "(run in name order, e.g. the study's tables)")
    s.add_argument("--out", default=None, help="the sweep directory (default sweeps/<sweep name>; for a folder: "
                                               "the parent of one directory per sweep)")
    s.add_argument("--jobs", type=positive_int, default=1,
                   help="local launcher: points run at once; the CPU threads are split between them (default 1)")
    s.add_argument("--launcher", default="local", choices=LAUNCHERS,
                   help="local processes, or submitit (Slurm, or --cluster local)")
    s.add_argument("--cluster", default=None, choices=CLUSTERS,
                   help="submitit's executor (default: Slurm where it exists)")
    s.add_argument("--gpus-per-point", type=nonneg_int, default=0, help="GPUs per point (> 1: a torchrun job)")
    s.add_argument("--partition", default=None, help="submitit: the Slurm partition")
    s.add_argument("--timeout-min", type=positive_int, default=None, help="submitit: time limit per point")
    add_device(s, unset="the recipes' device")
    s.add_argument("--status", action="store_true", help="print every point's state and exit")
    s.add_argument("--table", action="store_true", help="rebuild the table and plots from the directory only")


def _search_args(s) -> None:
    s.add_argument("search", help="the search .yaml (base recipe, slot, candidates, budget, verify)")
    s.add_argument("--out", default=None, help="the search directory (default searches/<search name>)")
    s.add_argument("--jobs", type=positive_int, default=1, help="verified designs run at once (local processes)")
    add_device(s, unset="the recipes' device")


def _recipes_args(s) -> None:
    s.add_argument("--show", metavar="RECIPE", default=None, help="print this recipe (name or path), resolved")
    s.add_argument("--gpus", type=positive_int, default=8, help="GPUs for the --show memory estimate (default 8)")


def _pretrain_args(s) -> None:
    from ditgraft.train.loop import PRECISIONS

    _tracker(s, "none")
    s.add_argument("--model", default="testbed",
                   help="size name, e.g. testbed, DiT-S/4, flowbed (the MMDiT, rectified flow; default testbed)")
    s.add_argument("--data", default="mnist5k", help="mnist5k, an image folder, or latents .npy/.npz")
    s.add_argument("--run-dir", default="runs/pretrain")
    s.add_argument("--steps", type=positive_int, default=4000)
    s.add_argument("--batch-size", type=positive_int, default=128)
    s.add_argument("--lr", type=finite_float(0, low_open=True), default=5e-4)
    s.add_argument("--warmup", type=nonneg_int, default=200)
    s.add_argument("--decay-steps", type=nonneg_int, default=0,
                   help="decay the LR linearly to 0 over the last N steps (default 0: constant after warmup)")
    s.add_argument("--ema", type=finite_float(0, 1, high_open=True), default=0.999)
    s.add_argument("--grad-clip", type=finite_float(0, low_open=True), default=1.0)
    s.add_argument("--ckpt-every", type=positive_int, default=250)
    s.add_argument("--seed", type=seed_int, default=0)
    add_device(s)
    s.add_argument("--precision", default="fp32", choices=PRECISIONS, help="bf16: autocast, CUDA only")
    s.add_argument("--grad-accum-steps", type=positive_int, default=1, help="micro-batches per step (default 1)")
    s.add_argument("--activation-checkpointing", action="store_true", help="recompute DiT blocks in backward")


def _sampling_args(s, num: int = 100) -> None:
    from ditgraft.diffusion.samplers import SAMPLERS

    s.add_argument("--num-samples", type=positive_int, default=num)
    s.add_argument("--sampler", default=None, choices=SAMPLERS,
                   help="default: the model's objective's (euler for flow matching: SD3, Flux, Wan; else ddim)")
    s.add_argument("--steps", type=positive_int, default=25)
    s.add_argument("--cfg", type=finite_float(1), default=1.5, help="guidance scale (1 = none)")
    s.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="clip predicted x0 to [-1, 1] (default: on for pixel models, off for latents)")
    s.add_argument("--seed", type=seed_int, default=0)
    s.add_argument("--batch-size", type=positive_int, default=100)
    add_device(s)


def _sample_args(s) -> None:
    s.add_argument("model", help="testbed, a .safetensors/.pt file, hf://..., or a run directory")
    s.add_argument("--out", default=None, help="default runs/samples/NAME-HASH (HASH: of the model's weights)")
    s.add_argument("--vae", default=None, help="latent models: AutoencoderKL folder or hub id that decodes samples")
    s.add_argument("--png-dir", default=None, help="also write one PNG per sample here (torch-fidelity, clean-fid)")
    s.add_argument("--fuse-units", action="store_true",
                   help="restructured models: run each parallel unit's two blocks as one fused block (the same "
                        "model up to rounding; faster where one block does not fill a GPU)")
    s.add_argument("--captions", default=None, help="caption-conditioned models (PixArt, SD3, Flux, Wan): the caption "
                                                   ".npz whose caption i %% n conditions sample i")
    _sampling_args(s)


def _encode_args(s) -> None:
    s.add_argument("image_dir", help="images: <dir>/<class>/<image> (ImageNet layout) or a flat folder")
    s.add_argument("--vae", required=True, help="AutoencoderKL folder or hub id, e.g. stabilityai/sd-vae-ft-ema")
    s.add_argument("--out", required=True, help="the latents .npz to write")
    s.add_argument("--image-size", type=positive_int, default=256, help="centre-crop size in pixels (default 256)")
    s.add_argument("--flip", action="store_true", help="also store the horizontally flipped copy of each image")
    s.add_argument("--per-class", type=positive_int, default=None,
                   help="only the first N images of every class (file-name order), e.g. 130 = 10%% of ImageNet")
    s.add_argument("--batch-size", type=positive_int, default=32)
    s.add_argument("--seed", type=seed_int, default=0, help="seed of the posterior draws")
    add_device(s)


def _import_release_args(s) -> None:
    s.add_argument("model", help="the release's model.pt ({'ema': state_dict})")
    s.add_argument("config", help="the release's YAML (operator: {type, name}, sample_config.graft_indexes)")
    s.add_argument("--out", required=True, help="the grafted .safetensors to write")
    s.add_argument("--num-heads", type=positive_int, default=None,
                   help="attention heads (default: from sample_config.dit_model_name, e.g. 16 for DiT-XL/2)")


def _export_args(s) -> None:
    s.add_argument("model", help="testbed, .safetensors (plain or grafted), .pt, a run directory, a diffusers folder")
    s.add_argument("--out", required=True, help="the folder to write (config.json, modeling_ditgraft.py, weights, "
                                                "README.md; DiT: scheduler/, vae/)")
    s.add_argument("--vae", default=None, help="AutoencoderKL folder or hub id to include as vae/ (DiT)")
    s.add_argument("--run-dir", default=None, help="the run whose report the model card quotes (default: the "
                                                   "model's run directory, when it has a report.json)")
    s.add_argument("--native", action="store_true", help="a plain DiT as diffusers' own DiTTransformer2DModel "
                                                        "(no remote code; timestep features as diffusers computes)")
    s.add_argument("--overwrite", action="store_true", help="replace the content of a non-empty --out")


def _push_args(s) -> None:
    s.add_argument("folder", help="a folder written by `ditgraft export`")
    s.add_argument("repo_id", help="owner/name")
    s.add_argument("--public", action="store_true", help="publish (default: a private repository)")
    s.add_argument("--token", default=None, help="hub token (default: HF_TOKEN or the saved login)")
    s.add_argument("--overwrite", action="store_true", help="upload into a repository that has other files")


def _synth_args(s) -> None:
    s.add_argument("model", help="a class-conditional model, or with --prompts a diffusers pipeline (PixArt, SD3, "
                                 "Flux, Wan)")
    s.add_argument("--out", default="runs/synth.npz")
    s.add_argument("--prompts", default=None,
                   help="text file, one prompt per line: caption latents + embeddings (cycled to --num-samples)")
    s.add_argument("--max-tokens", type=positive_int, default=None,
                   help="caption tokens with --prompts (default the pipeline's: PixArt-Sigma 300, SD3 256, Flux and "
                        "Wan 512)")
    s.add_argument("--height", type=positive_int, default=None, help="with --prompts: pixels (default the pipeline's)")
    s.add_argument("--width", type=positive_int, default=None, help="with --prompts: pixels (default the pipeline's)")
    s.add_argument("--frames", type=positive_int, default=None, help="with --prompts, Wan: video frames (default 81)")
    _sampling_args(s, num=1000)


def _eval_args(s) -> None:
    from ditgraft.eval.evaluate import FEATURES

    s.add_argument("target", nargs="?", default="testbed", help="samples .npz, or a model (default testbed)")
    s.add_argument("--features", default="testbed", choices=FEATURES)
    s.add_argument("--ref", default=None, help="ADM reference batch .npz (inception features)")
    s.add_argument("--inception-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (or env DITGRAFT_INCEPTION_WEIGHTS)")
    s.add_argument("--floor", action="store_true", help="the real-data floor: validation digits vs training")
    s.add_argument("--cfg", type=finite_float(1), default=None, help="protocol cfg scale (default 1.5)")
    s.add_argument("--num-samples", type=positive_int, default=None, help="protocol samples (default 500)")
    s.add_argument("--seed", type=seed_int, default=None,
                   help="protocol seed (default 0); others show the sampling spread")
    s.add_argument("--out", default=None, help="default runs/eval/NAME-HASH (HASH: of the model's weights)")
    s.add_argument("--overwrite", action="store_true", help="replace another model's results found in --out")
    add_device(s)
    s.add_argument("--seeds", default=None,
                   help="decision protocol: comma list of seeds pooled, e.g. 0,1,2 (default 0,1,2 with --against)")
    s.add_argument("--against", default=None,
                   help="decision protocol: baseline model sampled at the same seeds (e.g. testbed): FID ratio "
                        "and accuracy gap with paired bootstrap intervals")
    s.add_argument("--against-out", default=None,
                   help="where the baseline's samples go (default runs/eval/NAME-HASH)")
    s.add_argument("--allow-self", action="store_true", help="allow --against to be the same model (by weights)")
    s.add_argument("--target-ratio", type=finite_float(0, low_open=True), default=None,
                   help="verdict target for the FID ratio (<=; default 1.25)")
    s.add_argument("--target-gap", type=finite_float(), default=None,
                   help="verdict target for the accuracy gap (<=; default 0.02)")
    s.add_argument("--resamples", type=positive_int, default=None, help="bootstrap resamples (default 500)")
    s.add_argument("--compile", action="store_true",
                   help="sample through the model family's compiled forward (torch.compile): the first batch pays "
                        "the compile once (tens of seconds on a CPU), every later batch and seed reuses it; samples "
                        "equal the eager ones to float rounding, so cached results are reused either way")


def _analyze_args(s) -> None:
    s.add_argument("model")
    s.add_argument("--num-samples", type=positive_int, default=250)
    s.add_argument("--steps", type=positive_int, default=50)
    s.add_argument("--cfg", type=finite_float(1), default=1.5)
    s.add_argument("--band-k", type=positive_int, default=None, help="default N/8 (32 at N=256)")
    s.add_argument("--seed", type=seed_int, default=0)
    s.add_argument("--out", default=None, help="default runs/analysis/NAME-HASH (HASH: of the model's weights)")
    add_device(s)


def _ops_args(s) -> None:
    s.add_argument("--dim", type=positive_int, default=1152)
    s.add_argument("--tokens", type=positive_int, default=256)
    s.add_argument("--heads", type=positive_int, default=16)
    s.add_argument("--device", default=None,
                   help="the device whose paths the 'path' column shows, e.g. cuda (it need not be present); "
                        "default auto: cuda if available, else cpu")
    s.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="dtype of those paths (default fp32)")


def _bench_args(s) -> None:
    from ditgraft.bench.cli import add_bench_arguments

    add_bench_arguments(s)


# (name, help, arguments, aliases): the sub-commands, in `ditgraft --help` order; each runs cmd_<name>
COMMANDS = (
    ("demo", "graft the shipped testbed teacher: 50%% attention -> Hyena-X, both stages, report",
     _demo_args, ()),
    ("graft", "run a grafting recipe", _graft_args, ()),
    ("sweep", "run a sweep: a base recipe and axes over its fields; one table and plots", _sweep_args, ()),
    ("search", "choose an operator per layer under a FLOP or latency budget, then verify the best designs as a "
               "sweep", _search_args, ()),
    ("recipes", "list the bundled recipes, or print one resolved (its base merged in) with its expected stage-2 "
                "memory per GPU", _recipes_args, ()),
    ("pretrain", "train a DiT or MMDiT from scratch (how the testbed teachers were made)", _pretrain_args, ()),
    ("sample", "class-conditional samples: samples.png + samples.npz (ADM layout)", _sample_args, ()),
    ("encode", "SD-VAE latents of an image folder (class subfolders -> labels)", _encode_args, ()),
    ("import-release", "a released grafted DiT-XL/2 (model.pt + YAML) -> ditgraft checkpoint",
     _import_release_args, ()),
    ("export", "a folder that diffusers loads without ditgraft (any model ditgraft loads)",
     _export_args, ("export-diffusers",)),
    ("push", "upload an exported folder to the Hugging Face hub (create_repo + upload_folder)",
     _push_args, ()),
    ("synth", "synthetic data from a teacher (class-conditional samples with labels, or image-caption pairs "
              "from a text-to-image pipeline with --prompts)", _synth_args, ()),
    ("eval", "metrics of a sample .npz, or run the testbed protocol on a model", _eval_args, ()),
    ("analyze", "attention locality and activation statistics per layer", _analyze_args, ()),
    ("ops", "operator table: params and FLOPs per operator", _ops_args, ()),
    ("bench", "benchmarks: `bench ops`, `bench model`, `bench stage1` or `bench sample`", _bench_args, ()),
)

def _init_distributed() -> None:
    """Under torchrun (WORLD_SIZE > 1) join the process group: nccl with CUDA (each rank on GPU LOCAL_RANK, which
    'cuda' then means), gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            if torch.cuda.is_available():
                from ditgraft.utils import resolve_device

                resolve_device("cuda")  # makes this rank's GPU, cuda:LOCAL_RANK, the current device
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


from ditgraft.utils import EXPECTED_ERRORS  # noqa: E402


_WRITE_FAILED = ("os error 28", "os error 27", "os error 122", "No space left", "File too large", "Disk quota",
                 "StorageFull", "file write failed", "failed writing file", "unexpected pos")


def _write_failure(err: BaseException) -> str | None:
    """What a full disk (or quota, or file-size limit) looks like from the writers ditgraft uses: an OSError with
    ENOSPC/EDQUOT/EFBIG, safetensors' SafetensorError and torch.save's RuntimeError carrying the same in their text."""
    import errno

    seen, where = set(), None
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        where = where or getattr(err, "written_path", None)  # utils.writing: the file or checkpoint being written
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            where = where or err.filename
            return f"{where + ': ' if where else ''}{err.strerror}"
        text = str(err)
        if not isinstance(err, (ValueError, KeyError)) and any(t in text for t in _WRITE_FAILED):
            text = text.strip().splitlines()[0][:200] if text.strip() else type(err).__name__
            return f"{where + ': ' if where else ''}{text}"
        err = err.__cause__ or err.__context__
    return None


def _terminate(signum, _frame):
    raise SystemExit(128 + signum)  # unwinds like an error: locks are released, temporaries removed


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help (0) or a bad option value (2, already printed with the allowed values)
        return int(done.code or 0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    from ditgraft.train.loop import TrainingDiverged

    try:
        _init_distributed()
        args.fn(args)
    except TrainingDiverged as err:
        print(f"ditgraft {args.command}: error: {err}", file=sys.stderr)
        return 3
    except EXPECTED_ERRORS as err:
        from ditgraft.utils import input_error_message

        print(f"ditgraft {args.command}: error: {input_error_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ditgraft {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`ditgraft ... | head`): stop quietly, as SIGPIPE would
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 141
    except Exception as err:
        failed = _write_failure(err)
        if failed is not None:
            print(f"ditgraft {args.command}: error: a write failed: {failed} (the disk or quota is full, or a file "
                  "size limit was hit); what was committed is kept: free space and run the same command again to "
                  "resume", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(BUG_REPORT, file=sys.stderr)
        return 1
    finally:
        _leave_distributed()
    return 0


def _leave_distributed() -> None:
    """Leave the process group before the interpreter exits: a gloo group torn down at exit can abort the process
    ("terminate called without an active exception") after its work is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
