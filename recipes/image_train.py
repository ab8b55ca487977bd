"""Train an image diffusion model with diffkit.

With no arguments this trains the default model: a class-conditional U-Net on scikit-learn's
digits (16x16), with classifier-free guidance, on the CPU in minutes. Presets and flags
scale it up:

    python recipes/image_train.py                              # digits, class-conditional
    python recipes/image_train.py --preset digits-text         # prompts ("a handwritten 7")
    python recipes/image_train.py --preset digits-sr           # super-resolution 8x8 -> 16x16
    python recipes/image_train.py --preset cifar10 --data-root ~/data   # a GPU-sized run
    python recipes/image_train.py --data folder:~/pictures --image-size 32 --channels 3
    torchrun --nproc_per_node 4 recipes/image_train.py --preset cifar10 --data-root ~/data

Every run writes to ``--output-dir``: ``checkpoint/`` (resumed automatically when the same
command is run again), ``samples/step_XXXXXX.png`` grids every ``--sample-every`` steps and
``tensorboard/`` logs. ``--export DIR`` finally writes a compact copy (EMA weights only,
float16) with the command, seed, hardware and wall time recorded, the form the shipped
checkpoints in ``modalities/image/checkpoints`` take. The export is then calibrated as ``diffkit
calibrate`` does (sampler grids for ``--calibrate-steps``, the model's statistics, its reverse
variances); ``--no-calibrate`` skips it.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import diffkit
from diffkit.runs import (
    add_calibrate_arguments,
    add_flow_argument,
    add_sampling_default_arguments,
    add_training_arguments,
    apply_flow,
    flow_time_scale,
    calibrate_export,
    export_checkpoint,
    is_main_process,
    sampling_defaults,
    train_config,
    usage_errors,
)
from diffkit.trainer import Trainer

from modalities.image.data import (
    DIGITS_BIN_WIDTH,
    EIGHT_BIT_BIN_WIDTH,
    ImageDataset,
    ImageFolder,
    digit_captions,
    load_digits,
    torchvision_dataset,
)
from modalities.image.modality import save_grid
from modalities.image.text import DEFAULT_TEXT_ENCODER, load_text_encoder
from modalities.image.unet import UNet

# Each preset is a complete, reproducible configuration; flags override single entries.
PRESETS: dict[str, dict[str, Any]] = {
    "digits": dict(
        data="digits", image_size=16, channels=1, conditioning="class",
        base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=(1, 2, 2), attention_levels=(2,),
        schedule="cosine", prediction="v", learn_sigma=False,
        max_steps=8000, batch_size=64, lr=1e-3, warmup_steps=200, ema_decay=0.999,
        cond_drop_prob=0.1, sampler="dpm++2m", sample_steps=20, guidance_scale=1.5,
        sample_every=1000, save_every=1000,
    ),
    "digits-text": dict(
        data="digits", image_size=16, channels=1, conditioning="text",
        base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=(1, 2, 2), attention_levels=(2,),
        schedule="cosine", prediction="v", learn_sigma=False,
        max_steps=6000, batch_size=64, lr=1e-3, warmup_steps=200, ema_decay=0.999,
        cond_drop_prob=0.1, sampler="dpm++2m", sample_steps=20, guidance_scale=2.0,
        sample_every=1000, save_every=1000,
    ),
    "digits-sr": dict(
        data="digits", image_size=16, channels=1, conditioning="low_res", low_res_size=8,
        base_channels=24, channel_mult=(1, 2, 2), num_res_blocks=(1, 1, 1), attention_levels=(),
        schedule="cosine", prediction="v", learn_sigma=False,
        max_steps=3000, batch_size=64, lr=1e-3, warmup_steps=200, ema_decay=0.999,
        cond_drop_prob=0.0, sampler="dpm++2m", sample_steps=20, guidance_scale=1.0,
        sample_every=1000, save_every=1000,
    ),
    "cifar10": dict(
        data="torchvision:CIFAR10", image_size=32, channels=3, conditioning="class",
        base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_levels=(2,),
        schedule="cosine", prediction="v", learn_sigma=False, hflip=True, dropout=0.1,
        max_steps=200_000, batch_size=128, lr=2e-4, warmup_steps=5000, ema_decay=0.9999,
        cond_drop_prob=0.1, sampler="dpm++2m", sample_steps=25, guidance_scale=1.5,
        sample_every=5000, save_every=5000,
    ),
}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace(",", " ").split())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        # Fixed, not sys.argv[0]: errors read the same under torchrun, python -m and tests.
        prog="image_train.py",
        description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n" + __doc__.split("scale it up:\n\n")[1].split("\n\n")[0],
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="digits",
                   help="base configuration (default: digits); the flags below override it")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="digits | folder:PATH | torchvision:NAME (e.g. torchvision:CIFAR10)")
    g.add_argument("--data-root", default="~/data",
                   help="where torchvision data sets already are (nothing is downloaded)")
    g.add_argument("--image-size", type=int, help="training resolution (square)")
    g.add_argument("--channels", type=int, choices=(1, 3), help="1 = grey, 3 = RGB")
    g.add_argument("--conditioning", choices=("none", "class", "text", "low_res"),
                   help="what the model is conditioned on")
    g.add_argument("--low-res-size", type=int, help="input size of a super-resolution model")
    g.add_argument("--text-encoder", default=DEFAULT_TEXT_ENCODER,
                   help="local Hugging Face encoder directory for --conditioning text "
                        f"(default: {DEFAULT_TEXT_ENCODER}, the packaged all-MiniLM-L6-v2)")
    g = p.add_argument_group("network")
    g.add_argument("--base-channels", type=int, help="width of the full-resolution level")
    g.add_argument("--channel-mult", type=_ints, help='width multipliers per level, e.g. "1,2,2"')
    g.add_argument("--num-res-blocks", type=_ints, help='blocks per level, e.g. "1,2,2" or "2"')
    g.add_argument("--attention-levels", type=_ints, help='levels with attention, e.g. "2"')
    g.add_argument("--dropout", type=float, help="dropout in residual blocks")
    g.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=None,
                   help="learned variance trained with the hybrid loss (Improved DDPM)")
    g = p.add_argument_group("diffusion")
    g.add_argument("--schedule", help="noise schedule: linear, cosine, ..., or flow")
    g.add_argument("--prediction", choices=("eps", "x0", "v", "flow"), help="what the network predicts")
    add_flow_argument(g)
    g.add_argument("--cond-drop-prob", type=float,
                   help="probability of dropping the condition (classifier-free guidance)")
    add_training_arguments(p, run_dir="runs/image-<preset>")
    g = add_sampling_default_arguments(p)
    g.add_argument("--export", metavar="DIR",
                   help="after training, write a compact EMA-only float16 checkpoint here")
    add_calibrate_arguments(g)
    return p


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The preset with every flag that was given laid over it."""
    settings = dict(PRESETS[args.preset])
    for key, value in vars(args).items():
        if value is not None and key not in ("preset",):
            settings[key] = value
    if settings["conditioning"] == "low_res" and not settings.get("low_res_size"):
        raise ValueError("--conditioning low_res needs --low-res-size")
    settings.setdefault("output_dir", f"runs/image-{args.preset}")
    if settings.get("flow") and settings.get("learn_sigma"):
        raise ValueError("--flow trains with the simple loss; the preset's learned variance (hybrid loss) does not "
                         "apply to it")
    return apply_flow(settings, args.prediction)


def load_data(s: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None, float]:
    """(images in [-1, 1], labels or None, class names, bin width) for the chosen data."""
    spec = s["data"]
    if spec == "digits":
        if s["channels"] != 1:
            raise ValueError("the digits are greyscale: use --channels 1")
        x, y = load_digits(s["image_size"], split="train", seed=0)
        bin_width = DIGITS_BIN_WIDTH if s["image_size"] == 16 else EIGHT_BIT_BIN_WIDTH
        return x, y, [str(i) for i in range(10)], bin_width
    if spec.startswith("folder:"):
        folder = ImageFolder(Path(spec[7:]).expanduser(), s["image_size"], s["channels"],
                             with_labels=s["conditioning"] == "class")
        print(f"loaded {len(folder)} images from {spec[7:]} ({folder.num_skipped} unreadable skipped)")
        return folder.images, folder.labels, folder.class_names, EIGHT_BIT_BIN_WIDTH
    if spec.startswith("torchvision:"):
        try:
            x, y = torchvision_dataset(spec[12:], Path(s["data_root"]).expanduser(), s["image_size"])
        except ImportError as err:  # a missing optional package is bad input here, not a crash
            raise ValueError(str(err)) from err
        if x.shape[1] != s["channels"]:
            raise ValueError(f"{spec} has {x.shape[1]} channels; pass --channels {x.shape[1]}")
        return x, y, None, EIGHT_BIT_BIN_WIDTH
    raise ValueError(f"unknown --data {spec!r}; use digits, folder:PATH or torchvision:NAME")


@dataclass
class Built:
    """What :func:`build` makes: the network and how a checkpoint describes it."""

    net: UNet
    model_config: dict[str, Any]      # {"class", "kwargs"}: enough to rebuild the network
    modality_config: dict[str, Any]   # what the image modality needs to sample it
    diffusion: diffkit.Diffusion


def build(s: dict[str, Any], labels: torch.Tensor | None, class_names, bin_width) -> Built:
    """The network (initialised from ``s["seed"]``), its configs and the diffusion."""
    cond = s["conditioning"]
    num_classes = None
    if cond == "class":
        if labels is None:
            raise ValueError("class conditioning needs labels (sub-folders for folder: data)")
        num_classes = int(labels.max()) + 1
    context_dim = None
    if cond == "text":
        context_dim = load_text_encoder(s["text_encoder"]).dim
    kwargs = dict(
        in_channels=s["channels"], image_size=s["image_size"], base_channels=s["base_channels"],
        channel_mult=list(s["channel_mult"]),
        num_res_blocks=list(s["num_res_blocks"]) if len(s["num_res_blocks"]) > 1 else s["num_res_blocks"][0],
        attention_levels=list(s["attention_levels"]), num_classes=num_classes,
        context_dim=context_dim, low_res_channels=s["channels"] if cond == "low_res" else 0,
        learn_sigma=bool(s["learn_sigma"]), dropout=s.get("dropout", 0.0),
        **flow_time_scale(s["schedule"]),
    )
    # The initial weights are drawn here, before the Trainer seeds anything: without this the
    # same --seed would start (and so end) from different weights.
    diffkit.seed_everything(s["seed"])
    net = UNet(**kwargs)
    diffusion = diffkit.Diffusion(
        s["schedule"], 1000, s["prediction"],
        variance="learned_range" if s["learn_sigma"] else "fixed_small",
        loss_type="hybrid" if s["learn_sigma"] else "simple",
        decoder="discretized", bin_width=bin_width,
    )
    modality_config = {
        "data": s["data"], "class_names": class_names if num_classes else None,
        "text_encoder": s["text_encoder"] if cond == "text" else None,
        "text_max_length": 16,
        "low_res_size": s.get("low_res_size") if cond == "low_res" else None,
        "bin_width": bin_width,
        "defaults": sampling_defaults(s),
    }
    return Built(net, {"class": "modalities.image.unet.UNet", "kwargs": kwargs}, modality_config, diffusion)


def make_dataset(s, images, labels):
    cond = s["conditioning"]
    if cond == "text":
        if labels is None:
            raise ValueError("text conditioning builds captions from labels; this data has none")
        encoder = load_text_encoder(s["text_encoder"])
        return ImageDataset(images, labels, caption_fn=digit_captions, text_encoder=encoder,
                            hflip=s.get("hflip", False))
    return ImageDataset(images, labels if cond == "class" else None,
                        low_res_size=s.get("low_res_size") if cond == "low_res" else None,
                        hflip=s.get("hflip", False))


def make_sample_fn(s, diffusion, dataset, num: int = 64):
    """Writes a grid of EMA samples (classes in rows for class-conditional models)."""
    out = Path(s["output_dir"]) / "samples"
    fixed = {}
    cond = s["conditioning"]
    num = min(num, len(dataset))
    if cond == "class":
        n_classes = int(dataset.labels.max()) + 1
        fixed["labels"] = torch.arange(num) % n_classes
    elif cond in ("text", "low_res"):
        # Conditions of real training items, so the grid can be compared with the data.
        items = [dataset[i] for i in range(num)]
        keys = ("context", "context_mask") if cond == "text" else ("low_res",)
        fixed = {k: torch.stack([it[k] for it in items]) for k in keys}

    def sample_fn(trainer: Trainer, step: int) -> None:
        dev = trainer.device
        g = torch.Generator().manual_seed(s["seed"])
        w = s["guidance_scale"] if cond in ("class", "text") else 1.0
        x = diffusion.sample(trainer.ema_model, (num, s["channels"], s["image_size"], s["image_size"]),
                             sampler=s["sampler"], steps=s["sample_steps"], generator=g, device=dev,
                             guidance_scale=w, wrappers=[diffkit.ClipX0(-1.0, 1.0)],
                             **{k: v.to(dev) for k, v in fixed.items()})
        save_grid((x.float().cpu() + 1) / 2, out / f"step_{step:06d}.png",
                  nrow=10 if cond == "class" else None)

    return sample_fn


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    main_process = is_main_process()
    with usage_errors(parser):
        s = resolve_settings(args)
        images, labels, class_names, bin_width = load_data(s)
        built = build(s, labels, class_names, bin_width)
        dataset = make_dataset(s, images, labels)
        config = train_config(s)
        cond_drop = s["cond_drop_prob"] if s["conditioning"] in ("class", "text") else 0.0
        trainer = Trainer(built.net, built.diffusion, dataset, config, modality="image",
                          model_config=built.model_config, modality_config=built.modality_config,
                          sample_fn=make_sample_fn(s, built.diffusion, dataset),
                          loss_kwargs={"cond_drop_prob": cond_drop} if cond_drop else None)
        # Resuming is part of checking the input: a --output-dir holding another kind of
        # checkpoint is a usage error, not a crash.
        trainer.resume()
    if main_process:
        n_params = sum(p.numel() for p in built.net.parameters())
        print(f"preset {args.preset}: {len(dataset)} images {tuple(images.shape[1:])}, "
              f"{s['conditioning']} conditioning, U-Net {n_params / 1e6:.2f}M parameters, "
              f"{built.diffusion!r}")
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    if main_process:
        print(f"trained to step {trainer.step} in {wall:.0f} s; checkpoint: {trainer.checkpoint_dir}")
    if args.export and main_process:
        path = export_checkpoint(trainer.checkpoint_dir, args.export, modality="image",
                                 command=["recipes/image_train.py", *argv], seed=s["seed"], wall_time_s=wall,
                                 device=trainer.device, defaults=built.modality_config["defaults"],
                                 final_loss=trainer.history[-1]["loss"] if trainer.history else None)
        print(f"exported {path}")
        calibrate_export(path, args, trainer.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
