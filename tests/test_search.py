"""`ditgraft search`: the exact constrained choice against exhaustive search, the budget check before anything is
written, and a whole tiny search (signals, choice, verification sweep, report)."""
import json
import os

import numpy as np
import pytest
import yaml

from helpers import save_mnist_teacher
from ditgraft.cli import main
from ditgraft.explore.search import best_designs, design_grafts, exhaustive_designs, run_search


@pytest.mark.parametrize("seed", range(12))
def test_milp_choice_equals_exhaustive_search(seed):
    rng = np.random.default_rng(seed)
    L, C = int(rng.integers(2, 7)), int(rng.integers(2, 5))
    score = rng.random((L, C))
    score[:, 0] = 0  # the kept operator changes nothing
    cost = np.tile(np.concatenate([[1.0], rng.uniform(0.3, 2.0, C - 1)]), (L, 1))
    budget = float(rng.uniform(cost.min(), 1.0))
    got, want = best_designs(score, cost, budget, k=3), exhaustive_designs(score, cost, budget, k=3)
    assert len(got) == len(want)
    np.testing.assert_allclose([score[range(L), d].sum() for d in got], [score[range(L), d].sum() for d in want])
    assert all(cost[range(L), d].mean() <= budget + 1e-9 for d in got)
    assert len(set(got)) == len(got)


def test_design_grafts_group_layers_by_operator():
    assert design_grafts(["mha", "swa", "hyena_x", "swa"], "attn", {"swa": {"window": 4}, "hyena_x": {}}) == [
        {"slot": "attn", "layers": [1, 3], "operator": "swa", "options": {"window": 4}},
        {"slot": "attn", "layers": [2], "operator": "hyena_x", "options": {}}]


def _search(folder, **change) -> str:
    teacher = save_mnist_teacher(str(folder))
    spec = {"name": "tiny_search",
            "base": {"teacher": {"source": teacher},
                     "grafts": [{"slot": "attn", "layers": [0], "operator": "hyena_x"}],
                     "stage1": {"samples": 32, "val_samples": 16, "steps": 4, "batch_size": 8, "eval_every": 2},
                     "stage2": {"steps": 2, "batch_size": 8, "ckpt_every": 1}, "eval": {"num": 10, "steps": 2}},
            "slot": "attn", "candidates": {"mha": {}, "hyena_x": {}, "swa": {"window": 2}},
            "budget": {"share": 0.95}, "probe": {"steps": 4, "samples": 32, "val_samples": 16, "batch_size": 8},
            "sensitivity_samples": 16, "verify": 1, **change}
    path = os.path.join(folder, "search.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f)
    return path


def test_a_budget_no_design_meets_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    path = _search(tmp_path, budget={"share": 0.5})
    monkeypatch.chdir(tmp_path)
    assert main(["search", path]) == 2
    err = capsys.readouterr().err
    assert "budget.share = 0.5: no design fits" in err and "hyena_x" in err, err
    assert not os.path.exists(tmp_path / "searches")


def test_a_mixing_budget_counts_the_flops_above_the_kept_projections(tmp_path):
    import torch

    from ditgraft.explore.search import load_search, operator_costs
    from ditgraft.graft.teacher import load_teacher
    from ditgraft.operators.common import projection_flops
    from ditgraft.operators.registry import operator_flops
    from ditgraft.recipe import parse_recipe

    s, base, _ = load_search(_search(tmp_path, budget={"share": 0.6, "part": "mixing"}))
    teacher, _ = load_teacher(parse_recipe(base), torch.device("cpu"))
    from ditgraft.models.adapters import model_dims

    d = model_dims(teacher)
    dim, heads, grid = d.dim, d.heads, d.grid
    kept = projection_flops(grid[0] * grid[1], dim)
    want = (operator_flops("swa", dim, heads, grid, window=2) - kept) / (operator_flops("mha", dim, heads, grid) - kept)
    costs = operator_costs(teacher, "attn", s.candidates, "flops", "mixing")
    assert costs["mha"] == 1.0 and costs["swa"] == pytest.approx(want)
    assert costs["swa"] < operator_costs(teacher, "attn", s.candidates, "flops")["swa"]


def test_a_mixing_budget_by_latency_is_refused(tmp_path, capsys):
    path = _search(tmp_path, budget={"share": 0.6, "part": "mixing", "cost": "latency"})
    assert main(["search", path]) == 2
    assert "part = mixing needs cost = flops" in capsys.readouterr().err


def test_unknown_candidate_is_refused(tmp_path, capsys):
    path = _search(tmp_path, candidates={"mha": {}, "nonsense": {}})
    assert main(["search", path]) == 2
    assert "candidates.nonsense" in capsys.readouterr().err


def test_tiny_search_verifies_its_best_design_and_reports_signals(tmp_path):
    path = _search(tmp_path)
    out = str(tmp_path / "out")
    report = run_search(path, out, log=lambda *_: None)
    signals = json.load(open(os.path.join(out, "signals.json")))
    assert set(signals["sensitivity"]) == {"mha", "hyena_x", "swa"} and signals["depth"] == 2
    assert signals["sensitivity"]["mha"] == [0.0, 0.0] and min(signals["sensitivity"]["hyena_x"]) > 0
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["design1"]["cost"] <= 0.95 and rows["design1"]["ratio"] is not None
    assert rows["base"]["ratio"] is not None  # verified beside it (or it is design1 itself)
    assert os.path.exists(os.path.join(out, "verify", "results.md"))
    assert "Do the cheap signals rank designs?" in open(os.path.join(out, "report.md")).read()
