"""Surgery, activation capture, stage 1 and stage 2: correctness and exact resume."""
import os

import pytest
import torch

from helpers import Crash, crash_on_call, tiny_dit
from ditgraft.graft.stage1 import capture_slots, extract, noised_inputs, run_stage1
from ditgraft.graft.surgery import ResolvedGraft, graft_model, init_from_teacher, load_grafted, save_grafted
from ditgraft.models.dit import modulate
from ditgraft.operators import build_operator
from ditgraft.operators.attention import MHA
from ditgraft.operators.hyena import HyenaX
from ditgraft.operators.mlp import MLP
from ditgraft.recipe import Stage1, Stage2

GRAFTS = [ResolvedGraft("attn", 1, "hyena_x"), ResolvedGraft("mlp", 0, "mlp", {"ratio": 2}, loss="l2")]


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g).clamp(-1, 1), torch.randint(0, 10, (n,), generator=g)


def test_surgery_replaces_only_grafted_slots():
    teacher = tiny_dit(depth=3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = graft_model(teacher, GRAFTS, seed=0)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # teacher untouched
    assert type(student.blocks[1].attn) is HyenaX
    assert type(student.blocks[0].mlp) is MLP and student.blocks[0].mlp.hidden == 64
    assert [type(b.attn) for b in (student.blocks[0], student.blocks[2])] == [MHA, MHA]
    s = student.state_dict()
    for k, v in teacher.state_dict().items():
        if not (k.startswith("blocks.1.attn.") or k.startswith("blocks.0.mlp.")):
            assert torch.equal(s[k], v), k
    student.blocks[2].attn.proj.weight.data.add_(1)  # a deep copy: no sharing with the teacher
    assert not torch.equal(student.blocks[2].attn.proj.weight, teacher.blocks[2].attn.proj.weight)


def test_grafted_checkpoint_rebuilds_from_file_alone(tmp_path):
    student = graft_model(tiny_dit(depth=3), GRAFTS, seed=0)
    path = str(tmp_path / "student.safetensors")
    save_grafted(path, student, GRAFTS, {"name": "x"})
    loaded, meta = load_grafted(path)
    assert meta["recipe"] == {"name": "x"}
    x, y = _data(2)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(student.eval()(x, t, y), loaded(x, t, y))


def test_init_from_teacher_maps_names():
    mha = MHA(32, 2, (4, 4))
    swa = build_operator("swa", 32, 2, (4, 4))
    swa = init_from_teacher(swa, mha)
    assert torch.equal(swa.Wqkv.weight, mha.qkv.weight) and torch.equal(swa.out_proj.bias, mha.proj.bias)
    hyena = init_from_teacher(build_operator("hyena_x", 32, 2, (4, 4), kernel_size=3), mha, {"kernel_size": 3})
    assert torch.equal(hyena.in_proj.weight, mha.qkv.weight) and torch.equal(hyena.out_proj.bias, mha.proj.bias)
    assert hyena.kernel_size == 3
    mamba = build_operator("mamba2", 32, 2, (4, 4))
    with pytest.raises(ValueError, match="init='teacher' is not possible"):
        init_from_teacher(mamba, mha)


def test_capture_is_attn_input_and_ungated_output():
    """Hooks see norm1(x)*(1+scale)+shift and the raw attention output, for the right (x_t, t, y) call."""
    model = tiny_dit(depth=2).eval()
    x, y = _data(3)
    t = torch.tensor([0, 500, 999])
    with torch.no_grad(), capture_slots(model, [ResolvedGraft("attn", 1, "mha")]) as got:
        model(x, t, y)
        tokens, c = model.embed(x, t, y)
        tokens = model.blocks[0](tokens, c)
        blk = model.blocks[1]
        shift, scale = blk.adaLN_modulation(c).chunk(6, dim=1)[:2]
        expect_in = modulate(blk.norm1(tokens), shift, scale)
    xin, xout = got["attn1"]
    torch.testing.assert_close(xin, expect_in)
    torch.testing.assert_close(xout, blk.attn(expect_in))
    assert not model.blocks[1].attn._forward_hooks  # hooks removed


def test_noised_inputs_are_q_samples_at_uniform_t():
    x0, y = _data(400)
    inp = noised_inputs(x0, y, seed=0)
    assert inp.t.min() >= 0 and inp.t.max() <= 999 and inp.t.float().std() > 200
    low = inp.t < 50  # nearly clean there; heavily noised at high t
    assert (inp.x_t[low] - x0[low]).abs().mean() < 0.3
    assert (inp.x_t[inp.t > 950] - x0[inp.t > 950]).abs().mean() > 0.6


def test_disk_cache_matches_memory(tmp_path):
    teacher = tiny_dit(depth=2).eval()
    x0, y = _data(10)
    inp = noised_inputs(x0, y, 0)
    mem = extract(teacher, GRAFTS, inp, 4, None, torch.float32, "cpu")
    disk = extract(teacher, GRAFTS, inp, 4, str(tmp_path), torch.float32, "cpu")
    for k in mem:
        for a, b in zip(mem[k], disk[k]):
            torch.testing.assert_close(a, b)
    assert os.path.exists(tmp_path / "complete.json")


def _stage1(run_dir, cache="memory", crash_at=None, monkeypatch=None, cond_dropout=0.0):
    teacher = tiny_dit(depth=2)
    x0, y = _data(48)
    xv, yv = _data(16, seed=1)
    cfg = Stage1(samples=48, val_samples=16, steps=12, batch_size=8, eval_every=4, cache=cache,
                 cond_dropout=cond_dropout)
    if crash_at is not None:
        import ditgraft.graft.stage1 as s1

        monkeypatch.setattr(s1, "_bank_losses", crash_on_call(s1._bank_losses, crash_at))
    return run_stage1(teacher, GRAFTS, cfg, x0, y, xv, yv, run_dir, seed=0, device="cpu", progress=False,
                      log=lambda *_: None)


@pytest.mark.parametrize("cache", ["memory", "stream"])
def test_stage1_learns_and_resumes_exactly(tmp_path, monkeypatch, cache):
    full = _stage1(str(tmp_path / "a"), cache)
    ops = full["operators"]
    assert set(ops) == {"attn1", "mlp0"}
    first = [r for r in full["history"] if "eval/mlp0_mse" in r]
    assert first[-1]["eval/mlp0_mse"] < first[0]["eval/mlp0_mse"]  # it learns
    with pytest.raises(Crash):
        _stage1(str(tmp_path / "b"), cache, crash_at=10, monkeypatch=monkeypatch)
    monkeypatch.undo()
    resumed = _stage1(str(tmp_path / "b"), cache)
    for key in ops:
        assert resumed["operators"][key] == ops[key]
    from safetensors.torch import load_file

    for key in ops:
        a = load_file(str(tmp_path / "a" / "best" / f"{key}.safetensors"))
        b = load_file(str(tmp_path / "b" / "best" / f"{key}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage2_resumes_exactly(tmp_path, monkeypatch):
    from ditgraft.graft import stage2

    cfg = Stage2(steps=6, batch_size=4, ckpt_every=2, lr=1e-3)
    x0, y = _data(16)

    def run(d):
        student = graft_model(tiny_dit(depth=2), GRAFTS, seed=0)
        return stage2.run_stage2(student, cfg, x0, y, d, seed=0, progress=False)[0]

    a = run(str(tmp_path / "a"))
    real = stage2.diffusion_step_fn
    monkeypatch.setattr(stage2, "diffusion_step_fn", lambda diffusion: crash_on_call(real(diffusion), 5))
    with pytest.raises(Crash):
        run(str(tmp_path / "b"))
    monkeypatch.undo()
    b = run(str(tmp_path / "b"))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_stage2_distill_weight_zero_is_the_diffusion_loss_alone(tmp_path):
    """distill_weight 0 (the default) trains bit-identically to the plain diffusion step, teacher or not."""
    from ditgraft.diffusion.gaussian import GaussianDiffusion
    from ditgraft.graft import stage2
    from ditgraft.train.loop import train

    cfg = Stage2(steps=3, batch_size=4, ckpt_every=2, lr=1e-3)
    x0, y = _data(16)
    teacher = tiny_dit(depth=2)
    a = stage2.run_stage2(graft_model(teacher, GRAFTS, seed=0), cfg, x0, y, str(tmp_path / "a"), seed=0,
                          progress=False, teacher=teacher)[0]
    student = graft_model(teacher, GRAFTS, seed=0)
    student.pos_embed.requires_grad_(False)
    b = train(student, stage2.diffusion_step_fn(GaussianDiffusion.dit_default(learn_sigma=student.learn_sigma)),
              (x0, y), cfg.loop_config(0, False), str(tmp_path / "b"), desc="stage2").model
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_stage2_output_distillation_adds_a_teacher_term_with_student_only_gradients():
    from ditgraft.diffusion.gaussian import GaussianDiffusion
    from ditgraft.graft import stage2

    teacher = tiny_dit(depth=2, class_dropout_prob=0.5)
    diffusion = GaussianDiffusion.dit_default(learn_sigma=teacher.learn_sigma)
    x0, y = _data(8)
    # a student identical to the teacher: zero distillation loss only if the teacher sees the same noised input,
    # timestep and dropped-out labels
    clone = graft_model(teacher, [], seed=0).train()
    torch.manual_seed(0)
    assert stage2.distill_step_fn(diffusion, teacher.eval(), 1.0)(clone, (x0, y))["distill"].item() == 0.0

    grads = {}
    for w in (0.0, 2.0):
        student = graft_model(teacher, GRAFTS, seed=0).train()
        step = stage2.stage2_step_fn(diffusion, Stage2(distill_weight=w), teacher)
        torch.manual_seed(0)
        out = step(student, (x0, y))
        out["loss"].backward()
        grads[w] = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        if w:
            assert out["distill"].item() > 0
            assert out["loss"].item() == pytest.approx(base["loss"].item() + w * out["distill"].item(), rel=1e-6)
        else:
            assert "distill" not in out
            base = out
    assert all(p.grad is None for p in teacher.parameters())  # frozen: nothing flows into the teacher
    assert any(not torch.allclose(grads[0.0][n], grads[2.0][n]) for n in grads[0.0])
    with pytest.raises(ValueError, match="distill_weight"):
        stage2.stage2_step_fn(diffusion, Stage2(distill_weight=1.0), None)


def test_stage2_distillation_alone_has_the_distillation_gradient_only():
    """diffusion_weight 0: the loss is distill_weight x the output MSE against the teacher; the recipe refuses a
    stage 2 with no loss and a diffusion weight that would only rescale the plain loss."""
    from ditgraft.diffusion.gaussian import GaussianDiffusion
    from ditgraft.graft import stage2

    teacher = tiny_dit(depth=2)
    diffusion = GaussianDiffusion.dit_default(learn_sigma=teacher.learn_sigma)
    x0, y = _data(8)
    student = graft_model(teacher, GRAFTS, seed=0).train()
    torch.manual_seed(0)
    out = stage2.stage2_step_fn(diffusion, Stage2(diffusion_weight=0.0, distill_weight=3.0), teacher)(student, (x0, y))
    assert out["loss"].item() == pytest.approx(3.0 * out["distill"].item(), rel=1e-6)
    assert out["diffusion"].item() > 0  # still logged
    with pytest.raises(ValueError, match="no loss"):
        Stage2(diffusion_weight=0.0)
    with pytest.raises(ValueError, match="only rescales"):
        Stage2(diffusion_weight=0.5)


def test_stage1_samples_beyond_the_images_are_noised_copies():
    """stage1.samples larger than the data: the draw cycles through the images, each copy
    with its own timestep and noise."""
    from ditgraft.graft.data_split import load_split, stage1_split

    cfg = Stage1(data="mnist5k", samples=10_000, val_samples=50)
    x, y, xv, yv = stage1_split(cfg, seed=0)
    base, _, _, _ = load_split(cfg.data, 10**9, 50, 0)
    assert len(x) == len(y) == 10_000 and len(xv) == 50
    assert torch.equal(x[:len(base)], base) and torch.equal(x[len(base):2 * len(base)], base)
    inputs = noised_inputs(x, y, seed=1)
    n = len(base)
    assert (inputs.t[:n] != inputs.t[n:2 * n]).float().mean() > 0.9  # the copies are noised at other timesteps
    small = stage1_split(Stage1(data="mnist5k", samples=100, val_samples=50), seed=0)[0]
    assert len(small) == 100  # fewer samples than images: a draw, as before


def test_stage1_cond_dropout_gives_a_share_of_rows_the_unconditional_label():
    """cond_dropout p: about p of the rows get the null label; t and the noise are those of p = 0 (drawn first)."""
    x0, y = _data(400)
    plain = noised_inputs(x0, y, seed=3)
    dropped = noised_inputs(x0, y, seed=3, null=torch.full_like(y, 10), cond_dropout=0.3)
    assert torch.equal(plain.t, dropped.t) and torch.equal(plain.x_t, dropped.x_t)
    changed = dropped.y != y
    assert torch.all(dropped.y[changed] == 10) and torch.equal(dropped.y[~changed], y[~changed])
    assert 0.2 < changed.float().mean() < 0.4
    assert torch.equal(noised_inputs(x0, y, seed=3, null=None, cond_dropout=0.0).y, y)


@pytest.mark.parametrize("cache", ["memory", "stream"])
def test_stage1_with_cond_dropout_runs_through_the_family_null_label(tmp_path, cache):
    """cond_dropout in both cache modes: the teacher's null label comes from its family; the result differs from
    stage 1 without it (other rows are seen unconditionally)."""
    a = _stage1(str(tmp_path / "a"), cache, cond_dropout=0.5)["operators"]["attn1"]["val_mse"]
    b = _stage1(str(tmp_path / "b"), cache)["operators"]["attn1"]["val_mse"]
    assert a != b
