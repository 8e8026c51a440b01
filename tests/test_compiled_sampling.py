"""Compiled sampling (``compile=True``): the family's compiled forward samples what the eager path samples (to float
rounding), it is compiled once per process and reused by every later batch, seed and model of the same structure,
and the sampling loop never turns a tensor into a Python value (each such conversion waits for the device on a GPU).

The tests that compile use one tiny structure and batch (``helpers.compile_dit``, ``COMPILE_BATCH``): a process
compiles it once, about 30 s on a 2-core CPU with a cold inductor cache (a few seconds with a warm one); marked
slow."""
import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from helpers import COMPILE_BATCH, compile_dit
from ditgraft.diffusion.samplers import SamplingConfig, sample
from ditgraft.eval.sampling import generate

CONVERSIONS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


def forbid_host_values(mp: pytest.MonkeyPatch) -> None:
    """Every Tensor -> Python conversion (``.item()``, ``bool(t)`` as in ``if t:``, ``.tolist()``, ``.cpu()``, ...)
    raises while ``mp`` is active."""
    def refuse(name):
        def conversion(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} called while sampling: a host synchronisation on a GPU")
        return conversion

    for name in CONVERSIONS:
        mp.setattr(torch.Tensor, name, refuse(name))


def _labels():
    return torch.arange(COMPILE_BATCH) % 10


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
@pytest.mark.parametrize("sampler,atol", [("ddim", 1e-5), ("ddpm", 1e-4)])
def test_compiled_samples_equal_eager_ones(sampler, atol):
    """Guided protocol batches (both branches in one batch), deterministic DDIM and stochastic DDPM: the same
    samples within float tolerance, and the compiled path really ran compiled code."""
    model = compile_dit(seed=0)
    cfg = SamplingConfig(sampler=sampler, steps=3, cfg_scale=1.5, clip_denoised=True)
    kw = dict(seed=1, batch_size=COMPILE_BATCH, raw=True)
    eager, labels = generate(model, COMPILE_BATCH, cfg, **kw)
    compiled, compiled_labels = generate(model, COMPILE_BATCH, cfg, compile=True, **kw)
    assert _graphs() >= 1  # dynamo compiled a graph (it did not fall back to eager code)
    np.testing.assert_array_equal(labels, compiled_labels)
    np.testing.assert_allclose(compiled, eager, atol=atol, rtol=0)
    unguided, _ = generate(model, COMPILE_BATCH, SamplingConfig(sampler=sampler, steps=3, cfg_scale=1.0,
                                                                clip_denoised=True), **kw)
    assert np.abs(unguided - eager).max() > 100 * atol  # the tolerance is far below what guidance changes


@pytest.mark.slow
def test_compiled_once_per_process_and_no_host_values_in_the_loop():
    """After one compiled batch (the compile: its tracing may read values), other seeds and another model of the
    same structure reuse the compiled forward (no new graph); neither path converts a tensor to a Python value
    inside the loop (DDPM, DDIM with eta > 0: noise every step)."""
    cfg = SamplingConfig(sampler="ddpm", steps=3, cfg_scale=1.5, clip_denoised=True)
    shape = (COMPILE_BATCH, 1, 32, 32)
    model = compile_dit(seed=0)
    sample(model, _labels(), shape, cfg, generator=torch.Generator().manual_seed(0), compile=True)
    before = _graphs()
    with pytest.MonkeyPatch.context() as mp:
        forbid_host_values(mp)
        for seed, m in ((1, model), (2, compile_dit(seed=5))):
            for c in (cfg, SamplingConfig(sampler="ddim", steps=3, cfg_scale=1.5, eta=0.5)):
                for compiled in (True, False):
                    g = torch.Generator().manual_seed(seed)
                    assert sample(m, _labels(), shape, c, generator=g, compile=compiled).shape == shape
    assert _graphs() == before


def test_compile_is_refused_for_a_plain_callable():
    def fn(x, t, y):
        return torch.cat([x, x], dim=1)

    with pytest.raises(ValueError, match="compile=True needs a model of a known family"):
        sample(fn, torch.zeros(2, dtype=torch.long), (2, 1, 4, 4), SamplingConfig(steps=1, cfg_scale=1.0),
               compile=True)
