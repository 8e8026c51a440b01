"""The contract every registered model family keeps, checked for each name in the family registry on the tiny model
that tests/family_helpers.py declares for it: the family recognises and describes its model, finds both slots in
every layer (and its operator view of each slot computes what the slot computes inside the model), calls the model
as its source library does, a graft into one slot survives save_grafted / load_grafted unchanged, and protocol
sampling, the locality analysis and restructuring work where the family declares them (``Family.supports``) and are
refused in one line naming the family and the feature where it does not."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ditgraft.graft.surgery import ResolvedGraft, graft_model, load_grafted, save_grafted
from ditgraft.models.families import family_names, family_of, get_family
from ditgraft.operators import get_spec
from family_helpers import TINY_FAMILIES

NAMES = family_names()
DEPTH = 3


def tiny(name: str):
    if name not in TINY_FAMILIES:
        pytest.fail(f"family {name!r} has no tiny model: add a TinyFamily entry for it to TINY_FAMILIES in "
                    "tests/family_helpers.py")
    for package in TINY_FAMILIES[name].needs:
        pytest.importorskip(package)
    return TINY_FAMILIES[name]


def inputs(name: str, model, n: int = 2, seed: int = 0):
    """(x_t, t, cond) of the model's sample shape."""
    family = get_family(name)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(family.sample_shape(model, n), generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return x, t, tiny(name).cond(n, seed + 1)


@pytest.mark.parametrize("name", NAMES)
def test_family_recognises_and_describes_its_model(name):
    model = tiny(name).build(depth=DEPTH, seed=0)
    family = family_of(model)
    assert family.name == name
    dims = family.dims(model)
    assert dims.depth == DEPTH and dims.dim % dims.heads == 0
    x, t, cond = inputs(name, model)
    with torch.no_grad():
        out = family.forward(model, x, t, cond)
    channels = family.in_channels(model) * (2 if family.learn_sigma(model) else 1)
    assert out.shape == (x.shape[0], channels, *x.shape[2:]) and torch.isfinite(out).all()
    rebuilt = family.build(family.config(model))  # the saved config rebuilds the same architecture
    assert type(rebuilt) is type(model)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", NAMES)
def test_every_layer_has_both_slots_and_their_operator_view_computes_the_slot(name):
    """Each slot's input and output inside one model forward: the family's operator view of the slot (what
    ``init: teacher`` starts from), called by the operator contract ``op(x, grid)``, gives that output."""
    model = tiny(name).build(depth=DEPTH, seed=0)
    family = family_of(model)
    grid = family.dims(model).grid
    slots = TINY_FAMILIES[name].plain_slots
    seen, handles = {}, []
    for layer in range(DEPTH):
        for slot in slots:
            module = family.get_slot(model, layer, slot)
            assert isinstance(module, torch.nn.Module), (layer, slot)

            def hook(m, args, kwargs, out, key=(layer, slot)):
                x = args[0] if args else kwargs["hidden_states"]
                seen[key] = (x, out[0] if isinstance(out, tuple) else out)

            handles.append(module.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        family.forward(model, *inputs(name, model))
        for h in handles:
            h.remove()
        assert set(seen) == {(layer, slot) for layer in range(DEPTH) for slot in slots}  # every slot runs once
        for (layer, slot), (x, out) in seen.items():
            op = family.teacher_operator(model, layer, slot)
            torch.testing.assert_close(op(x, grid), out, rtol=1e-5, atol=1e-6, msg=lambda m: f"{layer} {slot}: {m}")


SOURCED = [n for n in NAMES if n in TINY_FAMILIES and TINY_FAMILIES[n].source_forward is not None]


@pytest.mark.parametrize("name", SOURCED)
def test_forward_is_the_source_librarys_call(name):
    model = tiny(name).build(depth=DEPTH, seed=0)
    x, t, cond = inputs(name, model)
    with torch.no_grad():
        torch.testing.assert_close(family_of(model).forward(model, x, t, cond),
                                   tiny(name).source_forward(model, x, t, cond), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_a_graft_survives_save_and_load(name, tmp_path):
    teacher = tiny(name).build(depth=DEPTH, seed=0)
    family = family_of(teacher)
    slot, operator, options = TINY_FAMILIES[name].graft
    grafts = [ResolvedGraft(slot, 1, operator, dict(options))]
    student = graft_model(teacher, grafts, seed=0)
    x, t, cond = inputs(name, teacher)
    with torch.no_grad():
        expected = family.forward(student, x, t, cond)
        assert not torch.allclose(expected, family.forward(teacher, x, t, cond))  # the graft changed the function
    path = str(tmp_path / "student.safetensors")
    save_grafted(path, student, grafts, None)
    loaded, meta = load_grafted(path)
    assert type(loaded) is type(teacher) and meta["family"] == name
    assert type(family.get_slot(loaded, 1, slot)) is get_spec(operator).cls
    assert type(family.get_slot(loaded, 0, slot)) is type(family.get_slot(teacher, 0, slot))
    with torch.no_grad():
        torch.testing.assert_close(family.forward(loaded.eval(), x, t, cond), expected, rtol=0, atol=0)


def _protocol_captions(name: str, family):
    """The caption set of a caption-conditioned family's protocol samples (None for class labels)."""
    return tiny(name).cond(4, 1) if family.conditioning == "caption" else None


@pytest.mark.parametrize("name", NAMES)
def test_protocol_sampling_where_supported(name):
    from ditgraft.diffusion.samplers import SamplingConfig, default_sampler
    from ditgraft.eval.sampling import generate
    from ditgraft.models.families.base import FEATURES

    model = tiny(name).build(depth=DEPTH, seed=0)
    family = family_of(model)
    assert family.supports <= set(FEATURES) and family.conditioning in ("class", "caption")
    cfg = SamplingConfig(sampler=default_sampler(model), steps=1, cfg_scale=1.0)  # the objective's sampler
    captions = _protocol_captions(name, family)
    if "sample" not in family.supports:
        with pytest.raises(ValueError, match=f"the {name} family does not support sample"):
            generate(model, 3, cfg, batch_size=2, raw=True, captions=captions)
        return
    x, labels = generate(model, 3, cfg, seed=1, batch_size=2, raw=True, captions=captions)
    assert x.shape == (3, *family.sample_shape(model, 1)[1:]) and np.isfinite(x).all() and len(labels) == 3
    part, _ = generate(model, 3, cfg, seed=1, batch_size=2, raw=True, captions=captions, rank=1, world=2)
    np.testing.assert_array_equal(part, x[2:])  # batch b's samples do not depend on how the batches are split


@pytest.mark.parametrize("name", NAMES)
def test_compiled_sampling_refused_where_not_supported(name):
    """A family without "compile" refuses compiled sampling in one line before any work; the families that declare
    it compare compiled and eager samples in tests/test_compiled_sampling.py."""
    from ditgraft.models.families import model_call

    model = tiny(name).build(depth=DEPTH, seed=0)
    family = family_of(model)
    if "compile" in family.supports:
        assert name == "dit", f"family {name!r} declares compile: compare its samples in test_compiled_sampling.py"
        return
    with pytest.raises(ValueError, match=f"the {name} family does not support compile"):
        model_call(model, compiled=True)


@pytest.mark.parametrize("name", NAMES)
def test_analysis_where_supported(name):
    from ditgraft.analysis.locality import analyze_model

    model = tiny(name).build(depth=DEPTH, seed=0)
    family = family_of(model)
    kw = dict(num_samples=2, steps=1, cfg_scale=1.0, batch_size=2, captions=_protocol_captions(name, family))
    if "analysis" not in family.supports:
        with pytest.raises(ValueError, match=f"the {name} family does not support analysis"):
            analyze_model(model, **kw)
        return
    res = analyze_model(model, **kw)
    assert [row["layer"] for row in res["layers"]] == list(range(DEPTH))
    assert all(row["activations"]["attn"] and row["activations"]["mlp"] for row in res["layers"])


@pytest.mark.parametrize("name", NAMES)
def test_restructure_where_supported(name):
    from ditgraft.graft.restructure import resolve_restructure, restructure

    model = tiny(name).build(depth=DEPTH, seed=0)
    family = family_of(model)
    spec = resolve_restructure({"parallel_pairs": [[0, 1]]}, DEPTH)
    if "restructure" not in family.supports:
        with pytest.raises(ValueError, match=f"the {name} family does not support restructure"):
            restructure(model, spec)
        assert len(family.blocks(model)) == DEPTH  # refused before any change
        return
    restructure(model, spec)
    assert len(family.blocks(model)) == DEPTH - 1
