"""Text modality data: E2E meaning representations, the fixed held-out split, text files,
and the word-level tokenizer."""

import gzip
import hashlib

import pytest
import torch

from modalities.text.data import (
    E2E_DIR,
    SLOTS,
    MRVocabulary,
    encode_corpus,
    format_mr,
    is_held_out,
    load_corpus,
    load_e2e,
    load_text_file,
    parse_mr,
)
from modalities.text.tokenizer import UNK, TextTokenizer


# ---------------------------------------------------------------------------------- MRs
def test_parse_mr_reads_every_slot_and_round_trips():
    mr = ("name[The Eagle], eatType[coffee shop], food[Italian], priceRange[£20-25], "
          "customer rating[3 out of 5], area[riverside], familyFriendly[yes], near[Burger King]")
    slots = parse_mr(mr)
    assert list(slots) == list(SLOTS)
    assert slots["customer rating"] == "3 out of 5" and slots["priceRange"] == "£20-25"
    assert slots["near"] == "Burger King"
    assert format_mr(slots) == mr
    assert parse_mr("name[Alimentum], area[city centre]") == {"name": "Alimentum", "area": "city centre"}


@pytest.mark.parametrize("bad, message", [
    ("", "non-empty"),
    ("name[Alimentum], colour[blue]", "unknown slot 'colour'"),
    ("name[Alimentum], name[Aromi]", "appears twice"),
    ("name Alimentum", "cannot parse"),
])
def test_parse_mr_rejects_bad_text_clearly(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_mr(bad)


def test_shipped_copy_matches_the_upstream_files():
    # The files in data/e2e are the upstream CSVs gzip-compressed, byte for byte (README).
    expected = {
        "devset.csv.gz": "fc26b78cdb849c80545f513b223d1e051138b43882eeb79e3eb153e689c864f9",
        "testset_w_refs.csv.gz": "edc8db685e39bb9824d5bd70c18b1c9b0412d14b527aa960e2d1c8251ee15ccd",
    }
    for name, digest in expected.items():
        assert hashlib.sha256(gzip.decompress((E2E_DIR / name).read_bytes())).hexdigest() == digest


def test_e2e_split_is_fixed_by_mr_and_disjoint():
    train, held_out, everything = load_e2e("train"), load_e2e("eval"), load_e2e("all")
    assert len(everything) == 4672 + 4693  # dev + test, no empty reference
    assert len(train) + len(held_out) == len(everything)
    train_mrs = {format_mr(m) for m in train.mrs}
    eval_mrs = {format_mr(m) for m in held_out.mrs}
    assert not train_mrs & eval_mrs  # no MR on both sides
    # About one MR in ten, chosen by a hash of the MR alone: the same set on every call.
    assert 0.05 < len(eval_mrs) / len(train_mrs | eval_mrs) < 0.15
    assert all(is_held_out(parse_mr(mr)) for mr in eval_mrs)
    assert {format_mr(m) for m in load_e2e("eval").mrs} == eval_mrs
    # The split depends on the MR's content, not on how its string is spaced or ordered.
    some = parse_mr(next(iter(eval_mrs)))
    assert is_held_out(dict(reversed(list(some.items()))))


def test_e2e_reads_plain_csv_directories_and_counts_empty_references(tmp_path):
    (tmp_path / "devset.csv").write_text(
        'mr,ref\n"name[Aromi], area[riverside]",Aromi is by the river.\n"name[Aromi]",\n', encoding="utf-8")
    (tmp_path / "testset_w_refs.csv").write_text('mr,ref\n"name[Zizzi]",Zizzi is a pub.\n', encoding="utf-8")
    corpus = load_corpus(f"e2e:{tmp_path}", "all")
    assert corpus.texts == ["Aromi is by the river.", "Zizzi is a pub."]
    assert corpus.mrs[0] == {"name": "Aromi", "area": "riverside"}
    assert corpus.num_empty == 1
    with pytest.raises(ValueError, match="not found"):
        load_e2e("all", root=tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown E2E split"):
        load_e2e("dev")
    (tmp_path / "testset_w_refs.csv").write_text('mr,ref\n"name[Zizzi]",Fine.\n"nme[Zizzi]",Bad.\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"testset_w_refs.csv, row 3: unknown slot 'nme'"):
        load_corpus(f"e2e:{tmp_path}", "all")


def test_text_file_skips_and_counts_empty_and_invalid_lines(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_bytes(b"first line\n\n   \nsecond \xff\xfe broken\nthird line\r\nlast")
    corpus = load_text_file(path)
    assert corpus.texts == ["first line", "third line", "last"]
    assert (corpus.num_empty, corpus.num_invalid, corpus.num_skipped) == (2, 1, 3)
    assert corpus.mrs is None
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"\n\n")
    with pytest.raises(ValueError, match="no usable lines"):
        load_text_file(empty)
    with pytest.raises(ValueError, match="cannot read"):
        load_text_file(tmp_path / "nope.txt")


def test_text_file_drops_a_utf8_byte_order_mark_and_refuses_utf16(tmp_path):
    marked = tmp_path / "marked.txt"
    marked.write_bytes("Hello there\nHello again\n".encode("utf-8-sig"))
    assert load_text_file(marked).texts == ["Hello there", "Hello again"]  # not '\ufeffHello'
    for encoding in ("utf-16", "utf-16-be"):
        wide = tmp_path / f"{encoding}.txt"
        wide.write_bytes("the cat sat\nthe dog ran\n".encode(encoding))
        with pytest.raises(ValueError, match="looks like UTF-16.*save it as UTF-8"):
            load_text_file(wide)


def test_mr_vocabulary_codes_and_clear_errors():
    vocab = MRVocabulary.from_mrs([{"name": "Aromi", "food": "Italian"}, {"name": "Zizzi", "food": "French"}])
    codes = vocab.encode({"name": "Zizzi", "food": "French"})
    assert codes[SLOTS.index("name")] == 2 + vocab.values["name"].index("Zizzi")
    assert codes[SLOTS.index("area")] == MRVocabulary.ABSENT       # a full MR: unnamed slots are absent
    partial = vocab.encode({"food": "Italian"}, partial=True)
    assert partial[SLOTS.index("name")] == MRVocabulary.UNSPECIFIED  # a user control: unnamed slots are free
    assert MRVocabulary.from_config(vocab.to_config()).encode({"food": "French"}) == vocab.encode({"food": "French"})
    with pytest.raises(ValueError, match="unknown value 'Thai' for slot 'food'; known values: French, Italian"):
        vocab.encode({"food": "Thai"})
    with pytest.raises(ValueError, match="unknown slot 'colour'.*name, eatType"):
        vocab.encode({"colour": "red"})


# ---------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_vocabulary_size():
    corpus = load_e2e("train")
    tok = TextTokenizer.train(corpus.texts, min_count=3)
    # Diffusion-LM's E2E vocabulary has 821 words (42k training texts, count > 10); ours is
    # trained on the 8.4k dev+test descriptions with count >= 3 and lands near it.
    assert 500 < tok.vocab_size < 1000
    text = "The Eagle is a coffee shop in the city centre ."
    ids, unknown = tok.tokenize(text)
    assert unknown == [] and tok.decode(ids) == text
    # Punctuation is split off, so decoded text reads like the infilling templates.
    assert tok.decode(tok.tokenize("family-friendly, cheap.")[0]) == "family - friendly , cheap ."


def test_tokenizer_reports_unknown_words_and_truncation(tmp_path):
    tok = TextTokenizer.train(["a cat sat", "a cat ran", "a dog sat"], min_count=2)
    with pytest.warns(UserWarning, match=r"map to \[UNK\]: 'zebra' \(2\)"):
        enc = tok.encode(["a zebra sat", "zebra"], max_length=8)
    assert enc.unknown == {"zebra": 2}
    assert enc.ids[0, 1] == tok.unk_id and tok.decode(enc.ids[0]) == f"a {UNK} sat"
    assert enc.lengths.tolist() == [3, 1] and enc.ids[1, 1:].eq(tok.pad_id).all()
    assert enc.mask.tolist()[1] == [True] + [False] * 7
    with pytest.warns(UserWarning, match="1 of 1 texts are longer than 2 tokens"):
        enc = tok.encode(["a cat sat"], max_length=2)
    assert enc.num_truncated == 1 and enc.ids.shape == (1, 2)
    # Saved and loaded (the checkpoint side file) it encodes the same.
    loaded = TextTokenizer.load(tok.save(tmp_path / "tokenizer.json"))
    assert loaded.tokenize("a dog ran") == tok.tokenize("a dog ran")
    assert TextTokenizer.load(tmp_path).vocab_size == tok.vocab_size  # a directory works too


def test_tokenizer_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer at"):
        TextTokenizer.load(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizers file"):
        TextTokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="min_count"):
        TextTokenizer.train(["a"], min_count=0)


def test_encode_corpus_builds_training_items():
    corpus = load_e2e("eval")
    tok = TextTokenizer.train(corpus.texts, min_count=1)
    vocab = MRVocabulary.from_mrs(corpus.mrs)
    with pytest.warns(UserWarning, match="truncated"):
        data = encode_corpus(corpus, tok, max_length=16, mr_vocab=vocab)
    item = data[0]
    assert item["ids"].shape == (16,) and item["mask"].dtype == torch.bool
    assert item["mr"].tolist() == vocab.encode(corpus.mrs[0])
    counts = data.length_counts()
    assert len(counts) == 17 and sum(counts) == len(data) and counts[16] > 0
