"""`diffkit calibrate CHECKPOINT`: grids, statistics and variances written into config.json, nothing else touched."""

from __future__ import annotations

import json

import numpy as np
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


def _with_defaults(path, **defaults):
    config = json.loads((path / "config.json").read_text())
    config["modality_config"] = {"defaults": defaults}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_the_recorded_sampler_gets_its_grids_too(gauss, tmp_path, capsys):
    """Grids for the diffusion's default sampler and for the sampler the checkpoint records as its
    sampling default (at each --steps and at its recorded step count); none for a stochastic one."""
    path = _with_defaults(_checkpoint(tmp_path / "ckpt"), sampler="dpm++2m", steps=3)
    assert main(["calibrate", str(path), *ARGS, "--data", "0"]) == 0
    grids = json.loads((path / "config.json").read_text())["diffusion"]["calibration"]["grids"]
    assert set(grids) == {"dpm-v3/4", "dpm++2m/4", "dpm++2m/3"}
    capsys.readouterr()
    stochastic = _with_defaults(_checkpoint(tmp_path / "ddpm"), sampler="ddpm", steps=50)
    assert main(["calibrate", str(stochastic), *ARGS, "--data", "0"]) == 0
    assert "'ddpm' is stochastic: no grid is fitted" in capsys.readouterr().out
    assert set(json.loads((stochastic / "config.json").read_text())["diffusion"]["calibration"]["grids"]) == {
        "dpm-v3/4"}
    # A grid the checkpoint holds (a distilled student's own) is kept, not refitted.
    held = _with_defaults(_checkpoint(tmp_path / "held"), sampler="ddim", steps=3)
    config = json.loads((held / "config.json").read_text())
    config["diffusion"]["calibration"] = {"grids": {"ddim/3": {"times": [99.0, 49.0, 0.0]}}}
    (held / "config.json").write_text(json.dumps(config))
    assert main(["calibrate", str(held), *ARGS, "--data", "0"]) == 0
    assert "already holds the recorded sampler's grids ddim/3: kept" in capsys.readouterr().out
    grids = json.loads((held / "config.json").read_text())["diffusion"]["calibration"]["grids"]
    assert grids["ddim/3"]["times"] == [99.0, 49.0, 0.0] and set(grids) == {"dpm-v3/4", "ddim/4", "ddim/3"}
    named = _with_defaults(_checkpoint(tmp_path / "named"), sampler="ddim", steps=4)
    assert main(["calibrate", str(named), *ARGS, "--data", "0", "--samplers", "heun"]) == 0  # as asked, no more
    assert set(json.loads((named / "config.json").read_text())["diffusion"]["calibration"]["grids"]) == {"heun/4"}


def _perturbed(net, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():  # an untrained network with zero-initialised outputs would ignore the grid
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return net


def test_generate_samples_on_the_recorded_samplers_calibrated_grid(tmp_path):
    """An image checkpoint recording dpm++2m at 3 steps: once calibrated, generate() draws exactly
    what the calibrated Diffusion draws on the fitted dpm++2m/3 grid, and not what it drew before."""
    pytest.importorskip("sklearn")
    from diffkit.calibration import calibrate_checkpoint
    from diffkit.runs import seeded_generator
    from modalities.image.unet import UNet

    kwargs = {"in_channels": 1, "image_size": 8, "base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": [1, 1],
              "attention_levels": [], "num_classes": None, "context_dim": None, "low_res_channels": 0,
              "learn_sigma": False, "dropout": 0.0}
    torch.manual_seed(0)
    net = _perturbed(UNet(**kwargs), 1)
    path = save_checkpoint(tmp_path / "image", model=net, step=1, config={
        "modality": "image", "model": {"class": "modalities.image.unet.UNet", "kwargs": kwargs},
        "diffusion": Diffusion("linear", 100).config,
        "modality_config": {"data": "digits", "defaults": {"sampler": "dpm++2m", "steps": 3, "guidance_scale": 1.0}}})
    before = diffkit.generate(modality="image", checkpoint=str(path), num_samples=2, seed=0, device="cpu")
    calibrated = calibrate_checkpoint(path, steps=(3,), batch=8, data=0, max_evals=10, reference_steps=12,
                                      model_statistics=False)
    stored = json.loads((path / "config.json").read_text())["diffusion"]["calibration"]["grids"]
    assert "dpm++2m/3" in stored
    grid = calibrated.sampling_grid(3, sampler="dpm++2m")
    assert torch.allclose(grid.times, torch.tensor(stored["dpm++2m/3"]["times"], dtype=grid.times.dtype))
    assert not torch.equal(grid.times, calibrated.sampling_grid(3, sampler="dpm++2m", calibrated=False).times)
    after = diffkit.generate(modality="image", checkpoint=str(path), num_samples=2, seed=0, device="cpu")
    direct = calibrated.sample(net.eval(), (2, 1, 8, 8), sampler="dpm++2m", steps=3, generator=seeded_generator(0),
                               device="cpu", wrappers=[diffkit.ClipX0(-1.0, 1.0)])
    torch.testing.assert_close(after, (direct.clamp(-1, 1) + 1) / 2, rtol=0, atol=1e-6)
    assert (after - before).abs().max() > 1e-3


def test_the_planner_plans_on_the_recorded_samplers_calibrated_grid(tmp_path, monkeypatch):
    """A planner checkpoint recording ddim at 3 steps: once calibrated, its plans are drawn on the
    fitted ddim/3 grid (and differ from those on the uncalibrated one)."""
    from diffkit.calibration import calibrate_checkpoint
    from modalities.planning.data import Normalizer
    from modalities.planning.model import TemporalUNet
    from modalities.planning.planner import DiffusionPlanner
    from modalities.planning.training import planner_diffusion

    torch.manual_seed(0)
    net = _perturbed(TemporalUNet(3, dim=8, dim_mults=(1, 2), zero_init_output=False), 2)
    modality_config = {"observation_dim": 2, "action_dim": 1, "horizon": 8,
                       "normalizer": Normalizer(np.zeros(3), np.ones(3), "gaussian").to_config(),
                       "defaults": {"sampler": "ddim", "steps": 3}}
    path = save_checkpoint(tmp_path / "planner", model=net, step=1, config={
        "modality": "planning", "model": {"class": "modalities.planning.model.TemporalUNet",
                                          "kwargs": {"transition_dim": 3, "dim": 8, "dim_mults": [1, 2],
                                                     "zero_init_output": False}},
        "diffusion": planner_diffusion(64).config, "modality_config": modality_config})
    before = DiffusionPlanner.load(path, device="cpu", seed=0).plan(np.zeros(2)).states
    calibrate_checkpoint(path, steps=(3,), batch=8, data=0, max_evals=30, reference_steps=20,
                         model_statistics=False)
    stored = json.loads((path / "config.json").read_text())["diffusion"]["calibration"]["grids"]
    assert "ddim/3" in stored
    grids = []
    original = Diffusion._grid

    def spy(self, *args, **kwargs):
        grids.append(original(self, *args, **kwargs))
        return grids[-1]

    monkeypatch.setattr(Diffusion, "_grid", spy)
    planner = DiffusionPlanner.load(path, device="cpu", seed=0)
    after = planner.plan(np.zeros(2)).states
    assert (planner.sampler, planner.steps) == ("ddim", 3)
    assert torch.allclose(grids[-1].times, torch.tensor(stored["ddim/3"]["times"], dtype=grids[-1].times.dtype))
    assert np.abs(after - before).max() > 1e-4
