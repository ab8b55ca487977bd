"""The planning modality of diffkit: Diffuser-style trajectory planning for Gymnasium.

    import gymnasium as gym, gymnasium_robotics
    from modalities.planning import DiffusionPlanner
    gym.register_envs(gymnasium_robotics)
    env = gym.make("PointMaze_Medium-v3", continuing_task=True)
    planner = DiffusionPlanner.load("PointMaze_Medium-v3")   # shipped checkpoint, or a path
    obs, info = env.reset(seed=0); planner.reset()
    action = planner.act(obs)

- :mod:`.data`: D4RL HDF5 and Minari loaders, a collector, episodes, normalisation, windows;
- :mod:`.maze`: PointMaze grids, the BFS waypoint expert, maze plots;
- :mod:`.model`: the temporal U-Net, the value network, the inverse-dynamics MLP;
- :mod:`.planner`: :class:`DiffusionPlanner`, :class:`Plan`, :class:`PlannerWrapper`, ``evaluate``;
- :mod:`.settings`: :class:`PlannerSettings`, the planner's settings grouped by what they control;
- :mod:`.modality`: :class:`PlanningModality` (``diffkit generate planning``, ``diffkit rollout planning``);
- ``recipes/planner_train.py`` trains planners.

Names are imported on first use, so ``modalities.planning.maze`` or ``.data`` work without
loading the networks (and the registry can list the modality cheaply).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DiffusionPlanner": "planner",
    "Plan": "planner",
    "PlannerWrapper": "planner",
    "evaluate": "planner",
    "PlannerSettings": "settings",
    "PlanningModality": "modality",
    "PlanSamples": "modality",
    "TemporalUNet": "model",
    "ValueNet": "model",
    "InverseDynamics": "model",
    "Trajectories": "data",
    "Normalizer": "data",
    "TrajectoryWindows": "data",
    "TransitionPairs": "data",
    "collect": "data",
    "collect_minari": "data",
    "d4rl_maze2d_to_pointmaze": "data",
    "load_d4rl_hdf5": "data",
    "load_minari": "data",
    "load_dataset": "data",
    "save_d4rl_hdf5": "data",
    "split_episodes": "data",
    "MazeGrid": "maze",
    "WaypointExpert": "maze",
    "make_env": "maze",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'modalities.planning' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
