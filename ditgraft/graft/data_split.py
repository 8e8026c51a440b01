"""A recipe's data as the graft stages see it: train and validation rows, and the check that they fit the
teacher."""
from __future__ import annotations

import torch

from ditgraft.data.captions import caption_keys, is_caption_file
from ditgraft.data.images import check_data_fits, load_dataset
from ditgraft.models.families import family_of
from ditgraft.models.families.base import cond_rows
from ditgraft.recipe import Data, Recipe


def load_data(data: Data) -> tuple[torch.Tensor, torch.Tensor]:
    """All samples (x, y) of a recipe's ``data``, its options passed to the loader."""
    if data.source == "mnist5k":
        return load_dataset(data.text())
    return load_dataset(data.path, image_size=data.image_size, channels=data.channels, latent_scale=data.scale,
                        labels_path=data.labels)


def load_split(data: Data | str, n_train: int | None, n_val: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(x, y, x_val, y_val): the testbed uses its fixed split; other data holds out its last n_val rows.
    ``n_train`` training rows (None: all of them). Subsets are seeded random draws, never prefixes (mnist5k is
    stored sorted by class). y is labels, or a tuple (caption embeddings, masks) for caption data.

    Stage 2 takes its rows with ``n_val = stage1.val_samples`` too: both stages train on the same side of one split,
    so the rows stage 1 validates on stay unseen by the whole run (the testbed's val split is separate anyway)."""
    data = Data.model_validate(data)
    if data.source == "mnist5k" and data.split is None:
        (x, y), (xv, yv) = load_dataset("mnist5k:train"), load_dataset("mnist5k:val")
    else:
        x_all, y_all = load_data(data)
        if len(x_all) <= n_val:
            raise ValueError(f"data={data.text() or data.path!r} has {len(x_all)} samples; need more than "
                             f"val_samples={n_val}")
        x, y = x_all[:-n_val], cond_rows(y_all, slice(None, -n_val))
        xv, yv = x_all[-n_val:], cond_rows(y_all, slice(len(x_all) - n_val, None))
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(x), generator=g)[:n_train].sort().values
    keep_val = torch.randperm(len(xv), generator=g)[:n_val].sort().values
    return x[keep], cond_rows(y, keep), xv[keep_val], cond_rows(yv, keep_val)


def stage1_split(cfg, seed: int, log=None) -> tuple[torch.Tensor, ...]:
    """Stage 1's (x, y, x_val, y_val): ``cfg.samples`` training rows. When the data holds fewer images, every image
    appears more than once (the draw cycles through them), and each copy gets its own timestep and noise in stage
    1, so the paper's 8k noised samples can come from a smaller set of images."""
    x, y, xv, yv = load_split(cfg.data, cfg.samples, cfg.val_samples, seed)
    if cfg.samples > len(x):
        if log is not None:
            log(f"stage 1: {cfg.samples} noised samples from {len(x)} images ({cfg.samples / len(x):.2f} noised "
                "copies of each, each copy with its own timestep and noise)")
        rows = torch.arange(cfg.samples) % len(x)
        x, y = x[rows], cond_rows(y, rows)
    return x, y, xv, yv


def check_data(recipe: Recipe, teacher) -> None:
    """Every dataset the recipe trains on loads and fits the teacher (channels, size, labels; for a caption-
    conditioned teacher, a caption .npz holding the conditioning arrays its family takes)."""
    family = family_of(teacher)
    for name, c, n_train in (("stage1", recipe.stage1, recipe.stage1.samples),
                             ("stage2", recipe.stage2, recipe.stage2.samples)):
        if c.enabled:
            path = Data.model_validate(c.data).path
            if family.conditioning == "caption":
                held = caption_keys(path) if path is not None and is_caption_file(path) else None
                want = family.caption_keys(teacher)
                if held != want:
                    raise ValueError(f"{name}.data = {c.data}: the {family.name} family trains on a caption .npz "
                                     f"holding {', '.join(want)} (ditgraft.data.captions); "
                                     + (f"this one holds {', '.join(held)}" if held else "it is not a caption .npz"))
            x, y, xv, yv = load_split(c.data, n_train, recipe.stage1.val_samples, recipe.seed)
            if name == "stage2" and n_train is not None and len(x) < n_train:
                raise ValueError(f"stage2.samples = {n_train}: the data {c.data} has only {len(x)} training rows "
                                 f"(after the {recipe.stage1.val_samples} held out); allowed: 1 to {len(x)}")
            check_data_fits(x, y, teacher, f"{name}.data = {c.data}")
            check_data_fits(xv, yv, teacher, f"{name}.data = {c.data} (validation rows)")


def eval_captions(recipe: Recipe) -> str | None:
    """The caption set a caption-conditioned teacher is evaluated on: ``eval.captions``, else the caption .npz the
    run trains on (stage 2's data, else stage 1's)."""
    if recipe.eval.captions is not None:
        return recipe.eval.captions
    for c in (recipe.stage2, recipe.stage1):
        path = Data.model_validate(c.data).path
        if path is not None and is_caption_file(path):
            return path
    return None
