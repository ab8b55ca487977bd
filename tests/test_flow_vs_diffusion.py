"""benchmarks/flow_vs_diffusion.py: its --quick run trains, calibrates and scores every model of a
modality and writes a table with a row per model at each call count, all values finite."""

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quick(tmp_path, *flags) -> dict:
    out = tmp_path / "table.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "flow_vs_diffusion.py"), "--quick", *flags,
                             "--out", str(out), "--work-dir", str(tmp_path / "work")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"exited {result.returncode} after {wall:.0f} s:\n{output[-3000:]}"
    return json.loads(out.with_suffix(".json").read_text())


def test_quick_run_writes_both_models_at_every_call_count(tmp_path):
    if importlib.util.find_spec("sklearn") is None:  # the digits loader of the image modality
        pytest.skip("the image benchmark needs scikit-learn")
    out = tmp_path / "table.md"
    data = _quick(tmp_path)
    rows = data["rows"]
    for kind in ("diffusion", "flow"):
        assert data["models"][kind]["train_wall_s"] > 0
        for calibrated in (False, True):
            calls = sorted(r["calls"] for r in rows if r["kind"] == kind and r["calibrated"] == calibrated)
            assert set(calls) == {5, 10, 20}, (kind, calibrated, calls)
    for r in rows:
        for key in ("acc", "fd", "seconds"):
            assert math.isfinite(r[key]), r
        assert 0.0 <= r["acc"] <= 1.0
    flow, diffusion = data["models"]["flow"]["diffusion"], data["models"]["diffusion"]["diffusion"]
    assert (flow["schedule"], flow["prediction"]) == ("flow", "flow")
    assert (diffusion["schedule"], diffusion["prediction"]) == ("cosine", "v")
    table = out.read_text()
    assert "| flow (rectified" in table and "| diffusion (v-pred, cosine)" in table
    for calls in (5, 10, 20):
        assert f"| {calls} |" in table
    # Nothing is written beside the table but its JSON (the work dir was given explicitly).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.json", "table.md", "work"]


def test_quick_planning_run_scores_flow_planners_with_the_map_hidden(tmp_path):
    """The planner ranks its candidates by re-noising them at table steps: on the flow path those
    are times in [0, 1], so a flow planner that acts at all got them right."""
    data = _quick(tmp_path, "--modality", "planning")
    described = {kind: model["diffusion"] for kind, model in data["models"].items()}
    assert {k: (d["schedule"], d["prediction"]) for k, d in described.items()} == {
        "diffusion": ("cosine", "x0"), "flow": ("flow", "flow"), "flow-x0": ("flow", "x0")}
    assert data["references"]["expert"]["return"] > data["references"]["random"]["return"]
    rows = data["rows"]
    for kind in described:
        for calibrated in (False, True):
            calls = {r["calls"] for r in rows if r["kind"] == kind and r["calibrated"] == calibrated}
            assert calls == {5, 10, 20}, (kind, calibrated, calls)
    for r in rows:
        assert math.isfinite(r["score"]) and 0.0 <= r["success"] <= 1.0 and r["actions_per_s"] > 0, r
    assert len(data["verdict"]) == 2 * len([r for r in rows if r["kind"] == "diffusion"])


def test_quick_text_run_trains_flow_with_x0_prediction_and_scores_both_models(tmp_path):
    data = _quick(tmp_path, "--modality", "text")
    described = {kind: (model["diffusion"]["schedule"], model["diffusion"]["prediction"])
                 for kind, model in data["models"].items()}
    assert described == {"diffusion": ("sqrt", "x0"), "flow-x0": ("flow", "x0")}
    human = data["references"]["held-out human descriptions, as many as a row"]
    assert human["perplexity"] > 1 and 0 < human["distinct_2"] <= 1
    for kind in described:
        for calibrated in (False, True):
            calls = {r["calls"] for r in data["rows"] if r["kind"] == kind and r["calibrated"] == calibrated}
            assert calls == {5, 10, 20}, (kind, calibrated, calls)
    for r in data["rows"]:
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1 and 0 <= r["repeats"] <= 1, r
    # The smoke run's judge stays in its work folder.
    assert (tmp_path / "work" / "ar_lm-quick.safetensors").is_file()


def test_every_audio_variant_trains_what_its_label_says():
    """The mel preset is flow with x0 prediction, so the diffusion row must ask for its schedule."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "recipes"))
    import audio_train
    import flow_vs_diffusion

    parser = audio_train.build_parser()
    modality = flow_vs_diffusion.MODALITIES["audio"]
    trained = {}
    for variant in modality.variants:
        args = parser.parse_args([*modality.train_args(argparse.Namespace(max_steps=3, seed=0)), *variant.flags])
        s = audio_train.resolve_settings(args, parser)
        trained[variant.key] = (s["schedule"], s["prediction"])
    assert trained == {"diffusion": ("cosine", "x0"), "flow": ("flow", "flow"), "flow-x0": ("flow", "x0")}
