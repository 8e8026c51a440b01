"""Adding an operator is one class registered with ``@register``; adding a layer selector is one function registered
with ``@selector``. Both are added here at run time and go through recipe parsing, surgery and a stage-1 step."""
import json

import pytest
import torch
from torch import nn

import ditgraft.graft.layers as layers
import ditgraft.operators.registry as registry
from ditgraft.graft.layers import Selection, selector
from ditgraft.graft.stage1 import run_stage1
from ditgraft.graft.surgery import graft_model, resolve_grafts
from ditgraft.operators import operator_names
from ditgraft.operators.registry import register
from ditgraft.recipe import parse_recipe
from helpers import tiny_dit


@pytest.fixture
def toys(monkeypatch):
    """A toy token mixer and a toy selector, registered for one test (the registries are restored afterwards)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(layers, "_SELECTORS", dict(layers._SELECTORS))

    @register("toy_shift", slot="attn", description="mix each token with its predecessor")
    class ToyShift(nn.Module):
        def __init__(self, dim: int, heads: int, grid: tuple[int, int] = (0, 0), mix: float = 0.5):
            super().__init__()
            self.proj, self.mix = nn.Linear(dim, dim), mix

        def forward(self, x: torch.Tensor, grid=None) -> torch.Tensor:
            return self.proj(x + self.mix * torch.roll(x, 1, dims=1))

        @staticmethod
        def flops(dim: int, heads: int, grid: tuple[int, int], **_) -> int:
            return 2 * grid[0] * grid[1] * dim * dim

    @selector("first_and_last")
    def first_and_last(ctx: Selection) -> list[int]:
        """the first and the last block"""
        return [0, ctx.depth - 1]

    return ToyShift


def test_a_toy_operator_and_selector_go_through_recipe_surgery_and_stage1(toys, tmp_path):
    assert "toy_shift" in operator_names("attn")
    recipe = parse_recipe({"grafts": [{"slot": "attn", "layers": "first_and_last", "operator": "toy_shift",
                                       "options": {"mix": 0.25}}],
                           "stage1": {"samples": 8, "val_samples": 4, "steps": 1, "batch_size": 4, "eval_every": 1}})
    teacher = tiny_dit(depth=3)
    grafts = resolve_grafts(recipe, depth=3)
    assert [(g.layer, g.operator, g.loss) for g in grafts] == [(0, "toy_shift", "l1"), (2, "toy_shift", "l1")]
    student = graft_model(teacher, grafts, seed=0)
    assert [type(b.attn) for b in student.blocks] == [toys, type(teacher.blocks[1].attn), toys]
    assert student.blocks[0].attn.mix == 0.25

    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 1, 16, 16, generator=g).clamp(-1, 1)
    y = torch.randint(0, 10, (12,), generator=g)
    result = run_stage1(teacher, grafts, recipe.stage1, x[:8], y[:8], x[8:], y[8:], str(tmp_path), seed=0,
                        device="cpu", progress=False, log=lambda *_: None)
    assert {s["operator"] for s in result["operators"].values()} == {"toy_shift"}
    assert all(s["val_mse"] > 0 for s in result["operators"].values())
    json.dumps(result["operators"])


def test_toys_do_not_outlive_their_test():
    assert "toy_shift" not in operator_names() and "first_and_last" not in layers.selector_names()
    with pytest.raises(ValueError, match="'first_and_last' is not a selector"):
        parse_recipe({"grafts": [{"slot": "attn", "layers": "first_and_last", "operator": "mha"}]})


def test_a_selector_needing_an_unknown_input_is_refused():
    with pytest.raises(ValueError, match="needs=\\['weather'\\] is not allowed"):
        selector("bad", needs=("weather",))(lambda ctx: [0])
