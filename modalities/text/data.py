"""Text data: the E2E restaurant descriptions with their meaning representations, and any
text file with one example per line.

E2E (Novikova et al., 2017) pairs a meaning representation (MR) such as
``name[The Eagle], eatType[coffee shop], food[Italian], area[riverside]`` with human-written
descriptions. The copy in ``data/e2e`` holds the official dev and test sets (the 42k-row
training set is not distributed with diffkit); see ``data/README.md`` for licence and source.

The held-out evaluation set is a fixed set of MRs chosen by a hash of the normalised MR
string, so it never depends on file order, on a random seed or on the machine: every
description of a held-out MR is held out with it, and no MR is ever seen in training and
evaluation both.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils.data

__all__ = [
    "E2E_DIR",
    "E2E_FILES",
    "SLOTS",
    "TextCorpus",
    "MRVocabulary",
    "parse_mr",
    "format_mr",
    "is_held_out",
    "is_e2e",
    "load_e2e",
    "load_text_file",
    "load_corpus",
    "TokenDataset",
    "encode_corpus",
]

E2E_DIR = Path(__file__).resolve().parents[2] / "data" / "e2e"
E2E_FILES = ("devset.csv.gz", "testset_w_refs.csv.gz")

# The eight slot types of the E2E domain, in the order the data set lists them.
SLOTS = ("name", "eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near")

# About one MR in ten is held out (the split is by MR, never by description).
HELD_OUT_BUCKETS = 10

_SLOT_RE = re.compile(r"\s*([^\[\],]+?)\s*\[([^\[\]]*)\]\s*")


def parse_mr(mr: str) -> dict[str, str]:
    """``"name[Alimentum], area[city centre]"`` -> ``{"name": "Alimentum", "area": "city centre"}``.

    Raises ValueError on text that is not a list of ``slot[value]`` items, on slots outside
    the E2E set and on a slot given twice.
    """
    if not isinstance(mr, str) or not mr.strip():
        raise ValueError(f"a meaning representation must be a non-empty string like "
                         f"'name[Alimentum], area[city centre]', got {mr!r}")
    slots: dict[str, str] = {}
    for item in mr.split("],"):
        item = item if item.rstrip().endswith("]") else item + "]"
        match = _SLOT_RE.fullmatch(item)
        if match is None:
            raise ValueError(f"cannot parse {item.strip()!r} in the meaning representation {mr!r}; "
                             "each item must look like slot[value], items separated by commas")
        slot, value = match.group(1), match.group(2).strip()
        if slot not in SLOTS:
            raise ValueError(f"unknown slot {slot!r} in {mr!r}; the E2E slots are {', '.join(SLOTS)}")
        if slot in slots:
            raise ValueError(f"slot {slot!r} appears twice in {mr!r}")
        slots[slot] = value
    return slots


def format_mr(slots: Mapping[str, str]) -> str:
    """The canonical MR string (slots in the E2E order): the inverse of :func:`parse_mr`."""
    return ", ".join(f"{slot}[{slots[slot]}]" for slot in SLOTS if slot in slots)


def is_held_out(slots: Mapping[str, str]) -> bool:
    """Whether an MR belongs to the fixed evaluation set.

    A hash of the canonical MR string (not Python's ``hash``, which is salted per process)
    puts about one MR in ten in the held-out set, the same on every machine.
    """
    digest = hashlib.sha256(format_mr(slots).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_BUCKETS == 0


@dataclass
class TextCorpus:
    """Texts (one example each), their MRs when the data has them, and what was skipped."""

    texts: list[str]
    mrs: list[dict[str, str]] | None = None
    source: str = ""
    num_empty: int = 0        # empty or whitespace-only lines / descriptions
    num_invalid: int = 0      # lines that were not valid UTF-8

    def __post_init__(self) -> None:
        if self.mrs is not None and len(self.mrs) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.mrs)} MRs")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_skipped(self) -> int:
        return self.num_empty + self.num_invalid


def _read_csv(path: Path) -> list[dict[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"cannot read E2E file {path}: {err}") from err
    if rows and not {"mr", "ref"} <= set(rows[0]):
        raise ValueError(f"{path} is not an E2E file: it needs the columns mr and ref, "
                         f"found {', '.join(rows[0])}")
    return rows


def load_e2e(split: str = "train", root: str | os.PathLike | None = None,
             files: Sequence[str] = E2E_FILES) -> TextCorpus:
    """E2E descriptions and parsed MRs from ``root`` (default: the copy in ``data/e2e``).

    ``split``: ``"train"`` (MRs outside the held-out set), ``"eval"`` (the fixed held-out
    MRs, see :func:`is_held_out`) or ``"all"``. Files may be plain or gzip-compressed CSV.
    Only ``files`` are read (the dev and test sets, as shipped): an official ``trainset.csv``
    in ``root`` is not, unless it is listed there.
    """
    if split not in ("train", "eval", "all"):
        raise ValueError(f"unknown E2E split {split!r}; use train, eval or all")
    root = Path(root) if root is not None else E2E_DIR
    texts: list[str] = []
    mrs: list[dict[str, str]] = []
    num_empty = 0
    for name in files:
        path = root / name
        if not path.is_file() and path.suffix == ".gz" and (root / path.stem).is_file():
            path = root / path.stem  # an uncompressed copy, as distributed upstream
        if not path.is_file():
            raise ValueError(f"E2E file {path} not found; it ships in data/e2e (or point --data at "
                             "a directory holding devset.csv and testset_w_refs.csv)")
        for number, row in enumerate(_read_csv(path), start=2):  # row 1 is the header
            text = (row.get("ref") or "").strip()
            if not text:
                num_empty += 1
                continue
            try:
                slots = parse_mr(row["mr"])
            except ValueError as err:
                raise ValueError(f"{path}, row {number}: {err}") from None
            if split != "all" and is_held_out(slots) != (split == "eval"):
                continue
            texts.append(text)
            mrs.append(slots)
    return TextCorpus(texts, mrs, source=f"e2e:{split}", num_empty=num_empty)


def load_text_file(path: str | os.PathLike) -> TextCorpus:
    """Every line of a text file is one example; empty and non-UTF-8 lines are skipped and
    counted (``num_empty``, ``num_invalid``) rather than failing the whole file."""
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read text file {path}: {err.strerror or err}") from err
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in raw[:4096]:
        # UTF-16 splits into lines that decode as UTF-8 full of NULs: refuse it rather than learn them.
        raise ValueError(f"{path} looks like UTF-16 (byte-order mark or NUL bytes); save it as UTF-8, one "
                         "example per line")
    raw = raw.removeprefix(codecs.BOM_UTF8)  # Windows editors start UTF-8 files with one
    texts: list[str] = []
    num_empty = num_invalid = 0
    for line in raw.splitlines():
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError:
            num_invalid += 1
            continue
        if not text:
            num_empty += 1
            continue
        texts.append(text)
    if not texts:
        raise ValueError(f"{path} holds no usable lines ({num_empty} empty, {num_invalid} not UTF-8); "
                         "give a UTF-8 text file with one example per line")
    return TextCorpus(texts, None, source=str(path), num_empty=num_empty, num_invalid=num_invalid)


def is_e2e(spec: str | os.PathLike) -> bool:
    """Whether a data spec names E2E data (``"e2e"`` or ``"e2e:DIR"``) rather than a text file
    (``e2e_notes.txt`` is a text file)."""
    spec = str(spec)
    return spec == "e2e" or spec.startswith("e2e:")


def load_corpus(spec: str, split: str = "train") -> TextCorpus:
    """``"e2e"`` (the shipped copy), ``"e2e:DIR"`` (E2E CSVs elsewhere) or a text file path."""
    if spec == "e2e":
        return load_e2e(split)
    if spec.startswith("e2e:"):
        return load_e2e(split, root=Path(spec[4:]).expanduser())
    if split == "eval":
        raise ValueError("a text file has no fixed held-out set; evaluate on another file")
    return load_text_file(spec)


# ---------------------------------------------------------------------------------- MR codes
@dataclass
class MRVocabulary:
    """The values each slot takes, so that an MR becomes one integer per slot for the network.

    Code 0 means "unspecified" (the slot is free: dropped for classifier-free guidance, or not
    given by the user), 1 means "absent" (the MR says nothing about it, so the text should not
    either), 2.. are the slot's values in sorted order.
    """

    values: dict[str, list[str]] = field(default_factory=dict)

    UNSPECIFIED = 0
    ABSENT = 1

    @classmethod
    def from_mrs(cls, mrs: Iterable[Mapping[str, str]]) -> MRVocabulary:
        seen: dict[str, set[str]] = {slot: set() for slot in SLOTS}
        for mr in mrs:
            for slot, value in mr.items():
                seen[slot].add(value)
        return cls({slot: sorted(seen[slot]) for slot in SLOTS})

    @property
    def sizes(self) -> list[int]:
        """Codes per slot (values + unspecified + absent)."""
        return [len(self.values.get(slot, [])) + 2 for slot in SLOTS]

    def encode(self, mr: Mapping[str, str], *, partial: bool = False) -> list[int]:
        """One code per slot. ``partial=True`` (user controls) leaves unnamed slots unspecified
        instead of absent. Unknown slots or values raise ValueError listing the known ones."""
        for slot in mr:
            if slot not in SLOTS:
                raise ValueError(f"unknown slot {slot!r}; the slots are {', '.join(SLOTS)}")
        codes = []
        for slot in SLOTS:
            if slot not in mr:
                codes.append(self.UNSPECIFIED if partial else self.ABSENT)
                continue
            known = self.values.get(slot, [])
            if mr[slot] not in known:
                raise ValueError(f"unknown value {mr[slot]!r} for slot {slot!r}; known values: "
                                 f"{', '.join(known) if known else '(none in the training data)'}")
            codes.append(known.index(mr[slot]) + 2)
        return codes

    def to_config(self) -> dict[str, list[str]]:
        return {slot: list(self.values.get(slot, [])) for slot in SLOTS}

    @classmethod
    def from_config(cls, config: Mapping[str, Sequence[str]]) -> MRVocabulary:
        return cls({slot: list(config.get(slot, [])) for slot in SLOTS})


# ---------------------------------------------------------------------------------- tensors
class TokenDataset(torch.utils.data.Dataset):
    """Encoded examples for training: dicts of ``ids`` (L,), ``mask`` (L,) and, with MR codes,
    ``mr`` (S,). Built by :func:`encode_corpus`."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, mr: torch.Tensor | None = None):
        if ids.shape != mask.shape or (mr is not None and mr.shape[0] != ids.shape[0]):
            raise ValueError("ids, mask and mr must describe the same examples")
        self.ids, self.mask, self.mr = ids, mask, mr

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"ids": self.ids[index], "mask": self.mask[index]}
        if self.mr is not None:
            item["mr"] = self.mr[index]
        return item

    def length_counts(self) -> list[int]:
        """How many examples have each length 0..L (the prior lengths are sampled from)."""
        lengths = self.mask.sum(1)
        return torch.bincount(lengths, minlength=self.ids.shape[1] + 1).tolist()


def encode_corpus(corpus: TextCorpus, tokenizer, max_length: int,
                  mr_vocab: MRVocabulary | None = None) -> TokenDataset:
    """Tokenise a corpus (truncating with a warning, reporting unknown words) into a dataset;
    examples that end up with no token at all are dropped, since they carry nothing to learn."""
    enc = tokenizer.encode(corpus.texts, max_length)
    keep = enc.lengths > 0
    mr = None
    if mr_vocab is not None:
        if corpus.mrs is None:
            raise ValueError(f"{corpus.source} has no meaning representations to condition on")
        mr = torch.tensor([mr_vocab.encode(m) for m in corpus.mrs], dtype=torch.long)[keep]
    if not keep.any():
        raise ValueError(f"no example of {corpus.source} has a single token")
    return TokenDataset(enc.ids[keep], enc.mask[keep], mr)
