"""Checkpoint format: exact round-trips without pickle, atomic replacement, and clear errors."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from torch import nn

import diffkit.checkpoint as ckpt_module
from diffkit.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    checkpoint_exists,
    load_checkpoint,
    parameter_count,
    read_config,
    save_checkpoint,
    versions,
)
from _toys import TinyDenoiser, state_equal

CONFIG = {"modality": "image", "model": {"class": "TinyDenoiser", "kwargs": {"hidden": 16}}, "diffusion": {"schedule": "linear"}}


class TiedModel(nn.Module):
    """Input embedding shared with the output layer: safetensors refuses shared tensors as-is."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight
        self.norm = nn.BatchNorm1d(4)  # brings integer buffers (num_batches_tracked)

    def forward(self, tokens):
        return self.head(self.norm(self.embed(tokens)))


def trained_state():
    """A model, its EMA copy, an AdamW optimizer with state and a LambdaLR after two steps."""
    torch.manual_seed(0)
    model = TiedModel()
    ema = TiedModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    for _ in range(2):
        model(torch.tensor([1, 2, 3])).square().mean().backward()
        optimizer.step()
        scheduler.step()
    return model, ema, optimizer, scheduler


def save_version(path, marker: float, **kwargs):
    """Save a small model whose weights are all ``marker``, to tell checkpoints apart."""
    model = TinyDenoiser()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(marker)
    save_checkpoint(path, model=model, config=CONFIG, step=int(marker), **kwargs)
    return model


def test_round_trip_is_exact(tmp_path):
    model, ema, optimizer, scheduler = trained_state()
    path = save_checkpoint(
        tmp_path / "ckpt", model=model, config=CONFIG, ema_model=ema, optimizer=optimizer,
        lr_scheduler=scheduler, step=2, extra={"note": "hello"},
    )
    loaded = load_checkpoint(path, modality="image")

    assert loaded.step == 2 and loaded.path == path
    assert loaded.modality == "image" and loaded.model_config == CONFIG["model"]
    assert loaded.diffusion_config == CONFIG["diffusion"] and loaded.extra == {"note": "hello"}
    assert loaded.config["format_version"] == FORMAT_VERSION
    assert set(loaded.config["versions"]) == {"diffkit", "torch", "python"}
    assert state_equal(loaded.model_state, model.state_dict())
    assert state_equal(loaded.ema_state, ema.state_dict())
    # Int parameter ids, tuple betas and 0-dim tensor step counters all come back as they were.
    assert state_equal(loaded.optimizer_state, optimizer.state_dict())
    assert state_equal(loaded.lr_scheduler_state, scheduler.state_dict())

    # And they load into fresh objects (tied weights included, strict=True). The scheduler is
    # built before loading the optimizer, as its constructor resets the learning rate.
    fresh = TiedModel()
    fresh.load_state_dict(loaded.model_state)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1.0)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda step: 1.0)
    fresh_opt.load_state_dict(loaded.optimizer_state)
    fresh_sched.load_state_dict(loaded.lr_scheduler_state)
    assert fresh.head.weight is fresh.embed.weight
    assert state_equal(fresh_opt.state_dict(), optimizer.state_dict())
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()


def test_layout_is_json_plus_safetensors(tmp_path):
    model, ema, optimizer, scheduler = trained_state()
    save_checkpoint(tmp_path / "c", model=model, config=CONFIG, ema_model=ema, optimizer=optimizer, lr_scheduler=scheduler)
    assert sorted(os.listdir(tmp_path / "c")) == ["config.json", "ema.safetensors", "model.safetensors", "optimizer.safetensors"]
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["format"] == "diffkit-checkpoint"
    assert config["optimizer"]["param_groups"][0]["weight_decay"] == 0.1
    assert os.listdir(tmp_path) == ["c"]  # no staging directories left behind


def test_optional_parts_are_absent_when_not_given(tmp_path):
    save_version(tmp_path / "c", 1.0)
    loaded = load_checkpoint(tmp_path / "c")
    assert loaded.ema_state is None and loaded.optimizer_state is None and loaded.lr_scheduler_state is None
    assert not (tmp_path / "c" / "optimizer.safetensors").exists()


def test_nothing_is_pickled(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle-based serialisation must not be used")

    for module, name in [(torch, "save"), (torch, "load"), (pickle, "dump"), (pickle, "dumps"), (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(module, name, forbidden)
    model, ema, optimizer, scheduler = trained_state()
    save_checkpoint(tmp_path / "c", model=model, config=CONFIG, ema_model=ema, optimizer=optimizer, lr_scheduler=scheduler)
    load_checkpoint(tmp_path / "c")


def test_overwrite_replaces_the_old_checkpoint(tmp_path):
    save_version(tmp_path / "c", 1.0)
    save_version(tmp_path / "c", 2.0)
    loaded = load_checkpoint(tmp_path / "c")
    assert loaded.step == 2
    assert all(bool((v == 2.0).all()) for k, v in loaded.model_state.items() if v.is_floating_point())
    assert os.listdir(tmp_path) == ["c"]


@pytest.mark.parametrize("crash_point", ["before_swap", "while_writing", "between_renames"])
def test_crash_during_save_keeps_the_old_checkpoint(tmp_path, monkeypatch, crash_point):
    save_version(tmp_path / "c", 1.0)

    if crash_point == "before_swap":
        # Everything is written to the staging directory, then the process dies.
        def crash(staging, path):
            assert (staging / "config.json").is_file() and (staging / "model.safetensors").is_file()
            raise KeyboardInterrupt

        monkeypatch.setattr(ckpt_module, "_swap_in", crash)
    elif crash_point == "while_writing":
        real_save_file = ckpt_module.save_file

        def crash(tensors, filename, metadata=None):
            real_save_file(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:  # leave a half-written file behind
                f.truncate(10)
            raise OSError("disk full")

        monkeypatch.setattr(ckpt_module, "save_file", crash)
    else:
        real_rename = os.rename

        def crash(src, dst):
            if ".partial-" in str(src):  # the old one is already aside; fail moving the new one in
                raise OSError("simulated crash")
            real_rename(src, dst)

        monkeypatch.setattr(ckpt_module.os, "rename", crash)

    with pytest.raises((KeyboardInterrupt, OSError)):
        save_version(tmp_path / "c", 2.0)
    monkeypatch.undo()

    loaded = load_checkpoint(tmp_path / "c")
    assert loaded.step == 1
    assert os.listdir(tmp_path) == ["c"]  # the staging directory was cleaned up


def test_power_loss_between_renames_is_recovered(tmp_path):
    """A hard crash after moving the old checkpoint aside but before moving the new one in."""
    save_version(tmp_path / "c", 1.0)
    os.rename(tmp_path / "c", tmp_path / ".c.old-deadbeef")
    (tmp_path / ".c.partial-cafe0000").mkdir()  # the staging directory, state unknown

    assert checkpoint_exists(tmp_path / "c")
    assert load_checkpoint(tmp_path / "c").step == 1

    # The next save cleans up the leftovers.
    save_version(tmp_path / "c", 2.0)
    assert load_checkpoint(tmp_path / "c").step == 2
    assert os.listdir(tmp_path) == ["c"]


@pytest.mark.parametrize("filename", ["model.safetensors", "ema.safetensors", "optimizer.safetensors"])
def test_truncated_file_names_the_file(tmp_path, filename):
    model, ema, optimizer, scheduler = trained_state()
    save_checkpoint(tmp_path / "c", model=model, config=CONFIG, ema_model=ema, optimizer=optimizer, lr_scheduler=scheduler)
    file = tmp_path / "c" / filename
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{filename}.*truncated or corrupt"):
        load_checkpoint(tmp_path / "c")


@pytest.mark.parametrize("filename", ["model.safetensors", "optimizer.safetensors"])
def test_missing_file_names_the_file(tmp_path, filename):
    _, _, optimizer, _ = trained_state()
    save_checkpoint(tmp_path / "c", model=TinyDenoiser(), config=CONFIG, optimizer=optimizer)
    (tmp_path / "c" / filename).unlink()
    with pytest.raises(CheckpointError, match=f"{filename} is missing.*Copy the whole directory again"):
        load_checkpoint(tmp_path / "c")


def test_wrong_modality(tmp_path):
    save_checkpoint(tmp_path / "c", model=TinyDenoiser(), config={**CONFIG, "modality": "audio"})
    with pytest.raises(CheckpointError, match="is for 'audio', not 'image'"):
        load_checkpoint(tmp_path / "c", modality="image")
    assert load_checkpoint(tmp_path / "c", modality="audio").modality == "audio"


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_newer_format_version_asks_to_upgrade(tmp_path):
    save_version(tmp_path / "c", 1.0)
    edit_config(tmp_path / "c", format_version=FORMAT_VERSION + 1)
    with pytest.raises(CheckpointError, match="upgrade diffkit"):
        load_checkpoint(tmp_path / "c")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "config.json").unlink(), "config.json is missing"),
        (lambda p: (p / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda p: (p / "config.json").write_text("[1, 2]"), "not a diffkit checkpoint config"),
        (lambda p: edit_config(p, format="something-else"), "format is 'something-else'"),
        (lambda p: edit_config(p, format_version="one"), "invalid format_version"),
    ],
)
def test_broken_config(tmp_path, damage, message):
    save_version(tmp_path / "c", 1.0)
    damage(tmp_path / "c")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "c")


def test_missing_path_and_file_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_checkpoint(tmp_path / "file")


def test_config_must_be_json(tmp_path):
    with pytest.raises(CheckpointError, match="not JSON-serializable"):
        save_checkpoint(tmp_path / "c", model=TinyDenoiser(), config={"modality": "image", "bad": object()})
    assert not (tmp_path / "c").exists()


def test_read_config_and_parameter_count(tmp_path):
    model = save_version(tmp_path / "c", 3.0)
    assert read_config(tmp_path / "c")["step"] == 3
    floats = sum(p.numel() for p in model.parameters())
    assert parameter_count(tmp_path / "c") == floats + 1  # + the `calls` buffer


def test_versions():
    info = versions()
    assert set(info) == {"diffkit", "torch", "python"}
    assert info["torch"] == torch.__version__
