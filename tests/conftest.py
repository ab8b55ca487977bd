"""Test-wide settings."""

import os

import torch

# Two test workers on two cores: one thread each, or OpenMP's spinning threads of one worker
# starve the other and small tensor ops slow down a hundredfold.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
