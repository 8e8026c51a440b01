"""Gaussian diffusion as DiT uses it (IDDPM, Nichol & Dhariwal 2021).

Linear beta schedule over 1000 steps, epsilon prediction, learned-range variance, loss = MSE(eps) + VLB (the VLB
term sees a detached mean so it only trains the variance), timestep respacing for faster sampling.
All schedule arithmetic is float64 numpy, as upstream; tensors are gathered per timestep from copies of the tables
kept on each device they are asked for (the first gather on a device copies the table there, later ones, every
sampling step included, only index it: no host-device copy inside a sampling loop).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

ModelFn = Callable[..., torch.Tensor]


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """DiT/IDDPM linear schedule, 1e-4..0.02 scaled so other step counts keep the same shape."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | list[int] | int) -> list[int]:
    """Which of the original steps to keep (IDDPM): "250", [10, 15, 20] per section, or "ddimN" (even stride)."""
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"steps={section_counts!r}: no integer stride gives {desired} of {num_timesteps} steps")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"steps: cannot take {count} steps from a section of {size}")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += frac_stride
        start += size
    return sorted(set(kept))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] discretised to 256 bins (elementwise, nats)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


class GaussianDiffusion:
    """IDDPM diffusion with eps prediction and learned-range variance (or fixed variance when learn_sigma=False).

    ``timestep_map`` maps this (possibly respaced) process's step indices to the model's original timesteps, so
    a respaced process calls the model with the original t, exactly like IDDPM's SpacedDiffusion.
    """

    name = "iddpm"

    def __init__(self, betas: np.ndarray, learn_sigma: bool = True, timestep_map: list[int] | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.learn_sigma = learn_sigma
        self.num_timesteps = len(betas)
        self.timestep_map = np.asarray(timestep_map if timestep_map is not None else range(self.num_timesteps))
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log of the posterior variance, clipped because it is 0 at t = 0 (a 1-step sampler has no t = 1: beta_0)
        first = self.posterior_variance[1] if len(betas) > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.log_one_minus_alphas_cumprod = np.log(self.one_minus_alphas_cumprod)
        # fixed "large" variance (betas, with the posterior variance at t = 0), as IDDPM's FIXED_LARGE
        self.log_fixed_large_variance = np.log(np.append(first, betas[1:]))
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        """The schedule array ``name`` as a float64 tensor on ``device``, copied there once."""
        key = (name, device)
        if key not in self._tables:
            self._tables[key] = torch.from_numpy(np.asarray(getattr(self, name))).to(device)
        return self._tables[key]

    def _gather(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Entries t of the schedule array ``name`` in float32, shaped [B, 1, ...] to broadcast over ndim dims."""
        return self._table(name, t.device)[t].float().reshape(-1, *([1] * (ndim - 1)))

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def dit_default(cls, steps: str | int | None = None, learn_sigma: bool = True, num_timesteps: int = 1000):
        """DiT's create_diffusion: linear schedule; ``steps`` respaces it ("250", "ddim50", 25, ...)."""
        base = linear_betas(num_timesteps)
        if steps is None or str(steps) == str(num_timesteps):
            return cls(base, learn_sigma=learn_sigma)
        keep = space_timesteps(num_timesteps, steps if isinstance(steps, (str, list)) else [int(steps)])
        alphas_cumprod = np.cumprod(1.0 - base)
        last, new_betas = 1.0, []
        for i in keep:
            new_betas.append(1 - alphas_cumprod[i] / last)
            last = alphas_cumprod[i]
        return cls(np.array(new_betas), learn_sigma=learn_sigma, timestep_map=keep)

    def sample_t(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One step index t ~ U{0..T-1} per sample of ``x0``, from ``generator`` (on its device) or the global RNG
        (on x0's device)."""
        if generator is None:
            return torch.randint(0, self.num_timesteps, (len(x0),), device=x0.device)
        return torch.randint(0, self.num_timesteps, (len(x0),), generator=generator,
                             device=generator.device).to(x0.device)

    def model_t(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps as the model sees them (original scale)."""
        return self._table("timestep_map", t.device)[t]

    # ---- forward process ----------------------------------------------------------------------------------------
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        mean = self._gather("sqrt_alphas_cumprod", t, x_start.ndim) * x_start
        var = self._gather("one_minus_alphas_cumprod", t, x_start.ndim)
        return mean, var, self._gather("log_one_minus_alphas_cumprod", t, x_start.ndim)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        noise = torch.randn_like(x_start) if noise is None else noise
        return (self._gather("sqrt_alphas_cumprod", t, x_start.ndim) * x_start
                + self._gather("sqrt_one_minus_alphas_cumprod", t, x_start.ndim) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        nd = x_t.ndim
        mean = (self._gather("posterior_mean_coef1", t, nd) * x_start
                + self._gather("posterior_mean_coef2", t, nd) * x_t)
        return mean, self._gather("posterior_variance", t, nd), self._gather("posterior_log_variance_clipped", t, nd)

    def predict_xstart_from_eps(self, x_t, t, eps):
        nd = x_t.ndim
        return (self._gather("sqrt_recip_alphas_cumprod", t, nd) * x_t
                - self._gather("sqrt_recipm1_alphas_cumprod", t, nd) * eps)

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        nd = x_t.ndim
        return ((self._gather("sqrt_recip_alphas_cumprod", t, nd) * x_t - pred_xstart)
                / self._gather("sqrt_recipm1_alphas_cumprod", t, nd))

    # ---- reverse process ----------------------------------------------------------------------------------------
    def split_output(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Model output -> (eps, log variance)."""
        nd, C = x_t.ndim, x_t.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"model output has {model_output.shape[1]} channels; learn_sigma needs {2 * C}")
            eps, var_values = model_output[:, :C], model_output[:, C:]
            min_log = self._gather("posterior_log_variance_clipped", t, nd)
            max_log = self._gather("log_betas", t, nd)
            frac = (var_values + 1) / 2  # model predicts in [-1, 1]
            return eps, frac * max_log + (1 - frac) * min_log
        return model_output, self._gather("log_fixed_large_variance", t, nd)

    def p_mean_variance_from_output(self, model_output, x_t, t, clip_denoised: bool = False):
        eps, log_var = self.split_output(model_output, x_t, t)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return dict(mean=mean, log_variance=log_var, pred_xstart=pred_xstart, eps=eps)

    def p_mean_variance(self, model: ModelFn, x_t, t, clip_denoised: bool = False, model_kwargs: dict | None = None):
        out = model(x_t, self.model_t(t), **(model_kwargs or {}))
        return self.p_mean_variance_from_output(out, x_t, t, clip_denoised)

    # ---- training -----------------------------------------------------------------------------------------------
    def vb_terms_bpd(self, model_output, x_start, x_t, t) -> torch.Tensor:
        """Per-sample VLB term in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), or the decoder NLL at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model: ModelFn, x_start: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None,
                        noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """DiT's loss per sample: {"loss", "mse", "vb"}; t indexes this process's steps."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self.model_t(t), **(model_kwargs or {}))
        C = x_start.shape[1]
        terms = {"mse": mean_flat((noise - model_output[:, :C]) ** 2)}
        if self.learn_sigma:
            # the VLB trains only the variance: the mean it sees is detached
            frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms
