"""The :class:`Diffusion` object: training loss, sampling and exact likelihood bounds for any tensor shape.

It is stateless once built: a schedule plus a few choices (what the network predicts, how its
variance is set, which loss and weighting, which decoder). Networks follow one convention,
``model(x_t, t, **cond)`` with integer timesteps t of shape (B,) (see docs/interfaces.md).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from . import __version__ as _version
from .guidance import (
    GuidanceFn,
    check_mask,
    model_denoiser,
    split_output,
    with_clipping,
    with_gradient_guidance,
    with_known_values,
)
from .parameterization import check_prediction, from_x0_eps, to_x0_eps, x0_error_scale
from .process import (
    LOG2,
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    normal_kl,
    posterior_coefficients,
    prior_kl,
    q_posterior,
    q_sample,
    transition_variance,
)
from .sampling import SAMPLERS, SamplingGrid, default_spacing, get_sampler, model_calls
from .schedules import NoiseSchedule, respace, schedule_from_config
from .utils import append_dims, check_finite, mean_flat, randn, sum_flat

VARIANCES = ("fixed_small", "fixed_large", "learned_range")
LOSS_TYPES = ("simple", "vlb", "hybrid")
LOSS_WEIGHTINGS = ("uniform", "snr", "min_snr", "truncated_snr")
DECODERS = ("gaussian", "discretized")


def _choose(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    return value


class Diffusion:
    """A Gaussian diffusion process with its losses, samplers and likelihood.

    Args:
        schedule: a schedule name (``linear``, ``scaled_linear``, ``cosine``, ``sqrt``,
            ``sigmoid``), or a :class:`NoiseSchedule` (e.g. from explicit betas).
        num_timesteps: T, the number of training timesteps (ignored for a NoiseSchedule).
        prediction: what the network predicts: ``eps``, ``x0`` or ``v``.
        variance: reverse-process variance: ``fixed_small`` (posterior beta-tilde),
            ``fixed_large`` (beta) or ``learned_range`` (the network outputs twice the
            channels; the second half interpolates log beta and log beta-tilde).
        loss_type: ``simple`` (MSE on the prediction), ``vlb`` (the variational bound) or
            ``hybrid`` (MSE plus ``hybrid_lambda`` times the bound, the bound training only the
            variance; Improved DDPM).
        loss_weighting: weighting of the simple loss, defined on the x0 error so it means the
            same for every prediction: ``uniform`` (plain MSE of the prediction), ``snr``
            (x0 error times SNR, i.e. eps-MSE), ``min_snr`` (times min(SNR, gamma); Hang et al.
            2023) or ``truncated_snr`` (times max(SNR, 1); Salimans & Ho 2022).
        decoder: the bound's last term: ``gaussian`` (a density, for continuous data) or
            ``discretized`` (a probability of quantised data with bins of ``bin_width`` over
            ``data_range``; 2/255 for 8-bit images in [-1, 1]).
        zero_terminal_snr: rescale a named schedule so alpha_bar_{T-1} = 0 (needs eps-free
            prediction: ``v`` or ``x0``).
    """

    def __init__(
        self,
        schedule: str | NoiseSchedule = "linear",
        num_timesteps: int = 1000,
        prediction: str = "eps",
        *,
        variance: str = "fixed_small",
        loss_type: str = "simple",
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        hybrid_lambda: float = 1e-3,
        decoder: str = "gaussian",
        bin_width: float = 2.0 / 255.0,
        data_range: tuple[float, float] = (-1.0, 1.0),
        zero_terminal_snr: bool = False,
    ) -> None:
        if isinstance(schedule, NoiseSchedule):
            self.schedule = schedule
        elif isinstance(schedule, str):
            self.schedule = NoiseSchedule.from_name(schedule, num_timesteps, zero_terminal_snr=zero_terminal_snr)
        else:
            raise TypeError(f"schedule must be a name or a NoiseSchedule, got {type(schedule).__name__}")
        self.prediction = check_prediction(prediction)
        self.variance = _choose(variance, VARIANCES, "variance")
        self.loss_type = _choose(loss_type, LOSS_TYPES, "loss_type")
        self.loss_weighting = _choose(loss_weighting, LOSS_WEIGHTINGS, "loss_weighting")
        self.decoder = _choose(decoder, DECODERS, "decoder")
        if self.loss_type == "hybrid" and self.variance != "learned_range":
            raise ValueError("loss_type='hybrid' trains a learned variance; set variance='learned_range'")
        if self.schedule.alpha_bar[-1] == 0 and self.prediction == "eps":
            raise ValueError("a zero-terminal-SNR schedule cannot be used with prediction='eps' (x0 is undefined "
                             "at alpha=0); use prediction='v' or 'x0'")
        if bin_width <= 0:
            raise ValueError(f"bin_width must be positive, got {bin_width}")
        self.min_snr_gamma = float(min_snr_gamma)
        self.hybrid_lambda = float(hybrid_lambda)
        self.bin_width = float(bin_width)
        self.data_range = (float(data_range[0]), float(data_range[1]))

    # ------------------------------------------------------------------ config
    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def learn_variance(self) -> bool:
        return self.variance == "learned_range"

    @property
    def config(self) -> dict:
        """Everything needed to rebuild this object, as JSON-able values."""
        return {
            "class": "Diffusion",
            "diffkit_version": _version,
            "schedule": self.schedule.config(),
            "prediction": self.prediction,
            "variance": self.variance,
            "loss_type": self.loss_type,
            "loss_weighting": self.loss_weighting,
            "min_snr_gamma": self.min_snr_gamma,
            "hybrid_lambda": self.hybrid_lambda,
            "decoder": self.decoder,
            "bin_width": self.bin_width,
            "data_range": list(self.data_range),
        }

    @classmethod
    def from_config(cls, config: dict) -> "Diffusion":
        """Rebuild a Diffusion from :attr:`config`."""
        if not isinstance(config, dict) or "schedule" not in config:
            raise ValueError("not a Diffusion config: it needs a 'schedule' entry (use Diffusion.config to make one)")
        keys = ("prediction", "variance", "loss_type", "loss_weighting", "min_snr_gamma", "hybrid_lambda",
                "decoder", "bin_width", "data_range")
        return cls(schedule_from_config(config["schedule"]), **{k: config[k] for k in keys if k in config})

    def __repr__(self) -> str:
        return (f"Diffusion(schedule={self.schedule.name!r}, num_timesteps={self.num_timesteps}, "
                f"prediction={self.prediction!r}, variance={self.variance!r}, loss_type={self.loss_type!r})")

    # ------------------------------------------------------------------ forward process
    def _scales(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t and sigma_t for per-example timesteps, shaped to broadcast against ``like``."""
        alpha = append_dims(self.schedule.alpha_at(t.cpu()).to(like.device, like.dtype), like.ndim)
        sigma = append_dims(self.schedule.sigma_at(t.cpu()).to(like.device, like.dtype), like.ndim)
        return alpha, sigma

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps for per-example timesteps ``t`` (B,)."""
        if noise is None:
            noise = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        alpha, sigma = self._scales(t, x0)
        return q_sample(x0, alpha, sigma, noise)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x0); at t = 0 the posterior is x0 itself (variance 0)."""
        a_t, s_t = self._scales(t, x0)
        a_s, s_s = self._scales(t - 1, x0)
        return q_posterior(x0, x_t, a_t, s_t, a_s, s_s)

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x0) || N(0, I)) in bits per dimension, one value per example."""
        t_last = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.long)
        alpha, sigma = self._scales(t_last, x0)
        return mean_flat(prior_kl(x0, alpha, sigma)) / LOG2

    # ------------------------------------------------------------------ model outputs
    def _reverse_log_variance(self, frac, a_t, s_t, a_s, s_s, *, is_last: bool, next_posterior_var=None):
        """log variance of p(x_s | x_t) for this diffusion's variance choice.

        At the last step (to clean data) the posterior variance is zero, so -- as Improved DDPM
        does -- the next step's beta-tilde stands in for it (``next_posterior_var``).
        """
        beta = transition_variance(a_t, s_t, a_s, s_s)
        small = posterior_coefficients(a_t, s_t, a_s, s_s)[2]
        if is_last:
            small = next_posterior_var if next_posterior_var is not None else beta
            if self.variance == "fixed_large":
                beta = small  # improved-diffusion replaces beta_0 by beta-tilde_1 as well
        log_small, log_beta = torch.log(small.clamp(min=1e-20)), torch.log(beta.clamp(min=1e-20))
        if self.variance == "fixed_small":
            return log_small
        if self.variance == "fixed_large":
            return log_beta
        return frac * log_beta + (1 - frac) * log_small

    # ------------------------------------------------------------------ training
    def loss(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        *,
        t: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        cond_drop_prob: float = 0.0,
        return_terms: bool = False,
        **cond,
    ):
        """The training loss for a batch of clean data ``x0`` (B, ...).

        Draws t ~ U{0..T-1} and eps ~ N(0, I) (from ``generator`` when given), forms x_t, calls
        ``model(x_t, t, **cond)`` and returns the batch mean of the configured loss. With
        ``cond_drop_prob`` > 0 the model also gets ``drop_cond``, a random mask that asks it to
        ignore its condition (training for classifier-free guidance).
        With ``return_terms=True`` it returns ``(loss, terms)``, ``terms`` holding per-example
        tensors: ``mse``, ``vb`` (bits/dim, when the bound is used), ``t`` and ``loss``.
        """
        if x0.ndim < 2:
            raise ValueError(f"x0 must have a batch dimension and at least one data dimension, got shape {tuple(x0.shape)}")
        check_finite(x0, "the training batch x0")
        batch = x0.shape[0]
        if t is None:
            gen_device = generator.device if generator is not None else x0.device
            t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gen_device)
        t = t.to(x0.device).long()
        if noise is None:
            noise = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        alpha, sigma = self._scales(t, x0)
        x_t = q_sample(x0, alpha, sigma, noise)
        if cond_drop_prob > 0:
            gen_device = generator.device if generator is not None else x0.device
            drop = torch.rand(batch, generator=generator, device=gen_device).to(x0.device) < cond_drop_prob
            cond = {**cond, "drop_cond": drop}
        output = model(x_t, t, **cond)
        if output.dtype != x0.dtype:
            output = output.to(x0.dtype)
        prediction, frac = split_output(output, x_t, self.learn_variance)

        target = from_x0_eps(self.prediction, x0, noise, alpha, sigma)
        mse = mean_flat((target - prediction) ** 2)
        terms = {"t": t, "mse": mse}
        if self.loss_weighting != "uniform":
            mse = mse * self._loss_weight(alpha, sigma).flatten()
            terms["weighted_mse"] = mse

        if self.loss_type == "simple":
            per_example = mse
        else:
            # The hybrid loss lets the bound train only the variance: the mean is frozen.
            frozen = prediction.detach() if self.loss_type == "hybrid" else prediction
            x0_hat, _ = to_x0_eps(self.prediction, frozen, x_t, alpha, sigma)
            alpha_s, sigma_s = self._scales(t - 1, x0)
            vb = self._bound_term(x0, x_t, x0_hat, frac, (alpha, sigma, alpha_s, sigma_s),
                                  append_dims(t == 0, x0.ndim), self._first_posterior_variance(x0))
            terms["vb"] = vb
            scale = self.num_timesteps  # a uniform t makes T * L_t an unbiased estimate of the bound
            per_example = scale * vb if self.loss_type == "vlb" else mse + self.hybrid_lambda * scale * vb
        terms["loss"] = per_example
        loss = per_example.mean()
        return (loss, terms) if return_terms else loss

    def _loss_weight(self, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        snr = alpha**2 / sigma**2
        if self.loss_weighting == "snr":
            weight_x0 = snr
        elif self.loss_weighting == "min_snr":
            weight_x0 = snr.clamp(max=self.min_snr_gamma)
        else:
            weight_x0 = snr.clamp(min=1.0)
        return weight_x0 / x0_error_scale(self.prediction, alpha, sigma)

    def _bound_term(self, x0, x_t, x0_hat, frac, scales, is_last, decoder_small, decoder=None, bin_width=None):
        """One term of the bound in bits/dim per example: KL(q(x_s|x_t,x0) || p(x_s|x_t)) for a step
        between noisy points, -log p(x0 | x_t) (the decoder) for the last step to clean data.

        ``scales`` = (alpha_t, sigma_t, alpha_s, sigma_s); ``is_last`` marks the decoder step (a
        bool or a per-example mask); ``decoder_small`` is beta-tilde of the step before it.
        """
        a_t, s_t, a_s, s_s = scales
        true_mean, true_var = q_posterior(x0, x_t, a_t, s_t, a_s, s_s)
        model_mean, _ = q_posterior(x0_hat, x_t, a_t, s_t, a_s, s_s)
        frac = frac if frac is not None else 0.0
        is_last = torch.as_tensor(is_last, device=x0.device)
        log_var = torch.where(
            is_last,
            self._reverse_log_variance(frac, a_t, s_t, a_s, s_s, is_last=True, next_posterior_var=decoder_small),
            self._reverse_log_variance(frac, a_t, s_t, a_s, s_s, is_last=False),
        ).expand_as(x0)
        kl = normal_kl(true_mean, torch.log(true_var.clamp(min=1e-20)).expand_as(x0), model_mean, log_var)
        decoder_nll = -self._decoder_log_likelihood(x0, model_mean, log_var, decoder, bin_width)
        return mean_flat(torch.where(is_last, decoder_nll, kl)) / LOG2

    def _first_posterior_variance(self, like: torch.Tensor) -> torch.Tensor:
        """beta-tilde of the step 1 -> 0, which stands in for the decoder's zero posterior variance."""
        if self.num_timesteps < 2:
            return self.schedule.betas[0].to(like.device, like.dtype)
        one = torch.ones(1, dtype=torch.long)
        return posterior_coefficients(*self._scales(one, like), *self._scales(one - 1, like))[2]

    def _decoder_log_likelihood(self, x0, mean, log_var, decoder=None, bin_width=None) -> torch.Tensor:
        decoder = decoder or self.decoder
        if decoder == "gaussian":
            return gaussian_log_likelihood(x0, mean, log_var)
        if decoder == "discretized":
            low, high = self.data_range
            return discretized_gaussian_log_likelihood(x0, mean, log_var, bin_width or self.bin_width, low, high)
        raise ValueError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")

    # ------------------------------------------------------------------ likelihood
    @torch.no_grad()
    def nll(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        *,
        steps: Optional[int] = None,
        decoder: Optional[str] = None,
        bin_width: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        return_terms: bool = False,
        progress: bool = False,
        **cond,
    ):
        """The variational bound on -log p(x0) in bits per dimension, one value per example.

            L = KL(q(x_T|x0) || N(0,I)) + sum_t E KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) + E[-log p(x0|x_1)]

        evaluated over every training step (one model call each), or over the ``steps``-point
        respaced chain, which bounds the likelihood of the matching ``steps``-step DDPM sampler.
        ``decoder`` and ``bin_width`` override the diffusion's own (``discretized`` for
        quantised data). With ``return_terms=True`` it returns ``(bpd, terms)`` with ``prior``,
        ``decoder`` (B,) and ``kl`` (B, K-1) in bits/dim, and ``timesteps``.
        """
        check_finite(x0, "x0")
        K = self.num_timesteps if steps is None else steps
        timesteps = respace(self.schedule, K, "linspace") if K != self.num_timesteps else torch.arange(K - 1, -1, -1)
        grid = SamplingGrid.from_timesteps(self.schedule, timesteps)
        num_dims = x0[0].numel()
        log_likelihood_kind = decoder or self.decoder
        _choose(log_likelihood_kind, DECODERS, "decoder")

        def scalar(values, i):
            return values[i].to(device=x0.device, dtype=x0.dtype)

        prior = sum_flat(prior_kl(x0, scalar(grid.alphas, 0), scalar(grid.sigmas, 0))) / (num_dims * LOG2)
        # beta-tilde of the last proper step stands in for the decoder's zero posterior variance
        decoder_small = None
        if len(grid) >= 2:
            decoder_small = posterior_coefficients(grid.alphas[-3], grid.sigmas[-3], grid.alphas[-2],
                                                   grid.sigmas[-2])[2].to(x0.device, x0.dtype)
        kls, decoder_bits = [], None
        for i in tqdm(range(len(grid)), desc="nll", disable=not progress, leave=False):
            scales = tuple(scalar(values, j) for values, j in
                           ((grid.alphas, i), (grid.sigmas, i), (grid.alphas, i + 1), (grid.sigmas, i + 1)))
            noise = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = q_sample(x0, scales[0], scales[1], noise)
            t = grid.timesteps[i].to(x0.device).expand(x0.shape[0])
            output, frac = split_output(model(x_t, t, **cond), x_t, self.learn_variance)
            x0_hat, _ = to_x0_eps(self.prediction, output, x_t, scales[0], scales[1])
            is_last = i == len(grid) - 1
            bits = self._bound_term(x0, x_t, x0_hat, frac, scales, is_last, decoder_small, log_likelihood_kind, bin_width)
            if is_last:
                decoder_bits = bits
            else:
                kls.append(bits)
        kl_terms = torch.stack(kls, dim=1) if kls else torch.zeros(x0.shape[0], 0, device=x0.device, dtype=x0.dtype)
        bpd = prior + kl_terms.sum(dim=1) + decoder_bits
        if return_terms:
            return bpd, {"prior": prior, "decoder": decoder_bits, "kl": kl_terms, "timesteps": grid.timesteps}
        return bpd

    # ------------------------------------------------------------------ sampling
    def sampling_grid(self, steps: Optional[int] = None, spacing: Optional[str] = None, *,
                      sampler: str = "unipc", timesteps=None, log_snr_range=None) -> SamplingGrid:
        """The grid a sampler would visit: explicit ``timesteps``, or ``steps`` respaced by ``spacing``."""
        if timesteps is not None:
            return SamplingGrid.from_timesteps(self.schedule, timesteps)
        if steps is None:
            steps = self.num_timesteps if sampler == "ddpm" else min(20, self.num_timesteps)
        steps_list = respace(self.schedule, steps, spacing or default_spacing(sampler), log_snr_range=log_snr_range)
        return SamplingGrid.from_timesteps(self.schedule, steps_list)

    @torch.no_grad()
    def sample(
        self,
        model: Callable[..., torch.Tensor],
        shape: Sequence[int],
        *,
        sampler: str = "unipc",
        steps: Optional[int] = None,
        spacing: Optional[str] = None,
        timesteps=None,
        log_snr_range: Optional[tuple[Optional[float], Optional[float]]] = None,
        generator: Optional[torch.Generator] = None,
        noise: Optional[torch.Tensor] = None,
        device: Optional[torch.device | str] = None,
        dtype: torch.dtype = torch.float32,
        guidance_scale: float = 1.0,
        guidance_fn: Optional[GuidanceFn] = None,
        guidance_fn_scale: float = 1.0,
        mask: Optional[torch.Tensor] = None,
        known: Optional[torch.Tensor] = None,
        init: Optional[torch.Tensor] = None,
        strength: Optional[float] = None,
        clip_denoised: Optional[tuple[float, float]] = None,
        callback: Optional[Callable[[dict], None]] = None,
        progress: bool = False,
        sampler_options: Optional[dict] = None,
        **cond,
    ) -> torch.Tensor:
        """Draw samples of ``shape`` = (B, ...) from ``model``.

        Args:
            sampler: one of :data:`diffkit.SAMPLERS`. ``steps`` grid points (default 20; all T
                for ``ddpm``) placed by ``spacing`` (default: the sampler's best, see
                :func:`diffkit.sampling.default_spacing`), or explicit descending ``timesteps``.
                ``log_snr_range=(low, high)`` narrows a ``logsnr``/``karras`` grid (see
                :func:`diffkit.respace`); (-4, 8) suits few-step sampling of unit-scale data.
            generator, noise: ``noise`` is the starting x_T; otherwise it is drawn from
                ``generator``, which also feeds stochastic samplers.
            guidance_scale: classifier-free guidance weight w (1 = off); the model must accept
                ``drop_cond``.
            guidance_fn, guidance_fn_scale: gradient guidance by a differentiable
                ``guidance_fn(x_t, t) -> (B,)`` (a classifier's log-probability, a value).
            mask, known: inpainting / replacement conditioning; where ``mask`` is true the
                sample equals ``known``.
            init, strength: start from ``init`` noised to ``strength`` in (0, 1] of the chain
                (SDEdit / img2img / denoising); 1 is pure noise.
            clip_denoised: (low, high) to clamp x0 predictions to the data range.
            callback: called with a dict (i, t, x, denoised, steps) at every grid point.
            sampler_options: extra keyword arguments for the sampler (e.g. ``{"eta": 1.0}``).
            **cond: passed to the model on every call.
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"shape must be (batch, ...) with positive sizes, got {shape}")
        sample_fn = get_sampler(sampler)
        device = torch.device(device) if device is not None else (noise.device if noise is not None else _model_device(model))
        grid = self.sampling_grid(steps, spacing, sampler=sampler, timesteps=timesteps, log_snr_range=log_snr_range)

        if noise is None:
            noise = randn(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but shape={shape} was asked for")
        noise = noise.to(device=device, dtype=dtype)

        x = noise
        if init is not None or strength is not None:
            if init is None or strength is None:
                raise ValueError("img2img/SDEdit needs both init=<clean data> and strength in (0, 1]")
            if not 0 < strength <= 1:
                raise ValueError(f"strength must lie in (0, 1], got {strength}")
            init = torch.as_tensor(init).to(device=device, dtype=dtype).expand(shape)
            check_finite(init, "init")
            grid = grid.truncate(round(strength * (self.num_timesteps - 1)))
            x = q_sample(init, float(grid.alphas[0]), float(grid.sigmas[0]), noise)

        denoise = model_denoiser(model, grid, prediction=self.prediction, learn_variance=self.learn_variance,
                                 cond=cond, guidance_scale=guidance_scale)
        if guidance_fn is not None:
            denoise = with_gradient_guidance(denoise, grid, guidance_fn, guidance_fn_scale)
        if clip_denoised is not None:
            denoise = with_clipping(denoise, grid, *clip_denoised)
        if mask is not None or known is not None:
            mask, known = check_mask(mask if mask is not None else torch.ones(shape, dtype=torch.bool), known, shape)
            denoise = with_known_values(denoise, grid, mask.to(device), known.to(device=device, dtype=dtype), noise)

        bar = tqdm(total=model_calls(sampler, len(grid)), desc=f"sampling ({sampler})", disable=not progress, leave=False)

        def counted(x_in, i, _inner=denoise):
            bar.update(1)
            return _inner(x_in, i)

        options = dict(sampler_options or {})
        if sampler == "ddpm" and "variance" not in options:
            options["variance"] = "learned" if self.learn_variance else self.variance
        try:
            result = sample_fn(counted, x, grid, generator=generator, callback=callback, **options)
        finally:
            bar.close()
        if not torch.isfinite(result).all():
            raise FloatingPointError(
                "sampling produced NaN or Inf; check the model for NaN outputs, try clip_denoised=(-1, 1), "
                "or use more steps"
            )
        return result


def _model_device(model) -> torch.device:
    """Where a model's parameters live (the CPU for parameter-free callables)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")
