"""The teacher's model card states the exact recipe and whether the accuracy target is met."""
from dataclasses import asdict

from ditgraft.train.card import _card
from ditgraft.train.loop import LoopConfig
from ditgraft.train.pretrain import record_stage


def _render(decay_steps: int, accuracies: tuple[float, ...]) -> str:
    loop = asdict(LoopConfig(steps=1000, batch_size=128, lr=5e-4, warmup_steps=200, decay_steps=decay_steps,
                             ema_decay=0.999, grad_clip=1.0, ckpt_every=250))
    info = {"loop": loop, "params": 2_464_800, "wall_seconds": 3600.0, "device": "cpu", "torch": "2.13.0",
            "train_flops": 1e14, "train_flops_per_sample": 661_880_832, "final_loss": 0.02}
    row = {"fid": 10.0, "kid_x1000": 1.0, "precision": 0.5, "recall": 0.5}
    evals = [dict(row, accuracy=a, protocol={"cfg_scale": c, "num": 500, "sampler": "ddim", "steps": 25, "seed": 0})
             for a, c in zip(accuracies, (1.5, 4.0))]
    return _card(info, evals, dict(row, accuracy=0.98))


def test_card_recipe_reproduces_the_schedule():
    assert "--decay-steps 300 " in _render(300, (0.95, 0.97))
    card = _render(300, (0.95, 0.97))
    assert "constant LR 0.0005, then linear decay from 0.0005 to 0 over the last 300 steps" in card
    assert "--decay-steps" not in _render(0, (0.95, 0.97))


def test_card_states_the_accuracy_target():
    assert "**met** (lowest\n95.0%)" in _render(0, (0.95, 0.97))
    assert "**missed** (lowest\n89.0%)" in _render(0, (0.89, 0.97))


def test_a_resume_with_new_settings_is_a_second_command_on_the_card():
    first = asdict(LoopConfig(steps=1000, batch_size=128, lr=5e-4, warmup_steps=200, decay_steps=300))
    info = {"loop": first}
    assert record_stage(info, first, 0) == [{"from_step": 0, "loop": first}]  # crash + resume: still one stage
    info["stages"] = record_stage(info, dict(first, progress=False), 600)  # only the progress bar differs
    assert len(info["stages"]) == 1
    second = asdict(LoopConfig(steps=1600, batch_size=128, lr=4e-4, warmup_steps=200, decay_steps=600))
    info["stages"] = record_stage(info, second, 1000)
    assert [st["from_step"] for st in info["stages"]] == [0, 1000]
    assert info["stages"][1]["loop"]["lr"] == 4e-4

    info = {"loop": second, "stages": info["stages"], "params": 1, "wall_seconds": 1.0, "device": "cpu",
            "torch": "2", "train_flops": 1.0, "train_flops_per_sample": 1, "final_loss": 0.1}
    row = {"fid": 1.0, "kid_x1000": 1.0, "precision": 0.5, "recall": 0.5, "accuracy": 0.9,
           "protocol": {"cfg_scale": 1.5, "num": 500, "sampler": "ddim", "steps": 25, "seed": 0}}
    card = _card(info, [row], row)
    assert "--steps 1000 --batch-size 128 --lr 0.0005 --warmup 200 --decay-steps 300" in card
    assert "--steps 1600 --batch-size 128 --lr 0.0004 --warmup 200 --decay-steps 600" in card
    assert "(resumes from step 1,000)" in card
    assert "steps 1,000-1,600: linear decay from 0.0004 to 0 over the last 600 steps" in card
    assert "steps 0-1,000: linear warmup over steps 0-200, then constant LR 0.0005, then linear decay" in card
