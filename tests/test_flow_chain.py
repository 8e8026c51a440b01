"""The whole chain for each flow-matching family (SD3, Flux, Wan), offline with tiny random diffusers models:
a pipeline folder as the teacher, caption data synthesised from the teacher itself (SD3, Flux: its own Euler
samples for random prompt embeddings; Wan: ``ditgraft synth --prompts`` with its pipeline's text encoder), stored
as a caption .npz, then ``run_pipeline`` (Wan: ``ditgraft graft RECIPE.yaml``): stage 1
(split joint-attention slots included), stage 2 with the flow loss, the student saved, protocol sampling and
evaluation through the family seam (SD3, Flux); the reloaded student then runs in the family's diffusers pipeline
with precomputed prompt embeddings and gives ditgraft's own protocol samples. Wan grafts its video self-attention
(``mha`` self-graft from the teacher's projections, ``linear_attn``) and its feed-forwards."""
from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers_helpers import CAPTION_DIM, POOLED_DIM, TOKENS, tiny_flux, tiny_sd3, tiny_wan  # noqa: E402
from latent_helpers import TinyFeatures  # noqa: E402

N = 12  # caption rows: 8 train + 4 validation for stage 1


def _vae(shift: float, scale: float):
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                                   shift_factor=shift, scaling_factor=scale).eval()


def _embeddings(family: str, n: int, seed: int) -> dict:
    """Random prompt embeddings as the family's pipeline's ``encode_prompt`` returns them (and a negative)."""
    g = torch.Generator().manual_seed(seed)
    out = {"prompt_embeds": torch.randn(n, TOKENS, CAPTION_DIM, generator=g),
           "negative_prompt_embeds": torch.randn(1, TOKENS, CAPTION_DIM, generator=g)}
    if family in ("sd3", "flux"):
        out["pooled_prompt_embeds"] = torch.randn(n, POOLED_DIM, generator=g)
        out["negative_pooled_prompt_embeds"] = torch.randn(1, POOLED_DIM, generator=g)
    if family == "flux":
        out["guidance"] = 3.5  # FLUX.1-dev's distilled guidance, the same for every row
        del out["negative_prompt_embeds"], out["negative_pooled_prompt_embeds"]  # no true CFG for a guided model
    return out


FAMILIES = {
    # teacher, scheduler, VAE, grafts, eval
    "sd3": (tiny_sd3, lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), lambda: _vae(0.0609, 1.5305),
            [{"slot": "attn", "layers": [0], "operator": "mha"},  # split slot: stage 1 on the joint attention
             {"slot": "mlp", "layers": [1], "operator": "mlp", "options": {"ratio": 2}}], 2.0),
    "flux": (tiny_flux, lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
             lambda: _vae(0.1159, 0.3611),
             [{"slot": "attn", "layers": [1], "operator": "rope_mha", "options": {"axes_dims": [2, 2, 4]}}], 1.0),
    "wan": (tiny_wan, lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), None,
            [{"slot": "attn", "layers": [0], "operator": "mha", "init": "teacher"},  # self-graft: no qk-norm, no RoPE
             {"slot": "attn", "layers": [1], "operator": "linear_attn"},  # video self-attention -> linear attention
             {"slot": "mlp", "layers": [0, 1], "operator": "mlp", "options": {"ratio": 2}}], None),
}


def _teacher_folder(family: str, d) -> str:
    build, scheduler, vae, _, _ = FAMILIES[family]
    build().save_pretrained(str(d / "teacher" / "transformer"))
    scheduler().save_pretrained(str(d / "teacher" / "scheduler"))
    if vae is not None:
        vae().save_pretrained(str(d / "vae"))
    return str(d / "teacher")


WORDS = ["<pad>", "</s>", "<unk>", "a", "cat", "dog", "red", "blue", "photo", "of"]


def _wan_pipeline_folder(d) -> str:
    """A WanPipeline with a word-level tokenizer and a one-layer umT5 encoder (E = CAPTION_DIM), saved to d."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS), d_model=CAPTION_DIM, d_kv=8, d_ff=32, num_layers=1,
                                          num_heads=2)).eval()
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval()
    pipe = diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=tiny_wan(),
                                 scheduler=FAMILIES["wan"][1]())
    pipe.save_pretrained(str(d / "teacher"))
    return str(d / "teacher")


def _synth_data(family: str, teacher_dir: str, path: str) -> str:
    """Caption data from the teacher: its own Euler samples (4 steps) for random prompt embeddings."""
    from ditgraft.data.captions import save_caption_latents
    from ditgraft.diffusion.samplers import SamplingConfig
    from ditgraft.eval.sampling import generate
    from ditgraft.models.families import family_of, load_diffusers

    teacher = load_diffusers(teacher_dir)
    emb = _embeddings(family, N, 0)
    keys = family_of(teacher).caption_keys(teacher)
    rows = [emb[k] if k != "guidance" else torch.full((N,), emb[k]) for k in keys]
    latents, _ = generate(teacher, N, SamplingConfig(sampler="euler", steps=4, cfg_scale=1.0), batch_size=6,
                          raw=True, captions=tuple(rows))
    save_caption_latents(path, torch.from_numpy(latents), emb.pop("prompt_embeds"), embed_dtype="float32", **emb)
    return path


@pytest.mark.parametrize("family", list(FAMILIES))
def test_flow_family_chain(family, tmp_path, monkeypatch):
    from ditgraft.api import run_pipeline, sample
    from ditgraft.data.captions import caption_keys, load_caption_latents, load_negative
    from ditgraft.diffusion.samplers import SamplingConfig
    from ditgraft.eval import adm, evaluate
    from ditgraft.eval.sampling import generate
    from ditgraft.graft.surgery import load_grafted
    from ditgraft.models.families import family_of
    from ditgraft.utils import read_json

    from ditgraft.cli import main

    _, _, vae_fn, grafts, cfg = FAMILIES[family]
    if family == "wan":  # the command line: `ditgraft synth PIPELINE --prompts` encodes and samples with the teacher
        teacher_dir = _wan_pipeline_folder(tmp_path)
        (tmp_path / "prompts.txt").write_text("a red cat\na blue dog\nphoto of a cat\n")
        data = str(tmp_path / "pairs.npz")
        assert main(["synth", teacher_dir, "--prompts", str(tmp_path / "prompts.txt"), "--num-samples", str(N),
                     "--steps", "4", "--batch-size", "6", "--cfg", "1.0", "--height", "32", "--width", "32",
                     "--frames", "9", "--max-tokens", str(TOKENS), "--out", data, "--device", "cpu"]) == 0
        with np.load(data) as f:
            assert f["latents"].shape == (N, 16, 3, 4, 4) and f["prompt_embeds"].shape == (N, TOKENS, CAPTION_DIM)
            assert list(f["prompts"][:4]) == ["a red cat", "a blue dog", "photo of a cat", "a red cat"]
    else:
        teacher_dir = _teacher_folder(family, tmp_path)
        data = _synth_data(family, teacher_dir, str(tmp_path / "pairs.npz"))
    latents, cond = load_caption_latents(data)
    assert len(latents) == N and torch.isfinite(latents).all()
    recipe = {
        "name": f"tiny_{family}", "teacher": {"source": f"diffusers:{teacher_dir}"}, "grafts": grafts,
        "stage1": {"data": data, "samples": 8, "val_samples": 4, "steps": 4, "batch_size": 4, "eval_every": 2,
                   "extract_batch_size": 4},
        "stage2": {"data": data, "steps": 2, "batch_size": 4, "ckpt_every": 2},
        "eval": {"enabled": False}, "device": "cpu"}
    if cfg is not None:  # SD3 and Flux: the quick protocol on VAE-decoded samples (a tiny feature network)
        rng = np.random.default_rng(0)
        ref = adm.save_reference_batch(str(tmp_path / "ref.npz"), rng.integers(0, 256, (8, 16, 16, 3), np.uint8))
        net = TinyFeatures()
        monkeypatch.setattr(evaluate, "inception_network", lambda weights=None, device="cpu": net)
        recipe["eval"] = {"num": 10, "steps": 2, "sampler": "euler", "cfg_scale": cfg, "batch_size": 5,
                          "vae": str(tmp_path / "vae"), "features": "inception", "reference": str(ref)}
    run = tmp_path / "run"
    if family == "wan":  # the command line: `ditgraft graft RECIPE.yaml` (the same run_graft call)
        import yaml

        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        assert main(["graft", str(tmp_path / "recipe.yaml"), "--run-dir", str(run), "--quiet"]) == 0
        assert (run / "report.md").exists()
    else:
        assert run_pipeline(recipe, run, device="cpu")
    summary = read_json(str(run / "stage1" / "summary.json"))
    slots = {f"{g['slot']}{layer}" for g in grafts for layer in g["layers"]}
    assert set(summary["operators"]) == slots
    assert all(np.isfinite(v["val_mse"]) for v in summary["operators"].values())
    if cfg is not None:
        for tag in ("grafted", "teacher"):
            m = read_json(str(run / "eval" / f"{tag}_metrics.json"))
            assert m["num"] == 10 and np.isfinite(m["fid"]) and m["protocol"]["sampler"] == "euler"
            with np.load(str(run / "eval" / f"{tag}.npz")) as f:
                assert f["arr_0"].shape == (10, 16, 16, 3) and f["arr_1"].tolist() == [i % N for i in range(10)]

    student, meta = load_grafted(str(run / "student.safetensors"))
    fam = family_of(student)
    assert fam.name == family and meta["recipe"]["name"] == f"tiny_{family}"
    assert caption_keys(data) == fam.caption_keys(student)

    # protocol sampling through the seam (caption i of the run's data, its negative prompt for guidance, the
    # family's Euler sampler with the teacher pipeline's shift) == the family's diffusers pipeline with those
    # precomputed embeddings and the same initial noise
    steps, n = 3, 2
    scale = cfg or 5.0
    if cfg is not None:  # decoded by the VAE (its shift and scale), the sampler defaulting to euler
        images, _ = sample(student, n, steps=2, cfg_scale=cfg, batch_size=n, vae=str(tmp_path / "vae"),
                           captions=data)
        assert images.shape == (n, 16, 16, 3) and images.dtype == np.uint8
        out_dir = tmp_path / "samples"  # `ditgraft sample`: the same samples from the command line
        assert main(["sample", str(run / "student.safetensors"), "--captions", data, "--vae", str(tmp_path / "vae"),
                     "--num-samples", str(n), "--steps", "2", "--cfg", str(cfg), "--batch-size", str(n), "--out",
                     str(out_dir), "--device", "cpu"]) == 0
        with np.load(str(out_dir / "samples.npz")) as f:
            np.testing.assert_array_equal(f["arr_0"], images)
    raw, labels = generate(student, n, SamplingConfig(sampler="euler", steps=steps, cfg_scale=scale), seed=0,
                           batch_size=n, raw=True, captions=data)
    assert labels.tolist() == [0, 1]
    g = torch.Generator().manual_seed(0)  # generate seeds batch 0 with seed * 100_003 + 0
    scheduler = FAMILIES[family][1]()
    negative = load_negative(data)
    if family == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(transformer=student, scheduler=scheduler, vae=vae_fn(),
                                                  text_encoder=None, tokenizer=None, text_encoder_2=None,
                                                  tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
        kw = dict(prompt_embeds=cond[0][:n], pooled_prompt_embeds=cond[1][:n],
                  negative_prompt_embeds=negative[0].expand(n, -1, -1),
                  negative_pooled_prompt_embeds=negative[1].expand(n, -1), guidance_scale=scale, height=16, width=16)
    elif family == "flux":
        pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=vae_fn(), text_encoder=None, tokenizer=None,
                                      text_encoder_2=None, tokenizer_2=None, transformer=student)
        kw = dict(prompt_embeds=cond[0][:n], pooled_prompt_embeds=cond[1][:n], guidance_scale=float(cond[2][0]),
                  height=16, width=16)
    else:
        vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                         temperal_downsample=[False, True, True]).eval()
        pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=student,
                                     scheduler=scheduler)
        kw = dict(prompt_embeds=cond[0][:n], negative_prompt_embeds=negative[0].expand(n, -1, -1),
                  guidance_scale=scale, height=32, width=32, num_frames=9)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**kw, num_inference_steps=steps, output_type="latent", generator=g)
    lat = out.frames if family == "wan" else out.images
    if family == "flux":
        lat = diffusers.FluxPipeline._unpack_latents(lat, 16, 16, pipe.vae_scale_factor)
    diff = float((torch.from_numpy(raw) - lat).abs().max())
    print(f"{family}: ditgraft protocol samples vs the diffusers pipeline: max abs diff {diff:.2e}")
    assert diff < 1e-4, diff
    decoded = pipe(**kw, num_inference_steps=steps, output_type="pt", generator=torch.Generator().manual_seed(0))
    pixels = decoded.frames if family == "wan" else decoded.images
    assert torch.isfinite(pixels).all()


def test_flow_family_refusals_before_any_work(tmp_path):
    """Data holding another family's conditioning, a sampler of the other objective and evaluation for a family
    without it: one line each, before a stage writes anything."""
    from ditgraft.api import run_pipeline
    from ditgraft.data.captions import save_caption_latents
    from ditgraft.utils import InputError

    teacher_dir = _teacher_folder("sd3", tmp_path)
    pixart_style = str(tmp_path / "pixart.npz")
    save_caption_latents(pixart_style, torch.randn(N, 4, 8, 8), torch.randn(N, TOKENS, CAPTION_DIM),
                         torch.ones(N, TOKENS, dtype=torch.long))
    good = _synth_data("sd3", teacher_dir, str(tmp_path / "pairs.npz"))

    def recipe(data, **eval_kw):
        return {"name": "refuse", "teacher": {"source": f"diffusers:{teacher_dir}"},
                "grafts": [{"slot": "attn", "layers": [0], "operator": "mha"}],
                "stage1": {"data": data, "samples": 8, "val_samples": 4, "steps": 2},
                "stage2": {"data": data, "steps": 2}, "eval": {"enabled": False, **eval_kw}, "device": "cpu"}

    run = tmp_path / "run"
    with pytest.raises(InputError, match="the sd3 family trains on a caption .npz holding prompt_embeds, "
                                         "pooled_prompt_embeds.*this one holds prompt_embeds, prompt_attention_mask"):
        run_pipeline(recipe(pixart_style), run, device="cpu")
    with pytest.raises(InputError, match="eval.sampler='ddim' does not sample the sd3 family's flow-matching "
                                         "objective; allowed: euler"):
        run_pipeline(recipe(good, enabled=True, features="inception", reference=good), run, device="cpu")
    hyena = recipe(good)
    hyena["grafts"][0]["operator"] = "hyena_x"
    with pytest.raises(InputError, match="operator 'hyena_x' for attn of block 0 cannot be the image-to-image part "
                                         "of the sd3 family's joint attention.*allowed: .*local2d, mha"):
        run_pipeline(hyena, run, device="cpu")
    assert not (run / "stage1").exists()

    wan_dir = _teacher_folder("wan", tmp_path / "w")
    wan = recipe(good, enabled=True)
    wan["teacher"]["source"] = f"diffusers:{wan_dir}"
    wan["grafts"] = [{"slot": "mlp", "layers": [0], "operator": "mlp"}]
    with pytest.raises(InputError, match="eval.enabled: the wan family does not support eval"):
        run_pipeline(wan, tmp_path / "run_wan", device="cpu")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_activation_checkpointing_of_a_grafted_diffusers_student(family, tmp_path):
    """``activation_checkpointing`` turns on diffusers' own block recomputation; a split-slot student trained with
    it takes the same steps (stage 2 through the shared loop), Flux's single-stream split slot included."""
    from ditgraft.graft.stage2 import run_stage2
    from ditgraft.graft.surgery import ResolvedGraft, graft_model
    from ditgraft.models.families import family_of
    from ditgraft.recipe import Stage2

    teacher = FAMILIES[family][0]()
    op = ("mha", {}) if family == "sd3" else ("rope_mha", {"axes_dims": [2, 2, 4]})
    layers = [0] if family == "sd3" else [0, 2]  # Flux: a double- and a single-stream attention
    grafts = [ResolvedGraft("attn", i, op[0], op[1]) for i in layers]
    emb = _embeddings(family, 8, 0)
    keys = family_of(teacher).caption_keys(teacher)
    cond = tuple(emb[k] if k != "guidance" else torch.full((8,), emb[k]) for k in keys)
    x0 = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    states = []
    for recompute in (False, True):
        student = graft_model(teacher, grafts, seed=0)
        start = {k: v.clone() for k, v in student.state_dict().items()}
        cfg = Stage2(steps=2, batch_size=4, ckpt_every=2, ema_decay=None, warmup_steps=0, lr=1e-3,
                     activation_checkpointing=recompute)
        student, _ = run_stage2(student, cfg, x0, cond, str(tmp_path / str(recompute)), 0, progress=False)
        assert student.gradient_checkpointing is recompute
        states.append(student.state_dict())
        assert max(float((states[-1][k] - start[k]).abs().max()) for k in start) > 1e-4  # the weights moved
    diff = max(float((states[0][k] - states[1][k]).abs().max()) for k in states[0])
    print(f"{family}: recomputed vs stored activations, max abs weight diff after 2 steps {diff:.1e}")
    assert diff < 1e-6


def test_bundled_flow_recipes_plan_their_memory():
    """The bundled SD3 / Flux / Wan recipes validate and ``recipes --show``'s memory line comes from the published
    architecture built on the meta device (parameter counts as published: SD3-medium 2.03B, FLUX.1-dev 11.9B, Wan
    2.1 1.3B 1.42B, PixArt-Sigma 0.61B; SD3.5-medium 2.24B from its config); a local pipeline folder's own config is
    read first."""
    from ditgraft.models.families import diffusers_architecture, family_of
    from ditgraft.recipe import load_recipe
    from ditgraft.graft.plan import recipe_stage2_memory

    counts = {"stabilityai/stable-diffusion-3-medium-diffusers": 2_028_328_000,
              "black-forest-labs/FLUX.1-dev": 11_901_408_320, "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": 1_418_996_800,
              "PixArt-alpha/PixArt-Sigma-XL-2-2048-MS": 610_856_096,
              "stabilityai/stable-diffusion-3.5-medium": 2_243_171_520}
    for source, n in counts.items():
        model = diffusers_architecture(source)
        assert sum(p.numel() for p in model.parameters()) == n and next(model.parameters()).is_meta
    flux = diffusers_architecture("black-forest-labs/FLUX.1-dev")
    assert family_of(flux).activation_layout(flux) == (4096 + 512, 19 + 38)
    for name, family in (("sd3_medium_local2d_50", "sd3"), ("sd35_medium_linear_hybrid", "sd3"),
                         ("flux_dev_mlp_r3_50", "flux"),
                         ("flux_dev_clear_all", "flux"), ("wan21_1p3b_mlp_r3_50", "wan"),
                         ("wan21_1p3b_local3d_50", "wan"), ("wan21_1p3b_linear_50", "wan")):
        recipe = load_recipe(name)
        assert family_of(diffusers_architecture(recipe.teacher.source.split(":", 1)[1])).name == family
        line = recipe_stage2_memory(recipe, 8)
        assert line.startswith("stage 2 expected memory: ") and "GiB per GPU" in line
    # CLEAR in every attention of FLUX.1-dev: 19 double-stream + 38 single-stream split slots, operators that build
    from ditgraft.graft.surgery import check_operators, resolve_grafts
    from ditgraft.models.adapters import slot_depths

    grafts = resolve_grafts(load_recipe("flux_dev_clear_all"), slot_depths(flux))
    assert [g.layer for g in grafts] == list(range(57)) and {g.operator for g in grafts} == {"clear"}
    check_operators(flux, grafts)
    # EDiT's hybrid on SD3.5-medium: linear attention in all 24 split slots, with the teacher's qk-norm kind
    sd35 = diffusers_architecture("stabilityai/stable-diffusion-3.5-medium")
    grafts = resolve_grafts(load_recipe("sd35_medium_linear_hybrid"), slot_depths(sd35))
    assert [g.layer for g in grafts] == list(range(24)) and {g.operator for g in grafts} == {"linear_attn"}
    check_operators(sd35, grafts)
    norm_q = sd35.transformer_blocks[0].attn.norm_q  # per head: the kind linear_attn's qk_norm "rms_norm" copies
    assert type(norm_q).__name__ == "RMSNorm" and norm_q.weight.shape == (64,) and grafts[0].options["qk_norm"] == "rms_norm"
    assert diffusers_architecture("someone/unknown-model") is None
    wan = diffusers_architecture("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert family_of(wan).dims(wan).grid == (21, 30, 52)  # 32,760 video tokens, (frames, rows, columns)
    assert family_of(wan).activation_layout(wan) == (32_760, 30)


@pytest.mark.parametrize("name", ["wan21_1p3b_local3d_50", "wan21_1p3b_linear_50"])
def test_bundled_wan_attention_recipes_show_and_build(name, capsys):
    """``ditgraft recipes --show NAME --gpus 8`` prints the resolved recipe and its memory per GPU; the grafts
    resolve to the odd blocks of the 30 and their operators build at Wan 2.1 1.3B's sizes on its (frames, rows,
    columns) grid (the meta device: no weights)."""
    from ditgraft.cli import main
    from ditgraft.graft.surgery import check_operators, resolve_grafts
    from ditgraft.models.families import diffusers_architecture
    from ditgraft.recipe import load_recipe

    assert main(["recipes", "--show", name, "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert f"name: {name}" in out and "# stage 2 expected memory: " in out and "GiB per GPU" in out
    assert "bf16, activation checkpointing on" in out
    recipe = load_recipe(name)
    assert recipe.stage1.cache == "stream" and recipe.grafts[0].init == "teacher" and recipe.grafts[0].loss == "l1"
    wan = diffusers_architecture(recipe.teacher.source.split(":", 1)[1])
    grafts = resolve_grafts(recipe, 30)
    assert [g.layer for g in grafts] == list(range(1, 30, 2)) and {g.slot for g in grafts} == {"attn"}
    check_operators(wan, grafts)


def _word_tokenizer(max_len: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_len)


def _clip(cls, hidden: int, **kw):
    from transformers import CLIPTextConfig

    torch.manual_seed(0)
    return cls(CLIPTextConfig(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8, eos_token_id=1,
                              pad_token_id=0, bos_token_id=1, **kw)).eval()


def _t5(d: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(1)
    return T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=d, d_kv=8, d_ff=32, num_layers=1,
                                   num_heads=2)).eval()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_synth_from_sd3_and_flux_pipelines(family, tmp_path):
    """``synth_captions`` on tiny SD3 (two CLIPs + T5: 8 + 6 tokens) and Flux (CLIP pooled + T5) pipelines: the
    stored arrays are the family's caption keys, the embeddings are the pipeline's own encoding (float16), Flux's
    latents are unpacked and its distilled guidance stored per row, SD3 keeps the empty prompt's pair for guidance."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ditgraft.data.captions import caption_keys, load_caption_latents, load_negative, synth_captions
    from ditgraft.models.families import family_of

    build, scheduler, vae_fn, _, _ = FAMILIES[family]
    if family == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=build(), scheduler=scheduler(), vae=vae_fn(),
            text_encoder=_clip(CLIPTextModelWithProjection, 8, projection_dim=8), tokenizer=_word_tokenizer(8),
            text_encoder_2=_clip(CLIPTextModelWithProjection, 8, projection_dim=8), tokenizer_2=_word_tokenizer(8),
            text_encoder_3=_t5(CAPTION_DIM), tokenizer_3=_word_tokenizer(8))
    else:
        pipe = diffusers.FluxPipeline(scheduler=scheduler(), vae=vae_fn(),
                                      text_encoder=_clip(CLIPTextModel, POOLED_DIM), tokenizer=_word_tokenizer(8),
                                      text_encoder_2=_t5(CAPTION_DIM),
                                      tokenizer_2=_word_tokenizer(8), transformer=build())
    prompts = ["a red cat", "a blue dog", "photo of a cat"]
    out = synth_captions(pipe, prompts, str(tmp_path / "pairs.npz"), num_samples=4, steps=2, batch_size=2,
                         guidance_scale=3.5, height=16, width=16, max_sequence_length=6, progress=False)
    latents, cond = load_caption_latents(out)
    assert caption_keys(out) == family_of(pipe.transformer).caption_keys(pipe.transformer)
    assert latents.shape == (4, 4, 8, 8) and torch.isfinite(latents).all()
    if family == "sd3":
        emb, _, pooled, _ = pipe.encode_prompt(prompts[1:3], None, None, max_sequence_length=6)
        assert cond[0].shape == (4, 8 + 6, CAPTION_DIM)
        assert [tuple(t.shape) for t in load_negative(out)] == [(1, 14, CAPTION_DIM), (1, POOLED_DIM)]
    else:
        emb, pooled, _ = pipe.encode_prompt(prompts[1:3], None, max_sequence_length=6)
        assert cond[2].tolist() == [3.5] * 4 and load_negative(out) is None
    torch.testing.assert_close(cond[0][1:3], emb, atol=2e-3, rtol=2e-3)  # stored as float16
    torch.testing.assert_close(cond[1][1:3], pooled, atol=1e-6, rtol=0)
