"""Training pieces shared by recipes/planner_train.py and the tests: the planner's diffusion,
the losses of the value function and the inverse-dynamics model (for ``Trainer(loss_fn=...)``),
the modality config a planner checkpoint carries, and the side files that put the value and
inverse-dynamics networks inside a planner checkpoint (compact copies come from
``diffkit.runs.export_checkpoint``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F

import diffkit

from .data import Normalizer, Trajectories
from .maze import MazeGrid

__all__ = [
    "inverse_dynamics_loss",
    "planner_config",
    "planner_diffusion",
    "side_files_of",
    "value_loss_fn",
]


def planner_diffusion(num_timesteps: int = 64, prediction: str = "x0", schedule: str = "cosine") -> diffkit.Diffusion:
    """The planner's diffusion. Diffuser predicts x0 for mazes (with clipping to the data range)
    and uses few training steps (64-256), which few-step solvers then shorten further. The
    network is told the training timestep (``time_input="timestep"``), which the value network
    shares."""
    return diffkit.Diffusion(schedule, num_timesteps, prediction, time_input="timestep")


def value_loss_fn(diffusion: diffkit.Diffusion) -> Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], Any]:
    """MSE of V(x_t, t) against the (normalised) return of the window, on noisy windows.

    The value sees x_t as the sampler will: noised at a time drawn as the denoiser's training
    draws it (``Diffusion.draw_times``), told that time as the denoiser is told it
    (``model_time``), with the known entries (current state, goal) clean. Batches are
    :class:`TrajectoryWindows` items with ``value`` already normalised.
    """

    def loss_fn(model, batch):
        x0 = batch["x"]
        t = diffusion.draw_times(x0.shape[0])
        x_t = diffusion.q_sample(x0, t)
        x_t = torch.where(batch["known_mask"], x0, x_t)
        prediction = model(x_t, diffusion.model_time(t).to(x0.device))
        return F.mse_loss(prediction, batch["value"].to(prediction.dtype))

    return loss_fn


def inverse_dynamics_loss(model, batch):
    """MSE of the predicted (normalised) action between two consecutive (normalised) observations."""
    return F.mse_loss(model(batch["obs"], batch["next_obs"]), batch["action"])


class NormalisedValues(torch.utils.data.Dataset):
    """Window items plus their normalised ``value``, for the value network's training."""

    def __init__(self, windows, normalizer: Normalizer):
        if windows.values is None:
            raise ValueError("the windows carry no values: build them with discount=...")
        if normalizer.dim != 1:
            raise ValueError(f"values are scalars: the value normaliser must have 1 dim, got {normalizer.dim}")
        self.windows, self.normalizer = windows, normalizer

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i):
        item = dict(self.windows[i])
        item["value"] = self.normalizer.normalize(self.windows.value(i).reshape(1))[0]
        return item


def planner_config(*, env_id: Optional[str], traj: Trajectories, normalizer: Normalizer, horizon: int,
                   maze: Optional[MazeGrid], action_low, action_high, defaults: Mapping[str, Any],
                   value_normalizer: Optional[Normalizer] = None, inverse_dynamics: bool = False,
                   data: Optional[str] = None, every: int = 1) -> dict[str, Any]:
    """The ``modality_config`` of a planner checkpoint: what the planner needs besides weights.

    ``horizon`` counts the model's rows; with ``every`` = k they are k environment steps apart.
    """
    return {
        "env_id": env_id,
        "observation_dim": traj.observation_dim,
        "action_dim": traj.action_dim,
        "horizon": int(horizon),
        "every": int(every),
        "normalizer": normalizer.to_config(),
        "action_low": np.asarray(action_low, dtype=float).reshape(-1).tolist(),
        "action_high": np.asarray(action_high, dtype=float).reshape(-1).tolist(),
        "maze": maze.to_config() if maze is not None else None,
        "condition_on_goal": maze is not None,
        "defaults": dict(defaults),
        "value": {"checkpoint": "value", "normalizer": value_normalizer.to_config()} if value_normalizer else None,
        "inverse_dynamics": "inverse_dynamics" if inverse_dynamics else None,
        "data": data,
    }


def side_files_of(directory: str | Path, prefix: str) -> dict[str, bytes]:
    """Every file of a (compact) checkpoint directory as side files under ``prefix/``, so a
    planner checkpoint carries its value or inverse-dynamics network inside it."""
    directory = Path(directory)
    return {f"{prefix}/{p.name}": p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
