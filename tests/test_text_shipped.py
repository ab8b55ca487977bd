"""The shipped embedding-route checkpoint (modalities/text/checkpoints/e2e): it loads, writes restaurant
descriptions, keeps the words of an infilling template, and follows control. Few samples and
few steps: these check that the shipped model works, benchmarks/text_quality.py measures it."""

from pathlib import Path

import pytest
import torch

import diffkit
from diffkit.checkpoint import read_config
from modalities.text import DEFAULT_CHECKPOINT, EMBEDDING_CHECKPOINT, TextModality, load_text_model
from modalities.text.data import MRVocabulary
from modalities.text.distillation import teacher_trajectories
from modalities.text.modality import CHECKPOINTS_DIR, denoiser_call

TEMPLATE = "The Eagle is a [MASK] [MASK] in the city centre ."


@pytest.fixture(scope="module")
def model():
    return load_text_model(EMBEDDING_CHECKPOINT, "cpu")


def test_shipped_checkpoint_loads_with_its_record(model):
    ckpt = diffkit.load_checkpoint(EMBEDDING_CHECKPOINT, modality="text")
    assert ckpt.optimizer_state is None and ckpt.extra["recipe"].startswith("python recipes/text_train.py")
    # Exported from the finished run: the training time is the run's, not the export command's.
    assert ckpt.extra["seed"] == 0 and ckpt.extra["train_seconds"] > 0 and ckpt.extra["hardware"]
    assert model.net.conditional and model.diffusion.prediction == "x0"
    assert model.default("steps", None) <= 50
    assert model.default("sampler", None) == "ddpm" and 0 < model.default_temperature < 1
    assert model.default("guidance_interval", None) == [1.5, None]  # guided where sigma/alpha >= 1.5
    assert (EMBEDDING_CHECKPOINT / "README.md").is_file()


def test_shipped_student_and_classifier_name_their_denoiser_portably():
    # A path of the machine that trained them would point nowhere on a user's machine.
    root = CHECKPOINTS_DIR.parents[2]
    for name in ("e2e-5step", "e2e-classifier"):
        recorded = read_config(CHECKPOINTS_DIR / name, modality="text")["modality_config"]["denoiser"]
        assert not Path(recorded).is_absolute() and (root / recorded).resolve() == EMBEDDING_CHECKPOINT.resolve()


def test_default_generate_writes_restaurant_descriptions(model):
    texts = diffkit.generate(modality=TextModality(), checkpoint=EMBEDDING_CHECKPOINT, num_samples=8, seed=0, steps=20)
    assert len(texts) == 8
    assert texts == TextModality().generate(checkpoint=EMBEDDING_CHECKPOINT, num_samples=8, seed=0, steps=20)
    # E2E words (the shipped model is short-trained: phrases in place, not yet grammar; see its
    # README), never special tokens.
    domain = {"restaurant", "pub", "coffee", "food", "rating", "price", "priced", "family", "friendly", "near",
              "riverside", "centre", "located", "customer", "kids", "children", "area", "serves"}
    assert sum(bool(domain & set(t.lower().split())) for t in texts) >= 6, texts
    assert not any(token in t for t in texts for token in ("[PAD]", "[MASK]", "[UNK]"))
    assert all(1 <= len(t.split()) <= model.max_length for t in texts)


def test_infill_keeps_the_template_words():
    texts = TextModality().generate(checkpoint=EMBEDDING_CHECKPOINT, num_samples=4, seed=0, steps=20, infill=TEMPLATE)
    for text in texts:
        words = text.split()
        assert len(words) == len(TEMPLATE.split())
        assert words[:4] == "The Eagle is a".split() and words[6:] == "in the city centre .".split()
        assert "[MASK]" not in text


def test_control_makes_the_value_appear_more_often():
    mod = TextModality()
    free = mod.generate(checkpoint=EMBEDDING_CHECKPOINT, num_samples=16, seed=1, steps=20)
    steered = mod.generate(checkpoint=EMBEDDING_CHECKPOINT, num_samples=16, seed=1, steps=20,
                           control={"food": "Italian"})
    hits_free = sum("italian" in t.lower() for t in free)
    hits_steered = sum("italian" in t.lower() for t in steered)
    # Measured: 16 of 16 here, 0 of 16 without control.
    assert hits_steered >= 13 and hits_free <= 3, (free, steered)


def test_repeat_penalty_removes_most_adjacent_repeats():
    repeat_share = _text_benchmark().repeat_share  # the benchmark's own measure
    mod = TextModality()
    plain = mod.generate(checkpoint=EMBEDDING_CHECKPOINT, num_samples=48, seed=0, steps=20)
    assert plain == mod.generate(checkpoint=EMBEDDING_CHECKPOINT, num_samples=48, seed=0, steps=20, repeat_penalty=0.0)
    penalised = mod.generate(checkpoint=EMBEDDING_CHECKPOINT, num_samples=48, seed=0, steps=20, repeat_penalty=10.0)
    assert repeat_share(plain) > 0.25 and repeat_share(penalised) < repeat_share(plain) / 3
    with pytest.raises(ValueError, match="repeat_penalty must be a finite number >= 0"):
        mod.generate(checkpoint=EMBEDDING_CHECKPOINT, num_samples=1, repeat_penalty=float("inf"))


def test_mr_vocabulary_covers_the_slots(model):
    assert isinstance(model.mr_vocab, MRVocabulary)
    assert "Italian" in model.mr_vocab.to_config()["food"]


def test_shipped_classifier_steers_the_shipped_model():
    from modalities.text.modality import CHECKPOINTS_DIR, load_classifier

    path = CHECKPOINTS_DIR / "e2e-classifier"
    clf = load_classifier(path, load_text_model(EMBEDDING_CHECKPOINT, "cpu"))  # refuses another denoiser's embeddings
    assert clf.mr_vocab.to_config()["eatType"] == ["coffee shop", "pub", "restaurant"]
    appears = _text_benchmark().value_appears  # the benchmark's own measure of control
    tokenizer = load_text_model(EMBEDDING_CHECKPOINT, "cpu").tokenizer
    hits = {}
    # The default scale (1) with each method, and the classifier switched off (scale 0).
    for method, scale in (("gradient", None), ("adagrad", None), ("gradient", 0.0)):
        texts = TextModality().generate(checkpoint=EMBEDDING_CHECKPOINT, num_samples=16, seed=0, steps=10,
                                        control={"eatType": "pub"}, classifier=path,
                                        classifier_scale=scale, control_method=method)
        assert len(texts) == 16 and all(isinstance(t, str) and t for t in texts)
        hits[method, scale] = sum(appears(tokenizer, t, "eatType", "pub") for t in texts)
    # Measured: "pub" in 16 of 16 with gradient guidance, 11 of 16 with Adagrad steps, 3 of 16 at
    # scale 0 (the denoiser is not told the MR then).
    assert hits["gradient", None] >= 13 and hits["adagrad", None] >= 8 and hits["gradient", 0.0] <= 5, hits
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


STUDENT = CHECKPOINTS_DIR / "e2e-5step"


def _words_in_5_steps(model, data):
    """Each model's words in 5 DDIM steps from the trajectories' starting noise."""
    length = int(data.mask.sum(1).max())
    mask = data.mask[:, :length]
    with torch.no_grad():
        x = model.diffusion.sample(denoiser_call(model.net, temperature=model.default_temperature),
                                   (len(data), model.net.embed_dim, length), sampler="ddim", steps=5,
                                   noise=data.states[:, 0, :, :length], attention_mask=mask, mr=data.mr)
    return model.net.nearest(x, model.allowed)[mask], data.ids[:, :length][mask]


def test_the_5_step_student_writes_what_its_teacher_writes_in_50(model):
    """The student's whole purpose: from the same noise, 5 of its steps land on the words of the
    teacher's 50-step DDIM path more often than 5 of the teacher's own."""
    student = load_text_model(STUDENT, "cpu")
    assert student.default("sampler", None) == "ddim" and student.default("steps", None) == 5
    assert student.default("guidance_scale", None) == 1.0  # it learnt the guided paths: one call a step
    assert student.diffusion.sampling_grid(5, sampler="ddim").times.tolist() == [1999, 1599, 1199, 799, 399]
    assert student.info["denoiser"].endswith("checkpoints/e2e") and (STUDENT / "README.md").is_file()
    data = teacher_trajectories(model, steps=5, teacher_steps=50, count=48, seed=7)
    own, target = _words_in_5_steps(model, data)
    taught, _ = _words_in_5_steps(student, data)
    teacher_rate, student_rate = (own == target).float().mean().item(), (taught == target).float().mean().item()
    assert student_rate > teacher_rate + 0.05, (teacher_rate, student_rate)  # measured: 0.72 against 0.63
    texts = diffkit.generate(modality="text", checkpoint=STUDENT, num_samples=4, seed=0, control={"food": "Italian"})
    assert len(texts) == 4 and all(texts)


# ------------------------------------------------------------------ the default: the masked model
DOMAIN = {"restaurant", "pub", "coffee", "food", "rating", "price", "priced", "family", "friendly", "near",
          "riverside", "centre", "located", "customer", "kids", "children", "area", "serves"}


def test_the_default_text_model_is_the_masked_one():
    model = load_text_model(None, "cpu")
    assert model.path == DEFAULT_CHECKPOINT.resolve() and model.route == "masked"
    assert model.diffusion.block_size == 4 and model.default("sampler") == "confidence"
    ckpt = diffkit.load_checkpoint(DEFAULT_CHECKPOINT, modality="text")
    assert ckpt.extra["recipe"].startswith("python recipes/text_train.py --route masked") and ckpt.extra["seed"] == 0
    assert (DEFAULT_CHECKPOINT / "README.md").is_file()


def test_default_generate_writes_ended_restaurant_descriptions():
    texts = diffkit.generate(modality="text", num_samples=16, seed=0)
    assert texts == diffkit.generate(modality="text", num_samples=16, seed=0)
    assert sum(bool(DOMAIN & set(t.lower().split())) for t in texts) >= 14, texts
    assert not any(token in t for t in texts for token in ("[PAD]", "[MASK]", "[UNK]"))
    # The model ends its texts: lengths vary and stay in the data's range.
    lengths = [len(t.split()) for t in texts]
    assert len(set(lengths)) > 4 and all(3 <= n <= 48 for n in lengths), texts


def test_default_control_infill_and_length():
    free = diffkit.generate(modality="text", num_samples=16, seed=1)
    steered = diffkit.generate(modality="text", num_samples=16, seed=1, control={"food": "Italian"})
    assert sum("Italian" in t for t in steered) >= 12 > sum("Italian" in t for t in free), steered
    filled = diffkit.generate(modality="text", num_samples=4, seed=0, infill=TEMPLATE)
    assert all(t.startswith("The Eagle is a ") and t.endswith(" in the city centre .") and "[MASK]" not in t
               for t in filled)
    assert all(len(t.split()) == 7 for t in diffkit.generate(modality="text", num_samples=4, seed=0, length=7))
