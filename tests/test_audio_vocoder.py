"""The learned harmonic-plus-noise vocoder (modalities/audio/vocoder.py): the synthesiser against
closed forms, the pitch tracker, the front-end offsets, the recipe's ddsp preset (seeded,
exported, loaded back), and the spectrogram route through it."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import audio_train  # noqa: E402

from modalities.audio import modality as audio_modality  # noqa: E402
from modalities.audio.mel import MelConfig, log_mel  # noqa: E402
from modalities.audio.modality import generate_audio, load_vocoder, vocode  # noqa: E402
from modalities.audio.vocoder import (  # noqa: E402
    HarmonicVocoder,
    filtered_noise,
    harmonic_synth,
    multi_resolution_stft_loss,
    pitch_track,
    upsample_frames,
)

SR, HOP = 8000, 64


def test_one_harmonic_is_the_closed_form_sinusoid():
    frames, f0, amp = 32, 250.0, 0.5
    amps = torch.zeros(1, 10, frames)
    amps[:, 0] = amp
    out = harmonic_synth(torch.full((1, frames), f0), amps, SR, HOP)
    n = torch.arange(frames * HOP, dtype=torch.float64)
    expected = amp * torch.sin(2 * math.pi * f0 * (n + 1) / SR)  # running phase: f0 / SR per sample
    torch.testing.assert_close(out[0].double(), expected, atol=2e-4, rtol=0)
    # Its spectrum peaks at f0 (bin of 1 / T resolution).
    spectrum = torch.fft.rfft(out[0] * torch.hann_window(out.shape[-1]))
    assert abs(spectrum.abs().argmax().item() * SR / out.shape[-1] - f0) < SR / out.shape[-1]


def test_harmonics_are_multiples_of_f0_with_their_amplitudes():
    frames, f0 = 64, 125.0  # 125 Hz: an exact number of cycles in 4096 samples
    amps = torch.zeros(1, 5, frames)
    amps[:, 1], amps[:, 3] = 0.3, 0.1  # harmonics 2 and 4: 250 and 500 Hz
    out = harmonic_synth(torch.full((1, frames), f0), amps, SR, HOP)[0]
    mags = torch.fft.rfft(out).abs() * 2 / out.shape[-1]
    bin_hz = SR / out.shape[-1]
    for freq, a in ((125, 0.0), (250, 0.3), (375, 0.0), (500, 0.1)):
        assert abs(mags[round(freq / bin_hz)].item() - a) < 0.01, freq


def test_upsampling_is_linear_between_frame_centres():
    x = torch.tensor([[[0.0, 1.0, 3.0]]])
    up = upsample_frames(x, 4)[0, 0]
    torch.testing.assert_close(up, torch.tensor([0, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 3, 3, 3.0]))


def test_filtered_noise_follows_its_envelope_and_its_generator():
    env = torch.zeros(1, 65, 64)
    env[:, :20] = 1.0  # 0 .. ~1.2 kHz only
    a = filtered_noise(env, HOP, generator=torch.Generator().manual_seed(1))
    b = filtered_noise(env, HOP, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    power = torch.fft.rfft(a[0]).abs().square()
    cut = round(1500 / (SR / a.shape[-1]))
    assert power[cut:].sum() < 0.01 * power[:cut].sum()


def test_vocoder_masks_harmonics_at_and_above_nyquist():
    torch.manual_seed(0)
    net = HarmonicVocoder(channels=16, dilations=[1], num_harmonics=40)
    controls = net(torch.zeros(2, 64, 8))
    k = torch.arange(1, 41)[None, :, None]
    above = k * controls["f0"][:, None] >= SR / 2
    assert above.any() and (controls["amplitudes"][above] == 0).all()
    assert (controls["amplitudes"][~above] > 0).all()
    assert ((controls["f0"] >= 50) & (controls["f0"] <= 500)).all()


def test_envelope_offsets_match_the_front_end():
    """The fixed offsets turn the frames' mel magnitudes into sinusoid and noise amplitudes."""
    net = HarmonicVocoder(channels=16, dilations=[1])
    cfg = MelConfig()
    t = torch.arange(8192) / SR
    tone = (0.1 * torch.sin(2 * math.pi * 500 * t))[None, None]
    level = net.log_envelope(log_mel(tone, cfg), torch.tensor([500.0]))[0, 0, 10:-10].mean().item()
    assert abs(math.log(0.1) - level - net.HARMONIC_OFFSET) < 0.3
    noise = filtered_noise(torch.ones(1, 65, 128), HOP, generator=torch.Generator().manual_seed(0))[:, None]
    level = net.log_envelope(log_mel(noise, cfg), net.noise_freqs)[0, :, 10:-10].mean().item()
    assert abs(-level - net.NOISE_OFFSET) < 0.3


def test_pitch_track_finds_f0_of_a_harmonic_signal_and_not_of_noise():
    t = torch.arange(8192) / SR
    voice = sum(0.5 / k * torch.sin(2 * math.pi * 140 * k * t) for k in range(1, 12))
    noise = torch.randn(8192, generator=torch.Generator().manual_seed(0)) * 0.3
    f0, voiced = pitch_track(torch.stack([voice, noise])[:, None], SR, HOP)
    assert f0.shape == (2, 128)
    assert voiced[0, 8:-8].all() and (f0[0, 8:-8] - 140).abs().max() < 2
    assert voiced[1].float().mean() < 0.1


def test_stft_loss_is_zero_for_equal_audio_and_grows_with_error():
    x = torch.randn(2, 1, 2048, generator=torch.Generator().manual_seed(0)) * 0.1
    assert multi_resolution_stft_loss(x, x).item() == 0
    assert multi_resolution_stft_loss(x * 0.5, x) > multi_resolution_stft_loss(x * 0.9, x) > 0


# 4 FSDD clips of 512 samples (8 frames), a 1-layer network of 8 channels: a second per run.
TINY = ["--preset", "ddsp", "--max-clips", "4", "--length", "512", "--ddsp-channels", "8", "--ddsp-layers", "1",
        "--num-harmonics", "8", "--batch-size", "2", "--crop-frames", "4", "--no-progress", "--save-every", "3"]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "checkpoint" / "model.safetensors"))


def test_recipe_trains_reproducibly_samples_and_exports(tmp_path):
    a, b, export = tmp_path / "a", tmp_path / "b", tmp_path / "export"
    assert audio_train.main([*TINY, "--max-steps", "3", "--sample-every", "3", "--output-dir", str(a),
                             "--export", str(export)]) == 0
    assert audio_train.main([*TINY, "--max-steps", "3", "--sample-every", "0", "--output-dir", str(b)]) == 0
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed, same weights
    c = tmp_path / "c"
    assert audio_train.main([*TINY, "--max-steps", "3", "--sample-every", "0", "--seed", "1",
                             "--output-dir", str(c)]) == 0
    assert not all(torch.equal(wa[k], _weights(c)[k]) for k in wa)
    step = a / "samples" / "step_000003"
    assert len(list(step.glob("*.wav"))) == 4 and (step / "spectrograms.png").is_file()
    # The export loads back through the audio checkpoint machinery (safetensors, no pickle) ...
    config = json.loads((export / "config.json").read_text())
    assert config["diffusion"] is None and config["modality_config"]["kind"] == "ddsp-vocoder"
    assert config["modality_config"]["mel"] == MelConfig().to_dict()
    voc = load_vocoder(export, "cpu")
    frames = log_mel(torch.zeros(3, 1, 512).uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(0)),
                     voc.mel_config)
    out = generate_audio(checkpoint=export, mel=frames, seed=3, device="cpu")
    assert out.audio.shape == (3, 1, 512) and out.sample_rate == 8000
    assert out.audio.abs().max() <= 1 and out.audio.abs().max() > 0
    torch.testing.assert_close(vocode(frames, checkpoint=export, seed=3, device="cpu").audio, out.audio)
    assert not torch.equal(vocode(frames, checkpoint=export, seed=4, device="cpu").audio, out.audio)
    # ... and the exported float16 weights are the run's EMA weights.
    from diffkit.checkpoint import load_network

    run = load_network(a / "checkpoint", audio_modality.VOCODER_NETWORKS, modality="audio", device="cpu").net
    for name, value in run.state_dict().items():
        torch.testing.assert_close(voc.net.state_dict()[name], value.half().float())
    with pytest.raises(ValueError, match="learned vocoder: it takes mel= frames only, not labels"):
        generate_audio(checkpoint=export, mel=frames, labels=[1, 2, 3], device="cpu")
    with pytest.raises(ValueError, match="not a density"):
        audio_modality.bits_per_sample(torch.zeros(1, 512), checkpoint=export, device="cpu")

    # The spectrogram route through it: the shipped mel model's frames, this vocoder's sound.
    gen = generate_audio(labels=[1, 2], steps=2, seed=0, vocoder=export, device="cpu")
    assert gen.audio.shape == (2, 1, 8192) and torch.isfinite(gen.audio).all()

    # A vocoder trained on other mel settings: one line naming both.
    config["modality_config"]["mel"]["hop_length"] = 128
    (export / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"(?s)^[^\n]*other mel settings[^\n]*hop_length 128 vs 64[^\n]*$"):
        generate_audio(labels=[1], steps=2, seed=0, vocoder=export, device="cpu")


def test_recipe_rejects_diffusion_flags_for_ddsp(tmp_path, capsys):
    with pytest.raises(SystemExit):
        audio_train.main([*TINY, "--schedule", "cosine", "--output-dir", str(tmp_path)])
    assert "trains no diffusion" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        audio_train.main(["--model", "ddsp", "--output-dir", str(tmp_path)])
    assert "--preset ddsp" in capsys.readouterr().err


def test_default_route_uses_the_shipped_vocoder_when_there_is_one(monkeypatch):
    if audio_modality.default_vocoder() == "griffin-lim":
        pytest.skip("no learned vocoder shipped")
    called = []
    monkeypatch.setattr(audio_modality, "griffin_lim", lambda *a, **k: called.append(1) / 0)
    out = generate_audio(labels=[4, 7], steps=2, seed=0, device="cpu")
    assert out.audio.shape == (2, 1, 8192) and not called
    monkeypatch.undo()
    gl = generate_audio(labels=[4, 7], steps=2, seed=0, device="cpu", vocoder="griffin-lim")
    assert gl.audio.shape == out.audio.shape and not torch.allclose(gl.audio, out.audio)


def test_the_shipped_vocoder_says_how_it_was_made_and_resynthesises_held_out_digits():
    from modalities.audio.data import load_fsdd
    from modalities.audio.metrics import load_digit_classifier, voicing_clarity

    if audio_modality.default_vocoder() == "griffin-lim":
        pytest.skip("no learned vocoder shipped")
    voc = load_vocoder(device="cpu")
    extra = json.loads((audio_modality.VOCODER_CHECKPOINT / "config.json").read_text())["extra"]
    assert extra["recipe"].startswith("python recipes/audio_train.py") and extra["seed"] == 0
    readme = (audio_modality.VOCODER_CHECKPOINT / "README.md").read_text()
    assert "recipes/audio_train.py" in readme and "wall time" in readme
    assert voc.mel_config == MelConfig() and voc.sample_rate == 8000
    test = load_fsdd("test", max_clips=40, peak=0.9)  # held out: the vocoder never heard takes 0-4
    out = voc(log_mel(test.audio, voc.mel_config), seed=0)
    assert out.shape == test.audio.shape
    acc = (load_digit_classifier().predict(out) == test.labels).float().mean().item()
    assert acc >= 0.9, f"resynthesised held-out digits heard right {acc:.0%} of the time"
    real, learned = voicing_clarity(test.audio).mean(), voicing_clarity(out).mean()
    assert learned >= 0.9 * real, (learned, real)
