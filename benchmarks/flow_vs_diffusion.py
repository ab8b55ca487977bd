"""Flow matching against the preset's diffusion, per modality, at equal training compute.

    python benchmarks/flow_vs_diffusion.py --modality image --max-steps 2000 --seed 0 \\
        --out benchmarks/results/flow_vs_diffusion_image.md
    python benchmarks/flow_vs_diffusion.py --quick          # a smoke run, not a measurement (seconds)

For one modality it trains the same network on the same data twice with the modality's recipe,
same preset, steps, batch and seed: once as the preset has it (image: v-prediction on the
cosine schedule) and once with ``--flow`` (x_s = (1 - s) x0 + s eps, the network predicting
eps - x0). Both exports are kept uncalibrated and calibrated (a copy each, calibrated as
``diffkit calibrate CHECKPOINT --steps 5 10 20`` does), and every one is scored with the
modality's own quality measure at 5, 10 and 20 model calls:

- uncalibrated: the sampler the checkpoint records as its default (the recipe's preset);
- calibrated: the sampler the calibration fitted (the calibrated diffusion's
  ``default_sampler``, with its fitted grids). The recorded default sampler is scored on the
  calibrated copy too when the calibration fitted grids for it; without them it samples exactly
  as the uncalibrated copy does (a deterministic sampler on the same grid), so that row is left out.

"Calls" are sampler network evaluations per sample, as ``diffkit.model_calls`` counts them
(without guidance: classifier-free guidance evaluates the conditional and the unconditional
branch in each of them).

Image: the measures of ``benchmarks/image_quality.py`` (imported from it): the digit
classifier's accuracy on class-conditional samples (labels 0..9 in turn, the checkpoint's
guidance) and the Frechet distance of the classifier's features to the held-out digits, with
the real-data floor for as many samples as a reference.

Training wall time is measured on whatever machine runs it; on a shared, loaded machine it is
noisy, and equal compute is equal steps x batch on the same network, not equal seconds.
Adding a modality: write a ``Modality`` (train arguments, a scorer) and add it to ``MODALITIES``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import diffkit  # noqa: E402
from diffkit.calibration import calibrate_checkpoint  # noqa: E402
from diffkit.checkpoint import read_config  # noqa: E402
from diffkit.runs import hardware_summary  # noqa: E402

CALLS = (5, 10, 20)
MODELS = ("diffusion", "flow")


def _recipe(name: str):
    """A recipe module from recipes/ (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_fvd_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def steps_for_calls(sampler: str, calls: int) -> int:
    """The step count at which ``sampler`` makes ``calls`` network evaluations."""
    for steps in range(1, calls + 1):
        if diffkit.model_calls(sampler, steps) == calls:
            return steps
    raise ValueError(f"{sampler} cannot make exactly {calls} model calls")


# ------------------------------------------------------------------------------ modalities
@dataclass
class Modality:
    """What the benchmark needs from one modality."""

    name: str
    recipe: str  # recipes/<recipe>.py
    train_args: Callable[[argparse.Namespace], list[str]]  # preset and sizes, without --flow/--export/...
    diffusion_label: str  # what the recipe's preset trains without --flow
    make_scorer: Callable[[argparse.Namespace], "Scorer"]
    measures: list[tuple[str, str, str]]  # (key, column title, format)


class Scorer:
    """Scores one checkpoint at one (sampler, steps); ``references`` are real-data rows."""

    references: dict

    def score(self, checkpoint: str, sampler: str, steps: int) -> dict:  # pragma: no cover - interface
        raise NotImplementedError


class ImageScorer(Scorer):
    def __init__(self, args):
        from image_quality import reference_rows, sample_scores  # benchmarks/image_quality.py
        from modalities.image.data import load_digits
        from modalities.image.metrics import load_digit_classifier, nearest_neighbour_distances

        self.sample_scores = sample_scores
        self.clf = load_digit_classifier()
        self.train, _ = load_digits(split="train")
        self.test, _ = load_digits(split="test")
        self.held_nn = nearest_neighbour_distances(self.test, self.train)
        self.n, self.seed, self.batch_size = args.num_samples, args.seed, args.batch_size
        self.references = reference_rows(self.clf, self.train, self.test, self.n, args.seed)

    def score(self, checkpoint, sampler, steps):
        from modalities.image.modality import generate_images

        target = torch.arange(self.n) % 10
        start = time.perf_counter()
        x = generate_images(checkpoint=checkpoint, num_samples=self.n, seed=self.seed, sampler=sampler,
                            steps=steps, labels=target, batch_size=self.batch_size, device="cpu")
        seconds = time.perf_counter() - start
        row = self.sample_scores(self.clf, x, self.test, self.train, self.held_nn, target)
        return {"acc": row["acc"], "fd": row["fd"], "nn_ratio": row["nn_ratio"], "seconds": round(seconds, 2)}


def _image_train_args(args) -> list[str]:
    return ["--preset", "digits", "--max-steps", str(args.max_steps), "--seed", str(args.seed)]


MODALITIES: dict[str, Modality] = {
    "image": Modality(
        name="image", recipe="image_train", train_args=_image_train_args,
        diffusion_label="diffusion (v-pred, cosine)", make_scorer=ImageScorer,
        measures=[("acc", "classifier acc", "{:.3f}"), ("fd", "FD", "{:.2f}"), ("nn_ratio", "NN ratio", "{:.2f}"),
                  ("seconds", "sampling s", "{:.1f}")],
    ),
}


# ------------------------------------------------------------------------------ the run
def _describe(diffusion_config: dict) -> dict:
    """Schedule name and settings, prediction and time draws of a config's diffusion (no beta tables)."""
    schedule = diffusion_config.get("schedule")
    out = {"schedule": schedule.get("name") if isinstance(schedule, dict) else schedule}
    if isinstance(schedule, dict):
        out.update({f"schedule.{k}": v for k, v in schedule.items() if k != "name" and not isinstance(v, (list, dict))})
    out.update({k: v for k, v in diffusion_config.items()
                if k not in ("schedule", "calibration") and not isinstance(v, (list, dict))})
    return out


def train(modality: Modality, model: str, args, work: Path) -> dict:
    """Train one model with the recipe, export it, keep an uncalibrated and a calibrated copy."""
    recipe = _recipe(modality.recipe)
    run_dir, export = work / f"{model}-run", work / f"{model}-uncalibrated"
    argv = [*modality.train_args(args), "--no-progress", "--sample-every", "0",
            "--save-every", str(10 * args.max_steps), "--output-dir", str(run_dir),
            "--export", str(export), "--no-calibrate"]
    if args.batch_size_train is not None:
        argv += ["--batch-size", str(args.batch_size_train)]
    if args.ema_decay is not None:
        argv += ["--ema-decay", str(args.ema_decay)]
    if model == "flow":
        argv.append("--flow")
    for stale in (run_dir, export):  # a reused --work-dir: the recipe would resume the finished run
        if stale.exists():
            shutil.rmtree(stale)
    print(f"[{model}] recipes/{modality.recipe}.py {' '.join(argv)}", flush=True)
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        code = recipe.main(argv)
    wall = time.perf_counter() - start
    if code:
        raise SystemExit(f"training the {model} model failed ({code}):\n{log.getvalue()[-3000:]}")
    config = read_config(export)
    record = config.get("extra") or {}  # what runs.export_checkpoint recorded
    info = {"train_argv": argv, "train_wall_s": round(wall, 1), "recipe_train_seconds": record.get("train_seconds"),
            "final_loss": record.get("final_loss"),
            "diffusion": _describe(config["diffusion"]),
            "uncalibrated": str(export)}
    print(f"[{model}] trained in {wall:.0f} s ({info['diffusion']})", flush=True)

    calibrated = work / f"{model}-calibrated"
    if calibrated.exists():
        shutil.rmtree(calibrated)
    shutil.copytree(export, calibrated)
    start = time.perf_counter()
    diffusion = calibrate_checkpoint(calibrated, steps=CALLS, seed=args.seed, device="cpu", **args.calibrate_options)
    info.update(calibrated=str(calibrated), calibrate_wall_s=round(time.perf_counter() - start, 1),
                calibrated_sampler=diffusion.default_sampler,
                calibration=sorted(diffusion.calibration),
                grids=sorted(diffusion.calibration.get("grids", {})))
    print(f"[{model}] calibrated in {info['calibrate_wall_s']:.0f} s: {info['grids']}", flush=True)
    return info


def evaluate(modality: Modality, trained: dict, scorer: Scorer) -> list[dict]:
    rows = []
    for model in MODELS:
        t = trained[model]
        recorded = (read_config(t["uncalibrated"]).get("modality_config") or {}).get("defaults", {}).get("sampler")
        recorded = recorded or "dpm++2m"
        variants = [(False, t["uncalibrated"], recorded), (True, t["calibrated"], t["calibrated_sampler"])]
        if t["calibrated_sampler"] != recorded and any(g.startswith(recorded + "/") for g in t["grids"]):
            variants.append((True, t["calibrated"], recorded))  # only when calibrating changed it
        for calibrated, path, sampler in variants:
            for calls in CALLS:
                steps = steps_for_calls(sampler, calls)
                row = {"model": modality.diffusion_label if model == "diffusion" else "flow (rectified, v = eps - x0)",
                       "kind": model, "calibrated": calibrated, "sampler": sampler, "calls": calls, "steps": steps,
                       "grid": "fitted" if calibrated and f"{sampler}/{steps}" in t["grids"] else "default"}
                row.update(scorer.score(path, sampler, steps))
                rows.append(row)
                print(f"[{model}] calibrated={calibrated!s:5} {sampler:8s} {calls:2d} calls  " + "  ".join(
                    f"{k} {row[k]:.3f}" for k, _, _ in modality.measures), flush=True)
    return rows


def markdown(modality: Modality, result: dict) -> str:
    s = result["setup"]
    lines = [f"# Flow matching vs diffusion: {modality.name}", "",
             f"- command: `{s['command']}`",
             f"- seed {s['seed']}; hardware: {s['hardware']}",
             f"- calibration: `calibrate_checkpoint(steps=(5, 10, 20), seed={s['seed']}, "
             + ", ".join(f"{k}={v}" for k, v in s["calibrate_options"].items()) + ")` on a copy of each export",
             f"- training: recipe flags `{s['train_flags']}`, {s['max_steps']} steps each, same network, batch, "
             "seed and EMA; "
             "wall time on a shared machine (noisy): " + ", ".join(
                 f"{m} {result['models'][m]['train_wall_s']:.0f} s (calibration {result['models'][m]['calibrate_wall_s']:.0f} s)"
                 for m in MODELS),
             "- final training loss (not comparable across the two objectives): " + ", ".join(
                 f"{m} {result['models'][m]['final_loss']:.4f}" for m in MODELS
                 if result["models"][m]["final_loss"] is not None),
             f"- samples per row: {s['num_samples']} (class-conditional, labels 0..9 in turn, the checkpoint's "
             "guidance); calls = sampler network evaluations per sample (guidance evaluates both branches in each)",
             ""]
    cols = modality.measures
    lines += ["| model | calibrated | sampler | calls | " + " | ".join(t for _, t, _ in cols) + " |",
              "|---" * (4 + len(cols)) + "|"]
    for r in sorted(result["rows"], key=lambda r: (r["calls"], r["kind"], r["calibrated"], r["sampler"])):
        cal = ("yes" + (" (fitted grid)" if r["grid"] == "fitted" else " (default grid)")) if r["calibrated"] else "no"
        lines.append(f"| {r['model']} | {cal} | {r['sampler']} | {r['calls']} | "
                     + " | ".join(f.format(r[k]) for k, _, f in cols) + " |")
    if result["references"]:
        lines += ["", "References (real digits, same number of samples):", ""]
        for name, ref in result["references"].items():
            lines.append(f"- {name}: FD {ref['fd']:.2f}" + (f" ± {ref['fd_std']:.2f}" if "fd_std" in ref else ""))
    verdict = result.get("verdict")
    if verdict:
        lines += ["", "Flow against diffusion, same calibration state and sampler (FD lower is better, acc higher):", ""]
        lines += [f"- {v}" for v in verdict]
    return "\n".join(lines) + "\n"


def compare(rows: list[dict]) -> list[str]:
    """One line per (calibrated, sampler, calls) that both models have."""
    out = []
    by = {(r["kind"], r["calibrated"], r["sampler"], r["calls"]): r for r in rows}
    for (kind, cal, sampler, calls), d in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][3])):
        if kind != "diffusion" or ("flow", cal, sampler, calls) not in by:
            continue
        f = by[("flow", cal, sampler, calls)]
        better = "flow" if f["fd"] < d["fd"] else "diffusion"
        out.append(f"{'calibrated' if cal else 'uncalibrated'} {sampler} {calls} calls: FD {d['fd']:.2f} -> "
                   f"{f['fd']:.2f} ({(f['fd'] - d['fd']) / d['fd']:+.0%}), acc {d['acc']:.3f} -> {f['acc']:.3f}; "
                   f"lower FD: {better}")
    return out


def result_flags(modality: Modality, args) -> list[str]:
    flags = modality.train_args(args)
    if args.ema_decay is not None:
        flags += ["--ema-decay", str(args.ema_decay)]
    return flags


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--modality", choices=sorted(MODALITIES), default="image")
    p.add_argument("--max-steps", type=int, default=2000, help="training steps of each model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=500, help="samples per table row")
    p.add_argument("--batch-size", type=int, default=500, help="sampling batch")
    p.add_argument("--batch-size-train", type=int, help="training batch (default: the preset's)")
    p.add_argument("--ema-decay", type=float,
                   help="EMA decay of the exported weights (default: the preset's). The digits preset's 0.999 "
                        "leaves 0.999^N of the initial weights in the EMA after N steps (45%% at 800): for short "
                        "runs take e.g. 0.99")
    p.add_argument("--out", help="Markdown table to write (a .json beside it); nothing is written without it")
    p.add_argument("--work-dir", help="where the trained runs and exports go (default: a temporary folder)")
    g = p.add_argument_group("calibration (diffkit.calibration.calibrate_checkpoint; default: its own defaults)")
    for flag in ("batch", "data", "max-evals", "reference-steps"):
        g.add_argument(f"--calibrate-{flag}", type=int, metavar="N")
    p.add_argument("--quick", action="store_true",
                   help="smoke run, not a measurement: 3 training steps, a tiny calibration, 20 samples per row")
    args = p.parse_args(argv)
    args.calibrate_options = {key: getattr(args, f"calibrate_{key}") for key in
                              ("batch", "data", "max_evals", "reference_steps")
                              if getattr(args, f"calibrate_{key}") is not None}
    if args.quick:
        args.max_steps, args.num_samples, args.batch_size, args.batch_size_train = 3, 10, 10, 8
        args.calibrate_options = dict(batch=2, data=4, max_evals=1, reference_steps=5)
    modality = MODALITIES[args.modality]
    scratch = None
    if args.work_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="flow_vs_diffusion-")
        work = Path(scratch.name)
    else:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    try:
        trained = {model: train(modality, model, args, work) for model in MODELS}
        scorer = modality.make_scorer(args)
        rows = evaluate(modality, trained, scorer)
    finally:
        if scratch is not None:
            scratch.cleanup()
    result = {
        "setup": {"command": "python benchmarks/flow_vs_diffusion.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  "modality": modality.name, "seed": args.seed, "max_steps": args.max_steps,
                  "train_flags": " ".join(result_flags(modality, args)), "num_samples": args.num_samples,
                  "hardware": hardware_summary(), "torch": torch.__version__, "quick": args.quick,
                  "calibrate_options": args.calibrate_options,
                  "wall_time_s": round(time.perf_counter() - started, 1)},
        "models": {m: {k: v for k, v in t.items() if k not in ("uncalibrated", "calibrated")} for m, t in trained.items()},
        "references": scorer.references, "rows": rows, "verdict": compare(rows),
    }
    for row in rows:
        for key, _, _ in modality.measures:
            if not math.isfinite(row[key]):
                print(f"warning: non-finite {key} in {row}", flush=True)
    text = markdown(modality, result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
