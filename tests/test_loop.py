"""The shared training loop: exact resume, checkpoints, schedules, evaluation hook, pretrain resume."""
import json
import os

import pytest
import torch
from torch import nn

from helpers import Crash, crash_on_call

from ditgraft.train.loop import LoopConfig, batch_indices, latest_checkpoint, train


def _toy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 4, generator=g)
    return x, x.sum(1, keepdim=True).sin()


def _step(model, batch):
    x, y = batch
    noise = 0.01 * torch.randn_like(y)  # uses the global RNG: resume must reproduce it
    return {"loss": (model(x) - y - noise).square().mean()}


def test_resume_is_exact(tmp_path):
    cfg = LoopConfig(steps=30, batch_size=8, lr=1e-2, warmup_steps=5, ema_decay=0.9, grad_clip=1.0, ckpt_every=7,
                     progress=False)
    full = train(_toy(), _step, _data(), cfg, str(tmp_path / "a"))
    with pytest.raises(Crash):
        train(_toy(), crash_on_call(_step, 18), _data(), cfg, str(tmp_path / "b"))
    assert latest_checkpoint(str(tmp_path / "b"))[0] == 14
    resumed = train(_toy(), _step, _data(), cfg, str(tmp_path / "b"))
    assert resumed.resumed_from == 14 and resumed.steps_run == 16
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    rows = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [r["step"] for r in full.history]  # no duplicated log rows


def test_complete_run_is_skipped_and_old_checkpoints_pruned(tmp_path):
    cfg = LoopConfig(steps=10, batch_size=8, ckpt_every=2, keep_checkpoints=2, ema_decay=None, progress=False)
    train(_toy(), _step, _data(), cfg, str(tmp_path))
    again = train(_toy(), _step, _data(), cfg, str(tmp_path))
    assert again.steps_run == 0 and again.ema is None
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_0000008", "step_0000010"]


def test_batches_are_epoch_permutations():
    rows = torch.cat([batch_indices(50, 10, seed=3, step=s) for s in range(5)])
    assert sorted(rows.tolist()) == list(range(50))
    assert torch.equal(batch_indices(50, 10, 3, 7), batch_indices(50, 10, 3, 7))
    assert not torch.equal(batch_indices(50, 10, 3, 5), batch_indices(50, 10, 3, 0))


def test_schedule_and_validation():
    cfg = LoopConfig(steps=100, batch_size=1, lr=1.0, warmup_steps=10, schedule="cosine")
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(10) == pytest.approx(1.0) and cfg.lr_at(99) < 0.01
    with pytest.raises(ValueError, match="schedule='linear'"):
        LoopConfig(steps=1, batch_size=1, schedule="linear")
    with pytest.raises(ValueError, match="steps=0"):
        LoopConfig(steps=0, batch_size=1)
    with pytest.raises(ValueError, match=r"sharding='zero3' is not allowed; use one of \('ddp', 'fsdp'\)"):
        LoopConfig(steps=1, batch_size=1, sharding="zero3")


def test_constant_schedule_with_a_final_linear_decay():
    """Warmup, constant, then linear decay to 0 over the last decay_steps steps. The constant part does not depend
    on decay_steps or steps, so a constant-LR run can be extended later with a decay and stay one exact run."""
    cfg = LoopConfig(steps=10, batch_size=1, lr=1.0, warmup_steps=2, decay_steps=4)
    assert [cfg.lr_at(s) for s in range(10)] == pytest.approx([0.5, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2])
    longer = LoopConfig(steps=1000, batch_size=1, lr=1.0, warmup_steps=2)
    assert [longer.lr_at(s) for s in range(6)] == [cfg.lr_at(s) for s in range(6)]
    with pytest.raises(ValueError, match="decay_steps=9"):
        LoopConfig(steps=10, batch_size=1, warmup_steps=2, decay_steps=9)
    with pytest.raises(ValueError, match="schedule='cosine'"):
        LoopConfig(steps=10, batch_size=1, schedule="cosine", decay_steps=2)


def test_extending_a_constant_run_with_a_decay_equals_one_run(tmp_path):
    base = dict(batch_size=8, lr=1e-2, warmup_steps=2, ema_decay=0.9, ckpt_every=5, progress=False)
    one = train(_toy(), _step, _data(), LoopConfig(steps=12, decay_steps=7, **base), str(tmp_path / "one"))
    train(_toy(), _step, _data(), LoopConfig(steps=5, **base), str(tmp_path / "two"))
    two = train(_toy(), _step, _data(), LoopConfig(steps=12, decay_steps=7, **base), str(tmp_path / "two"))
    assert two.resumed_from == 5
    for a, b in zip(one.model.state_dict().values(), two.model.state_dict().values()):
        assert torch.equal(a, b)


def test_evaluate_hook_logged(tmp_path):
    seen = []

    def evaluate(model, step):
        seen.append(step)
        return {"val": float(step)}

    cfg = LoopConfig(steps=9, batch_size=8, ema_decay=None, ckpt_every=100, log_every=100, progress=False)
    res = train(_toy(), _step, _data(), cfg, str(tmp_path), evaluate=evaluate, eval_every=4)
    assert seen == [4, 8, 9]
    assert [r["eval/val"] for r in res.history if "eval/val" in r] == [4.0, 8.0, 9.0]


def test_pretrain_interrupted_equals_uninterrupted(tmp_path, monkeypatch):
    """`ditgraft pretrain` killed mid-run and re-run gives the same weights as one uninterrupted run."""
    from safetensors.torch import load_file

    from ditgraft.models import dit
    from ditgraft.train import pretrain as pt
    from ditgraft.train.loop import LoopConfig as LC
    from ditgraft.utils import read_json

    monkeypatch.setitem(dit.DIT_CONFIGS, "tiny", dict(input_size=32, patch_size=8, in_channels=1, hidden_size=32,
                                                      depth=2, num_heads=2, num_classes=10))
    loop = LC(steps=6, batch_size=8, lr=1e-3, ema_decay=0.9, grad_clip=1.0, ckpt_every=2, progress=False)
    cfg = pt.PretrainConfig(model="tiny", loop=loop)
    a = pt.pretrain(cfg, str(tmp_path / "a"), torch.device("cpu"))

    real_step_fn = pt.diffusion_step_fn
    monkeypatch.setattr(pt, "diffusion_step_fn", lambda diffusion: crash_on_call(real_step_fn(diffusion), 4))
    with pytest.raises(Crash):
        pt.pretrain(cfg, str(tmp_path / "b"), torch.device("cpu"))
    monkeypatch.setattr(pt, "diffusion_step_fn", real_step_fn)
    b = pt.pretrain(cfg, str(tmp_path / "b"), torch.device("cpu"))
    wa, wb = load_file(a), load_file(b)
    stages = read_json(str(tmp_path / "b" / "pretrain_info.json"))["stages"]
    assert [st["from_step"] for st in stages] == [0]  # crash + resume of one command is one stage of the recipe
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
