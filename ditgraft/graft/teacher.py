"""The teacher of a graft run: loaded from the recipe's source, and its metrics from the shipped testbed card."""
from __future__ import annotations

import os
from dataclasses import asdict

import torch

from ditgraft.eval.evaluate import Protocol, sample_and_evaluate
from ditgraft.models.checkpoints import ASSETS, load_dit
from ditgraft.models.families import DIFFUSERS_PREFIX, load_diffusers
from ditgraft.recipe import Recipe
from ditgraft.utils import read_json


def load_teacher(recipe: Recipe, device) -> tuple[torch.nn.Module, dict]:
    t = recipe.teacher
    if t.source.startswith(DIFFUSERS_PREFIX):
        return load_diffusers(t.source[len(DIFFUSERS_PREFIX):]).to(device).eval(), {}
    model, meta = load_dit(t.source, model=t.model, image_size=t.image_size)
    return model.to(device).eval(), meta


def testbed_card_metrics(source: str, protocol: Protocol) -> dict | None:
    """The shipped testbed teacher's metrics under ``protocol``, from its model card (None for another teacher or
    a protocol the card did not measure)."""
    if source != "testbed":
        return None

    card = os.path.join(ASSETS, "testbed", "teacher_metrics.json")
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
