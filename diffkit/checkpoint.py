"""Checkpoints: a directory of JSON + safetensors, written atomically, loaded without pickle.

Layout (see docs/interfaces.md)::

    checkpoint/
        config.json           format, modality, model/diffusion/train config, modality_config
                              (the modality's own metadata), step, versions, the sha256 of
                              every other file written, and the non-tensor part of the
                              optimizer / LR-scheduler state
        model.safetensors     raw model weights
        ema.safetensors       EMA weights (optional)
        optimizer.safetensors tensors of the optimizer / LR-scheduler state (optional)
        <side files>          e.g. a tokenizer, written with ``side_files=`` (optional)

Why not ``torch.save``: pickle runs arbitrary code on load, so a downloaded checkpoint could
own the machine. Everything here is plain JSON or safetensors, so loading is always safe.
For the same reason :func:`load_network` builds only classes from an allow-list the caller
passes: the checkpoint names a class, it never chooses what code runs.

Why checksums: a weights file swapped or edited after saving (a partial re-copy, a file from
another run dropped in) still parses, and would silently give a different model. Every file a
save writes is recorded with its sha256 and verified when it is loaded.

Why a directory swap: a crash (power loss, OOM kill, Ctrl-C) in the middle of a save must never
leave a half-written checkpoint where the last good one was. The new checkpoint is written and
fsync'ed in a hidden sibling directory and then renamed into place; see :func:`save_checkpoint`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .utils import FILE_MODE, fsync_file

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "LoadedNetwork",
    "checkpoint_directory",
    "checkpoint_exists",
    "holds_other_files",
    "load_checkpoint",
    "load_network",
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
# Files whose meaning the format defines: a save never carries an old one over (a stale
# ema.safetensors next to new weights would be loaded as their EMA).
FORMAT_FILES = frozenset({CONFIG_FILE, MODEL_FILE, EMA_FILE, OPTIMIZER_FILE})

CHECKSUM_ALGORITHM = "sha256"
_HASH_CHUNK = 1 << 20

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
    def modality_config(self) -> dict[str, Any]:
        """The modality's own metadata (class names, tokenizer file, sampling defaults...); {} if none."""
        return self.config.get("modality_config") or {}

    @property
    def extra(self) -> dict[str, Any]:
        return self.config.get("extra") or {}

    def side_file(self, name: str) -> Path:
        """The path of side file ``name`` (see ``save_checkpoint(side_files=...)``), checksum verified."""
        return _side_file(self.path, self.config, name)


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
    side_files: Mapping[str, str | os.PathLike | bytes] | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically and return its path.

    ``config`` holds the descriptive part ("modality", "model": {"class", "kwargs"},
    "diffusion": diff.config or None, "modality_config": the modality's own metadata,
    "train": ...); the format fields, ``step``, ``versions``, ``extra`` and ``checksums`` are
    filled in here. ``model``/``ema_model`` may be modules (DDP wrappers are unwrapped) or
    state dicts. ``side_files`` maps file names inside the checkpoint (``"tokenizer.json"``,
    ``"vocab/merges.txt"``) to the bytes to write or a file to copy.

    Files and sub-directories already in ``path`` that this save does not write (a README, a
    side file of an earlier save) are kept; the format's own files (config, model, EMA,
    optimizer) are always replaced, so an old ``ema.safetensors`` never outlives a save without
    EMA. Every file written is recorded in ``config["checksums"]`` with its sha256 and made
    readable by everyone (mode 0644).

    Atomicity: everything is written and fsync'ed into a hidden sibling directory, then moved
    into place. If ``path`` already exists it is first renamed aside, the new directory is
    renamed in, and only then is the old one deleted. A crash at any moment therefore leaves a
    complete checkpoint: the old one (at ``path``, or renamed aside if the crash fell between
    the two renames, which :func:`load_checkpoint` recovers from) or the new one.
    """
    path = Path(path)
    if holds_other_files(path):
        # The swap replaces the directory as a whole: only a checkpoint's extra files are carried over.
        raise CheckpointError(
            f"cannot save checkpoint to {path}: it is a directory with other files and no {CONFIG_FILE}, so it is "
            "not a diffkit checkpoint and saving there would delete them. Choose a new or empty directory "
            "(or restore the checkpoint's config.json if it was one)."
        )
    state_files: dict[str, dict[str, torch.Tensor]] = {MODEL_FILE: _tensors_for_saving(_state_dict(model))}
    if ema_model is not None:
        state_files[EMA_FILE] = _tensors_for_saving(_state_dict(ema_model))
    side_sources = {_check_side_name(name, path): source for name, source in (side_files or {}).items()}
    for name, source in side_sources.items():
        if not isinstance(source, (bytes, str, os.PathLike)):
            raise CheckpointError(
                f"cannot save side file {name!r} to {path}: give its content as bytes or the path of a file to "
                f"copy, not a {type(source).__name__}"
            )
        if not isinstance(source, bytes) and not Path(source).is_file():
            raise CheckpointError(f"cannot save side file {name!r} to {path}: {source} is not a file")

    modality_config = config.get("modality_config")
    if modality_config is not None and not isinstance(modality_config, Mapping):
        raise CheckpointError(
            f"cannot save checkpoint to {path}: config['modality_config'] must be a dict of the modality's "
            f"metadata, got {type(modality_config).__name__}"
        )
    reserved = {"format", "format_version", "step", "versions", "extra", "optimizer", "lr_scheduler", "checksums"}
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
        # Checked before anything is written; the checksums added later are plain strings.
        json.dumps(full_config)
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
        checksums: dict[str, str] = {}
        for filename, tensors in state_files.items():
            save_file(tensors, str(staging / filename), metadata={"format": "pt"})
            checksums[filename] = _finish_file(staging / filename)
        for name, source in side_sources.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, bytes):
                target.write_bytes(source)
            else:
                shutil.copyfile(source, target)
            checksums[name] = _finish_file(target)
        checksums.update(_carry_over(path, staging, written=set(checksums) | {CONFIG_FILE}))
        full_config["checksums"] = dict(sorted(checksums.items()))
        _write_text(staging / CONFIG_FILE, config_text(full_config))
        (staging / CONFIG_FILE).chmod(FILE_MODE)
        # Sub-directories too: side files and carried entries may live in them.
        for directory in (staging, *(p for p in staging.rglob("*") if p.is_dir() and not p.is_symlink())):
            _fsync_dir(directory)
        _swap_in(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _remove_leftovers(path)
    return path


def _is_inside_name(name: Any) -> bool:
    """True for a relative '/'-separated path that stays inside the checkpoint directory."""
    if not isinstance(name, str) or not name or "\\" in name:
        return False
    pure = PurePosixPath(name)
    return not pure.is_absolute() and all(part not in (".", "..") for part in pure.parts)


def _check_side_name(name: Any, path: Path) -> str:
    """A side file's name: relative, inside the checkpoint, not one of the format's own files."""
    if not _is_inside_name(name):
        raise CheckpointError(
            f"cannot save side file {name!r} to {path}: give a relative path inside the checkpoint using '/' "
            "(e.g. 'tokenizer.json' or 'vocab/merges.txt'), without '..'"
        )
    top = PurePosixPath(name).parts[0]
    if top in FORMAT_FILES:
        raise CheckpointError(
            f"cannot save side file {name!r} to {path}: {top} is written by save_checkpoint itself; choose another name"
        )
    return PurePosixPath(name).as_posix()


def _finish_file(file: Path) -> str:
    """fsync a written file, make it readable by everyone and return its checksum entry."""
    fsync_file(file)
    file.chmod(FILE_MODE)
    return _checksum(file)


def _checksum(file: Path) -> str:
    digest = hashlib.new(CHECKSUM_ALGORITHM)
    with open(file, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return f"{CHECKSUM_ALGORITHM}:{digest.hexdigest()}"


def _carry_over(path: Path, staging: Path, written: set[str]) -> dict[str, str]:
    """Put what the existing checkpoint holds beyond this save's files into ``staging``.

    Entries are hard-linked (copied where the file system cannot link), never moved: the old
    checkpoint stays complete until the swap, so a crash here loses nothing. Returns the
    recorded checksums of carried files, so an earlier save's side files stay verifiable.
    """
    source = _locate(path)
    if source is None:
        return {}
    try:
        old_checksums = json.loads((source / CONFIG_FILE).read_text(encoding="utf-8")).get("checksums") or {}
    except (OSError, ValueError, AttributeError):
        old_checksums = {}  # a damaged old config: carry the files, there is nothing to vouch for them
    if not isinstance(old_checksums, dict):
        old_checksums = {}
    for entry in source.iterdir():
        target = staging / entry.name
        # Whatever staging already holds was written by this save and wins over the old entry.
        if entry.name in FORMAT_FILES or (target.exists() and not target.is_dir()):
            continue
        if entry.is_dir() and not entry.is_symlink():
            # Merged with a sub-directory this save writes into: only its other entries are kept.
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy, dirs_exist_ok=True,
                            ignore=_ignore_written(source, written))
        elif not target.exists():
            _link_or_copy(entry, target)
    carried = {name for name in old_checksums if name not in written and (staging / name).is_file()}
    return {name: old_checksums[name] for name in carried if isinstance(old_checksums[name], str)}


def _ignore_written(root: Path, written: set[str]):
    """An ignore function for copytree that skips the files this save has written."""

    def ignore(current: str, names: list[str]) -> set[str]:
        relative = Path(current).relative_to(root).as_posix()
        return {name for name in names if f"{relative}/{name}" in written}

    return ignore


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst, follow_symlinks=False)
        if not os.path.islink(dst):
            fsync_file(Path(dst))


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


def config_text(config: Mapping[str, Any]) -> str:
    """``config`` as indented JSON with every list of plain numbers on one line.

    Calibrations hold long numeric tables (per-step errors, per-element statistics); one
    number per line would make config.json several times larger and unreadable.
    """
    return _json_text(config, "")


def _json_text(value: Any, indent: str) -> str:
    # json.dumps(indent=2) by hand, but for number lists; built from the values rather than by
    # rewriting the text, so strings that look like number lists stay exactly as they are.
    inner = indent + "  "
    if isinstance(value, Mapping) and value:
        items = ",\n".join(f"{inner}{json.dumps(str(key))}: {_json_text(item, inner)}" for key, item in value.items())
        return "{\n" + items + "\n" + indent + "}"
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in value):
            return "[" + ", ".join(json.dumps(item) for item in value) + "]"
        return "[\n" + ",\n".join(inner + _json_text(item, inner) for item in value) + "\n" + indent + "]"
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, (list, tuple)):
        return "[]"
    return json.dumps(value)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
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


def holds_other_files(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory with files in it but no checkpoint: saving there would
    delete them, and a run that resumes from it would start over on top of them."""
    path = Path(path)
    return path.is_dir() and _locate(path) is None and any(path.iterdir())


def checkpoint_directory(path: str | os.PathLike) -> Path:
    """The directory whose files make the checkpoint at ``path``: ``path`` itself, or the complete
    checkpoint a crashed save left aside (see :func:`_locate`); a CheckpointError if there is none."""
    return _read_config(Path(path), None)[0]


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
    return directory, migrate_config(config)


def migrate_config(config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint config in today's layout, whatever diffkit wrote it: the one place old layouts are read.

    * Before ``modality_config`` existed, a modality kept its metadata in ``model[<modality>]``
      (image checkpoints: ``model["image"]``); it moves to ``modality_config``.

    Diffusion configs need no migration: every entry added since the first format has a default
    that reproduces the old behaviour (``Diffusion.from_config``). Returns a new dict when it
    changes anything, the config itself otherwise; the file is not rewritten.
    """
    model = config.get("model")
    modality = config.get("modality")
    if isinstance(model, dict) and modality in model and not config.get("modality_config"):
        config = copy.deepcopy(config)
        config["modality_config"] = config["model"].pop(modality) or {}
    return config


def _recorded_checksums(directory: Path, config: Mapping[str, Any]) -> dict[str, str] | None:
    """config["checksums"], or None for checkpoints written before diffkit recorded them."""
    checksums = config.get("checksums")
    if checksums is None:
        return None
    if not isinstance(checksums, dict) or not all(isinstance(v, str) for v in checksums.values()):
        raise CheckpointError(
            f"{directory / CONFIG_FILE} has an invalid 'checksums' entry (expected {{file name: 'sha256:<hex>'}}); "
            "the file is damaged. Copy the checkpoint again."
        )
    return checksums


def _verify(directory: Path, name: str, checksums: Mapping[str, str] | None) -> None:
    """Refuse file ``name`` of the checkpoint in ``directory`` unless it is the file that was saved."""
    if checksums is None:
        return
    expected = checksums.get(name)
    if expected is None:
        raise CheckpointError(
            f"{name} in checkpoint {directory} is not listed in the checksums of its {CONFIG_FILE}, so it was not "
            "written by the save that wrote that config (copied in from another checkpoint?). Remove it, or copy "
            "the whole checkpoint directory again."
        )
    algorithm, _, digest = expected.partition(":")
    if algorithm != CHECKSUM_ALGORITHM or not digest:
        raise CheckpointError(
            f"{CONFIG_FILE} of checkpoint {directory} records the checksum of {name} as {expected!r}, but this diffkit "
            f"({_diffkit_version()}) verifies '{CHECKSUM_ALGORITHM}:<hex>' only: upgrade diffkit (pip install -U diffkit)."
        )
    if _checksum(directory / name) != expected:
        raise CheckpointError(
            f"{name} in checkpoint {directory} was modified after saving: its {CHECKSUM_ALGORITHM} differs from the "
            f"one recorded in {CONFIG_FILE}. Restore the original file or copy the whole checkpoint again; to keep "
            "the changed weights, load them and write a new checkpoint with diffkit.save_checkpoint."
        )


def _load_tensors(file: Path, device: str, checksums: Mapping[str, str] | None) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(
            f"{file.name} is missing from checkpoint {file.parent}: the checkpoint is incomplete "
            "(an interrupted copy?). Copy the whole directory again."
        )
    try:
        tensors = load_file(str(file), device=device)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"{file.name} in checkpoint {file.parent} is truncated or corrupt ({err}). Copy the checkpoint again "
            "or fall back to an earlier one."
        ) from err
    # Verified after parsing so that a cut-off file is reported as truncated, which says more
    # than "modified"; parsing safetensors runs no code, so nothing is lost by the order.
    _verify(file.parent, file.name, checksums)
    return tensors


def _has_ema(directory: Path, checksums: Mapping[str, str] | None) -> bool:
    # A recorded EMA that has gone missing is an incomplete copy, not a checkpoint without EMA.
    return (directory / EMA_FILE).exists() or (checksums is not None and EMA_FILE in checksums)


def _side_file(directory: Path, config: Mapping[str, Any], name: str) -> Path:
    if not _is_inside_name(name):
        raise ValueError(f"side file names are relative paths inside the checkpoint (e.g. 'tokenizer.json'), got {name!r}")
    name = PurePosixPath(name).as_posix()  # the spelling checksums are recorded under
    checksums = _recorded_checksums(directory, config)
    file = directory / name
    if not file.is_file():
        recorded = sorted(set(checksums or {}) - FORMAT_FILES)
        raise CheckpointError(
            f"checkpoint {directory} has no side file {name!r} (side files recorded: {', '.join(recorded) or 'none'}). "
            f"Save it with save_checkpoint(..., side_files={{{name!r}: ...}}), or copy the whole checkpoint again if "
            "it went missing."
        )
    if checksums is not None and name in checksums:
        _verify(directory, name, checksums)
    return file


def load_checkpoint(
    path: str | os.PathLike,
    *,
    modality: str | None = None,
    map_location: str | torch.device = "cpu",
) -> Checkpoint:
    """Load the checkpoint directory at ``path``; nothing is unpickled.

    ``modality`` (optional) checks that the checkpoint was trained for that modality.
    ``map_location`` is the device the tensors are loaded onto. Every file loaded is checked
    against the checksum recorded when it was saved.
    """
    directory, config = _read_config(Path(path), modality)
    checksums = _recorded_checksums(directory, config)
    device = str(torch.device(map_location))

    model_state = _load_tensors(directory / MODEL_FILE, device, checksums)
    ema_state = _load_tensors(directory / EMA_FILE, device, checksums) if _has_ema(directory, checksums) else None

    optimizer_state = lr_scheduler_state = None
    if "optimizer" in config or "lr_scheduler" in config:
        tensors = _load_tensors(directory / OPTIMIZER_FILE, device, checksums)
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


# --------------------------------------------------------------------------------------------
# Networks for inference
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedNetwork:
    """A network rebuilt from a checkpoint, ready for inference (see :func:`load_network`)."""

    net: torch.nn.Module
    diffusion: Any  # diffkit.Diffusion, or None for networks that are not diffusion models
    config: dict[str, Any]
    modality_config: dict[str, Any]
    path: Path
    step: int

    def side_file(self, name: str) -> Path:
        """The path of side file ``name`` of the checkpoint, checksum verified."""
        return _side_file(self.path, self.config, name)


WEIGHTS = ("ema", "model")


def load_network(
    path: str | os.PathLike,
    networks: Mapping[str, type],
    *,
    modality: str | None = None,
    device: str | torch.device = "auto",
    weights: str = "ema",
) -> LoadedNetwork:
    """Build the network a checkpoint describes, load its weights and return it for inference.

    ``networks`` is the allow-list {class name as stored in config["model"]["class"]: class};
    a checkpoint naming any other class is refused, so a checkpoint never chooses what code
    runs. ``weights="ema"`` loads the EMA weights (the model's own when the checkpoint has no
    EMA), ``"model"`` the raw ones. Stored float16 weights are cast to the network's dtype.
    The network comes back in eval mode, without gradients, on ``device`` ("auto": a GPU when
    there is one); ``diffusion`` is rebuilt from the config, or None when the config has none.
    """
    from diffkit.diffusion import Diffusion  # diffusion imports the package root, which imports this module
    from diffkit.masked import MaskedDiffusion
    from diffkit.utils import resolve_device

    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(map(repr, WEIGHTS))}, got {weights!r}")
    if not isinstance(networks, Mapping) or not networks:
        raise TypeError("networks must be a non-empty mapping {class name in the checkpoint: class}")
    for name, cls in networks.items():
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise TypeError(f"networks[{name!r}] must be a torch.nn.Module subclass, got {cls!r}")
    target = resolve_device(device)

    directory, config = _read_config(Path(path), modality)
    checksums = _recorded_checksums(directory, config)
    model_config = config.get("model")
    class_name = model_config.get("class") if isinstance(model_config, dict) else None
    if not isinstance(class_name, str):
        raise CheckpointError(
            f"{directory / CONFIG_FILE} does not say which network it holds (config['model']['class'] is missing). "
            "Save checkpoints with config={'model': {'class': ..., 'kwargs': {...}}, ...}."
        )
    cls = networks.get(class_name)
    if cls is None:
        raise CheckpointError(
            f"checkpoint {directory} holds a {class_name!r}, but this loader builds only "
            f"{', '.join(sorted(networks))}. Use the checkpoint with the code that trained it, or add the class "
            "to the allow-list passed to load_network."
        )
    kwargs = model_config.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"config['model']['kwargs'] in {directory / CONFIG_FILE} must be a dict, got {kwargs!r}")
    try:
        net = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {directory} describes a {class_name} that this code cannot build ({err}). The checkpoint "
            "was written by a different version of the network's code; use that version."
        ) from err

    use_ema = weights == "ema" and _has_ema(directory, checksums)
    state = _load_tensors(directory / (EMA_FILE if use_ema else MODEL_FILE), "cpu", checksums)
    try:
        # load_state_dict copies into the existing parameters, which casts float16 shipped
        # weights to the network's own dtype.
        net.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(
            f"the weights in {directory / (EMA_FILE if use_ema else MODEL_FILE)} do not fit the {class_name} its "
            f"config describes: {err}"
        ) from err
    net.to(target).eval().requires_grad_(False)

    diffusion = None
    if config.get("diffusion") is not None:
        try:
            route = MaskedDiffusion if config["diffusion"].get("class") == "MaskedDiffusion" else Diffusion
            diffusion = route.from_config(config["diffusion"])
        except (TypeError, ValueError, KeyError) as err:
            raise CheckpointError(f"the diffusion config in {directory / CONFIG_FILE} is invalid: {err}") from err
    return LoadedNetwork(
        net=net,
        diffusion=diffusion,
        config=config,
        modality_config=config.get("modality_config") or {},
        path=directory,
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
