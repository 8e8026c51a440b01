"""Recipe inheritance: ``base:`` names a bundled recipe or a path, whose fields this recipe's override (mappings
merge key by key, lists are replaced); the DiT-XL/2 family shares one base and resolves to what it was before."""
import json
import os

import pytest

from ditgraft.cli import main
from ditgraft.recipe import bundled_recipes, deep_merge, load_recipe, parse_recipe

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "dit_xl2_recipes_before_inheritance.json")


def test_dit_xl2_recipes_resolve_to_what_they_were():
    with open(FIXTURE) as f:
        before = json.load(f)
    assert len(before) == 14 and set(before) == {n for n in bundled_recipes() if n.startswith("dit_xl2_")}
    for name, data in before.items():
        assert load_recipe(name).to_dict() == parse_recipe(data).to_dict(), name


def test_base_recipes_are_not_listed_nor_runnable():
    assert "dit_xl2_base" not in bundled_recipes()
    with pytest.raises(ValueError, match="base recipe"):
        load_recipe("dit_xl2_base")


def test_deep_merge_merges_mappings_and_replaces_lists():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    merged = deep_merge(base, {"a": {"y": [3]}, "c": 2})
    assert merged == {"a": {"x": 1, "y": [3]}, "b": 1, "c": 2}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1}  # unchanged


def test_base_by_path_and_chain(tmp_path):
    (tmp_path / "common.yaml").write_text(
        "abstract: true\nstage1: {steps: 7, lr: 0.01}\ngrafts: [{slot: attn, layers: [1], operator: swa}]\n")
    (tmp_path / "mid.yaml").write_text("base: common.yaml\nstage1: {steps: 9}\n")
    (tmp_path / "leaf.yaml").write_text("base: mid.yaml\nname: leaf\n"
                                        "grafts: [{slot: attn, layers: [2, 3], operator: hyena_x}]\n")
    r = load_recipe(str(tmp_path / "leaf.yaml"))
    assert (r.name, r.stage1.steps, r.stage1.lr) == ("leaf", 9, 0.01)
    assert [(g.operator, g.layers) for g in r.grafts] == [("hyena_x", [2, 3])]  # lists are replaced, not merged
    assert load_recipe(str(tmp_path / "mid.yaml")).stage1.steps == 9  # abstract is not inherited
    # a bundled base works from a dict too
    r = parse_recipe({"base": "testbed_hyena_x_50", "stage2": {"steps": 200}})
    assert (r.stage2.steps, r.stage2.decay_steps, r.name) == (200, 110, "testbed_hyena_x_50")


def test_bad_bases_are_clear_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_recipe(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: nowhere\ngrafts: [{slot: attn, layers: [1], operator: swa}]\n")
    with pytest.raises(FileNotFoundError, match="base = 'nowhere'"):
        load_recipe(str(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("base: testbed_swa_50\nstage1: {stepz: 3}\n")
    with pytest.raises(ValueError, match="stage1.stepz = 3: unknown field"):
        load_recipe(str(tmp_path / "d.yaml"))


def test_recipes_command_lists_and_shows_resolved(capsys):
    assert main(["recipes"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert listed == bundled_recipes() and "dit_xl2_base" not in listed
    assert main(["recipes", "--show", "dit_xl2_swa_75"]) == 0
    out = capsys.readouterr().out
    assert "base:" not in out and "ema_decay: 0.9999" in out and "fraction: 0.75" in out and "operator: swa" in out
