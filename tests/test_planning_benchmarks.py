"""The planning benchmarks run end to end with --quick (a tiny model, a few episodes): the next
full run only has to point them at trained checkpoints."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("gymnasium_robotics")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _main(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.slow
def test_maze_benchmark_quick(tmp_path):
    assert _main("planning_maze")(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "planning_maze.json").read_text())
    umaze = result["envs"]["PointMaze_UMaze-v3"]
    assert umaze["expert"]["score"] == pytest.approx(100.0) and umaze["random"]["score"] == pytest.approx(0.0)
    default, known = umaze["planner (defaults, map hidden)"], umaze["planner, known map (opt-in)"]
    assert default["episodes"] == 3 and umaze["bc"]["episodes"] == 3 and known["episodes"] == 3
    assert umaze["planner, Diffuser's acting"]["episodes"] == 3  # the same model, acting as Diffuser does
    assert not umaze["planner"]["known_map"] and umaze["known_map_planner"]["known_map"]
    assert default["actions_per_second"] > 0 and "score_se" in umaze["bc"]
    assert (tmp_path / "planning_maze_PointMaze_UMaze-v3.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "planning_maze.md").read_text()
    assert "| PointMaze_UMaze-v3 | planner (defaults, map hidden) |" in table and "Hierarchical Diffuser" in table


@pytest.mark.slow
def test_speed_benchmark_quick(tmp_path):
    assert _main("planning_speed")(["--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    ways = json.loads((tmp_path / "planning_speed.json").read_text())["envs"]["PointMaze_UMaze-v3"]["ways"]
    assert ways["Diffuser (maze)"]["sampler"] == "ddpm" and ways["Diffuser (maze)"]["steps"] == 16
    assert ways["Diffuser (locomotion)"]["candidates"] == 64
    assert ways["ours"]["actions_per_second"] > 0 and ways["ours"]["plans_per_second"] > 0


@pytest.mark.slow
def test_value_guidance_benchmark_quick(tmp_path):
    assert _main("planning_value_guidance")(["--quick", "--out", str(tmp_path / "out"),
                                             "--run-dir", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "out" / "planning_value_guidance.json").read_text())
    assert {"unguided", "guided (scale 0.1)", "ranked (4)"} <= set(result["results"])
    assert result["data"]["episodes"] == 20 and result["data"]["expert"][0] > result["data"]["random"][0]
