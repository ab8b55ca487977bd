"""The planner on the three PointMaze mazes, D4RL maze2d's way: normalised scores against a random
policy and the waypoint expert measured in the same run, success rates, actions per second, and
a behaviour-cloning MLP trained on the planner's own data beside it.

    python benchmarks/planning_maze.py                        # shipped checkpoints, 30 episodes each
    python benchmarks/planning_maze.py --envs PointMaze_UMaze-v3 --checkpoint PointMaze_UMaze-v3=runs/x/export
    python benchmarks/planning_maze.py --quick                # a tiny model, 3 episodes: plumbing only

Protocol (D4RL maze2d, as Diffuser reports it): sparse reward (1 for every step within 0.45 of
the goal), ``continuing_task=True`` (the episode never ends early; staying at the goal keeps
scoring), 300 / 600 / 800 steps, start and goal drawn by the environment from the episode's
seed; the same seeds for every policy. Three ways of acting on the same model are scored:

- "planner (defaults, map hidden)": the checkpoint's defaults, which read nothing but
  observations and the goal, run with the map hidden as an outside judge hides it (every
  ``MazeGrid`` the package builds has its inner walls cleared; the physics keep theirs);
- "planner, known map (opt-in)": ``known_map=True``, which lets the planner read the walls
  (shortcuts in straight sight, candidates ranked by free space, sight-line replanning): a path
  follower with a learned proposal, not comparable with map-free planners;
- "planner, Diffuser's acting": one plan per goal tracked open-loop on its schedule.

Score = 100 (R - R_random) / (R_expert - R_random) with both references measured here (uniform
random actions; the BFS waypoint expert of ``modalities.planning.maze``), standard errors over
episodes. Scores against D4RL's own references (random 23.85 / 13.13 / 6.7, expert 161.86 /
277.39 / 273.99, an expert that under-scored, D4RL #159/#215) are printed too, because the
published anchors use them: Diffuser 113.9 / 121.5 / 123.0, Diffusion Forcing 116.7 / 149.4 /
159.0, Hierarchical Diffuser 128.4 / 135.6 / 155.8, IQL 47.4 / 34.9 / 58.6 (D4RL's maze2d-v1 in
MuJoCo-py against Gymnasium-Robotics' PointMaze v3 here: versions differ). Goal: at least 100
against our expert and 95% success, map-free.

The BC baseline is a goal-conditioned MLP (observation + goal -> action) fitted to the same data
the planner was trained on: ``runs/planner-<env>/data.hdf5`` (or ``--data ENV=PATH``), or, when
absent, the stream the checkpoint records it was trained on, recorded again (the expert and the
seeds make it the same data). For each maze a PNG shows the walls, the plans and the executed
path of the first episode of the default planner.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from planning_common import (  # noqa: E402
    RESULTS,
    BehaviourCloning,
    RandomPolicy,
    normalised,
    quick_planner,
    record,
    summarize,
)

from diffkit.runs import hardware_summary  # noqa: E402
from modalities.planning.data import collect, load_d4rl_hdf5  # noqa: E402
from modalities.planning.maze import MazeGrid, WaypointExpert, hidden_inner_walls, make_env  # noqa: E402
from modalities.planning.modality import plot_episode  # noqa: E402
from modalities.planning.planner import DiffusionPlanner, evaluate  # noqa: E402

ENVS = ("PointMaze_UMaze-v3", "PointMaze_Medium-v3", "PointMaze_Large-v3")
D4RL_REFERENCES = {  # (random, expert): D4RL's maze2d v1 sparse references
    "PointMaze_UMaze-v3": (23.85, 161.86),
    "PointMaze_Medium-v3": (13.13, 277.39),
    "PointMaze_Large-v3": (6.7, 273.99),
}
PLANNER = "planner (defaults, map hidden)"
KNOWN_MAP = "planner, known map (opt-in)"
DIFFUSER_STYLE = "planner, Diffuser's acting"
ANCHORS = {"Diffuser": (113.9, 121.5, 123.0), "Diffusion Forcing": (116.7, 149.4, 159.0),
           "Hierarchical Diffuser": (128.4, 135.6, 155.8), "IQL": (47.4, 34.9, 58.6)}


def _pairs(items, what):
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"planning_maze.py: error: --{what} takes ENV=PATH, got {item!r}")
        env, path = item.split("=", 1)
        out[env] = path
    return out


def training_data(env_id: str, planner: DiffusionPlanner, given: dict, cache: Path):
    """The stream the planner learnt from (for the BC baseline)."""
    if env_id in given:
        return load_d4rl_hdf5(given[env_id]), given[env_id]
    run_data = Path("runs") / f"planner-{env_id}" / "data.hdf5"
    if run_data.is_file():
        return load_d4rl_hdf5(run_data), str(run_data)
    described = str(planner.config.get("data") or "")
    match = re.fullmatch(r"waypoint expert, (\d+) steps, seed (-?\d+)", described)
    if not match:
        raise SystemExit(f"planning_maze.py: error: cannot tell which data {env_id}'s planner learnt from "
                         f"({described!r}); pass --data {env_id}=PATH")
    steps, seed = int(match.group(1)), int(match.group(2))
    path = cache / f"{env_id}-{steps}-{seed}.hdf5"
    if path.is_file():
        return load_d4rl_hdf5(path), str(path)
    print(f"{env_id}: recording the planner's training stream again ({steps} steps, seed {seed}) for BC",
          flush=True)
    stream = make_env(env_id, continuing_task=True, reset_target=True, max_episode_steps=steps)
    traj = collect(stream, WaypointExpert(MazeGrid.from_env(stream)), steps=steps, seed=seed, path=path)
    stream.close()
    return traj, str(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", nargs="+", default=list(ENVS), help="mazes (default: all three)")
    p.add_argument("--checkpoint", action="append", metavar="ENV=DIR",
                   help="planner checkpoint per maze (default: the shipped one, by env id)")
    p.add_argument("--data", action="append", metavar="ENV=PATH", help="the planner's training data, for BC")
    p.add_argument("--episodes", type=int, default=30, help="seeded episodes per policy and maze (default: 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first episode (default: 0)")
    p.add_argument("--replan-distance", type=float,
                   help="planner option: also replan when this far off the plan (default: the checkpoint's)")
    p.add_argument("--bc-steps", type=int, default=20_000, help="BC optimizer steps (default: 20000)")
    p.add_argument("--no-bc", action="store_true", help="leave the behaviour-cloning baseline out")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where planning_maze.{json,md} and PNGs go")
    p.add_argument("--quick", action="store_true",
                   help="U-Maze only, a tiny planner trained for a few steps, 3 episodes: checks the plumbing")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoints, data = _pairs(args.checkpoint, "checkpoint"), _pairs(args.data, "data")
    tmp = Path(tempfile.mkdtemp(prefix="planning_maze_"))
    if args.quick:
        args.envs, args.episodes, args.bc_steps = args.envs[:1] if args.checkpoint else [ENVS[0]], 3, 200
        if args.out == RESULTS:
            args.out = tmp / "results"
        for env_id in args.envs:
            if env_id not in checkpoints:
                run = quick_planner(env_id, tmp / env_id, extra=["--collect-steps", "3000", "--every", "4"])
                checkpoints[env_id] = str(run / "checkpoint")
                data.setdefault(env_id, str(run / "data.hdf5"))
    start = time.perf_counter()
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    rows, payload = [], {"command": f"python benchmarks/planning_maze.py {argv_text}".strip(),
                         "protocol": "sparse reward, continuing_task=True, seeds "
                                     f"{args.seed}..{args.seed + args.episodes - 1}, planner seed {args.seed}",
                         "map": f"'{PLANNER}' runs with every MazeGrid's inner walls cleared", "envs": {}}
    for env_id in args.envs:
        env_start = time.perf_counter()
        overrides = {} if args.replan_distance is None else {"replan_distance": args.replan_distance}
        source = checkpoints.get(env_id, env_id)
        probe = make_env(env_id)
        maze, space = MazeGrid.from_env(probe), probe.action_space  # the real walls: the expert's
        probe.close()
        with hidden_inner_walls():
            planner = DiffusionPlanner.load(source, env=env_id, seed=args.seed, **overrides)
        known = DiffusionPlanner.load(source, env=env_id, seed=args.seed, known_map=True, **overrides)
        diffuser_style = DiffusionPlanner.load(source, env=env_id, seed=args.seed, action_source="tracking",
                                               num_candidates=1, replan_distance=None, stall_steps=None)
        policies = {"random": RandomPolicy(space, args.seed), "expert": WaypointExpert(maze),
                    PLANNER: planner, KNOWN_MAP: known, DIFFUSER_STYLE: diffuser_style}
        bc_time = data_source = bc = None
        if not args.no_bc:
            traj, data_source = training_data(env_id, planner, data, tmp)
            bc_start = time.perf_counter()
            bc = BehaviourCloning.fit(traj, steps=args.bc_steps, seed=args.seed, action_low=space.low,
                                      action_high=space.high)
            bc_time = time.perf_counter() - bc_start
            policies["bc"] = bc
        stats, first_episode = {}, None
        for name, policy in policies.items():
            hide = hidden_inner_walls() if name == PLANNER else contextlib.nullcontext()
            with hide:
                results = evaluate(policy, env_id, episodes=args.episodes, seed=args.seed, record=name == PLANNER,
                                   continuing_task=True)
            stats[name] = summarize(results)
            if name == PLANNER:
                first_episode = results["episodes"][0]
            print(f"{env_id} {name}: return {stats[name]['mean_return']:.1f} ± {stats[name]['se_return']:.1f}, "
                  f"success {100 * stats[name]['success_rate']:.0f}%", flush=True)
        r_rand, r_exp = stats["random"]["mean_return"], stats["expert"]["mean_return"]
        d_rand, d_exp = D4RL_REFERENCES[env_id]
        for name in policies:
            stats[name]["score"], stats[name]["score_se"] = normalised(stats[name], r_rand, r_exp)
            stats[name]["d4rl_score"], stats[name]["d4rl_score_se"] = normalised(stats[name], d_rand, d_exp)
        png = plot_episode(first_episode, maze, args.out / f"planning_maze_{env_id}.png",
                           title=f"{env_id} seed {first_episode['seed']} (defaults, map hidden): "
                                 f"return {first_episode['return']:.0f}")

        def settings(p):
            return {k: getattr(p, k) for k in (
                "known_map", "sampler", "steps", "horizon", "every", "replan_every", "replan_distance",
                "action_source", "num_candidates", "candidate_score", "shortcut_margin", "loop_radius",
                "stall_steps")}

        payload["envs"][env_id] = {
            "checkpoint": str(planner.path), "data": data_source, "bc_steps": None if args.no_bc else args.bc_steps,
            "bc_train_s": None if bc_time is None else round(bc_time, 1),
            "bc_final_loss": getattr(bc, "final_loss", None),
            "planner": settings(planner), "known_map_planner": settings(known),
            "png": png.name, "wall_time_s": round(time.perf_counter() - env_start, 1), **stats,
        }
        for name in (PLANNER, KNOWN_MAP, DIFFUSER_STYLE, "bc", "expert", "random"):
            if name not in stats:
                continue
            s = stats[name]
            rows.append(f"| {env_id} | {name} | {s['score']:.1f} ± {s['score_se']:.1f} | "
                        f"{s['d4rl_score']:.1f} ± {s['d4rl_score_se']:.1f} | {s['mean_return']:.1f} ± "
                        f"{s['se_return']:.1f} | {100 * s['success_rate']:.0f}% | {s['actions_per_second']:.0f} |")
    wall = time.perf_counter() - start
    payload.update(episodes=args.episodes, quick=args.quick, wall_time_s=round(wall, 1),
                   anchors={k: dict(zip(ENVS, v)) for k, v in ANCHORS.items()})
    anchors = "; ".join(f"{name} {' / '.join(map(str, values))}" for name, values in ANCHORS.items())
    table = "\n".join([
        f"# PointMaze planning ({args.episodes} seeded episodes per policy; sparse reward, continuing task)",
        "",
        f"`{payload['command']}`: seeds {payload['protocol'].split('seeds ')[1]}; {hardware_summary()}, "
        f"{torch.get_num_threads()} torch thread(s); wall time {wall:.0f} s.",
        "",
        f"'{PLANNER}' is the default planner, which reads nothing but observations and the goal, run with "
        f"the maze's inner walls cleared; '{KNOWN_MAP}' lets it read the walls (known_map=True) and is not "
        "comparable with map-free planners.",
        "",
        "| maze | policy | score (our references) | score (D4RL's references) | return | success | actions/s |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Published anchors, against D4RL's references (U-Maze / Medium / Large; maze2d-v1 under MuJoCo-py, "
        f"versions differ from Gymnasium-Robotics' PointMaze v3): {anchors}. All read no map.",
        "",
    ])
    path = record("planning_maze", payload, args.out, table)
    print(table)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
