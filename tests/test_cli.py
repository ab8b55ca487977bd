"""The `diffkit` command line: generate (with modality options), modalities, info."""

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
        tmp_path / "ckpt", model=TinyDenoiser(), step=12, extra={"note": "x"},
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
    assert f"wrote 3 toy sample(s) to {out}" in capsys.readouterr().out


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


def test_modalities_lists_names(toy, capsys):
    assert main(["modalities"]) == 0
    assert capsys.readouterr().out.split() == ["toy"]
    assert main(["modalities", "-v"]) == 0
    assert "registered: _toys.ToyModality" in capsys.readouterr().out


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
