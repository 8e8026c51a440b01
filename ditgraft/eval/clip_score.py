"""CLIP score: text-image alignment of a text-to-image model's samples (Hessel et al., 2021, "CLIPScore"; the form
torchmetrics computes).

    clip_score = mean over pairs of 100 * max(cos(E_image(image_i), E_text(caption_i)), 0)

E_image and E_text are a CLIP model's projected image and text embeddings. Images go in as CLIP's processor prepares
them, written here on tensors: shorter side resized to the model's image size (bicubic, antialiased), centre crop,
[0, 1] scale, normalised with CLIP's mean and std. The model is a ``transformers`` CLIPModel folder or hub id with its
tokenizer (the usual one: ``openai/clip-vit-base-patch32``).

``caption_metrics`` is the hook a text-to-image evaluation calls: ``{"clip_score": ...}`` when a CLIP model is given,
``{}`` when not.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_score_from_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """100 * max(cos, 0) averaged over the pairs (row i of each); embeddings [N, D] need not be normalised."""
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"image and text embeddings must both be [N, D]; got {tuple(image_emb.shape)} and "
                         f"{tuple(text_emb.shape)}")
    cos = F.cosine_similarity(image_emb.double(), text_emb.double(), dim=-1)
    return float((100.0 * cos.clamp(min=0.0)).mean())


def to_pixels(images) -> torch.Tensor:
    """uint8 [N, H, W, 3] (numpy or torch) or floats in [0, 1] [N, 3, H, W] -> float [N, 3, H, W] in [0, 1]."""
    x = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
    if x.dtype == torch.uint8:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"uint8 images must be [N, H, W, 3]; got {tuple(x.shape)}")
        return x.permute(0, 3, 1, 2).float() / 255.0
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"float images must be [N, 3, H, W] in [0, 1]; got {tuple(x.shape)}")
    return x.float().clamp(0.0, 1.0)


def preprocess(images, size: int) -> torch.Tensor:
    """CLIP's image preparation on tensors: resize the shorter side to ``size``, centre crop, normalise."""
    x = to_pixels(images)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class CLIPScorer:
    """A CLIP model and its tokenizer, loaded once; ``scorer(images, captions)`` is the CLIP score."""

    def __init__(self, model: str = DEFAULT_CLIP, device: str = "cpu"):
        try:
            from transformers import AutoTokenizer, CLIPModel
        except ImportError as err:
            raise ImportError("clip_score needs transformers: pip install 'ditgraft[diffusers]'") from err
        self.device = device
        self.model = CLIPModel.from_pretrained(model).eval().to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def image_embeddings(self, images, batch_size: int = 32) -> torch.Tensor:
        pixels = preprocess(images, self.image_size)
        out = []
        for i in range(0, len(pixels), batch_size):
            pooled = self.model.vision_model(pixel_values=pixels[i:i + batch_size].to(self.device)).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_embeddings(self, captions: list[str], batch_size: int = 32) -> torch.Tensor:
        out = []
        for i in range(0, len(captions), batch_size):
            tok = self.tokenizer(list(captions[i:i + batch_size]), padding=True, truncation=True,
                                 max_length=self.max_tokens, return_tensors="pt")
            pooled = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                           attention_mask=tok["attention_mask"].to(self.device)).pooler_output
            out.append(self.model.text_projection(pooled).float().cpu())
        return torch.cat(out)

    def __call__(self, images, captions: list[str], batch_size: int = 32) -> float:
        if len(images) != len(captions):
            raise ValueError(f"clip_score: {len(images)} images but {len(captions)} captions; give one per image")
        if not len(captions):
            raise ValueError("clip_score: no images to score")
        return clip_score_from_embeddings(self.image_embeddings(images, batch_size),
                                          self.text_embeddings(captions, batch_size))


def clip_score(images, captions: list[str], model: str = DEFAULT_CLIP, device: str = "cpu") -> float:
    return CLIPScorer(model, device)(images, captions)


def caption_metrics(images, captions: list[str], clip: str | CLIPScorer | None) -> dict:
    """The text-to-image evaluation's hook: ``{"clip_score": ...}`` (a CLIP folder, hub id or loaded scorer), or
    ``{}`` without one."""
    if clip is None:
        return {}
    scorer = clip if isinstance(clip, CLIPScorer) else CLIPScorer(clip)
    return {"clip_score": scorer(images, captions)}
