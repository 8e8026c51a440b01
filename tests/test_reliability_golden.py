"""Golden losses: a small fixed pretrain, stage-1 and stage-2 run whose per-step losses are stored in
tests/golden/losses.json, so a change that alters training (the learning-rate schedule, the loss, the batch order,
the initialisation) is noticed even when every other test passes.

On the build that wrote the file (same torch version, CPU capability and machine) the losses must match exactly;
elsewhere to a relative 1e-4 (float kernels differ between builds). After an intended change to training,
rewrite the file and say why in the commit: ``python tests/test_reliability_golden.py --write``.
"""
import json
import os
import platform
import sys

import pytest
import torch

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "losses.json")
RTOL = 1e-4


def build_id() -> dict:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine()}


def _losses(path: str) -> list[float]:
    with open(path) as f:
        return [json.loads(line)["loss"] for line in f if line.strip()]


def golden_runs(root: str) -> dict:
    """Per-step losses of the three fixed runs (CPU, one thread, a few seconds)."""
    from ditgraft.api import run_pipeline
    from ditgraft.train.loop import LoopConfig
    from ditgraft.train.pretrain import PretrainConfig, pretrain

    torch.set_num_threads(1)
    loop = LoopConfig(steps=6, batch_size=4, lr=2e-3, warmup_steps=3, ema_decay=0.9, grad_clip=1.0, ckpt_every=6,
                      seed=0, log_every=1, progress=False)
    teacher = pretrain(PretrainConfig(model="testbed", data="mnist5k", loop=loop), os.path.join(root, "pretrain"),
                       torch.device("cpu"))
    recipe = {"name": "golden", "teacher": {"source": teacher},
              "grafts": [{"slot": "attn", "layers": [1, 5], "operator": "hyena_x"}],
              "stage1": {"samples": 16, "val_samples": 8, "steps": 6, "batch_size": 4, "eval_every": 1,
                         "warmup_steps": 2, "lr": 2e-3},
              "stage2": {"steps": 6, "batch_size": 4, "ckpt_every": 6, "warmup_steps": 2, "lr": 2e-3},
              "eval": {"enabled": False}}
    run = os.path.join(root, "graft")
    run_pipeline(recipe, run, stages=("stage1", "stage2"), device="cpu")
    return {"pretrain": _losses(os.path.join(root, "pretrain", "metrics.jsonl")),
            "stage1": _losses(os.path.join(run, "stage1", "loop", "metrics.jsonl")),
            "stage2": _losses(os.path.join(run, "stage2", "loop", "metrics.jsonl"))}


def compare(got: dict, golden: dict) -> list[str]:
    """The runs whose losses differ from the golden ones (exact on the recording build, else within RTOL)."""
    exact = golden["build"] == build_id()
    bad = []
    for name, want in golden["losses"].items():
        have = got.get(name, [])
        same = have == want if exact else len(have) == len(want) and all(
            abs(a - b) <= RTOL * abs(b) for a, b in zip(have, want))
        if not same:
            bad.append(f"{name}: {have} != golden {want} ({'exact' if exact else f'rtol {RTOL}'})")
    return bad


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return golden_runs(str(tmp_path_factory.mktemp("golden")))


def test_training_losses_match_the_golden_ones(runs):
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert all(len(v) == 6 for v in runs.values()), runs
    assert compare(runs, golden) == []


def test_a_learning_rate_schedule_one_step_off_is_noticed(runs, tmp_path, monkeypatch):
    """The golden comparison catches the learning-rate schedule shifted by one step, on any build (tolerant mode)."""
    from ditgraft.train import loop

    real = loop.LoopConfig.lr_at

    def one_step_late(self, step):
        return real(self, max(step - 1, 0))

    monkeypatch.setattr(loop.LoopConfig, "lr_at", one_step_late)
    shifted = golden_runs(str(tmp_path))
    with open(GOLDEN) as f:
        golden = json.load(f)
    bad = compare(shifted, {**golden, "build": {}})  # the tolerant comparison: it must fail too
    assert {b.split(":")[0] for b in bad} == {"pretrain", "stage1", "stage2"}, bad


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        data = {"build": build_id(), "losses": golden_runs(d)}
    with open(GOLDEN, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    print(f"wrote {GOLDEN}: {data['build']}")
