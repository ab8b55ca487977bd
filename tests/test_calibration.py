"""Calibration against closed-form truths: fitted grids and Analytic-DPM variances on exact Gaussian models."""

import json

import pytest
import torch

from diffkit import Diffusion, GaussianData, SamplingGrid
from diffkit.analytic import standardized_noise
from diffkit.calibration import (
    analytic_variances,
    calibrate,
    estimate_eps_norms,
    estimate_reverse_statistics,
    optimize_grid,
)
from diffkit.process import posterior_coefficients, transition_variance

# The core accuracy issue's test: 16-D, means of order 2, standard deviations 0.1 to 1.6.
DATA = GaussianData(torch.linspace(1, 3, 16), torch.linspace(0.1, 1.6, 16))


@pytest.fixture(scope="module")
def calibrated():
    diff = Diffusion("linear", 1000)
    model = DATA.model(diff.schedule)
    diff = calibrate(diff, model, (128, 16), data=DATA.sample(512, torch.Generator().manual_seed(5)), steps=(5, 10),
                     generator=torch.Generator().manual_seed(7), dtype=torch.float64, max_evals=250)
    return diff, model


def test_fitted_grids_meet_the_issue_targets_and_beat_the_default(calibrated):
    diff, model = calibrated
    plain = Diffusion("linear", 1000)
    noise = standardized_noise(4000, 16)  # other draws than the calibration batch
    for steps, target in ((5, 1.3e-3), (10, 3.3e-4)):
        ours = DATA.kl_per_dim(diff.sample(model, noise.shape, steps=steps, noise=noise, dtype=torch.float64))
        default = DATA.kl_per_dim(plain.sample(model, noise.shape, steps=steps, noise=noise, dtype=torch.float64))
        assert ours < target, f"{steps} calls: calibrated KL {ours:.2e} nats/dim, target {target:.1e}"
        assert ours < 0.15 * default, f"{steps} calls: calibrated {ours:.2e} vs default {default:.2e}"


def test_analytic_bound_is_tight_and_never_below_the_exact_nll(calibrated):
    diff, model = calibrated
    entropy = DATA.entropy_bits_per_dim()
    # In closed form (no Monte-Carlo noise), with the estimated eps norms: 0.0027 bits/dim above.
    for steps in (None, 100, 20):
        grid = (SamplingGrid.from_times(diff.schedule, torch.arange(999, -1, -1)) if steps is None
                else diff.sampling_grid(steps, "linspace"))
        gap = DATA.expected_bound_bits_per_dim(diff.schedule, grid, analytic_variances(
            grid, torch.tensor(diff.calibration["eps_norm_sq"]))) - entropy
        assert 0.0 < gap < (0.05 if steps is None else 0.5), f"{steps} steps: analytic bound gap {gap:.4f} bits/dim"
    # The fixed-small bound it replaces, in closed form too: 0.82 bits/dim above on this data.
    full = SamplingGrid.from_times(diff.schedule, torch.arange(999, -1, -1))
    fixed = torch.tensor([posterior_coefficients(*full.step_scales(i))[2] for i in range(999)] + [full.decoder_variance()])
    assert DATA.expected_bound_bits_per_dim(diff.schedule, full, fixed) - entropy > 0.8
    # And the Monte-Carlo estimate nll computes (the default once calibrated) agrees within its noise.
    x0 = DATA.sample(1024, torch.Generator().manual_seed(0))
    exact = DATA.nll_bits_per_dim(x0).mean().item()
    bpd, terms = diff.nll(model, x0, generator=torch.Generator().manual_seed(1), return_terms=True)
    gap = bpd.mean().item() - exact
    assert terms["analytic"] is True
    assert -0.03 < gap < 0.04, f"analytic bound {gap:.4f} bits/dim from the exact NLL"
    assert (terms["kl"].mean(0) >= -1e-3).all()


def test_eps_norm_estimate_matches_the_closed_form():
    diff = Diffusion("linear", 1000)
    data = GaussianData(torch.zeros(8), torch.linspace(0.2, 1.0, 8))
    gamma = estimate_eps_norms(diff, data.model(diff.schedule), data.sample(1024, torch.Generator().manual_seed(0)),
                               generator=torch.Generator().manual_seed(1))
    t = torch.arange(1000)
    a2, s2 = diff.schedule.alpha_bar_at(t)[:, None], 1 - diff.schedule.alpha_bar_at(t)[:, None]
    exact = (s2 / (a2 * data.std**2 + s2)).mean(1)  # E||E[eps|x_t]||^2 / d for zero-mean Gaussian data
    assert gamma.shape == (1000,)
    assert (gamma - exact).abs().max() < 0.03
    assert (gamma[700:] - exact[700:]).abs().max() < 5e-3  # the control variate at work where eps_theta ~ eps
    # What the estimate is for: the bound with estimated norms is the bound with exact ones.
    grid = SamplingGrid.from_times(diff.schedule, torch.arange(999, -1, -1))
    bounds = [data.expected_bound_bits_per_dim(diff.schedule, grid, analytic_variances(grid, g)) for g in (gamma, exact)]
    assert bounds[0] == pytest.approx(bounds[1], abs=1e-3)
    assert 0 < bounds[1] - data.entropy_bits_per_dim() < 0.01


def test_x0_error_estimate_of_the_exact_model_is_the_posterior_variance():
    diff = Diffusion("linear", 1000)
    data = GaussianData(torch.linspace(-1, 1, 8), torch.linspace(0.2, 1.0, 8))
    stats = estimate_reverse_statistics(diff, data.model(diff.schedule), data.sample(2048, torch.Generator().manual_seed(0)),
                                        generator=torch.Generator().manual_seed(1), times=list(range(0, 1000, 50)) + [999])
    t = torch.arange(1000)
    a2, s2 = diff.schedule.alpha_bar_at(t)[:, None], 1 - diff.schedule.alpha_bar_at(t)[:, None]
    exact = (data.std**2 * s2 / (a2 * data.std**2 + s2)).mean(1)  # E Var[x0 | x_t] / d
    assert stats["x0_mse"].shape == (1000,)
    measured = torch.tensor(list(range(0, 1000, 50)) + [999])  # in between it is interpolated
    assert torch.allclose(stats["x0_mse"][measured], exact[measured], rtol=0.06, atol=1e-6)


def test_x0_error_variances_keep_the_bound_of_an_imperfect_model_where_analytic_dpm_collapses():
    """A network whose x0 is off by 0.05 everywhere: at low noise its eps norm exceeds the
    exact model's, Analytic-DPM reads that as a certain x0 and shrinks the decoder to nothing;
    the measured x0 error gives the variance that is optimal for this network."""
    diff = Diffusion("linear", 1000)
    data = GaussianData(torch.linspace(-1, 1, 4), torch.linspace(0.2, 1.0, 4))
    exact_model = data.model(diff.schedule, prediction="x0")
    imperfect = lambda x_t, t: exact_model(x_t, t) + 0.05  # noqa: E731
    diff = Diffusion("linear", 1000, prediction="x0")
    stats = estimate_reverse_statistics(diff, imperfect, data.sample(1024, torch.Generator().manual_seed(0)),
                                        generator=torch.Generator().manual_seed(1), times=list(range(0, 1000, 50)) + [999])
    assert stats["eps_norm_sq"][0] > 1.0  # what breaks Analytic-DPM
    x0 = data.sample(512, torch.Generator().manual_seed(2))
    bounds = {}
    for name, calibration in {"fixed": None, "eps_norm_sq only": {"eps_norm_sq": stats["eps_norm_sq"].tolist()},
                              "x0_mse": {k: v.tolist() for k, v in stats.items()}}.items():
        calibrated = Diffusion("linear", 1000, prediction="x0", calibration=calibration)
        bounds[name] = calibrated.nll(imperfect, x0, steps=100, generator=torch.Generator().manual_seed(3)).mean().item()
    exact_nll = data.nll_bits_per_dim(x0).mean().item()
    assert bounds["eps_norm_sq only"] > bounds["fixed"] + 10  # the collapse
    assert exact_nll < bounds["x0_mse"] < bounds["fixed"], bounds


@pytest.mark.parametrize("prediction, time_input", [("v", "log_snr"), ("x0", "noise_level")])
def test_eps_norms_are_the_same_for_every_prediction_and_time_input(prediction, time_input):
    data = GaussianData(torch.zeros(2, 3), torch.full((2, 3), 0.5))
    ref = Diffusion("cosine", 100)
    other = Diffusion("cosine", 100, prediction=prediction, time_input=time_input)
    x0 = data.sample(64, torch.Generator().manual_seed(0))
    expected = estimate_eps_norms(ref, data.model(ref.schedule), x0, generator=torch.Generator().manual_seed(1))

    def model(x_t, t, *, label):  # conditions pass through; other time inputs map back to times
        assert label.shape[0] == x_t.shape[0]
        times = {"log_snr": lambda v: other.schedule.timestep_for_log_snr(v.double()),
                 "noise_level": lambda v: other.schedule.time_for_alpha_bar(v.double() ** 2)}[time_input](t)
        return data.model(other.schedule, prediction)(x_t, times)

    got = estimate_eps_norms(other, model, x0, generator=torch.Generator().manual_seed(1), batch_size=16,
                             label=torch.zeros(64))
    assert torch.allclose(got, expected, atol=1e-6)


def test_calibration_survives_a_config_round_trip(calibrated):
    diff, _ = calibrated
    config = json.loads(json.dumps(diff.config))
    again = Diffusion.from_config(config)
    assert again.calibration == diff.calibration
    assert again.config == config
    assert set(diff.calibration["grids"]) == {"dpm-v3/5", "dpm-v3/10"}
    assert again.model_statistics().linear.shape == (200, 16)
    assert len(diff.calibration["eps_norm_sq"]) == 1000
    assert "calibration" not in Diffusion("linear", 1000).config  # uncalibrated configs are unchanged
    config["calibration"]["grids"].clear()
    assert diff.config["calibration"]["grids"] and again.calibration["grids"]  # configs are copies


def test_sample_uses_the_stored_grid_and_options():
    diff = Diffusion("linear", 1000, calibration={"grids": {"unipc/4": {"times": [999, 600.5, 120, 7],
                                                                          "sampler_options": {"variant": "bh1"}}}})
    data = GaussianData(torch.zeros(4), torch.ones(4))
    seen = []

    def model(x_t, t):
        seen.append(float(t[0]))
        return data.model(diff.schedule)(x_t, t)

    out = diff.sample(model, (8, 4), steps=4, generator=torch.Generator().manual_seed(0))
    assert seen == pytest.approx([999.0, 600.5, 120.0, 7.0])
    # The stored options were used: bh1 and bh2 give different samples from the same noise.
    noise = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    bh1 = diff.sample(model, (8, 4), steps=4, noise=noise)
    bh2 = diff.sample(model, (8, 4), steps=4, noise=noise, sampler_options={"variant": "bh2"})
    assert torch.equal(out, bh1) and not torch.allclose(bh1, bh2)
    seen.clear()
    diff.sample(model, (8, 4), steps=5)  # no stored grid: the default one
    assert seen == pytest.approx(diff.sampling_grid(5).times.tolist()) and 600.5 not in seen
    seen.clear()
    diff.sample(model, (8, 4), grid=[999, 500, 0])  # an explicit grid always wins
    assert seen == [999.0, 500.0, 0.0]
    assert diff.sampling_grid(4).times.tolist() == [999.0, 600.5, 120.0, 7.0]
    assert diff.sampling_grid(4, calibrated=False).times.tolist() != [999.0, 600.5, 120.0, 7.0]
    assert diff.sampling_grid(4, "logsnr").times.tolist() != [999.0, 600.5, 120.0, 7.0]


def test_ddpm_with_analytic_variances_beats_fixed_small(calibrated):
    diff, model = calibrated
    noise = standardized_noise(4000, 16)
    kls = {}
    for variance in ("analytic", "fixed_small"):
        x = diff.sample(model, noise.shape, sampler="ddpm", steps=50, noise=noise, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(3), sampler_options={"variance": variance})
        kls[variance] = DATA.kl_per_dim(x)
    assert kls["analytic"] < 0.5 * kls["fixed_small"], kls


def test_analytic_variances_lie_between_the_bounds():
    diff = Diffusion("cosine", 200)
    grid = diff.sampling_grid(20, "linspace")
    var = analytic_variances(grid, torch.linspace(0.0, 1.0, 200))
    for i in range(len(grid) - 1):
        tilde = posterior_coefficients(*grid.step_scales(i))[2]
        beta = transition_variance(*grid.step_scales(i))
        assert tilde * (1 - 1e-9) <= float(var[i]) <= beta * (1 + 1e-9)
    assert float(var[-1]) > 0
    # The x0 error alone is enough; neither is an error that names both.
    by_error = analytic_variances(grid, x0_mse=torch.full((200,), 0.01))
    assert torch.isfinite(by_error).all() and float(by_error[-1]) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="x0_mse.*eps_norm_sq"):
        analytic_variances(grid)


@pytest.mark.parametrize("schedule", ["flow", "zero-snr"])
def test_analytic_dpm_variances_are_finite_where_no_signal_is_left(schedule):
    """At a top point with alpha = 0, (sigma / alpha)^2 (1 - Gamma) is infinity times zero:
    the step takes its upper bound instead of a NaN that would poison the whole bound."""
    diff = (Diffusion("flow", 200, "x0") if schedule == "flow"
            else Diffusion("cosine", 200, "v", zero_terminal_snr=True))
    grid = diff.sampling_grid(10, "linspace")
    assert float(grid.alphas[0]) == 0.0
    for gamma in (torch.ones(200), torch.linspace(0.5, 1.0, 200)):
        var = analytic_variances(grid, gamma)
        assert torch.isfinite(var).all()
        assert float(var[0]) == pytest.approx(transition_variance(*grid.step_scales(0)), rel=1e-12)
        for i in range(1, len(grid) - 1):
            tilde = posterior_coefficients(*grid.step_scales(i))[2]
            assert tilde * (1 - 1e-9) <= float(var[i]) <= transition_variance(*grid.step_scales(i)) * (1 + 1e-9)


def test_optimize_grid_is_never_worse_than_its_start_and_works_on_any_shape():
    data = GaussianData(torch.zeros(2, 2, 2), torch.full((2, 2, 2), 0.3))
    diff = Diffusion("cosine", 200, prediction="v")
    model = data.model(diff.schedule, "v")
    grid, info = optimize_grid(diff, model, (32, 2, 2, 2), 4, "dpm++2m", max_evals=40, return_history=True,
                               generator=torch.Generator().manual_seed(0))
    assert isinstance(grid, SamplingGrid) and len(grid) == 4 and float(grid.times[0]) == 199
    assert info["final"] <= info["initial"] and info["evals"] <= 40


def test_bad_calibration_inputs_raise():
    diff = Diffusion("linear", 100)
    data = GaussianData(torch.zeros(3), torch.ones(3))
    model = data.model(diff.schedule)
    with pytest.raises(ValueError, match="eps_norm_sq"):
        Diffusion("linear", 100, calibration={"eps_norm_sq": [1.0] * 99})
    with pytest.raises(ValueError, match="unknown sampler"):
        Diffusion("linear", 100, calibration={"grids": {"nope/3": [99, 50, 0]}})
    with pytest.raises(ValueError, match="holds 3 times"):
        Diffusion("linear", 100, calibration={"grids": {"unipc/4": [99, 50, 0]}})
    with pytest.raises(ValueError, match="decreasing"):
        Diffusion("linear", 100, calibration={"grids": {"unipc/3": [50, 99, 0]}})
    with pytest.raises(ValueError, match="unknown calibration"):
        Diffusion("linear", 100, calibration={"grid": {}})
    with pytest.raises(ValueError, match="unknown calibration"):
        diff.with_calibration({"grid": {}})  # checked like the constructor argument
    with pytest.raises(AttributeError, match="with_calibration"):
        diff.calibration = {}  # a Diffusion never changes once built
    assert diff.calibration == {}
    with pytest.raises(ValueError, match=r"optimal \(analytic\) variances need"):
        diff.nll(model, data.sample(4), analytic=True)
    with pytest.raises(ValueError, match=r"optimal \(analytic\) variances need"):
        diff.sample(model, (4, 3), sampler="ddpm", steps=10, sampler_options={"variance": "analytic"})
    with pytest.raises(ValueError, match="deterministic"):
        optimize_grid(diff, model, (8, 3), 5, "ddpm")
    with pytest.raises(ValueError, match="steps must be"):
        optimize_grid(diff, model, (8, 3), 1)
    with pytest.raises(ValueError, match="data must be"):
        estimate_eps_norms(diff, model, torch.zeros(3))
    with pytest.raises(ValueError, match="needs noise_or_shape"):
        calibrate(diff, model)
    learned = Diffusion("linear", 100, variance="learned_range", calibration={"eps_norm_sq": [1.0] * 100})
    with pytest.raises(ValueError, match="learns its variance"):
        learned.nll(data.model(learned.schedule, learn_variance=True), data.sample(4), analytic=True)
