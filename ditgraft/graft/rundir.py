"""What a run directory records: the recipe it belongs to (recipe.yaml, recipe.pending.yaml while an attempt is
unrecorded) and the evaluations left in eval/."""
from __future__ import annotations

import glob
import os
import shutil
from dataclasses import asdict

import yaml

from ditgraft.distributed import on_main
from ditgraft.eval.evaluate import Protocol
from ditgraft.graft.restructure import BASELINES
from ditgraft.recipe import Recipe, recipe_diff
from ditgraft.utils import atomic_write_text, read_json


def _yaml_file(path: str):
    with open(path) as f:
        return yaml.safe_load(f)


def start_recording(recipe: Recipe, run_dir: str) -> bool:
    """True when ``run_dir`` already records this recipe; refuses a different one. An unrecorded directory (a
    failed or killed first attempt) keeps its planning results only if they were made for this same recipe."""
    recipe_path = os.path.join(run_dir, "recipe.yaml")
    if os.path.exists(recipe_path):
        recorded = _yaml_file(recipe_path)
        if recorded != recipe.to_dict():
            fields = recipe_diff(recorded, recipe.to_dict())
            raise ValueError(f"{run_dir} holds a run of a different recipe ({recipe_path}; fields that differ: "
                             f"{', '.join(fields[:8])}{' ...' if len(fields) > 8 else ''}); use another --run-dir")
        return True
    on_main(lambda: _forget_other_attempt(recipe, run_dir))
    return False


def _forget_other_attempt(recipe: Recipe, run_dir: str) -> None:
    """Drop the planning results of an unrecorded attempt with another recipe; note this recipe as pending."""
    pending = os.path.join(run_dir, "recipe.pending.yaml")
    if os.path.exists(pending) and _yaml_file(pending) != recipe.to_dict():
        for stale in [os.path.join(run_dir, "plan.json"), os.path.join(run_dir, "analysis"),
                      *glob.glob(os.path.join(run_dir, "probe*"))]:
            if os.path.isdir(stale):
                shutil.rmtree(stale)
            elif os.path.exists(stale):
                os.remove(stale)
    atomic_write_text(pending, yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def record_recipe(recipe: Recipe, run_dir: str) -> None:
    """Layers, teacher and data resolved: only now is the run directory this recipe's."""
    atomic_write_text(os.path.join(run_dir, "recipe.yaml"), yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    os.remove(os.path.join(run_dir, "recipe.pending.yaml"))


def evaluations_on_disk(run_dir: str, protocol: Protocol) -> dict:
    """The metrics files that ``sample_and_evaluate`` left in ``run_dir/eval`` for this protocol, by tag."""
    out = {}
    for tag in ("grafted", "teacher", "random_init", *BASELINES):
        path = os.path.join(run_dir, "eval", f"{tag}_metrics.json")
        row = read_json(path) if os.path.exists(path) else {}
        if row.get("protocol") == asdict(protocol):
            out[tag] = row
    return out
