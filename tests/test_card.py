"""The teacher's model card states the exact recipe and whether the accuracy target is met."""
from dataclasses import asdict

from ditgraft.train.card import _card
from ditgraft.train.loop import LoopConfig


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
    assert "linear decay to 0 over the last 300 steps" in _render(300, (0.95, 0.97))
    assert "--decay-steps" not in _render(0, (0.95, 0.97))


def test_card_states_the_accuracy_target():
    assert "**met** (lowest\n95.0%)" in _render(0, (0.95, 0.97))
    assert "**missed** (lowest\n89.0%)" in _render(0, (0.89, 0.97))
