"""What every training recipe and every ``generate`` needs besides the model: records of where and
how a run happened, compact shipping checkpoints, seeded generators, sampling defaults, and
command-line errors without tracebacks. Written once here so each recipe keeps only what is
particular to its modality.
"""

from __future__ import annotations

import argparse
import contextlib
import numbers
import os
import platform
import shlex
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint

__all__ = [
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
) -> Path:
    """A compact shipping copy of a run's checkpoint: EMA weights in float16, no optimizer state.

    The model, diffusion, modality and training configs are copied from the run; ``command``
    (e.g. ``["recipes/audio_train.py", *argv]``), ``seed``, the hardware, device and wall time
    are recorded in ``extra`` so anyone can rerun it. Side files of the run (a tokenizer,
    normaliser statistics) are copied along, plus any in ``side_files``.
    """
    ckpt = load_checkpoint(run_checkpoint, modality=modality)
    state = ckpt.ema_state if ckpt.ema_state is not None else ckpt.model_state
    weights = {key: value.half() if value.is_floating_point() else value for key, value in state.items()}
    record = {
        "recipe": "python " + shlex.join([str(part) for part in command]),
        "seed": seed,
        "hardware": hardware_summary(),
        "device": str(device) if device is not None else None,
        "wall_time_s": round(float(wall_time_s), 1),
        "final_loss": final_loss,
        "weights": "EMA, float16" if ckpt.ema_state is not None else "float16",
        **dict(extra or {}),
    }
    own_files = {"config.json", "model.safetensors", "ema.safetensors", "optimizer.safetensors"}
    carried = {name: Path(ckpt.path) / name for name in (ckpt.config.get("checksums") or {}) if name not in own_files}
    carried.update(side_files or {})
    described = ("modality", "model", "diffusion", "modality_config", "train")
    return save_checkpoint(path, model=weights, step=ckpt.step, extra=record,
                           config={key: ckpt.config.get(key) for key in described}, side_files=carried or None)


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
