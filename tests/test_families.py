"""Model families: grafting diffusers DiT and PixArt models in place (tiny random models from kwargs, offline)."""
from __future__ import annotations

import pytest
import torch

from ditgraft.graft.stage1 import load_best_operators, run_stage1
from ditgraft.graft.stage2 import run_stage2
from ditgraft.graft.surgery import ResolvedGraft, graft_model, load_grafted, save_grafted
from ditgraft.models.adapters import get_slot, model_dims
from ditgraft.models.families import family_of
from ditgraft.models.families.base import SlotAdapter
from ditgraft.recipe import Lora, Stage1, Stage2

diffusers = pytest.importorskip("diffusers")

from diffusers_helpers import (  # noqa: E402
    CAPTION_DIM, TOKENS, captions, latents, tiny_diffusers_dit, tiny_pixart)
from helpers import tiny_vae  # noqa: E402


def _block_io(model, family, x, t, cond):
    """(args, kwargs, output) of every transformer block in one forward."""
    seen = {}
    handles = [b.register_forward_hook(lambda m, a, k, o, i=i: seen.__setitem__(i, (a, k, o)), with_kwargs=True)
               for i, b in enumerate(model.transformer_blocks)]
    with torch.no_grad():
        family.forward(model, x, t, cond)
    for h in handles:
        h.remove()
    return seen


def test_family_dispatch_and_dims():
    p, d = tiny_pixart(), tiny_diffusers_dit()
    assert family_of(p).name == "pixart" and family_of(d).name == "diffusers_dit"
    assert tuple(model_dims(p).__dict__.values()) == (4, 16, 2, (4, 4))
    assert get_slot(p, 1, "attn") is p.transformer_blocks[1].attn1
    assert get_slot(d, 2, "mlp") is d.transformer_blocks[2].ff
    with pytest.raises(ValueError, match="slot='cross'"):
        get_slot(p, 0, "cross")
    with pytest.raises(ValueError, match="layer=4"):
        get_slot(p, 4, "attn")
    with pytest.raises(TypeError, match="not a supported model family"):
        model_dims(torch.nn.Linear(2, 2))


def test_pixart_padded_caption_tokens_do_not_matter():
    """The family passes the caption mask: changing padded embeddings leaves the output unchanged."""
    model, fam = tiny_pixart(), family_of(tiny_pixart())
    emb, mask = captions(3, 0)
    x, t = latents(3, 1), torch.tensor([10, 500, 999])
    emb2 = torch.where(mask[..., None].bool(), emb, torch.randn_like(emb))
    with torch.no_grad():
        a, b = fam.forward(model, x, t, (emb, mask)), fam.forward(model, x, t, (emb2, mask))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(emb, emb2)


def test_pixart_hyena_graft_lora_reload_pipeline(tmp_path):
    teacher = tiny_pixart()
    fam = family_of(teacher)
    grafts = [ResolvedGraft("attn", i, "hyena_x") for i in (1, 3)]
    x0, cond = latents(24, 0), captions(24, 1)
    xv, cond_v = latents(8, 2), captions(8, 3)
    s1 = Stage1(samples=24, val_samples=8, steps=6, batch_size=8, eval_every=3, extract_batch_size=8)
    res = run_stage1(teacher, grafts, s1, x0, cond, xv, cond_v, str(tmp_path / "stage1"), 0, "cpu", progress=False,
                     log=lambda *_: None)
    assert set(res["operators"]) == {"attn1", "attn3"}
    student = graft_model(teacher, grafts, 0)
    load_best_operators(student, grafts, str(tmp_path / "stage1"))
    assert type(student) is type(teacher)
    assert isinstance(student.transformer_blocks[1].attn1, SlotAdapter)
    assert student.transformer_blocks[1].attn2 is not teacher.transformer_blocks[1].attn2  # a copy, not shared
    # untouched layers compute exactly the teacher's function (same inputs -> same outputs)
    x, t = latents(2, 5), torch.tensor([3, 700])
    c = captions(2, 6)
    io_t = _block_io(teacher, fam, x, t, c)
    for i in (0, 2):
        args, kwargs, out = io_t[i]
        with torch.no_grad():
            torch.testing.assert_close(student.transformer_blocks[i](*args, **kwargs), out, rtol=0, atol=0)
    io_s = _block_io(student, fam, x, t, c)
    torch.testing.assert_close(io_s[0][2], io_t[0][2], rtol=0, atol=0)  # before the first graft
    assert not torch.allclose(io_s[1][2], io_t[1][2])

    before = {k: v.clone() for k, v in student.state_dict().items()}
    s2 = Stage2(steps=3, batch_size=4, lr=1e-3, ckpt_every=3, lora=Lora(rank=4, alpha=8))
    merged, history = run_stage2(student, s2, x0, cond, str(tmp_path / "stage2"), 0, progress=False, grafts=grafts)
    assert len(history) > 0 and type(merged) is type(teacher)
    state = merged.state_dict()
    assert set(state) == set(before)  # plain weights: no lora_A / lora_B / base_layer left
    q = "transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(state[q], before[q])  # LoRA merged into an untouched layer
    assert torch.equal(state["pos_embed.proj.weight"], before["pos_embed.proj.weight"])  # no adapter: frozen
    op_keys = [k for k in state if k.startswith("transformer_blocks.1.attn1.op.")]
    assert op_keys and any(not torch.equal(state[k], before[k]) for k in op_keys)  # grafted operator trains fully

    path = str(tmp_path / "student.safetensors")
    save_grafted(path, merged, grafts, {"note": "test"})
    loaded, meta = load_grafted(path)
    assert type(loaded) is diffusers.PixArtTransformer2DModel and meta["family"] == "pixart"
    with torch.no_grad():
        torch.testing.assert_close(fam.forward(loaded, x, t, c), fam.forward(merged, x, t, c))

    vae = tiny_vae()
    pipe = diffusers.PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=loaded,
                                         scheduler=diffusers.DPMSolverMultistepScheduler())
    emb, mask = captions(2, 7)
    neg = torch.zeros(2, TOKENS, CAPTION_DIM), torch.ones(2, TOKENS)
    size = loaded.config.sample_size * pipe.vae_scale_factor
    images = pipe(negative_prompt=None, prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=neg[0],
                  negative_prompt_attention_mask=neg[1], num_inference_steps=2, height=size, width=size,
                  use_resolution_binning=False, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, size, size) and torch.isfinite(images).all()


def test_pixart_self_graft_mha_from_scratch_matches_teacher(tmp_path):
    """Fresh MHA operators distilled into PixArt self-attention reach a tiny relative validation MSE: the captured
    activations are the teacher's own under its caption conditioning."""
    teacher = tiny_pixart(depth=2)
    grafts = [ResolvedGraft("attn", i, "mha", init="random") for i in (0, 1)]
    s1 = Stage1(samples=256, val_samples=32, steps=1000, batch_size=64, lr=1e-2, eval_every=100,
                extract_batch_size=64)
    res = run_stage1(teacher, grafts, s1, latents(256, 0), captions(256, 1), latents(32, 2), captions(32, 3),
                     str(tmp_path), 0, "cpu", progress=False, log=lambda *_: None)
    rel = {k: v["val_rel_mse"] for k, v in res["operators"].items()}
    assert all(r < 1e-3 for r in rel.values()), rel


def test_diffusers_dit_graft_both_stages_reload_pipeline(tmp_path):
    teacher = tiny_diffusers_dit()
    fam = family_of(teacher)
    grafts = [ResolvedGraft("attn", 1, "hyena_x"), ResolvedGraft("mlp", 3, "mlp", {"ratio": 2.0})]
    y, yv = torch.randint(0, 1000, (16,)), torch.randint(0, 1000, (8,))
    s1 = Stage1(samples=16, val_samples=8, steps=4, batch_size=8, eval_every=2, extract_batch_size=8)
    run_stage1(teacher, grafts, s1, latents(16, 0), y, latents(8, 1), yv, str(tmp_path / "s1"), 0, "cpu",
               progress=False, log=lambda *_: None)
    student = graft_model(teacher, grafts, 0)
    load_best_operators(student, grafts, str(tmp_path / "s1"))
    s2 = Stage2(steps=2, batch_size=4, ckpt_every=2, ema_decay=0.9)
    student, _ = run_stage2(student, s2, latents(16, 0), y, str(tmp_path / "s2"), 0, progress=False)
    path = str(tmp_path / "student.safetensors")
    save_grafted(path, student, grafts, None)
    loaded, meta = load_grafted(path)
    assert type(loaded) is diffusers.DiTTransformer2DModel and meta["family"] == "diffusers_dit"
    x, t, labels = latents(2, 3), torch.tensor([1, 900]), torch.tensor([5, 1000])
    with torch.no_grad():
        torch.testing.assert_close(fam.forward(loaded, x, t, labels), fam.forward(student, x, t, labels))
    pipe = diffusers.DiTPipeline(transformer=loaded, vae=tiny_vae(), scheduler=diffusers.DDIMScheduler())
    images = pipe(class_labels=[1, 2], num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape[0] == 2 and images.shape[-1] == 3


def test_ditgraft_sampler_runs_diffusers_families():
    """ditgraft's own sampler reaches diffusers models through their family (labels; captions with a negative)."""
    from ditgraft.diffusion.samplers import SamplingConfig, sample

    cfg = SamplingConfig(steps=2, cfg_scale=2.0)
    d = tiny_diffusers_dit(depth=2)
    out = sample(d, torch.tensor([3, 4]), (2, 4, 8, 8), cfg, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    p = tiny_pixart(depth=2)
    with pytest.raises(ValueError, match="negative prompt"):
        sample(p, captions(2, 0), (2, 4, 8, 8), cfg)
    neg = (torch.zeros(2, TOKENS, CAPTION_DIM), torch.ones(2, TOKENS))
    out = sample(p, captions(2, 0), (2, 4, 8, 8), cfg, generator=torch.Generator().manual_seed(0), null_cond=neg)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_lora_merge_keeps_the_function():
    """Merging trained (non-zero) adapters writes plain weights that compute what the adapted model computed."""
    pytest.importorskip("peft")
    from ditgraft.train.lora import add_lora, merge_lora

    model, fam = tiny_pixart(depth=2), family_of(tiny_pixart(depth=2))
    keys = set(model.state_dict())
    op = get_slot(model, 1, "mlp")
    model = add_lora(model, Lora(rank=2, alpha=4), trainable=[op])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("transformer_blocks.1.ff.") for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x, t, c = latents(2, 0), torch.tensor([5, 600]), captions(2, 1)
    with torch.no_grad():
        adapted = fam.forward(model, x, t, c)
        merged = merge_lora(model)
        torch.testing.assert_close(fam.forward(merged, x, t, c), adapted, rtol=1e-4, atol=1e-5)
    assert set(merged.state_dict()) == keys
    with pytest.raises(ValueError, match="target_modules"):
        add_lora(tiny_pixart(depth=2), Lora(target_modules=["no_such_layer"]))


def test_bench_family_pixart_prints_side_by_side(capsys):
    """`bench model --family pixart` at a tiny shape: one row, teacher vs grafted, with the counted FLOP bound."""
    from ditgraft.cli import main

    assert main(["bench", "model", "--family", "pixart", "--blocks", "2", "--dim", "32", "--heads", "2",
                 "--tokens", "64", "--text-tokens", "8", "--repeats", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "FLOP-bound speed-up" in out and "| hyena_x | 64 | 8x8 | 1 |" in out
    from ditgraft.bench.family import bench_family, default_layers

    assert default_layers(28) == [8, 10, 12, 14, 16, 18, 20, 21, 22, 23, 24, 25, 26, 27]
    with pytest.raises(ValueError, match="tokens=60 must be a square"):
        bench_family(blocks=2, heads=2, head_dim=8, tokens=60, repeats=1)
    with pytest.raises(ValueError, match="layers"):
        bench_family(blocks=2, heads=2, head_dim=8, tokens=16, layers=[2], repeats=1)


def test_slot_adapter_sees_the_call_grid_of_any_aspect_ratio():
    """A grafted PixArt runs at a non-square latent: its operators get the call's patch grid (H/p, W/p)."""
    model = tiny_pixart(depth=2)
    grafts = [ResolvedGraft("attn", 0, "local2d")]
    student = graft_model(model, grafts, 0)
    seen = []
    op = get_slot(student, 0, "attn")
    op.register_forward_pre_hook(lambda m, a, k: seen.append(k["grid"]), with_kwargs=True)
    fam = family_of(student)
    with torch.no_grad():
        out = fam.forward(student, torch.randn(1, 4, 8, 12), torch.tensor([10]), captions(1, 0))
    assert out.shape == (1, 8, 8, 12) and seen == [(4, 6)]


def test_pixart_alpha_micro_conditions_come_from_the_sample_size():
    """PixArt-Alpha-style models (use_additional_conditions) get resolution and aspect ratio from x's shape."""
    model = diffusers.PixArtTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=1, num_attention_heads=2,
        attention_head_dim=12, caption_channels=CAPTION_DIM, cross_attention_dim=24, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, use_additional_conditions=True).eval()  # width divisible by 3 (diffusers)
    fam = family_of(model)
    x = latents(2, 0)
    kw = fam.added_cond_kwargs(model, x)
    assert kw["resolution"].tolist() == [[64.0, 64.0]] * 2 and kw["aspect_ratio"].tolist() == [[1.0]] * 2
    with torch.no_grad():
        assert fam.forward(model, x, torch.tensor([1, 2]), captions(2, 0)).shape == (2, 8, 8, 8)


@pytest.mark.parametrize("build", [tiny_pixart, tiny_diffusers_dit])
def test_self_graft_from_teacher_weights_is_the_teacher(build):
    """MHA / MLP built from the diffusers slots' weights (init: teacher) in every layer compute the teacher."""
    teacher = build(depth=2)
    fam = family_of(teacher)
    grafts = [ResolvedGraft(s, i, op, init="teacher") for i in (0, 1) for s, op in (("attn", "mha"), ("mlp", "mlp"))]
    student = graft_model(teacher, grafts, 0)
    assert all(isinstance(b.attn1, SlotAdapter) and isinstance(b.ff, SlotAdapter) for b in student.transformer_blocks)
    x, t = latents(2, 0), torch.tensor([3, 800])
    cond = captions(2, 1) if fam.name == "pixart" else torch.tensor([7, 1000])
    with torch.no_grad():
        torch.testing.assert_close(fam.forward(student, x, t, cond), fam.forward(teacher, x, t, cond),
                                   rtol=1e-4, atol=1e-5)
        fresh = graft_model(teacher, [ResolvedGraft("attn", 0, "mha")], 0)
        assert not torch.allclose(fam.forward(fresh, x, t, cond), fam.forward(teacher, x, t, cond), atol=1e-3)


def test_pixart_stage1_streaming_uses_the_captions(tmp_path):
    """cache: stream calls the teacher with each batch's own caption embeddings and masks."""
    teacher = tiny_pixart(depth=2)
    grafts = [ResolvedGraft("attn", 1, "mha")]
    seen = []
    teacher.transformer_blocks[1].attn2.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["encoder_hidden_states"].shape), with_kwargs=True)
    s1 = Stage1(samples=8, val_samples=4, steps=2, batch_size=4, eval_every=2, cache="stream", extract_batch_size=4)
    res = run_stage1(teacher, grafts, s1, latents(8, 0), captions(8, 1), latents(4, 2), captions(4, 3),
                     str(tmp_path), 0, "cpu", progress=False, log=lambda *_: None)
    assert res["plan"]["mode"] == "stream" and res["operators"]["attn1"]["step"] == 2
    assert seen == [(4, TOKENS, 16)] * 3  # one validation extraction + two streamed steps


def test_output_distillation_through_the_pixart_family():
    """stage 2's output distillation calls student and teacher through the family with the captions: a copy of the
    teacher has zero distillation loss, a grafted student a positive one."""
    import copy

    from ditgraft.diffusion.gaussian import GaussianDiffusion
    from ditgraft.graft.stage2 import stage2_step_fn

    teacher = tiny_pixart().eval()
    diffusion = GaussianDiffusion.dit_default(learn_sigma=family_of(teacher).learn_sigma(teacher))
    step = stage2_step_fn(diffusion, Stage2(distill_weight=1.0), teacher)
    emb, mask = captions(4, 1)
    batch = (latents(4, 0), emb, mask)
    torch.manual_seed(0)
    assert step(copy.deepcopy(teacher), batch)["distill"].item() == 0.0
    student = graft_model(teacher, [ResolvedGraft("attn", 1, "hyena_x")], 0)
    terms = step(student, batch)
    assert terms["distill"].item() > 0 and torch.isfinite(terms["loss"])
