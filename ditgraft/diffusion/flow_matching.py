"""Flow matching as SD3, Flux and Wan train and sample (rectified flow; Esser et al. 2024, "Scaling Rectified Flow
Transformers").

The path is x_t = (1 - t) x_0 + t eps for t in [0, 1] (t = 1 is pure noise), the model predicts the velocity
v = eps - x_0 and sees the timestep t * num_train_timesteps (0..1000, a float). Training draws t uniformly or
logit-normally (SD3's choice: t = sigmoid(N(logit_mean, logit_std))) and shifts it towards noise: a static
``shift`` s maps t -> s t / (1 + (s - 1) t) (SD3: s = 3.0), a resolution-dependent one (``use_dynamic_shifting``,
Flux) maps t -> e^mu / (e^mu + (1/t - 1)) with mu linear in the number of image tokens. Sampling is Euler on the
ODE dx/dt = v from t = 1 down to 0 over the shifted schedule that diffusers' ``FlowMatchEulerDiscreteScheduler``
uses (same field names), so its steps agree with that scheduler's ``set_timesteps`` / ``step``.

The public shape follows ``GaussianDiffusion``: ``sample_t`` (this process's t for a batch), ``q_sample``,
``model_t`` (what the model sees), ``training_losses`` ({"loss", "mse"} per sample); ``sampling_sigmas`` and
``euler_step`` are the sampler's parts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ditgraft.diffusion.gaussian import ModelFn, mean_flat

TIMESTEP_SAMPLING = ("uniform", "logit_normal")
TIME_SHIFT_TYPES = ("exponential", "linear")
SAMPLING_GRIDS = ("train_levels", "uniform")


def shift_sigmas(t, shift: float):
    """The static shift s t / (1 + (s - 1) t) (s > 1 spends more steps near noise); numpy arrays or tensors."""
    return shift * t / (1 + (shift - 1) * t)


def time_shift(t, mu: float, kind: str = "exponential"):
    """The resolution-dependent shift: e^mu / (e^mu + (1/t - 1)) ("exponential", Flux) or mu / (mu + (1/t - 1))
    ("linear")."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    if kind == "linear":
        return mu / (mu + (1 / t - 1))
    raise ValueError(f"time_shift_type={kind!r} is not allowed; use one of {TIME_SHIFT_TYPES}")


def resolution_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                  max_shift: float = 1.15) -> float:
    """mu of the dynamic shift: linear in the image token count, base_shift at base_seq_len, max_shift at
    max_seq_len (as the Flux and SD3 pipelines compute it)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


@dataclass(frozen=True)
class FlowMatching:
    """Rectified-flow objective and Euler sampler (velocity prediction, no learned variance).

    The scheduler fields keep diffusers' names (``num_train_timesteps``, ``shift``, ``use_dynamic_shifting``,
    ``base_shift``, ``max_shift``, ``base_image_seq_len``, ``max_image_seq_len``, ``time_shift_type``), so a
    model's ``scheduler_config.json`` builds it (``from_scheduler_config``). ``patch_size`` turns a latent's
    height and width into the image token count for the dynamic shift.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    patch_size: int = 1
    sampling_grid: str = "train_levels"

    learn_sigma = False
    name = "flow_matching"

    def __post_init__(self):
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling={self.timestep_sampling!r} is not allowed; use one of "
                             f"{TIMESTEP_SAMPLING}")
        if self.sampling_grid not in SAMPLING_GRIDS:
            raise ValueError(f"sampling_grid={self.sampling_grid!r} is not allowed; use one of {SAMPLING_GRIDS}")
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type={self.time_shift_type!r} is not allowed; use one of "
                             f"{TIME_SHIFT_TYPES}")
        if not (self.shift > 0 and math.isfinite(self.shift)):
            raise ValueError(f"shift={self.shift} must be a finite number > 0")
        if not (self.logit_std > 0 and math.isfinite(self.logit_std) and math.isfinite(self.logit_mean)):
            raise ValueError(f"logit_mean={self.logit_mean}, logit_std={self.logit_std}: finite, logit_std > 0")
        for name in ("num_train_timesteps", "patch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    @classmethod
    def from_scheduler_config(cls, config: dict, **fields) -> FlowMatching:
        """From a ``FlowMatchEulerDiscreteScheduler`` config (or a flow-prediction ``UniPCMultistepScheduler``'s:
        its ``flow_shift`` is the shift; unknown keys ignored), over ``fields`` (training fields such as
        ``timestep_sampling`` and ``patch_size``, and defaults for what the config does not set)."""
        if config.get("prediction_type") not in (None, "flow_prediction"):
            raise ValueError(f"scheduler config prediction_type={config['prediction_type']!r} is not flow matching")
        for key in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                    "invert_sigmas", "stochastic_sampling"):
            if config.get(key):
                raise ValueError(f"scheduler config {key}={config[key]!r} is not supported by ditgraft's Euler "
                                 "sampler; supported: the (dynamic) shift")
        names = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
                 "base_image_seq_len", "max_image_seq_len", "time_shift_type")
        given = {k: config[k] for k in names if config.get(k) is not None}
        if "shift" not in given and config.get("flow_shift") is not None:
            given["shift"] = config["flow_shift"]
        return cls(**{**fields, **given})

    # ---- the shift ----------------------------------------------------------------------------------------------
    def image_seq_len(self, x: torch.Tensor) -> int:
        return (x.shape[-2] // self.patch_size) * (x.shape[-1] // self.patch_size)

    def mu(self, image_seq_len: int) -> float:
        return resolution_mu(image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift,
                             self.max_shift)

    def shifted(self, t, image_seq_len: int | None = None):
        """``t`` under this objective's shift (static, or dynamic for ``image_seq_len`` tokens)."""
        if not self.use_dynamic_shifting:
            return shift_sigmas(t, self.shift)
        if image_seq_len is None:
            raise ValueError("use_dynamic_shifting needs the image token count (image_seq_len)")
        return time_shift(t, self.mu(image_seq_len), self.time_shift_type)

    # ---- forward process and training ---------------------------------------------------------------------------
    def sample_t(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One t in (0, 1) per sample of ``x0`` (float32, on x0's device), from ``generator`` (its device) or the
        global RNG: uniform or logit-normal, then shifted."""
        n, device = len(x0), x0.device if generator is None else generator.device
        if self.timestep_sampling == "uniform":
            u = torch.rand(n, generator=generator, device=device)
        else:
            u = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=generator, device=device))
        return self.shifted(u, self.image_seq_len(x0)).to(x0.device)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        noise = torch.randn_like(x_start) if noise is None else noise
        t = t.to(x_start.dtype).reshape(-1, *([1] * (x_start.ndim - 1)))
        return (1 - t) * x_start + t * noise

    def model_t(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps as the model sees them: t * num_train_timesteps (float)."""
        return t * self.num_train_timesteps

    def velocity(self, x_start: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The regression target d x_t / d t = eps - x_0."""
        return noise - x_start

    def training_losses(self, model: ModelFn, x_start: torch.Tensor, t: torch.Tensor,
                        model_kwargs: dict | None = None, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per sample {"loss", "mse"}: MSE between the model output and the velocity eps - x_0 (unweighted, as the
        SD3 and Flux finetuning scripts use with logit-normal t)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        out = model(x_t, self.model_t(t), **(model_kwargs or {}))
        mse = mean_flat((out[:, :x_start.shape[1]] - self.velocity(x_start, noise)) ** 2)
        return {"mse": mse, "loss": mse}

    # ---- sampling -----------------------------------------------------------------------------------------------
    def sampling_sigmas(self, steps: int, image_seq_len: int | None = None) -> torch.Tensor:
        """The t of each Euler step from noise to data, float32, ``steps + 1`` values ending in 0, as
        ``FlowMatchEulerDiscreteScheduler.set_timesteps`` builds them: ``sampling_grid="train_levels"`` (SD3's
        pipeline) takes an even grid from the training schedule's largest to its smallest t (num_train_timesteps
        levels; the smallest one shifted where the shift is static), ``"uniform"`` (Flux's pipeline passes these
        sigmas) the float32 grid 1, ..., 1/steps; then the grid is shifted."""
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        if self.sampling_grid == "uniform":
            grid = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
            sigmas = torch.from_numpy(np.asarray(self.shifted(grid, image_seq_len))).to(torch.float32)
            return torch.cat([sigmas, torch.zeros(1)])
        big_t = self.num_train_timesteps
        ends = torch.tensor([float(big_t), 1.0]) / big_t  # the training levels' ends, in float32
        if not self.use_dynamic_shifting:
            ends = shift_sigmas(ends, self.shift)
        hi, lo = ends.tolist()
        grid = np.linspace(hi * big_t, lo * big_t, steps) / big_t
        sigmas = torch.from_numpy(np.asarray(self.shifted(grid, image_seq_len))).to(torch.float32)
        return torch.cat([sigmas, torch.zeros(1)])

    @staticmethod
    def euler_step(x: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """x_{t_next} = x_t + (t_next - t) v, computed in float32 and returned in the velocity's dtype."""
        return (x.to(torch.float32) + (t_next - t) * velocity).to(velocity.dtype)
