"""benchmarks/mixture_samplers.py: its energy distance tells mixtures apart, and --quick runs end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import mixture_samplers  # noqa: E402


def test_energy_distance_of_the_same_mixture_is_smaller_than_against_a_shifted_one():
    a = mixture_samplers.sample_mixture(1000, torch.Generator().manual_seed(0))
    b = mixture_samplers.sample_mixture(1000, torch.Generator().manual_seed(1))
    shifted = mixture_samplers.sample_mixture(1000, torch.Generator().manual_seed(2), shift=(0.3, 0.0))
    wider = mixture_samplers.sample_mixture(1000, torch.Generator().manual_seed(3), std=0.3)
    same = mixture_samplers.energy_distance(a, b)
    assert abs(same) < 0.01  # unbiased: zero in expectation for one distribution
    assert mixture_samplers.energy_distance(a, shifted) > same + 0.02
    assert mixture_samplers.energy_distance(a, wider) > same + 0.004
    # Symmetric, and the precomputed self-term gives the same value.
    assert math.isclose(mixture_samplers.energy_distance(a, shifted), mixture_samplers.energy_distance(shifted, a),
                        rel_tol=1e-9)
    y_self = mixture_samplers._distance_sum(b.double(), b.double()) / (len(b) * (len(b) - 1))
    assert math.isclose(mixture_samplers.energy_distance(a, b, y_self=y_self), same, rel_tol=1e-9, abs_tol=1e-12)


def test_mixture_log_density_is_normalised_and_peaks_at_the_modes():
    # Integrate the density on a grid: it is a probability density.
    axis = torch.linspace(-3, 3, 601, dtype=torch.float64)
    xx, yy = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([xx.flatten(), yy.flatten()], dim=1)
    mass = float(mixture_samplers.mixture_log_density(points).exp().sum()) * float(axis[1] - axis[0]) ** 2
    assert abs(mass - 1.0) < 1e-3
    means = mixture_samplers.mixture_means()
    at_modes = mixture_samplers.mixture_log_density(means)
    assert (at_modes > mixture_samplers.mixture_log_density(torch.zeros(1, 2))).all()


def test_quick_run_writes_a_table_with_finite_rows(tmp_path):
    out = tmp_path / "mixture.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = str(ROOT / "benchmarks" / "mixture_samplers.py")
    done = subprocess.run([sys.executable, script, "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    for row in ("| diffkit defaults, uncalibrated |", "| diffkit calibrated |",
                "| diffusers' best of the configurations |", "| unipc |", "| DPM++2M default |", "| FlowMatchEuler |", "## answers", "Floor"):
        assert row in text, row
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["quick"] and result["calls"] == [5, 10]
    rows = result["rows"]
    configs = {(r["model"], r["config"]) for r in rows}
    for needed in [("eps", mixture_samplers.DEFAULTS), ("eps", mixture_samplers.DEFAULTS_NOISE),
                   ("eps", mixture_samplers.CALIBRATED), ("flow", mixture_samplers.DEFAULTS),
                   ("flow", mixture_samplers.CALIBRATED), ("eps", "DPM++2M default"), ("flow", "FlowMatchEuler")]:
        assert needed in configs, needed
    for r in rows:
        assert math.isfinite(r["energy"]) and math.isfinite(r["logp_gap"]), r
        assert r["calls"] >= 1
    assert all(math.isfinite(v) for v in result["floor"]["draws"])
    # The markdown's energy cells are the JSON's values, x 1e3.
    default_5 = next(r for r in rows
                     if r["model"] == "eps" and r["config"] == mixture_samplers.DEFAULTS and r["calls"] == 5)
    assert f"| {mixture_samplers.DEFAULTS} | {default_5['energy'] * 1e3:.2f} |" in text


def test_quick_writes_nothing_without_out_and_the_full_run_writes_the_results_file():
    assert mixture_samplers.output_path(None, quick=True) is None
    assert mixture_samplers.output_path(Path("x.md"), quick=True) == Path("x.md")
    assert mixture_samplers.output_path(None, quick=False) == ROOT / "benchmarks" / "results" / "mixture_samplers.md"
