"""The masked-diffusion text network: a Transformer over word ids that predicts the masked ones.

Shapes follow :class:`diffkit.MaskedDiffusion`'s contract,

    net(x_t (B, L) long, t (B,), context=x0 (B, L) or None, mr=(B, S) long, drop_cond=(B,) bool)
        -> logits (B, L, V)

where token id V is the mask. The network ignores t: which tokens are masked already says how
far the chain has gone (MDLM, MD4), and a time-free network lets samplers skip calls while
nothing changes.

Two ways of reading a sequence share one set of weights:

- ``context=None``: plain masked diffusion, every position attends to every other (infilling
  reads the words on both sides of a gap).
- ``context=x0``: block diffusion (BD3-LM, Arriola et al. 2025). The network reads x_t and the
  clean sequence side by side, 2L tokens: a noisy token of block j attends to its own block of
  x_t and to the clean blocks before j; a clean token of block j attends to the clean blocks
  up to j. Every block's prediction is then one of block diffusion's conditionals, all from one
  pass. At sampling time :meth:`MaskedTextDenoiser.block_cache` keeps the clean blocks' keys and
  values, so each call reads only the block being drawn, as an autoregressive model reads one
  new word.

With ``mr_sizes`` the network is conditioned on an E2E meaning representation: one token per
slot in front of everything, attended by every position and attending only to the other slot
tokens (so the cache holds them once). ``drop_cond`` makes every slot "unspecified", the null
condition of classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .model import add_mr_slots, mr_slot_tokens

__all__ = ["MaskedTextDenoiser", "TextBlockCache"]


class MaskedTextDenoiser(nn.Module):
    """Token and position embeddings, pre-norm Transformer layers with explicit attention masks,
    an output head tied to the token embeddings.

    Args:
        vocab_size: V, the tokenizer's vocabulary (the mask is id V).
        hidden, depth, heads: width, layers and attention heads.
        max_length: the longest sequence (learned positions).
        block_size: tokens per block when the network is given ``context`` (block diffusion).
        mr_sizes: codes per MR slot for a conditional model, None for an unconditional one.
        dropout: dropout inside the layers.
    """

    def __init__(self, vocab_size: int, hidden: int = 128, depth: int = 4, heads: int = 4, max_length: int = 64,
                 block_size: int = 4, mr_sizes: Sequence[int] | None = None, dropout: float = 0.1):
        super().__init__()
        if vocab_size < 2 or max_length < 1 or depth < 1 or block_size < 1:
            raise ValueError(f"MaskedTextDenoiser needs vocab_size >= 2 and positive max_length, depth, block_size; "
                             f"got {vocab_size}, {max_length}, {depth}, {block_size}")
        if hidden % heads:
            raise ValueError(f"hidden width {hidden} must be divisible by the number of heads {heads}")
        self.vocab_size, self.max_length, self.block_size = vocab_size, max_length, block_size
        self.tokens = nn.Embedding(vocab_size + 1, hidden)
        # GPT-2's scale: with unit-variance rows the tied head's first logits would have a spread
        # of sqrt(hidden), a cross-entropy of tens of nats that the first hundreds of steps undo.
        nn.init.normal_(self.tokens.weight, std=0.02)
        self.positions = nn.Parameter(torch.randn(max_length, hidden) * 0.02)
        add_mr_slots(self, mr_sizes, hidden)
        self.layers = nn.ModuleList([_Layer(hidden, heads, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(hidden)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.drop = nn.Dropout(dropout)

    @property
    def conditional(self) -> bool:
        return bool(self.mr_sizes)

    # ------------------------------------------------------------------ pieces
    def _check(self, x: torch.Tensor, name: str) -> None:
        if x.ndim != 2 or x.dtype != torch.long:
            raise ValueError(f"{name} must be (B, L) token ids, got {tuple(x.shape)} {x.dtype}")
        if x.shape[1] > self.max_length:
            raise ValueError(f"sequence length {x.shape[1]} exceeds this model's max_length {self.max_length}")

    def _slots(self, batch: int, mr, drop_cond, device) -> torch.Tensor:
        """(B, S, hidden) MR slot tokens ((B, 0, hidden) for an unconditional network)."""
        if not self.mr_sizes:
            if mr is not None:
                raise ValueError("this text model is unconditional; it takes no mr (meaning representation)")
            return torch.zeros(batch, 0, self.positions.shape[1], device=device)
        return mr_slot_tokens(self, batch, mr, drop_cond, device)

    def _embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.tokens(ids) + self.positions[start: start + ids.shape[1]]

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h) @ self.tokens.weight[: self.vocab_size].t() + self.bias

    # ------------------------------------------------------------------ denoiser
    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, context: torch.Tensor | None = None,
                mr: torch.Tensor | None = None, drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        self._check(x, "x_t")
        batch, length = x.shape
        slots = self._slots(batch, mr, drop_cond, x.device)
        s = slots.shape[1]
        if context is None:
            h = torch.cat([slots, self._embed(x)], dim=1)
            mask = None  # everything sees everything
        else:
            if context.shape != x.shape:
                raise ValueError(f"context must have the shape of x_t {tuple(x.shape)}, got {tuple(context.shape)}")
            h = torch.cat([slots, self._embed(x), self._embed(context)], dim=1)
            mask = block_diffusion_mask(s, length, self.block_size, x.device)
        h = self.drop(h)
        for layer in self.layers:
            h = layer(h, mask)
        return self._head(h[:, s: s + length])

    def block_cache(self, batch: int, mr: torch.Tensor | None = None,
                    drop_cond: torch.Tensor | None = None) -> TextBlockCache:
        """A :class:`diffkit.masked.BlockCache` for ``batch`` rows under these conditions."""
        return TextBlockCache(self, self._slots(batch, mr, drop_cond, self.positions.device))


def block_diffusion_mask(slots: int, length: int, block_size: int, device) -> torch.Tensor:
    """(S + 2L, S + 2L) bool, True where a query row may attend to a key column: slots see slots;
    noisy block j sees the slots, itself and the clean blocks before j; clean block j sees the
    slots and the clean blocks up to j."""
    block = torch.arange(length, device=device) // block_size
    noisy_to_noisy = block[:, None] == block[None, :]
    noisy_to_clean = block[:, None] > block[None, :]
    clean_to_clean = block[:, None] >= block[None, :]
    none = torch.zeros(length, length, dtype=torch.bool, device=device)
    words = torch.cat([torch.cat([noisy_to_noisy, noisy_to_clean], 1), torch.cat([none, clean_to_clean], 1)], 0)
    mask = torch.zeros(slots + 2 * length, slots + 2 * length, dtype=torch.bool, device=device)
    mask[:, :slots] = True
    mask[slots:, slots:] = words
    return mask


class TextBlockCache:
    """Keys and values of the slot tokens and of every committed clean block, in buffers sized for
    the longest text (written in place, never copied to grow). ``commit`` only records a block;
    its keys and values are computed in the next ``logits`` call, in the same pass as the next
    block (one network call per sampling step)."""

    def __init__(self, net: MaskedTextDenoiser, slots: torch.Tensor):
        self.net, self.batch = net, slots.shape[0]
        width, heads = net.positions.shape[1], net.layers[0].heads
        shape = (self.batch, heads, slots.shape[1] + net.max_length, width // heads)
        self.keys = [slots.new_empty(shape) for _ in net.layers]
        self.values = [slots.new_empty(shape) for _ in net.layers]
        self.cached = 0  # entries of the buffers that hold committed tokens
        self.pending = slots  # (B, n, hidden) inputs not yet in the cache: the slots first
        self.pending_ids: torch.Tensor | None = None
        self.length = 0  # word positions committed

    def commit(self, x_block: torch.Tensor) -> None:
        if self.pending_ids is not None:
            raise RuntimeError("commit a block once, then ask for the next block's logits")
        self.pending_ids = x_block

    def logits(self, x_block: torch.Tensor, t: torch.Tensor | None = None,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the block being drawn; with ``rows``, of those rows only (x_block holds them)."""
        net = self.net
        start = self.length + (0 if self.pending_ids is None else self.pending_ids.shape[1])
        if start + x_block.shape[1] > net.max_length:
            raise ValueError(f"sequence length {start + x_block.shape[1]} exceeds this model's max_length "
                             f"{net.max_length}")
        if rows is not None:
            if self.pending is not None or self.pending_ids is not None:
                self._flush()
            return self._read(x_block, rows)
        parts = [self.pending] if self.pending is not None else []
        if self.pending_ids is not None:
            parts.append(net._embed(self.pending_ids, self.length))
        new = sum(p.shape[1] for p in parts)
        h = torch.cat([*parts, net._embed(x_block, start)], dim=1)
        cached = self.cached
        # Rows of the pending clean tokens see the cache and each other; the block's rows see all.
        # Slots pending at the start see only the slots: they are the whole of "pending" then.
        mask = torch.ones(h.shape[1], cached + h.shape[1], dtype=torch.bool, device=h.device)
        mask[:new, cached + new:] = False
        for i, layer in enumerate(net.layers):
            h = layer(h, mask, (self.keys[i], self.values[i], cached))
        self.cached += new  # the block's own entries past them are overwritten by the next call
        if self.pending_ids is not None:
            self.length += self.pending_ids.shape[1]
        self.pending, self.pending_ids = None, None
        return net._head(h[:, new:])

    def _flush(self) -> None:
        """Put the pending tokens into the cache for every row, reading no block."""
        self.logits(torch.zeros(self.batch, 0, dtype=torch.long, device=self.net.positions.device))

    def _read(self, x_block: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The block's logits for some rows, over those rows' cached keys and values (nothing is added)."""
        net, end = self.net, self.cached + x_block.shape[1]
        h = net._embed(x_block, self.length)
        for i, layer in enumerate(net.layers):
            # A copy of these rows' entries, with room for the block's own.
            h = layer(h, None, (self.keys[i][rows, :, :end], self.values[i][rows, :, :end], self.cached))
        return net._head(h)


class _Layer(nn.Module):
    """Pre-norm self-attention and MLP; attends over cached keys and values when given them."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.p = heads, dropout
        self.n1, self.n2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.drop = nn.Dropout(dropout)

    def forward(self, h, mask, cache=None):
        """``cache`` (keys, values, n): buffers (B, heads, >= n + L, d) whose first n entries are
        earlier tokens; this call's keys and values are written after them, in place."""
        batch, length, width = h.shape
        q, k, v = self.qkv(self.n1(h)).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            keys, values, n = cache
            keys[:, :, n: n + length], values[:, :, n: n + length] = k, v
            k, v = keys[:, :, : n + length], values[:, :, : n + length]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        h = h + self.drop(self.proj(a.transpose(1, 2).reshape(batch, length, width)))
        return h + self.drop(self.mlp(self.n2(h)))
