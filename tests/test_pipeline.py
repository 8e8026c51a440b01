"""`run_graft` on a tiny teacher, one stage per test (so a failure names the stage): stage 1, stage 2 with the
matched-budget random-init baseline, evaluation, the report, and a re-run that skips what is complete. Each test
starts from a run directory brought to the state it needs (``reach``), so any test runs alone or in any order."""
import json
import os
import shutil

import pytest
import torch

from helpers import save_mnist_teacher
from ditgraft.graft.pipeline import PIPELINE, STAGES, run_graft
from ditgraft.recipe import parse_recipe


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    return save_mnist_teacher(str(tmp_path_factory.mktemp("teacher")))


@pytest.fixture(scope="module")
def reach(teacher_file, tmp_path_factory):
    """``reach(stage)`` -> (a run directory where the stages up to ``stage`` have run, a function running some
    stages there, what running ``stage`` returned). Each stage runs once per module, on a copy of the directory of
    the stage before; every caller gets its own copy, so the tests pass alone and in any order."""
    r = parse_recipe({
        "name": "tiny", "teacher": {"source": teacher_file},
        "grafts": [{"slot": "attn", "layers": [1], "operator": "hyena_x"}],
        "stage1": {"samples": 32, "val_samples": 8, "steps": 4, "batch_size": 8, "eval_every": 2},
        "stage2": {"steps": 3, "batch_size": 8, "ckpt_every": 2},
        "eval": {"num": 10, "steps": 2, "baselines": ["random_init"]},
    })
    root = tmp_path_factory.mktemp("runs")
    done: dict[str, tuple[str, dict]] = {}

    def runner(folder: str):
        return lambda *stages: run_graft(r, folder, stages=stages or STAGES, progress=False, log=lambda *_: None)

    def snapshot(stage: str) -> tuple[str, dict]:
        if stage not in done:
            i = STAGES.index(stage)
            folder = str(root / stage / "run")
            if i:
                shutil.copytree(snapshot(STAGES[i - 1])[0], folder)
            done[stage] = (folder, runner(folder)(stage))
        return done[stage]

    def at(stage: str):
        folder, result = snapshot(stage)
        mine = str(tmp_path_factory.mktemp("run") / "run")
        shutil.copytree(folder, mine)
        return mine, runner(mine), result

    return at


def _timings(folder: str) -> dict:
    return json.load(open(os.path.join(folder, "timings.json")))


def test_every_stage_name_is_a_stage():
    assert {s.name for s in PIPELINE} == set(STAGES)


def test_stage1_distils_the_grafted_operator(reach):
    folder, _, result = reach("stage1")
    assert result == {}  # no report asked for
    summary = json.load(open(os.path.join(folder, "stage1", "summary.json")))
    assert [(s["slot"], s["layer"], s["operator"]) for s in summary["operators"].values()] == [("attn", 1, "hyena_x")]
    assert os.path.exists(os.path.join(folder, "plan.json"))
    assert not os.path.exists(os.path.join(folder, "student.safetensors"))
    assert set(_timings(folder)) == {"stage1"}


def test_stage2_trains_the_student_and_the_matched_random_init_baseline(reach):
    folder, _, _ = reach("stage2")
    assert os.path.exists(os.path.join(folder, "student.safetensors"))
    assert os.path.exists(os.path.join(folder, "baseline_random", "student.safetensors"))
    with open(os.path.join(folder, "baseline_random", "stage2", "loop", "metrics.jsonl")) as f:
        baseline_steps = max(json.loads(line)["step"] for line in f)
    assert baseline_steps > 3  # the grafted run's stage 1 + stage 2 FLOPs, spent on stage 2 alone
    assert set(_timings(folder)) == {"stage1", "stage2", "baseline_random"}


def test_eval_samples_the_student_and_the_baseline(reach):
    folder, _, _ = reach("eval")
    for tag in ("grafted", "random_init"):
        metrics = json.load(open(os.path.join(folder, "eval", f"{tag}_metrics.json")))
        assert metrics["num"] == 10 and metrics["protocol"]["steps"] == 2
        assert os.path.exists(os.path.join(folder, "eval", f"{tag}.npz"))


def test_report_accounts_the_compute_and_reads_evaluations_from_disk(reach):
    folder, _, report = reach("report")
    for name in ("report.md", "report.json"):
        assert os.path.exists(os.path.join(folder, name)), name
    c = report["compute"]
    assert c["total_flops"] == c["stage1_extraction_flops"] + c["stage1_operator_flops"] + c["stage2_flops"]
    assert c["stage1_extraction_flops"] > 0 and c["stage1_operator_flops"] > 0
    assert c["share_of_pretraining"] == pytest.approx(c["total_flops"] / 1e13)
    steps = c["random_init_stage2_steps"]
    assert steps == round(c["total_flops"] / (c["stage2_flops"] / 3)) and steps > 3
    with open(os.path.join(folder, "baseline_random", "stage2", "loop", "metrics.jsonl")) as f:
        assert max(json.loads(line)["step"] for line in f) == steps  # the baseline really trained that many
    assert set(report["eval"]) == {"grafted", "random_init"}
    assert f"{steps} steps instead of 3" in open(os.path.join(folder, "report.md")).read()
    assert json.load(open(os.path.join(folder, "report.json")))["compute"] == c


def test_rerun_skips_every_complete_stage(reach):
    folder, graft, _ = reach("report")
    before = _timings(folder)
    npz = os.path.getmtime(os.path.join(folder, "eval", "grafted.npz"))
    alone = graft("report")
    again = graft()
    after = _timings(folder)
    assert {k: after[k] for k in ("stage1", "stage2", "baseline_random")} == {
        k: before[k] for k in ("stage1", "stage2", "baseline_random")}  # nothing trained again
    assert os.path.getmtime(os.path.join(folder, "eval", "grafted.npz")) == npz  # nothing sampled again
    assert again["compute"] == alone["compute"]
    assert {k: v["fid"] for k, v in again["eval"].items()} == {k: v["fid"] for k, v in alone["eval"].items()}


def test_random_init_baseline_is_random_when_the_recipe_starts_from_the_teacher(teacher_file, tmp_path):
    """init: teacher starts the grafted operators from the teacher's attention; the random-init baseline still
    starts them from random weights (its name and its purpose: grafting vs no grafting at the same FLOPs)."""
    from safetensors.torch import load_file
    from ditgraft.api import load_model

    r = parse_recipe({
        "name": "tiny", "teacher": {"source": teacher_file},
        "grafts": [{"slot": "attn", "layers": [1], "operator": "hyena_x", "init": "teacher"}],
        "stage1": {"enabled": False},
        "stage2": {"steps": 1, "batch_size": 4, "lr": 1e-12, "ckpt_every": 1},
        "eval": {"enabled": False, "baselines": ["random_init"]},
    })
    folder, lines = str(tmp_path / "run"), []
    run_graft(r, folder, stages=("stage2",), progress=False, log=lines.append)
    assert any("GiB per CPU process" in line and "/ 1 CPU process(s)" in line for line in lines)  # not "per GPU"
    qkv = load_model(teacher_file).blocks[1].attn.qkv.weight
    key = "blocks.1.attn.in_proj.weight"
    grafted = load_file(os.path.join(folder, "student.safetensors"))[key]
    baseline = load_file(os.path.join(folder, "baseline_random", "student.safetensors"))[key]
    assert torch.allclose(grafted, qkv, atol=1e-6)  # lr 1e-12: still the teacher's weights
    assert not torch.allclose(baseline, qkv, atol=1e-2)


def _tiny_recipe(teacher_file: str) -> dict:
    return {"name": "tiny", "teacher": {"source": teacher_file},
            "grafts": [{"slot": "attn", "layers": [1], "operator": "hyena_x"}],
            "stage1": {"samples": 32, "val_samples": 8, "steps": 4, "batch_size": 8, "eval_every": 2},
            "stage2": {"steps": 3, "batch_size": 8, "ckpt_every": 2},
            "eval": {"num": 10, "steps": 2}}


def test_a_stage_without_its_inputs_fails_at_the_start_in_one_line(teacher_file, tmp_path, capsys):
    import yaml

    from ditgraft.cli import main

    recipe_path, run_dir = tmp_path / "tiny.yaml", tmp_path / "run"
    recipe_path.write_text(yaml.safe_dump(_tiny_recipe(teacher_file)))
    assert main(["graft", str(recipe_path), "--stages", "stage2", "--run-dir", str(run_dir), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"stage2 needs {os.path.join('stage1', 'summary.json')}, not in {run_dir}; run stage1 first" in err
    assert not os.path.exists(run_dir / "stage2") and not os.path.exists(run_dir / "recipe.yaml")  # no work done


def test_eval_without_a_student_is_refused(teacher_file, tmp_path):
    from ditgraft.utils import InputError

    r = parse_recipe(_tiny_recipe(teacher_file))
    with pytest.raises(InputError, match=r"eval needs .*student\.safetensors.*run stage2 first"):
        run_graft(r, str(tmp_path / "run"), stages=("eval",), progress=False, log=lambda *_: None)


def test_a_stage_the_recipe_does_not_want_is_not_needed(teacher_file, tmp_path):
    """stage 1 disabled: stage 2 starts from surgery alone, so stage 2 alone runs on a fresh directory."""
    cfg = _tiny_recipe(teacher_file)
    cfg["stage1"]["enabled"] = False
    folder = str(tmp_path / "run")
    run_graft(parse_recipe(cfg), folder, stages=("stage2",), progress=False, log=lambda *_: None)
    assert os.path.exists(os.path.join(folder, "student.safetensors"))
    assert not os.path.exists(os.path.join(folder, "stage1"))
