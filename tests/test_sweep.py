"""`ditgraft sweep`: sweep files validated before anything runs, points as run directories, stage 1 shared within a
group, a failing point recorded while the others finish, kill and resume giving the uninterrupted table, and the
submitit launcher (its local executor) giving the same table."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from helpers import save_mnist_teacher
from ditgraft.cli import main
from ditgraft.explore.spec import build_sweep
from ditgraft.explore.sweep import leaders
from ditgraft.explore.table import build_table, pareto_front

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what must agree between two runs of one sweep (latency and wall time are measurements of the moment)
COMPARED = ("name", "state", "overrides", "fid", "ratio", "accuracy", "gap", "share_of_pretraining", "params",
            "forward_flops", "error", "stage1_from")


def tiny_sweep(teacher: str) -> dict:
    return {
        "name": "tiny",
        "base": {
            "teacher": {"source": teacher},
            "grafts": [{"slot": "attn", "layers": [1], "operator": "hyena_x"}],
            "stage1": {"samples": 32, "val_samples": 8, "steps": 4, "batch_size": 8, "eval_every": 2},
            "stage2": {"steps": 3, "batch_size": 8, "ckpt_every": 1},
            "eval": {"num": 10, "steps": 2},
        },
        "grid": {"grafts.0.operator": ["hyena_x", "swa"], "stage2.steps": [2, 4]},
        "points": [{"teacher.source": os.path.join(os.path.dirname(teacher), "missing.safetensors")}],
    }


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    teacher = save_mnist_teacher(str(folder))
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_sweep(teacher)))
    return str(path)


def _cli(args, cwd, **kw):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "ditgraft.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _rows(sweep_dir):
    return [{k: r.get(k) for k in COMPARED} for r in build_table(sweep_dir)["rows"]]


@pytest.fixture(scope="module")
def uninterrupted(sweep_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("a") / "sweep")
    proc = _cli(["sweep", sweep_file, "--jobs", "2", "--out", out], cwd=os.path.dirname(sweep_file))
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text
    return out, text


def test_points_named_by_overrides_and_stage2_axes_share_stage1(sweep_file):
    sweep = build_sweep(yaml.safe_load(open(sweep_file)), sweep_file)
    names = [p.name for p in sweep.points]
    assert names[:4] == ["operator=hyena_x,steps=2", "operator=hyena_x,steps=4", "operator=swa,steps=2",
                         "operator=swa,steps=4"]
    assert names[4].startswith("source=")
    lead = leaders(sweep)
    assert lead["operator=hyena_x,steps=4"] == "operator=hyena_x,steps=2"  # differs only in stage 2
    assert lead["operator=swa,steps=4"] == "operator=swa,steps=2"
    assert lead["operator=swa,steps=2"] is None and lead[names[4]] is None


def test_a_failing_point_is_recorded_while_the_others_finish(uninterrupted):
    out, text = uninterrupted
    rows = {r["name"]: r for r in build_table(out)["rows"]}
    failed = [r for r in rows.values() if r["state"] == "failed"]
    assert len(failed) == 1 and "missing.safetensors" in failed[0]["error"], failed
    assert sum(r["state"] == "done" for r in rows.values()) == 4
    assert "FAILED" in text
    # the stage-2 points reused their group's stage 1: same best operator weights, stage 1 never trained again
    shared = json.load(open(os.path.join(out, "points", "operator=swa,steps=4", "sweep_shared.json")))
    assert shared == {"stage1_from": "operator=swa,steps=2"}
    lead, follow = (os.path.join(out, "points", n, "stage1") for n in ("operator=swa,steps=2", "operator=swa,steps=4"))
    assert os.path.isdir(os.path.join(lead, "loop", "checkpoints"))  # trained there ...
    assert not os.path.exists(os.path.join(follow, "loop", "checkpoints"))  # ... and only copied here
    assert open(os.path.join(lead, "best", "attn1.safetensors"), "rb").read() == \
        open(os.path.join(follow, "best", "attn1.safetensors"), "rb").read()
    for name in ("results.md", "results.csv", "results.json", "pareto.png", "budget.png", "code.json",
                 "recipes/operator=swa,steps=4.yaml"):
        assert os.path.exists(os.path.join(out, name)), name
    table = build_table(out)
    assert set(table["pareto"]) <= {r["name"] for r in table["rows"] if r["state"] == "done"}
    assert all(r["params"] and r["forward_flops"] and r["latency_ratio"] for r in table["rows"]
               if r["state"] == "done")
    md = open(os.path.join(out, "results.md")).read()
    assert "operator=swa,steps=4" in md and "Failed points" in md


def test_status_lists_every_point(uninterrupted, sweep_file):
    out, _ = uninterrupted
    proc = _cli(["sweep", sweep_file, "--out", out, "--status"], cwd=os.path.dirname(sweep_file))
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text
    assert "4 done, 1 failed" in text and "missing.safetensors" in text


def test_killed_midway_and_resumed_gives_the_same_table(uninterrupted, sweep_file, tmp_path):
    out = str(tmp_path / "sweep")
    proc = _cli(["sweep", sweep_file, "--jobs", "2", "--out", out], cwd=os.path.dirname(sweep_file),
                start_new_session=True)
    deadline = time.time() + 300
    marker = os.path.join(out, "points", "operator=hyena_x,steps=2", "sweep_point.json")
    while not os.path.exists(marker) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and every point it runs, mid-way
    proc.wait()
    states = [json.load(open(os.path.join(d, "sweep_point.json")))["state"]
              for d in [os.path.join(out, "points", n) for n in os.listdir(os.path.join(out, "points"))]
              if os.path.exists(os.path.join(d, "sweep_point.json"))]
    assert len(states) < 5  # something was left to resume
    proc = _cli(["sweep", sweep_file, "--jobs", "2", "--out", out], cwd=os.path.dirname(sweep_file))
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text
    assert _rows(out) == _rows(uninterrupted[0])
    # finished points were skipped, not run again
    log = open(os.path.join(out, "points", "operator=hyena_x,steps=2", "sweep.log")).read()
    assert log.count("$ ") == 1


def test_submitit_local_executor_gives_the_same_table(uninterrupted, sweep_file, tmp_path):
    pytest.importorskip("submitit")
    out = str(tmp_path / "sweep")
    proc = _cli(["--threads", "1", "sweep", sweep_file, "--launcher", "submitit", "--cluster", "local",
                 "--out", out], cwd=os.path.dirname(sweep_file))
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text
    assert os.path.isdir(os.path.join(out, "submitit"))
    assert _rows(out) == _rows(uninterrupted[0])


BAD = [
    ({"grid": {"stage1.nope": [1]}}, "'nope' is not a field of stage1"),
    ({"grid": {"grafts.3.operator": ["swa"]}}, "grafts is a list of 1 items"),
    ({"grid": {"stage2.steps": []}}, "grid.stage2.steps = []: an axis needs at least one value"),
    ({"grid": {"stage2.steps": [0]}}, "stage2.steps"),
    ({"grid": {"grafts.0.operator": ["nonsense"]}}, "'nonsense' is not an operator"),
    ({"grid": {"stage2.steps": [3, 3]}}, "duplicate points"),
    ({"points": [{"stage2.steps": 5}, {"stage2.steps": 5}]}, "duplicate points"),
    ({"zip": {"stage2.steps": [1, 2], "stage1.steps": [1]}}, "equal lengths"),
    ({"grid": {"stage2.steps": [2]}, "baseline": "nope"}, "baseline = 'nope'"),
    ({"grid": {"stage2.steps": [2]}, "axes": {}}, "axes"),
    ({}, "no points"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m for _, m in BAD])
def test_bad_sweep_files_are_refused_before_anything_runs(change, message, tmp_path, capsys, monkeypatch):
    spec = {"name": "bad", "base": {"teacher": {"source": "testbed"},
                                    "grafts": [{"slot": "attn", "layers": [1], "operator": "hyena_x"}]}, **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not os.path.exists(tmp_path / "sweeps")  # nothing written


def _folder_of_sweeps(folder, second: dict) -> str:
    base = {"teacher": {"source": "testbed"}, "grafts": [{"slot": "attn", "layers": [1], "operator": "hyena_x"}]}
    folder.mkdir()
    (folder / "a.yaml").write_text(yaml.safe_dump({"name": "a", "base": base, "grid": {"stage2.steps": [2, 4]}}))
    (folder / "b.yaml").write_text(yaml.safe_dump({"base": base, **second}))
    return str(folder)


def test_a_folder_of_sweeps_lists_each_and_is_validated_whole_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = _folder_of_sweeps(tmp_path / "study", {"name": "b", "points": [{"stage1.steps": 7}]})
    assert main(["sweep", good, "--status"]) == 0
    out = capsys.readouterr().out
    assert "== sweep a (sweeps/a)" in out and "== sweep b (sweeps/b)" in out and "2 pending" in out
    for i, (second, message) in enumerate((
            ({"name": "b", "points": [{"stage9.steps": 7}]}, "stage9"),
            ({"name": "a", "points": [{"stage1.steps": 7}]}, "sweep names must differ; used twice: a"))):
        assert main(["sweep", _folder_of_sweeps(tmp_path / f"bad{i}", second)]) == 2
        assert message in capsys.readouterr().err
        assert not os.path.exists(tmp_path / "sweeps")  # the first, valid sweep did not start either


def test_pareto_front_keeps_the_undominated_points():
    rows = [{"name": "a", "forward_flops": 1, "ratio": 3.0}, {"name": "b", "forward_flops": 2, "ratio": 2.0},
            {"name": "c", "forward_flops": 3, "ratio": 2.5}, {"name": "d", "forward_flops": 4, "ratio": 1.0},
            {"name": "e", "forward_flops": 5, "ratio": None}]
    assert pareto_front(rows) == ["a", "b", "d"]


def test_a_point_as_the_baseline_is_compared_under_the_decision_protocol(sweep_file, tmp_path):
    spec = yaml.safe_load(open(sweep_file))
    spec.update(name="vs_point", grid={"grafts.0.operator": ["hyena_x", "swa"]}, points=[],
                baseline="operator=hyena_x")
    spec["base"]["eval"] = {"num": 10, "steps": 2, "protocol": "decision", "seeds": [0, 1], "resamples": 10,
                            "target_ratio": 1.5, "target_gap": 0.5}
    path = tmp_path / "vs_point.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = str(tmp_path / "sweep")
    proc = _cli(["sweep", str(path), "--jobs", "2", "--out", out], cwd=str(tmp_path))
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text
    dec = json.load(open(os.path.join(out, "points", "operator=swa", "eval", "sweep_baseline_decision.json")))
    assert dec["against_point"] == "operator=hyena_x" and dec["num"] == 20  # two seeds pooled, paired
    rows = {r["name"]: r for r in build_table(out)["rows"]}
    assert rows["operator=hyena_x"]["ratio"] == 1.0
    swa = rows["operator=swa"]
    assert swa["ratio"] == pytest.approx(dec["ratio"]["value"]) and swa["ratio_ci"] == dec["ratio"]["ci"]
    assert swa["protocol"].startswith("decision (seeds 0,1")


def test_sigterm_stops_the_sweep_and_its_running_point_and_starts_no_other(sweep_file, tmp_path):
    out = str(tmp_path / "sweep")
    proc = _cli(["sweep", sweep_file, "--jobs", "1", "--out", out], cwd=os.path.dirname(sweep_file))
    lock = os.path.join(out, "points", "operator=hyena_x,steps=2", ".ditgraft.lock")
    deadline = time.time() + 300
    pid = None
    while pid is None and time.time() < deadline and proc.poll() is None:
        try:
            pid = json.load(open(lock))["pid"]  # the running point's process
        except (OSError, ValueError):
            time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # the sweep alone, not its process group
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, text
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    started = [n for n in os.listdir(os.path.join(out, "points"))
               if os.path.exists(os.path.join(out, "points", n, "sweep.log"))]
    assert started == ["operator=hyena_x,steps=2"], started
