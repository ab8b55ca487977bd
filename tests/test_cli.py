"""The `diffkit` command line: generate (with modality options), modalities, info, modality verbs,
and how a modality's errors reach the user."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import diffkit.registry as registry
from diffkit.checkpoint import save_checkpoint
from diffkit.cli import main
from diffkit.registry import register_modality
from _toys import TinyDenoiser, ToyModality

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(registry, "_registered", {})
    monkeypatch.setattr(registry, "_instances", {})
    monkeypatch.setattr(registry, "_entry_points", {})
    modality = ToyModality()
    register_modality("toy", modality)
    return modality


@pytest.fixture
def checkpoint(tmp_path):
    return save_checkpoint(
        tmp_path / "ckpt", model=TinyDenoiser(), step=12,
        extra={"note": "x", "segments": [{"steps": [0, 8], "command": None},
                                         {"steps": [8, 12], "command": "train.py --max-steps 12", "seconds": 3.2,
                                          "device": "cpu", "threads": 2, "world_size": 1, "final_loss": 0.25}]},
        config={"modality": "toy", "model": {"class": "TinyDenoiser", "kwargs": {"hidden": 16}},
                "diffusion": {"class": "Diffusion", "schedule": {"name": "cosine", "betas": [0.1] * 50}}},
    )


def test_generate_passes_only_modality_options(toy, tmp_path, capsys):
    out = tmp_path / "samples.txt"
    code = main(["generate", "toy", "--num-samples", "3", "--seed", "1", "--steps", "4", "--scale", "2",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    assert toy.calls == [dict(checkpoint=None, num_samples=3, seed=1, device="auto", sampler=None, steps=4,
                              progress=False, scale=2.0, flavour="plain")]
    assert len(out.read_text().splitlines()) == 3
    # The paths the modality's save() returned, one a line.
    assert capsys.readouterr().out.splitlines() == ["wrote 3 toy sample(s):", str(out)]


def test_generate_help_shows_modality_options(toy, capsys):
    assert main(["generate", "toy", "-h"]) == 0
    text = capsys.readouterr().out
    assert "--scale" in text and "multiply the samples" in text and "--num-samples" in text


def test_generate_help_without_modality_lists_them(toy, capsys):
    assert main(["generate", "--help"]) == 0
    assert "available modalities: toy" in capsys.readouterr().out


def test_generate_errors(toy, tmp_path, capsys):
    assert main(["generate", "tyo", "--out", str(tmp_path / "x")]) == 1
    assert "no modality 'tyo'; registered: toy. Did you mean 'toy'?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["generate", "toy"])
    assert info.value.code == 2 and "--out PATH is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "toy", "--out", "x", "--not-an-option", "1"])
    assert "unrecognized arguments: --not-an-option" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "toy", "--out", "x", "--num-samples", "0"])
    assert "argument --num-samples: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "toy", "--out", "x", "--steps", "abc"])
    assert "argument --steps: expected an integer, got 'abc'" in capsys.readouterr().err


def test_modalities_lists_names(toy, capsys):
    assert main(["modalities"]) == 0
    assert capsys.readouterr().out.split() == ["toy"]
    assert main(["modalities", "-v"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "toy\tregistered: _toys.ToyModality"
    assert lines[1].split() [:3] == ["diffkit", "rollout", "toy"] and "run the toy policy" in lines[1]


def test_modalities_when_none_installed(monkeypatch, capsys):
    monkeypatch.setattr(registry, "_registered", {})
    monkeypatch.setattr(registry, "_entry_points", {})
    assert main(["modalities"]) == 0
    assert "no modalities installed" in capsys.readouterr().out


def test_info_summarises_a_checkpoint(checkpoint, capsys):
    assert main(["info", str(checkpoint)]) == 0
    text = capsys.readouterr().out
    assert "modality       toy" in text and "step           12" in text
    assert 'schedule="cosine"' in text and "0.1, 0.1" not in text  # the beta table is left out
    params = sum(p.numel() for p in TinyDenoiser().parameters()) + 1  # + the `calls` buffer
    assert f"parameters     {params:,}" in text
    assert 'extra          note="x"\n' in text  # the runs get a line each instead
    assert "run 1          steps 0-8; not recorded" in text
    assert ("run 2          steps 8-12; 3 s; cpu, 2 threads, world size 1; last loss 0.25; "
            "command: train.py --max-steps 12") in text
    assert main(["info", str(checkpoint), "--json"]) == 0
    assert '"format": "diffkit-checkpoint"' in capsys.readouterr().out


def test_info_on_a_bad_path_says_what_is_wrong(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 1
    assert "no checkpoint at" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "generate" in capsys.readouterr().out


def test_runs_as_a_program(checkpoint):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "diffkit.cli", "info", str(checkpoint)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "step           12" in result.stdout


class StrictModality:
    """generate() rejects some values, like a real modality would."""

    name = "strict"

    def generate(self, *, checkpoint=None, num_samples=16, seed=None, device="auto", sampler=None, steps=None,
                 progress=False, colour=None):
        if colour not in (None, "red"):
            raise TypeError(f"colour must be 'red', not {colour!r}")
        if sampler not in (None, "ddim"):
            raise ValueError(f"unknown sampler {sampler!r}; choose ddim")
        if checkpoint is not None:
            raise FileNotFoundError(f"no checkpoint at {checkpoint}")
        return [0] * num_samples

    def save(self, samples, path):
        return []

    def add_cli_arguments(self, parser):
        parser.add_argument("--colour", help="only 'red' is accepted")


@pytest.mark.parametrize(
    "options, message",
    [
        (["--sampler", "foo"], "unknown sampler 'foo'; choose ddim"),
        (["--checkpoint", "nowhere"], "no checkpoint at nowhere"),
        (["--colour", "blue"], "colour must be 'red', not 'blue'"),  # a TypeError
    ],
)
def test_modality_errors_are_one_line_messages(toy, tmp_path, capsys, options, message):
    register_modality("strict", StrictModality())
    assert main(["generate", "strict", "--out", str(tmp_path / "x"), *options]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffkit: error: ") and message in err and "Traceback" not in err


def test_debug_variable_shows_the_traceback(toy, tmp_path, monkeypatch):
    register_modality("strict", StrictModality())
    monkeypatch.setenv("DIFFKIT_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown sampler"):
        main(["generate", "strict", "--out", str(tmp_path / "x"), "--sampler", "foo"])


def test_modality_verb_runs_with_its_own_options(toy, capsys):
    assert main(["rollout", "toy", "--episodes", "2", "--gain", "0.5"]) == 0
    # x = 4 halves each step: 2, 1, 0.5 -> return -3.5 per episode.
    assert capsys.readouterr().out.splitlines() == ["episode 0: return -3.50", "episode 1: return -3.50"]
    with pytest.raises(SystemExit) as info:
        main(["rollout", "toy", "-h"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: diffkit rollout toy" in text and "--episodes" in text and "run the toy policy" in text


def test_modality_verb_errors(toy, capsys):
    register_modality("strict", StrictModality())
    assert main(["rollout", "toy", "--episodes", "0"]) == 1  # a ValueError from the command
    assert capsys.readouterr().err.strip() == "diffkit: error: --episodes must be >= 1, got 0"
    assert main(["rollout", "strict"]) == 2
    assert "modality 'strict' has no command 'rollout'. Its commands: none" in capsys.readouterr().err
    assert main(["rolout", "toy"]) == 2
    assert "has no command 'rolout'. Did you mean 'rollout'? Its commands: rollout" in capsys.readouterr().err
    assert main(["generat"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'generat'. Did you mean 'generate'?" in err and "diffkit generat MODALITY" in err
    assert main(["rollout", "tyo"]) == 1
    assert "no modality 'tyo'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["rollout", "toy", "--not-an-option"])
    assert "unrecognized arguments: --not-an-option" in capsys.readouterr().err


def test_modality_verbs_may_not_shadow_built_in_commands(toy, capsys):
    from diffkit.registry import CliCommand

    class Shadowing(StrictModality):
        def cli_commands(self):
            return {"info": CliCommand("shadow", lambda parser: None, lambda args: 0)}

    register_modality("shadow", Shadowing())
    assert main(["info2", "shadow"]) == 1
    assert "defines the command(s) info, which are built into diffkit" in capsys.readouterr().err


def test_info_on_a_network_without_diffusion(tmp_path, capsys):
    path = save_checkpoint(tmp_path / "clf", model=TinyDenoiser(), step=3,
                           config={"modality": "toy", "model": {"class": "TinyDenoiser", "kwargs": {}},
                                   "diffusion": None, "modality_config": {"accuracy": 0.9}})
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "diffusion      none (not a diffusion model)" in text
    assert "modality cfg   accuracy=0.9" in text
    assert "checksums      1 file(s), verified on load" in text


class PrintingModality(ToyModality):
    """A toy whose samples a terminal can show, as text's can."""

    name = "printing"

    def format_samples(self, samples):
        return "\n".join(f"{row[0]:.3f}" for row in samples.tolist())


def test_generate_prints_when_the_modality_can_and_out_is_missing(toy, capsys):
    register_modality("printing", PrintingModality())
    assert main(["generate", "printing", "--num-samples", "3", "--seed", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(float(line) == float(line) for line in lines)
    with pytest.raises(SystemExit):
        main(["generate", "toy", "--num-samples", "3"])  # a toy sample is no text: --out is required
    assert "--out PATH is required" in capsys.readouterr().err


def test_the_modality_chooses_the_count_when_none_is_given(toy, capsys):
    class FewByDefault(PrintingModality):
        def generate(self, *, num_samples=3, **kwargs):
            return super().generate(num_samples=num_samples, **kwargs)

    register_modality("few", FewByDefault())
    main(["generate", "few"])
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


def test_a_bad_out_is_refused_before_any_sampling(toy, tmp_path, capsys):
    class Checking(ToyModality):
        def check_output(self, path):
            if not str(path).endswith(".txt"):
                raise ValueError("give a .txt path")

    register_modality("checking", checking := Checking())
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out, message in ((blocker / "samples.txt", "is a file, not a folder"),
                         (tmp_path / "samples.png", "give a .txt path")):
        assert main(["generate", "checking", "--num-samples", "2", "--out", str(out)]) == 1
        assert message in capsys.readouterr().err
    assert checking.calls == []  # nothing was sampled
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        if not os.access(read_only, os.W_OK):  # root may write anywhere
            assert main(["generate", "toy", "--num-samples", "2", "--out", str(read_only / "new" / "s.txt")]) == 1
            assert "is not writable" in capsys.readouterr().err and toy.calls == []
    finally:
        read_only.chmod(0o700)
    assert main(["generate", "checking", "--num-samples", "2", "--out", str(tmp_path / "s.txt")]) == 0
    assert len(checking.calls) == 1


@pytest.mark.parametrize("name, bad, good, message", [
    ("image", "grid.jpg", "grid.png", "give a .png path"),
    ("audio", "clip.wav", "clips", "give a folder for --out"),
    ("text", ".", "samples.txt", "is a directory"),
    ("planning", "file.txt", "plans", "is a file"),
])
def test_each_modality_checks_its_out_before_sampling(name, bad, good, message, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    modality = registry.get_modality(name)
    with pytest.raises(ValueError, match=message):
        modality.check_output(tmp_path / bad)
    modality.check_output(tmp_path / good)


def test_info_on_a_checkpoint_left_aside_by_a_crashed_save_lists_its_real_files(checkpoint, capsys):
    aside = checkpoint.parent / f".{checkpoint.name}.old-0123abcd"
    checkpoint.rename(aside)  # where a save that crashed between its two renames leaves it
    assert main(["info", str(checkpoint)]) == 0
    text = capsys.readouterr().out
    assert f"read from {aside}" in text
    assert "model.safetensors (" in text.split("files", 1)[1].splitlines()[0]
