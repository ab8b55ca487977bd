"""Schedules and respacing: properties that must hold for every schedule and every spacing."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffkit
from diffkit.schedules import NoiseSchedule, respace, schedule_from_config

# The table schedules; the flow path (continuous time) has its own tests in test_flow.py.
schedule_names = st.sampled_from([name for name in diffkit.SCHEDULES if name != "flow"])
timestep_counts = st.integers(min_value=2, max_value=1200)


@settings(max_examples=60, deadline=None)
@given(name=schedule_names, T=timestep_counts, zero_terminal=st.booleans())
def test_alpha_bar_strictly_decreasing_and_variances_positive(name, T, zero_terminal):
    schedule = NoiseSchedule.from_name(name, T, zero_terminal_snr=zero_terminal)
    alpha_bar = schedule.alpha_bar
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()
    assert (schedule.betas > 0).all() and (schedule.betas <= 1).all()
    assert (schedule.sigma_at(torch.arange(T)) > 0).all()
    assert torch.isclose(schedule.alpha_at(torch.arange(T)) ** 2 + schedule.sigma_at(torch.arange(T)) ** 2,
                         torch.ones((), dtype=torch.float64)).all()
    log_snr = schedule.log_snr
    assert (log_snr[1:] < log_snr[:-1]).all()
    if zero_terminal:
        assert alpha_bar[-1] == 0 and torch.isneginf(log_snr[-1])


def test_named_schedules_match_their_definitions():
    linear = NoiseSchedule.from_name("linear", 1000)
    assert linear.betas[0].item() == pytest.approx(1e-4) and linear.betas[-1].item() == pytest.approx(0.02)
    scaled = NoiseSchedule.from_name("scaled_linear", 1000)
    assert scaled.betas[0].item() == pytest.approx(0.00085) and scaled.betas[-1].item() == pytest.approx(0.012)
    cosine = NoiseSchedule.from_name("cosine", 1000)
    s = 0.008
    expected = math.cos((500 / 1000 + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    assert cosine.alpha_bar[499].item() == pytest.approx(expected, rel=1e-6)
    sqrt = NoiseSchedule.from_name("sqrt", 2000)
    # Diffusion-LM: alpha_bar(t) = 1 - sqrt(t/T + 1e-4), normalised by its value at 0
    assert sqrt.alpha_bar[999].item() == pytest.approx((1 - math.sqrt(1000 / 2000 + 1e-4)) / (1 - math.sqrt(1e-4)), rel=1e-6)


def test_linear_matches_diffusers_alphas_cumprod():
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod.double()
    ours = NoiseSchedule.from_name("linear", 1000).alpha_bar
    assert torch.allclose(ours, reference, rtol=1e-5)
    cosine_ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    assert torch.allclose(NoiseSchedule.from_name("cosine", 1000).alpha_bar, cosine_ref, rtol=1e-4)


def test_zero_terminal_snr_keeps_the_first_step_and_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ours = NoiseSchedule.from_name("scaled_linear", 1000, zero_terminal_snr=True)
    plain = NoiseSchedule.from_name("scaled_linear", 1000)
    assert ours.alpha_bar[0].item() == pytest.approx(plain.alpha_bar[0].item(), rel=1e-9)
    reference = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         rescale_betas_zero_snr=True).alphas_cumprod.double()
    assert torch.allclose(ours.alpha_bar[:-1], reference[:-1], rtol=1e-4, atol=1e-7)


def test_interpolation_hits_the_table_and_lies_between_neighbours():
    schedule = NoiseSchedule.from_name("cosine", 100)
    steps = torch.arange(100)
    assert torch.equal(schedule.alpha_bar_at(steps.double()), schedule.alpha_bar)
    mid = schedule.alpha_bar_at(torch.tensor([10.5], dtype=torch.float64))
    assert schedule.alpha_bar[11] < mid < schedule.alpha_bar[10]
    assert schedule.alpha_bar_at(torch.tensor(-1)).item() == 1.0  # clean data


@settings(max_examples=40, deadline=None)
@given(t=st.floats(min_value=0.0, max_value=999.0))
def test_timestep_for_log_snr_inverts_log_snr(t):
    schedule = NoiseSchedule.from_name("linear", 1000)
    t_tensor = torch.tensor([t], dtype=torch.float64)
    recovered = schedule.timestep_for_log_snr(schedule.log_snr_at(t_tensor))
    assert recovered.item() == pytest.approx(t, abs=1e-3)


@settings(max_examples=80, deadline=None)
@given(T=st.integers(min_value=1, max_value=1000), data=st.data(),
       spacing=st.sampled_from(diffkit.SPACINGS), name=schedule_names)
def test_respace_gives_distinct_descending_steps_in_range(T, data, spacing, name):
    K = data.draw(st.integers(min_value=1, max_value=T))
    steps = respace(NoiseSchedule.from_name(name, T), K, spacing)
    assert steps.dtype == torch.long and steps.numel() == K
    assert (steps[1:] < steps[:-1]).all()
    assert steps.min() >= 0 and steps.max() <= T - 1


def test_respace_spacings_match_their_definitions():
    schedule = NoiseSchedule.from_name("linear", 1000)
    assert respace(schedule, 10, "leading").tolist() == list(range(900, -1, -100))
    assert respace(schedule, 10, "trailing").tolist() == list(range(999, 0, -100))
    assert respace(schedule, 4, "linspace").tolist() == [999, 666, 333, 0]
    logsnr = schedule.log_snr[respace(schedule, 8, "logsnr")]
    gaps = logsnr[1:] - logsnr[:-1]
    assert gaps.std() / gaps.mean().abs() < 0.1  # uniform in log-SNR up to rounding
    assert respace(schedule, 1000, "logsnr").tolist() == list(range(999, -1, -1))


def test_karras_spacing_is_uniform_in_sigma_to_the_one_over_rho():
    schedule = NoiseSchedule.from_name("linear", 1000)
    steps = respace(schedule, 12, "karras", karras_rho=7.0)
    sigma_ve = (1 / schedule.alpha_bar[steps] - 1).sqrt()  # sigma / alpha
    ramp = sigma_ve ** (1 / 7)
    gaps = ramp[1:] - ramp[:-1]
    assert steps[0] == 999 and steps[-1] == 0
    assert (gaps[1:].std() / gaps[1:].mean().abs()) < 0.1  # uniform up to rounding to integer steps
    # A different rho places the steps differently: the option is used.
    assert not torch.equal(steps, respace(schedule, 12, "karras", karras_rho=3.0))


@pytest.mark.parametrize("spacing", ["logsnr", "karras"])
def test_log_snr_range_places_all_but_the_first_step_inside_it(spacing):
    schedule = NoiseSchedule.from_name("linear", 1000)
    steps = respace(schedule, 10, spacing, log_snr_range=(-4.0, 8.0))
    lam = schedule.log_snr[steps]
    assert steps[0] == 999  # sampling still starts from the last step's noise
    # inside the range up to rounding to an integer step (neighbouring steps differ by < 0.3 in log-SNR here)
    assert lam[1:].min() > -4.3 and lam[1:].max() < 8.3
    assert lam[-1] == pytest.approx(8.0, abs=0.3)
    if spacing == "logsnr":  # the grid's own first point (at -4) gave way to the last step
        assert torch.allclose(lam[1:], torch.linspace(-4.0, 8.0, 10, dtype=torch.float64)[1:], atol=0.3)
    # None keeps the schedule's own end, so the second step moves to lower log-SNR
    wide = schedule.log_snr[respace(schedule, 10, spacing, log_snr_range=(None, 8.0))]
    assert wide[1] < lam[1] - 0.5


def test_max_time_respaces_inside_the_start():
    schedule = NoiseSchedule.from_name("linear", 1000)
    steps = respace(schedule, 5, "linspace", max_time=300)
    assert steps.tolist() == [300, 225, 150, 75, 0]
    assert respace(schedule, 5, "logsnr", max_time=300)[0] == 300
    with pytest.raises(ValueError, match="max_time must be an integer"):
        respace(schedule, 5, "linspace", max_time=1000)


def test_config_round_trip():
    schedule = NoiseSchedule.from_name("sigmoid", 50, zero_terminal_snr=True)
    rebuilt = schedule_from_config(schedule.config())
    assert torch.equal(rebuilt.betas, schedule.betas) and rebuilt.zero_terminal_snr


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: NoiseSchedule.from_name("cosin", 10), "unknown schedule 'cosin'"),
        (lambda: NoiseSchedule.from_name("linear", 0), "num_timesteps must be a positive integer"),
        (lambda: NoiseSchedule.from_betas([0.1, float("nan")]), "NaN"),
        (lambda: NoiseSchedule.from_betas([0.1, 1.5]), "every beta must lie in"),
        (lambda: respace(NoiseSchedule.from_name("linear", 10), 11), "exceeds the 10 training timesteps"),
        (lambda: respace(NoiseSchedule.from_name("linear", 10), 5, "uniformish"), "unknown spacing"),
    ],
)
def test_bad_schedule_input_is_explained(call, message):
    with pytest.raises(ValueError, match=message):
        call()
