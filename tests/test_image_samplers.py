"""benchmarks/image_samplers.py --quick runs end to end on the shipped digits checkpoint and
writes a table with the diffkit rows beside diffusers' rows, every FD finite; its diffkit row
samples exactly what generate_images samples."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("diffusers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "image_samplers.py"


def _module():
    spec = importlib.util.spec_from_file_location("image_samplers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_table(tmp_path):
    bench = _module()
    assert bench.main(["--quick", "--out-dir", str(tmp_path), "--name", "quick"]) == 0
    report = json.loads((tmp_path / "quick.json").read_text())
    rows = report["rows"]
    by_config = {(r["library"], r["config"]): r for r in rows if r["steps"] == 5}
    for key in [("diffkit", bench.DEFAULTS), ("diffkit", bench.UNCALIBRATED), ("diffusers", "DPM++2M default")]:
        assert key in by_config, key
        assert math.isfinite(by_config[key]["fd"]) and by_config[key]["calls"] == 5
    assert math.isfinite(next(r["fd"] for r in rows if r["config"] == bench.REFERENCE))
    assert any(r["library"] == "diffusers" and r["calls"] == 10 and math.isfinite(r["fd"]) for r in rows)
    assert math.isfinite(report["floor"]["fd"])
    table = (tmp_path / "quick.md").read_text()
    assert "| diffkit | diffkit defaults |" in table and "| diffusers | DPM++2M default |" in table
    assert "half the calls" in table


def test_defaults_row_is_generate_images():
    bench = _module()
    from modalities.image.modality import DEFAULT_CHECKPOINT, generate_images, load_image_model

    model = load_image_model(DEFAULT_CHECKPOINT, "cpu")
    labels = torch.arange(8) % 10
    w = model.default("guidance_scale", 1.0)
    ours = bench.diffkit_samples(model, bench.starting_noise(model, 8, 0), labels, w, steps=5)
    theirs = generate_images(checkpoint=DEFAULT_CHECKPOINT, num_samples=8, seed=0, steps=5, labels=labels,
                             device="cpu", batch_size=8)
    torch.testing.assert_close(((ours + 1) / 2).clamp(0, 1), theirs)
