"""Second pass of the bad-input matrix: wrong answers that used to exit 0, paths that escaped or deleted, inputs
that hung or flooded, and faults that were reported as bugs. Every case is one clear line and exit 2 (or the right
result with exit 0), never a traceback, fast, with small output."""
import json
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ditgraft
from helpers import tiny_dit
from ditgraft.cli import main
from ditgraft.models.checkpoints import save_safetensors

ROOT = os.path.dirname(os.path.dirname(ditgraft.__file__))


def _write_recipe(path, teacher, **top):
    body = {"name": "tiny", "teacher": {"source": teacher},
            "grafts": [{"slot": "attn", "layers": [1], "operator": "hyena_x"}],
            "stage1": {"samples": 16, "val_samples": 8, "steps": 2, "batch_size": 8, "eval_every": 1},
            "stage2": {"enabled": False}, "eval": {"enabled": False}}
    body.update(top)
    with open(path, "w") as f:
        json.dump(body, f)
    return str(path)


def _mnist_model(seed=0):
    return tiny_dit(depth=2, input_size=32, patch_size=8, seed=seed)


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad2")
    model = _mnist_model()
    good = str(root / "tiny.safetensors")
    save_safetensors(good, model, {"model_config": model.config})
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for name, change in (("deep", {"depth": 1_000_000}), ("wide", {"hidden_size": 131072}),
                         ("huge_image", {"input_size": 100_000}), ("heads0", {"num_heads": 0})):
        save_file(state, str(root / f"{name}.safetensors"),
                  metadata={"ditgraft": json.dumps({"model_config": {**model.config, **change}})})
    grafted = {"model_config": model.config, "family": "dit", "recipe": {"name": "x"},
               "grafts": [{"slot": "attn", "layer": 1, "operator": "no_such_op"}]}
    save_file(state, str(root / "unknown_op.safetensors"), metadata={"ditgraft": json.dumps(grafted)})

    class Eval:
        def __reduce__(self):
            return (eval, ("1+1",))

    torch.save({"w": Eval()}, str(root / "eval_pickle.pt"))
    (root / "afile").write_text("a file where a folder is needed")
    os.makedirs(root / "nonempty")
    (root / "nonempty" / "keep.txt").write_text("someone's file")
    imgs = np.random.default_rng(0).integers(0, 255, (10, 32, 32, 1), dtype=np.uint8)
    np.savez(root / "samples.npz", arr_0=imgs, arr_1=np.arange(10) % 10)
    # recipes
    (root / "dup.yaml").write_text(f"name: dup\nteacher: {{source: {good}}}\n"
                                   "grafts: [{slot: attn, layers: [1], operator: hyena_x}]\n"
                                   "stage1: {steps: 2}\nstage1: {steps: 3}\n")
    levels = ["a: &a [" + ",".join(['"xxxxxxxx"'] * 9) + "]"]
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        levels.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    (root / "bomb.yaml").write_text("\n".join(levels) + "\nname: bomb\n")
    (root / "nonutf.yaml").write_bytes(b"name: caf\xe9\n")
    _write_recipe(root / "escape.yaml", good, name="../../escape_probe")
    _write_recipe(root / "abs.yaml", good, name="/tmp/abs_probe")
    _write_recipe(root / "seed.yaml", good, seed=10**20)
    _write_recipe(root / "slice0.yaml", good, grafts=[{"slot": "attn", "layers": "::0", "operator": "hyena_x"}])
    _write_recipe(root / "badopt.yaml", good,
                  grafts=[{"slot": "attn", "layers": [1], "operator": "hyena_x", "options": {"bogus": 1}}])
    return str(root)


CASES = [
    # wrong results that used to exit 0
    ("target-ratio-nan", ["eval", "{d}/tiny.safetensors", "--against", "testbed", "--target-ratio", "nan"],
     ["--target-ratio", "'nan'", "finite"]),
    ("npz-with-seeds", ["eval", "{d}/samples.npz", "--seeds", "0,1", "--against", "testbed"],
     ["--seeds, --against", "not used with a samples .npz"]),
    ("model-with-inception", ["eval", "{d}/tiny.safetensors", "--features", "inception", "--ref", "{d}/samples.npz"],
     ["--features, --ref", "not used with a model"]),
    ("npz-testbed-with-ref", ["eval", "{d}/samples.npz", "--ref", "{d}/samples.npz"], ["--ref", "not used"]),
    ("floor-with-seeds", ["eval", "--floor", "--seeds", "0"], ["--seeds", "not used with --floor"]),
    ("quick-with-target", ["eval", "{d}/tiny.safetensors", "--target-gap", "0.1"], ["--target-gap", "no --against"]),
    ("against-self", ["eval", "{d}/tiny.safetensors", "--against", "{d}/tiny.safetensors", "--seeds", "0",
                      "--out", "{d}/o_self"], ["same model", "--allow-self"]),
    ("recipe-duplicate-key", ["graft", "{d}/dup.yaml", "--run-dir", "{d}/g_dup"],
     ["dup.yaml", "line 5", "duplicate key 'stage1'"]),
    # paths
    ("recipe-name-escape", ["graft", "{d}/escape.yaml"], ["name = '../../escape_probe'", "plain name"]),
    ("recipe-name-absolute", ["graft", "{d}/abs.yaml"], ["name = '/tmp/abs_probe'", "plain name"]),
    ("synth-out-dir-slash", ["synth", "{d}/tiny.safetensors", "--out", "{d}/sdir/", "--num-samples", "2"],
     ["--out", "sdir/", "is a folder"]),
    ("png-dir-is-a-file", ["sample", "{d}/tiny.safetensors", "--num-samples", "2", "--steps", "1",
                           "--out", "{d}/o_png", "--png-dir", "{d}/afile"], ["--png-dir", "afile", "is a file"]),
    ("out-is-a-file", ["sample", "{d}/tiny.safetensors", "--num-samples", "2", "--steps", "1", "--out", "{d}/afile",
                       "--png-dir", "{d}/o_png"], ["--out", "afile", "is a file"]),
    ("export-nonempty", ["export-diffusers", "{d}/tiny.safetensors", "--out", "{d}/nonempty"],
     ["--out", "nonempty", "not empty", "--overwrite"]),
    ("export-unwritable", ["export-diffusers", "{d}/tiny.safetensors", "--out", "{d}/afile/sub"],
     ["--out", "afile/sub", "not writable"]),
    ("decision-out-unwritable", ["eval", "{d}/tiny.safetensors", "--seeds", "0", "--out", "{d}/afile/sub"],
     ["--out", "afile/sub", "not writable"]),
    # resource exhaustion
    ("st-depth-1e6", ["sample", "{d}/deep.safetensors", "--out", "{d}/o_h"], ["deep.safetensors", "depth=1000000"]),
    ("st-width-131072", ["sample", "{d}/wide.safetensors", "--out", "{d}/o_h"],
     ["wide.safetensors", "hidden_size=131072", "allowed: 32"]),
    ("st-huge-image", ["sample", "{d}/huge_image.safetensors", "--out", "{d}/o_h"],
     ["huge_image.safetensors", "input_size=100000", "pos_embed holds 16"]),
    ("st-heads-0", ["sample", "{d}/heads0.safetensors", "--out", "{d}/o_h"], ["heads0.safetensors", "heads=0"]),
    ("yaml-alias-bomb-show", ["recipes", "--show", "{d}/bomb.yaml"], ["bomb.yaml", "aliases", "not allowed"]),
    ("yaml-alias-bomb-graft", ["graft", "{d}/bomb.yaml", "--run-dir", "{d}/g_bomb"], ["aliases"]),
    ("ops-dim-1e10", ["ops", "--dim", "10000000000"], ["dim=10000000000", "1..65536"]),
    ("ops-tokens-huge", ["ops", "--tokens", "10000000000"], ["tokens=10000000000", "1..1048576"]),
    ("bench-ops-dim-1e10", ["bench", "ops", "--dim", "10000000000", "--ops", "hyena_x"],
     ["--dim=10000000000", "do not fit in memory", "use smaller sizes"]),
    ("bench-ops-batch-huge", ["bench", "ops", "--batch", "100000000000", "--tokens", "16", "--dim", "64", "--heads", "1",
                              "--ops", "hyena_x"], ["--batch=100000000000", "do not fit in memory"]),
    # tracebacks and messages that did not name the input
    ("device-meta", ["sample", "{d}/tiny.safetensors", "--device", "meta", "--out", "{d}/o_d"],
     ["device='meta'", "'cpu', 'cuda'"]),
    ("device-xla", ["sample", "{d}/tiny.safetensors", "--device", "xla", "--out", "{d}/o_d"], ["device='xla'"]),
    ("bench-threads-neg", ["bench", "ops", "--threads", "-2"], ["--threads", "'-2'", ">= 1"]),
    ("seed-huge", ["sample", "testbed", "--seed", str(10**20)], ["--seed", "[0, 4294967295]"]),
    ("seeds-huge", ["eval", "{d}/tiny.safetensors", "--seeds", f"0,{10**20}", "--out", "{d}/o_s"],
     ["--seeds", "[0, 4294967295]"]),
    ("recipe-seed-huge", ["graft", "{d}/seed.yaml", "--run-dir", "{d}/g_seed"], ["seed", "4294967295"]),
    ("recipe-slice-step-0", ["graft", "{d}/slice0.yaml", "--run-dir", "{d}/g_slice"], ["'::0'", "step must not be 0"]),
    ("recipe-not-utf8", ["graft", "{d}/nonutf.yaml"], ["nonutf.yaml", "not UTF-8"]),
    ("recipe-not-utf8-show", ["recipes", "--show", "{d}/nonutf.yaml"], ["nonutf.yaml", "not UTF-8"]),
    ("recipe-bad-operator-option", ["graft", "{d}/badopt.yaml", "--run-dir", "{d}/g_opt"],
     ["operator 'hyena_x'", "unknown option 'bogus'", "allowed: kernel_size, direction, impl"]),
    ("pretrain-seed-huge", ["pretrain", "--seed", str(10**20), "--run-dir", "{d}/p_seed"], ["--seed", "[0, 4294967295]"]),
    ("pretrain-device-meta", ["pretrain", "--device", "meta", "--run-dir", "{d}/p_meta"], ["device='meta'"]),
    ("pickle-builtins-eval", ["sample", "{d}/eval_pickle.pt", "--out", "{d}/o_p"],
     ["eval_pickle.pt", "refused", "naming eval"]),
    ("unknown-operator-meta", ["sample", "{d}/unknown_op.safetensors", "--out", "{d}/o_u"],
     ["unknown_op.safetensors", "no_such_op"]),
]


@pytest.mark.parametrize("argv,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_is_one_clear_line_exit_2_fast_and_small(d, argv, expected, capsys):
    before = sorted(os.listdir(d))
    abs_probe = os.path.exists("/tmp/abs_probe")
    t0 = time.time()
    code = main([a.replace("{d}", d) for a in argv])
    took = time.time() - t0
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err and "this is a bug" not in err
    assert err.count("error:") == 1 and len(out) + len(err) < 20_000, err[:2000]
    for text in expected:
        assert text.replace("{d}", d) in err, (text, err)
    assert took < 10, took
    # refused before any output is made (a run directory that the check needs may exist, empty of results)
    assert set(os.listdir(d)) - set(before) <= {"o_self", "o_s", "g_dup", "g_seed", "g_slice", "g_bomb", "g_opt"}
    assert not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(d)), "escape_probe"))
    assert os.path.exists("/tmp/abs_probe") == abs_probe  # the absolute recipe name made no run directory
    assert os.listdir(os.path.join(d, "nonempty")) == ["keep.txt"]


# --- evaluations keyed by the model's content --------------------------------------------------------------------

def _two_students(tmp_path):
    paths = []
    for name, seed in (("A", 1), ("B", 2)):
        os.makedirs(tmp_path / name)
        m = _mnist_model(seed)
        paths.append(str(tmp_path / name / "student.safetensors"))
        save_safetensors(paths[-1], m, {"model_config": m.config})
    return paths


def test_eval_against_a_student_of_the_same_file_name_compares_the_two(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = _two_students(tmp_path)
    argv = ["eval", a, "--against", b, "--seeds", "0,1", "--num-samples", "10", "--resamples", "20",
            "--device", "cpu"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    dirs = sorted(os.listdir(tmp_path / "runs" / "eval"))
    assert len(dirs) == 2 and all(x.startswith("student-") for x in dirs)  # kept apart by the weights' hash
    own = [x for x in dirs if os.path.exists(tmp_path / "runs" / "eval" / x / "samples_decision.json")]
    dec = json.load(open(tmp_path / "runs" / "eval" / own[0] / "samples_decision.json"))
    assert dec["model_sha256"] != dec["against_sha256"]
    assert dec["model"]["fid"]["value"] != dec["against"]["fid"]["value"]
    assert dec["ratio"]["value"] != 1.0 and "ratio 1.000 [1.000, 1.000]" not in out
    # A against a copy of itself (another path, same weights) is refused unless asked
    os.makedirs(tmp_path / "C")
    with open(a, "rb") as src, open(tmp_path / "C" / "student.safetensors", "wb") as dst:
        dst.write(src.read())
    assert main(["eval", a, "--against", str(tmp_path / "C" / "student.safetensors"), "--seeds", "0"]) == 2
    assert "is the same model" in capsys.readouterr().err


def test_eval_of_another_model_into_the_same_out_is_refused_and_the_cache_is_by_content(tmp_path, capsys):
    a, b = _two_students(tmp_path)
    out = str(tmp_path / "out")
    base = ["--num-samples", "10", "--device", "cpu", "--out", out]
    assert main(["eval", a, *base]) == 0
    first = json.load(open(os.path.join(out, "samples_metrics.json")))
    capsys.readouterr()
    assert main(["eval", b, *base]) == 2
    err = capsys.readouterr().err
    assert "holds the results of another model" in err and "--overwrite" in err
    assert json.load(open(os.path.join(out, "samples_metrics.json"))) == first  # untouched
    assert main(["eval", b, *base, "--overwrite"]) == 0
    second = json.load(open(os.path.join(out, "samples_metrics.json")))
    assert second["model_sha256"] != first["model_sha256"] and second["fid"] != first["fid"]


def test_sample_and_analyze_default_outputs_are_per_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = _two_students(tmp_path)
    for m in (a, b):
        assert main(["sample", m, "--num-samples", "2", "--steps", "1", "--device", "cpu"]) == 0
    outs = sorted(os.listdir(tmp_path / "runs" / "samples"))
    assert len(outs) == 2 and all(o.startswith("student-") and (tmp_path / "runs" / "samples" / o).is_dir()
                                  for o in outs), outs


# --- file safety ----------------------------------------------------------------------------------------------

def test_orphan_sweep_spares_a_live_run_below_and_live_writers(tmp_path, capsys):
    from ditgraft.utils import remove_orphan_temporaries

    parent = tmp_path / "parent"
    live = parent / "live_run"
    os.makedirs(live / "checkpoints" / "step_0000002.tmp")
    (live / ".ditgraft.lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                                     "command": "ditgraft pretrain"}))
    (live / ".metrics.jsonl.p1.abcdefgh.tmp").write_text("being written")
    (parent / f".samples.npz.p{os.getpid()}.abcdefgh.tmp").write_text("being written by a live process")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = parent / f".samples.png.p{int(dead.stdout)}.zyxwvuts.tmp"
    orphan.write_text("left by a killed writer")
    removed = remove_orphan_temporaries(str(parent))
    assert removed == [str(orphan)]
    assert (live / "checkpoints" / "step_0000002.tmp").is_dir()
    assert (live / ".metrics.jsonl.p1.abcdefgh.tmp").exists()


def test_sample_into_a_parent_of_a_live_run_keeps_its_temporaries(tmp_path, capsys):
    parent = tmp_path / "parent"
    live = parent / "run"
    os.makedirs(live / "checkpoints" / "step_0000004.tmp")
    (live / ".ditgraft.lock").write_text(json.dumps({"pid": 1, "host": os.uname().nodename, "command": "graft"}))
    (live / ".student.safetensors.k2j4h5g6.tmp").write_text("x")
    m = _mnist_model()
    path = str(tmp_path / "m.safetensors")
    save_safetensors(path, m, {"model_config": m.config})
    assert main(["sample", path, "--num-samples", "2", "--steps", "1", "--device", "cpu", "--out", str(parent)]) == 0
    assert (live / "checkpoints" / "step_0000004.tmp").is_dir()
    assert (live / ".student.safetensors.k2j4h5g6.tmp").exists()


def _linear_step(m, batch):
    return {"loss": m(batch[0]).square().mean()}


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one_exactly(tmp_path, capsys):
    from ditgraft.train.loop import LoopConfig, train

    x = torch.randn(32, 3)
    cfg = LoopConfig(steps=6, batch_size=4, ckpt_every=2, ema_decay=0.9, progress=False)
    torch.manual_seed(0)
    full = train(torch.nn.Linear(3, 1), _linear_step, (x,), cfg, str(tmp_path / "full"))
    run = tmp_path / "run"
    torch.manual_seed(0)
    train(torch.nn.Linear(3, 1), _linear_step, (x,), LoopConfig(**{**cfg.__dict__, "steps": 4}), str(run))
    newest = run / "checkpoints" / "step_0000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:40])  # a full disk or a crash mid-write
    torch.manual_seed(0)
    resumed = train(torch.nn.Linear(3, 1), _linear_step, (x,), cfg, str(run))
    err = capsys.readouterr().err
    assert resumed.resumed_from == 2
    assert "step_0000004 is damaged" in err and "falling back" in err and "resuming from" in err
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_torn_state_json_falls_back_and_all_damaged_is_one_named_error(tmp_path, capsys):
    from ditgraft.train.loop import LoopConfig, train

    x = torch.randn(16, 3)
    cfg = LoopConfig(steps=4, batch_size=4, ckpt_every=2, ema_decay=None, progress=False)
    train(torch.nn.Linear(3, 1), _linear_step, (x,), cfg, str(tmp_path))
    (tmp_path / "checkpoints" / "step_0000004" / "state.json").write_text('{"step": ')
    res = train(torch.nn.Linear(3, 1), _linear_step, (x,), LoopConfig(**{**cfg.__dict__, "steps": 5}), str(tmp_path))
    assert res.resumed_from == 2
    for c in os.listdir(tmp_path / "checkpoints"):
        (tmp_path / "checkpoints" / c / "state.json").write_text("{")
    with pytest.raises(ValueError, match="no readable checkpoint in .*checkpoints"):
        train(torch.nn.Linear(3, 1), _linear_step, (x,), LoopConfig(**{**cfg.__dict__, "steps": 8}), str(tmp_path))


def test_a_pickle_in_optim_pt_is_refused_naming_the_file(tmp_path):
    from ditgraft.train.loop import LoopConfig, train

    x = torch.randn(16, 3)
    cfg = LoopConfig(steps=2, batch_size=4, ckpt_every=2, ema_decay=None, progress=False)
    train(torch.nn.Linear(3, 1), _linear_step, (x,), cfg, str(tmp_path))

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state": Evil()}, str(tmp_path / "checkpoints" / "step_0000002" / "optim.pt"))
    with pytest.raises(ValueError, match=r"optim\.pt was refused: it is a pickle naming"):
        train(torch.nn.Linear(3, 1), _linear_step, (x,), LoopConfig(**{**cfg.__dict__, "steps": 4}), str(tmp_path))
    assert not marker.exists()


def test_resuming_with_another_model_size_names_the_checkpoint(tmp_path):
    from ditgraft.train.loop import LoopConfig, train

    x = torch.randn(16, 3)
    cfg = LoopConfig(steps=2, batch_size=4, ckpt_every=2, ema_decay=None, progress=False)
    train(torch.nn.Linear(3, 1), _linear_step, (x,), cfg, str(tmp_path))
    with pytest.raises(ValueError, match=r"step_0000002 holds a different model .*another model size"):
        train(torch.nn.Linear(3, 2), _linear_step, (x,), LoopConfig(**{**cfg.__dict__, "steps": 4}), str(tmp_path))


def test_metrics_log_drops_a_torn_last_line_and_names_a_torn_middle_one(tmp_path):
    from ditgraft.train.loop import _read_history

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    assert [r["step"] for r in _read_history(str(log), 10)] == [1, 2]
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a metrics row"):
        _read_history(str(log), 10)


def test_torn_pretrain_info_json_names_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["pretrain", "--run-dir", str(run), "--batch-size", "2", "--ckpt-every", "2", "--warmup", "0",
            "--device", "cpu", "--steps", "2"]
    assert main(base) == 0
    (run / "pretrain_info.json").write_text('{"stages": [')
    assert main(base[:-1] + ["4"]) == 2
    err = capsys.readouterr().err
    assert "pretrain_info.json is torn or not valid JSON" in err and "Traceback" not in err


_FSIZE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from ditgraft.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_full_disk_is_one_line_and_the_rerun_resumes(tmp_path):
    """The file-size limit (EFBIG) stands in for a full disk (ENOSPC): the same writers fail the same way."""
    run = str(tmp_path / "run")
    argv = ["pretrain", "--run-dir", run, "--steps", "4", "--batch-size", "2", "--ckpt-every", "2", "--warmup", "0",
            "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for limit in (4096, 3_000_000):  # the first checkpoint's model file; later, the second checkpoint
        r = subprocess.run([sys.executable, "-c", _FSIZE, str(limit), *argv], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 2, r.stderr[-3000:]
        assert "Traceback" not in r.stderr and "a write failed" in r.stderr and "run the same command again" in r.stderr
        assert f"a write failed: {os.path.join(run, 'checkpoints', 'step_')}" in r.stderr  # names what was written
    r = subprocess.run([sys.executable, "-m", "ditgraft.cli", *argv], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.exists(os.path.join(run, "model.safetensors"))


def _no_space(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_taking_a_lock_leaves_no_lock_behind(tmp_path, monkeypatch, capsys):
    """An empty lock file left by the failed write would hold the folder for nobody: the rerun would be refused."""
    from ditgraft import utils

    model = _mnist_model()
    path = str(tmp_path / "m.safetensors")
    save_safetensors(path, model, {"model_config": model.config})
    out = tmp_path / "out"
    argv = ["sample", path, "--num-samples", "2", "--steps", "1", "--device", "cpu", "--out", str(out)]
    with monkeypatch.context() as m:
        m.setattr(utils.json, "dump", _no_space)
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"a write failed: {out / '.ditgraft.lock'}: No space left on device" in err and "Traceback" not in err
    assert not (out / ".ditgraft.lock").exists()
    assert main(argv) == 0, capsys.readouterr().err  # space freed: the same command runs


def test_a_full_disk_during_export_names_the_folder_and_leaves_no_partial_export(tmp_path, monkeypatch, capsys):
    from ditgraft.export import hf

    model = _mnist_model()
    path = str(tmp_path / "m.safetensors")
    save_safetensors(path, model, {"model_config": model.config})
    out = str(tmp_path / "export")
    monkeypatch.setattr(hf, "atomic_write_text", _no_space)
    assert main(["export-diffusers", path, "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"a write failed: {out}: No space left on device" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["export", "m.safetensors"] and os.listdir(out) == []


def test_a_closed_stdout_is_quiet(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    read, write = os.pipe()
    p = subprocess.Popen([sys.executable, "-m", "ditgraft", "recipes"], stdout=write, stderr=subprocess.PIPE, env=env)
    os.close(write)
    os.close(read)
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == ""


# --- recipes and run directories ------------------------------------------------------------------------------

def test_a_bad_operator_option_does_not_bind_the_run_directory(tmp_path, capsys):
    from ditgraft.models.checkpoints import TESTBED_TEACHER

    run = str(tmp_path / "run")
    bad = _write_recipe(tmp_path / "bad.yaml", TESTBED_TEACHER,
                        grafts=[{"slot": "attn", "layers": [1], "operator": "hyena_x", "options": {"bogus": 1}}])
    assert main(["graft", bad, "--run-dir", run, "--stages", "stage1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown option 'bogus'; allowed: kernel_size, direction, impl" in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(run, "recipe.yaml"))
    good = _write_recipe(tmp_path / "good.yaml", TESTBED_TEACHER)
    assert main(["graft", good, "--run-dir", run, "--stages", "stage1", "--quiet"]) == 0, capsys.readouterr().err
    other = _write_recipe(tmp_path / "other.yaml", TESTBED_TEACHER, seed=3,
                          stage1={"samples": 16, "val_samples": 8, "steps": 2, "batch_size": 8, "eval_every": 1,
                                  "lr": 0.01})
    assert main(["graft", other, "--run-dir", run, "--stages", "stage1"]) == 2
    err = capsys.readouterr().err
    assert "different recipe" in err and "fields that differ: stage1.lr, seed" in err


# --- images ---------------------------------------------------------------------------------------------------

def test_16_bit_greyscale_pngs_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    from ditgraft.data.images import load_image_folder

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I;16")
    Image.fromarray((ramp // 257).astype(np.uint8)).save(tmp_path / "b.png")
    x, _ = load_image_folder(str(tmp_path), 32, channels=1)
    assert float((x[0] >= 0.999).float().mean()) < 0.01  # was 99.6% saturated
    assert float((x[0] - x[1]).abs().max()) <= 2 / 255 + 1e-6  # the 16-bit image equals its 8-bit version


def test_pretrain_reads_an_image_folder_at_the_model_size(tmp_path, capsys):
    """``pretrain --data FOLDER`` (16-bit greyscale PNGs here) reads the images at the model's size and channels."""
    from PIL import Image

    for cls in ("zero", "one"):
        os.makedirs(tmp_path / "digits" / cls)
        for i in range(2):
            ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
            Image.fromarray(np.roll(ramp, 100 * i)).save(tmp_path / "digits" / cls / f"{i}.png")
    run = str(tmp_path / "run")
    assert main(["pretrain", "--data", str(tmp_path / "digits"), "--run-dir", run, "--steps", "2", "--batch-size",
                 "2", "--ckpt-every", "2", "--warmup", "0", "--device", "cpu"]) == 0, capsys.readouterr().err
    assert os.path.exists(os.path.join(run, "model.safetensors"))


def test_class_folder_links_back_to_the_root_or_outside_are_refused(tmp_path):
    from PIL import Image

    from ditgraft.data.images import ImageFolderDataset

    root = tmp_path / "root"
    os.makedirs(root / "cat")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "cat" / "a.png")
    os.symlink(root, root / "loop")
    with pytest.raises(ValueError, match=r"class folder .*loop.* links to .*itself \(a loop\)"):
        ImageFolderDataset(str(root), 8)
    os.remove(root / "loop")
    os.makedirs(tmp_path / "elsewhere")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "elsewhere" / "b.png")
    os.symlink(tmp_path / "elsewhere", root / "dog")
    with pytest.raises(ValueError, match="outside it"):
        ImageFolderDataset(str(root), 8)
    os.remove(root / "dog")
    os.symlink(root / "cat", root / "kitten")
    with pytest.raises(ValueError, match="overlap"):
        ImageFolderDataset(str(root), 8)


# --- the Python API raises InputError with the CLI's message ----------------------------------------------------

@pytest.mark.parametrize("call,message", [
    (lambda: ditgraft.sample("testbed", num=-3), "num=-3: must be an integer >= 1"),
    (lambda: ditgraft.sample("testbed", num=2, batch_size=0), "batch_size=0: must be an integer >= 1"),
    (lambda: ditgraft.sample("testbed", num=2, seed=10**20), "seed=100000000000000000000"),
    (lambda: ditgraft.load_model("testbed", device="cuda" if not torch.cuda.is_available() else "cuda:99"),
     "device="),
    (lambda: ditgraft.load_model("nope.safetensors"), "model 'nope.safetensors': no such file"),
    (lambda: ditgraft.evaluate(np.zeros((4, 32, 32, 1), np.uint8), np.zeros(2, np.int64)),
     "labels: 2 labels for 4 images"),
    (lambda: ditgraft.run_pipeline("testbed_hyena_x_50", "/nonexistent/x", stages="stage3"), "stage='stage3'"),
], ids=["sample-num", "sample-batch", "sample-seed", "load-device", "load-missing", "evaluate-labels",
        "pipeline-stage"])
def test_api_bad_input_raises_input_error_with_the_cli_message(call, message):
    with pytest.raises(ditgraft.InputError, match=None) as info:
        call()
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_api_stages_as_a_string_is_a_list_of_stages(tmp_path):
    from ditgraft.models.checkpoints import TESTBED_TEACHER

    recipe = json.load(open(_write_recipe(tmp_path / "r.yaml", TESTBED_TEACHER)))
    ditgraft.run_pipeline(recipe, str(tmp_path / "run"), stages="stage1")
    assert os.path.exists(tmp_path / "run" / "stage1" / "summary.json")


def test_cli_and_api_print_the_same_message(capsys):
    assert main(["sample", "nope.safetensors", "--num-samples", "2"]) == 2
    err = capsys.readouterr().err.strip()
    with pytest.raises(ditgraft.InputError) as info:
        ditgraft.load_model("nope.safetensors")
    assert err == f"ditgraft sample: error: {info.value}"
