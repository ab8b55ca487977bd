"""Train a Diffuser-style trajectory planner for a Gymnasium environment with diffkit.

For the PointMaze mazes the data is recorded on the spot by the BFS waypoint expert (one long
stream with goals resampled on arrival, like D4RL's maze2d), unless --dataset gives a D4RL
HDF5 file or a Minari dataset. The diffusion model learns [action, observation] windows of
the preset's horizon with the current state and the window's end given clean; a value
network (--value) and an inverse-dynamics model (--inverse-dynamics) are trained when asked.
A few evaluation episodes follow training. The presets (one per maze, and a generic one for
other environments) are sized for a CPU.

    python recipes/planner_train.py --env PointMaze_UMaze-v3
    python recipes/planner_train.py --env PointMaze_Medium-v3 --value --inverse-dynamics
    python recipes/planner_train.py --env PointMaze_Large-v3 --dataset minari:D4RL/pointmaze/large-v2
    python recipes/planner_train.py --env PointMaze_UMaze-v3 --dataset runs/umaze-expert.hdf5
    python recipes/planner_train.py --env Hopper-v5 --dataset hopper.hdf5 --value
    torchrun --nproc_per_node 4 recipes/planner_train.py --env PointMaze_Large-v3

Every run writes to --output-dir: data.hdf5 (the recorded data, reused by later runs),
checkpoint/ (resumed automatically when the same command runs again), value/ and
inverse_dynamics/ (their own runs), tensorboard/ logs and eval.json. --export DIR writes the
compact planner checkpoint (EMA weights, value and inverse-dynamics networks inside) with the
command, seed, hardware and wall time recorded: the form shipped checkpoints take, loaded by
DiffusionPlanner.load(DIR). The export is then calibrated as `diffkit calibrate` does (sampler
grids for --calibrate-steps, the model's statistics); --no-calibrate skips it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import diffkit
from diffkit import distributed
from diffkit.runs import (
    add_calibrate_arguments,
    add_flow_argument,
    add_training_arguments,
    apply_flow,
    flow_time_scale,
    calibrate_export,
    export_checkpoint,
    hardware_summary,
    is_main_process,
    positive_int,
    train_config,
    usage_errors,
)
from diffkit.trainer import TrainConfig, Trainer

from modalities.planning.data import (
    Normalizer,
    d4rl_maze2d_to_pointmaze,
    TrajectoryWindows,
    TransitionPairs,
    collect,
    load_d4rl_hdf5,
    load_dataset,
)
from modalities.planning.maze import MazeGrid, WaypointExpert, is_maze_env, make_env
from modalities.planning.model import InverseDynamics, TemporalUNet, ValueNet
from modalities.planning.training import (
    NormalisedValues,
    inverse_dynamics_loss,
    planner_config,
    planner_diffusion,
    side_files_of,
    value_loss_fn,
)

_MAZE = dict(dim=32, dim_mults=(1, 2, 4), prediction="x0", schedule="cosine", batch_size=32, lr=2e-4,
             warmup_steps=500, ema_decay=0.995, sampler="ddim", sample_steps=10, replan_every=None,
             action_source="path", num_candidates=16, replan_distance=0.6, stall_steps=20,
             loop_radius=0.5, discount=0.99, save_every=2000, eval_episodes=5)
# Acting, from observations and the goal only (no map): following the plan's route at the
# controller's pace instead of tracking its schedule, skipping loops where the route comes back
# within 0.5 of the ball; 16 candidate plans ranked by the model's own denoising error; a fresh
# plan when the ball is lost (0.6 from the route) or stuck (20 steps without moving 0.1). benchmarks/planning_maze.py scores these defaults beside
# Diffuser's way of acting on the same model (one plan tracked on its schedule) and beside the
# known-map opt-in (DiffusionPlanner(..., known_map=True)).
PRESETS: dict[str, dict[str, Any]] = {
    "PointMaze_UMaze-v3": dict(_MAZE, horizon=32, every=4, diffusion_steps=64, collect_steps=200_000,
                               max_steps=16_000),
    "PointMaze_Medium-v3": dict(_MAZE, horizon=32, every=8, diffusion_steps=128, collect_steps=400_000,
                                max_steps=16_000),
    "PointMaze_Large-v3": dict(_MAZE, horizon=48, every=8, diffusion_steps=128, collect_steps=600_000,
                               max_steps=16_000),
    # Any other environment (a --dataset is then required): Diffuser's locomotion settings,
    # replanning every step from the plan's own first action.
    "generic": dict(dim=32, dim_mults=(1, 2, 4), prediction="eps", schedule="cosine", batch_size=32, lr=2e-4,
                    warmup_steps=500, ema_decay=0.995, sampler="ddim", sample_steps=10, replan_every=1,
                    action_source="plan", discount=0.99, save_every=2000, eval_episodes=3, horizon=32, every=1,
                    diffusion_steps=20, collect_steps=0, max_steps=50_000),
}
for _dense in ("UMaze", "Medium", "Large"):
    PRESETS[f"PointMaze_{_dense}Dense-v3"] = dict(PRESETS[f"PointMaze_{_dense}-v3"])


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like '1,2,4', got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like '1,2,4', got {text!r}")
    return values


def _margin(text: str) -> float:
    """A width >= 0, or 'none' (no shortcuts); -1 stands for 'none' until the flags are merged."""
    if text.lower() == "none":
        return -1.0
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a width like 0.15 or 'none', got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _replan(text: str) -> int:
    """K >= 1, or 0 for 'none' (plan once per goal); 0 becomes None once the flags are merged."""
    return 0 if text.lower() in ("none", "never", "0") else positive_int(text)


def build_parser() -> argparse.ArgumentParser:
    parts = __doc__.split("\n\n")
    p = argparse.ArgumentParser(
        prog="planner_train.py",
        description="\n\n".join([parts[0], parts[1], parts[3]]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + parts[2],
    )
    p.add_argument("--env", required=True,
                   help=f"Gymnasium environment id; presets: {', '.join(k for k in PRESETS if 'Dense' not in k)}")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="path.hdf5 (D4RL layout) or minari:<dataset id> (default for mazes: record "
                                     "with the waypoint expert)")
    g.add_argument("--collect-steps", type=positive_int, help="steps the expert records (mazes, no --dataset)")
    g = p.add_argument_group("model")
    g.add_argument("--horizon", type=positive_int, help="planned waypoints (a multiple of 2^(levels-1))")
    g.add_argument("--every", type=positive_int, help="one waypoint every K environment steps (mazes: 4 or 8; "
                                                   "a plan spans (horizon - 1) K + 1 steps)")
    g.add_argument("--dim", type=positive_int, help="U-Net width of the first level")
    g.add_argument("--dim-mults", type=_ints, help="width multipliers per level, e.g. 1,2,4 (Diffuser: 1,2,4,8)")
    g.add_argument("--diffusion-steps", type=positive_int, help="training timesteps T")
    g.add_argument("--prediction", choices=("eps", "x0", "v", "flow"), help="what the network predicts")
    add_flow_argument(g)
    g.add_argument("--action-weight", type=float, default=1.0,
                   help="loss weight of the first action (Diffuser's locomotion uses 10; default 1)")
    g.add_argument("--value", action="store_true", help="also train a value network (candidate ranking, guidance)")
    g.add_argument("--inverse-dynamics", action="store_true", help="also train an inverse-dynamics MLP")
    g = add_training_arguments(p, run_dir="runs/planner-<env>", samples=False, data_workers=False)
    g.add_argument("--aux-steps", type=positive_int, help="optimizer steps of the value / inverse-dynamics models "
                                                          "(default: half of --max-steps)")
    g = p.add_argument_group("planning defaults recorded with the model")
    g.add_argument("--sampler", choices=diffkit.SAMPLERS, help="sampler")
    g.add_argument("--sample-steps", type=positive_int, help="solver steps per plan")
    g.add_argument("--replan-every", type=_replan, help="replan every K steps, or 'none' to plan once per goal")
    g.add_argument("--replan-distance", type=float,
                   help="also replan when the position strays further than this from the plan (default: never)")
    g.add_argument("--action-source", choices=("path", "tracking", "plan", "inverse_dynamics"),
                   help="how actions come from a plan (path, tracking: mazes)")
    g.add_argument("--shortcut-margin", type=_margin,
                   help="known map only (the planner's known_map=True): steer at the furthest route point in "
                        "straight sight, with a band this wide either side free of walls (default then: 0.15)")
    g.add_argument("--loop-radius", type=_margin,
                   help="path: skip ahead to the last route point this close to the ball, cutting loops (no map); "
                        "'none': follow the route (maze presets: 0.5)")
    g.add_argument("--stall-steps", type=_replan,
                   help="replan when the ball has not moved 0.1 in this many steps, or 'none' (maze presets: 20)")
    g.add_argument("--num-candidates", type=int,
                   help="plans sampled at once, the best kept (mazes: by the model's denoising error; else by "
                        "--value)")
    g = p.add_argument_group("output")
    g.add_argument("--eval-episodes", type=int, help="seeded evaluation episodes after training (0: none)")
    g.add_argument("--export", metavar="DIR", help="after training, write the compact planner checkpoint here")
    add_calibrate_arguments(g)
    return p


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The environment's preset (or the generic one) with every given flag laid over it."""
    preset = PRESETS.get(args.env.split(":")[-1], PRESETS["generic"])
    s = dict(preset)
    for key, value in vars(args).items():
        if value is not None:
            s[key] = value
    apply_flow(s, args.prediction)
    if s["replan_every"] == 0:
        s["replan_every"] = None
    for key in ("shortcut_margin", "loop_radius"):
        if s.get(key) == -1.0:
            s[key] = None
    if s.get("stall_steps") == 0:
        s["stall_steps"] = None
    s.setdefault("output_dir", f"runs/planner-{args.env.split(':')[-1]}")
    s["maze"] = is_maze_env(args.env)
    if not s["maze"] and not s.get("dataset"):
        raise ValueError(f"{args.env} has no built-in expert to record data with: pass --dataset path.hdf5 or "
                         "--dataset minari:<id>")
    if s["action_source"] in ("tracking", "path") and not s["maze"]:
        raise ValueError(f"--action-source {s['action_source']} follows PointMaze waypoints; use plan or "
                         "inverse_dynamics")
    if s["action_source"] == "inverse_dynamics":
        s["inverse_dynamics"] = True
    if s["every"] > 1 and s["action_source"] == "plan":
        raise ValueError(f"--every {s['every']} plans every {s['every']}th step, so the plan holds no action for the "
                         "steps between: use --action-source tracking (mazes) or inverse_dynamics, or --every 1")
    multiple = 2 ** (len(s["dim_mults"]) - 1)
    if s["horizon"] % multiple:
        raise ValueError(f"--horizon {s['horizon']} must be a multiple of {multiple} for {len(s['dim_mults'])} "
                         "U-Net levels")
    if s["eval_episodes"] < 0:
        raise ValueError(f"--eval-episodes must be >= 0, got {s['eval_episodes']}")
    return s


def load_data(s: dict[str, Any], env, main_process: bool):
    """The training stream: --dataset, data.hdf5 of an earlier run, or a fresh expert recording."""
    if s.get("dataset"):
        traj = load_dataset(s["dataset"])
    else:
        cached = Path(s["output_dir"]) / "data.hdf5"
        if cached.is_file():
            traj = load_d4rl_hdf5(cached)
        else:
            # One long continuing stream, goals resampled on arrival: D4RL's maze2d recipe.
            stream = make_env(s["env"], continuing_task=True, reset_target=True, max_episode_steps=s["collect_steps"])
            traj = collect(stream, WaypointExpert(MazeGrid.from_env(stream)), steps=s["collect_steps"], seed=s["seed"],
                           path=cached if main_process else None, progress=main_process and not s["no_progress"])
            stream.close()
    obs_space = env.observation_space
    box = obs_space["observation"] if hasattr(obs_space, "spaces") and "observation" in obs_space.spaces else obs_space
    if traj.observation_dim != int(np.prod(box.shape)) or traj.action_dim != int(np.prod(env.action_space.shape)):
        raise ValueError(f"the dataset has observations of {traj.observation_dim} and actions of {traj.action_dim} "
                         f"values, but {s['env']} has {box.shape} and {env.action_space.shape}")
    if s["maze"]:
        # The ball's radius lets it graze wall cells a little; far fewer than this means another maze
        # or another frame: D4RL's maze2d files put (x, y) at (row, column), not PointMaze's x-right,
        # y-up, and are converted when that fits.
        grid = MazeGrid.from_env(env)
        share = grid.fraction_free(traj.observations[:, :2])
        if share < 0.9 and s.get("dataset"):
            converted = d4rl_maze2d_to_pointmaze(traj, grid)
            converted_share = grid.fraction_free(converted.observations[:, :2])
            if converted_share >= 0.9:
                if main_process:
                    print(f"{s['dataset']}: D4RL maze2d (row, column) coordinates, converted to PointMaze's frame "
                          f"({100 * converted_share:.0f}% of positions in free cells)")
                traj, share = converted, converted_share
        if share < 0.9:
            raise ValueError(f"only {100 * share:.0f}% of the dataset's positions lie in free cells of {s['env']}: "
                             "the data come from another maze or another coordinate frame (D4RL's maze2d files "
                             "use (row, column) coordinates; Minari's D4RL/pointmaze datasets match PointMaze v3)")
    return traj


def planner_train_config(s: dict[str, Any], output_dir: Path, max_steps: int) -> TrainConfig:
    """The run's training settings for one of its networks (the diffusion model, the value or the
    inverse dynamics), each with its own step count and directory."""
    return train_config(s, max_steps=max_steps, warmup_steps=min(s["warmup_steps"], max_steps),
                        output_dir=str(output_dir), sample_every=0, log_every=min(100, max_steps))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    # Up to three Trainers run one after the other: the recipe owns the torchrun process group,
    # so that no Trainer tears it down under the next one.
    owns_group = distributed.init_distributed(distributed.device_for_rank(diffkit.resolve_device(args.device)))
    try:
        return _main(argv, parser, args)
    finally:
        if owns_group:
            distributed.cleanup()


def _main(argv: list[str], parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    main_process = is_main_process()  # torchrun starts one process per device
    start = time.perf_counter()
    with usage_errors(parser):
        s = resolve_settings(args)
        out = Path(s["output_dir"])
        env = make_env(s["env"])
        maze = MazeGrid.from_env(env) if s["maze"] else None
        traj = load_data(s, env, main_process)
        normalizer = Normalizer.fit(traj.transitions(), kind="limits")
        windows = TrajectoryWindows(traj, s["horizon"], normalizer, condition_on_end=s["maze"],
                                    discount=s["discount"] if s["value"] else None, every=s["every"])
        diffusion = planner_diffusion(s["diffusion_steps"], s["prediction"], s["schedule"])
        aux_steps = s.get("aux_steps") or max(1, s["max_steps"] // 2)
        side_files: dict[str, bytes] = {}
        value_normalizer = None
        trainers = []

        if s["value"]:
            value_normalizer = Normalizer.fit(windows.values.numpy()[:, None], kind="gaussian")
            diffkit.seed_everything(s["seed"])  # same seed, same initial weights
            kwargs = dict(transition_dim=windows.transition_dim, dim=s["dim"], dim_mults=list(s["dim_mults"]))
            trainers.append(("value", Trainer(
                ValueNet(**kwargs), None, NormalisedValues(windows, value_normalizer),
                planner_train_config(s, out / "value", aux_steps), loss_fn=value_loss_fn(diffusion),
                modality="planning",
                model_config={"class": "modalities.planning.model.ValueNet", "kwargs": kwargs})))
        if s.get("inverse_dynamics"):
            diffkit.seed_everything(s["seed"])
            kwargs = dict(observation_dim=traj.observation_dim, action_dim=traj.action_dim)
            trainers.append(("inverse_dynamics", Trainer(
                InverseDynamics(**kwargs), None, TransitionPairs(traj, normalizer),
                planner_train_config(s, out / "inverse_dynamics", aux_steps), loss_fn=inverse_dynamics_loss,
                modality="planning",
                model_config={"class": "modalities.planning.model.InverseDynamics", "kwargs": kwargs})))
        for _, trainer in trainers:
            trainer.resume()  # a run directory of another kind is a usage error, found before training

    for name, trainer in trainers:
        aux_start = time.perf_counter()
        trainer.train()
        if main_process:  # only rank 0 writes checkpoints, so only it carries the side files
            compact = export_checkpoint(
                trainer.checkpoint_dir, out / name / "export", modality="planning",
                command=["recipes/planner_train.py", *argv], seed=s["seed"],
                wall_time_s=time.perf_counter() - aux_start, device=trainer.device,
                final_loss=trainer.history[-1]["loss"] if trainer.history else None)
            side_files.update(side_files_of(compact, name))

    # A few-step solver needs no more steps than the model has training timesteps.
    defaults = {"sampler": s["sampler"], "steps": min(s["sample_steps"], s["diffusion_steps"]),
                "replan_every": s["replan_every"], "replan_distance": s.get("replan_distance"),
                "action_source": s["action_source"], "warm_start_strength": 0.5,
                "num_candidates": s.get("num_candidates", 1)}
    if s["maze"]:
        defaults["stall_steps"] = s.get("stall_steps")
    if s["action_source"] == "path":
        defaults["loop_radius"] = s.get("loop_radius")
        if s.get("shortcut_margin") is not None:
            defaults["shortcut_margin"] = s["shortcut_margin"]  # used only with known_map=True
    modality_config = planner_config(
        env_id=s["env"].split(":")[-1], traj=traj, normalizer=normalizer, horizon=s["horizon"], maze=maze,
        action_low=env.action_space.low, action_high=env.action_space.high, defaults=defaults,
        value_normalizer=value_normalizer, inverse_dynamics=bool(s.get("inverse_dynamics")),
        data=s.get("dataset") or f"waypoint expert, {len(traj)} steps, seed {s['seed']}", every=s["every"])
    kwargs = dict(transition_dim=windows.transition_dim, dim=s["dim"], dim_mults=list(s["dim_mults"]),
                  **flow_time_scale(s["schedule"]))
    loss_kwargs = None
    if s["action_weight"] != 1.0:
        weight = torch.ones(windows.transition_dim, s["horizon"])
        weight[: traj.action_dim, 0] = s["action_weight"]
        loss_kwargs = {"weight": weight}
    with usage_errors(parser):
        diffkit.seed_everything(s["seed"])  # before building: the same seed gives the same weights
        net = TemporalUNet(**kwargs)
        trainer = Trainer(net, diffusion, windows, planner_train_config(s, out, s["max_steps"]), modality="planning",
                          model_config={"class": "modalities.planning.model.TemporalUNet", "kwargs": kwargs},
                          modality_config=modality_config, side_files=side_files or None, loss_kwargs=loss_kwargs)
        trainer.resume()
    if main_process:
        n_params = sum(p.numel() for p in net.parameters())
        print(f"{s['env']}: {len(traj)} steps in {len(windows.episodes)} episode(s), {len(windows)} windows of "
              f"{s['horizon']} waypoints every {s['every']} step(s) ({windows.span} steps); temporal U-Net "
              f"{n_params / 1e6:.2f}M parameters; {diffusion!r}")
    first_step, train_start = trainer.step, time.perf_counter()
    trainer.train()
    train_wall = time.perf_counter() - train_start
    wall = time.perf_counter() - start
    if not main_process:
        return 0
    print(f"trained to step {trainer.step} in {wall:.0f} s; checkpoint: {trainer.checkpoint_dir}")
    results = None

    if s["eval_episodes"] > 0:
        from modalities.planning.planner import DiffusionPlanner, evaluate

        planner = DiffusionPlanner.load(trainer.checkpoint_dir, env=s["env"], device=s["device"], seed=s["seed"])
        env_kwargs = {"continuing_task": True} if s["maze"] else {}
        results = evaluate(planner, s["env"], episodes=s["eval_episodes"], seed=s["seed"],
                           progress=not s["no_progress"], **env_kwargs)
        (out / "eval.json").write_text(json.dumps(results, indent=2))
        print(f"evaluation: mean return {results['mean_return']:.1f}, success {100 * results['success_rate']:.0f}% "
              f"over {s['eval_episodes']} episodes, {results['actions_per_second']:.0f} actions/s")
    if args.export:
        # The run's checkpoint carries the value / inverse-dynamics side files; the export copies them.
        path = export_checkpoint(trainer.checkpoint_dir, args.export, modality="planning",
                                 command=["recipes/planner_train.py", *argv], seed=s["seed"], wall_time_s=wall,
                                 device=trainer.device, defaults=defaults,
                                 final_loss=trainer.history[-1]["loss"] if trainer.history else None)
        card = model_card(s, argv, traj=traj, windows=windows, n_params=n_params,
                          trainer=trainer, steps_run=trainer.step - first_step, train_wall=train_wall, wall=wall,
                          results=results)
        (path / "README.md").write_text(card)
        print(f"exported {path} (model card: README.md)")
        calibrate_export(path, args, trainer.device)
    return 0


def model_card(s: dict[str, Any], argv: list[str], *, traj, windows, n_params: int, trainer,
               steps_run: int, train_wall: float, wall: float, results) -> str:
    """The README.md of an exported planner: how it was made, with what, and how it did."""
    env_id = s["env"].split(":")[-1]
    rate = f"{steps_run / train_wall:.1f} steps/s" if steps_run and train_wall > 0 else "resumed, no new steps"
    loss = trainer.history[-1]["loss"] if trainer.history else None
    side = [name for name, on in (("value (ValueNet)", s["value"]),
                                  ("inverse dynamics (MLP)", s.get("inverse_dynamics"))) if on]
    loop = s.get("loop_radius")
    shortcuts = f" (loops cut within {loop:g})" if s["action_source"] == "path" and loop is not None else ""
    lines = [
        f"# {env_id}: Diffuser-style planner",
        "",
        f"Used by `DiffusionPlanner.load({env_id!r})` (and `diffkit rollout planning --env {env_id}`).",
        "",
        "## How it was made",
        "",
        "```",
        "python " + " ".join(["recipes/planner_train.py", *argv]),
        "```",
        "",
        "| | |",
        "|---|---|",
        f"| data | {s.get('dataset') or 'BFS waypoint expert, one continuing stream with goals resampled on arrival'}: "
        f"{len(traj):,} steps, seed {s['seed']} |",
        f"| plans | {s['horizon']} waypoints every {s['every']} step(s) = {windows.span} steps, start and "
        f"{'goal' if s['maze'] else 'no end'} inpainted |",
        f"| network | `TemporalUNet` dim {s['dim']} x {tuple(s['dim_mults'])}; {n_params:,} parameters |",
        f"| side networks | {', '.join(side) or 'none'} |",
        f"| diffusion | {s['schedule']} schedule, "
        f"T = {s['diffusion_steps']}, {s['prediction']} prediction |",
        f"| training | {trainer.step:,} steps, batch {s['batch_size']}, AdamW lr {s['lr']:g} "
        f"({min(s['warmup_steps'], s['max_steps'])} warm-up), EMA {s['ema_decay']}"
        f"{'' if s.get('ema_warmup') is False else ' with warm-up'}, seed {s['seed']} |",
        f"| hardware | {hardware_summary()} |",
        f"| wall time | {wall:.0f} s for this command ({rate} in training); final loss "
        f"{'-' if loss is None else f'{loss:.4f}'} |",
        "| weights | EMA, float16 |",
        f"| sampling defaults | {s['sampler']} {min(s['sample_steps'], s['diffusion_steps'])} steps, "
        f"{'plan once per goal' if s['replan_every'] is None else 'replan every %d steps' % s['replan_every']}, "
        f"actions by {s['action_source']}"
        f"{shortcuts}"
        f"{', best of %d candidates' % s['num_candidates'] if s.get('num_candidates', 1) > 1 else ''}"
        f"{', replan when %g off the route' % s['replan_distance'] if s.get('replan_distance') else ''}"
        f"{', or stuck for %d steps' % s['stall_steps'] if s['maze'] and s.get('stall_steps') else ''}; "
        "no map read (known_map=True opts in) |",
        "",
    ]
    if results is not None:
        last = s["seed"] + len(results["episodes"]) - 1
        lines += ["## Measured after training", "",
                  f"{len(results['episodes'])} seeded episodes (seeds {s['seed']}..{last}"
                  f"{', continuing_task=True' if s['maze'] else ''}): mean return {results['mean_return']:.1f} "
                  f"(std {results['std_return']:.1f}), success {100 * results['success_rate']:.0f}%, "
                  f"{results['actions_per_second']:.0f} actions/s. The benchmarks in `benchmarks/planning_*.py` "
                  "measure it at length.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
