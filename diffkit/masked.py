"""Masked (absorbing-state) diffusion over discrete tokens: :class:`MaskedDiffusion`.

Tokens are integers 0..V-1 (words, audio codes, discretised states); the absorbing state is the
extra id V (:attr:`MaskedDiffusion.mask_id`). The forward process masks each token on its own:
at time t in [0, 1] a token is still itself with probability alpha_t and the mask otherwise,
alpha_0 = 1 and alpha_1 = 0. The network sees the partly masked sequence and predicts the clean
tokens,

    model(x_t (B, L) long, t (B,) float, **cond) -> logits (B, L, V),

and, as in MDLM (Sahoo et al. 2024; Shi et al. 2024's MD4), unmasked tokens are carried over:
only the masked positions' predictions are used. The negative ELBO in continuous time is

    -log p(x0) <= E_t [ w(t) sum_{l : x_t^l = mask} -log p_theta(x0^l | x_t) ],   w(t) = -alpha'_t / (1 - alpha_t),

which for the exact conditionals equals -log p(x0) (the any-order autoregressive likelihood), so
the bound of a perfect model is tight. ``loss`` is its per-token mean, ``nll`` its value in bits
per token, estimated over stratified time draws with its standard error.

Samplers, one short function each over the grid 1 = t_0 > ... > t_K = 0:

* ``ancestral``: from t to s every masked token is revealed with probability
  (alpha_s - alpha_t) / (1 - alpha_t), drawn from p_theta(x0 | x_t). The network is called only
  when the sequence changed since its last call, so a batch of one costs at most L calls,
  whatever K (MDLM's caching; it assumes a network whose predictions do not depend on t, as
  MDLM's and MD4's do not need to).
* ``confidence``: the same number of tokens revealed in expectation, but the ones the network
  is surest of first (MaskGIT, Chang et al. 2022; LLaDA's low-confidence remasking), with
  ``confidence_noise`` adding Gumbel noise to the ranking.

Both take classifier-free guidance on the log-probabilities, known tokens (infilling),
positions left out (padding), temperature and top-p.

Block diffusion (BD3-LM, Arriola et al. 2025) is the same process run one block of
``block_size`` tokens at a time: autoregressive across blocks, masked diffusion inside each.
The bound is the sum of each block's masked-diffusion bound given the clean blocks before it,
and the network reads those through a ``context`` keyword,

    model(x_t (B, L), t (B,), context=x0 (B, L), **cond) -> logits (B, L, V),

where the logits of block j may depend on x_t's block j and on ``context``'s blocks before j
only (block-causal attention; the later context is unseen). Sampling denoises block after
block with ``steps`` steps each and stops once every row has produced ``stop_id``. A network
that offers ``model.block_cache(batch, **cond)`` (:class:`BlockCache`) keeps the clean blocks'
keys and values, as an autoregressive model does; any other network is called on the whole
prefix each time (the same result, more work).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch

from . import __version__ as _version
from .guidance import check_guidance_scale
from .likelihood import Estimate

SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ancestral", "confidence")
LOG2 = math.log(2.0)

_DEFAULT = object()  # "the diffusion's own block size"


def _check_block_size(block_size) -> Optional[int]:
    if block_size is None:
        return None
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer or None (one block), got {block_size!r}")
    return block_size


def _alpha(schedule: str, t: torch.Tensor) -> torch.Tensor:
    if schedule == "linear":
        return 1.0 - t
    return torch.cos(0.5 * math.pi * t)


def _weight(schedule: str, t: torch.Tensor) -> torch.Tensor:
    """w(t) = -alpha'_t / (1 - alpha_t): 1 / t (linear), (pi/2) sin / (1 - cos) (cosine)."""
    if schedule == "linear":
        return 1.0 / t
    return 0.5 * math.pi * torch.sin(0.5 * math.pi * t) / (1.0 - torch.cos(0.5 * math.pi * t))


@dataclass(frozen=True)
class TokenSampling:
    """How tokens are drawn from the network's logits: ``temperature`` (> 0) and nucleus ``top_p`` in (0, 1]."""

    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not (math.isfinite(float(self.temperature)) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not 0 < float(self.top_p) <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities after temperature and top-p (tokens outside the nucleus get -inf)."""
        logp = torch.log_softmax(logits.float() / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_logp, order = logp.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            outside = sorted_logp.exp().cumsum(dim=-1) - sorted_logp.exp() >= self.top_p
            sorted_logp = sorted_logp.masked_fill(outside, -math.inf)
            logp = torch.full_like(logp, -math.inf).scatter(-1, order, sorted_logp)
            logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
        return logp


class MaskedDiffusion:
    """Masked (absorbing-state) diffusion over V token classes; see the module docstring.

    Args:
        num_classes: V, the vocabulary; the mask is token id V.
        schedule: alpha_t, the probability a token is unmasked at time t: ``linear`` (1 - t, MDLM's
            log-linear noise) or ``cosine`` (cos(pi t / 2)).
        eps: the smallest training time (w(t) grows as 1 / t near 0).
        block_size: tokens per block of block diffusion (None: the whole sequence is one block,
            plain masked diffusion). ``loss``, ``nll`` and ``sample`` take ``block_size=`` to
            override it per call (a network trained on both may be used either way).
    """

    def __init__(self, num_classes: int, schedule: str = "linear", *, eps: float = 1e-3,
                 block_size: Optional[int] = None) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not 0 < eps < 1:
            raise ValueError(f"eps must lie in (0, 1), got {eps}")
        self.num_classes = num_classes
        self.schedule = schedule
        self.eps = float(eps)
        self.block_size = _check_block_size(block_size)

    @property
    def mask_id(self) -> int:
        return self.num_classes

    @property
    def config(self) -> dict:
        return {"class": "MaskedDiffusion", "diffkit_version": _version, "num_classes": self.num_classes,
                "schedule": self.schedule, "eps": self.eps, "block_size": self.block_size}

    @classmethod
    def from_config(cls, config: dict) -> "MaskedDiffusion":
        if not isinstance(config, dict) or config.get("class") != "MaskedDiffusion":
            found = config.get("class") if isinstance(config, dict) else type(config).__name__
            raise ValueError(f"not a MaskedDiffusion config (class {found!r}); a Gaussian diffusion checkpoint "
                             "loads with diffkit.Diffusion.from_config")
        return cls(int(config["num_classes"]), config.get("schedule", "linear"), eps=float(config.get("eps", 1e-3)),
                   block_size=config.get("block_size"))

    def __repr__(self) -> str:
        blocks = "" if self.block_size is None else f", block_size={self.block_size}"
        return f"MaskedDiffusion(num_classes={self.num_classes}, schedule={self.schedule!r}{blocks})"

    def _blocks(self, block_size, length: int) -> Optional[int]:
        """The block size a call uses: its own, else the diffusion's; None when one block covers the sequence."""
        size = self.block_size if block_size is _DEFAULT else _check_block_size(block_size)
        return None if size is None or size >= length else size

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_t: the probability that a token is still itself at time t."""
        return _alpha(self.schedule, torch.as_tensor(t, dtype=torch.float64))

    # ------------------------------------------------------------------ forward process
    def _check_tokens(self, x0: torch.Tensor, name: str = "x0") -> torch.Tensor:
        if not torch.is_tensor(x0) or x0.dtype not in (torch.int64, torch.int32) or x0.ndim != 2:
            raise ValueError(f"{name} must be a (B, L) integer tensor of token ids")
        if x0.numel() and (int(x0.min()) < 0 or int(x0.max()) >= self.num_classes):
            raise ValueError(f"{name} holds ids outside [0, {self.num_classes - 1}] (the mask id {self.mask_id} "
                             "is not a data token)")
        return x0.long()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x_t: each token of x0 (B, L) masked with probability 1 - alpha_t, for per-example times t (B,)."""
        keep = self.alpha(t).to(x0.device, torch.float32)[:, None]
        u = torch.rand(x0.shape, generator=generator, device=generator.device if generator else x0.device)
        return torch.where(u.to(x0.device) < keep, x0, torch.full_like(x0, self.mask_id))

    def _draw_times(self, batch: int, generator, device) -> torch.Tensor:
        # Stratified (low-discrepancy) times: one uniform offset, B evenly spaced draws (MDLM).
        u = torch.rand((), generator=generator, device=generator.device if generator else device).to(device)
        t = (u + torch.arange(batch, device=device) / batch) % 1.0
        return self.eps + (1 - self.eps) * t.double()

    def _masked_nll(self, model, x0, t, counted, generator, cond, blocks) -> torch.Tensor:
        """Per example: w(t) * sum over masked counted positions of -log p_theta(x0 | x_t), nats.
        With blocks, every block is noised at the same t and read beside the clean earlier
        blocks (``context``): one draw of each block's bound, summed."""
        x_t = self.q_sample(x0, t, generator)
        if counted is not None:
            x_t = torch.where(counted, x_t, x0)  # positions that do not count are given clean
        if blocks is not None:
            cond = {**cond, "context": x0}
        logits = model(x_t, t.to(x0.device, torch.float32), **cond)
        if logits.shape != (*x0.shape, self.num_classes):
            raise ValueError(f"the model returned shape {tuple(logits.shape)} for tokens {tuple(x0.shape)}; it must "
                             f"return logits (B, L, V) with V = {self.num_classes}")
        ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")
        masked = x_t == self.mask_id
        return _weight(self.schedule, t).to(ce)[:, None].mul(torch.where(masked, ce, 0.0)).sum(dim=1)

    def _counted(self, mask, x0) -> Optional[torch.Tensor]:
        if mask is None:
            return None
        mask = torch.as_tensor(mask, device=x0.device)
        if mask.dtype != torch.bool or mask.shape != x0.shape:
            raise ValueError(f"mask must be a bool tensor of the tokens' shape {tuple(x0.shape)} (True = counts)")
        if (mask.sum(dim=1) == 0).any():
            raise ValueError("mask leaves no token to count in some example")
        return mask

    def loss(self, model: Callable[..., torch.Tensor], x0: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
             generator: Optional[torch.Generator] = None, cond_drop_prob: float = 0.0, block_size=_DEFAULT,
             **cond) -> torch.Tensor:
        """The negative ELBO per counted token, averaged over the batch (nats); ``mask`` marks the
        tokens that count (padding False: given clean, never masked, not scored)."""
        x0 = self._check_tokens(x0)
        blocks = self._blocks(block_size, x0.shape[1])
        counted = self._counted(mask, x0)
        t = self._draw_times(x0.shape[0], generator, x0.device)
        if cond_drop_prob > 0:
            gen_device = generator.device if generator is not None else x0.device
            drop = torch.rand(x0.shape[0], generator=generator, device=gen_device).to(x0.device) < cond_drop_prob
            cond = {**cond, "drop_cond": drop}
        nats = self._masked_nll(model, x0, t, counted, generator, cond, blocks)
        tokens = counted.sum(dim=1) if counted is not None else torch.full_like(nats, x0.shape[1])
        return (nats / tokens).mean()

    @torch.no_grad()
    def nll(self, model: Callable[..., torch.Tensor], x0: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
            samples: int = 16, generator: Optional[torch.Generator] = None, return_terms: bool = False,
            block_size=_DEFAULT, **cond):
        """The continuous-time bound on -log2 p(x0) per counted token, one value per example,
        averaged over ``samples`` stratified time draws. ``terms``: ``stderr`` (of the batch mean,
        over examples) and ``mc_stderr`` (the Monte-Carlo part: the spread of the time draws)."""
        x0 = self._check_tokens(x0)
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive integer, got {samples!r}")
        counted = self._counted(mask, x0)
        blocks = self._blocks(block_size, x0.shape[1])
        draws = []
        for _ in range(samples):
            t = self._draw_times(x0.shape[0], generator, x0.device)
            draws.append(self._masked_nll(model, x0, t, counted, generator, cond, blocks))
        draws = torch.stack(draws, dim=1).double()
        tokens = (counted.sum(dim=1) if counted is not None else torch.full((x0.shape[0],), x0.shape[1])).double()
        bits = draws.mean(dim=1) / tokens.to(draws.device) / LOG2
        if not return_terms:
            return bits
        mc = (draws.std(dim=1) / math.sqrt(samples) / tokens.to(draws.device) / LOG2) if samples > 1 else None
        return bits, {"stderr": Estimate.of(bits).stderr,
                      "mc_stderr": None if mc is None else float(mc.pow(2).mean().sqrt() / math.sqrt(len(bits))),
                      "tokens": tokens}

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, model: Callable[..., torch.Tensor], shape: Sequence[int], *, steps: int = 64,
               sampler: str = "ancestral", generator: Optional[torch.Generator] = None,
               known: Optional[torch.Tensor] = None, known_mask: Optional[torch.Tensor] = None,
               fill: Optional[torch.Tensor] = None, guidance_scale: float = 1.0,
               sampling: TokenSampling = TokenSampling(), confidence_noise: float = 0.0,
               confidence_threshold: Optional[float] = None, block_size=_DEFAULT, stop_id: Optional[int] = None,
               callback: Optional[Callable[[dict], None]] = None, device=None, **cond) -> torch.Tensor:
        """Token ids (B, L) drawn from ``model`` in ``steps`` steps (per block with block diffusion).

        ``known`` (B, L) ids with ``known_mask`` (B, L) bool: given tokens (infilling), never
        masked. ``fill`` (B, L) bool: the positions to generate (default all but the known ones);
        positions neither known nor filled keep ``known``'s value there (padding). ``guidance_scale``
        w mixes log-probabilities, log p_u + w (log p_c - log p_u) (the model must accept
        ``drop_cond``). ``sampling`` (:class:`TokenSampling`): temperature and top-p.
        ``stop_id`` (block diffusion): stop after the block in which every row has drawn this
        token; the blocks not drawn stay ``mask_id``. ``callback`` sees {"step", "t", "x",
        "calls"} after every step.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        guidance_scale = check_guidance_scale(guidance_scale)
        if not isinstance(sampling, TokenSampling):
            raise TypeError("sampling must be a TokenSampling(temperature, top_p)")
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"shape must be (batch, length) with positive sizes, got {shape}")
        blocks = self._blocks(block_size, shape[1])
        if confidence_threshold is not None and (sampler != "confidence" or isinstance(confidence_threshold, bool)
                                                 or not 0 < confidence_threshold <= 1):
            raise ValueError(f"confidence_threshold is a probability in (0, 1] for the confidence sampler, got "
                             f"{confidence_threshold!r} with sampler {sampler!r}")
        if stop_id is not None and not 0 <= stop_id < self.num_classes:
            raise ValueError(f"stop_id must be a token id in [0, {self.num_classes - 1}], got {stop_id!r}")
        if device is None:
            try:
                device = next(model.parameters()).device
            except (AttributeError, StopIteration):
                device = torch.device("cpu")
        x = self._start(shape, known, known_mask, fill, device)
        generate = x == self.mask_id
        run = _Denoising(self, sampler, steps, sampling, confidence_noise, confidence_threshold, generator,
                         generator.device if generator is not None else torch.device(device), callback)
        rows = shape[0] * (1 if guidance_scale == 1.0 else 2)
        cond = _cfg_cond(cond, guidance_scale, shape[0])
        if blocks is None:
            def call(x_t, tt, which):
                return model(x_t, tt, **_rows_of(cond, which, rows))
            return run(x, generate, _guided(call, guidance_scale, shape[0]))
        cache = _block_cache(model, rows, cond)
        for begin in range(0, shape[1], blocks):
            part = slice(begin, min(begin + blocks, shape[1]))
            x[:, part] = run(x[:, part], generate[:, part], _guided(cache.logits, guidance_scale, shape[0]))
            if part.stop == shape[1] or stop_id is not None and bool((x[:, : part.stop] == stop_id).any(dim=1).all()):
                break
            cache.commit(x[:, part] if guidance_scale == 1.0 else torch.cat([x[:, part], x[:, part]]))
        return x

    def _start(self, shape, known, known_mask, fill, device) -> torch.Tensor:
        """The all-mask start with the known tokens (and the positions not to fill) written in."""
        x = torch.full(shape, self.mask_id, dtype=torch.long, device=device)
        if (known is None) != (known_mask is None) and fill is None:
            raise ValueError("give known= (ids) and known_mask= (where they hold) together")
        if known is not None:
            known = self._check_tokens(torch.as_tensor(known, device=device).expand(shape).clone(), "known")
        if known_mask is not None:
            known_mask = torch.as_tensor(known_mask, device=device, dtype=torch.bool).expand(shape)
            x = torch.where(known_mask, known, x)
        if fill is not None:
            fill = torch.as_tensor(fill, device=device, dtype=torch.bool).expand(shape)
            if known is None:
                raise ValueError("fill= leaves the other positions as given: pass known= ids for them")
            x = torch.where(fill, x, known)
        return x


class BlockCache(Protocol):
    """What a block-diffusion network may offer as ``model.block_cache(batch, **cond)``: the clean
    blocks so far kept as keys and values, so each call reads only the block being drawn."""

    def logits(self, x_block: torch.Tensor, t: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, b, V) logits of the next block's partly masked tokens, given every committed block;
        with ``rows`` (indices into the batch) only those rows' (x_block holds just them)."""

    def commit(self, x_block: torch.Tensor) -> None:
        """Append a finished (clean) block to the prefix."""


class _PrefixCache:
    """The :class:`BlockCache` of a network without one: the whole prefix is read at every call."""

    def __init__(self, model, cond, batch):
        self.model, self.cond, self.batch, self.prefix = model, cond, batch, None

    def logits(self, x_block, t, rows=None):
        prefix = self.prefix if self.prefix is None or rows is None else self.prefix[rows]
        x = x_block if prefix is None else torch.cat([prefix, x_block], dim=1)
        return self.model(x, t, context=x, **_rows_of(self.cond, rows, self.batch))[:, -x_block.shape[1]:]

    def commit(self, x_block):
        self.prefix = x_block.clone() if self.prefix is None else torch.cat([self.prefix, x_block], dim=1)


def _block_cache(model, batch: int, cond: dict):
    make = getattr(model, "block_cache", None)
    return make(batch, **cond) if callable(make) else _PrefixCache(model, cond, batch)


def _cfg_cond(cond: dict, guidance_scale: float, batch: int) -> dict:
    """The conditions of a guided batch: each row twice, the second copy with its condition dropped."""
    if guidance_scale == 1.0:
        return cond
    doubled = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.shape[:1] == (batch,) else v for k, v in cond.items()}
    device = next((v.device for v in cond.values() if torch.is_tensor(v)), None)
    return {**doubled, "drop_cond": torch.arange(2 * batch, device=device) >= batch}


def _guided(call, guidance_scale: float, batch: int):
    """``call(x_t, t, rows)`` (conditions bound in; for guidance they cover the batch twice, the
    second copy with its condition dropped, as :func:`_cfg_cond` makes them; ``rows`` None or
    indices into that batch) -> log-probabilities, mixed log p_u + w (log p_c - log p_u) in one
    batched call."""
    if guidance_scale == 1.0:
        return lambda x_t, tt, rows: torch.log_softmax(call(x_t, tt, rows).float(), -1)

    def mixed(x_t, tt, rows):
        both = None if rows is None else torch.cat([rows, rows + batch])
        c, u = torch.log_softmax(call(torch.cat([x_t, x_t]), torch.cat([tt, tt]), both).float(), -1).chunk(2)
        # A token either model rules out (-inf) stays out, where the mix itself would be NaN.
        return torch.where(torch.isfinite(c) & torch.isfinite(u), u + guidance_scale * (c - u), -math.inf)
    return mixed


def _rows_of(cond: dict, rows, batch: int) -> dict:
    """The conditions of the given rows (tensors with the batch as their first dimension)."""
    if rows is None:
        return cond
    return {k: v[rows] if torch.is_tensor(v) and v.shape[:1] == (batch,) else v for k, v in cond.items()}


class _Denoising:
    """One masked-diffusion run over given positions: the grid 1 = t_0 > ... > t_K = 0, the
    reveal rule of the sampler, and the network called only for the rows that changed since
    their last call and still hold masked positions (MDLM's caching, row by row)."""

    def __init__(self, diffusion, sampler, steps, sampling, confidence_noise, threshold, generator, gen_device,
                 callback):
        self.diffusion, self.sampler, self.steps, self.sampling = diffusion, sampler, steps, sampling
        self.confidence_noise, self.threshold = confidence_noise, threshold
        self.generator, self.gen_device, self.callback = generator, gen_device, callback
        self.times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        self.calls = 0

    def __call__(self, x: torch.Tensor, generate: torch.Tensor, log_probs) -> torch.Tensor:
        """``log_probs(x_rows, t_rows, rows)`` -> log-probabilities of those rows (``rows`` None: all)."""
        mask_id, device = self.diffusion.mask_id, x.device
        logp = seen = None
        for k in range(self.steps):
            t, s = float(self.times[k]), float(self.times[k + 1])
            masked = (x == mask_id) & generate
            active = masked.any(dim=1)
            if not active.any():
                break
            stale = active if seen is None else active & (x != seen).any(dim=1)
            if stale.any():
                rows = None if bool(stale.all()) else stale.nonzero()[:, 0]
                part = x if rows is None else x[rows]
                fresh = self.sampling.log_probs(log_probs(part, torch.full((part.shape[0],), t, device=device), rows))
                if logp is None:
                    logp = fresh if rows is None else fresh.new_zeros((*x.shape, fresh.shape[-1])).index_copy(0, rows, fresh)
                    seen = x.clone()
                elif rows is None:
                    logp, seen = fresh, x.clone()
                else:
                    logp, seen = logp.index_copy(0, rows, fresh), seen.index_copy(0, rows, x[rows])
                self.calls += 1
            a_t, a_s = float(self.diffusion.alpha(torch.tensor(t))), float(self.diffusion.alpha(torch.tensor(s)))
            reveal = (a_s - a_t) / (1.0 - a_t) if a_t < 1 else 1.0
            tokens = _draw(logp, self.generator, self.gen_device)
            if self.sampler == "ancestral":
                u = torch.rand(x.shape, generator=self.generator, device=self.gen_device).to(device)
                chosen = masked & (u < reveal)
            else:
                confidence = logp.gather(-1, tokens[..., None])[..., 0]
                chosen = _most_confident(confidence, masked, reveal, self.confidence_noise, self.generator,
                                         self.gen_device)
                if self.threshold is not None:  # every token drawn at least this surely goes in now
                    chosen |= masked & (confidence >= math.log(self.threshold))
            x = torch.where(chosen, tokens, x)
            if self.callback is not None:
                self.callback({"step": k, "t": s, "x": x, "calls": self.calls})
        return x


def _draw(logp: torch.Tensor, generator, gen_device) -> torch.Tensor:
    """A draw from each categorical of ``logp`` (..., V) by the Gumbel-max trick."""
    return (logp + _gumbel(logp.shape, generator, gen_device).to(logp.device)).argmax(dim=-1)


def _gumbel(shape, generator, device) -> torch.Tensor:
    """Standard Gumbel noise, -log(-log u)."""
    u = torch.rand(shape, generator=generator, device=device).clamp(1e-12, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def _most_confident(confidence: torch.Tensor, masked: torch.Tensor, reveal: float, noise: float,
                    generator, gen_device) -> torch.Tensor:
    """The positions to reveal: per row, round(reveal x masked count) of the masked positions
    with the highest confidence (log-probability of the drawn token, plus ``noise`` x Gumbel)."""
    if noise > 0:
        confidence = confidence + noise * _gumbel(confidence.shape, generator, gen_device).to(confidence.device)
    counts = (masked.sum(dim=1).double() * reveal).round().long()
    counts = torch.where((counts == 0) & masked.any(dim=1) & (reveal >= 1), masked.sum(dim=1), counts)
    ranked = confidence.masked_fill(~masked, -math.inf).argsort(dim=1, descending=True)
    rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(ranked.shape[1], device=ranked.device)
                                             .expand_as(ranked).contiguous())
    return masked & (rank < counts[:, None])

