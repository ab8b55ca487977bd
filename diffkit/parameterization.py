"""The three things a network may predict -- eps, x0 or v -- and the one set of conversions between them.

With x_t = alpha x0 + sigma eps and alpha^2 + sigma^2 = 1:

    v   = alpha eps - sigma x0                  (Salimans & Ho, 2022)
    x0  = (x_t - sigma eps) / alpha = alpha x_t - sigma v
    eps = (x_t - alpha x0) / sigma  = sigma x_t + alpha v
"""

from __future__ import annotations

import torch

PREDICTIONS = ("eps", "x0", "v")


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
        return alpha * x_t - sigma * output, sigma * x_t + alpha * output
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
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def x0_error_scale(prediction: str, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Factor c with ||target - output||^2 = c * ||x0 - x0_hat||^2 for a fixed x_t.

    eps: c = SNR = alpha^2 / sigma^2;  x0: c = 1;  v: c = SNR + 1 = 1 / sigma^2.
    Loss weightings are defined on the x0 error and divided by c, so each weighting means
    the same thing whatever the network predicts.
    """
    snr = alpha**2 / sigma**2
    if prediction == "eps":
        return snr
    if prediction == "x0":
        return torch.ones_like(snr)
    if prediction == "v":
        return snr + 1.0
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
