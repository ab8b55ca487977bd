"""The trainer with loss_fn (any network, any objective): parameter subsets, logged values,
gradient accumulation, gradient clipping, checkpoint metadata and input validation."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import diffkit
from diffkit.checkpoint import load_checkpoint
from diffkit.trainer import TrainConfig, Trainer
from _toys import NUM_TIMESTEPS, TinyDenoiser, state_equal, vectors


class NoiseLevelDenoiser(nn.Module):
    """An MLP eps-model told the noise level sqrt(alpha_bar) in (0, 1]."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.SiLU(), nn.Linear(16, 4))

    def forward(self, x, level):
        return self.net(torch.cat([x, level[:, None].to(x.dtype)], dim=1))


class ValueNet(nn.Module):
    """A value head on a body: the shape of a network whose head is trained on a frozen body."""

    def __init__(self, dim: int = 4, hidden: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, 1)

    def forward(self, obs):
        return self.head(self.body(obs)).squeeze(-1)


class Weights(nn.Module):
    """f(x) = x @ w: a loss that is linear in w has a gradient known in closed form."""

    def __init__(self, initial):
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(initial, dtype=torch.float32).clone())

    def forward(self, x):
        return x @ self.w


def regression_data(n: int = 16, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, 4, generator=generator)
    target = obs.sum(dim=1).sin()
    return [{"obs": o, "target": t} for o, t in zip(obs, target)]


def mse(model, batch):
    """A deterministic loss that is a mean over the examples (what accumulation assumes)."""
    return ((model(batch["obs"]) - batch["target"]) ** 2).mean()


def mse_with_values(model, batch):
    loss = mse(model, batch)
    return loss, {"twice": 2 * loss, "const": 3.0}


def make_config(tmp_path, name="run", **overrides) -> TrainConfig:
    settings = dict(
        max_steps=4, batch_size=8, lr=1e-2, warmup_steps=0, grad_clip=None, ema_decay=0.9, seed=0,
        output_dir=str(tmp_path / name), save_every=0, sample_every=0, log_every=1, device="cpu",
        tensorboard=False, progress=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def value_trainer(config, *, model_seed=0, head_only=True, **kwargs) -> Trainer:
    diffkit.seed_everything(model_seed)
    model = ValueNet()
    parameters = model.head.parameters() if head_only else None
    return Trainer(model, None, regression_data(), config, loss_fn=mse, parameters=parameters, modality="value",
                   **kwargs)


def test_parameters_limit_what_the_optimiser_updates(tmp_path):
    trainer = value_trainer(make_config(tmp_path, max_steps=3), modality_config={"obs_dim": 4})
    body = {k: v.clone() for k, v in trainer.model.body.state_dict().items()}
    head = {k: v.clone() for k, v in trainer.model.head.state_dict().items()}
    trainer.train()

    assert state_equal(trainer.model.body.state_dict(), body)
    assert not torch.equal(trainer.model.head.weight, head["weight"])
    optimised = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert [id(p) for p in optimised] == [id(p) for p in trainer.model.head.parameters()]
    ckpt = load_checkpoint(trainer.checkpoint_dir, modality="value")
    assert ckpt.diffusion_config is None and ckpt.config["diffusion"] is None
    assert ckpt.config["modality_config"] == {"obs_dim": 4}
    assert state_equal(ckpt.model_state, trainer.model.state_dict())


class Interrupted(Exception):
    pass


def interrupt(trainer, step):
    raise Interrupted(step)


def test_resumed_loss_fn_run_matches_an_uninterrupted_one(tmp_path):
    # 16 examples, batch 4, two micro-batches a step: step 3 starts the second epoch. The LR
    # decays towards max_steps, so the first run is interrupted (after its step-3 save), not
    # shortened.
    settings = dict(max_steps=5, batch_size=4, grad_accum_steps=2, lr_decay="linear", warmup_steps=1)
    straight = value_trainer(make_config(tmp_path, "straight", **settings))
    straight.train()
    first = value_trainer(make_config(tmp_path, "resumed", save_every=3, sample_every=3, **settings),
                          sample_fn=interrupt)
    with pytest.raises(Interrupted):
        first.train()
    second = value_trainer(make_config(tmp_path, "resumed", save_every=3, sample_every=3, **settings), model_seed=1)
    second.train()

    assert first.step == 3 and second.step == 5
    assert [r["loss"] for r in first.history + second.history] == [r["loss"] for r in straight.history]
    assert [r["lr"] for r in first.history + second.history] == [r["lr"] for r in straight.history]
    assert state_equal(second.model.state_dict(), straight.model.state_dict())
    assert state_equal(second.ema_model.state_dict(), straight.ema_model.state_dict())
    assert state_equal(second.optimizer.state_dict(), straight.optimizer.state_dict())


def test_resume_with_other_parameters_says_what_to_do(tmp_path):
    value_trainer(make_config(tmp_path, max_steps=1)).train()
    other = value_trainer(make_config(tmp_path, max_steps=2), head_only=False)
    with pytest.raises(ValueError, match="Pass the same `parameters=`"):
        other.train()


@pytest.mark.parametrize(
    "n, big_batch, micro_batch, accum",
    [
        (16, 8, 4, 2),   # equal micro-batches: two steps in one epoch
        (12, 12, 5, 3),  # micro-batches of 5, 5 and 2: averaged per example, not per micro-batch
    ],
)
def test_accumulated_step_equals_one_big_batch(tmp_path, n, big_batch, micro_batch, accum):
    # Same seed, same permutation of the n examples: step k of both runs sees the same examples.
    # grad_clip is small so that clipping is active: it must act on the accumulated gradient.
    runs = {}
    for name, batch_size, grad_accum_steps in [("big", big_batch, 1), ("accum", micro_batch, accum)]:
        diffkit.seed_everything(0)
        model = ValueNet()
        config = make_config(tmp_path, name, max_steps=2, batch_size=batch_size, grad_accum_steps=grad_accum_steps,
                             grad_clip=0.05, lr=0.05)
        runs[name] = Trainer(model, None, regression_data(n), config, loss_fn=mse_with_values)
        runs[name].train()

    big, accumulated = runs["big"], runs["accum"]
    assert big.history[0]["grad_norm"] > 0.05  # so the clipping mattered
    for field in ("loss", "grad_norm", "twice", "const"):
        assert [r[field] for r in accumulated.history] == pytest.approx([r[field] for r in big.history], rel=1e-5)
    for name, value in accumulated.model.state_dict().items():
        torch.testing.assert_close(value, big.model.state_dict()[name], rtol=1e-5, atol=1e-6)


def test_logged_values_reach_history_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    diffkit.seed_everything(0)
    config = make_config(tmp_path, max_steps=4, log_every=2, tensorboard=True, grad_accum_steps=2, batch_size=4)
    trainer = Trainer(ValueNet(), None, regression_data(), config, loss_fn=mse_with_values)
    trainer.train()

    assert [r["step"] for r in trainer.history] == [2, 4]
    for record in trainer.history:
        assert record["twice"] == pytest.approx(2 * record["loss"], rel=1e-6)
        assert record["const"] == pytest.approx(3.0)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    twice = [(e.step, e.value) for e in events.Scalars("train/twice")]
    assert twice == [(r["step"], pytest.approx(r["twice"], rel=1e-6)) for r in trainer.history]


@pytest.mark.parametrize("grad_clip, applied_scale", [(None, 1.0), (1.0, 1.0 / 13.0), (100.0, 1.0)])
def test_gradient_clipping_scales_the_applied_gradient(tmp_path, grad_clip, applied_scale):
    # loss = mean_i x_i . w with every x_i = c: the gradient is c, of norm |(3, 4, 12)| = 13.
    c = torch.tensor([3.0, 4.0, 12.0])
    model = Weights(torch.zeros(3))
    beta1 = 0.8
    config = make_config(tmp_path, max_steps=1, grad_clip=grad_clip, betas=(beta1, 0.999), batch_size=4)
    trainer = Trainer(model, None, [c.clone() for _ in range(4)], config, loss_fn=lambda m, x: m(x).mean())
    trainer.train()

    assert trainer.history[0]["grad_norm"] == pytest.approx(13.0)  # logged before clipping
    applied = c * applied_scale
    torch.testing.assert_close(model.w.grad, applied)
    # AdamW's first moment after one step is (1 - beta1) * the gradient it was given.
    torch.testing.assert_close(trainer.optimizer.state[model.w]["exp_avg"], (1 - beta1) * applied)


def test_modality_config_and_side_files_go_into_the_checkpoint(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("a b c")
    trainer = value_trainer(make_config(tmp_path, max_steps=1), modality_config={"vocab": "vocab.txt"},
                            side_files={"vocab.txt": vocab, "stats.json": b'{"mean": 0.5}'})
    trainer.train()
    config = json.loads((trainer.checkpoint_dir / "config.json").read_text())
    assert config["modality_config"] == {"vocab": "vocab.txt"} and config["diffusion"] is None
    assert (trainer.checkpoint_dir / "vocab.txt").read_text() == "a b c"
    assert (trainer.checkpoint_dir / "stats.json").read_bytes() == b'{"mean": 0.5}'


def _returns(value):
    return lambda model, batch: value(mse(model, batch))


@pytest.mark.parametrize(
    "loss_fn, error, message",
    [
        (_returns(lambda loss: loss.reshape(1).expand(2)), TypeError, r"scalar \(0-dim\) floating tensor.*shape \(2,\)"),
        (_returns(lambda loss: loss.item()), TypeError, "scalar.*got a float"),
        (_returns(lambda loss: loss.detach()), ValueError, "does not depend on any parameter"),
        (_returns(lambda loss: (loss, {"loss": 1.0})), ValueError, "named 'loss'"),
        (_returns(lambda loss: (loss, {"v": torch.ones(3)})), TypeError, "'v' must be a number or a 0-dim tensor"),
        (_returns(lambda loss: (loss, 1.0)), TypeError, r"loss or \(loss, \{name: value\}\)"),
    ],
)
def test_bad_loss_fn_results_are_explained(tmp_path, loss_fn, error, message):
    trainer = Trainer(ValueNet(), None, regression_data(), make_config(tmp_path), loss_fn=loss_fn)
    with pytest.raises(error, match=message):
        trainer.train()


def test_loss_fn_values_must_keep_their_names(tmp_path):
    calls = []

    def changing(model, batch):
        calls.append(1)
        return mse(model, batch), ({"a": 1.0} if len(calls) == 1 else {"b": 1.0})

    trainer = Trainer(ValueNet(), None, regression_data(), make_config(tmp_path), loss_fn=changing)
    with pytest.raises(ValueError, match=r"returned the values \['b'\] but \['a'\] before"):
        trainer.train()


def test_bad_trainer_arguments_are_rejected_up_front(tmp_path):
    config = make_config(tmp_path)
    model = ValueNet()
    data = regression_data()
    with pytest.raises(ValueError, match="pass diffusion.*or loss_fn.*got neither"):
        Trainer(model, None, data, config)
    with pytest.raises(TypeError, match="only recorded: it needs a .config"):
        Trainer(model, object(), data, config, loss_fn=mse)
    with pytest.raises(TypeError, match="must have a .loss"):
        Trainer(model, object(), data, config)
    with pytest.raises(ValueError, match="loss_kwargs are passed to diffusion.loss"):
        Trainer(model, None, data, config, loss_fn=mse, loss_kwargs={"cond_drop_prob": 0.1})
    with pytest.raises(ValueError, match="with loss_fn, dataset items must be a Tensor or a dict"):
        Trainer(model, None, [(torch.zeros(4), 1.0)], config, loss_fn=mse)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        Trainer(model, None, data, config, loss_fn=mse, parameters=[nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="parameters is empty"):
        Trainer(model, None, data, config, loss_fn=mse, parameters=[])
    frozen = ValueNet()
    frozen.head.requires_grad_(False)
    with pytest.raises(ValueError, match="does not require grad"):
        Trainer(frozen, None, data, config, loss_fn=mse, parameters=frozen.head.parameters())
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        Trainer(model, None, data, {"max_steps": 4}, loss_fn=mse)
    with pytest.raises(TypeError, match="modality_config must be a dict"):
        Trainer(model, None, data, config, loss_fn=mse, modality_config=["sample_rate", 16000])
    with pytest.raises(ValueError, match="modality_config must be JSON-able"):
        Trainer(model, None, data, config, loss_fn=mse, modality_config={"mean": torch.zeros(2)})
    with pytest.raises(FileNotFoundError, match="side file 'vocab.txt'.*is not a file"):
        Trainer(model, None, data, config, loss_fn=mse, side_files={"vocab.txt": tmp_path / "missing.txt"})


def test_a_dataset_without_x_is_fine_with_loss_fn_only(tmp_path):
    # The dict items of regression_data() have no "x": the diffusion path must still refuse them.
    with pytest.raises(ValueError, match="under 'x'"):
        Trainer(TinyDenoiser(), diffkit.Diffusion(num_timesteps=NUM_TIMESTEPS), regression_data(), make_config(tmp_path))


def test_a_loss_fn_with_a_diffusion_trains_with_the_fn_and_records_the_diffusion(tmp_path):
    """Diffusion-LM-style objectives add terms to diffusion.loss; the checkpoint still names the process."""
    diffusion = diffkit.Diffusion(num_timesteps=NUM_TIMESTEPS, time_input="noise_level")
    calls = []

    def objective(model, batch):
        calls.append(1)
        return diffusion.loss(model, batch) + 0.0 * sum(p.sum() for p in model.parameters())

    trainer = Trainer(NoiseLevelDenoiser(), diffusion, vectors(), make_config(tmp_path), loss_fn=objective)
    trainer.train()
    assert len(calls) == trainer.step
    saved = diffkit.load_checkpoint(trainer.checkpoint_dir)
    assert diffkit.Diffusion.from_config(saved.diffusion_config).time_input == "noise_level"
