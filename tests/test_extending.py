"""Adding an operator is one class registered with ``@register``; adding a layer selector is one function registered
with ``@selector``. Both are added here at run time and go through recipe parsing, surgery and a stage-1 step.
Adding a model family is one ``Family`` in the family registry plus its tiny model in tests/family_helpers.py: a toy
family added here at run time passes the family contract tests unchanged."""
import json

import pytest
import torch
from torch import nn

import ditgraft.layers as layers
import ditgraft.models.families as families
import ditgraft.operators.registry as registry
from ditgraft.layers import Selection, selector
from ditgraft.graft.stage1 import run_stage1
from ditgraft.graft.surgery import graft_model, resolve_grafts
from ditgraft.models.families import Family, ModelDims, family_names
from ditgraft.operators import operator_names
from ditgraft.operators.attention import MHA
from ditgraft.operators.mlp import MLP
from ditgraft.operators.registry import register
from ditgraft.recipe import parse_recipe
import family_helpers
from helpers import randomize_weights, tiny_dit


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
    assert "toy" not in family_names() and "toy" not in family_helpers.TINY_FAMILIES
    with pytest.raises(ValueError, match="'first_and_last' is not a selector"):
        parse_recipe({"grafts": [{"slot": "attn", "layers": "first_and_last", "operator": "mha"}]})


def test_a_selector_needing_an_unknown_input_is_refused():
    with pytest.raises(ValueError, match="needs=\\['weather'\\] is not allowed"):
        selector("bad", needs=("weather",))(lambda ctx: [0])


# ----------------------------------------------------------------------------------------------------------------------
# A toy model family: a patch transformer whose blocks call their token mixer ``mixer`` and channel mixer ``channel``.
# ----------------------------------------------------------------------------------------------------------------------
class ToyLayer(nn.Module):
    def __init__(self, dim: int, heads: int, grid: tuple[int, int]):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mixer, self.channel = MHA(dim, heads, grid), MLP(dim, ratio=2)

    def forward(self, h):
        h = h + self.mixer(self.norm1(h))
        return h + self.channel(self.norm2(h))


class ToyTransformer(nn.Module):
    def __init__(self, size: int = 8, patch: int = 2, channels: int = 3, dim: int = 16, heads: int = 2,
                 depth: int = 3, classes: int = 4):
        super().__init__()
        self.settings = dict(size=size, patch=patch, channels=channels, dim=dim, heads=heads, depth=depth,
                             classes=classes)
        self.grid = (size // patch, size // patch)
        self.embed = nn.Linear(channels * patch * patch, dim)
        self.time = nn.Linear(1, dim)
        self.label = nn.Embedding(classes + 1, dim)  # the last row is the null class
        self.layers = nn.ModuleList(ToyLayer(dim, heads, self.grid) for _ in range(depth))
        self.out = nn.Linear(dim, channels * patch * patch)

    def forward(self, x, t, y):
        p, (gh, gw) = self.settings["patch"], self.grid
        B, C = x.shape[:2]
        tokens = x.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * p * p)
        h = self.embed(tokens) + self.time(t[:, None].float() / 1000)[:, None] + self.label(y)[:, None]
        for layer in self.layers:
            h = layer(h)
        out = self.out(h).reshape(B, gh, gw, C, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(B, C, gh * p, gw * p)


class ToyFamily(Family):
    name = "toy"

    def matches(self, model):
        return isinstance(model, ToyTransformer)

    def dims(self, model):
        s = model.settings
        return ModelDims(s["depth"], s["dim"], s["heads"], model.grid)

    def learn_sigma(self, model):
        return False

    def in_channels(self, model):
        return model.settings["channels"]

    def patch_size(self, model):
        return model.settings["patch"]

    def slot_parent(self, model, layer):
        return model.layers[layer]

    def slot_attr(self, slot):
        return {"attn": "mixer", "mlp": "channel"}[slot]

    def forward(self, model, x, t, cond):
        return model(x, t, cond)

    def null_cond(self, model, cond):
        return torch.full_like(cond, model.settings["classes"])

    def example_cond(self, model, batch, device):
        return torch.randint(0, model.settings["classes"], (batch,), device=device)

    def config(self, model):
        return dict(model.settings)

    def build(self, config):
        return ToyTransformer(**config)


def test_a_toy_family_passes_the_family_contract(monkeypatch, tmp_path):
    import test_family_contract as contract

    monkeypatch.setitem(families._FAMILIES, "toy", ToyFamily())
    monkeypatch.setitem(family_helpers.TINY_FAMILIES, "toy", family_helpers.TinyFamily(
        build=lambda depth, seed: randomize_weights(ToyTransformer(depth=depth), 0.2, seed).eval(),
        cond=lambda n, seed: torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(seed))))
    assert "toy" in family_names()
    contract.test_family_recognises_and_describes_its_model("toy")
    contract.test_every_layer_has_both_slots_and_their_operator_view_computes_the_slot("toy")
    contract.test_a_graft_survives_save_and_load("toy", tmp_path)
