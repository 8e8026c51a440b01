"""A sweep's results: comparison with its baseline, measured cost, one table (Markdown, CSV, JSON) and plots.

The table is built from the sweep directory alone (``points.json`` and each point's run directory), so
``ditgraft sweep SWEEP.yaml --table`` regenerates it without running anything. Quality per point: FID, its ratio to
the baseline and the class-accuracy gap, with paired bootstrap 95% intervals under the decision protocol (point
estimates under the quick one); cost: training compute as a share of the teacher's pretraining FLOPs, parameters,
forward FLOPs per sample and sampling latency measured beside the teacher in one process.
"""
from __future__ import annotations

import csv
import io
import json
import os

import torch

from ditgraft.explore.spec import Sweep
from ditgraft.explore.points import point_dir, point_state
from ditgraft.utils import atomic_write_json, atomic_write_text, read_json

MEASURE_SAMPLES = 20  # samples per model and repeat in the latency measurement (x2 batch with guidance)
MEASURE_BATCH = 4  # students measured per call, each call beside the teacher
BUDGET_FIELDS = ("steps", "samples", "decay_steps", "warmup_steps")  # stage1.* / stage2.* axes that set a budget


def _read(path: str) -> dict | None:
    return read_json(path) if os.path.exists(path) else None


# ----------------------------------------------------------------------------------------------- running parts

def compare_with_baseline(sweep: Sweep, sweep_dir: str, device=None, log=print) -> None:
    """With a point as the baseline: the decision protocol of every other finished point against it, paired at
    the same seeds (``eval/sweep_baseline_decision.json``); nothing to do with the teacher as the baseline (each
    point's own evaluation compares it with the teacher)."""
    from ditgraft.eval.decision import Targets, decision_eval
    from ditgraft.eval.evaluate import Protocol
    from ditgraft.graft.surgery import load_grafted
    from ditgraft.utils import resolve_device

    b = sweep.baseline
    if b == "teacher" or point_state(sweep_dir, b)[0] != "done":
        return
    dev = resolve_device(device)
    base_model = None
    for p in sweep.points:
        e, d = p.recipe.eval, point_dir(sweep_dir, p.name)
        out = os.path.join(d, "eval", "sweep_baseline_decision.json")
        done = _read(out)
        if (p.name == b or e.protocol != "decision" or not e.enabled or point_state(sweep_dir, p.name)[0] != "done"
                or (done is not None and done.get("against_point") == b)):
            continue
        if base_model is None:
            base_model, _ = load_grafted(os.path.join(point_dir(sweep_dir, b), "student.safetensors"), dev)
        model, _ = load_grafted(os.path.join(d, "student.safetensors"), dev)
        protocol = Protocol(**read_json(os.path.join(d, "eval", "grafted_metrics.json"))["protocol"])
        log(f"  {p.name}: decision protocol against the baseline point {b}")
        res = decision_eval(model, os.path.join(d, "eval"), e.seeds, protocol, against=base_model,
                            against_dir=os.path.join(point_dir(sweep_dir, b), "eval"), tag="grafted",
                            against_tag="grafted", targets=Targets(e.target_ratio, e.target_gap),
                            resamples=e.resamples, device=dev, progress=False, name="sweep_baseline",
                            hooks={"compile": True} if e.compile else None)
        atomic_write_json(out, {**res, "against_point": b})


def measure_points(sweep: Sweep, sweep_dir: str, device=None, log=print) -> None:
    """Parameters, forward FLOPs per sample and sampling latency of every finished point not yet measured, each
    measured beside its teacher in this process (the models take turns; ``sweep_measure.json``)."""
    from ditgraft.flops import dit_forward_flops_per_sample
    from ditgraft.graft.teacher import load_teacher
    from ditgraft.graft.restructure_train import sampling_latency
    from ditgraft.graft.surgery import load_grafted
    from ditgraft.utils import resolve_device

    todo = [p for p in sweep.points if point_state(sweep_dir, p.name)[0] == "done"
            and not os.path.exists(os.path.join(point_dir(sweep_dir, p.name), "sweep_measure.json"))]
    if not todo:
        return
    dev = resolve_device(device)
    by_teacher: dict[str, list] = {}
    for p in todo:
        by_teacher.setdefault(p.recipe.teacher.source, []).append(p)
    log(f"sweep {sweep.name}: measuring {len(todo)} point(s) beside the teacher (parameters, FLOPs, latency)")
    for source, points in by_teacher.items():
        teacher, _ = load_teacher(points[0].recipe, dev)
        t_row = {"params": sum(x.numel() for x in teacher.parameters()),
                 "forward_flops": dit_forward_flops_per_sample(teacher)}
        for i in range(0, len(points), MEASURE_BATCH):
            chunk = points[i:i + MEASURE_BATCH]
            models = {"teacher": teacher}
            for p in chunk:
                models[p.name], _ = load_grafted(os.path.join(point_dir(sweep_dir, p.name), "student.safetensors"),
                                                 dev)
            e = chunk[0].recipe.eval
            with torch.no_grad():
                lat = sampling_latency(models, num=MEASURE_SAMPLES, steps=e.steps, cfg_scale=e.cfg_scale, device=dev)
            for p in chunk:
                m = models[p.name]
                atomic_write_json(os.path.join(point_dir(sweep_dir, p.name), "sweep_measure.json"), {
                    "params": sum(x.numel() for x in m.parameters()), "forward_flops": dit_forward_flops_per_sample(m),
                    "latency_s": lat[p.name], "teacher_latency_s": lat["teacher"],
                    "latency_ratio": lat[p.name] / lat["teacher"], "teacher": source,
                    "samples": MEASURE_SAMPLES, "steps": e.steps, "cfg_scale": e.cfg_scale,
                    "threads": torch.get_num_threads(), "device": str(dev)})
            t_row["latency_s"] = lat["teacher"]
        teachers = _read(os.path.join(sweep_dir, "teacher_measure.json")) or {}
        teachers[source] = t_row
        atomic_write_json(os.path.join(sweep_dir, "teacher_measure.json"), teachers)


# ----------------------------------------------------------------------------------------------- the table

def _stat(s: dict | None) -> tuple[float | None, list | None]:
    return (None, None) if s is None else (s["value"], s.get("ci"))


def _quality(d: str, baseline: str, baseline_quick: dict | None) -> dict:
    """FID, accuracy, ratio and gap of one finished point (decision protocol when it ran, else quick)."""
    report = _read(os.path.join(d, "report.json")) or {}
    quick = (report.get("eval") or {}).get("grafted") or {}
    name = "grafted_decision.json" if baseline == "teacher" else "sweep_baseline_decision.json"
    dec = _read(os.path.join(d, "eval", name))
    row: dict = {}
    if dec is not None and "ratio" in dec:
        row["protocol"] = f"decision (seeds {','.join(map(str, dec['seeds']))}, {dec['num']} samples)"
        (row["fid"], row["fid_ci"]), (row["accuracy"], row["accuracy_ci"]) = \
            _stat(dec["model"]["fid"]), _stat(dec["model"]["accuracy"])
        (row["ratio"], row["ratio_ci"]), (row["gap"], row["gap_ci"]) = _stat(dec["ratio"]), _stat(dec["gap"])
        row["verdicts"] = dec.get("verdicts")
    elif quick:
        n = (quick.get("protocol") or {}).get("num")
        row["protocol"] = f"quick ({n} samples)"
        row["fid"], row["accuracy"] = quick.get("fid"), quick.get("accuracy")
        ref = baseline_quick or {}
        if ref.get("fid"):
            row["ratio"] = row["fid"] / ref["fid"]
        if ref.get("accuracy") is not None and row["accuracy"] is not None:
            row["gap"] = ref["accuracy"] - row["accuracy"]
    compute = report.get("compute") or {}
    row["share_of_pretraining"] = compute.get("share_of_pretraining")
    row["train_flops"] = compute.get("total_flops")
    return row


def build_table(sweep_dir: str) -> dict:
    """The sweep's table from its directory: {sweep, baseline, axes, code, rows, teacher, pareto}."""
    meta = read_json(os.path.join(sweep_dir, "points.json"))
    baseline = meta["baseline"]
    reports = {p["name"]: _read(os.path.join(point_dir(sweep_dir, p["name"]), "report.json")) or {}
               for p in meta["points"]}
    if baseline == "teacher":
        base_quick = next((r["eval"]["teacher"] for r in reports.values() if "teacher" in (r.get("eval") or {})),
                          None)
    else:
        base_quick = (reports.get(baseline, {}).get("eval") or {}).get("grafted")
    teachers = _read(os.path.join(sweep_dir, "teacher_measure.json")) or {}
    rows = []
    for p in meta["points"]:
        d = point_dir(sweep_dir, p["name"])
        state, status = point_state(sweep_dir, p["name"])
        row = {"name": p["name"], "overrides": p["overrides"], "state": state, "error": status.get("error"),
               "stage1_from": p["stage1_from"], "wall_s": status.get("wall_s")}
        if state == "done":
            row.update(_quality(d, baseline, base_quick))
            if p["name"] == baseline:
                row.update(ratio=1.0, ratio_ci=None, gap=0.0, gap_ci=None)
            m = _read(os.path.join(d, "sweep_measure.json")) or {}
            row.update({k: m.get(k) for k in ("params", "forward_flops", "latency_s", "latency_ratio")})
        rows.append(row)
    teacher = None
    if len(teachers) == 1:
        (source, t), = teachers.items()
        teacher = {"name": "teacher", "source": source, **t, "ratio": 1.0 if baseline == "teacher" else None,
                   "fid": (base_quick or {}).get("fid") if baseline == "teacher" else None}
    table = {"sweep": meta["name"], "description": meta.get("description", ""), "baseline": baseline,
             "axes": meta["axes"], "code": _read(os.path.join(sweep_dir, "code.json")), "rows": rows,
             "teacher": teacher}
    table["pareto"] = pareto_front(rows)
    return table


def pareto_front(rows: list[dict], x: str = "forward_flops", y: str = "ratio") -> list[str]:
    """Names of the finished points that no other point beats on both ``x`` and ``y`` (lower is better)."""
    pts = [(r[x], r[y], r["name"]) for r in rows if r.get(x) is not None and r.get(y) is not None]
    return [n for (a, b, n) in pts if not any((c <= a and e <= b) and (c < a or e < b) for (c, e, _) in pts)]


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ci(v, ci, digits: int = 3) -> str:
    if v is None:
        return "-"
    return _fmt(v, digits) + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def _value_text(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))


def table_markdown(table: dict) -> str:
    axes = table["axes"]
    code = table.get("code") or {}
    lines = [f"# Sweep {table['sweep']}", ""]
    if table["description"]:
        lines += [table["description"].strip(), ""]
    lines += [f"Baseline: {table['baseline']}. Code: ditgraft {code.get('ditgraft')}, torch {code.get('torch')}, "
              f"commit {(code.get('git_commit') or 'unknown')[:12]}{' (modified)' if code.get('git_dirty') else ''}. "
              "Ratio = FID / baseline FID; gap = baseline accuracy - accuracy (lower is better for both); intervals "
              "are paired bootstrap 95% intervals (decision protocol). Share = training compute (every FLOP of "
              "stage 1 and stage 2) / the teacher's pretraining FLOPs. Latency: sampling, beside the teacher in "
              "one process. * = on the Pareto front of forward FLOPs and FID ratio.", ""]
    head = ["point", *axes, "FID", "FID ratio", "accuracy", "accuracy gap", "share %", "params", "GFLOPs/sample",
            "latency ratio", "protocol"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    front = set(table["pareto"])
    for r in table["rows"]:
        cells = [r["name"] + (" *" if r["name"] in front else "")]
        cells += [_value_text(r["overrides"][a]) if a in r["overrides"] else "(base)" for a in axes]
        if r["state"] != "done":
            cells += [r["state"]] + ["-"] * (len(head) - len(cells) - 1) + [r.get("error") or ""]
        else:
            share = r.get("share_of_pretraining")
            cells += [_ci(r.get("fid"), r.get("fid_ci")), _ci(r.get("ratio"), r.get("ratio_ci")),
                      _ci(r.get("accuracy"), r.get("accuracy_ci")), _ci(r.get("gap"), r.get("gap_ci")),
                      _fmt(None if share is None else 100 * share, 2),
                      "-" if r.get("params") is None else f"{r['params']:,}",
                      "-" if r.get("forward_flops") is None else f"{r['forward_flops'] / 1e9:.3f}",
                      _fmt(r.get("latency_ratio")), r.get("protocol", "-")]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    t = table.get("teacher")
    if t:
        lines += ["", f"Teacher (`{t['source']}`): FID {_fmt(t.get('fid'))}, {t['params']:,} parameters, "
                      f"{t['forward_flops'] / 1e9:.3f} GFLOPs per sample, sampling latency {t['latency_s']:.2f} s."]
    failed = [r for r in table["rows"] if r["state"] == "failed"]
    if failed:
        lines += ["", "Failed points (run the sweep again to retry them):"]
        lines += [f"- {r['name']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("name", "state", "fid", "fid_lo", "fid_hi", "ratio", "ratio_lo", "ratio_hi", "accuracy", "gap",
              "gap_lo", "gap_hi", "share_of_pretraining", "train_flops", "params", "forward_flops", "latency_s",
              "latency_ratio", "protocol", "error")


def table_csv(table: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    axes = table["axes"]
    w.writerow([*CSV_FIELDS, *axes])
    for r in table["rows"]:
        flat = dict(r)
        for k in ("fid", "ratio", "gap"):
            ci = r.get(f"{k}_ci") or (None, None)
            flat[f"{k}_lo"], flat[f"{k}_hi"] = ci
        w.writerow([_fmt(flat.get(k), 6) if isinstance(flat.get(k), float) else ("" if flat.get(k) is None
                    else flat[k]) for k in CSV_FIELDS]
                   + [_value_text(r["overrides"][a]) if a in r["overrides"] else "" for a in axes])
    return buf.getvalue()


def _budget_series(table: dict) -> dict[str, list[dict]]:
    """Finished points grouped by everything but their budget axes (stage1/stage2 steps and samples)."""
    budget = {a for a in table["axes"] if a.split(".")[0] in ("stage1", "stage2") and a.split(".")[-1] in BUDGET_FIELDS}
    series: dict[str, list[dict]] = {}
    for r in table["rows"]:
        if r["state"] == "done" and r.get("share_of_pretraining") is not None and r.get("ratio") is not None:
            key = ",".join(f"{a}={_value_text(v)}" for a, v in r["overrides"].items() if a not in budget) or "all"
            series.setdefault(key, []).append(r)
    return series


def write_plots(table: dict, sweep_dir: str) -> list[str]:
    """pareto.png (FID ratio against forward FLOPs, the front marked) and budget.png (FID ratio against the compute
    share); the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in table["rows"] if r.get("forward_flops") is not None and r.get("ratio") is not None]
    written = []
    if done:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        front = [r for r in done if r["name"] in table["pareto"]]
        ax.scatter([r["forward_flops"] / 1e9 for r in done], [r["ratio"] for r in done], c="tab:blue", label="points")
        for r in done:
            ax.annotate(r["name"], (r["forward_flops"] / 1e9, r["ratio"]), fontsize=6, alpha=0.8)
        front.sort(key=lambda r: r["forward_flops"])
        ax.step([r["forward_flops"] / 1e9 for r in front], [r["ratio"] for r in front], where="post", c="tab:red",
                label="Pareto front")
        t = table.get("teacher")
        if t and t.get("ratio") is not None:
            ax.scatter([t["forward_flops"] / 1e9], [t["ratio"]], marker="*", s=120, c="k", label="teacher")
        ax.set_xlabel("forward GFLOPs per sample")
        ax.set_ylabel(f"FID ratio to {table['baseline']}")
        ax.set_title(f"sweep {table['sweep']}: quality against cost")
        ax.legend(fontsize=7)
        fig.tight_layout()
        _save_fig(fig, os.path.join(sweep_dir, "pareto.png"))
        written.append("pareto.png")
    series = _budget_series(table)
    if series:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for key, rows in series.items():
            rows.sort(key=lambda r: r["share_of_pretraining"])
            ax.plot([100 * r["share_of_pretraining"] for r in rows], [r["ratio"] for r in rows], marker="o",
                    label=key)
        ax.set_xlabel("training compute, % of the teacher's pretraining")
        ax.set_ylabel(f"FID ratio to {table['baseline']}")
        ax.set_title(f"sweep {table['sweep']}: budget curves")
        ax.legend(fontsize=6)
        fig.tight_layout()
        _save_fig(fig, os.path.join(sweep_dir, "budget.png"))
        written.append("budget.png")
    return written


def _save_fig(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_table(sweep_dir: str) -> dict:
    """Build the table from the sweep directory and write results.{md,csv,json} and the plots there."""
    table = build_table(sweep_dir)
    table["plots"] = write_plots(table, sweep_dir)
    atomic_write_json(os.path.join(sweep_dir, "results.json"), table)
    atomic_write_text(os.path.join(sweep_dir, "results.csv"), table_csv(table))
    atomic_write_text(os.path.join(sweep_dir, "results.md"), table_markdown(table))
    return table
