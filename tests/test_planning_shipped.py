"""The shipped maze planners (modalities/planning/checkpoints/<env id>/), each checked only when it
is there: found by environment id, made by the recipe's preset, recorded how, and planning from
the current state to the goal."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gymnasium_robotics")

from modalities.planning.maze import hidden_inner_walls, make_env  # noqa: E402
from modalities.planning.planner import CHECKPOINTS_DIR, DiffusionPlanner, evaluate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from planner_train import PRESETS  # noqa: E402

MAZES = ("PointMaze_UMaze-v3", "PointMaze_Medium-v3", "PointMaze_Large-v3")


@pytest.mark.parametrize("env_id", MAZES)
def test_shipped_planner(env_id):
    directory = CHECKPOINTS_DIR / env_id
    if not (directory / "config.json").is_file():
        pytest.skip(f"no shipped planner for {env_id} yet (recipes/planner_train.py --env {env_id} --export {directory})")
    config = json.loads((directory / "config.json").read_text())
    assert config["modality"] == "planning" and set(config["checksums"]) >= {"model.safetensors"}
    record = config["extra"]
    assert record["recipe"].startswith("python recipes/planner_train.py --env " + env_id)
    assert record["hardware"] and record["wall_time_s"] > 0 and "EMA" in record["weights"]
    assert (directory / "README.md").is_file(), "a shipped planner needs its model card"

    env = make_env(env_id, continuing_task=True)
    planner = DiffusionPlanner.load(env_id, env=env, device="cpu", seed=0)  # found by its id
    assert planner.path == directory and planner.env_id == env_id
    preset = PRESETS[env_id]
    assert (planner.horizon, planner.every) == (preset["horizon"], preset["every"])
    assert planner.replan_every is None
    assert (planner.action_source, planner.num_candidates, planner.replan_distance) == (
        preset["action_source"], preset["num_candidates"], preset["replan_distance"])
    assert (planner.stall_steps, planner.loop_radius) == (preset["stall_steps"], preset["loop_radius"])
    # Its defaults read no map; the known map is an opt-in.
    assert not planner.known_map and planner.shortcut_margin is None and planner.candidate_score == "consistency"
    assert DiffusionPlanner.load(env_id, device="cpu", known_map=True).candidate_score == "free_space"
    obs, _ = env.reset(seed=0)
    plan = planner.plan(obs)
    np.testing.assert_array_equal(plan.states[0], obs["observation"])
    np.testing.assert_allclose(plan.states[-1, :2], obs["desired_goal"], atol=1e-4)
    env.close()
    # Reaching the goal with the defaults it ships with, the map hidden as an outside judge hides
    # it (benchmarks/planning_maze.py scores it at length).
    with hidden_inner_walls():
        hidden = DiffusionPlanner.load(env_id, env=env_id, device="cpu", seed=0)
        assert not hidden.maze.walls[1:-1, 1:-1].any()
        results = evaluate(hidden, env_id, episodes=2, seed=1000, continuing_task=True)
    assert results["success_rate"] == 1.0, results["episodes"]
