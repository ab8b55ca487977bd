"""The maze planners with the map hidden: where map-free plans fail, and how planner settings compare.

    python benchmarks/planning_mapfree.py                                   # defaults, 30 episodes a maze
    python benchmarks/planning_mapfree.py --variant baseline --variant default --episodes 30
    python benchmarks/planning_mapfree.py --variant 'mine={"num_candidates": 8, "stall_steps": 20}'

The map is hidden as an outside judge hides it: while a planner is built and run, every
``MazeGrid`` the package builds has its inner walls cleared (the border stays; the physics keep
their walls). A planner that reads the walls then sees an open field; one that reads nothing but
observations and the goal plans exactly as with the map. The expert and the failure analysis use
the real walls.

Each episode is scored against the BFS waypoint expert and a random policy on the same seeds
(score 100 (R - R_random) / (R_expert - R_random)), and every episode that fails (never reaches
the goal) or scores below 90% of the expert's return on its seed is put in one class, read off
the real map:

- ``through a wall``: a plan the ball followed runs through wall cells (more than 2% of its
  route up to the goal);
- ``stall``: no plan runs through a wall, but the ball stood still (moved less than 0.1 in 20
  steps) away from the goal;
- ``detour``: neither, and the plans' routes are more than 30% longer than the expert's path to
  the goal (another way round, or loitering);
- ``slow``: none of these.

Results go to ``benchmarks/results/<name>.{json,md}`` with PNGs of failed episodes (the real
walls, the plans made, the path).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from planning_common import RESULTS, RandomPolicy, mean_se, record  # noqa: E402

from modalities.planning.maze import GOAL_RADIUS, MazeGrid, WaypointExpert, hidden_inner_walls, make_env  # noqa: E402
from modalities.planning.modality import plot_episode  # noqa: E402
from modalities.planning.planner import DiffusionPlanner, evaluate  # noqa: E402

ENVS = ("PointMaze_UMaze-v3", "PointMaze_Medium-v3", "PointMaze_Large-v3")
# Named planner settings (overrides of the checkpoint's). "default" is whatever the checkpoint and
# the planner give by default; "known map" is the opt-in that reads the walls.
VARIANTS: dict[str, dict] = {
    "default": {},
    "baseline": {"num_candidates": 1, "stall_steps": None, "loop_radius": None},
    "shipped, map hidden": {"known_map": True},
    "known map": {"known_map": True},
}
MAP_HIDDEN_EXEMPT = ("known map",)  # run with the real walls: the opt-in's own score


def _route_until_goal(states: np.ndarray, goal: np.ndarray) -> np.ndarray:
    near = np.linalg.norm(states[:, :2] - goal, axis=1) < GOAL_RADIUS
    end = int(np.argmax(near)) if near.any() else len(states) - 1
    return states[: end + 1, :2]


def _length(points: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(points, axis=0), axis=1).sum()) if len(points) > 1 else 0.0


def classify(episode: dict, grid: MazeGrid, expert_return: float, expert_length: float) -> dict:
    """The failure class of one recorded episode, read off the real map."""
    goal = np.asarray(episode["goal"])
    path = np.asarray(episode["path"])
    plans = [np.asarray(p) for p in episode.get("plans") or []]
    wall_share = [1.0 - grid.fraction_free(_route_until_goal(p, goal)) for p in plans]
    through_wall = any(w > 0.02 for w in wall_share)
    positions = path[:, :2]
    away = np.linalg.norm(positions - goal, axis=1) >= GOAL_RADIUS
    still = np.zeros(len(positions), dtype=bool)
    still[20:] = np.linalg.norm(positions[20:] - positions[:-20], axis=1) < 0.1
    stalled_steps = int((still & away).sum())
    plan_length = float(np.mean([_length(_route_until_goal(p, goal)) for p in plans])) if plans else 0.0
    ok = episode["success"] and episode["return"] >= 0.9 * expert_return
    if ok:
        kind = "ok"
    elif through_wall:
        kind = "through a wall"
    elif stalled_steps > 0:
        kind = "stall"
    elif plan_length > 1.3 * expert_length:
        kind = "detour"
    else:
        kind = "slow"
    return {"seed": episode["seed"], "class": kind, "success": episode["success"], "return": episode["return"],
            "expert_return": expert_return, "plans": len(plans), "plans_through_walls": int(sum(w > 0.02 for w in wall_share)),
            "stalled_steps": stalled_steps, "plan_length": plan_length, "expert_length": expert_length}


def expert_runs(env_id: str, grid: MazeGrid, seeds: range) -> tuple[list[float], list[float]]:
    """The expert's return on each seed and its path length to the first arrival."""
    env = make_env(env_id, continuing_task=True)
    returns, lengths = [], []
    for seed in seeds:
        obs, _ = env.reset(seed=seed)
        expert, total, path, arrived = WaypointExpert(grid), 0.0, [obs["observation"][:2]], False
        while True:
            obs, reward, terminated, truncated, info = env.step(expert.act(obs))
            total += reward
            if not arrived:
                path.append(obs["observation"][:2])
                arrived = bool(info.get("success"))
            if terminated or truncated:
                break
        returns.append(total)
        lengths.append(_length(np.asarray(path)))
    env.close()
    return returns, lengths


def _variant(text: str) -> tuple[str, dict]:
    if "=" in text:
        name, spec = text.split("=", 1)
        return name, json.loads(spec)
    if text not in VARIANTS:
        raise argparse.ArgumentTypeError(f"unknown variant {text!r}; named ones: {', '.join(VARIANTS)}, "
                                         "or NAME='{json overrides}'")
    return text, VARIANTS[text]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", nargs="+", default=list(ENVS))
    p.add_argument("--variant", action="append", type=_variant, metavar="NAME[=JSON]",
                   help="planner settings to run (repeatable; default: 'default')")
    p.add_argument("--episodes", type=int, default=30)
    p.add_argument("--seed", type=int, default=0, help="first episode seed and the planner's seed (default: 0)")
    p.add_argument("--pictures", type=int, default=2, help="PNGs of failed episodes per maze and variant")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="planning_mapfree", help="results file name (default: planning_mapfree)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = dict(args.variant or [("default", {})])
    seeds = range(args.seed, args.seed + args.episodes)
    start = time.perf_counter()
    payload: dict = {"command": "python benchmarks/planning_mapfree.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "seeds": f"{seeds.start}..{seeds.stop - 1}", "planner_seed": args.seed,
                     "map": "hidden (inner walls of every MazeGrid cleared) except for 'known map' rows",
                     "envs": {}}
    rows = []
    for env_id in args.envs:
        probe = make_env(env_id)
        grid, space = MazeGrid.from_env(probe), probe.action_space
        probe.close()
        expert_returns, expert_lengths = expert_runs(env_id, grid, seeds)
        random = evaluate(RandomPolicy(space, args.seed), env_id, episodes=args.episodes, seed=args.seed,
                          continuing_task=True)
        r_rand, r_exp = random["mean_return"], float(np.mean(expert_returns))
        entry = payload["envs"].setdefault(env_id, {"expert_return": r_exp, "random_return": r_rand, "variants": {}})
        for name, overrides in variants.items():
            hide = contextlib.nullcontext() if name in MAP_HIDDEN_EXEMPT else hidden_inner_walls()
            t0 = time.perf_counter()
            with hide:
                planner = DiffusionPlanner.load(env_id, env=env_id, device="cpu", seed=args.seed, **overrides)
                results = evaluate(planner, env_id, episodes=args.episodes, seed=args.seed, record=True,
                                   continuing_task=True)
            wall = time.perf_counter() - t0
            episodes = results["episodes"]
            classes = [classify(e, grid, expert_returns[k], expert_lengths[k]) for k, e in enumerate(episodes)]
            scores = [100 * (e["return"] - r_rand) / (r_exp - r_rand) for e in episodes]
            score, score_se = mean_se(scores)
            counts = {c: sum(x["class"] == c for x in classes)
                      for c in ("ok", "through a wall", "stall", "detour", "slow")}
            failed = [c for c in classes if not c["success"]]
            settings = {k: getattr(planner, k) for k in (
                "known_map", "num_candidates", "candidate_score", "shortcut_margin", "replan_distance", "stall_steps",
                "loop_radius", "steps", "action_source")}
            pictures = []
            worst = sorted(range(len(episodes)), key=lambda k: (episodes[k]["success"], episodes[k]["return"]))
            for k in [k for k in worst if classes[k]["class"] != "ok"][: args.pictures]:
                slug = name.replace(" ", "-").replace(",", "")
                png = args.out / f"{args.name}_{env_id}_{slug}_seed{episodes[k]['seed']}.png"
                plot_episode(episodes[k], grid, png, title=f"{env_id} seed {episodes[k]['seed']} ({name}): "
                             f"{classes[k]['class']}, return {episodes[k]['return']:.0f} (expert "
                             f"{expert_returns[k]:.0f})")
                pictures.append(png.name)
            entry["variants"][name] = {
                "overrides": overrides, "settings": settings, "map_hidden": name not in MAP_HIDDEN_EXEMPT,
                "score": score, "score_se": score_se, "mean_return": results["mean_return"],
                "success_rate": results["success_rate"], "actions_per_second": results["actions_per_second"],
                "plans": int(sum(c["plans"] for c in classes)), "wall_time_s": round(wall, 1),
                "classes": counts, "failures": len(failed), "episodes": classes, "pictures": pictures}
            print(f"{env_id} {name}: score {score:.1f} ± {score_se:.1f}, success {100 * results['success_rate']:.0f}%, "
                  f"{counts}, {wall:.0f} s", flush=True)
            rows.append(f"| {env_id} | {name} | {score:.1f} ± {score_se:.1f} | {100 * results['success_rate']:.0f}% | "
                        f"{counts['ok']} | {counts['through a wall']} | {counts['stall']} | {counts['detour']} | "
                        f"{counts['slow']} | {results['actions_per_second']:.0f} | {wall:.0f} |")
    total = time.perf_counter() - start
    payload["wall_time_s"] = round(total, 1)
    table = "\n".join([
        f"# PointMaze planners with the map hidden ({args.episodes} seeded episodes, seeds {seeds.start}.."
        f"{seeds.stop - 1}, planner seed {args.seed})",
        "",
        f"`{payload['command']}`; {total:.0f} s wall, one torch thread. Score against the BFS expert and random "
        "actions on the same seeds. Classes (episodes): ok (reached the goal with >= 90% of the expert's return), "
        "and for the rest the first that applies: a plan through a wall (real map), a stall, a detour, slow.",
        "",
        "| maze | variant | score | success | ok | through a wall | stall | detour | slow | actions/s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    record(args.name, payload, args.out, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
