"""The wandb (offline) and trackio adapters with the real libraries: a tiny logged training, then the logged rows
read back from what each library wrote on disk (wandb: the offline run's ``.wandb`` record log; trackio: its
project database, through trackio's own storage reader).

Each run happens in a subprocess under a timeout, with every setting that keeps the libraries off the network: a test
cannot hang on a missing network, and trackio's storage folder (read once at import) is the test's own."""
from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
TIMEOUT_S = 120

# The run: test_tracking's tiny training and results report inside a tracking session; the history as JSON.
TRAIN = textwrap.dedent("""
    import json, sys
    from test_tracking import REPORT, _grid, _train
    from ditgraft.train import tracking
    kind, run_dir = sys.argv[1], sys.argv[2]
    import os
    os.makedirs(os.path.join(run_dir, "eval"))
    _grid(os.path.join(run_dir, "eval", "grafted.png"))
    with tracking.session(kind, run_dir):
        result = _train(run_dir)
        tracking.log_results(REPORT, run_dir)
    print("HISTORY=" + json.dumps(result.history))
""")


def _offline_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TRACKIO_"))}
    env.update(
        PYTHONPATH=os.pathsep.join([ROOT, TESTS]), OMP_NUM_THREADS="1",
        WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb_dir"), WANDB_CONFIG_DIR=str(tmp_path / "wandb_cfg"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"), WANDB_DATA_DIR=str(tmp_path / "wandb_data"),
        WANDB_SILENT="true", WANDB_DISABLE_GIT="true", WANDB_DISABLE_CODE="true", WANDB_CONSOLE="off",
        TRACKIO_DIR=str(tmp_path / "trackio"), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
        GRADIO_ANALYTICS_ENABLED="False", DO_NOT_TRACK="1")
    return env


def _python(code: str, args: list[str], env: dict) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _logged_training(kind: str, tmp_path) -> tuple[str, list[dict], dict]:
    run_dir, env = str(tmp_path / "demo"), _offline_env(tmp_path)
    out = _python(TRAIN, [kind, run_dir], env)
    history = json.loads(next(line for line in out.splitlines() if line.startswith("HISTORY="))[len("HISTORY="):])
    return run_dir, history, env


# wandb's record log (the LevelDB log format): a 7-byte file header (":W&B", magic 0xBEE1, version), then 32 KiB
# blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last); a block tail
# shorter than a chunk header is zero padding. Every record is a serialised wandb_internal_pb2.Record.
BLOCK, CHUNK_HEADER = 32768, 7


def wandb_records(path: str):
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path} is not a wandb record log (starts {data[:4]!r})"
    pos, parts = 7, []
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if left < CHUNK_HEADER or (kind == 0 and length == 0):  # padding to the block's end
            pos += left
            continue
        parts.append(data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length])
        pos += CHUNK_HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def wandb_history(path: str) -> list[dict]:
    rows = []
    for r in wandb_records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows


def test_wandb_offline_run_holds_every_logged_row(tmp_path):
    pytest.importorskip("wandb")
    run_dir, history, _ = _logged_training("wandb", tmp_path)
    files = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1, files
    rows = wandb_history(files[0])
    train_rows = [r for r in rows if "stage1/loss" in r]
    assert [r["stage1/step"] for r in train_rows] == [h["step"] for h in history]
    assert [r["stage1/loss"] for r in train_rows] == pytest.approx([h["loss"] for h in history])
    assert [r["stage1/lr"] for r in train_rows] == pytest.approx([h["lr"] for h in history])
    assert [r["stage1/loss/attn3"] for r in train_rows] == pytest.approx([h["loss/attn3"] for h in history])
    evals = [r for r in rows if "stage1/eval/attn3_mse" in r]
    assert [r["stage1/eval/attn3_mse"] for r in evals] == pytest.approx([0.5 / r["stage1/step"] for r in evals])
    results = next(r for r in rows if "eval/grafted/fid" in r)
    assert results["eval/grafted/fid"] == 2.5 and results["eval/grafted/fid_ratio_hi"] == pytest.approx(1.3)
    image = next(r for r in rows if "samples/grafted/_type" in r)  # a nested value: its keys joined with "/"
    assert image["samples/grafted/_type"] == "image-file"
    assert (image["samples/grafted/width"], image["samples/grafted/height"]) == (12, 8)


READ_TRACKIO = textwrap.dedent("""
    import json, sys
    from trackio.sqlite_storage import SQLiteStorage
    print("LOGS=" + json.dumps(SQLiteStorage.get_logs(sys.argv[1], sys.argv[2]), default=str))
""")


def test_trackio_local_database_holds_every_logged_row(tmp_path):
    pytest.importorskip("trackio")
    run_dir, history, env = _logged_training("trackio", tmp_path)
    assert glob.glob(str(tmp_path / "trackio" / "*.db")), "trackio wrote no database in TRACKIO_DIR"
    out = _python(READ_TRACKIO, ["ditgraft", os.path.basename(run_dir)], env)
    rows = json.loads(next(line for line in out.splitlines() if line.startswith("LOGS="))[len("LOGS="):])
    train_rows = [r for r in rows if "stage1/loss" in r]
    assert [r["step"] for r in train_rows] == [h["step"] for h in history]
    assert [r["stage1/loss"] for r in train_rows] == pytest.approx([h["loss"] for h in history])
    assert [r["stage1/grad_norm"] for r in train_rows] == pytest.approx([h["grad_norm"] for h in history])
    assert any(r.get("eval/grafted/fid") == 2.5 and r.get("eval/grafted/fid_ratio_lo") == pytest.approx(1.1)
               for r in rows)
