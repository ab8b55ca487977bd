"""The :class:`Diffusion` object: training loss, sampling and exact likelihood bounds for any tensor shape.

It is stateless once built: a schedule plus a few choices (what the network predicts, what it
is told about the noise, how its variance is set, which loss and weighting, which decoder).
Networks follow one convention, ``model(x_t, t, **cond)`` with float times t of shape (B,)
(see docs/interfaces.md).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from . import __version__ as _version
from .guidance import SamplingContext, Wrapper, apply_wrappers, model_denoiser, split_output
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
from .sampling import TIME_INPUTS, ModelStatistics, SamplingGrid, default_spacing, get_sampler, sampler_spec
from .schedules import NoiseSchedule, respace, schedule_from_config
from .starts import Start, WarmStart, as_start
from .utils import append_dims, check_finite, module_device, randn

VARIANCES = ("fixed_small", "fixed_large", "learned_range")
LOSS_TYPES = ("simple", "vlb", "hybrid")
LOSS_WEIGHTINGS = ("uniform", "snr", "min_snr", "truncated_snr")
DECODERS = ("gaussian", "discretized")
TIME_SAMPLINGS = ("discrete", "continuous", "logit_normal", "noise_level")


def _choose(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    return value


def _element_mask(mask: Optional[torch.Tensor], known_mask: Optional[torch.Tensor], x0: torch.Tensor) -> Optional[torch.Tensor]:
    """The elements that count, broadcast to x0's shape: ``mask`` minus the known entries (None: all)."""
    if mask is None and known_mask is None:
        return None
    counted = torch.ones_like(x0, dtype=torch.bool)
    for name, value in (("mask", mask), ("known_mask", known_mask)):
        if value is None:
            continue
        value = torch.as_tensor(value, device=x0.device)
        if value.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor (True = {'counts' if name == 'mask' else 'known'}), got {value.dtype}")
        try:
            value = value.expand_as(x0)
        except RuntimeError:
            raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to the data shape {tuple(x0.shape)}") from None
        counted = counted & (value if name == "mask" else ~value)
    counts = counted.reshape(x0.shape[0], -1).sum(dim=1)
    if (counts == 0).any():
        raise ValueError(f"mask leaves no element to count in example(s) {(counts == 0).nonzero().flatten().tolist()}")
    return counted


def _significant(values, digits: int = 7):
    """A (nested) list of floats rounded to ``digits`` significant digits."""
    if isinstance(values, list):
        return [_significant(v, digits) for v in values]
    return float(f"{values:.{digits}g}")


def _masked_mean(values: torch.Tensor, counted: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-example mean over the elements that count: (B, ...) -> (B,)."""
    if counted is None:
        return values.reshape(values.shape[0], -1).mean(dim=1)
    flat = torch.where(counted, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return flat.reshape(values.shape[0], -1).sum(dim=1) / counted.reshape(values.shape[0], -1).sum(dim=1)


@dataclass
class Candidates:
    """Several samples per example, best first: ``samples`` (B, N, ...), ``scores`` (B, N)."""

    samples: torch.Tensor
    scores: torch.Tensor

    @property
    def top(self) -> torch.Tensor:
        """The best-scoring sample of each example, (B, ...)."""
        return self.samples[:, 0]


class Diffusion:
    """A Gaussian diffusion process with its losses, samplers and likelihood.

    Args:
        schedule: a schedule name (``linear``, ``scaled_linear``, ``cosine``, ``sqrt``,
            ``sigmoid``, or ``flow``: the flow-matching path x_s = (1 - s) x0 + s eps, s in
            [0, 1], see :class:`~diffkit.schedules.FlowSchedule`), or a :class:`NoiseSchedule`
            (e.g. from explicit betas).
        num_timesteps: T, the number of training timesteps (ignored for a NoiseSchedule; on
            the flow path, the resolution of discrete time draws and of the bound's chain).
        prediction: what the network predicts: ``eps``, ``x0``, ``v`` or ``flow`` (the
            velocity eps - x0; rectified flow / flow matching, with ``schedule="flow"``).
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
        time_input: what the network's ``t`` holds: ``timestep`` (the training time in
            [0, T-1], integer-valued for integer grids), ``noise_level`` (sqrt(alpha_bar),
            WaveGrad) or ``log_snr``. The last two let one model run on any noise levels.
        time_sampling: how training draws times: ``discrete`` (uniform over the T steps),
            ``continuous`` (uniform over the time range: [0, T-1], or [0, 1] on the flow path),
            ``logit_normal`` (sigmoid(m + s n) of the range, n ~ N(0, 1), with (m, s) =
            ``logit_normal``; Esser et al. 2024, Stable Diffusion 3) or ``noise_level``
            (WaveGrad: a step i uniformly, then sqrt(alpha_bar) uniformly between steps i-1
            and i). Default: ``continuous`` on the flow path, ``discrete`` otherwise.
        logit_normal: (mean, std) of ``time_sampling="logit_normal"``.
        calibration: what :mod:`diffkit.calibration` measured on a trained model, carried in
            :attr:`config` (so a checkpoint keeps it): ``{"grids": {"<sampler>/<K>": {"times":
            [...], "sampler_options": {...}}}, "eps_norm_sq": [T floats], "x0_mse": [T floats]}``,
            all optional. A stored grid is what ``sample(sampler=..., steps=K)`` and
            ``sampling_grid(K)`` use; ``x0_mse`` (or, in older calibrations, ``eps_norm_sq``
            alone) gives :meth:`nll` (and ``ddpm`` with ``variance="analytic"``) the optimal
            reverse variances. Fill it with :func:`diffkit.calibration.calibrate`.
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
        time_input: str = "timestep",
        time_sampling: Optional[str] = None,
        logit_normal: tuple[float, float] = (0.0, 1.0),
        calibration: Optional[dict] = None,
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
        self.time_input = _choose(time_input, TIME_INPUTS, "time_input")
        if time_sampling is None:
            time_sampling = "continuous" if self.schedule.is_continuous else "discrete"
        self.time_sampling = _choose(time_sampling, TIME_SAMPLINGS, "time_sampling")
        try:
            mean, std = (float(v) for v in logit_normal)
        except (TypeError, ValueError):
            raise ValueError(f"logit_normal must be (mean, std), got {logit_normal!r}") from None
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ValueError(f"logit_normal needs a finite mean and a positive std, got {logit_normal!r}")
        self.logit_normal = (mean, std)
        if self.loss_type == "hybrid" and self.variance != "learned_range":
            raise ValueError("loss_type='hybrid' trains a learned variance; set variance='learned_range'")
        if self.loss_type != "simple" and self.time_sampling != "discrete":
            raise ValueError(f"loss_type={self.loss_type!r} sums the bound's terms between training steps; "
                             "use time_sampling='discrete' with it")
        if self.schedule.alpha_bar[-1] == 0 and self.prediction == "eps":
            hint = "'flow', 'v' or 'x0'" if self.schedule.is_continuous else "'v' or 'x0'"
            raise ValueError(f"the {self.schedule.name!r} schedule reaches pure noise (alpha = 0), so it cannot be used "
                             f"with prediction='eps' (x0 is undefined there); use prediction={hint}")
        if self.schedule.is_continuous and self.loss_type != "simple":
            raise ValueError(f"loss_type={self.loss_type!r} sums the bound's terms between the steps of a discrete "
                             "chain; the flow path trains with loss_type='simple'")
        if bin_width <= 0:
            raise ValueError(f"bin_width must be positive, got {bin_width}")
        self.min_snr_gamma = float(min_snr_gamma)
        self.hybrid_lambda = float(hybrid_lambda)
        self.bin_width = float(bin_width)
        self.data_range = (float(data_range[0]), float(data_range[1]))
        # The loss's bound term at t = 0 needs the full chain's decoder variance; it never changes.
        self._decoder_variance = SamplingGrid.from_times(
            self.schedule, self.schedule.time_of_step(torch.arange(self.num_timesteps - 1, -1, -1))).decoder_variance()
        self._calibration = self._check_calibration(calibration)
        entry = self._calibration.get("statistics")
        self._statistics = (None if entry is None else
                            ModelStatistics(entry["lambdas"], entry["linear"], entry["offset"]))
        # ModelStatistics per event shape, filled on first use: each holds its solver's step cache.
        self._statistics_by_shape: dict = {}

    @property
    def calibration(self) -> dict:
        """What :mod:`diffkit.calibration` measured (see the class docstring); ``{}`` when nothing.

        A Diffusion never changes once built: :meth:`with_calibration` (or
        :func:`diffkit.calibration.calibrate`) returns a new one. The dict is a copy to read.
        """
        return copy.deepcopy(self._calibration)

    @calibration.setter
    def calibration(self, calibration) -> None:
        raise AttributeError("a Diffusion does not change once built; use diffusion.with_calibration(calibration), "
                             "which returns a new Diffusion")

    def with_calibration(self, calibration: Optional[dict]) -> "Diffusion":
        """A copy of this diffusion with ``calibration`` (validated) in place of its own; this one is unchanged."""
        return type(self).from_config({**self.config, "calibration": calibration})

    def _check_calibration(self, calibration: Optional[dict]) -> dict:
        """A validated, JSON-able copy of a calibration dict (see the class docstring)."""
        if calibration is None:
            return {}
        if not isinstance(calibration, dict):
            raise ValueError(f"calibration must be a dict, got {type(calibration).__name__}")
        known = ("grids", "eps_norm_sq", "x0_mse", "statistics", "notes")
        unknown = set(calibration) - set(known)
        if unknown:
            raise ValueError(f"unknown calibration entries {sorted(unknown)}; expected {', '.join(map(repr, known))}")
        checked: dict = {}
        for name in ("eps_norm_sq", "x0_mse"):
            if name not in calibration:
                continue
            values = torch.as_tensor(calibration[name], dtype=torch.float64).flatten()
            if values.numel() != self.num_timesteps or not torch.isfinite(values).all():
                raise ValueError(f"calibration[{name!r}] needs {self.num_timesteps} finite values (one per "
                                 f"training step), got {values.numel()}")
            checked[name] = [float(v) for v in values]
        grids = calibration.get("grids", {})
        if not isinstance(grids, dict):
            raise ValueError("calibration['grids'] must map '<sampler>/<steps>' to times")
        checked_grids = {}
        for key, entry in grids.items():
            name, _, count = str(key).rpartition("/")
            get_sampler(name)
            if not count.isdigit():
                raise ValueError(f"calibration grid key {key!r} must read '<sampler>/<steps>'")
            entry = {"times": entry} if not isinstance(entry, dict) else entry
            times = torch.as_tensor(entry.get("times", []), dtype=torch.float64).flatten()
            if times.numel() != int(count):
                raise ValueError(f"calibration grid {key!r} holds {times.numel()} times, not {count}")
            SamplingGrid.from_times(self.schedule, times)  # raises on unordered or out-of-range times
            options = entry.get("sampler_options", {}) or {}
            if not isinstance(options, dict):
                raise ValueError(f"calibration grid {key!r}: sampler_options must be a dict")
            checked_grids[str(key)] = {"times": [float(t) for t in times], "sampler_options": dict(options)}
        if checked_grids:
            checked["grids"] = checked_grids
        if "statistics" in calibration:
            entry = calibration["statistics"]
            if not isinstance(entry, dict) or set(entry) != {"lambdas", "linear", "offset"}:
                raise ValueError("calibration['statistics'] must hold 'lambdas', 'linear' and 'offset' "
                                 "(see diffkit.calibration.estimate_model_statistics)")
            try:
                ModelStatistics(entry["lambdas"], entry["linear"], entry["offset"])
            except (ValueError, TypeError, RuntimeError) as error:
                raise ValueError(f"calibration['statistics'] is not valid: {error}") from None
            # Seven significant digits (float32's): the tables are long, and the estimates' own
            # Monte-Carlo error is far larger.
            checked["statistics"] = {name: _significant(torch.as_tensor(entry[name], dtype=torch.float64).tolist())
                                     for name in ("lambdas", "linear", "offset")}
        if "notes" in calibration:
            checked["notes"] = calibration["notes"]
        return checked

    def model_statistics(self, event_shape: Optional[Sequence[int]] = None) -> Optional[ModelStatistics]:
        """The calibrated :class:`ModelStatistics` for samples of ``event_shape``, or None if there are none.

        They are per element of the shape they were measured on; for another shape (a longer
        clip, another length of text) every element gets their average, which still carries
        the scale of the data.
        """
        stats = self._statistics
        if stats is None:
            return None
        key = None if event_shape is None else tuple(event_shape)
        if key is None:
            return stats
        if key not in self._statistics_by_shape:
            if tuple(stats.linear.shape[1:]) != key:
                flat = stats.linear.shape[0]
                stats = ModelStatistics(stats.lambdas, stats.linear.reshape(flat, -1).mean(dim=1),
                                        stats.offset.reshape(flat, -1).mean(dim=1))
            self._statistics_by_shape[key] = stats
        return self._statistics_by_shape[key]

    @property
    def default_sampler(self) -> str:
        """``dpm-v3`` once calibrated for it (statistics or grids), ``unipc`` before."""
        calibrated = "statistics" in self._calibration or any(
            key.startswith("dpm-v3/") for key in self._calibration.get("grids", {}))
        return "dpm-v3" if calibrated else "unipc"

    def calibrated_grid(self, sampler: str, steps: int) -> Optional[tuple[SamplingGrid, dict]]:
        """The stored grid and sampler options for (``sampler``, ``steps``), or None when there is none."""
        entry = self._calibration.get("grids", {}).get(f"{sampler}/{int(steps)}")
        if entry is None:
            return None
        return SamplingGrid.from_times(self.schedule, entry["times"]), dict(entry.get("sampler_options", {}))

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
            "time_input": self.time_input,
            "time_sampling": self.time_sampling,
            **({"logit_normal": list(self.logit_normal)} if self.time_sampling == "logit_normal" else {}),
            # Only when present: an uncalibrated config stays what it always was.
            **({"calibration": copy.deepcopy(self._calibration)} if self._calibration else {}),
        }

    @classmethod
    def from_config(cls, config: dict) -> "Diffusion":
        """Rebuild a Diffusion from :attr:`config`."""
        if isinstance(config, dict) and config.get("class") == "MaskedDiffusion":
            raise ValueError("this is a masked (discrete) diffusion config; load it with "
                             "diffkit.MaskedDiffusion.from_config, not Diffusion.from_config")
        if not isinstance(config, dict) or not isinstance(config.get("schedule"), dict):
            raise ValueError("not a Diffusion config: it needs a 'schedule' entry (use Diffusion.config to make one)")
        keys = ("prediction", "variance", "loss_type", "loss_weighting", "min_snr_gamma", "hybrid_lambda",
                "decoder", "bin_width", "data_range", "time_input", "time_sampling", "logit_normal", "calibration")
        return cls(schedule_from_config(config["schedule"]), **{k: config[k] for k in keys if k in config})

    def __repr__(self) -> str:
        return (f"Diffusion(schedule={self.schedule.name!r}, num_timesteps={self.num_timesteps}, "
                f"prediction={self.prediction!r}, variance={self.variance!r}, loss_type={self.loss_type!r}, "
                f"time_input={self.time_input!r})")

    # ------------------------------------------------------------------ forward process
    def _scales(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t and sigma_t for per-example (float or integer) times, shaped to broadcast against ``like``."""
        if self.schedule.is_continuous:  # the path's own coefficients (1 - s, s), not variance preserving
            alpha, sigma = self.schedule.alpha_at(t), self.schedule.sigma_at(t)
        else:
            alpha_bar = self.schedule.alpha_bar_at(t)
            alpha, sigma = alpha_bar.sqrt(), (1.0 - alpha_bar).clamp(min=0).sqrt()
        return (append_dims(alpha.to(like.device, like.dtype), like.ndim),
                append_dims(sigma.to(like.device, like.dtype), like.ndim))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps for per-example times ``t`` (B,), fractions allowed."""
        if noise is None:
            noise = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        alpha, sigma = self._scales(t, x0)
        return q_sample(x0, alpha, sigma, noise)

    def model_time(self, t: torch.Tensor, alpha: Optional[torch.Tensor] = None,
                   sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What the network is told, float32 (B,), for times ``t`` (see ``time_input``).

        ``alpha`` and ``sigma`` are t's scales when the caller has them already.
        """
        if alpha is None or sigma is None:
            t = torch.as_tensor(t, dtype=torch.float64)
            alpha, sigma = self._scales(t, t)
        if self.time_input == "timestep":
            value = t.to(torch.float64)
        elif self.time_input == "noise_level":
            value = alpha.reshape(-1).to(torch.float64)
            if self.schedule.is_continuous:  # sqrt(alpha_bar) of the variance-preserving state
                value = value / (value**2 + sigma.reshape(-1).to(torch.float64) ** 2).sqrt()
        else:
            value = 2.0 * (torch.log(alpha.reshape(-1).to(torch.float64)) - torch.log(sigma.reshape(-1).to(torch.float64)))
        return value.to(torch.float32)

    def draw_times(self, batch: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Training times (B,) float64 on the CPU, drawn as ``time_sampling`` says.

        For losses of other networks on noisy data (a value function, a classifier on noisy
        latents): draw times here, noise with :meth:`q_sample`, and tell the network
        :meth:`model_time`, so it sees exactly what the denoiser sees.
        """
        gen_device = generator.device if generator is not None else torch.device("cpu")
        T = self.num_timesteps
        if self.time_sampling == "discrete":
            t = torch.randint(0, T, (batch,), generator=generator, device=gen_device)
            return self.schedule.time_of_step(t.cpu().to(torch.float64))
        low, high = self.schedule.time_range
        if self.time_sampling == "logit_normal":
            mean, std = self.logit_normal
            z = torch.randn(batch, generator=generator, device=gen_device, dtype=torch.float64).cpu()
            return low + (high - low) * torch.sigmoid(mean + std * z)
        u = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float64).cpu()
        if self.time_sampling == "continuous":
            return low + u * (high - low)
        # WaveGrad: a step uniformly, then the noise level uniformly within it (its upper end is
        # clean data for the first step), so every level the schedule spans is trained on.
        step = torch.randint(0, T, (batch,), generator=generator, device=gen_device).cpu()
        levels = torch.cat([torch.ones(1, dtype=torch.float64), self.schedule.alpha_bar.sqrt()])
        level = levels[step + 1] + u * (levels[step] - levels[step + 1])
        return self.schedule.time_for_alpha_bar(level**2)

    # ------------------------------------------------------------------ model outputs
    def _reverse_log_variance(self, frac, a_t, s_t, a_s, s_s, *, is_last: bool, decoder_variance: float):
        """log variance of p(x_s | x_t) for this diffusion's variance choice.

        At the last step (to clean data) the posterior variance is zero, so -- as Improved DDPM
        does -- ``decoder_variance`` (:meth:`SamplingGrid.decoder_variance`) stands in for it,
        and for beta too when the variance is ``fixed_large``; a learned variance still
        interpolates up to the step's own beta.
        """
        beta = transition_variance(a_t, s_t, a_s, s_s)
        small = posterior_coefficients(a_t, s_t, a_s, s_s)[2]
        if is_last:
            small = torch.full_like(beta, decoder_variance)
            if self.variance == "fixed_large":
                beta = small
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
        mask: Optional[torch.Tensor] = None,
        weight: Optional[torch.Tensor] = None,
        known_mask: Optional[torch.Tensor] = None,
        return_terms: bool = False,
        **cond,
    ):
        """The training loss for a batch of clean data ``x0`` (B, ...).

        Draws times t as ``time_sampling`` says and eps ~ N(0, I) (from ``generator`` when
        given), forms x_t, calls ``model(x_t, model_time, **cond)`` and returns the batch mean
        of the configured loss. With ``cond_drop_prob`` > 0 the model also gets ``drop_cond``,
        a random mask that asks it to ignore its condition (classifier-free guidance).

        ``mask`` (bool, broadcastable to x0) marks the elements that count (padding is False):
        every per-example mean runs over them only. ``weight`` multiplies each element's
        squared error (Diffuser's action weights). ``known_mask`` marks entries the model is
        given clean in x_t, as :class:`diffkit.guidance.KnownValues` with ``clean=True`` does at
        sampling time; they are left out of the loss.

        With ``return_terms=True`` it returns ``(loss, terms)``: per-example ``loss``, ``mse``
        (and ``weighted_mse``, ``vb`` in bits/dim when used), ``t`` (float times), and the
        intermediates a modality needs for terms of its own: ``x_t``, ``noise``, ``output`` (the
        raw network output), ``prediction``, ``x0_hat`` (with gradient), ``alpha``, ``sigma``
        and ``mask`` (the elements that counted, or None).
        """
        if x0.ndim < 2:
            raise ValueError(f"x0 must have a batch dimension and at least one data dimension, got shape {tuple(x0.shape)}")
        check_finite(x0, "the training batch x0")
        batch = x0.shape[0]
        t = self.draw_times(batch, generator) if t is None else torch.as_tensor(t).to(torch.float64).cpu()
        if t.shape != (batch,):
            raise ValueError(f"t must hold one time per example, shape ({batch},), got {tuple(t.shape)}")
        low, high = self.schedule.time_range
        if (t < self.schedule.clean_time).any() or (t > high).any():
            raise ValueError(f"training times must lie in [{low:g}, {high:g}], got {t.min():.3g}..{t.max():.3g}")
        if noise is None:
            noise = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        counted = _element_mask(mask, known_mask, x0)
        alpha, sigma = self._scales(t, x0)
        x_t = q_sample(x0, alpha, sigma, noise)
        if known_mask is not None:
            x_t = torch.where(known_mask.to(x0.device), x0, x_t)
        if cond_drop_prob > 0:
            gen_device = generator.device if generator is not None else x0.device
            drop = torch.rand(batch, generator=generator, device=gen_device).to(x0.device) < cond_drop_prob
            cond = {**cond, "drop_cond": drop}
        output = model(x_t, self.model_time(t, alpha, sigma).to(x0.device), **cond)
        if output.dtype != x0.dtype:
            output = output.to(x0.dtype)
        prediction, frac = split_output(output, x_t, self.learn_variance)

        target = from_x0_eps(self.prediction, x0, noise, alpha, sigma)
        squared_error = (target - prediction) ** 2
        mse = _masked_mean(squared_error, counted)
        terms = {"t": t.to(x0.device), "mse": mse}
        per_example = mse
        if weight is not None:
            weight = torch.as_tensor(weight, device=x0.device, dtype=x0.dtype)
            per_example = _masked_mean(squared_error * weight, counted)
        if self.loss_weighting != "uniform":
            per_example = per_example * self._loss_weight(alpha, sigma).flatten()
            terms["weighted_mse"] = per_example
        x0_hat, _ = to_x0_eps(self.prediction, prediction, x_t, alpha, sigma)

        if self.loss_type != "simple":
            # The hybrid loss lets the bound train only the variance: the mean is frozen.
            frozen_x0 = x0_hat.detach() if self.loss_type == "hybrid" else x0_hat
            alpha_s, sigma_s = self._scales(t - 1, x0)
            vb = self._bound_term(x0, x_t, frozen_x0, frac, (alpha, sigma, alpha_s, sigma_s),
                                  append_dims(t.to(x0.device) == 0, x0.ndim),
                                  self._decoder_variance, counted=counted)
            terms["vb"] = vb
            scale = self.num_timesteps  # a uniform t makes T * L_t an unbiased estimate of the bound
            per_example = scale * vb if self.loss_type == "vlb" else per_example + self.hybrid_lambda * scale * vb
        terms.update(loss=per_example, x_t=x_t, noise=noise, output=output, prediction=prediction, x0_hat=x0_hat,
                     alpha=alpha, sigma=sigma, mask=counted)
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

    def _bound_term(self, x0, x_t, x0_hat, frac, scales, is_last, decoder_variance: float, decoder=None,
                    bin_width=None, counted=None, log_var=None):
        """One term of the bound in bits/dim per example: KL(q(x_s|x_t,x0) || p(x_s|x_t)) for a step
        between noisy points, -log p(x0 | x_t) (the decoder) for the last step to clean data.

        ``scales`` = (alpha_t, sigma_t, alpha_s, sigma_s); ``is_last`` marks the decoder step (a
        bool or a per-example mask); ``counted`` the elements averaged over (None: all);
        ``log_var`` replaces the reverse log variance (Analytic-DPM's, from :meth:`nll`).
        """
        a_t, s_t, a_s, s_s = scales
        true_mean, true_var = q_posterior(x0, x_t, a_t, s_t, a_s, s_s)
        model_mean, _ = q_posterior(x0_hat, x_t, a_t, s_t, a_s, s_s)
        frac = frac if frac is not None else 0.0
        is_last = torch.as_tensor(is_last, device=x0.device)
        if log_var is None:
            log_var = torch.where(
                is_last,
                self._reverse_log_variance(frac, a_t, s_t, a_s, s_s, is_last=True, decoder_variance=decoder_variance),
                self._reverse_log_variance(frac, a_t, s_t, a_s, s_s, is_last=False, decoder_variance=decoder_variance),
            )
        log_var = log_var.expand_as(x0)
        kl = normal_kl(true_mean, torch.log(true_var.clamp(min=1e-20)).expand_as(x0), model_mean, log_var)
        decoder_nll = -self._decoder_log_likelihood(x0, model_mean, log_var, decoder, bin_width)
        return _masked_mean(torch.where(is_last, decoder_nll, kl), counted) / LOG2

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
        mask: Optional[torch.Tensor] = None,
        known_mask: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        return_terms: bool = False,
        progress: bool = False,
        analytic: Optional[bool] = None,
        method: str = "bound",
        ode_steps: int = 64,
        divergence: str = "auto",
        probes: int = 1,
        **cond,
    ):
        """-log p(x0) in bits per dimension, one value per example: the variational bound or, with
        ``method="ode"``, the exact likelihood of the probability-flow ODE.

        ``method="ode"`` (:func:`diffkit.likelihood.ode_nll`) solves the ODE in ``ode_steps``
        Runge-Kutta steps with the exact divergence (up to 32 counted dimensions) or
        Hutchinson's estimate with ``probes`` probes from ``generator`` (``divergence``:
        ``auto``, ``exact`` or ``hutchinson``); it serves every path, the flow path included,
        and honours ``mask`` and ``known_mask``. ``steps``, ``decoder``, ``bin_width``,
        and ``analytic`` belong to the bound. ``terms["stderr"]`` is the
        standard error of the batch mean; ``generator`` makes either reproducible. The rest of
        this docstring is about the bound:

            L = KL(q(x_T|x0) || N(0,I)) + sum_t E KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) + E[-log p(x0|x_1)]

        evaluated over every training step (one model call each), or over the ``steps``-point
        respaced chain, which bounds the likelihood of the matching ``steps``-step DDPM sampler.
        ``decoder`` and ``bin_width`` override the diffusion's own (``discretized`` for
        quantised data). ``mask`` marks the elements that count (padding is False) and
        ``known_mask`` the entries given clean (see :meth:`loss`): bits per dimension divide by
        the number of counted elements of each example. With ``return_terms=True`` it returns
        ``(bpd, terms)`` with ``prior``, ``decoder`` (B,) and ``kl`` (B, K-1) in bits/dim, and
        ``times``.

        ``analytic``: the reverse variances. None (default) uses Analytic-DPM's optimal
        variances when :attr:`calibration` holds ``eps_norm_sq`` and the variance is fixed
        (:func:`diffkit.calibration.analytic_variances`), the configured ``variance``
        otherwise; False always uses the configured one; True requires the calibration. The
        bound is a bound either way: any variance gives one, the analytic one the tightest
        isotropic one. ``terms["analytic"]`` says which was used.
        """
        check_finite(x0, "x0")
        if method == "ode":
            from .likelihood import Estimate, ode_nll

            counted = _element_mask(mask, known_mask, x0)
            bpd, terms = ode_nll(self, model, x0, steps=ode_steps, divergence=divergence, probes=probes,
                                 mask=counted, generator=generator, progress=progress, **cond)
            terms["stderr"] = Estimate.of(bpd).stderr
            return (bpd, terms) if return_terms else bpd
        if method != "bound":
            raise ValueError(f"unknown likelihood method {method!r}; choose 'bound' or 'ode'")
        K = self.num_timesteps if steps is None else steps
        # The chain runs over the table's steps (on the flow path, its points s_k = (k + 1) / T).
        table = NoiseSchedule(betas=self.schedule.betas) if self.schedule.is_continuous else self.schedule
        steps_used = respace(table, K, "linspace") if K != self.num_timesteps else torch.arange(K - 1, -1, -1)
        grid = SamplingGrid.from_times(self.schedule, self.schedule.time_of_step(steps_used))
        model_times = grid.model_times(self.time_input)
        counted = _element_mask(mask, known_mask, x0)
        decoder = _choose(decoder or self.decoder, DECODERS, "decoder")
        decoder_variance = grid.decoder_variance()
        has_statistics = "eps_norm_sq" in self._calibration or "x0_mse" in self._calibration
        if analytic and self.learn_variance:
            raise ValueError("analytic=True replaces fixed variances; this diffusion learns its variance")
        use_analytic = bool(has_statistics and not self.learn_variance) if analytic is None else bool(analytic)
        log_vars = torch.log(self._optimal_variances(grid)) if use_analytic else None

        prior = _masked_mean(prior_kl(x0, float(grid.alphas[0]), torch.tensor(float(grid.sigmas[0]), dtype=x0.dtype)), counted) / LOG2
        kls, decoder_bits = [], None
        for i in tqdm(range(len(grid)), desc="nll", disable=not progress, leave=False):
            scales = grid.step_scales(i)
            t = model_times[i].to(device=x0.device, dtype=torch.float32).expand(x0.shape[0])
            c = grid.input_scale(i)  # the network sees its own path's state
            is_last = i == len(grid) - 1
            scale_tensors = tuple(torch.tensor(v, dtype=x0.dtype, device=x0.device) for v in scales)
            log_var = None if log_vars is None else torch.tensor(float(log_vars[i]), dtype=x0.dtype, device=x0.device)
            noise = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = q_sample(x0, scales[0], scales[1], noise)
            if known_mask is not None:
                x_t = torch.where(known_mask.to(x0.device), x0, x_t)
            output, frac = split_output(model(c * x_t, t, **cond), x_t, self.learn_variance)
            x0_hat, _ = to_x0_eps(self.prediction, output, c * x_t, c * scales[0], c * scales[1])
            bits = self._bound_term(x0, x_t, x0_hat, frac, scale_tensors, is_last, decoder_variance, decoder,
                                    bin_width, counted=counted, log_var=log_var)
            if is_last:
                decoder_bits = bits
            else:
                kls.append(bits)
        kl_terms = torch.stack(kls, dim=1) if kls else torch.zeros(x0.shape[0], 0, device=x0.device, dtype=x0.dtype)
        bpd = prior + kl_terms.sum(dim=1) + decoder_bits
        if return_terms:
            from .likelihood import Estimate

            return bpd, {"prior": prior, "decoder": decoder_bits, "kl": kl_terms, "times": grid.times,
                         "analytic": use_analytic, "method": "bound", "stderr": Estimate.of(bpd).stderr}
        return bpd

    # ------------------------------------------------------------------ sampling
    def sampling_grid(self, steps: Optional[int] = None, spacing: Optional[str] = None, *,
                      sampler: Optional[str] = None, log_snr_range=None, max_time: Optional[int] = None,
                      calibrated: bool = True) -> SamplingGrid:
        """The grid a sampler visits: ``steps`` training times respaced by ``spacing``.

        Defaults: :attr:`default_sampler`, 20 steps (all T for ``ddpm``) and the sampler's best spacing (on the
        flow path: uniform in s for every sampler), or, when
        :attr:`calibration` holds a grid for (``sampler``, ``steps``) and neither ``spacing``,
        ``log_snr_range`` nor ``max_time`` is given, that stored grid (``calibrated=False``
        skips it). ``max_time`` restricts the grid to [0, max_time] (warm starts). Any other
        grid comes from the :class:`SamplingGrid` constructors (explicit times, noise levels or
        betas).
        """
        sampler = sampler or self.default_sampler
        if steps is None:
            steps = self.num_timesteps if sampler_spec(sampler).all_steps else min(20, self.num_timesteps)
        if calibrated and spacing is None and log_snr_range is None and max_time is None:
            stored = self.calibrated_grid(sampler, steps)
            if stored is not None:
                return stored[0]
        if max_time is not None and not self.schedule.is_continuous:
            steps = min(steps, max_time + 1)
        if spacing is None:
            # On the flow path every sampler steps uniformly in s: on a trained network the log-SNR
            # grid spends few calls at the extremes (benchmarks/results/mixture_spacing.md).
            spacing = "trailing" if self.schedule.is_continuous else default_spacing(sampler)
        times = respace(self.schedule, steps, spacing, log_snr_range=log_snr_range, max_time=max_time)
        return SamplingGrid.from_times(self.schedule, times)

    def _grid(self, grid, steps, sampler: str, start) -> SamplingGrid:
        """The grid to sample on: an explicit one, or ``steps`` points below the start's top."""
        if grid is not None:
            if isinstance(start, WarmStart):
                raise ValueError("give either grid= (it starts where it starts) or a WarmStart, not both")
            if steps is not None:
                raise ValueError("give either grid= or steps=, not both: an explicit grid fixes the steps")
            return grid if isinstance(grid, SamplingGrid) else SamplingGrid.from_times(self.schedule, grid)
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        return self.sampling_grid(steps, sampler=sampler, max_time=start.max_time(self.schedule))

    def denoiser(self, model: Callable[..., torch.Tensor], grid: SamplingGrid, *, cond: Optional[dict] = None,
                 guidance_scale: float = 1.0, guidance_interval: Optional[tuple] = None,
                 noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                 wrappers: Sequence[Wrapper] = ()):
        """``model`` as a denoiser on ``grid`` (what a sampler calls), with guidance and ``wrappers`` layered on.

        For running a sampler function of :data:`diffkit.SAMPLERS` by hand; :meth:`sample`
        builds the same thing.
        """
        context = SamplingContext(grid=grid, model_times=grid.model_times(self.time_input), noise=noise,
                                  generator=generator)
        denoise = model_denoiser(model, context, prediction=self.prediction, learn_variance=self.learn_variance,
                                 cond=dict(cond or {}), guidance_scale=guidance_scale,
                                 guidance_interval=guidance_interval)
        return apply_wrappers(denoise, wrappers, context)

    @torch.no_grad()
    def sample(
        self,
        model: Callable[..., torch.Tensor],
        shape: Sequence[int],
        *,
        sampler: Optional[str] = None,
        steps: Optional[int] = None,
        grid=None,
        start: str | Start = "prior",
        generator: Optional[torch.Generator] = None,
        noise: Optional[torch.Tensor] = None,
        guidance_scale: float = 1.0,
        guidance_interval: Optional[tuple] = None,
        wrappers: Sequence[Wrapper] = (),
        sampler_options: Optional[dict] = None,
        callback: Optional[Callable[[dict], None]] = None,
        progress: bool = False,
        device: Optional[torch.device | str] = None,
        dtype: torch.dtype = torch.float32,
        **cond,
    ) -> torch.Tensor:
        """Draw samples of ``shape`` = (B, ...) from ``model``.

        Args:
            sampler: one of :data:`diffkit.SAMPLERS` (or a registered one); default
                :attr:`default_sampler`.
            steps, grid: ``steps`` points (default 20; all T for ``ddpm``) in the sampler's best
                spacing, or the calibrated grid for (sampler, steps) when there is one; or an
                explicit ``grid``: a :class:`SamplingGrid` or decreasing training times.
            start: where sampling starts (:mod:`diffkit.starts`): ``"prior"`` (default; the N(0, I)
                start moved to the mean of q(x_T) at the first call, free), ``"noise"`` (exactly
                at ``noise``), or ``WarmStart(init, strength)`` (``init`` noised to ``strength``
                of the chain, then all ``steps`` below it: SDEdit, img2img, warm starts).
            generator, noise: ``noise`` is the starting draw; otherwise it is drawn from
                ``generator``, which also feeds stochastic samplers.
            guidance_scale, guidance_interval: classifier-free guidance weight w (1 = off) and
                the (low, high) range of sigma_t / alpha_t where it applies
                (:func:`diffkit.guidance.model_denoiser`).
            wrappers: conditioning layered on the denoiser, innermost first (:mod:`diffkit.guidance`).
            sampler_options: extra keyword arguments for the sampler (e.g. ``{"eta": 1.0}``); a
                calibrated grid brings the options it was fitted with, and these win.
            callback: called with a dict (i, t, x, denoised, steps) at every grid point.
            **cond: passed to the model on every call.
        """
        start = as_start(start)
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"shape must be (batch, ...) with positive sizes, got {shape}")
        if "init" in cond or "strength" in cond:
            raise ValueError("init= and strength= are given as start=WarmStart(init, strength)")
        sampler = sampler or self.default_sampler
        spec = sampler_spec(sampler)
        explicit_grid = grid is not None
        grid = self._grid(grid, steps, sampler, start)
        device = torch.device(device) if device is not None else (noise.device if noise is not None else module_device(model))
        if noise is None:
            noise = randn(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but shape={shape} was asked for")
        noise = noise.to(device=device, dtype=dtype)
        for wrapper in wrappers:
            if getattr(wrapper, "check", None) is not None:
                wrapper.check(shape)
        denoise = self.denoiser(model, grid, cond=cond, guidance_scale=guidance_scale,
                                guidance_interval=guidance_interval, noise=noise, generator=generator,
                                wrappers=[*start.wrappers(), *wrappers])
        options = dict(sampler_options or {})
        stored = None if explicit_grid else self.calibrated_grid(sampler, len(grid))
        if stored is not None and torch.equal(stored[0].times, grid.times):
            options = {**stored[1], **options}  # the options the stored grid was fitted with; the caller's win
        if spec.prepare is not None:
            denoise, options = spec.prepare(self, denoise, grid, shape, options)
        with tqdm(total=spec.model_calls(len(grid)), desc=f"sampling ({sampler})", disable=not progress,
                  leave=False) as bar:
            def counted(x_in, i, _inner=denoise):
                bar.update(1)
                return _inner(x_in, i)

            result = spec.function(counted, start.initial_state(grid, noise), grid, generator=generator,
                                   callback=callback, **options)
        if not torch.isfinite(result).all():
            raise FloatingPointError(
                "sampling produced NaN or Inf; check the model for NaN outputs, try wrappers=[ClipX0(-1, 1)], "
                "or use more steps"
            )
        return result

    def _analytic_ddpm_denoiser(self, denoise, grid: SamplingGrid):
        """``denoise`` with Analytic-DPM's variance expressed as DDPM's learned interpolation.

        The optimal variance is at least beta_tilde; clipped to beta (sampling with more noise than
        the forward step added only hurts), it is exp(v log beta + (1 - v) log beta_tilde) with
        v = log(var / beta_tilde) / log(beta / beta_tilde).
        """
        variances = self._optimal_variances(grid)
        fracs = []
        for i in range(len(grid)):
            if i == len(grid) - 1:
                fracs.append(0.0)  # the last step adds no noise
                continue
            beta = transition_variance(*grid.step_scales(i))
            tilde = posterior_coefficients(*grid.step_scales(i))[2]
            span = math.log(beta) - math.log(max(tilde, 1e-300))
            # A variance above beta (an imperfect model's measured error) is sampled at beta.
            frac = 0.0 if span <= 0 else (math.log(float(variances[i])) - math.log(max(tilde, 1e-300))) / span
            fracs.append(min(max(frac, 0.0), 1.0))

        def analytic(x, i):
            pred = denoise(x, i)
            return dataclasses.replace(pred, variance_frac=torch.tensor(fracs[i], dtype=x.dtype, device=x.device))

        return analytic

    def _optimal_variances(self, grid: SamplingGrid) -> torch.Tensor:
        """The calibrated reverse variances on ``grid`` (:func:`diffkit.calibration.analytic_variances`)."""
        if "x0_mse" not in self._calibration and "eps_norm_sq" not in self._calibration:
            raise ValueError("optimal (analytic) variances need calibration['x0_mse']; run "
                             "diffkit.calibration.calibrate(diffusion, model, data=...) first")
        from .calibration import analytic_variances

        x0_mse, eps_norm_sq = self._calibration.get("x0_mse"), self._calibration.get("eps_norm_sq")
        # The tables hold one value per step of the schedule's table.
        grid = dataclasses.replace(grid, times=self.schedule.step_of_time(grid.times))
        return analytic_variances(grid, None if eps_norm_sq is None else torch.tensor(eps_norm_sq),
                                  data_range=self._analytic_data_range(),
                                  x0_mse=None if x0_mse is None else torch.tensor(x0_mse))

    def _analytic_data_range(self) -> Optional[tuple[float, float]]:
        """The bound on the data the analytic variances may use: the data range of quantised data."""
        return self.data_range if self.decoder == "discretized" else None

    @torch.no_grad()
    def sample_candidates(
        self,
        model: Callable[..., torch.Tensor],
        shape: Sequence[int],
        num_candidates: int,
        score_fn: Callable[[torch.Tensor], torch.Tensor],
        **kwargs,
    ) -> Candidates:
        """``num_candidates`` samples per example in one batch, scored and sorted best first.

        Every per-example tensor among the model's conditions (and ``noise`` and a
        :class:`~diffkit.starts.WarmStart`'s ``init`` of batch B) is repeated for each candidate, so candidate j of example b is row b * N + j of the
        batch the model sees; wrappers (e.g. KnownValues) must be built for that (B * N, ...)
        batch (``tensor.repeat_interleave(N, 0)``). ``score_fn(samples)`` returns one value per
        sample (higher is better), e.g. a value function of planned trajectories.
        """
        if not isinstance(num_candidates, int) or num_candidates < 1:
            raise ValueError(f"num_candidates must be a positive integer, got {num_candidates!r}")
        shape = tuple(int(s) for s in shape)
        batch, n = shape[0], num_candidates

        def repeat(value):
            if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
                return value.repeat_interleave(n, dim=0)
            if isinstance(value, WarmStart):
                return WarmStart(repeat(value.init), value.strength)
            return value

        kwargs = {key: repeat(value) if key not in ("wrappers", "grid") else value for key, value in kwargs.items()}
        flat = self.sample(model, (batch * n, *shape[1:]), **kwargs)
        scores = torch.as_tensor(score_fn(flat))
        if scores.shape != (batch * n,):
            raise ValueError(f"score_fn must return one score per sample, shape ({batch * n},); got {tuple(scores.shape)}")
        samples, scores = flat.reshape(batch, n, *shape[1:]), scores.reshape(batch, n)
        order = scores.argsort(dim=1, descending=True)
        picked = samples.gather(1, append_dims(order, samples.ndim).expand_as(samples))
        return Candidates(samples=picked, scores=scores.gather(1, order))
