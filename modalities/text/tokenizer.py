"""Tokenisation with Hugging Face ``tokenizers``: a word-level vocabulary trained on the
corpus (Diffusion-LM's choice: a small vocabulary keeps the tied rounding head cheap and the
16-d embedding space uncrowded), or any local pretrained ``tokenizer.json``.

The tokenizer travels with a checkpoint as the side file ``tokenizer.json``, so a model is
always decoded with the vocabulary it was trained on.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

__all__ = ["PAD", "UNK", "MASK", "TOKENIZER_FILE", "TextTokenizer", "EncodedBatch"]

PAD, UNK, MASK = "[PAD]", "[UNK]", "[MASK]"
TOKENIZER_FILE = "tokenizer.json"

# Padding token names of common pretrained tokenizers, tried in order.
_PAD_NAMES = (PAD, "<pad>", "<|pad|>", "[pad]")
_UNK_NAMES = (UNK, "<unk>", "<|unk|>")


@dataclass
class EncodedBatch:
    """Token ids padded to one length, with what the encoding had to change."""

    ids: torch.Tensor                 # (N, L) long, padded with the PAD id
    lengths: torch.Tensor             # (N,) long, real tokens per example
    num_truncated: int = 0            # examples cut to max_length
    unknown: Counter = field(default_factory=Counter)  # words that became UNK, with counts

    @property
    def mask(self) -> torch.Tensor:
        """(N, L) bool, True at real tokens, False at padding."""
        return torch.arange(self.ids.shape[1])[None] < self.lengths[:, None]


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the ids the text modality needs (PAD, UNK)."""

    def __init__(self, tokenizer: Tokenizer, source: str = ""):
        # Pretrained tokenizer files often pad or truncate to a fixed length themselves; the
        # modality pads to the model's length (and reports truncation) on its own.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.source = source
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.pad_id = next((vocab[name] for name in _PAD_NAMES if name in vocab), None)
        if self.pad_id is None:
            raise ValueError(f"tokenizer {source or ''} has no padding token (tried "
                             f"{', '.join(_PAD_NAMES)}); add a special token named [PAD] to it, or leave "
                             "--tokenizer out to train a word-level vocabulary that has one")
        self.unk_id = next((vocab[name] for name in _UNK_NAMES if name in vocab), None)
        # Special tokens (padding, mask, [CLS]...) are never generated: rounding skips them.
        added = tokenizer.get_added_tokens_decoder() if hasattr(tokenizer, "get_added_tokens_decoder") else {}
        self.special_ids = sorted({self.pad_id, *(i for i, tok in added.items() if tok.special)}
                                  - ({self.unk_id} if self.unk_id is not None else set()))

    # ------------------------------------------------------------------ building
    @classmethod
    def train(cls, texts: Sequence[str], min_count: int = 3, lowercase: bool = False,
              max_vocab: int | None = None) -> TextTokenizer:
        """A word-level vocabulary of the words seen at least ``min_count`` times.

        Words are split at whitespace and punctuation ("family-friendly" -> "family - friendly"),
        so generated text comes out tokenised like the infilling templates users write
        ("The Eagle is a [MASK] [MASK] in the city centre .").
        """
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if not texts:
            raise ValueError("cannot train a tokenizer on no text")
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        if lowercase:
            from tokenizers import normalizers

            tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
        trainer = trainers.WordLevelTrainer(
            min_frequency=min_count, special_tokens=[PAD, UNK, MASK],
            **({"vocab_size": max_vocab} if max_vocab else {}))
        tok.train_from_iterator(texts, trainer)
        return cls(tok, source="trained")

    @classmethod
    def load(cls, path: str | os.PathLike) -> TextTokenizer:
        """A ``tokenizer.json`` file, or a directory holding one (a local pretrained tokenizer)."""
        path = Path(path).expanduser()
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"no tokenizer at {path}: give a tokenizer.json file or a directory "
                             "that holds one (nothing is downloaded)")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{file} is not a Hugging Face tokenizers file: {err}") from err
        return cls(tok, source=str(file))

    def to_str(self) -> str:
        """The tokenizer as JSON text (what ``tokenizer.json`` holds)."""
        return self.tokenizer.to_str()

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        return path

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        # One past the largest id (pretrained vocabularies may have gaps): the embedding rows.
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    # ------------------------------------------------------------------ encoding
    def tokenize(self, text: str) -> tuple[list[int], list[str]]:
        """(ids, unknown words) of one text, without special tokens."""
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        unknown = [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets)
                   if self.unk_id is not None and i == self.unk_id]
        return list(enc.ids), unknown

    def encode(self, texts: Sequence[str], max_length: int, *, warn: bool = True) -> EncodedBatch:
        """Ids padded to ``max_length``; longer texts are truncated with a warning, unknown words
        map to UNK and are reported (counted in ``EncodedBatch.unknown``, and warned about)."""
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        lengths = torch.zeros(len(texts), dtype=torch.long)
        unknown: Counter = Counter()
        truncated = 0
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts must be strings, got {type(text).__name__} at position {row}")
            tokens, unk = self.tokenize(text)
            unknown.update(unk)
            if len(tokens) > max_length:
                truncated += 1
                tokens = tokens[:max_length]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            lengths[row] = len(tokens)
        if warn and truncated:
            warnings.warn(f"{truncated} of {len(texts)} texts are longer than {max_length} tokens "
                          "and were truncated (a model handles at most its max_length; recipes/text_train.py "
                          "--max-length trains a longer one)", stacklevel=2)
        if warn and unknown:
            warnings.warn(f"{sum(unknown.values())} words are not in the vocabulary and map to "
                          f"{UNK}: {_describe_counts(unknown)}", stacklevel=2)
        return EncodedBatch(ids, lengths, truncated, unknown)

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text. Padding and other special tokens are left out, UNK is kept (a
        sentence with a hole says more than one that silently lost a word)."""
        skip = set(self.special_ids)
        return self.tokenizer.decode([int(i) for i in ids if int(i) not in skip], skip_special_tokens=False)


def _describe_counts(counts: Counter, limit: int = 10) -> str:
    common = counts.most_common(limit)
    text = ", ".join(f"{word!r} ({n})" for word, n in common)
    return text + (f" and {len(counts) - limit} more" if len(counts) > limit else "")
