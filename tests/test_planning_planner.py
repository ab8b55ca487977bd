"""DiffusionPlanner end to end with a tiny model trained by recipes/planner_train.py: plans hold
the current state exactly, actions stay in the action space, batches, warm starts, candidates,
guidance, the Gymnasium wrapper, the modality and `diffkit rollout planning`, and bad input."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium_robotics")

import diffkit  # noqa: E402
from modalities.planning import DiffusionPlanner, PlannerWrapper, PlanningModality  # noqa: E402
from modalities.planning.maze import hidden_inner_walls, make_env  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import planner_train  # noqa: E402

ENV = "PointMaze_UMaze-v3"
TINY = ["--collect-steps", "2000", "--horizon", "16", "--every", "1", "--dim", "8", "--dim-mults", "1,2",
        "--diffusion-steps", "16", "--batch-size", "8", "--aux-steps", "10", "--no-progress", "--no-calibrate"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny planner with value and inverse-dynamics networks, trained and exported by the recipe."""
    root = tmp_path_factory.mktemp("planner")
    argv = ["--env", ENV, "--max-steps", "30", "--value", "--inverse-dynamics", "--eval-episodes", "0",
            "--output-dir", str(root / "run"), "--export", str(root / "export"), *TINY]
    assert planner_train.main(argv) == 0
    return root


@pytest.fixture
def env():
    env = make_env(ENV, continuing_task=True)
    yield env
    env.close()


def test_plan_holds_the_current_state_and_the_goal(trained, env):
    planner = DiffusionPlanner.load(trained / "export", env=env, device="cpu")
    obs, _ = env.reset(seed=0)
    plan = planner.plan(obs)
    assert plan.states.shape == (16, 4) and plan.actions.shape == (16, 2) and len(plan) == 16
    np.testing.assert_array_equal(plan.states[0], obs["observation"])  # exactly the current state
    np.testing.assert_allclose(plan.states[-1, :2], obs["desired_goal"], atol=1e-5)  # and the goal at rest
    np.testing.assert_allclose(plan.states[-1, 2:], 0.0, atol=1e-5)
    assert np.all(np.abs(plan.actions) <= 1) and np.ndim(plan.values) == 0 and np.isfinite(plan.values)


def test_act_returns_bounded_actions_and_is_seeded(trained, env):
    planner = DiffusionPlanner.load(trained / "export", device="cpu", seed=3)
    obs, _ = env.reset(seed=1)
    planner.reset(seed=3)
    first = planner.act(obs)
    assert first.shape == (2,) and first.dtype == np.float32 and np.all(np.abs(first) <= 1)
    planner.reset(seed=3)
    np.testing.assert_array_equal(planner(obs), first)  # __call__ is act; same seed, same plan
    for _ in range(20):
        obs, *_ = env.step(planner.act(obs))
    assert planner.plans_made == 2  # open-loop: one plan per goal (and one after the reset)


def test_batched_act_for_vector_envs(trained):
    import gymnasium as gym

    envs = gym.vector.SyncVectorEnv([lambda: make_env(ENV, continuing_task=True) for _ in range(3)])
    planner = DiffusionPlanner.load(trained / "export", device="cpu")
    obs, _ = envs.reset(seed=0)
    for _ in range(3):
        actions = planner.act(obs)
        assert actions.shape == (3, 2) and np.all(np.abs(actions) <= 1)
        obs, *_ = envs.step(actions)
    assert planner.plans_made == 3  # one plan per environment, made together
    planner.reset(mask=[True, False, False])
    planner.act(obs)
    assert planner.plans_made == 4  # only the reset one planned again
    plans = planner.plan(obs)
    assert plans.states.shape == (3, 16, 4) and plans.values.shape == (3,)
    np.testing.assert_array_equal(plans.states[:, 0], obs["observation"])
    envs.close()


def test_replanning_warm_starts_from_the_shifted_plan(trained, env):
    planner = DiffusionPlanner.load(trained / "export", device="cpu", replan_every=4, warm_start_strength=0.5,
                                    num_candidates=1)
    calls = []
    sample = planner.diffusion.sample

    def spy(*args, **kwargs):
        calls.append({k: kwargs.get(k) for k in ("start", "steps")})
        return sample(*args, **kwargs)

    planner.diffusion.sample = spy
    obs, _ = env.reset(seed=2)
    for _ in range(9):
        obs, *_ = env.step(planner.act(obs))
    assert planner.plans_made == 3
    assert calls[0]["start"] is None and calls[1]["start"].strength == 0.5  # a diffkit.starts.WarmStart
    assert calls[1]["start"].init.shape == (1, 6, 16)
    # Half the chain redone at the cold plan's step density: half the network calls.
    assert calls[0]["steps"] == 10 and calls[1]["steps"] == 5


def test_candidates_are_ranked_by_the_value(trained, env):
    planner = DiffusionPlanner.load(trained / "export", device="cpu", num_candidates=4)
    seen = []
    pick = planner.diffusion.sample_candidates

    def spy(*args, **kwargs):
        seen.append(pick(*args, **kwargs))
        return seen[-1]

    planner.diffusion.sample_candidates = spy
    obs, _ = env.reset(seed=0)
    plan = planner.plan(obs)
    scores = seen[0].scores[0]
    assert scores.shape == (4,) and torch.all(scores[:-1] >= scores[1:])
    best = planner.value_normalizer.unnormalize(scores[:1].reshape(1, 1)).item()
    assert plan.values == pytest.approx(best, rel=1e-5)
    np.testing.assert_array_equal(plan.states[0], obs["observation"])


def test_value_guidance_moves_the_plan_but_not_the_known_state(trained, env):
    obs, _ = env.reset(seed=0)
    plain = DiffusionPlanner.load(trained / "export", device="cpu", seed=0).plan(obs)
    guided = DiffusionPlanner.load(trained / "export", device="cpu", seed=0, value_guidance=10.0,
                                   guidance_stop_below=0.0).plan(obs)
    assert not np.allclose(plain.states[1:-1], guided.states[1:-1])
    np.testing.assert_array_equal(guided.states[0], obs["observation"])


def test_inverse_dynamics_and_plan_actions(trained, env):
    obs, _ = env.reset(seed=0)
    for source in ("inverse_dynamics", "plan"):
        planner = DiffusionPlanner.load(trained / "export", device="cpu", action_source=source)
        action = planner.act(obs)
        assert action.shape == (2,) and np.all(np.abs(action) <= 1)


def test_bad_input_is_refused_clearly(trained, env):
    planner = DiffusionPlanner.load(trained / "export", device="cpu")
    obs, _ = env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(4,\) or a batch \(N, 4\), got shape \(5,\)"):
        planner.act({"observation": np.zeros(5), "desired_goal": obs["desired_goal"]})
    with pytest.raises(ValueError, match="must be numbers"):
        planner.act(np.array(["a", "b", "c", "d"]), goal=obs["desired_goal"])
    with pytest.raises(ValueError, match="NaN"):
        planner.act(np.full(4, np.nan), goal=obs["desired_goal"])
    with pytest.raises(ValueError, match="goal .* lies outside the maze"):
        planner.act(obs["observation"], goal=[9.0, 0.0])
    with pytest.raises(ValueError, match="goal .* lies in a wall or outside the maze"):  # read off the map:
        DiffusionPlanner.load(trained / "export", device="cpu", known_map=True).act(
            obs["observation"], goal=[0.0, 0.0])  # the U's middle wall
    with pytest.raises(ValueError, match="plans to a goal"):
        planner.act(obs["observation"])
    with pytest.raises(ValueError, match="trained for PointMaze_UMaze-v3, not PointMaze_Medium-v3"):
        DiffusionPlanner.load(trained / "export", env="PointMaze_Medium-v3", device="cpu")
    with pytest.raises(ValueError, match="no planner checkpoint 'PointMaze_Nowhere-v3'"):
        DiffusionPlanner.load("PointMaze_Nowhere-v3")
    with pytest.raises(ValueError, match="replan_every must lie in"):
        DiffusionPlanner.load(trained / "export", device="cpu", replan_every=16)
    with pytest.raises(TypeError, match="unknown planner option"):
        DiffusionPlanner.load(trained / "export", device="cpu", horizon=8)
    with pytest.raises(diffkit.CheckpointError, match="not 'planning'"):
        DiffusionPlanner.load(Path(diffkit.__file__).parents[1] / "modalities/image/checkpoints/digits")


def test_gymnasium_wrapper_exposes_the_planner_action(trained):
    planner = DiffusionPlanner.load(trained / "export", device="cpu")
    env = PlannerWrapper(make_env(ENV, continuing_task=True, max_episode_steps=12), planner)
    obs, info = env.reset(seed=0)
    steps = 0
    while True:
        assert info["planner_action"].shape == (2,) and env.planner_action is info["planner_action"]
        obs, reward, terminated, truncated, info = env.step(info["planner_action"])
        steps += 1
        if terminated or truncated:
            break
    assert steps == 12
    env.close()
    with pytest.raises(ValueError, match="trained for PointMaze_UMaze-v3"):
        PlannerWrapper(make_env("PointMaze_Medium-v3"), planner)


def test_modality_generates_and_saves_plans(trained, tmp_path):
    modality = PlanningModality()
    samples = modality.generate(checkpoint=trained / "export", num_samples=3, seed=0, device="cpu", steps=4)
    assert len(samples) == 3 and samples.plans.states.shape == (3, 16, 4)
    np.testing.assert_array_equal(samples.plans.states[:, 0], samples.starts)
    fixed = modality.generate(checkpoint=trained / "export", num_samples=2, seed=0, device="cpu", start=[0.5, 1.0],
                              goal=[-1.0, -1.0])
    np.testing.assert_array_equal(fixed.plans.states[:, 0], [[0.5, 1.0, 0.0, 0.0]] * 2)
    np.testing.assert_allclose(fixed.plans.states[:, -1, :2], [[-1.0, -1.0]] * 2, atol=1e-5)
    with pytest.raises(ValueError, match="lies in a wall"):
        modality.generate(checkpoint=trained / "export", num_samples=1, device="cpu", start=[0.0, 0.0])
    written = modality.save(samples, tmp_path / "plans.png")
    assert [p.name for p in written] == ["plans.png", "plans.json"]
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads(written[1].read_text())["states"]) == 3
    with pytest.raises(ValueError, match="steps must be a whole number >= 1"):
        modality.generate(checkpoint=trained / "export", steps=0)
    with pytest.raises(ValueError, match="needs --checkpoint"):
        modality.generate()
    assert isinstance(modality.policy(checkpoint=trained / "export", device="cpu"), diffkit.registry.Policy)


def test_rollout_command_writes_results_and_plots(trained, tmp_path, capsys):
    from diffkit import cli
    from diffkit.registry import register_modality, unregister_modality

    register_modality("planning", PlanningModality)
    try:
        out = tmp_path / "rollouts"
        status = cli.main(["rollout", "planning", "--env", ENV, "--checkpoint", str(trained / "export"),
                           "--episodes", "2", "--out", str(out), "--device", "cpu", "--no-progress"])
        assert status == 0
        results = json.loads((out / "results.json").read_text())
        assert len(results["episodes"]) == 2 and 0 <= results["success_rate"] <= 1
        assert results["steps"] == 600 and results["actions_per_second"] > 0
        assert (out / "episode_000.png").read_bytes()[:4] == b"\x89PNG"
        status = cli.main(["rollout", "planning", "--env", ENV, "--expert", "--episodes", "1",
                           "--out", str(tmp_path / "expert"), "--no-progress"])
        assert status == 0
        assert json.loads((tmp_path / "expert" / "results.json").read_text())["success_rate"] == 1.0
        assert cli.main(["rollout", "planning", "--env", "PointMaze_Medium-v3", "--checkpoint",
                         str(trained / "export"), "--out", str(tmp_path / "x")]) == 1
        assert "trained for PointMaze_UMaze-v3" in capsys.readouterr().err
        # `diffkit generate planning` with the modality's own options, and the policy lookup.
        assert cli.main(["generate", "planning", "--checkpoint", str(trained / "export"), "--num-samples", "2",
                         "--goal", "1.0,1.0", "--device", "cpu", "--out", str(tmp_path / "gen" / "plans.png"),
                         "--no-progress"]) == 0
        plans = json.loads((tmp_path / "gen" / "plans.json").read_text())
        assert plans["goals"] == [[1.0, 1.0], [1.0, 1.0]] and len(plans["states"][0]) == 16
        policy = diffkit.registry.load_policy("planning", checkpoint=trained / "export", device="cpu")
        assert isinstance(policy, DiffusionPlanner)
    finally:
        unregister_modality("planning")


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    """A tiny planner of waypoints every 4 steps (the maze presets' subsampling)."""
    root = tmp_path_factory.mktemp("sparse")
    argv = ["--env", ENV, "--max-steps", "2", "--eval-episodes", "0", "--output-dir", str(root / "run"),
            *TINY[:4], "--every", "4", *TINY[6:]]
    assert planner_train.main(argv) == 0
    return root / "run" / "checkpoint"


def test_waypoint_plans_are_interpolated_to_every_step(sparse, env):
    planner = DiffusionPlanner.load(sparse, env=env, device="cpu")
    assert planner.horizon == 16 and planner.every == 4 and planner.span == 61
    obs, _ = env.reset(seed=0)
    plan = planner.plan(obs)
    assert plan.states.shape == (61, 4) and plan.actions.shape == (61, 2) and plan.waypoints.shape == (16, 4)
    np.testing.assert_array_equal(plan.states[::4], plan.waypoints)  # the drawn waypoints, every 4th step
    np.testing.assert_allclose(plan.states[1], 0.75 * plan.waypoints[0] + 0.25 * plan.waypoints[1])
    np.testing.assert_array_equal(plan.states[0], obs["observation"])
    np.testing.assert_allclose(plan.states[-1, :2], obs["desired_goal"], atol=1e-5)
    # Open-loop tracking over the interpolated plan: one plan for 61 steps and beyond.
    planner.reset()
    for _ in range(70):
        action = planner.act(obs)
        assert np.all(np.abs(action) <= 1)
        obs, *_ = env.step(action)
    assert planner.plans_made == 1
    # Replanning counts environment steps; a warm start shifts the plan by whole waypoints.
    planner = DiffusionPlanner.load(sparse, device="cpu", replan_every=8)
    obs, _ = env.reset(seed=1)
    for _ in range(17):
        obs, *_ = env.step(planner.act(obs))
    assert planner.plans_made == 3
    with pytest.raises(ValueError, match=r"replan_every must lie in \[1, 60\]"):
        DiffusionPlanner.load(sparse, device="cpu", replan_every=61)


def test_value_loss_draws_times_and_tells_them_as_the_denoiser_does():
    from modalities.planning.model import ValueNet
    from modalities.planning.training import planner_diffusion, value_loss_fn

    diffusion = planner_diffusion(16, "x0")
    calls = []
    for name in ("draw_times", "model_time"):
        original = getattr(diffusion, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        setattr(diffusion, name, spy)
    net = ValueNet(6, dim=8, dim_mults=(1, 2))
    batch = {"x": torch.randn(4, 6, 8), "known_mask": torch.zeros(4, 6, 8, dtype=torch.bool),
             "value": torch.randn(4)}
    loss = value_loss_fn(diffusion)(net, batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and calls == ["draw_times", "model_time"]


def test_replan_when_knocked_off_the_plan(sparse, env):
    planner = DiffusionPlanner.load(sparse, device="cpu", replan_distance=0.3)
    obs, _ = env.reset(seed=0)
    planner.act(obs)
    assert planner.plans_made == 1
    on_plan = planner.current_plan.states[0, 1, :2]
    planner.act({**obs, "observation": np.concatenate([on_plan + [0.1, 0.0], obs["observation"][2:]])})
    assert planner.plans_made == 1  # near the plan: no new one
    path = planner.current_plan.states[0, 2:, :2]
    far = path[0] + [0.4, 0.0]
    while np.linalg.norm(path - far, axis=1).min() <= 0.3:  # a point 0.3 clear of the rest of the path
        far = far + [0.2, 0.2]
    planner.act({**obs, "observation": np.concatenate([far, obs["observation"][2:]])})
    assert planner.plans_made == 2  # off the plan's path: a fresh one
    with pytest.raises(ValueError, match="replan_distance must be > 0"):
        DiffusionPlanner.load(sparse, device="cpu", replan_distance=0)


def test_tracking_an_expert_route_of_waypoints_scores_like_the_expert():
    """The maze presets' premise: a plan of every 4th state, interpolated and tracked open-loop
    with Diffuser's controller, does as well as the expert whose route it is."""
    from modalities.planning.data import Normalizer
    from modalities.planning.maze import MazeGrid, WaypointExpert
    from modalities.planning.model import TemporalUNet
    from modalities.planning.training import planner_diffusion

    env = make_env(ENV, continuing_task=True)
    grid = MazeGrid.from_env(env)
    horizon, every = 32, 4
    config = {"observation_dim": 4, "action_dim": 2, "horizon": horizon, "every": every, "env_id": ENV,
              "normalizer": Normalizer(np.zeros(6), np.ones(6), "gaussian").to_config(), "maze": grid.to_config(),
              "defaults": {"action_source": "tracking", "replan_every": None}}
    planner = DiffusionPlanner(TemporalUNet(6, dim=8, dim_mults=(1, 2)), planner_diffusion(16), config)
    for seed in (0, 1, 2):
        obs, _ = env.reset(seed=seed)
        expert, route, expert_return = WaypointExpert(grid), [obs["observation"]], 0.0
        for _ in range(300):
            obs, reward, *_ = env.step(expert.act(obs))
            route.append(obs["observation"])
            expert_return += reward
        waypoints = np.array(route[: planner.span : every])
        waypoints[-1] = [*obs["desired_goal"], 0.0, 0.0]  # the goal at rest, as the planner asks
        x = torch.zeros(1, 6, horizon)
        x[0, 2:] = torch.as_tensor(waypoints.T, dtype=torch.float32)
        planner._sample = lambda states, goals, init=None, _x=x: (_x, None)  # the model "draws" the route
        obs, _ = env.reset(seed=seed)
        planner.reset()
        total, success = 0.0, False
        for _ in range(300):
            obs, reward, _, _, info = env.step(planner.act(obs))
            total += reward
            success |= info["success"]
        assert success and total >= 0.95 * expert_return and planner.plans_made == seed + 1  # one plan each
    env.close()


def _route_planner(action_source: str, **overrides):
    """A U-Maze planner with an untrained network, for tests that hand it a plan to act on."""
    from modalities.planning.data import Normalizer
    from modalities.planning.maze import MazeGrid
    from modalities.planning.model import TemporalUNet
    from modalities.planning.training import planner_diffusion

    env = make_env(ENV, continuing_task=True)
    grid = MazeGrid.from_env(env)
    config = {"observation_dim": 4, "action_dim": 2, "horizon": 32, "every": 4, "env_id": ENV,
              "normalizer": Normalizer(np.zeros(6), np.ones(6), "gaussian").to_config(), "maze": grid.to_config(),
              "defaults": {"action_source": action_source, "replan_every": None}}
    return env, grid, DiffusionPlanner(TemporalUNet(6, dim=8, dim_mults=(1, 2)), planner_diffusion(16), config,
                                       **overrides)


def test_following_the_route_arrives_as_early_as_the_expert_where_tracking_waits_for_the_schedule():
    """A plan with the expert's route at a slower pace (arriving at the plan's last row, as
    Diffuser's goal inpainting asks): tracking arrives with the plan, following the route
    arrives as soon as the ball can."""
    from modalities.planning.maze import WaypointExpert

    returns = {}
    for source in ("tracking", "path"):
        env, grid, planner = _route_planner(source)
        obs, _ = env.reset(seed=1)
        expert, route, expert_return = WaypointExpert(grid), [obs["observation"]], 0.0
        for _ in range(300):
            obs, reward, *_ = env.step(expert.act(obs))
            route.append(obs["observation"])
            expert_return += reward
        arrival = next(k for k, p in enumerate(route) if np.linalg.norm(p[:2] - obs["desired_goal"]) < 0.45)
        assert arrival < planner.span / 2  # else the test shows nothing
        slow = np.array([route[round(j * arrival / (planner.horizon - 1))] for j in range(planner.horizon)])
        slow[-1] = [*obs["desired_goal"], 0.0, 0.0]
        x = torch.zeros(1, 6, planner.horizon)
        x[0, 2:] = torch.as_tensor(slow.T, dtype=torch.float32)
        planner._sample = lambda states, goals, init=None, _x=x: (_x, None)
        obs, _ = env.reset(seed=1)
        planner.reset()
        returns[source] = 0.0
        for _ in range(300):
            obs, reward, *_ = env.step(planner.act(obs))
            returns[source] += reward
        env.close()
    assert returns["tracking"] < 0.9 * expert_return
    assert returns["path"] >= 0.95 * expert_return


def test_shortcuts_skip_a_detour_that_fills_the_horizon():
    """Start and goal in one corridor, and a plan that must fill its horizon, so its route runs
    up the U's side arm and back (as trained plans do for near goals). Following the route
    retraces the detour; with shortcuts the goal is in straight sight and reached as the
    expert reaches it."""
    from modalities.planning.maze import WaypointExpert

    returns = {}
    for margin in (None, 0.15):
        # replan_distance: leaving the route for a shortcut in sight is not straying from it.
        env, grid, planner = _route_planner("path", known_map=True, shortcut_margin=margin, replan_distance=0.3,
                                            stall_steps=None)
        obs, _ = env.reset(seed=4)
        start, goal = obs["observation"][:2], obs["desired_goal"]
        assert grid.cell_of(start)[0] == grid.cell_of(goal)[0] == 3  # both in the bottom corridor
        turn = grid.cell_center((1, 3))  # the far end of the right arm
        returns[margin] = _follow_out_and_back(planner, env, obs, turn)
        if margin is not None:
            assert planner.plans_made == 1
        env.close()
    env = make_env(ENV, continuing_task=True)
    obs, _ = env.reset(seed=4)
    expert, expert_return = WaypointExpert(MazeGrid_of(env)), 0.0
    for _ in range(300):
        obs, reward, *_ = env.step(expert.act(obs))
        expert_return += reward
    env.close()
    assert returns[None] < 0.8 * expert_return
    assert returns[0.15] >= 0.98 * expert_return
    with pytest.raises(ValueError, match="shortcut_margin"):
        _route_planner("path", known_map=True, shortcut_margin=-1)
    with pytest.raises(ValueError, match="known_map=True"):  # the map is an opt-in, named as such
        _route_planner("path", shortcut_margin=0.15)


def MazeGrid_of(env):
    from modalities.planning.maze import MazeGrid

    return MazeGrid.from_env(env)


def test_free_space_ranks_a_route_through_walls_below_one_around_them():
    from modalities.planning.maze import WaypointExpert

    env, grid, planner = _route_planner("path", num_candidates=2, known_map=True)
    assert planner.candidate_score == "free_space"  # a maze planner that may read the map
    assert _route_planner("path", num_candidates=2)[2].candidate_score == "consistency"  # by default it may not
    with pytest.raises(ValueError, match="known_map=True"):
        _route_planner("path", num_candidates=2, candidate_score="free_space")
    obs, _ = env.reset(seed=2)  # start and goal on the two arms of the U
    expert, route = WaypointExpert(grid), [obs["observation"]]
    for _ in range(planner.span - 1):
        obs, *_ = env.step(expert.act(obs))
        route.append(obs["observation"])
    around = np.array(route[:: planner.every])
    straight = np.linspace(around[0], around[-1], planner.horizon)  # the chord cuts the U-Maze's wall
    plans = torch.as_tensor(np.stack([np.c_[np.zeros((planner.horizon, 2)), p] for p in (straight, around)]),
                            dtype=torch.float32).transpose(1, 2)
    scores = planner._score(plans)
    assert scores[1] >= 1.0 and scores[0] < 0.9
    # Two routes inside the free cells: the one that reaches the goal's radius first ranks
    # higher (the plan's own sparse return), and a small share of wall still outweighs it.
    arrival = next(j for j, p in enumerate(around) if np.linalg.norm(p[:2] - around[-1, :2]) < 0.45)
    late = np.array([around[round(j * arrival / (planner.horizon - 1))] for j in range(planner.horizon)])
    through_wall = around.copy()
    through_wall[1, :2] = grid.cell_center((2, 1))  # one waypoint inside the middle wall
    plans = torch.as_tensor(np.stack([np.c_[np.zeros((planner.horizon, 2)), p]
                                      for p in (late, around, through_wall)]), dtype=torch.float32)
    scores = planner._score(plans.transpose(1, 2))
    assert arrival < planner.horizon - 4 and scores[1] > scores[0] > scores[2]  # early > late > wall
    env.close()
    with pytest.raises(ValueError, match="value network"):
        _route_planner("path", num_candidates=2, candidate_score="value")
    with pytest.raises(ValueError, match="path_lookahead"):
        _route_planner("path", path_lookahead=0)


def test_export_carries_a_model_card(trained):
    card = (trained / "export" / "README.md").read_text()
    assert card.startswith("# PointMaze_UMaze-v3: Diffuser-style planner")
    assert "python recipes/planner_train.py --env PointMaze_UMaze-v3" in card
    assert "16 waypoints every 1 step(s) = 16 steps" in card and "parameters" in card and "hardware" in card
    assert "actions by path (loops cut within 0.5)" in card and "no map read" in card
    config = json.loads((trained / "export" / "config.json").read_text())
    assert "README.md" not in config["checksums"]  # documentation, not weights


def _follow_out_and_back(planner, env, obs, via, steps: int = 300) -> float:
    """Make the model "draw" a route from the ball out to ``via`` and back to the goal, and return
    what acting on it for ``steps`` steps earns."""
    start, goal = obs["observation"][:2], obs["desired_goal"]
    half = planner.horizon // 2
    out = np.linspace(start, via, half)
    back = np.linspace(via, goal, planner.horizon - half + 1)[1:]
    route = np.c_[np.concatenate([out, back]), np.zeros((planner.horizon, 2))]
    x = torch.zeros(1, 6, planner.horizon)
    x[0, 2:] = torch.as_tensor(route.T, dtype=torch.float32)
    planner._sample = lambda states, goals, init=None, _x=x: (_x, None)
    planner.reset()
    total = 0.0
    for _ in range(steps):
        obs, reward, *_ = env.step(planner.act(obs))
        total += reward
    return total


def _episode_actions(planner, steps=60, seed=5):
    env = make_env(ENV, continuing_task=True)
    obs, _ = env.reset(seed=seed)
    planner.reset(seed=0)
    actions = []
    for _ in range(steps):
        actions.append(planner.act(obs))
        obs, *_ = env.step(actions[-1])
    env.close()
    return np.array(actions)


def test_defaults_read_no_walls(sparse, monkeypatch):
    """The defaults plan and act from observations and the goal alone: with the map's inner walls
    cleared, and with every wall reader of MazeGrid broken, the same seed gives the same actions.
    Everything that reads the map (shortcuts in sight, free-space ranking, sight-line
    replanning) is the known_map=True opt-in, and a checkpoint's own map settings wait for it."""
    from modalities.planning.maze import MazeGrid

    options = dict(num_candidates=3, stall_steps=5, loop_radius=0.5, replan_distance=0.3)
    real = _episode_actions(DiffusionPlanner.load(sparse, device="cpu", **options))
    default = DiffusionPlanner.load(sparse, device="cpu")
    assert not default.known_map and default.shortcut_margin is None and default.candidate_score != "free_space"
    assert (default.stall_steps, default.loop_radius) == (20, 0.5)  # the maze preset's map-free defaults
    real_default = _episode_actions(default)
    with monkeypatch.context() as patch, hidden_inner_walls():

        def broken(*args, **kwargs):
            raise AssertionError("the default planner read the maze's walls")

        for name in ("free_at", "is_free", "clear_lines", "check_point", "fraction_free", "distances_to",
                     "shortest_path", "free_cells"):
            patch.setattr(MazeGrid, name, broken)
        hidden = DiffusionPlanner.load(sparse, device="cpu", **options)
        assert not hidden.maze.walls[1:-1, 1:-1].any()  # the map is hidden indeed
        np.testing.assert_array_equal(_episode_actions(hidden), real)
        np.testing.assert_array_equal(_episode_actions(DiffusionPlanner.load(sparse, device="cpu")), real_default)
        with pytest.raises(AssertionError, match="read the maze's walls"):  # the opt-in does read them
            _episode_actions(DiffusionPlanner.load(sparse, device="cpu", known_map=True, **options), steps=5)


def test_a_checkpoints_map_settings_wait_for_known_map():
    from modalities.planning.data import Normalizer
    from modalities.planning.maze import MazeGrid
    from modalities.planning.model import TemporalUNet
    from modalities.planning.training import planner_diffusion

    env = make_env(ENV)
    config = {"observation_dim": 4, "action_dim": 2, "horizon": 32, "every": 4, "env_id": ENV,
              "normalizer": Normalizer(np.zeros(6), np.ones(6), "gaussian").to_config(),
              "maze": MazeGrid.from_env(env).to_config(),
              "defaults": {"action_source": "path", "num_candidates": 4, "shortcut_margin": 0.3,
                           "candidate_score": "free_space", "replan_distance": 0.6}}
    env.close()

    def build(**overrides):
        return DiffusionPlanner(TemporalUNet(6, dim=8, dim_mults=(1, 2)), planner_diffusion(16), config, **overrides)

    planner = build()
    assert (planner.known_map, planner.shortcut_margin, planner.candidate_score) == (False, None, "consistency")
    planner = build(known_map=True)
    assert (planner.known_map, planner.shortcut_margin, planner.candidate_score) == (True, 0.3, "free_space")
    config["defaults"] = {"action_source": "path", "known_map": True}  # recorded as an opt-in: honoured
    assert build().shortcut_margin == 0.15 and not build(known_map=False).known_map


def test_loops_in_the_route_are_cut_without_the_map():
    """Start and goal in one corridor and a plan that must fill its horizon, so its route runs
    away from the goal and comes back past the start: following the route retraces the loop;
    with loop_radius the ball skips it (no walls read) and arrives as the expert does."""
    from modalities.planning.maze import WaypointExpert

    returns = {}
    for loop in (None, 0.3):
        env, grid, planner = _route_planner("path", loop_radius=loop, stall_steps=None)
        obs, _ = env.reset(seed=4)
        start, goal = obs["observation"][:2], obs["desired_goal"]
        away = start + 1.2 * (start - goal) / np.linalg.norm(start - goal)  # back along the corridor
        away = np.clip(away, -1.4, 1.4)
        returns[loop] = _follow_out_and_back(planner, env, obs, away)
        env.close()
    env = make_env(ENV, continuing_task=True)
    obs, _ = env.reset(seed=4)
    expert, expert_return = WaypointExpert(MazeGrid_of(env)), 0.0
    for _ in range(300):
        obs, reward, *_ = env.step(expert.act(obs))
        expert_return += reward
    env.close()
    assert returns[None] < 0.9 * expert_return
    assert returns[0.3] >= 0.97 * expert_return
    with pytest.raises(ValueError, match="loop_radius"):
        _route_planner("path", loop_radius=0)


def test_a_stuck_ball_replans():
    """A plan straight through the U's middle wall: the ball stalls against the wall and the
    planner plans afresh from there (stall_steps), without reading the walls."""
    from modalities.planning.maze import WaypointExpert

    env, grid, planner = _route_planner("path", stall_steps=10)
    obs, _ = env.reset(seed=2)  # start and goal on the two arms of the U
    expert, around = WaypointExpert(grid), [obs["observation"]]
    for _ in range(planner.span - 1):
        obs, *_ = env.step(expert.act(obs))
        around.append(obs["observation"])
    around = np.array(around[:: planner.every])
    straight = np.linspace(around[0], around[-1], planner.horizon)  # through the wall
    straight[:, 2:] = 0.0
    plans = [torch.as_tensor(np.c_[np.zeros((planner.horizon, 2)), p].T, dtype=torch.float32)[None]
             for p in (straight, around)]
    starts = []

    def model(states, goals, init=None):  # draws the chord first, the way round after
        starts.append(states[0, :2].copy())
        return plans[min(len(starts) - 1, 1)], None

    planner._sample = model
    obs, _ = env.reset(seed=2)
    planner.reset()
    for _ in range(40):
        obs, *_ = env.step(planner.act(obs))
    assert planner.stalls_seen == 1 and planner.plans_made == 2
    assert np.linalg.norm(starts[1] - starts[0]) > 0.2  # the second plan starts where the ball got stuck
    env.close()
    with pytest.raises(ValueError, match="stall_steps"):
        _route_planner("path", stall_steps=0)


def test_candidates_are_ranked_by_the_models_denoising_error(trained, env):
    planner = DiffusionPlanner.load(trained / "export", device="cpu", num_candidates=4, candidate_score="consistency")
    seen = []
    pick = planner.diffusion.sample_candidates

    def spy(*args, **kwargs):
        seen.append(pick(*args, **kwargs))
        return seen[-1]

    planner.diffusion.sample_candidates = spy
    obs, _ = env.reset(seed=0)
    planner.plan(obs)
    candidates, scores = seen[0].samples[0], seen[0].scores[0]
    assert torch.all(scores[:-1] >= scores[1:])
    again = -planner._denoising_error(candidates)  # the same noise every time: a plan's own score
    torch.testing.assert_close(again.to(scores.dtype), scores, rtol=1e-4, atol=1e-6)


def test_settings_check_themselves_and_stay_fixed(trained):
    """The planner's options are small frozen settings objects, grouped by what they control, that
    refuse bad values when made; a checkpoint's facts are checked by PlannerSettings.resolve."""
    import dataclasses

    from modalities.planning.settings import (ActingSettings, CandidateSettings, MapSettings, PlannerCheckpoint,
                                              PlannerSettings, ReplanSettings, SamplingSettings)

    planner = DiffusionPlanner.load(trained / "export", device="cpu", steps=6, num_candidates=2,
                                    candidate_score="value", replan_every=4)
    settings = planner.settings
    assert (settings.sampling.steps, settings.candidates.num_candidates, settings.replanning.replan_every) == (6, 2, 4)
    assert settings.replanning.warm_start_steps == 3  # steps x warm_start_strength, filled when resolved
    assert planner.steps == 6 and planner.settings.flat()["num_candidates"] == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.sampling.steps = 3
    with pytest.raises(AttributeError):
        planner.steps = 3  # read-only: a planner's settings do not change behind its back
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        SamplingSettings(sampler="nope")
    with pytest.raises(ValueError, match="num_candidates must be >= 1"):
        CandidateSettings(num_candidates=0)
    with pytest.raises(ValueError, match="warm_start_strength must lie in"):
        ReplanSettings(warm_start_strength=2.0)
    with pytest.raises(ValueError, match="path_lookahead must be > 0"):
        ActingSettings(path_lookahead=-1)
    with pytest.raises(ValueError, match="known_map=True"):
        MapSettings(shortcut_margin=0.2)
    with pytest.raises(ValueError, match="known_map=True"):
        PlannerSettings(candidates=CandidateSettings(candidate_score="free_space"))
    facts = PlannerCheckpoint(num_timesteps=16, span=16, observation_dim=4)
    with pytest.raises(ValueError, match=r"steps must lie in \[1, 16\]"):
        PlannerSettings.resolve(facts, options={"steps": 20})
    with pytest.raises(ValueError, match="needs a PointMaze checkpoint"):
        PlannerSettings.resolve(facts, options={"known_map": True})
    with pytest.raises(TypeError, match="unknown planner option"):
        PlannerSettings.resolve(facts, options={"replan": 3})
    # Without a maze and a value network, candidates rank by value (which then needs the network).
    assert PlannerSettings.resolve(facts).candidates.candidate_score == "value"
