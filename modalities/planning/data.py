"""Offline RL data for the planner: D4RL HDF5 and Minari loaders, a collector, episodes,
per-dimension normalisation and fixed-horizon trajectory windows.

Everything becomes one :class:`Trajectories` stream in D4RL's flat layout (``observations``,
``actions``, ``rewards``, ``terminals``, ``timeouts`` and, for mazes, ``goals``, ``qpos``,
``qvel``), so the rest of the modality has one format to handle:

    traj = load_d4rl_hdf5("maze2d-umaze-v1.hdf5")        # D4RL's files, read with h5py only
    traj = load_minari("D4RL/pointmaze/umaze-v2")          # or a Minari dataset
    traj = collect(env, expert, steps=100_000, path="umaze.hdf5")   # or record one yourself
    episodes = traj.episodes(split_on_goal_change=True)
    norm = Normalizer.fit(np.concatenate([traj.actions, traj.observations], 1))
    windows = TrajectoryWindows(traj, horizon=128, normalizer=norm)   # (6, 128) items

``d4rl`` itself is never imported: it needs mujoco-py and gym<0.24, which do not install here.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from diffkit.utils import replaced_atomically

__all__ = [
    "D4RL_KEYS",
    "Normalizer",
    "TrajectoryWindows",
    "TransitionPairs",
    "Trajectories",
    "collect",
    "collect_minari",
    "d4rl_maze2d_to_pointmaze",
    "flatten_observation",
    "load_d4rl_hdf5",
    "load_dataset",
    "load_minari",
    "save_d4rl_hdf5",
    "split_episodes",
]

# The arrays every D4RL file holds, one row per environment step.
D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
# Optional extras of D4RL's maze2d files: the goal in force at each step and the MuJoCo state.
D4RL_INFO_KEYS = {"goals": "infos/goal", "qpos": "infos/qpos", "qvel": "infos/qvel"}
# D4RL's maze2d ball sits at world (1.2, 1.2) + qpos, its walls at (row + 1, col + 1): qpos + 0.2
# are cell coordinates with cell centres at whole numbers.
D4RL_BALL_OFFSET = 0.2


@dataclass
class Trajectories:
    """One stream of N environment steps in D4RL's layout.

    Row i holds the observation seen, the action taken, the reward received, and whether the
    episode ended there (``terminals``: the task ended, e.g. a fall; ``timeouts``: it was cut
    off). ``goals`` (N, G) is the goal in force at each step (goal-conditioned tasks);
    ``qpos``/``qvel`` the simulator state (optional, for resetting a simulator to a state).
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminals: np.ndarray
    timeouts: np.ndarray
    goals: Optional[np.ndarray] = None
    qpos: Optional[np.ndarray] = None
    qvel: Optional[np.ndarray] = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.observations = _as_2d(self.observations, "observations", np.float32)
        self.actions = _as_2d(self.actions, "actions", np.float32)
        self.rewards = np.asarray(self.rewards, dtype=np.float32).reshape(-1)
        self.terminals = np.asarray(self.terminals).astype(bool).reshape(-1)
        self.timeouts = np.asarray(self.timeouts).astype(bool).reshape(-1)
        n = len(self.observations)
        arrays = {"observations": self.observations, "actions": self.actions, "rewards": self.rewards,
                  "terminals": self.terminals, "timeouts": self.timeouts}
        for name in ("goals", "qpos", "qvel"):
            value = getattr(self, name)
            if value is not None:
                value = _as_2d(value, name, np.float32)
                setattr(self, name, value)
                arrays[name] = value
        lengths = {name: len(value) for name, value in arrays.items()}
        if len(set(lengths.values())) != 1:
            detail = ", ".join(f"{name} {length}" for name, length in lengths.items())
            raise ValueError(f"every array needs one row per step, but the lengths differ: {detail}")
        if n == 0:
            raise ValueError("the trajectories are empty (0 steps)")
        for name, value in arrays.items():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                rows = np.unique(np.nonzero(~np.isfinite(value.reshape(n, -1)))[0])
                raise ValueError(f"{name} holds NaN or Inf at {len(rows)} step(s), first at step {int(rows[0])}; "
                                 "clean the data (or drop those episodes) before training")

    def __len__(self) -> int:
        return len(self.observations)

    @property
    def observation_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def action_dim(self) -> int:
        return self.actions.shape[1]

    def episodes(self, split_on_goal_change: bool = False) -> list[tuple[int, int]]:
        """(start, end) row ranges of the episodes, see :func:`split_episodes`."""
        return split_episodes(self.terminals, self.timeouts,
                              goals=self.goals if split_on_goal_change else None)

    def transitions(self) -> np.ndarray:
        """(N, action_dim + observation_dim): the rows the diffusion model sees, action first (Diffuser)."""
        return np.concatenate([self.actions, self.observations], axis=1)


def _as_2d(value, name: str, dtype) -> np.ndarray:
    array = np.asarray(value, dtype=dtype)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"{name} must be (steps, dim), got shape {array.shape}")
    return array


def split_episodes(terminals, timeouts, goals=None) -> list[tuple[int, int]]:
    """Episode boundaries of a flat stream: (start, end) pairs, end exclusive.

    An episode ends after step i when ``terminals[i]`` or ``timeouts[i]`` is set, and, when
    ``goals`` is given, when the goal changes between step i and i + 1 (a goal reached and
    resampled in a continuing maze task: D4RL's maze2d stream holds no other boundary).
    The stream's last step always closes an episode.
    """
    terminals = np.asarray(terminals, dtype=bool).reshape(-1)
    timeouts = np.asarray(timeouts, dtype=bool).reshape(-1)
    if terminals.shape != timeouts.shape:
        raise ValueError(f"terminals and timeouts must have the same length, got {len(terminals)} and {len(timeouts)}")
    ends = terminals | timeouts
    if goals is not None:
        goals = np.asarray(goals).reshape(len(terminals), -1)
        ends[:-1] |= np.any(goals[1:] != goals[:-1], axis=1)
    ends[-1] = True
    stops = np.nonzero(ends)[0] + 1
    starts = np.concatenate([[0], stops[:-1]])
    return [(int(a), int(b)) for a, b in zip(starts, stops)]


# ----------------------------------------------------------------------------- D4RL HDF5
def load_d4rl_hdf5(path: str | os.PathLike) -> Trajectories:
    """Read a D4RL-layout HDF5 file (D4RL's own downloads, or :func:`save_d4rl_hdf5`'s)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no HDF5 file at {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path} is not a readable HDF5 file: {err}") from err
    with f:
        missing = [key for key in D4RL_KEYS if key not in f]
        if missing:
            raise ValueError(f"{path} lacks the D4RL key(s) {', '.join(missing)}; a D4RL file holds "
                             f"{', '.join(D4RL_KEYS)} (and infos/goal, infos/qpos, infos/qvel for mazes); "
                             f"found {', '.join(sorted(f.keys()))}")
        arrays = {key: f[key][()] for key in D4RL_KEYS}
        extras = {name: f[key][()] for name, key in D4RL_INFO_KEYS.items() if key in f}
        metadata = {key: _plain(value) for key, value in f.attrs.items()}
    return Trajectories(**arrays, **extras, metadata=metadata)


def save_d4rl_hdf5(traj: Trajectories, path: str | os.PathLike) -> Path:
    """Write ``traj`` in D4RL's layout (readable by D4RL's own ``get_dataset`` code too)."""
    import h5py

    path = Path(path)
    with replaced_atomically(path) as staging, h5py.File(staging, "w") as f:
        for key in D4RL_KEYS:
            f.create_dataset(key, data=getattr(traj, key), compression="gzip")
        for name, key in D4RL_INFO_KEYS.items():
            value = getattr(traj, name)
            if value is not None:
                f.create_dataset(key, data=value, compression="gzip")
        for key, value in traj.metadata.items():
            f.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)
    return path


def d4rl_maze2d_to_pointmaze(traj: Trajectories, grid) -> Trajectories:
    """D4RL maze2d data moved into Gymnasium-Robotics PointMaze's frame, for the same maze map.

    D4RL's maze2d (``d4rl/pointmaze/maze_model.py``) puts wall (row, col) at world (row + 1,
    col + 1) and the ball's body at world (1.2, 1.2), so a position ``qpos = (x, y)`` (the
    observation's first two values, and the goals, which D4RL draws as cells plus noise in the
    same frame) lies at the continuous cell coordinates (row, col) = (x + 0.2, y + 0.2), cell
    centres at whole numbers. PointMaze puts the centre of cell (row, col) at
    x' = (col + 0.5) s - W s / 2, y' = H s / 2 - (row + 0.5) s, x' to the right and y' up
    (``grid``: a :class:`~.maze.MazeGrid` of the same map, e.g.
    ``MazeGrid.from_env(make_env("PointMaze_UMaze-v3"))``). So positions map as
    x' = (y + 0.7) s - W s / 2, y' = H s / 2 - (x + 0.7) s, and velocities, forces and qvel
    rotate: (vx', vy') = (vy, -vx). Minari's ``D4RL/pointmaze/*`` datasets are already in
    PointMaze's frame and need no conversion.
    """
    scale = float(grid.scale)

    def position(xy):
        xy = np.asarray(xy, dtype=np.float64)
        out = np.empty_like(xy)
        out[:, 0] = (xy[:, 1] + D4RL_BALL_OFFSET + 0.5) * scale - grid.x_center
        out[:, 1] = grid.y_center - (xy[:, 0] + D4RL_BALL_OFFSET + 0.5) * scale
        return out

    def direction(v):
        v = np.asarray(v, dtype=np.float64)
        return np.stack([v[:, 1], -v[:, 0]], axis=1)

    if traj.observation_dim < 4 or traj.action_dim != 2:
        raise ValueError(f"D4RL maze2d data hold (x, y, vx, vy) observations and 2 forces; got observations of "
                         f"{traj.observation_dim} and actions of {traj.action_dim} values")
    observations = np.array(traj.observations, dtype=np.float64)
    observations[:, :2] = position(observations[:, :2])
    observations[:, 2:4] = direction(observations[:, 2:4])
    converted = {
        "goals": None if traj.goals is None else position(traj.goals[:, :2]),
        "qpos": None if traj.qpos is None else position(traj.qpos[:, :2]),
        "qvel": None if traj.qvel is None else direction(traj.qvel[:, :2]),
    }
    metadata = {**traj.metadata, "frame": "PointMaze (converted from D4RL maze2d's (row, col) frame)"}
    return Trajectories(observations, direction(traj.actions), traj.rewards, traj.terminals, traj.timeouts,
                        metadata=metadata, **converted)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------- Minari
def flatten_observation(obs) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(observation, goal) arrays from a Box observation or a goal-env dict.

    Goal environments (PointMaze, Fetch, ...) give ``{"observation", "achieved_goal",
    "desired_goal"}``; the achieved goal repeats part of the observation, so only the
    observation and the desired goal are kept. Works on one step or on stacked steps.
    """
    if isinstance(obs, Mapping):
        if "observation" not in obs:
            raise ValueError(f"a dict observation needs an 'observation' entry, got keys {sorted(obs)}")
        goal = obs.get("desired_goal")
        return np.asarray(obs["observation"]), None if goal is None else np.asarray(goal)
    return np.asarray(obs), None


def load_minari(dataset) -> Trajectories:
    """A Minari dataset (an id such as ``"D4RL/pointmaze/umaze-v2"``, a dataset directory, or a
    ``MinariDataset``) as one flat stream.

    Minari episodes hold T + 1 observations (the last one follows the last action); the last
    is dropped so that every row pairs an observation with the action taken there. An episode
    that ends with neither termination nor truncation is still an episode: its last step is
    marked as a timeout.
    """
    import minari

    if not isinstance(dataset, minari.MinariDataset):
        ident = str(dataset)
        if Path(ident).is_dir() and (Path(ident) / "data").is_dir():
            dataset = minari.MinariDataset(Path(ident) / "data")
        else:
            try:
                dataset = minari.load_dataset(ident)
            except (FileNotFoundError, ValueError) as err:
                raise ValueError(f"cannot load Minari dataset {ident!r} from "
                                 f"{os.environ.get('MINARI_DATASETS_PATH', '~/.minari/datasets')}: {err}") from err
    parts: dict[str, list] = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts", "goals")}
    for episode in dataset.iterate_episodes():
        observations, goals = flatten_observation(episode.observations)
        steps = len(episode.actions)
        if len(observations) != steps + 1:
            raise ValueError(f"Minari episode {episode.id} has {len(observations)} observations for {steps} "
                             f"actions; expected {steps + 1}")
        timeouts = np.asarray(episode.truncations, dtype=bool).copy()
        terminals = np.asarray(episode.terminations, dtype=bool)
        if not (timeouts[-1] or terminals[-1]):
            timeouts[-1] = True
        parts["observations"].append(observations[:-1])
        parts["actions"].append(np.asarray(episode.actions).reshape(steps, -1))
        parts["rewards"].append(episode.rewards)
        parts["terminals"].append(terminals)
        parts["timeouts"].append(timeouts)
        if goals is not None:
            parts["goals"].append(goals[:-1])
    if not parts["actions"]:
        raise ValueError(f"Minari dataset {dataset.id} holds no episodes")
    arrays = {k: np.concatenate(v) for k, v in parts.items() if v}
    env_spec = dataset.env_spec
    metadata = {"source": f"minari:{dataset.id}", "env_id": env_spec.id if env_spec is not None else None}
    return Trajectories(**arrays, metadata=metadata)


def load_dataset(source: str | os.PathLike) -> Trajectories:
    """``path.hdf5`` (D4RL layout) or ``minari:<dataset id or directory>``."""
    text = str(source)
    if text.startswith("minari:"):
        return load_minari(text[len("minari:"):])
    if text.endswith((".hdf5", ".h5")):
        return load_d4rl_hdf5(text)
    raise ValueError(f"unknown dataset {text!r}: give a D4RL-layout file (path.hdf5) or minari:<dataset id>")


# ----------------------------------------------------------------------------- collection
def _policy_fn(policy) -> Callable:
    act = getattr(policy, "act", None)
    fn = act if callable(act) else policy
    if not callable(fn):
        raise TypeError(f"policy must be callable or have act(obs), got {type(policy).__name__}")
    return fn


def collect(env, policy, *, steps: int, path: str | os.PathLike | None = None, seed: int = 0,
            progress: bool = False) -> Trajectories:
    """Record ``steps`` steps of ``env`` under ``policy`` in D4RL's layout (and write ``path``).

    ``policy`` is a callable ``obs -> action`` or an object with ``act(obs)`` (and optionally
    ``reset()``, called at every episode start). Episodes that end are reset (seeds ``seed``,
    ``seed + 1``, ...) and marked in ``terminals`` / ``timeouts``. For D4RL-style maze data
    make the environment continuing with goals resampled on arrival
    (``continuing_task=True, reset_target=True``) and a long ``max_episode_steps``.
    """
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    act = _policy_fn(policy)
    rows: dict[str, list] = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts",
                                             "goals", "qpos", "qvel")}
    data = getattr(env.unwrapped, "data", None)  # MuJoCo state, recorded as D4RL's infos/qpos, qvel
    episode = 0
    obs, _ = env.reset(seed=seed)
    getattr(policy, "reset", lambda: None)()
    for _ in tqdm(range(steps), desc="collecting", disable=not progress, leave=False):
        observation, goal = flatten_observation(obs)
        if data is not None and hasattr(data, "qpos"):
            rows["qpos"].append(np.array(data.qpos))
            rows["qvel"].append(np.array(data.qvel))
        action = np.asarray(act(obs))
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rows["observations"].append(observation)
        rows["actions"].append(action.reshape(-1))
        rows["rewards"].append(float(reward))
        rows["terminals"].append(bool(terminated))
        rows["timeouts"].append(bool(truncated))
        if goal is not None:
            rows["goals"].append(goal)
        obs = next_obs
        if terminated or truncated:
            episode += 1
            obs, _ = env.reset(seed=seed + episode)
            getattr(policy, "reset", lambda: None)()
    rows["timeouts"][-1] = rows["timeouts"][-1] or not rows["terminals"][-1]  # the recording stops here
    arrays = {k: np.stack(v) for k, v in rows.items() if v}
    spec = getattr(env, "spec", None)
    traj = Trajectories(**arrays, metadata={"env_id": spec.id if spec is not None else "", "seed": seed,
                                            "policy": type(policy).__name__})
    if path is not None:
        save_d4rl_hdf5(traj, path)
    return traj


def collect_minari(env, policy, dataset_id: str, *, episodes: int, seed: int = 0, algorithm_name: str | None = None,
                   **create_kwargs):
    """Record ``episodes`` episodes of ``env`` under ``policy`` as a Minari dataset.

    The dataset is written under ``MINARI_DATASETS_PATH`` (default ``~/.minari/datasets``) by
    Minari's ``create_dataset_from_buffers``; ``create_kwargs`` go to it (``ref_min_score``,
    ``ref_max_score``, ``description``, ...). Minari's ``DataCollector`` wrapper would do the
    recording too, but it needs jax (``minari[create]``); whole-episode buffers do not.
    Returns the ``MinariDataset``.
    """
    import minari
    from minari.data_collector import EpisodeBuffer

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    act = _policy_fn(policy)
    buffers = []
    for k in range(episodes):
        obs, _ = env.reset(seed=seed + k)
        getattr(policy, "reset", lambda: None)()
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        while True:
            action = np.asarray(act(obs), dtype=env.action_space.dtype)
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(float(reward))
            terminations.append(bool(terminated))
            truncations.append(bool(truncated))
            if terminated or truncated:
                break
        buffers.append(EpisodeBuffer(id=k, seed=seed + k, observations=_stack(observations), actions=np.stack(actions),
                                     rewards=rewards, terminations=terminations, truncations=truncations))
    name = algorithm_name or type(policy).__name__
    create_kwargs.setdefault("description", f"{env.spec.id if env.spec else 'environment'} recorded under {name}")
    with warnings.catch_warnings():
        # Minari advises an author, e-mail, code link and evaluation env for published datasets;
        # a local recording has none of them to give.
        warnings.filterwarnings("ignore", category=UserWarning, module="minari.utils")
        return minari.create_dataset_from_buffers(dataset_id, buffers, env=env, algorithm_name=name, **create_kwargs)


def _stack(observations: list):
    """Stack per-step observations; dict observations stay dicts of stacked arrays (Minari's layout)."""
    if isinstance(observations[0], Mapping):
        return {key: np.stack([o[key] for o in observations]) for key in observations[0]}
    return np.stack(observations)


# ----------------------------------------------------------------------------- normalisation
@dataclass
class Normalizer:
    """Per-dimension affine normalisation, x_norm = (x - shift) / scale.

    ``kind="limits"`` maps each dimension's [min, max] to [-1, 1] (Diffuser's choice for the
    mazes); ``"gaussian"`` to zero mean and unit variance. A constant dimension gets scale 1
    rather than a division by zero. Works on NumPy arrays and tensors whose last dim is ``dim``.
    """

    shift: np.ndarray
    scale: np.ndarray
    kind: str = "limits"

    def __post_init__(self) -> None:
        self.shift = np.asarray(self.shift, dtype=np.float32).reshape(-1)
        self.scale = np.asarray(self.scale, dtype=np.float32).reshape(-1)
        if self.shift.shape != self.scale.shape:
            raise ValueError(f"shift {self.shift.shape} and scale {self.scale.shape} must have the same size")
        if not (np.isfinite(self.scale).all() and (self.scale > 0).all() and np.isfinite(self.shift).all()):
            raise ValueError("normaliser statistics must be finite with positive scales")

    @classmethod
    def fit(cls, data, kind: str = "limits") -> "Normalizer":
        data = np.asarray(data, dtype=np.float64)
        if data.ndim != 2 or len(data) == 0:
            raise ValueError(f"fit a normaliser on (N, dim) data, got shape {data.shape}")
        if kind == "limits":
            low, high = data.min(0), data.max(0)
            shift, scale = (high + low) / 2, (high - low) / 2
        elif kind == "gaussian":
            shift, scale = data.mean(0), data.std(0)
        else:
            raise ValueError(f"unknown normaliser kind {kind!r}; choose limits or gaussian")
        scale = np.where(scale > 1e-6, scale, 1.0)
        return cls(shift, scale, kind)

    @property
    def dim(self) -> int:
        return self.shift.size

    def _stats(self, x):
        if x.shape[-1] != self.dim:
            raise ValueError(f"the normaliser was fitted on {self.dim} dimensions, got data of shape "
                             f"{tuple(x.shape)} (last dim {x.shape[-1]})")
        if torch.is_tensor(x):
            return (torch.as_tensor(self.shift, device=x.device, dtype=x.dtype),
                    torch.as_tensor(self.scale, device=x.device, dtype=x.dtype))
        return self.shift, self.scale

    def normalize(self, x):
        shift, scale = self._stats(x)
        return (x - shift) / scale

    def unnormalize(self, x):
        shift, scale = self._stats(x)
        return x * scale + shift

    def subset(self, dims: slice | Sequence[int]) -> "Normalizer":
        """The normaliser of some dimensions (e.g. the observation part of a transition)."""
        return Normalizer(self.shift[dims], self.scale[dims], self.kind)

    def to_config(self) -> dict:
        return {"kind": self.kind, "shift": self.shift.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Normalizer":
        try:
            return cls(config["shift"], config["scale"], config.get("kind", "limits"))
        except KeyError as err:
            raise ValueError(f"normaliser config lacks {err}; it needs kind, shift and scale") from None


# ----------------------------------------------------------------------------- windows
class TrajectoryWindows(torch.utils.data.Dataset):
    """Fixed-horizon windows of normalised transitions, for training the diffusion planner.

    Item i is a dict for :class:`diffkit.Trainer` (the keys besides ``x`` go to
    ``Diffusion.loss``):

    - ``x`` (transition_dim, H): [action, observation] at each of H steps, channels first;
    - ``mask`` (1, H) bool: False on padding past the episode's end (not in the loss);
    - ``known_mask`` (transition_dim, H) bool: the entries given clean to the model, i.e. the
      observation at step 0 and, with ``condition_on_end``, at step H - 1 (Diffuser's maze
      conditioning: start and goal). A padded window has no end condition;

    With ``discount``, :meth:`value` gives the discounted return from a window's first step to
    the end of its episode (the value function's target, Diffuser's ValueDataset); it is kept
    out of the items, which go to the diffusion model as they are.

    With ``pad=True`` windows start at every step of an episode and run past its end (the
    padding repeats the last observation with a zero action); without, only windows that fit
    are used and shorter episodes are skipped.

    ``every=k`` keeps every k-th step: a window's H rows are steps start, start + k, ...,
    start + (H - 1) k, so it spans ``span = (H - 1) k + 1`` environment steps. Diffuser's maze
    horizons (128-384 steps) are long because PointMaze moves the ball only ~0.05 per step; a
    plan of every 4th or 8th state carries the same route at a fraction of the cost, and the
    planner interpolates it back to every step (``DiffusionPlanner``'s tracking). ``stride``
    spaces the windows' starts (every start by default).
    """

    def __init__(self, traj: Trajectories, horizon: int, normalizer: Normalizer, *, pad: bool = False,
                 condition_on_end: bool = True, split_on_goal_change: bool = False,
                 discount: Optional[float] = None, stride: int = 1, every: int = 1):
        if horizon < 2:
            raise ValueError(f"horizon must be >= 2, got {horizon}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if every < 1:
            raise ValueError(f"every must be >= 1 (keep every k-th step), got {every}")
        transitions = traj.transitions()
        if normalizer.dim != transitions.shape[1]:
            raise ValueError(f"the normaliser covers {normalizer.dim} dims but a transition has "
                             f"{transitions.shape[1]} (actions {traj.action_dim} + observations {traj.observation_dim})")
        self.horizon, self.pad, self.condition_on_end = horizon, pad, condition_on_end
        self.every = int(every)
        self.span = (horizon - 1) * self.every + 1  # environment steps a window covers
        self.action_dim, self.observation_dim = traj.action_dim, traj.observation_dim
        self.data = torch.from_numpy(np.ascontiguousarray(normalizer.normalize(transitions), dtype=np.float32))
        self.episodes = traj.episodes(split_on_goal_change=split_on_goal_change)
        # (start, end of its episode) per window, as one array: a million-step stream has a
        # million windows, too many for Python tuples.
        starts, ends = [], []
        for start, end in self.episodes:
            last = end - 1 if pad else end - self.span
            window_starts = np.arange(start, last + 1, stride, dtype=np.int64)
            starts.append(window_starts)
            ends.append(np.full_like(window_starts, end))
        self.index = np.stack([np.concatenate(starts), np.concatenate(ends)], axis=1)
        if not len(self.index):
            longest = max(end - start for start, end in self.episodes)
            raise ValueError(f"no window of horizon {horizon} (every {self.every} step(s): {self.span} steps) fits: "
                             f"the longest episode has {longest} steps; use a shorter horizon or pad=True")
        self.values = None
        if discount is not None:
            self.values = torch.from_numpy(_returns_to_go(traj.rewards, self.episodes, discount))

    @property
    def transition_dim(self) -> int:
        return self.action_dim + self.observation_dim

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start, end = (int(v) for v in self.index[i])
        stop = min(start + self.span, end)
        window = self.data[start:stop:self.every]
        valid = len(window)
        if valid < self.horizon:
            filler = window[-1:].repeat(self.horizon - valid, 1)
            filler[:, : self.action_dim] = 0.0
            window = torch.cat([window, filler])
        mask = torch.zeros(1, self.horizon, dtype=torch.bool)
        mask[0, :valid] = True
        known = torch.zeros(self.transition_dim, self.horizon, dtype=torch.bool)
        known[self.action_dim:, 0] = True
        if self.condition_on_end and valid == self.horizon:
            known[self.action_dim:, -1] = True
        return {"x": window.T.contiguous(), "mask": mask, "known_mask": known}

    def value(self, i: int) -> torch.Tensor:
        """The discounted return of window i (needs ``discount``)."""
        if self.values is None:
            raise ValueError("these windows carry no values: build them with discount=...")
        return self.values[int(self.index[i, 0])]


def _returns_to_go(rewards: np.ndarray, episodes: list[tuple[int, int]], discount: float) -> np.ndarray:
    out = np.zeros(len(rewards), dtype=np.float32)
    for start, end in episodes:
        acc = 0.0
        for i in range(end - 1, start - 1, -1):
            acc = rewards[i] + discount * acc
            out[i] = acc
    return out


class TransitionPairs(torch.utils.data.Dataset):
    """(observation_t, observation_t+1) -> action_t pairs inside episodes, normalised, for the
    inverse-dynamics model (Decision Diffuser)."""

    def __init__(self, traj: Trajectories, normalizer: Normalizer, split_on_goal_change: bool = False):
        transitions = torch.from_numpy(np.ascontiguousarray(normalizer.normalize(traj.transitions()), dtype=np.float32))
        a = traj.action_dim
        rows = [i for start, end in traj.episodes(split_on_goal_change) for i in range(start, end - 1)]
        if not rows:
            raise ValueError("no consecutive steps inside an episode: every episode has a single step")
        rows_t = torch.as_tensor(rows)
        self.obs = transitions[rows_t, a:]
        self.next_obs = transitions[rows_t + 1, a:]
        self.actions = transitions[rows_t, :a]

    def __len__(self) -> int:
        return len(self.actions)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"obs": self.obs[i], "next_obs": self.next_obs[i], "action": self.actions[i]}
