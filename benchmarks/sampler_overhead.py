"""A sampler's own cost per step, beside one forward pass of a small network.

Times `Diffusion.sample` with a network that costs nothing (it returns its input), so all
that is measured is the sampler's own bookkeeping (coefficients, updates, history, the
denoiser wrapper), and sets it beside one forward pass of a small convolutional network.
The issue's budget: under 5% of that forward pass.

    python benchmarks/sampler_overhead.py            # about 1 minute on 2 CPU cores
    python benchmarks/sampler_overhead.py --device cuda
    python benchmarks/sampler_overhead.py --quick        # a smoke run: tiny batch, 3 steps, seconds
"""

from __future__ import annotations

import argparse
import time

import torch

import diffkit
from diffkit import Diffusion


class SmallConvNet(torch.nn.Module):
    """Three 3x3 convolutions, 64 channels: about the cost of a tiny U-Net level."""

    def __init__(self, channels: int = 3, width: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(width, channels, 3, padding=1),
        )

    def forward(self, x, t):
        return self.net(x)


def timed(fn, repeats: int, sync) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run, not a measurement: batch 2 of 8x8, 3 steps, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.steps, args.repeats = 2, 8, 3, 1
    device = diffkit.resolve_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = SmallConvNet().to(device).eval()
    diff = Diffusion("linear", 1000)
    shape = (args.batch, 3, args.size, args.size)
    x = torch.randn(shape, device=device)
    t = torch.full((args.batch,), 500, device=device)

    def bare_calls(n):
        for _ in range(n):
            model(x, t)

    timed(lambda: bare_calls(3), 1, sync)  # warm-up
    forward = timed(lambda: bare_calls(args.steps), args.repeats, sync) / args.steps
    print(f"# device {device}, batch {tuple(shape)}, {args.steps} steps, {torch.get_num_threads()} threads; "
          f"forward pass {forward * 1e3:.2f} ms")
    print("| sampler | calls | sampler overhead per call, ms | overhead / forward pass | first run of a grid |")
    print("|---|---|---|---|---|")
    def free_model(x_t, t):
        return x_t

    # dpm-v3 as a calibrated model runs it: statistics per element (200 log-SNR points, smooth
    # in lambda). Its step coefficients are computed on the first run of a grid and cached.
    lambdas = torch.linspace(-5.0, 5.0, 200, dtype=torch.float64)
    ramp = torch.sigmoid(lambdas).reshape(-1, 1, 1, 1) * torch.rand(1, *shape[1:], generator=torch.Generator().manual_seed(0))
    calibrated = Diffusion("linear", 1000, calibration={"statistics": {
        "lambdas": lambdas.tolist(), "linear": ramp.tolist(), "offset": (0.1 * ramp).tolist()}})
    rows = [(sampler, diff, sampler) for sampler in diffkit.SAMPLERS]
    rows.append(("dpm-v3, per-element statistics", calibrated, "dpm-v3"))
    for label, source, sampler in rows:
        calls = diffkit.model_calls(sampler, args.steps)
        def run(source=source, sampler=sampler):  # defaults bind this row's values, not the last row's
            return source.sample(free_model, shape, sampler=sampler, steps=args.steps, device=device,
                                 generator=torch.Generator().manual_seed(0))

        first = timed(run, 1, sync) / calls
        overhead = timed(run, args.repeats, sync) / calls
        print(f"| {label} | {calls} | {overhead * 1e3:.3f} | {overhead / forward:.1%} | {first / forward:.1%} |")


if __name__ == "__main__":
    main()
