"""DPM-Solver-v3's model statistics and the solver that uses them, against closed-form truths.

On Gaussian data the data prediction is exactly linear in the state, x0_theta = l x + m with
l = alpha s^2 / (alpha^2 s^2 + sigma^2) and m = mu (1 - alpha l) per dimension, so the
estimated statistics can be checked entry by entry and, with them, the solver's residual is
zero: a few steps reach what many steps of any other solver reach.
"""

import json
import math

import pytest
import torch

import diffkit
from diffkit import Diffusion, GaussianData, ModelStatistics
from diffkit.analytic import standardized_noise
from diffkit.calibration import calibrate, estimate_model_statistics
from diffkit.sampling import _statistics_step

# Multi-scale data: standard deviations 0.05 to 8 (benchmarks/samplers.py's data B, with a mean).
DATA = GaussianData(torch.linspace(-2, 2, 8), torch.logspace(math.log10(0.05), math.log10(8.0), 8))


def exact_statistics(data: GaussianData, lambdas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alpha = torch.sigmoid(2 * lambdas).sqrt()[:, None]
    sigma = torch.sigmoid(-2 * lambdas).sqrt()[:, None]
    linear = alpha * data.std**2 / (alpha**2 * data.std**2 + sigma**2)
    return linear, data.mean * (1 - alpha * linear)


def test_estimated_statistics_of_the_exact_model_are_the_closed_form():
    diff = Diffusion("linear", 1000)
    stats = estimate_model_statistics(diff, DATA.model(diff.schedule), (256, 8), reference_steps=60,
                                      generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert stats.linear.shape == stats.offset.shape == (60, 8)
    assert float(stats.lambdas[0]) == pytest.approx(0.5 * float(diff.schedule.log_snr[999]))
    assert float(stats.lambdas[-1]) == pytest.approx(0.5 * float(diff.schedule.log_snr[0]))
    linear, offset = exact_statistics(DATA, stats.lambdas)
    assert torch.allclose(stats.linear, linear, atol=1e-7)
    # The first point's state was moved by the prior-mean start with the prediction reused: O(alpha_T).
    assert torch.allclose(stats.offset[1:], offset[1:], atol=1e-7)


def test_with_exact_statistics_five_steps_are_exact_on_data_of_any_scale():
    diff = Diffusion("linear", 1000)
    model = DATA.model(diff.schedule)
    noise = standardized_noise(4000, 8)
    table = torch.linspace(-6, 6, 400, dtype=torch.float64)
    stats = ModelStatistics(table, *exact_statistics(DATA, table))
    kl = {}
    for name, options in (("dpm-v3", {"statistics": stats}), ("unipc", {})):
        x = diff.sample(model, noise.shape, sampler=name, steps=5, noise=noise, dtype=torch.float64, sampler_options=options)
        kl[name] = DATA.kl_per_dim(x)
    assert kl["dpm-v3"] < 1e-4 < 1e-2 < kl["unipc"], kl


def test_without_statistics_the_step_is_dpm_solver_plus_plus():
    zero = ModelStatistics.zero()
    for lam_s, lam_t in ((-5.0, -3.0), (0.0, 0.5), (2.0, 4.6)):
        flow, drift, weights = _statistics_step(zero, lam_s, lam_t, [lam_s])
        alpha_t = math.sqrt(1 / (1 + math.exp(-2 * lam_t)))
        sigma_t, sigma_s = math.sqrt(1 / (1 + math.exp(2 * lam_t))), math.sqrt(1 / (1 + math.exp(2 * lam_s)))
        assert float(flow) == pytest.approx(sigma_t / sigma_s, rel=1e-12)
        assert float(drift) == 0.0
        assert float(weights[0]) == pytest.approx(alpha_t * (1 - math.exp(-(lam_t - lam_s))), rel=1e-5)


def test_interpolation_is_smooth_and_held_at_the_ends():
    table = torch.tensor([-2.0, -1.5, -0.7, 0.0, 0.4, 1.0, 1.9, 2.2, 3.0], dtype=torch.float64)  # uneven
    quadratic = (table**2 - table)[:, None] * torch.tensor([1.0, -2.0], dtype=torch.float64)
    stats = ModelStatistics(table, quadratic, 3 * quadratic)
    points = torch.tensor([-2.0, -1.3, 0.05, 2.99, 5.0], dtype=torch.float64)
    linear, offset = stats.at(points)
    inside = points.clamp(-2, 3)
    expected = (inside**2 - inside)[:, None] * torch.tensor([1.0, -2.0], dtype=torch.float64)
    assert torch.allclose(linear, expected, atol=1e-12) and torch.allclose(offset, 3 * expected, atol=1e-12)


def test_calibration_makes_dpm_v3_the_default_and_survives_a_round_trip():
    diff = Diffusion("linear", 1000)
    model = DATA.model(diff.schedule)
    assert diff.default_sampler == "unipc"
    before = diff.config
    calibrated = calibrate(diff, model, (128, 8), steps=(5,), generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64, max_evals=30, reference_steps=80)
    assert diff.config == before and diff.default_sampler == "unipc"  # the one passed in is unchanged
    diff = calibrated
    assert diff.default_sampler == "dpm-v3" and set(diff.calibration["grids"]) == {"dpm-v3/5"}
    again = Diffusion.from_config(json.loads(json.dumps(diff.config)))
    noise = standardized_noise(2000, 8)
    x = again.sample(model, noise.shape, steps=5, noise=noise, dtype=torch.float64)
    assert torch.equal(x, diff.sample(model, noise.shape, steps=5, noise=noise, dtype=torch.float64))
    assert DATA.kl_per_dim(x) < 1e-4
    # Another shape gets the statistics averaged over the elements, and still samples.
    averaged = again.model_statistics((3,))
    assert averaged.linear.shape == (80,)
    assert torch.allclose(averaged.linear, again.model_statistics().linear.mean(dim=1))
    out = again.sample(model=GaussianData(torch.zeros(3), torch.ones(3)).model(again.schedule), shape=(16, 3), steps=5)
    assert out.shape == (16, 3) and torch.isfinite(out).all()


def test_known_values_stay_known_with_dpm_v3():
    diff = Diffusion("linear", 1000)
    model = DATA.model(diff.schedule)
    table = torch.linspace(-6, 6, 100, dtype=torch.float64)
    stats = ModelStatistics(table, *exact_statistics(DATA, table))
    known = torch.zeros(64, 8, dtype=torch.bool)
    known[:, :3] = True
    values = torch.full((64, 8), 0.7, dtype=torch.float64)
    out = diff.sample(model, (64, 8), sampler="dpm-v3", steps=8, dtype=torch.float64, sampler_options={"statistics": stats},
                      wrappers=[diffkit.KnownValues(known, values)], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out[:, :3], values[:, :3], atol=1e-6)


def test_bad_statistics_raise():
    table = torch.linspace(0, 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="increasing"):
        ModelStatistics(table.flip(0), torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="one entry per point"):
        ModelStatistics(table, torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        ModelStatistics(table, torch.tensor([0.0, float("nan"), 0.0, 0.0]), torch.zeros(4))
    with pytest.raises(ValueError, match="statistics"):
        Diffusion("linear", 100, calibration={"statistics": {"lambdas": [0.0, 1.0], "linear": [0.0, 0.0]}})
    with pytest.raises(ValueError, match="not valid"):
        Diffusion("linear", 100, calibration={"statistics": {"lambdas": [1.0, 0.0], "linear": [0.0, 0.0], "offset": [0.0, 0.0]}})
    diff = Diffusion("linear", 100)
    with pytest.raises(ValueError, match="reference_steps"):
        estimate_model_statistics(diff, DATA.model(diff.schedule), (8, 8), reference_steps=1)
    with pytest.raises(ValueError, match="grid_batch"):
        calibrate(diff, DATA.model(diff.schedule), (8, 8), steps=(3,), grid_batch=1, reference_steps=10,
                  generator=torch.Generator().manual_seed(0))


def test_statistics_that_no_fitted_grid_uses_are_not_kept(monkeypatch):
    import diffkit.calibration as calibration

    diff = Diffusion("linear", 1000)
    model = DATA.model(diff.schedule)
    real = calibration.optimize_grid

    def prefer(winner):
        def fake(diffusion, model, noise, steps, sampler, *, sampler_options=None, **kwargs):
            grid, info = real(diffusion, model, noise, steps, sampler, sampler_options=sampler_options,
                              **{**kwargs, "max_evals": 2})
            # Make the chosen variant score better, whatever the search found.
            return grid, {**info, "final": 0.0 if sampler_options == winner else 1.0}
        return fake

    monkeypatch.setattr(calibration, "optimize_grid", prefer({"statistics": None}))
    diff = calibrate(diff, model, (32, 8), steps=(3, 4), generator=torch.Generator().manual_seed(0),
                     dtype=torch.float64, reference_steps=20)
    assert "statistics" not in diff.calibration
    assert all(entry["sampler_options"] == {"statistics": None} for entry in diff.calibration["grids"].values())
    assert diff.default_sampler == "dpm-v3"  # its fitted grids still make it the default
    monkeypatch.setattr(calibration, "optimize_grid", prefer({}))
    kept = Diffusion("linear", 1000)
    kept = calibrate(kept, model, (32, 8), steps=(3,), generator=torch.Generator().manual_seed(0),
                     dtype=torch.float64, reference_steps=20)
    assert "statistics" in kept.calibration and kept.calibration["grids"]["dpm-v3/3"]["sampler_options"] == {}
