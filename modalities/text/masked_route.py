"""The masked-diffusion text route: sampling settings and the sampling of a masked text checkpoint.

A masked checkpoint (``recipes/text_train.py --route masked``) holds a
:class:`~modalities.text.masked_model.MaskedTextDenoiser` and a ``diffkit.MaskedDiffusion`` with
a block size. Texts are written block by block (block diffusion): each block of a few words is
drawn by masked diffusion given the blocks before it, and a text ends where the model writes the
end token, so lengths are the model's own. Infilling reads the whole template at once (plain
masked diffusion, the same network): the known words on both sides of a gap inform it, and the
template fixes the length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import diffkit
from diffkit.guidance import check_guidance_scale

__all__ = ["masked_bits_per_token", "MaskedTextSampling", "sample_masked_ids", "fill_masked_ids", "generate_masked", "MASKED_FALLBACKS"]


@dataclass(frozen=True)
class MaskedTextSampling:
    """How a masked text checkpoint samples; every field checks itself.

    Args:
        sampler: ``"ancestral"`` or ``"confidence"`` (``diffkit.masked.SAMPLERS``).
        steps: denoising steps per block (per text when infilling); the network is called only
            when a token was revealed, so a block of b words costs at most b calls.
        guidance_scale: classifier-free guidance towards an MR (1: none).
        temperature, top_p: the token distribution (``diffkit.TokenSampling``).
        threshold: confidence sampler only: also reveal every word drawn with at least this
            probability at once (None: one schedule's count a step).
    """

    sampler: str = "ancestral"
    steps: int = 4
    guidance_scale: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.sampler not in diffkit.masked.SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r} for a masked text model; choose one of "
                             f"{', '.join(diffkit.masked.SAMPLERS)}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        check_guidance_scale(self.guidance_scale)
        diffkit.TokenSampling(self.temperature, self.top_p)  # checks temperature and top_p
        if self.threshold is not None and (self.sampler != "confidence" or isinstance(self.threshold, bool)
                                           or not 0 < self.threshold <= 1):
            raise ValueError(f"threshold is a probability in (0, 1] for the confidence sampler, got "
                             f"{self.threshold!r} with sampler {self.sampler!r}")

    @property
    def tokens(self) -> diffkit.TokenSampling:
        return diffkit.TokenSampling(self.temperature, self.top_p)


MASKED_FALLBACKS = MaskedTextSampling()


class _Allowed:
    """The network with the tokens that may not be written (unknown, special) taken out of its logits."""

    def __init__(self, net, banned: torch.Tensor):
        self.net, self.banned = net, banned

    def __call__(self, x_t, t, **cond):
        return self.net(x_t, t, **cond).masked_fill(self.banned, -math.inf)

    def parameters(self):
        return self.net.parameters()

    def block_cache(self, batch, **cond):
        cache = self.net.block_cache(batch, **cond)
        banned, logits = self.banned, cache.logits
        cache.logits = lambda x_block, t=None, rows=None: logits(x_block, t, rows).masked_fill(banned, -math.inf)
        return cache


def _banned(net, tokenizer, *, end: bool) -> torch.Tensor:
    """(V,) bool: the tokens never written: special ones and [UNK]; the end token too unless ``end``."""
    banned = torch.zeros(net.vocab_size, dtype=torch.bool)
    ids = [*tokenizer.special_ids, tokenizer.unk_id]
    banned[[i for i in ids if i is not None and i < net.vocab_size and (not end or i != tokenizer.pad_id)]] = True
    return banned.to(next(net.parameters()).device)


@torch.no_grad()
def sample_masked_ids(net, diffusion: diffkit.MaskedDiffusion, tokenizer, n: int, settings: MaskedTextSampling, *,
                      mr: torch.Tensor | None = None, generator: torch.Generator | None = None,
                      length: int | None = None) -> list[list[int]]:
    """``n`` texts as token-id lists, written block by block up to the end token (at most
    ``length`` or the network's max_length tokens)."""
    end_id = tokenizer.pad_id
    device = next(net.parameters()).device
    limit = length or net.max_length
    cond = {} if mr is None else {"mr": mr.to(device)}
    ids = diffusion.sample(_Allowed(net, _banned(net, tokenizer, end=True)), (n, limit), steps=settings.steps,
                           sampler=settings.sampler, generator=generator, guidance_scale=settings.guidance_scale,
                           sampling=settings.tokens, confidence_threshold=settings.threshold, stop_id=end_id,
                           **cond)
    texts = []
    for row in ids.tolist():
        row = [i for i in row if i != diffusion.mask_id]
        texts.append(row[: row.index(end_id)] if end_id in row else row)
    return texts


@torch.no_grad()
def fill_masked_ids(net, diffusion: diffkit.MaskedDiffusion, tokenizer, lengths: torch.Tensor,
                    settings: MaskedTextSampling, *, known_ids: torch.Tensor | None = None,
                    known_mask: torch.Tensor | None = None, mr: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, max length) ids of texts of the given ``lengths`` drawn by plain masked diffusion over
    the whole text (every word sees every other), with ``known_ids`` kept where ``known_mask``
    holds: infilling and texts of a set length. Positions after a row's length are the end token."""
    n, width = len(lengths), int(lengths.max())
    device = next(net.parameters()).device
    inside = torch.arange(width)[None] < lengths[:, None]
    known = torch.full((n, width), tokenizer.pad_id, dtype=torch.long)
    fill = inside
    if known_ids is not None:
        known = torch.where(known_mask, known_ids, known)
        fill = inside & ~known_mask
    cond = {} if mr is None else {"mr": mr.to(device)}
    return diffusion.sample(_Allowed(net, _banned(net, tokenizer, end=False)), (n, width), steps=settings.steps,
                            sampler=settings.sampler, generator=generator, guidance_scale=settings.guidance_scale,
                            sampling=settings.tokens, confidence_threshold=settings.threshold, block_size=None,
                            known=known.to(device), fill=fill.to(device),
                            **cond).cpu()


def request_settings(model, request) -> MaskedTextSampling:
    """The checkpoint's recorded sampling defaults with the request's choices laid over them."""
    def pick(name, given):
        return given if given is not None else model.default(name, getattr(MASKED_FALLBACKS, name))

    guidance = pick("guidance_scale", request.guidance_scale) if request.control else 1.0
    sampler = pick("sampler", request.sampler)
    # A recorded threshold belongs to the recorded (confidence) sampler, not to one the request names.
    threshold = request.threshold if request.threshold is not None or request.sampler not in (None, "confidence") \
        else model.default("threshold", None)
    return MaskedTextSampling(sampler, int(pick("steps", request.steps)), float(guidance),
                              float(pick("temperature", request.temperature)), float(pick("top_p", request.top_p)),
                              threshold)


def generate_masked(model, request, *, mr: torch.Tensor | None, templates, generator) -> list[str]:
    """``generate_text`` for a masked checkpoint: block by block up to the model's own end token;
    with ``length`` or an infilling template, the whole text at once at that length."""
    from .modality import _lengths, fill_template, template_tensors

    settings = request_settings(model, request)
    net, tokenizer, n = model.net, model.tokenizer, request.num_samples
    if templates is not None:
        lengths, known_ids, known_mask = template_tensors([t for _, t in templates], tokenizer.pad_id)
        ids = fill_masked_ids(net, model.diffusion, tokenizer, lengths, settings, known_ids=known_ids,
                              known_mask=known_mask, mr=mr, generator=generator)
        return [fill_template(text, template, row, tokenizer) for (text, template), row in zip(templates, ids)]
    if request.length is not None:
        lengths = _lengths(model, n, request.length, generator)
        ids = fill_masked_ids(net, model.diffusion, tokenizer, lengths, settings, mr=mr, generator=generator)
        return [tokenizer.decode(row[: int(k)].tolist()) for row, k in zip(ids, lengths)]
    rows = sample_masked_ids(net, model.diffusion, tokenizer, n, settings, mr=mr, generator=generator)
    return [tokenizer.decode(row) for row in rows]


@torch.no_grad()
def masked_bits_per_token(model, encoded, codes: torch.Tensor | None, *, samples: int, batch_size: int,
                          generator: torch.Generator | None) -> torch.Tensor:
    """(n,) bits per word-and-end token: the block-diffusion bound of each encoded text, scored
    up to the block holding its end token (the positions after it in that block are end tokens
    too, and nearly free), divided by words + 1 as an autoregressive model's count is."""
    from .objective import MaskedTextObjective

    net, diffusion, device = model.net, model.diffusion, model.device
    reading = MaskedTextObjective(diffusion, model.tokenizer.pad_id, plain_share=0.0)
    out = []
    for start in range(0, len(encoded.lengths), batch_size):
        part = slice(start, start + batch_size)
        x0, counted, _ = reading.targets(encoded.ids[part], encoded.mask[part])
        cond = {} if codes is None else {"mr": codes[part].to(device)}
        bits = diffusion.nll(net, x0.to(device), mask=counted.to(device), samples=samples, generator=generator,
                             **cond)
        out.append((bits.cpu() * counted.sum(1) / (encoded.lengths[part] + 1)).float())
    return torch.cat(out)
