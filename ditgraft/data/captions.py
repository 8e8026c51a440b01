"""Text-to-image training data: latents with their caption embeddings, so training needs no text encoder.

An ``.npz`` with keys
    latents                         float [N, C, H, W]  model-space latents (VAE latents x the VAE's scaling factor)
    prompt_embeds                   float [N, L, E]     the teacher's text-encoder output per caption (T5 for PixArt)
    prompt_attention_mask           {0,1} [N, L]        1 = real token, 0 = padding
    negative_prompt_embeds          float [1, L, E]     the empty / negative prompt (classifier-free guidance)
    negative_prompt_attention_mask  {0,1} [1, L]
    prompts                         str   [N]           the captions (optional; for reading, never for training)
``load_caption_latents`` returns ``(latents, (prompt_embeds, prompt_attention_mask))``: the conditioning a PixArt
family forward takes. Saving keeps caption tokens up to the longest caption (padded tokens are masked out of the
cross-attention, so dropping columns that are padding in every row changes nothing) and stores embeddings as
float16 by default: 12k PixArt-Sigma captions of <= 120 T5 tokens (E = 4096) take ~12 GB instead of ~59 GB. ``synth_captions`` makes such a file from a text-to-image diffusers pipeline.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ditgraft.utils import atomic_path

KEYS = ("latents", "prompt_embeds", "prompt_attention_mask")
NEGATIVE_KEYS = ("negative_prompt_embeds", "negative_prompt_attention_mask")


def is_caption_file(path: str) -> bool:
    if not (str(path).lower().endswith(".npz") and os.path.isfile(path)):
        return False
    with np.load(path, allow_pickle=False) as f:
        return "prompt_embeds" in f.files


def _check(arrays: dict, where: str) -> None:
    missing = [k for k in KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{where}: caption data needs keys {list(KEYS)}; missing {missing}")
    lat, emb, mask = (arrays[k] for k in KEYS)
    if lat.ndim != 4 or emb.ndim != 3 or mask.shape != emb.shape[:2]:
        raise ValueError(f"{where}: shapes latents {lat.shape} (want [N, C, H, W]), prompt_embeds {emb.shape} "
                         f"(want [N, L, E]), prompt_attention_mask {mask.shape} (want [N, L])")
    if not len(lat) == len(emb) > 0:
        raise ValueError(f"{where}: {len(lat)} latents but {len(emb)} caption embeddings (want equal, > 0)")
    for k in ("latents", "prompt_embeds"):
        if not np.isfinite(arrays[k]).all():
            raise ValueError(f"{where}: {k} contains NaN or inf values")


def save_caption_latents(path: str, latents, prompt_embeds, prompt_attention_mask, negative_prompt_embeds=None,
                         negative_prompt_attention_mask=None, prompts=None, embed_dtype: str = "float16") -> None:
    """Write the layout above (atomically); caption columns past the longest caption are dropped."""
    if not str(path).endswith(".npz"):
        raise ValueError(f"path {path!r}: caption data is written as .npz; end the name with .npz")

    def arr(v, dtype):
        return (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)).astype(dtype)

    if embed_dtype not in ("float16", "float32"):
        raise ValueError(f"embed_dtype={embed_dtype!r} is not allowed; use float16 or float32")
    mask = arr(prompt_attention_mask, np.int64)
    masks = [mask] if negative_prompt_embeds is None else [mask, arr(negative_prompt_attention_mask, np.int64)[:1]]
    if any(m.ndim != 2 for m in masks):
        raise ValueError(f"prompt_attention_mask: shape {mask.shape}; want [N, L]")
    # one length for captions and the negative prompt (guidance batches them together)
    keep = max(1, max(int(m.sum(axis=1).max()) for m in masks))
    if any(m[:, keep:].any() for m in masks):
        raise ValueError("prompt_attention_mask: real tokens must come first (padding at the end of each row)")
    out = {"latents": arr(latents, np.float32), "prompt_embeds": arr(prompt_embeds, embed_dtype)[:, :keep],
           "prompt_attention_mask": mask[:, :keep]}
    if negative_prompt_embeds is not None:
        out["negative_prompt_embeds"] = arr(negative_prompt_embeds, embed_dtype)[:1, :keep]
        out["negative_prompt_attention_mask"] = masks[1][:, :keep]
    if prompts is not None:
        out["prompts"] = np.asarray(list(prompts), dtype=str)
    _check(out, path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **out)


def load_caption_latents(path: str) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """-> (latents [N, C, H, W] float32, (prompt_embeds [N, L, E] float32, prompt_attention_mask [N, L] int64))."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption data {path!r} does not exist")
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in KEYS if k in f.files}
    _check(arrays, path)
    lat, emb, mask = (torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in KEYS)
    return lat.float(), (emb.float(), mask.long())


def load_negative(path: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The stored negative prompt's (embeddings [1, L, E], mask [1, L]), or None."""
    with np.load(path, allow_pickle=False) as f:
        if not all(k in f.files for k in NEGATIVE_KEYS):
            return None
        return tuple(torch.from_numpy(f[k]) for k in NEGATIVE_KEYS)


def read_prompts(path: str) -> list[str]:
    """A prompt list: one prompt per line of a text file (blank lines skipped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path!r} does not exist (one prompt per line)")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path!r} holds no prompt (one prompt per line)")
    return prompts


def load_t2i_pipeline(source: str, device=None):
    """A text-to-image diffusers pipeline (text encoder included) from a local directory or a hub repo id."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(source)
    if getattr(pipe, "text_encoder", None) is None or not hasattr(pipe, "encode_prompt"):
        raise ValueError(f"{source!r} is not a text-to-image pipeline with a text encoder (e.g. PixArt-Sigma)")
    return pipe.to(device) if device is not None else pipe


@torch.no_grad()
def synth_captions(pipe, prompts: list[str], out: str, num_samples: int | None = None, steps: int = 20,
                   guidance_scale: float = 4.5, batch_size: int = 8, seed: int = 0, height: int | None = None,
                   width: int | None = None, max_sequence_length: int = 300, progress: bool = True) -> str:
    """Synthetic image-caption pairs from a text-to-image diffusers pipeline (PixArt-Sigma / -Alpha).

    Captions cycle through ``prompts`` until ``num_samples`` (default: one per prompt). Each batch's prompts are
    encoded once with the pipeline's text encoder; the same embeddings feed the pipeline (``prompt_embeds``) and are
    stored beside the latents it returns (``output_type='latent'``: model space). Seeds: batch b uses
    ``seed * 100_003 + b``.
    """
    from tqdm import tqdm

    n = num_samples or len(prompts)
    if n < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    lat, emb, mask = [], [], []
    neg = None
    device = pipe._execution_device
    pipe.set_progress_bar_config(disable=True)
    for b in tqdm(range(0, n, batch_size), disable=not progress, desc="synth"):
        batch = chosen[b:b + batch_size]
        pe, pm, ne, nm = pipe.encode_prompt(batch, do_classifier_free_guidance=True, negative_prompt="",
                                            device=device, clean_caption=False,
                                            max_sequence_length=max_sequence_length)
        g = torch.Generator(device="cpu").manual_seed(seed * 100_003 + b // batch_size)
        x = pipe(negative_prompt=None, prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=ne,
                 negative_prompt_attention_mask=nm, num_inference_steps=steps, guidance_scale=guidance_scale,
                 height=height, width=width, use_resolution_binning=False, output_type="latent",
                 generator=g).images
        lat.append(x.float().cpu())
        emb.append(pe.float().cpu())
        mask.append(pm.cpu())
        neg = neg or (ne[:1].float().cpu(), nm[:1].cpu())
    save_caption_latents(out, torch.cat(lat), torch.cat(emb), torch.cat(mask), neg[0], neg[1], chosen)
    return out
