"""Guidance, conditioning and the denoiser wrappers against closed forms and reference loops."""

import pytest
import torch

from diffkit import (
    ClipX0,
    Diffusion,
    GaussianData,
    GradientGuidance,
    GradientSteps,
    KnownValues,
    StateHook,
    WarmStart,
    X0Transform,
)
from diffkit.analytic import standardized_noise
from diffkit.process import posterior_coefficients


# --------------------------------------------------------------------------- gradient guidance
S, R, Y = 0.8, 0.3, 0.9  # x0 ~ N(0, S^2), y = x0 + N(0, R^2), observed y = Y


def _log_likelihood(diff):
    """log p(y | x_t) in closed form, for the exact posterior test."""

    def log_likelihood(x_t, t):
        alpha = diff.schedule.alpha_at(t.double()).to(x_t.dtype)[:, None]
        sigma = diff.schedule.sigma_at(t.double()).to(x_t.dtype)[:, None]
        denom = alpha**2 * S**2 + sigma**2
        mean = alpha * S**2 * x_t / denom  # E[x0 | x_t]
        var = S**2 * sigma**2 / denom + R**2  # Var[y | x_t]
        return (-0.5 * (Y - mean) ** 2 / var).sum(dim=1)

    return log_likelihood


POSTERIOR_MEAN = S**2 * Y / (S**2 + R**2)
POSTERIOR_STD = (S**2 * R**2 / (S**2 + R**2)) ** 0.5


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_gradient_guidance_with_the_exact_likelihood_samples_the_exact_posterior(prediction):
    """Guiding with log p(y | x_t) samples p(x0 | y) exactly, whatever the network predicts."""
    data = GaussianData(torch.zeros(4), torch.full((4,), S))
    diff = Diffusion("linear", 1000, prediction=prediction)
    noise = standardized_noise(4000, 4)
    samples = diff.sample(data.model(diff.schedule, prediction=prediction), noise.shape, sampler="unipc", steps=40,
                          noise=noise, dtype=torch.float64, wrappers=[GradientGuidance(_log_likelihood(diff))])
    assert samples.mean().item() == pytest.approx(POSTERIOR_MEAN, abs=0.01)
    assert samples.std(0).mean().item() == pytest.approx(POSTERIOR_STD, rel=0.03)


class TwoClassGaussian(torch.nn.Module):
    """Exact conditional model: class c has data N(c * mu, s^2); dropping the condition gives N(0, s^2)."""

    def __init__(self, diff, mu=1.0, s=0.5, dim=3):
        super().__init__()
        self.conditional = GaussianData(torch.full((dim,), mu), torch.full((dim,), s)).model(diff.schedule)
        self.unconditional = GaussianData(torch.zeros(dim), torch.full((dim,), s)).model(diff.schedule)
        self.calls = []

    def forward(self, x, t, label=None, drop_cond=None):
        self.calls.append(None if drop_cond is None else (x.shape[0], int(drop_cond.sum())))
        eps_c, eps_u = self.conditional(x, t), self.unconditional(x, t)
        if drop_cond is None:
            return eps_c
        return torch.where(drop_cond[:, None], eps_u, eps_c)


def test_gradient_guidance_composes_with_classifier_free_guidance():
    """CFG at w turns N(mu, s^2) into N(w mu, s^2); a Gaussian likelihood on top gives its exact posterior."""
    s, r, y, w = 0.5, 0.4, 2.0, 2.0
    diff = Diffusion("linear", 1000)
    model = TwoClassGaussian(diff, mu=1.0, s=s, dim=2)

    def log_likelihood(x_t, t):
        alpha = diff.schedule.alpha_at(t.double())[:, None]
        sigma = diff.schedule.sigma_at(t.double())[:, None]
        prior_mean = w * 1.0
        denom = alpha**2 * s**2 + sigma**2
        mean = prior_mean + alpha * s**2 * (x_t - alpha * prior_mean) / denom
        var = s**2 * sigma**2 / denom + r**2
        return (-0.5 * (y - mean) ** 2 / var).sum(dim=1)

    noise = standardized_noise(4000, 2)
    samples = diff.sample(model, noise.shape, sampler="unipc", steps=40, noise=noise, dtype=torch.float64,
                          guidance_scale=w, label=torch.ones(4000), wrappers=[GradientGuidance(log_likelihood)])
    expected_mean = (w * r**2 + s**2 * y) / (s**2 + r**2)
    assert samples.mean().item() == pytest.approx(expected_mean, abs=0.01)
    assert samples.std(0).mean().item() == pytest.approx((s**2 * r**2 / (s**2 + r**2)) ** 0.5, rel=0.03)


def test_classifier_free_guidance_scales_the_class_mean():
    """With equal variances, eps_u + w (eps_c - eps_u) is the exact model of N(w mu, s^2)."""
    diff = Diffusion("linear", 1000)
    model = TwoClassGaussian(diff)
    noise = standardized_noise(2000, 3)
    for scale in (1.0, 2.5):
        model.calls.clear()
        samples = diff.sample(model, noise.shape, sampler="unipc", steps=25, noise=noise, dtype=torch.float64,
                              guidance_scale=scale, label=torch.ones(2000))
        assert samples.mean().item() == pytest.approx(scale * 1.0, abs=0.01)
        assert samples.std(0).mean().item() == pytest.approx(0.5, rel=0.02)
        if scale == 1.0:  # guidance off: no unconditional call at all
            assert set(model.calls) == {None}
        else:  # one doubled batch a step: 2000 kept and 2000 dropped conditions
            assert set(model.calls) == {(4000, 2000)}


def test_a_guidance_interval_guides_only_where_sigma_over_alpha_lies_in_it():
    diff = Diffusion("linear", 1000)
    model = TwoClassGaussian(diff)
    noise = standardized_noise(200, 3)

    def run(scale, interval):
        model.calls.clear()
        return diff.sample(model, noise.shape, sampler="ddim", steps=20, noise=noise, dtype=torch.float64,
                           guidance_scale=scale, guidance_interval=interval, label=torch.ones(200))

    everywhere = run(3.0, None)
    assert torch.equal(run(3.0, (0.0, None)), everywhere)
    nowhere = run(3.0, (1e4, None))  # sigma/alpha stays below 160 on this schedule
    assert set(model.calls) == {None} and torch.equal(nowhere, run(1.0, None))
    grid = diff.sampling_grid(20, sampler="ddim")
    ratios = (grid.sigmas / grid.alphas)[:-1]
    part = run(3.0, (0.5, 20.0))
    inside = int(((ratios >= 0.5) & (ratios <= 20.0)).sum())
    assert 0 < inside < 20
    assert model.calls.count((400, 200)) == inside and model.calls.count(None) == 20 - inside
    # Guided for part of the way, the class mean lands between the unguided and the guided one.
    assert nowhere.mean() + 0.1 < part.mean() < everywhere.mean() - 0.1
    for bad in ((2.0, 1.0), (-1.0, 2.0), (1.0,), "high", (float("nan"), 1.0)):
        with pytest.raises(ValueError, match="guidance_interval"):
            run(3.0, bad)
    for bad in (float("nan"), float("inf"), "3", None):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            run(bad, None)
    assert torch.equal(run(torch.tensor(3.0), None), everywhere)  # any real number will do


class OwnMix(TwoClassGaussian):
    """The same exact model, mixing its own guidance (here the core's affine mix, computed
    apart from the core, so the two can be compared)."""

    def __init__(self, diff, own=True):
        super().__init__(diff)
        self.mixes = []
        if not own:
            self.classifier_free_guidance = None  # None: leave the mix to the core

    def classifier_free_guidance(self, x, t, scale, label=None):
        self.mixes.append((x.shape[0], scale))
        eps_c, eps_u = self.conditional(x, t), self.unconditional(x, t)
        return eps_u + scale * (eps_c - eps_u)


def test_a_model_that_mixes_its_own_guidance_is_asked_to_at_the_guided_points_only():
    diff = Diffusion("linear", 1000)
    noise = standardized_noise(200, 3)
    grid = diff.sampling_grid(20, sampler="ddim")
    inside = int((((grid.sigmas / grid.alphas)[:-1]) >= 0.5).sum())

    def run(model, scale=3.0, interval=(0.5, None)):
        return diff.sample(model, noise.shape, sampler="ddim", steps=20, noise=noise, dtype=torch.float64,
                           guidance_scale=scale, guidance_interval=interval, label=torch.ones(200))

    own = OwnMix(diff)
    mixed_by_model = run(own)
    assert own.mixes == [(200, 3.0)] * inside and own.calls == [None] * (20 - inside)
    core = TwoClassGaussian(diff)
    assert torch.allclose(mixed_by_model, run(core), atol=1e-12)
    assert core.calls.count((400, 200)) == inside  # the core mixed there itself
    own.mixes.clear()
    run(own, scale=1.0)
    assert own.mixes == []  # guidance off: the hook is not called
    declined = OwnMix(diff, own=False)
    assert torch.equal(run(declined), run(core)) and declined.mixes == []


def test_classifier_free_guidance_falls_back_to_two_calls_for_non_tensor_conditions():
    diff = Diffusion("linear", 1000)
    model = TwoClassGaussian(diff)
    noise = standardized_noise(500, 3)
    batched = diff.sample(model, noise.shape, steps=10, noise=noise, dtype=torch.float64, guidance_scale=3.0,
                          label=torch.ones(500))
    model.calls.clear()
    separate = diff.sample(model, noise.shape, steps=10, noise=noise, dtype=torch.float64, guidance_scale=3.0,
                           label=["one"] * 500)
    assert set(model.calls) == {(500, 0), (500, 500)}
    assert torch.allclose(batched, separate, atol=1e-10)


def test_condition_dropout_reaches_the_model_at_training_time():
    diff = Diffusion("linear", 100)
    seen = {}

    def model(x, t, drop_cond=None, label=None):
        seen["drop"] = drop_cond
        return torch.zeros_like(x)

    diff.loss(model, torch.zeros(4000, 2), cond_drop_prob=0.25, label=torch.zeros(4000),
              generator=torch.Generator().manual_seed(0))
    assert seen["drop"].dtype == torch.bool
    assert seen["drop"].float().mean().item() == pytest.approx(0.25, abs=0.03)


# --------------------------------------------------------------------------- Diffuser's value guidance
def test_gradient_steps_follow_diffusers_algorithm_exactly():
    """Diffuser's loop (n_guide_steps ascent steps scaled by the posterior variance, none below t_stopgrad,
    conditions re-applied after each) written out by hand gives the same samples as GradientSteps + DDPM."""
    diff = Diffusion("linear", 100)
    data = GaussianData(torch.linspace(-0.5, 0.5, 5), torch.full((5,), 0.7))
    model = data.model(diff.schedule)
    direction = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)

    def value(x, t):  # a value function of the noisy trajectory
        return (x * direction).sum(1) - 0.1 * (x**2).sum(1)

    mask = torch.tensor([True, False, False, False, False])
    start = torch.full((8, 5), 0.25, dtype=torch.float64)
    grid = diff.sampling_grid(20, "linspace", sampler="ddpm")
    noise = standardized_noise(8, 5, seed=3)
    scale, stop_below, n_steps = 0.5, 10.0, 2

    condition = KnownValues(mask, start, clean=True)
    ours = diff.sample(model, noise.shape, start="noise", sampler="ddpm", grid=grid, noise=noise, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(5),
                       wrappers=[condition, GradientSteps(value, scale, num_steps=n_steps, stop_below=stop_below,
                                                          conditions=[condition])])

    # The reference: Diffuser's n_step_guided_p_sample, with diffkit's model and noise draws.
    generator = torch.Generator().manual_seed(5)
    x = noise.clone()
    for i in range(len(grid)):
        x = torch.where(mask, start, x)
        a_t, s_t, a_s, s_s = (float(v) for v in (grid.alphas[i], grid.sigmas[i], grid.alphas[i + 1], grid.sigmas[i + 1]))
        c_xt, c_x0, var = posterior_coefficients(a_t, s_t, a_s, s_s)
        if grid.times[i] >= stop_below:
            for _ in range(n_steps):
                x_in = x.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(value(x_in, None).sum(), x_in)
                x = torch.where(mask, start, x + scale * var * grad)
        eps = model(x, grid.times[i].expand(8))
        x0 = torch.where(mask, start, (x - s_t * eps) / a_t)
        mean = c_xt * x + c_x0 * x0
        x = mean if i == len(grid) - 1 else mean + var**0.5 * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    assert torch.allclose(ours, x, atol=1e-10)
    assert torch.equal(ours[:, mask], start[:, mask])
    unguided = diff.sample(model, noise.shape, start="noise", sampler="ddpm", grid=grid, noise=noise, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(5), wrappers=[condition])
    assert (ours[:, 1:] - unguided[:, 1:]).abs().max() > 0.05  # the guidance did something


def test_gradient_steps_below_the_cutoff_change_nothing():
    diff = Diffusion("linear", 100)
    model = GaussianData(torch.zeros(3), torch.ones(3)).model(diff.schedule)
    noise = standardized_noise(16, 3)
    plain = diff.sample(model, noise.shape, sampler="ddim", steps=10, noise=noise, dtype=torch.float64)
    cut = diff.sample(model, noise.shape, sampler="ddim", steps=10, noise=noise, dtype=torch.float64,
                      wrappers=[GradientSteps(lambda x, t: x.sum(1), 10.0, num_steps=3, stop_below=1000)])
    assert torch.equal(plain, cut)


def test_state_hook_runs_after_every_step_but_not_on_the_start():
    """A hook that adds a constant after each DDIM step matches the hand-written loop."""
    diff = Diffusion("linear", 100)
    model = GaussianData(torch.zeros(2), torch.ones(2)).model(diff.schedule)
    noise = standardized_noise(4, 2)
    grid = diff.sampling_grid(5, "linspace")
    calls = []

    def hook(x, t, i):
        calls.append((i, float(t[0])))
        return x + 0.1

    ours = diff.sample(model, noise.shape, start="noise", sampler="ddim", grid=grid, noise=noise, dtype=torch.float64,
                       wrappers=[StateHook(hook)])
    x = noise.clone()
    for i in range(len(grid)):
        if i > 0:
            x = x + 0.1
        a_t, s_t, a_s, s_s = grid.step_scales(i)
        eps = model(x, grid.times[i].expand(4))
        x = a_s * (x - s_t * eps) / a_t + s_s * eps
    assert torch.allclose(ours, x, atol=1e-12)
    assert [i for i, _ in calls] == [1, 2, 3, 4]
    assert [t for _, t in calls] == grid.times[1:].tolist()


# --------------------------------------------------------------------------- known values
@pytest.mark.parametrize("clean", [False, True])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m", "unipc", "heun"])
def test_known_values_are_exact_and_the_rest_is_sampled(sampler, clean):
    data = GaussianData(torch.linspace(-1, 1, 6), torch.full((6,), 0.5))
    diff = Diffusion("linear", 1000)
    noise = standardized_noise(3000, 6)
    mask = torch.tensor([True, False, True, False, False, False])
    known = torch.full((3000, 6), 7.0, dtype=torch.float64)  # far outside the data: must not leak
    steps = 200 if sampler in ("ddpm", "ddim") else 30
    seen = []
    samples = diff.sample(data.model(diff.schedule), noise.shape, sampler=sampler, steps=steps, noise=noise,
                          dtype=torch.float64, wrappers=[KnownValues(mask, known, clean=clean)],
                          generator=torch.Generator().manual_seed(2), callback=lambda info: seen.append(info["x"]))
    assert torch.equal(samples[:, mask], known[:, mask])
    if clean:  # the model saw the clean value at every point, as Diffuser trains it to
        assert all(torch.equal(x[:, mask], known[:, mask]) for x in seen)
    free = ~mask
    assert torch.allclose(samples[:, free].mean(0), data.mean[free], atol=0.05)
    assert torch.allclose(samples[:, free].std(0), data.std[free], rtol=0.1)


def test_known_values_reject_shapes_that_do_not_fit():
    diff = Diffusion("linear", 100)
    model = GaussianData(torch.zeros(4), torch.ones(4)).model(diff.schedule)
    with pytest.raises(ValueError, match="must broadcast to the sample"):
        diff.sample(model, (8, 4), wrappers=[KnownValues(torch.ones(8, 5, dtype=torch.bool), torch.zeros(8, 4))], steps=5)
    with pytest.raises(ValueError, match="needs both mask"):
        KnownValues(torch.ones(8, 4, dtype=torch.bool), None)
    with pytest.raises(ValueError, match="NaN"):
        diff.sample(model, (8, 4), steps=5,
                    wrappers=[KnownValues(torch.ones(8, 4, dtype=torch.bool), torch.full((8, 4), float("nan")))])


# --------------------------------------------------------------------------- warm starts and SDEdit
def test_sdedit_strength_controls_how_far_samples_move_from_the_start():
    data = GaussianData(torch.zeros(4), torch.ones(4))
    diff = Diffusion("linear", 1000)
    model = data.model(diff.schedule)
    init = data.sample(500, torch.Generator().manual_seed(0))
    distances = []
    for strength in (0.05, 0.5, 1.0):
        out = diff.sample(model, init.shape, sampler="dpm++2m", steps=20, start=WarmStart(init, strength),
                          dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        distances.append((out - init).pow(2).mean().item())
    assert distances[0] < 0.1 < distances[1] < distances[2]
    assert distances[2] == pytest.approx(2.0, rel=0.15)  # strength 1 forgets the start: two independent draws


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "unipc", "ddpm"])
def test_warm_start_spends_every_step_below_the_strength(sampler):
    """steps=5, strength=0.3 calls the model 5 times between t = 0.3 (T-1) and 0, for every sampler."""
    diff = Diffusion("linear", 1000)
    times = []
    model = GaussianData(torch.zeros(2), torch.ones(2)).model(diff.schedule)

    def counting_model(x, t):
        times.append(float(t[0]))
        return model(x, t)

    diff.sample(counting_model, (4, 2), sampler=sampler, steps=5, start=WarmStart(torch.zeros(4, 2), 0.3))
    assert len(times) == 5
    # Trailing spacing (DDIM's) ends one step above 0; the others land on 0.
    assert times[0] == round(0.3 * 999) and times[-1] <= times[0] / 5
    assert times == sorted(times, reverse=True)
    with pytest.raises(ValueError, match="strength must lie in"):
        WarmStart(torch.zeros(4, 2), 1.5)
    with pytest.raises(ValueError, match="WarmStart"):
        diff.sample(model, (4, 2), init=torch.zeros(4, 2), strength=0.5)
    with pytest.raises(ValueError, match="broadcast"):
        diff.sample(model, (4, 2), start=WarmStart(torch.zeros(3, 2), 0.5))
    with pytest.raises(ValueError, match="start must be"):
        diff.sample(model, (4, 2), start="warm")


def test_sdedit_together_with_inpainting():
    """Known entries stay exact; the free ones follow SDEdit exactly as without the mask (the data's
    dimensions are independent, so the known ones cannot pull on them)."""
    data = GaussianData(torch.zeros(4), torch.ones(4))
    diff = Diffusion("linear", 1000)
    init = data.sample(400, torch.Generator().manual_seed(0))
    mask = torch.tensor([True, True, False, False])
    known = torch.full((400, 4), -3.0, dtype=torch.float64)
    kwargs = dict(sampler="unipc", steps=10, start=WarmStart(init, 0.2), dtype=torch.float64)
    out = diff.sample(data.model(diff.schedule), init.shape, wrappers=[KnownValues(mask, known)],
                      generator=torch.Generator().manual_seed(1), **kwargs)
    plain = diff.sample(data.model(diff.schedule), init.shape, generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(out[:, mask], known[:, mask])
    assert torch.allclose(out[:, ~mask], plain[:, ~mask], atol=1e-12)
    assert 0.05 < (out[:, ~mask] - init[:, ~mask]).pow(2).mean() < 1.0


# --------------------------------------------------------------------------- x0 transforms
@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m", "unipc", "heun", "ddpm"])
def test_x0_transform_snaps_every_prediction_and_the_final_sample(sampler):
    """Diffusion-LM's clamping trick: snap x0_hat to the nearest of a few 'embeddings' at each step."""
    diff = Diffusion("sqrt", 200, prediction="x0")
    data = GaussianData(torch.zeros(3), torch.ones(3))
    table = torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=torch.float64)

    def snap(x0, t):
        return table[(x0[..., None] - table).abs().argmin(-1)]

    seen = []
    out = diff.sample(data.model(diff.schedule, prediction="x0"), (64, 3), sampler=sampler, steps=10,
                      dtype=torch.float64, wrappers=[X0Transform(snap)], callback=lambda info: seen.append(info["denoised"]),
                      generator=torch.Generator().manual_seed(0))
    assert all(torch.isin(d, table).all() for d in seen)
    assert torch.isin(out, table).all()
    assert len(set(out.flatten().tolist())) == 4  # not collapsed onto one value


def test_clipping_keeps_predictions_in_range_and_callback_sees_every_point():
    data = GaussianData(torch.zeros(3), torch.full((3,), 3.0))  # most mass outside [-1, 1]
    diff = Diffusion("linear", 1000)
    seen = []
    out = diff.sample(data.model(diff.schedule), (256, 3), sampler="dpm++2m", steps=12, wrappers=[ClipX0(-1.0, 1.0)],
                      callback=seen.append, generator=torch.Generator().manual_seed(0))
    assert out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6
    assert out.abs().max() > 0.99  # the mass outside was clipped onto the edges, not shrunk
    assert [info["i"] for info in seen] == list(range(12))
    assert all(info["denoised"].abs().max() <= 1.0 + 1e-6 for info in seen)
    assert seen[0]["t"] == 999 and seen[-1]["t"] == 0


def test_wrappers_apply_innermost_first():
    """[ClipX0, X0Transform(+1)]: the transform sees clipped values, so outputs reach 2; reversed, they stop at 1."""
    diff = Diffusion("linear", 100, prediction="x0")
    data = GaussianData(torch.zeros(2), torch.full((2,), 5.0))
    kwargs = dict(steps=4, sampler="ddim", dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    shift = X0Transform(lambda x0, t: x0 + 1.0)
    clip_then_shift = diff.sample(data.model(diff.schedule, prediction="x0"), (256, 2), wrappers=[ClipX0(), shift], **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    shift_then_clip = diff.sample(data.model(diff.schedule, prediction="x0"), (256, 2), wrappers=[shift, ClipX0()], **kwargs)
    assert clip_then_shift.max() == pytest.approx(2.0) and shift_then_clip.max() == pytest.approx(1.0)


# --------------------------------------------------------------------------- candidates
def test_candidates_are_scored_sorted_and_conditioned_per_example():
    diff = Diffusion("linear", 1000)
    model = TwoClassGaussian(diff, dim=2)
    labels = torch.tensor([1.0, 1.0, 1.0])
    best = diff.sample_candidates(model, (3, 2), 8, lambda x: -(x - 1.0).pow(2).sum(1), steps=10,
                                  generator=torch.Generator().manual_seed(0), dtype=torch.float64, label=labels)
    assert best.samples.shape == (3, 8, 2) and best.scores.shape == (3, 8)
    assert (best.scores[:, :-1] >= best.scores[:, 1:]).all()
    assert torch.allclose(best.scores, -(best.samples - 1.0).pow(2).sum(-1))
    assert torch.equal(best.top, best.samples[:, 0])
    assert len({tuple(row.tolist()) for row in best.samples.reshape(-1, 2)}) == 24  # all different draws
    with pytest.raises(ValueError, match="one score per sample"):
        diff.sample_candidates(model, (3, 2), 2, lambda x: x, steps=2, label=labels)
