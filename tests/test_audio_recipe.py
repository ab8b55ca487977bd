"""recipes/audio_train.py end to end with a tiny network on a handful of clips: train, sample
WAVs, TensorBoard audio, export, resume, seeding and errors without tracebacks."""

import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open

import diffkit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import audio_train  # noqa: E402

# 6 FSDD clips of 1024 samples, a 4-layer DiffWave (the waveform route's cpu preset): seconds per run.
TINY = ["--max-clips", "6", "--length", "1024", "--residual-channels", "8", "--num-layers", "4",
        "--dilation-cycle", "2", "--batch-size", "4", "--sample-every", "2", "--save-every", "2",
        "--num-samples", "3", "--sample-steps", "6", "--no-progress", "--preset", "cpu", "--no-calibrate"]


def test_default_recipe_trains_samples_exports_and_resumes(tmp_path):
    out, export = tmp_path / "run", tmp_path / "export"
    assert audio_train.main(["--max-steps", "2", "--output-dir", str(out), *TINY]) == 0
    step_dir = out / "samples" / "step_000002"
    wavs = sorted(step_dir.glob("*.wav"))
    assert len(wavs) == 3 and (step_dir / "spectrograms.png").is_file()
    audio, rate = sf.read(str(wavs[0]))
    assert rate == 8000 and audio.shape == (1024,)
    EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator

    tags = set()
    for events in (out / "tensorboard").iterdir():
        acc = EventAccumulator(str(events), size_guidance={"audio": 0})
        acc.Reload()
        tags |= set(acc.Tags()["audio"])
    assert "samples/0" in tags
    # The same command with more steps resumes from the checkpoint rather than starting over.
    assert audio_train.main(["--max-steps", "4", "--output-dir", str(out), "--export", str(export), *TINY]) == 0
    ckpt = diffkit.checkpoint.load_checkpoint(export, modality="audio")
    assert ckpt.step == 4 and ckpt.optimizer_state is None
    assert ckpt.extra["seed"] == 0 and ckpt.extra["wall_time_s"] > 0 and ckpt.extra["hardware"]
    assert "audio_train.py" in ckpt.extra["recipe"] and "--max-steps 4" in ckpt.extra["recipe"]
    mc = ckpt.modality_config
    assert (mc["kind"], mc["sample_rate"], mc["length"], mc["class_names"][7]) == ("waveform", 8000, 1024, "7")
    assert ckpt.diffusion_config["time_input"] == "noise_level"
    with safe_open(str(export / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16


def test_same_seed_gives_the_same_initial_weights(tmp_path):
    s = audio_train.resolve_settings(audio_train.build_parser().parse_args(TINY), audio_train.build_parser())
    data = audio_train.load_data(s)
    nets = []
    for _ in range(2):
        diffkit.seed_everything(3)
        nets.append(audio_train.build(s, data)[0])
    diffkit.seed_everything(4)
    other = audio_train.build(s, data)[0]
    first, second, third = (n.state_dict() for n in (*nets, other))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], third[k]) for k in first)


@pytest.mark.parametrize("preset", ["vocoder", "mel"])
def test_spectrogram_route_presets_train(tmp_path, preset):
    args = ["--max-steps", "2", "--output-dir", str(tmp_path), *TINY, "--preset", preset]
    if preset == "mel":
        args += ["--mel-channels", "8", "--mel-blocks", "1"]
    assert audio_train.main(args) == 0
    ckpt = diffkit.checkpoint.load_checkpoint(tmp_path / "checkpoint", modality="audio")
    assert ckpt.modality_config["kind"] == preset
    assert ckpt.modality_config["mel"]["hop_length"] == 64
    assert len(list((tmp_path / "samples" / "step_000002").glob("*.wav"))) == 3


def test_vocoder_trains_on_aligned_crops_that_hold_sound():
    """Each crop's audio lies under its mel frames (hop 64), and crops start where there is sound."""
    seen = {}

    class Recorder:
        def loss(self, model, x, mel):
            seen.update(x=x, mel=mel)
            return x.sum() * 0

    frames, crop = 40, 8
    audio = torch.zeros(6, 1, frames * 64)
    mel = torch.full((6, 5, frames), -1.0)
    for b in range(6):  # a loud stretch of frames 20..27, tagged so alignment can be checked
        mel[b, :, 20:28] = 0.5
        audio[b, 0, 20 * 64: 28 * 64] = torch.arange(20 * 64, 28 * 64, dtype=torch.float32) + 1000 * b
    torch.manual_seed(0)
    audio_train.cropped_vocoder_loss(Recorder(), crop)(None, {"x": audio, "mel": mel})
    x, m = seen["x"], seen["mel"]
    assert x.shape == (6, 1, crop * 64) and m.shape == (6, 5, crop)
    for b in range(6):
        starts = [s for s in range(frames - crop + 1)
                  if torch.equal(m[b], mel[b, :, s: s + crop]) and torch.equal(x[b], audio[b, :, s * 64: (s + crop) * 64])]
        assert len(starts) == 1, f"clip {b}: the audio crop is not the one under its mel frames"
        assert 20 - crop < starts[0] < 28  # the crop holds some of the loud frames


def test_folder_data_resampled_with_labels_from_names(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i in range(4):
        sf.write(str(tmp_path / f"{'yes' if i % 2 else 'no'}_{i}.wav"),
                 (0.3 * rng.standard_normal(3000)).astype(np.float32), 16000, subtype="PCM_16")
    out = tmp_path / "run"
    assert audio_train.main(["--data", str(tmp_path), "--label-pattern", r"^([a-z]+)_", "--sample-rate", "8000",
                             "--max-steps", "1", "--output-dir", str(out), "--sample-every", "0",
                             *TINY[4:12], "--no-progress", "--preset", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "4 resampled to 8000 Hz" in text and "class conditioning" in text
    ckpt = diffkit.checkpoint.load_checkpoint(out / "checkpoint", modality="audio")
    assert ckpt.modality_config["class_names"] == ["no", "yes"]


def test_folder_without_labels_trains_an_unconditional_model(tmp_path, capsys):
    for i in range(3):
        sf.write(str(tmp_path / f"clip{i}.flac"), np.full(700, 0.1 * (i + 1), np.float32), 8000, subtype="PCM_16")
    out = tmp_path / "run"
    assert audio_train.main(["--data", str(tmp_path), "--length", "512", "--max-steps", "1", "--output-dir", str(out),
                             "--sample-every", "0", *TINY[4:12], "--no-progress", "--preset", "cpu"]) == 0
    assert "none conditioning" in capsys.readouterr().out
    ckpt = diffkit.checkpoint.load_checkpoint(out / "checkpoint", modality="audio")
    assert ckpt.model_config["kwargs"]["num_classes"] is None and ckpt.modality_config["class_names"] is None


def test_help_explains_itself(capsys):
    with pytest.raises(SystemExit):
        audio_train.main(["--help"])
    text = capsys.readouterr().out
    for needle in ("--preset", "torchrun", "--sample-rate", "--export", "spoken digits", "--data"):
        assert needle in text


@pytest.mark.parametrize("argv, message", [
    (["--data", "/no/such/folder"], "no such folder"),
    (["--sample-rate", "0"], "--sample-rate must be >= 1"),
    (["--peak", "2"], "--peak must lie in"),
    (["--beta-start", "0.5", "--beta-end", "0.1"], "--beta-start"),
    (["--model", "mel", "--length", "1000"], "multiple of the mel hop"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "nonsense"], "device"),
])
def test_bad_input_is_a_one_line_error_without_traceback(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        audio_train.main([*argv, "--output-dir", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "audio_train.py: error:" in err and message in err and "Traceback" not in err


def test_class_conditioning_without_labels_is_an_error(tmp_path, capsys):
    sf.write(str(tmp_path / "a.wav"), np.zeros(500, np.float32) + 0.1, 8000)
    with pytest.raises(SystemExit):
        audio_train.main(["--data", str(tmp_path), "--conditioning", "class", "--output-dir", str(tmp_path / "r")])
    assert "needs labels" in capsys.readouterr().err


def test_the_default_preset_is_the_spectrogram_route_on_a_schedule_that_ends_in_noise():
    parser = audio_train.build_parser()
    s = audio_train.resolve_settings(parser.parse_args([]), parser)
    assert (s["model"], s["schedule"], s["prediction"], s["output_dir"]) == ("mel", "flow", "x0", "runs/audio-mel")
    data = audio_train.load_data({**s, "max_clips": 4})
    net, model_config, diffusion, modality_config, conditioning, _ = audio_train.build(s, data)
    assert model_config["class"].endswith("MelDenoiser") and conditioning == "class"
    assert diffusion.schedule.alpha_bar[-1] < 1e-6  # the sampler's N(0, I) start is the schedule's end
    # DiffWave's six fast betas belong to its T=50 schedule; this model respaces its own grid.
    assert modality_config["fast_schedules"] == {} and modality_config["defaults"]["sampler"] == "dpm++2m"


def test_beta_flags_belong_to_the_linear_schedule(capsys, tmp_path):
    with pytest.raises(SystemExit):
        audio_train.main(["--beta-end", "0.02", "--output-dir", str(tmp_path)])
    assert "set the linear schedule" in capsys.readouterr().err


def test_an_output_dir_of_another_network_is_a_usage_error_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert audio_train.main(["--max-steps", "1", "--output-dir", str(out), *TINY]) == 0
    before = (out / "checkpoint" / "model.safetensors").read_bytes()
    wider = [*TINY[:TINY.index("--residual-channels") + 1], "16", *TINY[TINY.index("--residual-channels") + 2:]]
    with pytest.raises(SystemExit) as info:
        audio_train.main(["--max-steps", "2", "--output-dir", str(out), *wider])
    assert info.value.code == 2
    assert "do not fit this model" in capsys.readouterr().err
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before
