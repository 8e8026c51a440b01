"""Text-to-image (and text-to-video) training data: latents with their caption embeddings, so training needs no
text encoder.

An ``.npz`` with keys
    latents                         float [N, C, H, W]  model-space latents (VAE latents as the teacher's pipeline
                                    or [N, C, F, H, W]  hands them to its transformer; F frames for video)
    prompt_embeds                   float [N, L, E]     the teacher's text-encoder output per caption (T5 for PixArt,
                                                        CLIP + T5 for SD3, T5 for Flux, umT5 for Wan)
    prompt_attention_mask           {0,1} [N, L]        1 = real token, 0 = padding (PixArt; optional)
    pooled_prompt_embeds            float [N, P]        the pooled text embedding (SD3, Flux; optional)
    guidance                        float [N]           the distilled guidance scale (Flux.1-dev; optional)
    negative_<key>                  [1, ...]            the empty / negative prompt's <key> for classifier-free
                                                        guidance (optional; all or none of the keys present)
    prompts                         str   [N]           the captions (optional; for reading, never for training)
The conditioning of a row is the keys of ``COND_KEYS`` the file holds, in that order: ``load_caption_latents``
returns ``(latents, (prompt_embeds, prompt_attention_mask))`` for PixArt's data, ``(latents, (prompt_embeds,
pooled_prompt_embeds))`` for SD3's, and so on; each caption-conditioned family names the keys its forward takes
(``Family.caption_keys``) and a run refuses a file that holds others. Saving keeps caption tokens up to the
longest caption where there is a mask (padded tokens are masked out of the cross-attention, so dropping columns
that are padding in every row changes nothing) and stores embeddings as float16 by default: 12k PixArt-Sigma
captions of <= 120 T5 tokens (E = 4096) take ~12 GB instead of ~59 GB. ``synth_captions`` makes such a file from a
PixArt pipeline; for a flow-matching teacher, ``save_caption_latents`` takes the pipeline's ``encode_prompt``
output and latents (e.g. ``output_type="latent"`` samples of the teacher pipeline itself).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ditgraft.utils import atomic_path

COND_KEYS = ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds", "guidance")
REQUIRED = ("latents", "prompt_embeds")
_ROW_DIMS = {"prompt_embeds": 3, "prompt_attention_mask": 2, "pooled_prompt_embeds": 2, "guidance": 1}


def is_caption_file(path: str) -> bool:
    if not (str(path).lower().endswith(".npz") and os.path.isfile(path)):
        return False
    with np.load(path, allow_pickle=False) as f:
        return "prompt_embeds" in f.files


def _check(arrays: dict, where: str) -> None:
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise ValueError(f"{where}: caption data needs keys {list(REQUIRED)}; missing {missing}")
    lat, emb = arrays["latents"], arrays["prompt_embeds"]
    if lat.ndim not in (4, 5):
        raise ValueError(f"{where}: latents of shape {lat.shape}; want [N, C, H, W] (or [N, C, F, H, W] for video)")
    for k in COND_KEYS:
        if k in arrays and (arrays[k].ndim != _ROW_DIMS[k] or len(arrays[k]) != len(lat)):
            raise ValueError(f"{where}: {k} of shape {arrays[k].shape}; want {_ROW_DIMS[k]} dimensions with one row "
                             f"per latent ({len(lat)})")
    if "prompt_attention_mask" in arrays and arrays["prompt_attention_mask"].shape != emb.shape[:2]:
        raise ValueError(f"{where}: prompt_attention_mask {arrays['prompt_attention_mask'].shape} does not match "
                         f"prompt_embeds {emb.shape} (want [N, L])")
    if not len(lat) > 0:
        raise ValueError(f"{where}: holds no latents (want N > 0)")
    for k in ("latents", "prompt_embeds", "pooled_prompt_embeds", "guidance"):
        if k in arrays and not np.isfinite(arrays[k]).all():
            raise ValueError(f"{where}: {k} contains NaN or inf values")


def caption_keys(path: str) -> tuple[str, ...]:
    """The conditioning keys a caption .npz holds, in ``COND_KEYS`` order (its rows' conditioning)."""
    with np.load(path, allow_pickle=False) as f:
        return tuple(k for k in COND_KEYS if k in f.files)


def save_caption_latents(path: str, latents, prompt_embeds, prompt_attention_mask=None, negative_prompt_embeds=None,
                         negative_prompt_attention_mask=None, prompts=None, embed_dtype: str = "float16", *,
                         pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, guidance=None) -> None:
    """Write the layout above (atomically); with a mask, caption columns past the longest caption are dropped.
    ``guidance``: a number (every row) or one value per row."""
    if not str(path).endswith(".npz"):
        raise ValueError(f"path {path!r}: caption data is written as .npz; end the name with .npz")

    def arr(v, dtype):
        return (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)).astype(dtype)

    if embed_dtype not in ("float16", "float32"):
        raise ValueError(f"embed_dtype={embed_dtype!r} is not allowed; use float16 or float32")
    emb = arr(prompt_embeds, embed_dtype)
    keep = emb.shape[1] if emb.ndim == 3 else None
    out = {"latents": arr(latents, np.float32)}
    if prompt_attention_mask is not None:
        mask = arr(prompt_attention_mask, np.int64)
        masks = [mask] if negative_prompt_embeds is None else [mask, arr(negative_prompt_attention_mask, np.int64)[:1]]
        if any(m.ndim != 2 for m in masks):
            raise ValueError(f"prompt_attention_mask: shape {mask.shape}; want [N, L]")
        # one length for captions and the negative prompt (guidance batches them together)
        keep = max(1, max(int(m.sum(axis=1).max()) for m in masks))
        if any(m[:, keep:].any() for m in masks):
            raise ValueError("prompt_attention_mask: real tokens must come first (padding at the end of each row)")
        out["prompt_attention_mask"] = mask[:, :keep]
        if negative_prompt_embeds is not None:
            out["negative_prompt_attention_mask"] = masks[1][:, :keep]
    out["prompt_embeds"] = emb[:, :keep]
    if negative_prompt_embeds is not None:
        out["negative_prompt_embeds"] = arr(negative_prompt_embeds, embed_dtype)[:1, :keep]
    if pooled_prompt_embeds is not None:
        out["pooled_prompt_embeds"] = arr(pooled_prompt_embeds, np.float32)
    if negative_pooled_prompt_embeds is not None:
        out["negative_pooled_prompt_embeds"] = arr(negative_pooled_prompt_embeds, np.float32)[:1]
    if guidance is not None:
        g = arr(guidance, np.float32)
        out["guidance"] = np.full(len(out["latents"]), float(g), np.float32) if g.ndim == 0 else g
    if prompts is not None:
        out["prompts"] = np.asarray(list(prompts), dtype=str)
    _check(out, path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **out)


def _tensor(key: str, a: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.long() if key.endswith("attention_mask") else t.float()


def load_caption_latents(path: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """-> (latents float32, the conditioning arrays the file holds in ``COND_KEYS`` order: float32 embeddings,
    int64 masks); PixArt's data gives (prompt_embeds [N, L, E], prompt_attention_mask [N, L])."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption data {path!r} does not exist")
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in ("latents", *COND_KEYS) if k in f.files}
    _check(arrays, path)
    return _tensor("latents", arrays["latents"]), tuple(_tensor(k, arrays[k]) for k in COND_KEYS if k in arrays)


def load_negative(path: str) -> tuple[torch.Tensor, ...] | None:
    """The stored negative prompt's conditioning (``negative_<key>`` [1, ...] for each conditioning key of the
    file, in its order), or None when any of them is missing."""
    keys = caption_keys(path)
    with np.load(path, allow_pickle=False) as f:
        if not all(f"negative_{k}" in f.files for k in keys):
            return None
        return tuple(_tensor(k, f[f"negative_{k}"]) for k in keys)


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
    """A text-to-image (or text-to-video) diffusers pipeline, text encoder included, from a local directory or a hub
    repo id."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(source)
    if getattr(pipe, "text_encoder", None) is None or not hasattr(pipe, "encode_prompt"):
        raise ValueError(f"{source!r} is not a text-conditioned pipeline with a text encoder (allowed: "
                         f"{', '.join(SYNTH_PIPELINES)})")
    return pipe.to(device) if device is not None else pipe


# the pipelines ``synth_captions`` reads, with their default caption length (max_sequence_length)
SYNTH_PIPELINES = {"PixArtSigmaPipeline": 300, "PixArtAlphaPipeline": 120, "StableDiffusion3Pipeline": 256,
                   "FluxPipeline": 512, "WanPipeline": 512}


def _encode(pipe, batch: list[str], device, max_sequence_length: int, guidance_scale: float):
    """(conditioning arrays by caption-data key, the negative prompt's or None, extra pipeline arguments) for one
    batch of prompts, each pipeline's own ``encode_prompt``."""
    kind = type(pipe).__name__
    if kind.startswith("PixArt"):
        pe, pm, ne, nm = pipe.encode_prompt(batch, do_classifier_free_guidance=True, negative_prompt="",
                                            device=device, clean_caption=False,
                                            max_sequence_length=max_sequence_length)
        return ({"prompt_embeds": pe, "prompt_attention_mask": pm}, {"prompt_embeds": ne, "prompt_attention_mask": nm},
                {"negative_prompt": None, "use_resolution_binning": False})
    if kind == "StableDiffusion3Pipeline":
        pe, ne, pp, npp = pipe.encode_prompt(batch, None, None, device=device, do_classifier_free_guidance=True,
                                             negative_prompt="", max_sequence_length=max_sequence_length)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pp}, {"prompt_embeds": ne, "pooled_prompt_embeds": npp}, {}
    if kind == "FluxPipeline":  # FLUX.1-dev: the guidance scale is an input (stored per row), no negative prompt
        pe, pp, _ = pipe.encode_prompt(batch, None, device=device, max_sequence_length=max_sequence_length)
        cond = {"prompt_embeds": pe, "pooled_prompt_embeds": pp}
        if pipe.transformer.config.guidance_embeds:
            cond["guidance"] = torch.full((len(batch),), float(guidance_scale))
        return cond, None, {}
    if kind == "WanPipeline":
        pe, ne = pipe.encode_prompt(batch, negative_prompt="", do_classifier_free_guidance=True,
                                    max_sequence_length=max_sequence_length, device=device)
        return {"prompt_embeds": pe}, {"prompt_embeds": ne}, {}
    raise ValueError(f"synth: {kind} is not allowed; use one of {', '.join(SYNTH_PIPELINES)}")


@torch.no_grad()
def synth_captions(pipe, prompts: list[str], out: str, num_samples: int | None = None, steps: int = 20,
                   guidance_scale: float = 4.5, batch_size: int = 8, seed: int = 0, height: int | None = None,
                   width: int | None = None, max_sequence_length: int | None = None, progress: bool = True,
                   num_frames: int | None = None) -> str:
    """Synthetic caption data from the teacher's own text-conditioned diffusers pipeline (``SYNTH_PIPELINES``:
    PixArt-Sigma / -Alpha, SD3, Flux, Wan), in the layout above.

    Captions cycle through ``prompts`` until ``num_samples`` (default: one per prompt). Each batch's prompts are
    encoded once with the pipeline's ``encode_prompt`` (``max_sequence_length``: default the pipeline's); the same
    embeddings feed the pipeline and are stored beside the latents it returns (``output_type='latent'``: the
    transformer's space; FLUX's packed tokens unpacked to [C, H, W]). ``guidance_scale``: classifier-free guidance
    with the empty negative prompt (stored for the protocol's guidance), or FLUX.1-dev's distilled guidance (stored
    per row). ``height`` / ``width`` / ``num_frames`` (Wan): default the pipeline's. Seeds: batch b uses
    ``seed * 100_003 + b``.
    """
    from tqdm import tqdm

    kind = type(pipe).__name__
    if kind not in SYNTH_PIPELINES:
        raise ValueError(f"synth: {kind} is not allowed; use one of {', '.join(SYNTH_PIPELINES)}")
    n = num_samples or len(prompts)
    if n < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    max_len = max_sequence_length or SYNTH_PIPELINES[kind]
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    rows: dict[str, list] = {"latents": []}
    negative = None
    device = pipe._execution_device
    pipe.set_progress_bar_config(disable=True)
    size = {"height": height, "width": width, **({"num_frames": num_frames} if kind == "WanPipeline" else {})}
    for b in tqdm(range(0, n, batch_size), disable=not progress, desc="synth"):
        batch = chosen[b:b + batch_size]
        cond, neg, extra = _encode(pipe, batch, device, max_len, guidance_scale)
        g = torch.Generator(device="cpu").manual_seed(seed * 100_003 + b // batch_size)
        call = {k: v for k, v in cond.items() if k != "guidance"}
        call.update({f"negative_{k}": v for k, v in (neg or {}).items()})
        result = pipe(**call, **extra, **size, num_inference_steps=steps, guidance_scale=guidance_scale,
                      output_type="latent", generator=g)
        x = result.frames if kind == "WanPipeline" else result.images
        if kind == "FluxPipeline":
            h = height or pipe.default_sample_size * pipe.vae_scale_factor
            w = width or pipe.default_sample_size * pipe.vae_scale_factor
            x = type(pipe)._unpack_latents(x, h, w, pipe.vae_scale_factor)
        rows["latents"].append(x.float().cpu())
        for k, v in cond.items():
            rows.setdefault(k, []).append(v.cpu() if k.endswith("mask") else v.float().cpu())
        negative = negative or ({k: (v[:1].cpu() if k.endswith("mask") else v[:1].float().cpu())
                                 for k, v in neg.items()} if neg else None)
    arrays = {k: torch.cat(v) for k, v in rows.items()}
    negatives = {f"negative_{k}": v for k, v in (negative or {}).items()}
    save_caption_latents(out, arrays.pop("latents"), arrays.pop("prompt_embeds"), prompts=chosen,
                         **{k: v for k, v in arrays.items()}, **negatives)
    return out
