"""The run report: report.md (tables a person reads), report.json (the same numbers), loss-curve PNGs."""
from __future__ import annotations

import datetime
import json
import os
import platform

import torch

from ditgraft.utils import atomic_path, atomic_write_json, atomic_write_text, read_json


def _history(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(run_dir: str) -> dict[str, str]:
    """stage1_curves.png (validation MSE per operator) and stage2_loss.png, when those stages ran."""
    from matplotlib.figure import Figure

    out = {}
    s1 = _history(os.path.join(run_dir, "stage1", "loop", "metrics.jsonl"))
    evals = [r for r in s1 if any(k.startswith("eval/") for k in r)]
    if evals:
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        for key in sorted({k for r in evals for k in r if k.startswith("eval/")}):
            pts = [(r["step"], r[key]) for r in evals if key in r]
            ax.plot(*zip(*pts), marker=".", label=key.removeprefix("eval/").removesuffix("_mse"))
        ax.set(xlabel="stage 1 step", ylabel="validation MSE", yscale="log", title="Stage 1: activation distillation")
        ax.legend(fontsize=7, ncol=2)
        out["stage1"] = _save(fig, os.path.join(run_dir, "stage1_curves.png"))
    curves = {name: _history(os.path.join(run_dir, sub, "stage2", "loop", "metrics.jsonl"))
              for name, sub in (("grafted (stage 1 init)", ""), ("random init", "baseline_random"))}
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        for name, rows in curves.items():
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
        ax.set(xlabel="stage 2 step", ylabel="DiT loss (MSE + VLB)", title="Stage 2: finetuning")
        ax.legend()
        out["stage2"] = _save(fig, os.path.join(run_dir, "stage2_loss.png"))
    return out


def _save(fig, path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1e4:
            return f"{v:.3e}"
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.{digits}g}"
    return str(v)


def build_report(recipe, grafts, stage1: dict | None, evals: dict, compute: dict, timings: dict) -> dict:
    """The report's numbers (report.json): the recipe, the resolved grafts, stage 1's summary, the evaluations (each
    with its FID relative to the teacher's, when the teacher was evaluated), the compute accounting and timings.
    The arguments are left unchanged."""
    teacher_fid = evals.get("teacher", {}).get("fid")
    if teacher_fid:
        evals = {name: {**row, "fid_ratio_to_teacher": row["fid"] / teacher_fid} for name, row in evals.items()}
    else:
        evals = {name: dict(row) for name, row in evals.items()}
    return {
        "recipe": recipe.to_dict(),
        "grafts": [dict(slot=g.slot, layer=g.layer, operator=g.operator, loss=g.loss) for g in grafts],
        "stage1": stage1,
        "eval": evals,
        "compute": dict(compute),
        "timings_seconds": dict(timings),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def render_markdown(report: dict, plots: dict[str, str], run_dir: str) -> str:
    """report.md from a ``build_report`` dict: the tables a person reads, the sample grids and the curves."""
    recipe, stage1, evals, timings = report["recipe"], report["stage1"], report["eval"], report["timings_seconds"]
    md = [f"# ditgraft run: {recipe['name']}", ""]
    if recipe["description"]:
        md += [recipe["description"], ""]
    md += [f"Teacher: `{recipe['teacher']['source']}`. Date {report['date']}; torch {report['machine']['torch']}, "
           f"{report['machine']['threads']} threads, {'CUDA' if report['machine']['cuda'] else 'CPU'}.", ""]
    md += ["## Grafts (resolved layers)", "", "| slot | layers | operator | stage-1 loss |", "|---|---|---|---|"]
    by_op: dict[tuple, list[int]] = {}
    for g in report["grafts"]:
        by_op.setdefault((g["slot"], g["operator"], g["loss"]), []).append(g["layer"])
    for (slot, op, loss), layers in by_op.items():
        md.append(f"| {slot} | {', '.join(map(str, layers))} | {op} | {loss} |")
    if stage1:
        md += ["", "## Stage 1: activation distillation (per operator)", "",
               f"{stage1['plan']['samples']} train / {stage1['plan']['val_samples']} validation samples, "
               f"cache: {stage1['plan']['mode']}. Relative MSE = validation MSE / variance of the teacher's output.",
               "", "| slot | layer | operator | loss | best step | val MSE | relative MSE | final train loss |",
               "|---|---|---|---|---|---|---|---|"]
        for s in stage1["operators"].values():
            md.append(f"| {s['slot']} | {s['layer']} | {s['operator']} | {s['loss']} | {s['step']} | "
                      f"{_fmt(s['val_mse'])} | {_fmt(s['val_rel_mse'])} | {_fmt(s['final_train_loss'])} |")
    if evals:
        p = next(iter(evals.values())).get("protocol", {})
        md += ["", "## Evaluation", "",
               f"Protocol: {p.get('num')} samples, {p.get('sampler')} {p.get('steps')} steps, cfg "
               f"{p.get('cfg_scale')}, seed {p.get('seed')}; testbed classifier features vs the training digits.",
               "", "| model | FID | FID / teacher | KID x1000 | precision | recall | class accuracy |",
               "|---|---|---|---|---|---|---|"]
        for name, row in evals.items():
            md.append(f"| {name} | {_fmt(row.get('fid'))} | {_fmt(row.get('fid_ratio_to_teacher'))} | "
                      f"{_fmt(row.get('kid_x1000'))} | {_fmt(row.get('precision'))} | {_fmt(row.get('recall'))} | "
                      f"{_fmt(row.get('accuracy'))} |")
        for name in evals:
            if os.path.exists(os.path.join(run_dir, "eval", f"{name}.png")):
                md.append(f"\n{name} samples (one row per class order):\n\n![{name}](eval/{name}.png)")
    c = report["compute"]
    md += ["", "## Compute", "", "| part | FLOPs |", "|---|---|",
           f"| stage 1: teacher forwards (extraction) | {_fmt(float(c['stage1_extraction_flops']))} |",
           f"| stage 1: operator training | {_fmt(float(c['stage1_operator_flops']))} |",
           f"| stage 2: finetuning | {_fmt(float(c['stage2_flops']))} |",
           f"| total | {_fmt(float(c['total_flops']))} |",
           f"| teacher pretraining | {_fmt(float(c['teacher_pretrain_flops'])) if c['teacher_pretrain_flops'] else '-'} |"]
    if c.get("share_of_pretraining") is not None:
        md.append(f"\nGrafting cost: **{100 * c['share_of_pretraining']:.2f}%** of the teacher's pretraining FLOPs "
                  f"(stage 2 alone {100 * c['stage2_share_of_pretraining']:.2f}%).")
    if "random_init" in recipe["eval"]["baselines"]:
        md.append(f"\nThe random-init baseline (no stage 1) spends the same total FLOPs on stage 2 alone: "
                  f"{c['random_init_stage2_steps']} steps instead of {recipe['stage2']['steps']}.")
    if timings:
        md += ["", "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    for name, path in plots.items():
        md.append(f"\n![{name}]({os.path.basename(path)})")
    return "\n".join(md) + "\n"


def write_report(run_dir: str, report: dict) -> dict:
    """Render a ``build_report`` dict into ``run_dir``: report.json, the loss-curve PNGs and report.md."""
    plots = plot_curves(run_dir)
    atomic_write_text(os.path.join(run_dir, "report.md"), render_markdown(report, plots, run_dir))
    atomic_write_json(os.path.join(run_dir, "report.json"), report)
    return report
