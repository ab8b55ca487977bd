"""Diffusion-LM's training objective, as a ``loss_fn`` for diffkit's Trainer.

    loss = MSE(x0_hat, EMB(w))                     the core's x0 loss at a random t, padding masked
         + ||EMB(w) - x0_hat(x_0, t=0)||^2          the embedding term at the least noisy step
         + CE(round(x_0), w)                        the tied head's rounding cross-entropy
         + ||alpha_{T-1} EMB(w)||^2                 the prior term (keeps norms from drifting up)
         + CE(p(w | x_t), w)                         a softmax head's cross-entropy at the same t

A self-conditioned network is trained as Chen et al. (2022) do: on a share of the batch it first
estimates x0 without gradient, then predicts again given that estimate; the rest of the batch
gets zeros, so the network also works when no estimate exists yet (the first sampling step).

The embeddings are learned together with the denoiser. The MSE alone would let them collapse
(all words at one point make x0 trivially easy to predict); the rounding cross-entropy keeps
words apart, and the embedding term makes the network's least-noisy prediction land on them.
Padding counts nowhere: the core masks it in the MSE, and the other terms average over real
tokens only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import diffkit

from .model import NoisyMRClassifier, TextDenoiser, rounding_loss, slot_cross_entropy, token_cross_entropy

__all__ = ["TextObjective", "ClassifierObjective", "MaskedTextObjective", "drop_slots", "unwrap"]


def unwrap(model: torch.nn.Module) -> TextDenoiser:
    """The TextDenoiser inside a DistributedDataParallel wrapper (or the model itself)."""
    net = getattr(model, "module", model)
    if not isinstance(net, TextDenoiser):
        raise TypeError(f"the text objective trains a TextDenoiser, got {type(net).__name__}")
    return net


class TextObjective:
    """``loss_fn(model, batch) -> (loss, {term: value})`` for ``diffkit.Trainer(..., loss_fn=)``.

    A batch is a dict with ``ids`` (B, L) long, ``mask`` (B, L) bool (True at real tokens) and,
    for MR-conditioned models, ``mr`` (B, S) slot codes.

    Args:
        diffusion: the diffkit.Diffusion (x0 prediction, sqrt schedule in Diffusion-LM).
        t0_fraction: share of the batch that also gets the t=0 embedding term (an extra
            forward pass on that share; Diffusion-LM's term only fires when t=0 is drawn,
            1 in T of the time, far too rarely with a small T and a short run).
        cond_drop_prob: probability of dropping the whole MR (classifier-free guidance).
        slot_drop_prob: probability of marking each MR slot "unspecified" on its own, so the
            model also learns partial conditions (``control={"food": "Italian"}`` names one).
        self_condition_prob: share of the batch that a self-conditioned network sees with its
            own first estimate (Chen et al.: 0.5).
        rounding_weight, embedding_weight, prior_weight, word_weight: weights of the extra
            terms (``word_weight``: a softmax head's cross-entropy).
    """

    def __init__(self, diffusion: diffkit.Diffusion, *, t0_fraction: float = 0.25,
                 cond_drop_prob: float = 0.1, slot_drop_prob: float = 0.3, self_condition_prob: float = 0.5,
                 rounding_weight: float = 1.0, embedding_weight: float = 1.0, prior_weight: float = 1.0,
                 word_weight: float = 1.0):
        if diffusion.prediction != "x0":
            raise ValueError(f"the text objective needs an x0-predicting diffusion (the clamping trick and the "
                             f"embedding term act on x0), got prediction={diffusion.prediction!r}")
        for name, value in (("t0_fraction", t0_fraction), ("cond_drop_prob", cond_drop_prob),
                            ("slot_drop_prob", slot_drop_prob), ("self_condition_prob", self_condition_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        self.diffusion = diffusion
        self.t0_fraction = float(t0_fraction)
        self.cond_drop_prob = float(cond_drop_prob)
        self.slot_drop_prob = float(slot_drop_prob)
        self.self_condition_prob = float(self_condition_prob)
        self.word_weight = float(word_weight)
        self.rounding_weight = float(rounding_weight)
        self.embedding_weight = float(embedding_weight)
        self.prior_weight = float(prior_weight)

    @property
    def config(self) -> dict[str, Any]:
        return {"t0_fraction": self.t0_fraction, "cond_drop_prob": self.cond_drop_prob,
                "slot_drop_prob": self.slot_drop_prob, "self_condition_prob": self.self_condition_prob,
                "rounding_weight": self.rounding_weight, "embedding_weight": self.embedding_weight,
                "prior_weight": self.prior_weight, "word_weight": self.word_weight}

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor],
                 generator: torch.Generator | None = None):
        return self.loss(model, batch, generator=generator)

    def loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor], *,
             generator: torch.Generator | None = None, t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(scalar loss, {term: batch mean}). ``t``, ``noise`` and ``generator`` fix the draws
        of the main term (tests use them to compare two batches under the same noise)."""
        net = unwrap(model)
        ids, mask = batch["ids"], batch["mask"].to(torch.bool)
        if ids.shape != mask.shape:
            raise ValueError(f"ids {tuple(ids.shape)} and mask {tuple(mask.shape)} must have the same shape")
        # Columns that are padding in every example cost compute and change nothing: drop them.
        length = max(int(mask.sum(1).max()), 1)
        ids, mask = ids[:, :length], mask[:, :length]
        if noise is not None:
            noise = noise[..., :length]
        cond: dict[str, torch.Tensor] = {"attention_mask": mask}
        if net.conditional:
            if "mr" not in batch:
                raise ValueError("this model is conditioned on meaning representations; batches need 'mr' codes")
            cond["mr"] = self._drop_slots(batch["mr"], generator)

        x0 = net.embed(ids)                      # (B, D, L); gradients reach the embeddings
        loss_mask = mask[:, None, :]             # broadcasts over the D embedding channels
        diff = self.diffusion
        call = _NetworkCall(model, net, self.self_condition_prob, generator)
        main, _ = diff.loss(call, x0, mask=loss_mask, return_terms=True, t=t, noise=noise,
                            generator=generator, cond_drop_prob=self.cond_drop_prob if net.conditional else 0.0,
                            **cond)
        words = torch.zeros((), device=x0.device)
        if call.logits is not None:
            words = token_cross_entropy(call.logits, ids, mask).mean()

        # Embedding term: the prediction from the least noisy step, on a share of the batch.
        k = max(1, round(self.t0_fraction * ids.shape[0])) if self.t0_fraction > 0 else 0
        embedding = torch.zeros((), device=x0.device)
        if k:
            part = {key: value[:k] for key, value in cond.items()}
            t0 = diff.schedule.time_of_step(torch.zeros(k, dtype=torch.float64))
            embedding, _ = diff.loss(_NetworkCall(model, net, 0.0, generator), x0[:k], mask=loss_mask[:k],
                                     return_terms=True, t=t0, generator=generator, **part)

        # Rounding: the tied head must recover each word from its embedding noised to the
        # level of the last sampling step, which is what it rounds at the end of sampling.
        alpha0, sigma0 = scales_at_step(diff, 0)
        eps = (torch.randn(x0.shape, generator=generator, device=generator.device).to(x0)
               if generator is not None else torch.randn_like(x0))
        rounding = rounding_loss(net, alpha0 * x0 + sigma0 * eps, ids, mask).mean()

        # Prior: q(x_T | x0) should be N(0, I); its mean alpha_{T-1} EMB(w) must stay near 0.
        alpha_last, _ = scales_at_step(diff, diff.num_timesteps - 1)
        real = mask[:, None, :].to(x0.dtype)
        prior = ((alpha_last * x0) ** 2 * real).sum((1, 2)) / (real.sum((1, 2)) * x0.shape[1])
        prior = prior.mean()

        total = (main + self.embedding_weight * embedding + self.rounding_weight * rounding
                 + self.prior_weight * prior + self.word_weight * words)
        # 0-dim tensors, not floats: no device sync per step (the Trainer averages and logs them).
        terms = {"mse": main.detach(), "embedding": embedding.detach(), "rounding": rounding.detach(),
                 "prior": prior.detach()}
        if call.logits is not None:
            terms["words"] = words.detach()
        return total, terms

    def _drop_slots(self, mr: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return drop_slots(mr, self.slot_drop_prob, generator)


def scales_at_step(diffusion: diffkit.Diffusion, step: int) -> tuple[float, float]:
    """(alpha, sigma) at the table's ``step`` (0 is the least noisy), on any path: a table step
    is its own time, and the flow path's step k is the time s = (k + 1) / T."""
    t = diffusion.schedule.time_of_step(torch.tensor(float(step), dtype=torch.float64))
    return float(diffusion.schedule.alpha_at(t)), float(diffusion.schedule.sigma_at(t))


def drop_slots(mr: torch.Tensor, prob: float, generator: torch.Generator | None) -> torch.Tensor:
    """Each slot becomes "unspecified" (code 0) with probability ``prob``."""
    if prob <= 0:
        return mr
    u = torch.rand(mr.shape, generator=generator, device=generator.device if generator else mr.device)
    return torch.where(u.to(mr.device) < prob, torch.zeros_like(mr), mr)


class MaskedTextObjective:
    """``loss_fn(model, batch)`` for a :class:`~modalities.text.masked_model.MaskedTextDenoiser`:
    the core's masked-diffusion bound, in one of two readings per batch.

    - Block diffusion (a share ``1 - plain_share`` of the batches): a text ends with ``end_id``
      and is scored up to the end of the block holding it, so the model learns where texts end;
      the blocks after that are not read (they lie after every counted block).
    - Plain masked diffusion (``plain_share``): only the words count and the padding after them
      is given, so the length is known, as infilling and length-conditioned sampling use it.

    Args:
        diffusion: a ``diffkit.MaskedDiffusion`` with a block size.
        end_id: the token that ends a text (the tokenizer's padding id).
        plain_share: share of batches trained as plain masked diffusion.
        cond_drop_prob, slot_drop_prob: as :class:`TextObjective`'s (classifier-free guidance
            and partial MRs).
    """

    def __init__(self, diffusion: diffkit.MaskedDiffusion, end_id: int, *, plain_share: float = 0.2,
                 cond_drop_prob: float = 0.1, slot_drop_prob: float = 0.3):
        if not isinstance(diffusion, diffkit.MaskedDiffusion) or diffusion.block_size is None:
            raise ValueError("the masked text objective needs a diffkit.MaskedDiffusion with a block_size")
        for name, value in (("plain_share", plain_share), ("cond_drop_prob", cond_drop_prob),
                            ("slot_drop_prob", slot_drop_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        self.diffusion, self.end_id = diffusion, int(end_id)
        self.plain_share, self.cond_drop_prob, self.slot_drop_prob = (float(plain_share), float(cond_drop_prob),
                                                                      float(slot_drop_prob))

    @property
    def config(self) -> dict[str, Any]:
        return {"kind": "masked", "plain_share": self.plain_share, "cond_drop_prob": self.cond_drop_prob,
                "slot_drop_prob": self.slot_drop_prob}

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor],
                 generator: torch.Generator | None = None):
        ids, mask = batch["ids"], batch["mask"].to(torch.bool)
        x0, counted, plain = self.targets(ids, mask, generator)
        cond = {}
        conditional = getattr(getattr(model, "module", model), "conditional", False)
        if conditional:
            if "mr" not in batch:
                raise ValueError("this model is conditioned on meaning representations; batches need 'mr' codes")
            cond["mr"] = drop_slots(batch["mr"], self.slot_drop_prob, generator)
        options = {"block_size": None} if plain else {}
        loss = self.diffusion.loss(model, x0, mask=counted, generator=generator,
                                   cond_drop_prob=self.cond_drop_prob if conditional else 0.0, **options, **cond)
        return loss, {"plain": float(plain)}

    def targets(self, ids: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None):
        """(x0, counted, plain): the batch trimmed (or padded with the end token) to what it reads."""
        lengths = mask.sum(1)
        device = generator.device if generator is not None else ids.device
        plain = bool(torch.rand((), generator=generator, device=device) < self.plain_share)
        if plain:
            length = max(int(lengths.max()), 1)
            ids = ids[:, :length]
            return ids, mask[:, :length], True
        block = self.diffusion.block_size
        ends = (lengths + block) // block * block  # the block holding the end token, included
        length = int(ends.max())
        if ids.shape[1] < length:  # the end token's block reaches past the encoded width
            ids = torch.nn.functional.pad(ids, (0, length - ids.shape[1]))
            mask = torch.nn.functional.pad(mask, (0, length - mask.shape[1]))
        ids = torch.where(mask[:, :length], ids[:, :length], self.end_id)
        return ids, torch.arange(length, device=ids.device)[None] < ends[:, None], False


class _NetworkCall:
    """The network as the core's loss calls it, ``(x_t, t, **cond) -> x0_hat``, doing the two
    training-only things: self-conditioning (a share ``prob`` of the batch gets the network's
    own first estimate, made without gradient, the rest zeros) and keeping a softmax head's
    logits for the cross-entropy. ``model`` (a DDP wrapper, or the network) makes the pass
    that trains, so gradients are synchronised across processes."""

    def __init__(self, model: torch.nn.Module, net: TextDenoiser, prob: float, generator: torch.Generator | None):
        self.model, self.net, self.prob, self.generator = model, net, prob, generator
        self.logits: torch.Tensor | None = None

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        kwargs = {}
        if self.net.self_conditioning:
            previous = torch.zeros_like(x_t)
            if self.prob > 0:
                device = self.generator.device if self.generator is not None else x_t.device
                chosen = (torch.rand(x_t.shape[0], generator=self.generator, device=device) < self.prob).to(x_t.device)
                if bool(chosen.any()):
                    with torch.no_grad():
                        first = self.net(x_t[chosen], t[chosen], **{k: v[chosen] for k, v in cond.items()})
                    previous[chosen] = first.to(previous.dtype)
            kwargs["x0_previous"] = previous
        x0_hat, self.logits = self.model(x_t, t, return_logits=True, **kwargs, **cond)
        return x0_hat


class ClassifierObjective:
    """``loss_fn`` training a :class:`NoisyMRClassifier` to read each MR slot from x_t.

    Inputs are the frozen word embeddings of the denoiser the classifier serves, noised to a
    uniformly drawn time of the same diffusion; the target of every slot is its code in the
    example's MR (the value, or "absent"). Batches as for :class:`TextObjective`, with ``mr``.
    """

    def __init__(self, diffusion: diffkit.Diffusion):
        self.diffusion = diffusion

    @property
    def config(self) -> dict[str, Any]:
        return {"kind": "classifier"}

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]):
        clf = getattr(model, "module", model)
        if not isinstance(clf, NoisyMRClassifier):
            raise TypeError(f"the classifier objective trains a NoisyMRClassifier, got {type(clf).__name__}")
        ids, mask, codes = batch["ids"], batch["mask"].to(torch.bool), batch["mr"]
        length = max(int(mask.sum(1).max()), 1)
        ids, mask = ids[:, :length], mask[:, :length]
        diff = self.diffusion
        t = diff.draw_times(ids.shape[0])
        x0 = clf.embed(ids)
        alpha = diff.schedule.alpha_at(t).to(x0)[:, None, None]
        sigma = diff.schedule.sigma_at(t).to(x0)[:, None, None]
        x_t = alpha * x0 + sigma * torch.randn_like(x0)
        logits = model(x_t, diff.model_time(t, alpha, sigma).to(x0.device), mask)
        per_slot = slot_cross_entropy(logits, codes, clf.mr_sizes)
        with torch.no_grad():
            accuracy = torch.stack([(block.argmax(1) == codes[:, i]).float().mean()
                                    for i, block in enumerate(logits.split(clf.mr_sizes, dim=1))]).mean()
        return per_slot.mean(), {"accuracy": accuracy}
