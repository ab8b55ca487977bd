"""The training loop: exact resume, EMA and warm-up arithmetic, divergence handling, validation."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

import diffkit
import diffkit.trainer as trainer_module
from diffkit.checkpoint import CheckpointError, load_checkpoint
from diffkit.trainer import TrainConfig, Trainer, TrainingError, _autocast_dtype
from _toys import NUM_TIMESTEPS, TinyDenoiser, labelled, state_equal, vectors


def make_config(tmp_path, name="run", **overrides) -> TrainConfig:
    settings = dict(
        max_steps=4, batch_size=8, lr=1e-2, warmup_steps=2, grad_clip=1.0, ema_decay=0.9, seed=0,
        output_dir=str(tmp_path / name), save_every=0, sample_every=0, log_every=1, device="cpu",
        tensorboard=False, progress=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def make_trainer(config, *, model_seed=0, dataset=None, **kwargs) -> Trainer:
    torch.manual_seed(model_seed)
    model = kwargs.pop("model", None) or TinyDenoiser()
    diffusion = diffkit.Diffusion(num_timesteps=NUM_TIMESTEPS)
    return Trainer(model, diffusion, dataset if dataset is not None else vectors(), config, modality="toy", **kwargs)


def test_trains_and_writes_a_complete_checkpoint(tmp_path):
    config = make_config(tmp_path, max_steps=4, save_every=2)
    trainer = make_trainer(config, model_config={"class": "_toys.TinyDenoiser", "kwargs": {}})
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()

    assert trainer.step == 4
    assert [r["step"] for r in trainer.history] == [1, 2, 3, 4]
    assert not torch.equal(trainer.model.inp.weight, initial["inp.weight"])
    ckpt = load_checkpoint(trainer.checkpoint_dir, modality="toy")
    assert ckpt.step == 4
    assert ckpt.model_config == {"class": "_toys.TinyDenoiser", "kwargs": {}}
    assert ckpt.diffusion_config == trainer.diffusion.config
    assert diffkit.Diffusion.from_config(ckpt.diffusion_config).num_timesteps == NUM_TIMESTEPS
    assert TrainConfig.from_dict(ckpt.config["train"]) == config
    assert state_equal(ckpt.model_state, trainer.model.state_dict())
    assert state_equal(ckpt.ema_state, trainer.ema_model.state_dict())
    assert state_equal(ckpt.optimizer_state, trainer.optimizer.state_dict())


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    """Stop at step 4 (mid-epoch: 20 items, batch 8), resume to 7: identical to running to 7."""
    straight = make_trainer(make_config(tmp_path, "straight", max_steps=7))
    straight.train()

    first = make_trainer(make_config(tmp_path, "resumed", max_steps=4))
    first.train()
    # A different initialisation proves the weights really come from the checkpoint.
    second = make_trainer(make_config(tmp_path, "resumed", max_steps=7), model_seed=123)
    second.train()

    losses = [r["loss"] for r in first.history + second.history]
    assert losses == [r["loss"] for r in straight.history]
    assert state_equal(second.model.state_dict(), straight.model.state_dict())
    assert state_equal(second.ema_model.state_dict(), straight.ema_model.state_dict())
    assert state_equal(second.optimizer.state_dict(), straight.optimizer.state_dict())
    assert second.lr_scheduler.state_dict() == straight.lr_scheduler.state_dict()


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    runs = [make_trainer(make_config(tmp_path, f"r{i}", max_steps=2, seed=seed)) for i, seed in enumerate([5, 5, 6])]
    for run in runs:
        run.train()
    assert state_equal(runs[0].model.state_dict(), runs[1].model.state_dict())
    assert not state_equal(runs[0].model.state_dict(), runs[2].model.state_dict())


def test_nothing_to_do_when_checkpoint_is_at_max_steps(tmp_path):
    make_trainer(make_config(tmp_path, max_steps=2)).train()
    config_file = tmp_path / "run" / "checkpoint" / "config.json"
    before = config_file.stat().st_mtime_ns
    again = make_trainer(make_config(tmp_path, max_steps=2))
    again.train()
    assert again.step == 2 and again.history == []
    assert config_file.stat().st_mtime_ns == before


def test_resume_refuses_a_checkpoint_of_another_modality(tmp_path):
    make_trainer(make_config(tmp_path, max_steps=1)).train()
    other = Trainer(TinyDenoiser(), diffkit.Diffusion(num_timesteps=NUM_TIMESTEPS), vectors(), make_config(tmp_path, max_steps=2),
                    modality="audio")
    with pytest.raises(CheckpointError, match="is for 'toy', not 'audio'"):
        other.train()


def test_resume_warns_when_the_diffusion_changed(tmp_path):
    make_trainer(make_config(tmp_path, max_steps=1)).train()
    other = Trainer(TinyDenoiser(), diffkit.Diffusion(num_timesteps=NUM_TIMESTEPS, prediction="v"), vectors(),
                    make_config(tmp_path, max_steps=2), modality="toy")
    with pytest.warns(UserWarning, match=r"different diffusion config \(changed: prediction\)"):
        other.train()


def test_ema_is_an_exponential_moving_average(tmp_path):
    # ema_start=1: the first step copies the weights, the second one averages.
    snapshots = {}

    def snapshot(trainer, step):
        snapshots[step] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        snapshots[f"ema{step}"] = {k: v.clone() for k, v in trainer.ema_model.state_dict().items()}

    decay = 0.9
    trainer = make_trainer(make_config(tmp_path, max_steps=2, ema_decay=decay, ema_start=1, sample_every=1), sample_fn=snapshot)
    trainer.train()
    assert state_equal(snapshots["ema1"], snapshots[1])
    for name, ema_value in snapshots["ema2"].items():
        if ema_value.is_floating_point():
            expected = decay * snapshots[1][name] + (1 - decay) * snapshots[2][name]
            torch.testing.assert_close(ema_value, expected, rtol=1e-6, atol=1e-7)


def test_ema_after_one_step(tmp_path):
    decay = 0.75
    trainer = make_trainer(make_config(tmp_path, max_steps=1, ema_decay=decay))
    initial = {k: v.clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    ema = dict(trainer.ema_model.named_parameters())
    for name, new in trainer.model.named_parameters():
        torch.testing.assert_close(ema[name], decay * initial[name] + (1 - decay) * new.detach(), rtol=1e-6, atol=1e-7)
        assert not ema[name].requires_grad


def test_linear_warmup_learning_rates(tmp_path):
    trainer = make_trainer(make_config(tmp_path, max_steps=6, lr=0.1, warmup_steps=4))
    trainer.train()
    lrs = [r["lr"] for r in trainer.history]
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


def test_gradient_clipping_bounds_the_update(tmp_path):
    # With clipping the logged norm is the norm *before* clipping; the update uses the clipped one.
    trainer = make_trainer(make_config(tmp_path, max_steps=1, grad_clip=1e-3))
    trainer.train()
    assert trainer.history[0]["grad_norm"] > 1e-3


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    files = {}

    def remember_checkpoint(trainer, step):
        files.update({p.name: p.read_bytes() for p in trainer.checkpoint_dir.iterdir()})

    # Forward call 5 = step 5 returns NaN; the checkpoint of step 4 must survive untouched.
    model = TinyDenoiser(nan_after=5)
    trainer = make_trainer(make_config(tmp_path, max_steps=8, save_every=2, sample_every=4), model=model,
                           sample_fn=remember_checkpoint)
    with pytest.raises(TrainingError) as info:
        trainer.train()

    error = info.value
    assert isinstance(error, FloatingPointError)
    assert error.step == 5 and error.checkpoint_path == trainer.checkpoint_dir
    message = str(error)
    assert "step 5" in message and str(trainer.checkpoint_dir) in message and "(step 4)" in message
    assert "lower learning rate" in message and "check the data" in message
    assert {p.name: p.read_bytes() for p in trainer.checkpoint_dir.iterdir()} == files
    assert load_checkpoint(trainer.checkpoint_dir).step == 4
    # The NaN step did not touch the weights.
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint"]


def test_nan_before_any_checkpoint_says_so(tmp_path):
    trainer = make_trainer(make_config(tmp_path, max_steps=3), model=TinyDenoiser(nan_after=1))
    with pytest.raises(TrainingError, match="step 1.*No checkpoint had been written yet"):
        trainer.train()
    assert not trainer.checkpoint_dir.exists()


def test_conditions_and_loss_kwargs_reach_the_model(tmp_path):
    model = TinyDenoiser(num_classes=3)
    trainer = make_trainer(make_config(tmp_path, max_steps=2), model=model, dataset=labelled(),
                           loss_kwargs={"cond_drop_prob": 0.5})
    trainer.train()
    seen = model.seen_cond[-1]
    assert seen["label"].dtype == torch.long and seen["label"].shape == (8,)
    assert seen["drop_cond"].dtype == torch.bool


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(vectors())


@pytest.mark.parametrize(
    "dataset, error, message",
    [
        ([], ValueError, "empty"),
        ([(torch.zeros(4), 1)], ValueError, "must be a Tensor.*or a dict"),
        ([{"image": torch.zeros(4)}], ValueError, "under 'x'"),
        (Stream(), TypeError, "map-style dataset"),
    ],
)
def test_bad_datasets_are_rejected_up_front(tmp_path, dataset, error, message):
    with pytest.raises(error, match=message):
        make_trainer(make_config(tmp_path), dataset=dataset)


def test_non_finite_first_batch_is_rejected(tmp_path):
    data = vectors()
    data[3] = torch.full_like(data[3], float("nan"))
    trainer = make_trainer(make_config(tmp_path, batch_size=20), dataset=data)
    with pytest.raises(ValueError, match="first training batch holds 4 NaN/Inf"):
        trainer.train()


def test_train_config_round_trip_and_validation():
    config = TrainConfig(max_steps=10, betas=[0.5, 0.9], output_dir=Path("runs/x"))
    assert config.betas == (0.5, 0.9) and config.output_dir == "runs/x"
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown TrainConfig field.*bogus"):
        TrainConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="lr must be > 0.*mixed_precision must be one of"):
        TrainConfig(lr=0, mixed_precision="fp8")


def test_mixed_precision_choice():
    cpu = torch.device("cpu")
    assert _autocast_dtype("auto", cpu) is None  # bf16 on CPUs is usually slower, so "auto" skips it
    assert _autocast_dtype("bf16", cpu) is torch.bfloat16
    assert _autocast_dtype("no", cpu) is None


def test_bf16_autocast_step_runs_on_cpu(tmp_path):
    trainer = make_trainer(make_config(tmp_path, max_steps=1, mixed_precision="bf16"))
    trainer.train()
    assert trainer.model.inp.weight.dtype == torch.float32  # autocast, not a cast of the weights


def test_tensorboard_progress_and_sample_fn(tmp_path, capsys):
    calls = []
    trainer = make_trainer(
        make_config(tmp_path, max_steps=4, tensorboard=True, progress=True, sample_every=2, log_every=2),
        sample_fn=lambda trainer, step: calls.append((step, trainer.ema_model is not None, torch.is_grad_enabled())),
    )
    trainer.train()
    assert calls == [(2, True, False), (4, True, False)]
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert "loss=" in capsys.readouterr().err


def test_missing_tensorboard_warns_once_and_continues(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    monkeypatch.setattr(trainer_module, "_warned_no_tensorboard", False)
    with pytest.warns(UserWarning, match="pip install tensorboard"):
        make_trainer(make_config(tmp_path, "a", max_steps=1, tensorboard=True)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_trainer(make_config(tmp_path, "b", max_steps=1, tensorboard=True)).train()
