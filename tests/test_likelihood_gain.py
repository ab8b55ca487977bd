"""benchmarks/likelihood_gain.py runs end to end on the image checkpoint with tiny sizes, scores
it with all three variance choices (fixed, Analytic-DPM, x0 error), and the x0-error variances
(Diffusion.nll's default after calibration) do not loosen the bound there."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "likelihood_gain.py"


def _module():
    spec = importlib.util.spec_from_file_location("likelihood_gain", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_image_quick_three_variances(tmp_path):
    gain = _module()
    out = tmp_path / "gain.md"
    args = gain.parse_args(["--modalities", "image", "--quick", "--held-out", "3", "--train", "32",
                            "--steps", "6", "--norm-times", "6", "--out", str(out)])
    rows, skipped = gain.run(args)
    assert not skipped and [r["modality"] for r in rows] == ["image"]
    row = rows[0]
    assert row["n"] == 3 and row["steps"] == 6
    for label in ("fixed", "analytic", "x0"):
        assert row[label].shape == (3,) and bool(row[label].isfinite().all()), label
        assert math.isfinite(row[f"{label}_mean"]), label
        assert set(row[f"{label}_terms"]) == {"prior", "kl", "decoder"}, label
    # Same noise in all three: the prior term does not depend on the reverse variances.
    assert row["fixed_terms"]["prior"] == row["analytic_terms"]["prior"] == row["x0_terms"]["prior"]
    # The x0-error variances minimise each step's expected KL for the model's own mean, so the
    # bound may only go up by Monte Carlo noise.
    assert row["x0_mean"] <= row["fixed_mean"] + 0.05, (row["fixed_mean"], row["x0_mean"])
    assert row["diff_mean"] == pytest.approx(row["x0_mean"] - row["fixed_mean"])
    assert row["analytic_diff_mean"] == pytest.approx(row["analytic_mean"] - row["fixed_mean"])
    assert 0 <= row["better"] <= 3 and 0 <= row["analytic_better"] <= 3
    d = row["diagnostics"]
    for key in ("decoder_std_fixed", "decoder_std_analytic", "decoder_std_x0", "x0_rms_error"):
        assert math.isfinite(d[key]) and d[key] > 0, key
    assert math.isfinite(row["eps_seconds"]) and row["eps_seconds"] >= 0

    assert gain.main(["--modalities", "image", "--quick", "--held-out", "2", "--train", "16", "--steps", "4",
                      "--out", str(out)]) == 0
    text = out.read_text()
    assert "| image | 2 | 4 / 1000 |" in text and "Hardware:" in text and "Seed: 0" in text
    assert "bits/dim, fixed | bits/dim, Analytic-DPM | bits/dim, x0 error | x0 error - fixed |" in text
    assert "decoder std, x0 error" in text
