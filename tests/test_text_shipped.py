"""The shipped E2E checkpoint (modalities/text/checkpoints/e2e): it loads, writes restaurant
descriptions, keeps the words of an infilling template, and follows control. Few samples and
few steps: these check that the shipped model works, benchmarks/text_quality.py measures it."""

import pytest

import diffkit
from modalities.text import DEFAULT_CHECKPOINT, TextModality, load_text_model
from modalities.text.data import MRVocabulary

TEMPLATE = "The Eagle is a [MASK] [MASK] in the city centre ."


@pytest.fixture(scope="module")
def model():
    return load_text_model(None, "cpu")


def test_shipped_checkpoint_loads_with_its_record(model):
    ckpt = diffkit.load_checkpoint(DEFAULT_CHECKPOINT, modality="text")
    assert ckpt.optimizer_state is None and ckpt.extra["recipe"].startswith("python recipes/text_train.py")
    # Exported from the finished run: the training time is the run's, not the export command's.
    assert ckpt.extra["seed"] == 0 and ckpt.extra["train_seconds"] > 0 and ckpt.extra["hardware"]
    assert model.net.conditional and model.diffusion.prediction == "x0"
    assert model.default("steps", None) <= 50
    assert model.default("sampler", None) == "ddpm" and 0 < model.default_temperature < 1
    assert model.default("guidance_interval", None) == [1.5, None]  # guided where sigma/alpha >= 1.5
    assert (DEFAULT_CHECKPOINT / "README.md").is_file()


def test_default_generate_writes_restaurant_descriptions(model):
    texts = diffkit.generate(modality=TextModality(), num_samples=8, seed=0, steps=20)
    assert len(texts) == 8 and texts == TextModality().generate(num_samples=8, seed=0, steps=20)
    # E2E words (the shipped model is short-trained: phrases in place, not yet grammar; see its
    # README), never special tokens.
    domain = {"restaurant", "pub", "coffee", "food", "rating", "price", "priced", "family", "friendly", "near",
              "riverside", "centre", "located", "customer", "kids", "children", "area", "serves"}
    assert sum(bool(domain & set(t.lower().split())) for t in texts) >= 6, texts
    assert not any(token in t for t in texts for token in ("[PAD]", "[MASK]", "[UNK]"))
    assert all(1 <= len(t.split()) <= model.max_length for t in texts)


def test_infill_keeps_the_template_words():
    texts = TextModality().generate(num_samples=4, seed=0, steps=20, infill=TEMPLATE)
    for text in texts:
        words = text.split()
        assert len(words) == len(TEMPLATE.split())
        assert words[:4] == "The Eagle is a".split() and words[6:] == "in the city centre .".split()
        assert "[MASK]" not in text


def test_control_makes_the_value_appear_more_often():
    mod = TextModality()
    free = mod.generate(num_samples=16, seed=1, steps=20)
    steered = mod.generate(num_samples=16, seed=1, steps=20, control={"food": "Italian"})
    hits_free = sum("italian" in t.lower() for t in free)
    hits_steered = sum("italian" in t.lower() for t in steered)
    # A short-trained model (see its README): 16 of 16 here, 0 without control.
    assert hits_steered >= 4 and hits_steered > hits_free, steered


def test_repeat_penalty_removes_most_adjacent_repeats():
    repeat_share = _text_benchmark().repeat_share  # the benchmark's own measure
    mod = TextModality()
    plain = mod.generate(num_samples=48, seed=0, steps=20)
    assert plain == mod.generate(num_samples=48, seed=0, steps=20, repeat_penalty=0.0)
    penalised = mod.generate(num_samples=48, seed=0, steps=20, repeat_penalty=10.0)
    assert repeat_share(plain) > 0.25 and repeat_share(penalised) < repeat_share(plain) / 3
    with pytest.raises(ValueError, match="repeat_penalty must be a finite number >= 0"):
        mod.generate(num_samples=1, repeat_penalty=float("inf"))


def test_mr_vocabulary_covers_the_slots(model):
    assert isinstance(model.mr_vocab, MRVocabulary)
    assert "Italian" in model.mr_vocab.to_config()["food"]


def test_shipped_classifier_steers_the_shipped_model():
    from modalities.text.modality import CHECKPOINTS_DIR, load_classifier

    path = CHECKPOINTS_DIR / "e2e-classifier"
    clf = load_classifier(path, load_text_model(None, "cpu"))  # refuses another denoiser's embeddings
    assert clf.mr_vocab.to_config()["eatType"] == ["coffee shop", "pub", "restaurant"]
    texts = TextModality().generate(num_samples=4, seed=0, steps=10, control={"eatType": "pub"}, classifier=path)
    assert len(texts) == 4 and all(isinstance(t, str) and t for t in texts)
    assert (path / "README.md").is_file()


def _text_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "text_quality.py"
    spec = importlib.util.spec_from_file_location("text_quality", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_control_measure_needs_the_values_words_in_order(model):
    bench, tok = _text_benchmark(), model.tokenizer
    text = "The Eagle is a cheap pub near Café Sicilia , less than £20 . It is not family - friendly ."
    assert bench.value_appears(tok, text, "near", "Café Sicilia")
    assert not bench.value_appears(tok, "The Eagle is near Sicilia Café .", "near", "Café Sicilia")
    assert bench.value_appears(tok, text, "priceRange", "less than £20")
    assert not bench.value_appears(tok, "It costs than less £20 .", "priceRange", "less than £20")
    assert bench.value_appears(tok, text, "familyFriendly", "no")
    assert not bench.value_appears(tok, text, "familyFriendly", "yes")
    assert bench.value_appears(tok, "Kids are welcome .", "familyFriendly", "yes")
    rates = bench.control_rates(tok, [text, "The Eagle is a pub ."], [{"near": "Café Sicilia"}, {"near": "Café Sicilia",
                                                                                            "eatType": "pub"}])
    assert rates == {"eatType": 1.0, "near": 0.5, "all": 2 / 3, "all_se": (2 / 3 * 1 / 3 / 3) ** 0.5}
