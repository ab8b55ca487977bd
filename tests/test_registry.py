"""Modality lookup: registration forms, lazy entry points, helpful errors, diffkit.generate,
and the optional parts of the contract (policies, command-line verbs)."""

from __future__ import annotations

import sys
from importlib import metadata

import pytest
import torch

import diffkit.registry as registry
from diffkit.registry import (
    CliCommand,
    ModalityLoadError,
    Policy,
    UnknownModalityError,
    available_modalities,
    generate,
    get_modality,
    load_policy,
    modality_commands,
    register_modality,
    unregister_modality,
)
from _toys import ToyModality


@pytest.fixture(autouse=True)
def empty_registry(monkeypatch):
    """Each test starts with no modalities and no entry points, and leaves no trace."""
    monkeypatch.setattr(registry, "_registered", {})
    monkeypatch.setattr(registry, "_instances", {})
    monkeypatch.setattr(registry, "_entry_points", {})


def test_unknown_name_lists_the_registered_ones():
    register_modality("image", ToyModality())
    register_modality("audio", ToyModality())
    with pytest.raises(UnknownModalityError) as info:
        get_modality("imgae")
    assert str(info.value) == "no modality 'imgae'; registered: audio, image. Did you mean 'image'?"
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


def test_unknown_name_without_close_match_and_with_nothing_registered():
    with pytest.raises(UnknownModalityError, match="no modalities are registered.*register_modality"):
        get_modality("image")
    register_modality("audio", ToyModality())
    with pytest.raises(UnknownModalityError) as info:
        get_modality("zzz")
    assert "Did you mean" not in str(info.value) and "registered: audio" in str(info.value)


def test_registration_forms(tmp_path, monkeypatch):
    module = tmp_path / "toy_modality_module.py"
    module.write_text("from _toys import ToyModality\ninstance = ToyModality()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    made = []

    def factory():
        made.append(1)
        return ToyModality()

    instance = ToyModality()
    register_modality("instance", instance)
    register_modality("class", ToyModality)
    register_modality("factory", factory)
    register_modality("string", "toy_modality_module:instance")
    assert available_modalities() == ["class", "factory", "instance", "string"]
    assert get_modality("instance") is instance
    assert isinstance(get_modality("class"), ToyModality)
    assert get_modality("factory") is get_modality("factory") and made == [1]  # built once, cached
    assert get_modality("string") is sys.modules["toy_modality_module"].instance

    unregister_modality("instance")
    assert "instance" not in available_modalities()


def test_entry_points_are_found_lazily(tmp_path, monkeypatch):
    module = tmp_path / "lazy_modality_pkg.py"
    module.write_text("from _toys import ToyModality as LazyModality\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry_point = metadata.EntryPoint(name="lazy", value="lazy_modality_pkg:LazyModality", group=registry.ENTRY_POINT_GROUP)
    asked = []

    def fake_entry_points(group):
        asked.append(group)
        return [entry_point]

    monkeypatch.setattr(registry.metadata, "entry_points", fake_entry_points)
    monkeypatch.setattr(registry, "_entry_points", None)

    assert available_modalities() == ["lazy"]
    assert "lazy_modality_pkg" not in sys.modules  # listing does not import anything
    assert registry.modality_source("lazy") == "entry point: lazy_modality_pkg:LazyModality"
    assert isinstance(get_modality("lazy"), ToyModality)
    assert available_modalities() == ["lazy"] and asked == [registry.ENTRY_POINT_GROUP]  # read once

    # An explicit registration wins over the entry point of the same name.
    replacement = ToyModality()
    register_modality("lazy", replacement)
    assert get_modality("lazy") is replacement


def test_broken_modalities_fail_with_their_name():
    def broken():
        raise ImportError("No module named 'torchaudio'")

    register_modality("audio", broken)
    with pytest.raises(ModalityLoadError, match="modality 'audio'.*No module named 'torchaudio'"):
        get_modality("audio")
    register_modality("nogen", object())
    with pytest.raises(ModalityLoadError, match="modality 'nogen'.*no generate"):
        get_modality("nogen")
    register_modality("missing", "no_such_module_xyz:Thing")
    with pytest.raises(ModalityLoadError, match="modality 'missing'"):
        get_modality("missing")
    with pytest.raises(ValueError, match="package.module:attr"):
        register_modality("bad", "no-colon")


def test_generate_calls_the_modality_and_saves(tmp_path):
    toy = ToyModality()
    register_modality("toy", toy)
    out = tmp_path / "samples.txt"
    samples = generate("toy", checkpoint="ckpt", num_samples=3, seed=7, save=out, steps=5, scale=2.0)
    assert samples.shape == (3, 4)
    assert toy.calls == [dict(checkpoint="ckpt", num_samples=3, seed=7, device="auto", sampler=None, steps=5,
                              progress=False, scale=2.0)]
    assert len(out.read_text().splitlines()) == 3
    # Same seed, same samples; a modality object works in place of a name.
    assert torch.equal(generate(toy, num_samples=3, seed=7, scale=2.0), samples)


def test_generate_is_exported_from_the_package():
    import diffkit

    # A missing export is the regression this test guards against: it fails, never skips.
    assert hasattr(diffkit, "generate") and "generate" in diffkit.__all__
    assert diffkit.generate is generate and diffkit.register_modality is register_modality


class PlainModality:
    """Only the required part of the contract: no policy, no commands."""

    name = "plain"

    def generate(self, **kwargs):
        return []

    def save(self, samples, path):
        return []


def test_load_policy_returns_the_modalitys_policy():
    register_modality("toy", ToyModality())
    policy = load_policy("toy", gain=0.5)
    assert isinstance(policy, Policy)
    assert policy.act(4.0) == -2.0 and policy(4.0) == -2.0
    policy.reset()
    assert policy.resets == 1
    with pytest.raises(ValueError, match=r"gain must lie in \(0, 1\]"):
        load_policy("toy", gain=2.0)


def test_load_policy_errors():
    register_modality("plain", PlainModality())
    with pytest.raises(ValueError, match="modality 'plain' has no policy"):
        load_policy("plain")

    class BadPolicyModality(PlainModality):
        name = "badpolicy"

        def policy(self, checkpoint=None):
            return lambda obs: obs  # callable, but no act() / reset()

    with pytest.raises(TypeError, match="not a diffkit.Policy: it needs act"):
        load_policy(BadPolicyModality())


def test_policy_protocol_checks_all_three_methods():
    class ActOnly:
        def act(self, obs):
            return obs

    class Full(ActOnly):
        def reset(self):
            pass

        def __call__(self, obs):
            return self.act(obs)

    assert not isinstance(ActOnly(), Policy) and isinstance(Full(), Policy)


def test_modality_commands():
    register_modality("toy", ToyModality())
    register_modality("plain", PlainModality())
    commands = modality_commands("toy")
    assert list(commands) == ["rollout"] and isinstance(commands["rollout"], CliCommand)
    assert modality_commands("plain") == {}

    class Broken(PlainModality):
        def cli_commands(self):
            return {"rollout": lambda args: 0}

    with pytest.raises(ModalityLoadError, match=r"must return \{verb: diffkit.CliCommand"):
        modality_commands(Broken())


def test_contract_types_are_exported_from_the_package():
    import diffkit

    assert diffkit.Policy is Policy and diffkit.CliCommand is CliCommand and diffkit.load_policy is load_policy

