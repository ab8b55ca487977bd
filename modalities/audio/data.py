"""Audio data: the Free Spoken Digit Dataset shipped in ``data/fsdd`` and any folder of clips.

Every loader returns mono clips as float tensors (N, 1, L) in [-1, 1] at one sample rate,
cut or zero-padded to the model window L, plus integer labels when the data has them.
Dataset items are dicts ``{"x": clip, "labels": y}`` as the diffkit trainer expects.

Choices, and why:
- Files are read with soundfile (libsndfile: WAV, FLAC, OGG, AIFF). ``torchaudio.load``
  now needs FFmpeg through torchcodec, which a fresh machine may not have.
- Resampling uses ``torchaudio.functional.resample`` (windowed sinc), logged once per load
  with the number of clips it touched, since a silent rate change is a classic bug.
- Multi-channel audio is mixed down by averaging the channels (not by taking the first).
- The window: FSDD is 8 kHz and 99% of its clips are shorter than 0.92 s (7,361 samples);
  8,192 samples (1.02 s, a power of two, so it also divides by every mel hop we use) keeps
  all but 17 of the 3,000 clips whole. Shorter clips are centred in the window with zeros
  around them (the network sees silence on both sides of every word); longer ones are cut
  around their centre.
- Loudness: FSDD's clips peak anywhere between 1.6% and 86% of full scale. With
  ``peak=0.9`` (the recipe's default) every clip is scaled so its largest sample is 0.9, so
  the network learns words rather than recording levels. ``peak=None`` keeps the levels
  (and the 16-bit grid that ``bits_per_sample`` assumes).
- Empty and unreadable files are skipped, counted (``num_skipped``) and listed
  (``skipped``); an empty result is an error that says where it looked.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "AUDIO_EXTENSIONS",
    "DEFAULT_WINDOW",
    "FSDD_DIR",
    "FSDD_PATTERN",
    "FSDD_SAMPLE_RATE",
    "FSDD_TEST_TAKES",
    "AudioData",
    "AudioDataset",
    "fit_length",
    "load_audio_folder",
    "window_mask",
    "load_fsdd",
    "read_clip",
    "resample",
]

logger = logging.getLogger(__name__)

FSDD_DIR = Path(__file__).resolve().parents[2] / "data" / "fsdd"
FSDD_SAMPLE_RATE = 8000
DEFAULT_WINDOW = 8192
# {digit}_{speaker}_{take}, e.g. 7_jackson_32.flac
FSDD_PATTERN = r"^(?P<label>\d)_(?P<speaker>[A-Za-z]+)_(?P<take>\d+)$"
FSDD_TEST_TAKES = range(0, 5)  # the customary split: takes 0-4 test, 5-49 train
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif")


# ---------------------------------------------------------------------------------- clips
def resample(audio: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Resample (..., T) audio from ``orig_rate`` to ``new_rate`` Hz (windowed sinc)."""
    if orig_rate <= 0 or new_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} and {new_rate}")
    if orig_rate == new_rate:
        return audio
    import torchaudio.functional as AF

    # resample reduces the rates by their gcd itself; integer rates keep its kernel exact.
    return AF.resample(audio, int(orig_rate), int(new_rate))


def read_clip(path: str | Path, sample_rate: int | None = None) -> tuple[torch.Tensor, int]:
    """One audio file as a mono float tensor (1, T) in [-1, 1] and the file's own sample rate.

    Channels are averaged; with ``sample_rate`` the clip is resampled to it. Raises
    ``ValueError`` for a file that cannot be decoded, is empty or holds NaN/Inf.
    """
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError, ValueError) as err:  # soundfile's LibsndfileError is a RuntimeError
        raise ValueError(f"cannot read audio file {path}: {err}") from err
    if data.shape[0] == 0:
        raise ValueError(f"audio file {path} is empty (0 samples)")
    if not np.isfinite(data).all():
        raise ValueError(f"audio file {path} holds NaN or Inf samples")
    clip = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))[None]  # (1, T), channels mixed
    if sample_rate is not None and rate != sample_rate:
        clip = resample(clip, rate, sample_rate)
    return clip.clamp(-1.0, 1.0), int(rate)


def fit_length(clip: torch.Tensor, length: int) -> torch.Tensor:
    """Centre ``clip`` (..., T) in a window of ``length`` samples: zero-pad or cut around the middle."""
    if length < 1:
        raise ValueError(f"the window must be at least one sample, got {length}")
    n = clip.shape[-1]
    if n >= length:
        start = (n - length) // 2
        return clip[..., start : start + length]
    left = (length - n) // 2
    return torch.nn.functional.pad(clip, (left, length - n - left))


def window_mask(lengths, length: int) -> torch.Tensor:
    """(N, 1, length) bool: True on the samples of each clip that :func:`fit_length` kept,
    False on its zero padding. ``lengths`` are the clips' lengths before fitting
    (``AudioData.lengths``), so likelihoods can count real samples only."""
    lengths = torch.as_tensor(lengths, dtype=torch.long).flatten()
    if (lengths < 1).any():
        raise ValueError(f"clip lengths must be >= 1, got {lengths.tolist()}")
    kept = lengths.clamp(max=length)
    left = (length - kept) // 2  # fit_length centres short clips
    positions = torch.arange(length)
    return ((positions >= left[:, None]) & (positions < (left + kept)[:, None]))[:, None]


# ---------------------------------------------------------------------------------- data sets
@dataclass
class AudioData:
    """Clips loaded from disk, and what happened while loading them."""

    audio: torch.Tensor  # (N, 1, L) float32 in [-1, 1]
    sample_rate: int
    labels: torch.Tensor | None = None  # (N,) int64 class indices
    class_names: list[str] | None = None
    files: list[Path] = field(default_factory=list)
    speakers: list[str] | None = None
    lengths: list[int] = field(default_factory=list)  # samples before cutting / padding
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, why)
    num_resampled: int = 0

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)

    def __len__(self) -> int:
        return self.audio.shape[0]

    def dataset(self, with_labels: bool = True) -> "AudioDataset":
        return AudioDataset(self.audio, self.labels if with_labels else None)


class AudioDataset(Dataset):
    """In-memory clips (N, 1, L) with optional labels, yielding ``{"x": clip, "labels": y}``."""

    def __init__(self, audio: torch.Tensor, labels: torch.Tensor | None = None):
        if audio.ndim != 3 or audio.shape[1] != 1:
            raise ValueError(f"audio must be (N, 1, L) mono clips, got shape {tuple(audio.shape)}")
        if labels is not None and labels.shape != (audio.shape[0],):
            raise ValueError(f"labels must be ({audio.shape[0]},), one per clip; got {tuple(labels.shape)}")
        self.audio = audio
        self.labels = labels

    def __len__(self) -> int:
        return self.audio.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"x": self.audio[index]}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item


def _audio_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)


def _labels_from_pattern(files: Sequence[Path], pattern: str) -> list[str]:
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"label pattern {pattern!r} is not a valid regular expression: {err}") from err
    if regex.groups == 0:
        raise ValueError(f"label pattern {pattern!r} needs a group that captures the label, e.g. "
                         r"'^(?P<label>\d)_' or '^(\d)_'")
    names = []
    for f in files:
        match = regex.search(f.stem)
        if match is None:
            raise ValueError(f"file name {f.name!r} does not match the label pattern {pattern!r}; "
                             "fix the pattern or move the file out of the folder")
        names.append(match.group("label") if "label" in regex.groupindex else match.group(1))
    return names


def _labels_from_csv(csv_path: Path) -> tuple[list[Path], list[str]]:
    """(files, labels) from a CSV with a header holding ``file`` and ``label`` columns;
    relative file paths are relative to the CSV's folder."""
    try:
        with open(csv_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"cannot read label CSV {csv_path}: {err}") from err
    if not rows:
        raise ValueError(f"label CSV {csv_path} has no rows; it needs a header 'file,label' and one row per clip")
    if "file" not in rows[0] or "label" not in rows[0]:
        raise ValueError(f"label CSV {csv_path} needs the columns 'file' and 'label'; it has "
                         f"{', '.join(map(str, rows[0]))}")
    files, labels = [], []
    for i, row in enumerate(rows, start=2):
        if not row["file"] or row["label"] is None or row["label"].strip() == "":
            raise ValueError(f"label CSV {csv_path}, line {i}: empty file or label")
        path = Path(row["file"])
        files.append(path if path.is_absolute() else csv_path.parent / path)
        labels.append(row["label"].strip())
    return files, labels


def _class_indices(names: Sequence[str], num_classes: int | None, source: str) -> tuple[torch.Tensor, list[str]]:
    """Label strings -> indices. All-integer labels keep their values (digit 7 is class 7);
    other labels are numbered in sorted order."""
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        values = [int(n) for n in names]
        top = max(values) + 1 if num_classes is None else num_classes
        bad = sorted({v for v in values if v < 0 or v >= top})
        if bad:
            raise ValueError(f"labels {bad} from {source} are out of range: with {top} classes a label must be "
                             f"in 0..{top - 1}; pass num_classes (--num-classes) or fix the labels")
        return torch.tensor(values, dtype=torch.long), [str(i) for i in range(top)]
    classes = sorted(set(names))
    if num_classes is not None and len(classes) > num_classes:
        raise ValueError(f"{source} holds {len(classes)} distinct labels but num_classes is {num_classes}")
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index[n] for n in names], dtype=torch.long), classes


def load_audio_folder(
    root: str | Path,
    sample_rate: int,
    length: int = DEFAULT_WINDOW,
    *,
    label_pattern: str | None = None,
    labels_csv: str | Path | None = None,
    num_classes: int | None = None,
    peak: float | None = None,
    files: Sequence[Path] | None = None,
) -> AudioData:
    """Every WAV/FLAC/OGG/AIFF file under ``root`` (recursively), as clips of ``length`` samples.

    Labels (optional) come from the file names through ``label_pattern``, a regular
    expression searched in the file stem whose group ``label`` (or first group) is the label,
    or from ``labels_csv`` (columns ``file,label``; the files it lists are the data set).
    Integer labels keep their values; other labels are numbered in sorted order.
    """
    if sample_rate < 1:
        raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate}")
    if peak is not None and not 0 < peak <= 1:
        raise ValueError(f"peak must lie in (0, 1], got {peak}")
    if label_pattern is not None and labels_csv is not None:
        raise ValueError("give labels either by file-name pattern or by CSV, not both")
    root = Path(root).expanduser()
    label_names = None
    if labels_csv is not None:
        csv_path = Path(labels_csv).expanduser()
        files, label_names = _labels_from_csv(csv_path)
        where = str(csv_path)
    else:
        if not root.is_dir():
            raise ValueError(f"audio folder {root} does not exist or is not a folder")
        files = list(files) if files is not None else _audio_files(root)
        where = str(root)
        if not files:
            raise ValueError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) found under {root}")
        if label_pattern is not None:
            label_names = _labels_from_pattern(files, label_pattern)

    clips, kept, lengths, skipped, resampled = [], [], [], [], 0
    kept_labels = []
    for i, f in enumerate(files):
        try:
            clip, rate = read_clip(f, sample_rate)
        except ValueError as err:
            skipped.append((Path(f), str(err)))
            continue
        resampled += rate != sample_rate
        lengths.append(clip.shape[-1])
        if peak is not None and clip.abs().max() > 0:  # an all-zero clip stays silent
            clip = clip * (peak / clip.abs().max())
        clips.append(fit_length(clip, length))
        kept.append(Path(f))
        if label_names is not None:
            kept_labels.append(label_names[i])
    if skipped:
        logger.warning("skipped %d of %d audio files in %s (empty or unreadable), e.g. %s: %s",
                       len(skipped), len(files), where, skipped[0][0].name, skipped[0][1])
    if not clips:
        raise ValueError(f"no usable audio in {where}: all {len(files)} files were empty or unreadable "
                         f"(first: {skipped[0][0]}: {skipped[0][1]})")
    if resampled:
        logger.warning("resampled %d of %d clips from %s to %d Hz", resampled, len(clips), where, sample_rate)
    labels = class_names = None
    if label_names is not None:
        labels, class_names = _class_indices(kept_labels, num_classes, where)
    return AudioData(audio=torch.stack(clips), sample_rate=sample_rate, labels=labels,
                     class_names=class_names, files=kept, lengths=lengths, skipped=skipped,
                     num_resampled=resampled)


def load_fsdd(
    split: str = "train",
    sample_rate: int = FSDD_SAMPLE_RATE,
    length: int = DEFAULT_WINDOW,
    *,
    root: str | Path = FSDD_DIR,
    peak: float | None = None,
    speakers: Sequence[str] | None = None,
    max_clips: int | None = None,
) -> AudioData:
    """The Free Spoken Digit Dataset (``{digit}_{speaker}_{take}`` files) with digit labels 0-9.

    ``split``: "train" (takes 5-49), "test" (takes 0-4) or "all". ``speakers`` keeps only those
    speakers; ``max_clips`` keeps that many clips spread evenly through the sorted files (for
    quick runs and tests).
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"FSDD folder {root} is missing; it ships with diffkit in data/fsdd "
                         "(or pass root= a folder of {digit}_{speaker}_{take}.wav files)")
    regex = re.compile(FSDD_PATTERN)
    chosen, who = [], []
    for f in _audio_files(root):
        m = regex.match(f.stem)
        if m is None:
            continue  # not an FSDD clip (a README, a stray file): not part of the data set
        take = int(m.group("take"))
        if split != "all" and (take in FSDD_TEST_TAKES) != (split == "test"):
            continue
        if speakers is not None and m.group("speaker") not in speakers:
            continue
        chosen.append(f)
        who.append(m.group("speaker"))
    if max_clips is not None:
        if max_clips < 1:
            raise ValueError(f"max_clips must be >= 1, got {max_clips}")
        # Evenly spaced through the sorted files, so a small subset still spans digits and speakers.
        every = max(1, len(chosen) // max_clips)
        chosen, who = chosen[::every][:max_clips], who[::every][:max_clips]
    if not chosen:
        raise ValueError(f"no FSDD clips ({{digit}}_{{speaker}}_{{take}}) for split={split!r}"
                         f"{f', speakers={list(speakers)}' if speakers else ''} under {root}")
    data = load_audio_folder(root, sample_rate, length, label_pattern=FSDD_PATTERN, num_classes=10,
                             peak=peak, files=chosen)
    keep = set(data.files)
    data.speakers = [s for f, s in zip(chosen, who) if f in keep]
    return data
