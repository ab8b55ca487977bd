"""Recipe plumbing shared by every modality: exports, step defaults, generators, usage errors."""

import argparse

import pytest
import torch

from _toys import TinyDenoiser, vectors
from diffkit import Diffusion, TrainConfig, Trainer, load_checkpoint
from diffkit.runs import (
    add_sampling_default_arguments,
    add_training_arguments,
    export_checkpoint,
    resolve_steps,
    sampling_defaults,
    seeded_generator,
    train_config,
    usage_errors,
)


def test_export_keeps_configs_and_side_files_and_halves_the_ema_weights(tmp_path):
    trainer = Trainer(TinyDenoiser(), Diffusion("linear", 50), vectors(), TrainConfig(
        max_steps=3, batch_size=4, output_dir=str(tmp_path / "run"), tensorboard=False, progress=False),
        modality="toy", modality_config={"sample_rate": 8000}, side_files={"vocab.txt": b"a b c"})
    trainer.train()
    path = export_checkpoint(trainer.checkpoint_dir, tmp_path / "shipped", modality="toy",
                             command=["recipes/toy_train.py", "--seed", "3"], seed=3, wall_time_s=1.234,
                             side_files={"notes.txt": b"extra"})
    shipped = load_checkpoint(path, modality="toy")
    run = load_checkpoint(trainer.checkpoint_dir)
    assert shipped.optimizer_state is None and shipped.ema_state is None
    assert all(v.dtype == torch.float16 for v in shipped.model_state.values() if v.is_floating_point())
    assert all(torch.equal(shipped.model_state[k], run.ema_state[k].half()) for k in run.ema_state)
    assert shipped.modality_config == {"sample_rate": 8000}
    assert shipped.diffusion_config == run.diffusion_config and shipped.step == 3
    assert shipped.side_file("vocab.txt").read_bytes() == b"a b c"
    assert shipped.side_file("notes.txt").read_bytes() == b"extra"
    assert shipped.extra["recipe"] == "python recipes/toy_train.py --seed 3" and shipped.extra["wall_time_s"] == 1.2
    with pytest.raises(Exception, match="not 'image'"):
        export_checkpoint(trainer.checkpoint_dir, tmp_path / "x", modality="image", command=[], seed=0, wall_time_s=0)


def test_export_records_the_exporting_commands_sampling_defaults(tmp_path):
    trainer = Trainer(TinyDenoiser(), Diffusion("linear", 50), vectors(), TrainConfig(
        max_steps=2, batch_size=4, output_dir=str(tmp_path / "run"), tensorboard=False, progress=False),
        modality="toy", modality_config={"sample_rate": 8000, "defaults": {"sampler": "ddim", "steps": 50}})
    trainer.train()
    kept = export_checkpoint(trainer.checkpoint_dir, tmp_path / "kept", modality="toy", command=[], seed=0,
                             wall_time_s=0)
    assert load_checkpoint(kept).modality_config["defaults"] == {"sampler": "ddim", "steps": 50}
    new = export_checkpoint(trainer.checkpoint_dir, tmp_path / "new", modality="toy", command=[], seed=0,
                            wall_time_s=0, defaults={"sampler": "unipc", "steps": 10})
    assert load_checkpoint(new).modality_config == {"sample_rate": 8000, "defaults": {"sampler": "unipc", "steps": 10}}
    assert load_checkpoint(trainer.checkpoint_dir).modality_config["defaults"]["steps"] == 50  # the run is untouched


def test_steps_default_only_for_none():
    assert resolve_steps(None, 20) == 20 and resolve_steps(5, 20) == 5
    for bad in (0, -5, 2.5, True, "10"):
        with pytest.raises(ValueError, match="whole number >= 1"):
            resolve_steps(bad, 20)


def test_seeded_generators_repeat_and_unseeded_ones_differ():
    assert torch.equal(torch.randn(4, generator=seeded_generator(1)), torch.randn(4, generator=seeded_generator(1)))
    assert not torch.equal(torch.randn(4, generator=seeded_generator(None)), torch.randn(4, generator=seeded_generator(None)))


def test_usage_errors_exit_like_argparse(capsys, monkeypatch):
    parser = argparse.ArgumentParser(prog="toy_train.py")
    monkeypatch.delenv("DIFFKIT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        with usage_errors(parser):
            raise ValueError("the data folder is empty")
    assert exit_info.value.code == 2
    assert "toy_train.py: error: the data folder is empty" in capsys.readouterr().err
    with pytest.raises(KeyError):  # a bug is not a usage error
        with usage_errors(parser):
            raise KeyError("x")


def test_shared_training_flags_reach_the_train_config_and_unset_ones_keep_its_defaults(capsys):
    parser = argparse.ArgumentParser(prog="toy_train.py")
    group = add_training_arguments(parser, run_dir="runs/toy-<preset>", data_workers=False)
    group.add_argument("--extra", type=int)  # the group is handed back for the recipe's own flags
    add_sampling_default_arguments(parser)
    args = parser.parse_args(["--max-steps", "7", "--lr-decay", "cosine", "--no-progress", "--extra", "2",
                              "--sample-steps", "5"])
    preset = {"batch_size": 16, "lr": 1e-3, "output_dir": "runs/toy-cpu"}
    settings = {**preset, **{k: v for k, v in vars(args).items() if v is not None}}
    config = train_config(settings, log_every=3)
    defaults = TrainConfig()
    assert (config.max_steps, config.batch_size, config.lr, config.lr_decay) == (7, 16, 1e-3, "cosine")
    assert config.output_dir == "runs/toy-cpu" and config.progress is False and config.log_every == 3
    assert config.warmup_steps == defaults.warmup_steps and config.ema_decay == defaults.ema_decay
    assert config.seed == 0 and config.device == "auto" and not hasattr(args, "num_workers")
    assert args.sample_steps == 5 and args.extra == 2
    for bad in (["--max-steps", "0"], ["--batch-size", "two"], ["--lr-decay", "step"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    assert "must be >= 1, got 0" in capsys.readouterr().err
    assert "runs/toy-<preset>" in parser.format_help()


def test_sampling_defaults_are_checked_before_they_are_recorded():
    good = {"sampler": "unipc", "sample_steps": 10, "guidance_scale": 3.0, "guidance_interval": [1.5, float("inf")]}
    assert sampling_defaults(good) == {"sampler": "unipc", "steps": 10, "guidance_scale": 3.0,
                                       "guidance_interval": [1.5, None]}
    for change, message in [({"sampler": "bogus"}, "--sampler: unknown sampler 'bogus'; choose one of ddpm"),
                            ({"sample_steps": 0}, "--sample-steps: must be a whole number >= 1, got 0"),
                            ({"guidance_scale": float("nan")}, "--guidance-scale: must be a finite number"),
                            ({"guidance_interval": [2.0, 1.0]}, "--guidance-interval: guidance_interval needs")]:
        with pytest.raises(ValueError, match=message):
            sampling_defaults({**good, **change})


def test_sampling_default_flags_refuse_what_no_checkpoint_could_use():
    parser = argparse.ArgumentParser()
    add_sampling_default_arguments(parser)
    for argv in (["--sampler", "bogus"], ["--sample-steps", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    assert parser.parse_args(["--sampler", "dpm++2m", "--sample-steps", "12"]).sample_steps == 12
