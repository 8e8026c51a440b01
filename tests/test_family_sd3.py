"""The SD3 family (diffusers SD3Transformer2DModel, MMDiT): forward parity, slots, the split joint-attention slot,
flow-matching stages and the diffusers pipeline with the grafted student (tiny random models, offline)."""
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
from ditgraft.models.families.base import SlotAdapter
from ditgraft.models.families.joint import JointSplitAttention, capture_joint_attention
from ditgraft.recipe import Stage1, Stage2

diffusers = pytest.importorskip("diffusers")

from diffusers_helpers import latents, sd3_prompts, tiny_sd3  # noqa: E402


def _call(model, x, t, cond):
    with torch.no_grad():
        return family_of(model).forward(model, x, t, cond)


def _inputs(n=2, seed=0):
    return latents(n, seed), torch.tensor([30.0, 870.5])[:n], sd3_prompts(n, seed + 1)


def test_forward_reproduces_diffusers_and_slots():
    model = tiny_sd3()
    fam = family_of(model)
    assert fam.name == "sd3" and not fam.learn_sigma(model)
    assert tuple(model_dims(model).__dict__.values()) == (2, 16, 2, (4, 4))
    x, t, (emb, pooled) = _inputs()
    with torch.no_grad():
        ref = model(hidden_states=x, timestep=t, encoder_hidden_states=emb, pooled_projections=pooled).sample
    out = _call(model, x, t, (emb, pooled))
    assert (out - ref).abs().max() == 0  # max abs diff 0: the family makes the same call
    assert get_slot(model, 1, "attn") is model.transformer_blocks[1].attn
    assert get_slot(model, 0, "mlp") is model.transformer_blocks[0].ff
    with pytest.raises(ValueError, match="SD3 conditioning"):
        fam.forward(model, x, t, emb)
    with pytest.raises(ValueError, match="negative prompt"):
        fam.null_cond(model, (emb, pooled))


def _block_outputs(model, x, t, cond):
    seen = {}
    hs = [b.register_forward_hook(lambda m, a, k, o, i=i: seen.__setitem__(i, o), with_kwargs=True)
          for i, b in enumerate(model.transformer_blocks)]
    out = _call(model, x, t, cond)
    for h in hs:
        h.remove()
    return out, seen


def test_split_attention_identity_graft_reproduces_the_teacher():
    """Every joint attention split (image-to-image through an MHA copied from the teacher, text kept) and the
    image MLPs copied: the teacher's output and both streams of every block, to float rounding."""
    teacher = tiny_sd3(depth=3)
    grafts = [ResolvedGraft("attn", i, "mha", init="teacher") for i in range(3)]
    grafts += [ResolvedGraft("mlp", i, "mlp", init="teacher") for i in range(3)]
    student = graft_model(teacher, grafts)
    assert type(student) is type(teacher)
    assert all(isinstance(b.attn, JointSplitAttention) and isinstance(b.ff, SlotAdapter)
               for b in student.transformer_blocks)
    x, t, cond = _inputs()
    out_t, blocks_t = _block_outputs(teacher, x, t, cond)
    out_s, blocks_s = _block_outputs(student, x, t, cond)
    diff = (out_s - out_t).abs().max()
    assert diff < 1e-6, diff  # measured 1.5e-7 on outputs of magnitude 1.7 (3 blocks, all slots grafted)
    for i in range(3):
        for a, b in zip(blocks_s[i], blocks_t[i]):
            if a is None:  # the last block (context_pre_only) returns no text stream
                assert b is None
                continue
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # a random image-to-image operator changes the image stream but every text query still attends with the
    # teacher's softmax: the first block's text output is the teacher's
    rand = graft_model(teacher, [ResolvedGraft("attn", 0, "mha")])
    out_r, blocks_r = _block_outputs(rand, x, t, cond)
    assert not torch.allclose(blocks_r[0][1], blocks_t[0][1], atol=1e-3)
    torch.testing.assert_close(blocks_r[0][0], blocks_t[0][0], atol=1e-6, rtol=0)  # (text, image) order


def test_split_attention_refuses_operators_without_a_softmax_normaliser():
    teacher = tiny_sd3()
    student = graft_model(teacher, [ResolvedGraft("attn", 0, "hyena_x")])
    with pytest.raises(ValueError, match="reports its softmax normaliser; HyenaX"):
        _call(student, *_inputs())
    split = graft_model(teacher, [ResolvedGraft("attn", 0, "mha")]).transformer_blocks[0].attn
    hs, ehs = torch.randn(1, 16, 16), torch.randn(1, 6, 16)
    with pytest.raises(ValueError, match=r"\['ip_hidden_states'\]"):
        split(hs, ehs, ip_hidden_states=hs)
    with pytest.raises(ValueError, match="without encoder_hidden_states"):
        split(hs)


def test_graft_stage1_stage2_flow_loss_reload_pipeline(tmp_path):
    teacher = tiny_sd3()
    fam = family_of(teacher)
    grafts = [ResolvedGraft("mlp", 0, "mlp", {"ratio": 2.0}), ResolvedGraft("mlp", 1, "mlp", {"ratio": 1.0})]
    x0, cond = latents(16, 0), sd3_prompts(16, 1)
    s1 = Stage1(samples=16, val_samples=8, steps=4, batch_size=8, eval_every=2, extract_batch_size=8)
    res = run_stage1(teacher, grafts, s1, x0, cond, latents(8, 2), sd3_prompts(8, 3), str(tmp_path / "s1"), 0,
                     "cpu", progress=False, log=lambda *_: None)
    assert set(res["operators"]) == {"mlp0", "mlp1"}
    all_grafts = grafts + [ResolvedGraft("attn", 1, "mha", init="teacher")]  # a split slot trained in stage 2 alone
    student = graft_model(teacher, all_grafts)
    load_best_operators(student, grafts, str(tmp_path / "s1"))

    # stage 2 trains with the family's objective: the flow-matching velocity loss
    seen = []
    objective = fam.objective(student)
    orig = type(objective).training_losses

    def spy(self, *a, **k):
        seen.append(type(self).__name__)
        return orig(self, *a, **k)

    type(objective).training_losses = spy
    try:
        s2 = Stage2(steps=2, batch_size=4, ckpt_every=2, ema_decay=0.9)
        before = {k: v.clone() for k, v in student.state_dict().items()}
        student, history = run_stage2(student, s2, x0, cond, str(tmp_path / "s2"), 0, progress=False)
    finally:
        type(objective).training_losses = orig
    assert seen and set(seen) == {"FlowMatching"} and history
    state = student.state_dict()
    assert any(not torch.equal(state[k], before[k]) for k in state if k.startswith("transformer_blocks.1.attn.op."))

    path = str(tmp_path / "student.safetensors")
    save_grafted(path, student, all_grafts, None)
    loaded, meta = load_grafted(path)
    assert type(loaded) is diffusers.SD3Transformer2DModel and meta["family"] == "sd3"
    assert isinstance(loaded.transformer_blocks[1].attn, JointSplitAttention)
    x, t, c = _inputs()
    torch.testing.assert_close(_call(loaded, x, t, c), _call(student, x, t, c))

    # the grafted model runs in StableDiffusion3Pipeline with precomputed prompt embeddings, and ditgraft's own
    # Euler sampler (the family's objective: shift 3) gives the pipeline's latents
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                                  shift_factor=0.0609, scaling_factor=1.5305).eval()
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = diffusers.StableDiffusion3Pipeline(transformer=loaded, scheduler=sched, vae=vae, text_encoder=None,
                                              tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                              text_encoder_3=None, tokenizer_3=None)
    emb, pooled = sd3_prompts(2, 7)
    neg_emb, neg_pooled = sd3_prompts(2, 8)
    size = loaded.config.sample_size * pipe.vae_scale_factor
    kw = dict(prompt_embeds=emb, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg_emb,
              negative_pooled_prompt_embeds=neg_pooled, num_inference_steps=3, guidance_scale=4.0, height=size,
              width=size)
    images = pipe(**kw, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, size, size) and torch.isfinite(images).all()
    lat = pipe(**kw, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    ours = sample(loaded, (emb, pooled), (2, 4, 8, 8), SamplingConfig(sampler="euler", steps=3, cfg_scale=4.0),
                  generator=torch.Generator().manual_seed(0), null_cond=(neg_emb, neg_pooled))
    torch.testing.assert_close(ours, lat, atol=1e-5, rtol=1e-5)


def test_flow_objective_noises_stage1_with_float_timesteps(tmp_path):
    """Stage 1 calls the SD3 teacher with flow matching's timesteps (floats in (0, 1000)), in cached and
    streamed modes."""
    teacher = tiny_sd3()
    seen = []
    hook = teacher.time_text_embed.register_forward_hook(lambda m, a, o: seen.append(a[0].clone()))
    grafts = [ResolvedGraft("mlp", 0, "mlp")]
    for cache in ("memory", "stream"):
        s1 = Stage1(samples=8, val_samples=4, steps=2, batch_size=4, eval_every=2, extract_batch_size=4,
                    cache=cache)
        run_stage1(teacher, grafts, s1, latents(8, 0), sd3_prompts(8, 1), latents(4, 2), sd3_prompts(4, 3),
                   str(tmp_path / cache), 0, "cpu", progress=False, log=lambda *_: None)
    hook.remove()
    t = torch.cat(seen)
    assert t.dtype == torch.float32 and (t > 0).all() and (t < 1000).all() and (t != t.round()).any()


def test_sd3_euler_sampling_through_the_family():
    model = tiny_sd3()
    cond = sd3_prompts(2, 0)
    with pytest.raises(ValueError, match="sampler='ddim' does not sample a flow-matching model"):
        sample(model, cond, (2, 4, 8, 8), SamplingConfig(steps=2, cfg_scale=1.0))
    out = sample(model, cond, (2, 4, 8, 8), SamplingConfig(sampler="euler", steps=2, cfg_scale=1.0),
                 generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert isinstance(family_of(model).objective(model), FlowMatching)


def test_split_slot_distils_from_the_captured_joint_attention(tmp_path):
    """The split slot's distillation target is well defined: a random MHA in the image-to-image part, trained with
    the shared loop on the teacher's captured joint-attention inputs and image outputs (flow-matching noised
    latents), approaches the teacher's image outputs while the text part stays the teacher's."""
    import copy

    from ditgraft.graft.stage1 import noised_inputs
    from ditgraft.operators import build_operator
    from ditgraft.train.loop import LoopConfig, train

    teacher = tiny_sd3()
    fam = family_of(teacher)
    inputs = noised_inputs(latents(64, 0), sd3_prompts(64, 1), seed=0, objective=fam.objective(teacher))
    with capture_joint_attention(family_of(teacher), teacher, [0]) as seen:
        _call(teacher, inputs.x_t, inputs.t, inputs.y)
    hs, ehs, target = seen[0]
    assert hs.shape == (64, 16, 16) and ehs.shape == (64, 6, 16) and target.shape == (64, 16, 16)
    dims = model_dims(teacher)
    torch.manual_seed(0)
    split = JointSplitAttention(build_operator("mha", dims.dim, dims.heads, dims.grid), dims.grid,
                                copy.deepcopy(teacher.transformer_blocks[0].attn).requires_grad_(False))

    def rel_err():
        with torch.no_grad():
            return float((split(hs, ehs)[0] - target).square().mean() / target.var())

    def step(model, batch):
        return {"loss": (model(batch[0], batch[1])[0] - batch[2]).square().mean()}

    before = rel_err()
    train(split, step, (hs, ehs, target), LoopConfig(steps=50, batch_size=16, lr=1e-2, ema_decay=None,
                                                     ckpt_every=50, progress=False), str(tmp_path))
    after = rel_err()
    assert after < 0.1 * before, (before, after)
    assert all(not p.requires_grad for p in split.joint.parameters())
    torch.testing.assert_close(split(hs, ehs)[1], teacher.transformer_blocks[0].attn(hs, ehs)[1])


def test_sd35_qk_norm_split_identity_with_rope_mha():
    """SD3.5's joint attention has RMS qk-norm (and an image-only attn2 in dual_attention_layers, kept): its
    image-to-image part is a rope_mha without RoPE, and the identity split graft reproduces the teacher."""
    from helpers import randomize_weights

    teacher = randomize_weights(diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        qk_norm="rms_norm", dual_attention_layers=(0,)), 0.1, 0).eval()
    student = graft_model(teacher, [ResolvedGraft("attn", i, "rope_mha", init="teacher") for i in range(2)])
    x, t, cond = _inputs()
    ref, out = _call(teacher, x, t, cond), _call(student, x, t, cond)
    assert (out - ref).abs().max() < 1e-6
    assert student.transformer_blocks[0].attn2 is not None  # kept as the teacher's
    assert type(family_of(teacher).teacher_operator(teacher, 0, "attn")).__name__ == "RopeMHA"


def test_stage1_distils_the_split_slot(tmp_path):
    """Stage 1 on a split slot: the target is the teacher's joint-attention image output from both token streams;
    the operator trains inside the teacher's joint attention (text parts frozen). init: teacher is exact, a random
    MHA improves, and its best weights in the student's slot give exactly the distilled unit's output."""
    from ditgraft.graft.stage1 import SplitSlotTarget, SplitSlotUnit, teacher_targets

    teacher = tiny_sd3()
    grafts = [ResolvedGraft("attn", 0, "mha", init="teacher"), ResolvedGraft("attn", 1, "mha"),
              ResolvedGraft("mlp", 1, "mlp")]
    x0, cond = latents(32, 0), sd3_prompts(32, 1)
    kinds = teacher_targets(teacher, grafts, cond)
    assert [type(k).__name__ for k in kinds] == ["SplitSlotTarget", "SplitSlotTarget", "SlotTarget"]
    assert kinds[0].row_shapes(model_dims(teacher)) == ((16, 16), (6, 16), (16, 16))
    for cache in ("memory", "disk", "stream"):
        s1 = Stage1(samples=32, val_samples=8, steps=20, batch_size=8, eval_every=10, extract_batch_size=8,
                    lr=3e-3, cache=cache)
        res = run_stage1(teacher, grafts, s1, x0, cond, latents(8, 2), sd3_prompts(8, 3), str(tmp_path / cache), 0,
                         "cpu", progress=False, log=lambda *_: None)
        ops = res["operators"]
        # the teacher's own image-to-image part starts exact; L1 steps move it a little (measured rel. MSE ~1e-4)
        assert ops["attn0"]["val_rel_mse"] < 1e-3
        first = [r["loss/attn1"] for r in res["history"] if "loss/attn1" in r]
        assert first[-1] < first[0], first  # the random MHA learns the split target
    student = graft_model(teacher, grafts)
    load_best_operators(student, grafts, str(tmp_path / "memory"))
    x, t, c = _inputs()
    with capture_joint_attention(family_of(teacher), teacher, [1]) as seen:
        _call(teacher, x, t, c)
    hs, ehs, target = seen[1]
    fam = family_of(teacher)
    exact = SplitSlotUnit(fam.teacher_operator(teacher, 1, "attn"), fam, teacher, 1)
    with torch.no_grad():
        diff = (exact(hs, ehs) - target).abs().max()
    print("init teacher unit vs teacher target", float(diff), float(target.abs().max()))
    assert diff < 1e-6
    unit = SplitSlotUnit(get_slot(student, 1, "attn"), fam, teacher, 1)
    assert set(unit.state_dict()) == {f"op.{k}" for k in get_slot(student, 1, "attn").state_dict()}
    with torch.no_grad():
        got = student.transformer_blocks[1].attn(hs, ehs)[0]
        torch.testing.assert_close(got, unit(hs, ehs), atol=0, rtol=0)
    s1 = Stage1(samples=8, val_samples=4, steps=2, batch_size=4, eval_every=2, extract_batch_size=4)
    with pytest.raises(ValueError, match="operator='hyena_x' at attn0 cannot be the image-to-image part"):
        run_stage1(teacher, [ResolvedGraft("attn", 0, "hyena_x")], s1, latents(8, 0), sd3_prompts(8, 1),
                   latents(4, 2), sd3_prompts(4, 3), str(tmp_path / "h"), 0, "cpu", progress=False,
                   log=lambda *_: None)
    assert isinstance(kinds[0], SplitSlotTarget)


@pytest.mark.parametrize("impl", ["reference", "tiled"])
def test_local_attention_in_a_split_slot(impl, tmp_path):
    """Local attention reports its softmax normaliser over each query's window, so it can be a split slot's
    image-to-image part: with a window covering the whole 4 x 4 grid (swa window 15, local2d kernel 5, clear radius
    6) and the teacher's weights the split reproduces the teacher; with a 3 x 3 window stage 1 distils it."""
    from ditgraft.operators import build_operator
    from ditgraft.operators.attention import reference_attention

    teacher = tiny_sd3()
    x, t, cond = _inputs()
    ref = _call(teacher, x, t, cond)
    for op, options in (("swa", {"window": 15}), ("local2d", {"kernel_size": 5}), ("clear", {"radius": 6.0})):
        student = graft_model(teacher, [ResolvedGraft("attn", i, op, {**options, "impl": impl}, init="teacher")
                                        for i in range(2)])
        diff = (_call(student, x, t, cond) - ref).abs().max()
        print(f"{op} ({impl}) split identity graft vs teacher: max abs diff {float(diff):.1e}")
        assert diff < 1e-6, (op, diff)
    # the normaliser is the logsumexp of the allowed scores (tiled == reference == dense masked)
    local = build_operator("local2d", 16, 2, (4, 4), kernel_size=3, impl=impl)
    h = torch.randn(2, 16, 16)
    out, lse = local.attend_with_lse(h, (4, 4))
    q, k, v = local.qkv(h).view(2, 16, 3, 2, 8).permute(2, 0, 3, 1, 4)
    want, want_lse = reference_attention(q, k, v, local.mask((4, 4)), return_lse=True)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=1e-6, rtol=0)
    s1 = Stage1(samples=16, val_samples=4, steps=6, batch_size=8, eval_every=3, extract_batch_size=8, lr=3e-3)
    grafts = [ResolvedGraft("attn", 0, "local2d", {"kernel_size": 3, "impl": impl}, init="teacher")]
    res = run_stage1(teacher, grafts, s1, latents(16, 0), sd3_prompts(16, 1), latents(4, 2), sd3_prompts(4, 3),
                     str(tmp_path / "s1"), 0, "cpu", progress=False, log=lambda *_: None)
    losses = [r["loss/attn0"] for r in res["history"] if "loss/attn0" in r]
    assert np.isfinite(losses).all() and res["operators"]["attn0"]["val_rel_mse"] < 1.0


def _tiny_sd35():
    from helpers import randomize_weights

    return randomize_weights(diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        qk_norm="rms_norm", dual_attention_layers=(0,)), 0.1, 0).eval()


def test_linear_attention_split_slot_is_edits_hybrid_attention(tmp_path):
    """linear_attn in SD3.5's split slot: image queries see image keys through the relu kernel and text keys through
    the teacher's softmax, with one normaliser over both (EDiT's hybrid attention), computed here from the teacher's
    own projections and qk-norms; ``init: teacher`` carries the qk-norms; stage 1 distils the slot."""
    teacher = _tiny_sd35()
    with torch.no_grad():  # qk-norm weights away from 1, so that carrying them over is checked
        for block in teacher.transformer_blocks:
            block.attn.norm_q.weight.uniform_(0.5, 1.5)
            block.attn.norm_k.weight.uniform_(0.5, 1.5)
    graft = ResolvedGraft("attn", 0, "linear_attn", {"qk_norm": "rms_norm"}, init="teacher")
    split = graft_model(teacher, [graft]).transformer_blocks[0].attn
    a = teacher.transformer_blocks[0].attn
    hs, ehs = torch.randn(2, 16, 16), torch.randn(2, 6, 16)
    with torch.no_grad():
        img, _ = split(hs, ehs)

        def heads(lin, norm, x):
            y = lin(x).view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2)
            return norm(y) if norm is not None else y

        q, k, v = heads(a.to_q, a.norm_q, hs), heads(a.to_k, a.norm_k, hs), heads(a.to_v, None, hs)
        k_t, v_t = heads(a.add_k_proj, a.norm_added_k, ehs), heads(a.add_v_proj, None, ehs)
        kernel = torch.relu(q) @ torch.relu(k).transpose(-2, -1)  # image keys: relu features
        scores = torch.exp(q @ k_t.transpose(-2, -1) * 8 ** -0.5)  # text keys: the softmax's exp scores
        eps = split.op.eps
        mixed = (kernel @ v + scores @ v_t) / (kernel.sum(-1, keepdim=True) + eps + scores.sum(-1, keepdim=True))
        want = a.to_out[0](mixed.transpose(1, 2).reshape(2, 16, 16))
    diff = float((img - want).abs().max())
    print(f"linear_attn split slot vs EDiT's hybrid attention from the teacher's weights: max abs diff {diff:.1e}")
    assert diff < 1e-5
    torch.testing.assert_close(split.op.norm_q.weight, a.norm_q.weight, atol=0, rtol=0)
    torch.testing.assert_close(split.op.norm_k.weight, a.norm_k.weight, atol=0, rtol=0)
    s1 = Stage1(samples=16, val_samples=4, steps=6, batch_size=8, eval_every=3, extract_batch_size=8, lr=3e-3)
    res = run_stage1(teacher, [graft], s1, latents(16, 0), sd3_prompts(16, 1), latents(4, 2), sd3_prompts(4, 3),
                     str(tmp_path / "s1"), 0, "cpu", progress=False, log=lambda *_: None)
    losses = [r["loss/attn0"] for r in res["history"] if "loss/attn0" in r]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
