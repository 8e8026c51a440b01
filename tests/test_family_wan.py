"""The Wan family (diffusers WanTransformer3DModel, text-to-video): forward parity, the attn and mlp slots (the
teacher's video self-attention as a rope_mha), the flow-matching stages and WanPipeline with the grafted student
(tiny random models, offline)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ditgraft.diffusion.flow_matching import FlowMatching
from ditgraft.diffusion.samplers import SamplingConfig, sample
from ditgraft.graft.stage1 import load_best_operators, run_stage1
from ditgraft.graft.stage2 import run_stage2
from ditgraft.graft.surgery import ResolvedGraft, graft_model, load_grafted, save_grafted
from ditgraft.models.adapters import get_slot, model_dims
from ditgraft.models.families import family_of
from ditgraft.recipe import Stage1, Stage2

diffusers = pytest.importorskip("diffusers")

from diffusers_helpers import CAPTION_DIM, TOKENS, tiny_wan  # noqa: E402


def _videos(n, seed):
    return torch.randn(n, 16, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def _prompts(n, seed):
    return torch.randn(n, TOKENS, CAPTION_DIM, generator=torch.Generator().manual_seed(seed))


def test_forward_reproduces_diffusers_and_slots():
    model = tiny_wan()
    fam = family_of(model)
    assert fam.name == "wan" and fam.sample_shape(model, 2) == (2, 16, 3, 4, 4)
    assert tuple(model_dims(model).__dict__.values()) == (2, 16, 2, (3, 2, 2))  # (frames, rows, columns) patches
    x, t, emb = _videos(2, 0), torch.tensor([30.0, 870.5]), _prompts(2, 1)
    with torch.no_grad():
        ref = model(hidden_states=x, timestep=t, encoder_hidden_states=emb).sample
        assert (fam.forward(model, x, t, emb) - ref).abs().max() == 0  # max abs diff 0
    assert get_slot(model, 1, "mlp") is model.blocks[1].ffn
    assert get_slot(model, 0, "attn") is model.blocks[0].attn1  # video self-attention; attn2 is never a slot
    obj = fam.objective(model)
    assert isinstance(obj, FlowMatching) and obj.shift == 3.0 and not obj.use_dynamic_shifting


def _identity_grafts(model):
    """``init: teacher`` rope_mha with the teacher's own options in every attn slot."""
    op = family_of(model).teacher_operator(model, 0, "attn")
    options = {"axes_dims": list(op.axes_dims), "qk_norm": op.qk_norm}
    return [ResolvedGraft("attn", i, "rope_mha", options, init="teacher") for i in range(len(model.blocks))]


def test_identity_attn_graft_reproduces_the_teacher():
    """The teacher operator of attn1 (qk-norm across heads, RoPE over frame, row, column) put back into every attn
    slot gives the teacher's output, at the configured video size and at another one (the call's grid)."""
    teacher = tiny_wan()
    fam = family_of(teacher)
    grafts = _identity_grafts(teacher)
    assert grafts[0].options == {"axes_dims": [4, 2, 2], "qk_norm": "rms_norm_across_heads"}  # head dim 8
    student = graft_model(teacher, grafts)
    assert type(get_slot(student, 1, "attn")).__name__ == "RopeMHA"
    t, emb = torch.tensor([30.0, 870.5]), _prompts(2, 1)
    for x in (_videos(2, 0), torch.randn(2, 16, 5, 6, 8, generator=torch.Generator().manual_seed(3))):
        with torch.no_grad():
            ref, out = fam.forward(teacher, x, t, emb), fam.forward(student, x, t, emb)
        diff = float((out - ref).abs().max())
        print(f"wan identity attn graft, latents {tuple(x.shape[2:])}: max abs diff {diff:.1e} (output scale "
              f"{float(ref.abs().max()):.2f})")
        assert diff < 1e-6, diff  # a wrong RoPE split or a per-head qk-norm gives ~1e-4 here
    wrong = tiny_wan()
    wrong.blocks[1].attn1.norm_q = torch.nn.RMSNorm(8)  # a per-head qk-norm is not Wan's attention
    with pytest.raises(ValueError, match="blocks\\[1\\].attn1: this attention is not Wan's video self-attention"):
        fam.teacher_operator(wrong, 1, "attn")


@pytest.mark.parametrize("operator", ["mha", "linear_attn", "hyena_x", "hyena_y", "mamba2"])
def test_grid_free_operators_take_the_attn_slot(operator):
    """Operators that do not read the grid run in attn1 at any video size; their FLOPs count the 3-D grid's tokens."""
    from ditgraft.operators import operator_flops

    teacher = tiny_wan()
    fam = family_of(teacher)
    student = graft_model(teacher, [ResolvedGraft("attn", 1, operator, {})])
    t, emb = torch.tensor([30.0, 870.5]), _prompts(2, 1)
    for x in (_videos(2, 0), torch.randn(2, 16, 2, 6, 4, generator=torch.Generator().manual_seed(3))):
        with torch.no_grad():
            out, ref = fam.forward(student, x, t, emb), fam.forward(teacher, x, t, emb)
        assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.allclose(out, ref)
    grid = model_dims(teacher).grid
    assert operator_flops(operator, 16, 2, grid) == operator_flops(operator, 16, 2, (1, 12)) > 0


def test_local_windows_keep_wans_qk_norm_and_rope():
    """local2d and clear with windows covering the video, started from attn1 with its qk-norm across heads and its
    3-D RoPE kept, are the teacher (at the configured video size and another one)."""
    teacher = tiny_wan()
    fam = family_of(teacher)
    kept = {"qk_norm": "rms_norm_across_heads", "axes_dims": [4, 2, 2]}
    t, emb = torch.tensor([30.0, 870.5]), _prompts(2, 1)
    for op, options in (("local2d", {"kernel_size": [5, 7, 9]}), ("clear", {"radius": 12.0})):
        student = graft_model(teacher, [ResolvedGraft("attn", i, op, {**options, **kept}, init="teacher")
                                        for i in range(2)])
        for x in (_videos(2, 0), torch.randn(2, 16, 5, 6, 8, generator=torch.Generator().manual_seed(3))):
            with torch.no_grad():
                diff = float((fam.forward(student, x, t, emb) - fam.forward(teacher, x, t, emb)).abs().max())
            print(f"wan: {op} covering the video {tuple(x.shape[2:])}, qk-norm and RoPE kept: {diff:.1e}")
            assert diff < 1e-5, (op, diff)
    with pytest.raises(ValueError, match="qk_norm 'rms_norm_across_heads'.*qk_norm: false"):
        graft_model(teacher, [ResolvedGraft("attn", 0, "local2d", {"axes_dims": None}, init="teacher")])


@pytest.mark.parametrize("operator,options", [
    ("local2d", {"kernel_size": [1, 3, 3]}), ("local2d", {"kernel_size": 3}), ("clear", {"radius": 1.5}),
    ("swa", {"window": 4}), ("hyena_x", {"direction": "2d", "kernel_size": 3}),
    ("hyena_se", {"direction": "3d", "kernel_size": 3}), ("linear_attn", {"conv": 3})])
def test_grid_operators_take_the_attn_slot_on_the_calls_video_grid(operator, options):
    """Operators that read the grid get each call's (frames, rows, columns) grid in attn1, at two video sizes; on a
    one-frame window local2d keeps the frames apart (a change in one frame's latents leaves the other frames of the
    slot's output alone)."""
    teacher = tiny_wan()
    fam = family_of(teacher)
    student = graft_model(teacher, [ResolvedGraft("attn", 1, operator, options)])
    t, emb = torch.tensor([30.0, 870.5]), _prompts(2, 1)
    for x in (_videos(2, 0), torch.randn(2, 16, 2, 6, 4, generator=torch.Generator().manual_seed(3))):
        with torch.no_grad():
            out, ref = fam.forward(student, x, t, emb), fam.forward(teacher, x, t, emb)
        assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.allclose(out, ref)
    if options.get("kernel_size") == [1, 3, 3]:
        slot = get_slot(student, 1, "attn")
        x = torch.randn(2, 12, 16, dtype=torch.float32, generator=torch.Generator().manual_seed(4))  # 3 x 2 x 2
        x2 = x.clone()
        x2[:, 5] += 1.0  # frame 1
        with torch.no_grad():
            slot.call_grid = (3, 2, 2)
            changed = (slot(x2) - slot(x)).abs().amax((0, 2)) > 0
        assert changed.tolist() == [False] * 4 + [True] * 4 + [False] * 4


def test_graft_stage1_stage2_reload_wan_pipeline(tmp_path):
    teacher = tiny_wan()
    fam = family_of(teacher)
    grafts = [ResolvedGraft("mlp", 0, "mlp", {"ratio": 2.0}),
              ResolvedGraft("mlp", 1, "mlp", {"ratio": 2.0}, init="teacher"), _identity_grafts(teacher)[0],
              ResolvedGraft("attn", 1, "linear_attn", {})]
    x0, cond = _videos(16, 0), _prompts(16, 1)
    s1 = Stage1(samples=16, val_samples=8, steps=4, batch_size=8, eval_every=2, extract_batch_size=8)
    res = run_stage1(teacher, grafts, s1, x0, cond, _videos(8, 2), _prompts(8, 3), str(tmp_path / "s1"), 0, "cpu",
                     progress=False, log=lambda *_: None)
    assert set(res["operators"]) == {"mlp0", "mlp1", "attn0", "attn1"}
    # init: teacher copies ffn exactly (its ratio is ffn_dim / dim = 2), and attn1 as a rope_mha with its options
    assert res["operators"]["mlp1"]["val_mse"] < 1e-10 and res["operators"]["attn0"]["val_mse"] < 1e-10
    assert res["operators"]["attn1"]["val_mse"] > 1e-4
    student = graft_model(teacher, grafts)
    load_best_operators(student, grafts, str(tmp_path / "s1"))
    s2 = Stage2(steps=2, batch_size=4, ckpt_every=2, ema_decay=0.9)
    student, history = run_stage2(student, s2, x0, cond, str(tmp_path / "s2"), 0, progress=False)
    assert history and np.isfinite(history[-1]["loss"])

    path = str(tmp_path / "student.safetensors")
    save_grafted(path, student, grafts, None)
    loaded, meta = load_grafted(path)
    assert type(loaded) is diffusers.WanTransformer3DModel and meta["family"] == "wan"
    assert model_dims(loaded) == model_dims(teacher)
    x, t, c = _videos(2, 4), torch.tensor([5.0, 999.0]), _prompts(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(fam.forward(loaded, x, t, c), fam.forward(student, x, t, c))

    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval()
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=loaded,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    emb, neg = _prompts(2, 7), _prompts(2, 8)
    kw = dict(prompt_embeds=emb, negative_prompt_embeds=neg, height=32, width=32, num_frames=9,
              num_inference_steps=3, guidance_scale=5.0)
    video = pipe(**kw, output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    assert video.shape[:2] == (2, 9) and torch.isfinite(video).all()
    lat = pipe(**kw, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    ours = sample(loaded, emb, (2, 16, 3, 4, 4), SamplingConfig(sampler="euler", steps=3, cfg_scale=5.0),
                  generator=torch.Generator().manual_seed(0), null_cond=neg)
    torch.testing.assert_close(ours, lat, atol=1e-5, rtol=1e-5)
