"""Value guidance on a MuJoCo task: does steering the planner with its value function beat plain
sampling and the average of data of mixed quality?

    python benchmarks/planning_value_guidance.py                     # record, train, evaluate (see below)
    python benchmarks/planning_value_guidance.py --checkpoint DIR    # evaluate a trained planner only
    python benchmarks/planning_value_guidance.py --quick             # tiny everything: plumbing only

Task: Gymnasium's ``Reacher-v5`` (MuJoCo, a two-link arm reaching a random target, 50 steps,
reward = -distance - 0.1 |a|^2). Data of mixed quality, one policy per episode in equal shares:
a Jacobian-transpose reaching controller (``expert``, return ~-5), the same controller with
Gaussian action noise of 0.25 (``medium``) and 1.0 (``poor``), and uniform random actions
(``random``, ~-42). A Diffuser planner (``recipes/planner_train.py``'s generic preset: horizon
16, replanning every step, the plan's own first action, a value network on noisy
trajectories) learns the mixture, so plain sampling imitates the data's average behaviour.
Compared over the same seeded episodes:

- ``data average``: the mean episode return of the recorded data (and per policy);
- ``unguided``: one sampled plan per step;
- ``guided (scale s)``: Diffuser's value guidance, 2 gradient steps per denoising step, none in
  the last two (``value_guidance=s``);
- ``ranked (K)``: K candidates, the one with the best value kept;
- ``guided + ranked``: both (Diffuser's locomotion planner: 64 candidates, scale 0.1; 16 here by
  default to keep the run short, ``--candidates 64`` for Diffuser's).

Each training seed (``--train-seeds``) trains its own planner and value function; standard
errors are over episodes for each seed and over the seeds' means when there are several.
Expected cost on the 2-core CPU, one thread: recording ~1 min, training ~10-12 min per seed
(8,000 steps of the planner, 4,000 of the value); evaluation, 2,500 plans per variant at 50
episodes, from CPU time per plan measured on an untrained model of the same size (44 ms
unguided, 94 ms guided, 209 ms for 64 ranked candidates, 457 ms for both; 16 candidates cost
about a quarter of 64): ~2 min unguided, ~4 min per guidance scale, ~3 and ~6 min ranked; about
30 min in all for one seed (``--candidates 64``, Diffuser's count, adds ~20 min).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from planning_common import RESULTS, RandomPolicy, mean_se, planner_train, record, summarize  # noqa: E402

from modalities.planning.data import collect, load_d4rl_hdf5  # noqa: E402
from modalities.planning.maze import make_env  # noqa: E402
from modalities.planning.planner import DiffusionPlanner, evaluate  # noqa: E402

ENV = "Reacher-v5"
LEVELS = ("expert", "medium", "poor", "random")
NOISE = {"expert": 0.0, "medium": 0.25, "poor": 1.0}
LINKS = (0.1, 0.11)  # Reacher's link lengths (reacher.xml)


class ReachingController:
    """Jacobian-transpose control towards the target: tau = J^T (kp (target - tip)) - kd qdot.

    Reacher-v5 observations: cos q (2), sin q (2), target (2), qdot (2), tip - target (2).
    """

    def __init__(self, kp: float = 20.0, kd: float = 0.1):
        self.kp, self.kd = kp, kd

    def reset(self) -> None:
        pass

    def act(self, obs) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float64)
        c1, c2, s1, s2 = obs[0], obs[1], obs[2], obs[3]
        c12, s12 = c1 * c2 - s1 * s2, s1 * c2 + c1 * s2
        l1, l2 = LINKS
        jacobian = np.array([[-l1 * s1 - l2 * s12, -l2 * s12], [l1 * c1 + l2 * c12, l2 * c12]])
        torque = self.kp * jacobian.T @ (-obs[8:10]) - self.kd * obs[6:8]
        return np.clip(torque, -1.0, 1.0).astype(np.float32)

    __call__ = act


class MixedPolicy:
    """One quality level per episode, in turn: expert, medium, poor, random (``reset`` advances)."""

    def __init__(self, action_space, seed: int = 0):
        self.controller = ReachingController()
        self.random = RandomPolicy(action_space, seed)
        self.rng = np.random.default_rng(seed)
        self.episode = -1
        self.levels: list[str] = []

    def reset(self) -> None:
        self.episode += 1
        self.levels.append(LEVELS[self.episode % len(LEVELS)])

    def act(self, obs) -> np.ndarray:
        level = self.levels[-1]
        if level == "random":
            return self.random.act(obs)
        action = self.controller.act(obs) + NOISE[level] * self.rng.standard_normal(2)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    __call__ = act


def record_data(path: Path, episodes: int, seed: int) -> dict:
    env = make_env(ENV)
    policy = MixedPolicy(env.action_space, seed)
    traj = collect(env, policy, steps=episodes * env.spec.max_episode_steps, seed=seed, path=path)
    env.close()
    return data_returns(traj, policy.levels)


def data_returns(traj, levels=None) -> dict:
    returns = [float(traj.rewards[a:b].sum()) for a, b in traj.episodes()]
    out = {"all": mean_se(returns), "episodes": len(returns)}
    if levels:
        for level in LEVELS:
            out[level] = mean_se([r for r, lv in zip(returns, levels) if lv == level])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", help="trained planner(s) with a value network; skips training")
    p.add_argument("--run-dir", type=Path, default=Path("runs/planning-value-guidance"),
                   help="data and training runs (resumed when present)")
    p.add_argument("--data-episodes", type=int, default=2000, help="recorded episodes (default: 2000)")
    p.add_argument("--train-seeds", type=int, nargs="+", default=[0], help="one planner per seed (default: 0)")
    p.add_argument("--max-steps", type=int, default=8000, help="planner optimizer steps (default: 8000)")
    p.add_argument("--aux-steps", type=int, default=4000, help="value optimizer steps (default: 4000)")
    p.add_argument("--episodes", type=int, default=50, help="seeded evaluation episodes per variant (default: 50)")
    p.add_argument("--scales", type=float, nargs="+", default=[0.1, 1.0], help="guidance scales (default: 0.1 1.0)")
    p.add_argument("--candidates", type=int, default=16, help="candidates for ranking (default: 16; Diffuser: 64)")
    p.add_argument("--seed", type=int, default=1000, help="seed of the first evaluation episode (default: 1000)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--quick", action="store_true", help="20 episodes of data, a tiny planner, 1 evaluation episode")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train = ["--horizon", "16", "--action-weight", "10", "--no-progress"]
    if args.quick:
        tmp = Path(tempfile.mkdtemp(prefix="planning_value_guidance_"))
        args.run_dir = tmp if args.run_dir == Path("runs/planning-value-guidance") else args.run_dir
        args.out = tmp / "results" if args.out == RESULTS else args.out
        args.data_episodes, args.max_steps, args.aux_steps, args.episodes = 20, 10, 10, 1
        args.scales, args.candidates, args.train_seeds = args.scales[:1], 4, args.train_seeds[:1]
        train = ["--horizon", "8", "--dim", "8", "--dim-mults", "1,2", "--diffusion-steps", "8", "--batch-size", "8",
                 "--no-progress"]
    start = time.perf_counter()
    data_path = args.run_dir / "data.hdf5"
    if data_path.is_file():
        recorded = load_d4rl_hdf5(data_path)
        levels = [LEVELS[k % len(LEVELS)] for k in range(len(recorded.episodes()))]  # MixedPolicy's order
        data = data_returns(recorded, levels)
    else:
        data = record_data(data_path, args.data_episodes, seed=0)
    print(f"data: {data['episodes']} episodes, mean return {data['all'][0]:.2f} ± {data['all'][1]:.2f}; "
          + ", ".join(f"{lv} {data[lv][0]:.1f}" for lv in LEVELS if lv in data), flush=True)

    checkpoints = list(args.checkpoint or [])
    if not checkpoints:
        for seed in args.train_seeds:
            out = args.run_dir / f"seed{seed}"
            argv_train = ["--env", ENV, "--dataset", str(data_path), "--value", "--seed", str(seed),
                          "--max-steps", str(args.max_steps), "--aux-steps", str(args.aux_steps),
                          "--eval-episodes", "0", "--output-dir", str(out), *train]
            if planner_train.main(argv_train) != 0:
                raise RuntimeError(f"training failed: {argv_train}")
            checkpoints.append(str(out / "checkpoint"))

    env = make_env(ENV)
    space = env.action_space
    env.close()
    variants = {"unguided": {}}
    for scale in args.scales:
        variants[f"guided (scale {scale:g})"] = {"value_guidance": scale}
    variants[f"ranked ({args.candidates})"] = {"num_candidates": args.candidates}
    variants[f"guided (scale {args.scales[0]:g}) + ranked ({args.candidates})"] = {
        "value_guidance": args.scales[0], "num_candidates": args.candidates}
    references = {"expert controller": ReachingController(), "random": RandomPolicy(space, args.seed)}

    per_variant: dict[str, list] = {}
    for name, policy in references.items():
        per_variant[name] = [summarize(evaluate(policy, ENV, episodes=args.episodes, seed=args.seed))]
    for ckpt in checkpoints:
        for name, overrides in variants.items():
            planner = DiffusionPlanner.load(ckpt, env=ENV, device="cpu", seed=args.seed, **overrides)
            stats = summarize(evaluate(planner, ENV, episodes=args.episodes, seed=args.seed))
            per_variant.setdefault(name, []).append(stats)
            print(f"{Path(ckpt).parent.name} {name}: {stats['mean_return']:.2f} ± {stats['se_return']:.2f}", flush=True)

    rows = [f"| data average ({data['episodes']} episodes) | {data['all'][0]:.2f} ± {data['all'][1]:.2f} | - |"]
    summary = {}
    for name, runs in per_variant.items():
        means = [r["mean_return"] for r in runs]
        if len(runs) > 1:
            mean, se = mean_se(means)
        else:
            mean, se = runs[0]["mean_return"], runs[0]["se_return"]
        summary[name] = {"mean_return": mean, "se": se, "per_seed": runs}
        rows.append(f"| {name} | {mean:.2f} ± {se:.2f} | {len(runs)} |")
    wall = time.perf_counter() - start
    payload = {"env": ENV, "data": data, "checkpoints": checkpoints, "episodes": args.episodes,
               "first_seed": args.seed, "variants": {k: v for k, v in variants.items()}, "results": summary,
               "quick": args.quick, "wall_time_s": round(wall, 1)}
    table = "\n".join([
        f"# Value guidance on {ENV} ({args.episodes} seeded episodes per variant and training seed)",
        "",
        "| policy | return (± SE) | training seeds |",
        "|---|---|---|",
        *rows,
        "",
        "Data of mixed quality, one policy per episode: " + ", ".join(
            f"{lv} {data[lv][0]:.1f}" for lv in LEVELS if lv in data) + f". Wall time {wall:.0f} s.",
        "",
    ])
    path = record("planning_value_guidance", payload, args.out, table)
    print(table)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
