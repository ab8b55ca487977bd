"""The planning modality object: sample plans, save and plot them, act as a policy, and the
``diffkit rollout planning`` command.

    diffkit generate planning --checkpoint PointMaze_UMaze-v3 --num-samples 8 --out plans.png
    diffkit rollout planning --env PointMaze_Medium-v3 --episodes 10 --out rollouts/
    diffkit rollout planning --env PointMaze_Medium-v3 --expert --out rollouts/expert   # reference
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .maze import MazeGrid, WaypointExpert, is_maze_env, make_env, plot_maze

__all__ = ["PlanSamples", "PlanningModality", "plot_episode", "plot_plans"]


@dataclass
class PlanSamples:
    """Plans drawn by :meth:`PlanningModality.generate`: a batched :class:`Plan`, the start
    observations they were drawn from and the maze (None outside mazes)."""

    plans: Any
    starts: np.ndarray
    maze: Optional[MazeGrid] = None
    env_id: Optional[str] = None

    def __len__(self) -> int:
        return len(self.starts)


def _figure():
    """A figure and axis drawn off-screen; pyplot is not used, so a user's backend is left alone."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5))
    return fig, fig.subplots()


def plot_plans(samples: PlanSamples, path: str | os.PathLike) -> Path:
    """One PNG: the maze walls and every plan (start dot, goal star)."""
    from matplotlib import colormaps

    fig, ax = _figure()
    if samples.maze is not None:
        plot_maze(ax, samples.maze)
    colors = colormaps["viridis"](np.linspace(0, 1, max(len(samples), 2)))
    for k in range(len(samples)):
        states = samples.plans.states[k]
        ax.plot(states[:, 0], states[:, 1], "-", color=colors[k], lw=1.2, alpha=0.9)
        ax.plot(states[0, 0], states[0, 1], "o", color=colors[k], ms=4)
        if samples.plans.goal is not None:
            ax.plot(*samples.plans.goal[k], "*", color=colors[k], ms=10, mec="k", mew=0.5)
    ax.set_title(f"{len(samples)} plans" + (f" ({samples.env_id})" if samples.env_id else ""))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_episode(episode: dict, maze: Optional[MazeGrid], path: str | os.PathLike, title: str = "") -> Path:
    """One PNG of an episode: maze walls, the plans made (dashed), the executed path and the goal."""
    fig, ax = _figure()
    if maze is not None:
        plot_maze(ax, maze)
    for k, plan in enumerate(episode.get("plans") or []):
        plan = np.asarray(plan)
        ax.plot(plan[:, 0], plan[:, 1], "--", color="tab:orange", lw=1, alpha=0.8, label="plan" if k == 0 else None)
    route = np.asarray(episode.get("path") or [])
    if len(route):
        ax.plot(route[:, 0], route[:, 1], "-", color="tab:blue", lw=1.5, label="path")
        ax.plot(route[0, 0], route[0, 1], "o", color="tab:blue", ms=5)
    if episode.get("goal") is not None:
        ax.plot(*episode["goal"][:2], "*", color="tab:red", ms=14, mec="k", mew=0.5, label="goal")
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title(title or f"return {episode['return']:.0f}, {'success' if episode['success'] else 'failure'}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _pair(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers 'X,Y', got {text!r}") from None
    return x, y


def plot_path(path) -> Path:
    """The PNG that :meth:`PlanningModality.save` writes for ``path`` (``path`` itself if it ends
    in .png, else ``plans.png`` in folder ``path``); a ValueError if it cannot be written there."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        if path.is_dir():
            raise ValueError(f"{path} is a folder; give a .png file path or a folder for --out")
        return path
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file; give a .png file path or a folder for --out")
    if (path / "plans.png").is_dir():
        raise ValueError(f"{path / 'plans.png'} is a folder; give a .png file path or another folder for --out")
    return path / "plans.png"


class PlanningModality:
    """``diffkit.get_modality("planning")``: trajectory planning with a diffusion model."""

    name = "planning"

    def calibration_inputs(self, checkpoint: str, *, batch: int, data: int, device, generator):
        """What ``diffkit calibrate`` fits on: whole trajectories of the planner's horizon, drawn
        without a start or goal written in (the planner's known values pin a few entries of them)."""
        from diffkit.calibration import CalibrationInputs
        from diffkit.guidance import ClipX0

        from .planner import DiffusionPlanner

        planner = DiffusionPlanner.load(checkpoint, device=device)
        wrappers = [ClipX0(-1.0, 1.0)] if planner.normalizer.kind == "limits" else []
        return CalibrationInputs(planner.net, planner.diffusion, (batch, planner.transition_dim, planner.horizon),
                                 {}, {"wrappers": wrappers})

    # -------------------------------------------------------------- generate / save
    def generate(self, *, checkpoint=None, num_samples: int = 16, seed: Optional[int] = None, device: str = "auto",
                 sampler: Optional[str] = None, steps: Optional[int] = None, progress: bool = False,
                 start=None, goal=None) -> PlanSamples:
        """``num_samples`` plans from a planner checkpoint (an environment id or a directory).

        ``start``: full observations (N or 1, observation_dim), or in mazes (x, y) positions
        (the ball at rest); default in mazes: centres of random free cells. ``goal`` (mazes):
        (x, y) pairs, default random free cells. One row is used for every sample.
        """
        from .planner import DiffusionPlanner

        if checkpoint is None:
            raise ValueError("the planning modality needs --checkpoint: an environment id with a shipped planner "
                             "(e.g. PointMaze_UMaze-v3) or a checkpoint directory from recipes/planner_train.py")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        # The planner checks steps (diffkit.runs.resolve_steps) against the model's timesteps.
        overrides = {k: v for k, v in (("sampler", sampler), ("steps", steps)) if v is not None}
        planner = DiffusionPlanner.load(checkpoint, device=device, seed=seed, **overrides)
        rng = np.random.default_rng(seed)
        maze, dim = planner.maze, planner.observation_dim

        def rows(given, width, what):
            arr = np.asarray(given, dtype=np.float64)
            arr = arr.reshape(-1, arr.shape[-1]) if arr.ndim else arr.reshape(1, 1)
            if arr.shape[1] != width or len(arr) not in (1, num_samples):
                raise ValueError(f"{what} must have shape ({width},) or ({num_samples}, {width}), got {np.shape(given)}")
            return np.broadcast_to(arr, (num_samples, width)).copy()

        def random_cells():
            cells = maze.free_cells()
            return np.stack([maze.cell_center(cells[i]) for i in rng.integers(len(cells), size=num_samples)])

        if start is None and maze is None:
            raise ValueError(f"outside a maze give start= observations of {dim} values")
        if start is not None and maze is not None and np.shape(start)[-1] == 2 and dim != 2:
            positions = rows(start, 2, "start")
        elif start is None:
            positions = random_cells()
        else:
            positions = None
        if positions is not None:
            for p in positions:
                maze.check_point(p, "start")
            observations = np.zeros((num_samples, dim))
            observations[:, :2] = positions
        else:
            observations = rows(start, dim, "start")
        goals = None
        if planner.condition_on_goal:
            goals = rows(goal, 2, "goal") if goal is not None else random_cells()
        plans = planner.plan(observations, goal=goals)
        return PlanSamples(plans, observations, maze, planner.env_id)

    def save(self, samples: PlanSamples, path) -> list[Path]:
        """A PNG of the plans and a JSON file of their numbers (``path.png`` + ``path.json``, or
        ``plans.png`` + ``plans.json`` inside a directory ``path``)."""
        if not isinstance(samples, PlanSamples):
            raise ValueError(f"the planning modality saves PlanSamples from generate(), got {type(samples).__name__}")
        png = plot_path(path)
        data = {"env_id": samples.env_id, "starts": samples.starts.tolist(),
                "states": samples.plans.states.tolist(), "actions": samples.plans.actions.tolist(),
                "goals": None if samples.plans.goal is None else samples.plans.goal.tolist(),
                "values": None if samples.plans.values is None else samples.plans.values.tolist()}
        plot_plans(samples, png)
        js = png.with_suffix(".json")
        js.write_text(json.dumps(data))
        return [png, js]

    def check_output(self, path) -> None:
        """What :meth:`save` would refuse, before any sampling."""
        plot_path(path)

    def add_cli_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("planning")
        group.add_argument("--start", type=_pair, metavar="X,Y", help="start position of every plan (default: random cells)")
        group.add_argument("--goal", type=_pair, metavar="X,Y", help="goal of every plan in a maze (default: random cells)")

    # -------------------------------------------------------------- policy
    def policy(self, checkpoint=None, **kw: Any):
        """A :class:`DiffusionPlanner` (``act``, ``reset``, ``__call__``) for a checkpoint or an env id."""
        from .planner import DiffusionPlanner

        if checkpoint is None:
            raise ValueError("policy() needs checkpoint=: an environment id with a shipped planner or a directory")
        return DiffusionPlanner.load(checkpoint, **kw)

    # -------------------------------------------------------------- CLI verbs
    def cli_commands(self) -> dict:
        from diffkit.registry import CliCommand

        return {"rollout": CliCommand(
            help="run a planner (or the waypoint expert) in its environment; write returns, success and plots",
            add_arguments=_rollout_arguments, run=_rollout)}


def _rollout_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env", required=True, help="Gymnasium environment id, e.g. PointMaze_Medium-v3")
    parser.add_argument("--checkpoint", help="planner checkpoint directory (default: the shipped one for --env)")
    parser.add_argument("--expert", action="store_true", help="run the BFS waypoint expert instead (mazes; a reference)")
    parser.add_argument("--episodes", type=int, default=10, help="seeded episodes (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first episode (default: 0)")
    parser.add_argument("--out", required=True, help="directory for results.json and the PNG plots")
    parser.add_argument("--plots", type=int, default=10, help="plot at most this many episodes (default: 10)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    parser.add_argument("--sampler", help="sampler (default: the checkpoint's)")
    parser.add_argument("--steps", type=int, help="solver steps per plan (default: the checkpoint's)")
    parser.add_argument("--replan-every", type=int, help="replan every K steps (default: the checkpoint's)")
    parser.add_argument("--replan-distance", type=float,
                        help="also replan when this far off the plan (default: the checkpoint's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _rollout(args: argparse.Namespace) -> int:
    from .planner import DiffusionPlanner, evaluate

    if args.episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {args.episodes}")
    env_kwargs = {"continuing_task": True} if is_maze_env(args.env) else {}
    if args.expert:
        if not is_maze_env(args.env):
            raise ValueError(f"--expert is the PointMaze waypoint controller; {args.env} is not a PointMaze")
        probe = make_env(args.env)
        maze = MazeGrid.from_env(probe)
        probe.close()
        policy = WaypointExpert(maze)
    else:
        overrides = {k: v for k, v in (("sampler", args.sampler), ("steps", args.steps),
                                       ("replan_every", args.replan_every),
                                       ("replan_distance", args.replan_distance)) if v is not None}
        policy = DiffusionPlanner.load(args.checkpoint or args.env, env=args.env, device=args.device,
                                       seed=args.seed, **overrides)
        maze = policy.maze
    results = evaluate(policy, args.env, episodes=args.episodes, seed=args.seed, record=True,
                       progress=not args.no_progress, **env_kwargs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for k, episode in enumerate(results["episodes"][: max(args.plots, 0)]):
        plot_episode(episode, maze, out / f"episode_{k:03d}.png",
                     title=f"{args.env} seed {episode['seed']}: return {episode['return']:.0f}")
    summary = {key: value for key, value in results.items() if key != "episodes"}
    summary["policy"] = "expert" if args.expert else str(getattr(policy, "path", args.checkpoint or args.env))
    summary["episodes"] = [{k: e[k] for k in ("seed", "return", "success")} for e in results["episodes"]]
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"{args.env}: mean return {summary['mean_return']:.1f} ± {summary['std_return']:.1f}, success "
          f"{100 * summary['success_rate']:.0f}% over {args.episodes} episodes, "
          f"{summary['actions_per_second']:.0f} actions/s; wrote {out}")
    return 0
