"""The model card (README.md) of an exported folder: YAML front matter the hub reads (library, pipeline tag, base
model, license, tags), how to load it without ditgraft, what was grafted where, the recipe, and, from the run
directory when there is one, the compute share and the measured metrics with their protocol and intervals.

Sources: the checkpoint's metadata (grafts, restructure, recipe, teacher), ``report.json`` (evaluations, compute
accounting) and any ``*_decision.json`` under the run directory (the decision protocol's pooled metrics with
bootstrap intervals). Nothing is made up: a section without data says so or is left out.
"""
from __future__ import annotations

import glob
import json
import os

import yaml
from torch import nn

from ditgraft.models.families import family_of
from ditgraft.models.families.base import unwrap
from ditgraft.utils import read_json

# Teachers whose licence ditgraft knows (by a substring of their source): the official DiT weights (CC BY-NC 4.0,
# facebookresearch/DiT), PixArt-Sigma (openrail++ on its hub pages), the shipped testbed teacher (ditgraft's MIT).
KNOWN_LICENSES = (("testbed", "mit"), ("DiT-XL-2", "cc-by-nc-4.0"), ("facebook/DiT", "cc-by-nc-4.0"),
                  ("PixArt-Sigma", "openrail++"), ("PixArt-alpha", "openrail++"))
PIPELINES = {"dit": "DiTPipeline", "diffusers_dit": "DiTPipeline", "pixart": "PixArtSigmaPipeline"}
PIPELINE_TAGS = {"dit": "unconditional-image-generation", "diffusers_dit": "unconditional-image-generation",
                 "pixart": "text-to-image"}  # class-conditional: the hub
# has no class-conditional tag; DiT repositories use the unconditional one


def teacher_source(meta: dict) -> str | None:
    recipe = meta.get("recipe") or {}
    return ((recipe.get("teacher") or {}).get("source") or (meta.get("teacher") or {}).get("source")
            or meta.get("source"))


def license_of(source: str | None) -> str | None:
    if not source:
        return None
    for key, lic in KNOWN_LICENSES:
        if key in source:
            return lic
    return None


def base_model_of(source: str | None) -> str | None:
    """A hub repo id the model derives from (``owner/name``, ``diffusers:owner/name``, ``hf://owner/name/...``)."""
    if not source:
        return None
    s = source.removeprefix("diffusers:")
    if s.startswith("hf://"):
        return "/".join(s[len("hf://"):].split("/")[:2])
    if s.count("/") == 1 and not s.startswith((".", "/", "~")) and not os.path.exists(s) and "." not in s.split("/")[1]:
        return s
    return None


def front_matter(family: str, meta: dict) -> dict:
    source = teacher_source(meta)
    ops = sorted({g["operator"] for g in meta.get("grafts") or []})
    tags = ["ditgraft", "diffusion-transformer", family] + (["grafting"] if ops or meta.get("restructure") else [])
    tags += ops + ([f"diffusers:{PIPELINES[family]}"] if family in PIPELINES else [])
    fm = {"library_name": "diffusers", "pipeline_tag": PIPELINE_TAGS.get(family, "text-to-image"), "tags": tags}
    base = base_model_of(source)
    if base:
        fm["base_model"] = base
    lic = license_of(source)
    if lic:
        fm["license"] = lic
    return fm


def _grafts_table(grafts: list[dict]) -> list[str]:
    if not grafts:
        return ["No operator was replaced: every block keeps the teacher's attention and MLP."]
    groups: dict[tuple, list[int]] = {}
    for g in grafts:
        key = (g["slot"], g["operator"], json.dumps(g.get("options") or {}, sort_keys=True), g.get("init", "random"))
        groups.setdefault(key, []).append(int(g["layer"]))
    rows = ["| slot | blocks | operator | options | init |", "|---|---|---|---|---|"]
    for (slot, op, options, init), layers in groups.items():
        rows.append(f"| {slot} | {', '.join(map(str, sorted(layers)))} | {op} | {options if options != '{}' else '-'} "
                    f"| {init} |")
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3e}" if abs(v) >= 1e4 else f"{v:.4g}"
    return str(v)


def _metrics(report: dict | None, run_dir: str | None) -> list[str]:
    md = []
    evals = (report or {}).get("eval") or {}
    if evals:
        p = next(iter(evals.values())).get("protocol") or {}
        md += [f"Protocol: {p.get('num')} samples, {p.get('sampler')} {p.get('steps')} steps, cfg "
               f"{p.get('cfg_scale')}, seed {p.get('seed')}" + (f", {p['features']} features" if p.get("features")
                                                               else "") + ".", "",
               "| model | FID | FID / teacher | KID x1000 | precision | recall | class accuracy |",
               "|---|---|---|---|---|---|---|"]
        for name, row in evals.items():
            md.append(f"| {name} | {_fmt(row.get('fid'))} | {_fmt(row.get('fid_ratio_to_teacher'))} | "
                      f"{_fmt(row.get('kid_x1000'))} | {_fmt(row.get('precision'))} | {_fmt(row.get('recall'))} | "
                      f"{_fmt(row.get('accuracy'))} |")
    decisions = sorted(glob.glob(os.path.join(run_dir, "**", "*_decision.json"), recursive=True)) if run_dir else []
    if decisions:
        from ditgraft.eval.decision import format_decision

        md += ["", "Decision protocol (pooled seeds, paired bootstrap intervals):", ""]
        for path in decisions:
            try:
                text = format_decision(read_json(path))
            except (KeyError, TypeError, ValueError) as err:
                text = f"(unreadable: {err})"
            md += [f"`{os.path.relpath(path, run_dir)}`:", "", "```", text, "```", ""]
    return md or ["No evaluation was recorded with this model (no report.json evaluations, no decision results)."]


def _compute(report: dict | None) -> list[str]:
    c = (report or {}).get("compute") or {}
    if not c:
        return []
    md = ["## Compute", "", "| part | FLOPs |", "|---|---|"]
    for key, label in (("stage1_extraction_flops", "stage 1: teacher forwards"),
                       ("stage1_operator_flops", "stage 1: operator training"),
                       ("stage2_flops", "stage 2: finetuning"), ("total_flops", "total"),
                       ("teacher_pretrain_flops", "teacher pretraining")):
        if c.get(key) is not None:
            md.append(f"| {label} | {float(c[key]):.3e} |")
    if c.get("share_of_pretraining") is not None:
        md += ["", f"Grafting cost: **{100 * c['share_of_pretraining']:.3f}%** of the teacher's pretraining FLOPs."]
    return md + [""]


def model_card(model: nn.Module, meta: dict, config: dict, run_dir: str | None = None, has_vae: bool = False) -> str:
    """README.md text for the exported folder of ``model`` (``config``: its exported config.json; ``has_vae``: the
    folder holds vae/)."""
    model = unwrap(model)
    family = family_of(model).name
    report_path = os.path.join(run_dir, "report.json") if run_dir else None
    report = read_json(report_path) if report_path and os.path.exists(report_path) else None
    recipe = meta.get("recipe") or (report or {}).get("recipe") or {}
    name = recipe.get("name") or "ditgraft model"
    source = teacher_source(meta)
    grafts = meta.get("grafts") or []
    params = sum(p.numel() for p in model.parameters())
    cls = config["_class_name"]
    fm = yaml.safe_dump(front_matter(family, meta), sort_keys=False).strip()
    pipeline = PIPELINES.get(family)
    usage = ["```python", "import diffusers", "", 'model = diffusers.AutoModel.from_pretrained("REPO_OR_FOLDER", '
             "trust_remote_code=True)"]
    if family in ("dit", "diffusers_dit"):
        vae = "" if has_vae else ", vae=vae"  # no vae/ in the folder: bring an AutoencoderKL
        usage += [f'pipe = diffusers.DiTPipeline.from_pretrained("REPO_OR_FOLDER", transformer=model{vae})',
                  "images = pipe(class_labels=[0, 1], num_inference_steps=50).images"]
    elif pipeline:
        usage += [f'pipe = diffusers.{pipeline}.from_pretrained("<the teacher pipeline>", transformer=model)']
    usage.append("```")
    md = [f"---\n{fm}\n---", "", f"# {name}", ""]
    if recipe.get("description"):
        md += [recipe["description"], ""]
    md += [f"A diffusion transformer edited with ditgraft (grafting: new operators distilled "
           f"into a pretrained model, then finetuned). Teacher: `{source or 'unknown'}`. {params:,} parameters; "
           f"class `{cls}` in `modeling_ditgraft.py`, generated from ditgraft's own sources at export, so loading "
           "needs diffusers and torch only; it reproduces ditgraft's output bit for bit (fp32, same device).", "",
           "## Use", "", *usage, ""]
    if family in ("dit", "diffusers_dit") and config.get("in_channels") not in (4, None):
        md += [f"This model works on {config['in_channels']}-channel images, not VAE latents: `DiTPipeline` decodes "
               "through a VAE, so sample it with the scheduler in `scheduler/` in a loop of your own, or pass a "
               "decoder that fits.", ""]
    if family == "dit" and config.get("model_config", {}).get("num_classes", 1000) != 1000:
        md += [f"`DiTPipeline` always passes class 1000 as the null class (ImageNet's); this model has "
               f"{config['model_config']['num_classes']} classes and reads label 1000 as its own null class.", ""]
    md += ["## What was grafted", "", *_grafts_table(grafts), ""]
    if meta.get("restructure"):
        rs = meta["restructure"]
        md += [f"Restructured: parallel block pairs {rs.get('parallel_pairs')}, dropped blocks {rs.get('drop')}, "
               f"merge init {rs.get('merge_init')}.", ""]
    md += ["## Metrics", "", *_metrics(report, run_dir), ""]
    md += _compute(report)
    if recipe:
        md += ["## Recipe", "", "```yaml", yaml.safe_dump({k: v for k, v in recipe.items() if k != "description"},
                                                sort_keys=False, width=110).strip(), "```", ""]
    return "\n".join(md)
