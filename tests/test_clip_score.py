"""CLIP score: the formula against hand computations, and a tiny grafted PixArt's samples scored by a tiny random
CLIP model (built from a config with a word-level tokenizer, saved to a folder and loaded as a user's would be)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ditgraft.eval.clip_score import (CLIP_MEAN, CLIP_STD, CLIPScorer, caption_metrics, clip_score_from_embeddings,
                                      preprocess)


def test_formula_by_hand():
    e = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    assert clip_score_from_embeddings(e, 3 * e) == pytest.approx(100.0)  # identical directions
    assert clip_score_from_embeddings(e, e.flip(0)) == pytest.approx(0.0)  # orthogonal pairs
    assert clip_score_from_embeddings(e, -e) == pytest.approx(0.0)  # negative cosines count as 0
    t = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])  # cos 1/sqrt(2) and 1
    assert clip_score_from_embeddings(e, t) == pytest.approx(100 * (1 / math.sqrt(2) + 1) / 2)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        clip_score_from_embeddings(e, t[:1])


def test_score_drops_when_captions_are_shuffled():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(8, 16, generator=g)
    image = text + 0.3 * torch.randn(8, 16, generator=g)  # each image near its own caption
    matched = clip_score_from_embeddings(image, text)
    shuffled = clip_score_from_embeddings(image, text.roll(1, 0))
    assert matched > 90 and shuffled < 40, (matched, shuffled)


def test_preprocess_resizes_crops_and_normalises():
    img = np.zeros((2, 20, 40, 3), np.uint8)
    img[..., 0] = 255
    x = preprocess(img, 8)
    assert x.shape == (2, 3, 8, 8)
    red = torch.tensor([(1 - CLIP_MEAN[0]) / CLIP_STD[0], -CLIP_MEAN[1] / CLIP_STD[1], -CLIP_MEAN[2] / CLIP_STD[2]])
    torch.testing.assert_close(x[0, :, 3, 3], red)
    torch.testing.assert_close(preprocess(torch.from_numpy(img).permute(0, 3, 1, 2) / 255.0, 8), x)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        preprocess(img[..., :2], 8)


WORDS = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "red", "blue", "photo", "of"]
CAPTIONS = ["a photo of a red cat", "a blue dog", "a photo of a dog", "red cat"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    d = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    return str(d)


def test_tiny_grafted_pixart_samples_get_a_clip_score(tiny_clip):
    pytest.importorskip("diffusers")
    from test_t2i import tiny_pixart_pipeline

    from ditgraft.graft.surgery import ResolvedGraft, graft_model

    pipe = tiny_pixart_pipeline()
    pipe.transformer = graft_model(pipe.transformer, [ResolvedGraft("attn", 1, "hyena_x")], seed=0)
    size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    images = pipe(CAPTIONS, num_inference_steps=2, height=size, width=size, use_resolution_binning=False,
                  output_type="np", generator=torch.Generator().manual_seed(0), max_sequence_length=8).images
    assert images.shape == (len(CAPTIONS), size, size, 3)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)  # [0, 1] floats
    scorer = CLIPScorer(tiny_clip)
    metrics = caption_metrics(pixels, CAPTIONS, scorer)
    assert set(metrics) == {"clip_score"} and 0.0 <= metrics["clip_score"] <= 100.0, metrics
    # the same number by hand from the two embeddings
    img, txt = scorer.image_embeddings(pixels), scorer.text_embeddings(CAPTIONS)
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert metrics["clip_score"] == pytest.approx(float((100 * cos.clamp(min=0)).mean()), rel=1e-5)
    assert caption_metrics(pixels, CAPTIONS, None) == {}
    with pytest.raises(ValueError, match="4 images but 3 captions"):
        scorer(pixels, CAPTIONS[:3])
