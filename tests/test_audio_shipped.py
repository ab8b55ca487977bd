"""The shipped audio checkpoints: the spoken-digits model that ``generate`` uses without a
checkpoint, and the digit classifier that judges it. Its clips must be heard as the digit
asked for, fast (6-step) and slow (50-step) sampling must agree, and unconditional samples
must not collapse to one sound. A handful of clips and few steps keep this to seconds."""

import json

import pytest
import torch

import diffkit
from modalities.audio.data import DEFAULT_WINDOW, FSDD_SAMPLE_RATE, load_fsdd
from modalities.audio.mel import log_mel
from modalities.audio.metrics import CLASSIFIER_DIR, inception_score, load_digit_classifier
from modalities.audio.modality import DEFAULT_CHECKPOINT, generate_audio, load_audio_model

LABELS = torch.arange(20) % 10  # two clips of every digit


@pytest.fixture(scope="module")
def classifier():
    return load_digit_classifier(CLASSIFIER_DIR)


@pytest.fixture(scope="module")
def fast():
    return generate_audio(labels=LABELS, steps=6, seed=0, device="cpu")


@pytest.fixture(scope="module")
def slow():
    return generate_audio(labels=LABELS, steps=50, seed=1, device="cpu")


def test_the_shipped_checkpoints_load_and_say_how_they_were_made():
    model = load_audio_model(None, "cpu")
    assert model.path == DEFAULT_CHECKPOINT.resolve() and model.kind == "mel"
    assert (model.sample_rate, model.length, model.num_classes) == (8000, DEFAULT_WINDOW, 10)
    size = sum(f.stat().st_size for f in DEFAULT_CHECKPOINT.iterdir())
    assert size < 8e6  # a few MB inside the project
    config = json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())
    extra = config["extra"]
    assert extra["recipe"].startswith("python recipes/audio_train.py") and extra["seed"] == 0
    assert extra["wall_time_s"] > 0 and extra["hardware"] and extra["weights"] == "EMA, float16"
    readme = (DEFAULT_CHECKPOINT / "README.md").read_text()
    assert "recipes/audio_train.py" in readme and "wall time" in readme
    assert diffkit.checkpoint.checkpoint_exists(CLASSIFIER_DIR)


def test_the_classifier_hears_held_out_real_digits(classifier):
    test = load_fsdd("test", FSDD_SAMPLE_RATE, DEFAULT_WINDOW, peak=0.9, max_clips=60)
    acc = (classifier.predict(test.audio) == test.labels).float().mean().item()
    assert acc >= 0.85
    recorded = json.loads((CLASSIFIER_DIR / "config.json").read_text())["modality_config"]["held_out_accuracy"]
    assert recorded >= 0.9
    # It judges what is said, not how loud: a quieter copy is heard the same.
    assert torch.equal(classifier.predict(test.audio[:10] * 0.1), classifier.predict(test.audio[:10]))


def test_generate_without_a_checkpoint_uses_the_shipped_model(fast):
    out = diffkit.generate(modality="audio", labels=[7] * 2, steps=6, seed=0, device="cpu")
    assert out.audio.shape == (2, 1, DEFAULT_WINDOW) and out.sample_rate == 8000
    assert out.audio.abs().max() <= 1 and out.audio.abs().amax(-1).min() > 0.01  # sound, not silence
    assert torch.equal(out.audio, generate_audio(labels=[7] * 2, steps=6, seed=0, device="cpu").audio)


def test_generated_digits_are_recognised_by_the_classifier(classifier, fast):
    acc = (classifier.predict(fast.audio) == LABELS).float().mean().item()
    # Measured: 0.95 (19 of 20).
    assert acc >= 0.85, f"6-step clips heard as their digit {acc:.0%} of the time (chance: 10%)"


def test_fast_and_slow_sampling_agree_in_distribution(classifier, fast, slow):
    acc = [(classifier.predict(out.audio) == LABELS).float().mean().item() for out in (fast, slow)]
    assert min(acc) >= 0.85 and abs(acc[0] - acc[1]) <= 0.2, acc  # measured: 0.95 and 1.0
    # The clips' average log-mel spectra (their loudness and timbre) match across step counts.
    cfg = load_audio_model(None, "cpu").mel_config
    spectra = [log_mel(out.audio, cfg).mean(dim=(0, 2)) for out in (fast, slow)]
    assert (spectra[0] - spectra[1]).abs().mean() < 0.1
    assert torch.corrcoef(torch.stack(spectra))[0, 1] > 0.95


def test_unconditional_samples_are_not_all_one_sound(classifier):
    out = generate_audio(num_samples=20, steps=6, seed=2, device="cpu")
    assert out.labels is None
    probs = classifier.probabilities(out.audio)
    heard = torch.bincount(probs.argmax(1), minlength=10)
    # Measured: 7 digits heard, at most 5 clips of one, inception score 2.67.
    assert (heard > 0).sum() >= 5 and heard.max() <= 8, heard.tolist()
    assert inception_score(probs) > 2.3
    # and the clips themselves differ from one another
    flat = log_mel(out.audio, load_audio_model(None, "cpu").mel_config).flatten(1)
    assert torch.cdist(flat, flat)[~torch.eye(20, dtype=torch.bool)].min() > 1.0


def test_the_waveform_route_needs_a_waveform_checkpoint():
    with pytest.raises(ValueError, match="mel-diffusion model; the waveform route needs a DiffWave checkpoint"):
        generate_audio(labels=[1], route="waveform", device="cpu")
    # route="mel" without a checkpoint is the shipped model's own route
    assert generate_audio(labels=[1], route="mel", steps=2, seed=0, device="cpu").audio.shape == (1, 1, DEFAULT_WINDOW)
