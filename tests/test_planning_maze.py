"""PointMaze helpers: the grid agrees with Gymnasium-Robotics, BFS paths are valid, and the
waypoint expert reaches its goals (a fresh plan per goal, unlike D4RL's reused controller)."""

import numpy as np
import pytest

pytest.importorskip("gymnasium_robotics")

from modalities.planning.maze import MazeGrid, WaypointExpert, make_env  # noqa: E402


@pytest.fixture(scope="module")
def umaze():
    env = make_env("PointMaze_UMaze-v3", continuing_task=True)
    yield env
    env.close()


def test_grid_matches_gymnasium_robotics_coordinates(umaze):
    grid = MazeGrid.from_env(umaze)
    maze = umaze.unwrapped.maze
    assert grid.shape == (5, 5) and grid.walls.sum() == 18
    for cell in grid.free_cells():
        np.testing.assert_allclose(grid.cell_center(cell), maze.cell_rowcol_to_xy(np.array(cell)))
        assert grid.cell_of(grid.cell_center(cell)) == tuple(maze.cell_xy_to_rowcol(grid.cell_center(cell)))
    assert MazeGrid.from_config(grid.to_config()) == grid
    assert MazeGrid.from_env(make_env("PointMaze_Medium-v3")) != grid


def test_shortest_path_goes_around_the_wall(umaze):
    grid = MazeGrid.from_env(umaze)
    path = grid.shortest_path((1, 1), (3, 1))  # the two ends of the U
    assert path[0] == (1, 1) and path[-1] == (3, 1) and len(path) == 7
    for a, b in zip(path[:-1], path[1:]):
        assert abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1 and not grid.walls[b]


def test_points_in_walls_or_outside_are_refused(umaze):
    grid = MazeGrid.from_env(umaze)
    grid.check_point(grid.cell_center((1, 1)))
    with pytest.raises(ValueError, match="wall or outside"):
        grid.check_point(grid.cell_center((2, 1)))  # the U's middle wall
    with pytest.raises(ValueError, match="wall or outside"):
        grid.check_point([10.0, 0.0])
    with pytest.raises(ValueError, match="finite"):
        grid.check_point([np.nan, 0.0])
    with pytest.raises(ValueError, match="wall or outside"):
        grid.distances_to((0, 0))


def test_clear_lines_see_along_corridors_but_not_through_walls(umaze):
    grid = MazeGrid.from_env(umaze)
    top, bottom = grid.cell_center((1, 1)), grid.cell_center((3, 1))  # the two arms of the U
    right_bottom = grid.cell_center((3, 3))
    np.testing.assert_array_equal(grid.clear_lines(bottom, [right_bottom, top]), [True, False])
    # A line 0.1 from the middle wall's face (y = -0.5) is clear as a line, not as a 0.15-wide band.
    near_wall = np.array([-1.0, -0.6])
    assert grid.clear_lines(near_wall, [[0.3, -0.6]])[0]
    assert not grid.clear_lines(near_wall, [[0.3, -0.6]], margin=0.15)[0]
    assert grid.clear_lines(bottom, [bottom], margin=0.15)[0]  # a zero-length line
    # A start 0.05 from two walls (the bottom corridor's corner) still sees out of the corner:
    # the band's edges count from the margin's distance on.
    corner = np.array([-1.45, -1.45])
    assert not grid.free_at(corner + 0.15 * np.array([-1.0, 1.0]) / np.sqrt(2))
    assert grid.clear_lines(corner, [[-1.0, -1.0]], margin=0.15)[0]
    # Corner to corner of the U's bend: the diagonal clips the middle wall's end block.
    assert not grid.clear_lines(grid.cell_center((1, 2)), [grid.cell_center((3, 2))])[0]
    np.testing.assert_array_equal(grid.free_at(np.stack([top, grid.cell_center((2, 1)), [9.0, 0.0]])),
                                  [True, False, False])


@pytest.mark.parametrize("seed", [0, 3])
def test_expert_reaches_the_goal_in_umaze(umaze, seed):
    expert = WaypointExpert(MazeGrid.from_env(umaze))
    obs, _ = umaze.reset(seed=seed)
    expert.reset()
    total, first_success = 0.0, None
    for t in range(300):
        action = expert.act(obs)
        assert action.shape == (2,) and np.all(np.abs(action) <= 1)
        obs, reward, terminated, truncated, info = umaze.step(action)
        total += reward
        if info["success"] and first_success is None:
            first_success = t
        if terminated or truncated:
            break
    # Reached early and stayed: the measured expert averages ~252 of 300 steps at the goal.
    assert first_success is not None and first_success < 150
    assert total > 150


def test_expert_follows_resampled_goals():
    env = make_env("PointMaze_UMaze-v3", continuing_task=True, reset_target=True, max_episode_steps=1000)
    expert = WaypointExpert(MazeGrid.from_env(env))
    obs, _ = env.reset(seed=1)
    goals_reached = 0
    for _ in range(1000):
        goal = obs["desired_goal"].copy()
        obs, _, _, truncated, _ = env.step(expert.act(obs))
        goals_reached += not np.array_equal(goal, obs["desired_goal"])
        if truncated:
            break
    env.close()
    assert goals_reached >= 5  # each new goal is planned for at once


def test_expert_rejects_a_bad_state():
    expert = WaypointExpert(MazeGrid.from_map([[1, 1, 1], [1, 0, 1], [1, 1, 1]]))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        expert.act(np.zeros(3), goal=[0.0, 0.0])
    with pytest.raises(ValueError, match="needs the goal"):
        expert.act(np.zeros(4))
