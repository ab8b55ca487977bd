"""Checkpoints: a directory of JSON + safetensors, written atomically, loaded without pickle.

Layout (see docs/interfaces.md)::

    checkpoint/
        config.json           format, modality, model/diffusion/train config, step, versions,
                              and the non-tensor part of the optimizer / LR-scheduler state
        model.safetensors     raw model weights
        ema.safetensors       EMA weights (optional)
        optimizer.safetensors tensors of the optimizer / LR-scheduler state (optional)

Why not ``torch.save``: pickle runs arbitrary code on load, so a downloaded checkpoint could
own the machine. Everything here is plain JSON or safetensors, so loading is always safe.

Why a directory swap: a crash (power loss, OOM kill, Ctrl-C) in the middle of a save must never
leave a half-written checkpoint where the last good one was. The new checkpoint is written and
fsync'ed in a hidden sibling directory and then renamed into place; see :func:`save_checkpoint`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "checkpoint_exists",
    "load_checkpoint",
    "parameter_count",
    "read_config",
    "save_checkpoint",
    "versions",
]

FORMAT = "diffkit-checkpoint"
FORMAT_VERSION = 1

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"

# Markers used to encode optimizer/scheduler state in JSON. Python tuples and dicts with
# non-string keys (optimizer state is keyed by int parameter ids) do not survive plain JSON.
_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_ITEMS = "__items__"
_MARKERS = {_TENSOR, _TUPLE, _ITEMS}


class CheckpointError(Exception):
    """A checkpoint cannot be written or read; the message says why and what to do."""


@dataclass
class Checkpoint:
    """A loaded checkpoint. State dicts hold tensors on ``map_location``."""

    path: Path
    config: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None
    optimizer_state: dict[str, Any] | None
    lr_scheduler_state: dict[str, Any] | None
    step: int

    @property
    def modality(self) -> str | None:
        return self.config.get("modality")

    @property
    def model_config(self) -> dict[str, Any] | None:
        return self.config.get("model")

    @property
    def diffusion_config(self) -> dict[str, Any] | None:
        return self.config.get("diffusion")

    @property
    def extra(self) -> dict[str, Any]:
        return self.config.get("extra") or {}


def versions() -> dict[str, str]:
    """Versions of diffkit, torch and Python, recorded in every checkpoint for debugging."""
    return {"diffkit": _diffkit_version(), "torch": torch.__version__, "python": platform.python_version()}


def _diffkit_version() -> str:
    # Imported lazily: diffkit/__init__.py imports this module, and the package may not be
    # installed (running from a source checkout), in which case the metadata lookup fails.
    try:
        import diffkit

        version = getattr(diffkit, "__version__", None)
        if version:
            return str(version)
    except ImportError:
        pass
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        return dist_version("diffkit")
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    ema_model: torch.nn.Module | Mapping[str, torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any = None,
    step: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically and return its path.

    ``config`` holds the descriptive part ("modality", "model": {"class", "kwargs"},
    "diffusion": diff.config, "train": ...); the format fields, ``step``, ``versions`` and
    ``extra`` are filled in here. ``model``/``ema_model`` may be modules (DDP wrappers are
    unwrapped) or state dicts.

    Atomicity: everything is written and fsync'ed into a hidden sibling directory, then moved
    into place. If ``path`` already exists it is first renamed aside, the new directory is
    renamed in, and only then is the old one deleted. A crash at any moment therefore leaves a
    complete checkpoint: the old one (at ``path``, or renamed aside if the crash fell between
    the two renames, which :func:`load_checkpoint` recovers from) or the new one.
    """
    path = Path(path)
    state_files: dict[str, dict[str, torch.Tensor]] = {MODEL_FILE: _tensors_for_saving(_state_dict(model))}
    if ema_model is not None:
        state_files[EMA_FILE] = _tensors_for_saving(_state_dict(ema_model))

    reserved = {"format", "format_version", "step", "versions", "extra", "optimizer", "lr_scheduler"}
    # Format fields first so that a person opening config.json sees what it is at once.
    full_config: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION}
    full_config.update((k, v) for k, v in config.items() if k not in reserved)
    full_config.update(step=int(step), versions=versions(), extra=dict(extra or {}))
    # Optimizer and scheduler tensors share one file; their JSON skeletons reference them by key.
    optimizer_tensors: dict[str, torch.Tensor] = {}
    if optimizer is not None:
        full_config["optimizer"] = _encode_state(optimizer.state_dict(), "optimizer", optimizer_tensors)
    if lr_scheduler is not None:
        full_config["lr_scheduler"] = _encode_state(lr_scheduler.state_dict(), "lr_scheduler", optimizer_tensors)
    if optimizer is not None or optimizer_tensors:
        state_files[OPTIMIZER_FILE] = _tensors_for_saving(optimizer_tensors)

    try:
        config_text = json.dumps(full_config, indent=2, sort_keys=False)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"cannot save checkpoint to {path}: the config is not JSON-serializable ({err}). "
            "Pass only plain dicts, lists, strings, numbers, booleans and None in `config` and `extra`."
        ) from err

    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would make the final checkpoint unreadable to others.
    staging = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _write_text(staging / CONFIG_FILE, config_text)
        for filename, tensors in state_files.items():
            save_file(tensors, str(staging / filename), metadata={"format": "pt"})
            _fsync_file(staging / filename)
        _fsync_dir(staging)
        _swap_in(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _remove_leftovers(path)
    return path


def _state_dict(obj: torch.nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        return obj
    # DistributedDataParallel / DataParallel prefix every key with "module."; store the plain model.
    if isinstance(obj, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        obj = obj.module
    return obj.state_dict()


def _tensors_for_saving(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies with their own storage.

    safetensors refuses tensors that share memory (tied weights such as an embedding reused as
    the output layer) and non-contiguous views. Copying each one keeps every key, so a plain
    ``model.load_state_dict(strict=True)`` works on load; the cost is one extra copy of tied
    tensors on disk.
    """
    out = {}
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"cannot save state entry {key!r}: expected a tensor, got {type(tensor).__name__}")
        out[key] = tensor.detach().to("cpu", copy=True).contiguous()
    return out


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Persist directory entries (new files, renames). Not possible on Windows; skipped there."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_in(staging: Path, path: Path) -> None:
    """Move the complete ``staging`` directory to ``path``, replacing any previous checkpoint."""
    if not path.exists():
        os.replace(staging, path)
        _fsync_dir(path.parent)
        return
    if not path.is_dir():
        raise CheckpointError(f"cannot save checkpoint to {path}: a file with that name exists. Remove it or choose another path.")
    # A directory cannot be replaced by rename in one step (not portably), hence two renames.
    aside = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(path, aside)
    try:
        os.rename(staging, path)
    except BaseException:
        # The process is still alive: put the old checkpoint back rather than rely on recovery.
        os.rename(aside, path)
        raise
    _fsync_dir(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _remove_leftovers(path: Path) -> None:
    """Delete staging/aside directories of earlier saves to ``path`` that crashed.

    Assumes one writer per checkpoint path (the trainer saves from rank 0 only): a concurrent
    save to the same path would lose its staging directory here.
    """
    for pattern in (f".{path.name}.partial-*", f".{path.name}.old-*"):
        for leftover in path.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Optimizer / scheduler state <-> JSON + tensors
# --------------------------------------------------------------------------------------------


def _encode_state(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Turn a state_dict into JSON, moving every tensor into ``tensors`` under a readable key.

    Tensors (including 0-dim step counters) are stored as tensors so dtype and device
    semantics survive exactly; plain Python numbers stay in the JSON.
    """
    if isinstance(value, torch.Tensor):
        unique = key
        suffix = 1
        while unique in tensors:
            suffix += 1
            unique = f"{key}#{suffix}"
        tensors[unique] = value
        return {_TENSOR: unique}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_encode_state(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode_state(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value) and not _MARKERS.intersection(value):
            return {k: _encode_state(v, f"{key}/{k}", tensors) for k, v in value.items()}
        return {
            _ITEMS: [
                [_encode_state(k, f"{key}/key{i}", tensors), _encode_state(v, f"{key}/{k}", tensors)]
                for i, (k, v) in enumerate(value.items())
            ]
        }
    raise CheckpointError(
        f"cannot save optimizer/scheduler state entry {key!r} of type {type(value).__name__}: only tensors, "
        "numbers, strings, booleans, None, lists, tuples and dicts can be stored without pickle."
    )


def _decode_state(value: Any, tensors: Mapping[str, torch.Tensor], source: Path) -> Any:
    if isinstance(value, list):
        return [_decode_state(v, tensors, source) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        key = value[_TENSOR]
        if key not in tensors:
            raise CheckpointError(
                f"{source / OPTIMIZER_FILE} has no tensor {key!r} that config.json refers to: the two files come "
                "from different saves. Copy the whole checkpoint directory again, or resume without optimizer state."
            )
        return tensors[key]
    if _TUPLE in value:
        return tuple(_decode_state(v, tensors, source) for v in value[_TUPLE])
    if _ITEMS in value:
        return {_decode_state(k, tensors, source): _decode_state(v, tensors, source) for k, v in value[_ITEMS]}
    return {k: _decode_state(v, tensors, source) for k, v in value.items()}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def checkpoint_exists(path: str | os.PathLike) -> bool:
    """True when a checkpoint can be found at ``path`` (including one recovered from a crashed save)."""
    return _locate(Path(path)) is not None


def _locate(path: Path) -> Path | None:
    """The directory holding the checkpoint for ``path``.

    Normally ``path`` itself. If a save crashed between renaming the old checkpoint aside and
    renaming the new one in, ``path`` is missing and the old, complete checkpoint sits in
    ``.<name>.old-*`` next to it; that one is used (the newest if there are several).
    """
    if (path / CONFIG_FILE).is_file():
        return path
    if path.exists():
        return None
    aside = [p for p in path.parent.glob(f".{path.name}.old-*") if (p / CONFIG_FILE).is_file()]
    if not aside:
        return None
    return max(aside, key=lambda p: p.stat().st_mtime)


def read_config(path: str | os.PathLike, *, modality: str | None = None) -> dict[str, Any]:
    """Read and validate ``config.json`` of the checkpoint at ``path`` without loading weights."""
    return _read_config(Path(path), modality)[1]


def _read_config(path: Path, modality: str | None) -> tuple[Path, dict[str, Any]]:
    directory = _locate(path)
    if directory is None:
        if not path.exists():
            raise CheckpointError(
                f"no checkpoint at {path}: the path does not exist. Check the path, or train a model first "
                "(diffkit.Trainer writes <output_dir>/checkpoint)."
            )
        if path.is_file():
            raise CheckpointError(
                f"{path} is a file, but a diffkit checkpoint is a directory holding {CONFIG_FILE} and "
                f"{MODEL_FILE}. Pass the directory instead."
            )
        raise CheckpointError(
            f"{path} is not a diffkit checkpoint: {CONFIG_FILE} is missing. A checkpoint directory holds "
            f"{CONFIG_FILE} and {MODEL_FILE} as written by diffkit.save_checkpoint; if it was copied, copy it again."
        )
    config_path = directory / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{config_path} is not valid JSON ({err}); the file is damaged. Restore the checkpoint from a backup "
            "or copy it again."
        ) from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(
            f"{config_path} is not a diffkit checkpoint config (format is {found!r}, expected {FORMAT!r}). "
            "Point to a directory written by diffkit.save_checkpoint."
        )
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{config_path} has an invalid format_version {version!r}; the file is damaged.")
    if version > FORMAT_VERSION:
        written_by = (config.get("versions") or {}).get("diffkit", "a newer version")
        raise CheckpointError(
            f"checkpoint {directory} has format_version {version}, but this diffkit ({_diffkit_version()}) reads "
            f"format_version {FORMAT_VERSION} at most. It was written by diffkit {written_by}: upgrade diffkit "
            "(pip install -U diffkit)."
        )
    found_modality = config.get("modality")
    if modality is not None and found_modality != modality:
        raise CheckpointError(
            f"checkpoint {directory} is for {found_modality!r}, not {modality!r}. Use it with the "
            f"{found_modality!r} modality, or pass a checkpoint trained for {modality!r}."
        )
    return directory, config


def _load_tensors(file: Path, device: str) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(
            f"{file.name} is missing from checkpoint {file.parent}: the checkpoint is incomplete "
            "(an interrupted copy?). Copy the whole directory again."
        )
    try:
        return load_file(str(file), device=device)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"{file.name} in checkpoint {file.parent} is truncated or corrupt ({err}). Copy the checkpoint again "
            "or fall back to an earlier one."
        ) from err


def load_checkpoint(
    path: str | os.PathLike,
    *,
    modality: str | None = None,
    map_location: str | torch.device = "cpu",
) -> Checkpoint:
    """Load the checkpoint directory at ``path``; nothing is unpickled.

    ``modality`` (optional) checks that the checkpoint was trained for that modality.
    ``map_location`` is the device the tensors are loaded onto.
    """
    directory, config = _read_config(Path(path), modality)
    device = str(torch.device(map_location))

    model_state = _load_tensors(directory / MODEL_FILE, device)
    ema_state = _load_tensors(directory / EMA_FILE, device) if (directory / EMA_FILE).exists() else None

    optimizer_state = lr_scheduler_state = None
    if "optimizer" in config or "lr_scheduler" in config:
        tensors = _load_tensors(directory / OPTIMIZER_FILE, device)
        if "optimizer" in config:
            optimizer_state = _decode_state(config["optimizer"], tensors, directory)
        if "lr_scheduler" in config:
            lr_scheduler_state = _decode_state(config["lr_scheduler"], tensors, directory)

    return Checkpoint(
        path=directory,
        config=config,
        model_state=model_state,
        ema_state=ema_state,
        optimizer_state=optimizer_state,
        lr_scheduler_state=lr_scheduler_state,
        step=int(config.get("step", 0)),
    )


def parameter_count(path: str | os.PathLike) -> int:
    """Number of scalars in ``model.safetensors``, read from the header only (no weights loaded)."""
    directory, _ = _read_config(Path(path), None)
    file = directory / MODEL_FILE
    if not file.is_file():
        raise CheckpointError(f"{MODEL_FILE} is missing from checkpoint {directory}: copy the whole directory again.")
    try:
        with safe_open(str(file), framework="pt") as f:
            total = 0
            for key in f.keys():
                count = 1
                for dim in f.get_slice(key).get_shape():
                    count *= dim
                total += count
            return total
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{MODEL_FILE} in checkpoint {directory} is truncated or corrupt ({err}).") from err
