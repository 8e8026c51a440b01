"""Recipes: validation errors name field, value and what is allowed."""
import pytest

from ditgraft.recipe import bundled_recipes, load_recipe, parse_recipe

BASE = {"grafts": [{"slot": "attn", "layers": "interleave", "operator": "hyena_x"}]}


def _err(data) -> str:
    with pytest.raises(ValueError) as info:
        parse_recipe(data)
    return str(info.value)


def test_defaults_follow_paper_loss_rule():
    r = parse_recipe({"grafts": [{"slot": "attn", "layers": [1], "operator": "swa"},
                                 {"slot": "mlp", "layers": [2], "operator": "mlp", "options": {"ratio": 3}}]})
    assert [g.loss for g in r.grafts] == ["l1", "l2"]


@pytest.mark.parametrize("data, needle", [
    ({"grafts": [{"slot": "attn", "layers": [1], "operator": "hyena_z"}]}, "grafts.0.operator = 'hyena_z'"),
    ({"grafts": [{"slot": "mlp", "layers": [1], "operator": "hyena_x"}]}, "replaces 'attn' slots"),
    ({"grafts": [{"slot": "norm", "layers": [1], "operator": "mlp"}]}, "grafts.0.slot = 'norm'"),
    ({"grafts": [{"slot": "attn", "layers": "odd", "operator": "mha"}]}, "'odd' is not a selector"),
    ({**BASE, "stage1": {"steps": 0}}, "stage1.steps = 0"),
    ({**BASE, "stage2": {"lr": -1}}, "stage2.lr = -1"),
    ({**BASE, "stage1": {"lr_typo": 1}}, "stage1.lr_typo = 1: unknown field"),
    ({**BASE, "stage1": {"loss": "l3"}}, "stage1.loss"),
    ({"grafts": [{"slot": "attn", "layers": [1], "operator": "swa", "loss": "l3"}]}, "grafts.0.loss = 'l3'"),
    ({"grafts": [{"slot": "attn", "layers": [1], "operator": "swa", "loss": "huber", "huber_delta": 0}]},
     "grafts.0.huber_delta = 0"),
    ({"grafts": [{"slot": "attn", "layers": {"select": "nearest"}, "operator": "swa"}]},
     "grafts.0.layers.LayerSelector.select = 'nearest': 'nearest' is not a selector"),
    ({"grafts": []}, "grafts = []"),
    ({**BASE, "stage2": {"steps": 100, "warmup_steps": 10, "decay_steps": 91}},
     "decay_steps = 91 must be in [0, steps - warmup_steps] = [0, 90]"),
])
def test_errors_name_field_and_value(data, needle):
    assert needle in _err(data)


def test_bundled_recipes_all_validate():
    names = bundled_recipes()
    assert "testbed_hyena_x_50" in names
    for name in names:
        load_recipe(name)


def test_missing_recipe_file():
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_recipe("/nonexistent/recipe.yaml")


def test_stage2_decay_reaches_the_training_loop():
    r = parse_recipe({**BASE, "stage2": {"steps": 100, "lr": 1e-4, "warmup_steps": 10, "decay_steps": 90}})
    loop = r.stage2.loop_config(seed=0, progress=False)
    assert loop.decay_steps == 90
    assert loop.lr_at(9) == pytest.approx(1e-4) and loop.lr_at(99) == pytest.approx(1e-4 / 91)


def test_eval_compile_is_opt_in_and_refused_before_any_work_where_unsupported():
    """eval.compile defaults to false and is left out of the recorded form then (run directories recorded before
    the field keep matching); a teacher whose family cannot be compiled is refused at the start of a run."""
    from family_helpers import TINY_FAMILIES
    from helpers import tiny_dit
    from ditgraft.graft.pipeline import check_supported

    r = parse_recipe(BASE)
    assert r.eval.compile is False and "compile" not in r.to_dict()["eval"]
    on = parse_recipe({**BASE, "eval": {"compile": True}})
    assert on.to_dict()["eval"]["compile"] is True and parse_recipe(on.to_dict()) == on
    assert parse_recipe(r.to_dict()) == r
    check_supported(on, tiny_dit())
    pytest.importorskip("diffusers")
    with pytest.raises(ValueError, match="eval.compile: the diffusers_dit family does not support compile"):
        check_supported(on, TINY_FAMILIES["diffusers_dit"].build(depth=1, seed=0))
