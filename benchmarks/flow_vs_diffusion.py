"""Flow matching against the preset's diffusion, per modality, at equal training compute.

    python benchmarks/flow_vs_diffusion.py --modality image --max-steps 500 --ema-decay 0.99 \\
        --out benchmarks/results/flow_vs_diffusion_image.md
    python benchmarks/flow_vs_diffusion.py --modality audio --max-steps 1500 \\
        --out benchmarks/results/flow_vs_diffusion_audio.md
    python benchmarks/flow_vs_diffusion.py --modality planning --max-steps 8000 \\
        --out benchmarks/results/flow_vs_diffusion_planning.md
    python benchmarks/flow_vs_diffusion.py --modality text --max-steps 2000 --num-samples 200 \\
        --out benchmarks/results/flow_vs_diffusion_text.md
    python benchmarks/flow_vs_diffusion.py --quick          # a smoke run, not a measurement

For one modality it trains the same network on the same data with the modality's recipe, same
preset, steps, batch and seed, once per variant: as the preset has it (diffusion), with
``--flow`` (x_s = (1 - s) x0 + s eps, the network predicting the velocity eps - x0) and, for
audio and planning, whose presets predict x0, with ``--flow --prediction x0`` (the same path,
the network predicting x0). Text's embedding route predicts x0 on either path (its rounding
and embedding terms act on x0), so there ``--flow`` alone is the flow model. Each export is kept uncalibrated and calibrated (a copy each,
calibrated as ``diffkit calibrate CHECKPOINT --steps 5 10 20`` does), and every one is scored
with the modality's own quality measure at 5, 10 and 20 model calls:

- uncalibrated: the sampler the checkpoint records as its default (the recipe's preset);
- calibrated: the sampler the calibration fitted (the calibrated diffusion's
  ``default_sampler``, with its fitted grids). The recorded default sampler is scored on the
  calibrated copy too when the calibration fitted grids for it; without them it samples exactly
  as the uncalibrated copy does (a deterministic sampler on the same grid), so that row is left out.

"Calls" are sampler network evaluations per sample, as ``diffkit.model_calls`` counts them
(without guidance: classifier-free guidance evaluates the conditional and the unconditional
branch in each of them).

Measures:

- image (``benchmarks/image_quality.py``): the digit classifier's accuracy on class-conditional
  samples (labels 0..9 in turn, the checkpoint's guidance) and the Frechet distance of its
  features to the held-out digits, with the real-data floor for as many samples;
- audio (``benchmarks/audio_quality.py``): the spoken-digit classifier's accuracy on
  class-conditional clips (mel frames through the shipped learned vocoder), the Frechet distance
  of its features to FSDD's held-out clips and voicing clarity, with real training clips for
  as many clips as the floor;
- planning (``benchmarks/planning_maze.py``'s protocol, one maze): the default planner (map
  hidden) scored against a random policy and the waypoint expert measured in the same run,
  success rate and actions per second, over seeded episodes;
- text (``benchmarks/text_quality.py``'s judge): unconditional texts of the embedding route at
  the checkpoint's word temperature, their perplexity under the small autoregressive judge
  trained on E2E's training split (cached in ``runs/text-ar``), distinct-2, unigram entropy and
  the share of adjacent repeated words, beside as many held-out human descriptions.

Training wall time is measured on whatever machine runs it; on a shared, loaded machine it is
noisy, and equal compute is equal steps x batch on the same network, not equal seconds.
Adding a modality: write a ``Modality`` (train arguments, variants, a scorer) and add it to
``MODALITIES``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
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
@dataclass(frozen=True)
class Variant:
    """One model of the comparison: the recipe's preset with ``flags`` added."""

    key: str
    label: str
    flags: tuple[str, ...] = ()

    @property
    def is_flow(self) -> bool:
        return "--flow" in self.flags


@dataclass
class Modality:
    """What the benchmark needs from one modality."""

    name: str
    recipe: str  # recipes/<recipe>.py
    train_args: Callable[[argparse.Namespace], list[str]]  # preset and sizes, without --flow/--export/...
    variants: tuple[Variant, ...]  # the first is the preset's diffusion, the reference of the verdict
    make_scorer: Callable[[argparse.Namespace], "Scorer"]
    measures: list[tuple[str, str, str]]  # (key, column title, format)
    primary: tuple[str, bool]  # (measure, higher is better): the verdict's measure
    samples_note: Callable[[argparse.Namespace], str]  # what one row is scored on
    shared_files: tuple[str, ...] = ()  # run-directory files the first variant writes and the rest reuse


class Scorer:
    """Scores one checkpoint at one (sampler, steps); ``references`` are real-data rows."""

    references: dict

    def score(self, checkpoint: str, sampler: str, steps: int) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def reference_lines(self) -> list[str]:
        return [f"- {name}: " + ", ".join(f"{k} {v}" for k, v in ref.items()) for name, ref in self.references.items()]


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

    def reference_lines(self):
        return [f"- {name} (real digits): FD {ref['fd']:.2f}" + (f" ± {ref['fd_std']:.2f}" if "fd_std" in ref else "")
                for name, ref in self.references.items()]


class AudioScorer(Scorer):
    """Class-conditional clips (digits 0..9 in turn, the checkpoint's guidance) through the shipped vocoder."""

    def __init__(self, args):
        from audio_quality import score  # benchmarks/audio_quality.py
        from modalities.audio.data import DEFAULT_WINDOW, FSDD_SAMPLE_RATE, load_fsdd
        from modalities.audio.metrics import load_digit_classifier

        self.audio_score = score
        self.clf = load_digit_classifier()
        train = load_fsdd("train", FSDD_SAMPLE_RATE, DEFAULT_WINDOW, peak=0.9)
        test = load_fsdd("test", FSDD_SAMPLE_RATE, DEFAULT_WINDOW, peak=0.9)
        self.ref = self.clf.embed(test.audio).numpy()
        self.n, self.seed, self.batch_size = args.num_samples, args.seed, args.batch_size
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: self.n]
        self.references = {
            "real training clips, as many as a row (the floor)": self._row(train.audio[pick], train.labels[pick]),
            "real held-out clips (the reference set itself)": self._row(test.audio, test.labels)}

    def _row(self, audio, labels):
        row = self.audio_score(self.clf, audio, labels, self.ref)
        return {"acc": row["acc"], "fd": row["fd"], "voicing": row["voicing"]}

    def score(self, checkpoint, sampler, steps):
        from modalities.audio.modality import generate_audio

        labels = torch.arange(self.n) % 10
        start = time.perf_counter()
        out = generate_audio(checkpoint=checkpoint, labels=labels, steps=steps, seed=self.seed, sampler=sampler,
                             batch_size=self.batch_size, device="cpu")
        return {**self._row(out.audio, labels), "seconds": round(time.perf_counter() - start, 2)}


class PlanningScorer(Scorer):
    """The default planner with the maze's inner walls hidden, normalised by random and expert returns."""

    def __init__(self, args):
        from planning_common import RandomPolicy, normalised, summarize  # benchmarks/planning_common.py
        from modalities.planning.maze import MazeGrid, WaypointExpert, make_env
        from modalities.planning.planner import evaluate

        self.env_id, self.episodes, self.seed = args.env, args.episodes, args.seed
        self.evaluate, self.summarize, self.normalised = evaluate, summarize, normalised
        probe = make_env(self.env_id)
        maze, space = MazeGrid.from_env(probe), probe.action_space
        probe.close()
        self.references = {}
        for name, policy in (("random", RandomPolicy(space, args.seed)), ("expert", WaypointExpert(maze))):
            stats = self._stats(policy)
            self.references[name] = {"return": round(stats["mean_return"], 2), "success": stats["success_rate"]}
        self.r_random, self.r_expert = self.references["random"]["return"], self.references["expert"]["return"]

    def _stats(self, policy):
        return self.summarize(self.evaluate(policy, self.env_id, episodes=self.episodes, seed=self.seed,
                                            continuing_task=True))

    def score(self, checkpoint, sampler, steps):
        from modalities.planning.maze import hidden_inner_walls
        from modalities.planning.planner import DiffusionPlanner

        start = time.perf_counter()
        with hidden_inner_walls():
            planner = DiffusionPlanner.load(checkpoint, env=self.env_id, seed=self.seed, device="cpu",
                                            sampler=sampler, steps=steps)
            stats = self._stats(planner)
        score, se = self.normalised(stats, self.r_random, self.r_expert)
        return {"score": round(score, 2), "score_se": round(se, 2), "success": stats["success_rate"],
                "actions_per_s": round(stats["actions_per_second"], 1), "seconds": round(time.perf_counter() - start, 2)}

    def reference_lines(self):
        return [f"- {name} policy: return {ref['return']:.1f}, success {100 * ref['success']:.0f}%"
                for name, ref in self.references.items()]


class TextScorer(Scorer):
    """Unconditional texts of the embedding route, scored by the AR judge of
    ``benchmarks/text_quality.py`` (trained on E2E's training split, cached in ``runs/text-ar``)."""

    def __init__(self, args):
        from text_quality import judge, training_texts  # benchmarks/text_quality.py
        from text_routes import text_scores  # benchmarks/text_routes.py
        from modalities.text.data import load_corpus
        from modalities.text.modality import EMBEDDING_CHECKPOINT, load_text_model

        # Every variant's recipe builds its vocabulary from the same data and settings as the
        # shipped embedding model, so the judge trained with that tokenizer reads them all.
        shipped = load_text_model(EMBEDDING_CHECKPOINT, "cpu")
        self.tokenizer, self.max_length = shipped.tokenizer, int(shipped.info.get("max_length", shipped.max_length))
        train, held = load_corpus("e2e", "train"), load_corpus("e2e", "eval")
        if args.quick:
            train = dataclasses.replace(train, texts=train.texts[:64], mrs=None)
        enc = self.tokenizer.encode(train.texts, self.max_length, warn=False)
        self.judge, _ = judge(self.tokenizer, enc, self.max_length, args.ar_steps, args.seed, args.ar_cache,
                              lambda *a: print(*a, flush=True))
        self.text_scores = functools.partial(text_scores, self.judge, self.tokenizer, self.max_length,
                                             training_texts(self.tokenizer, enc, train.texts))
        self.load = load_text_model
        self.n, self.seed = args.num_samples, args.seed
        pick = torch.randperm(len(held.texts), generator=torch.Generator().manual_seed(args.seed))[: self.n]
        self.references = {"held-out human descriptions, as many as a row": self._row([held.texts[i] for i in pick])}

    def _row(self, texts):
        return {key: round(value, 4) for key, value in self.text_scores(texts).items()}

    def score(self, checkpoint, sampler, steps):
        from text_quality import diffusion_samples

        model = self.load(checkpoint, "cpu")
        if model.tokenizer.to_str() != self.tokenizer.to_str():
            raise SystemExit(f"{checkpoint} has another vocabulary than the judge's; train it on E2E with the preset's "
                             "--min-count")
        texts, seconds = diffusion_samples(model, self.n, steps=steps, seed=self.seed, sampler=sampler)
        return {**self._row(texts), "seconds": round(seconds, 2)}

    def reference_lines(self):
        return [f"- {name}: judge perplexity {ref['perplexity']:.2f}, distinct-2 {ref['distinct_2']:.3f}, "
                f"unigram entropy {ref['entropy']:.2f} bits, adjacent repeats {ref['repeats']:.3f}"
                for name, ref in self.references.items()]


def _image_train_args(args) -> list[str]:
    return ["--preset", "digits", "--max-steps", str(args.max_steps), "--seed", str(args.seed), "--sample-every", "0"]


def _audio_train_args(args) -> list[str]:
    return ["--preset", "mel", "--max-steps", str(args.max_steps), "--seed", str(args.seed), "--sample-every", "0"]


def _planning_train_args(args) -> list[str]:
    flags = ["--env", args.env, "--max-steps", str(args.max_steps), "--seed", str(args.seed), "--eval-episodes", "0"]
    return flags + (["--collect-steps", "3000", "--horizon", "16", "--dim", "8", "--dim-mults", "1,2",
                     "--diffusion-steps", "32"] if args.quick else [])


def _text_train_args(args) -> list[str]:
    flags = ["--preset", "cpu", "--max-steps", str(args.max_steps), "--seed", str(args.seed), "--sample-every", "0"]
    return flags + (["--hidden", "16", "--depth", "1", "--heads", "2", "--batch-size", "8", "--num-timesteps", "100"]
                    if args.quick else [])


FLOW = Variant("flow", "flow (rectified, v = eps - x0)", ("--flow",))
FLOW_X0 = Variant("flow-x0", "flow, x0-prediction", ("--flow", "--prediction", "x0"))
MODALITIES: dict[str, Modality] = {
    "image": Modality(
        name="image", recipe="image_train", train_args=_image_train_args,
        variants=(Variant("diffusion", "diffusion (v-pred, cosine)"), FLOW), make_scorer=ImageScorer,
        measures=[("acc", "classifier acc", "{:.3f}"), ("fd", "FD", "{:.2f}"), ("nn_ratio", "NN ratio", "{:.2f}"),
                  ("seconds", "sampling s", "{:.1f}")],
        primary=("fd", False),
        samples_note=lambda a: f"{a.num_samples} class-conditional digits (labels 0..9 in turn, the checkpoint's "
                               "guidance)"),
    "audio": Modality(
        name="audio", recipe="audio_train", train_args=_audio_train_args,
        # The mel preset is itself flow with x0 prediction now (this table chose it): the
        # diffusion it is compared with is named by its schedule.
        variants=(Variant("diffusion", "diffusion (x0-pred, cosine)", ("--schedule", "cosine")), FLOW, FLOW_X0),
        make_scorer=AudioScorer,
        measures=[("acc", "digit acc", "{:.3f}"), ("fd", "FD", "{:.2f}"), ("voicing", "voicing", "{:.3f}"),
                  ("seconds", "sampling s", "{:.1f}")],
        primary=("fd", False),
        samples_note=lambda a: f"{a.num_samples} class-conditional clips (digits 0..9 in turn, the checkpoint's "
                               "guidance), mel frames through the shipped learned vocoder"),
    "planning": Modality(
        name="planning", recipe="planner_train", train_args=_planning_train_args,
        variants=(Variant("diffusion", "diffusion (x0-pred, cosine)"), FLOW, FLOW_X0), make_scorer=PlanningScorer,
        measures=[("score", "score", "{:.1f}"), ("score_se", "± se", "{:.1f}"), ("success", "success", "{:.2f}"),
                  ("actions_per_s", "actions/s", "{:.0f}")],
        primary=("score", True), shared_files=("data.hdf5",),
        samples_note=lambda a: f"{a.episodes} seeded episodes of {a.env} (seeds {a.seed}..{a.seed + a.episodes - 1}, "
                               "sparse reward, continuing task), the checkpoint's planner defaults with the maze's "
                               "inner walls hidden; score = 100 (R - R_random) / (R_expert - R_random)"),
    "text": Modality(
        name="text", recipe="text_train", train_args=_text_train_args,
        # The text objective's rounding and embedding terms act on x0, so --flow predicts x0 there.
        variants=(Variant("diffusion", "diffusion (x0-pred, sqrt)"),
                  Variant("flow-x0", "flow, x0-prediction", ("--flow",))),
        make_scorer=TextScorer,
        measures=[("perplexity", "judge perplexity", "{:.2f}"), ("distinct_2", "distinct-2", "{:.3f}"),
                  ("entropy", "entropy (bits)", "{:.2f}"), ("repeats", "repeats", "{:.3f}"),
                  ("seconds", "sampling s", "{:.1f}")],
        primary=("perplexity", False),
        samples_note=lambda a: f"{a.num_samples} unconditional texts of the embedding route (lengths drawn from the "
                               "training lengths, the checkpoint's word temperature and clamping), scored by the AR "
                               "judge of benchmarks/text_quality.py"),
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


def train(modality: Modality, variant: Variant, args, work: Path) -> dict:
    """Train one model with the recipe, export it, keep an uncalibrated and a calibrated copy."""
    recipe = _recipe(modality.recipe)
    model = variant.key
    run_dir, export = work / f"{model}-run", work / f"{model}-uncalibrated"
    argv = [*modality.train_args(args), *variant.flags, "--no-progress",
            "--save-every", str(10 * args.max_steps), "--output-dir", str(run_dir),
            "--export", str(export), "--no-calibrate"]
    if args.batch_size_train is not None:
        argv += ["--batch-size", str(args.batch_size_train)]
    if args.ema_decay is not None:
        argv += ["--ema-decay", str(args.ema_decay)]
    for stale in (run_dir, export):  # a reused --work-dir: the recipe would resume the finished run
        if stale.exists():
            shutil.rmtree(stale)
    run_dir.mkdir(parents=True)
    for name in modality.shared_files:  # e.g. the planner's recorded data: the same for every variant
        if (work / name).is_file():
            shutil.copy2(work / name, run_dir / name)
    print(f"[{model}] recipes/{modality.recipe}.py {' '.join(argv)}", flush=True)
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        code = recipe.main(argv)
    wall = time.perf_counter() - start
    if code:
        raise SystemExit(f"training the {model} model failed ({code}):\n{log.getvalue()[-3000:]}")
    for name in modality.shared_files:
        if (run_dir / name).is_file() and not (work / name).is_file():
            shutil.copy2(run_dir / name, work / name)
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
    for variant in modality.variants:
        t = trained[variant.key]
        recorded = (read_config(t["uncalibrated"]).get("modality_config") or {}).get("defaults", {}).get("sampler")
        recorded = recorded or "dpm++2m"
        variants = [(False, t["uncalibrated"], recorded), (True, t["calibrated"], t["calibrated_sampler"])]
        if t["calibrated_sampler"] != recorded and any(g.startswith(recorded + "/") for g in t["grids"]):
            variants.append((True, t["calibrated"], recorded))  # only when calibrating changed it
        for calibrated, path, sampler in variants:
            for calls in CALLS:
                steps = steps_for_calls(sampler, calls)
                row = {"model": variant.label, "kind": variant.key, "calibrated": calibrated, "sampler": sampler,
                       "calls": calls, "steps": steps,
                       "grid": "fitted" if calibrated and f"{sampler}/{steps}" in t["grids"] else "default"}
                row.update(scorer.score(path, sampler, steps))
                rows.append(row)
                print(f"[{variant.key}] calibrated={calibrated!s:5} {sampler:8s} {calls:2d} calls  " + "  ".join(
                    f"{k} {row[k]:.3f}" for k, _, _ in modality.measures), flush=True)
    return rows


def markdown(modality: Modality, result: dict, references: list[str]) -> str:
    s = result["setup"]
    keys = [v.key for v in modality.variants]
    lines = [f"# Flow matching vs diffusion: {modality.name}", "",
             f"- command: `{s['command']}`",
             f"- seed {s['seed']}; hardware: {s['hardware']}; wall time {s['wall_time_s']:.0f} s",
             f"- calibration: `calibrate_checkpoint(steps=(5, 10, 20), seed={s['seed']}, "
             + ", ".join(f"{k}={v}" for k, v in s["calibrate_options"].items()) + ")` on a copy of each export",
             f"- training: recipe flags `{s['train_flags']}`, {s['max_steps']} steps each, same network, batch, "
             "seed and EMA; per model: " + "; ".join(
                 f"{v.key} `{' '.join(v.flags) or '(the preset)'}`" for v in modality.variants),
             "- training wall time on a shared machine (noisy): " + ", ".join(
                 f"{m} {result['models'][m]['train_wall_s']:.0f} s (calibration {result['models'][m]['calibrate_wall_s']:.0f} s)"
                 for m in keys),
             "- final training loss (not comparable across objectives): " + ", ".join(
                 f"{m} {result['models'][m]['final_loss']:.4f}" for m in keys
                 if result["models"][m]["final_loss"] is not None),
             f"- each row: {s['samples_note']}; calls = sampler network evaluations per sample (guidance "
             "evaluates both branches in each)",
             ""]
    cols = modality.measures
    order = {k: i for i, k in enumerate(keys)}
    lines += ["| model | calibrated | sampler | calls | " + " | ".join(t for _, t, _ in cols) + " |",
              "|---" * (4 + len(cols)) + "|"]
    for r in sorted(result["rows"], key=lambda r: (r["calls"], order[r["kind"]], r["calibrated"], r["sampler"])):
        cal = ("yes" + (" (fitted grid)" if r["grid"] == "fitted" else " (default grid)")) if r["calibrated"] else "no"
        lines.append(f"| {r['model']} | {cal} | {r['sampler']} | {r['calls']} | "
                     + " | ".join(f.format(r[k]) for k, _, f in cols) + " |")
    if references:
        lines += ["", "References (real data, or reference policies, scored the same way):", "", *references]
    verdict = result.get("verdict")
    if verdict:
        key, higher = modality.primary
        lines += ["", f"Each flow model against the diffusion model, same calibration state and sampler ({key}, "
                      f"{'higher' if higher else 'lower'} is better):", ""]
        lines += [f"- {v}" for v in verdict]
    return "\n".join(lines) + "\n"


def compare(modality: Modality, rows: list[dict]) -> list[str]:
    """One line per flow variant and (calibrated, sampler, calls) that the diffusion model has too."""
    key, higher = modality.primary
    reference = modality.variants[0].key
    by = {(r["kind"], r["calibrated"], r["sampler"], r["calls"]): r for r in rows}
    out = []
    for (kind, cal, sampler, calls), d in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][3])):
        if kind != reference:
            continue
        for variant in modality.variants[1:]:
            f = by.get((variant.key, cal, sampler, calls))
            if f is None:
                continue
            # A measure with a standard error (planning's score over episodes) calls a difference
            # inside the two errors combined a tie.
            noise = math.hypot(f.get(f"{key}_se", 0.0), d.get(f"{key}_se", 0.0))
            if abs(f[key] - d[key]) <= noise:
                better = f"neither (within {noise:.2f}, one standard error of the difference)" if noise else "tie"
            else:
                better = variant.key if (f[key] > d[key]) == higher else reference
            change = f" ({(f[key] - d[key]) / abs(d[key]):+.0%})" if d[key] else ""
            out.append(f"{'calibrated' if cal else 'uncalibrated'} {sampler} {calls} calls, {variant.key}: "
                       f"{key} {d[key]:.2f} -> {f[key]:.2f}{change}; better: {better}")
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
    p.add_argument("--num-samples", type=int, default=500, help="samples per table row (image, audio, text)")
    p.add_argument("--batch-size", type=int, default=500, help="sampling batch (image, audio)")
    p.add_argument("--env", default="PointMaze_UMaze-v3", help="planning: the maze (default: PointMaze_UMaze-v3)")
    p.add_argument("--episodes", type=int, default=20, help="planning: seeded episodes per table row (default: 20)")
    p.add_argument("--ar-steps", type=int, default=1000, help="text: training steps of the AR judge (default: 1000)")
    p.add_argument("--ar-cache", default="runs/text-ar/ar_lm.safetensors", help="text: where the AR judge is cached")
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
        args.max_steps, args.num_samples, args.batch_size, args.batch_size_train, args.episodes = 3, 10, 10, 8, 1
        args.calibrate_options = dict(batch=2, data=4, max_evals=1, reference_steps=5)
        args.ar_steps = 2
    modality = MODALITIES[args.modality]
    scratch = None
    if args.work_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="flow_vs_diffusion-")
        work = Path(scratch.name)
    else:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    if args.quick:  # the smoke run's two-step judge must not take the place of the real one
        args.ar_cache = str(work / "ar_lm-quick.safetensors")
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    try:
        trained = {variant.key: train(modality, variant, args, work) for variant in modality.variants}
        scorer = modality.make_scorer(args)
        rows = evaluate(modality, trained, scorer)
    finally:
        if scratch is not None:
            scratch.cleanup()
    result = {
        "setup": {"command": "python benchmarks/flow_vs_diffusion.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  "modality": modality.name, "seed": args.seed, "max_steps": args.max_steps,
                  "train_flags": " ".join(result_flags(modality, args)), "num_samples": args.num_samples,
                  "samples_note": modality.samples_note(args), "hardware": hardware_summary(), "torch": torch.__version__, "quick": args.quick,
                  "calibrate_options": args.calibrate_options,
                  "wall_time_s": round(time.perf_counter() - started, 1)},
        "models": {m: {k: v for k, v in t.items() if k not in ("uncalibrated", "calibrated")} for m, t in trained.items()},
        "references": scorer.references, "rows": rows, "verdict": compare(modality, rows),
    }
    for row in rows:
        for key, _, _ in modality.measures:
            if not math.isfinite(row[key]):
                print(f"warning: non-finite {key} in {row}", flush=True)
    text = markdown(modality, result, scorer.reference_lines())
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
