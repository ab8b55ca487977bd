"""Where the steps go: default spacings on the trained 2-D mixture of mixture_samplers.py and on Gaussian data.

The uncalibrated grid decides how few-step sampling goes. This trains (or reuses the
cached weights of) ``benchmarks/mixture_samplers.py``'s flow and eps models and scores every
sampler of interest on the log-SNR grid (full, and narrowed to a log-SNR range as
``sampling_grid(..., log_snr_range=...)`` does) and on the grid uniform in s (the flow path's
default), by the same energy distance to fresh data (x 1e-3; the floor of two data draws is about
0.2 +- 0.45). A second table puts the eps path's log-SNR, uniform (trailing) and Karras grids on
``benchmarks/samplers.py``'s Gaussian data sets, whose exact model leaves only the sampler's error:
a spacing chosen for one kind of data can be read against the other.

    python benchmarks/mixture_spacing.py            # writes benchmarks/results/mixture_spacing.md
    python benchmarks/mixture_spacing.py --quick    # seconds; prints only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import mixture_samplers as ms  # noqa: E402

import diffkit  # noqa: E402
from diffkit.runs import hardware_summary  # noqa: E402

# (sampler, spacing, log_snr_range): the range narrows a log-SNR grid (see diffkit.schedules.respace)
ROWS = (("unipc", "logsnr", None), ("unipc", "logsnr", (-4.0, 8.0)), ("unipc", "logsnr", (-3.0, 6.0)),
        ("unipc", "logsnr", (-5.0, 10.0)), ("dpm++2m", "logsnr", (-4.0, 8.0)), ("unipc", "trailing", None),
        ("dpm++2m", "trailing", None), ("dpm++3m", "trailing", None), ("ddim", "trailing", None))


# The eps path's uncalibrated grid against the alternatives on data whose model is exact.
GAUSSIAN_ROWS = (("unipc", "logsnr"), ("unipc", "trailing"), ("unipc", "karras"), ("dpm++2m", "logsnr"),
                 ("dpm++2m", "trailing"))


def gaussian_rows(seed: int, n: int, calls) -> list[str]:
    """The same spacings on ``benchmarks/samplers.py``'s Gaussian data sets, exact eps-model, linear
    schedule: KL(samples || data) per dimension, nats (the scale there differs from the mixture's)."""
    from samplers import DATA_SETS  # benchmarks/samplers.py

    from diffkit.analytic import standardized_noise

    diff = diffkit.Diffusion("linear", 1000, prediction="eps")
    noise = standardized_noise(n, 16, seed)
    lines = ["", f"The eps path's grids on Gaussian data (data sets A-E of `benchmarks/samplers.py`, exact eps-model, "
                 f"linear schedule, {n} samples): KL(samples || data) per dimension, nats, lower is better.", "",
             "| data | sampler | spacing | " + " | ".join(f"{k} calls" for k in calls) + " |",
             "|---|---|---|" + "---|" * len(calls)]
    for name, data in DATA_SETS.items():
        model = data.model(diff.schedule)
        for sampler, spacing in GAUSSIAN_ROWS:
            cells = []
            for k in calls:
                grid = diff.sampling_grid(k, spacing, sampler=sampler)
                x = diff.sample(model, noise.shape, sampler=sampler, grid=grid, noise=noise, dtype=torch.float64)
                cells.append(f"{data.kl_per_dim(x):.1e}")
            lines.append(f"| {name} | {sampler} | {spacing} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model and few samples; writes nothing unless --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    train_steps, n, calls = (200, 512, (5, 10)) if args.quick else (4000, 10000, (5, 10, 20, 40))
    cache = None if args.quick else ms.cache_dir(args.seed, train_steps)
    lines = ["# Grid spacing: uniform against log-SNR grids on a trained network and on Gaussian data", "",
             f"Command: `python benchmarks/mixture_spacing.py{' --quick' if args.quick else ''}` (seed {args.seed}); "
             f"{hardware_summary()}; models of `benchmarks/mixture_samplers.py` ({train_steps} training steps); "
             f"{n} samples against {n} fresh data points; energy distance x 1e-3, lower is better.", "",
             "| model | sampler | spacing | " + " | ".join(f"{k} calls" for k in calls) + " |",
             "|---|---|---|" + "---|" * len(calls)]
    reference = ms.sample_mixture(n, torch.Generator().manual_seed(args.seed + 123))
    score = ms.Scorer(reference)
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(args.seed + 7))
    for name, diff in (("flow", diffkit.Diffusion("flow", 1000, "flow")), ("eps", diffkit.Diffusion("linear", 1000))):
        model, _ = ms.trained_model(name, diff, train_steps, args.seed, cache)
        for sampler, spacing, log_snr_range in ROWS:
            cells = []
            for k in calls:
                grid = diff.sampling_grid(k, spacing, sampler=sampler, log_snr_range=log_snr_range)
                x = diff.sample(model, noise.shape, sampler=sampler, grid=grid, noise=noise)
                cells.append(f"{score(x)['energy'] * 1e3:.2f}")
            narrowed = "" if log_snr_range is None else " {:g}..{:g}".format(*log_snr_range)
            lines.append(f"| {name} | {sampler} | {spacing}{narrowed} | " + " | ".join(cells) + " |")
    lines += gaussian_rows(args.seed, 2000 if args.quick else 20000, calls[:3])
    lines += ["", f"Wall time {time.time() - started:.0f} s. The flow path's default is uniform in s for every "
              "sampler; the table schedules keep each sampler's own spacing. 'logsnr a..b': the log-SNR grid with "
              "its points after the first placed between log-SNR a and b."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out if args.out is not None else (None if args.quick else ROOT / "benchmarks" / "results" / "mixture_spacing.md")
    if out is not None:
        out.write_text(text)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
