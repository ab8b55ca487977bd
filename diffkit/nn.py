"""Network blocks shared by the modalities' denoisers, written once.

The core knows no modality: these blocks work on any ``(B, C, *spatial)`` tensor, with
``dims=1`` for sequences (audio, trajectories) and ``dims=2`` for images.

- :func:`sinusoidal_embedding`: the Transformer's sinusoidal features of (float) times.
- :class:`TimeEmbedding`: those features followed by Linear-SiLU-Linear.
- :class:`ResidualBlock`: GroupNorm-activation-conv twice, the time embedding applied as a
  FiLM scale and shift, the second conv zero-initialised (a fresh block is the identity).
- :class:`Attention`: multi-head self-attention over the flattened positions, then optional
  cross-attention to (B, L, context_dim) tokens with a padding mask; zero-initialised output
  projections (a fresh block is the identity).
- :func:`zero_module`, :func:`group_norm`: small helpers.

State-dict keys are part of the interface (shipped checkpoints depend on them): a
``TimeEmbedding`` stores ``0.weight, 0.bias, 2.weight, 2.bias``; a ``ResidualBlock``
``norm1, conv1, emb, norm2, conv2, skip``; an ``Attention`` ``norm, qkv, proj`` (and
``norm_cross, q_cross, kv_cross, proj_cross`` with a context).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Attention",
    "ResidualBlock",
    "TimeEmbedding",
    "group_norm",
    "sinusoidal_embedding",
    "zero_module",
]

M = TypeVar("M", bound=nn.Module)

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "mish": F.mish,
    "gelu": F.gelu,
    "relu": F.relu,
}
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


# ------------------------------------------------------------------------------ helpers
def zero_module(module: M) -> M:
    """Zero a module's parameters (so a residual branch starts as the identity); returns it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int, groups: int = 8) -> nn.GroupNorm:
    """GroupNorm over ``channels``; uses ``gcd(channels, groups)`` groups when ``groups`` does
    not divide the width, rather than failing."""
    if channels < 1 or groups < 1:
        raise ValueError(f"group_norm needs channels >= 1 and groups >= 1, got {channels}, {groups}")
    return nn.GroupNorm(math.gcd(channels, groups), channels)


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}") from None


def _check_times(t: torch.Tensor, who: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{who}: t must be a tensor of shape (B,), got {type(t).__name__}")
    if t.ndim != 1:
        raise ValueError(f"{who}: t must have shape (B,), got {tuple(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{who}: t must be a real (integer or float) tensor, got {t.dtype}")


# ---------------------------------------------------------------------- time embedding
def sinusoidal_embedding(
    t: torch.Tensor, dim: int, max_period: float = 10000.0, scale: float = 1.0
) -> torch.Tensor:
    """Sinusoidal features (B, dim) of times ``t`` (B,), as in the Transformer.

    With ``half = dim // 2`` and ``f_i = max_period ** (-i / half)``, the features are
    ``[cos(s t f_0), ..., cos(s t f_{half-1}), sin(s t f_0), ..., sin(s t f_{half-1})]``
    (a zero column is appended when ``dim`` is odd), where ``s = scale``: use e.g.
    ``scale=1000`` for a continuous time or noise level in (0, 1], so neighbouring times are
    as distinguishable as integer timesteps 0..999. ``t`` may be integer or float; the result
    is float32.
    """
    _check_times(t, "sinusoidal_embedding")
    if dim < 1:
        raise ValueError(f"sinusoidal_embedding: dim must be >= 1, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    times = t.float()
    if scale != 1.0:
        times = times * scale
    args = times[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Sequential):
    """Sinusoidal features of (float) times, then Linear-SiLU-Linear: (B,) -> (B, out_dim).

    Args:
        dim: number of sinusoidal features.
        hidden: width of the hidden layer (default ``4 * dim``).
        out_dim: output width (default ``hidden``).
        scale: multiplies ``t`` before the sinusoids (e.g. 1000 for times in (0, 1]).
        max_period: the longest sinusoid's period.

    It is an ``nn.Sequential`` of the three layers, so its weights are named
    ``0.weight, 0.bias, 2.weight, 2.bias``.
    """

    def __init__(self, dim: int, hidden: int | None = None, out_dim: int | None = None,
                 scale: float = 1.0, *, max_period: float = 10000.0):
        if dim < 1:
            raise ValueError(f"TimeEmbedding: dim must be >= 1, got {dim}")
        hidden = 4 * dim if hidden is None else hidden
        out_dim = hidden if out_dim is None else out_dim
        super().__init__(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))
        self.dim = dim
        self.hidden = hidden
        self.out_dim = out_dim
        self.scale = scale
        self.max_period = max_period

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        emb = sinusoidal_embedding(t, self.dim, self.max_period, self.scale)
        return super().forward(emb.to(self[0].weight.dtype))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}, max_period={self.max_period}"


# ---------------------------------------------------------------------- residual block
class ResidualBlock(nn.Module):
    """GroupNorm-activation-conv, FiLM by the embedding, GroupNorm-activation-dropout-conv.

    ``forward(x (B, in_channels, *spatial), emb (B, emb_dim)) -> (B, out_channels, *spatial)``.
    The embedding is projected to a per-channel scale and shift applied after the second
    norm (``h * (1 + scale) + shift``); the second conv starts at zero, so a fresh block is
    the identity (or its 1x1 skip conv when the widths differ). Convolutions keep the
    spatial size (odd ``kernel_size``, "same" padding).

    Args:
        dims: 1 for sequences (Conv1d), 2 for images (Conv2d), 3 for volumes.
        groups: GroupNorm groups (reduced to ``gcd(width, groups)`` when they do not divide).
        activation: "silu", "mish", "gelu" or "relu".
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        *,
        dims: int = 2,
        kernel_size: int = 3,
        groups: int = 8,
        dropout: float = 0.0,
        activation: str = "silu",
    ):
        super().__init__()
        if dims not in _CONVS:
            raise ValueError(f"ResidualBlock: dims must be 1, 2 or 3, got {dims}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"ResidualBlock: kernel_size must be odd (same padding), got {kernel_size}")
        conv = _CONVS[dims]
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_dim = emb_dim
        self.dims = dims
        self.act = _activation(activation)
        pad = kernel_size // 2
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = conv(in_channels, out_channels, kernel_size, padding=pad)
        self.emb = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(conv(out_channels, out_channels, kernel_size, padding=pad))
        self.skip = conv(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.dims + 2 or x.shape[1] != self.in_channels:
            spatial = {1: "L", 2: "H, W", 3: "D, H, W"}[self.dims]
            raise ValueError(f"ResidualBlock: expected x of shape (B, {self.in_channels}, {spatial}), "
                             f"got {tuple(x.shape)}")
        if emb.ndim != 2 or emb.shape[1] != self.emb_dim or emb.shape[0] != x.shape[0]:
            raise ValueError(f"ResidualBlock: expected emb of shape (B={x.shape[0]}, "
                             f"emb_dim={self.emb_dim}), got {tuple(emb.shape)}")
        h = self.conv1(self.act(self.norm1(x)))
        film = self.emb(emb).view(*emb.shape[:1], -1, *(1,) * self.dims)
        scale, shift = film.chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(self.act(h)))
        return self.skip(x) + h

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


# --------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """Multi-head self-attention over the positions of ``x`` (B, C, *spatial), then
    (with ``context_dim``) cross-attention to context tokens (B, L, context_dim).

    ``context_mask`` (B, L) marks real tokens with True; padding is ignored (an example whose
    tokens are all padding gets no cross-attention contribution). Both output projections
    start at zero, so a fresh block is the identity. 4-D outputs are ``channels_last``.
    """

    def __init__(self, channels: int, num_heads: int = 4, groups: int = 8,
                 context_dim: int | None = None):
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"Attention: channels={channels} is not divisible by num_heads={num_heads}")
        self.channels = channels
        self.num_heads = num_heads
        self.context_dim = context_dim
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_module(nn.Linear(channels, channels))
        self.cross = context_dim is not None
        if self.cross:
            self.norm_cross = nn.LayerNorm(channels)
            self.q_cross = nn.Linear(channels, channels)
            self.kv_cross = nn.Linear(context_dim, 2 * channels)
            self.proj_cross = zero_module(nn.Linear(channels, channels))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, h, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, h * d)

    def _check_context(self, x: torch.Tensor, context: torch.Tensor,
                       context_mask: torch.Tensor | None) -> torch.Tensor | None:
        if not self.cross:
            raise ValueError("Attention: a context was given but this block has no "
                             "cross-attention (context_dim=None)")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != self.context_dim:
            raise ValueError(f"Attention: expected context of shape (B={x.shape[0]}, L, "
                             f"context_dim={self.context_dim}), got {tuple(context.shape)}")
        if context_mask is None:
            return None
        if context_mask.shape != context.shape[:2]:
            raise ValueError(f"Attention: expected context_mask of shape {tuple(context.shape[:2])} "
                             f"(B, L), got {tuple(context_mask.shape)}")
        if context_mask.dtype != torch.bool:
            if context_mask.is_floating_point() or context_mask.is_complex():
                raise TypeError("Attention: context_mask must be boolean (True = real token), got "
                                f"{context_mask.dtype}")
            context_mask = context_mask != 0
        return context_mask

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.ndim < 3 or x.shape[1] != self.channels:
            raise ValueError(f"Attention: expected x of shape (B, {self.channels}, *spatial), "
                             f"got {tuple(x.shape)}")
        if context is None and context_mask is not None:
            raise ValueError("Attention: context_mask was given without a context")
        if context is not None:
            context_mask = self._check_context(x, context, context_mask)
        b, c, *spatial = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        q, k, v = self.qkv(tokens).chunk(3, dim=2)
        out = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v))
        h = x.flatten(2).transpose(1, 2) + self.proj(self._merge(out))
        if context is not None:
            q = self.q_cross(self.norm_cross(h))
            k, v = self.kv_cross(context.to(h.dtype)).chunk(2, dim=2)
            mask = keep = None
            if context_mask is not None:
                # SDPA's boolean mask: True = attend; (B, 1, 1, L) broadcasts over heads and
                # queries. A row of padding only would give NaN: let it attend to everything
                # and drop its contribution instead.
                keep = context_mask.any(dim=1)
                mask = (context_mask | ~keep[:, None])[:, None, None, :]
            out = F.scaled_dot_product_attention(
                self._heads(q), self._heads(k), self._heads(v), attn_mask=mask
            )
            cross = self.proj_cross(self._merge(out))
            if keep is not None:
                cross = cross * keep.to(cross.dtype)[:, None, None]
            h = h + cross
        out = h.transpose(1, 2).reshape(b, c, *spatial)
        if out.ndim == 4:
            return out.contiguous(memory_format=torch.channels_last)
        if out.ndim == 5:
            return out.contiguous(memory_format=torch.channels_last_3d)
        return out.contiguous()
