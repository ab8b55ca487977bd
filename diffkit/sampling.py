"""Samplers: short functions with one shared signature, working on tensors of any shape.

Every sampler is called as

    x0 = sampler(denoise, x, grid, *, generator=None, callback=None, **options)

* ``denoise(x, i)`` evaluates the network at grid point ``i`` and returns a :class:`Prediction`
  (x0_hat, eps_hat and, for learned-variance models, the variance interpolation);
* ``x`` is the starting state x_{t_0} (usually N(0, I) noise);
* ``grid`` is a :class:`SamplingGrid`: K training timesteps t_0 > ... > t_{K-1} where the network
  is evaluated, plus a final clean point (alpha = 1, sigma = 0) where sampling ends;
* ``generator`` feeds the stochastic samplers; ``callback(info)`` sees every intermediate state.

The deterministic solvers are written in the variance-preserving variables (alpha_t, sigma_t,
lambda_t = log(alpha_t / sigma_t)), so one code path serves every schedule, zero-terminal-SNR
ones included, and any respacing. ``dpm-v3`` also uses what a calibration measured about the
model (:class:`ModelStatistics`). Each model evaluation is one network call (two with
classifier-free guidance); ``SAMPLERS`` lists the names and :func:`model_calls` the cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from .process import posterior_coefficients, transition_variance
from .schedules import NoiseSchedule
from .utils import append_dims, randn


TIME_INPUTS = ("timestep", "noise_level", "log_snr")


@dataclass(frozen=True)
class Prediction:
    """What the network says about x_0 at one grid point.

    ``x`` is the state the prediction belongs to. A denoiser that changes the state before
    evaluating it (known values written in, gradient steps taken) returns the changed state
    here, and the sampler continues from it; None means the state it was given.
    """

    x0: torch.Tensor
    eps: torch.Tensor
    # Learned-variance models: v in [0, 1] interpolating log beta-tilde (0) and log beta (1).
    variance_frac: Optional[torch.Tensor] = None
    x: Optional[torch.Tensor] = None


Denoiser = Callable[[torch.Tensor, int], Prediction]
Callback = Callable[[dict], None]


@dataclass(frozen=True)
class SamplingGrid:
    """The points a sampler visits: K evaluation points, noisiest first, and a final clean point.

    ``times`` (K,) are continuous training times in [0, T-1] (fractions allowed; NaN where a
    point built from noise levels lies outside the schedule). ``alphas`` and ``sigmas`` have
    K + 1 entries (float64); the last is (1, 0), clean data. Build one with
    :meth:`from_times`, :meth:`from_noise_levels` or :meth:`from_betas`, or let
    :meth:`diffkit.Diffusion.sampling_grid` respace the schedule.
    """

    times: torch.Tensor
    alphas: torch.Tensor
    sigmas: torch.Tensor
    # c_i (K,): the network sees c_i times the variance-preserving state (the flow path's own
    # state); None means 1 everywhere, as on every variance-preserving schedule.
    input_scales: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.times.ndim != 1 or self.times.numel() < 1:
            raise ValueError("a sampling grid needs at least one point")
        if self.input_scales is not None and self.input_scales.shape != (len(self),):
            raise ValueError("input_scales needs one entry per point")
        if self.alphas.shape != (len(self) + 1,) or self.sigmas.shape != (len(self) + 1,):
            raise ValueError("alphas and sigmas need one entry per point plus the clean end point")
        noise = (self.sigmas / self.alphas.clamp(min=1e-300))[:-1]
        if (noise[1:] >= noise[:-1]).any():
            raise ValueError("grid points must go from noisy to clean: sigma/alpha strictly decreasing")

    @classmethod
    def from_times(cls, schedule: NoiseSchedule, times) -> "SamplingGrid":
        """Evaluation at the given training times, strictly decreasing, in the schedule's time range
        ([0, T-1], fractions allowed; (0, 1] on the flow path)."""
        times = torch.as_tensor(times).to(torch.float64).flatten()
        if times.numel() < 1:
            raise ValueError("a sampling grid needs at least one time")
        if (times[1:] >= times[:-1]).any():
            raise ValueError(f"times must be strictly decreasing, got {times.tolist()[:12]}")
        low, high = schedule.time_range
        if times[0] > high or times[-1] < low or (schedule.is_continuous and times[-1] <= low):
            raise ValueError(f"times must lie in [{low:g}, {high:g}] (the schedule's range; clean data excluded), "
                             f"got {float(times[-1]):g}..{float(times[0]):g}")
        grid = cls._from_alpha_bar(schedule.alpha_bar_at(times), times)
        if schedule.is_continuous:
            grid = replace(grid, input_scales=schedule.input_scale_at(times))
        return grid

    @classmethod
    def from_noise_levels(cls, schedule: NoiseSchedule, alphas) -> "SamplingGrid":
        """Evaluation at explicit noise levels sqrt(alpha_bar), increasing (noisiest first).

        Levels need not be training steps (WaveGrad's grid-searched schedules). Their times are
        found by inverting the schedule; a level outside the trained range gets time NaN, which
        only a model conditioned on ``time_input="noise_level"`` or ``"log_snr"`` can use.
        """
        alphas = torch.as_tensor(alphas).to(torch.float64).flatten()
        if alphas.numel() < 1 or (alphas <= 0).any() or (alphas >= 1).any():
            raise ValueError(f"noise levels sqrt(alpha_bar) must lie in (0, 1), got {alphas.tolist()}")
        if (alphas[1:] <= alphas[:-1]).any():
            raise ValueError(f"noise levels must increase (noisiest first), got {alphas.tolist()}")
        alpha_bar = alphas**2
        times = schedule.time_for_alpha_bar(alpha_bar, strict=True)
        grid = cls._from_alpha_bar(alpha_bar, times)
        if schedule.is_continuous:
            grid = replace(grid, input_scales=schedule.input_scale_at(times))
        return grid

    @classmethod
    def from_betas(cls, schedule: NoiseSchedule, betas) -> "SamplingGrid":
        """The points of an inference schedule given by its betas (alpha_bar = cumprod(1 - beta)).

        DiffWave's fast schedule ``[1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5]`` is six such points.
        """
        betas = torch.as_tensor(betas).to(torch.float64).flatten()
        if betas.numel() < 1 or (betas <= 0).any() or (betas >= 1).any():
            raise ValueError(f"betas must lie in (0, 1), got {betas.tolist()}")
        return cls.from_noise_levels(schedule, torch.cumprod(1.0 - betas, dim=0).sqrt().flip(0))

    @classmethod
    def _from_alpha_bar(cls, alpha_bar: torch.Tensor, times: torch.Tensor) -> "SamplingGrid":
        alphas = torch.cat([alpha_bar.sqrt(), torch.ones(1, dtype=torch.float64)])
        sigmas = torch.cat([(1.0 - alpha_bar).clamp(min=0).sqrt(), torch.zeros(1, dtype=torch.float64)])
        return cls(times=times, alphas=alphas, sigmas=sigmas)

    def __len__(self) -> int:
        return self.times.numel()

    @property
    def lambdas(self) -> torch.Tensor:
        """log(alpha / sigma) at every point: -inf where alpha = 0, +inf at the clean point."""
        return torch.log(self.alphas) - torch.log(self.sigmas)

    def model_times(self, time_input: str = "timestep") -> torch.Tensor:
        """What the network is told at each of the K points, float64 (K,); see docs/interfaces.md.

        ``timestep``: the training time; ``noise_level``: sqrt(alpha_bar); ``log_snr``:
        log(alpha_bar / (1 - alpha_bar)).
        """
        if time_input == "timestep":
            if torch.isnan(self.times).any():
                raise ValueError(
                    "a grid point lies outside the schedule's trained range, so there is no training time to "
                    "give the model; keep the noise levels within the schedule, or train the model with "
                    "time_input='noise_level' or 'log_snr'"
                )
            return self.times
        if time_input == "noise_level":
            return self.alphas[:-1]
        if time_input == "log_snr":
            return 2.0 * self.lambdas[:-1]
        raise ValueError(f"unknown time_input {time_input!r}; choose one of {', '.join(TIME_INPUTS)}")

    def input_scale(self, i: int) -> float:
        """c_i: the network sees c_i times the state at point i (1 but on the flow path)."""
        return 1.0 if self.input_scales is None else float(self.input_scales[i])

    def step_scales(self, i: int) -> tuple[float, float, float, float]:
        """(alpha_t, sigma_t, alpha_s, sigma_s) of the step from point i to point i + 1, as Python floats."""
        return float(self.alphas[i]), float(self.sigmas[i]), float(self.alphas[i + 1]), float(self.sigmas[i + 1])

    def decoder_variance(self) -> float:
        """The variance that stands in for the zero posterior variance of the last step to clean data.

        As in Improved DDPM: beta-tilde of the step before it (the last step between two noisy
        points), or that step's beta on a one-point grid. Used by the bound's decoder and by the
        reverse process of the final step.
        """
        if len(self) < 2:
            alpha = float(self.alphas[0])
            return 1.0 - alpha**2
        return float(posterior_coefficients(*self.step_scales(len(self) - 2))[2])


def _evaluate(denoise: Denoiser, x: torch.Tensor, i: int, grid: SamplingGrid, callback) -> tuple[torch.Tensor, Prediction]:
    """One network evaluation: the (possibly changed) state and the prediction, reported to the callback."""
    pred = denoise(x, i)
    if pred.x is not None:
        x = pred.x
    if callback is not None:
        callback({"i": i, "t": float(grid.times[i]), "x": x, "denoised": pred.x0, "steps": len(grid)})
    return x, pred


# --------------------------------------------------------------------------- ancestral samplers
def sample_ddpm(denoise: Denoiser, x, grid: SamplingGrid, *, generator=None, callback=None, variance: str = "fixed_small"):
    """DDPM ancestral sampling: x_s ~ p(x_s | x_t) = N(mu(x_t, x0_hat), var), on any grid.

    ``variance``: ``fixed_small`` (the posterior beta-tilde), ``fixed_large`` (the step's beta)
    or ``learned`` (exp(v log beta + (1 - v) log beta-tilde), with v from the network).
    No noise is added on the final step to clean data.
    """
    if variance not in ("fixed_small", "fixed_large", "learned"):
        raise ValueError(f"unknown DDPM variance {variance!r}; choose fixed_small, fixed_large or learned")
    for i in range(len(grid)):
        x, pred = _evaluate(denoise, x, i, grid, callback)
        scales = grid.step_scales(i)
        coef_xt, coef_x0, posterior_var = posterior_coefficients(*scales)
        mean = coef_xt * x + coef_x0 * pred.x0
        if i == len(grid) - 1:
            x = mean
            continue
        beta = transition_variance(*scales)
        if variance == "fixed_small":
            std = posterior_var**0.5
        elif variance == "fixed_large":
            std = beta**0.5
        else:
            if pred.variance_frac is None:
                raise ValueError("variance='learned' needs a model that outputs variance channels (learn_variance=True)")
            frac = pred.variance_frac
            std = torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(max(posterior_var, 1e-20))))
        x = mean + std * randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


def sample_ddim(denoise: Denoiser, x, grid: SamplingGrid, *, generator=None, callback=None, eta: float = 0.0):
    """DDIM (Song et al., 2021): x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z.

    c = eta * sqrt(posterior variance): eta = 0 is the deterministic probability-flow ODE's
    first-order solver, eta = 1 is DDPM's fixed-small ancestral sampler. With eta = 0 it is
    also Euler's method on the ODE in the variance-exploding variables x / alpha and
    sigma / alpha (Karras et al.), which is why ``euler`` names this same function.
    """
    for i in range(len(grid)):
        x, pred = _evaluate(denoise, x, i, grid, callback)
        scales = grid.step_scales(i)
        a_s, s_s = scales[2], scales[3]
        c = eta * posterior_coefficients(*scales)[2] ** 0.5
        x = a_s * pred.x0 + max(s_s**2 - c**2, 0.0) ** 0.5 * pred.eps
        if eta > 0 and i < len(grid) - 1:
            x = x + c * randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


# --------------------------------------------------------------------------- exponential integrators
def _first_order_update(x, d0, a_t: float, s_t: float, s_s: float, h: torch.Tensor):
    """x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) D  -- exact for a constant data prediction."""
    return (s_t / s_s) * x - a_t * float(torch.expm1(-h)) * d0


def _x0_step(x, x0, grid: SamplingGrid, i: int):
    """The first-order step from grid point i to i + 1 with the data prediction ``x0`` held constant."""
    return _first_order_update(x, x0, float(grid.alphas[i + 1]), float(grid.sigmas[i + 1]), float(grid.sigmas[i]),
                               grid.lambdas[i + 1] - grid.lambdas[i])


def _final_jump(x, pred: Prediction, previous: Optional[Prediction], grid: SamplingGrid, final_order: int):
    """The jump from the last grid point to clean data: first order, then made second order if asked."""
    x = _x0_step(x, pred.x0, grid, len(grid) - 1)
    return _second_order_final(x, pred, previous, grid) if final_order == 2 else x


def _second_order_final(x0, pred: Prediction, previous: Optional[Prediction], grid: SamplingGrid) -> torch.Tensor:
    """The jump to clean data made second order with the previous evaluation; no extra call.

    In the variance-exploding variables y = x / alpha, s = sigma / alpha the probability-flow
    ODE is dy/ds = eps(y, s), so y(0) = y_t - integral_0^{s_t} eps ds. The first-order jump takes
    eps constant and returns x0_hat, the posterior mean E[x0 | x_t], which shrinks every
    dimension of standard deviation d by d^2 / (d^2 + s_t^2) in variance: a floor of about
    1e-6 to 1e-5 nats/dim below which no step count goes (benchmarks/samplers.py, the final-denoise
    floor). Extrapolating eps linearly in s through the previous point gives

        y(0) = x0_hat + (s_t^2 / 2) (eps_t - eps_prev) / (s_t - s_prev),

    which removes the floor. Entries whose x0_hat is identical at both points (known values
    written in by a wrapper) are left as they are, so they stay exact.
    """
    K = len(grid)
    if previous is None or K < 2 or float(grid.sigmas[K]) != 0.0 or float(grid.alphas[K - 2]) == 0.0:
        return x0
    s_t = float(grid.sigmas[K - 1]) / float(grid.alphas[K - 1])
    s_prev = float(grid.sigmas[K - 2]) / float(grid.alphas[K - 2])
    slope = (pred.eps - previous.eps) / (s_t - s_prev)
    return x0 + torch.where(pred.x0 == previous.x0, 0.0, 0.5 * s_t**2 * slope)


def _dpmpp_multistep(denoise: Denoiser, x, grid: SamplingGrid, order: int, callback, final_order: int = 2) -> torch.Tensor:
    """DPM-Solver++ multistep in data prediction (Lu et al., 2022), orders 1-3.

    Earlier evaluations stand in for the intermediate points of a single-step method, so each
    step costs one network call. Orders warm up from 1, the final jump to clean data is
    second order in sigma / alpha (``final_order=2``, :func:`_second_order_final`; 1 is the
    paper's first-order jump), and on short grids (< 15 points) the second-to-last step is at
    most second order, where higher-order extrapolation has too few points to be stable.
    """
    _check_final_order(final_order)
    lambdas = grid.lambdas
    history: list[tuple[torch.Tensor, torch.Tensor]] = []  # (lambda, D), newest last
    K = len(grid)
    previous = None
    for i in range(K):
        x, pred = _evaluate(denoise, x, i, grid, callback)
        history = (history + [(lambdas[i], pred.x0)])[-order:]
        a_t, s_t, s_s = float(grid.alphas[i + 1]), float(grid.sigmas[i + 1]), float(grid.sigmas[i])
        h = lambdas[i + 1] - lambdas[i]
        step_order = min(order, len(history))
        if i == K - 1:  # the jump to clean data
            step_order = 1
        elif i == K - 2 and K < 15:
            step_order = min(step_order, 2)
        # Points at lambda = -inf (zero-terminal SNR) carry no usable slope information.
        while step_order > 1 and not torch.isfinite(history[-step_order][0]):
            step_order -= 1
        d0 = pred.x0
        x_next = _first_order_update(x, d0, a_t, s_t, s_s, h)
        if step_order >= 2:
            lam1, d_1 = history[-2]
            r0 = (lambdas[i] - lam1) / h
            d1_0 = (d0 - d_1) / float(r0)
            if step_order == 2:
                x_next = x_next - 0.5 * a_t * float(torch.expm1(-h)) * d1_0
            else:
                lam2, d_2 = history[-3]
                r1 = (lam1 - lam2) / h
                d1_1 = (d_1 - d_2) / float(r1)
                d1 = d1_0 + float(r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / float(r0 + r1)
                phi1 = torch.expm1(-h)
                x_next = (
                    x_next
                    + a_t * float(phi1 / h + 1.0) * d1
                    - a_t * float((phi1 + h) / h**2 - 0.5) * d2
                )
        if i == K - 1 and final_order == 2:
            x_next = _second_order_final(x_next, pred, previous, grid)
        x, previous = x_next, pred
    return x


def _check_final_order(final_order: int) -> None:
    if final_order not in (1, 2):
        raise ValueError(f"final_order must be 1 (the posterior-mean jump) or 2, got {final_order}")


def sample_dpmpp_2m(denoise: Denoiser, x, grid: SamplingGrid, *, generator=None, callback=None, final_order: int = 2):
    """DPM-Solver++(2M): second-order multistep exponential integrator, one call a step."""
    return _dpmpp_multistep(denoise, x, grid, 2, callback, final_order)


def sample_dpmpp_3m(denoise: Denoiser, x, grid: SamplingGrid, *, generator=None, callback=None, final_order: int = 2):
    """DPM-Solver++(3M): third-order multistep exponential integrator, one call a step."""
    return _dpmpp_multistep(denoise, x, grid, 3, callback, final_order)


def _unipc_coefficients(rks: list[torch.Tensor], hh: torch.Tensor, b_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear system R rho = b of UniPC, for B(h) = ``b_h`` (e^{-h} - 1 in 'bh2', -h in 'bh1').

    Row k of R holds r_j^k for the stencil's relative offsets r_j (the new point last, r = 1);
    b_k = k! phi_{k+1}(h) / B(h), phi being the exponential integrator's phi-functions. rho
    then weights the divided differences so the update is exact for polynomial D(lambda) up
    to the stencil's degree.
    """
    order = len(rks)
    phi = torch.expm1(hh) / hh - 1.0
    factorial = 1.0
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append(torch.stack([r ** (k - 1) for r in rks]))
        b.append(phi * factorial / b_h)
        factorial *= k + 1
        phi = phi / hh - 1.0 / factorial
    return torch.stack(rows), torch.stack(b)


def sample_unipc(
    denoise: Denoiser, x, grid: SamplingGrid, *, generator=None, callback=None, order: Optional[int] = None,
    corrector: bool = True, variant: str = "bh2", final_order: int = 2,
):
    """UniPC (Zhao et al., 2023): a multistep predictor with a free corrector, in data prediction.

    After each network call at a new point, the corrector (UniC) refines that point's state
    with the fresh evaluation, raising the order by one at no extra call: the evaluation is the
    one the next predictor step needs anyway. The final jump to clean data is second order in
    sigma / alpha (``final_order=2``, :func:`_second_order_final`; 1 is the paper's first-order
    jump). When a denoiser changed the state it evaluated (known values, gradient steps), the
    corrected state keeps that change.

    ``order`` defaults to 3 on grids of 15 points or more and 2 below, where third-order
    extrapolation over long steps loses more than it gains (benchmarks/samplers.py).
    ``variant``: ``bh2`` (B(h) = e^h - 1, the default) or ``bh1`` (B(h) = h).
    """
    if order is None:
        order = 3 if len(grid) >= 15 else 2
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unknown UniPC variant {variant!r}; choose bh1 or bh2")
    if order not in (1, 2, 3, 4):
        raise ValueError(f"UniPC order must be 1-4, got {order}")
    _check_final_order(final_order)
    lambdas = grid.lambdas
    K = len(grid)
    history: list[tuple[torch.Tensor, torch.Tensor]] = []
    pending = None  # what the corrector needs from the last predictor step
    previous = None
    for i in range(K):
        x_predicted = x
        x, pred = _evaluate(denoise, x, i, grid, callback)
        if pending is not None and corrector:
            x = _unipc_correct(pending, pred.x0) + (x - x_predicted)
        history = (history + [(lambdas[i], pred.x0)])[-order:]
        if i == K - 1:
            x = _final_jump(x, pred, previous, grid, final_order)
            break
        previous = pred
        step_order = min(order, len(history), K - i)
        while step_order > 1 and not torch.isfinite(history[-step_order][0]):
            step_order -= 1
        x, pending = _unipc_predict(x, history[-step_order:], lambdas[i + 1], grid, i, corrector, variant)
    return x


def _unipc_predict(x, stencil, lambda_t, grid: SamplingGrid, i: int, with_corrector: bool, variant: str):
    """UniP: step from grid point i to i + 1 using the last len(stencil) evaluations."""
    lam0, d0 = stencil[-1]
    a_t, s_t, s_s = float(grid.alphas[i + 1]), float(grid.sigmas[i + 1]), float(grid.sigmas[i])
    h = lambda_t - lam0
    hh = -h
    rks = [(lam - lam0) / h for lam, _ in stencil[:-1]]
    diffs = [(d - d0) / float(r) for r, (_, d) in zip(rks, stencil[:-1])]
    base = _first_order_update(x, d0, a_t, s_t, s_s, h)
    b_h = torch.expm1(hh) if variant == "bh2" else hh
    R, b = _unipc_coefficients(rks + [torch.ones((), dtype=torch.float64, device=h.device)], hh, b_h)
    x_next = base
    if diffs:
        # With one difference the paper fixes rho = 1/2 (diffusers does the same), which keeps
        # the second-order predictor identical to the reference implementation.
        rhos = torch.linalg.solve(R[:-1, :-1], b[:-1]) if len(diffs) > 1 else torch.full((1,), 0.5, dtype=torch.float64, device=h.device)
        x_next = base - a_t * float(b_h) * sum(float(rho) * d for rho, d in zip(rhos, diffs))
    pending = None
    if with_corrector and torch.isfinite(h):
        rhos_c = torch.linalg.solve(R, b) if diffs else torch.full((1,), 0.5, dtype=torch.float64, device=h.device)
        pending = (base, d0, diffs, rhos_c, a_t * float(b_h))
    return x_next, pending


def _unipc_correct(pending, d_new: torch.Tensor) -> torch.Tensor:
    """UniC: redo the last step's update with the new point's evaluation included in the stencil."""
    base, d0, diffs, rhos_c, scale = pending
    correction = sum(float(rho) * d for rho, d in zip(rhos_c[:-1], diffs)) if diffs else 0.0
    correction = correction + float(rhos_c[-1]) * (d_new - d0)
    return base - scale * correction


# --------------------------------------------------------------------------- model statistics (DPM-Solver-v3)
_ZERO_STATISTICS = None


@dataclass(frozen=True)
class ModelStatistics:
    """How a trained model's data prediction depends on the state, on average, per element.

    DPM-Solver-v3 (Zheng et al., 2023) splits the network's data prediction as

        x0_theta(x, lambda) = l(lambda) * x + m(lambda) + r(x, lambda),

    with l the per-element average of the Jacobian's diagonal over p(x_lambda), and m the
    average of x0_theta - l x over p(x_lambda) (its "empirical model statistics" l and b, b
    being m's slope; estimate them with :func:`diffkit.calibration.estimate_model_statistics`).
    The first two terms are integrated exactly, so only the residual r is interpolated, and
    r is small and varies slowly where the model is close to linear (for Gaussian data it is
    zero).

    ``lambdas`` (N,) are increasing log(alpha / sigma) values; ``linear`` and ``offset`` (N,
    ...) hold l and m at each, with the shape of one example (or any shape that broadcasts
    against it). In between they are interpolated by cubic Hermite polynomials with
    finite-difference slopes (continuous first derivative: the kinks of a piecewise-linear l
    or m would become kinks of r, which the solver interpolates with polynomials); outside,
    they are held at the end values.
    """

    lambdas: torch.Tensor
    linear: torch.Tensor
    offset: torch.Tensor

    def __post_init__(self) -> None:
        lambdas = torch.as_tensor(self.lambdas, dtype=torch.float64).flatten()
        if lambdas.numel() < 2 or (lambdas[1:] <= lambdas[:-1]).any() or not torch.isfinite(lambdas).all():
            raise ValueError("model statistics need at least two finite, strictly increasing log-SNR points")
        object.__setattr__(self, "lambdas", lambdas)
        for name in ("linear", "offset"):
            values = torch.as_tensor(getattr(self, name), dtype=torch.float64)
            if values.ndim < 1 or values.shape[0] != lambdas.numel():
                raise ValueError(f"{name} needs one entry per point ({lambdas.numel()}), got shape {tuple(values.shape)}")
            if not torch.isfinite(values).all():
                raise ValueError(f"the model statistics' {name} holds NaN or Inf")
            object.__setattr__(self, name, values)
        object.__setattr__(self, "_linear_slopes", _parabola_slopes(lambdas, self.linear))
        object.__setattr__(self, "_offset_slopes", _parabola_slopes(lambdas, self.offset))
        object.__setattr__(self, "_integral", None)  # built on first use (validation alone does not need it)
        object.__setattr__(self, "_steps", {})  # cache of _statistics_step results

    @classmethod
    def zero(cls) -> "ModelStatistics":
        """l = m = 0: the solver then treats the whole data prediction as the residual (one shared instance)."""
        global _ZERO_STATISTICS
        if _ZERO_STATISTICS is None:
            zeros = torch.zeros(2, dtype=torch.float64)
            _ZERO_STATISTICS = cls(torch.tensor([-1.0, 1.0], dtype=torch.float64), zeros, zeros)
        return _ZERO_STATISTICS

    def at(self, lambdas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(l, m) at each of ``lambdas`` (M,), float64 (M, ...) each."""
        return (_hermite(self.lambdas, self.linear, self._linear_slopes, lambdas),
                _hermite(self.lambdas, self.offset, self._offset_slopes, lambdas))

    def integral(self, lambdas: torch.Tensor) -> torch.Tensor:
        """integral of alpha l from the first point to each of ``lambdas`` (M,), float64 (M, ...).

        Hermite interpolation of the integral's table with its exact derivative alpha l at the
        points; beyond the ends, l is held, as in :meth:`at`.
        """
        if self._integral is None:
            # The integral at every point (Gauss-Legendre on each interval of the interpolant), so a
            # step needs the tables only at its own quadrature nodes.
            nodes, weights = _gauss_legendre(self.lambdas[:-1], self.lambdas[1:])
            pieces = (append_dims(weights, self.linear.ndim) * _alpha(nodes, self.linear) * self.at(nodes)[0]).reshape(
                self.lambdas.numel() - 1, -1, *self.linear.shape[1:]).sum(dim=1)
            object.__setattr__(self, "_integral", torch.cat([torch.zeros_like(self.linear[:1]), pieces.cumsum(dim=0)]))
        low, high = float(self.lambdas[0]), float(self.lambdas[-1])
        inside = lambdas.to(torch.float64).clamp(low, high)
        derivative = _alpha(self.lambdas, self.linear) * self.linear
        value = _hermite(self.lambdas, self._integral, derivative, inside)
        # Outside the table l is constant, so the integral of alpha l is l times that of alpha:
        # asinh(e^lambda) is an antiderivative of alpha = sigmoid(2 lambda)^(1/2).
        beyond = torch.asinh(torch.exp(lambdas.to(torch.float64))) - torch.asinh(torch.exp(inside))
        end = torch.where(lambdas > high, 1.0, 0.0)
        ndim = self.linear.ndim
        held = append_dims(end, ndim) * self.linear[-1] + append_dims(1 - end, ndim) * self.linear[0]
        return value + append_dims(beyond, ndim) * held


def _alpha(lambdas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alpha = sigmoid(2 lambda)^(1/2) (variance preserving), shaped to broadcast along ``like``'s first axis."""
    return append_dims(torch.sigmoid(2 * lambdas).sqrt(), like.ndim)


def _parabola_slopes(points: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """d table / d lambda at every point: the slope of the parabola through it and its neighbours
    (one-sided at the ends), so a quadratic in lambda is reproduced exactly."""
    if points.numel() == 2:
        slope = (table[1] - table[0]) / float(points[1] - points[0])
        return torch.stack([slope, slope])
    gaps = points[1:] - points[:-1]
    # the left and right gaps of the interior points
    a, b = append_dims(gaps[:-1], table.ndim), append_dims(gaps[1:], table.ndim)
    slopes = torch.empty_like(table)
    slopes[1:-1] = -b / (a * (a + b)) * table[:-2] + (b - a) / (a * b) * table[1:-1] + a / (b * (a + b)) * table[2:]
    a0, b0 = float(gaps[0]), float(gaps[1])
    slopes[0] = (-(2 * a0 + b0) / (a0 * (a0 + b0)) * table[0] + (a0 + b0) / (a0 * b0) * table[1]
                 - a0 / (b0 * (a0 + b0)) * table[2])
    a1, b1 = float(gaps[-2]), float(gaps[-1])
    slopes[-1] = (b1 / (a1 * (a1 + b1)) * table[-3] - (a1 + b1) / (a1 * b1) * table[-2]
                  + (a1 + 2 * b1) / (b1 * (a1 + b1)) * table[-1])
    return slopes


def _hermite(points: torch.Tensor, table: torch.Tensor, slopes: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The cubic Hermite interpolant of (table, slopes) over ``points`` at ``at`` (clamped to the ends)."""
    at = at.to(torch.float64).clamp(float(points[0]), float(points[-1]))
    upper = torch.searchsorted(points, at).clamp(1, points.numel() - 1)
    lower = upper - 1
    width = points[upper] - points[lower]
    u = (at - points[lower]) / width
    h00, h10, h01, h11 = 2 * u**3 - 3 * u**2 + 1, u**3 - 2 * u**2 + u, -2 * u**3 + 3 * u**2, u**3 - u**2
    return (append_dims(h00, table.ndim) * table[lower] + append_dims(h10 * width, table.ndim) * slopes[lower]
            + append_dims(h01, table.ndim) * table[upper] + append_dims(h11 * width, table.ndim) * slopes[upper])


_GAUSS_4 = (torch.tensor([-0.8611363115940526, -0.3399810435848563, 0.3399810435848563, 0.8611363115940526],
                         dtype=torch.float64),
            torch.tensor([0.3478548451374538, 0.6521451548625461, 0.6521451548625461, 0.3478548451374538],
                         dtype=torch.float64))


def _gauss_legendre(starts: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Four-point Gauss-Legendre nodes and weights on each interval [starts_k, ends_k], flattened (4K,)."""
    roots, weights = _GAUSS_4
    half, middle = (ends - starts)[:, None] / 2, (ends + starts)[:, None] / 2
    return (middle + half * roots).flatten(), (half * weights).flatten()


def _lagrange_basis(nodes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """L_j(points) for the Lagrange polynomials of ``nodes`` (n,), float64 (n, M)."""
    basis = torch.ones(nodes.numel(), points.numel(), dtype=torch.float64)
    for j in range(nodes.numel()):
        for k in range(nodes.numel()):
            if k != j:
                basis[j] *= (points - nodes[k]) / (nodes[j] - nodes[k])
    return basis


def _statistics_step(stats: ModelStatistics, lam_s: float, lam_t: float, nodes, piece: float = 0.5):
    """One step of the probability-flow ODE from lambda_s to lambda_t with the model's statistics exact.

    In log-SNR the ODE reads dx/dlambda = -alpha^2 x + alpha x0_theta (VP, alpha^2 + sigma^2
    = 1). With x0_theta = l x + m + r it is linear in x, so

        x_t = Phi(t, s) x_s + integral_s^t Phi(t, tau) alpha_tau (m(tau) + r(tau)) dtau,
        Phi(t, tau) = (sigma_t / sigma_tau) exp(integral_tau^t alpha l),

    and r is replaced by its polynomial interpolant through the evaluations at ``nodes``.
    Returns Phi(t, s) (...), the m-integral (...) and the weights (n, ...) of the node values
    of r. The outer integrals use four-point Gauss-Legendre on pieces of at most ``piece`` in
    lambda, the inner one :meth:`ModelStatistics.integral`. With l = m = 0 this is
    DPM-Solver++'s exponential integrator. Results are cached on ``stats``: a sampler that
    runs the same grid again pays nothing.
    """
    key = (lam_s, lam_t, tuple(float(n) for n in nodes), piece)
    cached = stats._steps.get(key)
    if cached is not None:
        return cached
    nodes = torch.as_tensor(nodes, dtype=torch.float64)
    count = max(1, math.ceil(abs(lam_t - lam_s) / piece))
    edges = torch.linspace(lam_s, lam_t, count + 1, dtype=torch.float64)
    tau, quadrature = _gauss_legendre(edges[:-1], edges[1:])
    ends = torch.tensor([lam_s, lam_t], dtype=torch.float64)
    integral_ends, integral = stats.integral(ends), stats.integral(tau)
    _, offset = stats.at(tau)
    like = integral
    log_sigma = 0.5 * torch.nn.functional.logsigmoid(-2 * torch.cat([ends, tau]))
    flow = torch.exp(log_sigma[1] - log_sigma[0] + integral_ends[1] - integral_ends[0])
    # Phi(t, tau) alpha_tau, times the quadrature weight
    kernel = (torch.exp(append_dims(log_sigma[1] - log_sigma[2:], like.ndim) + integral_ends[1] - integral)
              * _alpha(tau, like) * append_dims(quadrature, like.ndim))
    drift = (kernel * offset).sum(dim=0)
    weights = torch.einsum("jm,m...->j...", _lagrange_basis(nodes, tau), kernel)
    result = (flow, drift, weights)
    if len(stats._steps) < 1024:
        stats._steps[key] = result
    return result


def sample_dpm_v3(
    denoise: Denoiser, x, grid: SamplingGrid, *, generator=None, callback=None,
    statistics: Optional[ModelStatistics] = None,
    order: Optional[int] = None, corrector: bool = True, final_order: int = 2,
):
    """DPM-Solver-v3 (Zheng et al., 2023): a multistep predictor-corrector that integrates the model's statistics exactly.

    With :class:`ModelStatistics` the data prediction splits into l x + m + r; the first two
    terms are integrated exactly (:func:`_statistics_step`), and only the residual r is
    interpolated in log-SNR through the last ``order`` evaluations (the predictor) and then,
    with the fresh evaluation at the new point, refined at no extra call (the corrector, as in
    UniPC, Zhao et al., 2023). Where the model is close to linear in the state, r is small and
    smooth, and a few steps suffice at any data scale: on Gaussian data (exactly linear) five
    steps are exact up to the final jump. Zheng et al.'s third statistic, s, is not used; the
    multistep interpolant follows r's variation instead. Without ``statistics`` (l = m = 0)
    every step is a data-prediction multistep step with exactly integrated weights. The final
    jump to clean data is that of :func:`sample_unipc`. ``order`` defaults to 3 on grids of 15
    points or more and 2 below. :meth:`diffkit.Diffusion.sample` passes the calibrated
    statistics (:func:`diffkit.calibration.estimate_model_statistics`).
    """
    if order is None:
        order = 3 if len(grid) >= 15 else 2
    if order not in (1, 2, 3, 4):
        raise ValueError(f"order must be 1-4, got {order}")
    _check_final_order(final_order)
    stats = statistics if statistics is not None else ModelStatistics.zero()
    lambdas = grid.lambdas
    K = len(grid)

    def advance(x_s, lam_s: float, lam_t: float, stencil):
        flow, drift, weights = _statistics_step(stats, lam_s, lam_t, [node for node, _ in stencil])
        return flow.to(x_s.dtype) * x_s + drift.to(x_s.dtype) + sum(w.to(x_s.dtype) * r for w, (_, r) in zip(weights, stencil))

    history: list[tuple[float, torch.Tensor]] = []  # (lambda, residual r), newest last
    pending = None  # (x_s, lambda_s, stencil) of the last predictor step, for the corrector
    previous = None
    for i in range(K):
        x_input = x
        x, pred = _evaluate(denoise, x, i, grid, callback)
        lam = float(lambdas[i])
        if math.isfinite(lam):
            linear, offset = stats.at(lambdas[i:i + 1])
            residual = pred.x0 - linear[0].to(x.dtype) * x - offset[0].to(x.dtype)
        if pending is not None and corrector:
            x_start, lam_start, stencil = pending
            # A denoiser's change to the state it evaluated (known values) is kept.
            x = x - x_input + advance(x_start, lam_start, lam, stencil + [(lam, residual)])
        if i == K - 1:
            return _final_jump(x, pred, previous, grid, final_order)
        if not math.isfinite(lam):  # a step from alpha = 0: only the data prediction counts
            x = _x0_step(x, pred.x0, grid, i)
            previous, history, pending = pred, [], None
            continue
        previous = pred
        history = (history + [(lam, residual)])[-order:]
        stencil = history[-min(order, K - i):]
        pending = (x, lam, stencil)
        x = advance(x, lam, float(lambdas[i + 1]), stencil)
    return x


# --------------------------------------------------------------------------- Karras-style ODE solvers
def sample_heun(denoise: Denoiser, x, grid: SamplingGrid, *, generator=None, callback=None):
    """Heun's second-order method (Karras et al., 2022, Alg. 1): two calls a step, Euler on the last.

    In the variance-exploding variables x / alpha and sigma / alpha the probability-flow ODE's
    slope is eps_hat. The corrector averages the slopes at both ends of a step; the final jump
    to clean data and any step starting at alpha = 0 stay first order (DDIM's step).
    """
    K = len(grid)
    x, pred = _evaluate(denoise, x, 0, grid, callback)
    for i in range(K):
        a_t, s_t, a_s, s_s = grid.step_scales(i)
        x_euler = a_s * pred.x0 + s_s * pred.eps
        if i == K - 1 or a_t == 0.0:
            x = x_euler
        else:
            # The trial evaluation at the Euler point only supplies a slope; the state comes
            # from the corrected step below.
            pred_next = denoise(x_euler, i + 1)
            x = a_s * (x / a_t + (s_s / a_s - s_t / a_t) * 0.5 * (pred.eps + pred_next.eps))
        if i < K - 1:
            x, pred = _evaluate(denoise, x, i + 1, grid, callback)
    return x


# --------------------------------------------------------------------------- registry
Sampler = Callable[..., torch.Tensor]
# prepare(diffusion, denoise, grid, shape, options) -> (denoise, options): what a sampler needs
# from the diffusion it runs for (calibrated statistics, the reverse variance), filled in only
# where the caller's options leave it open.
Prepare = Callable[..., tuple]


@dataclass(frozen=True)
class SamplerSpec:
    """Everything the core asks of a sampler, in one registration (:func:`register_sampler`).

    ``spacing``: its default respacing; ``calls_per_step``: network calls per grid point (heun:
    2, one fewer on the last point); ``deterministic``: its output is a function of the
    starting noise, so calibration can fit grids for it; ``reference``: the sampler whose
    fine-grid run is its calibration reference (one family solves one ODE; None: itself);
    ``variants(diffusion)``: the (options, coarse first stage) pairs calibration fits, keeping the best;
    ``prepare``: fills options from the diffusion; ``all_steps``: its default grid is the whole
    chain (ddpm) instead of 20 points.
    """

    name: str
    function: Sampler
    spacing: str
    calls_per_step: int = 1
    deterministic: bool = True
    reference: Optional[str] = None
    variants: Callable[..., tuple] = lambda diffusion: (({}, True),)
    prepare: Optional[Prepare] = None
    all_steps: bool = False

    def model_calls(self, steps: int) -> int:
        """Network evaluations on a grid of ``steps`` points (without guidance)."""
        return self.calls_per_step * steps - (self.calls_per_step - 1)


_REGISTRY: dict[str, SamplerSpec] = {}


def register_sampler(spec: SamplerSpec) -> SamplerSpec:
    """Add a sampler (or replace one of the same name); it is then usable everywhere by name."""
    if not isinstance(spec, SamplerSpec):
        raise TypeError(f"register_sampler takes a SamplerSpec, got {type(spec).__name__}")
    if spec.calls_per_step < 1:
        raise ValueError(f"calls_per_step must be at least 1, got {spec.calls_per_step}")
    _REGISTRY[spec.name] = spec
    return spec


def sampler_spec(name: str) -> SamplerSpec:
    """The registration of the sampler called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def _prepare_ddpm(diffusion, denoise, grid, shape, options):
    if "variance" not in options:
        options["variance"] = "learned" if diffusion.learn_variance else diffusion.variance
    if options["variance"] == "analytic":
        denoise = diffusion._analytic_ddpm_denoiser(denoise, grid)
        options["variance"] = "learned"
    return denoise, options


def _prepare_dpm_v3(diffusion, denoise, grid, shape, options):
    if "statistics" not in options:
        # A stored grid may say {"statistics": None}: it was fitted, and is used, without them.
        options["statistics"] = diffusion.model_statistics(shape[1:])
    return denoise, options


def _unipc_variants(diffusion) -> tuple:
    # Both B(h) variants; bh1 is poor on the default grid, and a coarse first stage walks it into
    # a poor basin, so it refines point by point from the start.
    return (({"variant": "bh1"}, False), ({}, True))


def _dpm_v3_variants(diffusion) -> tuple:
    # Also without the statistics (None: l = m = 0), which wins where the model is far from linear.
    if diffusion.model_statistics() is None:
        return (({}, True),)
    return (({}, True), ({"statistics": None}, True))


for _spec in (
    SamplerSpec("ddpm", sample_ddpm, "linspace", deterministic=False, prepare=_prepare_ddpm, all_steps=True),
    SamplerSpec("ddim", sample_ddim, "trailing"),
    # Euler on the probability-flow ODE is DDIM with eta = 0; the name keeps Karras' spacing.
    SamplerSpec("euler", sample_ddim, "karras"),
    SamplerSpec("heun", sample_heun, "karras", calls_per_step=2),
    SamplerSpec("dpm++2m", sample_dpmpp_2m, "logsnr", reference="unipc"),
    SamplerSpec("dpm++3m", sample_dpmpp_3m, "logsnr", reference="unipc"),
    SamplerSpec("unipc", sample_unipc, "logsnr", reference="unipc", variants=_unipc_variants),
    SamplerSpec("dpm-v3", sample_dpm_v3, "logsnr", reference="unipc", variants=_dpm_v3_variants,
                prepare=_prepare_dpm_v3),
):
    register_sampler(_spec)

# The built-in samplers' names (:func:`register_sampler` adds more).
SAMPLERS: tuple[str, ...] = tuple(_REGISTRY)


def get_sampler(name: str) -> Sampler:
    """The sampler function registered under ``name``."""
    return sampler_spec(name).function


def default_spacing(name: str) -> str:
    """The respacing each sampler works best with (measured by benchmarks/samplers.py)."""
    return sampler_spec(name).spacing


def model_calls(name: str, steps: int) -> int:
    """Network evaluations a sampler makes on a grid of ``steps`` points (without guidance)."""
    return sampler_spec(name).model_calls(steps)
