"""The Gaussian forward process and the densities of the variational bound.

Everything is written in terms of the signal and noise scales (alpha_t, sigma_t) of

    q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I),

so the same functions serve the full T-step chain, any respaced sub-chain, and the final jump
to clean data (alpha = 1, sigma = 0). Scales are tensors that broadcast against x (use
:func:`diffkit.utils.append_dims`).
"""

from __future__ import annotations

import math

import torch

LOG2 = math.log(2.0)


def q_sample(x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0):  x_t = alpha_t x_0 + sigma_t eps,  eps ~ N(0, I)."""
    return alpha * x0 + sigma * noise


def _non_negative(value):
    """max(value, 0) for a tensor or a Python float (grid scales are floats on the hot path)."""
    return value.clamp(min=0) if torch.is_tensor(value) else max(value, 0.0)


def posterior_coefficients(alpha_t, sigma_t, alpha_s, sigma_s):
    """(c_xt, c_x0, variance) with q(x_s | x_t, x_0) = N(c_xt x_t + c_x0 x_0, variance); see :func:`q_posterior`.

    Works on tensors and on Python floats alike.
    """
    alpha_ts = alpha_t / alpha_s
    sigma_ts_sq = _non_negative(sigma_t**2 - alpha_ts**2 * sigma_s**2)
    return alpha_ts * sigma_s**2 / sigma_t**2, alpha_s * sigma_ts_sq / sigma_t**2, sigma_ts_sq * sigma_s**2 / sigma_t**2


def q_posterior(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    alpha_t: torch.Tensor,
    sigma_t: torch.Tensor,
    alpha_s: torch.Tensor,
    sigma_s: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_s | x_t, x_0) for s < t (DDPM eq. 6-7, generalised to any s).

    With alpha_{t|s} = alpha_t / alpha_s and sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2:

        mean     = (alpha_{t|s} sigma_s^2 / sigma_t^2) x_t + (alpha_s sigma_{t|s}^2 / sigma_t^2) x_0
        variance = sigma_{t|s}^2 sigma_s^2 / sigma_t^2                     (beta-tilde for s = t-1)

    For s = clean data (alpha_s = 1, sigma_s = 0) the posterior collapses onto x_0.
    """
    coef_xt, coef_x0, variance = posterior_coefficients(alpha_t, sigma_t, alpha_s, sigma_s)
    return coef_xt * x_t + coef_x0 * x0, variance


def transition_variance(alpha_t: torch.Tensor, sigma_t: torch.Tensor, alpha_s: torch.Tensor, sigma_s: torch.Tensor) -> torch.Tensor:
    """Variance of q(x_t | x_s), i.e. beta of the (possibly respaced) step s -> t: 1 - alpha_bar_t / alpha_bar_s."""
    return _non_negative(1.0 - (alpha_t / alpha_s) ** 2)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def prior_kl(x0: torch.Tensor, alpha_T: torch.Tensor, sigma_T: torch.Tensor) -> torch.Tensor:
    """KL(q(x_T | x_0) || N(0, I)) elementwise, in nats: the bound's prior term."""
    mean = alpha_T * x0
    logvar = torch.log(sigma_T**2).expand_as(mean)
    return normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(mean))


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, e^log_variance) elementwise, in nats (a density, for continuous data)."""
    return -0.5 * (math.log(2 * math.pi) + log_variance + (x - mean) ** 2 * torch.exp(-log_variance))


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - e^d) for d <= 0, accurate at both ends and floored where the difference underflows."""
    d = d.clamp(max=-1e-300)
    return torch.where(d > -math.log(2.0), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d))).clamp(min=-1e4)


def discretized_gaussian_log_likelihood(
    x: torch.Tensor,
    mean: torch.Tensor,
    log_variance: torch.Tensor,
    bin_width: float,
    low: float = -1.0,
    high: float = 1.0,
) -> torch.Tensor:
    """log P(x) of quantised data under N(mean, e^log_variance) integrated over x's bin, elementwise, in nats.

    Data quantised to bins of width ``bin_width`` on [low, high] (2/255 for 8-bit images in
    [-1, 1], 2/65535 for 16-bit audio). The outermost bins extend to -inf and +inf so the
    probabilities sum to one. Uses log Phi (torch.special.log_ndtr) for accuracy in the tails.
    """
    std = torch.exp(0.5 * log_variance)
    half = 0.5 * bin_width
    upper = (x - mean + half) / std
    lower = (x - mean - half) / std
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_survival_lower = torch.special.log_ndtr(-lower)
    # log(Phi(upper) - Phi(lower)) computed stably on whichever side of the mean the bin lies.
    log_bin = torch.where(
        lower > 0,
        log_survival_lower + _log1mexp(torch.special.log_ndtr(-upper) - log_survival_lower),
        log_cdf_upper + _log1mexp(torch.special.log_ndtr(lower) - log_cdf_upper),
    )
    # Half a bin's margin tells the edge bins apart from their neighbours despite rounding.
    is_lowest, is_highest = x < low + 0.5 * half, x > high - 0.5 * half
    return torch.where(is_lowest, log_cdf_upper, torch.where(is_highest, log_survival_lower, log_bin))
