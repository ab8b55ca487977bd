"""Bring your own model: a diffusers UNet2DModel, trained here with diffusers' own noising, runs
under diffkit's samplers, calibration and likelihoods (diffkit.interop.from_diffusers).

diffusers is a test-only dependency; diffkit.interop never imports it.
"""

import ast
import inspect
from types import SimpleNamespace

import pytest
import torch

from diffkit import ClipX0, Diffusion, interop
from diffkit.calibration import calibrate
from diffkit.interop import DiffusersNetwork, diffusers_betas, from_diffusers, sampling_wrappers

diffusers = pytest.importorskip("diffusers")
datasets = pytest.importorskip("sklearn.datasets")

TRAIN_STEPS = 150


def digits() -> torch.Tensor:
    """sklearn's 8x8 digits (0..16) as (N, 1, 8, 8) images in [-1, 1]."""
    return torch.tensor(datasets.load_digits().images, dtype=torch.float32)[:, None] / 8.0 - 1.0


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16,),
                                 layers_per_block=1, down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                                 norm_num_groups=8, add_attention=False)


# ---------------------------------------------------------------------------- schedules and settings
CONFIGS = [
    ("DDPMScheduler", {}),
    ("DDPMScheduler", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}),
    ("DDPMScheduler", {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 300}),
    ("DDPMScheduler", {"beta_schedule": "sigmoid"}),
    ("DDPMScheduler", {"beta_schedule": "laplace"}),
    ("DDIMScheduler", {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}),
    ("DDIMScheduler", {"trained_betas": torch.linspace(1e-3, 0.05, 200).tolist(), "num_train_timesteps": 200}),
    ("DPMSolverMultistepScheduler", {"prediction_type": "sample", "use_karras_sigmas": True}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("UniPCMultistepScheduler", {}),
    ("PNDMScheduler", {"skip_prk_steps": True}),
]


@pytest.mark.parametrize("name, options", CONFIGS, ids=[f"{n}-{'-'.join(map(str, o.values()))[:30]}" for n, o in CONFIGS])
def test_the_schedule_is_diffusers_own(name, options):
    scheduler = getattr(diffusers, name)(**options)
    diff, _ = from_diffusers(lambda x, t: x, scheduler.config)
    # Both count timesteps 0..T-1: step t of diffkit's table is diffusers' alphas_cumprod[t].
    assert diff.num_timesteps == scheduler.config.num_train_timesteps
    assert torch.allclose(diff.schedule.alpha_bar, scheduler.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)
    assert torch.equal(diffusers_betas(scheduler.config).double(), scheduler.betas.double())
    expected = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[scheduler.config.prediction_type]
    assert diff.prediction == expected and diff.time_input == "timestep"
    # The config survives diffkit's own round trip (a checkpoint keeps it).
    assert torch.equal(Diffusion.from_config(diff.config).schedule.alpha_bar, diff.schedule.alpha_bar)


def test_the_scheduler_object_and_a_plain_dict_are_accepted():
    scheduler = diffusers.DDPMScheduler(variance_type="fixed_large", beta_schedule="scaled_linear")
    a, _ = from_diffusers(lambda x, t: x, scheduler)
    b, _ = from_diffusers(lambda x, t: x, dict(scheduler.config), decoder="discretized")
    assert a.variance == b.variance == "fixed_large" and b.decoder == "discretized"
    assert torch.equal(a.schedule.alpha_bar, b.schedule.alpha_bar)
    learned, _ = from_diffusers(lambda x, t: x, {"num_train_timesteps": 100, "variance_type": "learned_range"})
    assert learned.variance == "learned_range"


@pytest.mark.parametrize("change, words", [
    ({"prediction_type": "unknown"}, "prediction_type='unknown'"),
    ({"num_train_timesteps": None}, "num_train_timesteps is missing"),
    ({"thresholding": True}, "thresholding=True"),
    ({"variance_type": "learned"}, "variance_type='learned'"),
    ({"beta_schedule": "exp"}, "beta_schedule='exp'"),
    ({"timestep_spacing": "karras"}, "timestep_spacing='karras'"),
    ({"timestep_type": "continuous"}, "timestep_type='continuous'"),
    ({"rescale_betas_zero_snr": True}, "prediction_type='v_prediction'"),
    ({"snr": 0.15}, "unknown scheduler setting snr=0.15"),
    ({"trained_betas": [0.01] * 10}, "trained_betas holds 10 values"),
])
def test_bad_configs_say_what_is_wrong_in_one_line(change, words):
    config = dict(diffusers.DDPMScheduler().config)
    config.update(change)
    if change.get("num_train_timesteps", 0) is None:
        del config["num_train_timesteps"]
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")) as error:
        from_diffusers(lambda x, t: x, config)
    assert "\n" not in str(error.value)


def test_options_that_the_config_sets_are_refused():
    with pytest.raises(ValueError, match="prediction"):
        from_diffusers(lambda x, t: x, diffusers.DDPMScheduler().config, prediction="v")
    with pytest.raises(TypeError, match="dict"):
        from_diffusers(lambda x, t: x, [("num_train_timesteps", 10)])


def test_the_module_does_not_import_diffusers():
    tree = ast.parse(inspect.getsource(interop))
    names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    names += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [name for name in names if name.split(".")[0] == "diffusers"]


# ---------------------------------------------------------------------------- the network
def test_the_wrapper_passes_times_and_conditions_through_and_unwraps_outputs():
    seen = {}

    class Output:
        def __init__(self, sample):
            self.sample = sample

    def model(sample, timestep, class_labels=None, encoder_hidden_states=None):
        seen.update(timestep=timestep, class_labels=class_labels, states=encoder_hidden_states)
        return Output(sample * 2)

    _, net = from_diffusers(model, {"num_train_timesteps": 50}, null_cond={"class_labels": torch.tensor(9)})
    x, t = torch.randn(3, 2, 4), torch.tensor([0.0, 10.5, 49.0])
    labels = torch.tensor([1, 2, 3])
    assert torch.equal(net(x, t, class_labels=labels, encoder_hidden_states="text"), 2 * x)
    assert torch.equal(seen["timestep"], t) and seen["states"] == "text"
    net(x, t, class_labels=labels, drop_cond=torch.tensor([True, False, True]))
    assert seen["class_labels"].tolist() == [9, 2, 9]  # dropped rows get the null class
    assert torch.equal(DiffusersNetwork(lambda s, ts: (s + 1, None))(x, t), x + 1)  # return_dict=False tuples
    with pytest.raises(ValueError, match="null condition"):
        DiffusersNetwork(model)(x, t, drop_cond=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match=".sample"):
        DiffusersNetwork(lambda s, ts: "nothing")(x, t)


def test_classifier_free_guidance_through_the_wrapper():
    def model(sample, timestep, class_labels):  # eps = (label / 10) everywhere
        return (class_labels.float() / 10).reshape(-1, 1, 1).expand_as(sample)

    diff, net = from_diffusers(model, {"num_train_timesteps": 100}, null_cond={"class_labels": torch.tensor(0)})
    noise = torch.randn(2, 1, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 5])
    kwargs = dict(sampler="ddim", steps=4, noise=noise, start="noise", class_labels=labels)
    plain, guided = diff.sample(net, noise.shape, **kwargs), diff.sample(net, noise.shape, guidance_scale=2.0, **kwargs)
    # Guidance mixes eps affinely: 2 * c - u with u the null class (0), i.e. the label doubled.
    doubled = diff.sample(net, noise.shape, **{**kwargs, "class_labels": 2 * labels})
    assert not torch.allclose(plain, guided)
    assert torch.allclose(guided, doubled, atol=1e-5)


# ---------------------------------------------------------------------------- on the trained UNet
def train_tiny_unet(scheduler, data: torch.Tensor) -> tuple[torch.nn.Module, list]:
    """A tiny UNet trained the diffusers way: DDPMScheduler.add_noise, integer timesteps, an eps MSE."""
    unet = tiny_unet()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(TRAIN_STEPS):
        x0 = data[torch.randint(0, len(data), (32,), generator=generator)]
        eps = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (32,), generator=generator)
        loss = ((unet(scheduler.add_noise(x0, eps, t), t).sample - eps) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return unet.eval().requires_grad_(False), losses


def check_ddim_is_diffusers_ddim(unet, train_scheduler, spacing: str, clip: bool) -> None:
    diff, net = from_diffusers(unet, train_scheduler.config)
    # set_alpha_to_one=True: diffusers' last DDIM step lands on clean data, as diffkit's does.
    scheduler = diffusers.DDIMScheduler.from_config(train_scheduler.config, timestep_spacing=spacing,
                                                    clip_sample=clip, set_alpha_to_one=True)
    scheduler.set_timesteps(8)
    noise = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = noise.clone()
    for t in scheduler.timesteps:
        eps = unet(x, t).sample
        x = scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=clip).prev_sample
    wrappers = sampling_wrappers(scheduler.config)
    assert [type(w) for w in wrappers] == ([ClipX0] if clip else [])
    ours = diff.sample(net, noise.shape, sampler="ddim", grid=scheduler.timesteps, noise=noise, start="noise",
                       wrappers=wrappers)
    error = (ours - x).abs().max()
    assert torch.allclose(ours, x, atol=1e-4, rtol=1e-4), f"DDIM {spacing} clip={clip}: off by {error:.3g}"


def check_calibration_helps(unet, scheduler) -> None:
    diff, net = from_diffusers(unet, scheduler.config)
    # Sampled as its config says diffusers samples it: x0_hat clipped to [-1, 1] (clip_sample=True).
    clip = sampling_wrappers(scheduler.config)
    calibrated = calibrate(diff, net, (32, 1, 8, 8), steps=(5,), max_evals=8, model_statistics=False,
                           reference_steps=100, generator=torch.Generator().manual_seed(2),
                           sample_kwargs={"wrappers": clip})
    assert "unipc/5" in calibrated.calibration["grids"] and diff.calibration == {}  # a new Diffusion
    fresh = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    reference = diff.sample(net, fresh.shape, sampler="unipc", steps=200, noise=fresh, wrappers=clip)
    before = diff.sample(net, fresh.shape, sampler="unipc", steps=5, noise=fresh, wrappers=clip)
    after = calibrated.sample(net, fresh.shape, sampler="unipc", steps=5, noise=fresh, wrappers=clip)
    error_before, error_after = ((before - reference) ** 2).mean(), ((after - reference) ** 2).mean()
    # measured: 0.034 -> 0.010
    assert error_after < 0.6 * error_before, f"calibration: 5-step error {error_before:.3g} -> {error_after:.3g}"


def check_likelihoods(unet, scheduler, x: torch.Tensor, train: torch.Tensor) -> None:
    diff, net = from_diffusers(unet, scheduler.config)
    noise_images = torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) * 2 - 1
    ode = dict(method="ode", divergence="hutchinson", ode_steps=6)
    bpd_data = diff.nll(net, x, generator=torch.Generator().manual_seed(5), **ode)
    bpd_noise = diff.nll(net, noise_images, generator=torch.Generator().manual_seed(5), **ode)
    bound = diff.nll(net, x, steps=10, generator=torch.Generator().manual_seed(6))
    for values in (bpd_data, bpd_noise, bound):
        assert values.shape == (len(x),) and torch.isfinite(values).all()
    # measured: -0.38 against 1.87 bits/dim
    assert bpd_data.mean() < bpd_noise.mean() - 1.0, f"ODE nll: data {bpd_data.mean():.3g}, noise {bpd_noise.mean():.3g}"
    # With fixed variances the bound of a barely trained model is loose (measured: 400 bits/dim, the
    # step into t = 0); the variances calibrated on training data (Analytic-DPM) tighten it (0.8).
    calibrated = calibrate(diff, net, data=train, eps_norm_times=torch.linspace(0, 999, 10).round().tolist(),
                           generator=torch.Generator().manual_seed(7))
    tight = calibrated.nll(net, x, steps=10, generator=torch.Generator().manual_seed(6))
    assert tight.shape == (len(x),) and torch.isfinite(tight).all()
    assert tight.mean() < 0.05 * bound.mean(), f"bound: {bound.mean():.3g} -> {tight.mean():.3g} calibrated"


def test_a_unet_trained_with_diffusers_runs_under_diffkit():
    """One test, so that the training runs once even when xdist spreads the tests over workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = digits()
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)  # linear betas, epsilon, clip_sample=True
        unet, losses = train_tiny_unet(scheduler, data)
        assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:5]) / 5, "the UNet did not learn"
        with torch.no_grad():
            for spacing in ("leading", "trailing"):
                for clip in (False, True):
                    check_ddim_is_diffusers_ddim(unet, scheduler, spacing, clip)
        check_calibration_helps(unet, scheduler)
        check_likelihoods(unet, scheduler, data[-16:], data[:128])
    finally:
        torch.set_num_threads(threads)


def wavy_network(sample, timestep):
    """A nonlinear, time-dependent stand-in for a trained UNet, with a diffusers-style output."""
    scale = (timestep.float() / 1000.0).reshape(-1, *([1] * (sample.ndim - 1)))
    return SimpleNamespace(sample=0.6 * torch.tanh(1.5 * sample) * scale + 0.3 * torch.sin(2 * sample) * (1 - scale))


@pytest.mark.parametrize("options", [
    {"prediction_type": "epsilon", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    {"prediction_type": "sample", "beta_schedule": "squaredcos_cap_v2", "steps_offset": 1},
])
def test_ddim_matches_diffusers_for_every_prediction_type(options):
    scheduler = diffusers.DDIMScheduler(clip_sample=False, **options)
    scheduler.set_timesteps(10)
    diff, net = from_diffusers(wavy_network, scheduler.config)
    noise = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(wavy_network(x, t.expand(x.shape[0])).sample, t, x).prev_sample
    # (Not timestep_spacing="linspace": diffusers' DDIM then steps from t to t - T // N, which is
    # not its next timestep, a mismatch diffkit's grids do not reproduce.)
    ours = diff.sample(net, noise.shape, sampler="ddim", grid=scheduler.timesteps, noise=noise, start="noise")
    assert torch.allclose(ours, x, atol=1e-4, rtol=1e-4), (ours - x).abs().max()


# ---------------------------------------------------------------------------- the flow path
def wavy_velocity(sample, timestep):
    """A nonlinear stand-in for a flow-matching transformer, told sigma x 1000 as diffusers does."""
    s = (timestep / 1000.0).reshape(-1, *([1] * (sample.ndim - 1)))
    return 0.8 * torch.tanh(1.5 * sample) * s - 0.4 * torch.sin(2 * sample) * (1 - s) + 0.1 * sample


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_euler_is_ddim_on_the_flow_path(shift):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    diff, net = from_diffusers(wavy_velocity, scheduler.config)
    assert diff.prediction == "flow" and diff.schedule.is_continuous
    scheduler.set_timesteps(10)
    noise = torch.randn(8, 3, 4, generator=torch.Generator().manual_seed(0))
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(wavy_velocity(x, t.expand(x.shape[0])), t, x).prev_sample
    ours = diff.sample(net, noise.shape, sampler="ddim", grid=scheduler.sigmas[:-1].double(), noise=noise,
                       start="noise")
    assert torch.allclose(ours, x, atol=1e-5, rtol=1e-5), (ours - x).abs().max()
