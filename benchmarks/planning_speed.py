"""Planning speed at batch 1 on this CPU: our planner beside the same model sampled as Diffuser
samples it, and actions per second in the maze loop.

    python benchmarks/planning_speed.py                               # shipped checkpoints, 2 threads
    python benchmarks/planning_speed.py --envs PointMaze_Large-v3 --checkpoint PointMaze_Large-v3=DIR
    python benchmarks/planning_speed.py --quick                       # a tiny model: plumbing only

For each maze and each way of sampling, the median time of one plan from a random start to a
random goal (batch 1, after warm-up), its rate in plans per second (Hz: what a planner that
replans every step could act at), and actions per second over seeded episodes of the maze loop
(``continuing_task=True``, the environment's own stepping included). Ways of sampling:

- ``ours``: the checkpoint's defaults (the shipped mazes: 16 candidate plans of 10 DDIM steps in
  one batch, once per goal and again when the ball strays from the route, which it follows);
- ``ours, one candidate``: the same with one plan (the plan rate of the network itself);
- ``ours, replan every 25``: a fresh plan every 25 steps, warm-started from the last one;
- ``Diffuser (maze)``: ancestral DDPM over every training step of the model (Diffuser samples
  its maze planners so, with 64 / 256 / 256 steps on its own models), one plan per goal;
- ``Diffuser (locomotion)``: a batch of 64 candidates at 20 DDPM steps (Diffuser's locomotion
  planner, which replans every step: its 1.3 Hz in DiffuserLite's table), timed per decision.

Anchors (DiffuserLite's table, GPU): Diffuser 1.3 Hz, Decision Diffuser 0.4 Hz, DiffuserLite
122 Hz. Goal here: at least 50 actions per second in the maze loop on this 2-core CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from planning_common import RESULTS, quick_planner, record  # noqa: E402

from modalities.planning.maze import make_env  # noqa: E402
from modalities.planning.planner import DiffusionPlanner, evaluate  # noqa: E402

ENVS = ("PointMaze_UMaze-v3", "PointMaze_Medium-v3", "PointMaze_Large-v3")
ANCHORS_HZ = {"Diffuser": 1.3, "Decision Diffuser": 0.4, "DiffuserLite (GPU)": 122.0}


def plan_times(planner: DiffusionPlanner, env_id: str, plans: int, seed: int, batch: int = 1) -> list[float]:
    """Seconds per plan (batch ``batch`` copies of one start) from seeded random starts and goals."""
    env = make_env(env_id, continuing_task=True)
    times = []
    for k in range(plans + 2):
        obs, _ = env.reset(seed=seed + k)
        observation = np.repeat(obs["observation"][None], batch, axis=0)
        goal = np.repeat(obs["desired_goal"][None], batch, axis=0)
        start = time.perf_counter()
        planner.plan(observation if batch > 1 else obs["observation"], goal=goal if batch > 1 else goal[0])
        if k >= 2:  # two warm-up plans
            times.append(time.perf_counter() - start)
    env.close()
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", nargs="+", default=list(ENVS), help="mazes (default: all three)")
    p.add_argument("--checkpoint", action="append", metavar="ENV=DIR", help="planner checkpoint per maze "
                                                                             "(default: the shipped one)")
    p.add_argument("--plans", type=int, default=30, help="timed plans per way of sampling (default: 30)")
    p.add_argument("--episodes", type=int, default=5, help="maze-loop episodes per way of sampling (default: 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2, this machine's cores)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where planning_speed.{json,md} go")
    p.add_argument("--quick", action="store_true", help="U-Maze, a tiny model, 2 plans and 1 episode each")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint or [])
    if args.quick:
        tmp = Path(tempfile.mkdtemp(prefix="planning_speed_"))
        args.envs, args.plans, args.episodes = [ENVS[0]], 2, 1
        args.out = tmp / "results" if args.out == RESULTS else args.out
        if ENVS[0] not in checkpoints:
            run = quick_planner(ENVS[0], tmp / "run", extra=["--collect-steps", "2000", "--every", "4"], max_steps=2)
            checkpoints[ENVS[0]] = str(run / "checkpoint")
    rows, payload = [], {"threads": args.threads, "envs": {}}
    for env_id in args.envs:
        source = checkpoints.get(env_id, env_id)
        base = DiffusionPlanner.load(source, env=env_id, device="cpu", seed=args.seed)
        T = base.diffusion.num_timesteps
        # Diffuser's ways draw one plan each (a batch of 64 for locomotion) and act as Diffuser does.
        diffuser = dict(replan_every=None, num_candidates=1, replan_distance=None, stall_steps=None,
                        **({"action_source": "tracking"} if base.maze is not None else {}))
        ways = {
            "ours": dict(),
            "ours, one candidate": dict(num_candidates=1),
            "ours, replan every 25": dict(replan_every=min(25, base.span - 1)),
            "Diffuser (maze)": dict(diffuser, sampler="ddpm", steps=T),
            "Diffuser (locomotion)": dict(diffuser, sampler="ddpm", steps=min(20, T)),
        }
        payload["envs"][env_id] = {"checkpoint": str(base.path), "training_timesteps": T,
                                   "horizon": base.horizon, "every": base.every, "ways": {}}
        for name, overrides in ways.items():
            planner = DiffusionPlanner.load(source, env=env_id, device="cpu", seed=args.seed, **overrides)
            batch = 64 if name == "Diffuser (locomotion)" else 1
            times = plan_times(planner, env_id, args.plans, args.seed, batch=batch)
            median = statistics.median(times)
            entry = {"sampler": planner.sampler, "steps": planner.steps, "candidates": batch * planner.num_candidates,
                     "replan_every": planner.replan_every, "plan_ms": 1000 * median,
                     "plan_ms_p90": 1000 * float(np.percentile(times, 90)), "plans_per_second": 1 / median}
            if batch == 1:
                loop = evaluate(planner, env_id, episodes=args.episodes, seed=args.seed, continuing_task=True)
                entry.update(actions_per_second=loop["actions_per_second"], loop_steps=loop["steps"],
                             plans_in_loop=planner.plans_made, success_rate=loop["success_rate"])
            payload["envs"][env_id]["ways"][name] = entry
            loop_text = f"{entry['actions_per_second']:.0f}" if "actions_per_second" in entry else "-"
            rows.append(f"| {env_id} | {name} | {planner.sampler} {planner.steps} | {entry['candidates']} | "
                        f"{entry['plan_ms']:.1f} | {entry['plans_per_second']:.1f} | {loop_text} |")
            print(rows[-1], flush=True)
    payload["anchors_hz"] = ANCHORS_HZ
    table = "\n".join([
        f"# Planning speed at batch 1 ({args.threads} torch threads, CPU)",
        "",
        "| maze | sampling | sampler, steps | candidates | ms per plan (median) | plans/s (Hz) | maze-loop actions/s |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Anchors (DiffuserLite's table, GPU): " + ", ".join(f"{k} {v} Hz" for k, v in ANCHORS_HZ.items())
        + ". Goal: at least 50 actions/s in the maze loop.",
        "",
    ])
    path = record("planning_speed", payload, args.out, table)
    print(table)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
