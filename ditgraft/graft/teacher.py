"""The teacher of a graft run: loaded from the recipe's source, and its metrics from a shipped teacher's card."""
from __future__ import annotations

import os
from dataclasses import asdict

import torch

from ditgraft.eval.evaluate import Protocol, sample_and_evaluate
from ditgraft.graft.surgery import load_grafted
from ditgraft.models.checkpoints import ASSETS, SHIPPED_TEACHERS, load_dit, read_metadata, shipped_path
from ditgraft.models.families import DIFFUSERS_PREFIX, load_diffusers
from ditgraft.recipe import Recipe
from ditgraft.utils import read_json


def load_teacher(recipe: Recipe, device) -> tuple[torch.nn.Module, dict]:
    t = recipe.teacher
    if t.source.startswith(DIFFUSERS_PREFIX):
        return load_diffusers(t.source[len(DIFFUSERS_PREFIX):]).to(device).eval(), {}
    path = shipped_path(t.source)
    if path.endswith(".safetensors") and os.path.exists(path) and read_metadata(path).get("family", "dit") != "dit":
        model, meta = load_grafted(path)  # a plain model of another family (the flowbed MMDiT)
    else:
        model, meta = load_dit(t.source, model=t.model, image_size=t.image_size)
    return model.to(device).eval(), meta


def testbed_card_metrics(source: str, protocol: Protocol) -> dict | None:
    """A shipped teacher's metrics (``testbed``, ``flowbed``) under ``protocol``, from its model card (None for
    another teacher or a protocol the card did not measure)."""
    if source not in SHIPPED_TEACHERS:
        return None

    card = os.path.join(ASSETS, source, "teacher_metrics.json")
    if os.path.exists(card):
        for row in read_json(card).get("evaluations", []):
            if row.get("protocol") == asdict(protocol):
                return row
    return None


def teacher_metrics(teacher, source: str, protocol: Protocol, run_dir: str, device, progress: bool,
                     **hooks) -> dict:
    """The teacher under the same protocol; the shipped testbed teacher's numbers are read from its card."""
    row = testbed_card_metrics(source, protocol)
    if row is not None:
        return row
    return sample_and_evaluate(teacher, os.path.join(run_dir, "eval"), protocol, device, progress, tag="teacher",
                               **hooks)
