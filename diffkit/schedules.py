"""Noise schedules and respacing.

A :class:`NoiseSchedule` is an immutable table of the discrete-time forward process

    q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I),   alpha_t^2 = alpha_bar_t = prod_{s<=t} (1 - beta_s),
    sigma_t^2 = 1 - alpha_bar_t,                  log-SNR lambda_t = log(alpha_t^2 / sigma_t^2),

for integer timesteps t = 0 .. T-1 (t = 0 is the least noisy latent, the convention of diffusers
and improved-diffusion). Between integer steps alpha_bar is interpolated linearly, so every
quantity is also defined at continuous times in [0, T-1].

A :class:`FlowSchedule` is the flow-matching (rectified-flow) path x_s = (1 - s) x_0 + s eps for
s in [0, 1], in continuous time. It is not variance preserving, but its state divided by
c_s = sqrt((1 - s)^2 + s^2) is: the samplers work on that variance-preserving state, with
alpha_bar_s = (1 - s)^2 / c_s^2, and the network sees c_s times it, the flow's own state
(:meth:`NoiseSchedule.input_scale_at`). So every sampler, wrapper and calibration serves both.

Respacing to K sampling steps is the pure function :func:`respace`; nothing here holds state
that a sampler could mutate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

SCHEDULES = ("linear", "scaled_linear", "cosine", "sqrt", "sigmoid", "flow")
SPACINGS = ("leading", "trailing", "linspace", "logsnr", "karras")

# Betas are capped below 1 so that no step destroys the signal in one go (Nichol & Dhariwal).
MAX_BETA = 0.999


def _betas_from_alpha_bar(alpha_bar: Callable[[torch.Tensor], torch.Tensor], num_timesteps: int) -> torch.Tensor:
    """Discretise a continuous alpha_bar(s), s in [0, 1], into T betas: beta_t = 1 - abar(t+1)/abar(t)."""
    grid = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    values = alpha_bar(grid)
    betas = 1.0 - values[1:] / values[:-1]
    return betas.clamp(min=0.0, max=MAX_BETA)


def _linear(num_timesteps: int, beta_start: float | None = None, beta_end: float | None = None) -> torch.Tensor:
    # Scaled by 1000/T (improved-diffusion) so that a shorter chain destroys the signal as fully as DDPM's.
    scale = 1000.0 / num_timesteps
    start = beta_start if beta_start is not None else scale * 1e-4
    end = beta_end if beta_end is not None else scale * 0.02
    return torch.linspace(start, end, num_timesteps, dtype=torch.float64).clamp(max=MAX_BETA)


def _scaled_linear(num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    # Linear in sqrt(beta): the latent-diffusion / Stable Diffusion schedule.
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def _cosine(num_timesteps: int, offset: float = 0.008) -> torch.Tensor:
    # alpha_bar(s) = cos^2(((s + offset) / (1 + offset)) * pi / 2)   (Nichol & Dhariwal, 2021)
    return _betas_from_alpha_bar(
        lambda s: torch.cos((s + offset) / (1 + offset) * math.pi / 2) ** 2, num_timesteps
    )


def _sqrt(num_timesteps: int, offset: float = 1e-4) -> torch.Tensor:
    # alpha_bar(s) = 1 - sqrt(s + offset)   (Diffusion-LM, Li et al. 2022); it noises fast at the start.
    return _betas_from_alpha_bar(lambda s: 1 - torch.sqrt(s + offset), num_timesteps)


def _sigmoid(num_timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> torch.Tensor:
    # alpha_bar(s) = (sigmoid(end/tau) - sigmoid((s (end - start) + start)/tau)) / (sigmoid(end/tau) - sigmoid(start/tau))
    # (Chen, "On the importance of noise scheduling", 2023)
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))

    def alpha_bar(s: torch.Tensor) -> torch.Tensor:
        value = (v_end - torch.sigmoid((s * (end - start) + start) / tau)) / (v_end - v_start)
        return value.clamp(min=1e-9, max=1.0)

    return _betas_from_alpha_bar(alpha_bar, num_timesteps)


_SCHEDULE_BUILDERS: dict[str, Callable[..., torch.Tensor]] = {
    "linear": _linear,
    "scaled_linear": _scaled_linear,
    "cosine": _cosine,
    "sqrt": _sqrt,
    "sigmoid": _sigmoid,
}


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step has alpha_bar = 0 exactly (Lin et al., 2023).

    The first step keeps its value; the SNR at t = T-1 becomes zero, so sampling starts from pure
    noise as training assumed. Such a schedule needs a v- or x0-predicting model.
    """
    alpha_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alpha_bar_sqrt[0].clone(), alpha_bar_sqrt[-1].clone()
    alpha_bar_sqrt = (alpha_bar_sqrt - last) * first / (first - last)
    alpha_bar = alpha_bar_sqrt**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """An immutable discrete noise schedule, from which every per-step quantity is derived.

    Build one with :meth:`from_name` or :meth:`from_betas`. All tables are float64 on the CPU;
    the lookups return float64 tensors on the device of the query.
    """

    betas: torch.Tensor
    name: str = "custom"
    zero_terminal_snr: bool = False

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas, dtype=torch.float64).detach().cpu().flatten()
        if betas.numel() < 1:
            raise ValueError("a noise schedule needs at least one step (num_timesteps >= 1)")
        if not torch.isfinite(betas).all():
            raise ValueError("betas contain NaN or Inf")
        if (betas <= 0).any() or (betas > 1).any():
            raise ValueError("every beta must lie in (0, 1]; got min %.3g, max %.3g" % (betas.min(), betas.max()))
        object.__setattr__(self, "betas", betas)
        alpha_bar = torch.cumprod(1.0 - betas, dim=0)
        object.__setattr__(self, "alpha_bar", alpha_bar)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_name(
        cls, name: str, num_timesteps: int = 1000, *, zero_terminal_snr: bool = False, **kwargs: float
    ) -> "NoiseSchedule":
        """A named schedule: linear, scaled_linear, cosine, sqrt or sigmoid (keyword arguments tune it)."""
        if name == "flow":
            if zero_terminal_snr or kwargs:
                raise ValueError("the flow schedule takes no options besides num_timesteps")
            return FlowSchedule.with_steps(num_timesteps)
        if name not in _SCHEDULE_BUILDERS:
            raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)} or pass betas")
        if not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
        betas = _SCHEDULE_BUILDERS[name](num_timesteps, **kwargs)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas=betas, name=name, zero_terminal_snr=zero_terminal_snr)

    @classmethod
    def from_betas(cls, betas, *, zero_terminal_snr: bool = False) -> "NoiseSchedule":
        """A schedule from explicit betas (a sequence or 1-D tensor of values in (0, 1])."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas=betas, name="custom", zero_terminal_snr=zero_terminal_snr)

    # ----------------------------------------------------------------- properties
    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    def config(self) -> dict:
        """A JSON-able description from which :func:`schedule_from_config` rebuilds this schedule."""
        return {"name": self.name, "betas": self.betas.tolist(), "zero_terminal_snr": self.zero_terminal_snr}

    # ----------------------------------------------------------------- time units
    @property
    def time_range(self) -> tuple[float, float]:
        """The training times (lowest, highest): (0, T-1) in steps here, (0, 1) on the flow path."""
        return 0.0, float(self.num_timesteps - 1)

    @property
    def clean_time(self) -> float:
        """The time of clean data: -1 here (one step before the first), 0 on the flow path."""
        return -1.0

    @property
    def is_continuous(self) -> bool:
        """Whether times are continuous by nature (flow) rather than steps of a table."""
        return False

    def time_of_step(self, steps: torch.Tensor) -> torch.Tensor:
        """The times of the table's steps 0..T-1 (the steps themselves here)."""
        return torch.as_tensor(steps)

    def step_of_time(self, times: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`time_of_step`: (fractional) table steps of ``times``."""
        return torch.as_tensor(times)

    def input_scale_at(self, t) -> torch.Tensor:
        """c_t, the factor from the variance-preserving state the samplers use to what the network sees (1 here)."""
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))

    # ----------------------------------------------------------------- lookups
    def alpha_bar_at(self, t: torch.Tensor | float | int) -> torch.Tensor:
        """alpha_bar at integer or continuous times t in [0, T-1] (linear interpolation between steps).

        t = -1 denotes clean data (alpha_bar = 1), which lets a sampler's last step land on x_0.
        """
        t = torch.as_tensor(t)
        table = self.alpha_bar.to(t.device)
        if not t.is_floating_point():
            return torch.where(t < 0, torch.ones((), dtype=torch.float64, device=t.device), table[t.clamp(min=0)])
        t = t.to(torch.float64)
        if (t > self.num_timesteps - 1).any() or (t < -1).any():
            raise ValueError(f"time outside [-1, {self.num_timesteps - 1}]")
        padded = torch.cat([torch.ones(1, dtype=torch.float64, device=t.device), table])
        position = t + 1.0
        low = position.floor().long().clamp(max=self.num_timesteps - 1)
        frac = position - low
        return padded[low] * (1 - frac) + padded[(low + 1).clamp(max=self.num_timesteps)] * frac

    def alpha_at(self, t) -> torch.Tensor:
        """Signal scale alpha_t = sqrt(alpha_bar_t) (on the flow path: 1 - s, the path's own)."""
        return self.alpha_bar_at(t).sqrt()

    def sigma_at(self, t) -> torch.Tensor:
        """Noise scale sigma_t = sqrt(1 - alpha_bar_t)."""
        return (1.0 - self.alpha_bar_at(t)).clamp(min=0).sqrt()

    def log_snr_at(self, t) -> torch.Tensor:
        """lambda_t = log(alpha_t^2 / sigma_t^2); -inf where alpha is zero, +inf on clean data."""
        alpha_bar = self.alpha_bar_at(t)
        return torch.log(alpha_bar) - torch.log1p(-alpha_bar)

    @property
    def log_snr(self) -> torch.Tensor:
        """log-SNR at every integer step, strictly decreasing in t."""
        return torch.log(self.alpha_bar) - torch.log1p(-self.alpha_bar)

    def timestep_for_log_snr(self, log_snr: torch.Tensor) -> torch.Tensor:
        """Continuous time whose log-SNR equals ``log_snr`` (inverse of :meth:`log_snr_at`, clamped to [0, T-1])."""
        return self.time_for_alpha_bar(torch.sigmoid(torch.as_tensor(log_snr, dtype=torch.float64))).clamp(min=0.0)

    def time_for_alpha_bar(self, alpha_bar: torch.Tensor, *, strict: bool = False) -> torch.Tensor:
        """Continuous time t in [-1, T-1] with ``alpha_bar_at(t) == alpha_bar`` (inverse of the interpolation).

        Values outside the schedule's range [alpha_bar_{T-1}, 1] are clamped to its ends, or,
        with ``strict=True``, become NaN so a caller can tell that no training time matches.
        """
        target = torch.as_tensor(alpha_bar, dtype=torch.float64)
        # The interpolation table with clean data (alpha_bar = 1) at t = -1, strictly decreasing.
        table = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar])
        outside = (target < table[-1] * (1 - 1e-12)) | (target > 1.0)
        clamped = target.clamp(min=float(table[-1]), max=1.0)
        upper = torch.searchsorted(-table, -clamped).clamp(1, self.num_timesteps)
        lower = upper - 1
        frac = (table[lower] - clamped) / (table[lower] - table[upper])
        times = lower.to(torch.float64) + frac - 1.0
        if strict:
            times = torch.where(outside, torch.full_like(times, float("nan")), times)
        return times


@dataclass(frozen=True, eq=False)
class FlowSchedule(NoiseSchedule):
    """The flow-matching path x_s = (1 - s) x_0 + s eps, s in [0, 1] (s = 0 clean, s = 1 pure noise).

    Times are continuous; the network is told s. ``alpha_at`` and ``sigma_at`` give the path's
    own coefficients 1 - s and s; ``alpha_bar_at`` and the log-SNR those of the equivalent
    variance-preserving state x_s / c_s, c_s = sqrt((1 - s)^2 + s^2), on which the samplers run.
    The table (``betas``, ``alpha_bar``) holds T = ``num_timesteps`` points s_k = (k + 1) / T:
    the resolution of ``time_sampling="discrete"``, of the bound's chain and of the grid search
    in calibration. Build one with ``NoiseSchedule.from_name("flow", T)`` or :meth:`with_steps`.
    """

    name: str = "flow"
    zero_terminal_snr: bool = True

    @classmethod
    def with_steps(cls, num_timesteps: int = 1000) -> "FlowSchedule":
        if not isinstance(num_timesteps, int) or isinstance(num_timesteps, bool) or num_timesteps < 2:
            raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
        s = torch.arange(1, num_timesteps + 1, dtype=torch.float64) / num_timesteps
        alpha_bar = _flow_alpha_bar(s)
        betas = 1.0 - alpha_bar / torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        return cls(betas=betas)

    def __post_init__(self) -> None:
        super().__post_init__()
        s = self.time_of_step(torch.arange(self.num_timesteps))
        object.__setattr__(self, "alpha_bar", _flow_alpha_bar(s))

    @property
    def time_range(self) -> tuple[float, float]:
        return 0.0, 1.0

    @property
    def clean_time(self) -> float:
        return 0.0

    @property
    def is_continuous(self) -> bool:
        return True

    def time_of_step(self, steps: torch.Tensor) -> torch.Tensor:
        return (torch.as_tensor(steps).to(torch.float64) + 1.0) / self.num_timesteps

    def step_of_time(self, times: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(times).to(torch.float64) * self.num_timesteps - 1.0

    def config(self) -> dict:
        return {"name": "flow", "num_timesteps": self.num_timesteps}

    def _times(self, t) -> torch.Tensor:
        t = torch.as_tensor(t).to(torch.float64)
        if (t < 0).any() or (t > 1).any():
            raise ValueError("flow time outside [0, 1]")
        return t

    def input_scale_at(self, t) -> torch.Tensor:
        s = self._times(t)
        return ((1 - s) ** 2 + s**2).sqrt()

    def alpha_bar_at(self, t) -> torch.Tensor:
        return _flow_alpha_bar(self._times(t))

    def alpha_at(self, t) -> torch.Tensor:
        return 1.0 - self._times(t)

    def sigma_at(self, t) -> torch.Tensor:
        return self._times(t)

    def log_snr_at(self, t) -> torch.Tensor:
        s = self._times(t)
        return 2.0 * (torch.log1p(-s) - torch.log(s))

    def timestep_for_log_snr(self, log_snr: torch.Tensor) -> torch.Tensor:
        # (1 - s) / s = e^(lambda / 2)
        return torch.sigmoid(-0.5 * torch.as_tensor(log_snr, dtype=torch.float64))

    def time_for_alpha_bar(self, alpha_bar: torch.Tensor, *, strict: bool = False) -> torch.Tensor:
        alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
        ratio = (alpha_bar.clamp(0, 1) / (1 - alpha_bar.clamp(0, 1))).sqrt()  # (1 - s) / s
        times = 1.0 / (1.0 + ratio)
        if strict:
            times = torch.where((alpha_bar < 0) | (alpha_bar > 1), torch.full_like(times, float("nan")), times)
        return times


def _flow_alpha_bar(s: torch.Tensor) -> torch.Tensor:
    """alpha_bar of the variance-preserving state x_s / c_s on the flow path: (1 - s)^2 / ((1 - s)^2 + s^2)."""
    return (1 - s) ** 2 / ((1 - s) ** 2 + s**2)


def schedule_from_config(config: dict) -> NoiseSchedule:
    """Rebuild a :class:`NoiseSchedule` from :meth:`NoiseSchedule.config`."""
    if config.get("name") == "flow":
        return FlowSchedule.with_steps(int(config.get("num_timesteps", 1000)))
    try:
        return NoiseSchedule(
            betas=torch.tensor(config["betas"], dtype=torch.float64),
            name=config.get("name", "custom"),
            zero_terminal_snr=bool(config.get("zero_terminal_snr", False)),
        )
    except KeyError as error:
        raise ValueError(f"schedule config lacks {error}; it must come from NoiseSchedule.config()") from error


# --------------------------------------------------------------------------- respacing
def _distinct_descending(times: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """Round to integers and nudge collisions apart, keeping K distinct steps in [0, T-1], descending."""
    ascending = torch.sort(times.round().long().clamp(0, num_timesteps - 1)).values
    count = ascending.numel()
    for i in range(1, count):  # push up collisions from the bottom ...
        ascending[i] = max(ascending[i].item(), ascending[i - 1].item() + 1)
    for i in range(count - 1, -1, -1):  # ... then pull down whatever overflowed the top
        ascending[i] = min(ascending[i].item(), num_timesteps - count + i)
    return ascending.flip(0)


def respace(
    schedule: NoiseSchedule,
    steps: int,
    spacing: str = "logsnr",
    *,
    karras_rho: float = 7.0,
    log_snr_range: tuple[float | None, float | None] | None = None,
    max_time: int | None = None,
) -> torch.Tensor:
    """The K = ``steps`` training timesteps a sampler visits, in descending order (LongTensor (K,)).

    spacings:
      * ``leading``  -- t_i = i * (T // K), as DDIM and diffusers' default; never visits T-1.
      * ``trailing`` -- evenly spaced down from T-1 (Lin et al. 2023); never visits 0.
      * ``linspace`` -- evenly spaced from T-1 to 0 inclusive.
      * ``logsnr``   -- uniform in log-SNR from lambda_{T-1} to lambda_0 (DPM-Solver's choice).
      * ``karras``   -- sigma_i^(1/rho) uniform between the noise scales of T-1 and 0 (Karras et al. 2022),
                        with sigma the variance-exploding scale sigma_t / alpha_t.

    ``log_snr_range=(low, high)`` narrows the ``logsnr`` and ``karras`` grids: the first step still
    starts at T-1, but the others are placed between log-SNR ``low`` and ``high`` (None keeps the
    schedule's end). Few-step sampling gains from it because, for data of roughly unit scale,
    nothing resolves below log-SNR -4 and little above 8, so no call is spent there
    (benchmarks/samplers.py measures it).

    ``max_time`` places the grid on [0, max_time] instead of [0, T-1] (warm starts and SDEdit:
    ``steps`` calls between the start time and clean data, however small the start).

    On the flow path (:class:`FlowSchedule`) times are continuous in (0, 1]: ``leading``,
    ``trailing`` and ``linspace`` all give s_i = 1 - i / K (rectified flow's Euler grid), and
    ``logsnr`` and ``karras`` place the points between the log-SNR of the table's first and
    last noisy points; ``max_time`` is then a time s in (0, 1].

    A pure function: the same arguments always give the same steps and nothing is stored.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if schedule.is_continuous:
        return _respace_continuous(schedule, steps, spacing, karras_rho, log_snr_range, max_time)
    if max_time is not None:
        if not isinstance(max_time, int) or not 0 <= max_time < schedule.num_timesteps:
            raise ValueError(f"max_time must be an integer in [0, {schedule.num_timesteps - 1}], got {max_time!r}")
        # The first max_time + 1 steps of a schedule are a schedule of their own.
        schedule = NoiseSchedule(betas=schedule.betas[: max_time + 1], name=schedule.name)
    T = schedule.num_timesteps
    if steps > T:
        raise ValueError(f"steps={steps} exceeds the {T} training timesteps; use at most {T} steps")
    if spacing == "leading":
        times = torch.arange(steps, dtype=torch.float64) * (T // steps)
    elif spacing == "trailing":
        times = torch.arange(T, 0, -T / steps, dtype=torch.float64)[:steps] - 1
    elif spacing == "linspace":
        times = torch.linspace(0, T - 1, steps, dtype=torch.float64)
    elif spacing in ("logsnr", "karras"):
        table = schedule.log_snr
        # A zero-terminal-SNR schedule has lambda_{T-1} = -inf: space over the finite part and
        # still start at T-1, where sampling begins.
        top = T - 1 if torch.isfinite(table[-1]) else max(T - 2, 0)
        low, high = table[top].item(), table[0].item()
        times = _times_between(schedule, steps, spacing, low, high, float(T - 1), karras_rho, log_snr_range)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return _distinct_descending(times, T)


def _times_between(schedule: NoiseSchedule, steps: int, spacing: str, low: float, high: float, first: float,
                   karras_rho: float, log_snr_range) -> torch.Tensor:
    """``steps`` times from ``first`` down, the rest placed by ``spacing`` (logsnr or karras) in log-SNR [low, high]."""
    if log_snr_range is not None:
        requested_low, requested_high = log_snr_range
        low = low if requested_low is None else min(max(requested_low, low), high)
        high = high if requested_high is None else max(min(requested_high, high), low)
    if steps == 1:
        return torch.tensor([first], dtype=torch.float64)
    if spacing == "logsnr":
        times = schedule.timestep_for_log_snr(torch.linspace(low, high, steps, dtype=torch.float64))
    else:
        sigma_max, sigma_min = math.exp(-0.5 * low), math.exp(-0.5 * high)
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        sigmas = (sigma_max ** (1 / karras_rho) + ramp * (sigma_min ** (1 / karras_rho) - sigma_max ** (1 / karras_rho))) ** karras_rho
        times = schedule.timestep_for_log_snr(-2 * torch.log(sigmas))
    times[0] = first  # sampling starts from the noise of the first point
    return times


def _respace_continuous(schedule: NoiseSchedule, steps: int, spacing: str, karras_rho: float, log_snr_range,
                        max_time) -> torch.Tensor:
    """:func:`respace` on a continuous-time (flow) schedule: float times in (0, 1], descending."""
    top = 1.0 if max_time is None else float(max_time)
    if not 0 < top <= 1:
        raise ValueError(f"max_time must be a time in (0, 1] on the flow path, got {max_time!r}")
    if spacing in ("leading", "trailing", "linspace"):
        return top * (1.0 - torch.arange(steps, dtype=torch.float64) / steps)
    if spacing not in ("logsnr", "karras"):
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    T = schedule.num_timesteps
    # Pure noise (s = 1) has log-SNR -inf: space over the table's finite part, starting at ``top``.
    low_time = top if top < 1 else float(schedule.time_of_step(T - 2))
    low = float(schedule.log_snr_at(torch.tensor(low_time)))
    high = max(float(schedule.log_snr_at(schedule.time_of_step(0))), low)
    times = _times_between(schedule, steps, spacing, low, high, top, karras_rho, log_snr_range)
    if (times[1:] >= times[:-1]).any():
        raise ValueError(f"{steps} {spacing} points do not fit below time {top}; use fewer steps")
    return times
