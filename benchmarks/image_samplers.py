"""Sampler accuracy per model call on the shipped image model: diffkit beside diffusers, in FD.

The image counterpart of ``benchmarks/samplers.py``. Every row samples the same class-conditional
digits (labels ``arange(N) % 10``) from the same network, with the checkpoint's default
classifier-free guidance scale and the same starting noise (``seeded_generator(seed)``, drawn
as ``generate_images`` draws it with one batch). The score is the Frechet distance in the
project's digit-classifier features to the 359 held-out test digits, as in
``benchmarks/image_quality.py``. One "call" is one guided network evaluation (a doubled batch:
conditional and unconditional halves), the same for every row.

Rows:
- diffkit defaults: ``model.diffusion.sample`` exactly as ``generate_images`` calls it (the
  checkpoint's sampler, its calibrated grid for K steps where the config stores one, the prior
  start, second-order final step, ``ClipX0(-1, 1)``);
- diffkit uncalibrated: the same but on the uncalibrated default grid
  (``sampling_grid(K, calibrated=False)``);
- diffusers: its schedulers (the configurations of ``samplers.py``) built on the checkpoint's
  betas (``trained_betas``), stepped on the same network wrapped as a guided eps-predictor for
  integer timesteps, at K and 2K calls so "half the calls" can be read off. diffusers' defaults
  are kept (``thresholding=False``, no x0 clipping) except ``clip_sample=False`` for DDIM;
  diffkit clips x0_hat to [-1, 1] as ``generate_images`` does.
- a diffkit reference at many steps (default 100, uncalibrated grid; image_quality.py has FD 43.8 at
  50 steps and 44.0 at 1000), and the real-data floor
  (FD of as many real digits the classifier never saw, mean +- std over 10 draws).

Every row's output is clamped to [-1, 1] before scoring (``to_unit_range``, as generate does and
as diffusers' pipelines post-process).

    python benchmarks/image_samplers.py            # ~20 min on 1 thread of a shared 2-core CPU
    python benchmarks/image_samplers.py --quick    # 20 samples, 5 steps, two diffusers configs (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # samplers.py: the same diffusers configurations

import diffkit  # noqa: E402
import samplers as sampler_benchmark  # noqa: E402
from diffkit.runs import hardware_summary, seeded_generator  # noqa: E402
from diffkit.utils import randn  # noqa: E402
from modalities.image.data import load_digits, to_unit_range  # noqa: E402
from modalities.image.metrics import frechet_distance, load_digit_classifier  # noqa: E402
from modalities.image.modality import (  # noqa: E402
    DEFAULT_CHECKPOINT,
    load_image_model,
)

DEFAULTS = "diffkit defaults"
UNCALIBRATED = "diffkit uncalibrated grid"
REFERENCE = "diffkit reference"
FLOOR = "real digits (floor)"


def diffusers_configs(betas: torch.Tensor, quick: bool = False):
    """(label, factory) for samplers.py's diffusers configurations on the checkpoint's own betas."""
    configs = [(label, make) for label, make, _ in
               sampler_benchmark.diffusers_configs(num_train_timesteps=len(betas), trained_betas=betas.double().numpy())]
    if quick:
        configs = [c for c in configs if c[0] in ("DPM++2M default", "UniPC-2 karras")]
    return configs


def guided_eps_model(model, labels: torch.Tensor, guidance_scale: float):
    """The network as diffusers wants it: eps(x_t, t), t the batch's one integer time, guided.

    The core's own denoiser on a one-point grid at t, so guidance (one doubled batch) and the
    conversion of the network's prediction to eps are the very ones diffkit samples with.
    """
    diff = model.diffusion

    @torch.no_grad()
    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        grid = diffkit.SamplingGrid.from_times(diff.schedule, [float(t.flatten()[0])])
        denoise = diff.denoiser(model.net, grid, cond={"labels": labels}, guidance_scale=guidance_scale)
        return denoise(x, 0).eps

    return eps


@torch.no_grad()
def diffkit_samples(model, noise: torch.Tensor, labels: torch.Tensor, guidance_scale: float, *,
                    steps: int | None = None, grid=None, sampler: str | None = None) -> torch.Tensor:
    """``model.diffusion.sample`` as ``generate_images`` calls it (its wrappers, guidance and
    conditioning), on explicit ``noise``; output in [-1, 1] before the final clamp."""
    sampler = sampler or model.default("sampler")
    return model.diffusion.sample(
        model.net, tuple(noise.shape), sampler=sampler, steps=steps, grid=grid, noise=noise,
        guidance_scale=float(guidance_scale), wrappers=[diffkit.ClipX0(-1.0, 1.0)], labels=labels,
    )


def starting_noise(model, n: int, seed: int) -> torch.Tensor:
    """The noise ``generate_images(num_samples=n, seed=seed, batch_size>=n)`` starts from."""
    c, s = model.channels, model.image_size
    return randn((n, c, s, s), generator=seeded_generator(seed), dtype=torch.float32)


def real_floor(clf, train, test_features, n: int, seed: int) -> tuple[float, float]:
    """FD of n real digits the classifier never saw vs the held-out set: mean, std over 10 draws."""
    from modalities.image.metrics import classifier_split

    g = torch.Generator().manual_seed(seed)
    unseen = train[classifier_split()[1]]
    fds = torch.tensor([frechet_distance(clf.embed(unseen[torch.randperm(len(unseen), generator=g)[:n]]), test_features)
                        for _ in range(10)])
    return float(fds.mean()), float(fds.std(unbiased=False))


def cell(row: dict | None, key: str) -> str:
    if row is None:
        return "-"
    if "error" in row:
        return "failed"
    return f"{row[key]:.1f}"


def markdown(results: list[dict], steps: list[int], all_steps: list[int], setup: dict, floor: tuple,
             summary: list[str]) -> str:
    lines = [
        "# Sampler accuracy per model call on the image model (benchmarks/image_samplers.py)",
        "",
        f"FD (digit-classifier features) of {setup['samples']} class-conditional samples (labels "
        f"arange({setup['samples']}) % 10, guidance w = {setup['guidance_scale']}) against the "
        f"{setup['held_out']} held-out test digits; every row from the same network and the same starting "
        f"noise (seed {setup['seed']}). Lower is better; FD with this many samples carries a few units of "
        "noise (see the floor's std). Calls = guided network evaluations.",
        "",
        "| library | configuration | " + " | ".join(f"{k} calls" for k in all_steps) + " | seconds |",
        "|---|---|" + "---|" * len(all_steps) + "---|",
    ]
    configs = dict.fromkeys((r["library"], r["config"]) for r in results)
    for library, config in configs:
        rows = {r["calls"]: r for r in results if r["library"] == library and r["config"] == config}
        if config == REFERENCE:
            (r,) = rows.values()
            lines.append(f"| {library} | {config} ({r['calls']} calls) | " + " | ".join(
                f"{r['fd']:.1f}" for _ in all_steps) + f" | {r['seconds']:.0f} |")
            continue
        cells = [cell(rows.get(k), "fd") for k in all_steps]
        seconds = sum(r["seconds"] for r in rows.values())
        lines.append(f"| {library} | {config} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    lines.append(f"| real data | {FLOOR}, {setup['samples']} digits | " + " | ".join(
        f"{floor[0]:.1f} ± {floor[1]:.1f}" for _ in all_steps) + " | - |")
    lines += ["", "FD of each row's samples against the reference row's samples (solver error more than "
              "model error; same noise, so lower = closer to the converged diffkit sampler, which "
              "favours diffkit's clipping):", "",
              "| library | configuration | " + " | ".join(f"{k} calls" for k in all_steps) + " |",
              "|---|---|" + "---|" * len(all_steps)]
    for library, config in configs:
        if config == REFERENCE:
            continue
        rows = {r["calls"]: r for r in results if r["library"] == library and r["config"] == config}
        cells = [cell(rows.get(k), "fd_ref") for k in all_steps]
        lines.append(f"| {library} | {config} | " + " | ".join(cells) + " |")
    failures = sorted({f"{r['config']} at {r['steps']} steps: {r['error']}" for r in results if "error" in r})
    if failures:
        lines += ["", "Failed diffusers runs (on this checkpoint's cosine schedule sigma/alpha reaches ~2e4 at "
                  "t = T-1, so karras / exponential sigma grids map many steps onto the same integer timestep "
                  "near T; diffusers' step-index lookup then runs off the end (IndexError) or UniPC asserts):", ""] + [f"- {f}" for f in failures]
    lines += ["", "Half the calls (diffkit defaults at K calls vs the best diffusers configuration at K "
              "and at 2K calls, FD to the held-out digits):", ""] + summary
    lines += ["", f"command: `{setup['command']}`", f"seed: {setup['seed']}", f"hardware: {setup['hardware']}",
              f"wall time: {setup['wall_time_s']:.0f} s", f"checkpoint: {setup['checkpoint']} "
              f"(prediction {setup['prediction']}, sampler {setup['sampler']})", ""]
    return "\n".join(lines)


def half_the_calls(results: list[dict], steps: list[int], key: str = "fd") -> list[str]:
    lines = []
    for k in steps:
        ours = next((r for r in results if r["config"] == DEFAULTS and r["calls"] == k), None)
        theirs = [r for r in results if r["library"] == "diffusers" and not math.isnan(r[key])]
        same = min((r for r in theirs if r["calls"] <= k), key=lambda r: r[key], default=None)
        double = min((r for r in theirs if r["calls"] <= 2 * k), key=lambda r: r[key], default=None)
        if ours is None or same is None or double is None:
            continue
        lines.append(f"- {k} calls: diffkit defaults {ours[key]:.1f}; diffusers best at {k} calls {same[key]:.1f} "
                     f"({same['config']}), at <= {2 * k} calls {double[key]:.1f} ({double['config']}, "
                     f"{double['calls']} calls): half the calls "
                     f"{'met' if ours[key] <= double[key] else 'NOT met'}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20], help="diffkit call budgets")
    p.add_argument("--reference-steps", type=int, default=100, help="steps of the converged diffkit row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="20 samples, 5 steps, two diffusers configs, 10-step reference; "
                                                        "writes to a temporary folder unless --out-dir is given")
    p.add_argument("--out-dir", help="where the .md/.json go (default: benchmarks/results)")
    p.add_argument("--name", default="image_samplers", help="file name stem of the .md/.json written")
    args = p.parse_args(argv)
    scratch = None
    if args.quick:
        args.num_samples, args.steps, args.reference_steps = 20, [5], 10
        if args.out_dir is None:
            scratch = tempfile.TemporaryDirectory(prefix="image_samplers-quick-")  # removed when main returns
            args.out_dir = scratch.name
    args.out_dir = args.out_dir or "benchmarks/results"
    command = "python benchmarks/image_samplers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()

    torch.manual_seed(args.seed)
    model = load_image_model(args.checkpoint, "cpu")
    if model.num_classes is None or model.is_text_conditional or model.is_super_resolution:
        raise SystemExit("this benchmark needs a class-conditional image checkpoint")
    clf = load_digit_classifier()
    train, _ = load_digits(image_size=model.image_size, split="train")
    test, _ = load_digits(image_size=model.image_size, split="test")
    test_features = clf.embed(test)

    n = args.num_samples
    labels = torch.arange(n) % model.num_classes
    w = float(model.default("guidance_scale"))
    sampler = model.default("sampler")
    noise = starting_noise(model, n, args.seed)
    diff = model.diffusion

    def score(x):
        return clf.embed(to_unit_range(x.float()) * 2 - 1)

    results, features_of = [], []

    def record(library, config, steps, calls, x, seconds):
        features = score(x)
        row = dict(library=library, config=config, steps=steps, calls=calls,
                   fd=frechet_distance(features, test_features), fd_ref=float("nan"), seconds=seconds)
        results.append(row)
        features_of.append((row, features))
        print(f"{library:9s} {config:28s} {calls:3d} calls: FD {row['fd']:7.2f}  ({seconds:.0f} s)", flush=True)

    for k in args.steps:
        tick = time.perf_counter()
        x = diffkit_samples(model, noise, labels, w, steps=k)
        record("diffkit", DEFAULTS, k, diffkit.model_calls(sampler, k), x, time.perf_counter() - tick)
    for k in args.steps:
        tick = time.perf_counter()
        x = diffkit_samples(model, noise, labels, w, grid=diff.sampling_grid(k, sampler=sampler, calibrated=False))
        record("diffkit", UNCALIBRATED, k, diffkit.model_calls(sampler, k), x, time.perf_counter() - tick)

    eps_model = guided_eps_model(model, labels, w)
    diffusers_steps = sorted(set(args.steps) | {2 * k for k in args.steps})
    for label, make in diffusers_configs(diff.schedule.betas, quick=args.quick):
        for k in diffusers_steps:
            tick = time.perf_counter()
            try:
                x, calls = sampler_benchmark.run_diffusers(make, None, eps_model, noise, k)
                record("diffusers", label, k, calls, x, time.perf_counter() - tick)
            except Exception as error:  # report a failing configuration instead of hiding the row
                reason = f"{type(error).__name__}: {error}".rstrip(": ")
                print(f"diffusers {label} at {k} steps failed: {reason}", flush=True)
                results.append(dict(library="diffusers", config=label, steps=k, calls=k, fd=float("nan"),
                                    fd_ref=float("nan"), seconds=time.perf_counter() - tick, error=reason))
    # The converged row last, so the rows above print while it runs; FD to it is filled in afterwards.
    tick = time.perf_counter()
    x = diffkit_samples(model, noise, labels, w, steps=args.reference_steps)
    ref_features = score(x)
    ref_row = dict(library="diffkit", config=REFERENCE, steps=args.reference_steps,
                   calls=diffkit.model_calls(sampler, args.reference_steps),
                   fd=frechet_distance(ref_features, test_features), fd_ref=0.0,
                   seconds=time.perf_counter() - tick)
    print(f"reference {args.reference_steps} steps: FD {ref_row['fd']:.2f} ({ref_row['seconds']:.0f} s)", flush=True)
    for row, features in features_of:
        row["fd_ref"] = frechet_distance(features, ref_features)
    results.append(ref_row)
    floor = real_floor(clf, train, test_features, n, args.seed)

    summary = half_the_calls(results, args.steps)
    setup = dict(command=command, seed=args.seed, samples=n, guidance_scale=w, held_out=len(test),
                 hardware=hardware_summary(), wall_time_s=time.perf_counter() - started,
                 checkpoint=str(args.checkpoint), prediction=diff.prediction, sampler=sampler,
                 reference_steps=args.reference_steps)
    all_steps = sorted({r["calls"] for r in results if r["config"] != REFERENCE})
    text = markdown(results, args.steps, all_steps, setup, floor, summary)
    print()
    print(text)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text(text)
    (out / f"{args.name}.json").write_text(json.dumps(
        {"setup": setup, "floor": {"fd": floor[0], "fd_std": floor[1]}, "rows": results,
         "half_the_calls": summary}, indent=1))
    print(f"wrote {out / args.name}.{{md,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
