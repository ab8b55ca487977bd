"""The spoken-digit measures: the classifier's front end, Frechet distance and inception score."""

import numpy as np
import torch

from modalities.audio.metrics import SpokenDigitClassifier, frechet_distance, inception_score


def test_inception_score_runs_from_one_to_the_number_of_classes():
    assert abs(inception_score(np.full((50, 10), 0.1)) - 1.0) < 1e-9   # no confidence
    one_class = np.zeros((50, 10))
    one_class[:, 3] = 1
    assert abs(inception_score(one_class) - 1.0) < 1e-6                # every clip the same digit
    balanced = np.eye(10)[np.arange(50) % 10]
    assert abs(inception_score(balanced) - 10.0) < 1e-4                # ten confident, balanced classes


def test_frechet_distance_is_zero_for_one_set_and_the_mean_shift_squared_for_a_shifted_one():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 8))
    assert abs(frechet_distance(a, a)) < 1e-6
    assert abs(frechet_distance(a, a + 2.0) - 4.0 * 8) < 1e-6


def test_the_classifier_takes_any_loudness_and_length():
    net = SpokenDigitClassifier().eval()
    clip = torch.randn(3, 1, 8192) * 0.3
    with torch.no_grad():
        assert torch.allclose(net.features(clip), net.features(clip * 0.05), atol=1e-4)  # peak-normalised
        assert net(torch.randn(2, 1, 4000) * 0.1).shape == (2, 10)                       # padded to the hop
        assert net.embed(clip).shape == (3, 64)


def test_voicing_clarity_tells_a_harmonic_voice_from_noise():
    import math

    from modalities.audio.metrics import voicing_clarity

    sr, t = 8000, torch.arange(8192) / 8000
    gen = torch.Generator().manual_seed(0)
    voice = sum(0.5 / k * torch.sin(2 * math.pi * 120 * k * t) for k in range(1, 15))     # f0 120 Hz
    high = sum(0.3 / k * torch.sin(2 * math.pi * 380 * k * t + k) for k in range(1, 6))  # f0 380 Hz
    noise = torch.randn(8192, generator=gen) * 0.3
    # A voice that starts after silence: only its loud frames count.
    padded = torch.cat([torch.zeros(4096), voice[:4096]])
    clarity = voicing_clarity(torch.stack([voice, high, noise, padded])[:, None], sr)
    assert clarity.shape == (4,)
    assert clarity[0] > 0.95 and clarity[1] > 0.95 and clarity[3] > 0.9, clarity
    assert clarity[2] < 0.35, clarity
    # The same voice under noise of equal power is less clear.
    mixed = voice + torch.randn(8192, generator=gen) * voice.std()
    assert voicing_clarity(mixed[None, None], sr)[0] < clarity[0] - 0.2
