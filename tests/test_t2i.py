"""Text-to-image grafting end to end: `ditgraft synth --prompts` from a tiny PixArt-Sigma pipeline, then a recipe
with a diffusers teacher (stage 1 on caption latents, stage 2 with LoRA), the student back in the pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from diffusers_helpers import tiny_pixart  # noqa: E402
from helpers import tiny_vae  # noqa: E402

WORDS = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "red", "blue", "photo", "of"]


def tiny_pixart_pipeline():
    """PixArt-Sigma with a word-level tokenizer and a one-layer T5 encoder (E = 16), all from kwargs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    encoder = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                      num_heads=2)).eval()
    return diffusers.PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=tiny_vae(),
                                         transformer=tiny_pixart(), scheduler=diffusers.DPMSolverMultistepScheduler())


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pixart")
    tiny_pixart_pipeline().save_pretrained(str(d))
    return str(d)


def test_synth_then_graft_recipe_with_lora(pipeline_dir, tmp_path):
    from ditgraft.cli import main
    from ditgraft.data.captions import load_caption_latents, load_negative
    from ditgraft.graft.pipeline import run_graft
    from ditgraft.graft.surgery import load_grafted
    from ditgraft.models.families import family_of
    from ditgraft.recipe import parse_recipe

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\na blue dog\nphoto of a cat\n")
    out = str(tmp_path / "pairs.npz")
    assert main(["synth", pipeline_dir, "--prompts", str(prompts), "--num-samples", "20", "--steps", "2",
                 "--batch-size", "8", "--cfg", "4.5", "--max-tokens", "8", "--out", out, "--device", "cpu"]) == 0
    x, (emb, mask) = load_caption_latents(out)
    # 8 caption tokens, of which at most 4 are real ("photo of a cat"): the padding-only tail is dropped
    assert x.shape == (20, 4, 8, 8) and emb.shape == (20, 4, 16) and mask.shape == (20, 4)
    assert mask.sum(1).tolist()[:3] == [3, 3, 4]
    with np.load(out) as f:
        assert list(f["prompts"][:4]) == ["a red cat", "a blue dog", "photo of a cat", "a red cat"]
    # the stored embeddings are the pipeline's own text encoding of each caption
    pipe = diffusers.DiffusionPipeline.from_pretrained(pipeline_dir)
    pe, pm, _, _ = pipe.encode_prompt(["a blue dog"], device="cpu", max_sequence_length=8)
    torch.testing.assert_close(emb[1:2], pe[:, :4], atol=2e-3, rtol=2e-3)  # stored as float16
    torch.testing.assert_close(mask[1:2], pm[:, :4].long())
    assert not pm[:, 4:].any()
    neg_emb, neg_mask = load_negative(out)

    recipe = parse_recipe({
        "name": "tiny_pixart", "teacher": {"source": f"diffusers:{pipeline_dir}"},
        "grafts": [{"slot": "attn", "layers": [1, 3], "operator": "hyena_x"}],
        "stage1": {"data": out, "samples": 14, "val_samples": 6, "steps": 4, "batch_size": 7, "eval_every": 2,
                   "extract_batch_size": 7},
        "stage2": {"data": out, "steps": 2, "batch_size": 4, "ckpt_every": 2, "lora": {"rank": 4, "alpha": 4}},
        "eval": {"enabled": False}, "device": "cpu"}, "test")
    run_dir = str(tmp_path / "run")
    report = run_graft(recipe, run_dir, stages=("stage1", "stage2", "report"), device="cpu", progress=False,
                       log=lambda *_: None)
    assert report  # the report (FLOP accounting through the family) was written
    student, meta = load_grafted(f"{run_dir}/student.safetensors")
    assert type(student) is diffusers.PixArtTransformer2DModel and meta["recipe"]["stage2"]["lora"]["rank"] == 4
    assert family_of(student).name == "pixart"
    pipe.transformer = student
    pipe.set_progress_bar_config(disable=True)
    images = pipe(negative_prompt=None, prompt_embeds=emb[:2], prompt_attention_mask=mask[:2],
                  negative_prompt_embeds=neg_emb.expand(2, -1, -1),
                  negative_prompt_attention_mask=neg_mask.expand(2, -1),
                  num_inference_steps=2, use_resolution_binning=False, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_prompts_file_errors(tmp_path):
    from ditgraft.data.captions import read_prompts

    with pytest.raises(FileNotFoundError, match="one prompt per line"):
        read_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        read_prompts(str(tmp_path / "empty.txt"))
