"""Bad input to the core fails with a message that says what is wrong and what to do."""

import pytest
import torch

import diffkit
from diffkit import Diffusion


def zeros_model(x, t, **_):
    return torch.zeros_like(x)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prediction="noise"), "unknown prediction 'noise'; choose one of eps, x0, v"),
        (dict(variance="learned"), "unknown variance 'learned'"),
        (dict(loss_type="l2"), "unknown loss_type 'l2'"),
        (dict(loss_weighting="p2"), "unknown loss_weighting 'p2'"),
        (dict(decoder="laplace"), "unknown decoder 'laplace'"),
        (dict(schedule="cosine_v2"), "unknown schedule 'cosine_v2'"),
        (dict(num_timesteps=0), "num_timesteps must be a positive integer"),
        (dict(schedule="linear", zero_terminal_snr=True), "cannot be used with prediction='eps'"),
    ],
)
def test_bad_diffusion_settings(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Diffusion(**kwargs)


def test_unknown_sampler_lists_the_choices():
    with pytest.raises(ValueError, match="unknown sampler 'dpm\\+\\+4m'; choose one of ddpm, ddim"):
        Diffusion("linear", 10).sample(zeros_model, (2, 3), sampler="dpm++4m")


def test_too_many_steps():
    with pytest.raises(ValueError, match="steps=20 exceeds the 10 training timesteps"):
        Diffusion("linear", 10).sample(zeros_model, (2, 3), steps=20)


def test_model_output_shape_mismatch_is_named():
    with pytest.raises(ValueError, match=r"returned shape \(2, 4\) for input \(2, 3\)"):
        Diffusion("linear", 10).sample(lambda x, t: torch.zeros(2, 4), (2, 3), steps=3)
    with pytest.raises(ValueError, match="twice the channels"):
        Diffusion("linear", 10, variance="learned_range").loss(zeros_model, torch.zeros(2, 3))


def test_nan_in_data_is_refused():
    x0 = torch.zeros(4, 3)
    x0[1, 2] = float("nan")
    with pytest.raises(ValueError, match="contains 1 NaN or Inf"):
        Diffusion("linear", 10).loss(zeros_model, x0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        Diffusion("linear", 10).nll(zeros_model, x0)


def test_nan_from_the_model_during_sampling_is_reported():
    with pytest.raises(FloatingPointError, match="sampling produced NaN"):
        Diffusion("linear", 10).sample(lambda x, t: torch.full_like(x, float("nan")), (2, 3), steps=3)


def test_noise_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"noise has shape \(2, 2\) but shape=\(2, 3\)"):
        Diffusion("linear", 10).sample(zeros_model, (2, 3), noise=torch.zeros(2, 2))


def test_data_without_batch_dimension():
    with pytest.raises(ValueError, match="batch dimension"):
        Diffusion("linear", 10).loss(zeros_model, torch.zeros(5))


def test_config_round_trip_rebuilds_an_equal_diffusion():
    diff = Diffusion("sigmoid", 64, prediction="v", variance="learned_range", loss_type="hybrid",
                     loss_weighting="min_snr", decoder="discretized", bin_width=2 / 65535)
    rebuilt = Diffusion.from_config(diff.config)
    assert rebuilt.config == diff.config
    assert torch.equal(rebuilt.schedule.betas, diff.schedule.betas)
    with pytest.raises(ValueError, match="not a Diffusion config"):
        Diffusion.from_config({"prediction": "eps"})


def test_public_sampler_list_is_complete():
    assert set(diffkit.SAMPLERS) == {"ddpm", "ddim", "euler", "heun", "dpm++2m", "dpm++3m", "unipc", "dpm-v3"}
    for name in diffkit.SAMPLERS:
        assert callable(diffkit.get_sampler(name))
