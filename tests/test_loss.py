"""Training losses: weightings, the bound terms, and the hybrid loss's stop-gradient."""

import pytest
import torch

from diffkit import Diffusion, GaussianData
from diffkit.parameterization import x0_error_scale


def fixed_output_model(output):
    return lambda x, t, **_: output


def test_snr_weighting_of_eps_prediction_is_plain_eps_mse():
    x0 = torch.randn(64, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = torch.randn(64, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(2))
    noise = torch.randn(64, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    plain = Diffusion("linear", 1000).loss(fixed_output_model(out), x0, t=t, noise=noise)
    snr = Diffusion("linear", 1000, loss_weighting="snr").loss(fixed_output_model(out), x0, t=t, noise=noise)
    assert snr.item() == pytest.approx(plain.item(), rel=1e-9)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_weighting_is_min_snr_gamma_on_the_x0_error(prediction):
    diff = Diffusion("cosine", 1000, prediction=prediction, loss_weighting="min_snr", min_snr_gamma=5.0)
    x0 = torch.randn(32, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = torch.randn(32, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = torch.randn(32, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.linspace(0, 999, 32).long()
    _, terms = diff.loss(fixed_output_model(out), x0, t=t, noise=noise, return_terms=True)
    alpha, sigma = diff.schedule.alpha_at(t), diff.schedule.sigma_at(t)
    snr = alpha**2 / sigma**2
    expected = terms["mse"] * snr.clamp(max=5.0) / x0_error_scale(prediction, alpha, sigma)
    assert torch.allclose(terms["weighted_mse"], expected, rtol=1e-9)
    if prediction == "v":  # the published form: min(SNR, gamma) / (SNR + 1)
        assert torch.allclose(terms["weighted_mse"], terms["mse"] * snr.clamp(max=5.0) / (snr + 1), rtol=1e-9)


def test_hybrid_loss_needs_a_learned_variance():
    with pytest.raises(ValueError, match="variance='learned_range'"):
        Diffusion("linear", 100, loss_type="hybrid")


def test_hybrid_bound_term_trains_only_the_variance():
    diff = Diffusion("linear", 100, variance="learned_range", loss_type="hybrid")
    x0 = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    out = torch.randn(16, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    t = torch.randint(1, 100, (16,), generator=torch.Generator().manual_seed(2))
    noise = torch.randn(16, 3, generator=torch.Generator().manual_seed(3))
    loss, terms = diff.loss(lambda x, tt: out, x0, t=t, noise=noise, return_terms=True)
    (grad_total,) = torch.autograd.grad(loss, out, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(terms["mse"].mean(), out, retain_graph=True)
    (grad_vb,) = torch.autograd.grad(terms["vb"].mean(), out)
    assert torch.allclose(grad_total[:, :3], grad_mse[:, :3])  # the bound adds nothing to the mean's gradient
    assert grad_vb[:, :3].abs().sum() == 0
    assert grad_vb[:, 3:].abs().sum() > 0  # ... but it does train the variance


def test_bound_term_in_the_loss_matches_the_likelihood_term():
    data = GaussianData(torch.zeros(3), torch.full((3,), 0.6))
    diff = Diffusion("linear", 1000, variance="learned_range", loss_type="vlb")
    model = data.model(diff.schedule, learn_variance=True)
    x0 = data.sample(8192, torch.Generator().manual_seed(0))
    _, loss_terms = diff.loss(model, x0, t=torch.full((8192,), 3), generator=torch.Generator().manual_seed(1),
                              return_terms=True)
    _, nll_terms = diff.nll(model, x0, generator=torch.Generator().manual_seed(2), return_terms=True)
    from_nll = nll_terms["kl"][:, list(nll_terms["timesteps"]).index(3)]
    assert loss_terms["vb"].mean().item() == pytest.approx(from_nll.mean().item(), rel=0.05)
    _, at_zero = diff.loss(model, x0, t=torch.zeros(8192, dtype=torch.long), generator=torch.Generator().manual_seed(1),
                           return_terms=True)
    assert at_zero["vb"].mean().item() == pytest.approx(nll_terms["decoder"].mean().item(), abs=0.02)


def test_loss_is_reproducible_with_a_generator_and_backpropagates():
    net = torch.nn.Linear(4, 4)
    model = lambda x, t: net(x)  # noqa: E731
    diff = Diffusion("cosine", 50, prediction="v")
    x0 = torch.randn(8, 4)
    a = diff.loss(model, x0, generator=torch.Generator().manual_seed(0))
    b = diff.loss(model, x0, generator=torch.Generator().manual_seed(0))
    assert a.item() == b.item()
    a.backward()
    assert net.weight.grad.abs().sum() > 0
