"""Sample-quality statistics in any feature space, shared by every modality's benchmarks.

A modality supplies the features (a classifier trained on its data); these turn them into the
numbers the field reports: the Frechet distance (FID-style) and the inception score.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["frechet_distance", "inception_score"]


def frechet_distance(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D) and (M, D).

    ||mu_a - mu_b||^2 + tr(A) + tr(B) - 2 tr((A B)^1/2), with the last trace computed as the
    sum of square roots of the eigenvalues of the symmetric A^1/2 B A^1/2 (the same
    eigenvalues as A B), which is stable where a general matrix square root is not.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def inception_score(probs: torch.Tensor | np.ndarray) -> float:
    """exp(E_x KL(p(y|x) || p(y))) of class probabilities (N, C): 1 (one class, or no confidence) to C."""
    p = np.asarray(probs, dtype=np.float64).clip(1e-12, 1)
    marginal = p.mean(0, keepdims=True)
    return float(np.exp((p * (np.log(p) - np.log(marginal))).sum(1).mean()))
