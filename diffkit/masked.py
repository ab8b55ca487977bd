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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from . import __version__ as _version
from .guidance import check_guidance_scale
from .likelihood import Estimate

SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ancestral", "confidence")
LOG2 = math.log(2.0)


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
    """

    def __init__(self, num_classes: int, schedule: str = "linear", *, eps: float = 1e-3) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not 0 < eps < 1:
            raise ValueError(f"eps must lie in (0, 1), got {eps}")
        self.num_classes = num_classes
        self.schedule = schedule
        self.eps = float(eps)

    @property
    def mask_id(self) -> int:
        return self.num_classes

    @property
    def config(self) -> dict:
        return {"class": "MaskedDiffusion", "diffkit_version": _version, "num_classes": self.num_classes,
                "schedule": self.schedule, "eps": self.eps}

    @classmethod
    def from_config(cls, config: dict) -> "MaskedDiffusion":
        if not isinstance(config, dict) or config.get("class") != "MaskedDiffusion":
            found = config.get("class") if isinstance(config, dict) else type(config).__name__
            raise ValueError(f"not a MaskedDiffusion config (class {found!r}); a Gaussian diffusion checkpoint "
                             "loads with diffkit.Diffusion.from_config")
        return cls(int(config["num_classes"]), config.get("schedule", "linear"), eps=float(config.get("eps", 1e-3)))

    def __repr__(self) -> str:
        return f"MaskedDiffusion(num_classes={self.num_classes}, schedule={self.schedule!r})"

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

    def _masked_nll(self, model, x0, t, counted, generator, cond) -> torch.Tensor:
        """Per example: w(t) * sum over masked counted positions of -log p_theta(x0 | x_t), nats."""
        x_t = self.q_sample(x0, t, generator)
        if counted is not None:
            x_t = torch.where(counted, x_t, x0)  # positions that do not count are given clean
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
             generator: Optional[torch.Generator] = None, cond_drop_prob: float = 0.0, **cond) -> torch.Tensor:
        """The negative ELBO per counted token, averaged over the batch (nats); ``mask`` marks the
        tokens that count (padding False: given clean, never masked, not scored)."""
        x0 = self._check_tokens(x0)
        counted = self._counted(mask, x0)
        t = self._draw_times(x0.shape[0], generator, x0.device)
        if cond_drop_prob > 0:
            gen_device = generator.device if generator is not None else x0.device
            drop = torch.rand(x0.shape[0], generator=generator, device=gen_device).to(x0.device) < cond_drop_prob
            cond = {**cond, "drop_cond": drop}
        nats = self._masked_nll(model, x0, t, counted, generator, cond)
        tokens = counted.sum(dim=1) if counted is not None else torch.full_like(nats, x0.shape[1])
        return (nats / tokens).mean()

    @torch.no_grad()
    def nll(self, model: Callable[..., torch.Tensor], x0: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
            samples: int = 16, generator: Optional[torch.Generator] = None, return_terms: bool = False, **cond):
        """The continuous-time bound on -log2 p(x0) per counted token, one value per example,
        averaged over ``samples`` stratified time draws. ``terms``: ``stderr`` (of the batch mean,
        over examples) and ``mc_stderr`` (the Monte-Carlo part: the spread of the time draws)."""
        x0 = self._check_tokens(x0)
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive integer, got {samples!r}")
        counted = self._counted(mask, x0)
        draws = []
        for _ in range(samples):
            t = self._draw_times(x0.shape[0], generator, x0.device)
            draws.append(self._masked_nll(model, x0, t, counted, generator, cond))
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
               callback: Optional[Callable[[dict], None]] = None, device=None, **cond) -> torch.Tensor:
        """Token ids (B, L) drawn from ``model`` in ``steps`` steps.

        ``known`` (B, L) ids with ``known_mask`` (B, L) bool: given tokens (infilling), never
        masked. ``fill`` (B, L) bool: the positions to generate (default all but the known ones);
        positions neither known nor filled keep ``known``'s value there (padding). ``guidance_scale``
        w mixes log-probabilities, log p_u + w (log p_c - log p_u) (the model must accept
        ``drop_cond``). ``sampling`` (:class:`TokenSampling`): temperature and top-p.
        ``callback`` sees {"step", "t", "x", "calls"} after every step.
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
        if device is None:
            try:
                device = next(model.parameters()).device
            except (AttributeError, StopIteration):
                device = torch.device("cpu")
        gen_device = generator.device if generator is not None else torch.device(device)
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
        generate = x == self.mask_id
        times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        state = {"calls": 0, "x": None, "logp": None}

        def log_probs(x_t: torch.Tensor, t: float) -> torch.Tensor:
            if state["x"] is not None and torch.equal(state["x"], x_t):
                return state["logp"]  # nothing changed: no call (MDLM's caching)
            tt = torch.full((shape[0],), t, device=device)
            if guidance_scale == 1.0:
                logp = sampling.log_probs(model(x_t, tt, **cond))
            else:
                drop = torch.cat([torch.zeros(shape[0], dtype=torch.bool, device=device),
                                  torch.ones(shape[0], dtype=torch.bool, device=device)])
                both = model(torch.cat([x_t, x_t]), torch.cat([tt, tt]), drop_cond=drop,
                             **{k: torch.cat([v, v]) if torch.is_tensor(v) and v.shape[:1] == (shape[0],) else v
                                for k, v in cond.items()})
                c, u = torch.log_softmax(both.float(), -1).chunk(2)
                logp = sampling.log_probs(u + guidance_scale * (c - u))
            state.update(calls=state["calls"] + 1, x=x_t.clone(), logp=logp)
            return logp

        for k in range(steps):
            t, s = float(times[k]), float(times[k + 1])
            masked = (x == self.mask_id) & generate
            if not masked.any():
                break
            logp = log_probs(x, t)
            a_t, a_s = float(self.alpha(torch.tensor(t))), float(self.alpha(torch.tensor(s)))
            reveal = (a_s - a_t) / (1.0 - a_t) if a_t < 1 else 1.0
            # The Gumbel-max trick: a draw from the (tempered, nucleus) categorical.
            tokens = (logp + _gumbel(logp.shape, generator, gen_device).to(device)).argmax(dim=-1)
            if sampler == "ancestral":
                u = torch.rand(shape, generator=generator, device=gen_device).to(device)
                chosen = masked & (u < reveal)
            else:
                chosen = _most_confident(logp.gather(-1, tokens[..., None])[..., 0], masked, reveal,
                                         confidence_noise, generator, gen_device)
            x = torch.where(chosen, tokens, x)
            if callback is not None:
                callback({"step": k, "t": s, "x": x, "calls": state["calls"]})
        return x


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

