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
ones included, and any respacing. Each model evaluation is one network call (two with
classifier-free guidance); ``SAMPLERS`` lists the names and :func:`model_calls` the cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .process import posterior_coefficients, transition_variance
from .schedules import NoiseSchedule
from .utils import randn


@dataclass(frozen=True)
class Prediction:
    """What the network says about x_0 at one grid point."""

    x0: torch.Tensor
    eps: torch.Tensor
    # Learned-variance models: v in [0, 1] interpolating log beta-tilde (0) and log beta (1).
    variance_frac: Optional[torch.Tensor] = None


Denoiser = Callable[[torch.Tensor, int], Prediction]
Callback = Callable[[dict], None]


@dataclass(frozen=True)
class SamplingGrid:
    """The points a sampler visits: K evaluation timesteps and a final clean point.

    ``alphas`` and ``sigmas`` have K + 1 entries (float64); the last is (1, 0), clean data.
    """

    timesteps: torch.Tensor
    alphas: torch.Tensor
    sigmas: torch.Tensor

    @classmethod
    def from_timesteps(cls, schedule: NoiseSchedule, timesteps) -> "SamplingGrid":
        timesteps = torch.as_tensor(timesteps).long().flatten()
        if timesteps.numel() < 1:
            raise ValueError("a sampling grid needs at least one timestep")
        if (timesteps[1:] >= timesteps[:-1]).any():
            raise ValueError(f"timesteps must be strictly decreasing, got {timesteps.tolist()}")
        if timesteps[0] >= schedule.num_timesteps or timesteps[-1] < 0:
            raise ValueError(f"timesteps must lie in [0, {schedule.num_timesteps - 1}], got {timesteps.tolist()}")
        alphas = torch.cat([schedule.alpha_at(timesteps), torch.ones(1, dtype=torch.float64)])
        sigmas = torch.cat([schedule.sigma_at(timesteps), torch.zeros(1, dtype=torch.float64)])
        return cls(timesteps=timesteps, alphas=alphas, sigmas=sigmas)

    def __len__(self) -> int:
        return self.timesteps.numel()

    @property
    def lambdas(self) -> torch.Tensor:
        """log(alpha / sigma) at every point: -inf where alpha = 0, +inf at the clean point."""
        return torch.log(self.alphas) - torch.log(self.sigmas)

    def step_scales(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t, alpha_s, sigma_s) of the step from point i to point i + 1."""
        return self.alphas[i], self.sigmas[i], self.alphas[i + 1], self.sigmas[i + 1]

    def truncate(self, start_timestep: int) -> "SamplingGrid":
        """The part of the grid at or below ``start_timestep`` (for SDEdit / img2img)."""
        keep = self.timesteps <= start_timestep
        if not keep.any():
            raise ValueError(f"no sampling step at or below timestep {start_timestep}; use more steps or more strength")
        first = int(keep.nonzero()[0])
        return SamplingGrid(self.timesteps[first:], self.alphas[first:], self.sigmas[first:])


def _scalar(value: torch.Tensor) -> float:
    """A float64 grid entry as a Python number: it scales a tensor on any device without a copy."""
    return float(value)


def _report(callback: Optional[Callback], i: int, grid: SamplingGrid, x: torch.Tensor, pred: Prediction) -> None:
    if callback is not None:
        callback({"i": i, "t": int(grid.timesteps[i]), "x": x, "denoised": pred.x0, "steps": len(grid)})


# --------------------------------------------------------------------------- ancestral samplers
def sample_ddpm(denoise: Denoiser, x, grid: SamplingGrid, *, generator=None, callback=None, variance: str = "fixed_small"):
    """DDPM ancestral sampling: x_s ~ p(x_s | x_t) = N(mu(x_t, x0_hat), var), on any respaced grid.

    ``variance``: ``fixed_small`` (the posterior beta-tilde), ``fixed_large`` (the step's beta)
    or ``learned`` (exp(v log beta + (1 - v) log beta-tilde), with v from the network).
    No noise is added on the final step to clean data.
    """
    if variance not in ("fixed_small", "fixed_large", "learned"):
        raise ValueError(f"unknown DDPM variance {variance!r}; choose fixed_small, fixed_large or learned")
    for i in range(len(grid)):
        pred = denoise(x, i)
        _report(callback, i, grid, x, pred)
        scales = grid.step_scales(i)
        coef_xt, coef_x0, posterior_var = map(_scalar, posterior_coefficients(*scales))
        mean = coef_xt * x + coef_x0 * pred.x0
        if i == len(grid) - 1:
            x = mean
            continue
        beta = _scalar(transition_variance(*scales))
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
    first-order solver, eta = 1 is DDPM's fixed-small ancestral sampler.
    """
    for i in range(len(grid)):
        pred = denoise(x, i)
        _report(callback, i, grid, x, pred)
        scales = grid.step_scales(i)
        a_s, s_s = _scalar(grid.alphas[i + 1]), _scalar(grid.sigmas[i + 1])
        c = eta * _scalar(posterior_coefficients(*scales)[2]) ** 0.5
        x = a_s * pred.x0 + max(s_s**2 - c**2, 0.0) ** 0.5 * pred.eps
        if eta > 0 and i < len(grid) - 1:
            x = x + c * randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


# --------------------------------------------------------------------------- exponential integrators
def _first_order_update(x, d0, a_t: float, s_t: float, s_s: float, h: torch.Tensor):
    """x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^{-h}) D  -- exact for a constant data prediction."""
    return (s_t / s_s) * x - a_t * _scalar(torch.expm1(-h)) * d0


def _dpmpp_multistep(denoise: Denoiser, x, grid: SamplingGrid, order: int, callback) -> torch.Tensor:
    """DPM-Solver++ multistep in data prediction (Lu et al., 2022), orders 1-3.

    Earlier evaluations stand in for the intermediate points of a single-step method, so each
    step costs one network call. Orders warm up from 1, the final jump to clean data is
    first order, and on short grids (< 15 points) the second-to-last step is at most second
    order, where higher-order extrapolation has too few points to be stable.
    """
    lambdas = grid.lambdas
    history: list[tuple[torch.Tensor, torch.Tensor]] = []  # (lambda, D), newest last
    K = len(grid)
    for i in range(K):
        pred = denoise(x, i)
        _report(callback, i, grid, x, pred)
        history = (history + [(lambdas[i], pred.x0)])[-order:]
        a_t, s_t, s_s = _scalar(grid.alphas[i + 1]), _scalar(grid.sigmas[i + 1]), _scalar(grid.sigmas[i])
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
            d1_0 = (d0 - d_1) / _scalar(r0)
            if step_order == 2:
                x_next = x_next - 0.5 * a_t * _scalar(torch.expm1(-h)) * d1_0
            else:
                lam2, d_2 = history[-3]
                r1 = (lam1 - lam2) / h
                d1_1 = (d_1 - d_2) / _scalar(r1)
                d1 = d1_0 + _scalar(r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / _scalar(r0 + r1)
                phi1 = torch.expm1(-h)
                x_next = (
                    x_next
                    + a_t * _scalar(phi1 / h + 1.0) * d1
                    - a_t * _scalar((phi1 + h) / h**2 - 0.5) * d2
                )
        x = x_next
    return x


def sample_dpmpp_2m(denoise: Denoiser, x, grid: SamplingGrid, *, generator=None, callback=None):
    """DPM-Solver++(2M): second-order multistep exponential integrator, one call a step."""
    return _dpmpp_multistep(denoise, x, grid, 2, callback)


def sample_dpmpp_3m(denoise: Denoiser, x, grid: SamplingGrid, *, generator=None, callback=None):
    """DPM-Solver++(3M): third-order multistep exponential integrator, one call a step."""
    return _dpmpp_multistep(denoise, x, grid, 3, callback)


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
    corrector: bool = True, variant: str = "bh2",
):
    """UniPC (Zhao et al., 2023): a multistep predictor with a free corrector, in data prediction.

    After each network call at a new point, the corrector (UniC) refines that point's state
    with the fresh evaluation, raising the order by one at no extra call: the evaluation is the
    one the next predictor step needs anyway. The final jump to clean data is first order.

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
    lambdas = grid.lambdas
    K = len(grid)
    history: list[tuple[torch.Tensor, torch.Tensor]] = []
    pending = None  # what the corrector needs from the last predictor step
    for i in range(K):
        pred = denoise(x, i)
        _report(callback, i, grid, x, pred)
        if pending is not None and corrector:
            x = _unipc_correct(pending, pred.x0, x)
        history = (history + [(lambdas[i], pred.x0)])[-order:]
        if i == K - 1:
            x = _first_order_update(x, pred.x0, _scalar(grid.alphas[i + 1]), _scalar(grid.sigmas[i + 1]),
                                    _scalar(grid.sigmas[i]), lambdas[i + 1] - lambdas[i])
            break
        step_order = min(order, len(history), K - i)
        while step_order > 1 and not torch.isfinite(history[-step_order][0]):
            step_order -= 1
        x, pending = _unipc_predict(x, history[-step_order:], lambdas[i + 1], grid, i, corrector, variant)
    return x


def _unipc_predict(x, stencil, lambda_t, grid: SamplingGrid, i: int, with_corrector: bool, variant: str):
    """UniP: step from grid point i to i + 1 using the last len(stencil) evaluations."""
    lam0, d0 = stencil[-1]
    a_t, s_t, s_s = _scalar(grid.alphas[i + 1]), _scalar(grid.sigmas[i + 1]), _scalar(grid.sigmas[i])
    h = lambda_t - lam0
    hh = -h
    rks = [(lam - lam0) / h for lam, _ in stencil[:-1]]
    diffs = [(d - d0) / _scalar(r) for r, (_, d) in zip(rks, stencil[:-1])]
    base = _first_order_update(x, d0, a_t, s_t, s_s, h)
    b_h = torch.expm1(hh) if variant == "bh2" else hh
    R, b = _unipc_coefficients(rks + [torch.ones((), dtype=torch.float64, device=h.device)], hh, b_h)
    x_next = base
    if diffs:
        # With one difference the paper fixes rho = 1/2 (diffusers does the same), which keeps
        # the second-order predictor identical to the reference implementation.
        rhos = torch.linalg.solve(R[:-1, :-1], b[:-1]) if len(diffs) > 1 else torch.full((1,), 0.5, dtype=torch.float64, device=h.device)
        x_next = base - a_t * _scalar(b_h) * sum(_scalar(rho) * d for rho, d in zip(rhos, diffs))
    pending = None
    if with_corrector and torch.isfinite(h):
        rhos_c = torch.linalg.solve(R, b) if diffs else torch.full((1,), 0.5, dtype=torch.float64, device=h.device)
        pending = (base, d0, diffs, rhos_c, a_t * _scalar(b_h))
    return x_next, pending


def _unipc_correct(pending, d_new: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """UniC: redo the last step's update with the new point's evaluation included in the stencil."""
    base, d0, diffs, rhos_c, scale = pending
    correction = sum(_scalar(rho) * d for rho, d in zip(rhos_c[:-1], diffs)) if diffs else 0.0
    correction = correction + _scalar(rhos_c[-1]) * (d_new - d0)
    return base - scale * correction


# --------------------------------------------------------------------------- Karras-style ODE solvers
def sample_euler(denoise: Denoiser, x, grid: SamplingGrid, *, generator=None, callback=None):
    """Euler's method on the probability-flow ODE in the variance-exploding variables (Karras et al.).

    In x_ve = x / alpha with noise level s = sigma / alpha, dx_ve/ds = eps_hat. On the same grid
    it coincides with DDIM (eta = 0); it is usually paired with ``spacing="karras"``.
    """
    for i in range(len(grid)):
        pred = denoise(x, i)
        _report(callback, i, grid, x, pred)
        x = _euler_step(x, pred.eps, pred.x0, grid, i)
    return x


def _euler_step(x, slope, x0, grid: SamplingGrid, i: int):
    a_s, s_s = _scalar(grid.alphas[i + 1]), _scalar(grid.sigmas[i + 1])
    # x_ve + (s_next - s) eps = x0 + s_next eps once x_ve = x0 + s eps is substituted, which
    # stays finite even where alpha_t = 0 (zero-terminal SNR).
    return a_s * x0 + s_s * slope


def sample_heun(denoise: Denoiser, x, grid: SamplingGrid, *, generator=None, callback=None):
    """Heun's second-order method (Karras et al., 2022, Alg. 1): two calls a step, Euler on the last.

    The corrector averages the ODE slopes (eps) at both ends of a step; the final jump to
    clean data and any step starting at alpha = 0 stay first order.
    """
    K = len(grid)
    pred = denoise(x, 0)
    for i in range(K):
        _report(callback, i, grid, x, pred)
        x_euler = _euler_step(x, pred.eps, pred.x0, grid, i)
        if i == K - 1 or float(grid.alphas[i]) == 0.0:
            x = x_euler
            if i < K - 1:
                pred = denoise(x, i + 1)
            continue
        pred_next = denoise(x_euler, i + 1)
        s_ve, s_ve_next = grid.sigmas[i] / grid.alphas[i], grid.sigmas[i + 1] / grid.alphas[i + 1]
        x_ve = x / _scalar(grid.alphas[i])
        x_ve = x_ve + _scalar(s_ve_next - s_ve) * 0.5 * (pred.eps + pred_next.eps)
        x = _scalar(grid.alphas[i + 1]) * x_ve
        pred = denoise(x, i + 1)
    return x


# --------------------------------------------------------------------------- registry
Sampler = Callable[..., torch.Tensor]

_SAMPLERS: dict[str, tuple[Sampler, str]] = {
    # name: (function, default spacing)
    "ddpm": (sample_ddpm, "linspace"),
    "ddim": (sample_ddim, "trailing"),
    "euler": (sample_euler, "karras"),
    "heun": (sample_heun, "karras"),
    "dpm++2m": (sample_dpmpp_2m, "logsnr"),
    "dpm++3m": (sample_dpmpp_3m, "logsnr"),
    "unipc": (sample_unipc, "logsnr"),
}

SAMPLERS: tuple[str, ...] = tuple(_SAMPLERS)


def get_sampler(name: str) -> Sampler:
    """The sampler function registered under ``name``."""
    try:
        return _SAMPLERS[name][0]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


def default_spacing(name: str) -> str:
    """The respacing each sampler works best with (measured by benchmarks/samplers.py)."""
    get_sampler(name)
    return _SAMPLERS[name][1]


def model_calls(name: str, steps: int) -> int:
    """Network evaluations a sampler makes on a grid of ``steps`` points (without guidance)."""
    get_sampler(name)
    return 2 * steps - 1 if name == "heun" else steps
