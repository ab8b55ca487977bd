"""Train an audio diffusion model with diffkit.

With no arguments this trains the default model, the one shipped as
modalities/audio/checkpoints/digits: a class-conditional diffusion model over log-mel frames that
says spoken digits (the Free Spoken Digit Dataset shipped in data/fsdd, 8 kHz; Griffin-Lim or a
vocoder turns the frames into sound), on the CPU in well under an hour. Presets and flags scale
it up or change what is trained:

    python recipes/audio_train.py                                  # spoken digits, mel route, CPU
    python recipes/audio_train.py --preset cpu                     # waveform DiffWave sized for a CPU
    python recipes/audio_train.py --preset gpu                     # DiffWave's size (30 x 64)
    python recipes/audio_train.py --data my_wavs/ --sample-rate 16000 --preset gpu
    python recipes/audio_train.py --data clips.csv                 # labels from a file,label CSV
    python recipes/audio_train.py --data my_wavs/ --label-pattern '^(?P<label>[a-z]+)_'
    python recipes/audio_train.py --preset ddsp --export modalities/audio/checkpoints/digits-vocoder
                                                                   # the shipped learned vocoder (CPU)
    python recipes/audio_train.py --preset ddsp-gpu                # the same vocoder, scaled for a GPU
    python recipes/audio_train.py --preset vocoder                 # mel-conditioned DiffWave
    torchrun --nproc_per_node 4 recipes/audio_train.py --preset gpu

Every run writes to --output-dir: checkpoint/ (resumed automatically when the same command runs
again), samples/step_XXXXXX/ (WAV files and a spectrogram PNG) every --sample-every steps, and
tensorboard/ logs (losses, and the samples as audio). --export DIR finally writes a compact copy
(EMA weights only, float16) that records the command, seed, hardware and wall time: the form of
the shipped checkpoints in modalities/audio/checkpoints. The export is then calibrated as
`diffkit calibrate DIR --batch 16 --data 0 --max-evals 15 --reference-steps 50 --no-statistics`
does (sampler grids for --calibrate-steps, for the default and the recorded sampler; a few
minutes on one thread); --no-calibrate skips it.

The waveform presets use DiffWave's diffusion (T=50, linear betas 1e-4..0.05, eps prediction), the
mel preset the flow-matching path (x_s = (1 - s) x0 + s eps, a 1000-point table, x0 prediction;
`--schedule cosine` gives the cosine-schedule diffusion it replaced); all are trained the
WaveGrad way: the network sees the continuous noise level sqrt(alpha_bar), drawn uniformly
between two neighbouring schedule points, so one model samples on any grid (6 steps: DiffWave's
fast schedule for DiffWave's diffusion; 50: the training grid; 1000: fractional times).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

import diffkit
from diffkit import Diffusion, NoiseSchedule, Trainer
from diffkit.runs import (
    add_calibrate_arguments,
    add_flow_argument,
    add_sampling_default_arguments,
    add_training_arguments,
    apply_flow,
    calibrate_export,
    export_checkpoint,
    is_main_process,
    sampling_defaults,
    seeded_generator,
    train_config,
    usage_errors,
)

from modalities.audio.data import DEFAULT_WINDOW, FSDD_SAMPLE_RATE, AudioDataset, load_audio_folder, load_fsdd
from modalities.audio.mel import MelConfig, griffin_lim, log_mel
from modalities.audio.modality import BIN_WIDTH_16BIT, FAST_BETAS, AudioSamples, sampling_grid, save_audio
from modalities.audio.model import DiffWave, MelDenoiser
from modalities.audio.vocoder import HarmonicVocoder, multi_resolution_stft_loss, pitch_track

PROG = "audio_train.py"

# Each preset is a complete, reproducible configuration; flags override single entries.
# mel (the default): the spectrogram route, a class-conditional 1-D U-Net over log-mel frames
# (1.51M parameters) turned into sound by Griffin-Lim (or a vocoder checkpoint). On one core of
# the development machine a step of 32 clips takes 0.39 s against 2.46 s for a step of 8 clips
# of the `cpu` waveform DiffWave: 25x more clips per second, which is what makes recognisable
# digits possible in well under an hour on a CPU (modalities/audio/README.md has the numbers).
# Log-mel frames sit far from zero (silence is -1), so the mel model uses a path that ends in
# pure noise rather than DiffWave's T=50 schedule, which keeps 53% of the signal at its last
# step: the flow-matching path x_s = (1 - s) x0 + s eps (a 1000-point table for the sampler
# grids). It predicts x0: the U-Net carries the 64 mel bins as 64 channels, and predicting v,
# eps or the flow velocity makes it copy the noise of every bin through that bottleneck.
# Measured (x0 error of held-out frames at t=400, raw weights): v after 2,000 steps 0.043, x0
# after 400 steps 0.0077; digits recognised by the classifier 13-23% (v, 2,000 steps) against
# 83% (x0, 400 steps); on the flow path, velocity 16-20% against x0 97-100% (2,000 steps).
# Flow with x0 prediction beat the cosine-schedule diffusion with x0 prediction at every call
# count, calibrated or not (benchmarks/results/flow_vs_diffusion_audio.md), hence the preset.
# cpu: 12 layers with a dilation cycle of 12 (dilations 1..2048) see 8,191 samples, the whole
# 1.02 s window, at the cost of 12 narrow layers (0.63M parameters): the waveform route on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "mel": dict(
        model="mel", data="fsdd", conditioning="auto", peak=0.9,
        mel_channels=64, mel_blocks=2,
        schedule="flow", num_timesteps=1000, prediction="x0",
        max_steps=4000, batch_size=32, lr=1e-3, warmup_steps=200, lr_decay="cosine", ema_decay=0.999,
        cond_drop_prob=0.1, sampler="dpm++2m", sample_steps=20, guidance_scale=1.5,
        sample_every=1000, save_every=500,
    ),
    "cpu": dict(
        model="waveform", data="fsdd", conditioning="auto", peak=0.9,
        residual_channels=32, num_layers=12, dilation_cycle=12,
        schedule="linear", num_timesteps=50, beta_start=1e-4, beta_end=0.05, prediction="eps",
        # EMA over ~200 steps: with 0.999 a 1,500-step run would still be 22% initial weights.
        max_steps=1500, batch_size=8, lr=5e-4, warmup_steps=100, lr_decay="none", ema_decay=0.995,
        cond_drop_prob=0.1, sampler="ddpm", sample_steps=50, guidance_scale=1.5,
        sample_every=500, save_every=250,
    ),
    "gpu": dict(
        model="waveform", data="fsdd", conditioning="auto", peak=0.9,
        residual_channels=64, num_layers=30, dilation_cycle=10,
        schedule="linear", num_timesteps=50, beta_start=1e-4, beta_end=0.05, prediction="eps",
        max_steps=200_000, batch_size=32, lr=2e-4, warmup_steps=1000, lr_decay="none", ema_decay=0.9999,
        cond_drop_prob=0.1, sampler="ddpm", sample_steps=50, guidance_scale=1.5,
        sample_every=5000, save_every=5000,
    ),
    # The spectrogram route's learned second stage (the shipped digits-vocoder): a harmonic-plus-
    # noise vocoder, a frame-rate network driving an oscillator bank and filtered noise
    # (modalities/audio/vocoder.py), trained on random 32-frame (2,048-sample) crops that hold sound.
    "ddsp": dict(
        model="ddsp", data="fsdd", conditioning="none", peak=0.9,
        ddsp_channels=128, num_harmonics=50, ddsp_layers=8,
        max_steps=10_000, batch_size=16, lr=2e-3, warmup_steps=100, lr_decay="cosine", ema_decay=0.999,
        cond_drop_prob=0.0, sample_every=2500, save_every=500, crop_frames=32, f0_weight=1.0,
    ),
    "ddsp-gpu": dict(
        model="ddsp", data="fsdd", conditioning="none", peak=0.9,
        ddsp_channels=256, num_harmonics=60, ddsp_layers=12,
        max_steps=50_000, batch_size=64, lr=1e-3, warmup_steps=500, lr_decay="cosine", ema_decay=0.999,
        cond_drop_prob=0.0, sample_every=5000, save_every=2500, crop_frames=64, f0_weight=1.0,
    ),
    # A DiffWave vocoder conditioned on log-mel frames (the diffusion alternative; see the README).
    "vocoder": dict(
        model="vocoder", data="fsdd", conditioning="none", peak=0.9,
        residual_channels=32, num_layers=12, dilation_cycle=6,
        schedule="linear", num_timesteps=50, beta_start=1e-4, beta_end=0.05, prediction="eps",
        max_steps=3000, batch_size=16, lr=5e-4, warmup_steps=100, lr_decay="none", ema_decay=0.999,
        cond_drop_prob=0.0, sampler="ddpm", sample_steps=6, guidance_scale=1.0,
        sample_every=1000, save_every=250, crop_frames=16,
    ),
}
DEFAULT_PRESET = "mel"
# The export's calibration, lighter than `diffkit calibrate`'s defaults: an audio sample holds
# thousands of values (64 x 64 log-mel frames, 8,192 waveform samples), so dpm-v3's per-element
# statistics would add megabytes to config.json; 16 noise draws and 15 sampler runs per grid fit
# the six grids of the shipped model in 3.5 minutes on one CPU thread, where the defaults (128
# draws, up to 200 runs) would cost roughly a hundred times more.
# No training clips: the audio modality measures no reverse variances (calibration_inputs).
EXPORT_CALIBRATION = dict(batch=16, data=0, max_evals=15, reference_steps=50, model_statistics=False)


class _Parser(argparse.ArgumentParser):
    """argparse, with ``fail`` for errors found after parsing (same format, no traceback)."""

    def fail(self, message: str):
        self.error(message)


def build_parser() -> _Parser:
    head, rest = __doc__.split("\n\n", 1)
    p = _Parser(prog=PROG, description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                   help=f"base configuration (default: {DEFAULT_PRESET}, the shipped spoken-digits model); "
                        "the flags below override it")
    p.add_argument("--model", choices=("waveform", "vocoder", "mel", "ddsp"),
                   help="waveform: DiffWave on samples; vocoder: DiffWave conditioned on log-mel frames; "
                        "mel: diffusion over log-mel frames; ddsp: harmonic-plus-noise vocoder (no diffusion)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="fsdd (the shipped spoken digits, train split), a folder of WAV/FLAC/OGG files, "
                                  "or a CSV with columns file,label")
    g.add_argument("--label-pattern", metavar="REGEX",
                   help="folder data: a regular expression on the file name (without extension) whose group "
                        "'label' (or first group) is the class, e.g. '^(?P<label>\\d)_'")
    g.add_argument("--num-classes", type=int, help="number of classes (default: from the labels)")
    g.add_argument("--conditioning", choices=("auto", "class", "none"),
                   help="class-conditional or not (auto: class when the data has labels)")
    g.add_argument("--sample-rate", type=int, help=f"train at this rate in Hz; files are resampled to it "
                                                   f"(default: {FSDD_SAMPLE_RATE})")
    g.add_argument("--length", type=int, help=f"samples per clip; longer clips are cut, shorter padded (default: "
                                              f"{DEFAULT_WINDOW} at 8 kHz, 1.02 s, scaled with --sample-rate)")
    g.add_argument("--peak", type=float, help="scale every clip to this peak in (0, 1]; 0 keeps the recorded levels")
    g.add_argument("--crop-frames", type=int,
                   help="vocoder, ddsp: train on random crops of this many mel frames (x 64 samples) that "
                        "hold sound, as DiffWave trains its vocoder; 0 = whole clips (preset vocoder: 16, ddsp: "
                        "32, or whole clips when they are shorter)")
    g.add_argument("--max-clips", type=int,
                   help="use only N clips, for quick trials (spread evenly over FSDD; the first N of a folder)")
    g = p.add_argument_group("network")
    g.add_argument("--residual-channels", type=int, help="DiffWave width (64 in the paper)")
    g.add_argument("--num-layers", type=int, help="DiffWave residual layers (30 in the paper)")
    g.add_argument("--dilation-cycle", type=int, help="dilations 1, 2, ... 2^(cycle-1), repeated (10 in the paper)")
    g.add_argument("--mel-channels", type=int, help="mel model: width of the 1-D U-Net")
    g.add_argument("--mel-blocks", type=int, help="mel model: residual blocks per level")
    g.add_argument("--ddsp-channels", type=int, help="ddsp vocoder: width of the frame-rate network")
    g.add_argument("--ddsp-layers", type=int, help="ddsp vocoder: residual dilated conv layers (dilations 1, 2, 4, 8 "
                                                   "repeated)")
    g.add_argument("--num-harmonics", type=int, help="ddsp vocoder: harmonics of f0 in the oscillator bank")
    g.add_argument("--f0-weight", type=float, help="ddsp vocoder: weight of the f0 loss (octaves, voiced frames)")
    g = p.add_argument_group("diffusion")
    add_flow_argument(g)
    g.add_argument("--schedule", choices=("linear", "cosine", "flow"),
                   help="noise schedule: linear betas (DiffWave's, with --beta-start/--beta-end), cosine, or "
                        "the flow-matching path (the mel preset's)")
    g.add_argument("--prediction", choices=("eps", "v", "x0", "flow"),
                   help="what the network predicts (DiffWave: eps)")
    g.add_argument("--num-timesteps", type=int, help="training schedule length T (50 in DiffWave)")
    g.add_argument("--beta-start", type=float, help="first beta of the linear schedule")
    g.add_argument("--beta-end", type=float, help="last beta of the linear schedule")
    g.add_argument("--cond-drop-prob", type=float, help="probability of dropping the label (classifier-free guidance)")
    g = add_training_arguments(p, run_dir="runs/audio-<preset>")
    g.add_argument("--num-samples", type=int, default=10, help="clips per sample round (default: 10)")
    g = add_sampling_default_arguments(p)
    g.add_argument("--export", metavar="DIR", help="after training, write a compact EMA-only float16 checkpoint here")
    add_calibrate_arguments(g)
    return p


def resolve_settings(args: argparse.Namespace, parser: _Parser) -> dict[str, Any]:
    """The preset with every flag that was given laid over it, checked."""
    s = dict(PRESETS[args.preset])
    for key, value in vars(args).items():
        if value is not None and key != "preset":
            s[key] = value
    apply_flow(s, args.prediction)
    s.setdefault("output_dir", f"runs/audio-{args.preset}")
    s.setdefault("sample_rate", FSDD_SAMPLE_RATE)
    if "length" not in s:
        # Keep the 1.02 s window at other rates, rounded to the 64-sample mel hop.
        s["length"] = max(64, round(DEFAULT_WINDOW * s["sample_rate"] / FSDD_SAMPLE_RATE / 64) * 64)
    positive = ("sample_rate", "length", "max_steps", "batch_size", "num_timesteps", "num_samples")
    for key in positive:
        if s.get(key) is not None and s[key] < 1:
            parser.fail(f"--{key.replace('_', '-')} must be >= 1, got {s[key]}")
    for key in ("residual_channels", "num_layers", "dilation_cycle", "mel_channels", "mel_blocks", "max_clips",
                "num_classes", "ddsp_channels", "ddsp_layers", "num_harmonics"):
        if s.get(key) is not None and s[key] < 1:
            parser.fail(f"--{key.replace('_', '-')} must be >= 1, got {s[key]}")
    if not 0 <= s["peak"] <= 1:
        parser.fail(f"--peak must lie in [0, 1] (0 = keep levels), got {s['peak']}")
    if (s["model"] == "ddsp") != (PRESETS[args.preset]["model"] == "ddsp"):
        parser.fail(f"--model {s['model']} and --preset {args.preset} do not go together: the harmonic vocoder "
                    "trains with --preset ddsp or ddsp-gpu, the diffusion models with the others")
    if s["model"] == "ddsp":
        diffusion_flags = [f for f in ("flow", "schedule", "prediction", "num_timesteps", "beta_start", "beta_end")
                           if getattr(args, f, None) not in (None, False)]
        if diffusion_flags:
            parser.fail(f"--model ddsp trains no diffusion; drop --{', --'.join(f.replace('_', '-') for f in diffusion_flags)}")
        s.setdefault("schedule", None)
    elif s["schedule"] != "linear" and (args.beta_start is not None or args.beta_end is not None):
        parser.fail(f"--beta-start and --beta-end set the linear schedule; this run uses --schedule {s['schedule']}")
    if s["schedule"] == "linear" and not 0 < s.get("beta_start", 0) <= s.get("beta_end", 0) < 1:
        parser.fail(f"need 0 < --beta-start <= --beta-end < 1, got {s['beta_start']} and {s['beta_end']}")
    if not 0 <= s["cond_drop_prob"] < 1:
        parser.fail(f"--cond-drop-prob must lie in [0, 1), got {s['cond_drop_prob']}")
    if s["model"] == "ddsp" and s["ddsp_channels"] % 8:
        parser.fail(f"--ddsp-channels must be a multiple of 8 (GroupNorm groups), got {s['ddsp_channels']}")
    if s["model"] == "ddsp" and s["f0_weight"] < 0:
        parser.fail(f"--f0-weight must be >= 0, got {s['f0_weight']}")
    if s["model"] in ("vocoder", "mel", "ddsp") and s["length"] % 64:
        parser.fail(f"--length must be a multiple of the mel hop (64) for --model {s['model']}, got {s['length']}")
    if s["model"] == "mel" and (s["length"] // 64) % 4:
        parser.fail("--model mel needs a number of mel frames divisible by 4: --length a multiple of 256")
    if s.get("crop_frames") and s["model"] not in ("vocoder", "ddsp"):
        parser.fail("--crop-frames is for --model vocoder or ddsp (their receptive field is local; the others see "
                    "whole clips)")
    if args.crop_frames is None and s.get("crop_frames", 0) > s["length"] // 64:
        s["crop_frames"] = 0  # the preset's crop is longer than these clips: train on whole clips
    if s.get("crop_frames") is not None and not 0 <= s["crop_frames"] <= s["length"] // 64:
        parser.fail(f"--crop-frames must lie in [0, {s['length'] // 64}] (the clip's frames), got {s['crop_frames']}")
    if s["model"] in ("vocoder", "ddsp") and s["conditioning"] == "class":
        parser.fail("the vocoder is conditioned on mel frames, not on classes: use --conditioning none")
    if s["data"] == "fsdd" and s.get("label_pattern"):
        parser.fail("--label-pattern is for folders of your own; FSDD's digits come from its file names")
    if s["data"] != "fsdd" and s.get("label_pattern") and str(s["data"]).lower().endswith(".csv"):
        parser.fail("--label-pattern is for folders; a CSV gives the labels itself")
    return s


def load_data(s: dict[str, Any]):
    """AudioData for the settings (the FSDD training split, a folder or a CSV)."""
    peak = s["peak"] or None
    spec = str(s["data"])
    if spec == "fsdd":
        data = load_fsdd("train", s["sample_rate"], s["length"], peak=peak, max_clips=s.get("max_clips"))
    else:
        path = Path(spec).expanduser()
        if path.suffix.lower() == ".csv":
            data = load_audio_folder(path.parent, s["sample_rate"], s["length"], labels_csv=path,
                                     num_classes=s.get("num_classes"), peak=peak)
        else:
            if not path.is_dir():
                raise ValueError(f"--data {spec}: no such folder (give fsdd, a folder of audio files or a CSV)")
            data = load_audio_folder(path, s["sample_rate"], s["length"], label_pattern=s.get("label_pattern"),
                                     num_classes=s.get("num_classes"), peak=peak)
        if s.get("max_clips"):
            data.audio = data.audio[: s["max_clips"]]
            data.labels = None if data.labels is None else data.labels[: s["max_clips"]]
    return data


def build(s: dict[str, Any], data):
    """Network, its config, the diffusion and the checkpoint's modality_config for the settings."""
    conditioning = s["conditioning"]
    if conditioning == "auto":
        conditioning = "class" if data.labels is not None and s["model"] not in ("vocoder", "ddsp") else "none"
    if conditioning == "class" and data.labels is None:
        raise ValueError("--conditioning class needs labels: use --label-pattern or a CSV for --data")
    num_classes = data.num_classes if conditioning == "class" else None
    mel_cfg = MelConfig(sample_rate=s["sample_rate"]) if s["model"] in ("vocoder", "mel", "ddsp") else None
    if s["model"] == "ddsp":
        return build_ddsp(s, data, mel_cfg)
    if s["model"] == "mel":
        kwargs = dict(n_mels=mel_cfg.n_mels, channels=s["mel_channels"], blocks=s["mel_blocks"],
                      num_classes=num_classes)
        net, cls = MelDenoiser(**kwargs), "modalities.audio.model.MelDenoiser"
    else:
        kwargs = dict(residual_channels=s["residual_channels"], num_layers=s["num_layers"],
                      dilation_cycle=s["dilation_cycle"], num_classes=num_classes,
                      n_mels=mel_cfg.n_mels if s["model"] == "vocoder" else None, upsample_factors=[8, 8])
        net, cls = DiffWave(**kwargs), "modalities.audio.model.DiffWave"
    if s["schedule"] == "linear":
        betas = torch.linspace(s["beta_start"], s["beta_end"], s["num_timesteps"], dtype=torch.float64)
        schedule = NoiseSchedule.from_betas(betas)
    else:
        schedule = NoiseSchedule.from_name(s["schedule"], s["num_timesteps"])
    diffusion = Diffusion(schedule, prediction=s["prediction"], time_input="noise_level",
                          time_sampling="noise_level", decoder="discretized", bin_width=BIN_WIDTH_16BIT)
    # DiffWave's six fast betas suit its own T=50 linear schedule; other schedules respace theirs.
    fast = {"6": list(FAST_BETAS)} if s["schedule"] == "linear" else {}
    modality_config = {
        "kind": s["model"],
        "sample_rate": s["sample_rate"],
        "length": s["length"],
        "class_names": data.class_names if num_classes else None,
        "data": str(s["data"]),
        "peak": s["peak"] or None,
        "mel": mel_cfg.to_dict() if mel_cfg else None,
        "bin_width": BIN_WIDTH_16BIT,
        "fast_schedules": fast,
        "defaults": sampling_defaults(s),
    }
    return net, {"class": cls, "kwargs": kwargs}, diffusion, modality_config, conditioning, mel_cfg


def build_ddsp(s: dict[str, Any], data, mel_cfg: MelConfig):
    """build() for the harmonic-plus-noise vocoder: no diffusion (its checkpoints record null)."""
    dilations = [(1, 2, 4, 8)[i % 4] for i in range(s["ddsp_layers"])]
    kwargs = dict(n_mels=mel_cfg.n_mels, sample_rate=mel_cfg.sample_rate, hop_length=mel_cfg.hop_length,
                  n_fft=mel_cfg.n_fft, f_min=mel_cfg.f_min, f_max=mel_cfg.f_max, channels=s["ddsp_channels"], dilations=dilations, num_harmonics=s["num_harmonics"])
    net = HarmonicVocoder(**kwargs)
    modality_config = {
        "kind": "ddsp-vocoder",
        "sample_rate": s["sample_rate"],
        "length": s["length"],
        "class_names": None,
        "data": str(s["data"]),
        "peak": s["peak"] or None,
        "mel": mel_cfg.to_dict(),
        "crop_frames": s.get("crop_frames") or 0,
        "f0_weight": s["f0_weight"],
    }
    return net, {"class": "modalities.audio.vocoder.HarmonicVocoder", "kwargs": kwargs}, None, modality_config, \
        "none", mel_cfg


def make_dataset(s, data, conditioning: str, mel_cfg: MelConfig | None):
    labels = data.labels if conditioning == "class" else None
    if s["model"] == "waveform":
        return AudioDataset(data.audio, labels)
    mel = torch.cat([log_mel(data.audio[i : i + 256], mel_cfg) for i in range(0, len(data), 256)])
    if s["model"] == "ddsp":
        tracks = [pitch_track(data.audio[i : i + 256], mel_cfg.sample_rate, mel_cfg.hop_length)
                  for i in range(0, len(data), 256)]
        f0 = torch.cat([t[0] for t in tracks])
        voiced = torch.cat([t[1] for t in tracks]).float()
        return _DDSPDataset(data.audio, mel, f0, voiced)
    if s["model"] == "vocoder":
        return _VocoderDataset(data.audio, mel)
    return _MelDataset(mel, labels)


def cropped_vocoder_loss(diffusion, crop_frames: int, hop: int = 64, floor: float = -0.3):
    """The vocoder's loss on one random crop of ``crop_frames`` mel frames per clip (DiffWave's way).

    The vocoder's receptive field is a few hundred samples, so whole 8,192-sample clips (mostly
    silence on FSDD) cost 8x the compute of 1,024-sample crops for little more to learn. Each
    crop starts at a frame drawn uniformly among those whose crop holds a frame louder than
    ``floor`` (about -58 dB on the [-1, 1] log-mel scale), so silence is not what it learns.
    Drawn from torch's global generator, which the Trainer reseeds every step: resumable and
    reproducible.
    """

    def loss_fn(model, batch):
        audio, mel = batch["x"], batch["mel"]
        loud = (mel.amax(dim=1) > floor).float()  # (B, frames)
        # A start s is useful when frames s .. s + crop - 1 hold a loud one.
        windows = torch.nn.functional.avg_pool1d(loud[:, None], crop_frames, stride=1)[:, 0] > 0
        weights = windows.float() + 1e-6  # silent clips: any start
        starts = torch.multinomial(weights, 1)[:, 0].to(audio.device)
        frame_index = starts[:, None] + torch.arange(crop_frames, device=audio.device)
        sample_index = starts[:, None] * hop + torch.arange(crop_frames * hop, device=audio.device)
        mel_crop = torch.gather(mel, 2, frame_index[:, None].expand(-1, mel.shape[1], -1))
        audio_crop = torch.gather(audio, 2, sample_index[:, None].expand(-1, audio.shape[1], -1))
        return diffusion.loss(model, audio_crop, mel=mel_crop)

    return loss_fn


def _loud_crop_starts(mel: torch.Tensor, crop_frames: int, floor: float = -0.3) -> torch.Tensor:
    """One random start frame per clip whose ``crop_frames`` frames hold a frame louder than
    ``floor`` (about -58 dB on the [-1, 1] log-mel scale); any start for silent clips. Drawn from
    torch's global generator, which the Trainer reseeds every step."""
    loud = (mel.amax(dim=1) > floor).float()  # (B, frames)
    windows = torch.nn.functional.avg_pool1d(loud[:, None], crop_frames, stride=1)[:, 0] > 0
    return torch.multinomial(windows.float() + 1e-6, 1)[:, 0].to(mel.device)


def ddsp_loss(crop_frames: int, mel_cfg: MelConfig, f0_weight: float = 1.0):
    """The harmonic vocoder's loss on one random loud crop per clip (whole clips for 0): the
    multi-resolution STFT loss of the synthesised crop (voiced frames at the pitch track's f0,
    teacher forcing) against the recording, plus ``f0_weight`` x the mean |log2 f0 - log2
    f0_track| (octaves) over the frames the pitch tracker calls voiced, plus 0.1 x the
    voicing's binary cross-entropy against the tracker. The noise of the filtered-noise branch
    comes from the global generator (reseeded per step)."""

    hop = mel_cfg.hop_length

    def loss_fn(model, batch):
        audio, mel, f0, voiced = batch["x"], batch["mel"], batch["f0"], batch["voiced"]
        if crop_frames and crop_frames < mel.shape[-1]:
            starts = _loud_crop_starts(mel, crop_frames)
            frame_index = starts[:, None] + torch.arange(crop_frames, device=mel.device)
            sample_index = starts[:, None] * hop + torch.arange(crop_frames * hop, device=mel.device)
            mel = torch.gather(mel, 2, frame_index[:, None].expand(-1, mel.shape[1], -1))
            audio = torch.gather(audio, 2, sample_index[:, None].expand(-1, audio.shape[1], -1))
            f0, voiced = torch.gather(f0, 1, frame_index), torch.gather(voiced, 1, frame_index)
        # Teacher forcing: the track's f0 on voiced frames; elsewhere the prediction, detached, so
        # that the STFT loss cannot move the f0 head to silence harmonics (it learns from the track).
        controls = model(mel, f0=f0 * voiced)
        pred = inner_net(model).synthesise(controls)
        stft = multi_resolution_stft_loss(pred, audio)
        log_f0 = torch.log2(controls["f0_predicted"])
        pitch = ((log_f0 - torch.log2(f0.clamp(min=1.0))).abs() * voiced).sum() / voiced.sum().clamp(min=1.0)
        voicing = torch.nn.functional.binary_cross_entropy_with_logits(controls["voicing"], voiced)
        return stft + f0_weight * pitch + 0.1 * voicing, {"stft": stft.detach(), "f0_octaves": pitch.detach()}

    return loss_fn


def inner_net(model):
    """The network inside a DistributedDataParallel wrapper (or the network itself)."""
    return model.module if hasattr(model, "module") else model


class _DDSPDataset(torch.utils.data.Dataset):
    """{"x": clip (1, T), "mel": (n_mels, frames), "f0": (frames,) Hz, "voiced": (frames,) 0/1}."""

    def __init__(self, audio, mel, f0, voiced):
        self.audio, self.mel, self.f0, self.voiced = audio, mel, f0, voiced

    def __len__(self):
        return len(self.audio)

    def __getitem__(self, i):
        return {"x": self.audio[i], "mel": self.mel[i], "f0": self.f0[i], "voiced": self.voiced[i]}


class _VocoderDataset(torch.utils.data.Dataset):
    """{"x": clip (1, T), "mel": its log-mel frames (n_mels, T // hop)}."""

    def __init__(self, audio, mel):
        self.audio, self.mel = audio, mel

    def __len__(self):
        return len(self.audio)

    def __getitem__(self, i):
        return {"x": self.audio[i], "mel": self.mel[i]}


class _MelDataset(torch.utils.data.Dataset):
    """{"x": log-mel frames (n_mels, frames), "labels": y}."""

    def __init__(self, mel, labels):
        self.mel, self.labels = mel, labels

    def __len__(self):
        return len(self.mel)

    def __getitem__(self, i):
        item = {"x": self.mel[i]}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def make_sample_fn(s, diffusion, dataset, conditioning: str, mel_cfg, class_names, fast_schedules=None):
    """Writes EMA samples as WAVs + a spectrogram PNG, and logs them to TensorBoard as audio."""
    out = Path(s["output_dir"]) / "samples"
    num = min(s["num_samples"], len(dataset))
    fixed: dict[str, torch.Tensor] = {}
    if conditioning == "class":
        fixed["labels"] = torch.arange(num) % len(class_names)
    if s["model"] in ("vocoder", "ddsp"):
        # real clips' frames, spread over the data (FSDD's first clips are all one digit)
        pick = torch.linspace(0, len(dataset) - 1, num).round().long().tolist() if s["model"] == "ddsp" \
            else range(num)
        fixed["mel"] = torch.stack([dataset[i]["mel"] for i in pick])

    def sample_fn(trainer: Trainer, step: int) -> None:
        dev = trainer.device
        net = trainer.ema_model
        g = seeded_generator(s["seed"])
        if s["model"] == "ddsp":
            x = net.vocode(fixed["mel"].to(dev), generator=torch.Generator(device=dev).manual_seed(s["seed"]))
            _write_samples(trainer, AudioSamples(x.float().cpu(), s["sample_rate"]), out, step, num)
            return
        cond = {k: v.to(dev) for k, v in fixed.items()}
        if "mel" in cond:
            cond = {"mel_features": net.upsample_mel(cond["mel"])}  # once, not at every step
        if s["model"] == "mel":
            shape = (num, mel_cfg.n_mels, s["length"] // mel_cfg.hop_length)
        else:
            shape = (num, 1, s["length"])
        scale = s["guidance_scale"] if conditioning == "class" else 1.0
        grid = sampling_grid(diffusion, s["sample_steps"], s["sampler"], fast_schedules)
        x = diffusion.sample(net, shape, sampler=s["sampler"], grid=grid, generator=g, device=dev,
                             guidance_scale=scale, wrappers=[diffkit.ClipX0(-1.0, 1.0)], **cond)
        x = x.float().cpu().clamp(-1, 1)
        if s["model"] == "mel":
            x = griffin_lim(x, mel_cfg, length=s["length"], n_iter=32)
        _write_samples(trainer, AudioSamples(x, s["sample_rate"], fixed.get("labels"), class_names), out, step, num)

    return sample_fn


def _write_samples(trainer: Trainer, samples: AudioSamples, out: Path, step: int, num: int) -> None:
    """WAVs + spectrogram PNG under out/step_N, and the clips as audio in TensorBoard."""
    save_audio(samples, out / f"step_{step:06d}")
    log = trainer.writer  # the Trainer's own TensorBoard writer (None without tensorboard)
    if log is not None:
        for i in range(min(num, 10)):
            log.add_audio(f"samples/{i}", samples.audio[i, 0], step, sample_rate=samples.sample_rate)
        log.flush()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    s = resolve_settings(args, parser)
    main_process = is_main_process()  # torchrun starts one process per GPU
    with usage_errors(parser):  # bad data or settings: a one-line error, not a traceback
        diffkit.resolve_device(s["device"])
        data = load_data(s)
        # Seeded right before the network is built: the same --seed gives the same weights.
        diffkit.seed_everything(s["seed"])
        net, model_config, diffusion, modality_config, conditioning, mel_cfg = build(s, data)
        dataset = make_dataset(s, data, conditioning, mel_cfg)
        config = train_config(s)
        cond_drop = s["cond_drop_prob"] if conditioning == "class" else 0.0
        crop = s.get("crop_frames") or 0
        if s["model"] == "ddsp":
            loss_fn = ddsp_loss(crop, mel_cfg, s["f0_weight"])
        else:
            loss_fn = cropped_vocoder_loss(diffusion, crop) if s["model"] == "vocoder" and crop else None
        trainer = Trainer(net, diffusion, dataset, config, modality="audio", model_config=model_config,
                          modality_config=modality_config, loss_fn=loss_fn,
                          sample_fn=make_sample_fn(s, diffusion, dataset, conditioning, mel_cfg,
                                                   modality_config["class_names"],
                                                   modality_config.get("fast_schedules")),
                          loss_kwargs={"cond_drop_prob": cond_drop} if cond_drop else None)
        # A --output-dir holding another kind of checkpoint, or one of another network, is a usage error.
        trainer.resume()
    if main_process:
        n_params = sum(p.numel() for p in net.parameters())
        resampled = f", {data.num_resampled} resampled to {s['sample_rate']} Hz" if data.num_resampled else ""
        print(f"preset {args.preset}: {len(data)} clips of {s['length']} samples at {s['sample_rate']} Hz "
              f"({data.num_skipped} unreadable or empty skipped{resampled}); {s['model']} model, "
              f"{conditioning} conditioning, {n_params / 1e6:.2f}M parameters; "
              + (repr(diffusion) if diffusion is not None else "no diffusion (a harmonic-plus-noise vocoder)"))
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    if main_process:
        print(f"trained to step {trainer.step} in {wall:.0f} s; checkpoint: {trainer.checkpoint_dir}")
    if args.export and main_process:
        path = export_checkpoint(trainer.checkpoint_dir, args.export, modality="audio",
                                 command=[f"recipes/{PROG}", *argv], seed=s["seed"], wall_time_s=wall,
                                 device=trainer.device, defaults=modality_config.get("defaults"),
                                 final_loss=trainer.history[-1]["loss"] if trainer.history else None,
                                 extra={"preset": args.preset})
        for file in Path(path).iterdir():
            if file.is_file():
                file.chmod(0o644)  # safetensors writes owner-only files; shipped files must be readable
        print(f"exported {path}")
        if modality_config["kind"] == "vocoder":
            print("a vocoder samples on its own fast schedules, given frames: it is not calibrated")
        elif modality_config["kind"] == "ddsp-vocoder":
            pass  # no diffusion: nothing to calibrate
        else:
            calibrate_export(path, args, trainer.device, **EXPORT_CALIBRATION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
