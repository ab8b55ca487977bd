"""`diffkit calibrate CHECKPOINT`: grids, statistics and variances written into config.json, nothing else touched."""

from __future__ import annotations

import json

import pytest
import torch

import diffkit
import diffkit.registry as registry
from diffkit import Diffusion, GaussianData
from diffkit.calibration import CalibrationInputs
from diffkit.checkpoint import save_checkpoint
from diffkit.cli import main
from diffkit.registry import register_modality
from _toys import TinyDenoiser

DATA = GaussianData(torch.linspace(-1, 1, 4), torch.linspace(0.3, 1.0, 4))


class BareModality:
    """A modality that samples but does not say how to calibrate its checkpoints."""

    def generate(self, **kwargs):
        return DATA.sample(2)

    def save(self, samples, path):
        return [path]


class GaussianModality(BareModality):
    """A modality whose checkpoints hold the exact model of DATA (the stored weights are ignored)."""

    name = "gauss"

    def calibration_inputs(self, checkpoint, *, batch, data, device, generator):
        config = json.loads((__import__("pathlib").Path(checkpoint) / "config.json").read_text())
        diffusion = Diffusion.from_config(config["diffusion"])
        return CalibrationInputs(DATA.model(diffusion.schedule), diffusion, (batch, 4),
                                 data=DATA.sample(max(data, 1), generator).float())


@pytest.fixture
def gauss(monkeypatch):
    monkeypatch.setattr(registry, "_registered", {})
    monkeypatch.setattr(registry, "_instances", {})
    monkeypatch.setattr(registry, "_entry_points", {})
    register_modality("gauss", GaussianModality())


def _checkpoint(path, modality="gauss", diffusion=True):
    config = {"modality": modality, "model": {"class": "TinyDenoiser", "kwargs": {"hidden": 16}}}
    if diffusion:
        config["diffusion"] = Diffusion("linear", 100).config
    return save_checkpoint(path, model=TinyDenoiser(), step=1, config=config)


ARGS = ["--steps", "4", "--batch", "16", "--data", "64", "--max-evals", "12", "--reference-steps", "20",
        "--no-progress", "--device", "cpu"]


def test_calibrate_writes_the_calibration_and_nothing_else(gauss, tmp_path, capsys):
    path = _checkpoint(tmp_path / "ckpt")
    weights = (path / "model.safetensors").read_bytes()
    before = json.loads((path / "config.json").read_text())
    assert main(["calibrate", str(path), *ARGS]) == 0
    after = json.loads((path / "config.json").read_text())
    calibration = after["diffusion"]["calibration"]
    assert set(calibration["grids"]) == {"dpm-v3/4"} and len(calibration["x0_mse"]) == 100
    assert {k: v for k, v in after.items() if k != "diffusion"} == {k: v for k, v in before.items() if k != "diffusion"}
    assert (path / "model.safetensors").read_bytes() == weights
    assert "grid dpm-v3/4" in capsys.readouterr().out
    # The stored grid is what a 4-step sample now uses.
    diffusion = Diffusion.from_config(after["diffusion"])
    stored = torch.tensor(calibration["grids"]["dpm-v3/4"]["times"], dtype=torch.float64)
    assert torch.allclose(diffusion.sampling_grid(4).times, stored, rtol=1e-6)
    assert not torch.allclose(diffusion.sampling_grid(4, calibrated=False).times, stored)


def test_dry_run_writes_nothing(gauss, tmp_path):
    path = _checkpoint(tmp_path / "ckpt")
    text = (path / "config.json").read_text()
    assert main(["calibrate", str(path), *ARGS, "--dry-run"]) == 0
    assert (path / "config.json").read_text() == text


def test_calibrate_refuses_what_it_cannot_calibrate(gauss, tmp_path, capsys):
    assert main(["calibrate", str(_checkpoint(tmp_path / "clf", diffusion=False)), *ARGS]) == 1
    assert "holds no diffusion" in capsys.readouterr().err
    register_modality("bare", BareModality())
    assert main(["calibrate", str(_checkpoint(tmp_path / "bare", modality="bare")), *ARGS]) == 1
    assert "does not say how to calibrate" in capsys.readouterr().err
    assert main(["calibrate", str(tmp_path / "missing"), *ARGS]) == 1


def test_calibrate_help_says_what_it_does(capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    text = capsys.readouterr().out
    assert "atomically" in text and "--no-calibrate" in text and "--steps" in text


def test_recipes_calibrate_their_exports_unless_told_not_to(gauss, tmp_path, capsys):
    from argparse import Namespace

    from diffkit.runs import calibrate_export

    skipped = _checkpoint(tmp_path / "skipped")
    calibrate_export(skipped, Namespace(no_calibrate=True, calibrate_steps=[3]))
    assert "calibration" not in json.loads((skipped / "config.json").read_text())["diffusion"]
    assert "diffkit calibrate" in capsys.readouterr().out
    done = _checkpoint(tmp_path / "done")
    calibrate_export(done, Namespace(no_calibrate=False, calibrate_steps=[3]), batch=16, data=32, max_evals=8,
                     reference_steps=20)
    assert set(json.loads((done / "config.json").read_text())["diffusion"]["calibration"]["grids"]) == {"dpm-v3/3"}
    classifier = _checkpoint(tmp_path / "classifier", diffusion=False)
    calibrate_export(classifier, Namespace(no_calibrate=False, calibrate_steps=[3]))  # nothing to calibrate


@pytest.mark.parametrize("recipe", ["image_train", "audio_train", "text_train", "planner_train"])
def test_every_recipe_says_it_calibrates_on_export(recipe):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = subprocess.run([sys.executable, str(root / "recipes" / f"{recipe}.py"), "--help"], capture_output=True,
                          text=True, check=True).stdout
    assert "--no-calibrate" in text and "--calibrate-steps" in text and "diffkit calibrate" in text


@pytest.mark.parametrize("name", ["image", "audio", "text", "planning"])
def test_shipped_modalities_follow_the_modality_protocol(name):
    modality = diffkit.get_modality(name)
    assert isinstance(modality, diffkit.Modality)
    assert callable(getattr(modality, "calibration_inputs", None))  # diffkit calibrate serves every modality


def test_no_statistics_keeps_the_config_small(gauss, tmp_path):
    path = _checkpoint(tmp_path / "ckpt")
    assert main(["calibrate", str(path), *ARGS, "--no-statistics", "--data", "0"]) == 0
    calibration = json.loads((path / "config.json").read_text())["diffusion"]["calibration"]
    assert "statistics" not in calibration and set(calibration["grids"]) == {"unipc/4"}
