"""Every benchmark runs: `python benchmarks/X.py --quick` is a smoke run of seconds (tiny sizes, a
temporary output folder), so a benchmark that no longer imports or runs fails the suite instead of
rotting. The figures are not checked; benchmarks/results must be left as it was.

The planning benchmarks (planning_*.py) have their own quick runs in tests/test_planning_*.py, and
so do the scripts in TESTED_ELSEWHERE."""

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
HELPERS = {"benchmark_stats.py"}  # imported by the scripts, not run
# script: the test file that runs its --quick (not run twice)
TESTED_ELSEWHERE = {"mixture_samplers.py": "test_mixture_benchmark.py",
                    "flow_vs_diffusion.py": "test_flow_vs_diffusion.py"}

# script: (a line its quick run prints, the optional packages it needs)
QUICK = {
    "audio_quality.py": ("Real-time factor at 6 steps", ("torchaudio", "soundfile")),
    "audio_speed.py": ("Trainer / plain:", ("torchaudio", "soundfile")),
    "calibrate_image.py": ("wrote the calibration into", ("sklearn",)),
    "image_quality.py": ("| class-conditional w=", ("sklearn", "matplotlib")),
    "image_samplers.py": ("half the calls", ("sklearn", "diffusers")),
    "image_speed.py": ("diffkit image UNet", ("sklearn", "diffusers")),
    "likelihood_gain.py": ("wrote ", ("sklearn",)),
    "mixture_spacing.py": ("| E | unipc | trailing |", ()),
    "ode_likelihood.py": ("| flow, velocity |", ()),
    "sampler_overhead.py": ("| dpm-v3, per-element statistics |", ()),
    "samplers.py": ("calibrated defaults at 5 calls", ("diffusers",)),
    "text_quality.py": ("likelihood: ", ("tokenizers",)),
    "text_routes.py": ("likelihood: ", ("tokenizers",)),
}


def _snapshot(script: str) -> dict[str, tuple[int, int]]:
    """What the script could overwrite: its own files in benchmarks/results (they are named after it;
    other files there may change under a concurrent run of another benchmark) and the shipped image
    checkpoint that calibrate_image.py calibrates."""
    files = [p for p in RESULTS.glob(f"{Path(script).stem}*") if p.is_file()]
    files += list((ROOT / "modalities" / "image" / "checkpoints").glob("*/config.json"))
    return {str(p.relative_to(ROOT)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def test_every_benchmark_has_a_quick_run():
    scripts = {p.name for p in BENCHMARKS.glob("*.py")
               if p.name not in HELPERS and not p.name.startswith("planning_")}
    assert scripts == set(QUICK) | set(TESTED_ELSEWHERE), "give the new benchmark a --quick smoke run, list it in QUICK"
    for script, test_file in TESTED_ELSEWHERE.items():
        assert '"--quick"' in (BENCHMARKS / script).read_text() and (ROOT / "tests" / test_file).is_file(), script


@pytest.mark.parametrize("script", sorted(QUICK))
def test_quick_run(script):
    expected, needs = QUICK[script]
    for module in needs:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{script} needs {module}")
    before = _snapshot(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{script} --quick exited {result.returncode} after {wall:.0f} s:\n{output[-3000:]}"
    assert expected in result.stdout, f"{script} --quick did not print {expected!r}:\n{output[-3000:]}"
    assert _snapshot(script) == before, f"{script} --quick wrote into benchmarks/results or a shipped checkpoint"
