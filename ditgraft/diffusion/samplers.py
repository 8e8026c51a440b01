"""The one sampling entry point: DDPM or DDIM over a (respaced) IDDPM process, or Euler over a flow-matching one
(the model's family says which objective it was trained with), with batched classifier-free guidance.

Guidance doubles the batch once per step ([x; x] with labels [y; null]) so the model runs one forward per step:
both branches in one batch. The loop keeps everything on the model's device and never waits for it inside the loop:
no ``.item()``, no Python branch on a tensor's value, the schedule tables copied to the device once
(``GaussianDiffusion``), and a stochastic sampler's per-step noise (drawn on the CPU generator, so samples do not
depend on the device) sent to a GPU by an asynchronous copy from pinned memory.

``compile=True`` calls the model through its family's compiled forward (``model_call(model, compiled=True)``:
torch.compile, one compilation per model structure and input shape in a process, reused by every later batch and
seed); everything else in the loop is the same code, so its samples equal the eager ones to float rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ditgraft.diffusion.flow_matching import FlowMatching
from ditgraft.diffusion.gaussian import GaussianDiffusion
from ditgraft.models.families import family_of, model_call
from ditgraft.models.families.base import cond_cat, cond_len, cond_to

SAMPLERS = ("ddpm", "ddim", "euler")
FLOW_SAMPLERS = ("euler",)  # the samplers of a flow-matching objective; the others are IDDPM's
DIFFUSION_SAMPLERS = tuple(s for s in SAMPLERS if s not in FLOW_SAMPLERS)  # IDDPM's (DiT's own)


@dataclass(frozen=True)
class SamplingConfig:
    sampler: str = "ddim"
    steps: int = 50
    cfg_scale: float = 1.5
    eta: float = 0.0
    clip_denoised: bool = False

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r} is not allowed; use one of {SAMPLERS}")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1")
        if not self.cfg_scale >= 1.0:  # also refuses NaN
            raise ValueError(f"cfg_scale={self.cfg_scale} must be a finite number >= 1 (1 = no guidance)")
        if self.cfg_scale == float("inf") or self.eta != self.eta:
            raise ValueError(f"cfg_scale={self.cfg_scale}, eta={self.eta} must be finite")
        if self.sampler in FLOW_SAMPLERS and self.eta:
            raise ValueError(f"eta={self.eta}: the {self.sampler} sampler is deterministic; use eta=0")


def default_sampler(model) -> str:
    """The sampler of the model's objective when none is named: Euler for a flow-matching family, DDIM for IDDPM."""
    return "euler" if isinstance(family_of(model).objective(model), FlowMatching) else "ddim"


def check_sampler(model, sampler: str, option: str = "sampler") -> None:
    """Refuse, before any sampling, a sampler that does not sample the model's objective (``option`` names the
    setting)."""
    flow = isinstance(family_of(model).objective(model), FlowMatching)
    if flow != (sampler in FLOW_SAMPLERS):
        allowed = FLOW_SAMPLERS if flow else DIFFUSION_SAMPLERS
        raise ValueError(f"{option}={sampler!r} does not sample the {family_of(model).name} family's "
                         f"{'flow-matching' if flow else 'IDDPM'} objective; allowed: {', '.join(allowed)}")


def guided_model(model, cfg_scale: float, cfg_channels: int):
    """Model fn ``fn(x, t, y)`` for [cond; uncond] batches: guides the first ``cfg_channels`` output channels of
    both halves.

    As upstream's forward_with_cfg, only the first half of ``x`` is used (duplicated), so the halves cannot drift
    apart when a stochastic sampler adds independent noise to each.
    """

    def fn(x, t, y):
        half = x[: len(x) // 2]
        out = model(torch.cat([half, half], dim=0), t, y)
        eps, rest = out[:, :cfg_channels], out[:, cfg_channels:]
        cond, uncond = eps.chunk(2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)

    return fn


@torch.no_grad()
def sample(model, labels, shape: tuple[int, ...], cfg: SamplingConfig = SamplingConfig(),
           generator: torch.Generator | None = None, diffusion: GaussianDiffusion | FlowMatching | None = None,
           null_class: int | None = None, cfg_channels: int | None = None, learn_sigma: bool = True,
           null_cond=None, compile: bool = False) -> torch.Tensor:
    """Draw samples x_0 of ``shape`` = (B, C, H, W) for conditioning ``labels`` (class labels [B], or a tuple
    such as caption embeddings and masks).

    A model of a known family is called through it (``ditgraft.models.families``); any other callable as
    ``model(x, t, y)``; it returns eps (and variance values when learn_sigma). ``compile``: call it through the
    family's compiled forward (see the module docstring; refused for a family that cannot be compiled and for a
    plain callable). Guidance mixes in ``null_cond``
    (default: the family's null conditioning, or labels ``null_class``). Noise comes from ``generator`` (CPU
    generator; tensors are moved to the conditioning's device), so results do not depend on the global RNG.

    ``diffusion`` is the process (default: the family's objective; DiT's IDDPM respaced to ``cfg.steps``): a
    flow-matching one (``FlowMatching``, e.g. the SD3 and Flux families') is sampled with the Euler sampler
    (``cfg.sampler = "euler"``; the model returns velocities), IDDPM with DDPM or DDIM.
    """
    try:
        family = family_of(model)
    except TypeError:
        family = None
    objective = diffusion if isinstance(diffusion, FlowMatching) else None
    if diffusion is None and family is not None:
        declared = family.objective(model)
        objective = declared if isinstance(declared, FlowMatching) else None
    if (objective is not None) != (cfg.sampler in FLOW_SAMPLERS):
        kind = "flow-matching" if objective is not None else "IDDPM"
        allowed = FLOW_SAMPLERS if objective is not None else tuple(x for x in SAMPLERS if x not in FLOW_SAMPLERS)
        raise ValueError(f"sampler={cfg.sampler!r} does not sample a {kind} model; use one of {allowed}")
    device = labels[0].device if isinstance(labels, (tuple, list)) else labels.device
    steps = f"ddim{cfg.steps}" if cfg.sampler == "ddim" else str(cfg.steps)
    if objective is None:
        diffusion = diffusion or GaussianDiffusion.dit_default(steps=steps, learn_sigma=learn_sigma)
    if cfg_channels is None:
        cfg_channels = family.cfg_channels(model) if family else getattr(model, "cfg_channels", shape[1])
    guided = cfg.cfg_scale > 1.0
    if compile and family is None:
        raise ValueError(f"compile=True needs a model of a known family; got {type(model).__name__} (call it "
                         "eagerly: compile=False)")
    x = to_device(torch.randn(shape, generator=generator), device)
    y = labels
    fn = model_call(model, compiled=compile) if family else model
    if guided:
        if null_class is None and family is None:
            null_class = getattr(model, "num_classes", None)
        if null_cond is None and null_class is not None:
            null_cond = torch.full_like(labels, null_class)
        if null_cond is None:
            if family is None:
                raise ValueError("cfg_scale > 1 needs null_class (the model's num_classes) or null_cond")
            null_cond = family.null_cond(model, labels)
        if cond_len(null_cond) != cond_len(labels):
            raise ValueError(f"null_cond has {cond_len(null_cond)} rows; the conditioning has {cond_len(labels)}")
        x = torch.cat([x, x], dim=0)
        y = cond_cat(labels, cond_to(null_cond, device))
        fn = guided_model(fn, cfg.cfg_scale, cfg_channels)
    if objective is not None:
        return euler_loop(objective, fn, x, y, cfg.steps, device)[: cond_len(labels)]
    stochastic = cfg.sampler == "ddpm" or cfg.eta > 0
    for i in reversed(range(diffusion.num_timesteps)):
        t = torch.full((x.shape[0],), i, device=device, dtype=torch.long)
        out = diffusion.p_mean_variance(fn, x, t, clip_denoised=cfg.clip_denoised, model_kwargs=dict(y=y))
        noise = to_device(torch.randn(x.shape, generator=generator), device) if stochastic else None
        if cfg.sampler == "ddpm":
            x = out["mean"] + (i > 0) * torch.exp(0.5 * out["log_variance"]) * noise
        else:
            x = ddim_step(diffusion, x, t, i, out, cfg.eta, noise)
    return x[: cond_len(labels)]


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on ``device``; to a GPU by an asynchronous copy from pinned memory, so the host does not wait
    for the work already queued there."""
    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def ddim_step(diffusion: GaussianDiffusion, x, t, i: int, out: dict, eta: float, noise) -> torch.Tensor:
    eps = diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])
    a_bar = float(diffusion.alphas_cumprod[i])
    a_prev = float(diffusion.alphas_cumprod_prev[i])
    sigma = eta * ((1 - a_prev) / (1 - a_bar)) ** 0.5 * (1 - a_bar / a_prev) ** 0.5
    mean = out["pred_xstart"] * a_prev**0.5 + (1 - a_prev - sigma**2) ** 0.5 * eps
    if i > 0 and sigma > 0:
        mean = mean + sigma * noise
    return mean


def euler_loop(objective: FlowMatching, fn, x: torch.Tensor, y, steps: int, device) -> torch.Tensor:
    """Euler from t = 1 to 0 over ``objective.sampling_sigmas``; ``fn(x, t, y)`` returns the velocity and is
    called with t * num_train_timesteps, as diffusers' flow-matching pipelines call their transformer."""
    sigmas = objective.sampling_sigmas(steps, objective.image_seq_len(x)).to(device)
    for i in range(steps):
        t = (sigmas[i] * objective.num_train_timesteps).expand(x.shape[0])
        x = objective.euler_step(x, fn(x, t, y), sigmas[i], sigmas[i + 1])
    return x
