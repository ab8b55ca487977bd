"""Checkpoint format: exact round-trips without pickle, atomic replacement, and clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import stat

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import diffkit.checkpoint as ckpt_module
from diffkit.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    checkpoint_exists,
    load_checkpoint,
    load_network,
    parameter_count,
    read_config,
    save_checkpoint,
    versions,
)
from diffkit.diffusion import Diffusion
from diffkit.utils import replaced_atomically
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


# --------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------


def sha256_of(file) -> str:
    return "sha256:" + hashlib.sha256(file.read_bytes()).hexdigest()


def test_every_written_file_is_checksummed(tmp_path):
    model, ema, optimizer, scheduler = trained_state()
    path = save_checkpoint(tmp_path / "c", model=model, config=CONFIG, ema_model=ema, optimizer=optimizer,
                           lr_scheduler=scheduler, side_files={"vocab.txt": b"a\nb\n"})
    checksums = read_config(path)["checksums"]
    written = ["ema.safetensors", "model.safetensors", "optimizer.safetensors", "vocab.txt"]
    assert sorted(checksums) == written
    assert all(checksums[name] == sha256_of(path / name) for name in written)


@pytest.mark.parametrize("filename", ["model.safetensors", "ema.safetensors"])
def test_weights_replaced_after_saving_are_refused(tmp_path, filename):
    save_version(tmp_path / "c", 1.0, ema_model=TinyDenoiser())
    save_version(tmp_path / "other", 2.0, ema_model=TinyDenoiser())
    # Valid safetensors of the same shapes: only the checksum can tell them apart.
    (tmp_path / "c" / filename).write_bytes((tmp_path / "other" / filename).read_bytes())
    with pytest.raises(CheckpointError, match=f"{filename} in checkpoint .* was modified after saving.*copy the whole"):
        load_checkpoint(tmp_path / "c")


def test_checkpoint_without_checksums_still_loads(tmp_path):
    save_version(tmp_path / "c", 1.0)
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    del config["checksums"]  # as written before checksums existed
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    assert load_checkpoint(tmp_path / "c").step == 1


def test_weights_file_dropped_into_a_checksummed_checkpoint_is_refused(tmp_path):
    save_version(tmp_path / "c", 1.0)  # no EMA
    save_checkpoint(tmp_path / "other", model=TinyDenoiser(), ema_model=TinyDenoiser(), config=CONFIG)
    (tmp_path / "c" / "ema.safetensors").write_bytes((tmp_path / "other" / "ema.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="ema.safetensors .* not listed in the checksums"):
        load_checkpoint(tmp_path / "c")


def test_recorded_ema_that_went_missing_is_an_error(tmp_path):
    save_checkpoint(tmp_path / "c", model=TinyDenoiser(), ema_model=TinyDenoiser(), config=CONFIG)
    (tmp_path / "c" / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match="ema.safetensors is missing"):
        load_checkpoint(tmp_path / "c")


def test_unknown_checksum_algorithm_asks_to_upgrade(tmp_path):
    save_version(tmp_path / "c", 1.0)
    edit_config(tmp_path / "c", checksums={"model.safetensors": "blake3:00"})
    with pytest.raises(CheckpointError, match="upgrade diffkit"):
        load_checkpoint(tmp_path / "c")


def test_saved_files_are_readable_by_everyone(tmp_path):
    old_umask = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "c", model=TinyDenoiser(), ema_model=TinyDenoiser(), config=CONFIG,
                        side_files={"notes/a.txt": b"x"})
    finally:
        os.umask(old_umask)
    for file in (tmp_path / "c").rglob("*"):
        if file.is_file():
            assert stat.S_IMODE(file.stat().st_mode) == 0o644, file


# --------------------------------------------------------------------------------------------
# Side files and files kept through a save
# --------------------------------------------------------------------------------------------


def test_side_files_from_bytes_and_paths(tmp_path):
    source = tmp_path / "tokenizer.json"
    source.write_text('{"vocab": ["a"]}')
    path = save_checkpoint(tmp_path / "c", model=TinyDenoiser(), config=CONFIG,
                           side_files={"tokenizer.json": source, "stats/mean.bin": b"\x00\x01"})
    loaded = load_checkpoint(path)
    assert loaded.side_file("tokenizer.json").read_text() == '{"vocab": ["a"]}'
    assert loaded.side_file("stats/mean.bin").read_bytes() == b"\x00\x01"

    (path / "stats" / "mean.bin").write_bytes(b"\x00\x02")
    with pytest.raises(CheckpointError, match="stats/mean.bin in checkpoint .* was modified after saving"):
        loaded.side_file("stats/mean.bin")
    with pytest.raises(CheckpointError, match="no side file 'merges.txt'.*recorded: stats/mean.bin, tokenizer.json"):
        loaded.side_file("merges.txt")
    with pytest.raises(ValueError, match="relative paths inside the checkpoint"):
        loaded.side_file("../c/config.json")


@pytest.mark.parametrize(
    "side_files, message",
    [
        ({"../escape.txt": b"x"}, "relative path inside the checkpoint"),
        ({"/etc/passwd": b"x"}, "relative path inside the checkpoint"),
        ({"model.safetensors": b"x"}, "written by save_checkpoint itself"),
        ({"a.txt": 3}, "bytes or the path of a file"),
        ({"a.txt": "no/such/file"}, "is not a file"),
    ],
)
def test_bad_side_files_are_refused_before_writing(tmp_path, side_files, message):
    save_version(tmp_path / "c", 1.0)
    with pytest.raises(CheckpointError, match=message):
        save_checkpoint(tmp_path / "c", model=TinyDenoiser(), config=CONFIG, side_files=side_files)
    assert load_checkpoint(tmp_path / "c").step == 1 and os.listdir(tmp_path) == ["c"]


def test_a_save_keeps_files_it_does_not_write(tmp_path):
    save_checkpoint(tmp_path / "c", model=TinyDenoiser(), ema_model=TinyDenoiser(), config=CONFIG,
                    side_files={"tokenizer.json": b"{}", "vocab/a.txt": b"a"})
    (tmp_path / "c" / "README.md").write_text("model card")
    (tmp_path / "c" / "samples" / "nested").mkdir(parents=True)
    (tmp_path / "c" / "samples" / "nested" / "grid.png").write_bytes(b"png")

    # A later save (no EMA, one new side file, one side file rewritten) keeps everything else.
    save_version(tmp_path / "c", 2.0, side_files={"vocab/b.txt": b"b", "tokenizer.json": b"{1}"})
    c = tmp_path / "c"
    assert (c / "README.md").read_text() == "model card"
    assert (c / "samples" / "nested" / "grid.png").read_bytes() == b"png"
    assert (c / "vocab" / "a.txt").read_text() == "a" and (c / "vocab" / "b.txt").read_text() == "b"
    loaded = load_checkpoint(c)
    assert loaded.step == 2
    # The old EMA is a format file: it does not survive a save without EMA.
    assert loaded.ema_state is None and not (c / "ema.safetensors").exists()
    # The carried side file keeps its recorded checksum, so it stays verifiable.
    assert loaded.side_file("vocab/a.txt").read_text() == "a"
    assert loaded.side_file("tokenizer.json").read_bytes() == b"{1}"
    assert set(loaded.config["checksums"]) == {"model.safetensors", "tokenizer.json", "vocab/a.txt", "vocab/b.txt"}
    assert os.listdir(tmp_path) == ["c"]


def test_saving_over_a_directory_that_is_not_a_checkpoint_is_refused_and_deletes_nothing(tmp_path):
    target = tmp_path / "models"
    (target / "results").mkdir(parents=True)
    (target / "README.md").write_text("notes")
    (target / "results" / "eval.csv").write_text("1,2")
    with pytest.raises(CheckpointError, match="no config.json, so it is not a diffkit checkpoint.*new or empty"):
        save_checkpoint(target, model=TinyDenoiser(), config=CONFIG)
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["README.md", "results", "results/eval.csv"]
    assert os.listdir(tmp_path) == ["models"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_checkpoint(save_checkpoint(empty, model=TinyDenoiser(), config=CONFIG)).step == 0


@pytest.mark.parametrize("crash_point", ["while_carrying", "before_swap"])
def test_crash_during_save_keeps_the_old_checkpoint_and_its_extra_files(tmp_path, monkeypatch, crash_point):
    save_version(tmp_path / "c", 1.0, side_files={"tokenizer.json": b"{}"})
    (tmp_path / "c" / "README.md").write_text("model card")

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(ckpt_module, "_link_or_copy" if crash_point == "while_carrying" else "_swap_in", crash)
    with pytest.raises(OSError):
        save_version(tmp_path / "c", 2.0)
    monkeypatch.undo()

    loaded = load_checkpoint(tmp_path / "c")
    assert loaded.step == 1 and loaded.side_file("tokenizer.json").read_bytes() == b"{}"
    assert (tmp_path / "c" / "README.md").read_text() == "model card"
    assert os.listdir(tmp_path) == ["c"]


def test_modality_config_is_a_top_level_field(tmp_path):
    save_checkpoint(tmp_path / "c", model=TinyDenoiser(), config={**CONFIG, "modality_config": {"sample_rate": 22050}})
    assert load_checkpoint(tmp_path / "c").modality_config == {"sample_rate": 22050}
    save_version(tmp_path / "d", 1.0)
    assert load_checkpoint(tmp_path / "d").modality_config == {}
    with pytest.raises(CheckpointError, match="modality_config'\\] must be a dict"):
        save_checkpoint(tmp_path / "e", model=TinyDenoiser(), config={**CONFIG, "modality_config": [1]})


# --------------------------------------------------------------------------------------------
# load_network
# --------------------------------------------------------------------------------------------

NETWORKS = {"TinyDenoiser": TinyDenoiser}


def network_checkpoint(path, *, ema=True, with_diffusion=True, half=False, **config_changes):
    """A TinyDenoiser checkpoint whose raw weights are all 1 and EMA weights all 2."""
    raw, averaged = TinyDenoiser(hidden=8), TinyDenoiser(hidden=8)
    with torch.no_grad():
        for p in raw.parameters():
            p.fill_(1.0)
        for p in averaged.parameters():
            p.fill_(2.0)

    def weights(module):
        return {k: v.half() if half and v.is_floating_point() else v for k, v in module.state_dict().items()}

    config = {
        "modality": "toy",
        "model": {"class": "TinyDenoiser", "kwargs": {"hidden": 8}},
        "diffusion": Diffusion(schedule="linear", num_timesteps=50).config if with_diffusion else None,
        "modality_config": {"labels": ["a", "b"]},
        **config_changes,
    }
    return save_checkpoint(path, model=weights(raw), ema_model=weights(averaged) if ema else None, config=config,
                           step=7, side_files={"vocab.txt": b"a b"})


def all_params_equal(net, value) -> bool:
    return all(bool((p == value).all()) for p in net.parameters())


def test_load_network_builds_an_inference_network(tmp_path):
    path = network_checkpoint(tmp_path / "c")
    loaded = load_network(path, NETWORKS, modality="toy", device="cpu")
    assert isinstance(loaded.net, TinyDenoiser) and loaded.net.inp.out_features == 8
    assert all_params_equal(loaded.net, 2.0)  # EMA weights by default
    assert not loaded.net.training and not any(p.requires_grad for p in loaded.net.parameters())
    assert loaded.diffusion.num_timesteps == 50
    assert loaded.modality_config == {"labels": ["a", "b"]} and loaded.step == 7 and loaded.path == path
    assert loaded.config["model"]["class"] == "TinyDenoiser"
    assert loaded.side_file("vocab.txt").read_text() == "a b"
    assert all_params_equal(load_network(path, NETWORKS, weights="model", device="cpu").net, 1.0)


def test_load_network_without_ema_or_diffusion(tmp_path):
    path = network_checkpoint(tmp_path / "c", ema=False, with_diffusion=False)
    loaded = load_network(path, NETWORKS, device="cpu")
    assert all_params_equal(loaded.net, 1.0)  # "ema" falls back to the model's weights
    assert loaded.diffusion is None


def test_load_network_casts_half_precision_weights(tmp_path):
    path = network_checkpoint(tmp_path / "c", half=True)
    net = load_network(path, NETWORKS, device="cpu").net
    assert all(p.dtype == torch.float32 for p in net.parameters()) and all_params_equal(net, 2.0)


def test_load_network_builds_only_allow_listed_classes(tmp_path):
    path = network_checkpoint(tmp_path / "c", model={"class": "os.system", "kwargs": {}})
    with pytest.raises(CheckpointError, match="holds a 'os.system', but this loader builds only TinyDenoiser"):
        load_network(path, NETWORKS, device="cpu")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model": {"kwargs": {}}}, r"does not say which network it holds"),
        ({"model": {"class": "TinyDenoiser", "kwargs": {"width": 3}}}, "cannot build.*width"),
        ({"model": {"class": "TinyDenoiser", "kwargs": {"hidden": 4}}}, "do not fit the TinyDenoiser"),
        ({"model": {"class": "TinyDenoiser", "kwargs": [8]}}, "kwargs'\\] .* must be a dict"),
        ({"diffusion": {"prediction": "eps"}}, "diffusion config .* is invalid"),
        ({"modality": "audio"}, "is for 'audio', not 'toy'"),
    ],
)
def test_load_network_errors_say_what_is_wrong(tmp_path, changes, message):
    path = network_checkpoint(tmp_path / "c", **changes)
    with pytest.raises(CheckpointError, match=message):
        load_network(path, NETWORKS, modality="toy", device="cpu")


def test_load_network_checks_its_arguments(tmp_path):
    path = network_checkpoint(tmp_path / "c")
    with pytest.raises(ValueError, match="weights must be one of 'ema', 'model'"):
        load_network(path, NETWORKS, weights="best")
    with pytest.raises(TypeError, match="torch.nn.Module subclass"):
        load_network(path, {"TinyDenoiser": "TinyDenoiser"})
    with pytest.raises(TypeError, match="non-empty mapping"):
        load_network(path, {})


def test_load_network_refuses_modified_weights(tmp_path):
    path = network_checkpoint(tmp_path / "c")
    other = network_checkpoint(tmp_path / "other", ema=False)
    (path / "ema.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="ema.safetensors .* modified after saving"):
        load_network(path, NETWORKS, device="cpu")


def test_files_are_copied_where_hard_links_are_not_supported(tmp_path, monkeypatch):
    save_version(tmp_path / "c", 1.0, side_files={"tokenizer.json": b"{}"})
    (tmp_path / "c" / "README.md").write_text("model card")

    def no_links(*args, **kwargs):
        raise OSError("Operation not permitted")

    monkeypatch.setattr(ckpt_module.os, "link", no_links)
    save_version(tmp_path / "c", 2.0)
    loaded = load_checkpoint(tmp_path / "c")
    assert loaded.step == 2 and loaded.side_file("tokenizer.json").read_bytes() == b"{}"
    assert (tmp_path / "c" / "README.md").read_text() == "model card"


def test_config_json_keeps_strings_as_written_and_number_lists_on_one_line(tmp_path):
    config = {**CONFIG, "train": {"command": "recipe.py --grid [ 1, 2 ]  --x", "betas": [0.9, 0.999],
                                  "nested": [[1, 2], {"a": []}], "flags": [True, False]}}
    path = save_checkpoint(tmp_path / "c", model=TinyDenoiser(), config=config)
    text = (path / "config.json").read_text()
    assert load_checkpoint(path).config["train"] == config["train"]
    assert '"betas": [0.9, 0.999]' in text and '"command": "recipe.py --grid [ 1, 2 ]  --x"' in text
    assert json.loads(text) == json.loads(json.dumps(load_checkpoint(path).config))


# --------------------------------------------------------------------------------------------
# Single files (caches, D4RL files, calibrated configs): replaced_atomically
# --------------------------------------------------------------------------------------------


def test_replaced_atomically_swaps_in_the_whole_new_file_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "sub" / "cache.bin"  # the parent is created
    with replaced_atomically(target) as staging:
        assert staging.parent == target.parent and staging != target
        staging.write_bytes(b"first")
        assert not target.exists()  # nothing under the real name until the block ends
    assert target.read_bytes() == b"first"
    with replaced_atomically(target) as staging:
        staging.write_bytes(b"second")
        assert target.read_bytes() == b"first"
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["cache.bin"]
    with replaced_atomically(target) as staging:
        save_file({"x": torch.zeros(2)}, str(staging))  # safetensors writes owner-only files
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_replaced_atomically_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "cache.bin"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError, match="disk full"):
        with replaced_atomically(target) as staging:
            staging.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"good"
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with replaced_atomically(target):
            pass
    assert target.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.bin"]


def test_old_config_layouts_are_migrated_in_one_place():
    from diffkit.checkpoint import migrate_config

    old = {"modality": "image", "model": {"class": "UNet", "kwargs": {}, "image": {"class_names": ["a"]}},
           "diffusion": {"class": "Diffusion", "schedule": {"betas": [0.1, 0.2]}, "prediction": "eps"}}
    new = migrate_config(old)
    assert new["modality_config"] == {"class_names": ["a"]} and "image" not in new["model"]
    assert new["diffusion"] == old["diffusion"]  # older diffusion configs load through their defaults
    assert "image" in old["model"]  # the caller's dict is left alone
    assert migrate_config(new) == new  # today's layout passes unchanged
