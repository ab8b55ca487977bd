"""DiffusionPlanner: plan trajectories with a diffusion model and act on them (Diffuser).

    import gymnasium as gym, gymnasium_robotics
    from modalities.planning import DiffusionPlanner
    gym.register_envs(gymnasium_robotics)
    env = gym.make("PointMaze_Medium-v3", continuing_task=True)
    planner = DiffusionPlanner.load("PointMaze_Medium-v3")   # shipped checkpoint, or a path
    obs, info = env.reset(seed=0); planner.reset()
    while True:
        action = planner.act(obs)                            # planner(obs) too
        obs, reward, terminated, truncated, info = env.step(action)
        if terminated or truncated: break

A plan is a (transition_dim, H) trajectory of [action, observation] rows, sampled by the core
with the current observation (and, in mazes, the goal at step H - 1) written in clean at every
step (``KnownValues(clean=True)``, matching ``known_mask`` at training). A model trained on
every k-th step (the checkpoint's ``every``, the maze presets' waypoint subsampling) plans H
waypoints k steps apart; the planner interpolates them linearly back to every step, so a plan
covers ``span = (H - 1) k + 1`` environment steps and everything below counts in those steps.
How it is used:

- ``replan_every=None`` (mazes, as Diffuser): plan once per goal and track the plan open-loop
  with a = (wp[k+1][:2] - s[:2]) + (wp[k+1][2:] - s[2:]) (``action_source="tracking"``).
- ``replan_every=k``: a fresh plan every k steps, warm-started from the previous one shifted
  by k steps: it is noised to ``warm_start_strength`` of the chain and denoised from there in
  ``warm_start_steps`` solver steps respaced inside it (default: ``steps`` x strength, the
  same step density as a cold plan at a fraction of its cost).
- ``action_source``: "path" (mazes; the default of the shipped maze planners), "tracking"
  (mazes, Diffuser's controller), "plan" (the plan's own action at the current step) or
  "inverse_dynamics" (Decision Diffuser: a = f(s_k, s_k+1) with a trained MLP). "path" follows
  the plan's route at the controller's own pace instead of the plan's schedule: the target is
  the point ``path_lookahead`` further along the route than the nearest point ahead, and the
  action the maze expert's a = clip(10 (target - position) - velocity, -1, 1). A plan's
  schedule is the data's pace, so Diffuser's tracking arrives when the plan does (the
  horizon's end); following the route arrives as soon as the ball can. The route ends where
  it first comes within the goal's radius (the rest of a plan that must fill its horizon is
  loitering), and with ``loop_radius`` set the ball skips ahead to the last route point that
  close to it, so a route that runs off and comes back past the ball (a loop) is not retraced.
- ``num_candidates`` > 1: sample that many plans in one batch and keep the best
  (``Diffusion.sample_candidates``), ranked by ``candidate_score``: "value" (the value
  network), "consistency" (the model's own denoising error on the plan: noised to a few levels
  with the same noise for every candidate and denoised in one call, plans like the data's come
  back closest; plans through walls, which the data never show, are pulled away), or
  "arrival" (the plan's own return under the sparse reward); ``value_guidance`` > 0:
  Diffuser's guidance, a few gradient steps on the value before each denoising step
  (``GradientSteps``).
- ``stall_steps``: a fresh plan (cold) when the ball has not moved ``stall_distance`` in that
  many steps (or, following a route, not moved on along it in twice that) away from the goal:
  stuck against a wall a plan runs through.
- ``replan_distance``: a fresh plan (cold) when the ball is further than this from every point
  of the plan still ahead.

All of these read nothing but observations, the goal and the plans. ``known_map=True`` is the
opt-in that lets the planner read the maze's walls (``MazeGrid``) while it acts: shortcuts to
the furthest route point in straight sight (a band of ``shortcut_margin``, 0.15, either side
free of wall cells), candidates ranked by the share of their route in free cells
(``candidate_score="free_space"``, ties to the earliest arrival), and replanning by distance
only when no point of the plan is in sight. A checkpoint's recorded map settings wait for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

import diffkit
from diffkit.checkpoint import CheckpointError, load_network
from diffkit.guidance import ClipX0, GradientSteps, KnownValues
from diffkit.starts import WarmStart
from diffkit.runs import seeded_generator
from diffkit.utils import module_device

from .data import Normalizer, flatten_observation
from .maze import GOAL_RADIUS, MazeGrid, make_env, pd_action
from .model import InverseDynamics, TemporalUNet, ValueNet
from .settings import (ACTION_SOURCES, CANDIDATE_SCORES, DEFAULTS, KNOWN_MAP_SHORTCUT_MARGIN,  # noqa: F401
                       MAP_OPTIONS, PlannerCheckpoint, PlannerSettings)

__all__ = ["CHECKPOINTS_DIR", "DiffusionPlanner", "Plan", "PlannerWrapper", "evaluate"]

CHECKPOINTS_DIR = Path(__file__).parent / "checkpoints"
MODALITY = "planning"
# Network classes a checkpoint may name: a checkpoint never chooses what code runs.
NETWORKS = {"modalities.planning.model.TemporalUNet": TemporalUNet}
VALUE_NETWORKS = {"modalities.planning.model.ValueNet": ValueNet}
INVERSE_DYNAMICS_NETWORKS = {"modalities.planning.model.InverseDynamics": InverseDynamics}

@dataclass
class Plan:
    """A planned trajectory, unnormalised, one row per environment step: ``states`` (L,
    observation_dim), ``actions`` (L, action_dim), ``values`` (the value network's estimate, or
    None) and the ``goal`` it was made for; L is the planner's ``span`` (its horizon when the
    model plans every step). ``waypoints`` (H, observation_dim) are the states the model drew
    (every ``every``-th row of ``states``). For a batch of observations every field has a
    leading batch dimension."""

    states: np.ndarray
    actions: np.ndarray
    values: Optional[np.ndarray] = None
    goal: Optional[np.ndarray] = None
    waypoints: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return self.states.shape[-2]


class DiffusionPlanner:
    """Acts in a Gymnasium environment by planning with a trajectory diffusion model.

    Build it with :meth:`load` (a shipped checkpoint by environment id, or a checkpoint
    directory). Keyword arguments override the checkpoint's sampling defaults: ``sampler``,
    ``steps``, ``replan_every``, ``replan_distance`` (also replan, cold, when the position lies
    further than this from every point of the plan still ahead; None: never),
    ``warm_start_strength`` (None: no warm start), ``warm_start_steps``, ``action_source``,
    ``path_lookahead`` and ``loop_radius`` (for "path"), ``stall_steps``, ``stall_distance``,
    ``candidate_score``, ``consistency_levels``, ``num_candidates``,
    ``value_guidance`` (scale; 0 = off), ``guidance_steps``, ``guidance_stop_below``;
    ``known_map`` (False: read nothing but observations and the goal; True: also the maze's
    walls, with ``shortcut_margin``); ``seed`` fixes the sampling noise.

    The options are checked and grouped into :class:`~modalities.planning.settings.PlannerSettings`
    (``planner.settings``: sampling, candidates, replanning, acting, map), fixed once the
    planner is built; each option is also readable by its name (``planner.steps``).
    """

    def __init__(self, net: torch.nn.Module, diffusion: diffkit.Diffusion, config: Mapping[str, Any], *,
                 value_net: Optional[torch.nn.Module] = None, inverse_dynamics: Optional[torch.nn.Module] = None,
                 seed: Optional[int] = 0, **overrides: Any):
        self.net, self.diffusion = net, diffusion
        self.config = dict(config)
        try:
            self.observation_dim = int(config["observation_dim"])
            self.action_dim = int(config["action_dim"])
            self.horizon = int(config["horizon"])
            self.every = int(config.get("every", 1))
            self.normalizer = Normalizer.from_config(config["normalizer"])
        except KeyError as err:
            raise CheckpointError(f"the planning config lacks {err}; it needs observation_dim, action_dim, horizon "
                                  "and normalizer (write checkpoints with recipes/planner_train.py)") from None
        if self.every < 1 or self.horizon < 2:
            raise CheckpointError(f"the planning config needs horizon >= 2 and every >= 1, got horizon "
                                  f"{self.horizon} and every {self.every}")
        self.span = (self.horizon - 1) * self.every + 1  # environment steps one plan covers
        if self.normalizer.dim != self.transition_dim:
            raise CheckpointError(f"the normaliser covers {self.normalizer.dim} dims, the transitions "
                                  f"{self.transition_dim} (actions {self.action_dim} + observations {self.observation_dim})")
        self.env_id: Optional[str] = config.get("env_id")
        self.maze = MazeGrid.from_config(config["maze"]) if config.get("maze") else None
        self.condition_on_goal = bool(config.get("condition_on_goal", self.maze is not None))
        self.action_low = np.asarray(config.get("action_low", [-1.0] * self.action_dim), dtype=np.float32)
        self.action_high = np.asarray(config.get("action_high", [1.0] * self.action_dim), dtype=np.float32)
        value_cfg = config.get("value") or {}
        self.value_net, self.inverse_dynamics = value_net, inverse_dynamics
        # Values are learnt normalised; without recorded statistics they are taken as they come.
        self.value_normalizer = (Normalizer.from_config(value_cfg["normalizer"]) if value_cfg.get("normalizer")
                                 else Normalizer([0.0], [1.0], "gaussian"))

        self.settings = PlannerSettings.resolve(
            PlannerCheckpoint(num_timesteps=diffusion.num_timesteps, span=self.span,
                              observation_dim=self.observation_dim, maze=self.maze is not None,
                              value_net=value_net is not None, inverse_dynamics=inverse_dynamics is not None,
                              condition_on_goal=self.condition_on_goal),
            stored=config.get("defaults") or {}, options=overrides)
        multiple = getattr(net, "horizon_multiple", 1)
        if self.horizon % multiple:
            raise CheckpointError(f"horizon {self.horizon} is not a multiple of {multiple}, which the network needs")

        self.device = module_device(net)
        self._seed = seed
        self._generator = seeded_generator(seed)
        self._obs_norm = self.normalizer.subset(slice(self.action_dim, None))
        self._act_norm = self.normalizer.subset(slice(0, self.action_dim))
        self._memory: Optional[dict[str, Any]] = None
        self.plans_made = 0  # how many plans act() has sampled (each replanned row counts once)
        self.stalls_seen = 0  # how many times act() found the ball stuck and planned afresh
        self._score_context: dict[str, Any] = {}
        self.path: Optional[Path] = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, source: str | os.PathLike, *, env: Any = None, device: str | torch.device = "auto",
             seed: Optional[int] = 0, **overrides: Any) -> "DiffusionPlanner":
        """A planner from a shipped checkpoint (``"PointMaze_Medium-v3"``) or a checkpoint directory.

        ``env`` (an environment or its id), when given, must be the one the checkpoint was
        trained for: a planner for another maze would plan through walls.
        """
        path = resolve_checkpoint(source)
        loaded = load_network(path, NETWORKS, modality=MODALITY, device=device)
        if loaded.diffusion is None:
            raise CheckpointError(f"checkpoint {path} has no diffusion config; it is not a planner checkpoint")
        config = loaded.modality_config
        value_net = inverse_dynamics = None
        if (config.get("value") or {}).get("checkpoint"):
            value_net = load_network(path / config["value"]["checkpoint"], VALUE_NETWORKS, modality=MODALITY,
                                     device=device).net
        if config.get("inverse_dynamics"):
            inverse_dynamics = load_network(path / config["inverse_dynamics"], INVERSE_DYNAMICS_NETWORKS,
                                            modality=MODALITY, device=device).net
        planner = cls(loaded.net, loaded.diffusion, config, value_net=value_net, inverse_dynamics=inverse_dynamics,
                      seed=seed, **overrides)
        planner.path = loaded.path
        if env is not None:
            planner.check_env(env)
        return planner

    def check_env(self, env: Any) -> None:
        """Raise a ValueError when ``env`` (an environment or an id) is not the one this planner was trained for."""
        env_id = env if isinstance(env, str) else getattr(getattr(env, "spec", None), "id", None)
        if self.env_id and env_id and env_id.split(":")[-1] != self.env_id:
            raise ValueError(f"this planner was trained for {self.env_id}, not {env_id}; load the checkpoint for "
                             f"{env_id} (DiffusionPlanner.load({env_id!r}) or recipes/planner_train.py --env {env_id})")
        if not isinstance(env, str):
            space = getattr(env, "observation_space", None)
            box = space["observation"] if hasattr(space, "spaces") and "observation" in space.spaces else space
            shape = getattr(box, "shape", None)
            if shape is not None and tuple(shape[-1:]) != (self.observation_dim,):
                raise ValueError(f"the environment's observations have shape {tuple(shape)}, but this planner "
                                 f"expects {self.observation_dim} values")
            if self.maze is not None and getattr(env.unwrapped, "maze", None) is not None:
                if MazeGrid.from_env(env) != self.maze:
                    raise ValueError("the environment's maze differs from the one this planner was trained on")

    @property
    def transition_dim(self) -> int:
        return self.action_dim + self.observation_dim

    # The settings, read-only, under the keyword names the constructor takes.
    sampler = property(lambda self: self.settings.sampling.sampler)
    steps = property(lambda self: self.settings.sampling.steps)
    value_guidance = property(lambda self: self.settings.sampling.value_guidance)
    guidance_steps = property(lambda self: self.settings.sampling.guidance_steps)
    guidance_stop_below = property(lambda self: self.settings.sampling.guidance_stop_below)
    num_candidates = property(lambda self: self.settings.candidates.num_candidates)
    candidate_score = property(lambda self: self.settings.candidates.candidate_score)
    consistency_levels = property(lambda self: self.settings.candidates.consistency_levels)
    replan_every = property(lambda self: self.settings.replanning.replan_every)
    warm_start_strength = property(lambda self: self.settings.replanning.warm_start_strength)
    warm_start_steps = property(lambda self: self.settings.replanning.warm_start_steps)
    replan_distance = property(lambda self: self.settings.replanning.replan_distance)
    stall_steps = property(lambda self: self.settings.replanning.stall_steps)
    stall_distance = property(lambda self: self.settings.replanning.stall_distance)
    action_source = property(lambda self: self.settings.acting.action_source)
    path_lookahead = property(lambda self: self.settings.acting.path_lookahead)
    loop_radius = property(lambda self: self.settings.acting.loop_radius)
    known_map = property(lambda self: self.settings.map.known_map)
    shortcut_margin = property(lambda self: self.settings.map.shortcut_margin)

    # ------------------------------------------------------------------ acting
    def reset(self, mask=None, *, seed: Optional[int] = None) -> None:
        """Forget the current plans (all, or those of the vector-env entries where ``mask`` is True).

        ``seed`` restarts the sampling noise, so the same seed gives the same plans.
        """
        if seed is not None:
            self._generator = seeded_generator(seed)
        if mask is None or self._memory is None:
            self._memory = None
            return
        mask = np.asarray(mask, dtype=bool).reshape(-1)
        if mask.shape != (len(self._memory["step"]),):
            raise ValueError(f"reset mask must have one entry per environment ({len(self._memory['step'])}), "
                             f"got shape {mask.shape}")
        self._memory["has_plan"][mask] = False
        self._memory["anchor"][mask], self._memory["still"][mask] = np.inf, 0
        self._memory["progress_still"][mask] = 0

    def act(self, obs, goal=None) -> np.ndarray:
        """The action for one observation (action_dim,), or for a batch (N, action_dim) from a vector env.

        ``obs`` is the environment's observation: an array, or a goal-env dict whose
        ``desired_goal`` is the goal (or pass ``goal=``). A new plan is made when there is none,
        when the goal changes, every ``replan_every`` steps, and when a plan runs out of
        actions. With a vector env call ``reset(mask=terminated | truncated)`` after each step
        so that a sub-environment that starts over gets a fresh plan.
        """
        states, goals, single = self._parse(obs, goal)
        n = len(states)
        mem = self._memory
        if mem is None or len(mem["step"]) != n:
            mem = self._memory = self._fresh_memory(n)
        stale = ~mem["has_plan"]
        if goals is not None:
            stale |= np.any(mem["goal"] != goals, axis=1)
        if self.replan_every is not None:
            stale |= mem["step"] >= self.replan_every
        strayed = np.zeros(n, dtype=bool)
        if self.replan_distance is not None:
            # Knocked off the plan's path (a wall's corner, a bad plan): plan afresh from here. The
            # path, not the plan's schedule: the tracking controller lags behind a fast plan.
            reached = mem["progress"] if self.action_source == "path" else mem["step"]
            ahead = np.arange(self.span)[None, :] >= np.minimum(reached, self.span - 1)[:, None]
            gaps = np.linalg.norm(mem["states"][:, :, :2] - states[:, None, :2], axis=2)
            off_path = np.where(ahead, gaps, np.inf).min(axis=1) > self.replan_distance
            if self.action_source == "path" and self.shortcut_margin is not None:
                # A shortcut leaves the route on purpose: lost only when no point ahead is in sight.
                for r in np.nonzero(off_path & mem["has_plan"])[0]:
                    route_ahead = mem["states"][r, min(int(reached[r]), self.span - 1):, :2]
                    off_path[r] = not self.maze.clear_lines(states[r, :2], route_ahead).any()
            strayed = mem["has_plan"] & off_path
            stale |= strayed
        if self.stall_steps is not None:
            # Stuck (against a wall the plan runs through): plan afresh from here, cold.
            moved = np.linalg.norm(states[:, :2] - mem["anchor"], axis=1) > self.stall_distance
            mem["anchor"][moved], mem["still"][moved] = states[moved, :2], 0
            stalled = mem["has_plan"] & (mem["still"] >= self.stall_steps)
            if self.action_source == "path":
                # Or rocking on the spot: the route's nearest point has not moved on in twice that.
                advanced = mem["progress"] >= mem["progress_anchor"] + 4
                mem["progress_anchor"][advanced], mem["progress_still"][advanced] = mem["progress"][advanced], 0
                stalled |= mem["has_plan"] & (mem["progress_still"] >= 2 * self.stall_steps)
            if goals is not None:
                stalled &= np.linalg.norm(states[:, :2] - goals, axis=1) >= GOAL_RADIUS
            mem["still"][stalled] = mem["progress_still"][stalled] = 0
            self.stalls_seen += int(stalled.sum())
            strayed = strayed | stalled
            stale |= stalled
        if self.action_source not in ("tracking", "path"):  # those hold at the plan's end
            stale |= mem["step"] >= self.span - 1  # no action left in the plan
        if stale.any():
            self._replan(np.nonzero(stale)[0], states, goals, cold=strayed)
        actions = self._actions(states, np.arange(n))
        mem["step"] += 1
        mem["still"] += 1
        mem["progress_still"] += 1
        return actions[0] if single else actions

    __call__ = act

    def _fresh_memory(self, n: int) -> dict[str, Any]:
        """What ``act`` keeps per environment: the plan being followed and how far along it is."""
        return {
            "has_plan": np.zeros(n, dtype=bool),
            "step": np.zeros(n, dtype=np.int64),  # steps taken since the plan was made
            "progress": np.zeros(n, dtype=np.int64),  # action_source "path": the plan row reached
            "x": torch.zeros(n, self.transition_dim, self.horizon),  # normalised model rows, for warm starts
            "states": np.zeros((n, self.span, self.observation_dim)),  # one row per environment step
            "actions": np.zeros((n, self.span, self.action_dim), np.float32),
            "goal": np.full((n, 2), np.nan),  # the goal the plan was made for
            "anchor": np.full((n, 2), np.inf),  # stall detection: where the ball last moved from
            "still": np.zeros(n, dtype=np.int64),  # steps since it moved stall_distance from there
            "progress_anchor": np.zeros(n, dtype=np.int64),  # "path": the route row last moved on from
            "progress_still": np.zeros(n, dtype=np.int64),  # steps since
        }

    def plan(self, obs, goal=None) -> Plan:
        """A fresh plan from ``obs`` (one observation or a batch), without touching ``act``'s plans."""
        states, goals, single = self._parse(obs, goal)
        x, values = self._sample(states, goals)
        plan = self._to_plan(x, states, goals, values)
        if single:
            return Plan(plan.states[0], plan.actions[0], None if plan.values is None else plan.values[0],
                        None if plan.goal is None else plan.goal[0], plan.waypoints[0])
        return plan

    @property
    def current_plan(self) -> Optional[Plan]:
        """The plans ``act`` is following (batched), for plotting; None before the first action."""
        mem = self._memory
        if mem is None:
            return None
        return Plan(mem["states"].copy(), mem["actions"].copy(), None,
                    None if np.isnan(mem["goal"]).all() else mem["goal"].copy())

    # ------------------------------------------------------------------ internals
    def _parse(self, obs, goal) -> tuple[np.ndarray, Optional[np.ndarray], bool]:
        """Observations (N, obs_dim) and goals (N, 2) as float64 arrays, checked; single-observation flag."""
        observation, obs_goal = flatten_observation(obs)
        goal = obs_goal if goal is None else goal
        observation = np.asarray(observation)
        if observation.dtype == object or not (np.issubdtype(observation.dtype, np.floating)
                                               or np.issubdtype(observation.dtype, np.integer)):
            raise ValueError(f"observations must be numbers, got dtype {observation.dtype}")
        single = observation.ndim == 1
        states = observation.reshape(1, -1) if single else observation
        if states.ndim != 2 or states.shape[1] != self.observation_dim:
            raise ValueError(f"expected an observation of shape ({self.observation_dim},) or a batch "
                             f"(N, {self.observation_dim}), got shape {observation.shape}")
        if not np.isfinite(states).all():
            raise ValueError("the observation contains NaN or Inf")
        states = states.astype(np.float64)
        goals = None
        if self.condition_on_goal:
            if goal is None:
                raise ValueError("this planner plans to a goal: pass the goal-env observation dict (with "
                                 "desired_goal) or goal=(x, y)")
            goals = np.asarray(goal, dtype=np.float64).reshape(-1, 2) if np.size(goal) % 2 == 0 else None
            if goals is None or len(goals) not in (1, len(states)):
                raise ValueError(f"expected a goal of shape (2,) or ({len(states)}, 2), got shape {np.shape(goal)}")
            goals = np.broadcast_to(goals, (len(states), 2)).copy()
            if self.maze is not None:
                for g in goals:
                    if self.known_map:
                        self.maze.check_point(g, "goal")
                    else:
                        self.maze.check_inside(g, "goal")  # the maze's extent, not its walls
        return states, goals, single

    def _known(self, states: np.ndarray, goals: Optional[np.ndarray]) -> KnownValues:
        n, a, h = len(states), self.action_dim, self.horizon
        mask = torch.zeros(n, self.transition_dim, h, dtype=torch.bool)
        known = torch.zeros(n, self.transition_dim, h)
        mask[:, a:, 0] = True
        known[:, a:, 0] = torch.as_tensor(self._obs_norm.normalize(states), dtype=torch.float32)
        if goals is not None:
            # The goal as a state at rest: position = goal, velocity 0 (Diffuser's maze target).
            target = np.zeros((n, self.observation_dim))
            target[:, :2] = goals
            mask[:, a:, -1] = True
            known[:, a:, -1] = torch.as_tensor(self._obs_norm.normalize(target), dtype=torch.float32)
        return KnownValues(mask.to(self.device), known.to(self.device), clean=True)

    def _value(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.value_net(x, t)

    def _sample(self, states: np.ndarray, goals: Optional[np.ndarray], init: Optional[torch.Tensor] = None):
        n, k = len(states), self.num_candidates
        rows = np.repeat(np.arange(n), k)  # candidate j of example b is row b * k + j (sample_candidates)
        known = self._known(states[rows], None if goals is None else goals[rows])
        self._score_context = {"known_mask": known.mask}  # for the candidates' denoising error
        wrappers: list = []
        if self.normalizer.kind == "limits":
            wrappers.append(ClipX0(-1.0, 1.0))  # the data lie in [-1, 1]; so must the model's guesses
        wrappers.append(known)
        if self.value_guidance > 0:
            wrappers.append(GradientSteps(self._value, self.value_guidance, num_steps=self.guidance_steps,
                                          stop_below=self.guidance_stop_below, conditions=[known]))
        kwargs: dict[str, Any] = dict(sampler=self.sampler, steps=self.steps, generator=self._generator,
                                      wrappers=wrappers, device=self.device)
        if init is not None:
            kwargs.update(start=WarmStart(init.to(self.device), self.warm_start_strength), steps=self.warm_start_steps)
        shape = (n, self.transition_dim, self.horizon)
        if k > 1:
            best = self.diffusion.sample_candidates(self.net, shape, k, score_fn=self._score, **kwargs)
            if self.value_net is not None and self.candidate_score != "value":
                with torch.no_grad():
                    return best.top, self._value(best.top, torch.zeros(n, device=best.top.device))
            return best.top, (best.scores[:, 0] if self.candidate_score == "value" else None)
        x = self.diffusion.sample(self.net, shape, **kwargs)
        return x, (self._score(x) if self.candidate_score == "value" and self.value_net is not None else None)

    @torch.no_grad()
    def _score(self, x: torch.Tensor) -> torch.Tensor:
        if self.candidate_score == "consistency":
            return -self._denoising_error(x)
        if self.candidate_score == "arrival":
            rows = self.normalizer.unnormalize(x.transpose(1, 2).float().cpu()).numpy().astype(np.float64)
            route = _interpolate(rows[:, :, self.action_dim: self.action_dim + 2], self.every)
            arrival = np.array([_arrival_row(points, points[-1]) for points in route], dtype=np.float64)
            return torch.as_tensor(-arrival, device=x.device)
        if self.candidate_score == "free_space":
            rows = self.normalizer.unnormalize(x.transpose(1, 2).float().cpu()).numpy().astype(np.float64)
            route = _interpolate(rows[:, :, self.action_dim: self.action_dim + 2], self.every)
            free = self.maze.free_at(route).mean(axis=1)
            # Ties in free share broken by the earliest arrival at the goal: the term stays below
            # 1 / span, one route row's worth of free share, so feasibility always comes first.
            arrival = np.array([_arrival_row(points, points[-1]) for points in route])
            return torch.tensor(free + (1.0 - arrival / self.span) / (self.span + 1), device=x.device)
        return self.value_net(x, torch.zeros(len(x), device=x.device))

    def _denoising_error(self, x: torch.Tensor) -> torch.Tensor:
        """The model's own check of a plan: noise it to a few levels (the same noise for every
        plan) and measure how far the network's denoised guess lands from it (mean squared error
        over the entries not given, averaged over the levels). Plans like the data's come back
        close; plans the data never show (through walls) are pulled away."""
        mask = self._score_context.get("known_mask")
        if mask is None or mask.shape[0] != x.shape[0]:
            mask = None
        T = self.diffusion.num_timesteps
        levels = np.unique(np.round(np.linspace(0.3, 0.6, self.consistency_levels) * (T - 1)))
        generator = torch.Generator().manual_seed(20240)
        total = torch.zeros(len(x), dtype=torch.float64)
        for level in levels:
            noise = torch.randn((1, *x.shape[1:]), generator=generator).expand_as(x).to(x.device, x.dtype)
            # A table step in the schedule's own time units (the step itself; s on the flow path).
            t = self.diffusion.schedule.time_of_step(torch.full((len(x),), float(level), dtype=torch.float64))
            _, terms = self.diffusion.loss(self.net, x, t=t, noise=noise, known_mask=mask, return_terms=True)
            total += terms["mse"].detach().double().cpu()
        return (total / len(levels)).to(x.device)

    def _to_plan(self, x: torch.Tensor, states: np.ndarray, goals, values) -> Plan:
        # float64 like Gymnasium's observations, so the current state is copied in exactly.
        rows = self.normalizer.unnormalize(x.transpose(1, 2).float().cpu()).numpy().astype(np.float64)
        waypoints = rows[:, :, self.action_dim:].copy()
        waypoints[:, 0] = states  # exact, not a normalise/unnormalise round trip
        # Back to one row per environment step: states on straight lines between waypoints (the
        # ball moves ~0.05 a step, so k steps are close to straight), each action held for its k steps.
        plan_states = _interpolate(waypoints, self.every)
        actions = np.repeat(rows[:, :, : self.action_dim], self.every, axis=1)[:, : self.span]
        plan_actions = np.clip(actions, self.action_low, self.action_high).astype(np.float32)
        if values is not None:
            values = self.value_normalizer.unnormalize(values.float().cpu()[:, None]).numpy()[:, 0]
        return Plan(plan_states, plan_actions, values, goals, waypoints)

    def _replan(self, idx: np.ndarray, states: np.ndarray, goals: Optional[np.ndarray],
                cold: Optional[np.ndarray] = None) -> None:
        mem = self._memory
        warm = self.warm_start_strength is not None and self.replan_every is not None
        same_goal = np.ones(len(idx), dtype=bool) if goals is None else np.all(mem["goal"][idx] == goals[idx], axis=1)
        groups = [(idx, None)]
        if warm:
            reuse = mem["has_plan"][idx] & same_goal
            if cold is not None:
                reuse &= ~cold[idx]  # a plan left behind is no start for the next
            groups = [(idx[~reuse], None), (idx[reuse], "warm")]
        for rows, mode in groups:
            if len(rows) == 0:
                continue
            init = None
            if mode == "warm":
                init = torch.stack([_shift(mem["x"][r], round(int(mem["step"][r]) / self.every)) for r in rows])
            x, values = self._sample(states[rows], None if goals is None else goals[rows], init)
            plan = self._to_plan(x, states[rows], None if goals is None else goals[rows], values)
            mem["x"][rows] = x.float().cpu()
            mem["states"][rows], mem["actions"][rows] = plan.states, plan.actions
            mem["step"][rows] = 0
            mem["progress"][rows] = mem["progress_anchor"][rows] = mem["progress_still"][rows] = 0
            mem["has_plan"][rows] = True
            self.plans_made += len(rows)
            if goals is not None:
                mem["goal"][rows] = goals[rows]

    def _actions(self, states: np.ndarray, rows: np.ndarray) -> np.ndarray:
        mem = self._memory
        step = mem["step"][rows]
        if self.action_source == "path":
            return self._follow_path(states, rows)
        if self.action_source == "tracking":
            nxt = np.minimum(step + 1, self.span - 1)
            waypoint = mem["states"][rows, nxt].astype(np.float64)
            waypoint[step + 1 > self.span - 1, 2:] = 0.0  # past the plan's end: hold at its last point
            action = (waypoint[:, :2] - states[:, :2]) + (waypoint[:, 2:] - states[:, 2:])
        elif self.action_source == "plan":
            action = mem["actions"][rows, step]
        else:
            s = torch.as_tensor(self._obs_norm.normalize(states), dtype=torch.float32, device=self.device)
            s_next = torch.as_tensor(self._obs_norm.normalize(mem["states"][rows, step + 1]), dtype=torch.float32,
                                     device=self.device)
            with torch.no_grad():
                a = self.inverse_dynamics(s, s_next).float().cpu().numpy()
            action = self._act_norm.unnormalize(a)
        return np.clip(action, self.action_low, self.action_high).astype(np.float32)

    def _follow_path(self, states: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Action source "path": steer at the route point ``path_lookahead`` beyond the nearest one
        ahead, or at the furthest one in straight sight (``shortcut_margin``); the goal once the
        route has reached its radius."""
        mem = self._memory
        actions = np.empty((len(rows), self.action_dim), dtype=np.float32)
        for k, (r, state) in enumerate(zip(rows, states)):
            route = mem["states"][r, :, :2]
            goal = route[-1] if np.isnan(mem["goal"][r]).any() else mem["goal"][r]
            end = _arrival_row(route, goal)
            start = min(int(mem["progress"][r]), end)
            # The nearest route point among the next 40 rows (env steps; the plan moves at the data's
            # pace, which the ball cannot outrun by that much in one step): progress only moves
            # forward, so a route that passes near itself (a U-turn) is not short-cut.
            window = route[start: min(start + 40, end + 1)]
            nearest = start + int(np.argmin(np.linalg.norm(window - state[:2], axis=1)))
            if self.loop_radius is not None:
                # A route that runs off and comes back past the ball (plans must fill their
                # horizon): skip the loop, to the last route point this close to the ball.
                close = np.nonzero(np.linalg.norm(route[nearest: end + 1] - state[:2], axis=1) < self.loop_radius)[0]
                if len(close):
                    nearest += int(close[-1])
            mem["progress"][r] = nearest
            ahead = np.concatenate([route[nearest: end + 1], goal[None]])
            along = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(ahead, axis=0), axis=1))])
            pick = min(int(np.searchsorted(along, self.path_lookahead)), len(ahead) - 1)
            if self.shortcut_margin is not None:  # known_map
                in_sight = np.nonzero(self.maze.clear_lines(state[:2], ahead[pick:], self.shortcut_margin))[0]
                if len(in_sight):
                    pick += int(in_sight[-1])
            actions[k] = pd_action(ahead[pick], state)
        return np.clip(actions, self.action_low, self.action_high)


def _arrival_row(route: np.ndarray, goal: np.ndarray) -> int:
    """The first row of an (L, 2) route within the environment's goal radius of ``goal`` (else L - 1)."""
    near = np.linalg.norm(route - goal, axis=1) < GOAL_RADIUS
    return int(np.argmax(near)) if near.any() else len(route) - 1


def _interpolate(waypoints: np.ndarray, every: int) -> np.ndarray:
    """(N, H, D) waypoints ``every`` steps apart -> (N, (H - 1) every + 1, D), linear in between."""
    if every == 1:
        return waypoints
    frac = (np.arange(every) / every)[None, None, :, None]  # (1, 1, k, 1)
    start, end = waypoints[:, :-1, None, :], waypoints[:, 1:, None, :]
    between = (start + frac * (end - start)).reshape(len(waypoints), -1, waypoints.shape[-1])
    return np.concatenate([between, waypoints[:, -1:]], axis=1)


def _shift(x: torch.Tensor, k: int) -> torch.Tensor:
    """A (C, H) plan moved k steps ahead, its last step repeated at the end: the warm start's init."""
    if k <= 0:
        return x.clone()
    k = min(k, x.shape[1] - 1)
    return torch.cat([x[:, k:], x[:, -1:].expand(-1, k)], dim=1)


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A checkpoint directory, or the shipped one for an environment id."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    shipped = CHECKPOINTS_DIR / str(source)
    if (shipped / "config.json").is_file():
        return shipped
    available = sorted(p.name for p in CHECKPOINTS_DIR.glob("*") if (p / "config.json").is_file()) \
        if CHECKPOINTS_DIR.is_dir() else []
    raise ValueError(
        f"no planner checkpoint {str(source)!r}: it is neither a checkpoint directory nor a shipped environment "
        f"(shipped: {', '.join(available) or 'none yet'}). Train one with "
        f"`python recipes/planner_train.py --env {source}` and pass its checkpoint directory."
    )


# ------------------------------------------------------------------ Gymnasium forms
try:
    import gymnasium as _gym

    _WrapperBase = _gym.Wrapper
except ImportError:  # gymnasium is an optional dependency (the rl extra)
    _WrapperBase = object  # type: ignore[assignment,misc]


class PlannerWrapper(_WrapperBase):  # type: ignore[misc,valid-type]
    """A Gymnasium wrapper that runs the planner alongside the environment.

    Spaces and ``step`` are unchanged (Gymnasium's conventions); after ``reset`` and every
    ``step`` the planner's next action is in ``info["planner_action"]`` and
    ``wrapper.planner_action``, so a loop reads::

        env = PlannerWrapper(gym.make("PointMaze_UMaze-v3", continuing_task=True), planner)
        obs, info = env.reset(seed=0)
        while True:
            obs, reward, terminated, truncated, info = env.step(info["planner_action"])
            if terminated or truncated: break
    """

    def __init__(self, env, planner: DiffusionPlanner):
        super().__init__(env)
        planner.check_env(env)
        self.planner = planner
        self.planner_action: Optional[np.ndarray] = None

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        self.planner.reset(seed=seed)
        self.planner_action = self.planner.act(obs)
        return obs, {**info, "planner_action": self.planner_action}

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.planner_action = self.planner.act(obs)
        return obs, reward, terminated, truncated, {**info, "planner_action": self.planner_action}


def evaluate(planner, env_id: str, *, episodes: int = 10, seed: int = 0, record: bool = False,
             progress: bool = False, **env_kwargs) -> dict[str, Any]:
    """Run ``episodes`` seeded episodes; returns returns, success, steps per second (and paths with ``record``).

    ``planner`` is any policy with ``act`` and ``reset``. Success means the goal was reached
    at least once (``info["success"]``), or, for environments without that flag, that the
    episode ended by termination rather than time-out.
    """
    import time

    from tqdm.auto import tqdm

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    env = make_env(env_id, **env_kwargs)
    if hasattr(planner, "check_env"):
        planner.check_env(env)
    results: dict[str, Any] = {"env_id": env_id, "episodes": []}
    steps = 0
    start = time.perf_counter()
    for k in tqdm(range(episodes), desc="episodes", disable=not progress, leave=False):
        obs, info = env.reset(seed=seed + k)
        planner.reset()
        total, success, path, plans = 0.0, False, [], []
        while True:
            observation, goal = flatten_observation(obs)
            if record:
                path.append(np.asarray(observation, dtype=np.float64).tolist())
            made = getattr(planner, "plans_made", 0)
            action = planner.act(obs)
            if record and getattr(planner, "plans_made", 0) != made:
                plans.append(planner.current_plan.states[0].tolist())  # the plan made at this step
            obs, reward, terminated, truncated, info = env.step(action)
            steps += 1
            total += float(reward)
            success = success or bool(info.get("success", False))
            if terminated or truncated:
                success = success or (terminated and "success" not in info)
                break
        episode = {"seed": seed + k, "return": total, "success": success}
        if record:
            episode.update(path=path, plans=plans, goal=None if goal is None else np.asarray(goal).tolist())
        results["episodes"].append(episode)
    elapsed = time.perf_counter() - start
    env.close()
    returns = [e["return"] for e in results["episodes"]]
    results.update(mean_return=float(np.mean(returns)), std_return=float(np.std(returns)),
                   success_rate=float(np.mean([e["success"] for e in results["episodes"]])),
                   actions_per_second=steps / max(elapsed, 1e-9), steps=steps)
    return results
