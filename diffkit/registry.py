"""Find modalities (image, audio, ...) by name, so the core never imports them.

A modality comes from one of two places:

- an entry point in the ``diffkit.modalities`` group of an installed package, e.g. in
  pyproject.toml ``[project.entry-points."diffkit.modalities"] image = "modalities.image:ImageModality"``;
- :func:`register_modality` at run time (wins over an entry point of the same name).

Nothing is imported until a modality is asked for by name: listing names only reads package
metadata, so ``diffkit modalities`` stays fast and a broken optional modality (say, a missing
audio dependency) does not stop the others from working.

Besides ``generate`` and ``save``, a modality may offer command-line verbs of its own
(``cli_commands() -> {verb: CliCommand}``) and a policy that acts in an environment
(``policy(checkpoint=None, **kw) -> Policy``); see docs/interfaces.md.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "ENTRY_POINT_GROUP",
    "CliCommand",
    "ModalityLoadError",
    "Modality",
    "Policy",
    "UnknownModalityError",
    "available_modalities",
    "generate",
    "get_modality",
    "load_policy",
    "modality_commands",
    "modality_source",
    "register_modality",
    "unregister_modality",
]

ENTRY_POINT_GROUP = "diffkit.modalities"

# name -> what was registered (instance, class, factory or "module:attr"), before resolving.
_registered: dict[str, Any] = {}
# name -> resolved modality instance, filled on first use.
_instances: dict[str, Any] = {}
# name -> entry point, read once from package metadata on first use.
_entry_points: dict[str, metadata.EntryPoint] | None = None


class UnknownModalityError(KeyError, ValueError):
    """No modality of that name; the message lists the registered ones.

    Both a KeyError (it is a failed lookup) and a ValueError (it is a bad argument), so either
    ``except`` clause catches it.
    """

    def __str__(self) -> str:
        # KeyError.__str__ would print the message quoted, like a key.
        return str(self.args[0]) if self.args else ""


class ModalityLoadError(RuntimeError):
    """A modality is registered but importing or constructing it failed."""


@dataclass(frozen=True)
class CliCommand:
    """A verb a modality adds to the command line: ``diffkit VERB MODALITY [options]``.

    ``add_arguments(parser)`` declares the verb's options; ``run(args)`` does the work and
    returns the exit status.
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


@runtime_checkable
class Policy(Protocol):
    """Something that acts in an environment (a planner, a diffusion policy).

    ``act(obs)`` returns the action for one observation, ``reset()`` starts a new episode
    (clearing any plan or history it keeps), and calling the policy is the same as ``act``.
    ``isinstance(obj, Policy)`` checks that the three methods exist (not their signatures).
    """

    def act(self, obs: Any) -> Any: ...

    def reset(self) -> None: ...

    def __call__(self, obs: Any) -> Any: ...


@runtime_checkable
class Modality(Protocol):
    """What the core asks of a modality (``isinstance(obj, Modality)`` checks the two methods exist).

    Required:

    * ``generate(*, checkpoint=None, num_samples=None, seed=None, device="auto", sampler=None,
      steps=None, progress=False, **cond)``: samples from a checkpoint (default: the shipped one);
    * ``save(samples, path) -> list[Path]``: writes them (PNG, WAV, text, ...).

    Optional, found by name when present:

    * ``add_cli_arguments(parser)``: the modality's own ``diffkit generate`` options;
    * ``cli_commands() -> {verb: CliCommand}``: verbs of its own (``diffkit rollout planning``);
    * ``policy(checkpoint=None, **kw) -> Policy``: something that acts in an environment;
    * ``calibration_inputs(checkpoint, *, batch, data, device, generator) -> CalibrationInputs``:
      what ``diffkit calibrate`` fits its checkpoints on (:mod:`diffkit.calibration`).

    Loading, caching and sampling defaults come from :mod:`diffkit.frontdoor`.
    """

    def generate(self, **kwargs: Any) -> Any: ...

    def save(self, samples: Any, path: Any) -> Any: ...


def register_modality(name: str, modality: Any) -> None:
    """Make ``modality`` available as ``name``.

    ``modality`` may be a ready object (with ``generate`` and ``save``), a class or a factory
    (called with no arguments on first use), or a ``"module:attr"`` string imported on first
    use. Registering a name again replaces the earlier registration.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a modality name must be a non-empty string, got {name!r}")
    if isinstance(modality, str) and ":" not in modality:
        raise ValueError(f"modality {name!r}: a string must look like 'package.module:attr', got {modality!r}")
    _registered[name] = modality
    _instances.pop(name, None)


def unregister_modality(name: str) -> None:
    """Forget a modality registered with :func:`register_modality` (entry points stay visible)."""
    _registered.pop(name, None)
    _instances.pop(name, None)


def available_modalities() -> list[str]:
    """Sorted names of all modalities, registered or installed; none of them is imported."""
    return sorted(set(_registered) | set(_discover_entry_points()))


def modality_source(name: str) -> str:
    """Where ``name`` comes from, for listings: "registered ..." or "entry point ..."."""
    if name in _registered:
        target = _registered[name]
        return f"registered: {target}" if isinstance(target, str) else f"registered: {_qualname(target)}"
    entry_point = _discover_entry_points().get(name)
    if entry_point is not None:
        return f"entry point: {entry_point.value}"
    raise _unknown(name)


def get_modality(name: str) -> Any:
    """The modality object for ``name``, imported and constructed on first use, then cached."""
    if name in _instances:
        return _instances[name]
    if name in _registered:
        target, origin = _registered[name], "registered"
    else:
        entry_point = _discover_entry_points().get(name)
        if entry_point is None:
            raise _unknown(name)
        target, origin = entry_point, f"entry point {entry_point.value!r}"
    instance = _resolve(name, target, origin)
    _instances[name] = instance
    return instance


def generate(
    modality: str | Any,
    checkpoint: str | os.PathLike | None = None,
    num_samples: int | None = None,
    seed: int | None = None,
    save: str | os.PathLike | None = None,
    **kwargs: Any,
) -> Any:
    """Draw ``num_samples`` samples from ``modality`` (a name or a modality object).

    ``num_samples=None`` leaves the count to the modality: its default, or one sample per
    condition given (``labels=[7] * 8`` makes 8). ``kwargs`` go to the modality's ``generate``
    (device, sampler, steps, progress and modality-specific conditions). With ``save=path``
    the samples are also written with the modality's ``save`` (a PNG grid, WAV files, ...).
    Returns the samples.
    """
    mod = get_modality(modality) if isinstance(modality, str) else modality
    if num_samples is not None:
        kwargs["num_samples"] = num_samples
    samples = mod.generate(checkpoint=checkpoint, seed=seed, **kwargs)
    if save is not None:
        mod.save(samples, save)
    return samples


def load_policy(modality: str | Any, checkpoint: str | os.PathLike | None = None, **kwargs: Any) -> Policy:
    """The policy of ``modality`` (a name or a modality object), from its ``policy(...)``.

    ``checkpoint`` and ``kwargs`` go to the modality's ``policy``. Raises ValueError when the
    modality has no policies, TypeError when what it returns is not a :class:`Policy`.
    """
    mod = get_modality(modality) if isinstance(modality, str) else modality
    make_policy = getattr(mod, "policy", None)
    if not callable(make_policy):
        raise ValueError(
            f"modality {_display_name(mod)!r} has no policy(); policies come from modalities that act in an "
            "environment (e.g. planning). Use generate() for its samples instead."
        )
    policy = make_policy(checkpoint=checkpoint, **kwargs)
    if not isinstance(policy, Policy):
        raise TypeError(
            f"policy() of modality {_display_name(mod)!r} returned {_qualname(policy)}, which is not a diffkit.Policy: "
            "it needs act(obs), reset() and __call__(obs)"
        )
    return policy


def modality_commands(modality: str | Any) -> dict[str, CliCommand]:
    """The command-line verbs of ``modality`` (a name or a modality object); {} when it has none."""
    mod = get_modality(modality) if isinstance(modality, str) else modality
    make_commands = getattr(mod, "cli_commands", None)
    if make_commands is None:
        return {}
    commands = make_commands()
    if not isinstance(commands, dict) or not all(
        isinstance(verb, str) and verb and isinstance(command, CliCommand) for verb, command in commands.items()
    ):
        raise ModalityLoadError(
            f"cli_commands() of modality {_display_name(mod)!r} must return {{verb: diffkit.CliCommand(help, "
            f"add_arguments, run)}}, got {commands!r}"
        )
    return commands


# --------------------------------------------------------------------------------------------


def _display_name(modality: Any) -> str:
    return getattr(modality, "name", None) or _qualname(modality)


def _discover_entry_points() -> dict[str, metadata.EntryPoint]:
    global _entry_points
    if _entry_points is None:
        found: dict[str, metadata.EntryPoint] = {}
        for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
            # Two installed packages claiming one name: keep the first, as pip's order is arbitrary
            # anyway; register_modality() is the way to pick one explicitly.
            found.setdefault(entry_point.name, entry_point)
        _entry_points = found
    return _entry_points


def _resolve(name: str, target: Any, origin: str) -> Any:
    """Turn what was registered into a modality instance, with errors that name the culprit."""
    try:
        if isinstance(target, str):
            target = metadata.EntryPoint(name=name, value=target, group=ENTRY_POINT_GROUP).load()
        elif isinstance(target, metadata.EntryPoint):
            target = target.load()
        # A class also has a `generate` attribute (the unbound function), so test classes first.
        if isinstance(target, type) or (callable(target) and not hasattr(target, "generate")):
            target = target()
    except Exception as err:
        raise ModalityLoadError(
            f"modality {name!r} ({origin}) failed to load: {type(err).__name__}: {err}. "
            "Check that its optional dependencies are installed."
        ) from err
    if not callable(getattr(target, "generate", None)):
        raise ModalityLoadError(
            f"modality {name!r} ({origin}) resolved to {_qualname(target)}, which has no generate() method; "
            "register an object with generate(...) and save(samples, path), or a class/factory returning one"
        )
    return target


def _unknown(name: str) -> UnknownModalityError:
    names = available_modalities()
    if not names:
        return UnknownModalityError(
            f"no modality {name!r}; no modalities are registered. Install a package that provides one through "
            f"the {ENTRY_POINT_GROUP!r} entry-point group (for the built-in ones run `pip install -e .` in the "
            f"diffkit repository), or call diffkit.register_modality({name!r}, obj)."
        )
    message = f"no modality {name!r}; registered: {', '.join(names)}."
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        message += f" Did you mean {close[0]!r}?"
    return UnknownModalityError(message)


def _qualname(obj: Any) -> str:
    """'module.Name' of a class or function, or of the class of an instance."""
    target = obj if isinstance(obj, type) or inspect.isroutine(obj) else type(obj)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__name__)}"
