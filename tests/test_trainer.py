"""The training loop (diffusion path): exact resume, EMA and LR arithmetic, autocast, divergence handling,
validation. The loss_fn path, accumulation and clipping are in test_trainer_generic.py."""

from __future__ import annotations

import json
import math
import re
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
    # Every step had a nonzero, finite gradient, and every learning weight moved.
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in trainer.history), trainer.history
    for name in ("inp.weight", "inp.bias", "out.weight", "out.bias", "time.weight"):
        assert not torch.equal(trainer.model.state_dict()[name], initial[name]), name
    ckpt = load_checkpoint(trainer.checkpoint_dir, modality="toy")
    assert ckpt.step == 4
    assert ckpt.model_config == {"class": "_toys.TinyDenoiser", "kwargs": {}}
    assert ckpt.diffusion_config == trainer.diffusion.config
    assert diffkit.Diffusion.from_config(ckpt.diffusion_config).num_timesteps == NUM_TIMESTEPS
    assert TrainConfig.from_dict(ckpt.config["train"]) == config
    assert state_equal(ckpt.model_state, trainer.model.state_dict())
    assert state_equal(ckpt.ema_state, trainer.ema_model.state_dict())
    assert state_equal(ckpt.optimizer_state, trainer.optimizer.state_dict())


@pytest.mark.parametrize("batch_size, grad_accum_steps", [(8, 1), (4, 2)])
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, batch_size, grad_accum_steps):
    """Stop at step 4, resume to 7: identical to running to 7.

    20 items: with batch 8 step 4 ends mid-epoch; with 2 micro-batches of 4 it ends after
    micro-batch 8 of 5 per epoch, and step 3 straddles the epoch boundary.
    """
    settings = dict(batch_size=batch_size, grad_accum_steps=grad_accum_steps)
    straight = make_trainer(make_config(tmp_path, "straight", max_steps=7, **settings))
    straight.train()

    first = make_trainer(make_config(tmp_path, "resumed", max_steps=4, **settings))
    first.train()
    # A different initialisation proves the weights really come from the checkpoint.
    second = make_trainer(make_config(tmp_path, "resumed", max_steps=7, **settings), model_seed=123)
    second.train()

    losses = [r["loss"] for r in first.history + second.history]
    assert losses == [r["loss"] for r in straight.history]
    assert state_equal(second.model.state_dict(), straight.model.state_dict())
    assert state_equal(second.ema_model.state_dict(), straight.ema_model.state_dict())
    assert state_equal(second.optimizer.state_dict(), straight.optimizer.state_dict())
    assert second.lr_scheduler.state_dict() == straight.lr_scheduler.state_dict()


def test_training_time_adds_up_over_resumed_runs_and_is_exported(tmp_path):
    from diffkit.runs import export_checkpoint

    first = make_trainer(make_config(tmp_path, "run", max_steps=3))
    first.train()
    recorded = diffkit.load_checkpoint(first.checkpoint_dir).extra["train_seconds"]
    assert recorded == first.train_seconds > 0
    second = make_trainer(make_config(tmp_path, "run", max_steps=5))
    second.train()
    total = diffkit.load_checkpoint(second.checkpoint_dir).extra["train_seconds"]
    assert total == second.train_seconds > recorded
    exported = export_checkpoint(second.checkpoint_dir, tmp_path / "export", modality="toy", command=["x"], seed=0,
                                 wall_time_s=0.0)
    assert diffkit.load_checkpoint(exported).extra["train_seconds"] == round(total, 1)
    # A checkpoint from before this record: the total is unknown, not restarted from zero.
    config_file = second.checkpoint_dir / "config.json"
    config = json.loads(config_file.read_text())
    del config["extra"]["train_seconds"]
    config_file.write_text(json.dumps(config))
    third = make_trainer(make_config(tmp_path, "run", max_steps=6))
    third.train()
    assert third.train_seconds is None
    assert diffkit.load_checkpoint(third.checkpoint_dir).extra["train_seconds"] is None


def test_each_run_of_a_resumed_model_is_recorded_and_exported(tmp_path):
    import shlex

    from diffkit.runs import export_checkpoint

    first = make_trainer(make_config(tmp_path, "run", max_steps=3, lr=1e-2))
    first.train()
    second = make_trainer(make_config(tmp_path, "run", max_steps=5, lr=1e-3, save_every=1))
    with pytest.warns(UserWarning, match="changed optimizer settings"):
        second.train()
    segments = diffkit.load_checkpoint(second.checkpoint_dir).extra["segments"]
    assert [seg["steps"] for seg in segments] == [[0, 3], [3, 5]]
    assert [seg["train"]["lr"] for seg in segments] == [1e-2, 1e-3]
    assert [seg["train"]["max_steps"] for seg in segments] == [3, 5]
    assert all(seg["command"] == shlex.join(sys.argv) and seg["seconds"] >= 0 for seg in segments)
    assert segments[0]["final_loss"] == first.history[-1]["loss"]
    assert segments[1]["final_loss"] == second.history[-1]["loss"]
    assert "output_dir" not in segments[0]["train"]  # where a run reports is not part of its recipe
    # An export of the finished run (it trains nothing) still says how the weights came about.
    exported = export_checkpoint(second.checkpoint_dir, tmp_path / "export", modality="toy", command=["x"], seed=0,
                                 wall_time_s=0.0)
    extra = diffkit.load_checkpoint(exported).extra
    assert extra["segments"] == segments and extra["final_loss"] == second.history[-1]["loss"]
    # A checkpoint from before the record: its earlier runs are unknown, not absent.
    config_file = second.checkpoint_dir / "config.json"
    config = json.loads(config_file.read_text())
    del config["extra"]["segments"]
    config_file.write_text(json.dumps(config))
    third = make_trainer(make_config(tmp_path, "run", max_steps=6, lr=1e-3))
    third.train()
    steps = [seg["steps"] for seg in diffkit.load_checkpoint(third.checkpoint_dir).extra["segments"]]
    assert steps == [[0, 5], [5, 6]]
    assert diffkit.load_checkpoint(third.checkpoint_dir).extra["segments"][0]["command"] is None


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


def test_resume_uses_the_new_learning_rate_and_schedule_from_its_first_step(tmp_path):
    """A run resumed with another lr and a longer cosine follows them at once; it used to keep the
    checkpoint's lr silently and spend its first step at the old schedule's final LR."""
    make_trainer(make_config(tmp_path, max_steps=4, lr=0.1, lr_decay="cosine", warmup_steps=0)).train()
    lr, max_steps = 0.02, 8
    resumed = make_trainer(make_config(tmp_path, max_steps=max_steps, lr=lr, lr_decay="cosine", warmup_steps=0,
                                       weight_decay=0.5, betas=(0.8, 0.99)))
    with pytest.warns(UserWarning, match=r"changed optimizer settings \(lr 0.1 -> 0.02, betas \(0.9, 0.999\) -> "
                                         r"\(0.8, 0.99\), weight_decay 0.0 -> 0.5\)"):
        resumed.train()
    expected = [lr * (1 + math.cos(math.pi * k / max_steps)) / 2 for k in range(5, max_steps + 1)]
    assert [r["lr"] for r in resumed.history] == pytest.approx(expected, rel=1e-12)
    group = resumed.optimizer.param_groups[0]
    assert (group["weight_decay"], group["betas"]) == (0.5, (0.8, 0.99))


def test_resume_with_unchanged_settings_says_nothing_about_them(tmp_path):
    make_trainer(make_config(tmp_path, max_steps=2)).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(make_config(tmp_path, max_steps=3)).train()
    assert not [w for w in caught if "optimizer settings" in str(w.message)]


def test_resume_refuses_an_incomplete_checkpoint_instead_of_starting_over(tmp_path):
    make_trainer(make_config(tmp_path, max_steps=2)).train()
    checkpoint = tmp_path / "run" / "checkpoint"
    (checkpoint / "config.json").unlink()
    left = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    with pytest.raises(CheckpointError, match="holds files but no config.json.*move it away"):
        make_trainer(make_config(tmp_path, max_steps=4)).train()
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir()} == left


def test_resume_into_another_network_names_the_settings_that_differ(tmp_path):
    make_trainer(make_config(tmp_path, max_steps=1), model_config={"class": "_toys.TinyDenoiser", "kwargs": {}}).train()
    wider = make_trainer(make_config(tmp_path, max_steps=2), model=TinyDenoiser(hidden=32),
                         model_config={"class": "_toys.TinyDenoiser", "kwargs": {"hidden": 32}})
    with pytest.raises(CheckpointError, match=r"do not fit this model \(hidden None -> 32\).*another output_dir"):
        wider.train()


def custom_diffusion(betas) -> diffkit.Diffusion:
    return diffkit.Diffusion(schedule=diffkit.NoiseSchedule.from_betas(betas))


@pytest.mark.parametrize("change, reported", [(lambda b: b + 1e-16, []), (lambda b: b * 1.001, ["schedule.betas"])])
def test_resume_ignores_float_noise_in_the_schedule_but_not_a_change(tmp_path, change, reported):
    betas = torch.linspace(1e-4, 0.02, NUM_TIMESTEPS, dtype=torch.float64)
    Trainer(TinyDenoiser(), custom_diffusion(betas), vectors(), make_config(tmp_path, max_steps=1), modality="toy").train()
    changed = change(betas)
    assert not torch.equal(changed, betas)
    other = Trainer(TinyDenoiser(), custom_diffusion(changed), vectors(), make_config(tmp_path, max_steps=2),
                    modality="toy")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        other.train()
    found = [re.search(r"different diffusion config \(changed: (.*?)\)", str(w.message)) for w in caught]
    assert [match.group(1) for match in found if match] == [", ".join(reported)] * bool(reported)


@pytest.mark.parametrize(
    "saved, current, changed",
    [
        ({"a": 0.1, "b": [1.0, 2.0]}, {"a": 0.1 * (1 + 1e-12), "b": [1.0, 2.0 + 1e-15]}, []),
        ({"a": 0.1}, {"a": 0.1 * (1 + 1e-8)}, ["a"]),
        ({"b": [1.0, 2.0]}, {"b": [1.0, 2.0, 3.0]}, ["b"]),
        ({"s": {"name": "linear", "n": 50}}, {"s": {"name": "cosine", "n": 50.0}}, ["s.name"]),
        ({"flag": True}, {"flag": 1}, ["flag"]),
        ({"a": 1, "diffkit_version": "0.1"}, {"a": 1, "new": None, "diffkit_version": "0.2"}, ["new"]),
        ({"a": 0.0}, {"a": 1e-300}, ["a"]),
        ({"a": 1, "calibration": {"eps_norm_sq": [0.5]}}, {"a": 1}, []),  # fitted to weights, not a setting
    ],
)
def test_changed_settings_compares_numbers_with_a_relative_tolerance(saved, current, changed):
    assert trainer_module._changed_settings(saved, current) == changed


def test_ema_is_an_exponential_moving_average(tmp_path):
    # ema_start=1: the first step copies the weights, the second one averages.
    snapshots = {}

    def snapshot(trainer, step):
        snapshots[step] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        snapshots[f"ema{step}"] = {k: v.clone() for k, v in trainer.ema_model.state_dict().items()}

    decay = 0.9
    trainer = make_trainer(make_config(tmp_path, max_steps=2, ema_decay=decay, ema_start=1, sample_every=1,
                                       ema_warmup=False), sample_fn=snapshot)
    trainer.train()
    assert state_equal(snapshots["ema1"], snapshots[1])
    for name, ema_value in snapshots["ema2"].items():
        if ema_value.is_floating_point():
            expected = decay * snapshots[1][name] + (1 - decay) * snapshots[2][name]
            torch.testing.assert_close(ema_value, expected, rtol=1e-6, atol=1e-7)


def test_ema_after_one_step(tmp_path):
    decay = 0.75
    trainer = make_trainer(make_config(tmp_path, max_steps=1, ema_decay=decay, ema_warmup=False))
    initial = {k: v.clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    ema = dict(trainer.ema_model.named_parameters())
    for name, new in trainer.model.named_parameters():
        torch.testing.assert_close(ema[name], decay * initial[name] + (1 - decay) * new.detach(), rtol=1e-6, atol=1e-7)
        assert not ema[name].requires_grad


def test_ema_warmup_forgets_the_initial_weights_as_the_formula_says(tmp_path):
    """One scalar weight, 1 at the start and 0 after every step: the EMA after N steps is the
    initial weights' share, and with warm-up that share is prod_k min(d, (1+k)/(10+k))
    over the averaging updates k = 1..N - ema_start; while the warm-up stays below d it telescopes
    to 10! (N+1)! / (N+10)!."""
    from diffkit.trainer import ema_decay_at, ema_initial_share

    def share_after(steps, decay, *, start=0, warmup=True):
        trainer = make_trainer(make_config(tmp_path, name=f"r{steps}-{decay}-{start}-{warmup}", ema_decay=decay,
                                           ema_start=start, ema_warmup=warmup),
                               model=torch.nn.Linear(1, 1, bias=False))
        trainer.ema_model.weight.data.fill_(1.0)  # the initial weight (copied while step <= ema_start)
        for step in range(1, steps + 1):
            trainer.model.weight.data.fill_(1.0 if step <= start else 0.0)  # then every step takes it to 0
            trainer._update_ema(step)
        return float(trainer.ema_model.weight.double())

    for n in (1, 5, 30):
        closed = math.factorial(10) * math.factorial(n + 1) / math.factorial(n + 10)
        assert share_after(n, 0.999) == pytest.approx(closed, rel=1e-5)
        assert ema_initial_share(n, 0.999) == pytest.approx(closed, rel=1e-12)
    # Once (1+k)/(10+k) passes the decay (k >= 80 for 0.9), the decay itself applies.
    assert [ema_decay_at(k, 0.9) for k in (1, 79, 80, 500)] == [2 / 11, 80 / 89, 0.9, 0.9]
    expected = math.prod(min(0.9, (1 + k) / (10 + k)) for k in range(1, 101))
    assert share_after(100, 0.9) == pytest.approx(expected, rel=1e-4)
    assert ema_initial_share(100, 0.9) == pytest.approx(expected, rel=1e-12)
    # ema_start: copies first, then the warm-up counts from the first averaging update (the share
    # is that of the weights at step ema_start).
    assert ema_decay_at(3, 0.9, start=3) == 0.0 and ema_decay_at(4, 0.9, start=3) == 2 / 11
    assert share_after(6, 0.999, start=3) == pytest.approx(2 / 11 * 3 / 12 * 4 / 13, rel=1e-5)
    # Off: the old EMA, decay ** N; a preset's 0.999 over 800 steps keeps 45% of the start.
    assert share_after(20, 0.9, warmup=False) == pytest.approx(0.9 ** 20, rel=1e-5)
    assert ema_initial_share(800, 0.999, warmup=False) == pytest.approx(0.999 ** 800) and 0.999 ** 800 > 0.44
    assert ema_initial_share(800, 0.999) < 1e-19


def test_ema_warmup_off_reproduces_the_fixed_decay_bit_for_bit(tmp_path):
    """warm-up off: every update is torch's multi-tensor EMA with ema_decay, as before warm-up existed."""
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    trainer = make_trainer(make_config(tmp_path, max_steps=6, ema_decay=0.9, ema_start=2, ema_warmup=False))
    torch.manual_seed(1)
    reference = [p.detach().clone() for p in trainer.ema_model.parameters()]
    for step in range(1, 7):
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(torch.randn_like(p))
        trainer._update_ema(step)
        weights = [p.detach() for p in trainer.model.parameters()]
        if step <= 2:
            reference = [w.clone() for w in weights]
        else:
            get_ema_multi_avg_fn(0.9)(reference, weights, None)
        assert all(torch.equal(a, b) for a, b in zip(trainer.ema_model.parameters(), reference))


def test_ema_warmup_is_recorded_and_on_by_default(tmp_path):
    assert TrainConfig().ema_warmup is True
    trainer = make_trainer(make_config(tmp_path, max_steps=2))
    trainer.train()
    ckpt = load_checkpoint(trainer.checkpoint_dir)
    assert ckpt.config["train"]["ema_warmup"] is True
    assert ckpt.extra["segments"][-1]["train"]["ema_warmup"] is True
    assert TrainConfig.from_dict(ckpt.config["train"]) == trainer.config
    with pytest.raises(ValueError, match="ema_warmup must be True or False"):
        TrainConfig(ema_warmup="yes")
    # A run written without warm-up, resumed with it: the change is named.
    config = make_config(tmp_path, name="old", max_steps=2, ema_warmup=False)
    make_trainer(config).train()
    with pytest.warns(UserWarning, match=r"changed EMA settings \(ema_warmup False -> True\)"):
        make_trainer(make_config(tmp_path, name="old", max_steps=3)).train()


def test_linear_warmup_learning_rates(tmp_path):
    trainer = make_trainer(make_config(tmp_path, max_steps=6, lr=0.1, warmup_steps=4))
    trainer.train()
    lrs = [r["lr"] for r in trainer.history]
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


@pytest.mark.parametrize(
    "decay, shape",
    [("linear", lambda p: 1 - p), ("cosine", lambda p: (1 + math.cos(math.pi * p)) / 2)],
)
@pytest.mark.parametrize("warmup", [0, 3])
def test_learning_rate_decays_to_min_lr_at_max_steps(tmp_path, decay, shape, warmup):
    lr, min_lr, max_steps = 0.1, 0.01, 9
    trainer = make_trainer(make_config(tmp_path, max_steps=max_steps, lr=lr, min_lr=min_lr, warmup_steps=warmup,
                                       lr_decay=decay))
    trainer.train()
    expected = [
        lr * k / warmup if k <= warmup else min_lr + (lr - min_lr) * shape((k - warmup) / (max_steps - warmup))
        for k in range(1, max_steps + 1)
    ]
    assert [r["lr"] for r in trainer.history] == pytest.approx(expected, rel=1e-12)
    assert trainer.history[-1]["lr"] == pytest.approx(min_lr, rel=1e-12)


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


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(lr_decay="exponential"), "lr_decay must be one of none, cosine, linear"),
        (dict(lr_decay="cosine", lr=1e-3, min_lr=1e-2), r"min_lr must be in \[0, lr=0.001\]"),
        (dict(lr_decay="linear", min_lr=-1e-5), "min_lr must be in"),
        (dict(min_lr=1e-5), "min_lr=1e-05 has no effect with lr_decay='none'"),
        (dict(grad_accum_steps=0), "grad_accum_steps must be >= 1"),
        (dict(grad_accum_steps=2.5), "grad_accum_steps must be an integer"),
    ],
)
def test_train_config_rejects_bad_schedules(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_train_config_of_an_older_checkpoint_gets_the_new_defaults():
    old = TrainConfig(max_steps=10).to_dict()
    for name in ("lr_decay", "min_lr", "grad_accum_steps"):
        del old[name]
    config = TrainConfig.from_dict(old)
    assert (config.lr_decay, config.min_lr, config.grad_accum_steps) == ("none", 0.0, 1)


def test_mixed_precision_choice():
    cpu = torch.device("cpu")
    assert _autocast_dtype("auto", cpu) is None  # bf16 on CPUs is usually slower, so "auto" skips it
    assert _autocast_dtype("bf16", cpu) is torch.bfloat16
    assert _autocast_dtype("no", cpu) is None


@pytest.mark.parametrize(
    "mode, autocast, output_dtype",
    [("bf16", True, torch.bfloat16), ("no", False, torch.float32), ("auto", False, torch.float32)],
)
def test_forward_runs_under_autocast_only_with_bf16(tmp_path, mode, autocast, output_dtype):
    trainer = make_trainer(make_config(tmp_path, max_steps=2, mixed_precision=mode))
    seen = []
    trainer.model.inp.register_forward_hook(
        lambda module, args, output: seen.append((torch.is_autocast_enabled("cpu"), output.dtype))
    )
    trainer.train()
    assert seen == [(autocast, output_dtype)] * 2
    assert trainer.model.inp.weight.dtype == torch.float32  # autocast, not a cast of the weights
    assert trainer.model.inp.weight.grad.dtype == torch.float32


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
