"""recipes/planner_train.py: resume, seeding, evaluation, help and usage errors (the full run
with value, inverse dynamics and export is in test_planning_planner.py)."""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gymnasium_robotics")

from diffkit.checkpoint import load_checkpoint  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import planner_train  # noqa: E402

TINY = ["--env", "PointMaze_UMaze-v3", "--collect-steps", "600", "--horizon", "8", "--dim", "8",
        "--dim-mults", "1,2", "--diffusion-steps", "8", "--batch-size", "4", "--save-every", "2", "--no-progress", "--no-calibrate"]


def test_recipe_resumes_reuses_its_data_and_evaluates(tmp_path):
    out = tmp_path / "run"
    assert planner_train.main([*TINY, "--max-steps", "2", "--eval-episodes", "0", "--output-dir", str(out)]) == 0
    assert (out / "data.hdf5").is_file() and any((out / "tensorboard").iterdir())
    first = load_checkpoint(out / "checkpoint", modality="planning")
    assert first.step == 2
    config = first.config["modality_config"]
    assert config["env_id"] == "PointMaze_UMaze-v3" and config["horizon"] == 8 and config["maze"]["walls"]
    assert config["observation_dim"] == 4 and len(config["normalizer"]["shift"]) == 6
    defaults = config["defaults"]
    assert defaults["action_source"] == "path" and "shortcut_margin" not in defaults  # no map read by default
    assert defaults["stall_steps"] == 20 and defaults["loop_radius"] == 0.5 and not defaults.get("known_map")
    data_time = (out / "data.hdf5").stat().st_mtime_ns
    # The same command with more steps continues from step 2 and reuses the recorded data.
    assert planner_train.main([*TINY, "--max-steps", "4", "--eval-episodes", "1", "--output-dir", str(out)]) == 0
    assert load_checkpoint(out / "checkpoint").step == 4
    assert (out / "data.hdf5").stat().st_mtime_ns == data_time
    results = json.loads((out / "eval.json").read_text())
    assert len(results["episodes"]) == 1 and results["steps"] == 300


def test_same_seed_same_weights(tmp_path):
    runs = []
    for name in ("a", "b"):
        assert planner_train.main([*TINY, "--max-steps", "1", "--eval-episodes", "0", "--seed", "7",
                                   "--output-dir", str(tmp_path / name)]) == 0
        runs.append(load_checkpoint(tmp_path / name / "checkpoint").model_state)
    for key in runs[0]:
        torch.testing.assert_close(runs[0][key], runs[1][key])


def test_help_explains_itself(capsys):
    with pytest.raises(SystemExit) as exit_info:
        planner_train.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--env", "--dataset", "minari:", "torchrun", "--export", "--value", "PointMaze_Large-v3"):
        assert needle in text


@pytest.mark.parametrize("argv,message", [
    (["--env", "Hopper-v5"], "no built-in expert"),
    (["--env", "PointMaze_UMaze-v3", "--horizon", "10", "--dim-mults", "1,2,4"], "multiple of 4"),
    (["--env", "PointMaze_Nowhere-v3"], "cannot make environment"),
    (["--env", "PointMaze_UMaze-v3", "--dataset", "data.csv"], "unknown dataset"),
    (["--env", "PointMaze_UMaze-v3", "--dim-mults", "1,x"], "expected integers"),
    (["--env", "PointMaze_UMaze-v3", "--shortcut-margin", "wide"], "expected a width"),
])
def test_bad_input_is_a_usage_error_without_traceback(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        planner_train.main([*argv, "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "planner_train.py: error:" in err and message in err and "Traceback" not in err


def test_data_from_another_maze_are_refused(tmp_path, capsys):
    from modalities.planning.data import collect
    from modalities.planning.maze import MazeGrid, WaypointExpert, make_env

    env = make_env("PointMaze_Large-v3", continuing_task=True, reset_target=True, max_episode_steps=400)
    collect(env, WaypointExpert(MazeGrid.from_env(env)), steps=400, path=tmp_path / "large.hdf5")
    env.close()
    with pytest.raises(SystemExit):
        planner_train.main(["--env", "PointMaze_UMaze-v3", "--dataset", str(tmp_path / "large.hdf5"),
                            "--output-dir", str(tmp_path / "run")])
    assert "lie in free cells of PointMaze_UMaze-v3" in capsys.readouterr().err


def test_recipe_trains_any_environment_from_a_dataset(tmp_path):
    import gymnasium as gym

    from modalities.planning.data import collect
    from modalities.planning.planner import DiffusionPlanner

    env = gym.make("Pendulum-v1", max_episode_steps=50)
    env.action_space.seed(0)
    collect(env, lambda obs: env.action_space.sample(), steps=200, path=tmp_path / "pendulum.hdf5")
    env.close()
    out = tmp_path / "run"
    assert planner_train.main(["--env", "Pendulum-v1", "--dataset", str(tmp_path / "pendulum.hdf5"),
                               "--horizon", "8", "--dim", "8", "--dim-mults", "1,2", "--diffusion-steps", "8",
                               "--sample-steps", "2", "--batch-size", "4", "--max-steps", "2", "--value",
                               "--aux-steps", "2", "--eval-episodes", "1", "--output-dir", str(out),
                               "--no-progress"]) == 0
    results = json.loads((out / "eval.json").read_text())
    assert results["steps"] == 200  # Pendulum's own 200-step limit, one action per step
    planner = DiffusionPlanner.load(out / "checkpoint", env="Pendulum-v1", device="cpu", num_candidates=2)
    assert planner.maze is None and planner.replan_every == 1 and planner.action_source == "plan"
    obs, _ = gym.make("Pendulum-v1").reset(seed=0)
    action = planner.act(obs)
    assert action.shape == (1,) and -2.0 <= float(action[0]) <= 2.0  # Pendulum's torque bounds


def test_d4rl_maze2d_frame_is_converted(tmp_path, capsys):
    """A D4RL maze2d-layout file ((row, col) frame) trains after conversion to PointMaze's frame."""
    import numpy as np

    from modalities.planning.data import D4RL_BALL_OFFSET, Trajectories, collect, save_d4rl_hdf5
    from modalities.planning.maze import MazeGrid, WaypointExpert, make_env

    env = make_env("PointMaze_UMaze-v3", continuing_task=True, reset_target=True, max_episode_steps=300)
    grid = MazeGrid.from_env(env)
    traj = collect(env, WaypointExpert(grid), steps=300)
    env.close()

    def to_d4rl(xy):  # PointMaze (x right, y up) -> D4RL (row, col) qpos
        return np.stack([(grid.y_center - xy[:, 1]) - 0.5 - D4RL_BALL_OFFSET,
                         (xy[:, 0] + grid.x_center) - 0.5 - D4RL_BALL_OFFSET], axis=1)

    def rotate_back(v):
        return np.stack([-v[:, 1], v[:, 0]], axis=1)

    obs = np.concatenate([to_d4rl(traj.observations[:, :2]), rotate_back(traj.observations[:, 2:])], axis=1)
    d4rl = Trajectories(obs, rotate_back(traj.actions), traj.rewards, traj.terminals, traj.timeouts,
                        goals=to_d4rl(traj.goals))
    save_d4rl_hdf5(d4rl, tmp_path / "maze2d-umaze.hdf5")
    out = tmp_path / "run"
    assert planner_train.main(["--env", "PointMaze_UMaze-v3", "--dataset", str(tmp_path / "maze2d-umaze.hdf5"),
                               *TINY[4:], "--max-steps", "1", "--eval-episodes", "0", "--output-dir", str(out)]) == 0
    assert "converted to PointMaze's frame" in capsys.readouterr().out
    shift = load_checkpoint(out / "checkpoint").config["modality_config"]["normalizer"]["shift"]
    expected = (traj.observations.max(0) + traj.observations.min(0)) / 2
    np.testing.assert_allclose(shift[2:], expected, atol=1e-4)  # the normaliser saw PointMaze's frame


def test_waypoints_need_tracking_or_inverse_dynamics(tmp_path, capsys):
    with pytest.raises(SystemExit):
        planner_train.main([*TINY, "--every", "4", "--action-source", "plan", "--output-dir", str(tmp_path)])
    assert "holds no action for the steps between" in capsys.readouterr().err
