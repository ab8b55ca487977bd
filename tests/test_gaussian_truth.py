"""Closed-form truth: Gaussian data has an exact optimal denoiser and an exact likelihood.

Every sampler must reproduce the data distribution from the exact model, and the variational
bound must sit above the exact NLL (and on it once the reverse variances are exact).
"""

import math

import pytest
import torch

import diffkit
from diffkit import Diffusion, GaussianData
from diffkit.analytic import standardized_noise

DATA = GaussianData(mean=torch.linspace(-1.0, 1.0, 8), std=torch.linspace(0.2, 1.0, 8))


# sampler, steps, KL bound (nats/dim) for 4000 samples: about twice what each measured, so a
# wrong coefficient (which costs orders of magnitude) fails while solver error passes.
CASES = [
    ("ddpm", 1000, 1e-3),
    ("ddpm", 100, 1.5e-2),
    ("ddim", 100, 3e-3),
    ("euler", 100, 2e-3),
    ("heun", 30, 1e-3),
    ("dpm++2m", 20, 5e-4),
    ("dpm++3m", 20, 2e-4),
    ("unipc", 20, 3e-5),
]


@pytest.mark.parametrize("sampler, steps, bound", CASES)
def test_every_sampler_reproduces_gaussian_data(sampler, steps, bound):
    diff = Diffusion("linear", 1000)
    model = DATA.model(diff.schedule)
    noise = standardized_noise(4000, 8)
    samples = diff.sample(model, noise.shape, sampler=sampler, steps=steps, noise=noise, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(1))
    kl = DATA.kl_per_dim(samples)
    assert kl < bound, f"{sampler} at {steps} steps: KL {kl:.2e} nats/dim"
    assert torch.allclose(samples.mean(0), DATA.mean, atol=0.06)
    assert torch.allclose(samples.std(0), DATA.std, rtol=0.15)


@pytest.mark.parametrize("prediction", diffkit.PREDICTIONS)
@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "unipc", "heun", "dpm-v3"])
def test_predictions_agree_on_the_same_trajectory(prediction, sampler):
    diff_eps, diff_other = Diffusion("cosine", 200), Diffusion("cosine", 200, prediction=prediction)
    noise = standardized_noise(64, 8)
    ref = diff_eps.sample(DATA.model(diff_eps.schedule), noise.shape, sampler=sampler, steps=12, noise=noise, dtype=torch.float64)
    out = diff_other.sample(DATA.model(diff_other.schedule, prediction), noise.shape, sampler=sampler, steps=12,
                            noise=noise, dtype=torch.float64)
    assert torch.allclose(ref, out, atol=1e-8)


@pytest.mark.parametrize("sampler", diffkit.SAMPLERS)
def test_zero_terminal_snr_with_v_prediction_samples_correctly(sampler):
    diff = Diffusion("scaled_linear", 1000, prediction="v", zero_terminal_snr=True)
    model = DATA.model(diff.schedule, "v")
    noise = standardized_noise(4000, 8)
    steps = 200 if sampler in ("ddpm", "ddim", "euler") else 30
    samples = diff.sample(model, noise.shape, sampler=sampler, steps=steps, noise=noise, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(samples).all()
    assert DATA.kl_per_dim(samples) < 6e-3


@pytest.mark.parametrize("sampler", ["dpm++2m", "unipc", "dpm-v3"])
def test_samplers_work_on_any_tensor_shape(sampler):
    data = GaussianData(mean=torch.zeros(2, 3, 2, 2), std=torch.full((2, 3, 2, 2), 0.5))
    diff = Diffusion("linear", 100)
    out = diff.sample(data.model(diff.schedule), (500, 2, 3, 2, 2), sampler=sampler, steps=20,
                      generator=torch.Generator().manual_seed(0))
    assert out.shape == (500, 2, 3, 2, 2)
    assert abs(out.std().item() - 0.5) < 0.03


def test_fast_sampler_targets_on_exact_model():
    """The headline claim of benchmarks/samplers.py, in small: on unit-scale data our best
    sampler at 10 calls beats diffusers' best DPM-Solver++ configuration (log-SNR steps)."""
    diffusers = pytest.importorskip("diffusers")
    diff = Diffusion("linear", 1000)
    data = GaussianData(mean=torch.linspace(-1, 1, 16), std=torch.linspace(0.1, 1.0, 16))
    model = data.model(diff.schedule)
    noise = standardized_noise(4000, 16)
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear", use_lu_lambdas=True)
    scheduler.set_timesteps(10)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(len(x)).long()), t, x).prev_sample
    reference = data.kl_per_dim(x)
    ours = data.kl_per_dim(diff.sample(model, noise.shape, sampler="unipc", grid=diff.sampling_grid(10, log_snr_range=(-4.0, 8.0)),
                                       sampler_options={"order": 3}, noise=noise, dtype=torch.float64))
    assert ours < 0.5 * reference, f"diffkit {ours:.2e} vs diffusers {reference:.2e}"


def test_bound_is_above_the_exact_nll_with_fixed_variances():
    data = GaussianData(mean=torch.tensor([0.3, -0.2, 0.0, 0.5]), std=torch.tensor([0.3, 0.5, 0.8, 1.0]))
    diff = Diffusion("linear", 1000)
    x0 = data.sample(512, torch.Generator().manual_seed(0))
    bpd = diff.nll(data.model(diff.schedule), x0, generator=torch.Generator().manual_seed(1))
    exact = data.nll_bits_per_dim(x0)
    assert bpd.shape == (512,)
    gap = (bpd - exact).mean().item()
    assert 0.05 < gap < 1.5, f"fixed-variance bound gap {gap:.3f} bits/dim"


def test_bound_is_tight_with_exact_reverse_variances():
    data = GaussianData(mean=torch.tensor([0.3, -0.2, 0.0, 0.5]), std=torch.tensor([0.3, 0.5, 0.8, 1.0]))
    diff = Diffusion("linear", 1000, variance="learned_range")
    x0 = data.sample(4096, torch.Generator().manual_seed(0))
    bpd, terms = diff.nll(data.model(diff.schedule, learn_variance=True), x0,
                          generator=torch.Generator().manual_seed(1), return_terms=True)
    exact = data.nll_bits_per_dim(x0)
    gap = (bpd - exact).mean().item()
    # Exact reverse kernels leave only the prior's mismatch and Monte-Carlo noise (~0.01).
    assert -0.025 < gap < 0.025, f"bound with exact variances is {gap:.4f} bits/dim from the exact NLL"
    assert terms["kl"].shape == (4096, 999)
    assert torch.allclose(bpd, terms["prior"] + terms["kl"].sum(1) + terms["decoder"])
    assert (terms["kl"] >= -1e-6).all()


def test_respaced_bound_still_bounds_the_likelihood():
    """A K-step chain is another model: its bound is looser, and never below the data's entropy."""
    data = GaussianData(mean=torch.zeros(4), std=torch.full((4,), 0.5))
    diff = Diffusion("linear", 1000)
    x0 = data.sample(2048, torch.Generator().manual_seed(0))
    model = data.model(diff.schedule)
    full = diff.nll(model, x0, generator=torch.Generator().manual_seed(1)).mean()
    coarse, terms = diff.nll(model, x0, steps=50, generator=torch.Generator().manual_seed(1), return_terms=True)
    exact = data.nll_bits_per_dim(x0).mean()
    assert terms["kl"].shape == (2048, 49) and terms["times"][0] == 999 and terms["times"][-1] == 0
    assert exact < full < coarse.mean()


def test_discretized_bound_of_8bit_data_is_a_probability_near_the_entropy():
    """For data quantised to 8 bits the bound is -log2 of a probability: at least the discrete
    entropy, which is about h(x) + log2(1 / bin width) for a smooth density."""
    data = GaussianData(mean=torch.zeros(6), std=torch.full((6,), 0.4))
    diff = Diffusion("linear", 1000, decoder="discretized")
    x0 = (data.sample(512, torch.Generator().manual_seed(0)).clamp(-1, 1) * 127.5).round() / 127.5
    bpd = diff.nll(data.model(diff.schedule), x0, generator=torch.Generator().manual_seed(1))
    entropy = data.entropy_bits_per_dim() + math.log2(255 / 2)
    assert (bpd > 0).all()
    assert entropy < bpd.mean().item() < entropy + 1.2


def test_loss_of_the_exact_model_is_its_irreducible_error():
    """E||eps - E[eps|x_t]||^2 per dim equals E Var[eps | x_t] = 1 - sigma^2/(alpha^2 s^2 + sigma^2)."""
    data = GaussianData(mean=torch.zeros(4), std=torch.full((4,), 0.5))
    diff = Diffusion("linear", 1000)
    model = data.model(diff.schedule)
    x0 = data.sample(20000, torch.Generator().manual_seed(0))
    t = torch.full((20000,), 300)
    _, terms = diff.loss(model, x0, t=t, generator=torch.Generator().manual_seed(1), return_terms=True)
    a, s = diff.schedule.alpha_at(torch.tensor(300)), diff.schedule.sigma_at(torch.tensor(300))
    expected = 1 - s**2 / (a**2 * 0.25 + s**2)
    assert terms["mse"].mean().item() == pytest.approx(expected.item(), rel=0.03)


@pytest.mark.parametrize("variance", ["fixed_large", "learned_range"])
def test_ddpm_with_large_or_learned_variance_reproduces_gaussian_data(variance):
    diff = Diffusion("linear", 1000, variance=variance)
    model = DATA.model(diff.schedule, learn_variance=variance == "learned_range")
    noise = standardized_noise(4000, 8)
    samples = diff.sample(model, noise.shape, sampler="ddpm", noise=noise, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(5))
    assert DATA.kl_per_dim(samples) < 2e-3


# --------------------------------------------------------------------------- the two floors
# Data with means of order 2 (the prior mismatch matters) and a dimension narrower than
# sigma_0 = 0.01 allows (the posterior-mean shrink matters).
FLOOR_DATA = GaussianData(mean=torch.linspace(1.0, 3.0, 6), std=torch.tensor([0.03, 0.05, 0.1, 0.4, 0.8, 1.6]))


def test_plain_noise_start_sits_on_the_prior_mismatch_floor_and_the_prior_start_removes_it():
    diff = Diffusion("linear", 1000)
    model = FLOOR_DATA.model(diff.schedule)
    noise = standardized_noise(4000, 6)
    floor = FLOOR_DATA.prior_mismatch_kl(diff.schedule)
    assert floor > 5e-5  # the test means something only if the floor is well above solver error
    plain = diff.sample(model, noise.shape, steps=50, noise=noise, dtype=torch.float64, start="noise")
    moved = diff.sample(model, noise.shape, steps=50, noise=noise, dtype=torch.float64)
    assert FLOOR_DATA.kl_per_dim(plain) == pytest.approx(floor, rel=0.1)
    assert FLOOR_DATA.kl_per_dim(moved) < floor / 20


def test_prior_start_moves_the_first_state_by_alpha_times_the_first_prediction():
    diff = Diffusion("linear", 1000)
    model = FLOOR_DATA.model(diff.schedule)
    noise = standardized_noise(16, 6)
    seen = []
    diff.sample(model, noise.shape, sampler="ddim", steps=4, noise=noise, dtype=torch.float64, callback=seen.append)
    alpha = float(diff.sampling_grid(4, sampler="ddim").alphas[0])
    assert torch.allclose(seen[0]["x"], noise + alpha * seen[0]["denoised"], atol=1e-12)
    with pytest.raises(ValueError, match="start must be"):
        diff.sample(model, noise.shape, steps=4, start="exact")


@pytest.mark.parametrize("sampler", ["unipc", "dpm++2m", "dpm++3m"])
def test_second_order_final_jump_removes_the_posterior_mean_floor(sampler):
    """A first-order jump from t = 0 lands on E[x0 | x_0], the closed-form shrink floor; the
    default second-order jump goes far below it."""
    diff = Diffusion("linear", 1000)
    model = FLOOR_DATA.model(diff.schedule)
    noise = standardized_noise(4000, 6)
    floor = FLOOR_DATA.posterior_mean_kl(diff.schedule, 0.0)
    assert floor > 1e-4
    first = diff.sample(model, noise.shape, sampler=sampler, steps=100, noise=noise, dtype=torch.float64,
                        sampler_options={"final_order": 1})
    second = diff.sample(model, noise.shape, sampler=sampler, steps=100, noise=noise, dtype=torch.float64)
    assert FLOOR_DATA.kl_per_dim(first) == pytest.approx(floor, rel=0.2)
    assert FLOOR_DATA.kl_per_dim(second) < floor / 20
    with pytest.raises(ValueError, match="final_order"):
        diff.sample(model, noise.shape, sampler=sampler, steps=5, sampler_options={"final_order": 3})
