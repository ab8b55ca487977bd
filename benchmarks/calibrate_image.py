"""Calibrate an image checkpoint: fitted sampler grids and Analytic-DPM variances, stored in its config.

    python benchmarks/calibrate_image.py --checkpoint modalities/image/checkpoints/digits --in-place
    python benchmarks/calibrate_image.py --out /tmp/digits-calibrated      # a calibrated copy
    python benchmarks/calibrate_image.py --quick    # a smoke run on a temporary copy (seconds)

What it does (diffkit.calibration; the weights are not touched):

- ``eps_norm_sq``: E||eps_theta(x_t, t)||^2 / d on ``--data-images`` training digits, at
  ``--norm-times`` points spread over [0, T-1] (linear interpolation between them), scored with
  the condition the likelihood uses (the null class / empty prompt). ``Diffusion.nll`` then
  uses Analytic-DPM's reverse variances by default.
- ``statistics``: DPM-Solver-v3's model statistics (the average diagonal of the denoiser's
  Jacobian and the offset, per pixel and log-SNR) along ``--reference-steps`` trajectories from
  ``--batch`` noise draws, sampled as ``generate`` does (its default guidance scale, random
  classes, ClipX0). They make ``dpm-v3`` the default sampler, and the checkpoint's recorded
  default sampler becomes ``dpm-v3`` too (``--no-statistics`` skips them).
- ``grids``: for the default sampler (or ``--samplers``) and ``--steps``, a grid fitted to the
  reference on the first ``--grid-batch`` draws; ``generate(steps=K)`` then uses it.

The result goes into config.json's ``diffusion.calibration`` (the checksums cover the weight
files only, so they stay valid). It prints the time taken and the objective before and after.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffkit  # noqa: E402
from diffkit.calibration import calibrate  # noqa: E402
from diffkit.checkpoint import config_text  # noqa: E402
from diffkit.utils import replaced_atomically  # noqa: E402
from modalities.image.data import load_digits, resize  # noqa: E402
from modalities.image.modality import DEFAULT_CHECKPOINT, load_image_model  # noqa: E402


def null_condition(model, n: int, images: torch.Tensor) -> dict:
    """The condition ``bits_per_dim`` scores with: the null class/prompt, or the low-res input."""
    cond: dict[str, torch.Tensor] = {}
    if model.num_classes is not None:
        cond["labels"] = torch.zeros(n, dtype=torch.long)
    if model.is_text_conditional:
        cond["context"] = torch.zeros(n, 1, model.net.context_dim)
        cond["context_mask"] = torch.ones(n, 1, dtype=torch.bool)
    if model.num_classes is not None or model.is_text_conditional:
        cond["drop_cond"] = torch.ones(n, dtype=torch.bool)
    if model.is_super_resolution:
        cond["low_res"] = resize(images, model.low_res_size)
    return cond


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    where = p.add_mutually_exclusive_group()  # one of them is required, unless --quick
    where.add_argument("--in-place", action="store_true", help="rewrite the checkpoint's config.json")
    where.add_argument("--out", type=Path, help="write a calibrated copy of the checkpoint here")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--samplers", nargs="+", default=None, help="default: the checkpoint's default sampler")
    p.add_argument("--batch", type=int, default=256, help="noise draws the statistics are measured on")
    p.add_argument("--grid-batch", type=int, default=64, help="the first of those draws, the grids are fitted on")
    p.add_argument("--no-statistics", action="store_true", help="fit grids only, for the recorded default sampler")
    p.add_argument("--max-evals", type=int, default=150, help="sampler runs per grid and variant")
    p.add_argument("--reference-steps", type=int, default=100)
    p.add_argument("--data-images", type=int, default=512)
    p.add_argument("--norm-times", type=int, default=100, help="times E||eps||^2 is measured at (<= T)")
    p.add_argument("--no-grids", action="store_true")
    p.add_argument("--no-variances", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--measure-nll", type=int, default=0, metavar="N",
                   help="then print held-out bits/dim of N test digits with fixed and analytic variances")
    p.add_argument("--nll-steps", type=int, default=None, help="chain length for --measure-nll (default: all T)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run, not a calibration: a grid for 3 steps from 8 sampler runs, statistics on 4 draws, "
                        "norms on 8 images at 4 times; into a temporary copy unless --out or --in-place is given")
    args = p.parse_args(argv)
    scratch = None
    if args.quick:
        args.steps, args.batch, args.grid_batch, args.max_evals = [3], 4, 2, 8
        args.reference_steps, args.data_images, args.norm_times = 10, 8, 4
        if not (args.in_place or args.out):
            scratch = tempfile.TemporaryDirectory(prefix="calibrate_image-quick-")  # removed when main returns
            args.out = Path(scratch.name) / "checkpoint"
    if not (args.in_place or args.out):
        p.error("one of the arguments --in-place --out is required")

    source = Path(args.checkpoint)
    target = source if args.in_place else args.out
    if not args.in_place:
        if target.exists():
            raise SystemExit(f"{target} exists; choose another --out")
        shutil.copytree(source, target)
    model = load_image_model(target, args.device)
    diff = diffkit.Diffusion.from_config(model.diffusion.config)  # a private copy to calibrate
    net, dev = model.net, diffkit.utils.module_device(model.net)
    defaults = model.info.get("defaults", {}) if isinstance(model.info, dict) else {}
    samplers = args.samplers or (None if not args.no_statistics else [defaults.get("sampler", "unipc")])
    guidance = float(defaults.get("guidance_scale", 1.0))
    started = time.time()

    if not args.no_variances:
        images, _ = load_digits(image_size=model.image_size, split="train")
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[: args.data_images]]
        T = diff.num_timesteps
        times = torch.linspace(0, T - 1, min(args.norm_times, T)).round().unique()
        tick = time.time()
        diff = calibrate(diff, net, data=images.to(dev), eps_norm_times=times.tolist(), batch_size=128,
                  generator=torch.Generator(device=dev).manual_seed(args.seed + 1), progress=True,
                  eps_norm_cond={k: v.to(dev) for k, v in null_condition(model, len(images), images).items()})
        print(f"eps norms at {len(times)} times on {len(images)} images: {time.time() - tick:.0f} s", flush=True)

    if not args.no_grids:
        n = args.batch
        gen = torch.Generator(device=dev).manual_seed(args.seed + 2)
        shape = (n, model.channels, model.image_size, model.image_size)
        cond: dict[str, torch.Tensor] = {}
        sample_kwargs: dict = {"wrappers": [diffkit.ClipX0(-1.0, 1.0)]}
        if model.num_classes is not None:
            cond["labels"] = torch.randint(0, model.num_classes, (n,), generator=torch.Generator().manual_seed(args.seed))
            sample_kwargs["guidance_scale"] = guidance
        elif model.is_text_conditional or model.is_super_resolution:
            images, _ = load_digits(image_size=model.image_size, split="train")
            cond = null_condition(model, n, images[:n])
        tick = time.time()
        diff = calibrate(diff, net, shape, steps=args.steps, samplers=samplers, model_statistics=not args.no_statistics,
                  grid_batch=min(args.grid_batch, n), generator=gen, max_evals=args.max_evals,
                  reference_steps=args.reference_steps, device=dev, progress=True, sample_kwargs=sample_kwargs,
                  **{k: v.to(dev) for k, v in cond.items()})
        print(f"{'grids' if args.no_statistics else 'statistics on ' + str(n) + ' draws and grids'} for "
              f"{samplers or [diff.default_sampler]} at {args.steps} steps on {min(args.grid_batch, n)} draws: "
              f"{time.time() - tick:.0f} s", flush=True)

    config_file = target / "config.json"
    config = json.loads(config_file.read_text())
    config["diffusion"]["calibration"] = diff.calibration
    if not args.no_grids and samplers is None:
        # generate() samples with the checkpoint's recorded default: the sampler the grids were fitted for.
        config["modality_config"].setdefault("defaults", {})["sampler"] = diff.default_sampler
    with replaced_atomically(config_file) as staging:
        staging.write_text(config_text(config))
    print(f"wrote the calibration into {config_file} ({time.time() - started:.0f} s in all)")
    for key, entry in diff.calibration.get("grids", {}).items():
        print(f"  {key}: {[round(t, 1) for t in entry['times']]} {entry['sampler_options']}")
    if args.measure_nll and "eps_norm_sq" in diff.calibration:
        test, _ = load_digits(image_size=model.image_size, split="test")
        test = test[: args.measure_nll].to(dev)
        cond = {k: v.to(dev) for k, v in null_condition(model, len(test), test.cpu()).items()}
        bin_width = float(model.info.get("bin_width", diff.bin_width))
        for analytic in (False, True):
            tick = time.time()
            bpd = diff.nll(net, test, steps=args.nll_steps, decoder="discretized", bin_width=bin_width,
                           analytic=analytic, generator=torch.Generator(device=dev).manual_seed(args.seed), **cond)
            print(f"held-out bits/dim, {len(test)} test digits, {args.nll_steps or diff.num_timesteps}-step chain, "
                  f"{'analytic' if analytic else 'fixed ' + diff.variance} variances: {bpd.mean():.3f} "
                  f"+- {bpd.std() / len(bpd) ** 0.5:.3f} ({time.time() - tick:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
