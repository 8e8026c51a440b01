"""Benchmark tooling: row fields, speed-up arithmetic, interleaved (round-robin) timing, dtype guard, layer choice,
JSON output. Tiny shapes and fake clocks only: no assertion ever depends on measured time."""
import argparse
import json

import pytest
import torch

import ditgraft.bench.model as bmodel
import ditgraft.bench.ops as bops
import ditgraft.bench.stage1 as bstage1
from ditgraft.bench.cli import add_bench_arguments, parse_options, run_bench
from ditgraft.bench.common import format_table, grid_for_tokens, resolve_device_dtype, round_robin
from ditgraft.operators import operator_flops
from ditgraft.operators.attention import MHA
from ditgraft.operators.hyena import HyenaX

OP_FIELDS = {"operator", "params", "gflops", "time_ms", "min_ms", "samples_ms", "speedup", "flop_speedup",
             "efficiency", "gflop_per_s", "tokens", "grid", "mode", "dtype", "device", "env"}


class FakeTime:
    """A clock that only moves when an operator runs: each forward of operator ``name`` costs ``cost[name]`` s."""

    def __init__(self, cost):
        self.cost, self.now, self.calls = cost, 0.0, []

    def __call__(self):
        return self.now

    def wrap_build(self, build):
        def build_and_hook(name, *args, **kwargs):
            op = build(name, *args, **kwargs)

            def hook(module, inputs):
                self.calls.append(name)
                self.now += self.cost[name]
            op.register_forward_pre_hook(hook)
            return op
        return build_and_hook


@pytest.fixture
def fake_time(monkeypatch):
    ft = FakeTime({"mha": 0.010, "hyena_x": 0.004, "swa": 0.008})
    monkeypatch.setattr(bops, "build_operator", ft.wrap_build(bops.build_operator))
    return ft


def test_ops_rows_fields_and_arithmetic(fake_time):
    torch.manual_seed(0)
    rows = bops.bench_ops(64, 64, 4, ["hyena_x", "swa"], repeats=3, warmup=1, clock=fake_time)
    assert [r["operator"] for r in rows] == ["mha", "hyena_x", "swa"]
    grid = (8, 8)
    for r in rows:
        assert OP_FIELDS <= set(r), OP_FIELDS - set(r)
        assert "error" not in r
        assert len(r["samples_ms"]) == 3
        assert r["gflops"] == pytest.approx(operator_flops(r["operator"], 64, 4, grid) / 1e9)
        assert r["params"] == sum(p.numel() for p in bops.build_operator(r["operator"], 64, 4, grid).parameters())
    mha, hx, swa = rows
    assert mha["speedup"] == 1.0 and mha["flop_speedup"] == 1.0 and mha["efficiency"] == 1.0
    assert hx["time_ms"] == pytest.approx(4.0) and swa["time_ms"] == pytest.approx(8.0)
    assert hx["speedup"] == pytest.approx(2.5)
    assert hx["flop_speedup"] == pytest.approx(mha["gflops"] / hx["gflops"])
    assert hx["efficiency"] == pytest.approx(2.5 / hx["flop_speedup"])
    table = format_table(rows)
    assert "speed-up" in table and "efficiency" in table and "| mha |" in table and "1.00x" in table


def test_ops_are_interleaved(fake_time):
    bops.bench_ops(64, 64, 4, ["hyena_x", "swa"], repeats=4, warmup=1, clock=fake_time)
    calls = fake_time.calls
    # one checked first call each, one warm-up round, then 4 timed rounds of all three operators
    assert len(calls) == 3 + 3 + 12
    timed = calls[6:]
    rounds = [timed[i:i + 3] for i in range(0, 12, 3)]
    assert all(sorted(r) == ["hyena_x", "mha", "swa"] for r in rounds), rounds
    assert len({tuple(r) for r in rounds}) == 3  # the order rotates from round to round


def test_round_robin_order_and_rotation():
    order = []
    fns = {name: (lambda n=name: order.append(n)) for name in "abc"}
    tick = iter(range(1000))
    times = round_robin(fns, repeats=3, warmup=2, clock=lambda: float(next(tick)))
    assert order[:6] == list("abcabc")
    assert order[6:] == list("abc") + list("bca") + list("cab")
    assert all(len(v) == 3 and all(t == 1.0 for t in v) for v in times.values())
    with pytest.raises(ValueError, match="repeats=0"):
        round_robin(fns, repeats=0, warmup=0)


def test_backward_mode_runs_and_triples_flops(fake_time):
    rows = bops.bench_ops(64, 64, 4, ["hyena_x"], backward=True, repeats=1, warmup=0, clock=fake_time)
    assert all(r["mode"] == "fwd+bwd" for r in rows)
    assert rows[1]["gflops"] == pytest.approx(3 * operator_flops("hyena_x", 64, 4, (8, 8)) / 1e9)


@pytest.mark.parametrize("backward", [False, True])
def test_matmul_limit_column(fake_time, monkeypatch, backward):
    """The limit is the reference matmul's FLOPs / its median time in the same run; each operator's share is its
    GFLOP/s over that."""
    real = bops.matmul_limit_call
    seen = {}

    def slow_limit(rows, dim, bwd, *args):
        call, flops = real(rows, dim, bwd, *args)
        seen.update(rows=rows, dim=dim, backward=bwd, flops=flops)

        def timed():
            call()
            fake_time.now += 0.002
        return timed, flops
    monkeypatch.setattr(bops, "matmul_limit_call", slow_limit)
    rows = bops.bench_ops(64, 64, 4, ["hyena_x"], batch=2, backward=backward, repeats=3, warmup=1, clock=fake_time)
    assert seen["rows"] == 2 * 64 and seen["dim"] == 64 and seen["backward"] is backward
    assert seen["flops"] == 2 * 128 * 64 * 192 * (3 if backward else 1)
    limit = seen["flops"] / 1e9 / 0.002
    for r in rows:
        assert r["limit_gflop_per_s"] == pytest.approx(limit)
        assert r["limit_share"] == pytest.approx(r["gflop_per_s"] / limit)
    table = format_table(rows)
    assert "matmul limit GFLOP/s" in table and "share of limit" in table
    assert not any(r["operator"] == bops.LIMIT for r in rows)  # the reference matmul is a column, not a row


def test_matmul_limit_call_computes_the_products():
    call, flops = bops.matmul_limit_call(8, 4, True, torch.device("cpu"), torch.float32, torch.Generator())
    call()
    assert flops == 3 * 2 * 8 * 4 * 12


def test_broken_operator_gets_error_row_not_crash():
    rows = bops.bench_ops(32, 16, 2, ["swa", "hyena_x"], repeats=1, warmup=0, options={"swa": {"window": -1}})
    by = {r["operator"]: r for r in rows}
    assert "window=-1" in by["swa"]["error"] and "time_ms" not in by["swa"]
    assert by["hyena_x"]["time_ms"] > 0 and by["mha"]["speedup"] == 1.0
    assert "| swa |" in format_table(rows)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_refused_on_cpu(dtype):
    with pytest.raises(ValueError, match=f"dtype='{dtype}' is not allowed on device='cpu'"):
        resolve_device_dtype("cpu", dtype)
    with pytest.raises(ValueError, match="not allowed on device='cpu'"):
        bops.bench_ops(32, 16, 2, ["hyena_x"], repeats=1, dtype=dtype)
    with pytest.raises(ValueError, match="not allowed on device='cpu'"):
        bmodel.bench_model(32, 2, 2, (16,), repeats=1, dtype=dtype)


def test_cpu_clock_and_bad_clock():
    rows = bops.bench_ops(32, 16, 2, ["hyena_x"], repeats=2, warmup=0, clock="cpu")
    assert all(r["clock"] == "cpu" and len(r["samples_ms"]) == 2 and r["time_ms"] >= 0 for r in rows)
    with pytest.raises(ValueError, match="clock='gpu'"):
        bops.bench_ops(32, 16, 2, ["hyena_x"], clock="gpu")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="dtype='fp8'"):
        resolve_device_dtype("cpu", "fp8")
    with pytest.raises(ValueError, match="operator='nope'"):
        bops.bench_ops(32, 16, 2, ["nope"])
    with pytest.raises(ValueError, match="operator='mlp'"):  # a channel mixer is not a token mixer
        bops.bench_ops(32, 16, 2, ["mlp"])
    with pytest.raises(ValueError, match="divisible"):
        bops.bench_ops(30, 16, 4)
    with pytest.raises(ValueError, match="layers='half'"):
        bmodel.select_layers("half", 4)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        bmodel.select_layers([4], 4)


def test_grid_for_tokens():
    assert grid_for_tokens(4096) == (64, 64)
    assert grid_for_tokens(16384) == (128, 128)
    assert grid_for_tokens(60) == (6, 10)
    assert grid_for_tokens(7) == (1, 7)
    with pytest.raises(ValueError, match="tokens=0"):
        grid_for_tokens(0)


def test_layer_sets():
    assert bmodel.select_layers("interleave", 4) == [1, 3]
    assert bmodel.select_layers("interleave", 28) == list(range(1, 28, 2))
    assert bmodel.select_layers("interleave75", 8) == [1, 2, 3, 5, 6, 7]
    assert bmodel.select_layers("all", 3) == [0, 1, 2]
    assert bmodel.select_layers([3, 1, 1], 4) == [1, 3]


def test_graft_replaces_exactly_the_interleaved_blocks():
    torch.manual_seed(0)
    teacher = bmodel.BlockStack(32, 2, 4, (4, 4))
    student = bmodel.graft(teacher, "hyena_x", bmodel.select_layers("interleave", 4), 32, 2, (4, 4))
    assert [type(b.attn) for b in student.blocks] == [MHA, HyenaX, MHA, HyenaX]
    assert all(isinstance(b.attn, MHA) for b in teacher.blocks)  # the teacher is untouched
    # everything that was not replaced is an identical copy
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for k, v in t_sd.items():
        if not (k.startswith("blocks.1.attn") or k.startswith("blocks.3.attn")):
            assert torch.equal(v, s_sd[k]), k


def _fake_count(stack, x, c):
    """Stand-in for count_flops (the real one imports torch._dynamo, tens of seconds on a loaded 2-core machine)."""
    return sum(p.numel() for p in stack.parameters()) * 2 * x.shape[1]


def test_bench_model_rows(monkeypatch):
    monkeypatch.setattr(bmodel, "count_flops", _fake_count)
    torch.manual_seed(0)
    res = bmodel.bench_model(32, 2, 4, (16, 12), "hyena_x", repeats=2, warmup=1, profile=True)
    assert res["config"]["replaced"] == [1, 3]
    assert [r["tokens"] for r in res["rows"]] == [16, 12]
    assert [r["grid"] for r in res["rows"]] == [[4, 4], [3, 4]]
    for r in res["rows"]:
        assert r["replaced"] == [1, 3] and r["candidate"] == "hyena_x"
        assert len(r["teacher_samples_ms"]) == 2 and len(r["candidate_samples_ms"]) == 2
        assert r["speedup"] == pytest.approx(r["teacher_ms"] / r["candidate_ms"])
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["flop_speedup"])
    prof = res["profile"]["16"]
    assert set(prof) == {"teacher", "candidate"}
    assert prof["teacher"]["top"] and "aten::" in prof["teacher"]["table"]
    assert "candidate ms" in format_table(res["rows"])


def test_bench_model_backward_rows(monkeypatch):
    monkeypatch.setattr(bmodel, "count_flops", _fake_count)
    torch.manual_seed(0)
    fwd = bmodel.bench_model(32, 2, 2, (16,), "hyena_x", repeats=1, warmup=0)["rows"][0]
    res = bmodel.bench_model(32, 2, 2, (16,), "hyena_x", repeats=1, warmup=0, backward=True, profile=True)
    row = res["rows"][0]
    assert res["config"]["mode"] == row["mode"] == "fwd+bwd" and fwd["mode"] == "fwd"
    assert row["teacher_gflops"] == pytest.approx(3 * fwd["teacher_gflops"])
    assert row["candidate_gflops"] == pytest.approx(3 * fwd["candidate_gflops"])
    assert row["flop_speedup"] == pytest.approx(fwd["flop_speedup"])
    assert res["profile"]["16"]["candidate"]["top"] and res["profile"]["16"]["teacher"]["top"]


def test_ops_profile_rows():
    rows = bops.bench_ops(32, 16, 2, ["hyena_x"], repeats=1, warmup=0, backward=True, profile=True)
    for r in rows:
        assert r["profile"]["top"] and "aten::" in r["profile"]["table"]


def test_bench_stage1_rows_and_overhead():
    """A real stage-1 step on a tiny DiT: every grafted operator is timed alone, overhead = step / parts - 1."""
    times = iter(range(1000))
    res = bstage1.bench_stage1(32, 2, 4, (16,), "hyena_x", repeats=2, warmup=0, clock=lambda: next(times) * 0.001)
    row = res["rows"][0]
    assert res["config"]["replaced"] == [1, 3] and set(row["operators_ms"]) == {"attn1", "attn3"}
    assert row["parts_ms"] == pytest.approx(row["teacher_forward_ms"] + sum(row["operators_ms"].values()))
    assert row["overhead"] == pytest.approx(row["step_ms"] / row["parts_ms"] - 1)
    assert set(row["samples_ms"]) == {"step", "teacher_forward", "operator:attn1", "operator:attn3"}
    assert "overhead" in format_table(res["rows"])


@pytest.mark.slow
def test_bench_model_counts_whole_stack_flops():
    """The real counter on the stacks agrees with the registry formulas (MHA via ditgraft.flops' CPU SDPA formula)."""
    torch.manual_seed(0)
    D, n, blocks = 32, 16, 4
    res = bmodel.bench_model(D, 2, blocks, (n,), "hyena_x", repeats=1, warmup=0)
    row = res["rows"][0]
    per_block = operator_flops("mlp", D, 2, (4, 4), ratio=4.0) + 2 * D * 6 * D  # MLP + adaLN linear
    teacher = blocks * (per_block + operator_flops("mha", D, 2, (4, 4)))
    assert row["teacher_gflops"] * 1e9 == pytest.approx(teacher, rel=1e-9)
    cand = teacher + 2 * (operator_flops("hyena_x", D, 2, (4, 4)) - operator_flops("mha", D, 2, (4, 4)))
    assert row["candidate_gflops"] * 1e9 == pytest.approx(cand, rel=1e-2)  # the counter skips the elementwise gates


def _parse(argv):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    add_bench_arguments(sub.add_parser("bench"))
    return p.parse_args(argv)


def test_cli_ops_writes_json(tmp_path, capsys):
    path = tmp_path / "out" / "ops.json"
    args = _parse(["bench", "ops", "--dim", "32", "--heads", "2", "--tokens", "16", "12", "--ops", "hyena_x",
                   "--repeats", "1", "--warmup", "0", "--option", "hyena_x.direction=2d", "--clock", "cpu",
                   "--json", str(path)])
    assert args.fn is run_bench
    run_bench(args)
    data = json.loads(path.read_text())
    assert [r["operator"] for r in data["rows"]] == ["mha", "hyena_x"] * 2
    assert [r["tokens"] for r in data["rows"]] == [16, 16, 12, 12]
    assert data["rows"][1]["options"] == {"direction": "2d"} and data["rows"][1]["clock"] == "cpu"
    assert len(data["env"]) == 2 and "torch" in data["env"][0]
    assert "hyena_x" in capsys.readouterr().out


def test_cli_ops_on_a_video_grid(tmp_path):
    """--grid FxHxW times the grid operators on a video's grid with per-axis windows; FLOPs count its tokens."""
    from ditgraft.operators import operator_flops

    path = tmp_path / "ops.json"
    run_bench(_parse(["bench", "ops", "--dim", "32", "--heads", "2", "--grid", "2x3x4", "--ops", "local2d", "clear",
                      "hyena_x", "--repeats", "1", "--warmup", "0", "--option", "local2d.kernel_size=1,3,3",
                      "--option", "hyena_x.direction=3d", "--option", "hyena_x.kernel_size=3", "--json", str(path)]))
    rows = json.loads(path.read_text())["rows"]
    assert [(r["operator"], r["tokens"], r["grid"]) for r in rows] == [(op, 24, [2, 3, 4]) for op in
                                                                       ("mha", "local2d", "clear", "hyena_x")]
    assert all("error" not in r for r in rows)
    assert rows[1]["gflops"] * 1e9 == operator_flops("local2d", 32, 2, (2, 3, 4), kernel_size=[1, 3, 3])
    with pytest.raises(SystemExit):
        _parse(["bench", "ops", "--grid", "2x3x4x5"])


def test_cli_model_writes_json(tmp_path, monkeypatch):
    monkeypatch.setattr(bmodel, "count_flops", _fake_count)
    path = tmp_path / "model.json"
    args = _parse(["bench", "model", "--dim", "32", "--heads", "2", "--blocks", "3", "--tokens", "16",
                   "--layers", "0,2", "--operator", "swa", "--repeats", "1", "--json", str(path)])
    run_bench(args)
    data = json.loads(path.read_text())
    assert data["config"]["replaced"] == [0, 2] and data["rows"][0]["candidate"] == "swa"


def test_cli_stage1_writes_json(tmp_path):
    path = tmp_path / "stage1.json"
    args = _parse(["bench", "stage1", "--dim", "32", "--heads", "2", "--blocks", "2", "--tokens", "16",
                   "--repeats", "1", "--warmup", "0", "--json", str(path)])
    run_bench(args)
    data = json.loads(path.read_text())
    assert data["command"] == "bench stage1" and data["rows"][0]["replaced"] == [1]
    assert data["rows"][0]["overhead"] == pytest.approx(data["rows"][0]["step_ms"] / data["rows"][0]["parts_ms"] - 1)


def test_parse_options():
    assert parse_options(["swa.window=8", "hyena_x.direction=2d", "swa.impl=tiled", "mamba2.chunk_size=32"]) == {
        "swa": {"window": 8, "impl": "tiled"}, "hyena_x": {"direction": "2d"}, "mamba2": {"chunk_size": 32}}
    assert parse_options(["local2d.kernel_size=[3,9,9]", "clear.tile=2,4,4"]) == {
        "local2d": {"kernel_size": [3, 9, 9]}, "clear": {"tile": [2, 4, 4]}}
    with pytest.raises(ValueError, match="NAME.KEY=VALUE"):
        parse_options(["window=8"])


def test_suite_plan_and_a_tiny_cpu_run_write_json_and_markdown(tmp_path):
    from ditgraft.bench import suite

    plan = suite.run_suite(str(tmp_path / "plan"), "gpu", dry_run=True)
    assert plan["settings"]["device"] == "cuda" and plan["settings"]["dtype"] == "bf16"
    assert plan["sections"] == ["paths", "ops_fwd", "ops_fwd_bwd", "model", "pixart", "sampling"]
    assert plan["settings"]["model_tokens"] == 256 and plan["settings"]["pixart"]["tokens"] == 16384
    assert not (tmp_path / "plan").exists()
    with pytest.raises(ValueError, match="section='nope'"):
        suite.run_suite(str(tmp_path), "tiny", sections=["nope"])
    result = suite.run_suite(str(tmp_path / "tiny"), "tiny", sections=["paths", "ops_fwd", "sampling"])
    saved = json.loads((tmp_path / "tiny" / "results.json").read_text())
    assert saved["sections"].keys() == {"paths", "ops_fwd", "sampling"}
    assert all(s["error"] is None for s in saved["sections"].values())
    sampling = {r["candidate"]: r for r in result["sections"]["sampling"]["rows"]}
    assert {"teacher", "parallel 1 units", "parallel 1 units, fused"} <= set(sampling)
    assert sampling["teacher"]["speedup"] == 1.0
    md = (tmp_path / "tiny" / "results.md").read_text()
    assert "## ops_fwd" in md and "| mha |" in md and "| mamba2 | chunked + taps |" in md


# ---- bench sample: eager vs compiled sampling (compiles the shared tiny structure of tests/helpers.py) ----------

@pytest.mark.slow
def test_bench_sample_rows_and_cli_json(tmp_path, capsys):
    from helpers import COMPILE_BATCH, compile_dit
    from ditgraft.bench.sample import bench_sample
    from ditgraft.models.checkpoints import save_safetensors

    ticks = iter(range(1000))
    res = bench_sample(compile_dit(seed=0), batch=COMPILE_BATCH, steps=2, repeats=2, clock=lambda: next(ticks))
    eager, compiled = res["rows"]
    assert (eager["candidate"], compiled["candidate"]) == ("eager", "compiled")
    assert len(eager["samples_ms"]) == len(compiled["samples_ms"]) == 2
    assert res["speedup"] == pytest.approx(eager["time_ms"] / compiled["time_ms"]) == compiled["speedup"]
    assert eager["speedup"] == 1.0 and res["config"]["clock"] == "custom"
    assert res["compile_s"] == pytest.approx(compiled["first_s"] - compiled["time_ms"] / 1e3)
    assert res["max_abs_diff"] < 1e-4  # the same seeds: the same samples to float rounding
    assert eager["gflops"] == compiled["gflops"] > 0
    assert eager["gflop_per_s"] == pytest.approx(eager["gflops"] / (eager["time_ms"] / 1e3))

    model = str(tmp_path / "tiny.safetensors")
    m = compile_dit(seed=1)
    save_safetensors(model, m, {"model_config": m.config})
    path = tmp_path / "sample.json"
    run_bench(_parse(["bench", "sample", "--model", model, "--batch", str(COMPILE_BATCH), "--steps", "2",
                      "--repeats", "1", "--sampler", "ddpm", "--json", str(path)]))
    data = json.loads(path.read_text())
    assert data["command"] == "bench sample" and data["config"]["sampler"] == "ddpm"
    assert data["config"]["clock"] == "cpu" and [r["candidate"] for r in data["rows"]] == ["eager", "compiled"]
    assert "compile s" in capsys.readouterr().out


def test_bench_sample_refuses_a_family_that_cannot_compile():
    from family_helpers import TINY_FAMILIES
    from ditgraft.bench.sample import bench_sample

    pytest.importorskip("diffusers")
    with pytest.raises(ValueError, match="bench sample: the diffusers_dit family does not support compile"):
        bench_sample(TINY_FAMILIES["diffusers_dit"].build(depth=1, seed=0), batch=2, steps=1, repeats=1)


def test_retain_memory_is_recorded_in_the_environment():
    """--retain-memory changes the allocator of the whole process, so it runs in a child process here."""
    import subprocess
    import sys

    from ditgraft.bench.common import environment

    assert environment(torch.device("cpu"))["malloc"] == "default"
    code = ("import torch; from ditgraft.bench.common import environment, retain_freed_memory; "
            "ok = retain_freed_memory(); print(ok, environment(torch.device('cpu'))['malloc'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out in (["True", "retain"], ["False", "default"])
    assert _parse(["bench", "ops", "--retain-memory"]).retain_memory is True
