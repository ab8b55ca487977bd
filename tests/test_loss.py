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
    from_nll = nll_terms["kl"][:, list(nll_terms["times"]).index(3)]
    assert loss_terms["vb"].mean().item() == pytest.approx(from_nll.mean().item(), rel=0.05)
    _, at_zero = diff.loss(model, x0, t=torch.zeros(8192, dtype=torch.long), generator=torch.Generator().manual_seed(1),
                           return_terms=True)
    assert at_zero["vb"].mean().item() == pytest.approx(nll_terms["decoder"].mean().item(), abs=0.02)


@pytest.mark.parametrize("loss_type", ["vlb", "hybrid"])
def test_bound_loss_over_every_time_sums_to_the_whole_bound(loss_type):
    """L_vlb draws one t uniformly and returns T * L_t, an unbiased estimate of the bound: summed
    over every t (the mean over all T times, times T) it is the bound less its prior term, which
    nll computes term by term with its own noise. Without the factor T it would be 1/T of that."""
    T, n = 100, 256
    data = GaussianData(torch.zeros(3), torch.full((3,), 0.6))
    diff = Diffusion("linear", T, variance="learned_range", loss_type=loss_type)
    model = data.model(diff.schedule, learn_variance=True)
    x0 = data.sample(n, torch.Generator().manual_seed(0))
    bpd, nll_terms = diff.nll(model, x0, generator=torch.Generator().manual_seed(2), return_terms=True)
    every_t = torch.arange(T).repeat_interleave(n)
    loss, terms = diff.loss(model, x0.repeat(T, 1), t=every_t, generator=torch.Generator().manual_seed(1),
                            return_terms=True)
    bound_part = loss if loss_type == "vlb" else (terms["loss"] - terms["mse"]).mean() / diff.hybrid_lambda
    bound_less_prior = (bpd - nll_terms["prior"]).mean().item()
    # Measured: 1.3025 against 1.2874 bits/dim (the two noise draws differ); without T, 0.013.
    assert bound_part.item() == pytest.approx(bound_less_prior, rel=0.1)
    if loss_type == "vlb":  # one fixed t: T times nll's own term at t
        at_3 = diff.loss(model, x0, t=torch.full((n,), 3), generator=torch.Generator().manual_seed(1))
        kl_3 = nll_terms["kl"][:, list(nll_terms["times"]).index(3)].mean().item()
        # Measured: 39.0 against 40.4 (other noise seeds: 40.3 to 43.7); without T, 0.39.
        assert at_3.item() == pytest.approx(T * kl_3, rel=0.2)


def test_loss_is_reproducible_with_a_generator_and_backpropagates():
    net = torch.nn.Linear(4, 4)
    model = lambda x, t: net(x)  # noqa: E731
    diff = Diffusion("cosine", 50, prediction="v")
    x0 = torch.randn(8, 4)
    a = diff.loss(model, x0, generator=torch.Generator().manual_seed(0))
    b = diff.loss(model, x0, generator=torch.Generator().manual_seed(0))
    assert a.item() == b.item()
    a.backward()
    for p in net.parameters():  # weight and bias both learn, from finite gradients
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_truncated_snr_weighting_is_max_snr_one_on_the_x0_error():
    diff = Diffusion("cosine", 1000, prediction="v", loss_weighting="truncated_snr")
    x0 = torch.randn(32, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = torch.randn(32, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = torch.randn(32, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.linspace(0, 999, 32).long()
    _, terms = diff.loss(fixed_output_model(out), x0, t=t, noise=noise, return_terms=True)
    x0_error = ((terms["x0_hat"] - x0) ** 2).mean(1)
    snr = (diff.schedule.alpha_bar[t] / (1 - diff.schedule.alpha_bar[t]))
    assert torch.allclose(terms["weighted_mse"], x0_error * snr.clamp(min=1.0), rtol=1e-9)
    assert (snr < 1).any() and (snr > 1).any()  # both sides of the truncation are exercised


# --------------------------------------------------------------------------- masks, weights, known entries
def _padded_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(6, 3, 10, generator=g, dtype=torch.float64)
    lengths = torch.tensor([10, 7, 3, 10, 1, 5])
    mask = (torch.arange(10) < lengths[:, None])[:, None, :].expand(6, 3, 10)
    return x0, mask, lengths


def test_padding_never_counts_in_the_loss():
    diff = Diffusion("linear", 100)
    x0, mask, lengths = _padded_batch()
    t = torch.arange(6) * 15
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loss, terms = diff.loss(fixed_output_model(out), x0, t=t, noise=noise, mask=mask, return_terms=True)
    manual = torch.stack([((out[b, :, :n] - noise[b, :, :n]) ** 2).mean() for b, n in enumerate(lengths)])
    assert torch.allclose(terms["mse"], manual, rtol=1e-12)
    # Anything in the padding (data, noise or output) leaves the loss unchanged.
    junk = torch.where(mask, 0.0, 1e3)
    again = diff.loss(fixed_output_model(out + junk), x0 - junk, t=t, noise=noise + junk, mask=mask)
    assert again.item() == pytest.approx(loss.item(), rel=1e-12)


def test_element_weights_scale_the_squared_error():
    diff = Diffusion("linear", 100)
    x0, mask, _ = _padded_batch()
    t = torch.full((6,), 40)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = torch.zeros_like(x0)
    weight = torch.ones(3, 10, dtype=torch.float64)
    weight[:2, 0] = 10.0  # Diffuser's first-action weight
    _, terms = diff.loss(fixed_output_model(out), x0, t=t, noise=noise, mask=mask, weight=weight, return_terms=True)
    manual = torch.where(mask, weight * noise**2, 0.0).sum((1, 2)) / mask.sum((1, 2))
    assert torch.allclose(terms["loss"], manual, rtol=1e-12)


def test_known_entries_are_given_clean_and_left_out_of_the_loss():
    diff = Diffusion("linear", 100, prediction="x0")
    x0, _, _ = _padded_batch()
    known = torch.zeros(3, 10, dtype=torch.bool)
    known[:, 0] = True  # the current state
    seen = {}

    def model(x_t, t):
        seen["x_t"] = x_t
        return torch.where(known, 1e3, torch.zeros_like(x_t))  # nonsense where the value is known

    loss, terms = diff.loss(model, x0, known_mask=known, return_terms=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen["x_t"][:, known], x0[:, known])
    assert torch.allclose(terms["mse"], (x0[:, ~known] ** 2).reshape(6, -1).mean(1), rtol=1e-12)
    assert torch.equal(terms["mask"], ~known.expand_as(x0))


def test_loss_hands_back_consistent_intermediates_with_gradients():
    diff = Diffusion("sqrt", 200, prediction="x0")
    x0 = torch.randn(8, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weight = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    model = lambda x_t, t: torch.einsum("ij,bjl->bil", weight, x_t)  # noqa: E731
    _, terms = diff.loss(model, x0, return_terms=True, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(terms["x_t"], terms["alpha"] * x0 + terms["sigma"] * terms["noise"])
    assert torch.equal(terms["x0_hat"], terms["output"]) and torch.equal(terms["prediction"], terms["output"])
    # A modality's own term (here Diffusion-LM-like: x0_hat close to a table) backpropagates to the network.
    (grad,) = torch.autograd.grad(terms["x0_hat"].pow(2).mean(), weight)
    assert grad.abs().sum() > 0
    assert terms["t"].dtype.is_floating_point and terms["t"].shape == (8,)


def test_bad_masks_are_explained():
    diff = Diffusion("linear", 100)
    x0 = torch.zeros(2, 3)
    model = fixed_output_model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="must be a bool tensor"):
        diff.loss(model, x0, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="does not broadcast"):
        diff.loss(model, x0, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"no element to count in example\(s\) \[1\]"):
        diff.loss(model, x0, mask=torch.tensor([[True, False, False], [False, False, False]]))


def test_masked_bound_divides_by_the_real_count_and_is_tight():
    """Padded dimensions do not count: with exact reverse variances the bound of the real dimensions
    sits at their exact NLL, whatever the padding holds."""
    data = GaussianData(torch.tensor([0.3, -0.2, 0.0, 0.5]), torch.tensor([0.3, 0.5, 0.8, 1.0]))
    diff = Diffusion("linear", 1000, variance="learned_range")
    model = data.model(diff.schedule, learn_variance=True)
    x0 = data.sample(2048, torch.Generator().manual_seed(0))
    mask = torch.tensor([True, True, True, False])
    x0_padded = torch.where(mask, x0, 0.0)
    bpd = diff.nll(model, x0_padded, mask=mask, generator=torch.Generator().manual_seed(1))
    real = GaussianData(data.mean[:3], data.std[:3])
    assert bpd.mean().item() == pytest.approx(real.nll_bits_per_dim(x0[:, :3]).mean().item(), abs=0.03)
    assert bpd.mean().item() >= real.nll_bits_per_dim(x0[:, :3]).mean().item() - 0.01
