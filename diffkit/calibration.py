"""Calibration: what a trained model says about itself, computed once and stored in its config.

Three pieces of information make the defaults of a trained model accurate without retraining:

1. **Step placement** (:func:`optimize_grid`). A K-point sampler grid is optimised against a
   fine-step reference on a small calibration batch of starting noise (Align-Your-Steps,
   Sabour et al. 2024, with the sampler's own error measured directly instead of bounded).
   For starting noise z_1..z_N the objective is

       L(t_1, ..., t_{K-1}) = (1/N) sum_n || (Phi_K(z_n; t) - Phi_ref(z_n)) / s ||^2 / d

   where Phi_K is the K-point deterministic sampler on the grid (T-1, t_1, ..., t_{K-1}),
   Phi_ref the same sampler family on a fine grid (the truth up to its own small error), and
   s the per-element standard deviation of the reference samples over the batch, so every
   element's error counts relative to its own scale (on Gaussian data L is then, to second
   order, twice the KL divergence per dimension the benchmark reports). The first point stays at
   T-1, where sampling starts; the others move in log-SNR by a pattern search (coordinate
   steps that halve when nothing improves), starting from the sampler's default grid: first
   two parameters (the points evenly spaced in log-SNR between a movable first and last
   value, a quarter of the budget), then every point on its own. No
   data is needed: only the model and noise. The cost is a few hundred runs of the K-step
   sampler on the batch, once per (model, sampler, K); the result is a list of K times stored
   in ``diffusion.calibration["grids"]["<sampler>/<K>"]`` and used by ``sample(steps=K)``.

2. **Reverse variances** (:func:`estimate_reverse_statistics`, :func:`analytic_variances`;
   Analytic-DPM, Bao et al. 2022, with its imperfect-mean correction). For a step t -> s of the
   reverse process with the mean of q(x_s | x_t, x0 = x0_theta), the variance that minimises the
   step's expected KL term, i.e. maximises the bound, is

       var*(t -> s) = beta_tilde(t, s) + c_x0(t, s)^2 * E||x0 - x0_theta(x_t, t)||^2 / d

   with c_x0 = alpha_s sigma_{t|s}^2 / sigma_t^2 the posterior's weight on x0. The model's x0
   error is estimated once per training step by Monte Carlo on data and stored in
   ``diffusion.calibration["x0_mse"]``. Analytic-DPM's own estimate of the same quantity,
   (sigma_t / alpha_t)^2 (1 - Gamma_t) with Gamma_t = E||eps_theta(x_t, t)||^2 / d (stored as
   ``eps_norm_sq``, with E||eps||^2 / d = 1 as a control variate), is exact only when the
   network is the true posterior mean, E Var[x0 | x_t]; a real network's x0 is worse at low
   noise, Gamma exceeds 1 there, and the decoder's variance would collapse to zero. It is kept
   for calibrations made before ``x0_mse`` existed (clipped to [beta_tilde, beta] and, for
   bounded data, Var[x0 | x_t] <= (range / 2)^2, as Analytic-DPM does). The decoder step (to
   clean data) uses var = the x0 error at the last point. :meth:`Diffusion.nll` uses these
   variances by default once they are calibrated.

3. **Model statistics** (:func:`estimate_model_statistics`; DPM-Solver-v3, Zheng et al. 2023).
   The per-element average of the denoiser's Jacobian diagonal l(lambda) and of the rest,
   m(lambda) = E[x0_theta - l x], along the model's own trajectories from noise (no data).
   The ``dpm-v3`` sampler integrates l x + m exactly and interpolates only the residual; where
   the model is nearly linear in its state (Gaussian data exactly) a few steps then suffice.
   They are kept only if a grid fitted with them beats the one fitted without.

All are pure functions of (diffusion, model, inputs); :func:`calibrate` runs them and returns a
new diffusion whose ``calibration`` holds the results (a frozen sampling profile: the diffusion
passed in is unchanged), which :attr:`Diffusion.config` carries, so a checkpoint keeps them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from .guidance import split_output
from .parameterization import to_x0_eps
from .process import posterior_coefficients, transition_variance
from .sampling import SAMPLERS, ModelStatistics, SamplerSpec, SamplingGrid, model_calls, sampler_spec
from .utils import check_finite, randn
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from .diffusion import Diffusion



def _deterministic(sampler: str) -> SamplerSpec:
    """The registration of ``sampler``, which must be deterministic: a grid can be fitted to a
    reference only then (a stochastic sampler's error would be mostly its own noise)."""
    spec = sampler_spec(sampler)
    if not spec.deterministic:
        names = ", ".join(name for name in SAMPLERS if sampler_spec(name).deterministic)
        raise ValueError(f"grids are fitted for deterministic samplers ({names}), got {sampler!r}")
    return spec


def grid_key(sampler: str, steps: int) -> str:
    """The key of a stored grid in ``calibration["grids"]``: ``"<sampler>/<steps>"``."""
    return f"{sampler}/{int(steps)}"


def _rows(cond: dict, batch: int, start: int, stop: int) -> dict:
    """``cond`` for the examples start..stop of a batch: tensors with ``batch`` rows are sliced, the rest pass."""
    return {key: (value[start:stop] if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch else value)
            for key, value in cond.items()}


# --------------------------------------------------------------------------- reverse variances
def estimate_eps_norms(diffusion, model: Callable[..., torch.Tensor], data: torch.Tensor, **kwargs) -> torch.Tensor:
    """Gamma_t = E||eps_theta(x_t, t)||^2 / d for every training step, float64 (T,).

    The ``eps_norm_sq`` half of :func:`estimate_reverse_statistics` (same arguments).
    """
    return estimate_reverse_statistics(diffusion, model, data, **kwargs)["eps_norm_sq"]


@torch.no_grad()
def estimate_reverse_statistics(
    diffusion,
    model: Callable[..., torch.Tensor],
    data: torch.Tensor,
    *,
    times: Optional[Sequence[float]] = None,
    batch_size: int = 256,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
    **cond,
) -> dict[str, torch.Tensor]:
    """Per training step t = 0..T-1, float64 (T,) each, from one pass of the model over ``data``:

    * ``eps_norm_sq``: Gamma_t = E||eps_theta(x_t, t)||^2 / d (Analytic-DPM's statistic);
    * ``x0_mse``: E||x0 - x0_theta(x_t, t)||^2 / d, the model's own error.

    For the exact posterior mean the two say the same thing (x0_mse = (sigma_t / alpha_t)^2
    (1 - Gamma_t)); for a real network they differ, and x0_mse is the one that gives the best
    variances (:func:`analytic_variances`).

    ``data`` (N, ...) are clean examples (a few hundred suffice); each step sees every
    example once with fresh noise. The estimate uses the exact E||eps||^2 / d = 1 as a control
    variate,

        Gamma_t ~= mean_n ||eps_theta(x_t^n, t)||^2 / d - c (mean_n ||eps^n||^2 / d - 1),

    with c the regression coefficient of the first on the second over the batch: the same mean
    as the plain average (up to O(1/N)) but far less variance where eps_theta ~ eps (high
    noise, c ~ 1), and no added variance where eps_theta ~ 0 (low noise, c ~ 0). Any prediction type and ``time_input`` work: the output is converted to eps
    (:mod:`diffkit.parameterization`). ``times`` (increasing, within [0, T-1]) evaluates only
    those steps and interpolates linearly in between, for expensive models. ``cond`` tensors of
    batch N are split along with the data; other values pass through.
    """
    if not torch.is_tensor(data) or data.ndim < 2 or data.shape[0] < 1:
        raise ValueError("data must be a tensor of clean examples (N, ...) with N >= 1")
    check_finite(data, "calibration data")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    T = diffusion.num_timesteps
    if times is None:
        eval_times = torch.arange(T, dtype=torch.float64)
    else:
        eval_times = torch.as_tensor(times, dtype=torch.float64).flatten()
        if eval_times.numel() < 2 or (eval_times[1:] <= eval_times[:-1]).any():
            raise ValueError("times must hold at least two strictly increasing training times")
        if eval_times[0] != 0 or eval_times[-1] != T - 1:
            raise ValueError(f"times must start at 0 and end at {T - 1} so every step can be interpolated")
    n = data.shape[0]
    dims = data[0].numel()
    values = torch.empty(eval_times.numel(), dtype=torch.float64)
    errors = torch.empty(eval_times.numel(), dtype=torch.float64)
    from tqdm.auto import tqdm

    for k in tqdm(range(eval_times.numel()), desc="eps norms", disable=not progress, leave=False):
        t_value = float(diffusion.schedule.time_of_step(eval_times[k]))
        model_norms, noise_norms, x0_errors = [], [], []
        for start in range(0, n, batch_size):
            x0 = data[start:start + batch_size]
            b = x0.shape[0]
            part = _rows(cond, n, start, start + batch_size)
            t = torch.full((b,), t_value, dtype=torch.float64)
            alpha, sigma = diffusion._scales(t, x0)
            noise = randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = alpha * x0 + sigma * noise
            output = model(x_t, diffusion.model_time(t, alpha, sigma).to(x0.device), **part)
            output, _ = split_output(output.to(x0.dtype), x_t, diffusion.learn_variance)
            x0_hat, eps_hat = to_x0_eps(diffusion.prediction, output, x_t, alpha, sigma)
            x0_errors.append(((x0_hat.to(torch.float64) - x0.to(torch.float64)) ** 2).reshape(b, -1).sum(dim=1).cpu() / dims)
            model_norms.append((eps_hat.to(torch.float64) ** 2).reshape(b, -1).sum(dim=1).cpu() / dims)
            noise_norms.append((noise.to(torch.float64) ** 2).reshape(b, -1).sum(dim=1).cpu() / dims)
        a, c = torch.cat(model_norms), torch.cat(noise_norms)
        # The regression coefficient of ||eps_theta||^2 on ||eps||^2: the variance-minimising weight.
        slope = float(((a - a.mean()) * (c - c.mean())).mean() / (c.var(unbiased=False) + 1e-300)) if n > 1 else 0.0
        values[k] = float(a.mean()) - slope * (float(c.mean()) - 1.0)
        errors[k] = float(torch.cat(x0_errors).mean())
    if not (torch.isfinite(values).all() and torch.isfinite(errors).all()):
        raise FloatingPointError("the model returned NaN or Inf while estimating its reverse statistics")
    if times is None:
        return {"eps_norm_sq": values, "x0_mse": errors}
    steps = torch.arange(T, dtype=torch.float64)
    upper = torch.searchsorted(eval_times, steps).clamp(1, eval_times.numel() - 1)
    lower = upper - 1
    frac = (steps - eval_times[lower]) / (eval_times[upper] - eval_times[lower])
    return {name: table[lower] * (1 - frac) + table[upper] * frac
            for name, table in (("eps_norm_sq", values), ("x0_mse", errors))}


def per_step_at(table: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """A per-training-step table (Gamma, x0 error) at (fractional) times, by linear interpolation."""
    table = torch.as_tensor(table, dtype=torch.float64)
    times = torch.as_tensor(times, dtype=torch.float64).clamp(0, table.numel() - 1)
    low = times.floor().long().clamp(max=table.numel() - 1)
    high = (low + 1).clamp(max=table.numel() - 1)
    frac = times - low.to(torch.float64)
    return table[low] * (1 - frac) + table[high] * frac


def analytic_variances(grid: SamplingGrid, eps_norm_sq: Optional[torch.Tensor] = None, *,
                       data_range: Optional[tuple[float, float]] = None,
                       x0_mse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The likelihood-optimal reverse variances for every step of ``grid``, float64 (K,).

    Entry i is the variance of p(x_{i+1} | x_i) (the last entry: of the decoder p(x0 | x_{K-1}))

        var_i = beta_tilde_i + c_x0,i^2 * v_i,

    with v_i the uncertainty of the model's x0 at t_i. Given ``x0_mse`` (the model's measured
    error E||x0 - x0_theta||^2 / d), v_i = x0_mse(t_i): the exact minimiser of each step's
    expected KL term for the model's own mean, E KL(q(x_s | x_t, x0) || N(mu_theta, var I)),
    which is beta_tilde + E||mu_q - mu_theta||^2 / d (the imperfect-mean correction of Bao et
    al., 2022b). Otherwise Analytic-DPM's v_i = (sigma_i / alpha_i)^2 (1 - Gamma(t_i)), exact
    only for the true posterior mean: it is clipped to [beta_tilde_i, beta_i] (Analytic-DPM's
    Theorem 2) and v_i <= ((high - low) / 2)^2 when ``data_range`` bounds the data. It fails
    where a network's x0 is worse than the posterior mean: at low noise Gamma then exceeds 1,
    v_i becomes 0 and the decoder's variance collapses (benchmarks/results/likelihood_gain.md
    measured this on x0-predicting audio and planning models). A point without signal
    (alpha = 0) takes the upper bound beta_i. Points with NaN times (outside the schedule) are
    not supported. One of ``eps_norm_sq`` and ``x0_mse`` is needed.
    """
    if eps_norm_sq is None and x0_mse is None:
        raise ValueError("analytic variances need the model's x0 error (x0_mse) or its eps norms (eps_norm_sq)")
    if torch.isnan(grid.times).any():
        raise ValueError("analytic variances need grid points inside the schedule (no NaN times)")
    alphas, sigmas = grid.alphas.to(torch.float64), grid.sigmas.to(torch.float64)
    a_t, s_t, a_s, s_s = alphas[:-1], sigmas[:-1], alphas[1:], sigmas[1:]
    _, c_x0, tilde = posterior_coefficients(a_t, s_t, a_s, s_s)
    if x0_mse is not None:
        x0_var = per_step_at(x0_mse, grid.times).clamp(min=0.0)
        var = tilde + c_x0**2 * x0_var
        var[-1] = x0_var[-1].clamp(min=1e-12)
        return var
    gamma = per_step_at(eps_norm_sq, grid.times).clamp(max=1.0)
    x0_var = (s_t / a_t.clamp(min=1e-300)) ** 2 * (1.0 - gamma)
    if data_range is not None:
        x0_var = x0_var.clamp(max=((data_range[1] - data_range[0]) / 2.0) ** 2)
    var = tilde + c_x0**2 * x0_var
    beta = transition_variance(a_t, s_t, a_s, s_s)
    # With no signal left (alpha_t = 0: the flow path's or a zero-terminal-SNR schedule's top
    # point) Gamma says nothing of x0's uncertainty (infinity times zero): Theorem 2's upper bound.
    var = torch.where(a_t > 0, torch.minimum(torch.maximum(var, tilde), beta), beta)
    # The decoder step: x0 itself, whose uncertainty is v at the last point (kept above a tiny floor).
    var[-1] = x0_var[-1].clamp(min=1e-12)
    return var


# --------------------------------------------------------------------------- step placement
def _lambda_range(diffusion) -> tuple[float, float]:
    """(lowest finite, highest) log-SNR of the schedule's steps (the first point is pinned at T-1)."""
    table = diffusion.schedule.log_snr
    T = diffusion.num_timesteps
    top = T - 1 if torch.isfinite(table[-1]) else max(T - 2, 0)
    return float(table[top]), float(table[0])


def _times_from_lambdas(diffusion, lambdas: torch.Tensor) -> torch.Tensor:
    interior = diffusion.schedule.timestep_for_log_snr(lambdas)
    return torch.cat([torch.tensor([diffusion.schedule.time_range[1]], dtype=torch.float64), interior])


def _pattern_search(score, x: torch.Tensor, best: float, valid, delta: float, final: float, budget: int, count):
    """Coordinate pattern search: try +-delta on each coordinate, repeat a success with doubling
    length while it improves, halve delta when a sweep finds nothing; stop below ``final`` or
    when ``count[0]`` reaches ``budget``. Returns (x, best)."""
    while delta >= final and count[0] < budget:
        improved = False
        for j in range(x.numel()):
            for sign in (1.0, -1.0):
                if count[0] >= budget:
                    break
                trial = x.clone()
                trial[j] += sign * delta
                if not valid(trial):
                    continue
                value = score(trial)
                if value < best:
                    best, x, improved = value, trial, True
                    step = 2.0 * delta
                    while count[0] < budget:
                        trial = x.clone()
                        trial[j] += sign * step
                        if not valid(trial):
                            break
                        value = score(trial)
                        if value >= best:
                            break
                        best, x, step = value, trial, 2.0 * step
                    break
        if not improved:
            delta /= 2.0
    return x, best


def _calibration_noise(noise_or_shape, generator, dtype, device) -> torch.Tensor:
    """The calibration batch: the given noise (on ``device``), or a draw of the given shape."""
    if torch.is_tensor(noise_or_shape):
        noise = noise_or_shape if device is None else noise_or_shape.to(device)
    else:
        shape = tuple(int(s) for s in noise_or_shape)
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"shape must be (batch, ...) with positive sizes, got {shape}")
        noise = randn(shape, generator=generator, device=device or "cpu", dtype=dtype)
    if noise.shape[0] < 2:
        raise ValueError("the calibration batch needs at least two examples")
    check_finite(noise, "calibration noise")
    return noise


@torch.no_grad()
def optimize_grid(
    diffusion,
    model: Callable[..., torch.Tensor],
    noise_or_shape,
    steps: int,
    sampler: str = "unipc",
    *,
    sampler_options: Optional[dict] = None,
    reference_steps: int = 200,
    reference: Optional[torch.Tensor] = None,
    init_grid: Optional[SamplingGrid] = None,
    initial_step: float = 1.0,
    final_step: float = 0.03,
    max_evals: int = 600,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device=None,
    return_history: bool = False,
    sample_kwargs: Optional[dict] = None,
    coarse: bool = True,
    **cond,
):
    """A ``steps``-point grid for ``sampler`` that minimises its error against a fine-step reference.

    ``noise_or_shape`` is the calibration batch of starting noise (B, ...) or a shape to draw
    it with ``generator`` (a few hundred examples suffice). The reference is the same sampler
    family's solution on a ``reference_steps``-point log-SNR grid (UniPC for the multistep
    samplers, the sampler itself otherwise) unless ``reference`` gives it. The objective and the
    search are described in the module docstring (a successful move is repeated with
    doubling length while it keeps improving); at most ``max_evals`` runs of the K-step
    sampler are made (each ``model_calls(sampler, steps)`` network calls on the batch). The
    result is never worse on the batch than ``init_grid`` (default: the sampler's default grid).
    ``sample_kwargs`` go to :meth:`Diffusion.sample` on every run (``guidance_scale``,
    ``wrappers``): fit the grid to the sampler as it will be used.

    Returns the :class:`SamplingGrid` (and, with ``return_history``, a dict with the initial and
    final objective values, the number of evaluations, network calls (times batch) and the
    reference samples, which a caller may pass back as ``reference`` for other step counts).
    """
    spec = _deterministic(sampler)
    options = dict(sampler_options or {})
    if options.get("eta", 0.0):
        raise ValueError("optimize_grid needs a deterministic sampler: eta must be 0")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2 (one point is always T-1), got {steps!r}")
    if steps > diffusion.num_timesteps:
        raise ValueError(f"steps={steps} exceeds the {diffusion.num_timesteps} training timesteps")
    noise = _calibration_noise(noise_or_shape, generator, dtype, device)

    def run(grid: SamplingGrid, name: str = sampler, opts: Optional[dict] = None) -> torch.Tensor:
        return diffusion.sample(model, noise.shape, sampler=name, grid=grid, noise=noise, dtype=noise.dtype,
                                sampler_options=opts if opts is not None else options, **(sample_kwargs or {}), **cond)

    if reference is None:
        ref_sampler = spec.reference or sampler
        ref_grid = diffusion.sampling_grid(min(reference_steps, diffusion.num_timesteps), "logsnr")
        reference = run(ref_grid, ref_sampler, {})
    reference = reference.to(noise.device, noise.dtype)
    if reference.shape != noise.shape:
        raise ValueError(f"reference has shape {tuple(reference.shape)}, the noise {tuple(noise.shape)}")
    scale = reference.std(dim=0, keepdim=True)
    scale = scale.clamp(min=max(float(scale.mean()) * 1e-3, 1e-12))

    def objective(times: torch.Tensor) -> float:
        out = run(SamplingGrid.from_times(diffusion.schedule, times))
        value = float((((out - reference) / scale).to(torch.float64) ** 2).mean())
        return value if math.isfinite(value) else float("inf")

    lam_low, lam_high = _lambda_range(diffusion)
    if init_grid is None:
        init_grid = diffusion.sampling_grid(steps, sampler=sampler)
    if len(init_grid) != steps:
        raise ValueError(f"init_grid has {len(init_grid)} points, steps={steps}")
    lambdas = (2.0 * init_grid.lambdas[1:-1]).clamp(lam_low, lam_high)  # log-SNR of points 1..K-1
    # Keep the points strictly ordered inside the schedule (a rounded default grid may touch the ends).
    gap = 1e-3
    for j in range(lambdas.numel()):
        lo = (lam_low if j == 0 else float(lambdas[j - 1])) + gap
        lambdas[j] = min(max(float(lambdas[j]), lo), lam_high - gap * (lambdas.numel() - 1 - j))

    def valid(lams: torch.Tensor) -> bool:
        edges = torch.cat([torch.tensor([lam_low]), lams, torch.tensor([lam_high + gap])])
        return bool((edges[1:] - edges[:-1] >= gap).all())

    count = [0]

    def score(lams: torch.Tensor) -> float:
        count[0] += 1
        return objective(_times_from_lambdas(diffusion, lams))

    best = score(lambdas)
    initial = best
    # Stage 1: two parameters -- the interior points evenly spaced in log-SNR between a first
    # and a last value -- which moves all points at once for a few runs (what matters most
    # on a small budget). Stage 2: every point on its own, from the better of the two.
    n_free = lambdas.numel()
    if coarse and n_free >= 3:
        def spread(ends: torch.Tensor) -> torch.Tensor:
            return ends[0] + (ends[1] - ends[0]) * torch.linspace(0, 1, n_free, dtype=torch.float64)

        ends, value = _pattern_search(lambda e: score(spread(e)), torch.stack([lambdas[0], lambdas[-1]]), best,
                                      lambda e: bool(e[1] - e[0] >= gap * n_free) and valid(spread(e)),
                                      initial_step, final_step * 4, max(max_evals // 4, 1) - count[0] + 1,
                                      count)
        if value < best:
            best, lambdas = value, spread(ends)
    lambdas, best = _pattern_search(score, lambdas, best, valid, initial_step, final_step, max_evals, count)
    evals = count[0]
    grid = SamplingGrid.from_times(diffusion.schedule, _times_from_lambdas(diffusion, lambdas))
    if return_history:
        return grid, {"initial": initial, "final": best, "evals": evals, "reference": reference,
                      "model_calls": evals * model_calls(sampler, steps) * noise.shape[0]}
    return grid


# --------------------------------------------------------------------------- model statistics
@torch.no_grad()
def estimate_model_statistics(
    diffusion,
    model: Callable[..., torch.Tensor],
    noise_or_shape,
    *,
    reference_steps: int = 200,
    probe_scale: float = 1e-3,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device=None,
    sample_kwargs: Optional[dict] = None,
    return_reference: bool = False,
    **cond,
):
    """DPM-Solver-v3's empirical model statistics l and m (:class:`~diffkit.sampling.ModelStatistics`).

    At every point of a fine ``reference_steps``-point log-SNR grid, over the states x of
    the model's own probability-flow trajectories from the calibration noise (UniPC; the
    states are draws of the model's p(x_lambda), so no data is needed):

        l(lambda) = E[ diag d x0_theta / dx ]      ~ mean_n v_n * (x0_theta(x_n + e v_n) - x0_theta(x_n - e v_n)) / (2 e)
        m(lambda) = E[ x0_theta(x) - l(lambda) x ]

    per element, with Rademacher probes v (Hutchinson's estimator of the diagonal; exact for
    a model whose Jacobian is diagonal, such as Gaussian data's) and e = ``probe_scale``
    times the states' RMS. Zheng et al. define the same l (their b is m's slope in lambda,
    which the solver integrates exactly through m); their third statistic s is not used.
    Cost: three network calls per point and example. ``sample_kwargs`` (``guidance_scale``,
    ``wrappers``) and ``cond`` go to the model as when sampling: measure the sampler as it
    will be used. Returns the statistics (and, with ``return_reference``, the trajectories'
    end points, the reference :func:`optimize_grid` takes).
    """
    noise = _calibration_noise(noise_or_shape, generator, dtype, device)
    if not isinstance(reference_steps, int) or reference_steps < 2:
        raise ValueError(f"reference_steps must be an integer >= 2, got {reference_steps!r}")
    if not probe_scale > 0:
        raise ValueError(f"probe_scale must be positive, got {probe_scale}")
    options = dict(sample_kwargs or {})
    # Evenly spaced in log-SNR at fractional times: the statistics are functions of lambda, and
    # the integer times of the respaced grid crowd and gap them unevenly.
    log_snr_low, log_snr_high = _lambda_range(diffusion)
    grid = SamplingGrid.from_times(diffusion.schedule, _times_from_lambdas(
        diffusion, torch.linspace(log_snr_low, log_snr_high, reference_steps, dtype=torch.float64)[1:]))
    denoise = diffusion.denoiser(model, grid, cond=cond, guidance_scale=options.get("guidance_scale", 1.0),
                                 noise=noise, wrappers=options.get("wrappers", ()))
    # One probe per trajectory for all points: the estimates' Monte-Carlo error is then smooth
    # in lambda. Fresh probes at every point make it jagged, and the solver, which integrates
    # l and m exactly but interpolates the residual, turns jaggedness into error that more
    # steps do not remove.
    probe = torch.randint(0, 2, noise.shape, generator=torch.Generator(device=noise.device).manual_seed(0),
                          device=noise.device).to(noise.dtype) * 2 - 1
    lambdas, linear, offset = [], [], []

    def measure(info: dict) -> None:
        lam = float(grid.lambdas[info["i"]])
        if not math.isfinite(lam):
            return
        x, x0 = info["x"], info["denoised"]
        step = probe_scale * float(x.to(torch.float64).pow(2).mean().sqrt())
        difference = denoise(x + step * probe, info["i"]).x0 - denoise(x - step * probe, info["i"]).x0
        l_here = (probe * difference).to(torch.float64).mean(dim=0) / (2 * step)
        lambdas.append(lam)
        linear.append(l_here)
        offset.append((x0.to(torch.float64) - l_here * x.to(torch.float64)).mean(dim=0))

    reference = diffusion.sample(model, noise.shape, sampler="unipc", grid=grid, noise=noise, dtype=noise.dtype,
                                 callback=measure, **options, **cond)
    order = torch.tensor(lambdas, dtype=torch.float64).argsort()
    stats = ModelStatistics(torch.tensor(lambdas, dtype=torch.float64)[order],
                            torch.stack(linear)[order].cpu(), torch.stack(offset)[order].cpu())
    return (stats, reference) if return_reference else stats


# --------------------------------------------------------------------------- both, into the config
def calibrate(
    diffusion,
    model: Callable[..., torch.Tensor],
    noise_or_shape=None,
    *,
    data: Optional[torch.Tensor] = None,
    steps: Sequence[int] = (5, 10, 20),
    samplers: Optional[Sequence[str]] = None,
    model_statistics: bool = True,
    grid_batch: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    max_evals: int = 400,
    reference_steps: int = 200,
    eps_norm_times: Optional[Sequence[float]] = None,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float32,
    device=None,
    progress: bool = False,
    sample_kwargs: Optional[dict] = None,
    eps_norm_cond: Optional[dict] = None,
    extra_grids: Sequence[tuple[str, int]] = (),
    **cond,
) -> "Diffusion":
    """A new :class:`~diffkit.Diffusion`, ``diffusion`` calibrated for ``model``; ``diffusion`` itself is unchanged.

    * with ``noise_or_shape`` (a calibration batch of noise, or its shape): first the model's
      statistics by :func:`estimate_model_statistics` (unless ``model_statistics=False``),
      which make ``dpm-v3`` the default sampler; then a grid per (sampler, K) by
      :func:`optimize_grid`, for ``samplers`` (default: the default sampler); for ``unipc``
      both B(h) variants are fitted, for ``dpm-v3`` the grid with and without the statistics,
      and the better one on the batch is kept with its ``sampler_options`` (statistics that no
      fitted grid uses are not kept: the model is too far from linear for them). ``grid_batch``
      fits the grids on the first draws only: the statistics are cheap per draw (three
      network calls at each of ``reference_steps`` points) and gain from many, while a grid
      costs hundreds of sampler runs. ``extra_grids``: further (sampler, K) pairs to fit besides
      ``samplers`` x ``steps`` (e.g. a checkpoint's recorded sampling default). No data needed.
    * with ``data`` (clean examples): Analytic-DPM's ``eps_norm_sq`` by :func:`estimate_eps_norms`.

    ``cond`` goes to the model in both (``eps_norm_cond``, when given, replaces it for the
    variances: e.g. the null condition the likelihood is scored with); ``sample_kwargs``
    (``guidance_scale``, ``wrappers``) to the sampler runs. Entries already present and not
    recomputed are kept. The results live in the returned diffusion's ``calibration`` and so in
    its ``config`` (and a checkpoint's config.json, where :func:`diffkit.checkpoint.save_checkpoint`
    or ``diffkit calibrate`` write it).
    """
    if noise_or_shape is None and data is None:
        raise ValueError("calibrate needs noise_or_shape (for grids), data (for variances), or both")
    current = dict(diffusion.calibration)
    grids = dict(current.get("grids", {}))
    if noise_or_shape is not None:
        noise = _calibration_noise(noise_or_shape, generator, dtype, device)
        references = {}  # the fine-step reference run, per reference sampler
        if model_statistics:
            stats, references["unipc"] = estimate_model_statistics(diffusion, model, noise, reference_steps=reference_steps,
                                                         sample_kwargs=sample_kwargs, return_reference=True, **cond)
            current["statistics"] = {"lambdas": stats.lambdas.tolist(), "linear": stats.linear.tolist(),
                                     "offset": stats.offset.tolist()}
            # The grids below are fitted to the sampler as it will run: with these statistics.
            diffusion = diffusion.with_calibration(current)
        if grid_batch is not None:
            if not isinstance(grid_batch, int) or not 2 <= grid_batch <= noise.shape[0]:
                raise ValueError(f"grid_batch must be an integer from 2 to the batch size {noise.shape[0]}, got {grid_batch!r}")
            cond = _rows(cond, noise.shape[0], 0, grid_batch)
            noise = noise[:grid_batch]
            references = {name: reference[:grid_batch] for name, reference in references.items()}
        jobs = [(sampler, int(k)) for sampler in samplers or (diffusion.default_sampler,) for k in steps]
        jobs += [(sampler, int(k)) for sampler, k in extra_grids if (sampler, int(k)) not in jobs]
        for sampler, _ in jobs:
            _deterministic(sampler)
        bar = tqdm(jobs, desc="calibrating grids", disable=not progress, leave=False)
        for sampler, k in bar:
            spec = sampler_spec(sampler)
            reference_sampler = spec.reference or sampler
            best = None
            for options, coarse in spec.variants(diffusion):
                grid, info = optimize_grid(diffusion, model, noise, int(k), sampler, sampler_options=options,
                                           reference_steps=reference_steps,
                                           reference=references.get(reference_sampler),
                                           max_evals=max_evals, return_history=True, coarse=coarse,
                                           sample_kwargs=sample_kwargs, **cond)
                references[reference_sampler] = info["reference"]
                if best is None or info["final"] < best[2]:
                    best = (grid, options, info["final"])
                if progress:
                    bar.write(f"calibrate {sampler}/{k} {options or 'default options'}: objective "
                              f"{info['initial']:.3g} -> {info['final']:.3g} in {info['evals']} runs")
            grids[grid_key(sampler, int(k))] = {"times": best[0].times.tolist(), "sampler_options": best[1]}
        current["grids"] = grids
        fitted = [entry for key, entry in grids.items() if key.startswith("dpm-v3/")]
        if model_statistics and fitted and all("statistics" in entry["sampler_options"] for entry in fitted):
            # Every grid fitted better without them: the model is too far from linear in its
            # state for them to pay, and at other step counts they would only add error.
            del current["statistics"]
            if progress:
                print("calibrate: no fitted grid used the model statistics; they are not kept", flush=True)
    if data is not None:
        reverse = estimate_reverse_statistics(diffusion, model, data, times=eps_norm_times, batch_size=batch_size,
                                              generator=generator, progress=progress,
                                              **(cond if eps_norm_cond is None else eps_norm_cond))
        current.update({name: values.tolist() for name, values in reverse.items()})
    return diffusion.with_calibration(current)


# --------------------------------------------------------------------------- checkpoints
@dataclass
class CalibrationInputs:
    """What a modality hands :func:`calibrate_checkpoint` about one of its checkpoints.

    ``net`` and ``diffusion`` as loaded; ``shape`` the calibration batch (B, ...) of starting
    noise; ``cond`` and ``sample_kwargs`` (``guidance_scale``, ``wrappers``) as the modality's
    ``generate`` samples with them, so the grids are fitted to the sampler as it is used;
    ``data`` clean training examples (N, ...) for the reverse variances, with ``data_cond``
    (None: no variances).
    """

    net: Callable[..., torch.Tensor]
    diffusion: "Diffusion"
    shape: tuple
    cond: dict = field(default_factory=dict)
    sample_kwargs: dict = field(default_factory=dict)
    data: Optional[torch.Tensor] = None
    data_cond: dict = field(default_factory=dict)


def recorded_sampling(config: dict) -> tuple[Optional[str], Optional[int]]:
    """The sampler and step count a checkpoint records as its sampling defaults
    (``config["modality_config"]["defaults"]``, what ``generate`` and the planner sample with
    when not told otherwise); None for what it does not record."""
    defaults = (config.get("modality_config") or {}).get("defaults") or {}
    sampler, steps = defaults.get("sampler"), defaults.get("steps")
    steps = int(steps) if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1 else None
    return (str(sampler) if sampler else None), steps


def recorded_grids(config: dict, steps: Sequence[int]) -> tuple[list[tuple[str, int]], Optional[str]]:
    """The grids :func:`calibrate_checkpoint` fits for a checkpoint's recorded sampler: (sampler,
    K) for K in ``steps`` and the recorded step count, when the recorded sampler is deterministic
    (a grid is fitted to a reference only then) and the checkpoint does not hold that grid
    already. Returns them and a line saying why some or all are not fitted, or None."""
    sampler, recorded_steps = recorded_sampling(config)
    if sampler is None:
        return [], None
    try:
        spec = sampler_spec(sampler)
    except ValueError:
        return [], f"the recorded sampler {sampler!r} is not registered here: no grid is fitted for it"
    if not spec.deterministic:
        return [], (f"the recorded sampler {sampler!r} is stochastic: no grid is fitted for it (it samples on its "
                    "default grid; the reverse variances serve it)")
    counts = [int(k) for k in steps]
    if recorded_steps is not None and recorded_steps not in counts:
        counts.append(recorded_steps)
    # A grid the checkpoint already holds is kept: fitted before, or the grid a distilled student
    # was trained for, which no fit may move (``--samplers`` refits on purpose).
    held = ((config.get("diffusion") or {}).get("calibration") or {}).get("grids") or {}
    kept = [k for k in counts if f"{sampler}/{k}" in held]
    jobs = [(sampler, k) for k in counts if k not in kept]
    why = (f"the checkpoint already holds the recorded sampler's grids {', '.join(f'{sampler}/{k}' for k in kept)}: "
           "kept (name it with --samplers to refit)") if kept else None
    return jobs, why


def calibratable_config(checkpoint) -> dict:
    """The config of a checkpoint that ``diffkit calibrate`` can calibrate; a one-line error for one it cannot."""
    from .checkpoint import checkpoint_directory, read_config

    directory = checkpoint_directory(checkpoint)
    config = read_config(directory)
    if not config.get("diffusion"):
        raise ValueError(f"checkpoint {directory} holds no diffusion (a classifier or value network?); "
                         "only diffusion checkpoints are calibrated")
    if config["diffusion"].get("class") == "MaskedDiffusion":
        raise ValueError(f"checkpoint {directory} holds a masked-diffusion model; its samplers reveal tokens on a "
                         "fixed schedule and have no time grid or statistics to calibrate")
    return config


def calibrate_checkpoint(
    checkpoint,
    *,
    steps: Sequence[int] = (5, 10, 20),
    batch: int = 128,
    data: int = 256,
    samplers: Optional[Sequence[str]] = None,
    max_evals: int = 200,
    reference_steps: int = 100,
    seed: int = 0,
    device="cpu",
    progress: bool = False,
    write: bool = True,
    model_statistics: bool = True,
) -> "Diffusion":
    """Calibrate a saved diffusion checkpoint and write the result into its ``config.json``.

    The checkpoint's modality (through the registry) supplies the network, the batch shape and
    the conditions (:class:`CalibrationInputs`, its ``calibration_inputs`` method); ``batch``
    draws of noise fit the grids, ``data`` training examples (0: none) the reverse variances.
    Grids are fitted for every K in ``steps`` with ``samplers`` or, by default, with the
    diffusion's default sampler (``dpm-v3`` once its statistics are measured) and with the
    sampler the checkpoint records as its sampling default (``modality_config["defaults"]``,
    e.g. ``dpm++2m`` for images, ``ddim`` for planners; also at its recorded step count), so
    that ``generate`` and the planner, which sample with the recorded sampler, find a fitted
    grid (:func:`recorded_grids`; a stochastic recorded sampler such as ``ddpm`` gets none).
    ``model_statistics=False`` skips dpm-v3's statistics (they hold two tables per element of a
    sample, which for large samples make the config large). The config is rewritten atomically (the old file or the whole new one, never a torn one);
    everything else in the checkpoint is left as it is. Returns the calibrated diffusion.
    """
    from .checkpoint import CONFIG_FILE, checkpoint_directory, config_text
    from .registry import get_modality
    from .utils import replaced_atomically

    directory = checkpoint_directory(checkpoint)
    config = calibratable_config(directory)
    modality = get_modality(config.get("modality") or "")
    hook = getattr(modality, "calibration_inputs", None)
    if hook is None:
        raise ValueError(f"the {config.get('modality')!r} modality does not say how to calibrate its checkpoints "
                         "(it has no calibration_inputs method)")
    if not isinstance(batch, int) or batch < 2:
        raise ValueError(f"batch must be an integer >= 2, got {batch!r}")
    if not isinstance(data, int) or data < 0:
        raise ValueError(f"data must be a non-negative integer, got {data!r}")
    generator = torch.Generator().manual_seed(seed)
    extra = recorded_grids(config, steps)[0] if samplers is None else []
    inputs = hook(str(directory), batch=batch, data=data, device=device, generator=generator)
    noise = torch.randn(inputs.shape, generator=generator).to(device)
    T = inputs.diffusion.num_timesteps
    calibrated = calibrate(
        inputs.diffusion, inputs.net, noise,
        data=inputs.data if data > 0 else None, steps=tuple(steps), samplers=samplers, max_evals=max_evals,
        # The x0 error changes slowly with the step: measured at 50 steps and interpolated.
        eps_norm_times=torch.linspace(0, T - 1, min(50, T)).round().unique().tolist(),
        reference_steps=reference_steps, generator=torch.Generator(device=noise.device).manual_seed(seed + 1),
        device=noise.device, progress=progress, sample_kwargs=inputs.sample_kwargs,
        eps_norm_cond=inputs.data_cond if data > 0 else None, model_statistics=model_statistics,
        extra_grids=extra, **inputs.cond)
    if write:
        config_file = directory / CONFIG_FILE
        fresh = json.loads(config_file.read_text())
        fresh["diffusion"] = calibrated.config
        with replaced_atomically(config_file) as staging:
            staging.write_text(config_text(fresh))
    return calibrated
