"""Continuous time: fractional times, explicit noise levels and betas, and continuous training draws,
checked against the closed-form behaviour of the exact Gaussian denoiser."""

import math

import pytest
import torch

from diffkit import Diffusion, GaussianData, NoiseSchedule, SamplingGrid

DIFFWAVE_FAST_BETAS = [1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5]
MEAN = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64)
STD = torch.tensor([0.2, 0.7, 1.0, 1.5], dtype=torch.float64)


def diffwave_schedule():
    """DiffWave's training schedule: 50 linear betas from 1e-4 to 0.05."""
    return NoiseSchedule.from_betas(torch.linspace(1e-4, 0.05, 50, dtype=torch.float64))


def noise_level_model(data: GaussianData):
    """The exact eps-model of ``data`` conditioned on the noise level sqrt(alpha_bar) (WaveGrad's input)."""

    def model(x_t, level, **_):
        alpha = level.to(torch.float64)[:, None]
        sigma = (1 - alpha**2).sqrt()
        return (sigma * (x_t - alpha * data.mean) / (alpha**2 * data.std**2 + sigma**2)).to(x_t.dtype)

    return model


def closed_form_ddim(noise, alphas):
    """DDIM with the exact denoiser of Gaussian data is an affine map per dimension; apply it step by step."""
    x = noise.clone()
    for a_t, a_s in zip(alphas[:-1], alphas[1:]):
        s_t, s_s = math.sqrt(1 - a_t**2), math.sqrt(1 - a_s**2)
        denom = a_t**2 * STD**2 + s_t**2
        x0 = MEAN + a_t * STD**2 * (x - a_t * MEAN) / denom  # E[x0 | x_t]
        eps = s_t * (x - a_t * MEAN) / denom  # E[eps | x_t]
        x = a_s * x0 + s_s * eps
    return x


def closed_form_ddpm_moments(alphas, step_variances=None):
    """Mean and variance of DDPM's output per dimension: every step is affine in x plus Gaussian noise
    (of the posterior variance, or of ``step_variances[i]`` when given)."""
    mean, var = torch.zeros_like(MEAN), torch.ones_like(STD)
    for i, (a_t, a_s) in enumerate(zip(alphas[:-1], alphas[1:])):
        s_t2, s_s2 = 1 - a_t**2, 1 - a_s**2
        a_ts = a_t / a_s
        step_var = s_t2 - a_ts**2 * s_s2
        c_xt, c_x0, post_var = a_ts * s_s2 / s_t2, a_s * step_var / s_t2, step_var * s_s2 / s_t2
        gain = a_t * STD**2 / (a_t**2 * STD**2 + s_t2)  # d E[x0 | x_t] / d x_t
        slope = c_xt + c_x0 * gain
        offset = c_x0 * (MEAN - gain * a_t * MEAN)
        if step_variances is not None:
            post_var = step_variances[i]
        mean, var = slope * mean + offset, slope**2 * var + post_var
    return mean, var


def grids():
    schedule = diffwave_schedule()
    random_times = torch.sort(torch.rand(7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 49,
                              descending=True).values
    return {
        "diffwave-fast-betas": SamplingGrid.from_betas(schedule, DIFFWAVE_FAST_BETAS),
        "random-fractional-times": SamplingGrid.from_times(schedule, random_times),
        "noise-levels": SamplingGrid.from_noise_levels(schedule, [0.6, 0.75, 0.9, 0.97, 0.999]),
    }


@pytest.mark.parametrize("grid_name", list(grids()))
@pytest.mark.parametrize("time_input", ["timestep", "noise_level"])
def test_ddim_on_any_grid_is_the_closed_form_map(grid_name, time_input):
    grid = grids()[grid_name]
    data = GaussianData(MEAN, STD)
    diff = Diffusion(diffwave_schedule(), time_input=time_input)
    model = data.model(diff.schedule) if time_input == "timestep" else noise_level_model(data)
    noise = torch.randn(256, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seen = []

    def recording_model(x, t):
        seen.append(t.clone())
        return model(x, t)

    ours = diff.sample(recording_model, noise.shape, start="noise", sampler="ddim", grid=grid, noise=noise, dtype=torch.float64)
    expected = closed_form_ddim(noise, [float(a) for a in grid.alphas])
    assert torch.allclose(ours, expected, atol=1e-6)
    told = torch.stack([t[0] for t in seen]).double()
    truth = grid.times if time_input == "timestep" else grid.alphas[:-1]
    assert torch.allclose(told, truth, atol=1e-5)  # fractional times reach the model untruncated
    if time_input == "timestep":
        assert (told != told.round()).any()


@pytest.mark.parametrize("grid_name", ["diffwave-fast-betas", "random-fractional-times"])
def test_ddpm_on_fractional_grids_has_the_closed_form_moments(grid_name):
    grid = grids()[grid_name]
    data = GaussianData(MEAN, STD)
    diff = Diffusion(diffwave_schedule())
    samples = diff.sample(data.model(diff.schedule), (40000, 4), start="noise", sampler="ddpm", grid=grid, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(2))
    mean, var = closed_form_ddpm_moments([float(a) for a in grid.alphas])
    assert torch.allclose(samples.mean(0), mean, atol=4 * (var / 40000).sqrt().max().item())
    assert torch.allclose(samples.var(0), var, rtol=0.03)


def test_diffwave_fast_schedule_lands_on_its_noise_levels():
    grid = SamplingGrid.from_betas(diffwave_schedule(), DIFFWAVE_FAST_BETAS)
    alpha_bar = torch.cumprod(1 - torch.tensor(DIFFWAVE_FAST_BETAS, dtype=torch.float64), 0).flip(0)
    assert torch.allclose(grid.alphas[:-1] ** 2, alpha_bar, rtol=1e-12)
    assert torch.allclose(diffwave_schedule().alpha_bar_at(grid.times), alpha_bar, rtol=1e-10)
    assert (grid.times != grid.times.round()).all()  # none of them is a training step


def test_noise_levels_outside_the_schedule_need_a_noise_level_model():
    schedule = NoiseSchedule.from_betas(torch.linspace(1e-4, 0.02, 20, dtype=torch.float64))  # alpha_bar_end ~ 0.8
    grid = SamplingGrid.from_noise_levels(schedule, [0.1, 0.5, 0.99])
    assert math.isnan(float(grid.times[0])) and not math.isnan(float(grid.times[-1]))
    data = GaussianData(MEAN, STD)
    with pytest.raises(ValueError, match="outside the schedule's trained range"):
        Diffusion(schedule).sample(data.model(schedule), (8, 4), grid=grid)
    out = Diffusion(schedule, time_input="noise_level").sample(noise_level_model(data), (8, 4), grid=grid)
    assert torch.isfinite(out).all()


def test_grids_reject_bad_input():
    schedule = diffwave_schedule()
    with pytest.raises(ValueError, match="strictly decreasing"):
        SamplingGrid.from_times(schedule, [3.0, 5.0])
    with pytest.raises(ValueError, match=r"lie in \[0, 49\]"):
        SamplingGrid.from_times(schedule, [60.0, 5.0])
    with pytest.raises(ValueError, match="must increase"):
        SamplingGrid.from_noise_levels(schedule, [0.9, 0.5])
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
        SamplingGrid.from_betas(schedule, [0.1, 1.5])
    with pytest.raises(ValueError, match="either grid= or steps="):
        Diffusion(schedule).sample(lambda x, t: x, (2, 4), grid=[3.0, 1.0], steps=5)


@pytest.mark.parametrize("time_sampling", ["continuous", "noise_level"])
def test_continuous_training_times_cover_the_schedule(time_sampling):
    schedule = NoiseSchedule.from_betas([0.1, 0.2, 0.3, 0.4])
    diff = Diffusion(schedule, time_sampling=time_sampling,
                     time_input="noise_level" if time_sampling == "noise_level" else "timestep")
    told = []

    def model(x, t):
        told.append(t)
        return torch.zeros_like(x)

    diff.loss(model, torch.zeros(40000, 1), generator=torch.Generator().manual_seed(0))
    t = told[0].double()
    assert (t != t.round()).float().mean() > 0.99  # almost no draw is a training step
    if time_sampling == "continuous":
        assert 0 <= t.min() and t.max() <= 3 and t.mean().item() == pytest.approx(1.5, abs=0.02)
        return
    # WaveGrad: each of the 4 segments between neighbouring noise levels is hit a quarter of the
    # time, uniformly inside; the first segment reaches clean data (level 1).
    levels = torch.cat([torch.ones(1, dtype=torch.float64), schedule.alpha_bar.sqrt()])
    for i in range(4):
        inside = (t <= levels[i]) & (t > levels[i + 1])
        assert inside.float().mean().item() == pytest.approx(0.25, abs=0.01)
        assert t[inside].mean().item() == pytest.approx(float(levels[i] + levels[i + 1]) / 2, abs=0.01)


def test_loss_of_the_exact_model_at_fractional_times_is_its_irreducible_error():
    """E||eps - E[eps|x_t]||^2 = alpha^2 s^2 / (alpha^2 s^2 + sigma^2) per dimension, at t = 17.5."""
    schedule = diffwave_schedule()
    diff = Diffusion(schedule)
    data = GaussianData(MEAN, STD)
    x0 = data.sample(40000, torch.Generator().manual_seed(0))
    _, terms = diff.loss(data.model(schedule), x0, t=torch.full((40000,), 17.5), return_terms=True,
                         generator=torch.Generator().manual_seed(1))
    alpha_bar = schedule.alpha_bar_at(torch.tensor(17.5, dtype=torch.float64))
    expected = (alpha_bar * STD**2 / (alpha_bar * STD**2 + 1 - alpha_bar)).mean()
    assert terms["mse"].mean().item() == pytest.approx(expected.item(), rel=0.02)
    assert torch.allclose(terms["alpha"].flatten()[:1] ** 2, alpha_bar.float().reshape(1).double(), rtol=1e-6)


def test_time_choices_are_recorded_and_checked():
    diff = Diffusion("linear", 100, time_input="log_snr", time_sampling="continuous")
    rebuilt = Diffusion.from_config(diff.config)
    assert (rebuilt.time_input, rebuilt.time_sampling) == ("log_snr", "continuous")
    with pytest.raises(ValueError, match="unknown time_input"):
        Diffusion("linear", 100, time_input="sigma")
    with pytest.raises(ValueError, match="time_sampling='discrete'"):
        Diffusion("linear", 100, loss_type="vlb", time_sampling="continuous")
    told = []
    diff.sample(lambda x, t: told.append(t) or torch.zeros_like(x), (2, 3), steps=4)
    grid = diff.sampling_grid(4)
    assert torch.allclose(torch.stack([t[0] for t in told]).double(), 2 * grid.lambdas[:-1], atol=1e-4)


def test_learned_variance_on_a_respaced_grid_interpolates_that_grid_steps_variances():
    """On a 10-step grid the network's variance channel v mixes the *respaced* step's beta and beta-tilde:
    the output's moments follow from exp(v log beta_step + (1 - v) log tilde_step) in closed form."""
    schedule = NoiseSchedule.from_name("linear", 1000)
    data = GaussianData(MEAN, STD)
    diff = Diffusion(schedule, variance="learned_range")
    model = data.model(schedule, learn_variance=True)
    grid = diff.sampling_grid(10, "linspace", sampler="ddpm")
    alphas = [float(a) for a in grid.alphas]
    step_variances = []
    for i in range(len(grid)):
        out = model(torch.zeros(1, 4, dtype=torch.float64), grid.times[i:i + 1])
        frac = (out[0, 4:].clamp(-1, 1) + 1) / 2
        a_t, a_s = alphas[i], alphas[i + 1]
        beta = 1 - (a_t / a_s) ** 2
        tilde = beta * (1 - a_s**2) / (1 - a_t**2)
        step_variances.append(torch.exp(frac * math.log(beta) + (1 - frac) * math.log(max(tilde, 1e-20))))
    step_variances[-1] = torch.zeros(4, dtype=torch.float64)  # no noise on the last step
    samples = diff.sample(model, (40000, 4), start="noise", sampler="ddpm", grid=grid, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(3))
    mean, var = closed_form_ddpm_moments(alphas, step_variances)
    assert torch.allclose(samples.mean(0), mean, atol=4 * (var / 40000).sqrt().max().item())
    assert torch.allclose(samples.var(0), var, rtol=0.03)
    fixed_small, fixed_var = closed_form_ddpm_moments(alphas)
    assert not torch.allclose(var, fixed_var, rtol=0.05)  # the learned variance made a difference


@pytest.mark.parametrize("time_input", ["timestep", "noise_level", "log_snr"])
def test_other_networks_see_what_the_denoiser_sees(time_input):
    """draw_times + q_sample + model_time reproduce the loss's own draws (for value or classifier losses)."""
    diff = Diffusion("cosine", 100, time_input=time_input, time_sampling="continuous")
    x0 = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    told = {}

    def model(x_t, t):
        told["x_t"], told["t"] = x_t, t
        return torch.zeros_like(x_t)

    diff.loss(model, x0, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    t = diff.draw_times(16, generator)
    x_t = diff.q_sample(x0, t, generator=generator)
    assert torch.allclose(x_t, told["x_t"]) and torch.allclose(diff.model_time(t), told["t"])
