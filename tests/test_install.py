"""The installed torch/torchaudio pair works together, and the core imports no modality."""

import importlib.metadata
import subprocess
import sys

import pytest
import torch


def test_torchaudio_imports_and_runs_a_compiled_op():
    """A torch release built against another CUDA breaks `import torchaudio` (torch 2.15.0 with 2.11.0).

    lfilter runs torchaudio's own C++ kernel, not a torch fallback, so a mismatch shows up here.
    """
    torchaudio = pytest.importorskip("torchaudio")
    signal = torch.zeros(1, 64, dtype=torch.float64)
    signal[0, 0] = 1.0
    # y[n] = x[n] + 0.5 y[n-1]: the impulse response is 0.5 ** n.
    out = torchaudio.functional.lfilter(signal, torch.tensor([1.0, -0.5], dtype=torch.float64),
                                        torch.tensor([1.0, 0.0], dtype=torch.float64), clamp=False)
    assert torch.allclose(out[0, :8], 0.5 ** torch.arange(8, dtype=torch.float64))
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=8000, n_fft=256, n_mels=20)(torch.randn(1, 4000))
    assert mel.shape[:2] == (1, 20) and torch.isfinite(mel).all()


def test_installed_versions_are_inside_the_tested_bounds():
    torch_version = importlib.metadata.version("torch")
    assert torch_version.startswith("2.14."), f"torch {torch_version} is outside the tested 2.14.x"
    try:
        audio_version = importlib.metadata.version("torchaudio")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("torchaudio is not installed (core-only install)")
    assert audio_version.startswith("2.11."), f"torchaudio {audio_version} is outside the tested 2.11.x"


def test_the_core_imports_no_modality():
    code = "import sys, diffkit; print(sorted(m for m in sys.modules if m.startswith('modalities')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
