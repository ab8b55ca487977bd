"""The planner's settings: small frozen objects that check themselves, grouped by what they control.

``DiffusionPlanner(..., **options)`` and ``DiffusionPlanner.load(..., **options)`` take flat
keywords (and a checkpoint's ``modality_config["defaults"]`` stores the same names);
:meth:`PlannerSettings.resolve` sorts them into

- :class:`SamplingSettings`: how a plan is drawn (``sampler``, ``steps``, Diffuser's value
  guidance ``value_guidance``, ``guidance_steps``, ``guidance_stop_below``);
- :class:`CandidateSettings`: how many plans are drawn and how the best is chosen
  (``num_candidates``, ``candidate_score``, ``consistency_levels``);
- :class:`ReplanSettings`: when a fresh plan is made and how it starts (``replan_every``,
  ``warm_start_strength``, ``warm_start_steps``, ``replan_distance``, ``stall_steps``,
  ``stall_distance``);
- :class:`ActingSettings`: how an action is read off the plan (``action_source``,
  ``path_lookahead``, ``loop_radius``);
- :class:`MapSettings`: whether the planner may read the maze's walls (``known_map``) and the
  options that need it (``shortcut_margin``; ``candidate_score="free_space"``).

Each object checks its own values when made; what depends on the checkpoint (its training
timesteps, the plan's span, a maze, a value or inverse-dynamics network) is checked against a
:class:`PlannerCheckpoint` by :meth:`PlannerSettings.resolve`, which also fills the defaults
that depend on other settings (``candidate_score=None``, ``shortcut_margin="auto"``,
``warm_start_steps=None``). A planner's settings never change after it is built.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional

import diffkit
from diffkit.runs import resolve_steps

__all__ = ["DEFAULTS", "ACTION_SOURCES", "CANDIDATE_SCORES", "KNOWN_MAP_SHORTCUT_MARGIN", "PlannerCheckpoint",
           "SamplingSettings", "CandidateSettings", "ReplanSettings", "ActingSettings", "MapSettings",
           "PlannerSettings"]

ACTION_SOURCES = ("path", "tracking", "plan", "inverse_dynamics")
CANDIDATE_SCORES = ("value", "consistency", "arrival", "free_space")
# What known_map=True turns on: the half-width of the band that must be free of walls for a shortcut.
KNOWN_MAP_SHORTCUT_MARGIN = 0.15

# Used when neither the caller nor the checkpoint says.
DEFAULTS: dict[str, Any] = {
    "sampler": "ddim",
    "steps": 10,
    "replan_every": None,
    "warm_start_strength": 0.5,
    "warm_start_steps": None,  # None: steps x warm_start_strength (the same step density as a cold plan)
    "action_source": "plan",
    "num_candidates": 1,
    "value_guidance": 0.0,
    "guidance_steps": 2,
    "guidance_stop_below": 2.0,
    "replan_distance": None,
    "path_lookahead": 1.0,
    "loop_radius": None,  # "path": skip ahead to the last route point within this of the ball (cuts loops)
    "stall_steps": None,  # replan (cold) after this many steps without moving stall_distance, away from the goal
    "stall_distance": 0.1,
    "candidate_score": None,  # None: "value" with a value network, "free_space" with known_map, else "consistency"
    "consistency_levels": 4,  # "consistency": noise levels the candidates' denoising error is averaged over
    "known_map": False,  # the opt-in that lets the planner read the maze's walls (MazeGrid) while it acts
    "shortcut_margin": "auto",  # known_map + "path": 0.15 ("auto"); None: no shortcuts. The ball's radius is 0.1
}
# The options that read the maze's walls (besides candidate_score="free_space").
MAP_OPTIONS = ("shortcut_margin",)


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen dataclass's own fields while it is made


def _optional(value: Any, kind: type) -> Any:
    return None if value is None else kind(value)


@dataclass(frozen=True)
class PlannerCheckpoint:
    """What the settings are checked against: facts of the checkpoint, not choices."""

    num_timesteps: int  # the diffusion's training timesteps
    span: int  # environment steps one plan covers
    observation_dim: int
    maze: bool = False  # a PointMaze checkpoint (its walls recorded)
    value_net: bool = False
    inverse_dynamics: bool = False
    condition_on_goal: bool = False


@dataclass(frozen=True)
class SamplingSettings:
    """How a plan is drawn: the core sampler and its solver steps, and Diffuser's value guidance
    (``value_guidance`` > 0: ``guidance_steps`` gradient steps on the value before each denoising
    step, stopped below noise level ``guidance_stop_below``)."""

    sampler: str = DEFAULTS["sampler"]
    steps: int = DEFAULTS["steps"]
    value_guidance: float = DEFAULTS["value_guidance"]
    guidance_steps: int = DEFAULTS["guidance_steps"]
    guidance_stop_below: float = DEFAULTS["guidance_stop_below"]

    def __post_init__(self) -> None:
        _set(self, "sampler", str(self.sampler))
        if self.sampler not in diffkit.SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(diffkit.SAMPLERS)}")
        _set(self, "steps", resolve_steps(self.steps, DEFAULTS["steps"]))
        _set(self, "value_guidance", float(self.value_guidance))
        _set(self, "guidance_steps", int(self.guidance_steps))
        _set(self, "guidance_stop_below", float(self.guidance_stop_below))

    def check(self, checkpoint: PlannerCheckpoint) -> None:
        if not 1 <= self.steps <= checkpoint.num_timesteps:
            raise ValueError(f"steps must lie in [1, {checkpoint.num_timesteps}] (the model's training timesteps), "
                             f"got {self.steps}")
        if self.value_guidance > 0 and not checkpoint.value_net:
            raise ValueError("value guidance needs a checkpoint with a value network (recipes/planner_train.py --value)")


@dataclass(frozen=True)
class CandidateSettings:
    """How many plans are drawn at once and how the best is kept: ``candidate_score`` "value"
    (the value network), "consistency" (the model's own denoising error, averaged over
    ``consistency_levels`` noise levels), "arrival" (the plan's own return under the sparse
    reward) or "free_space" (the share of the route in free cells; needs ``known_map``)."""

    num_candidates: int = DEFAULTS["num_candidates"]
    candidate_score: str = "consistency"
    consistency_levels: int = DEFAULTS["consistency_levels"]

    def __post_init__(self) -> None:
        _set(self, "num_candidates", int(self.num_candidates))
        if self.num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {self.num_candidates}")
        if self.candidate_score not in CANDIDATE_SCORES:
            raise ValueError(f"unknown candidate_score {self.candidate_score!r}; choose one of "
                             f"{', '.join(CANDIDATE_SCORES)}")
        _set(self, "consistency_levels", int(self.consistency_levels))
        if self.consistency_levels < 1:
            raise ValueError(f"consistency_levels must be >= 1, got {self.consistency_levels}")

    def check(self, checkpoint: PlannerCheckpoint) -> None:
        if self.num_candidates > 1 and self.candidate_score == "value" and not checkpoint.value_net:
            raise ValueError("ranking candidates by value needs a checkpoint with a value network "
                             "(recipes/planner_train.py --value); in a maze, candidate_score='free_space' needs none")
        if self.candidate_score == "free_space" and not checkpoint.maze:
            raise ValueError("candidate_score='free_space' ranks routes by the maze's free cells and needs a PointMaze "
                             "checkpoint")
        if self.candidate_score == "arrival" and not checkpoint.condition_on_goal:
            raise ValueError("candidate_score='arrival' ranks plans by when they reach the goal and needs a "
                             "goal-conditioned planner")


@dataclass(frozen=True)
class ReplanSettings:
    """When a fresh plan is made, and how it starts.

    ``replan_every`` (None: once per goal) plans every k steps, warm-started from the previous
    plan noised to ``warm_start_strength`` of the chain (None: cold) and denoised in
    ``warm_start_steps`` solver steps; ``replan_distance`` replans (cold) when the ball is
    further than this from every point of the plan still ahead; ``stall_steps`` replans (cold)
    when it has not moved ``stall_distance`` in that many steps."""

    replan_every: Optional[int] = DEFAULTS["replan_every"]
    warm_start_strength: Optional[float] = DEFAULTS["warm_start_strength"]
    warm_start_steps: Optional[int] = None
    replan_distance: Optional[float] = DEFAULTS["replan_distance"]
    stall_steps: Optional[int] = DEFAULTS["stall_steps"]
    stall_distance: float = DEFAULTS["stall_distance"]

    def __post_init__(self) -> None:
        raw = {f.name: getattr(self, f.name) for f in fields(self)}
        _set(self, "replan_every", _optional(self.replan_every, int))
        _set(self, "warm_start_strength", _optional(self.warm_start_strength, float))
        if self.warm_start_strength is not None and not 0 < self.warm_start_strength <= 1:
            raise ValueError(f"warm_start_strength must lie in (0, 1] or be None (no warm start), "
                             f"got {raw['warm_start_strength']}")
        _set(self, "warm_start_steps", _optional(self.warm_start_steps, int))
        if self.warm_start_steps is not None and self.warm_start_steps < 1:
            raise ValueError(f"warm_start_steps must be >= 1, got {raw['warm_start_steps']}")
        _set(self, "replan_distance", _optional(self.replan_distance, float))
        if self.replan_distance is not None and not self.replan_distance > 0:
            raise ValueError(f"replan_distance must be > 0 (a distance in the first two observation values) or "
                             f"None, got {raw['replan_distance']}")
        _set(self, "stall_steps", _optional(self.stall_steps, int))
        if self.stall_steps is not None and self.stall_steps < 1:
            raise ValueError(f"stall_steps must be >= 1 or None (never), got {raw['stall_steps']}")
        _set(self, "stall_distance", float(self.stall_distance))
        if not self.stall_distance > 0:
            raise ValueError(f"stall_distance must be > 0, got {raw['stall_distance']}")

    def check(self, checkpoint: PlannerCheckpoint) -> None:
        if self.replan_every is not None and not 1 <= self.replan_every <= checkpoint.span - 1:
            raise ValueError(f"replan_every must lie in [1, {checkpoint.span - 1}] (a plan covers {checkpoint.span} "
                             f"steps) or be None (plan once per goal), got {self.replan_every}")
        if self.warm_start_steps is not None and not self.warm_start_steps <= checkpoint.num_timesteps:
            raise ValueError(f"warm_start_steps must lie in [1, {checkpoint.num_timesteps}], got {self.warm_start_steps}")
        if self.stall_steps is not None and checkpoint.observation_dim < 2:
            raise ValueError("stall detection compares positions (the first two observation values)")


@dataclass(frozen=True)
class ActingSettings:
    """How an action is read off the plan: ``action_source`` "path" (follow the route at the
    controller's pace, aiming ``path_lookahead`` ahead; ``loop_radius`` skips loops), "tracking"
    (Diffuser's controller on the plan's schedule), "plan" (the plan's own action) or
    "inverse_dynamics" (a trained inverse-dynamics model)."""

    action_source: str = DEFAULTS["action_source"]
    path_lookahead: float = DEFAULTS["path_lookahead"]
    loop_radius: Optional[float] = DEFAULTS["loop_radius"]

    def __post_init__(self) -> None:
        raw = {f.name: getattr(self, f.name) for f in fields(self)}
        _set(self, "action_source", str(self.action_source))
        if self.action_source not in ACTION_SOURCES:
            raise ValueError(f"unknown action_source {self.action_source!r}; choose one of {', '.join(ACTION_SOURCES)}")
        _set(self, "path_lookahead", float(self.path_lookahead))
        if not self.path_lookahead > 0:
            raise ValueError(f"path_lookahead must be > 0 (a distance along the plan's route), got "
                             f"{raw['path_lookahead']}")
        _set(self, "loop_radius", _optional(self.loop_radius, float))
        if self.loop_radius is not None and not self.loop_radius > 0:
            raise ValueError(f"loop_radius must be > 0 (a distance to the plan's route) or None, got {raw['loop_radius']}")

    def check(self, checkpoint: PlannerCheckpoint) -> None:
        if self.action_source in ("tracking", "path") and (not checkpoint.maze or checkpoint.observation_dim != 4):
            raise ValueError(f"action_source={self.action_source!r} follows (x, y, vx, vy) waypoints and needs a "
                             "PointMaze checkpoint; use 'plan' or 'inverse_dynamics'")
        if self.action_source == "inverse_dynamics" and not checkpoint.inverse_dynamics:
            raise ValueError("action_source='inverse_dynamics' needs a checkpoint trained with an inverse-dynamics "
                             "model (recipes/planner_train.py --inverse-dynamics)")


@dataclass(frozen=True)
class MapSettings:
    """Whether the planner may read the maze's walls. False (the default): nothing but
    observations and the goal. True: shortcuts to the furthest route point in straight sight
    (a band of ``shortcut_margin`` either side free of walls; None: no shortcuts), ranking by
    free space, replanning by distance only when no point of the plan is in sight."""

    known_map: bool = False
    shortcut_margin: Optional[float] = None

    def __post_init__(self) -> None:
        raw = self.shortcut_margin
        _set(self, "known_map", bool(self.known_map))
        _set(self, "shortcut_margin", _optional(self.shortcut_margin, float))
        if self.shortcut_margin is not None and not self.shortcut_margin >= 0:
            raise ValueError(f"shortcut_margin must be >= 0 (half the width of the band that must be free of walls) "
                             f"or None (no shortcuts), got {raw}")
        if self.shortcut_margin is not None and not self.known_map:
            raise ValueError(_needs_map(["shortcut_margin"]))

    def check(self, checkpoint: PlannerCheckpoint) -> None:
        if self.known_map and not checkpoint.maze:
            raise ValueError("known_map=True reads a maze's walls and needs a PointMaze checkpoint")


def _needs_map(asked: list[str]) -> str:
    return (f"{', '.join(asked)} read(s) the maze's walls; pass known_map=True to let the planner use the map "
            "(by default it plans from observations and the goal only)")


@dataclass(frozen=True)
class PlannerSettings:
    """All of a planner's settings, one group per concern; checks what spans groups when made."""

    sampling: SamplingSettings = SamplingSettings()
    candidates: CandidateSettings = CandidateSettings()
    replanning: ReplanSettings = ReplanSettings()
    acting: ActingSettings = ActingSettings()
    map: MapSettings = MapSettings()

    def __post_init__(self) -> None:
        if self.candidates.candidate_score == "free_space" and not self.map.known_map:
            raise ValueError(_needs_map(["candidate_score='free_space'"]))

    def check(self, checkpoint: PlannerCheckpoint) -> None:
        """Raise a ValueError when a setting does not fit ``checkpoint``."""
        self.map.check(checkpoint)
        self.sampling.check(checkpoint)
        self.replanning.check(checkpoint)
        self.acting.check(checkpoint)
        self.candidates.check(checkpoint)

    def flat(self) -> dict[str, Any]:
        """The settings as the flat keywords the planner takes (resolved: no None/"auto" left to fill)."""
        return {f.name: getattr(group, f.name) for group in (self.sampling, self.candidates, self.replanning,
                                                             self.acting, self.map) for f in fields(group)}

    @classmethod
    def resolve(cls, checkpoint: PlannerCheckpoint, stored: Optional[Mapping[str, Any]] = None,
                options: Optional[Mapping[str, Any]] = None) -> "PlannerSettings":
        """The settings from a checkpoint's recorded defaults ``stored`` and the caller's ``options``
        (which win), over :data:`DEFAULTS`, checked against ``checkpoint``.

        Unknown options are a TypeError (unknown names in ``stored`` are ignored: older
        checkpoints may record options since removed). Unless ``known_map`` is True, the map
        settings a checkpoint recorded are ignored, and asking for them is a ValueError."""
        options = dict(options or {})
        stored = dict(stored or {})
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise TypeError(f"unknown planner option(s) {', '.join(unknown)}; valid: {', '.join(DEFAULTS)}")
        known_map = bool(options.get("known_map", stored.get("known_map", DEFAULTS["known_map"])))
        if known_map and not checkpoint.maze:
            raise ValueError("known_map=True reads a maze's walls and needs a PointMaze checkpoint")
        if not known_map:
            # A checkpoint's map settings apply only when the map is known.
            stored.pop("shortcut_margin", None)
            if stored.get("candidate_score") == "free_space":
                stored.pop("candidate_score")
            asked = [k for k in MAP_OPTIONS if options.get(k) not in (None, "auto")]
            if options.get("candidate_score") == "free_space":
                asked.append("candidate_score='free_space'")
            if asked:
                raise ValueError(_needs_map(asked))
        s = {**DEFAULTS, **stored, **options}
        sampling = SamplingSettings(s["sampler"], s["steps"], s["value_guidance"], s["guidance_steps"],
                                    s["guidance_stop_below"])
        strength = _optional(s["warm_start_strength"], float)
        warm_steps = s["warm_start_steps"]
        if warm_steps is None and strength is not None and 0 < strength <= 1:
            # The same step density as a cold plan: the warm plan only redoes that share of the chain.
            warm_steps = max(1, round(sampling.steps * strength))
        replanning = ReplanSettings(s["replan_every"], s["warm_start_strength"], warm_steps, s["replan_distance"],
                                    s["stall_steps"], s["stall_distance"])
        acting = ActingSettings(s["action_source"], s["path_lookahead"], s["loop_radius"])
        margin = s["shortcut_margin"]
        if margin == "auto":
            margin = KNOWN_MAP_SHORTCUT_MARGIN if known_map and acting.action_source == "path" else None
        map_settings = MapSettings(known_map, margin)
        score = s["candidate_score"]
        if score is None:
            score = "value" if checkpoint.value_net or not checkpoint.maze else (
                "free_space" if known_map else "consistency")
        candidates = CandidateSettings(s["num_candidates"], score, s["consistency_levels"])
        settings = cls(sampling, candidates, replanning, acting, map_settings)
        settings.check(checkpoint)
        return settings
