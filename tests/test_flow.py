"""The flow-matching path and the probability-flow likelihood, against closed forms on Gaussian data."""

import math

import pytest
import torch

from diffkit import SAMPLERS, Diffusion, GaussianData, KnownValues, WarmStart
from diffkit.calibration import calibrate
from diffkit.likelihood import Estimate
from diffkit.parameterization import from_x0_eps, to_x0_eps
from diffkit.schedules import FlowSchedule, NoiseSchedule, respace

DATA = GaussianData(torch.tensor([0.5, -1.0, 0.2, 1.5]), torch.tensor([0.7, 1.2, 0.3, 1.0]))


def test_flow_schedule_is_the_straight_path_with_a_variance_preserving_twin():
    schedule = NoiseSchedule.from_name("flow", 100)
    assert isinstance(schedule, FlowSchedule) and schedule.time_range == (0.0, 1.0)
    s = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(schedule.alpha_at(s), 1 - s) and torch.allclose(schedule.sigma_at(s), s)
    c = schedule.input_scale_at(s)
    # The variance-preserving state x / c has alpha_bar = (1 - s)^2 / c^2.
    assert torch.allclose(schedule.alpha_bar_at(s), ((1 - s) / c) ** 2)
    assert torch.allclose(schedule.time_for_alpha_bar(schedule.alpha_bar_at(s)), s)
    inner = s[1:-1]
    assert torch.allclose(schedule.timestep_for_log_snr(schedule.log_snr_at(inner)), inner)
    # The table holds s_k = (k + 1) / T and ends at pure noise.
    assert torch.allclose(schedule.alpha_bar, schedule.alpha_bar_at(torch.arange(1, 101) / 100))
    assert schedule.alpha_bar[-1] == 0
    with pytest.raises(ValueError, match="outside"):
        schedule.alpha_at(torch.tensor(1.5))


def test_flow_respacing_is_continuous_and_starts_at_pure_noise():
    schedule = FlowSchedule.with_steps(1000)
    assert torch.allclose(respace(schedule, 4, "trailing"), torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64))
    for spacing in ("logsnr", "karras"):
        times = respace(schedule, 8, spacing)
        assert times[0] == 1.0 and (times[1:] < times[:-1]).all() and times[-1] > 0
    warm = respace(schedule, 5, "logsnr", max_time=0.4)
    assert warm[0] == 0.4 and (warm < 0.4 + 1e-12).all()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
def test_conversions_round_trip_on_the_flow_path(prediction):
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    alpha, sigma = torch.tensor(0.3), torch.tensor(0.7)  # alpha + sigma = 1, alpha^2 + sigma^2 != 1
    x_t = alpha * x0 + sigma * eps
    back_x0, back_eps = to_x0_eps(prediction, from_x0_eps(prediction, x0, eps, alpha, sigma), x_t, alpha, sigma)
    assert torch.allclose(back_x0, x0, atol=1e-5) and torch.allclose(back_eps, eps, atol=1e-5)
    assert torch.allclose(from_x0_eps("flow", x0, eps, alpha, sigma), eps - x0)


def test_flow_loss_regresses_the_velocity_on_the_straight_path():
    diff = Diffusion("flow", 1000, "flow")
    x0 = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(2))
    t = torch.linspace(0.05, 0.95, 6, dtype=torch.float64)
    seen = {}

    def model(x_t, times):
        seen["x_t"], seen["t"] = x_t, times
        return torch.zeros_like(x_t)

    loss = diff.loss(model, x0, t=t, noise=noise)
    s = t.float()[:, None]
    assert torch.allclose(seen["x_t"], (1 - s) * x0 + s * noise, atol=1e-6)
    assert torch.allclose(seen["t"], t.float())  # the network is told s itself
    assert loss.item() == pytest.approx(float(((noise - x0) ** 2).mean()), rel=1e-5)


@pytest.mark.parametrize("time_sampling", ["continuous", "logit_normal", "discrete"])
def test_flow_time_draws(time_sampling):
    diff = Diffusion("flow", 1000, "flow", time_sampling=time_sampling, logit_normal=(0.0, 1.0))
    t = diff.draw_times(4000, torch.Generator().manual_seed(0))
    assert (t >= 0).all() and (t <= 1).all()
    if time_sampling == "logit_normal":
        logits = torch.log(t) - torch.log1p(-t)
        assert abs(float(logits.mean())) < 0.08 and abs(float(logits.std()) - 1.0) < 0.05
        assert diff.config["logit_normal"] == [0.0, 1.0]
    if time_sampling == "discrete":
        assert torch.allclose(t * 1000, (t * 1000).round())
    rebuilt = Diffusion.from_config(diff.config)
    assert rebuilt.time_sampling == time_sampling and isinstance(rebuilt.schedule, FlowSchedule)


def test_flow_needs_a_prediction_that_survives_pure_noise():
    with pytest.raises(ValueError, match="alpha = 0"):
        Diffusion("flow", 1000, "eps")
    with pytest.raises(ValueError, match="loss_type='simple'"):
        Diffusion("flow", 1000, "flow", loss_type="vlb", variance="learned_range", time_sampling="discrete")


def test_rectified_flow_euler_is_ddim_on_the_flow_path():
    diff = Diffusion("flow", 1000, "flow")
    model = DATA.model(diff.schedule, "flow")
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    K = 8
    x = noise.clone()
    for i in range(K):  # x_{s'} = x_s + (s' - s) v(x_s, s) on s_i = 1 - i / K
        s, s_next = 1 - i / K, 1 - (i + 1) / K
        x = x + (s_next - s) * model(x, torch.full((64,), s, dtype=torch.float64))
    ddim = diff.sample(model, (64, 4), sampler="ddim", steps=K, noise=noise, dtype=torch.float64, start="noise")
    assert torch.allclose(ddim, x, atol=1e-10)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_the_flow_path_to_the_data(sampler):
    diff = Diffusion("flow", 1000, "flow")
    model = DATA.model(diff.schedule, "flow")
    steps = 200 if sampler == "ddpm" else 40
    out = diff.sample(model, (3000, 4), sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
    assert DATA.kl_per_dim(out) < 0.02


def test_known_values_and_warm_starts_on_the_flow_path():
    diff = Diffusion("flow", 1000, "flow")
    model = DATA.model(diff.schedule, "flow")
    known = torch.zeros(50, 4)
    mask = torch.zeros(50, 4, dtype=torch.bool)
    mask[:, 0] = True
    known[:, 0] = 0.123
    out = diff.sample(model, (50, 4), steps=10, wrappers=[KnownValues(mask, known)],
                      generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out[:, 0], known[:, 0], atol=1e-6)
    seen = []

    def recording(x_t, t):
        seen.append(x_t[:, 0].clone())
        return model(x_t, t)

    clean = diff.sample(recording, (50, 4), steps=6, wrappers=[KnownValues(mask, known, clean=True)],
                        generator=torch.Generator().manual_seed(0))
    assert torch.allclose(clean[:, 0], known[:, 0], atol=1e-6)
    assert all(torch.allclose(column, known[:, 0], atol=1e-6) for column in seen)  # the network sees the value
    init = DATA.sample(50, torch.Generator().manual_seed(1)).float()
    close = diff.sample(model, (50, 4), start=WarmStart(init, 0.05), steps=5, generator=torch.Generator().manual_seed(2))
    far = diff.sample(model, (50, 4), start=WarmStart(init, 0.9), steps=5, generator=torch.Generator().manual_seed(2))
    assert (close - init).abs().mean() < 0.5 * (far - init).abs().mean()


@pytest.mark.parametrize("schedule,prediction", [("linear", "eps"), ("flow", "flow"), ("cosine", "v")])
def test_ode_likelihood_matches_the_closed_form(schedule, prediction):
    diff = Diffusion(schedule, 1000, prediction)
    model = DATA.model(diff.schedule, prediction)
    x0 = DATA.sample(64, torch.Generator().manual_seed(2)).float()
    bpd, terms = diff.nll(model, x0, method="ode", return_terms=True)
    exact = DATA.nll_bits_per_dim(x0)
    assert terms["divergence_method"] == "exact"
    assert float((bpd.double() - exact).abs().mean()) < 0.01
    assert float((bpd.double() - exact).abs().max()) < 0.02
    assert terms["stderr"] == pytest.approx(float(bpd.double().std() / math.sqrt(64)), rel=1e-4)


def test_ode_likelihood_hutchinson_is_reproducible_and_unbiased():
    # A rotated Gaussian: a full Jacobian, so Hutchinson's estimate differs from the trace.
    diff = Diffusion("flow", 1000, "flow")
    rotation = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64))[0]
    model = DATA.model(diff.schedule, "flow")

    def rotated(x_t, t):
        return (model(x_t.double() @ rotation, t).double() @ rotation.T).to(x_t.dtype)

    x0 = (DATA.sample(64, torch.Generator().manual_seed(2)) @ rotation.T).float()
    exact = DATA.nll_bits_per_dim(x0.double() @ rotation)
    runs = [diff.nll(rotated, x0, method="ode", divergence="hutchinson", probes=2, ode_steps=24,
                     generator=torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert abs(float((runs[0].double() - exact).mean())) < 0.05


def test_ode_likelihood_counts_only_the_masked_dimensions():
    diff = Diffusion("linear", 1000, "eps")
    model = DATA.model(diff.schedule, "eps")
    x0 = DATA.sample(32, torch.Generator().manual_seed(4)).float()
    mask = torch.tensor([True, True, False, False])
    bpd = diff.nll(model, x0, method="ode", mask=mask)
    z = (x0.double() - DATA.mean) / DATA.std
    nats = 0.5 * (z**2 + math.log(2 * math.pi)) + torch.log(DATA.std)
    expected = nats[:, :2].mean(dim=1) / math.log(2)  # independent dimensions: the counted ones' marginal
    assert float((bpd.double() - expected).abs().max()) < 0.02


def test_estimate_reports_mean_and_standard_error():
    estimate = Estimate.of(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert estimate.mean == 2.5 and estimate.stderr == pytest.approx(math.sqrt(5 / 3) / 2)
    assert str(estimate) == "2.5000 ± 0.6455"


def test_calibration_on_the_flow_path():
    diff = Diffusion("flow", 1000, "flow")
    model = DATA.model(diff.schedule, "flow")
    noise = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    calibrated = calibrate(diff, model, noise, steps=(5,), max_evals=40, reference_steps=60,
                           data=DATA.sample(128, torch.Generator().manual_seed(1)).float())
    assert isinstance(calibrated, Diffusion) and calibrated is not diff and diff.calibration == {}
    key = f"{calibrated.default_sampler}/5"
    assert key in calibrated.calibration["grids"]
    times = torch.tensor(calibrated.calibration["grids"][key]["times"])
    assert times[0] == 1.0 and (times > 0).all() and (times <= 1).all()
    fresh = torch.randn(4000, 4, generator=torch.Generator().manual_seed(9))
    before = DATA.kl_per_dim(diff.sample(model, (4000, 4), steps=5, noise=fresh))
    after = DATA.kl_per_dim(calibrated.sample(model, (4000, 4), steps=5, noise=fresh))
    assert after < before
