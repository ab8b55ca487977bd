"""Audio data: FSDD split and labels, folders with labels from names or a CSV, resampling,
stereo mix-down, window fitting, skipped files and clear errors."""

import logging
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from modalities.audio.data import (
    FSDD_DIR,
    AudioDataset,
    fit_length,
    load_audio_folder,
    load_fsdd,
    read_clip,
    resample,
    window_mask,
)


def write(path, data, rate=8000, subtype="PCM_16"):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.asarray(data, dtype=np.float32), rate, subtype=subtype)
    return path


def tone(n, freq=440.0, rate=8000, amp=0.5):
    return amp * np.sin(2 * np.pi * freq * np.arange(n) / rate)


# ---------------------------------------------------------------------------------- FSDD
def test_shipped_fsdd_is_complete_and_lossless_16_bit():
    files = sorted(FSDD_DIR.glob("*.flac"))
    assert len(files) == 3000
    assert sum(f.stat().st_size for f in files) < 15e6  # the copy must stay small
    info = sf.info(str(files[0]))
    assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "PCM_16")


# SHA-256 of the 16-bit samples of all 3,000 upstream WAV files, concatenated in name order
# (10,498,424 samples): the FLAC copy must decode to exactly the same numbers.
FSDD_PCM_SHA256 = "6f643a7422de89763625dfc9aa79427e69f7a690223a5bc5752a2f56db5af465"


def test_shipped_fsdd_decodes_to_the_upstream_samples():
    import hashlib

    digest, count = hashlib.sha256(), 0
    for f in sorted(FSDD_DIR.glob("*.flac"), key=lambda p: p.stem):
        pcm, _ = sf.read(str(f), dtype="int16")
        digest.update(pcm.astype("<i2").tobytes())
        count += len(pcm)
    assert count == 10_498_424 and digest.hexdigest() == FSDD_PCM_SHA256


def test_fsdd_split_by_take_with_labels_and_speakers_from_names():
    test = load_fsdd("test", peak=None)
    # 10 digits x 6 speakers x takes 0-4
    assert len(test) == 300 and test.num_skipped == 0
    assert torch.equal(test.labels.bincount(), torch.full((10,), 30))
    for f, y, who in zip(test.files, test.labels.tolist(), test.speakers):
        digit, speaker, take = f.stem.split("_")
        assert int(digit) == y and speaker == who and int(take) < 5
    train = load_fsdd("train", max_clips=50)
    assert all(int(f.stem.split("_")[2]) >= 5 for f in train.files)
    assert len(set(train.labels.tolist())) > 1  # the subset spans digits, not 50 zeros
    assert test.audio.shape[1:] == (1, 8192) and test.class_names == [str(d) for d in range(10)]


def test_fsdd_keeps_the_16_bit_samples_without_peak_normalisation():
    data = load_fsdd("test", peak=None, max_clips=3)
    raw, _ = sf.read(str(data.files[0]), dtype="int16")
    clip = fit_length(torch.from_numpy(raw.astype(np.float32) / 32768)[None], 8192)
    assert torch.equal(data.audio[0], clip)


def test_peak_normalisation_sets_every_clip_peak():
    data = load_fsdd("test", peak=0.9, max_clips=5)
    peaks = data.audio.abs().amax(dim=(1, 2))
    assert torch.allclose(peaks, torch.full_like(peaks, 0.9), atol=1e-6)


# ---------------------------------------------------------------------------------- clips
@pytest.mark.parametrize("orig, new", [(8000, 16000), (16000, 8000), (44100, 8000)])
def test_resampling_changes_length_by_the_rate_ratio(tmp_path, orig, new):
    n = orig  # one second
    path = write(tmp_path / "a.wav", tone(n, rate=orig), rate=orig)
    clip, rate = read_clip(path, new)
    assert rate == orig
    assert clip.shape == (1, math.ceil(n * new / orig))
    # The tone survives: its frequency is still the strongest one at the new rate.
    spectrum = torch.fft.rfft(clip[0]).abs()
    assert abs(spectrum.argmax().item() * new / clip.shape[-1] - 440.0) < 2.0


def test_folder_loader_logs_how_many_clips_it_resampled(tmp_path, caplog):
    write(tmp_path / "a.wav", tone(1600, rate=16000), rate=16000)
    write(tmp_path / "b.wav", tone(800), rate=8000)
    with caplog.at_level(logging.WARNING, logger="modalities.audio.data"):
        data = load_audio_folder(tmp_path, 8000, length=1000)
    assert data.num_resampled == 1
    assert "resampled 1 of 2 clips" in caplog.text and "8000 Hz" in caplog.text


def test_stereo_is_mixed_down_by_averaging(tmp_path):
    left, right = tone(400), tone(400, freq=1000, amp=0.25)
    path = tmp_path / "s.wav"
    sf.write(str(path), np.stack([left, right], axis=1).astype(np.float32), 8000, subtype="FLOAT")
    clip, _ = read_clip(path)
    assert clip.shape == (1, 400)
    assert torch.allclose(clip[0], torch.from_numpy((left + right) / 2).float(), atol=1e-6)


def test_fit_length_centres_short_clips_and_cuts_long_ones_around_the_middle():
    x = torch.arange(1, 6.0)[None]  # 5 samples
    assert fit_length(x, 9).tolist() == [[0, 0, 1, 2, 3, 4, 5, 0, 0]]
    assert fit_length(x, 3).tolist() == [[2, 3, 4]]
    assert torch.equal(fit_length(x, 5), x)
    with pytest.raises(ValueError, match="at least one sample"):
        fit_length(x, 0)


def test_window_mask_marks_exactly_the_samples_fit_length_kept():
    clips = [torch.arange(1.0, n + 1)[None] for n in (3, 8, 11)]
    mask = window_mask([3, 8, 11], 8)
    assert mask.shape == (3, 1, 8)
    for clip, m in zip(clips, mask):
        fitted = fit_length(clip, 8)
        assert torch.equal(m, fitted != 0)  # the clips have no zeros of their own


def test_resample_rejects_bad_rates():
    with pytest.raises(ValueError, match="positive"):
        resample(torch.zeros(1, 10), 0, 8000)


# ---------------------------------------------------------------------------------- folders
def test_labels_from_file_names_by_regex_with_named_or_first_group(tmp_path):
    for name in ("yes_a", "no_b", "yes_c"):
        write(tmp_path / f"{name}.wav", tone(100))
    named = load_audio_folder(tmp_path, 8000, 128, label_pattern=r"^(?P<label>[a-z]+)_")
    assert named.class_names == ["no", "yes"]
    assert dict(zip([f.stem for f in named.files], named.labels.tolist())) == {"no_b": 0, "yes_a": 1, "yes_c": 1}
    first = load_audio_folder(tmp_path, 8000, 128, label_pattern=r"^([a-z]+)_")
    assert torch.equal(first.labels, named.labels)


def test_integer_labels_keep_their_values(tmp_path):
    write(tmp_path / "3_x.wav", tone(100))
    write(tmp_path / "7_y.wav", tone(100))
    data = load_audio_folder(tmp_path, 8000, 128, label_pattern=r"^(\d)_")
    assert data.labels.tolist() == [3, 7] and len(data.class_names) == 8


def test_labels_from_csv_relative_to_the_csv(tmp_path):
    write(tmp_path / "clips" / "one.flac", tone(300))
    write(tmp_path / "clips" / "two.wav", tone(200))
    (tmp_path / "labels.csv").write_text("file,label\nclips/one.flac,1\nclips/two.wav,0\n")
    data = load_audio_folder(tmp_path, 8000, 256, labels_csv=tmp_path / "labels.csv", num_classes=2)
    assert data.labels.tolist() == [1, 0] and data.audio.shape == (2, 1, 256)
    assert data.lengths == [300, 200]


def test_labels_out_of_range_are_an_error(tmp_path):
    write(tmp_path / "a.wav", tone(100))
    (tmp_path / "labels.csv").write_text("file,label\na.wav,12\n")
    with pytest.raises(ValueError, match=r"out of range.*0\.\.9"):
        load_audio_folder(tmp_path, 8000, 128, labels_csv=tmp_path / "labels.csv", num_classes=10)
    (tmp_path / "neg.csv").write_text("file,label\na.wav,-1\n")
    with pytest.raises(ValueError, match="out of range"):
        load_audio_folder(tmp_path, 8000, 128, labels_csv=tmp_path / "neg.csv")


def test_bad_csv_and_bad_pattern_errors(tmp_path):
    write(tmp_path / "a.wav", tone(100))
    (tmp_path / "bad.csv").write_text("path,class\na.wav,1\n")
    with pytest.raises(ValueError, match="columns 'file' and 'label'"):
        load_audio_folder(tmp_path, 8000, 128, labels_csv=tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="does not match the label pattern"):
        load_audio_folder(tmp_path, 8000, 128, label_pattern=r"^(\d)_")
    with pytest.raises(ValueError, match="needs a group"):
        load_audio_folder(tmp_path, 8000, 128, label_pattern=r"^a")


def test_empty_and_corrupt_files_are_skipped_and_counted(tmp_path, caplog):
    write(tmp_path / "good.wav", tone(500))
    write(tmp_path / "empty.wav", np.zeros(0))
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00not really a wave file")
    (tmp_path / "notes.txt").write_text("not audio, not counted")
    with caplog.at_level(logging.WARNING, logger="modalities.audio.data"):
        data = load_audio_folder(tmp_path, 8000, 512)
    assert len(data) == 1 and data.files[0].name == "good.wav"
    assert data.num_skipped == 2
    assert {p.name for p, _ in data.skipped} == {"empty.wav", "corrupt.wav"}
    assert "skipped 2 of 3" in caplog.text


def test_empty_folder_and_all_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no audio files"):
        load_audio_folder(tmp_path, 8000)
    (tmp_path / "corrupt.wav").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="no usable audio.*1 files"):
        load_audio_folder(tmp_path, 8000)
    with pytest.raises(ValueError, match="does not exist"):
        load_audio_folder(tmp_path / "missing", 8000)
    with pytest.raises(ValueError, match="no FSDD clips"):
        load_fsdd("test", root=tmp_path)


def test_dataset_items_carry_labels():
    ds = AudioDataset(torch.zeros(3, 1, 16), torch.tensor([0, 1, 2]))
    assert ds[2]["labels"].item() == 2 and ds[2]["x"].shape == (1, 16)
    assert "labels" not in AudioDataset(torch.zeros(3, 1, 16))[0]
    with pytest.raises(ValueError, match=r"\(N, 1, L\)"):
        AudioDataset(torch.zeros(3, 16))
