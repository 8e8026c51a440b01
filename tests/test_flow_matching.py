"""Flow matching (rectified flow): the path, the timestep samplers, the Euler sampler against diffusers'
FlowMatchEulerDiscreteScheduler step by step, guidance, and the objective each family declares."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ditgraft.diffusion.flow_matching import FlowMatching, resolution_mu, shift_sigmas, time_shift
from ditgraft.diffusion.gaussian import GaussianDiffusion
from ditgraft.diffusion.samplers import SamplingConfig, sample
from ditgraft.graft.stage1 import noised_inputs
from ditgraft.models.dit import DiT
from ditgraft.models.families import family_of

diffusers = pytest.importorskip("diffusers")


def test_path_endpoints_and_velocity_target():
    fm = FlowMatching()
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(fm.q_sample(x0, torch.zeros(3), eps), x0)
    torch.testing.assert_close(fm.q_sample(x0, torch.ones(3), eps), eps)
    t = torch.tensor([0.1, 0.5, 0.9])
    x_t = fm.q_sample(x0, t, eps)
    torch.testing.assert_close(x_t, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps)
    torch.testing.assert_close(fm.model_t(t), t * 1000)
    # the oracle velocity has zero loss; another output does not
    oracle = lambda x, tm, y=None: eps - x0  # noqa: E731
    assert fm.training_losses(oracle, x0, t, noise=eps)["loss"].abs().max() == 0
    assert (fm.training_losses(lambda x, tm, y=None: x, x0, t, noise=eps)["loss"] > 0).all()


def test_timestep_samplers():
    x = torch.zeros(20_000, 1, 2, 2)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    u = FlowMatching(timestep_sampling="uniform").sample_t(x, g())
    assert 0 < u.min() and u.max() < 1 and abs(float(u.mean()) - 0.5) < 0.01
    ln = FlowMatching(logit_mean=0.5, logit_std=0.8).sample_t(x, g())
    z = torch.logit(ln.double())
    assert abs(float(z.mean()) - 0.5) < 0.02 and abs(float(z.std()) - 0.8) < 0.02
    # a static shift maps each draw through s t / (1 + (s - 1) t): same draws, shifted
    shifted = FlowMatching(logit_mean=0.5, logit_std=0.8, shift=3.0).sample_t(x, g())
    torch.testing.assert_close(shifted, 3 * ln / (1 + 2 * ln))
    assert float(shifted.mean()) > float(ln.mean())
    # the resolution-dependent shift: mu from the token count of the latent (patch size 2: 8x8 -> 16 tokens)
    dyn = FlowMatching(use_dynamic_shifting=True, patch_size=2, logit_mean=0.5, logit_std=0.8)
    mu = resolution_mu(16)
    torch.testing.assert_close(dyn.sample_t(torch.zeros(20_000, 1, 8, 8), g()), time_shift(ln, mu))
    with pytest.raises(ValueError, match="timestep_sampling='mode'"):
        FlowMatching(timestep_sampling="mode")
    with pytest.raises(ValueError, match="sampling_grid='karras'"):
        FlowMatching(sampling_grid="karras")


def test_resolution_mu_is_the_pipelines_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for n in (16, 256, 1024, 4096):
        assert math.isclose(resolution_mu(n), calculate_shift(n), rel_tol=1e-12)
        assert math.isclose(resolution_mu(n, 256, 4096, 0.5, 1.16), calculate_shift(n, 256, 4096, 0.5, 1.16),
                            rel_tol=1e-12)


SCHEDULES = [dict(shift=1.0), dict(shift=3.0), dict(shift=7.5),
             dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15),
             dict(use_dynamic_shifting=True, time_shift_type="linear", base_shift=0.5, max_shift=1.15)]


def _scheduler(kw):
    return diffusers.FlowMatchEulerDiscreteScheduler(**kw)


@pytest.mark.parametrize("kw", SCHEDULES)
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_sampling_sigmas_equal_diffusers_set_timesteps(kw, steps):
    fm = FlowMatching.from_scheduler_config(dict(_scheduler(kw).config), patch_size=2)
    seq = 64
    sched = _scheduler(kw)
    sched.set_timesteps(steps, mu=fm.mu(seq) if fm.use_dynamic_shifting else None)
    ours = fm.sampling_sigmas(steps, seq)
    assert torch.equal(ours, sched.sigmas)
    assert torch.equal(ours[:-1] * fm.num_train_timesteps, sched.timesteps)


@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("seq", [16, 1024, 4096])
def test_uniform_grid_equals_the_flux_pipelines_sigmas(steps, seq):
    """FluxPipeline passes sigmas 1, ..., 1/steps to set_timesteps with mu from the token count."""
    kw = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    fm = FlowMatching.from_scheduler_config(dict(_scheduler(kw).config), sampling_grid="uniform")
    sched = _scheduler(kw)
    sched.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=fm.mu(seq))
    ours = fm.sampling_sigmas(steps, seq)
    assert torch.equal(ours, sched.sigmas) and torch.equal(ours[:-1] * 1000, sched.timesteps)


@pytest.mark.parametrize("kw", SCHEDULES)
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_euler_sampler_matches_diffusers_step_by_step(kw, cfg_scale):
    """ditgraft's sample() with a flow objective against the scheduler's own loop (SD3 pipeline's guidance:
    uncond + s (cond - uncond)): the same model calls and the same latents after every step, bit for bit."""
    steps, B = 6, 2
    fm = FlowMatching.from_scheduler_config(dict(_scheduler(kw).config), patch_size=2)
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)) * 0.3

    def model(x, t, y):  # a smooth nonlinear "velocity" depending on x, t and the conditioning
        return torch.tanh(torch.einsum("oc,bchw->bohw", w, x)) * (t / 1000).view(-1, 1, 1, 1) + y.view(-1, 1, 1, 1)

    ours_calls, ref_calls = [], []

    def recording(store):
        def fn(x, t, y):
            store.append((x.clone(), t.clone()))
            return model(x, t, y)
        return fn

    y, null = torch.tensor([0.5, -0.25]), torch.zeros(2)
    g = torch.Generator().manual_seed(3)
    cfg = SamplingConfig(sampler="euler", steps=steps, cfg_scale=cfg_scale)
    out = sample(recording(ours_calls), y, (B, 4, 8, 8), cfg, generator=g, diffusion=fm, null_cond=null,
                 cfg_channels=4)

    sched = _scheduler(kw)
    sched.set_timesteps(steps, mu=fm.mu(16) if fm.use_dynamic_shifting else None)
    latents = torch.randn((B, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    fn = recording(ref_calls)
    for t in sched.timesteps:
        if cfg_scale > 1:
            v = fn(torch.cat([latents, latents]), t.expand(2 * B), torch.cat([null, y]))
            uncond, cond = v.chunk(2)
            v = uncond + cfg_scale * (cond - uncond)
        else:
            v = fn(latents, t.expand(B), y)
        latents = sched.step(v, t, latents).prev_sample
    assert len(ours_calls) == len(ref_calls) == steps
    for (xa, ta), (xb, tb) in zip(ours_calls, ref_calls):
        assert torch.equal(ta, tb)
        assert torch.equal(xa[:B], xb[:B])  # the latents entering each step
    assert torch.equal(out, latents)


def test_euler_recovers_a_point_mass_with_guidance():
    """For data at one point x*, the exact velocity is (x_t - x*) / t and Euler on the straight path is exact:
    every schedule lands on x*, with or without guidance (both branches agree)."""
    target = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    fm = FlowMatching(shift=3.0)

    def model(x, t, y):
        return (x - target) / (t / 1000).view(-1, 1, 1, 1)

    for cfg_scale in (1.0, 3.0):
        cfg = SamplingConfig(sampler="euler", steps=5, cfg_scale=cfg_scale)
        out = sample(model, torch.zeros(3), (3, 2, 4, 4), cfg, generator=torch.Generator().manual_seed(1),
                     diffusion=fm, null_cond=torch.ones(3), cfg_channels=2)
        torch.testing.assert_close(out, target.expand(3, -1, -1, -1), atol=1e-5, rtol=0)


def test_sampler_and_objective_must_agree():
    dit = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=4)
    with pytest.raises(ValueError, match="sampler='euler' does not sample a IDDPM model"):
        sample(dit, torch.tensor([0]), (1, 1, 8, 8), SamplingConfig(sampler="euler", steps=2))
    with pytest.raises(ValueError, match="sampler='ddim' does not sample a flow-matching model"):
        sample(lambda x, t, y: x, torch.tensor([0]), (1, 1, 8, 8), SamplingConfig(steps=2),
               diffusion=FlowMatching())
    with pytest.raises(ValueError, match="eta=0.5"):
        SamplingConfig(sampler="euler", eta=0.5)


def test_scheduler_config_options_outside_the_euler_sampler_are_refused():
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowMatching.from_scheduler_config({"shift": 3.0, "use_karras_sigmas": True})
    assert FlowMatching.from_scheduler_config({"shift": 3.0, "_class_name": "x"}).shift == 3.0


def test_iddpm_noising_is_unchanged():
    """Stage 1's noising through the objective draws exactly what the IDDPM code drew before (same generator
    stream), so DiT runs keep their numbers."""
    x0, y = torch.randn(6, 1, 4, 4), torch.arange(6)
    got = noised_inputs(x0, y, seed=5)
    diffusion = GaussianDiffusion.dit_default()
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (6,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.equal(got.t, t) and got.t.dtype == torch.long
    assert torch.equal(got.x_t, diffusion.q_sample(x0, t, noise))
    torch.manual_seed(9)
    a = diffusion.sample_t(x0)
    torch.manual_seed(9)
    assert torch.equal(a, torch.randint(0, 1000, (6,)))


def test_flow_noising_for_stage1():
    fm = FlowMatching(shift=3.0)
    x0 = torch.randn(5, 1, 4, 4)
    got = noised_inputs(x0, torch.arange(5), seed=2, objective=fm)
    g = torch.Generator().manual_seed(2)
    t = fm.sample_t(x0, g)
    noise = torch.randn(x0.shape, generator=g)
    assert got.t.dtype == torch.float32 and torch.equal(got.t, t * 1000)
    assert torch.equal(got.x_t, fm.q_sample(x0, t, noise))


def test_families_declare_their_objective():
    from diffusers_helpers import tiny_diffusers_dit, tiny_flux, tiny_pixart, tiny_sd3

    dit = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2, num_classes=4)
    for model, learn_sigma in ((dit, True), (tiny_diffusers_dit(depth=1), True), (tiny_pixart(depth=1), True)):
        obj = family_of(model).objective(model)
        assert isinstance(obj, GaussianDiffusion) and obj.learn_sigma == learn_sigma and obj.num_timesteps == 1000
        assert np.array_equal(obj.betas, GaussianDiffusion.dit_default().betas)
    sd3 = tiny_sd3()
    obj = family_of(sd3).objective(sd3)
    assert isinstance(obj, FlowMatching) and obj.shift == 3.0 and obj.timestep_sampling == "logit_normal"
    assert obj.patch_size == sd3.config.patch_size
    flux = tiny_flux()
    obj = family_of(flux).objective(flux)
    assert isinstance(obj, FlowMatching) and obj.use_dynamic_shifting and obj.sampling_grid == "uniform"
    assert obj.patch_size == 2  # FluxPipeline's 2 x 2 packing: image_seq_len = (H / 2) (W / 2)


def test_shift_helpers():
    t = np.linspace(0.01, 0.99, 7)
    np.testing.assert_allclose(shift_sigmas(t, 1.0), t)
    np.testing.assert_allclose(time_shift(t, 0.0), t)
    with pytest.raises(ValueError, match="time_shift_type='cubic'"):
        time_shift(t, 0.5, "cubic")
