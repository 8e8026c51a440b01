"""Layer selectors (ditgraft.layers): the paper's sets, the analysis- and probe-driven selectors, recipe
layer specs resolved against a depth, and the command-line layer sets."""
import pytest

from ditgraft.layers import interleave, layers_from_text, resolve_layers, select_layers, selector_names
from ditgraft.recipe import parse_recipe

BASE = {"grafts": [{"slot": "attn", "layers": "interleave", "operator": "hyena_x"}]}


def test_interleave_matches_the_paper():
    assert select_layers("interleave", 28, fraction=0.5) == list(range(1, 28, 2))
    assert select_layers("interleave", 28, fraction=0.75) == [i for i in range(28) if i % 4]
    assert select_layers("interleave", 28, fraction=1.0) == list(range(28))
    assert select_layers("interleave", 8, fraction=0.5) == [1, 3, 5, 7]
    assert select_layers("interleave", 8, fraction=0.75) == [1, 2, 3, 5, 6, 7]
    assert select_layers("interleave", 8, count=2) == [3, 7]
    assert select_layers("interleave", 7, fraction=0.5) == [1, 3, 5, 6]  # round(3.5) = 4
    for depth in range(1, 30):
        for n in range(1, depth + 1):
            got = interleave(depth, n)
            assert len(got) == n and got == sorted(set(got)) and all(0 <= i < depth for i in got)


def test_simple_selectors():
    assert select_layers("all", 8) == list(range(8))
    assert select_layers("deepest", 28, fraction=0.5) == list(range(14, 28))
    assert select_layers("deepest", 8, count=3) == [5, 6, 7]


def fake_analysis(values):
    return {"layers": [{"layer": i, "attention": None if v is None else {"band_locality_mean": v}}
                       for i, v in enumerate(values)]}


def test_locality_selectors():
    analysis = fake_analysis([0.9, 0.2, 0.5, 0.7, 0.5, 0.1, 0.8, 0.3])
    assert select_layers("most_local", 8, analysis=analysis, count=3) == [0, 3, 6]
    assert select_layers("least_local", 8, analysis=analysis, count=3) == [1, 5, 7]
    assert select_layers("most_local", 8, analysis=analysis) == [0, 2, 3, 6]  # tie 0.5 (layers 2, 4): lower index
    assert select_layers("least_local", 8, analysis=analysis, count=4) == [1, 2, 5, 7]
    skipped = fake_analysis([0.9, None, 0.1, 0.5])
    assert select_layers("least_local", 4, analysis=skipped, count=2) == [2, 3]
    with pytest.raises(ValueError, match="only 3 of 4"):
        select_layers("most_local", 4, analysis=skipped, count=4)


def test_selector_errors():
    with pytest.raises(ValueError, match=r"selector='odd' is not allowed.*interleave"):
        select_layers("odd", 8)
    assert "most_local" in selector_names()
    with pytest.raises(ValueError, match="needs analysis"):
        select_layers("most_local", 8)
    with pytest.raises(ValueError, match="analysis has 3 layers but depth=8"):
        select_layers("least_local", 8, analysis=fake_analysis([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="fraction"):
        select_layers("interleave", 8, fraction=1.5)
    with pytest.raises(ValueError, match="count"):
        select_layers("deepest", 8, count=9)
    with pytest.raises(ValueError, match="selects no layer"):
        select_layers("interleave", 8, fraction=0.01)
    with pytest.raises(ValueError, match="depth"):
        select_layers("all", 0)


def test_selectors_resolve():
    r = parse_recipe({"grafts": [
        {"slot": "attn", "layers": {"select": "interleave", "fraction": 0.75}, "operator": "mha"},
        {"slot": "mlp", "layers": "-2:", "operator": "mlp"}]})
    assert resolve_layers(r.grafts[0].layers, 28) == [i for i in range(28) if i % 4]
    assert resolve_layers(r.grafts[1].layers, 8) == [6, 7]
    assert resolve_layers(parse_recipe(BASE).grafts[0].layers, 28) == list(range(1, 28, 2))
    assert resolve_layers([0, -1], 8) == [0, 7]
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers([9], 8)
    analysis = {"layers": [{"layer": i, "attention": {"band_locality_mean": loc}}
                           for i, loc in enumerate([0.1, 0.9, 0.5, 0.7])]}
    sel = parse_recipe({"grafts": [{"slot": "attn", "layers": {"select": "most_local", "count": 2},
                                    "operator": "mha"}]}).grafts[0].layers
    assert resolve_layers(sel, 4, analysis=analysis) == [1, 3]
    auto = parse_recipe({"grafts": [{"slot": "attn", "layers": {"select": "auto", "count": 2},
                                     "operator": "mha"}]}).grafts[0].layers
    assert resolve_layers(auto, 4, probe_losses={0: 0.3, 1: 0.1, 2: 0.2, 3: 0.9}) == [1, 2]
    with pytest.raises(ValueError, match="probe"):
        resolve_layers(auto, 4)


def test_command_line_layer_sets():
    assert layers_from_text("interleave", 8) == [1, 3, 5, 7]
    assert layers_from_text("interleave:0.75", 8) == [1, 2, 3, 5, 6, 7]
    assert layers_from_text("deepest:0.25", 8) == [6, 7]
    assert layers_from_text("1,3", 4) == [1, 3]
    assert layers_from_text("1:8:3", 8) == [1, 4, 7]
    assert set(selector_names(needing_nothing=True)) == {"all", "interleave", "deepest"}
    with pytest.raises(ValueError, match="layers='most_local'.*needs analysis"):
        layers_from_text("most_local", 8)
    with pytest.raises(ValueError, match="layers='half'"):
        layers_from_text("half", 8)
