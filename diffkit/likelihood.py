"""Exact likelihood by the probability-flow ODE, and the standard error every likelihood reports.

Any path (variance preserving or flow) is solved in its variance-preserving state x and the
variable lambda = log(alpha / sigma) (half the log-SNR), where the probability-flow ODE reads

    dx/dlambda = alpha (x0_theta(x, lambda) - alpha x),        alpha^2 = sigmoid(2 lambda),

the same for every schedule (Song et al. 2021, written as in DPM-Solver). Along a solution the
log-density changes by minus the divergence of the drift (the instantaneous change of variables,
Chen et al. 2018), so for the data point x0

    log p_0(x0) = log N(x_lo; 0, I) + integral_{lambda_lo}^{lambda_hi} div f dlambda + D log alpha_hi,

with the ODE started at x_hi = alpha_hi x0 at the least noisy point and run to the noisiest.
The last term maps the state at lambda_hi back to the data scale. The divergence is exact
(one backward pass per dimension) for small dimensions and Hutchinson's estimate
E[v^T J v] with Rademacher probes v, held fixed along each trajectory, otherwise.

What it leaves out: the data are taken at the least noisy point (the first training step of a
discrete schedule, s = 1 / T on the flow path) instead of at exactly zero noise. For data whose
per-dimension spread is s this costs about sigma_hi^2 / (2 s^2 ln 2) bits/dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .guidance import split_output
from .parameterization import to_x0_eps

DIVERGENCES = ("auto", "exact", "hutchinson")
# Up to this many (counted) dimensions the exact divergence costs at most this many backward passes.
EXACT_DIVERGENCE_MAX_DIMS = 32


@dataclass(frozen=True)
class Estimate:
    """A mean with its standard error over ``count`` independent values (e.g. bits/dim of examples)."""

    mean: float
    stderr: float
    count: int

    @classmethod
    def of(cls, values: torch.Tensor) -> "Estimate":
        """The mean of ``values`` (one per example) and its standard error, std / sqrt(n)."""
        values = torch.as_tensor(values, dtype=torch.float64).flatten()
        if values.numel() < 1:
            raise ValueError("an estimate needs at least one value")
        stderr = float(values.std() / math.sqrt(values.numel())) if values.numel() > 1 else float("nan")
        return cls(float(values.mean()), stderr, values.numel())

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.stderr:.4f}"


def _lambda_ends(diffusion) -> tuple[float, float]:
    """(lambda_lo, lambda_hi): the noisiest finite point and the least noisy point of the schedule's table."""
    table = 0.5 * diffusion.schedule.log_snr
    T = diffusion.num_timesteps
    top = T - 1 if torch.isfinite(table[-1]) else max(T - 2, 0)
    return float(table[top]), float(table[0])


def _drift(diffusion, model, x: torch.Tensor, lam: float, cond: dict) -> torch.Tensor:
    """f(x, lambda) = alpha (x0_theta - alpha x) for the variance-preserving state x."""
    schedule = diffusion.schedule
    t = schedule.timestep_for_log_snr(torch.tensor(2.0 * lam, dtype=torch.float64))
    alpha = math.sqrt(float(torch.sigmoid(torch.tensor(2.0 * lam, dtype=torch.float64))))
    sigma = math.sqrt(float(torch.sigmoid(torch.tensor(-2.0 * lam, dtype=torch.float64))))
    c = float(schedule.input_scale_at(t))
    times = t.expand(x.shape[0])
    a_in = torch.full((x.shape[0],), c * alpha, dtype=torch.float64)
    s_in = torch.full((x.shape[0],), c * sigma, dtype=torch.float64)
    model_time = diffusion.model_time(times, a_in, s_in).to(x.device)
    output, _ = split_output(model(c * x, model_time, **cond), x, diffusion.learn_variance)
    x0_hat, _ = to_x0_eps(diffusion.prediction, output, c * x, c * alpha, c * sigma)
    return alpha * (x0_hat - alpha * x)


def _drift_and_divergence(diffusion, model, x, lam, cond, counted, probes):
    """The drift and its divergence over the counted dimensions (exact when ``probes`` is None)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        f = _drift(diffusion, model, x, lam, cond)
        if probes is None:
            flat_f = f.reshape(f.shape[0], -1)
            divergence = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
            dims = flat_f.shape[1]
            flat_counted = None if counted is None else counted.reshape(x.shape[0], -1)
            for j in range(dims):
                (grad,) = torch.autograd.grad(flat_f[:, j].sum(), x, retain_graph=j < dims - 1)
                d = grad.reshape(x.shape[0], -1)[:, j].to(torch.float64)
                divergence += d if flat_counted is None else torch.where(flat_counted[:, j], d, 0.0)
        else:
            divergence = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
            for k, probe in enumerate(probes):
                (grad,) = torch.autograd.grad(f, x, probe, retain_graph=k < len(probes) - 1)
                divergence += (grad * probe).reshape(x.shape[0], -1).sum(dim=1).to(torch.float64)
            divergence /= len(probes)
    return f.detach(), divergence


@torch.no_grad()
def ode_nll(
    diffusion,
    model: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    *,
    steps: int = 64,
    divergence: str = "auto",
    probes: int = 1,
    mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    progress: bool = False,
    **cond,
) -> tuple[torch.Tensor, dict]:
    """-log2 p(x0) per counted dimension by the probability-flow ODE, one value per example.

    ``steps`` fourth-order Runge-Kutta steps, evenly spaced in lambda (4 drift evaluations
    each). ``divergence``: ``exact``, ``hutchinson`` (``probes`` Rademacher probes per
    example, drawn from ``generator``) or ``auto`` (exact up to 32 counted dimensions).
    ``mask`` (bool, broadcastable to x0) marks the dimensions that count: only they enter the
    prior, the divergence and the per-dimension average; the others still move with the ODE,
    as the model sees them. Returns (bits/dim (B,), terms) with ``prior``, ``divergence`` and
    ``scale`` in bits/dim, and ``method``.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive integer, got {probes!r}")
    from .diffusion import _element_mask  # the diffusion module imports this one lazily

    batch = x0.shape[0]
    counted = _element_mask(mask, None, x0)
    dims = (counted.reshape(batch, -1).sum(dim=1) if counted is not None
            else torch.full((batch,), x0[0].numel(), device=x0.device)).to(torch.float64)
    use_exact = divergence == "exact" or (divergence == "auto" and int(dims.max()) <= EXACT_DIVERGENCE_MAX_DIMS)
    probe_list = None
    if not use_exact:
        gen_device = generator.device if generator is not None else x0.device
        probe_list = []
        for _ in range(probes):
            v = torch.randint(0, 2, x0.shape, generator=generator, device=gen_device).to(x0.device, x0.dtype) * 2 - 1
            probe_list.append(v if counted is None else torch.where(counted, v, torch.zeros_like(v)))

    lam_lo, lam_hi = _lambda_ends(diffusion)
    alpha_hi = math.sqrt(float(torch.sigmoid(torch.tensor(2.0 * lam_hi, dtype=torch.float64))))
    x = alpha_hi * x0
    h = (lam_lo - lam_hi) / steps
    integral = torch.zeros(batch, dtype=torch.float64, device=x0.device)  # of div f, from lambda_hi down to lambda_lo

    def evaluate(state, lam):
        return _drift_and_divergence(diffusion, model, state, lam, cond, counted, probe_list)

    for k in tqdm(range(steps), desc="ode nll", disable=not progress, leave=False):
        lam = lam_hi + k * h
        f1, d1 = evaluate(x, lam)
        f2, d2 = evaluate(x + 0.5 * h * f1, lam + 0.5 * h)
        f3, d3 = evaluate(x + 0.5 * h * f2, lam + 0.5 * h)
        f4, d4 = evaluate(x + h * f3, lam + h)
        x = x + h / 6.0 * (f1 + 2 * f2 + 2 * f3 + f4)
        integral += h / 6.0 * (d1 + 2 * d2 + 2 * d3 + d4)
    if not torch.isfinite(x).all():
        raise FloatingPointError("the probability-flow ODE produced NaN or Inf; check the model for NaN outputs")
    log_prior = -0.5 * (x.to(torch.float64) ** 2 + math.log(2 * math.pi))
    if counted is not None:
        log_prior = torch.where(counted, log_prior, 0.0)
    log_prior = log_prior.reshape(batch, -1).sum(dim=1)
    # log p_hi(x_hi) = log p_lo(x_lo) - integral_{lambda_lo}^{lambda_hi} div f = log_prior + integral (h < 0).
    log_scale = dims * math.log(alpha_hi)
    nats = -(log_prior + integral + log_scale)
    per_dim = 1.0 / (dims * math.log(2.0))
    bpd = (nats * per_dim).to(x0.dtype)
    terms = {"prior": -log_prior * per_dim, "divergence": -integral * per_dim, "scale": -log_scale * per_dim,
             "method": "ode", "divergence_method": "exact" if use_exact else "hutchinson"}
    return bpd, terms

