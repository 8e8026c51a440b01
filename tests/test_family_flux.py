"""The Flux family (diffusers FluxTransformer2DModel): forward parity with FluxPipeline's packing, the mlp slot, the
split attention slot, the flow-matching stages and FluxPipeline with the grafted student (tiny random models,
offline)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ditgraft.diffusion.samplers import SamplingConfig, sample
from ditgraft.graft.stage1 import load_best_operators, run_stage1
from ditgraft.graft.stage2 import run_stage2
from ditgraft.graft.surgery import ResolvedGraft, graft_model, load_grafted, save_grafted
from ditgraft.models.adapters import get_slot, model_dims
from ditgraft.models.families import family_of
from ditgraft.recipe import Stage1, Stage2

diffusers = pytest.importorskip("diffusers")

from diffusers_helpers import latents, sd3_prompts, tiny_flux  # noqa: E402


def _cond(n, seed, guidance=3.5):
    emb, pooled = sd3_prompts(n, seed)
    return emb, pooled, torch.full((n,), guidance)


def test_forward_reproduces_diffusers_with_the_pipelines_packing():
    from diffusers import FluxPipeline

    model = tiny_flux()
    fam = family_of(model)
    assert fam.name == "flux" and fam.in_channels(model) == 4 and fam.sample_shape(model, 2) == (2, 4, 8, 8)
    assert tuple(model_dims(model).__dict__.values()) == (2, 16, 2, (4, 4))
    x, t = latents(2, 0), torch.tensor([30.0, 870.5])
    emb, pooled, g = _cond(2, 1)
    g[1] = 1.0
    with torch.no_grad():
        out = fam.forward(model, x, t, (emb, pooled, g))
        ref = model(hidden_states=FluxPipeline._pack_latents(x, 2, 4, 8, 8), encoder_hidden_states=emb,
                    pooled_projections=pooled, timestep=t / 1000,
                    img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
                    txt_ids=torch.zeros(emb.shape[1], 3), guidance=g).sample
    assert (out - FluxPipeline._unpack_latents(ref, 64, 64, 8)).abs().max() == 0  # max abs diff 0
    assert get_slot(model, 1, "mlp") is model.transformer_blocks[1].ff
    assert get_slot(model, 0, "attn") is model.transformer_blocks[0].attn
    with pytest.raises(ValueError, match="guidance scale per sample"):
        fam.forward(model, x, t, (emb, pooled))


ROPE = {"axes_dims": [2, 2, 4]}  # tiny_flux's axes_dims_rope


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (2, 4, 8, 4)])
def test_split_attention_identity_graft_reproduces_the_teacher(shape):
    """Every double-stream joint attention split (image-to-image through a rope_mha copied from the teacher, with
    its qk-norm and RoPE), text attention kept: the teacher's output, on a square and a non-square latent (the
    call grid comes from img_ids)."""
    from ditgraft.models.families.joint import JointSplitAttention

    teacher = tiny_flux()
    fam = family_of(teacher)
    grafts = [ResolvedGraft("attn", i, "rope_mha", ROPE, init="teacher") for i in range(2)]
    grafts += [ResolvedGraft("mlp", i, "mlp", init="teacher") for i in range(2)]
    student = graft_model(teacher, grafts)
    assert all(isinstance(b.attn, JointSplitAttention) for b in student.transformer_blocks)
    x, t, c = torch.randn(shape, generator=torch.Generator().manual_seed(0)), torch.tensor([30.0, 870.5]), _cond(2, 1)
    with torch.no_grad():
        ref, out = fam.forward(teacher, x, t, c), fam.forward(student, x, t, c)
    assert (out - ref).abs().max() < 1e-6  # measured 2.4e-7 (8 x 8) and 3.6e-7 (8 x 4) on outputs of about 1.5
    # a random image-to-image operator changes the output; the first block's text stream stays the teacher's
    rand = graft_model(teacher, [ResolvedGraft("attn", 0, "rope_mha", ROPE)])
    seen = {}
    for name, m in (("teacher", teacher), ("rand", rand)):
        h = m.transformer_blocks[0].register_forward_hook(lambda mod, a, o, name=name: seen.__setitem__(name, o))
        with torch.no_grad():
            fam.forward(m, x, t, c)
        h.remove()
    torch.testing.assert_close(seen["rand"][0], seen["teacher"][0], atol=1e-6, rtol=0)
    assert not torch.allclose(seen["rand"][1], seen["teacher"][1], atol=1e-3)


def test_graft_stage1_stage2_reload_flux_pipeline(tmp_path):
    teacher = tiny_flux()
    fam = family_of(teacher)
    grafts = [ResolvedGraft("mlp", 0, "mlp", {"ratio": 2.0}), ResolvedGraft("mlp", 1, "mlp", init="teacher")]
    # split slots: stage 1 regresses the joint attention's image output (RoPE and text parts the teacher's)
    split = [ResolvedGraft("attn", 0, "rope_mha", ROPE), ResolvedGraft("attn", 1, "rope_mha", ROPE, init="teacher")]
    x0, cond = latents(16, 0), _cond(16, 1)
    s1 = Stage1(samples=16, val_samples=8, steps=4, batch_size=8, eval_every=2, extract_batch_size=8, lr=1e-3)
    res = run_stage1(teacher, grafts + split, s1, x0, cond, latents(8, 2), _cond(8, 3), str(tmp_path / "s1"), 0,
                     "cpu", progress=False, log=lambda *_: None)
    assert set(res["operators"]) == {"mlp0", "mlp1", "attn0", "attn1"}
    assert res["operators"]["mlp1"]["val_mse"] < 1e-10  # init: teacher copies the FeedForward exactly
    # the teacher's image-to-image part (with FLUX's RoPE) inside the split starts at its target to float rounding
    # (max abs diff 6e-8 on outputs of magnitude 0.22, rel. MSE 2e-14, measured); L1 steps move it a little
    from ditgraft.models.families.joint import SplitSlotUnit, capture_joint_attention

    with capture_joint_attention(family_of(teacher), teacher, [1]) as seen, torch.no_grad():
        fam.forward(teacher, latents(2, 0), torch.tensor([100.0, 700.0]), _cond(2, 1))
        hs, ehs, target = seen[1]
        diff = (SplitSlotUnit(fam.teacher_operator(teacher, 1, "attn"), fam, teacher, 1)(hs, ehs) - target).abs().max()
    assert diff < 1e-6, diff
    assert res["operators"]["attn1"]["val_rel_mse"] < 1e-3
    assert res["operators"]["attn0"]["val_rel_mse"] > res["operators"]["attn1"]["val_rel_mse"]
    student = graft_model(teacher, grafts + split)
    load_best_operators(student, grafts + split, str(tmp_path / "s1"))
    s2 = Stage2(steps=2, batch_size=4, ckpt_every=2, ema_decay=0.9)
    student, history = run_stage2(student, s2, x0, cond, str(tmp_path / "s2"), 0, progress=False)
    assert history and np.isfinite(history[-1]["loss"])

    path = str(tmp_path / "student.safetensors")
    save_grafted(path, student, grafts + split, None)
    loaded, meta = load_grafted(path)
    assert type(loaded) is diffusers.FluxTransformer2DModel and meta["family"] == "flux"
    assert model_dims(loaded) == model_dims(teacher)
    x, t, c = latents(2, 4), torch.tensor([5.0, 999.0]), _cond(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(fam.forward(loaded, x, t, c), fam.forward(student, x, t, c))

    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                                  shift_factor=0.1159, scaling_factor=0.3611).eval()
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                      max_shift=1.15)
    pipe = diffusers.FluxPipeline(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                  tokenizer_2=None, transformer=loaded)
    emb, pooled, g = _cond(2, 7)
    size = 8 * pipe.vae_scale_factor
    kw = dict(prompt_embeds=emb, pooled_prompt_embeds=pooled, num_inference_steps=3, guidance_scale=3.5,
              height=size, width=size)
    images = pipe(**kw, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, size, size) and torch.isfinite(images).all()
    packed = pipe(**kw, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    # ditgraft's Euler sampler with the family's objective (resolution shift, Flux's sigmas) and the distilled
    # guidance as conditioning: the pipeline's latents
    ours = sample(loaded, (emb, pooled, g), (2, 4, 8, 8), SamplingConfig(sampler="euler", steps=3, cfg_scale=1.0),
                  generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, diffusers.FluxPipeline._unpack_latents(packed, size, size,
                                                                           pipe.vae_scale_factor),
                               atol=1e-5, rtol=1e-5)


def test_a_pipeline_folders_scheduler_sets_the_objective(tmp_path):
    """A teacher loaded from a pipeline folder takes its scheduler's settings (here FLUX.1-schnell's: static shift
    1, no resolution shift); they stay with the grafted checkpoint, and ditgraft's sampler gives FluxPipeline's
    latents under that scheduler."""
    from ditgraft.models.families import load_diffusers

    folder = tmp_path / "pipe"
    tiny_flux(guidance=False).save_pretrained(str(folder / "transformer"))
    schnell = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    schnell.save_pretrained(str(folder / "scheduler"))
    teacher = load_diffusers(str(folder))
    obj = family_of(teacher).objective(teacher)
    assert obj.shift == 1.0 and not obj.use_dynamic_shifting and obj.sampling_grid == "uniform"
    grafts = [ResolvedGraft("mlp", 0, "mlp")]
    path = str(tmp_path / "student.safetensors")
    save_grafted(path, graft_model(teacher, grafts), grafts, None)
    loaded, _ = load_grafted(path)
    assert family_of(loaded).objective(loaded) == obj and model_dims(loaded) == model_dims(teacher)

    pipe = diffusers.FluxPipeline(scheduler=schnell, vae=None, text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=loaded)
    emb, pooled = sd3_prompts(2, 7)
    packed = pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, num_inference_steps=3, height=64, width=64,
                  output_type="latent", generator=torch.Generator().manual_seed(0)).images
    ours = sample(loaded, (emb, pooled), (2, 4, 8, 8), SamplingConfig(sampler="euler", steps=3, cfg_scale=1.0),
                  generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, diffusers.FluxPipeline._unpack_latents(packed, 64, 64, 8), atol=1e-5,
                               rtol=1e-5)


# ---- the single-stream blocks' attention as split slots (layers 2, 3 of tiny_flux(single=2)) ----------------------
@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (2, 4, 8, 4)])
def test_single_stream_identity_graft_reproduces_the_teacher(shape):
    """Attention layers count the double-stream blocks, then the single-stream ones. The single-stream attentions
    split (image-to-image through the teacher's own part, a rope_mha with the identity as proj; text through the
    teacher's shared projections and softmax): the teacher's output, alone and with every double-stream attention
    split too; a random operator there changes it. The parallel MLP of a single-stream block is refused as a slot."""
    from ditgraft.graft.surgery import resolve_grafts
    from ditgraft.models.adapters import slot_depths
    from ditgraft.models.families.flux import SingleStreamSplitAttention
    from ditgraft.recipe import parse_recipe

    teacher = tiny_flux(single=2)
    fam = family_of(teacher)
    assert slot_depths(teacher) == {"attn": 4, "mlp": 2} and model_dims(teacher).depth == 2
    recipe = parse_recipe({"grafts": [{"slot": "attn", "layers": {"select": "all"}, "operator": "clear"},
                                      {"slot": "mlp", "layers": {"select": "all"}, "operator": "mlp"}]})
    assert [(g.slot, g.layer) for g in resolve_grafts(recipe, slot_depths(teacher))] == [
        ("attn", 0), ("mlp", 0), ("attn", 1), ("mlp", 1), ("attn", 2), ("attn", 3)]
    assert get_slot(teacher, 3, "attn") is teacher.single_transformer_blocks[1].attn
    x, t, c = torch.randn(shape, generator=torch.Generator().manual_seed(0)), torch.tensor([30.0, 870.5]), _cond(2, 1)
    with torch.no_grad():
        ref = fam.forward(teacher, x, t, c)
        for layers in ([2, 3], [0, 1, 2, 3]):
            student = graft_model(teacher, [ResolvedGraft("attn", i, "rope_mha", ROPE, init="teacher")
                                             for i in layers])
            assert all(isinstance(b.attn, SingleStreamSplitAttention) for b in student.single_transformer_blocks)
            diff = float((fam.forward(student, x, t, c) - ref).abs().max())
            assert diff < 1e-6, diff  # measured at most 2.4e-7 (8 x 8), 1.8e-7 (8 x 4), fp32, on outputs up to 1.3
        rand = graft_model(teacher, [ResolvedGraft("attn", 3, "rope_mha", ROPE)])
        assert float((fam.forward(rand, x, t, c) - ref).abs().max()) > 1e-3  # measured 0.022, 0.026
    with pytest.raises(ValueError, match="layer=2 for slot='mlp' is a single-stream block"):
        graft_model(teacher, [ResolvedGraft("mlp", 2, "mlp")])
    with pytest.raises(ValueError, match="layer=4 is out of range"):
        graft_model(teacher, [ResolvedGraft("attn", 4, "clear")])


def test_clear_in_every_attention_stage1_stage2_reload_flux_pipeline(tmp_path):
    """CLEAR's setting: a circular window in every attention, double- and single-stream (text attending to and
    from everything through the teacher's softmax). Split-slot stage 1 regresses each attention's image output
    (the teacher's own part starts at its single-stream target), stage 2 trains with the flow loss plus output
    distillation, the reloaded student runs in FluxPipeline from precomputed embeddings."""
    from ditgraft.models.families.joint import SplitSlotUnit, capture_joint_attention

    teacher = tiny_flux(single=2)
    fam = family_of(teacher)
    with capture_joint_attention(family_of(teacher), teacher, [1, 3]) as seen, torch.no_grad():
        fam.forward(teacher, latents(2, 0), torch.tensor([100.0, 700.0]), _cond(2, 1))
        for layer in (1, 3):
            hs, ehs, target = seen[layer]
            assert hs.shape == (2, 16, 16) and ehs.shape == (2, 6, 16) and target.shape == (2, 16, 16)
            unit = SplitSlotUnit(fam.teacher_operator(teacher, layer, "attn"), fam, teacher, layer)
            diff = float((unit(hs, ehs) - target).abs().max())
            assert diff < 1e-6, (layer, diff)  # measured 5e-8 (double), 1.2e-7 (single) on targets up to 0.46

    # CLEAR keeps FLUX's qk-norm and RoPE: with a circle covering the 4 x 4 grid the student is the teacher
    kept = {"qk_norm": "rms_norm", "axes_dims": [2, 2, 4]}
    whole = graft_model(teacher, [ResolvedGraft("attn", i, "clear", {"radius": 6, **kept}, init="teacher")
                                  for i in range(4)])
    x, t, c = latents(2, 4), torch.tensor([5.0, 999.0]), _cond(2, 5)
    with torch.no_grad():
        diff = float((fam.forward(whole, x, t, c) - fam.forward(teacher, x, t, c)).abs().max())
    print(f"flux: clear (whole grid, teacher's qk-norm and RoPE) in all 4 attentions vs teacher: {diff:.1e}")
    assert diff < 1e-5
    with pytest.raises(ValueError, match=r"the teacher's attention has RoPE \(axes_dims \[2, 2, 4\]\).*axes_dims: null"):
        graft_model(teacher, [ResolvedGraft("attn", 0, "clear", {"qk_norm": "rms_norm"}, init="teacher")])
    grafts = [ResolvedGraft("attn", i, "clear", {"radius": 2, **kept}, init="teacher") for i in range(4)]
    x0, cond = latents(16, 0), _cond(16, 1)
    s1 = Stage1(samples=16, val_samples=8, steps=4, batch_size=8, eval_every=2, extract_batch_size=8, lr=1e-3,
                cache="stream")
    res = run_stage1(teacher, grafts, s1, x0, cond, latents(8, 2), _cond(8, 3), str(tmp_path / "s1"), 0,
                     "cpu", progress=False, log=lambda *_: None)
    assert set(res["operators"]) == {"attn0", "attn1", "attn2", "attn3"}
    assert all(np.isfinite(r["val_rel_mse"]) for r in res["operators"].values())
    student = graft_model(teacher, grafts)
    load_best_operators(student, grafts, str(tmp_path / "s1"))
    s2 = Stage2(steps=2, batch_size=4, ckpt_every=2, ema_decay=None, distill_weight=1.0)
    student, history = run_stage2(student, s2, x0, cond, str(tmp_path / "s2"), 0, progress=False, teacher=teacher)
    assert history and np.isfinite(history[-1]["loss"])

    path = str(tmp_path / "student.safetensors")
    save_grafted(path, student, grafts, None)
    loaded, _ = load_grafted(path)
    x, t, c = latents(2, 4), torch.tensor([5.0, 999.0]), _cond(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(fam.forward(loaded, x, t, c), fam.forward(student, x, t, c))
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                      max_shift=1.15)
    pipe = diffusers.FluxPipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                  tokenizer_2=None, transformer=loaded)
    emb, pooled, g = _cond(2, 7)
    packed = pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, num_inference_steps=3, guidance_scale=3.5,
                  height=64, width=64, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    ours = sample(loaded, (emb, pooled, g), (2, 4, 8, 8), SamplingConfig(sampler="euler", steps=3, cfg_scale=1.0),
                  generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, diffusers.FluxPipeline._unpack_latents(packed, 64, 64, 8), atol=1e-5,
                               rtol=1e-5)
