"""Restructuring (graft/restructure.py, graft/restructure_train.py): parallel units of block pairs, dropped blocks,
their recipes, stage 1 of units (the stage-1 engine with PairTarget targets), self-describing checkpoints, and the
DiT-XL/2 parameter count of the paper's 14-unit model."""
import copy
import os

import pytest
import torch

from ditgraft.graft import restructure as rs
from ditgraft.graft import restructure_train as rt
from ditgraft.graft.stage1 import PairTarget, capture, extract, noised_inputs, pair_targets, run_stage1
from ditgraft.graft.surgery import load_any, save_grafted
from ditgraft.recipe import parse_recipe
from helpers import tiny_dit


def _inputs(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = model.grid[0] * model.patch_size
    return (torch.randn(n, model.in_channels, h, h, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, model.num_classes, (n,), generator=g))


def test_parallel_pair_matches_its_definition_for_every_merge_init():
    model = tiny_dit(depth=2).eval()
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    a, b = model.blocks
    da, db = a(x, c) - x, b(x, c) - x
    expected = {"sum": x + da + db, "average": x + (da + db) / 2, "first": x + da}
    for how, want in expected.items():
        unit = rs.ParallelPair(a, b, how)
        torch.testing.assert_close(unit(x, c), want, atol=1e-6, rtol=1e-5)
    # a trained merge mixes the concatenated updates: x + W [da; db] + bias
    unit = rs.ParallelPair(a, b)
    with torch.no_grad():
        unit.merge.weight.normal_(0, 0.1)
        unit.merge.bias.normal_(0, 0.1)
    torch.testing.assert_close(unit(x, c), x + torch.cat([da, db], -1) @ unit.merge.weight.T + unit.merge.bias)


def _random_unit(depth=2, seed=0):
    torch.manual_seed(seed)
    model = tiny_dit(depth=depth)
    with torch.no_grad():  # adaLN starts at zero (gates 0): random weights so every path carries signal
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model, rs.ParallelPair(*model.blocks[:2])


def _out_and_grads(unit, x, c, g):
    unit.zero_grad(set_to_none=True)
    x, c = x.clone().requires_grad_(), c.clone().requires_grad_()
    out = unit(x, c)
    (out * g).sum().backward()
    return [out.detach(), x.grad, c.grad] + [p.grad for _, p in sorted(unit.named_parameters())]


def test_fused_unit_equals_the_sequential_parallel_unit_outputs_and_gradients():
    _, unit = _random_unit()
    unit.double()  # the two differ by rounding only: in float64 that is far below the tolerance
    x, c, g = (torch.randn(*shape, dtype=torch.float64) for shape in ((3, 16, 32), (3, 32), (3, 16, 32)))
    plain = _out_and_grads(unit, x, c, g)
    assert rs.fuse_parallel_units(unit) == 1 and unit.fused
    fused = _out_and_grads(unit, x, c, g)
    assert len(fused) == len(plain) == 3 + len(list(unit.parameters()))
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert set(unit.state_dict()) == set(rs.ParallelPair(*_random_unit()[0].blocks[:2]).state_dict())


def test_fused_unit_cache_follows_parameter_updates_and_unfusable_pairs_stay_sequential():
    model, unit = _random_unit()
    rs.fuse_parallel_units(unit)
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    with torch.no_grad():
        first = unit(x, c)
        unit.pair[1].mlp.fc1.weight.mul_(0.5)  # an in-place update: the stacked weights must follow it
        fused = unit(x, c)
        unit.fused = False
        plain = unit(x, c)
    assert not torch.allclose(first, fused)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    from ditgraft.operators import build_operator

    other = rs.ParallelPair(*copy.deepcopy(model).blocks[:2])
    other.pair[1].attn = build_operator("hyena_x", 32, 1, (4, 4))
    assert not rs.can_fuse(other) and rs.fuse_parallel_units(other) == 0 and not other.fused


def test_sample_fuse_units_gives_the_same_samples_and_refuses_a_model_without_units(tmp_path, capsys):
    import numpy as np

    from ditgraft.cli import main

    model = rs.restructured_copy(tiny_dit(depth=4), rs.resolve_restructure({"parallel_pairs": "all"}, 4))
    path = str(tmp_path / "parallel.safetensors")
    save_grafted(path, model, [], {}, {}, extra={"restructure": model.restructure})
    common = ["sample", path, "--num-samples", "2", "--steps", "2", "--batch-size", "2", "--device", "cpu"]
    assert main(common + ["--out", str(tmp_path / "plain")]) == 0
    assert main(common + ["--out", str(tmp_path / "fused"), "--fuse-units"]) == 0
    plain, fused = (np.load(tmp_path / d / "samples.npz")["arr_0"].astype(int) for d in ("plain", "fused"))
    assert plain.shape == fused.shape and np.abs(plain - fused).max() <= 1  # uint8 images, equal up to rounding
    capsys.readouterr()
    assert main(["sample", "testbed", "--fuse-units", "--num-samples", "1", "--steps", "1", "--device", "cpu",
                 "--out", str(tmp_path / "none")]) == 2
    assert "--fuse-units" in capsys.readouterr().err and not (tmp_path / "none" / "samples.npz").exists()


def test_restructure_keeps_dit_names_and_roundtrips_from_the_file_alone(tmp_path):
    teacher = tiny_dit(depth=6)
    spec = rs.resolve_restructure({"parallel_pairs": [[0, 1], [4, 5]], "drop": [3]}, 6)
    student = rs.restructured_copy(teacher, spec)
    assert len(student.blocks) == 3 and len(teacher.blocks) == 6  # units 0-1, block 2, unit 4-5; teacher untouched
    keys = student.state_dict().keys()
    assert "blocks.0.pair.1.attn.qkv.weight" in keys and "blocks.2.merge.weight" in keys
    assert "blocks.1.mlp.fc1.weight" in keys and not any(k.startswith("blocks.3.") for k in keys)
    torch.testing.assert_close(student.blocks[2].pair[0].attn.qkv.weight, teacher.blocks[4].attn.qkv.weight)
    torch.testing.assert_close(student.blocks[1].mlp.fc1.weight, teacher.blocks[2].mlp.fc1.weight)
    with torch.no_grad():
        student.blocks[0].merge.weight.normal_(0, 0.1)
    path = str(tmp_path / "student.safetensors")
    save_grafted(path, student, [], {"name": "x"}, {}, extra={"restructure": spec})
    loaded, meta = load_any(path)
    assert meta["restructure"] == spec
    x, t, y = _inputs(student)
    torch.testing.assert_close(loaded(x, t, y), student.eval()(x, t, y))
    # a plain-config model (the from-scratch baseline: a shallower DiT, no restructure) also loads from its file
    plain = tiny_dit(depth=3)
    save_grafted(str(tmp_path / "plain.safetensors"), plain, [], {"name": "x"}, {}, extra={"baseline": "s"})
    assert len(load_any(str(tmp_path / "plain.safetensors"))[0].blocks) == 3


@pytest.mark.parametrize("spec, message", [
    ({"parallel_pairs": [[1, 3]]}, "[1, 3] is not allowed; a pair is two adjacent blocks"),
    ({"parallel_pairs": [[6, 7]]}, "[6, 7] is not allowed"),
    ({"parallel_pairs": [[0, 1], [1, 2]]}, "reuses block(s) [1]"),
    ({"parallel_pairs": [[0, 1]], "drop": [1]}, "reuses block(s) [1]"),
    ({"drop": [9]}, "restructure.drop=[9]: blocks [9] are out of range for depth 6"),
    ({"drop": list(range(6))}, "removes every block"),
    ({"parallel_pairs": "all", "merge_init": "mean"}, "merge_init='mean' is not allowed"),
    ({}, "give parallel_pairs and/or drop"),
])
def test_resolve_restructure_names_field_value_and_allowed(spec, message):
    with pytest.raises(ValueError) as err:
        rs.resolve_restructure(spec, 6)
    assert message in str(err.value)


def test_resolve_all_and_odd_depth():
    assert rs.resolve_restructure({"parallel_pairs": "all"}, 4)["parallel_pairs"] == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="needs an even depth"):
        rs.resolve_restructure({"parallel_pairs": "all"}, 5)


def test_recipe_restructure_section_validates_and_composes_with_grafts():
    r = parse_recipe({"restructure": {"parallel_pairs": "all"}, "eval": {"baselines": ["depth_pruned"]}})
    assert r.grafts == [] and r.restructure.merge_init == "sum" and r.restructure.loss == "l1"
    r = parse_recipe({"grafts": [{"slot": "attn", "layers": [1], "operator": "hyena_x"}],
                      "restructure": {"parallel_pairs": [[0, 1]], "drop": [3]}})
    assert r.restructure.parallel_pairs == [[0, 1]] and r.restructure.drop == [3]
    for bad, message in [({}, "grafts = [] and there is no restructure section"),
                         ({"restructure": {"parallel_pairs": "some"}}, "restructure.parallel_pairs = 'some'"),
                         ({"restructure": {"parallel_pairs": [[1, 2, 3]]}}, "two block indices"),
                         ({"restructure": {}}, "give parallel_pairs"),
                         ({"restructure": {"drop": [1], "stage1_train": "all"}}, "restructure.stage1_train"),
                         ({"grafts": [{"slot": "attn", "layers": [1], "operator": "mha"}],
                           "eval": {"baselines": ["from_scratch"]}}, "need a restructure section")]:
        with pytest.raises(ValueError) as err:
            parse_recipe(bad)
        assert message in str(err.value)


def test_pair_target_captures_the_sequential_pair():
    teacher = tiny_dit(depth=4).eval()
    x, t, y = _inputs(teacher)
    with capture(teacher, [PairTarget([2, 3])]) as got:
        teacher(x, t, y)
    xin, c, out = got["pair2_3"]
    torch.testing.assert_close(teacher.blocks[3](teacher.blocks[2](xin, c), c), out)


def test_unit_stage1_trains_the_chosen_parameters_and_loads_into_the_student(tmp_path):
    teacher = tiny_dit(depth=4, input_size=32, patch_size=8)
    x0, y = torch.randn(48, 1, 32, 32), torch.randint(0, 10, (48,))
    spec = rs.resolve_restructure({"parallel_pairs": [[0, 1], [2, 3]]}, 4)
    for train in ("unit", "merge"):
        r = parse_recipe({"restructure": {"parallel_pairs": "all", "stage1_train": train},
                          "stage1": {"samples": 40, "val_samples": 8, "steps": 6, "batch_size": 8, "eval_every": 3,
                                     "lr": 3e-3}})
        run = str(tmp_path / train)
        out = run_stage1(teacher, pair_targets(spec, r.restructure), r.stage1, x0[:40], y[:40], x0[40:], y[40:],
                         run, 0, "cpu", progress=False, log=lambda *_: None)
        assert set(out["units"]) == {"pair0_1", "pair2_3"} and out["plan"]["mode"] == "memory"
        student = rt.restructure_student(copy.deepcopy(teacher), spec, [], run)
        unit, fresh = student.blocks[0], rt.make_units(teacher, spec)["pair0_1"]
        merge_moved = not torch.equal(unit.merge.weight, fresh.merge.weight)
        blocks_moved = not torch.equal(unit.pair[1].mlp.fc2.weight, fresh.pair[1].mlp.fc2.weight)
        assert merge_moved and blocks_moved == (train == "unit")
        # the best weights reproduce the recorded validation error
        val = extract(teacher, pair_targets(spec, r.restructure), noised_inputs(x0[40:], y[40:], seed=2), 8, None,
                      torch.float32, "cpu")
        xin, c, target = val["pair0_1"]
        with torch.no_grad():
            mse = float((unit(xin, c) - target).square().mean())
        assert mse == pytest.approx(out["units"]["pair0_1"]["val_mse"], rel=1e-4)


def test_unit_stage1_disk_cache_and_resume_match_one_uninterrupted_memory_run(tmp_path, monkeypatch):
    """The engine's caches and resume serve units as they serve grafted slots: units distilled from the disk cache,
    killed mid-way and resumed, end with the same best weights and summary as one uninterrupted run from memory."""
    from safetensors.torch import load_file

    import ditgraft.graft.stage1 as s1
    from helpers import Crash, crash_on_call

    teacher = tiny_dit(depth=4, input_size=32, patch_size=8)
    x0, y = torch.randn(30, 1, 32, 32), torch.randint(0, 10, (30,))
    r = parse_recipe({"restructure": {"parallel_pairs": "all", "loss": "huber"},
                      "stage1": {"samples": 24, "val_samples": 6, "steps": 6, "batch_size": 8, "eval_every": 2}})
    spec = rs.resolve_restructure(r.restructure, 4)

    def run(name, cache):
        cfg = r.stage1.model_copy(update={"cache": cache})
        return run_stage1(teacher, pair_targets(spec, r.restructure), cfg, x0[:24], y[:24], x0[24:], y[24:],
                          str(tmp_path / name), 0, "cpu", progress=False, log=lambda *_: None, desc="stage1-units")

    want = run("memory", "memory")
    monkeypatch.setattr(s1, "_bank_losses", crash_on_call(s1._bank_losses, 5))
    with pytest.raises(Crash):
        run("disk", "disk")
    monkeypatch.undo()
    got = run("disk", "disk")
    assert got["plan"]["mode"] == "disk" and os.path.exists(tmp_path / "disk" / "cache" / "pair2_3_c.npy")
    assert got["units"] == want["units"] and set(got["units"]) == {"pair0_1", "pair2_3"}
    for key in got["units"]:
        a = load_file(str(tmp_path / "memory" / "best" / f"{key}.safetensors"))
        b = load_file(str(tmp_path / "disk" / "best" / f"{key}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_merge_init_study_sum_is_exact_for_independent_blocks():
    """With block b's MLP and attention gated off (adaLN gate 0), b is the identity: sum and first are exact."""
    teacher = tiny_dit(depth=2)
    with torch.no_grad():
        teacher.blocks[1].adaLN_modulation[-1].weight.zero_()
        teacher.blocks[1].adaLN_modulation[-1].bias.zero_()
    res = rt.merge_init_study(teacher, torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)), inits=rs.MERGE_INITS)
    assert res["sum"]["pair0_1"] < 1e-10 and res["first"]["pair0_1"] < 1e-10
    assert res["average"]["pair0_1"] > 0.1


def test_dit_xl2_parallel_14_parameter_count_on_meta():
    """The paper: 712M parallel vs 675M sequential. A Linear(2D -> D) merge per unit: 14 x (2 D^2 + D) more."""
    from ditgraft.models.dit import build_dit

    with torch.device("meta"):
        teacher = build_dit("DiT-XL/2", input_size=32)
        spec = rs.resolve_restructure(parse_recipe({"restructure": {"parallel_pairs": "all"}}).restructure, 28)
        student = rs.restructure(teacher, spec)
    assert len(student.blocks) == 14
    assert rt.param_count(student) == 675_129_632 + 14 * (2 * 1152 * 1152 + 1152) == 712_304_672


def test_dit_xl2_parallel_recipe_is_wired(tmp_path):
    """The real recipe's sections drive one step of stage 1 (units) and stage 2 on a DiT-XL/2-wide stand-in with
    2 blocks (1 unit): same width, heads, tokens and latent shape as DiT-XL/2; stage 1 streams as at full size."""
    from ditgraft.graft.stage2 import run_stage2
    from ditgraft.models.dit import build_dit
    from ditgraft.recipe import load_recipe

    recipe = load_recipe("dit_xl2_parallel_14")
    assert recipe.restructure.parallel_pairs == "all" and "25pct" in recipe.stage2.data.path and recipe.grafts == []
    torch.manual_seed(0)
    teacher = build_dit(recipe.teacher.model, input_size=recipe.teacher.image_size // 8, depth=2).eval()
    with torch.no_grad():  # adaLN-Zero makes fresh blocks identities: give them (and the output) non-zero weights
        for m in [b.adaLN_modulation[-1] for b in teacher.blocks] + [teacher.final_layer.linear]:
            m.weight.normal_(0, 0.02)
    spec = rs.resolve_restructure(recipe.restructure, 2)
    g = torch.Generator().manual_seed(0)
    x0, y = torch.randn(3, 4, 32, 32, generator=g), torch.randint(0, 1000, (3,), generator=g)
    s1 = recipe.stage1.model_copy(update={"samples": 2, "val_samples": 1, "steps": 1, "batch_size": 2,
                                          "eval_every": 1, "extract_batch_size": 2, "ram_budget_gb": 0.001})
    out = run_stage1(teacher, pair_targets(spec, recipe.restructure), s1, x0[:2], y[:2], x0[2:], y[2:],
                     str(tmp_path / "s1"), 0, "cpu", progress=False, log=lambda *_: None)
    assert out["plan"]["mode"] == "stream" and list(out["units"]) == ["pair0_1"]
    assert all(torch.isfinite(torch.tensor(u["val_mse"])) for u in out["units"].values())
    student = rt.restructure_student(teacher, spec, [], str(tmp_path / "s1"))
    s2 = recipe.stage2.model_copy(update={"steps": 1, "batch_size": 2, "ema_decay": None, "ckpt_every": 1,
                                          "precision": "fp32"})  # bf16 is for CUDA
    before = student.blocks[0].merge.weight.detach().clone()
    trained, history = run_stage2(student, s2, x0[:2], y[:2], str(tmp_path / "s2"), 0, progress=False)
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["loss"]))
    assert not torch.equal(before, trained.blocks[0].merge.weight)
    assert os.path.exists(str(tmp_path / "s1" / "best" / "pair0_1.safetensors"))


def test_pipeline_restructure_with_baselines_at_matched_flops(tmp_path):
    """`run_graft` with a restructure section: unit stage 1, stage 2, the two baselines at the same total FLOPs,
    their evaluations, the latency table and a report; every model reloads from its file alone."""
    import json

    from ditgraft.flops import dit_train_flops_per_sample
    from ditgraft.graft.pipeline import run_graft
    from ditgraft.models.checkpoints import save_safetensors

    teacher = tiny_dit(depth=2, input_size=32, patch_size=8)
    path = str(tmp_path / "teacher.safetensors")
    save_safetensors(path, teacher, {"model_config": teacher.config, "pretrain": {"train_flops": 1e13}})
    r = parse_recipe({"name": "tiny", "teacher": {"source": path}, "restructure": {"parallel_pairs": "all"},
                      "stage1": {"samples": 32, "val_samples": 8, "steps": 4, "batch_size": 8, "eval_every": 2},
                      "stage2": {"steps": 3, "batch_size": 8, "ckpt_every": 2},
                      "eval": {"num": 10, "steps": 2, "baselines": ["depth_pruned", "from_scratch"],
                               "protocol": "decision", "seeds": [0, 1], "resamples": 20}})
    run = str(tmp_path / "run")
    report = run_graft(r, run, progress=False, log=lambda *_: None)
    for name in rs.BASELINES:  # under the decision protocol: each baseline vs the teacher, and paired with the student
        against_teacher = json.load(open(os.path.join(run, "eval", f"{name}_decision.json")))
        paired = json.load(open(os.path.join(run, "eval", f"grafted_vs_{name}_decision.json")))
        assert against_teacher["num"] == paired["num"] == 20
        assert paired["against"]["fid"]["value"] == pytest.approx(against_teacher["model"]["fid"]["value"])
    assert "grafted/depth_pruned" in open(os.path.join(run, "eval", "decision.txt")).read()
    c = report["compute"]
    assert c["total_flops"] == c["stage1_extraction_flops"] + c["stage1_operator_flops"] + c["stage2_flops"]
    assert c["stage1_operator_flops"] > 0 and c["stage2_flops"] > 0
    assert set(report["eval"]) == {"grafted", "depth_pruned", "from_scratch"}
    student, meta = load_any(os.path.join(run, "student.safetensors"))
    assert meta["restructure"]["parallel_pairs"] == [[0, 1]] and isinstance(student.blocks[0], rs.ParallelPair)
    for name in rs.BASELINES:
        model, _ = load_any(os.path.join(run, f"baseline_{name}", "student.safetensors"))
        assert len(model.blocks) == 1
        steps = c[f"{name}_stage2_steps"]
        assert steps == round(c["total_flops"] / (dit_train_flops_per_sample(model) * 8)) and steps > 3
        with open(os.path.join(run, f"baseline_{name}", "stage2", "loop", "metrics.jsonl")) as f:
            assert max(json.loads(line)["step"] for line in f) == steps
    lat = json.load(open(os.path.join(run, "eval", "latency.json")))
    assert lat["depth_bound"] == 0.5 and set(lat["models"]) == {"teacher", "grafted", *rs.BASELINES}
    assert "## Restructuring" in open(os.path.join(run, "report.md")).read()


def test_grafts_compose_with_restructure_and_reload(tmp_path):
    """An operator grafted into a block of a parallel pair keeps its own (operator stage 1) weights when the unit's
    stage-1 weights are loaded, and the grafted + restructured model reloads from its file alone."""
    from ditgraft.graft.stage1 import BestKeeper
    from ditgraft.graft.surgery import graft_model, resolve_grafts

    teacher = tiny_dit(depth=4)
    r = parse_recipe({"grafts": [{"slot": "attn", "layers": [1], "operator": "hyena_x"}],
                      "restructure": {"parallel_pairs": [[0, 1]], "drop": [3]}})
    grafts = resolve_grafts(r, 4)
    spec = rt.recipe_spec(r, teacher)
    units = rt.make_units(teacher, spec)
    with torch.no_grad():
        for p in units["pair0_1"].parameters():
            p.add_(1.0)  # "trained" unit weights, distinguishable from the teacher's
    BestKeeper(str(tmp_path / "units" / "best")).offer("pair0_1", units["pair0_1"], 1, 0.0, 0.0)
    student = graft_model(teacher, grafts, seed=0)
    op = copy.deepcopy(student.blocks[1].attn)
    student = rt.restructure_student(student, spec, grafts, str(tmp_path / "units"))
    assert [type(b).__name__ for b in student.blocks] == ["ParallelPair", "DiTBlock"]
    unit = student.blocks[0]
    for (k, v), w in zip(unit.pair[1].attn.state_dict().items(), op.state_dict().values()):
        assert torch.equal(v, w), k  # the grafted operator is not overwritten
    torch.testing.assert_close(unit.pair[0].attn.qkv.weight, units["pair0_1"].pair[0].attn.qkv.weight)
    torch.testing.assert_close(unit.merge.weight, units["pair0_1"].merge.weight)
    path = str(tmp_path / "student.safetensors")
    save_grafted(path, student, grafts, r.to_dict(), {}, extra={"restructure": spec})
    loaded, _ = load_any(path)
    x, t, y = _inputs(student)
    torch.testing.assert_close(loaded(x, t, y), student.eval()(x, t, y))


def test_accounting_counts_each_stage1_run_and_matches_baselines_by_one_step_rule():
    """graft/accounting.py: a stage-1 run (operators, units) costs one teacher pass over the cached rows; a
    restructure that only drops blocks runs no stage 1 and costs none; every baseline's step costs what its own
    stage 2 runs (with output distillation: plus the teacher's forward per row)."""
    from ditgraft.flops import dit_forward_flops_per_sample, dit_train_flops_per_sample
    from ditgraft.graft.accounting import compute_accounting, stage2_step_flops
    from ditgraft.graft.surgery import graft_model, resolve_grafts

    teacher = tiny_dit(depth=4)
    s1 = {"samples": 20, "val_samples": 4, "steps": 3, "batch_size": 4}

    def account(**sections):
        r = parse_recipe({"stage1": s1, "stage2": {"steps": 5, "batch_size": 4}, **sections})
        grafts = resolve_grafts(r, 4)
        return compute_accounting(teacher, {}, grafts, r, graft_model(teacher, grafts, 0), rt.recipe_spec(r, teacher))

    fwd = dit_forward_flops_per_sample(teacher)
    drop = account(restructure={"drop": [3]})
    assert drop["stage1_extraction_flops"] == 0 and drop["stage1_operator_flops"] == 0
    both = account(grafts=[{"slot": "attn", "layers": [2], "operator": "hyena_x"}],
                   restructure={"parallel_pairs": [[0, 1]]})
    assert both["stage1_extraction_flops"] == 2 * fwd * 24  # the operators' pass and the units' pass
    units = account(restructure={"parallel_pairs": [[0, 1]]})
    assert units["stage1_extraction_flops"] == fwd * 24
    assert both["stage1_operator_flops"] > units["stage1_operator_flops"] > 0
    r = parse_recipe({"restructure": {"parallel_pairs": "all"}, "stage1": s1,
                      "stage2": {"steps": 5, "batch_size": 4, "distill_weight": 1.0}})
    acc = compute_accounting(teacher, {}, [], r, graft_model(teacher, [], 0), rt.recipe_spec(r, teacher))
    pruned = rs.baseline_model("depth_pruned", teacher, rt.recipe_spec(r, teacher), 0)
    step = stage2_step_flops(pruned, teacher, r.stage2)
    assert step == (dit_train_flops_per_sample(pruned) + fwd) * 4
    assert acc["depth_pruned_stage2_steps"] == round(acc["total_flops"] / step)
