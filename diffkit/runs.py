"""What every training recipe and every ``generate`` needs besides the model: records of where and
how a run happened, compact shipping checkpoints, seeded generators, sampling defaults, and
command-line errors without tracebacks. Written once here so each recipe keeps only what is
particular to its modality.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import numbers
import os
import platform
import shlex
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .guidance import check_guidance_interval
from .sampling import SAMPLERS
from .trainer import TrainConfig

__all__ = [
    "add_training_arguments",
    "add_sampling_default_arguments",
    "sampling_defaults",
    "add_guidance_interval_argument",
    "train_config",
    "positive_int",
    "hardware_summary",
    "export_checkpoint",
    "seeded_generator",
    "resolve_steps",
    "usage_errors",
    "is_main_process",
]

# Errors that mean "the input is wrong" rather than "the code is wrong": a recipe reports them
# as usage errors, not tracebacks.
USAGE_ERRORS = (ValueError, FileNotFoundError, CheckpointError)


def hardware_summary() -> str:
    """CPU model and core count, torch version and threads (and the GPU, when there is one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def is_main_process() -> bool:
    """True outside torchrun and on its rank 0: the process that prints, exports and writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def export_checkpoint(
    run_checkpoint: str | os.PathLike,
    path: str | os.PathLike,
    *,
    modality: str,
    command: Sequence[str],
    seed: int,
    wall_time_s: float,
    device: str | torch.device | None = None,
    final_loss: Optional[float] = None,
    side_files: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
    defaults: Optional[Mapping[str, Any]] = None,
) -> Path:
    """A compact shipping copy of a run's checkpoint: EMA weights in float16, no optimizer state.

    The model, diffusion, modality and training configs are copied from the run; ``command``
    (e.g. ``["recipes/audio_train.py", *argv]``), ``seed``, the hardware, device and wall time
    (of this command) are recorded in ``extra`` so anyone can rerun it, with ``train_seconds``,
    the training time of every run that led to the weights (resumed runs included; None when
    the run predates that record), and ``segments``, the record of each of those runs (steps,
    command, weight-affecting settings, time, last loss; see :class:`~diffkit.trainer.Trainer`).
    ``final_loss`` None takes the last run's. Side files of the run (a tokenizer, normaliser
    statistics) are copied along, plus any in ``side_files``. ``defaults`` (the exporting command's sampling
    defaults) replace ``modality_config["defaults"]`` of the run: exporting a finished run with
    new sampling flags trains nothing, so the run's own config still holds its old ones.
    """
    ckpt = load_checkpoint(run_checkpoint, modality=modality)
    segments = ckpt.extra.get("segments")
    if final_loss is None and isinstance(segments, list) and segments and isinstance(segments[-1], dict):
        final_loss = segments[-1].get("final_loss")  # an export of a finished run trains nothing itself
    state = ckpt.ema_state if ckpt.ema_state is not None else ckpt.model_state
    weights = {key: value.half() if value.is_floating_point() else value for key, value in state.items()}
    record = {
        "recipe": "python " + shlex.join([str(part) for part in command]),
        "seed": seed,
        "hardware": hardware_summary(),
        "device": str(device) if device is not None else None,
        "wall_time_s": round(float(wall_time_s), 1),
        "train_seconds": _rounded(ckpt.extra.get("train_seconds")),
        "final_loss": final_loss,
        "segments": segments,
        "weights": "EMA, float16" if ckpt.ema_state is not None else "float16",
        **dict(extra or {}),
    }
    own_files = {"config.json", "model.safetensors", "ema.safetensors", "optimizer.safetensors"}
    carried = {name: Path(ckpt.path) / name for name in (ckpt.config.get("checksums") or {}) if name not in own_files}
    carried.update(side_files or {})
    described = ("modality", "model", "diffusion", "modality_config", "train")
    config = {key: ckpt.config.get(key) for key in described}
    if defaults is not None:
        config["modality_config"] = {**(config["modality_config"] or {}), "defaults": dict(defaults)}
    return save_checkpoint(path, model=weights, step=ckpt.step, extra=record, config=config,
                           side_files=carried or None)


def _rounded(seconds: Any) -> Optional[float]:
    return round(float(seconds), 1) if isinstance(seconds, (int, float)) else None


def seeded_generator(seed: Optional[int]) -> torch.Generator:
    """A CPU generator: seeded when ``seed`` is given (same seed, same samples), fresh entropy otherwise."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return generator


def resolve_steps(steps: Optional[int], default: int) -> int:
    """``steps`` as given, or ``default`` when None; anything but a positive integer is a ValueError.

    (``steps or default`` would silently turn 0 into the default.)
    """
    if steps is None:
        return int(default)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be a whole number >= 1 (or None for the default {default}), got {steps!r}")
    return int(steps)


LR_DECAYS = ("none", "cosine", "linear")

# The TrainConfig fields a recipe's flags set (``add_training_arguments``); the rest keep their defaults.
_TRAINING_FLAGS = ("max_steps", "batch_size", "lr", "warmup_steps", "lr_decay", "ema_decay", "ema_warmup", "seed",
                   "output_dir", "save_every", "sample_every", "device", "num_workers")


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1, or a message saying what was wrong."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_training_arguments(parser: argparse.ArgumentParser, *, run_dir: str, samples: bool = True,
                           data_workers: bool = True):
    """Add the "training" flags every recipe shares and return the group, for the recipe's own.

    All default to None (the preset decides) except ``--seed`` (0), ``--device`` (auto) and
    ``--num-workers`` (0);
    ``run_dir`` is the default run directory named in the help. ``samples`` adds
    ``--sample-every``, ``data_workers`` adds ``--num-workers``. :func:`train_config` turns the
    resolved values into a :class:`~diffkit.trainer.TrainConfig`.
    """
    g = parser.add_argument_group("training")
    g.add_argument("--max-steps", type=positive_int, help="optimizer steps")
    g.add_argument("--batch-size", type=positive_int, help="batch size per process")
    g.add_argument("--lr", type=float, help="AdamW learning rate")
    g.add_argument("--warmup-steps", type=int, help="linear LR warm-up steps")
    g.add_argument("--lr-decay", choices=LR_DECAYS, help="LR decay after the warm-up")
    g.add_argument("--ema-decay", type=float, help="EMA decay of the sampled weights")
    g.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="warm the EMA up: the k-th update uses min(ema_decay, (1 + k) / (10 + k)), so a short run's "
                        "EMA does not keep the initial weights (default: on; --no-ema-warmup averages with "
                        "ema_decay from the first step)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of everything: data order, initial weights, noise (default: 0)")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N (default: auto)")
    g.add_argument("--output-dir", help=f"run directory (default: {run_dir})")
    if samples:
        g.add_argument("--sample-every", type=int, help="write samples every N steps (0: never)")
    g.add_argument("--save-every", type=int, help="write the checkpoint every N steps")
    if data_workers:
        g.add_argument("--num-workers", type=int, default=0, help="data loader workers (default: 0)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return g


def add_sampling_default_arguments(parser: argparse.ArgumentParser, *, guidance: str = "default guidance scale"):
    """Add the "output" flags that set the sampling defaults recorded with the model; returns the group."""
    g = parser.add_argument_group("output")
    g.add_argument("--sampler", choices=SAMPLERS, help="default sampler recorded with the model")
    g.add_argument("--sample-steps", type=positive_int, help="default sampling steps recorded with the model")
    g.add_argument("--guidance-scale", type=float, help=f"{guidance} recorded with the model")
    add_guidance_interval_argument(g, "recorded with the model; default: the preset's, else every step")
    return g


def add_flow_argument(group) -> None:
    """``--flow``: train a flow-matching model instead of the preset's diffusion (see :func:`apply_flow`)."""
    group.add_argument("--flow", action="store_true", default=None,
                       help="train a flow-matching (rectified-flow) model: the path x_s = (1 - s) x0 + s eps, "
                            "s in [0, 1], with the network predicting the velocity eps - x0 (the same as "
                            "--schedule flow --prediction flow); with --prediction given too, the network "
                            "predicts that instead (e.g. --flow --prediction x0). Sampling, calibration and "
                            "likelihoods work as for diffusion")


def apply_flow(settings: dict, prediction: str | None = None) -> dict:
    """``settings`` with the flow path's schedule when ``settings["flow"]`` is set.

    The network then predicts the velocity, unless ``prediction`` (the command line's own
    ``--prediction``, not the preset's) names another target for the same path.
    """
    if settings.get("flow"):
        settings.update(schedule="flow", prediction=prediction or "flow")
    return settings


def flow_time_scale(schedule: str) -> dict[str, float]:
    """Network keyword arguments for a schedule: ``time_scale=1000`` on the flow path, whose times
    s lie in [0, 1], so that they spread over the time embedding's sinusoids as a table's integer
    steps do; nothing for a table's steps (the networks' default scale of 1)."""
    return {"time_scale": 1000.0} if schedule == "flow" else {}


def add_calibrate_arguments(group) -> None:
    """``--no-calibrate`` and ``--calibrate-steps``: what a recipe's ``--export`` calibrates."""
    group.add_argument("--no-calibrate", action="store_true",
                       help="do not calibrate the --export checkpoint. By default it is calibrated as `diffkit "
                            "calibrate` does: sampler grids fitted for --calibrate-steps (for the default dpm-v3 "
                            "sampler and for the recorded --sampler, when it is deterministic), the model's "
                            "statistics and its reverse variances, written into the exported config.json")
    group.add_argument("--calibrate-steps", type=positive_int, nargs="+", default=[5, 10, 20], metavar="K",
                       help="step counts the exported checkpoint's sampler grids are fitted for (default: 5 10 20)")


def calibrate_export(path: str | os.PathLike, args, device="cpu", **options: Any) -> None:
    """Calibrate an exported checkpoint unless ``args.no_calibrate`` (see :func:`add_calibrate_arguments`)."""
    if args.no_calibrate:
        print(f"{path} is not calibrated (--no-calibrate); run `diffkit calibrate {path}` to do it later")
        return
    from .calibration import calibrate_checkpoint
    from .checkpoint import read_config

    if not read_config(path).get("diffusion"):
        return  # a classifier or value network: nothing to calibrate

    started = time.time()
    calibrated = calibrate_checkpoint(path, steps=args.calibrate_steps, device=device, progress=True, **options)
    print(f"calibrated {path} for {' '.join(map(str, args.calibrate_steps))} steps "
          f"({', '.join(calibrated.calibration)}) in {time.time() - started:.0f} s")


def add_guidance_interval_argument(group, default: str = "default: the checkpoint's") -> None:
    """``--guidance-interval LOW HIGH``, for recipes (recorded) and ``diffkit generate`` alike."""
    group.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"),
                       help="apply classifier-free guidance only where the noise-to-signal ratio sigma/alpha lies "
                            "in [LOW, HIGH] (HIGH may be inf; 0 inf is every step); elsewhere one network call "
                            f"instead of two ({default})")


def sampling_defaults(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling defaults a recipe records with its model, from the flags of
    :func:`add_sampling_default_arguments` laid over its preset: sampler, steps, guidance scale
    and guidance interval, each checked (a preset or a caller may bypass the flags' own checks,
    and a bad default would only fail later, in every ``generate``); an open end of the interval
    is null, as JSON has no infinity."""
    sampler, steps, scale = settings["sampler"], settings["sample_steps"], settings["guidance_scale"]
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler: unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--sample-steps: must be a whole number >= 1, got {steps!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not math.isfinite(scale)):
        raise ValueError(f"--guidance-scale: must be a finite number, got {scale!r}")
    try:
        interval = check_guidance_interval(settings.get("guidance_interval"))
    except ValueError as error:
        raise ValueError(f"--guidance-interval: {error}") from None
    recorded = None if interval is None else [interval[0], None if math.isinf(interval[1]) else interval[1]]
    return {"sampler": sampler, "steps": steps, "guidance_scale": scale, "guidance_interval": recorded}


def train_config(settings: Mapping[str, Any], **overrides: Any) -> TrainConfig:
    """A :class:`~diffkit.trainer.TrainConfig` from a recipe's resolved settings (its preset with
    the flags of :func:`add_training_arguments` laid over it): the shared fields that are set,
    ``progress`` from ``no_progress``, then ``overrides``."""
    fields = {key: settings[key] for key in _TRAINING_FLAGS if settings.get(key) is not None}
    fields["progress"] = not settings.get("no_progress", False)
    fields["output_dir"] = str(fields.get("output_dir", TrainConfig.output_dir))
    return TrainConfig(**{**fields, **overrides})


@contextlib.contextmanager
def usage_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Report bad input raised inside the block as ``PROG: error: message`` (exit 2), argparse's way.

    Set ``DIFFKIT_DEBUG=1`` to see the traceback instead.
    """
    try:
        yield
    except USAGE_ERRORS as err:
        if os.environ.get("DIFFKIT_DEBUG"):
            raise
        parser.error(str(err))
