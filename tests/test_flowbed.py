"""The flow-matching testbed teacher (``flowbed``): a small MMDiT (models/mmdit.py, family ``mmdit``) with joint
image-text attention over the captions of the digit classes, trained with rectified flow by ``ditgraft pretrain``;
its split attention slots, pretraining and resume, Euler sampling, ``ditgraft eval`` and the bundled recipe."""
from __future__ import annotations

import json
import os

import pytest
import torch

from ditgraft.cli import main
from ditgraft.diffusion.flow_matching import FlowMatching
from ditgraft.diffusion.samplers import SamplingConfig, default_sampler
from ditgraft.eval.sampling import generate
from ditgraft.graft.surgery import ResolvedGraft, graft_model, load_any
from ditgraft.models.checkpoints import load_weights
from ditgraft.models.families import family_of
from ditgraft.models.families.joint import JointSplitAttention
from ditgraft.models.mmdit import CAPTION_WORDS, MMDIT_CONFIGS, MMDiT, caption
from ditgraft.train.loop import LoopConfig
from ditgraft.train.pretrain import PretrainConfig, pretrain
from helpers import tiny_mmdit as tiny


def inputs(n=4, seed=1, size=16):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([7, 0, 10, 3][:n])  # 10: the empty caption
    return torch.randn(n, 1, size, size, generator=g), torch.rand(n, generator=g) * 1000, labels


def test_forward_shapes_captions_and_family():
    model = MMDiT(**MMDIT_CONFIGS["flowbed"])
    assert 2e6 < sum(p.numel() for p in model.parameters()) < 5e6  # a few million; float32 well under 20 MB
    x, t, y = inputs(size=32)
    assert model(x, t, y).shape == (4, 1, 32, 32)
    assert caption(7) == "a handwritten seven" and caption(10) == ""
    tokens = model.caption_embedder.tokens(torch.tensor([7, 10]))
    assert [CAPTION_WORDS[i] for i in tokens[0]] == ["a", "handwritten", "seven"] and tokens[1].tolist() == [0, 0, 0]
    fam = family_of(model)
    assert fam.name == "mmdit" and fam.dims(model).grid == (8, 8) and fam.dims(model).depth == 6
    assert fam.split_text(model, 0, y) == (3, 128)  # the caption tokens entering each joint attention
    assert isinstance(fam.objective(model), FlowMatching) and default_sampler(model) == "euler"
    assert fam.protocol_cond(model, torch.arange(12), "cpu").tolist() == [*range(10), 0, 1]  # class-balanced
    assert fam.null_cond(model, torch.tensor([3, 4])).tolist() == [10, 10]  # the empty caption
    assert model.transformer_blocks[-1].context_pre_only and not hasattr(model.transformer_blocks[-1], "ff_context")


def test_caption_conditioning_reaches_the_image_through_joint_attention_alone():
    """With the pooled caption embedding cut off, the caption still changes the image output: it reaches the image
    tokens through the joint attention."""
    model = tiny()
    with torch.no_grad():
        model.caption_embedder.pooled[-1].weight.zero_()
        model.caption_embedder.pooled[-1].bias.zero_()
        x, t, _ = inputs(2)
        a, b = model(x, t, torch.tensor([1, 1])), model(x, t, torch.tensor([8, 8]))
    assert (a - b).abs().max() > 1e-3


def test_identity_graft_of_the_image_to_image_split_reproduces_the_teacher():
    teacher = tiny()
    x, t, y = inputs()
    with torch.no_grad():
        want = teacher(x, t, y)
    # every attention split (an MHA copied from the image projections) and every image MLP copied
    grafts = [ResolvedGraft("attn", i, "mha", init="teacher") for i in range(3)]
    grafts += [ResolvedGraft("mlp", i, "mlp", init="teacher") for i in range(3)]
    student = graft_model(teacher, grafts)
    assert all(isinstance(b.attn, JointSplitAttention) for b in student.transformer_blocks)
    with torch.no_grad():
        got = student(x, t, y)
    assert (got - want).abs().max() < 1e-5, (got - want).abs().max()
    # CLEAR (a local softmax) copied from the teacher with a circle over the whole 4 x 4 grid is full attention
    clear = graft_model(teacher, [ResolvedGraft("attn", i, "clear", {"radius": 12}, init="teacher")
                                  for i in range(3)])
    with torch.no_grad():
        assert (clear(x, t, y) - want).abs().max() < 1e-5
        # a real window changes the image-to-image part only: the output moves
        local = graft_model(teacher, [ResolvedGraft("attn", 1, "clear", {"radius": 2}, init="teacher")])
        assert (local(x, t, y) - want).abs().max() > 1e-4


def test_split_slot_refuses_an_operator_without_a_softmax_normaliser():
    student = graft_model(tiny(), [ResolvedGraft("attn", 0, "hyena_x")])
    with pytest.raises(ValueError, match="reports its softmax normaliser; HyenaX"):
        student(*inputs())


def _pretrain(run_dir, steps):
    loop = LoopConfig(steps=steps, batch_size=8, lr=1e-3, warmup_steps=1, ema_decay=0.9, grad_clip=1.0, ckpt_every=2,
                      progress=False, log_every=1)
    return pretrain(PretrainConfig(model="flowbed", loop=loop), str(run_dir), torch.device("cpu"))


def test_pretrain_flow_matching_and_resume_exactly(tmp_path):
    straight = _pretrain(tmp_path / "a", 4)
    _pretrain(tmp_path / "b", 2)
    resumed = _pretrain(tmp_path / "b", 4)  # a second stage: resumes from the step-2 checkpoint
    a, b = load_weights(straight), load_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    stages = json.loads((tmp_path / "b" / "pretrain_info.json").read_text())["stages"]
    assert [st["from_step"] for st in stages] == [0, 2]  # it did resume (a fresh 4-step run would also match)
    info = json.loads((tmp_path / "a" / "pretrain_info.json").read_text())
    assert info["objective"] == "flow_matching" and info["model"] == "flowbed" and info["final_loss"] > 0
    model, meta = load_any(straight)
    assert isinstance(model, MMDiT) and meta["family"] == "mmdit"


def test_euler_sampling_and_eval_against_the_testbed_features(tmp_path, capsys):
    model = tiny(input_size=32)  # the testbed classifier reads 32 x 32 digits
    images, labels = generate(model, 12, SamplingConfig(sampler="euler", steps=2, cfg_scale=1.5), batch_size=6)
    assert images.shape == (12, 32, 32, 1) and labels.tolist() == [*range(10), 0, 1]
    with pytest.raises(ValueError, match="use one of \\('euler',\\)"):
        generate(model, 2, SamplingConfig(sampler="ddim", steps=2))
    from ditgraft.models.checkpoints import save_safetensors

    path = str(tmp_path / "m.safetensors")
    save_safetensors(path, model, {"model_config": model.config, "family": "mmdit"})
    assert main(["eval", path, "--num-samples", "20", "--out", str(tmp_path / "eval")]) == 0
    row = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert row["protocol"]["sampler"] == "euler" and 0 <= row["accuracy"] <= 1 and row["fid"] > 0


def _flowbed_recipe(tmp_path, teacher: str, **eval_overrides) -> str:
    """The bundled flowbed recipe on ``teacher``, at a few steps and samples."""
    import yaml

    from ditgraft.recipe import RECIPES_DIR

    with open(f"{RECIPES_DIR}/flowbed_clear_50.yaml") as f:
        r = yaml.safe_load(f)
    r["teacher"]["source"] = teacher
    r["stage1"].update(samples=24, val_samples=8, steps=3, batch_size=8, eval_every=3)
    r["stage2"].update(steps=3, decay_steps=2, warmup_steps=1, batch_size=8, ckpt_every=2)
    r["eval"].update(num=20, steps=2, seeds=[0, 1], batch_size=10, resamples=20, **eval_overrides)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return str(path)


def test_bundled_recipe_grafts_and_decides_against_the_teacher(tmp_path, capsys):
    from ditgraft.models.checkpoints import save_safetensors

    model = tiny(depth=4, input_size=32)
    teacher = str(tmp_path / "teacher.safetensors")
    save_safetensors(teacher, model, {"model_config": model.config, "family": "mmdit",
                                      "pretrain": {"train_flops": 1e12}})
    assert main(["graft", _flowbed_recipe(tmp_path, teacher, sampler="ddim"), "--run-dir", str(tmp_path / "bad")])
    assert "eval.sampler='ddim' does not sample the mmdit family's flow-matching objective; allowed: euler" in \
        capsys.readouterr().err
    assert main(["graft", _flowbed_recipe(tmp_path, teacher), "--run-dir", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert set(report["eval"]) == {"grafted", "teacher", "random_init"}
    assert report["eval"]["grafted"]["protocol"]["sampler"] == "euler"
    assert [g["layer"] for g in report["grafts"]] == [1, 3] and report["grafts"][0]["operator"] == "clear"
    assert os.path.exists(tmp_path / "run" / "stage1" / "summary.json")  # the split slots were distilled
    decision = json.loads((tmp_path / "run" / "eval" / "grafted_decision.json").read_text())
    assert decision["verdicts"]
    student, _ = load_any(str(tmp_path / "run"))
    assert isinstance(student.transformer_blocks[1].attn, JointSplitAttention)


def test_card_ships_the_pretrained_flowbed_teacher(tmp_path, monkeypatch):
    """``python -m ditgraft.train.card RUN`` on a flowbed run: the teacher file loads by family, the metrics are
    Euler-protocol ones and the card states the command that made it (at a few samples here)."""
    from ditgraft.eval import evaluate
    from ditgraft.train import card

    monkeypatch.setattr(card, "protocol_for", lambda **kw: evaluate.protocol_for(**kw, num=20, steps=2,
                                                                                 batch_size=10))
    _pretrain(tmp_path / "run", 2)
    metrics = card.ship_teacher(str(tmp_path / "run"), str(tmp_path / "assets"), str(tmp_path / "docs"))
    assert [e["protocol"]["sampler"] for e in metrics["evaluations"]] == ["euler", "euler"]
    model, meta = load_any(str(tmp_path / "assets" / "teacher.safetensors"))
    assert isinstance(model, MMDiT) and meta["pretrain"]["model"] == "flowbed"
    text = (tmp_path / "assets" / "TEACHER.md").read_text()
    assert "`ditgraft pretrain --model flowbed --run-dir runs/flowbed --steps 2 --batch-size 8" in text
    assert "euler 2 steps" in text and "(velocity MSE)" in text and "torch 1 threads" in text
    assert (tmp_path / "docs" / "flowbed_cfg1.5.png").exists()
