"""The text modality's generate: lengths, infilling, control, saving, the CLI, the likelihood
and bad input, on a tiny checkpoint made by the recipe (untrained: these are mechanics)."""

import sys
import warnings
from pathlib import Path

import pytest
import torch

import diffkit
from diffkit.cli import main as cli_main
from diffkit.registry import available_modalities, register_modality, unregister_modality
from modalities.text import DEFAULT_CHECKPOINT, SLOTS, TextModality, load_text_model, nll_per_token, parse_control
from modalities.text.modality import RowConditions, TextModel, TextSampling, parse_infill, sample_ids

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import text_train  # noqa: E402
from _toys import tiny_text_checkpoint  # noqa: E402

TEMPLATE = "The Eagle is a [MASK] [MASK] in the city centre ."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_text_checkpoint(tmp_path_factory.mktemp("text"))


@pytest.fixture
def text_registered():
    # Until pyproject declares the entry point, register the modality for the CLI tests.
    installed = "text" in available_modalities()
    if not installed:
        register_modality("text", "modalities.text:TextModality")
    yield
    if not installed:
        unregister_modality("text")


def test_generate_gives_strings_deterministically(checkpoint):
    mod = TextModality()
    texts = mod.generate(checkpoint=checkpoint, num_samples=4, seed=0, steps=3)
    assert isinstance(texts, list) and len(texts) == 4 and all(isinstance(t, str) and t for t in texts)
    assert mod.generate(checkpoint=checkpoint, num_samples=4, seed=0, steps=3) == texts
    # The length is the modality's business: drawn from the data, or as asked. Padding and
    # other special tokens are never generated.
    fixed = mod.generate(checkpoint=checkpoint, num_samples=3, seed=1, steps=2, length=7)
    assert all(len(t.split()) == 7 for t in fixed)
    assert not any("[PAD]" in t or "[MASK]" in t for t in texts + fixed)


def test_clamping_default_follows_the_head(checkpoint):
    """The recipe's softmax head samples without the clamping trick unless asked; a regression
    head (or a checkpoint that records its choice) gets it by default."""
    model = load_text_model(checkpoint, "cpu")
    assert model.net.head == "softmax" and model.default_clamp is False
    mod = TextModality()
    plain = mod.generate(checkpoint=checkpoint, num_samples=6, seed=0, steps=3)
    assert plain == mod.generate(checkpoint=checkpoint, num_samples=6, seed=0, steps=3, clamp=False)
    assert plain != mod.generate(checkpoint=checkpoint, num_samples=6, seed=0, steps=3, clamp=True)
    recorded = TextModel(model.path, model.net, model.diffusion, {"defaults": {"clamp": True}}, tokenizer=model.tokenizer)
    assert recorded.default_clamp is True


def test_word_temperature_default_and_override(checkpoint):
    """The cpu preset records temperature 0.5; generate's temperature changes the draws of the
    same seed, a checkpoint that records one uses it, and one that records none uses 1."""
    model = load_text_model(checkpoint, "cpu")
    assert model.default_temperature == 0.5
    mod = TextModality()
    plain = mod.generate(checkpoint=checkpoint, num_samples=6, seed=0, steps=3)
    assert plain == mod.generate(checkpoint=checkpoint, num_samples=6, seed=0, steps=3, temperature=0.5)
    sharp = mod.generate(checkpoint=checkpoint, num_samples=6, seed=0, steps=3, temperature=0.05)
    assert sharp != plain
    assert TextModel(model.path, model.net, model.diffusion, {}, tokenizer=model.tokenizer).default_temperature == 1.0
    recorded = TextModel(model.path, model.net, model.diffusion, {"defaults": {"temperature": 0.05}},
                         tokenizer=model.tokenizer)
    lengths = torch.tensor([5, 3])
    ids = sample_ids(recorded, lengths, TextSampling("ddim", 3), generator=torch.Generator().manual_seed(0))
    explicit = sample_ids(model, lengths, TextSampling("ddim", 3, temperature=0.05),
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, explicit)
    for bad in (0, -1.0, "hot"):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            mod.generate(checkpoint=checkpoint, num_samples=1, temperature=bad)


def test_guidance_interval_default_and_override(checkpoint):
    """The cpu preset records guidance only where sigma/alpha >= 1.5; outside it one plain
    conditional call replaces the doubled batch, and generate can widen or move it."""
    model = load_text_model(checkpoint, "cpu")
    assert model.default("guidance_interval", None) == [1.5, None]
    batches = []
    hook = model.net.register_forward_pre_hook(lambda net, args: batches.append(args[0].shape[0]))
    lengths = torch.tensor([5, 5, 5])
    mr = torch.tensor([model.mr_vocab.encode({"food": "Italian"}, partial=True)] * 3)
    grid = model.diffusion.sampling_grid(10, sampler="ddim")
    noisy = int(((grid.sigmas / grid.alphas)[:-1] >= 1.5).sum())
    assert 0 < noisy < 10

    def draw(interval):
        batches.clear()
        return sample_ids(model, lengths, TextSampling("ddim", 10, 3.0, interval), RowConditions(mr=mr),
                          generator=torch.Generator().manual_seed(0))

    try:
        default = draw(None)
        assert batches.count(6) == noisy and batches.count(3) == 10 - noisy
        assert torch.equal(draw((1.5, None)), default)
        draw((0, None))
        assert batches == [6] * 10
        draw((1e9, None))
        assert batches == [3] * 10
    finally:
        hook.remove()
    mod = TextModality()
    with pytest.raises(ValueError, match="guidance_interval needs 0 <= low < high"):
        mod.generate(checkpoint=checkpoint, num_samples=1, control={"food": "Italian"}, guidance_interval=(2, 1))
    with pytest.raises(ValueError, match="pass control="):
        mod.generate(checkpoint=checkpoint, num_samples=1, guidance_interval=(0, None))
    texts = mod.generate(checkpoint=checkpoint, num_samples=2, seed=0, steps=3, control={"food": "Italian"},
                         guidance_interval=(0.5, 10))
    assert len(texts) == 2


def test_guidance_mix_default_and_override(checkpoint, monkeypatch):
    """The cpu preset records guidance mixed on the word logits; generate follows it, and
    guidance_mix="x0" hands the mix back to the core (no guided() call, other texts)."""
    model = load_text_model(checkpoint, "cpu")
    assert model.default("guidance_mix", None) == "logits" and model.default("guidance_scale", None) == 2.5
    from modalities.text.model import TextDenoiser

    mixed = []
    original = TextDenoiser.guided
    monkeypatch.setattr(TextDenoiser, "guided", lambda self, *a, **k: mixed.append(a[2]) or original(self, *a, **k))
    mod = TextModality()

    def draw(**kwargs):
        mixed.clear()
        return mod.generate(checkpoint=checkpoint, num_samples=3, seed=0, steps=4, control={"food": "Italian"},
                            guidance_scale=40.0, guidance_interval=(0, None), **kwargs)

    default = draw()
    assert mixed == [40.0] * 4
    assert draw(guidance_mix="logits") == default
    on_x0 = draw(guidance_mix="x0")
    assert mixed == [] and on_x0 != default
    with pytest.raises(ValueError, match="guidance_mix must be one of 'logits', 'x0'"):
        mod.generate(checkpoint=checkpoint, num_samples=1, control={"food": "Italian"}, guidance_mix="eps")
    with pytest.raises(ValueError, match="guidance_mix says how classifier-free guidance mixes: pass control="):
        mod.generate(checkpoint=checkpoint, num_samples=1, guidance_mix="x0")


def test_infill_keeps_known_words_exactly_and_sets_the_length(checkpoint):
    model = load_text_model(checkpoint, "cpu")
    template = parse_infill(TEMPLATE, model)
    words = TEMPLATE.split()
    assert template.ids.numel() == len(words) and template.known.tolist() == [w != "[MASK]" for w in words]
    n = 3
    lengths = torch.full((n,), len(words))
    ids = sample_ids(model, lengths, TextSampling("ddim", 3),
                     RowConditions(known_ids=template.ids.expand(n, -1), known_mask=template.known.expand(n, -1)),
                     generator=torch.Generator().manual_seed(0))
    assert ids.shape == (n, len(words))
    assert torch.equal(ids[:, template.known], template.ids[template.known].expand(n, -1))
    assert (ids[:, ~template.known] != model.tokenizer.pad_id).all()
    # Through the public API: the template's words stay, one word per [MASK].
    for text in TextModality().generate(checkpoint=checkpoint, num_samples=2, seed=0, steps=3, infill=TEMPLATE):
        out = text.split()
        assert len(out) == len(words)
        assert all(o == w for o, w in zip(out, words) if w != "[MASK]")
    # Several stochastic samplers and the clamping switched off keep them too.
    for sampler in ("ddpm", "dpm++2m"):
        text = TextModality().generate(checkpoint=checkpoint, num_samples=1, seed=0, steps=3, infill=TEMPLATE,
                                       sampler=sampler, clamp=False)[0]
        assert all(o == w for o, w in zip(text.split(), words) if w != "[MASK]")


def test_length_groups_is_the_cheapest_split_by_brute_force():
    import itertools

    from modalities.text.modality import length_groups

    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        # At most 9 distinct lengths: 256 ways to split them, all tried below.
        lengths = torch.randint(1, 10, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g) * 4
        extra, overhead = trial % 9, [0, 16, 64, 1000][trial % 4]
        groups = length_groups(lengths, extra_tokens=extra, overhead=overhead)
        # A partition of the rows into groups of consecutive lengths, shortest first.
        assert sorted(torch.cat(groups).tolist()) == list(range(len(lengths)))
        spans = [(int(lengths[r].min()), int(lengths[r].max())) for r in groups]
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))

        def cost(parts, overhead=overhead, lengths=lengths, extra=extra):
            return sum(overhead + len(r) * (int(lengths[r].max()) + extra) for r in parts)

        values = sorted(set(lengths.tolist()))
        best = min(cost([torch.nonzero((lengths >= values[a]) & (lengths <= values[b - 1])).flatten()
                         for a, b in zip((0, *cuts), (*cuts, len(values)))])
                   for k in range(len(values)) for cuts in itertools.combinations(range(1, len(values)), k))
        assert cost(groups) == best
    assert len(length_groups(torch.full((9,), 7))) == 1
    assert len(length_groups(torch.tensor([3, 5, 3, 9]), overhead=0)) == 3
    with pytest.raises(ValueError, match="non-empty"):
        length_groups(torch.zeros(0, dtype=torch.long))


def test_grouped_sampling_keeps_every_row_in_place(checkpoint):
    """Rows of very different lengths are sampled in separate groups; each row keeps its own
    MR, known words, wrappers and padding."""
    model = load_text_model(checkpoint, "cpu")
    lengths = torch.tensor([2] * 12 + [30] * 3 + [2] * 8)
    n = len(lengths)
    known_ids = torch.full((n, 30), model.tokenizer.pad_id)
    known_mask = torch.zeros(n, 30, dtype=torch.bool)
    for row in range(n):  # each row's first word is its own, to see that rows stay in place
        known_ids[row, 0] = 5 + row
        known_mask[row, 0] = True
    mr = torch.tensor([model.mr_vocab.encode({"food": "Italian"}, partial=True)] * n)
    seen = []

    def extra(rows, mask):
        seen.append((rows.tolist(), tuple(mask.shape)))
        return []

    ids = sample_ids(model, lengths, TextSampling("ddim", 2, 2.0), RowConditions(mr, known_ids, known_mask, extra),
                     generator=torch.Generator().manual_seed(0))
    assert ids.shape == (n, 30)
    assert torch.equal(ids[:, 0], known_ids[:, 0])
    real = torch.arange(30)[None] < lengths[:, None]
    assert (ids[~real] == model.tokenizer.pad_id).all() and (ids[real] != model.tokenizer.pad_id).all()
    short = [r for r in range(n) if lengths[r] == 2]
    assert sorted(seen) == sorted([(short, (len(short), 2)), ([12, 13, 14], (3, 30))])
    # One group reproduces the plain padded batch.
    same = torch.full((4,), 6)
    args = (TextSampling("ddim", 2), RowConditions(known_ids=known_ids[:4, :6], known_mask=known_mask[:4, :6]))
    assert torch.equal(sample_ids(model, same, *args, generator=torch.Generator().manual_seed(1)),
                       sample_ids(model, same, *args, generator=torch.Generator().manual_seed(1), group_by_length=False))


def test_infill_one_template_per_sample_of_different_lengths(checkpoint):
    templates = ["[MASK] is a pub .", TEMPLATE, "The Eagle [MASK] [MASK] [MASK] [MASK] [MASK] ."]
    texts = TextModality().generate(checkpoint=checkpoint, num_samples=3, seed=0, steps=2, infill=templates)
    for text, template in zip(texts, templates):
        words = template.split()
        assert len(text.split()) == len(words)
        assert all(o == w for o, w in zip(text.split(), words) if w != "[MASK]")
    with pytest.raises(ValueError, match=r"one template or one per sample \(3\), got 2"):
        TextModality().generate(checkpoint=checkpoint, num_samples=3, infill=templates[:2])


def test_infill_errors_and_unknown_words(checkpoint):
    mod = TextModality()
    with pytest.raises(ValueError, match=r"no \[MASK\]"):
        mod.generate(checkpoint=checkpoint, num_samples=1, infill="The Eagle is a pub .")
    with pytest.raises(ValueError, match="at most 48"):
        mod.generate(checkpoint=checkpoint, num_samples=1, infill="word " * 70 + "[MASK]")
    with pytest.raises(ValueError, match="fixes the length"):
        mod.generate(checkpoint=checkpoint, num_samples=1, infill=TEMPLATE, length=5)
    with pytest.warns(UserWarning, match=r"map to \[UNK\]: Zyxwvut \(the model reads them as \[UNK\]; the output keeps"):
        text = mod.generate(checkpoint=checkpoint, num_samples=1, steps=2, infill="Zyxwvut  is a [MASK] .")[0]
    # The template comes back as written (unknown word, double space), its [MASK] filled with one word.
    assert text.startswith("Zyxwvut  is a ") and text.endswith(" .") and len(text.split()) == 5
    # Sampling never writes an [UNK] of its own.
    model = load_text_model(checkpoint, "cpu")
    assert not model.allowed[model.tokenizer.unk_id] and not model.allowed[model.tokenizer.pad_id]
    assert int(model.allowed.sum()) == model.net.vocab_size - 3  # [PAD], [MASK], [UNK]


def test_control_follows_the_mr_vocabulary(checkpoint):
    mod = TextModality()
    texts = mod.generate(checkpoint=checkpoint, num_samples=2, seed=0, steps=2,
                         control={"food": "Italian", "area": "riverside"}, guidance_scale=3.0)
    assert len(texts) == 2
    assert mod.generate(checkpoint=checkpoint, num_samples=2, seed=0, steps=2,
                        control=["food=Italian", "area=riverside"], guidance_scale=3.0) == texts
    with pytest.raises(ValueError, match="unknown value 'Thai' for slot 'food'; known values: .*Italian"):
        mod.generate(checkpoint=checkpoint, num_samples=1, control={"food": "Thai"})
    with pytest.raises(ValueError, match=f"unknown control slot 'cuisine'; the slots are {', '.join(SLOTS)}"):
        mod.generate(checkpoint=checkpoint, num_samples=1, control={"cuisine": "Thai"})
    with pytest.raises(ValueError, match="slot=value"):
        parse_control(["food:Italian"])
    with pytest.raises(ValueError, match="needs a condition"):
        mod.generate(checkpoint=checkpoint, num_samples=1, guidance_scale=2.0)


def test_generate_bad_input(checkpoint, tmp_path):
    mod = TextModality()
    with pytest.raises(ValueError, match="num_samples"):
        mod.generate(checkpoint=checkpoint, num_samples=0)
    with pytest.raises(ValueError, match="steps"):
        mod.generate(checkpoint=checkpoint, num_samples=1, steps=0)
    for scale in (True, float("nan"), "2"):  # the core's check, as for images and audio: a bool is no weight
        with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
            mod.generate(checkpoint=checkpoint, num_samples=1, guidance_scale=scale)
    with pytest.raises(ValueError, match="classifier_scale must be a finite number"):
        mod.generate(checkpoint=checkpoint, num_samples=1, classifier_scale=False)
    with pytest.raises(ValueError, match=r"length must be a whole number in \[1, 48\]"):
        mod.generate(checkpoint=checkpoint, num_samples=1, length=49)
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        mod.generate(checkpoint=tmp_path, num_samples=1)
    image_checkpoint = Path(__file__).resolve().parents[1] / "modalities" / "image" / "checkpoints" / "digits"
    with pytest.raises(diffkit.CheckpointError, match="image"):
        load_text_model(image_checkpoint, "cpu")


def test_missing_shipped_checkpoint_says_how_to_train_one(tmp_path, monkeypatch):
    monkeypatch.setattr("modalities.text.modality.DEFAULT_CHECKPOINT", tmp_path / "e2e")
    with pytest.raises(ValueError, match="recipes/text_train.py"):
        TextModality().generate(num_samples=1)
    assert DEFAULT_CHECKPOINT.name == "e2e-masked"


def test_save_writes_one_utf8_line_per_sample(tmp_path):
    paths = TextModality().save(["Café Rouge is a pub .", "two\nlines"], tmp_path / "out" / "s.txt")
    assert paths == [tmp_path / "out" / "s.txt"]
    assert paths[0].read_text(encoding="utf-8") == "Café Rouge is a pub .\ntwo lines\n"
    with pytest.raises(ValueError, match="list of strings"):
        TextModality().save("not a list", tmp_path / "x.txt")
    with pytest.raises(ValueError, match="is a directory"):
        TextModality().save(["a"], tmp_path)


def test_cli_generate_infill_and_control(checkpoint, tmp_path, capsys, text_registered):
    out = tmp_path / "samples.txt"
    assert cli_main(["generate", "text", "--checkpoint", str(checkpoint), "--num-samples", "2", "--steps", "2",
                     "--seed", "0", "--infill", TEMPLATE, "--out", str(out), "--no-progress"]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and all(line.startswith("The Eagle is a ") for line in lines)
    assert cli_main(["generate", "text", "--checkpoint", str(checkpoint), "--num-samples", "1", "--steps", "2",
                     "--control", "food=Italian", "--control", "customer rating=high", "--guidance-scale", "2",
                     "--guidance-interval", "0.5", "inf", "--guidance-mix", "x0", "--out", str(out),
                     "--no-progress"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_main(["generate", "text", "--checkpoint", str(checkpoint), "--control", "food=Italian",
                  "--guidance-mix", "eps"])
    assert "invalid choice: 'eps'" in capsys.readouterr().err
    assert cli_main(["generate", "text", "--checkpoint", str(checkpoint), "--control", "food=Thai",
                     "--out", str(out)]) == 1
    assert "diffkit: error: unknown value 'Thai' for slot 'food'" in capsys.readouterr().err
    cli_main(["generate", "text", "-h"])
    assert "--infill" in capsys.readouterr().out


def test_cli_prints_samples_without_out(checkpoint, capsys, text_registered):
    assert cli_main(["generate", "text", "--checkpoint", str(checkpoint), "--num-samples", "3", "--steps", "2",
                     "--seed", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out.splitlines()
    expected = TextModality().generate(checkpoint=checkpoint, num_samples=3, steps=2, seed=0)
    assert printed == [" ".join(t.split()) for t in expected]
    assert TextModality().format_samples(["a  b", "two\nlines"]) == "a b\ntwo lines"
    with pytest.raises(ValueError, match="list of strings"):
        TextModality().format_samples("one string")


def test_nll_per_token(checkpoint):
    texts = ["The Eagle is a coffee shop .", "Zizzi is a pub in the riverside area near The Sorrento ."]
    bits = nll_per_token(texts, checkpoint=checkpoint, steps=4)
    assert bits.shape == (2,) and torch.isfinite(bits).all() and (bits > 0).all()
    assert torch.equal(nll_per_token(texts, checkpoint=checkpoint, steps=4), bits)  # seeded
    # An MR-conditioned model can be scored with each text's MR.
    conditioned = nll_per_token(texts[:1], checkpoint=checkpoint, steps=4,
                                mrs=[{"name": "The Eagle", "eatType": "coffee shop"}])
    assert torch.isfinite(conditioned).all()
    with pytest.raises(ValueError, match="non-empty list"):
        nll_per_token("one string", checkpoint=checkpoint)
    with pytest.raises(ValueError, match="steps must be a whole number >= 1"):
        nll_per_token(texts, checkpoint=checkpoint, steps=0)
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1, got 0"):
        nll_per_token(texts, checkpoint=checkpoint, batch_size=0)
    # Diffusion-LM's embedding-space quantity swaps the rounding decoder for the Gaussian one.
    embedding = nll_per_token(texts, checkpoint=checkpoint, steps=4, bound="embedding")
    assert torch.isfinite(embedding).all() and not torch.equal(embedding, bits)
    with pytest.raises(ValueError, match="bound must be"):
        nll_per_token(texts, checkpoint=checkpoint, bound="bits")


# ---------------------------------------------------------------------------------- classifier control
@pytest.fixture(scope="module")
def classifier(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("text-classifier")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert text_train.main(["--task", "classifier", "--denoiser", str(checkpoint), "--max-steps", "2",
                                "--hidden", "16", "--depth", "1", "--heads", "2", "--batch-size", "8",
                                "--no-progress", "--output-dir", str(out / "run"),
                                "--export", str(out / "export")]) == 0
    return out / "export"


def test_classifier_control_with_both_methods(checkpoint, classifier):
    mod = TextModality()
    words = TEMPLATE.split()
    for method in ("gradient", "adagrad"):
        texts = mod.generate(checkpoint=checkpoint, num_samples=2, seed=0, steps=3, classifier=classifier,
                             control={"food": "Italian"}, classifier_scale=2.0, control_method=method,
                             infill=TEMPLATE)
        # Control and infilling together: the template's words still stay.
        assert all(o == w for t in texts for o, w in zip(t.split(), words) if w != "[MASK]")
        # The classifier's scale reaches the sampler: switched off (0) it writes other words.
        # (Untrained models: test_text_shipped measures the steering with the shipped ones.)
        free, steered = (mod.generate(checkpoint=checkpoint, num_samples=8, seed=0, steps=3, length=8,
                                      classifier=classifier, control={"food": "Italian"}, classifier_scale=scale,
                                      control_method=method) for scale in (0.0, 2.0))
        assert free != steered, method
    with pytest.raises(ValueError, match="pass control="):
        mod.generate(checkpoint=checkpoint, num_samples=1, classifier=classifier)
    with pytest.raises(ValueError, match="classifier_scale needs classifier="):
        mod.generate(checkpoint=checkpoint, num_samples=1, control={"food": "Italian"}, classifier_scale=2.0)
    with pytest.raises(ValueError, match="control_method chooses how a classifier steers: pass classifier="):
        mod.generate(checkpoint=checkpoint, num_samples=1, control={"food": "Italian"}, control_method="adagrad")
    for name, value in (("guidance_scale", float("nan")), ("classifier_scale", float("inf"))):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            mod.generate(checkpoint=checkpoint, num_samples=1, control={"food": "Italian"}, **{name: value})
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got inf"):
        mod.generate(checkpoint=checkpoint, num_samples=1, temperature=float("inf"))
    with pytest.raises(ValueError, match="unknown control_method 'sgd'"):
        mod.generate(checkpoint=checkpoint, num_samples=1, classifier=classifier, control={"food": "Italian"},
                     control_method="sgd")
    with pytest.raises(ValueError, match="unknown value 'Thai'"):
        mod.generate(checkpoint=checkpoint, num_samples=1, classifier=classifier, control={"food": "Thai"})


def test_adagrad_control_raises_the_classifier_probability(checkpoint, classifier):
    from modalities.text.modality import classifier_control, load_classifier

    model = load_text_model(checkpoint, "cpu")
    clf = load_classifier(classifier, model)
    codes = torch.tensor([clf.mr_vocab.encode({"food": "Italian"}, partial=True)] * 3)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[2, 6:] = False
    hook = classifier_control(clf, codes, mask, "adagrad", scale=1.0, proximity=0.0)
    x = torch.randn(3, model.net.embed_dim, 10, generator=torch.Generator().manual_seed(0))
    t = torch.full((3,), 20.0)
    moved = hook.fn(x, t, 1)
    assert (clf.net.log_prob(moved, t, codes, mask) > clf.net.log_prob(x, t, codes, mask)).all()
    assert torch.equal(moved[2, :, 6:], x[2, :, 6:])  # padding is not touched


def test_classifier_of_another_denoiser_is_refused(checkpoint, classifier, tmp_path):
    other = tmp_path / "other"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text_train.main(["--max-steps", "1", "--hidden", "16", "--depth", "1", "--heads", "2", "--batch-size", "8",
                         "--sample-every", "0", "--num-timesteps", "100", "--no-progress", "--seed", "5",
                         "--output-dir", str(other)])
    with pytest.raises(ValueError, match="another denoiser"):
        TextModality().generate(checkpoint=other / "checkpoint", num_samples=1, classifier=classifier,
                                control={"food": "Italian"})


def test_infill_joins_a_continuation_piece_to_the_word_before_it():
    """With a subword tokenizer a hole may be filled by "##ping": it joins "shop" as the decoder
    joins it ("shopping"), instead of standing alone as "##ping"; whole words keep the template's
    spacing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from modalities.text.modality import InfillTemplate, fill_template
    from modalities.text.tokenizer import TextTokenizer

    vocab = {"[PAD]": 0, "[UNK]": 1, "a": 2, "shop": 3, "##ping": 4, "coffee": 5, "near": 6}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.pre_tokenizer, wordpiece.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    tok = TextTokenizer(wordpiece)
    text = "a  [MASK] [MASK] near"
    template = InfillTemplate(torch.tensor([2, 0, 0, 6]), torch.tensor([True, False, False, True]), [])
    assert fill_template(text, template, torch.tensor([2, 3, 4, 6]), tok) == "a  shopping near"
    assert fill_template(text, template, torch.tensor([2, 5, 3, 6]), tok) == "a  coffee shop near"
    starts = InfillTemplate(torch.tensor([0, 6]), torch.tensor([False, True]), [])
    assert fill_template("[MASK] near", starts, torch.tensor([4, 6]), tok) == "##ping near"  # nothing to join
