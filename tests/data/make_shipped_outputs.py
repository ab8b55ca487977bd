"""Write tests/data/shipped_outputs.safetensors: what the shipped checkpoints generate at fixed seeds.

Run it once against the code BEFORE a refactor of the sampling path or the modality front
doors (e.g. from a checkout of the previous commit: ``PYTHONPATH=<checkout> python
tests/data/make_shipped_outputs.py OUT``); tests/test_shipped_outputs.py then checks that the
current code reproduces every tensor bit for bit. Regenerating it from the code under test
would make that test vacuous. One CPU thread, fp32.
"""

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import diffkit

CASES = {
    "image_digits": dict(modality="image", labels=[3, 7], steps=5, seed=0, device="cpu"),
    "image_digits_unipc": dict(modality="image", labels=[1, 2], steps=5, sampler="unipc", seed=1, device="cpu"),
    # Griffin-Lim, named: it was the default second stage when the reference was made.
    "audio_digits": dict(modality="audio", labels=[7, 2], steps=6, seed=0, device="cpu", vocoder="griffin-lim"),
    # The embedding model, named: it was the default text model when the reference was made.
    "text_e2e": dict(modality="text", checkpoint=str(Path(__file__).resolve().parents[2] / "modalities" / "text" /
                                                     "checkpoints" / "e2e"), num_samples=4, steps=10, seed=0,
                     device="cpu"),
}


def outputs() -> dict:
    torch.set_num_threads(1)
    tensors = {}
    for name, kwargs in CASES.items():
        out = diffkit.generate(**kwargs)
        if name.startswith("audio"):
            tensors[name] = out.audio
        elif name.startswith("text"):
            tensors[name] = torch.tensor([list(text.encode()) + [0] * (200 - len(text.encode())) for text in out],
                                         dtype=torch.int32)
        else:
            tensors[name] = out
    return {key: value.detach().cpu().contiguous() for key, value in tensors.items()}


if __name__ == "__main__":
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    save_file(outputs(), sys.argv[1], metadata={"commit": commit, "torch": torch.__version__})
