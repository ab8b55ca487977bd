"""Training speed of the audio recipe's network: diffkit's Trainer beside the same network in a
straightforward PyTorch loop, in clips per CPU minute.

    python benchmarks/audio_speed.py                     # the default (mel) preset's network
    python benchmarks/audio_speed.py --preset cpu        # the waveform DiffWave
    python benchmarks/audio_speed.py --quick             # a smoke run, not a measurement (seconds)

Both train the recipe's network for the preset (same batch size, learning rate, data: FSDD's
training split as the recipe feeds it) from the same initial weights, in alternating rounds so
that a slow-down of the shared machine hits both alike:

- diffkit: ``Trainer.train()`` as ``recipes/audio_train.py`` builds it (the diffusion's loss
  with continuous noise levels and label dropout, AdamW with warm-up and LR decay, gradient
  clipping, EMA, the data loader; one checkpoint at the end of each round, no samples);
- plain: a hand-written loop: random batch, a noise level drawn the same way (uniform between
  neighbouring schedule points), the v- or eps-target, MSE, backward, clip, AdamW, EMA lerp.

Reported: steps/s and clips per CPU minute (process CPU seconds, so time the process waited
for the core does not count) of each, as medians over rounds; the ratio is the Trainer's
overhead. Writes ``--out`` (JSON) and prints a Markdown table.
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

from diffkit import TrainConfig, Trainer
from diffkit.runs import hardware_summary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import audio_train  # noqa: E402  (the recipe's own settings, data and network)

# --quick: a tiny network of either kind (the flags of the other kind are ignored by the recipe).
QUICK_NETWORK = ["--residual-channels", "8", "--num-layers", "2", "--dilation-cycle", "2",
                 "--mel-channels", "8", "--mel-blocks", "1"]


def plain_loop(net, diffusion, dataset, steps: int, batch_size: int, lr: float, cond_drop: float,
               state: dict) -> None:
    """``steps`` training steps written out by hand (state keeps the optimizer, EMA and RNG)."""
    if "opt" not in state:
        state["opt"] = torch.optim.AdamW(net.parameters(), lr=lr)
        state["ema"] = copy.deepcopy(net).requires_grad_(False)
        state["gen"] = torch.Generator().manual_seed(0)
        x_all = torch.stack([dataset[i]["x"] for i in range(len(dataset))])
        y_all = torch.stack([torch.as_tensor(dataset[i]["labels"]) for i in range(len(dataset))]) \
            if "labels" in dataset[0] else None
        state["data"] = (x_all, y_all)
        ab = diffusion.schedule.alpha_bar.float()
        state["levels"] = torch.cat([torch.ones(1), ab.sqrt()])  # sqrt(alpha_bar) at t = -1, 0, ..., T-1
    opt, ema, gen = state["opt"], state["ema"], state["gen"]
    x_all, y_all = state["data"]
    levels = state["levels"]
    T = len(levels) - 1
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (batch_size,), generator=gen)
        x0 = x_all[idx]
        t = torch.randint(0, T, (batch_size,), generator=gen)
        u = torch.rand(batch_size, generator=gen)
        a = levels[t + 1] + u * (levels[t] - levels[t + 1])  # uniform between neighbouring levels
        s = (1 - a**2).sqrt()
        eps = torch.randn(x0.shape, generator=gen)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        xt = a.view(shape) * x0 + s.view(shape) * eps
        target = a.view(shape) * eps - s.view(shape) * x0 if diffusion.prediction == "v" else eps
        kwargs = {}
        if y_all is not None:
            kwargs = {"labels": y_all[idx], "drop_cond": torch.rand(batch_size, generator=gen) < cond_drop}
        loss = (net(xt, a, **kwargs) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        get_ema_multi_avg_fn(0.999)(list(ema.parameters()), [p.detach() for p in net.parameters()], None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--preset", default=audio_train.DEFAULT_PRESET, choices=sorted(audio_train.PRESETS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=20)
    p.add_argument("--out", help="JSON path (default: benchmarks/results/audio_speed_<preset>.json; a temporary file "
                                 "with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run, not a measurement: 8 clips, a tiny network, batch 4, one round of one step")
    args = p.parse_args(argv)
    recipe_args = ["--preset", args.preset, "--no-progress"]
    scratch = None
    if args.quick:
        args.rounds, args.steps_per_round = 1, 1
        recipe_args += ["--max-clips", "8", "--batch-size", "4", *QUICK_NETWORK]
        if args.out is None:
            scratch = tempfile.TemporaryDirectory(prefix="audio_speed-quick-")  # removed when main returns
            args.out = str(Path(scratch.name) / "audio_speed.json")

    parser = audio_train.build_parser()
    s = audio_train.resolve_settings(parser.parse_args(recipe_args), parser)
    data = audio_train.load_data(s)
    torch.manual_seed(0)
    net, model_config, diffusion, modality_config, conditioning, mel_cfg = audio_train.build(s, data)
    dataset = audio_train.make_dataset(s, data, conditioning, mel_cfg)
    cond_drop = s["cond_drop_prob"] if conditioning == "class" else 0.0
    plain_net = copy.deepcopy(net)
    state: dict = {}
    rates = {"diffkit Trainer": [], "plain PyTorch loop": []}
    cpu_rates = {"diffkit Trainer": [], "plain PyTorch loop": []}
    start_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        plain_loop(plain_net, diffusion, dataset, 2, s["batch_size"], s["lr"], cond_drop, state)  # warm-up
        for r in range(args.rounds + 1):
            total = (r + 1) * args.steps_per_round
            config = TrainConfig(max_steps=total, batch_size=s["batch_size"], lr=s["lr"],
                                 warmup_steps=s["warmup_steps"], lr_decay=s["lr_decay"], ema_decay=s["ema_decay"],
                                 seed=0, output_dir=tmp, save_every=total, sample_every=0, device="cpu",
                                 progress=False)
            trainer = Trainer(net, diffusion, dataset, config, modality="audio", model_config=model_config,
                              modality_config=modality_config,
                              loss_kwargs={"cond_drop_prob": cond_drop} if cond_drop else None)
            w, c = time.perf_counter(), time.process_time()
            trainer.train()  # resumes from the previous round's checkpoint: steps_per_round new steps
            w, c = time.perf_counter() - w, time.process_time() - c
            if r:  # round 0 is the warm-up
                rates["diffkit Trainer"].append(args.steps_per_round / w)
                cpu_rates["diffkit Trainer"].append(args.steps_per_round * s["batch_size"] * 60 / c)
            w, c = time.perf_counter(), time.process_time()
            plain_loop(plain_net, diffusion, dataset, args.steps_per_round, s["batch_size"], s["lr"], cond_drop,
                       state)
            w, c = time.perf_counter() - w, time.process_time() - c
            if r:
                rates["plain PyTorch loop"].append(args.steps_per_round / w)
                cpu_rates["plain PyTorch loop"].append(args.steps_per_round * s["batch_size"] * 60 / c)
    result = {
        "preset": args.preset, "network": model_config["class"], "kwargs": model_config["kwargs"],
        "params": sum(p.numel() for p in net.parameters()), "batch_size": s["batch_size"],
        "rounds": args.rounds, "steps_per_round": args.steps_per_round,
        "steps_per_s": {k: round(statistics.median(v), 3) for k, v in rates.items()},
        "clips_per_cpu_minute": {k: round(statistics.median(v), 1) for k, v in cpu_rates.items()},
        "threads": torch.get_num_threads(), "hardware": hardware_summary(),
        "wall_time_s": round(time.perf_counter() - start_all, 1),
        "command": "python " + " ".join(["benchmarks/audio_speed.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    ratio = result["clips_per_cpu_minute"]["diffkit Trainer"] / result["clips_per_cpu_minute"]["plain PyTorch loop"]
    result["trainer_over_plain"] = round(ratio, 3)
    out = Path(args.out or f"benchmarks/results/audio_speed_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| {args.preset} ({result['params'] / 1e6:.2f}M parameters, batch {s['batch_size']}) | steps/s | "
          f"clips per CPU minute |\n|---|---|---|")
    for k in rates:
        print(f"| {k} | {result['steps_per_s'][k]} | {result['clips_per_cpu_minute'][k]} |")
    print(f"Trainer / plain: {ratio:.3f}; {result['hardware']}; {result['wall_time_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
