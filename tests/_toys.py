"""Tiny models, datasets and a toy modality shared by the trainer/checkpoint/registry/CLI tests.

Kept importable as a plain module (tests/ is on sys.path under pytest) so the torchrun helper
script of test_distributed.py can use the same model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

NUM_TIMESTEPS = 50
DIM = 4


class TinyDenoiser(nn.Module):
    """An MLP eps-predictor for (B, DIM) vectors, optionally conditioned on an integer label.

    ``nan_after``: from that forward call on the output is NaN (to test divergence handling).
    """

    def __init__(self, dim: int = DIM, hidden: int = 16, num_classes: int = 0, nan_after: int | None = None):
        super().__init__()
        self.time = nn.Embedding(NUM_TIMESTEPS, hidden)
        self.inp = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, dim)
        # The extra row is the learned null label used when drop_cond is True.
        self.label = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.nan_after = nan_after
        self.seen_cond: list[dict] = []

    def forward(self, x, t, label=None, drop_cond=None):
        self.calls += 1
        # The core passes float times; this toy was trained on integer steps only.
        h = self.inp(x) + self.time(t.round().long())
        if self.label is not None and label is not None:
            self.seen_cond.append({"label": label, "drop_cond": drop_cond})
            if drop_cond is not None:
                label = torch.where(drop_cond, torch.full_like(label, self.label.num_embeddings - 1), label)
            h = h + self.label(label)
        y = self.out(torch.relu(h))
        if self.nan_after is not None and int(self.calls) >= self.nan_after:
            y = y * float("nan")
        return y


def vectors(n: int = 20, seed: int = 0) -> list[torch.Tensor]:
    """A map-style dataset of n random (DIM,) vectors."""
    return list(torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)))


def labelled(n: int = 20, num_classes: int = 3) -> list[dict]:
    return [{"x": x, "label": i % num_classes} for i, x in enumerate(vectors(n))]


def state_equal(a: dict, b: dict) -> bool:
    """Exact equality of two (possibly nested) state dicts, tensors compared element-wise."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    return a == b


class ToyModality:
    """A modality that "generates" seeded noise and saves it as a text file, one sample a line.

    It also has a policy (for a scalar environment x <- x + action, reward -|x|) and a
    ``rollout`` command-line verb that runs that policy: the optional parts of the contract.
    """

    name = "toy"

    def __init__(self):
        self.calls: list[dict] = []

    def generate(self, *, checkpoint=None, num_samples=16, seed=None, device="auto", sampler=None, steps=None,
                 progress=False, **cond):
        self.calls.append(dict(checkpoint=checkpoint, num_samples=num_samples, seed=seed, device=device,
                               sampler=sampler, steps=steps, progress=progress, **cond))
        generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        scale = cond.get("scale", 1.0)
        return scale * torch.randn(num_samples, DIM, generator=generator)

    def save(self, samples, path):
        path = Path(path)
        path.write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in samples.tolist()))
        return [path]

    def add_cli_arguments(self, parser):
        parser.add_argument("--scale", type=float, default=1.0, help="multiply the samples by this")
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--flavour", choices=["plain", "fancy"], default="plain", help="a toy choice")

    def policy(self, checkpoint=None, gain=1.0):
        if not 0.0 < gain <= 1.0:
            raise ValueError(f"gain must lie in (0, 1], got {gain}")
        return ToyPolicy(gain)

    def cli_commands(self):
        from diffkit.registry import CliCommand

        return {"rollout": CliCommand(help="run the toy policy for a few episodes and print the returns",
                                      add_arguments=self._rollout_arguments, run=self._rollout)}

    @staticmethod
    def _rollout_arguments(parser):
        parser.add_argument("--episodes", type=int, default=2, help="how many episodes")
        parser.add_argument("--gain", type=float, default=1.0, help="fraction of the error corrected per step")

    def _rollout(self, args):
        if args.episodes < 1:
            raise ValueError(f"--episodes must be >= 1, got {args.episodes}")
        policy = self.policy(gain=args.gain)
        for episode in range(args.episodes):
            policy.reset()
            x, total = 4.0, 0.0
            for _ in range(3):
                x += policy(x)
                total -= abs(x)
            print(f"episode {episode}: return {total:.2f}")
        return 0


class ToyPolicy:
    """Moves a scalar state ``gain`` of the way towards 0 each step."""

    def __init__(self, gain):
        self.gain = gain
        self.resets = 0

    def act(self, obs):
        return -self.gain * obs

    def reset(self):
        self.resets += 1

    def __call__(self, obs):
        return self.act(obs)


def tiny_text_checkpoint(out: Path, *options: str) -> Path:
    """A tiny text checkpoint exported by recipes/text_train.py after 2 training steps, under
    ``out``: for the text modality's mechanics, not its quality. ``options`` are more recipe flags."""
    import sys
    import warnings

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    import text_train

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text_train.main(["--max-steps", "2", "--hidden", "16", "--depth", "1", "--heads", "2", "--batch-size", "8",
                         "--sample-every", "0", "--num-timesteps", "100", "--no-progress", "--no-calibrate", *options,
                         "--output-dir", str(out / "run"), "--export", str(out / "export")])
    return out / "export"
