"""The four things a network may predict -- eps, x0, v or flow -- and the one set of conversions between them.

With x_t = alpha x0 + sigma eps (any path: variance preserving, alpha^2 + sigma^2 = 1, or the
flow-matching path alpha = 1 - s, sigma = s):

    v    = alpha eps - sigma x0                  (Salimans & Ho, 2022)
    flow = eps - x0 = d x_t / ds on the flow path (Lipman et al. 2023; Liu et al. 2023)

and, with n = alpha^2 + sigma^2 (1 on a variance-preserving path),

    x0  = (x_t - sigma eps) / alpha = (alpha x_t - sigma v) / n = (x_t - sigma flow) / (alpha + sigma)
    eps = (x_t - alpha x0) / sigma  = (sigma x_t + alpha v) / n = (x_t + alpha flow) / (alpha + sigma)
"""

from __future__ import annotations

import torch

PREDICTIONS = ("eps", "x0", "v", "flow")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
    return prediction


def to_x0_eps(
    prediction: str, output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a network output of the given kind into the pair (x0_hat, eps_hat)."""
    if prediction == "eps":
        return (x_t - sigma * output) / alpha, output
    if prediction == "x0":
        return output, (x_t - alpha * output) / sigma
    if prediction == "v":
        norm = alpha**2 + sigma**2
        return (alpha * x_t - sigma * output) / norm, (sigma * x_t + alpha * output) / norm
    if prediction == "flow":
        total = alpha + sigma
        return (x_t - sigma * output) / total, (x_t + alpha * output) / total
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def from_x0_eps(
    prediction: str, x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """The quantity of the given kind implied by (x0, eps); also the regression target of the loss."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - sigma * x0
    if prediction == "flow":
        return eps - x0
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def x0_error_scale(prediction: str, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Factor c with ||target - output||^2 = c * ||x0 - x0_hat||^2 for a fixed x_t.

    eps: c = alpha^2 / sigma^2 (the SNR);  x0: c = 1;  v: c = n^2 / sigma^2 (SNR + 1 on a
    variance-preserving path);  flow: c = (alpha + sigma)^2 / sigma^2 (1 / s^2 on the flow path).
    Loss weightings are defined on the x0 error and divided by c, so each weighting means the
    same thing whatever the network predicts.
    """
    if prediction == "eps":
        return alpha**2 / sigma**2
    if prediction == "x0":
        return torch.ones_like(alpha / sigma)
    if prediction == "v":
        return (alpha**2 + sigma**2) ** 2 / sigma**2
    if prediction == "flow":
        return (alpha + sigma) ** 2 / sigma**2
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
