"""Guidance and conditioning, shared by every modality and every sampler.

A sampler only ever sees a *denoiser*: ``denoise(x, i) -> Prediction``. This module builds
one from a network and layers the conditioning on it, each layer a small function of the
previous prediction:

* classifier-free guidance: eps = eps_uncond + w (eps_cond - eps_uncond)   (Ho & Salimans, 2022)
* gradient guidance from any differentiable f(x, t) (a classifier's log-probability, a value
  function):  score += s grad f,  i.e.  eps -= s sigma_t grad f          (Dhariwal & Nichol, 2021)
* replacement conditioning (inpainting): known entries of x_t are overwritten with
  alpha_t known + sigma_t noise before the call, and x0_hat takes the known values, so the
  final sample holds them exactly (Song et al., 2021; Diffuser's state conditioning)
* clipping of x0_hat to the data range, with eps made consistent again.

Because everything acts on (x0, eps) pairs, it works with eps-, x0- and v-predicting networks.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .parameterization import to_x0_eps
from .sampling import Denoiser, Prediction, SamplingGrid

GuidanceFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def call_model(model, x: torch.Tensor, t: torch.Tensor, cond: dict, drop_cond: Optional[bool]) -> torch.Tensor:
    """Run the network; ``drop_cond`` True/False asks a conditional model to drop/keep its condition."""
    if drop_cond is None:
        return model(x, t, **cond)
    flags = torch.full((x.shape[0],), drop_cond, dtype=torch.bool, device=x.device)
    return model(x, t, drop_cond=flags, **cond)


def _conditional_and_unconditional(model, x: torch.Tensor, t: torch.Tensor, cond: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The model with its condition kept and dropped, as one doubled batch where the condition allows.

    One call on 2B examples keeps an accelerator busy; conditions that are not per-example
    tensors (a list of strings, a scalar) cannot be doubled, and then two calls are made.
    """
    batch = x.shape[0]
    per_example = all(torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == batch for v in cond.values())
    if not per_example:
        return call_model(model, x, t, cond, False), call_model(model, x, t, cond, True)
    doubled = {key: torch.cat([value, value]) for key, value in cond.items()}
    drop = torch.cat([torch.zeros(batch, dtype=torch.bool, device=x.device), torch.ones(batch, dtype=torch.bool, device=x.device)])
    return model(torch.cat([x, x]), torch.cat([t, t]), drop_cond=drop, **doubled).chunk(2, dim=0)


def split_output(output: torch.Tensor, x: torch.Tensor, learn_variance: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Separate a network's prediction from its variance channels, checking the shape on the way.

    Returns (prediction, variance_frac) with variance_frac = (v + 1) / 2 in [0, 1], or None.
    """
    expected = list(x.shape)
    if learn_variance:
        expected[1] *= 2
    if list(output.shape) != expected:
        hint = " (twice the channels, since learn_variance=True)" if learn_variance else ""
        raise ValueError(
            f"the model returned shape {tuple(output.shape)} for input {tuple(x.shape)}; "
            f"it must return {tuple(expected)}{hint}"
        )
    output = output.to(x.dtype)
    if not learn_variance:
        return output, None
    prediction, v = output.chunk(2, dim=1)
    return prediction, (v.clamp(-1, 1) + 1) / 2


def model_denoiser(
    model,
    grid: SamplingGrid,
    *,
    prediction: str,
    learn_variance: bool,
    cond: dict,
    guidance_scale: float = 1.0,
) -> Denoiser:
    """The bare network as a denoiser, with classifier-free guidance when ``guidance_scale != 1``."""
    use_cfg = guidance_scale != 1.0

    def denoise(x: torch.Tensor, i: int) -> Prediction:
        t = grid.timesteps[i].to(x.device).expand(x.shape[0])
        alpha, sigma = float(grid.alphas[i]), float(grid.sigmas[i])
        if not use_cfg:
            out, frac = split_output(call_model(model, x, t, cond, None), x, learn_variance)
            x0, eps = to_x0_eps(prediction, out, x, alpha, sigma)
            return Prediction(x0=x0, eps=eps, variance_frac=frac)
        out_c, out_u = _conditional_and_unconditional(model, x, t, cond)
        out, frac = split_output(out_c, x, learn_variance)
        x0, eps = to_x0_eps(prediction, out, x, alpha, sigma)
        out_u, _ = split_output(out_u, x, learn_variance)
        x0_u, eps_u = to_x0_eps(prediction, out_u, x, alpha, sigma)
        # Mixing is affine in the prediction at fixed x_t, so doing it on eps and on x0 gives
        # one consistent pair.
        return Prediction(x0=x0_u + guidance_scale * (x0 - x0_u), eps=eps_u + guidance_scale * (eps - eps_u),
                          variance_frac=frac)

    return denoise


def with_gradient_guidance(denoise: Denoiser, grid: SamplingGrid, guidance_fn: GuidanceFn, scale: float) -> Denoiser:
    """Shift the score by ``scale * grad_x guidance_fn(x, t)`` (a classifier's log p(y|x) or a value).

    ``guidance_fn(x, t)`` gets x_t and the LongTensor timesteps and returns one value per
    example; its gradient is taken at x_t. For eps this means eps -= scale sigma_t grad.
    """

    def denoise_guided(x: torch.Tensor, i: int) -> Prediction:
        pred = denoise(x, i)
        t = grid.timesteps[i].to(x.device).expand(x.shape[0])
        alpha, sigma = float(grid.alphas[i]), float(grid.sigmas[i])
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            value = guidance_fn(x_in, t)
            if value.shape != (x.shape[0],):
                raise ValueError(f"guidance_fn must return one value per example, shape ({x.shape[0]},); got {tuple(value.shape)}")
            (grad,) = torch.autograd.grad(value.sum(), x_in)
        eps = pred.eps - scale * sigma * grad
        return Prediction(x0=(x - sigma * eps) / alpha, eps=eps, variance_frac=pred.variance_frac)

    return denoise_guided


def with_clipping(denoise: Denoiser, grid: SamplingGrid, low: float, high: float) -> Denoiser:
    """Clamp x0_hat to [low, high] (the data range) and recompute eps to match."""

    def denoise_clipped(x: torch.Tensor, i: int) -> Prediction:
        pred = denoise(x, i)
        alpha, sigma = float(grid.alphas[i]), float(grid.sigmas[i])
        x0 = pred.x0.clamp(low, high)
        return Prediction(x0=x0, eps=(x - alpha * x0) / sigma, variance_frac=pred.variance_frac)

    return denoise_clipped


def with_known_values(
    denoise: Denoiser, grid: SamplingGrid, mask: torch.Tensor, known: torch.Tensor, noise: torch.Tensor
) -> Denoiser:
    """Inpainting / state conditioning: where ``mask`` is true the sample takes ``known``.

    Before each call the known entries of x_t become alpha_t known + sigma_t noise (one fixed
    draw, so deterministic samplers stay deterministic); afterwards x0_hat takes ``known`` and
    eps the noise there, which keeps the pair consistent and makes the final sample exact.
    """
    mask = mask.to(torch.bool)

    def denoise_masked(x: torch.Tensor, i: int) -> Prediction:
        alpha, sigma = float(grid.alphas[i]), float(grid.sigmas[i])
        x_in = torch.where(mask, alpha * known + sigma * noise, x)
        pred = denoise(x_in, i)
        return Prediction(
            x0=torch.where(mask, known, pred.x0),
            eps=torch.where(mask, noise, pred.eps),
            variance_frac=pred.variance_frac,
        )

    return denoise_masked


def check_mask(mask: torch.Tensor, known: Optional[torch.Tensor], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate an inpainting mask and its known values against the sample shape."""
    if known is None:
        raise ValueError("mask was given without known values; pass known=<tensor of the sample's shape>")
    mask = torch.as_tensor(mask)
    try:
        torch.broadcast_shapes(mask.shape, tuple(shape))
        torch.broadcast_shapes(known.shape, tuple(shape))
    except RuntimeError:
        raise ValueError(
            f"mask {tuple(mask.shape)} and known {tuple(known.shape)} must broadcast to the sample shape {tuple(shape)}"
        ) from None
    if torch.broadcast_shapes(mask.shape, tuple(shape)) != torch.Size(shape):
        raise ValueError(f"mask {tuple(mask.shape)} would enlarge the sample shape {tuple(shape)}")
    return mask, known
