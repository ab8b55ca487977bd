"""The audio modality: sampling grids, generation from a checkpoint the recipe wrote, saving
WAVs and spectrograms, the CLI, bits per sample against a closed form, and errors."""

import math
import sys
from pathlib import Path
from unittest.mock import patch

import pytest
import soundfile as sf
import torch

import diffkit
from diffkit import NoiseSchedule
from modalities.audio import modality as audio_modality
from modalities.audio.modality import (
    BIN_WIDTH_16BIT,
    FAST_BETAS,
    AudioModality,
    AudioSamples,
    bits_per_sample,
    bits_per_sample_of,
    generate_audio,
    load_audio_model,
    sampling_grid,
    save_audio,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import audio_train  # noqa: E402

DIFFWAVE_BETAS = torch.linspace(1e-4, 0.05, 50, dtype=torch.float64)


def diffwave_diffusion(**kw):
    return diffkit.Diffusion(NoiseSchedule.from_betas(DIFFWAVE_BETAS), prediction="eps", time_input="noise_level",
                             time_sampling="noise_level", **kw)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 2-step class-conditional run of the recipe on 6 FSDD clips of 1024 samples."""
    out = tmp_path_factory.mktemp("audio-run")
    assert audio_train.main(["--max-clips", "6", "--length", "1024", "--residual-channels", "8",
                             "--num-layers", "4", "--dilation-cycle", "2", "--batch-size", "4",
                             "--max-steps", "2", "--sample-every", "0", "--no-progress", "--no-calibrate",
                             "--output-dir", str(out), "--export", str(out / "export"), "--preset", "cpu"]) == 0
    return out / "export"


@pytest.fixture
def audio_registered():
    # The entry point lives in pyproject.toml; registering here keeps the tests independent of
    # whether the package was reinstalled since it was added.
    from diffkit.registry import unregister_modality

    diffkit.register_modality("audio", AudioModality)
    yield
    unregister_modality("audio")  # other tests list the installed modalities


# ---------------------------------------------------------------------------------- grids
def test_six_steps_use_diffwaves_fast_schedule():
    diff = diffwave_diffusion()
    grid = sampling_grid(diff, 6)
    expected = torch.cumprod(1 - torch.tensor(FAST_BETAS, dtype=torch.float64), 0).sqrt().flip(0)
    assert torch.allclose(grid.alphas[:-1], expected)
    assert torch.allclose(grid.model_times("noise_level"), expected)


def test_other_step_counts_respace_or_interpolate_the_training_schedule():
    diff = diffwave_diffusion()
    assert len(sampling_grid(diff, 20)) == 20
    full = sampling_grid(diff, 50)
    assert torch.allclose(full.alphas[:-1], NoiseSchedule.from_betas(DIFFWAVE_BETAS).alpha_bar.sqrt().flip(0))
    fine = sampling_grid(diff, 1000)  # more points than training steps: fractional times
    assert len(fine) == 1000 and (fine.times.frac() != 0).any()
    assert torch.all(fine.alphas[1:] > fine.alphas[:-1])
    with pytest.raises(ValueError, match="positive integer"):
        sampling_grid(diff, 0)


def test_the_network_is_told_the_noise_levels_of_the_grid(checkpoint):
    model = load_audio_model(checkpoint, "cpu")
    seen = []
    hook = model.net.register_forward_pre_hook(lambda m, args: seen.append(args[1].double().clone()))
    try:
        generate_audio(checkpoint=checkpoint, num_samples=2, steps=6, seed=0, labels=[1, 2], guidance_scale=1.0,
                       device="cpu")
    finally:
        hook.remove()
    expected = torch.cumprod(1 - torch.tensor(FAST_BETAS, dtype=torch.float64), 0).sqrt().flip(0)
    assert torch.allclose(torch.stack([s[0] for s in seen]), expected, atol=1e-6)


def test_guidance_interval_halves_the_calls_outside_it(checkpoint):
    model = load_audio_model(checkpoint, "cpu")
    batches = []

    def count(interval):
        batches.clear()
        hook = model.net.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
        try:
            with patch("modalities.audio.modality.load_audio_model", return_value=model):
                generate_audio(checkpoint=checkpoint, num_samples=2, steps=6, seed=0, labels=[1, 2],
                               guidance_scale=3.0, guidance_interval=interval, device="cpu")
        finally:
            hook.remove()
        return list(batches)

    assert count((0, None)) == [4] * 6
    assert count((1e9, None)) == [2] * 6
    grid = sampling_grid(model.diffusion, 6)
    noisy = int(((grid.sigmas / grid.alphas)[:-1] >= 1.0).sum())
    assert 0 < noisy < 6 and count((1.0, None)) == [4] * noisy + [2] * (6 - noisy)


# ---------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("steps", [6, 20])
def test_generate_from_the_recipes_checkpoint(checkpoint, audio_registered, tmp_path, steps):
    out = diffkit.generate(modality="audio", checkpoint=checkpoint, labels=[7] * 3, num_samples=3, steps=steps,
                           seed=0, device="cpu")
    assert isinstance(out, AudioSamples) and out.audio.shape == (3, 1, 1024)
    assert out.audio.dtype == torch.float32 and out.audio.min() >= -1 and out.audio.max() <= 1
    assert out.sample_rate == 8000 and out.labels.tolist() == [7, 7, 7]
    files = AudioModality().save(out, tmp_path / "samples")
    wavs = [f for f in files if f.suffix == ".wav"]
    assert len(wavs) == 3 and wavs[0].name == "sample_000_7.wav"
    for f, clip in zip(wavs, out.audio):
        data, rate = sf.read(str(f), dtype="int16")
        assert rate == 8000 and sf.info(str(f)).subtype == "PCM_16"
        assert torch.allclose(torch.from_numpy(data / 32767.0).float(), clip[0], atol=2 / 32767)
    assert (tmp_path / "samples" / "spectrograms.png").is_file()


@pytest.mark.parametrize("sampler", diffkit.SAMPLERS)
def test_every_core_sampler_runs_on_the_fast_and_a_long_grid(checkpoint, sampler):
    for steps in (6, 60):
        out = generate_audio(checkpoint=checkpoint, num_samples=1, labels=2, sampler=sampler, steps=steps, seed=0,
                             device="cpu")
        assert out.audio.shape == (1, 1, 1024) and torch.isfinite(out.audio).all()


def test_same_seed_same_audio_and_unconditional_mode(checkpoint):
    a = generate_audio(checkpoint=checkpoint, num_samples=2, steps=6, seed=5, device="cpu")
    b = generate_audio(checkpoint=checkpoint, num_samples=2, steps=6, seed=5, device="cpu")
    assert torch.equal(a.audio, b.audio) and a.labels is None
    c = generate_audio(checkpoint=checkpoint, num_samples=2, steps=6, seed=6, device="cpu")
    assert not torch.equal(a.audio, c.audio)
    # Without num_samples, one clip per label.
    assert AudioModality().generate(checkpoint=checkpoint, labels=[4] * 3, steps=6, device="cpu").audio.shape[0] == 3
    d = generate_audio(checkpoint=checkpoint, num_samples=3, steps=6, seed=5, device="cpu", batch_size=2)
    assert d.audio.shape == (3, 1, 1024)  # batches of 2 + 1 are put back together in order


def test_cli_writes_wavs_and_a_spectrogram(checkpoint, audio_registered, tmp_path, capsys):
    from diffkit.cli import main

    out = tmp_path / "samples"
    assert main(["generate", "audio", "--checkpoint", str(checkpoint), "--label", "7", "--num-samples", "2",
                 "--steps", "6", "--seed", "0", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sample_000_7.wav", "sample_001_7.wav", "spectrograms.png"]
    assert "wrote 2 audio sample(s)" in capsys.readouterr().out


def test_cli_without_a_shipped_checkpoint_says_how_to_train_one(audio_registered, tmp_path, monkeypatch, capsys):
    from diffkit.cli import main

    monkeypatch.setattr(audio_modality, "DEFAULT_CHECKPOINT", tmp_path / "nothing-shipped")
    assert main(["generate", "audio", "--label", "7", "--out", str(tmp_path / "s")]) != 0
    err = capsys.readouterr().err
    assert "diffkit: error:" in err and "python recipes/audio_train.py" in err and "Traceback" not in err


def test_generate_errors_say_what_to_fix(checkpoint, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.9"):
        generate_audio(checkpoint=checkpoint, num_samples=2, labels=[3, 10], device="cpu")
    with pytest.raises(ValueError, match="2 labels for 3 samples"):
        generate_audio(checkpoint=checkpoint, num_samples=3, labels=[3, 4], device="cpu")
    with pytest.raises(ValueError, match="guidance_scale needs labels"):
        generate_audio(checkpoint=checkpoint, num_samples=1, guidance_scale=2.0, device="cpu")
    with pytest.raises(ValueError, match="guidance_interval limits classifier-free guidance"):
        generate_audio(checkpoint=checkpoint, num_samples=1, guidance_interval=(0, None), device="cpu")
    with pytest.raises(ValueError, match="guidance_interval needs 0 <= low < high"):
        generate_audio(checkpoint=checkpoint, num_samples=1, labels=[1], guidance_interval=(1, 1), device="cpu")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        generate_audio(checkpoint=checkpoint, num_samples=1, steps=0, device="cpu")
    with pytest.raises(ValueError, match="route must be one of"):
        generate_audio(checkpoint=checkpoint, num_samples=1, route="midi", device="cpu")
    with pytest.raises(ValueError, match="is a waveform model; route='mel'"):
        generate_audio(checkpoint=checkpoint, num_samples=1, route="mel", device="cpu")
    with pytest.raises(ValueError, match="mel= is for vocoder"):
        generate_audio(checkpoint=checkpoint, num_samples=1, mel=torch.zeros(1, 64, 16), device="cpu")
    with pytest.raises(ValueError, match="give a folder"):
        save_audio(AudioSamples(torch.zeros(1, 1, 8), 8000), tmp_path / "x.wav")
    monkeypatch.setattr(audio_modality, "DEFAULT_CHECKPOINT", tmp_path / "nothing-shipped")
    with pytest.raises(ValueError, match="recipes/audio_train.py"):
        generate_audio(num_samples=1, device="cpu")


def test_vocoder_checkpoint_takes_mel_frames_once_upsampled(tmp_path):
    out = tmp_path / "voc"
    assert audio_train.main(["--preset", "vocoder", "--max-clips", "4", "--length", "512", "--residual-channels",
                             "8", "--num-layers", "2", "--batch-size", "4", "--max-steps", "1", "--sample-every",
                             "0", "--no-progress", "--output-dir", str(out)]) == 0
    model = load_audio_model(out / "checkpoint", "cpu")
    calls = []
    model.net.register_forward_hook(lambda m, args, kwargs, o: calls.append(sorted(kwargs)), with_kwargs=True)
    ups = []
    original = model.net.upsample_mel
    model.net.upsample_mel = lambda mel: ups.append(1) or original(mel)
    try:
        res = generate_audio(checkpoint=out / "checkpoint", num_samples=2, mel=torch.zeros(2, 64, 8), steps=6,
                             seed=0, device="cpu")
    finally:
        del model.net.upsample_mel
    assert res.audio.shape == (2, 1, 512)
    assert len(ups) == 1 and len(calls) == 6 and all("mel_features" in c for c in calls)
    with pytest.raises(ValueError, match="mel has 7 frames"):
        generate_audio(checkpoint=out / "checkpoint", num_samples=1, mel=torch.zeros(1, 64, 7), device="cpu")
    with pytest.raises(ValueError, match="pass mel="):
        generate_audio(checkpoint=out / "checkpoint", num_samples=1, device="cpu")

    # Likelihood: a vocoder scores clips given their own log-mel frames.
    from modalities.audio.data import load_fsdd
    from modalities.audio.mel import log_mel

    clips = load_fsdd("test", length=512, max_clips=2).audio
    seen = []
    hook = model.net.register_forward_hook(lambda m, args, kwargs, o: seen.append(kwargs["mel_features"]),
                                           with_kwargs=True)
    try:
        bits = bits_per_sample(clips, checkpoint=out / "checkpoint", steps=5, device="cpu")
    finally:
        hook.remove()
    with torch.no_grad():
        own = model.net.upsample_mel(log_mel(clips, model.mel_config))
    assert len(seen) == 5 and all(torch.equal(f, own) for f in seen)  # every call sees the clips' own frames
    direct = bits_per_sample_of(model.net, model.diffusion, clips, steps=5,
                                generator=torch.Generator().manual_seed(0), mel_features=own)
    assert bits.shape == (2,) and torch.isfinite(bits).all() and torch.allclose(bits, direct)
    with pytest.raises(ValueError, match="not on labels"):
        bits_per_sample(clips, checkpoint=out / "checkpoint", labels=[1, 2], device="cpu")


# ---------------------------------------------------------------------------------- likelihood
class OracleDenoiser(torch.nn.Module):
    """The exact model of data that is one known clip x0 (a Gaussian of vanishing width):
    given x_t and the noise level t = alpha, eps = (x_t - alpha x0) / sqrt(1 - alpha^2)."""

    def __init__(self, x0):
        super().__init__()
        self.register_buffer("x0", x0)

    def forward(self, x, t, **_):
        alpha = t.reshape(-1, 1, 1).to(x.dtype)
        return (x - alpha * self.x0) / (1 - alpha**2).sqrt()


def test_bits_per_sample_of_quantised_audio_under_the_exact_model_is_its_closed_form():
    g = torch.Generator().manual_seed(0)
    # 16-bit values k * 2/65535 - 1, away from the two outermost (half-infinite) bins.
    k = torch.randint(8000, 57000, (3, 1, 64), generator=g)
    x0 = (k.double() * BIN_WIDTH_16BIT - 1.0)
    diff = diffwave_diffusion()
    bits, terms = diff.nll(OracleDenoiser(x0), x0, decoder="discretized", bin_width=BIN_WIDTH_16BIT,
                           generator=g, return_terms=True)
    via_modality = bits_per_sample_of(OracleDenoiser(x0), diff, x0, generator=torch.Generator().manual_seed(0))
    # Closed form. The model is exact, so every KL term vanishes. The prior is
    # KL(N(a_T x0, s_T^2) || N(0, 1)); the decoder integrates N(x0, beta-tilde_1) over x0's bin,
    # beta-tilde_1 = beta_1 (1 - abar_0) / (1 - abar_1) standing in for the zero variance of the
    # last step (Improved DDPM's convention).
    abar = torch.cumprod(1 - DIFFWAVE_BETAS, 0)
    a2, s2 = abar[-1], 1 - abar[-1]
    prior = (0.5 * (a2 * x0**2 + s2 - 1 - torch.log(s2))).mean(dim=(1, 2)) / math.log(2)
    tilde = DIFFWAVE_BETAS[1] * (1 - abar[0]) / (1 - abar[1])
    half = BIN_WIDTH_16BIT / 2 / tilde.sqrt()
    decoder = -math.log2(math.erf(half / math.sqrt(2)))  # P(bin) = Phi(h/s) - Phi(-h/s)
    assert terms["kl"].abs().max() < 1e-7  # zero up to rounding (the decoder term is ~9 bits)
    assert torch.allclose(terms["prior"], prior, rtol=1e-9)
    assert torch.allclose(terms["decoder"], torch.full((3,), decoder, dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(bits, prior + decoder, rtol=1e-6)
    assert torch.allclose(via_modality, bits, rtol=1e-6)
    # Counting only the first 16 samples of each clip: the prior term averages over those.
    mask = torch.zeros_like(x0, dtype=torch.bool)
    mask[..., :16] = True
    masked = bits_per_sample_of(OracleDenoiser(x0), diff, x0, mask=mask, generator=torch.Generator().manual_seed(0))
    prior16 = (0.5 * (a2 * x0[..., :16] ** 2 + s2 - 1 - torch.log(s2))).mean(dim=(1, 2)) / math.log(2)
    assert torch.allclose(masked, prior16 + decoder, rtol=1e-6)


def test_bits_per_sample_from_a_checkpoint(checkpoint):
    from modalities.audio.data import load_fsdd

    clips = load_fsdd("test", length=1024, max_clips=2).audio
    bits = bits_per_sample(clips, checkpoint=checkpoint, steps=10, device="cpu")
    assert bits.shape == (2,) and torch.isfinite(bits).all() and (bits > 0).all()
    again = bits_per_sample(clips, checkpoint=checkpoint, steps=10, device="cpu")
    assert torch.equal(bits, again)  # seeded noise: the same estimate every call
    real = bits_per_sample(clips, checkpoint=checkpoint, steps=10, device="cpu", lengths=[300, 1024])
    assert real[1] == bits[1] and real[0] != bits[0]  # only the padded clip changes
    with pytest.raises(ValueError, match="2 clips"):
        bits_per_sample(clips, checkpoint=checkpoint, device="cpu", lengths=[300])
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        bits_per_sample(torch.full_like(clips, 1.5), checkpoint=checkpoint, device="cpu")
    with pytest.raises(ValueError, match="mono audio"):
        bits_per_sample(torch.zeros(2, 2, 1024), checkpoint=checkpoint, device="cpu")


def test_mel_route_through_griffin_lim_or_a_vocoder(tmp_path, monkeypatch):
    common = ["--max-clips", "4", "--length", "512", "--batch-size", "4", "--max-steps", "1", "--sample-every", "0",
              "--no-progress"]
    assert audio_train.main(["--preset", "mel", "--mel-channels", "8", "--mel-blocks", "1", *common,
                             "--output-dir", str(tmp_path / "mel")]) == 0
    assert audio_train.main(["--preset", "vocoder", "--residual-channels", "8", "--num-layers", "2", *common,
                             "--output-dir", str(tmp_path / "voc")]) == 0
    mel_ckpt, voc_ckpt = tmp_path / "mel" / "checkpoint", tmp_path / "voc" / "checkpoint"
    # Griffin-Lim, watched: it records the frames it is given (the mel model's samples).
    frames_seen, griffin_lim = [], audio_modality.griffin_lim

    def watched_griffin_lim(frames, *args, **kwargs):
        frames_seen.append(frames.clone())
        return griffin_lim(frames, *args, **kwargs)

    monkeypatch.setattr(audio_modality, "griffin_lim", watched_griffin_lim)
    audio = {}
    for vocoder in ("griffin-lim", voc_ckpt):
        out = generate_audio(checkpoint=mel_ckpt, route="mel", vocoder=vocoder, num_samples=2, labels=[3, 4],
                             steps=6, seed=0, device="cpu")
        assert out.audio.shape == (2, 1, 512) and out.audio.abs().max() <= 1 and out.sample_rate == 8000
        audio[str(vocoder)] = out.audio
    # Griffin-Lim ran once (for its own route only), and each route returns its vocoder's output
    # for the same frames (same seed): the vocoder checkpoint's, not Griffin-Lim's.
    cfg = load_audio_model(mel_ckpt, "cpu").mel_config
    assert len(frames_seen) == 1 and frames_seen[0].shape == (2, cfg.n_mels, 512 // cfg.hop_length)
    torch.testing.assert_close(audio["griffin-lim"], griffin_lim(frames_seen[0], cfg, length=512, generator_seed=0))
    vocoded = audio_modality.vocode(frames_seen[0], checkpoint=voc_ckpt, seed=0, device="cpu").audio
    torch.testing.assert_close(audio[str(voc_ckpt)], vocoded)
    assert (audio[str(voc_ckpt)] - audio["griffin-lim"]).abs().mean() > 1e-3
    # Without route= a checkpoint samples its own route; the waveform route refuses a mel model.
    assert generate_audio(checkpoint=mel_ckpt, num_samples=1, steps=2, device="cpu").audio.shape == (1, 1, 512)
    with pytest.raises(ValueError, match="is a mel model"):
        generate_audio(checkpoint=mel_ckpt, route="waveform", num_samples=1, device="cpu")
    with pytest.raises(ValueError, match="not a vocoder"):
        generate_audio(checkpoint=mel_ckpt, route="mel", vocoder=mel_ckpt, num_samples=1, device="cpu")


def test_spectrogram_png_puts_a_tone_at_its_frequency_with_low_frequencies_at_the_bottom():
    from modalities.audio.modality import spectrogram_image

    rate, n_fft, padding = 8000, 256, 4
    t = torch.arange(4096) / rate
    tones = torch.stack([0.5 * torch.sin(2 * math.pi * f * t) for f in (500.0, 3000.0)])[:, None]
    image = spectrogram_image(tones, rate, columns=2, n_fft=n_fft, padding=padding)
    bins = n_fft // 2 + 1
    assert image.shape[0] == bins + 2 * padding and image.dtype.name == "uint8"
    for i, freq in enumerate((500.0, 3000.0)):
        left = padding + i * (4096 // 64 + 1 + padding)
        panel = image[padding : padding + bins, left : left + 4096 // 64 + 1].astype(float).sum(axis=(1, 2))
        expected_row = (bins - 1) - round(freq / (rate / 2) * (bins - 1))
        assert abs(int(panel.argmax()) - expected_row) <= 1
