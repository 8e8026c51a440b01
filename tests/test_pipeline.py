"""`run_graft` end to end on a tiny teacher: every stage, the report, the matched-budget random-init baseline, and a
re-run that skips what is complete."""
import json
import os

import pytest

from helpers import tiny_dit
from ditgraft.graft.pipeline import run_graft
from ditgraft.models.checkpoints import save_safetensors
from ditgraft.recipe import parse_recipe


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    model = tiny_dit(depth=2, input_size=32, patch_size=8)  # mnist5k-shaped: 32x32x1, 16 tokens
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.safetensors")
    save_safetensors(path, model, {"model_config": model.config, "pretrain": {"train_flops": 1e13}})
    return path


def recipe(teacher_file):
    return parse_recipe({
        "name": "tiny", "teacher": {"source": teacher_file},
        "grafts": [{"slot": "attn", "layers": [1], "operator": "hyena_x"}],
        "stage1": {"samples": 32, "val_samples": 8, "steps": 4, "batch_size": 8, "eval_every": 2},
        "stage2": {"steps": 3, "batch_size": 8, "ckpt_every": 2},
        "eval": {"num": 10, "steps": 2, "baselines": ["random_init"]},
    })


def test_pipeline_runs_every_stage_and_reports(teacher_file, tmp_path):
    r = recipe(teacher_file)
    run = str(tmp_path / "run")
    report = run_graft(r, run, progress=False, log=lambda *_: None)
    for name in ("plan.json", "stage1/summary.json", "student.safetensors", "baseline_random/student.safetensors",
                 "report.md", "report.json"):
        assert os.path.exists(os.path.join(run, name)), name
    c = report["compute"]
    assert c["total_flops"] == c["stage1_extraction_flops"] + c["stage1_operator_flops"] + c["stage2_flops"]
    assert c["stage1_extraction_flops"] > 0 and c["stage1_operator_flops"] > 0
    assert c["share_of_pretraining"] == pytest.approx(c["total_flops"] / 1e13)
    # the baseline gets the grafted run's whole budget as stage-2 steps, and really trains that many
    steps = c["random_init_stage2_steps"]
    assert steps == round(c["total_flops"] / (c["stage2_flops"] / 3)) and steps > 3
    with open(os.path.join(run, "baseline_random", "stage2", "loop", "metrics.jsonl")) as f:
        assert max(json.loads(line)["step"] for line in f) == steps
    assert set(report["eval"]) == {"grafted", "random_init"}
    assert f"{steps} steps instead of 3" in open(os.path.join(run, "report.md")).read()

    # a second call finds every stage complete (nothing trains or samples again: timings unchanged); the report
    # alone reads the evaluations back from disk
    timings = json.load(open(os.path.join(run, "timings.json")))
    assert timings.keys() >= {"stage1", "stage2", "baseline_random", "eval"}
    npz = os.path.getmtime(os.path.join(run, "eval", "grafted.npz"))
    again = run_graft(r, run, progress=False, log=lambda *_: None)
    after = json.load(open(os.path.join(run, "timings.json")))
    assert {k: after[k] for k in ("stage1", "stage2", "baseline_random")} == {
        k: timings[k] for k in ("stage1", "stage2", "baseline_random")}
    assert os.path.getmtime(os.path.join(run, "eval", "grafted.npz")) == npz
    alone = run_graft(r, run, stages=("report",), progress=False, log=lambda *_: None)
    for rep in (again, alone):
        assert rep["compute"] == report["compute"]
        assert {k: v["fid"] for k, v in rep["eval"].items()} == {k: v["fid"] for k, v in report["eval"].items()}
