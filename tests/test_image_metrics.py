"""The benchmark's measuring tools: the shipped digit classifier and the Frechet distance."""

import numpy as np
import pytest
import torch

from diffkit.checkpoint import CheckpointError, read_config
from diffkit.cli import main as cli
from modalities.image.data import load_digits
from modalities.image.metrics import (
    CLASSIFIER_DIR,
    DigitClassifier,
    frechet_distance,
    load_digit_classifier,
    nearest_neighbour_distances,
    save_digit_classifier,
)
from modalities.image.modality import DEFAULT_CHECKPOINT


def test_shipped_classifier_recognises_held_out_digits():
    x, y = load_digits(split="test")
    clf = load_digit_classifier()
    assert (clf.predict(x) == y).float().mean() > 0.95
    assert clf.embed(x[:5]).shape == (5, 64)
    assert not clf.training and not any(p.requires_grad for p in clf.parameters())


def test_classifier_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DigitClassifier(feature_dim=8)
    save_digit_classifier(model, tmp_path / "clf", {"held_out_accuracy": 0.5}, step=3)
    config = read_config(tmp_path / "clf", modality="image")
    assert config["diffusion"] is None and config["step"] == 3
    assert config["modality_config"] == {"held_out_accuracy": 0.5}
    loaded = load_digit_classifier(tmp_path / "clf")
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    assert torch.equal(loaded.embed(x), model.embed(x))


def test_classifier_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--train-classifier"):
        load_digit_classifier(tmp_path / "none")
    # A diffusion checkpoint is not a classifier; the allow-list refuses to build it.
    with pytest.raises(CheckpointError, match="holds a 'modalities.image.unet.UNet', but this loader builds only "
                                              "modalities.image.metrics.DigitClassifier"):
        load_digit_classifier(DEFAULT_CHECKPOINT)


def test_info_summarises_the_classifier(capsys):
    assert cli(["info", str(CLASSIFIER_DIR)]) == 0
    text = capsys.readouterr().out
    assert "modality       image" in text
    assert "model          modalities.image.metrics.DigitClassifier  num_classes=10 feature_dim=64" in text
    assert "diffusion      none (not a diffusion model)" in text
    assert "held_out_accuracy=0.98" in text and "checksums      1 file(s)" in text


def test_frechet_distance_is_zero_for_equal_sets_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    assert abs(frechet_distance(a, a)) < 1e-6
    # Mean shift of 1 in each of 8 dimensions adds 8 to the distance.
    assert abs(frechet_distance(a, a + 1.0) - 8.0) < 1e-6
    assert frechet_distance(a, 2 * a) > 1.0


def test_nearest_neighbour_distance_finds_copies():
    ref = torch.rand(10, 1, 4, 4)
    queries = torch.cat([ref[:2], ref[:2] + 0.5])
    d = nearest_neighbour_distances(queries, ref)
    assert torch.all(d[:2] == 0) and torch.all(d[2:] > 0)
