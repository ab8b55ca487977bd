"""Pieces the planning benchmarks share: episode statistics with standard errors, the random and
behaviour-cloning baselines, tiny planners for ``--quick`` runs, and the results' record.

Not a benchmark itself; ``planning_maze.py``, ``planning_value_guidance.py`` and
``planning_speed.py`` import it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import planner_train  # noqa: E402  (the recipe trains the --quick models and the benchmark's own)

from benchmark_stats import mean_se  # noqa: E402,F401  (re-exported for the planning benchmarks)
from diffkit.runs import hardware_summary  # noqa: E402
from modalities.planning.data import Trajectories, flatten_observation  # noqa: E402


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """``evaluate``'s record reduced to the figures a table needs: mean return ± SE, success, actions/s."""
    returns = [e["return"] for e in results["episodes"]]
    mean, se = mean_se(returns)
    successes = [float(e["success"]) for e in results["episodes"]]
    return {"mean_return": mean, "se_return": se, "success_rate": float(np.mean(successes)),
            "se_success": mean_se(successes)[1], "episodes": len(returns),
            "actions_per_second": results.get("actions_per_second"), "returns": returns}


def normalised(stats: dict[str, Any], random_return: float, expert_return: float) -> tuple[float, float]:
    """100 (R - R_random) / (R_expert - R_random) and its standard error (the references taken as exact)."""
    span = expert_return - random_return
    return 100 * (stats["mean_return"] - random_return) / span, 100 * stats["se_return"] / abs(span)


class RandomPolicy:
    """Uniform random actions, seeded (the normalised score's lower reference)."""

    def __init__(self, action_space, seed: int = 0):
        self.space, self.seed = action_space, seed
        self.space.seed(seed)

    def reset(self) -> None:
        pass

    def act(self, obs) -> np.ndarray:
        return self.space.sample()

    __call__ = act


class BehaviourCloning(torch.nn.Module):
    """A goal-conditioned MLP policy a = f(s, g), trained by regression on the planner's data.

    Inputs and outputs are normalised with the data's mean and standard deviation; two hidden
    layers of 256 (the usual BC baseline of D4RL papers).
    """

    def __init__(self, obs_dim: int, goal_dim: int, action_dim: int, hidden: int = 256):
        super().__init__()
        self.goal_dim = goal_dim
        self.net = torch.nn.Sequential(
            torch.nn.Linear(obs_dim + goal_dim, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, action_dim),
        )
        self.register_buffer("in_shift", torch.zeros(obs_dim + goal_dim))
        self.register_buffer("in_scale", torch.ones(obs_dim + goal_dim))
        self.low = self.high = None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net((inputs - self.in_shift) / self.in_scale)

    @classmethod
    def fit(cls, traj: Trajectories, *, steps: int = 5000, batch_size: int = 256, lr: float = 1e-3,
            seed: int = 0, action_low=-1.0, action_high=1.0) -> "BehaviourCloning":
        torch.manual_seed(seed)
        goals = traj.goals if traj.goals is not None else np.zeros((len(traj), 0), np.float32)
        inputs = torch.as_tensor(np.concatenate([traj.observations, goals], axis=1), dtype=torch.float32)
        targets = torch.as_tensor(traj.actions, dtype=torch.float32)
        model = cls(traj.observation_dim, goals.shape[1], traj.action_dim)
        model.in_shift.copy_(inputs.mean(0))
        model.in_scale.copy_(inputs.std(0).clamp_min(1e-6))
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(0, len(inputs), (batch_size,), generator=generator)
            loss = torch.nn.functional.mse_loss(model(inputs[idx]), targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.final_loss = loss.item()
        model.low = np.broadcast_to(np.asarray(action_low, np.float32), (traj.action_dim,))
        model.high = np.broadcast_to(np.asarray(action_high, np.float32), (traj.action_dim,))
        return model.eval()

    def reset(self) -> None:
        pass

    @torch.no_grad()
    def act(self, obs) -> np.ndarray:
        observation, goal = flatten_observation(obs)
        parts = [np.asarray(observation, np.float32).reshape(-1)]
        if self.goal_dim:
            parts.append(np.asarray(goal, np.float32).reshape(-1))
        action = self.forward(torch.as_tensor(np.concatenate(parts))[None])[0].numpy()
        return np.clip(action, self.low, self.high).astype(np.float32)


def quick_planner(env_id: str, out: Path, *, extra: Sequence[str] = (), max_steps: int = 20) -> Path:
    """A tiny planner trained for a few steps by the recipe (for ``--quick``): its run directory."""
    argv = ["--env", env_id, "--horizon", "16", "--dim", "8", "--dim-mults", "1,2", "--diffusion-steps", "16",
            "--batch-size", "8", "--max-steps", str(max_steps), "--save-every", str(max_steps),
            "--eval-episodes", "0", "--no-progress", "--output-dir", str(out), *extra]
    if planner_train.main(argv) != 0:
        raise RuntimeError(f"training the --quick planner failed: {argv}")
    return out


def record(name: str, payload: dict[str, Any], out_dir: Path, markdown: Optional[str] = None) -> Path:
    """Write ``<name>.json`` (and ``<name>.md``) under ``out_dir`` with the hardware and the time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"hardware": hardware_summary(), "torch_threads": torch.get_num_threads(),
               "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **payload}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    if markdown is not None:
        (out_dir / f"{name}.md").write_text(markdown)
    return path
