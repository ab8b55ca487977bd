"""The benchmark's measuring tools: the shipped digit classifier and the Frechet distance."""

import numpy as np
import torch

from modalities.image.data import load_digits
from modalities.image.metrics import frechet_distance, load_digit_classifier, nearest_neighbour_distances


def test_shipped_classifier_recognises_held_out_digits():
    x, y = load_digits(split="test")
    clf = load_digit_classifier()
    assert (clf.predict(x) == y).float().mean() > 0.95
    assert clf.embed(x[:5]).shape == (5, 64)


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
