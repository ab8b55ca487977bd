"""The ``diffkit`` command line.

    diffkit generate image --checkpoint runs/cifar/checkpoint --num-samples 16 --out grid.png
    diffkit generate image -h          # also lists the image modality's own options
    diffkit modalities [-v]            # what is installed (-v: with each one's own commands)
    diffkit info runs/cifar/checkpoint # what a checkpoint holds
    diffkit calibrate runs/cifar/checkpoint --steps 5 10 20   # fit grids, statistics, variances
    diffkit VERB MODALITY ...          # a modality's own command, e.g. `diffkit rollout planning`

Modalities add their own options to ``generate`` through ``add_cli_arguments(parser)``; those
(and only those) are passed to the modality's ``generate`` as keyword arguments. Commands of
their own come from ``cli_commands()``.

A bad argument that a modality rejects (ValueError, TypeError, FileNotFoundError,
CheckpointError) is printed as ``diffkit: error: <message>`` with exit status 1, no traceback;
set ``DIFFKIT_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffkit.checkpoint import CONFIG_FILE, CheckpointError, checkpoint_directory, parameter_count, read_config
from diffkit.registry import (
    ENTRY_POINT_GROUP,
    CliCommand,
    ModalityLoadError,
    available_modalities,
    generate,
    get_modality,
    modality_commands,
    modality_source,
)
from diffkit.runs import positive_int
from diffkit.masked import SAMPLERS as MASKED_SAMPLERS
from diffkit.sampling import SAMPLERS

__all__ = ["main"]

PROG = "diffkit"
BUILTIN_COMMANDS = ("generate", "modalities", "info", "calibrate")
# What a user's bad input looks like when it comes back from the core or a modality. Anything
# else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, CheckpointError, ModalityLoadError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: sys.argv[1:]); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in BUILTIN_COMMANDS:
        return _modality_command(argv)
    parser, generate_parser, common_dests = _build_parser()
    # First pass: find the command and modality without failing on the modality's own options,
    # which the parser only knows once the modality is loaded.
    args, _ = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "generate":
            return _generate(argv, args, parser, generate_parser, common_dests)
        if args.command == "modalities":
            return _modalities(args)
        if args.command == "calibrate":
            return _calibrate(args)
        return _info(args)
    except USER_ERRORS as err:
        return _report(err)


def _report(err: Exception) -> int:
    if os.environ.get("DIFFKIT_DEBUG"):
        raise err
    print(f"{PROG}: error: {err}", file=sys.stderr)
    return 1


def _build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, set[str]]:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "diffkit: one diffusion core serving image, audio, text and planning modalities. "
            "Draw samples from trained models, list the installed modalities, inspect checkpoints."
        ),
        epilog="Modalities may add commands of their own, run as `diffkit VERB MODALITY ...`; "
        "`diffkit modalities -v` lists them.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = commands.add_parser(
        "generate",
        # Help is handled by hand so that `generate MODALITY -h` can list the modality's options.
        add_help=False,
        help="draw samples from a modality and save them",
        description=(
            "Draw samples from a modality's model and save them (a PNG grid, WAV files, ...). "
            "Run `diffkit generate MODALITY -h` to also see that modality's own options."
        ),
    )
    common = [
        gen.add_argument("-h", "--help", action="store_true", help="show this help (with the modality's options) and exit"),
        gen.add_argument("modality", nargs="?", metavar="MODALITY", help="which modality to sample from (see `diffkit modalities`)"),
        gen.add_argument("--checkpoint", metavar="DIR", help="checkpoint directory to load (default: the modality's default model)"),
        gen.add_argument("--num-samples", type=positive_int, default=None, metavar="N", help="how many samples to draw (default: the modality's, usually 16, or one per label given)"),
        gen.add_argument("--seed", type=int, default=None, metavar="S", help="random seed; the same seed gives the same samples (default: random)"),
        gen.add_argument("--sampler", default=None, metavar="NAME", help=f"sampling algorithm: {', '.join(SAMPLERS)}; for a masked-diffusion model "
                                 f"{', '.join(MASKED_SAMPLERS)} (default: the checkpoint's choice)"),
        gen.add_argument("--steps", type=positive_int, default=None, metavar="K", help="number of sampling steps (default: the modality's choice)"),
        gen.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda or cuda:N (default: auto)"),
        gen.add_argument("--out", metavar="PATH", help="where to write the samples (required, except for modalities whose samples print, such as text)"),
        gen.add_argument("--no-progress", action="store_true", help="do not show a progress bar"),
    ]

    mods = commands.add_parser(
        "modalities",
        help="list the installed modalities",
        description=f"List the modalities diffkit can find (entry-point group {ENTRY_POINT_GROUP!r} and register_modality).",
    )
    mods.add_argument("-v", "--verbose", action="store_true",
                      help="also show where each modality comes from and the commands it adds (loads each one)")

    info = commands.add_parser(
        "info",
        help="describe a checkpoint",
        description="Print what a checkpoint holds: modality, step, model, diffusion and training settings.",
    )
    info.add_argument("checkpoint", metavar="DIR", help="checkpoint directory (holds config.json and model.safetensors)")
    info.add_argument("--json", action="store_true", help=f"print the raw {CONFIG_FILE} instead of a summary")

    cal = commands.add_parser(
        "calibrate",
        help="calibrate a diffusion checkpoint for few-step sampling and tight likelihoods",
        description=(
            "Measure what a trained diffusion model says about itself and store it in the checkpoint: "
            "sampler grids fitted to a fine-step reference for each step count (no data needed), the model's "
            "statistics for the dpm-v3 sampler, and its per-step x0 error on training data (the reverse "
            "variances that tighten the likelihood bound). Grids are fitted, for every --steps K, for the "
            "diffusion's default sampler (dpm-v3 once its statistics are measured, else unipc) and for the "
            "sampler the checkpoint records as its sampling default (what `diffkit generate` and the planner "
            "use: dpm++2m for the image recipes, ddim for the planners; also at its recorded step count), when "
            "that sampler is deterministic; a stochastic one (ddpm, recorded by the text and audio recipes) gets "
            "no grid, only the reverse variances. --samplers replaces both with the samplers named. Sampling "
            "with a calibrated (sampler, step count) then uses the fitted grid. "
            f"Only {CONFIG_FILE} is rewritten, atomically: the old file or the whole new one. "
            "Recipes run this on --export unless given --no-calibrate."
        ),
    )
    cal.add_argument("checkpoint", metavar="DIR", help="checkpoint directory of a diffusion model")
    cal.add_argument("--steps", type=positive_int, nargs="+", default=[5, 10, 20], metavar="K",
                     help="step counts to fit grids for (default: 5 10 20)")
    cal.add_argument("--samplers", nargs="+", default=None, metavar="NAME",
                     help="deterministic samplers to fit grids for (default: the diffusion's default sampler and "
                          "the checkpoint's recorded sampling default, when deterministic)")
    cal.add_argument("--batch", type=positive_int, default=128, metavar="N",
                     help="draws of starting noise the grids are fitted on (default: 128)")
    cal.add_argument("--data", type=int, default=256, metavar="N",
                     help="training examples for the reverse variances; 0 skips them (default: 256)")
    cal.add_argument("--max-evals", type=positive_int, default=200, metavar="N",
                     help="sampler runs allowed per grid search (default: 200)")
    cal.add_argument("--reference-steps", type=positive_int, default=100, metavar="K",
                     help="points of the fine-step reference run (default: 100)")
    cal.add_argument("--no-statistics", action="store_true",
                     help="skip dpm-v3's model statistics (two tables per element of a sample: large samples make "
                          "a large config)")
    cal.add_argument("--seed", type=int, default=0, help="seed of the noise and data draws (default: 0)")
    cal.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda or cuda:N (default: auto)")
    cal.add_argument("--dry-run", action="store_true", help="calibrate and print the result, but write nothing")
    cal.add_argument("--no-progress", action="store_true", help="do not show progress")
    return parser, gen, {action.dest for action in common} | {"command"}


def _generate(
    argv: list[str],
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    generate_parser: argparse.ArgumentParser,
    common_dests: set[str],
) -> int:
    if args.modality is None:
        if args.help:
            generate_parser.print_help()
            print(f"\navailable modalities: {', '.join(available_modalities()) or '(none installed)'}")
            return 0
        generate_parser.error(f"choose a modality: {', '.join(available_modalities()) or '(none installed)'}")
    modality = get_modality(args.modality)
    add_arguments = getattr(modality, "add_cli_arguments", None)
    if add_arguments is not None:
        add_arguments(generate_parser)
    if args.help:
        generate_parser.print_help()
        return 0
    # Second pass, now strict: unknown options are errors.
    args = parser.parse_args(argv)
    # Samples a terminal can show (text) may go to stdout; the others need a file.
    prints = callable(getattr(modality, "format_samples", None))
    if args.out is None and not prints:
        generate_parser.error("--out PATH is required: where to write the samples")
    if args.out is not None:  # a bad --out is found now, not after minutes of sampling
        check_output_location(args.out)
        check_output = getattr(modality, "check_output", None)
        if check_output is not None:
            check_output(args.out)
    modality_kwargs = {key: value for key, value in vars(args).items() if key not in common_dests}
    samples = generate(
        modality,
        checkpoint=args.checkpoint,
        num_samples=args.num_samples,
        seed=args.seed,
        device=args.device,
        sampler=args.sampler,
        steps=args.steps,
        progress=not args.no_progress,
        **modality_kwargs,
    )
    if args.out is None:
        print(modality.format_samples(samples))
        return 0
    written = modality.save(samples, args.out) or []
    count = len(samples) if hasattr(samples, "__len__") else args.num_samples or "the"
    if written:
        # One path a line, so scripts can pick up what was written.
        print(f"wrote {count} {args.modality} sample(s):")
        for path in written:
            print(path)
    else:
        print(f"wrote {count} {args.modality} sample(s) to {args.out}")
    return 0


def check_output_location(path: str | os.PathLike) -> None:
    """ValueError unless ``path`` could be created: its nearest existing ancestor must be a
    writable directory (a file there, or a read-only folder, would only fail after sampling)."""
    ancestor = Path(path).absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"--out {path}: {ancestor} is a file, not a folder; choose another --out")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: folder {ancestor} is not writable; choose another --out")


def _modality_command(argv: list[str]) -> int:
    """``diffkit VERB MODALITY [options]``: run a command that a modality defines."""
    verb = argv[0]
    if len(argv) < 2 or argv[1].startswith("-"):
        close = difflib.get_close_matches(verb, BUILTIN_COMMANDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        print(
            f"{PROG}: error: unknown command {verb!r}.{hint} Built-in commands: {', '.join(BUILTIN_COMMANDS)}; "
            f"a modality's own command is run as `{PROG} {verb} MODALITY ...` (`{PROG} modalities -v` lists them).",
            file=sys.stderr,
        )
        return 2
    name = argv[1]
    try:
        commands = _commands_of(name)
        command = commands.get(verb)
        if command is None:
            close = difflib.get_close_matches(verb, [*BUILTIN_COMMANDS, *commands], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            print(
                f"{PROG}: error: modality {name!r} has no command {verb!r}.{hint} Its commands: "
                f"{', '.join(commands) or 'none'}; built-in commands: {', '.join(BUILTIN_COMMANDS)}.",
                file=sys.stderr,
            )
            return 2
        parser = argparse.ArgumentParser(prog=f"{PROG} {verb} {name}", description=command.help)
        command.add_arguments(parser)
        status = command.run(parser.parse_args(argv[2:]))
    except USER_ERRORS as err:
        return _report(err)
    return 0 if status is None else int(status)


def _commands_of(name: str) -> dict[str, CliCommand]:
    commands = modality_commands(name)
    shadowed = sorted(set(commands) & set(BUILTIN_COMMANDS))
    if shadowed:
        raise ModalityLoadError(
            f"modality {name!r} defines the command(s) {', '.join(shadowed)}, which are built into {PROG} and "
            "would never run; rename them in its cli_commands()"
        )
    return commands


def _modalities(args: argparse.Namespace) -> int:
    names = available_modalities()
    if not names:
        print(
            f"no modalities installed. Install a package that registers one in the {ENTRY_POINT_GROUP!r} "
            "entry-point group (for the built-in ones: `pip install -e .` in the diffkit repository)."
        )
        return 0
    for name in names:
        if not args.verbose:
            print(name)
            continue
        print(f"{name}\t{modality_source(name)}")
        try:
            commands = _commands_of(name)
        except USER_ERRORS as err:
            print(f"    (cannot list its commands: {err})")
            continue
        for verb, command in commands.items():
            print(f"    {PROG} {verb} {name}\t{command.help}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from diffkit.calibration import calibratable_config, calibrate_checkpoint, recorded_grids
    from diffkit.utils import resolve_device

    config = calibratable_config(args.checkpoint)
    if args.samplers is None:
        _, why_not = recorded_grids(config, args.steps)
        if why_not:
            print(why_not)
    calibrated = calibrate_checkpoint(
        args.checkpoint, steps=args.steps, batch=args.batch, data=args.data, samplers=args.samplers,
        max_evals=args.max_evals, reference_steps=args.reference_steps, seed=args.seed,
        device=resolve_device(args.device), progress=not args.no_progress, write=not args.dry_run,
        model_statistics=not args.no_statistics)
    calibration = calibrated.calibration
    for key, entry in calibration.get("grids", {}).items():
        print(f"grid {key}: {[round(t, 3) for t in entry['times']]} {entry['sampler_options'] or ''}".rstrip())
    print(f"model statistics: {'kept' if 'statistics' in calibration else 'none'}; reverse variances: "
          f"{'measured' if 'x0_mse' in calibration else 'not measured'}; default sampler now "
          f"{calibrated.default_sampler}")
    print(("would write " if args.dry_run else "wrote ") + str(Path(args.checkpoint) / CONFIG_FILE))
    return 0


def _info(args: argparse.Namespace) -> int:
    config = read_config(args.checkpoint)
    if args.json:
        print(json.dumps(config, indent=2))
        return 0
    directory = checkpoint_directory(args.checkpoint)
    where = str(args.checkpoint)
    if directory != Path(args.checkpoint):
        where += f" (missing after a crashed save: read from {directory}, the complete checkpoint it left aside)"
    model = config.get("model") or {}
    lines = [
        f"checkpoint     {where}",
        f"modality       {config.get('modality')}",
        f"step           {config.get('step')}",
        f"model          {model.get('class', '?')}  {_compact(model.get('kwargs'))}",
        f"parameters     {parameter_count(directory):,}",
        f"files          {', '.join(_file_sizes(directory))}",
    ]
    diffusion = config.get("diffusion")
    if isinstance(diffusion, dict):
        # The schedule's beta table is long and says little; its name is enough for a summary.
        summary = {k: v for k, v in diffusion.items() if k != "schedule"}
        schedule = diffusion.get("schedule")
        if isinstance(schedule, dict):
            summary["schedule"] = schedule.get("name", "custom")
        lines.append(f"diffusion      {_compact(summary)}")
    else:
        lines.append("diffusion      none (not a diffusion model)")
    if config.get("modality_config"):
        lines.append(f"modality cfg   {_compact(config['modality_config'])}")
    train = config.get("train")
    if isinstance(train, dict):
        keys = ("max_steps", "batch_size", "lr", "warmup_steps", "ema_decay", "seed", "mixed_precision")
        lines.append(f"training       {_compact({k: train[k] for k in keys if k in train})}")
    checksums = config.get("checksums")
    lines.append(f"checksums      {len(checksums)} file(s), verified on load" if isinstance(checksums, dict)
                 else "checksums      none (written before diffkit recorded them)")
    lines.append(f"written by     {_compact(config.get('versions'))}")
    extra = dict(config.get("extra") or {})
    segments = extra.pop("segments", None)
    if extra:
        lines.append(f"extra          {_compact(extra)}")
    if isinstance(segments, list):
        # One line per run that led to these weights (a resumed model has several).
        for number, segment in enumerate(segments, start=1):
            if isinstance(segment, dict):
                lines.append(f"run {number:<10} {_segment_summary(segment)}")
    print("\n".join(lines))
    return 0


def _segment_summary(segment: dict) -> str:
    steps = segment.get("steps") or ["?", "?"]
    parts = [f"steps {steps[0]}-{steps[-1]}"]
    if isinstance(segment.get("seconds"), (int, float)):
        parts.append(f"{segment['seconds']:.0f} s")
    if segment.get("device"):
        parts.append(f"{segment['device']}, {segment.get('threads', '?')} threads, world size {segment.get('world_size', 1)}")
    if isinstance(segment.get("final_loss"), (int, float)):
        parts.append(f"last loss {segment['final_loss']:.4g}")
    parts.append(f"command: {segment['command']}" if segment.get("command") else "not recorded")
    return "; ".join(parts)


def _file_sizes(directory: Path) -> list[str]:
    return [f"{p.name} ({p.stat().st_size / 1e6:.1f} MB)" for p in sorted(directory.glob("*")) if p.is_file()]


def _compact(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={json.dumps(v)}" for k, v in value.items())
    return "" if value is None else json.dumps(value)


if __name__ == "__main__":
    sys.exit(main())
