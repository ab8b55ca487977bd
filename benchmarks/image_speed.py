"""Training speed of our U-Net against diffusers' UNet2DModel, side by side in one run, and
sample quality at equal training time.

    python benchmarks/image_speed.py                      # throughput + equal-time quality
    python benchmarks/image_speed.py --quality-steps 0    # throughput only (about a minute)
    python benchmarks/image_speed.py --quick              # a smoke run, not a measurement (seconds)

Throughput: both networks train (diffkit loss, AdamW, batch 64 of 16x16 digits) in
alternating rounds, so a slow-down of the machine hits both alike; the median steps/s of
the rounds is reported. diffusers' model is the one the issue names: 1.6M parameters,
``block_out_channels=(32, 64, 64)``, attention at the middle level, two layers per block.
Ours is the default digits network (``recipes/image_train.py``, preset ``digits``, 1.25M
parameters); a wider variant with more parameters than diffusers' model is timed beside them.

Quality at equal wall-clock time: diffusers' model trains for ``--quality-steps`` steps and
ours for that many times the measured speed ratio, i.e. for the same time at the measured
speeds (step counts rather than a stopwatch, so another process on the machine cannot tilt
the comparison; the actual wall times are reported too). Both are then scored like
``benchmarks/image_quality.py`` does: Frechet distance in the digit classifier's features
between 1,000 samples (same sampler and steps) and the held-out digits.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn
from tqdm.auto import tqdm

import diffkit
from diffkit.runs import hardware_summary
from modalities.image.data import load_digits
from modalities.image.metrics import frechet_distance, load_digit_classifier
from modalities.image.unet import UNet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from image_train import PRESETS  # noqa: E402  (the recipe's default network is timed)


class DiffusersUNet(torch.nn.Module):
    """diffusers' UNet2DModel behind the diffkit model convention ``model(x_t, t) -> tensor``."""

    def __init__(self, image_size: int = 16, channels: int = 1):
        super().__init__()
        from diffusers import UNet2DModel

        self.net = UNet2DModel(
            sample_size=image_size, in_channels=channels, out_channels=channels,
            block_out_channels=(32, 64, 64), layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t).sample


def ours() -> UNet:
    """The default digits network (unconditional here, like diffusers' model)."""
    p = PRESETS["digits"]
    return UNet(in_channels=1, image_size=16, base_channels=p["base_channels"],
                channel_mult=p["channel_mult"], num_res_blocks=p["num_res_blocks"],
                attention_levels=p["attention_levels"])


def ours_wider() -> UNet:
    """A variant with more parameters than diffusers' model (timed only): wider at 4x4."""
    return UNet(in_channels=1, image_size=16, base_channels=32, channel_mult=(1, 2, 3),
                num_res_blocks=(1, 1, 2), attention_levels=(2,))


class Run:
    """A network with its optimizer and EMA, stepping on random batches of the digits."""

    def __init__(self, name: str, net: torch.nn.Module, diff: diffkit.Diffusion, data: torch.Tensor,
                 batch_size: int, lr: float, seed: int):
        torch.manual_seed(seed)
        self.name, self.net, self.diff, self.data, self.batch_size = name, net, diff, data, batch_size
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(net.parameters(), lr=lr)
        self.lr = lr
        self.gen = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.seconds = 0.0
        self.params = sum(p.numel() for p in net.parameters())

    def step(self, n: int = 1, ema_decay: float = 0.999, warmup: int = 200) -> float:
        """Run ``n`` training steps; returns their wall time."""
        start = time.perf_counter()
        for _ in range(n):
            idx = torch.randint(0, len(self.data), (self.batch_size,), generator=self.gen)
            for group in self.opt.param_groups:
                group["lr"] = self.lr * min(1.0, (self.steps + 1) / warmup)
            loss = self.diff.loss(self.net, self.data[idx], generator=self.gen)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
            self.opt.step()
            get_ema_multi_avg_fn(ema_decay)(list(self.ema.parameters()),
                                            [p.detach() for p in self.net.parameters()], None)
            self.steps += 1
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        return elapsed


def throughput(runs: list[Run], rounds: int, steps_per_round: int) -> dict[str, float]:
    """Median steps/s of alternating rounds (after a warm-up round each)."""
    for run in runs:
        run.step(3)
    rates: dict[str, list[float]] = {run.name: [] for run in runs}
    for _ in range(rounds):
        for run in runs:
            rates[run.name].append(steps_per_round / run.step(steps_per_round))
    return {name: statistics.median(r) for name, r in rates.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7, help="alternating timing rounds")
    p.add_argument("--steps-per-round", type=int, default=10)
    p.add_argument("--quality-steps", type=int, default=1500,
                   help="diffusers' training steps for the equal-time quality check (0 = skip)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of both networks")
    p.add_argument("--num-samples", type=int, default=1000, help="samples scored per network")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-steps", type=int, default=20, help="dpm++2m steps of the quality samples")
    p.add_argument("--out", help="JSON path (default: benchmarks/results/image_speed.json; a temporary file "
                                 "with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run, not a measurement: batch 4, one round of one step, 2 quality steps, "
                        "8 samples of 2 steps; writes to a temporary folder unless --out is given")
    args = p.parse_args(argv)
    scratch = None
    if args.quick:
        args.batch_size, args.rounds, args.steps_per_round = 4, 1, 1
        args.quality_steps, args.num_samples, args.sample_steps = 2, 8, 2
        if args.out is None:
            scratch = tempfile.TemporaryDirectory(prefix="image_speed-quick-")  # removed when main returns
            args.out = str(Path(scratch.name) / "image_speed.json")
    args.out = args.out or "benchmarks/results/image_speed.json"

    preset = PRESETS["digits"]
    diff = diffkit.Diffusion(preset["schedule"], 1000, preset["prediction"])
    train, _ = load_digits(split="train")
    runs = [Run("diffusers UNet2DModel", DiffusersUNet(), diff, train, args.batch_size, args.lr, args.seed),
            Run("diffkit image UNet", ours(), diff, train, args.batch_size, args.lr, args.seed),
            Run("diffkit image UNet, wider", ours_wider(), diff, train, args.batch_size, args.lr,
                args.seed)]
    start = time.perf_counter()
    speed = throughput(runs, args.rounds, args.steps_per_round)
    ratio = speed[runs[1].name] / speed[runs[0].name]
    result = {
        "throughput_steps_per_s": speed,
        "params": {r.name: r.params for r in runs},
        "speed_ratio": ratio,
        "speed_ratio_wider": speed[runs[2].name] / speed[runs[0].name],
        "setup": {"batch_size": args.batch_size, "image_size": 16, "rounds": args.rounds,
                  "steps_per_round": args.steps_per_round, "seed": args.seed,
                  "hardware": hardware_summary(),
                  "command": "python benchmarks/image_speed.py " + " ".join(argv or sys.argv[1:])},
    }
    for r in runs:
        print(f"{r.name:28s} {r.params / 1e6:.2f}M params  {speed[r.name]:.2f} steps/s  "
              f"{speed[r.name] / speed[runs[0].name]:.2f}x")

    if args.quality_steps:
        clf = load_digit_classifier()
        test, _ = load_digits(split="test")
        features = clf.embed(test)
        targets = {runs[0].name: args.quality_steps, runs[1].name: round(args.quality_steps * ratio)}
        quality = {}
        for run in runs[:2]:
            # Fresh networks: the timing rounds above must not count as training.
            fresh = Run(run.name, DiffusersUNet() if run is runs[0] else ours(), diff, train,
                        args.batch_size, args.lr, args.seed)
            for _ in tqdm(range(targets[run.name]), desc=run.name, leave=False):
                fresh.step()
            g = torch.Generator().manual_seed(args.seed)
            x = diff.sample(fresh.ema, (args.num_samples, 1, 16, 16), sampler="dpm++2m", steps=args.sample_steps,
                            generator=g, wrappers=[diffkit.ClipX0(-1.0, 1.0)])
            quality[run.name] = {"train_steps": fresh.steps, "train_seconds": round(fresh.seconds, 1),
                                 "fd": frechet_distance(clf.embed(x), features)}
            print(f"{run.name:28s} {fresh.steps} steps in {fresh.seconds:.0f} s -> FD "
                  f"{quality[run.name]['fd']:.1f}", flush=True)
        result["equal_time_quality"] = quality
        result["equal_time_quality_setup"] = {
            "sampler": "dpm++2m", "sampling_steps": args.sample_steps, "samples": args.num_samples,
            "lr": args.lr, "ema_decay": 0.999, "reference": "held-out digits (359)"}
    result["wall_time_s"] = round(time.perf_counter() - start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out} ({result['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
