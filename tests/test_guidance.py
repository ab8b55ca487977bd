"""Guidance and conditioning against closed forms."""

import pytest
import torch

from diffkit import Diffusion, GaussianData


def standard_noise(n, d, seed=0):
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z - z.mean(0)) / z.std(0)


def test_gradient_guidance_with_the_exact_likelihood_samples_the_exact_posterior():
    """x0 ~ N(0, s^2), y = x0 + N(0, r^2): guiding with log p(y | x_t) samples p(x0 | y) exactly."""
    s, r, y = 0.8, 0.3, 0.9
    data = GaussianData(torch.zeros(4), torch.full((4,), s))
    diff = Diffusion("linear", 1000)

    def log_likelihood(x_t, t):
        alpha = diff.schedule.alpha_at(t).to(x_t.dtype)[:, None]
        sigma = diff.schedule.sigma_at(t).to(x_t.dtype)[:, None]
        denom = alpha**2 * s**2 + sigma**2
        mean = alpha * s**2 * x_t / denom  # E[x0 | x_t]
        var = s**2 * sigma**2 / denom + r**2  # Var[y | x_t]
        return (-0.5 * (y - mean) ** 2 / var).sum(dim=1)

    noise = standard_noise(4000, 4)
    samples = diff.sample(data.model(diff.schedule), noise.shape, sampler="unipc", steps=40, noise=noise,
                          dtype=torch.float64, guidance_fn=log_likelihood)
    posterior_mean = s**2 * y / (s**2 + r**2)
    posterior_std = (s**2 * r**2 / (s**2 + r**2)) ** 0.5
    assert samples.mean().item() == pytest.approx(posterior_mean, abs=0.01)
    assert samples.std(0).mean().item() == pytest.approx(posterior_std, rel=0.03)


class TwoClassGaussian(torch.nn.Module):
    """Exact conditional model: class c has data N(c * mu, s^2); dropping the condition gives N(0, s^2)."""

    def __init__(self, diff, mu=1.0, s=0.5):
        super().__init__()
        self.conditional = GaussianData(torch.full((3,), mu), torch.full((3,), s)).model(diff.schedule)
        self.unconditional = GaussianData(torch.zeros(3), torch.full((3,), s)).model(diff.schedule)
        self.calls = []

    def forward(self, x, t, label=None, drop_cond=None):
        self.calls.append(None if drop_cond is None else (x.shape[0], int(drop_cond.sum())))
        eps_c, eps_u = self.conditional(x, t), self.unconditional(x, t)
        if drop_cond is None:
            return eps_c
        return torch.where(drop_cond[:, None], eps_u, eps_c)


def test_classifier_free_guidance_scales_the_class_mean():
    """With equal variances, eps_u + w (eps_c - eps_u) is the exact model of N(w mu, s^2)."""
    diff = Diffusion("linear", 1000)
    model = TwoClassGaussian(diff)
    noise = standard_noise(2000, 3)
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


def test_classifier_free_guidance_falls_back_to_two_calls_for_non_tensor_conditions():
    diff = Diffusion("linear", 1000)
    model = TwoClassGaussian(diff)
    noise = standard_noise(500, 3)
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


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m", "unipc", "heun"])
def test_inpainting_keeps_known_values_exactly_and_samples_the_rest(sampler):
    data = GaussianData(torch.linspace(-1, 1, 6), torch.full((6,), 0.5))
    diff = Diffusion("linear", 1000)
    noise = standard_noise(3000, 6)
    mask = torch.tensor([True, False, True, False, False, False])
    known = torch.full((3000, 6), 7.0, dtype=torch.float64)  # far outside the data: must not leak
    steps = 200 if sampler in ("ddpm", "ddim") else 30
    samples = diff.sample(data.model(diff.schedule), noise.shape, sampler=sampler, steps=steps, noise=noise,
                          dtype=torch.float64, mask=mask, known=known, generator=torch.Generator().manual_seed(2))
    assert torch.equal(samples[:, mask], known[:, mask])
    free = ~mask
    assert torch.allclose(samples[:, free].mean(0), data.mean[free], atol=0.05)
    assert torch.allclose(samples[:, free].std(0), data.std[free], rtol=0.1)


def test_inpainting_rejects_a_mask_of_the_wrong_shape():
    diff = Diffusion("linear", 100)
    model = GaussianData(torch.zeros(4), torch.ones(4)).model(diff.schedule)
    with pytest.raises(ValueError, match="must broadcast to the sample shape"):
        diff.sample(model, (8, 4), mask=torch.ones(8, 5, dtype=torch.bool), known=torch.zeros(8, 4), steps=5)
    with pytest.raises(ValueError, match="without known values"):
        diff.sample(model, (8, 4), mask=torch.ones(8, 4, dtype=torch.bool), steps=5)


def test_sdedit_strength_controls_how_far_samples_move_from_the_start():
    data = GaussianData(torch.zeros(4), torch.ones(4))
    diff = Diffusion("linear", 1000)
    model = data.model(diff.schedule)
    init = data.sample(500, torch.Generator().manual_seed(0))
    distances = []
    for strength in (0.1, 0.5, 1.0):
        out = diff.sample(model, init.shape, sampler="dpm++2m", steps=20, init=init, strength=strength,
                          dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        distances.append((out - init).pow(2).mean().item())
    assert distances[0] < 0.1 < distances[1] < distances[2]
    assert distances[2] == pytest.approx(2.0, rel=0.15)  # strength 1 forgets the start: two independent draws


def test_sdedit_starts_from_the_truncated_grid():
    diff = Diffusion("linear", 1000)
    grids = []
    model = GaussianData(torch.zeros(2), torch.ones(2)).model(diff.schedule)
    diff.sample(model, (4, 2), sampler="ddim", steps=10, spacing="linspace", init=torch.zeros(4, 2), strength=0.5,
                callback=lambda info: grids.append(info["t"]))
    assert grids[0] <= 500 and len(grids) < 10
    with pytest.raises(ValueError, match="strength must lie in"):
        diff.sample(model, (4, 2), init=torch.zeros(4, 2), strength=1.5)


def test_clipping_keeps_predictions_in_range_and_callback_sees_every_point():
    data = GaussianData(torch.zeros(3), torch.full((3,), 3.0))  # most mass outside [-1, 1]
    diff = Diffusion("linear", 1000)
    seen = []
    out = diff.sample(data.model(diff.schedule), (256, 3), sampler="dpm++2m", steps=12, clip_denoised=(-1.0, 1.0),
                      callback=seen.append, generator=torch.Generator().manual_seed(0))
    assert out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6
    assert [info["i"] for info in seen] == list(range(12))
    assert all(info["denoised"].abs().max() <= 1.0 + 1e-6 for info in seen)
    assert seen[0]["t"] == 999 and seen[-1]["t"] == 0
