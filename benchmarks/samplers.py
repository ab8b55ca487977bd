"""Sampler accuracy per model call: diffkit beside diffusers, on the same exact model and noise.

The data are Gaussian, so the optimal eps-model is known in closed form and any error in the
samples is the sampler's own. For every sampler and step count it prints the number of model
calls and the KL divergence per dimension (nats) between the Gaussian fitted to the samples and
the true data distribution.

Four data sets:
  A  16-D, mean linspace(-1, 1), std linspace(0.1, 1)       -- unit-scale data
  B  16-D, mean 0, std log-spaced 0.05 .. 8                 -- multi-scale data, like the low
                                                              frequencies of an image
  C  16-D, mean linspace(1, 3), std linspace(0.1, 1.6)      -- means of order 2 (the core
                                                              accuracy issue's test)
  D  16-D, mean linspace(-8, 8), std log-spaced 0.5 .. 5      -- far above unit scale
  E  16-D, mean linspace(-0.1, 0.1), std log-spaced 0.005 .. 0.1 -- far below unit scale

``--start exact`` starts every sampler (ours and diffusers') from the exact q(x_{T-1}) of the
data instead of N(0, I) -- the same standardised draws, scaled and shifted -- which removes the
prior-mismatch floor below and leaves solver error (plus the final-denoise floor).

"calibrated" rows run ``Diffusion.sample`` with its defaults after
``diffkit.calibration.calibrate(diff, model, (512, 16))``: grids fitted to a fine-step reference
on 512 noise draws (seed + 100, not the evaluation noise); step counts without a stored grid
fall back to the default grid. Each data set also prints two closed-form floors
(``GaussianData.prior_mismatch_kl`` and ``posterior_mean_kl``): the KL that starting from
N(0, I) instead of q(x_{T-1}) costs (alpha_{T-1} > 0 on the linear schedule; the exact flow
preserves KL), and the KL of a first-order final jump from t = 0 to E[x0 | x_0], which shrinks
each dimension's variance by alpha_0^2 s^2 / (alpha_0^2 s^2 + sigma_0^2). diffkit's samplers
remove both by default: the start is moved to q(x_T)'s mean with the first prediction
(``start="prior"``, ``PriorMeanStart``) and the multistep solvers' final jump is second order
(``final_order=2``); diffusers' samplers keep both.

The starting noise is standardised per dimension (mean exactly 0, variance exactly 1), so
deterministic samplers -- affine maps on Gaussian data -- are measured without a Monte-Carlo
floor; stochastic samplers keep theirs (about 1/N).

    python benchmarks/samplers.py                 # a few minutes on 2 CPU cores
    python benchmarks/samplers.py --data C        # one data set
    python benchmarks/samplers.py --quick         # a smoke run, not a measurement (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

import diffkit
from diffkit import Diffusion, GaussianData
from diffkit.analytic import standardized_noise
from diffkit.calibration import calibrate

DATA_SETS = {
    "A": GaussianData(torch.linspace(-1, 1, 16), torch.linspace(0.1, 1.0, 16)),
    "B": GaussianData(torch.zeros(16), torch.logspace(math.log10(0.05), math.log10(8.0), 16)),
    "C": GaussianData(torch.linspace(1, 3, 16), torch.linspace(0.1, 1.6, 16)),
    "D": GaussianData(torch.linspace(-8, 8, 16), torch.logspace(math.log10(0.5), math.log10(5.0), 16)),
    "E": GaussianData(torch.linspace(-0.1, 0.1, 16), torch.logspace(math.log10(0.005), math.log10(0.1), 16)),
}
CALIBRATED = "defaults (calibrated)"
STATISTICS_ONLY = "dpm-v3 (statistics, default grid)"
GRID_ONLY = "unipc (fitted grid, no statistics)"


def floors(diff: Diffusion, data: GaussianData) -> tuple[float, float]:
    """(prior floor, final-denoise floor): closed-form KLs per dimension, nats (see the module docstring)."""
    return data.prior_mismatch_kl(diff.schedule), data.posterior_mean_kl(diff.schedule, 0.0)


# (label, sampler, options: log_snr_range for the grid, the rest for Diffusion.sample)
DIFFKIT_CONFIGS = [
    ("ddim (trailing)", "ddim", {}),
    ("euler (karras)", "euler", {}),
    ("heun (karras)", "heun", {}),
    ("dpm++2m (logsnr)", "dpm++2m", {}),
    ("dpm++3m (logsnr)", "dpm++3m", {}),
    ("unipc (logsnr)", "unipc", {}),
    ("unipc-3 (logsnr)", "unipc", {"sampler_options": {"order": 3}}),
    ("unipc (logsnr -4..8)", "unipc", {"log_snr_range": (-4.0, 8.0)}),
    ("unipc-3 (logsnr -4..8)", "unipc", {"log_snr_range": (-4.0, 8.0), "sampler_options": {"order": 3}}),
    ("dpm++2m (logsnr -4..8)", "dpm++2m", {"log_snr_range": (-4.0, 8.0)}),
]


LINEAR_1000 = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def diffusers_configs(**schedule):
    """(label, scheduler factory, dtype) for the diffusers configurations every comparison runs.

    ``schedule``: the schedulers' noise-schedule arguments (default: DDPM's linear schedule,
    T = 1000; ``benchmarks/image_samplers.py`` passes a checkpoint's ``trained_betas``).
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    common = schedule or LINEAR_1000
    return [
        ("DPM++2M default", lambda: DPMSolverMultistepScheduler(**common), torch.float64),
        ("DPM++2M lu_lambdas", lambda: DPMSolverMultistepScheduler(**common, use_lu_lambdas=True), torch.float64),
        ("DPM++2M karras", lambda: DPMSolverMultistepScheduler(**common, use_karras_sigmas=True), torch.float64),
        ("DPM++3M lu_lambdas", lambda: DPMSolverMultistepScheduler(**common, solver_order=3, use_lu_lambdas=True), torch.float64),
        # UniPC raises in float64 (mixed dtypes in its linear solve), so it runs in float32.
        ("UniPC-2 karras", lambda: UniPCMultistepScheduler(**common, use_karras_sigmas=True), torch.float32),
        ("UniPC-2 exponential", lambda: UniPCMultistepScheduler(**common, use_exponential_sigmas=True), torch.float32),
        ("UniPC-3 exponential", lambda: UniPCMultistepScheduler(**common, solver_order=3, use_exponential_sigmas=True), torch.float32),
        ("DDIM trailing", lambda: DDIMScheduler(**common, timestep_spacing="trailing", clip_sample=False), torch.float64),
    ]


@torch.no_grad()
def run_diffusers(make_scheduler, dtype, model, noise, steps):
    """A diffusers scheduler's ``steps``-step loop on ``model(x, t)`` (eps; t a (B,) long tensor)
    from ``noise``: (samples, network calls). ``dtype``: the state's dtype and the default dtype
    diffusers builds its tables in (None: the noise's own, and torch's default)."""
    scheduler = make_scheduler()
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        scheduler.set_timesteps(steps)
        x = noise.to(dtype or noise.dtype) * scheduler.init_noise_sigma
        calls = 0
        for t in scheduler.timesteps:
            eps = model(scheduler.scale_model_input(x, t), t.expand(x.shape[0]).long())
            calls += 1
            x = scheduler.step(eps, t, x).prev_sample
    finally:
        torch.set_default_dtype(previous)
    return x, calls


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000, help="samples per configuration (default 20000)")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50, 100], help="step counts to measure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run, not a measurement: data C (unless --data), 512 samples, 5 steps, a coarse "
                             "calibration")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--data", nargs="+", default=None, choices=list(DATA_SETS),
                        help="data sets (default: all; C with --quick)")
    parser.add_argument("--start", choices=["noise", "exact"], default="noise",
                        help="start from N(0, I) (default) or from the data's exact q(x_{T-1})")
    parser.add_argument("--calibrate-steps", type=int, nargs="+", default=[5, 10, 20],
                        help="step counts to fit calibrated grids for (default 5 10 20)")
    args = parser.parse_args(argv)
    # Calibration fits grids with hundreds of sampler runs; the smoke run asks for a few.
    calibration_effort = {}
    if args.quick:
        args.samples, args.steps, args.calibrate_steps = 512, [5], [5]
        args.data = args.data or ["C"]
        calibration_effort = {"max_evals": 8, "reference_steps": 20, "batch_size": 64}
    args.data = args.data or list(DATA_SETS)
    # diffusers also runs at twice each step count: the goal is its accuracy at half the calls.
    reference_steps = sorted(set(args.steps) | {2 * s for s in args.steps})

    started = time.time()
    diff = Diffusion("linear", 1000, prediction="eps")
    noise = standardized_noise(args.samples, 16, args.seed)
    results, calibration_seconds = [], {}
    data_sets = {name: DATA_SETS[name] for name in args.data}
    standard = noise
    for data_name, data in data_sets.items():
        model = data.model(diff.schedule)
        noise = standard
        if args.start == "exact":
            a_T, s_T = diff.schedule.alpha_at(torch.tensor(999)), diff.schedule.sigma_at(torch.tensor(999))
            noise = a_T * data.mean + (a_T**2 * data.std**2 + s_T**2).sqrt() * standard
        # Our samplers move an N(0, I) start to q(x_T)'s mean by default; an exact start stays as it is.
        start = "noise" if args.start == "exact" else "prior"
        tick = time.time()
        calibrated = calibrate(diff, model, (512, 16), steps=[s for s in args.calibrate_steps if s >= 2],
                               generator=torch.Generator().manual_seed(args.seed + 100), dtype=torch.float64,
                               **calibration_effort)
        calibration_seconds[data_name] = time.time() - tick
        for steps in args.steps:
            x = calibrated.sample(model, noise.shape, steps=steps, noise=noise, dtype=torch.float64, start=start)
            results.append(dict(data=data_name, library="diffkit", config=CALIBRATED, steps=steps,
                                calls=steps, kl=data.kl_per_dim(x),
                                grid=calibrated.calibration.get("grids", {}).get(f"{calibrated.default_sampler}/{steps}")))
        # What each half of the calibration adds: the statistics alone on the default grid, and
        # the fitted grid alone (UniPC, the default before statistics existed).
        grid_only = calibrate(diff, model, (512, 16), steps=[s for s in args.calibrate_steps if s >= 2],
                              model_statistics=False, generator=torch.Generator().manual_seed(args.seed + 100),
                              dtype=torch.float64, **calibration_effort)
        for steps in args.steps:
            for label, source, grid in ((STATISTICS_ONLY, calibrated, calibrated.sampling_grid(steps, calibrated=False)),
                                        (GRID_ONLY, grid_only, None)):
                x = source.sample(model, noise.shape, steps=None if grid is not None else steps, grid=grid, noise=noise,
                                  dtype=torch.float64, start=start)
                results.append(dict(data=data_name, library="diffkit", config=label, steps=steps, calls=steps,
                                    kl=data.kl_per_dim(x)))
        for label, sampler, options in DIFFKIT_CONFIGS:
            for steps in args.steps:
                # A fresh copy each time: the grid's option must not be popped for good.
                sample_options = dict(options)
                log_snr_range = sample_options.pop("log_snr_range", None)
                grid = diff.sampling_grid(steps, sampler=sampler, log_snr_range=log_snr_range)
                x = diff.sample(model, noise.shape, sampler=sampler, grid=grid, noise=noise, dtype=torch.float64,
                                start=start, generator=torch.Generator().manual_seed(args.seed + 1), **sample_options)
                results.append(dict(data=data_name, library="diffkit", config=label, steps=steps,
                                    calls=diffkit.model_calls(sampler, steps), kl=data.kl_per_dim(x)))
        for label, make, dtype in diffusers_configs():
            for steps in reference_steps:
                try:
                    x, calls = run_diffusers(make, dtype, model, noise, steps)
                    kl = data.kl_per_dim(x)
                except Exception as error:  # report a reference's failure instead of hiding the row
                    calls, kl = steps, float("nan")
                    print(f"diffusers {label} at {steps} steps failed: {error}")
                results.append(dict(data=data_name, library="diffusers", config=label, steps=steps, calls=calls, kl=kl))

    print(f"# Sampler accuracy: KL(samples || data) per dimension, nats; {args.samples} samples, seed {args.seed}, "
          f"start {'N(0, I)' if args.start == 'noise' else 'exact q(x_T)'}")
    print(f"# exact eps-model, linear schedule (1e-4..0.02), T=1000; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    for data_name, data in data_sets.items():
        prior_floor, shrink_floor = floors(diff, data)
        print(f"\n## data {data_name}: mean {data.mean.min():.3g}..{data.mean.max():.3g}, "
              f"std {data.std.min():.3g}..{data.std.max():.3g}\n")
        print(f"closed-form floors: prior mismatch {prior_floor:.1e}, final denoise from t = 0 {shrink_floor:.1e}; "
              f"calibration took {calibration_seconds[data_name]:.0f} s\n")
        print("| library | configuration | " + " | ".join(f"{s} steps (calls)" for s in args.steps) + " |")
        print("|---|---|" + "---|" * len(args.steps))
        configs = dict.fromkeys((r["library"], r["config"]) for r in results if r["data"] == data_name)
        for library, config in configs:
            rows = {r["steps"]: r for r in results if r["data"] == data_name and r["config"] == config and r["library"] == library}
            cells = [f"{rows[s]['kl']:.1e} ({rows[s]['calls']})" if s in rows else "-" for s in args.steps]
            print(f"| {library} | {config} | " + " | ".join(cells) + " |")
        print()
        for calls in args.steps:
            ours = next(r for r in results if r["data"] == data_name and r["config"] == CALIBRATED and r["steps"] == calls)
            theirs = [r for r in results if r["data"] == data_name and r["library"] == "diffusers"
                      and r["calls"] <= 2 * calls and not math.isnan(r["kl"])]
            same = min((r for r in theirs if r["calls"] <= calls), key=lambda r: r["kl"])
            double = min(theirs, key=lambda r: r["kl"])
            print(f"- calibrated defaults at {calls} calls: {ours['kl']:.1e}; diffusers best at {calls} calls "
                  f"{same['kl']:.1e} ({same['config']}; ratio {same['kl'] / ours['kl']:.1f}x), at {2 * calls} calls "
                  f"{double['kl']:.1e} ({double['config']}; ratio {double['kl'] / ours['kl']:.1f}x): half the calls "
                  f"{'met' if ours['kl'] <= double['kl'] else 'NOT met'}")
        for calls in args.steps:
            best = {lib: min((r for r in results if r["data"] == data_name and r["library"] == lib and r["calls"] <= calls
                              and r["config"] != CALIBRATED
                              and not math.isnan(r["kl"])), key=lambda r: r["kl"], default=None)
                    for lib in ("diffkit", "diffusers")}
            if best["diffkit"] and best["diffusers"]:
                ratio = best["diffusers"]["kl"] / best["diffkit"]["kl"]
                print(f"- at <= {calls} calls: diffkit best {best['diffkit']['kl']:.1e} ({best['diffkit']['config']}), "
                      f"diffusers best {best['diffusers']['kl']:.1e} ({best['diffusers']['config']}): ratio {ratio:.1f}x")
    print(f"\nwall time {time.time() - started:.0f} s")
    for data_name in data_sets:
        print(f"calibrated grids, data {data_name}: " + "; ".join(
            f"{r['steps']}: {[round(t, 1) for t in r['grid']['times']]} {r['grid']['sampler_options']}"
            for r in results if r["data"] == data_name and r["config"] == CALIBRATED and r["grid"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
