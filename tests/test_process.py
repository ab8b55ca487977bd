"""Forward process, posterior and densities against closed forms."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffkit.parameterization import PREDICTIONS, from_x0_eps, to_x0_eps, x0_error_scale
from diffkit.process import (
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    normal_kl,
    prior_kl,
    q_posterior,
)
from diffkit.schedules import NoiseSchedule

finite = st.floats(min_value=-5, max_value=5)


@settings(max_examples=100, deadline=None)
@given(mean=finite, logvar=st.floats(min_value=-8, max_value=4))
def test_kl_of_identical_gaussians_is_zero(mean, logvar):
    m, lv = torch.tensor(mean, dtype=torch.float64), torch.tensor(logvar, dtype=torch.float64)
    assert normal_kl(m, lv, m, lv).abs().item() < 1e-12


@pytest.mark.parametrize("m1, lv1, m2, lv2", [(0.0, 0.0, 1.0, 0.0), (0.5, -1.0, -0.3, 0.7), (2.0, 1.5, 0.0, -2.0)])
def test_kl_matches_a_monte_carlo_estimate(m1, lv1, m2, lv2):
    """KL = E_p[log p - log q], estimated from 400k draws of p."""
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    draws = m1 + math.exp(0.5 * lv1) * torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    log_ratio = gaussian_log_likelihood(draws, t(m1), t(lv1)) - gaussian_log_likelihood(draws, t(m2), t(lv2))
    standard_error = log_ratio.std().item() / math.sqrt(draws.numel())
    assert normal_kl(t(m1), t(lv1), t(m2), t(lv2)).item() == pytest.approx(log_ratio.mean().item(), abs=4 * standard_error)


@settings(max_examples=100, deadline=None)
@given(m1=finite, m2=finite, lv1=st.floats(-4, 2), lv2=st.floats(-4, 2))
def test_kl_is_non_negative(m1, m2, lv1, lv2):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert normal_kl(t(m1), t(lv1), t(m2), t(lv2)).item() >= -1e-12


def test_posterior_matches_ddpm_equations():
    schedule = NoiseSchedule.from_name("linear", 1000)
    t = torch.arange(1, 1000)
    a_t, s_t = schedule.alpha_at(t), schedule.sigma_at(t)
    a_s, s_s = schedule.alpha_at(t - 1), schedule.sigma_at(t - 1)
    x0, x_t = torch.ones(999, dtype=torch.float64), torch.full((999,), 2.0, dtype=torch.float64)
    mean, variance = q_posterior(x0, x_t, a_t, s_t, a_s, s_s)
    beta, ab, ab_prev = schedule.betas[1:], schedule.alpha_bar[1:], schedule.alpha_bar[:-1]
    assert torch.allclose(variance, beta * (1 - ab_prev) / (1 - ab), rtol=1e-9)
    coef_x0 = beta * ab_prev.sqrt() / (1 - ab)
    coef_xt = (1 - ab_prev) * (1 - beta).sqrt() / (1 - ab)
    assert torch.allclose(mean, coef_x0 * x0 + coef_xt * x_t, rtol=1e-9)


def test_posterior_variance_is_positive_and_below_beta():
    schedule = NoiseSchedule.from_name("cosine", 500)
    t = torch.arange(1, 500)
    zero = torch.zeros(499, dtype=torch.float64)
    _, variance = q_posterior(zero, zero, schedule.alpha_at(t), schedule.sigma_at(t), schedule.alpha_at(t - 1), schedule.sigma_at(t - 1))
    assert (variance > 0).all() and (variance <= schedule.betas[1:]).all()


def test_posterior_is_the_gaussian_conditional():
    """q(x_s | x_t, x0) by brute-force Gaussian conditioning of the joint of (x_s, x_t) given x0."""
    schedule = NoiseSchedule.from_name("linear", 1000)
    t, s = torch.tensor(700), torch.tensor(300)  # a respaced jump, not just t-1
    a_t, s_t, a_s, s_s = schedule.alpha_at(t), schedule.sigma_at(t), schedule.alpha_at(s), schedule.sigma_at(s)
    x0, x_t = torch.tensor(0.7, dtype=torch.float64), torch.tensor(-0.4, dtype=torch.float64)
    # x_s = a_s x0 + s_s e1 ; x_t = (a_t/a_s) x_s + sqrt(s_t^2 - (a_t/a_s)^2 s_s^2) e2
    cov_ss, cov_st = s_s**2, (a_t / a_s) * s_s**2
    cov_tt = s_t**2
    mean_expected = a_s * x0 + cov_st / cov_tt * (x_t - a_t * x0)
    var_expected = cov_ss - cov_st**2 / cov_tt
    mean, variance = q_posterior(x0, x_t, a_t, s_t, a_s, s_s)
    assert mean.item() == pytest.approx(mean_expected.item(), rel=1e-10)
    assert variance.item() == pytest.approx(var_expected.item(), rel=1e-10)


def test_prior_kl_vanishes_for_pure_noise_and_grows_with_signal():
    zero = torch.zeros(3, dtype=torch.float64)
    assert prior_kl(zero, torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)).abs().max() < 1e-12
    small = prior_kl(torch.ones(1), torch.tensor(0.01), torch.tensor(math.sqrt(1 - 1e-4)))
    large = prior_kl(torch.ones(1), torch.tensor(0.5), torch.tensor(math.sqrt(0.75)))
    assert 0 < small.item() < large.item()


def test_discretized_likelihood_sums_to_one_over_all_bins():
    bin_width = 2 / 255
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_var in [(0.3, -4.0), (-0.99, -9.0), (1.2, 0.0), (0.0, -14.0)]:
        log_p = discretized_gaussian_log_likelihood(
            bins, torch.full_like(bins, mean), torch.full_like(bins, log_var), bin_width
        )
        assert torch.exp(log_p).sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_likelihood_approaches_density_times_bin_width():
    x, mean, log_var = torch.tensor([0.1], dtype=torch.float64), torch.tensor([0.12], dtype=torch.float64), torch.tensor([math.log(0.05**2)], dtype=torch.float64)
    width = 1e-4
    approx = gaussian_log_likelihood(x, mean, log_var) + math.log(width)
    assert discretized_gaussian_log_likelihood(x, mean, log_var, width).item() == pytest.approx(approx.item(), abs=1e-6)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_parameterisations_round_trip(prediction):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    alpha = torch.tensor(0.6, dtype=torch.float64)
    sigma = (1 - alpha**2).sqrt()
    x_t = alpha * x0 + sigma * eps
    output = from_x0_eps(prediction, x0, eps, alpha, sigma)
    x0_back, eps_back = to_x0_eps(prediction, output, x_t, alpha, sigma)
    assert torch.allclose(x0_back, x0) and torch.allclose(eps_back, eps)
    # the x0-error scale: an error d in x0_hat moves the prediction by sqrt(c) * d
    delta = 1e-3 * torch.randn(4, 3, generator=g, dtype=torch.float64)
    moved = from_x0_eps(prediction, x0 + delta, (x_t - alpha * (x0 + delta)) / sigma, alpha, sigma)
    ratio = ((moved - output) ** 2).sum() / (delta**2).sum()
    assert ratio.item() == pytest.approx(x0_error_scale(prediction, alpha, sigma).item(), rel=1e-9)
