"""Sampler accuracy per model call on a TRAINED network whose data density is known.

``benchmarks/samplers.py`` measures samplers on Gaussian data with the exact model; there the
model's statistics make any step count exact, so it no longer tells samplers apart. Here a
small MLP is trained on a 2-D mixture of 8 Gaussians and the samplers run on that network:

- data: 8 equal-weight isotropic Gaussians, means on a circle of radius 2 (angles 2 pi k / 8),
  std 0.1 each (``MIXTURE_RADIUS``, ``MIXTURE_STD``); its density is exact;
- models: a residual MLP (sinusoidal time embedding, 3 residual SiLU-Linear layers of width 128) trained
  with ``diffkit.Diffusion("linear", 1000, "eps").loss`` for 4000 Adam steps at batch 512
  (fresh data every step, seeded), and the same network and budget on the flow-matching path
  ``diffkit.Diffusion(schedule="flow", prediction="flow")`` (x_s = (1 - s) x0 + s eps, the
  model predicts eps - x0 and is told s);
- score: the energy distance between N samples and N fresh data points (the unbiased
  U-statistic: 2 E|X - Y| - E|X - X'| - E|Y - Y'| with i != j in the last two, so two draws of
  the data score 0 on average; the floor is reported as the mean and spread over independent
  data draws), and, since the density is known, the mean exact log-density of the samples
  minus that of fresh data (0 is ideal; negative: samples off the modes, positive: too
  concentrated on them; it is not a divergence).

Every row samples from the same N starting noises (common random numbers), scored against the
same reference data. Rows, at 5, 10, 20 and 40 model calls:

- diffkit defaults, uncalibrated: ``diff.sample(model, shape, steps=K)`` (default start
  ``"prior"``), and the same with ``start="noise"``;
- diffkit calibrated: ``calibrate(diff, model, (512, 2), steps=(5, 10, 20, 40))`` (a new
  Diffusion; its default sampler), sampled with the default start; and calibrated with
  ``sample_kwargs={"start": "noise"}`` (grids fitted to that start) sampled with
  ``start="noise"``;
- every sampler in ``diffkit.SAMPLERS``, uncalibrated, on its default grid, with both starts
  (heun at ``(K + 1) // 2`` steps: ``diffkit.model_calls`` says 2 per step minus 1);
- diffusers' schedulers on the same betas (linear 1e-4..0.02, T = 1000): the configurations of
  ``benchmarks/samplers.py`` plus UniPC and DPM++2M defaults, Euler and Heun (default, Karras,
  trailing), at K and 2K calls; "diffusers' best" is the best configuration with at most that
  many calls;
- the flow model: every diffkit sampler, its defaults uncalibrated and calibrated, and diffusers'
  ``FlowMatchEulerDiscreteScheduler`` (rectified-flow Euler).

    python benchmarks/mixture_samplers.py          # writes benchmarks/results/mixture_samplers.md and .json
    python benchmarks/mixture_samplers.py --quick --out /tmp/m.md   # seconds; --quick writes nothing without --out
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # samplers.py: the same diffusers configurations

import diffkit  # noqa: E402
from diffkit.calibration import calibrate  # noqa: E402
from diffkit.runs import hardware_summary  # noqa: E402

MIXTURE_MODES = 8
MIXTURE_RADIUS = 2.0
MIXTURE_STD = 0.1
CALLS = (5, 10, 20, 40)
RESULTS = Path(__file__).resolve().parent / "results"

DEFAULTS = "diffkit defaults, uncalibrated"
DEFAULTS_NOISE = 'diffkit defaults, uncalibrated, start="noise"'
CALIBRATED = "diffkit calibrated"
CALIBRATED_NOISE = 'diffkit calibrated (fitted with start="noise"), start="noise"'
CALIBRATED_PRIOR_FIT_NOISE = 'diffkit calibrated (fitted with start="prior"), start="noise"'
DIFFUSERS_BEST = "diffusers' best of the configurations"


# --------------------------------------------------------------------------- data
def mixture_means(radius: float = MIXTURE_RADIUS, modes: int = MIXTURE_MODES) -> torch.Tensor:
    angles = 2 * math.pi * torch.arange(modes, dtype=torch.float64) / modes
    return radius * torch.stack([angles.cos(), angles.sin()], dim=1)


def sample_mixture(n: int, generator: torch.Generator, *, radius: float = MIXTURE_RADIUS,
                   std: float = MIXTURE_STD, shift=(0.0, 0.0)) -> torch.Tensor:
    """n draws (float32) of the mixture; ``shift`` moves every mode (for tests)."""
    means = mixture_means(radius)
    k = torch.randint(0, len(means), (n,), generator=generator)
    x = means[k] + std * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return (x + torch.tensor(shift, dtype=torch.float64)).float()


def mixture_log_density(x: torch.Tensor, *, radius: float = MIXTURE_RADIUS, std: float = MIXTURE_STD) -> torch.Tensor:
    """The exact log-density of the mixture at x (N, 2), float64."""
    means = mixture_means(radius)
    d2 = (x.to(torch.float64)[:, None, :] - means[None]).pow(2).sum(-1)
    log_comp = -d2 / (2 * std**2) - math.log(2 * math.pi * std**2) - math.log(len(means))
    return torch.logsumexp(log_comp, dim=1)


def _distance_sum(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> float:
    total = 0.0
    for i in range(0, len(a), chunk):
        total += float(torch.cdist(a[i:i + chunk], b).sum())
    return total


def energy_distance(x: torch.Tensor, y: torch.Tensor, *, y_self: float | None = None) -> float:
    """The unbiased (U-statistic) energy distance between samples x (N, d) and y (M, d).

    2 mean|x_i - y_j| - mean_{i != j}|x_i - x_j| - mean_{i != j}|y_i - y_j|: zero in expectation
    when x and y come from the same distribution. ``y_self``: y's own term, when precomputed.
    """
    x, y = x.to(torch.float64), y.to(torch.float64)
    n, m = len(x), len(y)
    xy = _distance_sum(x, y) / (n * m)
    xx = _distance_sum(x, x) / (n * (n - 1))
    yy = y_self if y_self is not None else _distance_sum(y, y) / (m * (m - 1))
    return 2 * xy - xx - yy


# --------------------------------------------------------------------------- model
class MixtureMLP(nn.Module):
    """A residual MLP for (B, 2) points: sinusoidal time features, 3 residual SiLU-Linear blocks of width 128."""

    def __init__(self, time_scale: float, width: int = 128, blocks: int = 3):
        super().__init__()
        self.time = diffkit.nn.TimeEmbedding(64, width, scale=time_scale)
        self.inp = nn.Linear(2, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(width, width)) for _ in range(blocks))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = self.inp(x.float()) + self.time(t.float())
        for block in self.blocks:
            h = h + block(h)
        return self.out(h).to(dtype)


def train(diff: diffkit.Diffusion, steps: int, seed: int, batch: int = 512, lr: float = 2e-3) -> tuple[nn.Module, dict]:
    """A MixtureMLP trained on fresh mixture draws with ``diff.loss`` (Adam, cosine decay); seeded."""
    torch.manual_seed(seed)
    model = MixtureMLP(time_scale=1000.0 if diff.schedule.is_continuous else 1.0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed + 10)
    started, cpu_started, losses = time.time(), time.process_time(), []
    for _ in range(steps):
        loss = diff.loss(model, sample_mixture(batch, g), generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval().requires_grad_(False)
    tail = losses[-max(len(losses) // 10, 1):]
    return model, {"seconds": time.time() - started, "cpu_seconds": time.process_time() - cpu_started,
                   "final_loss": sum(tail) / len(tail), "steps": steps}


# --------------------------------------------------------------------------- diffusers
def diffusers_configs(quick: bool = False):
    """(label, factory, dtype): samplers.py's configurations plus UniPC/DPM defaults, Euler and Heun."""
    from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler, UniPCMultistepScheduler

    import samplers as sampler_benchmark

    common = sampler_benchmark.LINEAR_1000
    configs = list(sampler_benchmark.diffusers_configs())
    configs += [
        ("UniPC-2 default", lambda: UniPCMultistepScheduler(**common), torch.float32),
        ("Euler default", lambda: EulerDiscreteScheduler(**common), torch.float64),
        ("Euler trailing", lambda: EulerDiscreteScheduler(**common, timestep_spacing="trailing"), torch.float64),
        ("Euler karras", lambda: EulerDiscreteScheduler(**common, use_karras_sigmas=True), torch.float64),
        ("Heun default", lambda: HeunDiscreteScheduler(**common), torch.float64),
        ("Heun trailing", lambda: HeunDiscreteScheduler(**common, timestep_spacing="trailing"), torch.float64),
        ("Heun karras", lambda: HeunDiscreteScheduler(**common, use_karras_sigmas=True), torch.float64),
    ]
    if quick:
        configs = [c for c in configs if c[0] in ("DPM++2M default", "Heun default")]
    return configs


@torch.no_grad()
def run_diffusers(make_scheduler, dtype, model, noise: torch.Tensor, steps: int, time_scale: float = 1.0):
    """samplers.py's diffusers loop, but the model is told the scheduler's (float) timestep
    times ``time_scale`` as it is (Euler and Heun interpolate between integer times).
    Returns (samples as float32, network calls)."""
    scheduler = make_scheduler()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        scheduler.set_timesteps(steps)
        x = noise.to(dtype) * getattr(scheduler, "init_noise_sigma", 1.0)
        scale_input = getattr(scheduler, "scale_model_input", lambda x, t: x)
        calls = 0
        for t in scheduler.timesteps:
            out = model(scale_input(x, t), (t * time_scale).to(torch.float64).expand(x.shape[0]))
            calls += 1
            x = scheduler.step(out.to(dtype), t, x).prev_sample
    finally:
        torch.set_default_dtype(previous)
    return x.float(), calls


def diffusers_steps(label: str, calls: int) -> int:
    """Steps that make at most ``calls`` network calls (Heun: 2 per step minus 1)."""
    return (calls + 1) // 2 if label.startswith("Heun") else calls


def diffkit_steps(sampler: str, calls: int) -> int:
    steps = calls
    while steps > 1 and diffkit.model_calls(sampler, steps) > calls:
        steps -= 1
    return steps


# --------------------------------------------------------------------------- the benchmark
class Scorer:
    def __init__(self, reference: torch.Tensor):
        self.reference = reference
        self.ref_self = _distance_sum(reference.double(), reference.double()) / (len(reference) * (len(reference) - 1))
        self.ref_logp = float(mixture_log_density(reference).mean())

    def __call__(self, x: torch.Tensor) -> dict:
        x = x.detach().float()
        if not torch.isfinite(x).all():
            return {"energy": float("nan"), "logp_gap": float("nan")}
        return {"energy": energy_distance(x, self.reference, y_self=self.ref_self),
                "logp_gap": float(mixture_log_density(x).mean()) - self.ref_logp}


def cache_dir(seed: int, train_steps: int) -> Path:
    """Where full runs keep trained weights and calibrations (a temp dir; delete it to retrain)."""
    return Path(tempfile.gettempdir()) / "diffkit-mixture-samplers" / f"seed{seed}-steps{train_steps}"


def trained_model(name: str, diff: diffkit.Diffusion, steps: int, seed: int, cache: Path | None):
    if cache is not None and (cache / f"{name}.pt").exists():
        model = MixtureMLP(time_scale=1000.0 if diff.schedule.is_continuous else 1.0)
        model.load_state_dict(torch.load(cache / f"{name}.pt", weights_only=True))
        return model.eval().requires_grad_(False), {**json.loads((cache / f"{name}.json").read_text()), "cached": True}
    model, info = train(diff, steps, seed)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache / f"{name}.pt")
        (cache / f"{name}.json").write_text(json.dumps(info))
    return model, info


def calibrated_diffusion(key: str, diff: diffkit.Diffusion, model, cache: Path | None, **kwargs):
    """``calibrate(diff, model, **kwargs)``, or the calibration cached under ``key``: (diffusion, seconds)."""
    path = None if cache is None else cache / f"calibration-{key.replace('/', '-')}.json"
    if path is not None and path.exists():
        stored = json.loads(path.read_text())
        return diff.with_calibration(stored["calibration"]), stored["seconds"]
    tick = time.time()
    calibrated = calibrate(diff, model, **kwargs)
    seconds = time.time() - tick
    if path is not None:
        path.write_text(json.dumps({"calibration": calibrated.calibration, "seconds": seconds}))
    return calibrated, seconds


def run(args, on_stage=None) -> dict:
    """The benchmark; ``on_stage(result)`` is called with the partial result after each stage."""
    started = time.time()
    quick = args.quick
    calls_list = (5, 10) if quick else CALLS
    n = args.samples
    seed = args.seed
    train_steps = args.train_steps
    cache = None if quick or args.no_cache else cache_dir(seed, train_steps)

    eps_diff = diffkit.Diffusion("linear", 1000, "eps")
    flow_diff = diffkit.Diffusion(schedule="flow", prediction="flow")
    models, training = {}, {}
    for name, diff in (("eps", eps_diff), ("flow", flow_diff)):
        models[name], training[name] = trained_model(name, diff, train_steps, seed, cache)
        print(f"trained {name}: {training[name]['seconds']:.0f} s, final loss {training[name]['final_loss']:.4f}"
              + (" (cached)" if training[name].get("cached") else ""), flush=True)

    reference = sample_mixture(n, torch.Generator().manual_seed(seed + 2))
    score = Scorer(reference)
    floor_draws = [energy_distance(sample_mixture(n, torch.Generator().manual_seed(seed + 1000 + i)), reference,
                                   y_self=score.ref_self) for i in range(2 if quick else 5)]
    floor = {"mean": sum(floor_draws) / len(floor_draws),
             "std": float(torch.tensor(floor_draws).std()) if len(floor_draws) > 1 else 0.0,
             "draws": floor_draws}
    print(f"floor (fresh data draws): {floor['mean']:.2e} +- {floor['std']:.2e}", flush=True)
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed + 1))
    shape = tuple(noise.shape)
    rows: list[dict] = []
    calibrated, cal_seconds = {}, {}
    diffusers_calls = sorted(set(calls_list) | {2 * k for k in calls_list})
    result = {"rows": rows, "floor": floor, "training": training, "calibration_seconds": cal_seconds,
              "calls": list(calls_list), "quick": quick, "calibration_batch": 64 if quick else 512,
              "diffusers_calls": diffusers_calls, "samples": n, "seed": seed, "train_steps": train_steps,
              "data": {"modes": MIXTURE_MODES, "radius": MIXTURE_RADIUS, "std": MIXTURE_STD}}

    def stage(name: str) -> None:
        result["wall_seconds"] = time.time() - started
        result["calibrated_grids"] = {f"{m}/{s}": d.calibration.get("grids", {}) for (m, s), d in calibrated.items()}
        result["calibrated_statistics_kept"] = {f"{m}/{s}": "statistics" in d.calibration
                                                for (m, s), d in calibrated.items()}
        result["stages_done"] = [*result.get("stages_done", []), name]
        print(f"stage {name}: done at {result['wall_seconds']:.0f} s", flush=True)
        if on_stage is not None:
            on_stage(result)

    def add(model_name, library, config, calls, x, steps, **extra):
        row = {"model": model_name, "library": library, "config": config, "calls": calls, "steps": steps,
               **score(x), **extra}
        rows.append(row)
        return row

    def gen():
        return torch.Generator().manual_seed(seed + 4)

    cal_kwargs = dict(steps=tuple(k for k in calls_list if k >= 2))
    if quick:
        cal_kwargs.update(max_evals=10, reference_steps=40)

    def calibrated_for(name, start):
        diff = eps_diff if name == "eps" else flow_diff
        calibrated[name, start], cal_seconds[f"{name}/{start}"] = calibrated_diffusion(
            f"{name}/{start}", diff, models[name], cache, noise_or_shape=(result["calibration_batch"], 2),
            sample_kwargs=None if start == "prior" else {"start": start},
            generator=torch.Generator().manual_seed(seed + 100), **cal_kwargs)
        print(f"calibrated {name} (start {start}): {cal_seconds[f'{name}/{start}']:.0f} s, default sampler "
              f"{calibrated[name, start].default_sampler}", flush=True)

    calibrated_for("eps", "prior")
    calibrated_for("flow", "prior")

    for name, diff in (("eps", eps_diff), ("flow", flow_diff)):
        model = models[name]
        for k in calls_list:
            x = diff.sample(model, shape, steps=k, noise=noise, generator=gen())
            add(name, "diffkit", DEFAULTS, k, x, k, sampler=diff.default_sampler)
            if name == "eps":
                x = diff.sample(model, shape, steps=k, noise=noise, generator=gen(), start="noise")
                add(name, "diffkit", DEFAULTS_NOISE, k, x, k, sampler=diff.default_sampler)
            cal = calibrated[name, "prior"]
            x = cal.sample(model, shape, steps=k, noise=noise, generator=gen())
            add(name, "diffkit", CALIBRATED, k, x, k, sampler=cal.default_sampler)
            if name == "eps":
                x = cal.sample(model, shape, steps=k, noise=noise, generator=gen(), start="noise")
                add(name, "diffkit", CALIBRATED_PRIOR_FIT_NOISE, k, x, k, sampler=cal.default_sampler)
        samplers = ("unipc", "heun") if quick else diffkit.SAMPLERS
        starts = ("prior", "noise") if name == "eps" and not quick else ("prior",)
        for sampler in samplers:
            for start in starts:
                for k in calls_list:
                    steps = diffkit_steps(sampler, k)
                    x = diff.sample(model, shape, sampler=sampler, steps=steps, noise=noise, generator=gen(),
                                    start=start)
                    label = sampler if start == "prior" else f'{sampler}, start="noise"'
                    add(name, "diffkit", label, diffkit.model_calls(sampler, steps), x, steps, sampler=sampler,
                        start=start, nominal_calls=k)
        stage(f"diffkit rows on {name}")

    # diffusers, at K and 2K calls
    for label, make, dtype in diffusers_configs(quick):
        for k in diffusers_calls:
            steps = diffusers_steps(label, k)
            try:
                x, calls = run_diffusers(make, dtype, models["eps"], noise, steps)
                add("eps", "diffusers", label, calls, x, steps, nominal_calls=k)
            except Exception as error:  # a reference's failure is reported, not hidden
                print(f"diffusers {label} at {steps} steps failed: {error}")
                rows.append({"model": "eps", "library": "diffusers", "config": label, "calls": k, "steps": steps,
                             "energy": float("nan"), "logp_gap": float("nan"), "nominal_calls": k})
    from diffusers import FlowMatchEulerDiscreteScheduler

    for k in diffusers_calls:
        x, calls = run_diffusers(FlowMatchEulerDiscreteScheduler, torch.float64, models["flow"], noise, k,
                                 time_scale=1.0 / 1000)
        add("flow", "diffusers", "FlowMatchEuler", calls, x, k, nominal_calls=k)
    stage("diffusers rows")

    # Last (the slowest and least essential part): grids fitted with start="noise".
    if not quick:
        calibrated_for("eps", "noise")
        for k in calls_list:
            cal_n = calibrated["eps", "noise"]
            x = cal_n.sample(models["eps"], shape, steps=k, noise=noise, generator=gen(), start="noise")
            add("eps", "diffkit", CALIBRATED_NOISE, k, x, k, sampler=cal_n.default_sampler)
        stage("calibration fitted with start=noise")
    return result


# --------------------------------------------------------------------------- report
METRICS = {"energy": lambda r: r["energy"], "gap": lambda r: abs(r["logp_gap"])}


def best_of(rows, model, library, calls, exclude=(), metric="energy"):
    """The best row of ``library`` on ``model`` with at most ``calls`` calls (nan rows skipped);
    ``metric``: ``energy`` (the energy distance) or ``gap`` (|mean log-density gap|)."""
    value = METRICS[metric]
    pool = [r for r in rows if r["model"] == model and r["library"] == library and r["calls"] <= calls
            and r["config"] not in exclude and math.isfinite(value(r))]
    return min(pool, key=value, default=None)


def lookup(rows, model, config, k):
    for r in rows:
        if r["model"] == model and r["config"] == config and r.get("nominal_calls", r["calls"]) == k:
            return r
    return None


def fmt(value: float | None, scale: float = 1e3) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value * scale:.2f}"


def render(result: dict, command: str) -> str:
    rows, calls, dcalls = result["rows"], result["calls"], result["diffusers_calls"]
    floor = result["floor"]
    lines = ["# Samplers on a trained network: 2-D mixture of 8 Gaussians", ""]
    lines += [f"`{command}`", "",
              f"- data: {result['data']['modes']} equal Gaussians, means on a circle of radius "
              f"{result['data']['radius']}, "
              f"std {result['data']['std']}; exact density known",
              f"- models: residual MLP (3 residual SiLU-Linear layers of width 128, sinusoidal time embedding), "
              f"{result['train_steps']} Adam steps at batch 512 (lr 2e-3, cosine), seed {result['seed']}: "
              + "; ".join(f"{m} ({'linear VP, T=1000, eps' if m == 'eps' else 'flow path, flow prediction'}) "
                          f"{t['seconds']:.0f} s wall"
                          + (f" ({t['cpu_seconds']:.0f} s CPU)" if "cpu_seconds" in t else "")
                          + f", final loss {t['final_loss']:.4f}"
                          for m, t in result["training"].items()),
              f"- score: unbiased energy distance (x 1e-3) between {result['samples']} samples and {result['samples']} "
              f"fresh data points; every row starts from the same noise. **Floor** (a fresh data draw of the same "
              f"size against the same reference): {fmt(floor['mean'])} +- {fmt(floor['std'])} (mean +- std over "
              f"{len(floor['draws'])} draws)",
              f"- calibration: `calibrate(diff, model, ({result['calibration_batch']}, 2), "
              f"steps={tuple(k for k in calls if k >= 2)}, generator=seed + 100)`"
              f"{' (quick: max_evals=10, reference_steps=40)' if result['quick'] else ''}; "
              + ", ".join(f"{k} {v:.0f} s" for k, v in result["calibration_seconds"].items())
              + "; model statistics kept: "
              + ", ".join(f"{k} {v}" for k, v in result["calibrated_statistics_kept"].items()),
              f"- hardware: {result['hardware']}; wall time {result['wall_seconds']:.0f} s"
              + (" (weights and calibrations from the cache of an earlier run of the same seed; their times are "
                 "that run's)" if any(t.get("cached") for t in result["training"].values()) else ""), ""]
    if not result.get("finished", True):
        lines += [f"**Partial result**: stages done: {', '.join(result.get('stages_done', []))}; the run was "
                  "stopped before the rest (the last stage calibrates again with start=\"noise\").", ""]

    def table(model, configs, columns, title, key="energy", scale=1e3):
        out = [f"## {title}", "", "| sampler | " + " | ".join(f"{c} calls" for c in columns) + " |",
               "|---|" + "---|" * len(columns)]
        for config in configs:
            cells = []
            for c in columns:
                r = lookup(rows, model, config, c)
                cells.append("-" if r is None else fmt(r[key], scale) + ("" if r["calls"] == c else f" ({r['calls']})"))
            out.append(f"| {config} | " + " | ".join(cells) + " |")
        return out

    def best_row(model, columns):
        cells = []
        for c in columns:
            b = best_of(rows, model, "diffusers", c)
            cells.append("-" if b is None else f"{fmt(b['energy'])} ({b['config']})")
        return f"| {DIFFUSERS_BEST} | " + " | ".join(cells) + " |"

    eps_diffkit = list(dict.fromkeys(r["config"] for r in rows if r["model"] == "eps" and r["library"] == "diffkit"))
    main = [c for c in eps_diffkit if c.startswith("diffkit")]
    per_sampler = [c for c in eps_diffkit if not c.startswith("diffkit") and "start" not in c]
    per_sampler_noise = [c for c in eps_diffkit if not c.startswith("diffkit") and "start" in c]
    diffusers = list(dict.fromkeys(r["config"] for r in rows if r["model"] == "eps" and r["library"] == "diffusers"))
    lines += table("eps", main, dcalls, "eps-diffusion (linear VP, T = 1000): defaults and calibration")
    lines.append(best_row("eps", dcalls))
    lines.append("")
    lines += table("eps", per_sampler + per_sampler_noise, calls,
                   "eps-diffusion: every diffkit sampler, uncalibrated (calls in brackets where fewer)")
    lines.append("")
    lines += table("eps", diffusers, dcalls, "eps-diffusion: diffusers' configurations (calls in brackets where fewer)")
    lines.append(best_row("eps", dcalls))
    lines.append("")
    flow_configs = list(dict.fromkeys(r["config"] for r in rows if r["model"] == "flow"))
    lines += table("flow", flow_configs, dcalls, "flow matching (same network, same training budget)")
    lines.append("")
    # flow vs eps row pairs
    lines += ["## flow vs eps-diffusion, same data and training", "",
              "| row | model | " + " | ".join(f"{c} calls" for c in calls) + " |", "|---|---|" + "---|" * len(calls)]
    for config in (DEFAULTS, CALIBRATED):
        for model in ("eps", "flow"):
            lines.append(f"| {config} | {model} | "
                         + " | ".join(fmt((lookup(rows, model, config, c) or {}).get("energy")) for c in calls) + " |")
    for model in ("eps", "flow"):
        cells = []
        for c in calls:
            b = best_of(rows, model, "diffkit", c)
            cells.append("-" if b is None else f"{fmt(b['energy'])} ({b['config']})")
        lines.append(f"| best diffkit row | {model} | " + " | ".join(cells) + " |")
    lines.append("")
    # log-density gap
    lines += ["## mean exact log-density of samples minus that of data (0 ideal; negative: off the modes)", "",
              "| row | model | " + " | ".join(f"{c} calls" for c in dcalls) + " |", "|---|---|" + "---|" * len(dcalls)]
    for model, config in [("eps", c) for c in main] + [("flow", DEFAULTS), ("flow", CALIBRATED)]:
        lines.append(f"| {config} | {model} | " + " | ".join(
            fmt((lookup(rows, model, config, c) or {}).get("logp_gap"), 1.0) for c in dcalls) + " |")
    cells = []
    for c in dcalls:
        b = best_of(rows, "eps", "diffusers", c)
        cells.append("-" if b is None else f"{b['logp_gap']:.2f} ({b['config']})")
    lines.append(f"| {DIFFUSERS_BEST} (by energy) | eps | " + " | ".join(cells) + " |")
    cells = []
    for c in dcalls:
        b = best_of(rows, "eps", "diffusers", c, metric="gap")
        cells.append("-" if b is None else f"{b['logp_gap']:.2f} ({b['config']})")
    lines.append(f"| {DIFFUSERS_BEST} (by abs. gap) | eps | " + " | ".join(cells) + " |")
    lines.append("")
    gap_title = "mean log-density gap (nats), "
    lines += table("eps", per_sampler + per_sampler_noise, calls, gap_title + "eps-diffusion: every diffkit sampler",
                   key="logp_gap", scale=1.0)
    lines.append("")
    lines += table("eps", diffusers, dcalls, gap_title + "eps-diffusion: diffusers' configurations",
                   key="logp_gap", scale=1.0)
    lines.append("")
    lines += table("flow", flow_configs, dcalls, gap_title + "flow matching", key="logp_gap", scale=1.0)

    lines.append("")
    lines += ["## answers", ""] + answers(result)
    return "\n".join(lines) + "\n"


def answers(result: dict) -> list[str]:
    out = []
    for metric, what, scale in (("energy", "energy distance (x 1e-3)", 1e3),
                                ("gap", "|mean log-density gap| (nats; resolves far finer than the energy distance "
                                        "here)", 1.0)):
        out += [f"### by {what}", ""] + _answers(result, metric, scale) + [""]
    floor = result["floor"]
    out.append(f"- energy-distance floor: {fmt(floor['mean'])} +- {fmt(floor['std'])} (x 1e-3): differences smaller "
               f"than about {fmt(2 * floor['std'])} are within the estimator's noise for unrelated draws")
    return out


def _answers(result: dict, metric: str, scale: float) -> list[str]:
    rows, calls = result["rows"], result["calls"]
    out = []
    value = METRICS[metric]

    def score(model, config, k):
        r = lookup(rows, model, config, k)
        return None if r is None else value(r)

    def f(v):
        return fmt(v, scale)

    for k in calls:
        ours = score("eps", CALIBRATED, k)
        same = best_of(rows, "eps", "diffusers", k, metric=metric)
        double = best_of(rows, "eps", "diffusers", 2 * k, metric=metric)
        if ours is None or same is None or double is None:
            continue
        out.append(f"- calibrated defaults at {k} calls {f(ours)}: diffusers' best at {k} calls {f(value(same))} "
                   f"({same['config']}) -> {'not worse' if ours <= value(same) else 'WORSE'}; at {2 * k} calls "
                   f"{f(value(double))} ({double['config']}) -> half the calls "
                   f"{'met' if ours <= value(double) else 'NOT met'}")
    for k in calls:
        pairs = [(DEFAULTS, DEFAULTS_NOISE, "uncalibrated defaults"),
                 (CALIBRATED, CALIBRATED_PRIOR_FIT_NOISE, "calibrated (grids fitted with the prior start)"),
                 (CALIBRATED, CALIBRATED_NOISE, "calibrated (grids fitted per start)")]
        texts = []
        for prior_cfg, noise_cfg, what in pairs:
            p, q = score("eps", prior_cfg, k), score("eps", noise_cfg, k)
            if p is not None and q is not None:
                texts.append(f"{what}: prior {f(p)} vs noise {f(q)} ({'noise' if q < p else 'prior'} better)")
        per_sampler = [(s, score("eps", s, k), score("eps", f'{s}, start="noise"', k)) for s in diffkit.SAMPLERS]
        per_sampler = [(s, p, q) for s, p, q in per_sampler if p is not None and q is not None]
        if per_sampler:
            texts.append(f"noise better for {sum(q < p for _, p, q in per_sampler)} of {len(per_sampler)} samplers")
        if texts:
            out.append(f"- start at {k} calls: " + "; ".join(texts))
    calibrated_rows = {CALIBRATED, CALIBRATED_NOISE, CALIBRATED_PRIOR_FIT_NOISE}
    verdict = {True: "at least as good", False: "WORSE"}
    for k in calls:
        ours = best_of([r for r in rows if "start" not in r["config"]], "eps", "diffkit", k,
                       exclude=calibrated_rows | {DEFAULTS}, metric=metric)
        ours_any = best_of(rows, "eps", "diffkit", k, exclude=calibrated_rows, metric=metric)
        theirs = best_of(rows, "eps", "diffusers", k, metric=metric)
        if ours is None or theirs is None:
            continue
        default = score("eps", DEFAULTS, k)
        out.append(f"- best uncalibrated diffkit sampler at {k} calls (default start): {ours['config']} "
                   f"{f(value(ours))}; any start: {ours_any['config']} {f(value(ours_any))}; diffusers' best "
                   f"{theirs['config']} {f(value(theirs))} -> {verdict[value(ours) <= value(theirs)]}; "
                   f"the uncalibrated default ({f(default)}) "
                   f"{verdict[default is not None and default <= value(theirs)]}")
    for k in calls:
        e, fl = best_of(rows, "eps", "diffkit", k, metric=metric), best_of(rows, "flow", "diffkit", k, metric=metric)
        de, df = score("eps", CALIBRATED, k), score("flow", CALIBRATED, k)
        ue, uf = score("eps", DEFAULTS, k), score("flow", DEFAULTS, k)
        if e is None or fl is None:
            continue
        out.append(f"- flow vs eps at {k} calls: calibrated eps {f(de)}, flow {f(df)}; uncalibrated defaults eps "
                   f"{f(ue)}, flow {f(uf)}; best diffkit row eps {f(value(e))} ({e['config']}), flow {f(value(fl))} "
                   f"({fl['config']})")
    return out


def output_path(out: Path | None, quick: bool) -> Path | None:
    """Where the table goes: ``--out``, else benchmarks/results/mixture_samplers.md; nowhere for --quick
    without --out."""
    if out is not None:
        return out
    return None if quick else RESULTS / "mixture_samplers.md"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=None, help="samples per row (default 10000; --quick 256)")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="training steps per model (default 4000; --quick 200)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run (200 training steps, 256 samples, few rows); writes nothing without --out")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown output (a .json beside it); default benchmarks/results/mixture_samplers.md, "
                             "none with --quick")
    parser.add_argument("--no-cache", action="store_true",
                        help="retrain and recalibrate instead of reusing the weights and calibrations that a full run "
                             "keeps in a temp dir (<tmp>/diffkit-mixture-samplers)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.samples is None:
        args.samples = 256 if args.quick else 10000
    if args.train_steps is None:
        args.train_steps = 200 if args.quick else 4000
    out = output_path(args.out, args.quick)
    command = "python benchmarks/mixture_samplers.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                         if (argv if argv is not None else sys.argv[1:]) else "")

    def write(result: dict, final: bool = False) -> str:
        result.update(hardware=hardware_summary(), torch=torch.__version__, command=command, finished=final)
        text = render(result, command)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
            out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float) + "\n")
        return text

    result = run(args, on_stage=write)
    print(write(result, final=True))
    if out is not None:
        print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
