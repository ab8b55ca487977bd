"""The shipped checkpoints generate exactly what they did before the sampling API and the front
doors were redesigned: every tensor of tests/data/shipped_outputs.safetensors, bit for bit.

The file was written by tests/data/make_shipped_outputs.py from the code of the commit in its
metadata, not from the code under test (see tests/data/README.md).
"""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

REFERENCE = Path(__file__).parent / "data" / "shipped_outputs.safetensors"


def _current_outputs() -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_shipped_outputs", REFERENCE.parent / "make_shipped_outputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        return module.outputs()
    finally:
        torch.set_num_threads(threads)


def test_reference_was_made_by_another_commit():
    with safe_open(str(REFERENCE), "pt") as handle:
        assert handle.metadata()["commit"]  # regenerating from the code under test would make the check vacuous


@pytest.mark.slow
def test_shipped_checkpoints_reproduce_their_reference_outputs():
    reference = load_file(str(REFERENCE))
    current = _current_outputs()
    assert set(current) == set(reference)
    for name, expected in reference.items():
        assert current[name].dtype == expected.dtype and current[name].shape == expected.shape, name
        assert torch.equal(current[name], expected), f"{name} changed"
