"""PointMaze (Gymnasium-Robotics v3) helpers: the maze grid, a correct waypoint expert, plots.

D4RL's maze2d data came from a waypoint controller: a shortest path on the maze grid, then PD
control towards the next cell, a = clip(10 (waypoint - position) - velocity, -1, 1), with goals
resampled on arrival in one long stream. Its reference "expert" score reused one controller
across episodes and kept following the old goal's plan, so it under-scored (D4RL #159, #215).
:class:`WaypointExpert` reads the goal from every observation and plans afresh whenever the
goal cell changes, so it reaches every goal.

    env = make_env("PointMaze_UMaze-v3", continuing_task=True, reset_target=True)
    expert = WaypointExpert(MazeGrid.from_env(env))
    obs, info = env.reset(seed=0); expert.reset()
    obs, reward, terminated, truncated, info = env.step(expert.act(obs))
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

__all__ = [
    "MAZE_ENVS",
    "MazeGrid",
    "hidden_inner_walls",
    "WaypointExpert",
    "is_maze_env",
    "make_env",
    "plot_maze",
]

# Episode lengths of the PointMaze v3 environments (Gymnasium-Robotics' TimeLimit), the same
# 300 / 600 / 800 steps as D4RL's maze2d evaluation.
MAZE_ENVS: dict[str, int] = {
    "PointMaze_UMaze-v3": 300,
    "PointMaze_Medium-v3": 600,
    "PointMaze_Large-v3": 800,
    "PointMaze_UMazeDense-v3": 300,
    "PointMaze_MediumDense-v3": 600,
    "PointMaze_LargeDense-v3": 800,
}

# Within this distance the environment counts the goal as reached (Gymnasium-Robotics 1.4).
GOAL_RADIUS = 0.45


def is_maze_env(env_id: str) -> bool:
    """True for the PointMaze environments this module knows (their grid and expert apply)."""
    return env_id.split(":")[-1].startswith("PointMaze_")


def make_env(env_id: str, **kwargs: Any):
    """``gym.make(env_id, **kwargs)`` with Gymnasium-Robotics' environments registered first."""
    import gymnasium as gym

    if is_maze_env(env_id) or "Maze" in env_id:
        import gymnasium_robotics

        gym.register_envs(gymnasium_robotics)
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.Error as err:
        raise ValueError(f"cannot make environment {env_id!r}: {err}") from err


@dataclass(frozen=True, eq=False)
class MazeGrid:
    """The walls of a maze and the map between grid cells and MuJoCo (x, y) coordinates.

    ``walls[row, col]`` is True for a wall block. Row 0 is the top (largest y), as in
    Gymnasium-Robotics' ``Maze.cell_rowcol_to_xy``; cells are ``scale`` wide.
    """

    walls: np.ndarray
    scale: float = 1.0

    def __post_init__(self) -> None:
        walls = np.asarray(self.walls, dtype=bool)
        if walls.ndim != 2 or min(walls.shape) < 1:
            raise ValueError(f"a maze map must be a 2-d grid of cells, got shape {walls.shape}")
        object.__setattr__(self, "walls", walls)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MazeGrid):
            return NotImplemented
        return self.scale == other.scale and np.array_equal(self.walls, other.walls)

    __hash__ = None  # type: ignore[assignment]  # mutable-array contents: not hashable

    @classmethod
    def from_env(cls, env) -> "MazeGrid":
        """The grid of a PointMaze environment (``env.unwrapped.maze``)."""
        maze = getattr(env.unwrapped, "maze", None)
        if maze is None:
            raise ValueError(f"{env.unwrapped.__class__.__name__} has no maze (env.unwrapped.maze); "
                             "MazeGrid needs a Gymnasium-Robotics maze environment such as PointMaze_UMaze-v3")
        return cls.from_map(maze.maze_map, float(maze.maze_size_scaling))

    @classmethod
    def from_map(cls, maze_map, scale: float = 1.0) -> "MazeGrid":
        """From a Gymnasium-Robotics map: 1 is a wall; 0, "g", "r", "c" are free cells."""
        return cls(np.array([[cell == 1 for cell in row] for row in maze_map], dtype=bool), scale)

    def to_config(self) -> dict:
        """JSON-able form, stored with a checkpoint (it says which maze the model was trained on)."""
        return {"walls": self.walls.astype(int).tolist(), "scale": self.scale}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "MazeGrid":
        return cls(np.array(config["walls"], dtype=bool), float(config.get("scale", 1.0)))

    @property
    def shape(self) -> tuple[int, int]:
        return self.walls.shape  # type: ignore[return-value]

    @property
    def x_center(self) -> float:
        return self.shape[1] / 2 * self.scale

    @property
    def y_center(self) -> float:
        return self.shape[0] / 2 * self.scale

    def cell_center(self, cell) -> np.ndarray:
        """(x, y) of the centre of cell (row, col)."""
        row, col = cell
        return np.array([(col + 0.5) * self.scale - self.x_center, self.y_center - (row + 0.5) * self.scale])

    def cells_of(self, points) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) int64 arrays of the cells holding (..., 2) points (x, y); outside the maze too."""
        points = np.asarray(points, dtype=np.float64)
        rows = np.floor((self.y_center - points[..., 1]) / self.scale).astype(np.int64)
        cols = np.floor((points[..., 0] + self.x_center) / self.scale).astype(np.int64)
        return rows, cols

    def cell_of(self, xy) -> tuple[int, int]:
        """(row, col) of the cell holding the point (x, y)."""
        row, col = self.cells_of(np.asarray(xy, dtype=np.float64).reshape(2))
        return int(row), int(col)

    def free_at(self, points) -> np.ndarray:
        """For (..., 2) points (x, y): True where the point lies inside the maze and not in a wall block."""
        rows, cols = self.cells_of(points)
        inside = (rows >= 0) & (rows < self.shape[0]) & (cols >= 0) & (cols < self.shape[1])
        free = np.zeros(rows.shape, dtype=bool)
        free[inside] = ~self.walls[rows[inside], cols[inside]]
        return free

    def is_free(self, xy) -> bool:
        """True when (x, y) lies inside the maze and not in a wall block."""
        return bool(self.free_at(np.asarray(xy, dtype=np.float64).reshape(2)))

    def fraction_free(self, points) -> float:
        """The share of (x, y) points (N, 2) that lie in free cells: a check that data belong to this maze."""
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return float(self.free_at(points).mean()) if len(points) else 1.0

    def clear_lines(self, start, ends, margin: float = 0.0, spacing: float = 0.05) -> np.ndarray:
        """For each of ``ends`` (N, 2): True when the straight segment from ``start`` to it, widened
        to a band of half-width ``margin``, stays in free cells (checked every ``spacing``: the
        band's centre line and both edges). The edges count from ``margin`` away from ``start``
        on, so that a start close to a wall still sees the way out of it."""
        start = np.asarray(start, dtype=np.float64).reshape(1, 2)
        ends = np.asarray(ends, dtype=np.float64).reshape(-1, 2)
        offsets = ends - start
        lengths = np.linalg.norm(offsets, axis=1, keepdims=True)
        normals = np.stack([-offsets[:, 1], offsets[:, 0]], axis=1) / np.maximum(lengths, 1e-12)
        samples = max(2, int(np.ceil(lengths.max(initial=0.0) / spacing)) + 1)
        fractions = np.linspace(0.0, 1.0, samples)[None, :]  # (1, S)
        along = start[:, None] + offsets[:, None] * fractions[..., None]  # (N, S, 2)
        clear = self.free_at(along).all(axis=1)
        if margin > 0:
            past_start = fractions * lengths >= margin  # (N, S)
            for side in (-margin, margin):
                free = self.free_at(along + side * normals[:, None])
                clear &= (free | ~past_start).all(axis=1)
        return clear

    def free_cells(self) -> list[tuple[int, int]]:
        return [tuple(int(v) for v in rc) for rc in np.argwhere(~self.walls)]

    def distances_to(self, goal_cell) -> np.ndarray:
        """Shortest-path length (in cells, 4-connected) from every cell to ``goal_cell``; -1 where unreachable."""
        goal_cell = tuple(int(v) for v in goal_cell)
        dist = np.full(self.shape, -1, dtype=np.int64)
        if not self._inside(goal_cell) or self.walls[goal_cell]:
            raise ValueError(f"goal cell {goal_cell} is a wall or outside the {self.shape[0]}x{self.shape[1]} maze")
        dist[goal_cell] = 0
        queue = deque([goal_cell])
        while queue:
            row, col = queue.popleft()
            for nxt in ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1)):
                if self._inside(nxt) and not self.walls[nxt] and dist[nxt] < 0:
                    dist[nxt] = dist[row, col] + 1
                    queue.append(nxt)
        return dist

    def _inside(self, cell) -> bool:
        return 0 <= cell[0] < self.shape[0] and 0 <= cell[1] < self.shape[1]

    def shortest_path(self, start_cell, goal_cell) -> list[tuple[int, int]]:
        """Cells from ``start_cell`` to ``goal_cell`` (both included) along a shortest path."""
        dist = self.distances_to(goal_cell)
        cell = tuple(int(v) for v in start_cell)
        if not self._inside(cell) or dist[cell] < 0:
            raise ValueError(f"no path from cell {cell} to cell {tuple(goal_cell)} in this maze")
        path = [cell]
        while dist[cell] > 0:
            cell = _downhill(dist, cell)
            path.append(cell)
        return path

    def check_inside(self, xy, what: str = "goal") -> None:
        """A clear error for a point outside the maze's extent (its walls are not read)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1)
        if xy.shape != (2,) or not np.all(np.isfinite(xy)):
            raise ValueError(f"the {what} must be a finite (x, y) pair, got {xy.tolist()}")
        half_x, half_y = self.x_center, self.y_center
        if not (-half_x <= xy[0] <= half_x and -half_y <= xy[1] <= half_y):
            raise ValueError(f"the {what} ({xy[0]:.3f}, {xy[1]:.3f}) lies outside the maze "
                             f"(x in [{-half_x:g}, {half_x:g}], y in [{-half_y:g}, {half_y:g}])")

    def check_point(self, xy, what: str = "goal") -> None:
        """A clear error for a point outside the maze or inside a wall."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1)
        if xy.shape != (2,) or not np.all(np.isfinite(xy)):
            raise ValueError(f"the {what} must be a finite (x, y) pair, got {xy.tolist()}")
        if not self.is_free(xy):
            half_x, half_y = self.x_center, self.y_center
            raise ValueError(
                f"the {what} ({xy[0]:.3f}, {xy[1]:.3f}) lies in a wall or outside the maze "
                f"(x in [{-half_x:g}, {half_x:g}], y in [{-half_y:g}, {half_y:g}]; cell {self.cell_of(xy)})"
            )


def _downhill(dist: np.ndarray, cell: tuple[int, int]) -> tuple[int, int]:
    """The neighbour one step closer to the goal (the first in a fixed order, so paths are deterministic)."""
    row, col = cell
    for nxt in ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1)):
        if 0 <= nxt[0] < dist.shape[0] and 0 <= nxt[1] < dist.shape[1] and dist[nxt] == dist[cell] - 1:
            return nxt
    raise AssertionError("distance map without a downhill neighbour")  # cannot happen for a BFS map


def pd_action(target, state, gain: float = 10.0, damping: float = 1.0) -> np.ndarray:
    """The PointMaze controller: clip(gain (target - position) - damping velocity, -1, 1).

    ``state`` is (x, y, vx, vy). D4RL's maze2d expert steered this way; so do the waypoint
    expert and the planner's path following.
    """
    state = np.asarray(state, dtype=np.float64)
    action = gain * (np.asarray(target, dtype=np.float64) - state[:2]) - damping * state[2:]
    return np.clip(action, -1.0, 1.0).astype(np.float32)


class WaypointExpert:
    """D4RL's maze2d controller, done right: BFS waypoints and PD control, a fresh plan per goal.

    ``act(obs)`` takes a PointMaze observation dict (or a flat (x, y, vx, vy) with ``goal=``).
    The waypoint is the centre of the next cell on a shortest path to the goal's cell, or the
    goal itself once in its cell; the action is clip(gain (waypoint - position) - velocity, -1, 1).
    The distance map is rebuilt whenever the goal's cell changes, so goals resampled on arrival
    (``continuing_task=True, reset_target=True``) are followed at once.
    """

    def __init__(self, grid: MazeGrid, gain: float = 10.0, damping: float = 1.0):
        self.grid = grid
        self.gain = float(gain)
        self.damping = float(damping)
        self._goal_cell: tuple[int, int] | None = None
        self._dist: np.ndarray | None = None

    def reset(self) -> None:
        self._goal_cell = self._dist = None

    def waypoint(self, position, goal) -> np.ndarray:
        goal = np.asarray(goal, dtype=np.float64)
        goal_cell = self.grid.cell_of(goal)
        if goal_cell != self._goal_cell:
            self._goal_cell, self._dist = goal_cell, self.grid.distances_to(goal_cell)
        cell = self.grid.cell_of(position)
        if cell == goal_cell or not self.grid._inside(cell) or self._dist[cell] <= 0:
            # In the goal's cell (or pushed into a wall cell by a collision): head for the goal.
            return goal
        return self.grid.cell_center(_downhill(self._dist, cell))

    def act(self, obs, goal=None) -> np.ndarray:
        if isinstance(obs, Mapping):
            state, goal = np.asarray(obs["observation"], dtype=np.float64), obs["desired_goal"]
        else:
            state = np.asarray(obs, dtype=np.float64)
            if goal is None:
                raise ValueError("WaypointExpert.act needs the goal: pass the observation dict or goal=(x, y)")
        if state.shape != (4,):
            raise ValueError(f"WaypointExpert expects a PointMaze state (x, y, vx, vy) of shape (4,), got {state.shape}")
        return pd_action(self.waypoint(state[:2], goal), state, self.gain, self.damping)

    __call__ = act


def plot_maze(ax, grid: MazeGrid, *, color: str = "0.35") -> None:
    """Draw the wall blocks of ``grid`` on a matplotlib axis, in MuJoCo coordinates."""
    from matplotlib.patches import Rectangle

    for row, col in np.argwhere(grid.walls):
        x, y = grid.cell_center((row, col)) - grid.scale / 2
        ax.add_patch(Rectangle((x, y), grid.scale, grid.scale, facecolor=color, edgecolor="none"))
    ax.set_xlim(-grid.x_center, grid.x_center)
    ax.set_ylim(-grid.y_center, grid.y_center)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


@contextlib.contextmanager
def hidden_inner_walls() -> Iterator[None]:
    """The map hidden as an outside judge hides it: every :class:`MazeGrid` built inside has its
    inner walls cleared (the border stays; the environment's physics keep their walls). A planner
    that reads the walls then sees an open field; one that plans from observations and the goal
    alone acts exactly as with the map."""
    original = MazeGrid.__post_init__

    def cleared(self):
        original(self)
        walls = self.walls.copy()
        walls[1:-1, 1:-1] = False
        object.__setattr__(self, "walls", walls)

    MazeGrid.__post_init__ = cleared
    try:
        yield
    finally:
        MazeGrid.__post_init__ = original
