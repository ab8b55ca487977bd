"""Best-of-K sampling (modalities/text/ranking.py): the two rankings, their wiring into
generate, and bad input. The rankings' value is measured on the shipped model; the mechanics
on a tiny untrained checkpoint made by the recipe."""

import math

import pytest
import torch

from diffkit.cli import main as cli_main
from diffkit.runs import seeded_generator
from modalities.text import EMBEDDING_CHECKPOINT, TextModality, load_text_model
from modalities.text.data import load_corpus
from modalities.text.modality import (
    Continuation,
    RowConditions,
    TextSampling,
    _lengths,
    _sample_group,
    padding_mask,
    sample_best_of,
    sample_ids,
)
from modalities.text.ranking import (
    SCORE_LEVELS,
    CandidateChoice,
    best_in_groups,
    choose_candidates,
    consensus_scores,
    denoising_log_likelihood,
    sentence_bleu,
)

from _toys import tiny_text_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_text_checkpoint(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def shipped():
    return load_text_model(EMBEDDING_CHECKPOINT, "cpu")


def test_sentence_bleu_closed_forms():
    assert sentence_bleu([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    # No shared word: add-one precisions 1/5, 1/4, 1/3, 1/2 of a 4-word hypothesis.
    assert sentence_bleu([1, 2, 3, 4], [5, 6, 7, 8]) == pytest.approx((1 / 120) ** 0.25)
    # Half the words, no longer n-gram: (3/5 * 1/4 * 1/3 * 1/2)^(1/4), and a reference twice as
    # long costs the brevity penalty exp(1 - 8/4).
    assert sentence_bleu([1, 2, 3, 4], [1, 9, 2, 9]) == pytest.approx((3 / 5 / 24) ** 0.25)
    assert sentence_bleu([1, 2, 3, 4], [1, 2, 3, 4] * 2) == pytest.approx(math.exp(1 - 8 / 4))
    assert sentence_bleu([], [1]) == 0.0


def test_consensus_picks_the_candidate_closest_to_the_others_within_its_group():
    rows = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [7, 8, 9, 10, 11],     # group 0: the first two agree
            [5, 5, 5, 5, 5], [1, 2, 3, 4, 5], [1, 2, 3, 9, 5]]       # group 1: a copy of group 0's first is no help
    ids = torch.tensor(rows)
    scores = consensus_scores(ids, torch.ones_like(ids, dtype=torch.bool), group_size=3)
    expected = [sum(sentence_bleu(rows[i], rows[j]) for j in range(g, g + 3) if j != i)
                for g in (0, 3) for i in range(g, g + 3)]
    assert scores.tolist() == pytest.approx(expected)
    assert best_in_groups(scores, 3).tolist() == [0, 4]
    # Padding is not part of a text.
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[2, 1:] = False
    assert consensus_scores(ids, mask, 3)[2] == pytest.approx(sentence_bleu([7], rows[0]) + sentence_bleu([7], rows[1]))


def test_best_in_groups():
    scores = torch.tensor([0.1, 0.5, 0.2, 3.0, 1.0, 3.0])
    assert best_in_groups(scores, 3).tolist() == [1, 3]  # the first of a tie
    assert best_in_groups(scores, 1).tolist() == list(range(6))
    with pytest.raises(ValueError, match="multiple of 4"):
        best_in_groups(scores, 4)


def test_likelihood_prefers_human_word_order_and_the_texts_own_mr(shipped):
    held = load_corpus("e2e", "eval")
    texts, mrs = held.texts[::30][:32], held.mrs[::30][:32]
    enc = shipped.tokenizer.encode(texts, shipped.max_length, warn=False)
    mask = padding_mask(enc.lengths)
    ids = enc.ids[:, : mask.shape[1]]
    shuffled = ids.clone()
    gen = torch.Generator().manual_seed(0)
    for row, n in enumerate(enc.lengths.tolist()):
        shuffled[row, :n] = ids[row, torch.randperm(n, generator=gen)]
    with torch.no_grad():
        human = denoising_log_likelihood(shipped.net, shipped.diffusion, ids, mask, generator=seeded_generator(1))
        mixed = denoising_log_likelihood(shipped.net, shipped.diffusion, shuffled, mask, generator=seeded_generator(1))
        codes = torch.tensor([shipped.mr_vocab.encode(mr) for mr in mrs])
        own = denoising_log_likelihood(shipped.net, shipped.diffusion, ids, mask, generator=seeded_generator(1),
                                       mr=codes)
        other = denoising_log_likelihood(shipped.net, shipped.diffusion, ids, mask, generator=seeded_generator(1),
                                         mr=codes.roll(1, 0))
    assert human.shape == (32,) and bool(torch.isfinite(human).all()) and bool((human <= 0).all())
    assert (human > mixed).float().mean() >= 0.9
    # A text's own MR makes its words likelier than another text's MR does.
    assert (own > other).float().mean() >= 0.8 and own.mean() > human.mean()
    with pytest.raises(ValueError, match="fractions"):
        denoising_log_likelihood(shipped.net, shipped.diffusion, ids, mask, generator=gen, levels=(1.0,))


def test_best_of_by_likelihood_writes_more_of_the_training_texts_bigrams():
    """A measure the ranking does not see: the share of the output's word pairs that occur in
    the training texts. At 10 steps it rose from 0.71 to 0.80 (seed 0) and 0.70 to 0.77 (seed 1)."""
    seen = set()
    for text in load_corpus("e2e", "train").texts:
        words = text.lower().split()
        seen |= set(zip(words, words[1:]))

    def seen_share(texts):
        pairs = [pair for text in texts for pair in zip(text.lower().split(), text.lower().split()[1:])]
        return sum(pair in seen for pair in pairs) / len(pairs)

    mod = TextModality()
    plain = mod.generate(checkpoint=EMBEDDING_CHECKPOINT, num_samples=16, seed=0, steps=10)
    best = mod.generate(checkpoint=EMBEDDING_CHECKPOINT, num_samples=16, seed=0, steps=10, best_of=8)
    assert seen_share(best) >= seen_share(plain) + 0.04


def test_generate_keeps_the_best_finished_candidate_of_each_text(checkpoint):
    """Compared when finished (``select_at=1``, and always by MBR), the kept texts are the
    candidates the ranking prefers: candidates drawn as sample_ids draws them, K consecutive rows
    per text of its length, then scored from the same generator."""
    model = load_text_model(checkpoint, "cpu")
    n, k = 3, 4
    for rank_by, select_at in (("likelihood", 1.0), ("mbr", None)):
        got = TextModality().generate(checkpoint=checkpoint, num_samples=n, seed=5, steps=3, best_of=k,
                                      rank_by=rank_by, select_at=select_at)
        gen = seeded_generator(5)
        lengths = _lengths(model, n, None, gen).repeat_interleave(k)
        ids = sample_ids(model, lengths, TextSampling(model.default("sampler", "ddim"), 3), RowConditions(),
                         generator=gen)
        candidates = [model.tokenizer.decode(row[: int(m)].tolist()) for row, m in zip(ids, lengths)]
        mask = padding_mask(lengths)
        if rank_by == "likelihood":
            with torch.no_grad():
                scores = denoising_log_likelihood(model.net, model.diffusion, ids, mask, generator=gen)
        else:
            scores = consensus_scores(ids, mask, k)
        for text in got:
            assert text in candidates
        assert got == [candidates[g * k + int(group.argmax())] for g, group in enumerate(scores.view(n, k))]
        # Each text's candidates share its length.
        assert [len(t.split()) for t in got] == lengths[::k].tolist()


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory):
    """A tiny checkpoint without self-conditioning: its runs depend on the states alone."""
    return tiny_text_checkpoint(tmp_path_factory.mktemp("plain"), "--no-self-conditioning")


def test_a_resumed_run_is_the_uninterrupted_run(plain_checkpoint, checkpoint):
    """Stopped after 3 of 6 DDIM points and resumed from the state there, a run ends on the same
    words as one run straight through; a self-conditioned network's first resumed call reads
    the estimate it is given."""
    model = load_text_model(plain_checkpoint, "cpu")
    lengths = torch.tensor([5, 5, 7])
    settings = TextSampling("ddim", 6)
    times = model.diffusion.sampling_grid(6, sampler="ddim").times
    whole = _sample_group(model, lengths, settings, RowConditions(), seeded_generator(3), False)
    last = {}

    def keep(info):
        if info["i"] == 2:
            last.update(state=info["x"], estimate=info["denoised"])

    _sample_group(model, lengths, settings, RowConditions(), seeded_generator(3), False, keep, times=times[:3])
    resumed = _sample_group(model, lengths, settings, RowConditions(), seeded_generator(4), False,
                            resume=Continuation(times[2:], last["state"]))
    assert torch.equal(resumed, whole)

    conditioned = load_text_model(checkpoint, "cpu")
    seen = []
    hook = conditioned.net.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("x0_previous")), with_kwargs=True)
    try:
        estimate = torch.randn(3, conditioned.net.embed_dim, 7)
        _sample_group(conditioned, lengths, settings, RowConditions(), seeded_generator(3), False,
                      resume=Continuation(times[2:], torch.randn(3, conditioned.net.embed_dim, 7), estimate))
    finally:
        hook.remove()
    assert torch.equal(seen[0], estimate) and len(seen) == 4


def test_early_choice_finishes_only_the_kept_candidates(checkpoint):
    """With select_at, K candidates run the first share of the steps, and only the kept one the
    rest: the network sees K x head + (steps - head + 1) rows per text, plus the ranking's
    three reads per candidate; the texts keep their lengths, templates and seeds."""
    model = load_text_model(checkpoint, "cpu")
    rows_seen = []
    hook = model.net.register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape[0]))
    n, k, steps = 2, 5, 8
    try:
        lengths = torch.tensor([6, 6])
        settings = TextSampling(model.default("sampler", "ddim"), steps)
        ids = sample_best_of(model, lengths, settings, RowConditions(), CandidateChoice(k, "likelihood", 0.25),
                             generator=seeded_generator(0))
    finally:
        hook.remove()
    head = 2  # a quarter of 8 points; one network call per point, and the kept run repeats the head's last
    assert ids.shape == (n, 6)
    assert sum(rows_seen) == n * k * head + n * (steps - head + 1) + n * k * len(SCORE_LEVELS), rows_seen
    mod = TextModality()
    template = "The Eagle is a [MASK] [MASK] in the city centre ."
    filled = mod.generate(checkpoint=checkpoint, num_samples=3, seed=1, steps=8, infill=template, best_of=4)
    assert filled == mod.generate(checkpoint=checkpoint, num_samples=3, seed=1, steps=8, infill=template, best_of=4)
    for text in filled:
        assert text.split()[:4] == template.split()[:4] and text.split()[6:] == template.split()[6:]
    assert [len(t.split()) for t in mod.generate(checkpoint=checkpoint, num_samples=3, seed=1, steps=8, length=9,
                                                 best_of=3)] == [9, 9, 9]
    with pytest.raises(ValueError, match=r"select_at must be a share of the sampler's steps in \(0, 1\]"):
        mod.generate(checkpoint=checkpoint, num_samples=2, steps=2, best_of=2, select_at=0)
    with pytest.raises(ValueError, match="select_at says how best_of candidates are chosen"):
        mod.generate(checkpoint=checkpoint, num_samples=2, steps=2, select_at=0.5)
    with pytest.raises(ValueError, match="rank_by='mbr' compares finished texts"):
        mod.generate(checkpoint=checkpoint, num_samples=2, steps=2, best_of=2, rank_by="mbr", select_at=0.5)


def test_best_of_with_infill_and_control(checkpoint):
    mod = TextModality()
    template = "The Eagle is a [MASK] [MASK] in the city centre ."
    filled = mod.generate(checkpoint=checkpoint, num_samples=2, seed=0, steps=2, infill=template, best_of=3)
    for text in filled:
        words = text.split()
        assert words[:4] == template.split()[:4] and words[6:] == template.split()[6:]
    model = load_text_model(checkpoint, "cpu")
    gen = seeded_generator(0)
    ids = torch.randint(4, model.tokenizer.vocab_size, (6, 5), generator=gen)
    mask = torch.ones(6, 5, dtype=torch.bool)
    codes = torch.tensor([model.mr_vocab.encode({"food": "Italian"}, partial=True)] * 6)
    with torch.no_grad():
        keep = choose_candidates(model.net, model.diffusion, ids, mask, group_size=3, generator=seeded_generator(0),
                                 mr=codes)
        scores = denoising_log_likelihood(model.net, model.diffusion, ids, mask, generator=seeded_generator(0), mr=codes)
    assert keep.tolist() == best_in_groups(scores, 3).tolist()
    steered = mod.generate(checkpoint=checkpoint, num_samples=2, seed=0, steps=2, control={"food": "Italian"},
                           best_of=2)
    assert len(steered) == 2 and all(isinstance(t, str) and t for t in steered)


def test_best_of_one_is_plain_sampling_and_bad_input(checkpoint):
    mod = TextModality()
    assert mod.generate(checkpoint=checkpoint, num_samples=3, seed=2, steps=2, best_of=1) == \
        mod.generate(checkpoint=checkpoint, num_samples=3, seed=2, steps=2)
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="best_of must be a whole number"):
            mod.generate(checkpoint=checkpoint, num_samples=2, steps=2, best_of=bad)
    with pytest.raises(ValueError, match="unknown rank_by 'bleu'"):
        mod.generate(checkpoint=checkpoint, num_samples=2, steps=2, best_of=2, rank_by="bleu")
    with pytest.raises(ValueError, match="rank_by says how best_of candidates are chosen"):
        mod.generate(checkpoint=checkpoint, num_samples=2, steps=2, rank_by="mbr")


def test_cli_best_of(checkpoint, capsys):
    args = ["generate", "text", "--checkpoint", str(checkpoint), "--num-samples", "2", "--steps", "2", "--seed", "0"]
    assert cli_main([*args, "--best-of", "3", "--rank-by", "mbr"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == TextModality().generate(checkpoint=checkpoint, num_samples=2, steps=2, seed=0, best_of=3,
                                              rank_by="mbr")
    assert cli_main([*args, "--best-of", "0"]) == 1
    assert "best_of must be a whole number" in capsys.readouterr().err
    assert cli_main([*args, "--rank-by", "mbr"]) == 1
    assert "rank_by says how best_of candidates are chosen" in capsys.readouterr().err
