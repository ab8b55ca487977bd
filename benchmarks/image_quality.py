"""Sample quality of an image checkpoint on the digits, against real-data references.

    python benchmarks/image_quality.py                       # the shipped class-conditional model
    python benchmarks/image_quality.py --checkpoint modalities/image/checkpoints/digits-text
    python benchmarks/image_quality.py --checkpoint modalities/image/checkpoints/digits-sr
    python benchmarks/image_quality.py --train-classifier    # (re)train the feature network
    python benchmarks/image_quality.py --quick               # a smoke run, not a measurement (seconds)

What it measures (all on the held-out split of the digits, which no model trained on):

- FD: the Frechet distance between Gaussians fitted to the 64-d features of the project's
  digit classifier (``modalities/image/metrics.py``) for generated and held-out digits. As
  references: the same distance for as many real training digits that the classifier never
  saw (the floor a perfect model would reach with this many samples; mean +- std over 10
  draws), between two random halves of all real digits, and for samples of a Gaussian fitted
  to the training pixels (a trivial baseline).
- acc: how often the classifier assigns class-conditional samples their label (text models:
  the digit named in the prompt, for training phrasings and for unseen ones).
- NN: pixel distance from each sample to its nearest training image, as a ratio to the
  same distance for held-out digits (below 1 = closer to the training set than new real
  digits are); "copies" counts samples nearer to a training image than 99% of held-out
  digits are.
- all at 5, 10, 20, 50 and 1000 sampler steps, written to ``--out-dir`` as JSON, a Markdown
  table and a plot; plus bits/dim of the held-out digits (discretised decoder, full chain).
- super-resolution checkpoints: FD of the upsampled held-out digits, the error of the
  re-downsampled output against the input, and the PSNR to the true 16x16 digit beside
  bilinear upsampling.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modalities.image.data import DIGIT_WORDS, digit_captions, load_digits, to_unit_range
from modalities.image.metrics import (
    CLASSIFIER_DIR,
    classifier_split,
    frechet_distance,
    load_digit_classifier,
    nearest_neighbour_distances,
    save_digit_classifier,
    train_digit_classifier,
)
from modalities.image.modality import DEFAULT_CHECKPOINT, bits_per_dim, generate_images, load_image_model

from diffkit.runs import hardware_summary

# Phrasings the text model never saw in training (see data.CAPTION_TEMPLATES for those it did).
UNSEEN_TEMPLATES = ("a drawing of the number {w}", "digit {d}", "write a {w}")


def reference_rows(clf, train, test, n: int, seed: int) -> dict[str, dict]:
    """FD of the real-data floor, the two-halves split and the Gaussian baseline."""
    g = torch.Generator().manual_seed(seed)
    ft = clf.embed(test)
    unseen = train[classifier_split()[1]]  # real digits the classifier never trained on
    floors = [frechet_distance(clf.embed(unseen[torch.randperm(len(unseen), generator=g)[:n]]), ft)
              for _ in range(10)]
    everything = torch.cat([train, test])
    perm = torch.randperm(len(everything), generator=g)
    half = len(everything) // 2
    halves = frechet_distance(clf.embed(everything[perm[:half]]), clf.embed(everything[perm[half:]]))
    flat = train.flatten(1).double()
    cov = torch.cov(flat.T) + 1e-5 * torch.eye(flat.shape[1], dtype=torch.float64)
    gauss = flat.mean(0) + torch.randn(n, flat.shape[1], generator=g, dtype=torch.float64) \
        @ torch.linalg.cholesky(cov).T
    gauss = gauss.clamp(-1, 1).float().view(n, *train.shape[1:])
    return {
        "real (unseen by classifier) vs held-out: floor": {"fd": float(np.mean(floors)), "fd_std": float(np.std(floors)), "n": n},
        "two halves of all real digits": {"fd": halves, "n": half},
        "Gaussian fitted to pixels": {"fd": frechet_distance(clf.embed(gauss), ft), "n": n},
    }


def sample_scores(clf, samples01: torch.Tensor, test, train, held_nn, target=None) -> dict:
    """FD, accuracy (when targets are given) and the nearest-neighbour check for samples."""
    x = samples01 * 2 - 1
    row = {"fd": frechet_distance(clf.embed(x), clf.embed(test))}
    if target is not None:
        row["acc"] = (clf.predict(x) == target).float().mean().item()
    nn = nearest_neighbour_distances(x, train)
    row["nn_ratio"] = (nn.median() / held_nn.median()).item()
    row["copies"] = int((nn < torch.quantile(held_nn, 0.01)).sum())
    return row


def evaluate_generator(model, args, clf, train, test) -> dict:
    """The table rows for a class-, text- or un-conditional checkpoint."""
    held_nn = nearest_neighbour_distances(test, train)
    n = args.num_samples
    rows = {}
    target = torch.arange(n) % 10
    modes = [("unconditional", {}, None)]
    if model.num_classes is not None:
        modes.append((f"class-conditional w={model.default('guidance_scale', 1.0)}",
                      {"labels": target}, target))
    if model.is_text_conditional:
        seen = [digit_captions(int(d))[0] for d in target]  # "a handwritten 7"
        unseen = [UNSEEN_TEMPLATES[i % len(UNSEEN_TEMPLATES)].format(d=int(d), w=DIGIT_WORDS[d])
                  for i, d in enumerate(target)]
        modes += [("prompt, training phrasing", {"prompt": seen}, target),
                  ("prompt, unseen phrasing", {"prompt": unseen}, target)]
    for steps in args.steps:
        for name, cond, tgt in modes:
            start = time.perf_counter()
            x = generate_images(checkpoint=model.path, num_samples=n, seed=args.seed,
                                sampler=args.sampler, steps=steps, batch_size=args.batch_size,
                                progress=args.progress, **cond)
            row = sample_scores(clf, x, test, train, held_nn, tgt)
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows[f"{name} | {args.sampler} {steps} steps"] = row
            print(f"{name:32s} steps {steps:5d}  " + "  ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                flush=True)
    return rows


def evaluate_super_resolution(model, args, clf, test) -> dict:
    """Upsample the held-out digits' 8x8 versions and compare with the true 16x16 ones."""
    size = model.low_res_size
    low = F.interpolate(test, size=(size, size), mode="area")
    low01 = to_unit_range(low)
    truth01 = to_unit_range(test)
    bilinear = F.interpolate(low01, size=test.shape[-2:], mode="bilinear", align_corners=False)
    ft = clf.embed(test)

    def psnr(a, b):
        return (10 * torch.log10(1.0 / ((a - b) ** 2).flatten(1).mean(1))).mean().item()

    rows = {"bilinear upsampling": {"fd": frechet_distance(clf.embed(bilinear * 2 - 1), ft),
                                    "psnr": psnr(bilinear, truth01)}}
    for steps in args.steps:
        start = time.perf_counter()
        x = generate_images(checkpoint=model.path, low_res=low01, seed=args.seed,
                            num_samples=len(low01), sampler=args.sampler, steps=steps,
                            batch_size=args.batch_size, progress=args.progress)
        down = F.interpolate(x, size=(size, size), mode="area")
        rows[f"super-resolution | {args.sampler} {steps} steps"] = {
            "fd": frechet_distance(clf.embed(x * 2 - 1), ft),
            "acc": (clf.predict(x * 2 - 1) == args.test_labels).float().mean().item(),
            "psnr": psnr(x, truth01),
            "low_res_mae": (down - low01).abs().mean().item(),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(steps, rows[f"super-resolution | {args.sampler} {steps} steps"], flush=True)
    return rows


def held_out_bits_per_dim(model, test, args) -> dict:
    """Variational bound on held-out digits in bits/dim (discretised decoder, all T steps)."""
    x01 = to_unit_range(test[: args.nll_images])
    low = None
    if model.is_super_resolution:
        low = F.interpolate(x01, size=(model.low_res_size,) * 2, mode="area")
    start = time.perf_counter()
    bpd = bits_per_dim(x01, checkpoint=model.path, low_res=low, seed=args.seed,
                       batch_size=args.batch_size, progress=args.progress)
    return {"bits_per_dim": bpd.mean().item(), "std_err": (bpd.std() / len(bpd) ** 0.5).item(),
            "images": len(x01), "bin_width": model.info.get("bin_width", model.diffusion.bin_width),
            "seconds": round(time.perf_counter() - start, 1),
            "conditioning": "low-res input" if model.is_super_resolution else "none (null condition)"}


def plot(rows: dict, refs: dict, path: Path, sampler: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    modes = sorted({k.split(" | ")[0] for k in rows})
    for mode in modes:
        pts = sorted((int(k.split()[-2]), v["fd"]) for k, v in rows.items() if k.startswith(mode + " |"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
    for (name, ref), style in zip(refs.items(), (":", "--", "-.")):
        ax.axhline(ref["fd"], color="grey", linestyle=style, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"{sampler} steps")
    ax.set_ylabel("Frechet distance (classifier features)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(rows: dict, refs: dict, extra: dict) -> str:
    """One table; columns that no row has (e.g. PSNR for a generator) are left out."""
    columns = [("fd", "FD"), ("acc", "acc"), ("nn_ratio", "NN ratio"), ("copies", "copies"),
               ("psnr", "PSNR dB"), ("low_res_mae", "low-res MAE"), ("seconds", "seconds")]
    table = {**refs, **rows}
    columns = [(k, title) for k, title in columns if any(k in r for r in table.values())]
    lines = ["| samples | " + " | ".join(t for _, t in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]

    def cell(r, key):
        if key not in r:
            return "-"
        value = r[key]
        if key == "fd":
            return f"{value:.1f}" + (f" ± {r['fd_std']:.1f}" if "fd_std" in r else "")
        return f"{value:.3f}" if isinstance(value, float) and key != "seconds" else str(value)

    for name, r in table.items():
        lines.append(f"| {name} | " + " | ".join(cell(r, k) for k, _ in columns) + " |")
    for key, value in extra.items():
        lines.append(f"\n{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="image checkpoint directory")
    p.add_argument("--num-samples", type=int, default=500, help="samples per table row")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50, 1000])
    p.add_argument("--sampler", default="dpm++2m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--nll-images", type=int, default=359, help="held-out images for bits/dim")
    p.add_argument("--no-nll", action="store_true", help="skip bits/dim")
    p.add_argument("--out-dir", help="where JSON/Markdown/PNG go (default: benchmarks/results; a temporary folder "
                                     "with --quick)")
    p.add_argument("--name", help="file name stem (default: image_quality_<the checkpoint's directory name>)")
    p.add_argument("--progress", action="store_true", help="progress bars while sampling")
    p.add_argument("--train-classifier", action="store_true",
                   help=f"train the digit classifier and write it to {CLASSIFIER_DIR}, then exit")
    p.add_argument("--quick", action="store_true",
                   help="smoke run, not a measurement: 20 samples at 2 steps, no bits/dim; writes to a temporary "
                        "folder unless --out-dir is given")
    args = p.parse_args(argv)
    scratch = None
    if args.quick:
        args.num_samples, args.steps, args.batch_size, args.no_nll = 20, [2], 20, True
        if args.out_dir is None:
            scratch = tempfile.TemporaryDirectory(prefix="image_quality-quick-")  # removed when main returns
            args.out_dir = scratch.name
    args.out_dir = args.out_dir or "benchmarks/results"

    if args.train_classifier:
        start = time.perf_counter()
        clf, acc = train_digit_classifier(seed=args.seed, progress=True)
        wall = time.perf_counter() - start
        save_digit_classifier(clf, CLASSIFIER_DIR, {
            "trained_on": "half of the digits' train split (metrics.classifier_split, 719 images)",
            "held_out_accuracy": acc, "seed": args.seed, "wall_time_s": round(wall, 1),
            "command": "python benchmarks/image_quality.py --train-classifier",
            "hardware": hardware_summary()},
            step=30 * ((719 + 63) // 64))  # train_digit_classifier's epochs x batches of 64
        print(f"digit classifier: held-out accuracy {acc:.4f}, trained in {wall:.1f} s -> {CLASSIFIER_DIR}")
        return 0

    torch.manual_seed(args.seed)
    clf = load_digit_classifier()
    train, _ = load_digits(split="train")
    test, test_labels = load_digits(split="test")
    args.test_labels = test_labels
    model = load_image_model(args.checkpoint, "auto")
    if model.image_size != 16 or model.channels != 1:
        raise SystemExit("this benchmark scores 16x16 greyscale digit models")
    start = time.perf_counter()
    refs = reference_rows(clf, train, test, args.num_samples, args.seed)
    for name, r in refs.items():
        print(f"{name:32s} fd {r['fd']:.1f}" + (f" ± {r['fd_std']:.1f}" if "fd_std" in r else ""))
    if model.is_super_resolution:
        rows = evaluate_super_resolution(model, args, clf, test)
    else:
        rows = evaluate_generator(model, args, clf, train, test)
    extra = {}
    if not args.no_nll:
        extra["held-out bits/dim"] = held_out_bits_per_dim(model, test, args)
        print("bits/dim", extra["held-out bits/dim"])
    wall = time.perf_counter() - start
    extra["setup"] = {"checkpoint": str(args.checkpoint), "samples per row": args.num_samples,
                      "held-out digits": len(test), "seed": args.seed, "hardware": hardware_summary(),
                      "wall_time_s": round(wall, 1),
                      "command": "python benchmarks/image_quality.py " + " ".join(argv or sys.argv[1:])}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"image_quality_{Path(args.checkpoint).name}"
    (out / f"{stem}.json").write_text(json.dumps({"references": refs, "rows": rows, **extra}, indent=2))
    (out / f"{stem}.md").write_text(markdown(rows, refs, extra))
    if not model.is_super_resolution:
        plot(rows, refs, out / f"{stem}.png", args.sampler)
    print(markdown(rows, refs, extra))
    print(f"wrote {out / stem}.{{json,md,png}} in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
