"""Planning data: D4RL HDF5 and Minari round trips, episode splitting, normalisation and
fixed-horizon windows, and clear errors for broken data."""

import numpy as np
import pytest
import torch

from modalities.planning.data import (
    D4RL_KEYS,
    Normalizer,
    Trajectories,
    TrajectoryWindows,
    TransitionPairs,
    collect,
    collect_minari,
    load_d4rl_hdf5,
    load_dataset,
    load_minari,
    save_d4rl_hdf5,
    split_episodes,
)


def _stream(n=20, obs_dim=3, act_dim=2, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return Trajectories(rng.normal(size=(n, obs_dim)), rng.uniform(-1, 1, (n, act_dim)), rng.normal(size=n),
                        np.zeros(n, bool), np.zeros(n, bool), **kw)


# ------------------------------------------------------------------ episodes
def test_split_at_terminals_timeouts_and_goal_changes():
    terminals = np.zeros(10, bool)
    timeouts = np.zeros(10, bool)
    terminals[2] = True
    timeouts[6] = True
    assert split_episodes(terminals, timeouts) == [(0, 3), (3, 7), (7, 10)]
    goals = np.zeros((10, 2))
    goals[5:] = 1.0  # a goal reached at step 4 and a new one drawn
    assert split_episodes(terminals, timeouts, goals=goals) == [(0, 3), (3, 5), (5, 7), (7, 10)]
    assert split_episodes(np.zeros(4, bool), np.zeros(4, bool)) == [(0, 4)]
    with pytest.raises(ValueError, match="same length"):
        split_episodes(np.zeros(3, bool), np.zeros(4, bool))


def test_mismatched_lengths_and_nans_are_refused():
    with pytest.raises(ValueError, match=r"lengths differ: observations 5, actions 4"):
        Trajectories(np.zeros((5, 3)), np.zeros((4, 2)), np.zeros(5), np.zeros(5), np.zeros(5))
    obs = np.zeros((5, 3))
    obs[3, 1] = np.nan
    with pytest.raises(ValueError, match="observations holds NaN or Inf at 1 step.*first at step 3"):
        Trajectories(obs, np.zeros((5, 2)), np.zeros(5), np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="goals"):
        _stream(goals=np.zeros((7, 2)))


# ------------------------------------------------------------------ normalisation
@pytest.mark.parametrize("kind", ["limits", "gaussian"])
def test_normaliser_round_trip(kind):
    data = np.random.default_rng(1).normal(3.0, [1.0, 10.0, 0.1], size=(500, 3))
    data[:, 2] = 7.0  # a constant dimension must not divide by zero
    norm = Normalizer.fit(data, kind=kind)
    z = norm.normalize(data)
    if kind == "limits":
        np.testing.assert_allclose(z[:, :2].min(0), -1, atol=1e-5)
        np.testing.assert_allclose(z[:, :2].max(0), 1, atol=1e-5)
    else:
        np.testing.assert_allclose(z[:, :2].mean(0), 0, atol=1e-4)
        np.testing.assert_allclose(z[:, :2].std(0), 1, atol=1e-3)
    assert np.isfinite(z).all()
    np.testing.assert_allclose(norm.unnormalize(z), data, rtol=1e-5, atol=1e-4)
    again = Normalizer.from_config(norm.to_config())
    t = torch.as_tensor(data, dtype=torch.float32)
    torch.testing.assert_close(again.unnormalize(again.normalize(t)), t, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"fitted on 3 dimensions.*\(4, 2\)"):
        norm.normalize(np.zeros((4, 2)))


# ------------------------------------------------------------------ windows
def test_windows_with_padding_and_mask():
    traj = _stream(n=12)
    traj.timeouts[4] = True  # episodes of 5 and 7 steps
    norm = Normalizer.fit(traj.transitions())
    full = TrajectoryWindows(traj, horizon=6, normalizer=norm)
    assert len(full) == 2  # only the 7-step episode holds a 6-step window, twice
    padded = TrajectoryWindows(traj, horizon=6, normalizer=norm, pad=True)
    assert len(padded) == 12  # one window per step
    item = padded[2]  # starts at step 2 of the first episode: 3 real steps, 3 padded
    assert item["x"].shape == (5, 6) and item["mask"].shape == (1, 6)
    assert item["mask"][0].tolist() == [True, True, True, False, False, False]
    expected = torch.as_tensor(norm.normalize(traj.transitions()[2:5]), dtype=torch.float32).T
    torch.testing.assert_close(item["x"][:, :3], expected)
    assert (item["x"][:2, 3:] == 0).all()  # padded actions are zero; observations repeat
    torch.testing.assert_close(item["x"][2:, 3:], expected[2:, -1:].expand(3, 3))
    # The start state is always known; the end state only in full windows.
    assert item["known_mask"][2:, 0].all() and not item["known_mask"][:2].any()
    assert not item["known_mask"][:, -1].any()
    assert full[0]["known_mask"][2:, -1].all() and full[0]["mask"].all()
    with pytest.raises(ValueError, match="longest episode has 7 steps"):
        TrajectoryWindows(traj, horizon=8, normalizer=norm)
    with pytest.raises(ValueError, match="normaliser covers 3 dims but a transition has 5"):
        TrajectoryWindows(traj, horizon=4, normalizer=Normalizer.fit(traj.observations))


def test_window_values_are_discounted_returns_within_the_episode():
    traj = _stream(n=6)
    traj.rewards[:] = 1.0
    traj.timeouts[2] = True
    windows = TrajectoryWindows(traj, horizon=2, normalizer=Normalizer.fit(traj.transitions()), discount=0.5)
    # Windows start at 0, 1 (episode 0..3) and 3, 4 (episode 3..6).
    assert [float(windows.value(i)) for i in range(len(windows))] == [1.75, 1.5, 1.75, 1.5]


def test_transition_pairs_stay_inside_episodes():
    traj = _stream(n=6)
    traj.terminals[2] = True
    pairs = TransitionPairs(traj, Normalizer.fit(traj.transitions()))
    assert len(pairs) == 4  # (0,1), (1,2), (3,4), (4,5): never across the episode boundary


# ------------------------------------------------------------------ files
def test_d4rl_hdf5_round_trip_and_bad_files(tmp_path):
    h5py = pytest.importorskip("h5py")
    traj = _stream(n=9, goals=np.ones((9, 2)), qpos=np.zeros((9, 2)), qvel=np.zeros((9, 2)))
    traj.terminals[3] = True
    path = save_d4rl_hdf5(traj, tmp_path / "data.hdf5")
    with h5py.File(path) as f:
        assert set(D4RL_KEYS) <= set(f.keys()) and {"goal", "qpos", "qvel"} <= set(f["infos"].keys())
    back = load_dataset(path)
    np.testing.assert_allclose(back.observations, traj.observations, rtol=1e-6)
    assert back.episodes() == [(0, 4), (4, 9)] and back.goals.shape == (9, 2)
    # A save that fails half-way (metadata JSON cannot hold) leaves the last good file whole.
    before = path.read_bytes()
    traj.metadata["unwritable"] = object()
    with pytest.raises(TypeError):
        save_d4rl_hdf5(traj, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["data.hdf5"]
    del traj.metadata["unwritable"]
    with h5py.File(tmp_path / "broken.hdf5", "w") as f:
        f["observations"] = np.zeros((3, 2))
        f["actions"] = np.zeros((2, 1))
    with pytest.raises(ValueError, match="lacks the D4RL key.*rewards"):
        load_d4rl_hdf5(tmp_path / "broken.hdf5")
    for key, value in (("rewards", np.zeros(3)), ("terminals", np.zeros(3)), ("timeouts", np.zeros(3))):
        with h5py.File(tmp_path / "broken.hdf5", "a") as f:
            f[key] = value
    with pytest.raises(ValueError, match="observations 3, actions 2"):
        load_d4rl_hdf5(tmp_path / "broken.hdf5")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset(tmp_path / "data.csv")


@pytest.fixture
def umaze():
    pytest.importorskip("gymnasium_robotics")
    from modalities.planning.maze import MazeGrid, WaypointExpert, make_env

    env = make_env("PointMaze_UMaze-v3", continuing_task=True, reset_target=True, max_episode_steps=60)
    yield env, WaypointExpert(MazeGrid.from_env(env))
    env.close()


def test_collector_hdf5_round_trips_through_the_d4rl_loader(tmp_path, umaze):
    env, expert = umaze
    traj = collect(env, expert, steps=150, path=tmp_path / "umaze.hdf5", seed=0)
    back = load_d4rl_hdf5(tmp_path / "umaze.hdf5")
    assert len(back) == 150 and back.observation_dim == 4 and back.action_dim == 2
    assert back.goals.shape == (150, 2) and back.qpos.shape == (150, 2) and back.qvel.shape == (150, 2)
    # Episodes of 60 steps end in time-outs; the stream's end closes the last one.
    assert back.timeouts.nonzero()[0].tolist() == [59, 119, 149]
    assert back.episodes() == [(0, 60), (60, 120), (120, 150)]
    np.testing.assert_allclose(back.observations, traj.observations)
    # qpos is the position in the observation, and each action moved the ball on.
    np.testing.assert_allclose(back.qpos, back.observations[:, :2], atol=1e-6)
    assert back.rewards.sum() > 0 and back.metadata["env_id"] == "PointMaze_UMaze-v3"
    # Goals change on arrival (reset_target): splitting there gives more, shorter episodes.
    assert len(back.episodes(split_on_goal_change=True)) > 3


def test_minari_dataset_round_trips(tmp_path, monkeypatch, umaze):
    pytest.importorskip("minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    env, expert = umaze
    collect_minari(env, expert, "test/umaze-expert-v0", episodes=2, seed=5, description="test data")
    assert (tmp_path / "minari").is_dir()
    traj = load_minari("test/umaze-expert-v0")
    assert len(traj) == 120 and traj.observation_dim == 4 and traj.goals.shape == (120, 2)
    assert traj.episodes() == [(0, 60), (60, 120)]
    assert traj.metadata["source"] == "minari:test/umaze-expert-v0"
    again = load_dataset("minari:test/umaze-expert-v0")
    np.testing.assert_array_equal(again.actions, traj.actions)
    with pytest.raises(ValueError, match="cannot load Minari dataset"):
        load_minari("test/missing-v0")


def test_collector_records_any_environment(tmp_path):
    gym = pytest.importorskip("gymnasium")
    from modalities.planning.data import flatten_observation

    env = gym.make("Pendulum-v1", max_episode_steps=20)
    env.action_space.seed(0)
    traj = collect(env, lambda obs: env.action_space.sample(), steps=50, path=tmp_path / "pendulum.hdf5")
    back = load_d4rl_hdf5(tmp_path / "pendulum.hdf5")
    assert back.observation_dim == 3 and back.action_dim == 1 and back.goals is None and back.qpos is None
    assert back.episodes() == [(0, 20), (20, 40), (40, 50)]
    np.testing.assert_array_equal(back.actions, traj.actions)
    env.close()
    with pytest.raises(ValueError, match="needs an 'observation' entry"):
        flatten_observation({"achieved_goal": np.zeros(2)})


# ------------------------------------------------------------------ waypoint subsampling
def test_windows_keep_every_kth_step():
    traj = _stream(n=30)
    norm = Normalizer.fit(traj.transitions())
    windows = TrajectoryWindows(traj, horizon=4, normalizer=norm, every=3)
    assert windows.span == 10 and len(windows) == 30 - 10 + 1
    item = windows[5]
    expected = norm.normalize(traj.transitions()[[5, 8, 11, 14]]).T
    np.testing.assert_allclose(item["x"].numpy(), expected, rtol=1e-6)
    assert item["mask"].all() and item["known_mask"][2:, 0].all() and item["known_mask"][2:, -1].all()
    # Padded: the window from step 25 holds steps 25 and 28, then the last row repeated with no action.
    padded = TrajectoryWindows(traj, horizon=4, normalizer=norm, every=3, pad=True)
    last = padded[25]
    assert last["mask"].tolist() == [[True, True, False, False]] and not last["known_mask"][:, -1].any()
    np.testing.assert_allclose(last["x"][2:, 3].numpy(), last["x"][2:, 1].numpy())
    assert (last["x"][:2, 2:] == 0).all()
    with pytest.raises(ValueError, match="every must be >= 1"):
        TrajectoryWindows(traj, horizon=4, normalizer=norm, every=0)
    with pytest.raises(ValueError, match=r"every 10 step\(s\): 31 steps\) fits"):
        TrajectoryWindows(traj, horizon=4, normalizer=norm, every=10)


# ------------------------------------------------------------------ D4RL maze2d frame
def test_d4rl_maze2d_file_converts_to_pointmaze_frame(tmp_path):
    """A synthetic D4RL maze2d file: D4RL's ball sits at qpos + (1.2, 1.2) and wall (r, c) at
    (r + 1, c + 1), so qpos (r - 0.2, c - 0.2) is the centre of cell (r, c)."""
    from modalities.planning.data import d4rl_maze2d_to_pointmaze
    from modalities.planning.maze import MazeGrid

    u_maze = [[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 1, 1, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]]
    grid = MazeGrid.from_map(u_maze)  # D4RL's U_MAZE and PointMaze's are the same map
    cells = grid.free_cells()
    n = len(cells)
    qpos = np.array([[r - 0.2, c - 0.2] for r, c in cells])
    # Moving "down" D4RL's rows (+x there) is moving down the maze: -y in PointMaze.
    qvel = np.tile([1.0, 0.0], (n, 1))
    observations = np.concatenate([qpos, qvel], axis=1)
    actions = np.tile([0.5, -0.25], (n, 1))
    goals = qpos[::-1] + 0.05
    traj = Trajectories(observations, actions, np.zeros(n), np.zeros(n), np.zeros(n), goals=goals, qpos=qpos,
                        qvel=qvel)
    save_d4rl_hdf5(traj, tmp_path / "maze2d-umaze-sparse-v1.hdf5")
    loaded = load_d4rl_hdf5(tmp_path / "maze2d-umaze-sparse-v1.hdf5")
    assert grid.fraction_free(loaded.observations[:, :2]) < 0.5  # as stored: not PointMaze's frame

    converted = d4rl_maze2d_to_pointmaze(loaded, grid)
    centres = np.stack([grid.cell_center(cell) for cell in cells])
    np.testing.assert_allclose(converted.observations[:, :2], centres, atol=1e-5)
    np.testing.assert_allclose(converted.qpos, centres, atol=1e-5)
    np.testing.assert_allclose(converted.observations[:, 2:], np.tile([0.0, -1.0], (n, 1)), atol=1e-6)
    np.testing.assert_allclose(converted.qvel, np.tile([0.0, -1.0], (n, 1)), atol=1e-6)
    np.testing.assert_allclose(converted.actions, np.tile([-0.25, -0.5], (n, 1)), atol=1e-6)
    np.testing.assert_allclose(converted.goals, centres[::-1] + [0.05, -0.05], atol=1e-5)
    assert grid.fraction_free(converted.observations[:, :2]) == 1.0
    # D4RL's resets (whole-number qpos) land 0.2 off the centre, still inside the cell.
    resets = d4rl_maze2d_to_pointmaze(
        Trajectories(np.array([[r, c, 0, 0] for r, c in cells], float), np.zeros((n, 2)), np.zeros(n),
                     np.zeros(n), np.zeros(n)), grid)
    assert [grid.cell_of(p) for p in resets.observations[:, :2]] == cells
    with pytest.raises(ValueError, match="maze2d data hold"):
        d4rl_maze2d_to_pointmaze(_stream(obs_dim=3), grid)
