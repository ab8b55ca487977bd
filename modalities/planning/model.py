"""The planner's networks: Diffuser's temporal U-Net, a value function on noisy trajectories and
Decision Diffuser's inverse-dynamics MLP.

Trajectories are (B, transition_dim, H): one channel per action or observation dimension,
H time steps. Convolutions run over time only (1-d, kernel 5, GroupNorm, Mish, the diffusion
time added after the first convolution of each block, as in Janner et al. 2022), through the
core's ``diffkit.nn.ResidualBlock`` and ``TimeEmbedding``. Sizes here are for a CPU: with
``dim=32, dim_mults=(1, 2, 4)`` the U-Net has ~0.9M parameters, and a call on one 128-step plan
takes a few milliseconds, so a plan of a few solver steps costs well under the 20 ms budget of
50 actions per second.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from diffkit.nn import ResidualBlock, TimeEmbedding

__all__ = ["TemporalUNet", "ValueNet", "InverseDynamics"]

KERNEL_SIZE = 5  # Diffuser's: five steps of context per layer


def _block(in_channels: int, out_channels: int, emb_dim: int) -> nn.Module:
    return ResidualBlock(in_channels, out_channels, emb_dim, dims=1, kernel_size=KERNEL_SIZE, activation="mish")


def _check_input(x: torch.Tensor, t: torch.Tensor, channels: int, multiple: int, what: str) -> None:
    if x.ndim != 3 or x.shape[1] != channels:
        raise ValueError(f"{what} expects trajectories of shape (batch, {channels}, horizon), got {tuple(x.shape)}")
    if x.shape[2] % multiple:
        raise ValueError(f"{what}: the horizon must be a multiple of {multiple} (one halving per level), "
                         f"got {x.shape[2]}")
    if t.shape != (x.shape[0],):
        raise ValueError(f"{what}: t must hold one time per trajectory, shape ({x.shape[0]},), got {tuple(t.shape)}")


class TemporalUNet(nn.Module):
    """Diffuser's U-Net over time: ``model(x_t, t) -> prediction`` of x_t's shape.

    Args:
        transition_dim: channels of a trajectory (action_dim + observation_dim).
        dim: width of the first level; level k has ``dim * dim_mults[k]`` channels.
        dim_mults: width multipliers, one level each; the horizon halves between levels, so it
            must be a multiple of 2 ** (len(dim_mults) - 1). Diffuser used (1, 2, 4, 8).
        zero_init_output: start with a zero output (the model first predicts "no change"),
            which steadies the first steps of training.
    """

    def __init__(self, transition_dim: int, dim: int = 32, dim_mults: Sequence[int] = (1, 2, 4),
                 zero_init_output: bool = True, time_scale: float = 1.0):
        super().__init__()
        if transition_dim < 1 or dim < 1 or not dim_mults:
            raise ValueError(f"invalid TemporalUNet sizes: transition_dim={transition_dim}, dim={dim}, "
                             f"dim_mults={tuple(dim_mults)}")
        self.transition_dim = transition_dim
        self.dim_mults = tuple(int(m) for m in dim_mults)
        widths = [transition_dim] + [dim * m for m in self.dim_mults]
        # Sinusoids of the diffusion time, then an MLP to 4 * dim (Diffuser's time MLP); time_scale
        # 1000 for a flow model's times s in [0, 1].
        emb_dim = dim * 4
        self.time_embedding = TimeEmbedding(dim, hidden=emb_dim, out_dim=emb_dim, scale=time_scale)
        levels = len(self.dim_mults)

        self.downs = nn.ModuleList()
        for k, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            last = k == levels - 1
            self.downs.append(nn.ModuleList([
                _block(w_in, w_out, emb_dim),
                _block(w_out, w_out, emb_dim),
                nn.Identity() if last else nn.Conv1d(w_out, w_out, 3, stride=2, padding=1),
            ]))
        mid = widths[-1]
        self.mid = nn.ModuleList([_block(mid, mid, emb_dim), _block(mid, mid, emb_dim)])
        self.ups = nn.ModuleList()
        for _k, (w_in, w_out) in enumerate(reversed(list(zip(widths[1:-1], widths[2:])))):
            # Back up one level: the skip connection doubles the input channels.
            self.ups.append(nn.ModuleList([
                _block(w_out * 2, w_in, emb_dim),
                _block(w_in, w_in, emb_dim),
                nn.ConvTranspose1d(w_in, w_in, 4, stride=2, padding=1),
            ]))
        self.out = nn.Sequential(
            nn.Conv1d(dim, dim, KERNEL_SIZE, padding=KERNEL_SIZE // 2),
            nn.GroupNorm(min(8, dim), dim),
            nn.Mish(),
            nn.Conv1d(dim, transition_dim, 1),
        )
        if zero_init_output:
            nn.init.zeros_(self.out[-1].weight)
            nn.init.zeros_(self.out[-1].bias)

    @property
    def horizon_multiple(self) -> int:
        return 2 ** (len(self.dim_mults) - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_input(x, t, self.transition_dim, self.horizon_multiple, "TemporalUNet")
        emb = self.time_embedding(t)
        skips = []
        h = x
        for block1, block2, down in self.downs:
            h = block2(block1(h, emb), emb)
            skips.append(h)
            h = down(h)
        for block in self.mid:
            h = block(h, emb)
        # As in Diffuser, the way up pairs each level with the skip of the level below it, deepest
        # first; the full-resolution skip is left unused.
        for block1, block2, up in self.ups:
            h = block2(block1(torch.cat([h, skips.pop()], dim=1), emb), emb)
            h = up(h)
        return self.out(h)


class ValueNet(nn.Module):
    """Diffuser's value function: the return expected from a noisy trajectory, ``V(x_t, t) -> (B,)``.

    The U-Net's down path, then a mean over time and a small MLP. It is trained on x_t at every
    noise level, so its gradient can steer sampling (value guidance) as well as rank finished
    plans.
    """

    def __init__(self, transition_dim: int, dim: int = 32, dim_mults: Sequence[int] = (1, 2, 4), hidden: int = 128):
        super().__init__()
        self.transition_dim = transition_dim
        self.dim_mults = tuple(int(m) for m in dim_mults)
        widths = [transition_dim] + [dim * m for m in self.dim_mults]
        emb_dim = dim * 4
        self.time_embedding = TimeEmbedding(dim, hidden=emb_dim, out_dim=emb_dim)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        for k, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            self.blocks.append(_block(w_in, w_out, emb_dim))
            last = k == len(self.dim_mults) - 1
            self.downs.append(nn.Identity() if last else nn.Conv1d(w_out, w_out, 3, stride=2, padding=1))
        self.head = nn.Sequential(nn.Linear(widths[-1] + emb_dim, hidden), nn.Mish(), nn.Linear(hidden, 1))

    @property
    def horizon_multiple(self) -> int:
        return 2 ** (len(self.dim_mults) - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_input(x, t, self.transition_dim, self.horizon_multiple, "ValueNet")
        emb = self.time_embedding(t)
        h = x
        for block, down in zip(self.blocks, self.downs):
            h = down(block(h, emb))
        return self.head(torch.cat([h.mean(dim=2), emb], dim=1)).squeeze(1)


class InverseDynamics(nn.Module):
    """Decision Diffuser's inverse dynamics: the action that leads from s_t to s_t+1 (normalised)."""

    def __init__(self, observation_dim: int, action_dim: int, hidden: int = 256):
        super().__init__()
        self.observation_dim, self.action_dim = observation_dim, action_dim
        self.net = nn.Sequential(
            nn.Linear(2 * observation_dim, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, action_dim),
        )

    def forward(self, obs: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        if obs.shape != next_obs.shape or obs.ndim != 2 or obs.shape[1] != self.observation_dim:
            raise ValueError(f"InverseDynamics expects two (batch, {self.observation_dim}) observations, "
                             f"got {tuple(obs.shape)} and {tuple(next_obs.shape)}")
        return self.net(torch.cat([obs, next_obs], dim=1))
