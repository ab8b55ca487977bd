"""A U-Net for image diffusion, written to be read top to bottom.

The network maps a noisy image ``x_t`` and its timestep ``t`` (B,) (integer or real) to the
diffusion's prediction (noise, x0 or v; twice the channels when the diffusion learns its
variance). Its building blocks (time embedding, residual block, attention) are the core's,
from ``diffkit.nn``; this file only arranges them. Optional conditions:

- ``labels``: class indices, embedded and added to the timestep embedding;
- ``context`` (+ ``context_mask``): a text encoder's per-token hidden states, read by
  cross-attention at the attention levels, and their masked mean added to the timestep
  embedding;
- ``low_res``: a low-resolution image (super-resolution), upsampled and concatenated to the
  input channels;
- ``drop_cond``: per-example switch to the learned null condition, for classifier-free
  guidance (see docs/interfaces.md).

Why it is shaped the way it is (measured on a 2-core CPU, see benchmarks/image_speed.py):
compute in a convolutional net grows with height x width while parameters do not, so the
full-resolution level gets the fewest, narrowest blocks and the parameters live at the low
resolutions; the decoder has one skip connection per level rather than one per block, which
removes a third of the convolutions; attention runs only where the feature map is small
(4x4 by default), where it is cheap; tensors are kept in ``channels_last``, the layout
oneDNN convolutions prefer on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffkit.nn import Attention, ResidualBlock, TimeEmbedding, group_norm, zero_module

__all__ = ["UNet"]


class Block(nn.Module):
    """A residual block, followed by attention at the levels that have it."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float,
                 attention: bool, num_heads: int, context_dim: int | None):
        super().__init__()
        self.res = ResidualBlock(in_ch, out_ch, emb_dim, groups=groups, dropout=dropout)
        self.attn = Attention(out_ch, num_heads, groups, context_dim) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x, context, context_mask)
        return x


class UNet(nn.Module):
    """U-Net denoiser for (B, C, H, W) images in [-1, 1].

    Args:
        in_channels: image channels (1 for digits, 3 for RGB).
        image_size: training resolution; H and W must be divisible by 2 ** (levels - 1).
        base_channels: width of the full-resolution level.
        channel_mult: width of each level as a multiple of ``base_channels``; one entry per
            resolution, each level after the first halves the resolution.
        num_res_blocks: residual blocks per level (an int for all levels, or one per level),
            used both on the way down and on the way up.
        attention_levels: indices of the levels with self-attention (and cross-attention
            when ``context_dim`` is set); the middle block always has attention.
        num_heads: attention heads (each level's width must be divisible by it).
        num_classes: enables class conditioning; index ``num_classes`` is the learned null
            class used for classifier-free guidance.
        context_dim: enables text conditioning on (B, L, context_dim) hidden states.
        low_res_channels: enables super-resolution conditioning on a low-resolution image
            with this many channels.
        learn_sigma: output twice the channels, the second half interpolating the log
            variance (for ``variance="learned_range"`` and the hybrid loss).
        dropout: dropout inside residual blocks.
        norm_groups: GroupNorm groups (reduced automatically to divide the width).
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 16,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int | Sequence[int] = (1, 2, 2),
        attention_levels: Sequence[int] = (2,),
        num_heads: int = 4,
        num_classes: int | None = None,
        context_dim: int | None = None,
        low_res_channels: int = 0,
        learn_sigma: bool = False,
        dropout: float = 0.0,
        norm_groups: int = 8,
        time_scale: float = 1.0,
    ):
        super().__init__()
        levels = len(channel_mult)
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * levels
        if len(num_res_blocks) != levels:
            raise ValueError(f"num_res_blocks has {len(num_res_blocks)} entries for {levels} levels")
        if image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {image_size} is not divisible by 2**{levels - 1}")
        bad_levels = [lvl for lvl in attention_levels if not 0 <= lvl < levels]
        if bad_levels:
            raise ValueError(f"attention_levels {bad_levels} out of range for {levels} levels")
        widths = [base_channels * m for m in channel_mult]
        for level in sorted({*attention_levels, levels - 1}):  # the middle block attends too
            if widths[level] % num_heads:
                raise ValueError(f"width {widths[level]} of level {level} is not divisible by "
                                 f"num_heads={num_heads}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.low_res_channels = low_res_channels
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * (2 if learn_sigma else 1)

        emb_dim = 4 * base_channels
        # Sinusoidal features of the (integer or real) timestep, then Linear-SiLU-Linear.
        # time_scale: 1000 for a flow model, whose times s lie in [0, 1], so its sinusoids resolve them
        # as finely as a 1000-step diffusion model's.
        self.time_mlp = TimeEmbedding(base_channels, emb_dim, emb_dim, scale=time_scale)
        if num_classes is not None:
            self.class_emb = nn.Embedding(num_classes + 1, emb_dim)  # last row: null class
        if context_dim is not None:
            self.context_proj = nn.Linear(context_dim, emb_dim)
            # The null condition for guidance: a single learned token stands in for the prompt.
            self.null_context = nn.Parameter(torch.zeros(1, 1, context_dim))

        def make_block(i: int, o: int, level: int) -> Block:
            attn = level in attention_levels
            return Block(i, o, emb_dim, norm_groups, dropout, attn, num_heads, context_dim)

        self.stem = nn.Conv2d(in_channels + low_res_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        ch = widths[0]
        for level, (w, n) in enumerate(zip(widths, num_res_blocks)):
            blocks = nn.ModuleList()
            for _ in range(n):
                blocks.append(make_block(ch, w, level))
                ch = w
            self.down.append(blocks)
            if level < levels - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))

        self.mid1 = ResidualBlock(ch, ch, emb_dim, groups=norm_groups, dropout=dropout)
        self.mid_attn = Attention(ch, num_heads, norm_groups, context_dim)
        self.mid2 = ResidualBlock(ch, ch, emb_dim, groups=norm_groups, dropout=dropout)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(levels)):
            w, n = widths[level], num_res_blocks[level]
            # One skip per level: the first block of the level reads [features, skip].
            blocks = nn.ModuleList([make_block(ch + w, w, level)])
            blocks.extend(make_block(w, w, level) for _ in range(n - 1))
            ch = w
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(nn.Conv2d(ch, widths[level - 1], 3, padding=1))
                ch = widths[level - 1]

        self.out_norm = group_norm(ch, norm_groups)
        self.out_conv = zero_module(nn.Conv2d(ch, self.out_channels, 3, padding=1))
        self.to(memory_format=torch.channels_last)

    def _embed(self, t, labels, context, context_mask, drop_cond, batch: int):
        """Timestep embedding plus the class and pooled-text embeddings; also returns the
        context and mask with dropped prompts replaced by the null token."""
        emb = self.time_mlp(t)
        # A condition the network has no input for would be ignored silently: refuse it.
        if labels is not None and self.num_classes is None:
            raise ValueError("labels were given but this network is not class-conditional")
        if context is not None and self.context_dim is None:
            raise ValueError("a text context was given but this network is not text-conditional")
        if self.num_classes is not None:
            if labels is None:
                raise ValueError("this network is class-conditional: pass labels=LongTensor (B,)")
            labels = labels.to(emb.device).long()
            if drop_cond is not None:
                labels = torch.where(drop_cond, torch.full_like(labels, self.num_classes), labels)
            emb = emb + self.class_emb(labels)
        if self.context_dim is not None:
            if context is None:
                raise ValueError("this network is text-conditional: pass context=(B, L, D)")
            if context_mask is None:
                context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
            if drop_cond is not None:
                # Replace dropped prompts by the learned null token (and mask everything else).
                drop = drop_cond.to(context.device)
                null = self.null_context.expand(batch, context.shape[1], -1)
                context = torch.where(drop[:, None, None], null, context)
                first_only = torch.zeros_like(context_mask)
                first_only[:, 0] = True
                context_mask = torch.where(drop[:, None], first_only, context_mask)
            weights = context_mask.to(context.dtype)[:, :, None]
            pooled = (context * weights).sum(1) / weights.sum(1).clamp_min(1.0)
            emb = emb + self.context_proj(pooled)
        return emb, context, context_mask

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        low_res: torch.Tensor | None = None,
        drop_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected images (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}"
            )
        if x.shape[-2] % 2 ** (len(self.down) - 1) or x.shape[-1] % 2 ** (len(self.down) - 1):
            raise ValueError(f"H and W must be divisible by {2 ** (len(self.down) - 1)}")
        if not isinstance(t, torch.Tensor) or t.shape != x.shape[:1]:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"expected timesteps t of shape (B,) = ({x.shape[0]},), got {shape}")
        t = t.to(x.device)
        emb, context, context_mask = self._embed(
            t, labels, context, context_mask, drop_cond, x.shape[0]
        )
        if low_res is not None and not self.low_res_channels:
            raise ValueError("low_res was given but this network is not a super-resolution model")
        if self.low_res_channels:
            if low_res is None:
                raise ValueError("this network is a super-resolution model: pass low_res=(B,C,h,w)")
            up = F.interpolate(low_res.to(x.dtype), size=x.shape[-2:], mode="bilinear",
                               align_corners=False)
            if drop_cond is not None:
                up = up * (~drop_cond.to(up.device)).to(up.dtype)[:, None, None, None]
            x = torch.cat([x, up], dim=1)

        h = self.stem(x.contiguous(memory_format=torch.channels_last))
        skips = []
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb, context, context_mask)
            skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)

        h = self.mid2(self.mid_attn(self.mid1(h, emb), context, context_mask), emb)

        for i, blocks in enumerate(self.up):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb, context, context_mask)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))

        out = self.out_conv(F.silu(self.out_norm(h)))
        return out.contiguous()  # the core expects the caller's ordinary layout
