"""Gaussian data: the one case where the optimal denoiser and the likelihood are known exactly.

For x0 ~ N(mu, diag(s^2)) and x_t = alpha x0 + sigma eps, x_t is Gaussian too, and

    E[eps | x_t]  = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2)
    Var[x0 | x_t] = s^2 sigma^2 / (alpha^2 s^2 + sigma^2)

so a network can be replaced by the exact answer. Tests and benchmarks use it to measure
samplers and likelihood bounds against the truth instead of against each other.
"""

from __future__ import annotations

import math

import torch

from .parameterization import from_x0_eps
from .process import posterior_coefficients
from .sampling import SamplingGrid
from .schedules import NoiseSchedule


def standardized_noise(num: int, dims: int, seed: int = 0) -> torch.Tensor:
    """(num, dims) float64 normal draws shifted and scaled so that each column has mean exactly
    0 and variance exactly 1: a deterministic (affine) sampler on Gaussian data is then measured
    by :meth:`GaussianData.kl_per_dim` without a Monte-Carlo floor."""
    z = torch.randn(num, dims, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z - z.mean(0)) / z.std(0)


class GaussianData:
    """Independent Gaussian data x0 ~ N(mean, diag(std^2)) of any event shape."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.std = torch.as_tensor(std, dtype=torch.float64)
        if self.mean.shape != self.std.shape:
            raise ValueError(f"mean {tuple(self.mean.shape)} and std {tuple(self.std.shape)} must have one shape")
        if (self.std <= 0).any():
            raise ValueError("every std must be positive")

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape)

    def sample(self, num: int, generator: torch.Generator | None = None, dtype=torch.float64) -> torch.Tensor:
        noise = torch.randn((num, *self.event_shape), generator=generator, dtype=torch.float64)
        return (self.mean + self.std * noise).to(dtype)

    def nll_bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Exact -log2 density per dimension, one value per example."""
        z = (x.to(torch.float64) - self.mean) / self.std
        nats = 0.5 * (z**2 + math.log(2 * math.pi)) + torch.log(self.std)
        return nats.reshape(x.shape[0], -1).mean(dim=1) / math.log(2)

    def entropy_bits_per_dim(self) -> float:
        """Differential entropy per dimension in bits: the expected exact NLL."""
        return float((0.5 * math.log(2 * math.pi * math.e) + torch.log(self.std)).mean() / math.log(2))

    def kl_per_dim(self, samples: torch.Tensor) -> float:
        """KL(N(m_hat, s_hat^2) || data) per dimension, in nats, with (m_hat, s_hat) fitted to ``samples``."""
        flat = samples.to(torch.float64).reshape(samples.shape[0], -1)
        m_hat, v_hat = flat.mean(dim=0), flat.var(dim=0)
        m, v = self.mean.flatten(), self.std.flatten() ** 2
        kl = 0.5 * (torch.log(v / v_hat) + (v_hat + (m_hat - m) ** 2) / v - 1.0)
        return float(kl.mean())

    def prior_mismatch_kl(self, schedule: NoiseSchedule) -> float:
        """KL(N(0, I) || q(x_{T-1})) per dimension, nats: what a plain N(0, I) start costs.

        The exact flow preserves KL, so an exact solver started from N(0, I) ends this far from
        the data; :class:`~diffkit.guidance.PriorMeanStart` removes most of it.
        """
        last = torch.tensor(schedule.num_timesteps - 1)
        alpha, sigma = schedule.alpha_at(last).double(), schedule.sigma_at(last).double()
        mean, var = alpha * self.mean, alpha**2 * self.std**2 + sigma**2
        return float((0.5 * (torch.log(var) + (1 + mean**2) / var - 1)).mean())

    def posterior_mean_kl(self, schedule: NoiseSchedule, t: float = 0.0) -> float:
        """KL per dimension, nats, of E[x0 | x_t] (x_t from the data) against the data.

        The posterior mean shrinks a dimension of std s by r = alpha^2 s^2 / (alpha^2 s^2 + sigma^2)
        in variance: the floor of a sampler whose last step jumps from t to E[x0 | x_t].
        """
        time = torch.tensor(float(t))
        alpha, sigma = schedule.alpha_at(time).double(), schedule.sigma_at(time).double()
        r = alpha**2 * self.std**2 / (alpha**2 * self.std**2 + sigma**2)
        return float((0.5 * (r - 1 - torch.log(r))).mean())

    def model(self, schedule: NoiseSchedule, prediction: str = "eps", learn_variance: bool = False):
        """The exact network for this data: ``model(x_t, t)`` returns E[target | x_t].

        With ``learn_variance`` it also returns the variance channels that make p(x_{t-1} | x_t)
        the exact reverse kernel q(x_{t-1} | x_t) (in range whenever std <= 1).
        """
        data = self
        # The reverse step at t = 0 uses the chain's decoder variance (one rule, in SamplingGrid).
        decoder_variance = SamplingGrid.from_times(
            schedule, schedule.time_of_step(torch.arange(schedule.num_timesteps - 1, -1, -1))).decoder_variance()

        def exact_model(x_t: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
            shape = (-1,) + (1,) * (x_t.ndim - 1)
            alpha = schedule.alpha_at(t.cpu()).to(x_t.device).reshape(shape)
            sigma = schedule.sigma_at(t.cpu()).to(x_t.device).reshape(shape)
            mean, std = data.mean.to(x_t.device), data.std.to(x_t.device)
            x = x_t.to(torch.float64)
            denom = alpha**2 * std**2 + sigma**2
            eps = sigma * (x - alpha * mean) / denom
            x0 = mean + alpha * std**2 * (x - alpha * mean) / denom
            out = from_x0_eps(prediction, x0, eps, alpha, sigma)
            if learn_variance:
                out = torch.cat([out, data._variance_channels(schedule, t, x0.shape, alpha, sigma, decoder_variance)], dim=1)
            return out.to(x_t.dtype)

        return exact_model

    def _variance_channels(self, schedule: NoiseSchedule, t: torch.Tensor, shape, alpha, sigma,
                           decoder_variance: float) -> torch.Tensor:
        """v in [-1, 1] with exp(frac log beta + (1 - frac) log beta_tilde) = Var[x_{t-1} | x_t]."""
        view = (-1,) + (1,) * (len(shape) - 1)
        alpha_s = schedule.alpha_at(t.cpu() - 1).to(alpha.device).reshape(view)
        sigma_s = schedule.sigma_at(t.cpu() - 1).to(alpha.device).reshape(view)
        std = self.std.to(alpha.device)
        posterior_x0_var = std**2 * sigma**2 / (alpha**2 * std**2 + sigma**2)
        coef_xt, coef_x0, tilde = posterior_coefficients(alpha, sigma, alpha_s, sigma_s)
        true_var = tilde + coef_x0**2 * posterior_x0_var
        beta = 1 - (alpha / alpha_s) ** 2
        # At t = 0 the reverse process uses the decoder variance in place of the zero beta-tilde,
        # exactly as Diffusion does (one rule, in SamplingGrid.decoder_variance).
        is_first = (t.cpu() == 0).to(alpha.device).reshape(view)
        small = torch.where(is_first, torch.full_like(tilde, decoder_variance), tilde)
        frac = (torch.log(true_var) - torch.log(small)) / (torch.log(beta) - torch.log(small))
        return (2 * frac.clamp(0, 1) - 1).expand(shape)

    def expected_bound_bits_per_dim(self, schedule: NoiseSchedule, grid: SamplingGrid, variances: torch.Tensor) -> float:
        """E_x0[variational bound] in bits/dim for the exact mean model and reverse variances ``variances`` (K,).

        With x0_hat = E[x0 | x_t] the reverse mean differs from the posterior mean by
        c_x0 (x0 - E[x0|x_t]), whose expected square is c_x0^2 Var[x0_i | x_t] per dimension i, so
        every term is closed form:

            E KL_i     = 0.5 (log(var / beta_tilde) + (beta_tilde + c_x0^2 v_i) / var - 1)
            E decoder_i = 0.5 log(2 pi var) + v_i / (2 var)
            E prior_i  = KL(N(alpha_T mu_i, alpha_T^2 s_i^2 + sigma_T^2) || N(0, 1))

        with v_i = s_i^2 sigma_t^2 / (alpha_t^2 s_i^2 + sigma_t^2). Minus
        :meth:`entropy_bits_per_dim` it is the bound's exact gap (no Monte-Carlo noise).
        ``variances`` is what :func:`diffkit.calibration.analytic_variances` returns (the last
        entry the decoder's).
        """
        s2 = self.std.flatten() ** 2
        mu = self.mean.flatten()
        a, sg = grid.alphas.to(torch.float64), grid.sigmas.to(torch.float64)
        var = torch.as_tensor(variances, dtype=torch.float64)
        m, v = a[0] * mu, a[0] ** 2 * s2 + sg[0] ** 2
        total = 0.5 * (v + m**2 - 1.0 - torch.log(v))  # KL(N(m, v) || N(0, 1))
        K = len(grid)
        for i in range(K):
            a_t, s_t, a_s, s_s = grid.step_scales(i)
            x0_var = s2 * s_t**2 / (a_t**2 * s2 + s_t**2)
            if i == K - 1:
                total = total + 0.5 * math.log(2 * math.pi * float(var[i])) + x0_var / (2 * float(var[i]))
            else:
                _, c_x0, tilde = posterior_coefficients(a_t, s_t, a_s, s_s)
                total = total + 0.5 * (math.log(float(var[i]) / tilde) + (tilde + c_x0**2 * x0_var) / float(var[i]) - 1.0)
        return float(total.mean() / math.log(2))
