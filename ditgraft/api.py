"""The Python API (re-exported from ``ditgraft``): the command line's main entry points as functions.

    model = ditgraft.load_model(source)                  any source the CLI takes (see load_model)
    student = ditgraft.graft_model(model, operator="hyena_x")  surgery from a recipe or a few arguments (untrained)
    report = ditgraft.run_pipeline(recipe, run_dir)      stage 1 -> stage 2 -> eval -> report, as `ditgraft graft`
    images, labels = ditgraft.sample(model, num=100)     uint8 NHWC images (latent models: vae=...)
    metrics = ditgraft.evaluate(images_or_npz, labels)   testbed metrics, or Inception ones against an ADM reference
    folder = ditgraft.export_model(model, out)           a folder diffusers loads without ditgraft (model card)
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict

import numpy as np
import torch

__all__ = ["load_model", "graft_model", "run_pipeline", "sample", "evaluate", "export_model", "InputError"]

# InputError: the API's one exception type for bad input
from ditgraft.utils import InputError, resolve_device  # noqa: E402


def _input_errors(fn):
    """Bad input raises ``InputError`` (a ValueError) with the command line's message, from the same checks."""
    import functools

    from ditgraft.utils import EXPECTED_ERRORS, input_error_message

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError:
            raise
        except EXPECTED_ERRORS as err:
            raise InputError(input_error_message(err)) from err
    return wrapper


@_input_errors
def load_model(source: str, device="cpu", release_config: str | None = None) -> torch.nn.Module:
    """A model in eval mode from any source: ``testbed``; a ditgraft ``.safetensors`` (plain or grafted); a run
    directory; an official DiT ``.pt`` (DiT-XL/2 at 256 px); ``hf://owner/repo/file``; a diffusers
    ``DiTTransformer2DModel`` / ``DiTPipeline`` folder or hub repo id; a release ``model.pt`` with its YAML
    (``release_config``). The checkpoint's metadata is in ``model.ditgraft_meta``."""
    if release_config is not None:
        from ditgraft.graft.release import load_release

        model, grafts, info = load_release(source, release_config)
        meta = {"model_config": model.config, "grafts": [asdict(g) for g in grafts], "release": info}
    else:
        from ditgraft.graft.surgery import load_any

        model, meta = load_any(os.fspath(source), map_location="cpu")
    model.ditgraft_meta = meta
    return model.to(resolve_device(device)).eval()


def _recipe(recipe, overrides: dict):
    from ditgraft.recipe import Recipe, load_recipe, parse_recipe

    if isinstance(recipe, Recipe):
        data = recipe.to_dict()
    elif isinstance(recipe, dict):
        data = copy.deepcopy(recipe)
    else:
        data = load_recipe(os.fspath(recipe)).to_dict()
    for section, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **value}
        else:
            data[section] = value
    return parse_recipe(data, "recipe (with overrides)" if overrides else "recipe")


@_input_errors
def graft_model(model, recipe=None, *, operator: str | None = None, layers="interleave", slot: str | None = None,
          options: dict | None = None, seed: int = 0, init: str = "random") -> torch.nn.Module:
    """A new student: ``model`` (or a source for ``load_model``) with operators swapped in, as surgery does before
    stage 1 (the new operators are untrained). Either a ``recipe`` (name, path, dict or Recipe; selectors that need
    an analysis run through ``run_pipeline``) or ``operator`` (+ ``layers``: indices, a slice string or a selector
    such as "interleave" / {"select": "interleave", "fraction": 0.75}; ``slot`` defaults to the operator's)."""
    from ditgraft.graft import surgery
    from ditgraft.models.adapters import slot_depths
    from ditgraft.operators import get_spec

    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    if (recipe is None) == (operator is None):
        raise ValueError("graft_model: give either recipe=... or operator=... (not both)")
    if recipe is None:
        spec = get_spec(operator)
        recipe = {"grafts": [{"slot": slot or spec.slot, "layers": layers, "operator": operator,
                              "options": dict(options or {}), "init": init}], "seed": seed}
    r = _recipe(recipe, {})
    grafts = surgery.resolve_grafts(r, slot_depths(model))
    student = surgery.graft_model(model, grafts, seed=r.seed).eval()
    # what a saved student's metadata would say (export reads it): earlier grafts stay where no new one replaces them
    meta = getattr(model, "ditgraft_meta", None) or {}
    slots = {(g["slot"], g["layer"]): g for g in meta.get("grafts") or []}
    slots.update({(g.slot, g.layer): asdict(g) for g in grafts})
    student.ditgraft_meta = {**meta, "grafts": sorted(slots.values(), key=lambda g: (g["layer"], g["slot"])),
                             "recipe": r.to_dict()}
    return student


@_input_errors
def run_pipeline(recipe, run_dir: str, stages=None, device: str | None = None, progress: bool = False,
                 **overrides) -> dict:
    """``ditgraft graft``: run a recipe (bundled name, path, dict or Recipe) in ``run_dir``; returns the report.
    Keyword overrides replace recipe sections or update their fields, e.g. ``stage1={"steps": 100}``."""
    from ditgraft.graft.pipeline import STAGES, run_graft
    from ditgraft.train import tracking

    if isinstance(stages, str):  # "stage1" or "stage1,stage2", as --stages takes them
        stages = [s.strip() for s in stages.split(",") if s.strip()]
    recipe = _recipe(recipe, overrides)
    with tracking.session(recipe.log, os.fspath(run_dir)):
        report = run_graft(recipe, os.fspath(run_dir), stages=tuple(stages or STAGES), device=device,
                           progress=progress, log=print if progress else (lambda *a: None))
        tracking.log_results(report, os.fspath(run_dir))
    return report


@_input_errors
def sample(model, num: int = 100, *, steps: int = 25, sampler: str | None = None, cfg_scale: float = 1.5,
           seed: int = 0, batch_size: int = 100, vae=None, clip: bool | None = None, device="cpu",
           captions=None) -> tuple[np.ndarray, np.ndarray]:
    """Protocol samples as (uint8 NHWC images, labels), seeded as ``ditgraft sample``: class-balanced (labels
    i % num_classes) for class-conditional models; caption i % n of ``captions`` (a caption .npz or (embeddings,
    mask); labels are caption indices) for caption-conditioned ones such as PixArt. Latent models need ``vae`` (an
    AutoencoderKL, its folder or hub id) to decode; ``clip`` defaults to on for pixel models and off for latents.
    ``sampler`` defaults to the model's objective's: euler for flow-matching families (SD3, Flux, Wan), else ddim."""
    from ditgraft.diffusion.samplers import SamplingConfig, default_sampler
    from ditgraft.eval.sampling import decoding, generate

    device = resolve_device(device)
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model, device)
    clip, decode = decoding(model, vae, clip=clip, device=device, option="vae")
    cfg = SamplingConfig(sampler=sampler or default_sampler(model), steps=steps, cfg_scale=cfg_scale,
                         clip_denoised=clip)
    return generate(model.to(device), num, cfg, seed=seed, batch_size=batch_size, device=device, decode=decode,
                    captions=captions)


@_input_errors
def evaluate(samples, labels=None, *, features: str = "testbed", reference: str | None = None,
             inception_weights: str | None = None, device="cpu") -> dict:
    """Metrics of uint8 NHWC images (with their labels) or of a sample ``.npz`` (streamed for Inception features):
    ``features="testbed"`` (the shipped classifier) or ``"inception"`` (FID, sFID, IS, precision/recall from the
    user's Inception weights against an ADM ``reference`` batch)."""
    from ditgraft.eval.evaluate import FEATURES, evaluate_samples, inception_metrics, testbed_metrics

    if isinstance(samples, (str, os.PathLike)):
        return evaluate_samples(os.fspath(samples), features, reference, inception_weights, device)
    if features not in FEATURES:
        raise ValueError(f"features={features!r} is not allowed; use one of {FEATURES}")
    if features == "testbed":
        return testbed_metrics(samples, labels)
    if reference is None:
        raise ValueError("features='inception' needs reference=PATH (an ADM reference batch .npz)")
    return inception_metrics(samples, reference, inception_weights, device)


def export_model(model, out: str, *, vae=None, run_dir: str | None = None) -> str:
    """``ditgraft export``: ``model`` (a model from ``load_model`` / ``graft_model``, or any source it takes) as a
    folder that ``diffusers.AutoModel.from_pretrained(out, trust_remote_code=True)`` loads without ditgraft, with a
    model card quoting ``run_dir``'s report (default: the source's run directory). Upload it with ``ditgraft.push``."""
    from ditgraft.export.hf import run_dir_of, write_export
    from ditgraft.models.checkpoints import require_finite

    if isinstance(model, (str, os.PathLike)):
        source = os.fspath(model)
        model, run_dir = load_model(source), run_dir or run_dir_of(source)
    require_finite(model, "the model to export")
    return write_export(model, getattr(model, "ditgraft_meta", None) or {}, os.fspath(out), vae=vae,
                        run_dir=run_dir)
