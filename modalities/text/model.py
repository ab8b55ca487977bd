"""The text denoiser: Diffusion-LM's continuous word embeddings and a Transformer over them.

Words become learned 16-d embeddings (Li et al., 2022): the diffusion runs in that continuous
space, the network predicts the clean embeddings x0, and a rounding head tied to the
embedding matrix turns vectors back into words. Shapes follow diffkit's model contract:

    net(x_t (B, D, L), t (B,) float, attention_mask=(B, L) bool, mr=(B, S) long, drop_cond=(B,),
        x0_previous=(B, D, L)) -> x0_hat (B, D, L)

D is the embedding width (16), L the sequence length; channels come first as for every
diffkit model. ``attention_mask`` is True at real tokens: padding is never attended to and its
output is zero, so padded positions cannot change what the network says about real ones.
With ``mr_sizes`` the network is conditioned on an E2E meaning representation: one code per
slot (see :class:`modalities.text.data.MRVocabulary`) enters as one extra token per slot in
front of the words; ``drop_cond`` turns every slot into "unspecified", the null condition
of classifier-free guidance.

Two options make a small network learn far more from a short run than Diffusion-LM's plain
regression (the shipped model against its predecessor: ``modalities/text/checkpoints/e2e/README.md``):

- ``head="softmax"`` (CDCD's score interpolation, Dieleman et al., 2022): the network
  predicts a distribution p(w | x_t) over the vocabulary at each position, trained by
  cross-entropy, and x0_hat is its mean embedding sum_w p(w) EMB(w). That is the same
  posterior mean the regression head aims at, learned from a classification signal.
- ``self_conditioning`` (Chen et al., 2022, Analog Bits): the network also reads its own
  previous x0 estimate, so each sampling step refines the last one instead of starting over.
  :class:`SelfConditioned` feeds it that estimate at sampling and likelihood time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffkit.nn import TimeEmbedding

__all__ = ["HEADS", "TextDenoiser", "SelfConditioned", "NoisyMRClassifier", "rounding_loss", "slot_cross_entropy",
           "token_cross_entropy"]

# How the network turns its last hidden state into x0_hat.
HEADS = ("regression", "softmax")


class TextDenoiser(nn.Module):
    """Token embeddings, up-projection, Transformer encoder with time conditioning, learned
    positions and optional MR tokens, down-projection, and the tied rounding head.

    Args:
        vocab_size: rows of the embedding matrix (the tokenizer's vocabulary).
        embed_dim: width of the diffused space (16 in Diffusion-LM: small enough that the
            noise destroys words quickly, large enough to keep 800 words apart).
        hidden: Transformer width; depth, heads: its layers and attention heads.
        max_length: the longest sequence (learned positions).
        mr_sizes: codes per MR slot for a conditional model, None for an unconditional one.
        dropout: dropout inside the Transformer.
        head: ``"regression"`` (Diffusion-LM: an MLP down to the embedding width outputs x0_hat)
            or ``"softmax"`` (logits over the vocabulary; x0_hat is the mean embedding).
        self_conditioning: the network also takes its previous x0 estimate (``x0_previous``).
        time_scale: multiplies the time before its sinusoidal features: 1 for a table's integer
            steps, 1000 for the flow path's times s in [0, 1] (so neighbouring times stay apart).
    """

    def __init__(self, vocab_size: int, embed_dim: int = 16, hidden: int = 128, depth: int = 4,
                 heads: int = 4, max_length: int = 64, mr_sizes: Sequence[int] | None = None,
                 dropout: float = 0.1, head: str = "regression", self_conditioning: bool = False,
                 time_scale: float = 1.0):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
        if vocab_size < 2 or embed_dim < 1 or max_length < 1 or depth < 1:
            raise ValueError(f"TextDenoiser needs vocab_size >= 2, embed_dim, depth, max_length >= 1; got "
                             f"{vocab_size}, {embed_dim}, {depth}, {max_length}")
        if hidden % heads:
            raise ValueError(f"hidden width {hidden} must be divisible by the number of heads {heads}")
        self.vocab_size, self.embed_dim, self.max_length = vocab_size, embed_dim, max_length
        self.head, self.self_conditioning = head, bool(self_conditioning)
        # Unit-variance coordinates (nn.Embedding's default init) match the diffusion's unit
        # noise, so at the end of the chain words are as hidden as the schedule intends.
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        # Diffusion-LM's input_up_proj / output_down_proj: a small MLP each way between the
        # narrow word space and the Transformer width. A self-conditioned network reads x_t and
        # its previous estimate side by side.
        inputs = embed_dim * (2 if self.self_conditioning else 1)
        self.up = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.time = TimeEmbedding(hidden, out_dim=hidden, scale=time_scale)
        self.positions = nn.Parameter(torch.randn(max_length, hidden) * 0.02)
        add_mr_slots(self, mr_sizes, hidden)
        layer = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        if head == "regression":
            self.down = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, embed_dim))
        else:
            self.word_logits = nn.Linear(hidden, vocab_size)

    # ------------------------------------------------------------------ words <-> vectors
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> clean embeddings x0 (B, D, L)."""
        return self.embedding(ids).transpose(1, 2)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The tied rounding head: (B, D, L) vectors -> (B, L, V) logits.

        The logit of word w is -||x - EMB(w)||^2 up to a per-position constant, so the most
        likely word is exactly the nearest embedding: rounding and the clamping trick agree.
        """
        weight = self.embedding.weight
        x = x.transpose(1, 2).to(weight.dtype)
        return 2 * x @ weight.t() - (weight * weight).sum(1)

    def nearest(self, x: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Ids (B, L) of the nearest embedding to each vector of x (B, D, L); ``allowed`` (V,)
        bool restricts the choice (padding and other special tokens are never generated)."""
        logits = self.logits(x)
        if allowed is not None:
            logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
        return logits.argmax(-1)

    # ------------------------------------------------------------------ denoiser
    def forward(self, x: torch.Tensor, t: torch.Tensor, attention_mask: torch.Tensor | None = None,
                mr: torch.Tensor | None = None, drop_cond: torch.Tensor | None = None,
                x0_previous: torch.Tensor | None = None, return_logits: bool = False,
                temperature: float = 1.0, repeat_penalty: float = 0.0):
        """x0_hat (B, D, L); with ``return_logits`` the pair (x0_hat, logits (B, L, V)) of a
        softmax head (logits None for a regression head). ``x0_previous`` (B, D, L) is the
        previous estimate of a self-conditioned network (None: zeros, "no estimate yet").

        ``temperature`` (softmax head only) sharpens the word distribution that x0_hat averages:
        x0_hat = sum_w softmax(logits / temperature)_w EMB(w). Below 1 each position leans
        towards its likelier words, a sampling choice (the returned logits, the training
        target and the likelihood bound all stay at temperature 1).

        ``repeat_penalty`` (softmax head only, sampling only) discourages the same word at
        neighbouring positions, the commonest visible defect of embedding diffusion ("Italian
        Italian"; human E2E text has it in 0.2% of sentences): the word distribution q_i of
        position i becomes softmax(logits_i / temperature - penalty (q_{i-1} + q_{i+1})), two
        mean-field passes of a chain that prices equal neighbours at ``repeat_penalty`` nats."""
        batch, dim, length = x.shape
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if temperature != 1.0 and self.head != "softmax":
            raise ValueError(f"temperature sharpens a softmax head's word distribution; this {self.head}-head "
                             "model predicts x0 directly (leave temperature at 1)")
        if not 0 <= repeat_penalty < float("inf"):
            raise ValueError(f"repeat_penalty must be a finite number >= 0, got {repeat_penalty}")
        if repeat_penalty and self.head != "softmax":
            raise ValueError(f"repeat_penalty reshapes a softmax head's word distribution; this {self.head}-head "
                             "model predicts x0 directly (leave it at 0)")
        dtype = x.dtype
        if dim != self.embed_dim:
            raise ValueError(f"expected x of shape (B, {self.embed_dim}, L), got {tuple(x.shape)}")
        if length > self.max_length:
            raise ValueError(f"sequence length {length} exceeds this model's max_length {self.max_length}")
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.bool, device=x.device)
        elif attention_mask.shape != (batch, length):
            raise ValueError(f"attention_mask must be (B, L) = {(batch, length)}, got {tuple(attention_mask.shape)}")
        attention_mask = attention_mask.to(torch.bool)
        if self.self_conditioning:
            if x0_previous is None:
                x0_previous = torch.zeros_like(x)
            elif x0_previous.shape != x.shape:
                raise ValueError(f"x0_previous must have the shape of x {tuple(x.shape)}, got {tuple(x0_previous.shape)}")
            x = torch.cat([x, x0_previous.to(x.dtype)], dim=1)
        elif x0_previous is not None:
            raise ValueError("this text model is not self-conditioned; it takes no x0_previous")

        h = self.up(x.transpose(1, 2)) + self.positions[:length]
        time = self.time(t)[:, None]
        h = h + time
        keep = attention_mask
        if self.mr_sizes:
            cond = mr_slot_tokens(self, batch, mr, drop_cond, x.device) + time
            h = torch.cat([cond, h], dim=1)
            keep = torch.cat([torch.ones(batch, cond.shape[1], dtype=torch.bool, device=x.device), attention_mask],
                             dim=1)
        elif mr is not None:
            raise ValueError("this text model is unconditional; it takes no mr (meaning representation)")
        elif not bool(attention_mask.any(1).all()):
            raise ValueError("every example needs at least one real token (attention_mask all False)")
        h = self.encoder(h, src_key_padding_mask=~keep)
        h = self.norm(h[:, -length:])
        if self.head == "regression":
            # where, not a product: whatever a fused attention kernel leaves at padded positions
            # (NaN included) must not leak into the output.
            out = torch.where(attention_mask[..., None], self.down(h), 0.0).transpose(1, 2).to(dtype)
            return (out, None) if return_logits else out
        logits = self.word_logits(h)
        out = self.average_embedding(logits.float() / temperature, attention_mask, repeat_penalty).to(dtype)
        return (out, logits) if return_logits else out

    def average_embedding(self, scores: torch.Tensor, attention_mask: torch.Tensor,
                          repeat_penalty: float = 0.0) -> torch.Tensor:
        """x0_hat (B, D, L) = sum_w q_w EMB(w), q = softmax(``scores`` (B, L, V)) at each position
        (with ``repeat_penalty``, see :meth:`forward`); zero at padding."""
        out = _word_distribution(scores, attention_mask, repeat_penalty) @ self.embedding.weight.float()
        return torch.where(attention_mask[..., None], out, 0.0).transpose(1, 2)

    def guided(self, x: torch.Tensor, t: torch.Tensor, scale: float, *, mr: torch.Tensor,
               attention_mask: torch.Tensor | None = None, x0_previous: torch.Tensor | None = None,
               temperature: float = 1.0, repeat_penalty: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifier-free guidance towards ``mr``, mixed where a softmax head should mix: on the
        word logits, x0_hat = sum_w softmax((l_u + scale (l_c - l_u)) / temperature)_w EMB(w),
        with l_c, l_u each position's logits with the MR kept and dropped. The usual mix of the
        two x0 estimates extrapolates averages of embeddings out of their hull, towards no word;
        this one stays a word distribution, sharpened towards the words the MR makes likelier.
        A regression head has no logits and mixes its x0 estimates.

        One call on the doubled batch (conditional half first). ``x0_previous`` (2B, D, L) or
        None: the two halves' previous estimates (self-conditioning). Returns (x0_hat (B, D, L),
        each half's own estimate (2B, D, L), what the next self-conditioned call takes).
        """
        batch = x.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones(batch, x.shape[2], dtype=torch.bool, device=x.device)
        drop = torch.arange(2 * batch, device=x.device) >= batch
        both, logits = self(torch.cat([x, x]), torch.cat([t, t]), attention_mask=torch.cat([attention_mask] * 2),
                            mr=torch.cat([mr, mr]), drop_cond=drop, x0_previous=x0_previous, return_logits=True,
                            temperature=temperature, repeat_penalty=repeat_penalty)
        if logits is None:
            conditional, unconditional = both.chunk(2)
            return unconditional + scale * (conditional - unconditional), both
        conditional, unconditional = logits.float().chunk(2)
        mixed = unconditional + scale * (conditional - unconditional)
        x0 = self.average_embedding(mixed / temperature, attention_mask.to(torch.bool), repeat_penalty)
        return x0.to(x.dtype), both

    @property
    def conditional(self) -> bool:
        return bool(self.mr_sizes)


def add_mr_slots(module: nn.Module, mr_sizes: Sequence[int] | None, hidden: int) -> None:
    """Give a network MR slot tokens (``mr_sizes``: codes per slot; None: unconditional): one
    embedding table for every slot's codes, offsets picking each slot's rows, and a learned
    embedding per slot. Code 0 of each slot ("unspecified") is its null embedding."""
    module.mr_sizes = list(mr_sizes) if mr_sizes else None
    if module.mr_sizes:
        module.mr_values = nn.Embedding(sum(module.mr_sizes), hidden)
        module.mr_slots = nn.Parameter(torch.randn(len(module.mr_sizes), hidden) * 0.02)
        module.register_buffer("mr_offsets", torch.tensor([0, *module.mr_sizes[:-1]]).cumsum(0), persistent=False)
        module.register_buffer("mr_limits", torch.tensor(module.mr_sizes), persistent=False)


def mr_slot_tokens(module: nn.Module, batch: int, mr: torch.Tensor | None, drop_cond: torch.Tensor | None,
                   device) -> torch.Tensor:
    """(B, S, hidden) slot tokens of a network made with :func:`add_mr_slots`; ``mr`` None means
    every slot unspecified (the unconditional model), ``drop_cond`` turns a row's slots to that."""
    if mr is None:
        mr = torch.zeros(batch, len(module.mr_sizes), dtype=torch.long, device=device)
    if mr.shape != (batch, len(module.mr_sizes)):
        raise ValueError(f"mr must be (B, {len(module.mr_sizes)}) slot codes, got {tuple(mr.shape)}")
    if bool(((mr < 0) | (mr >= module.mr_limits)).any()):
        raise ValueError(f"mr codes must lie in [0, size) per slot, sizes {module.mr_sizes}; "
                         "encode MRs with MRVocabulary.encode")
    if drop_cond is not None:
        mr = torch.where(drop_cond.to(torch.bool)[:, None], torch.zeros_like(mr), mr)
    return module.mr_values(mr + module.mr_offsets) + module.mr_slots


def _word_distribution(scores: torch.Tensor, attention_mask: torch.Tensor, repeat_penalty: float) -> torch.Tensor:
    """softmax(scores) (B, L, V) per position, with ``repeat_penalty`` on each neighbour's
    distribution (see :meth:`TextDenoiser.forward`); padding neither has nor casts a penalty."""
    probs = scores.softmax(-1)
    if not repeat_penalty:
        return probs
    real = attention_mask[..., None].to(probs.dtype)
    for _ in range(2):
        probs = probs * real
        neighbours = torch.zeros_like(probs)
        neighbours[:, 1:] += probs[:, :-1]
        neighbours[:, :-1] += probs[:, 1:]
        probs = (scores - repeat_penalty * neighbours).softmax(-1)
    return probs


GUIDANCE_MIXES = ("logits", "x0")


def check_guidance_mix(mix) -> str:
    if mix not in GUIDANCE_MIXES:
        raise ValueError(f"guidance_mix must be one of {', '.join(map(repr, GUIDANCE_MIXES))}, got {mix!r}")
    return mix


class WordOptions:
    """A :class:`TextDenoiser` without self-conditioning as the core's ``model(x, t, **cond)``,
    with the word ``temperature`` and ``repeat_penalty`` of a sampling run and classifier-free
    guidance mixed as ``guidance_mix`` says (see :class:`SelfConditioned`)."""

    def __init__(self, net: TextDenoiser, *, temperature: float = 1.0, repeat_penalty: float = 0.0,
                 guidance_mix: str = "logits"):
        self.net, self.word_options = net, {"temperature": temperature, "repeat_penalty": repeat_penalty}
        if check_guidance_mix(guidance_mix) == "x0":
            self.classifier_free_guidance = None  # the core mixes

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.net(x, t, **self.word_options, **cond)

    def classifier_free_guidance(self, x: torch.Tensor, t: torch.Tensor, scale: float, **cond) -> torch.Tensor:
        return self.net.guided(x, t, scale, **self.word_options, **cond)[0]


class SelfConditioned:
    """A self-conditioned :class:`TextDenoiser` as the plain ``model(x, t, **cond) -> x0_hat``
    the core's sampler and bound call.

    ``chain=True`` (sampling): each call is conditioned on the previous call's estimate, which
    is how the network was trained to be used; the first call, or one of another shape (a new
    sample), gets zeros, except where guidance doubles or halves the batch (see
    :meth:`_previous_for`). ``chain=False`` (the likelihood bound, where every call
    stands alone): two passes at the same x_t, the first's estimate feeding the second. Either
    way x0_hat is a function of the sampler's states, so the sampler and the bound stay exact.
    Use one instance per sampling run. ``temperature`` and ``repeat_penalty`` shape the
    network's word distribution (sampling only; the bound needs 1 and 0).

    ``guidance_mix`` says where classifier-free guidance mixes the conditional and unconditional
    predictions: ``"logits"`` (:meth:`TextDenoiser.guided`, through the core's
    ``classifier_free_guidance`` hook) or ``"x0"`` (the core's own mix of the x0 estimates).
    """

    def __init__(self, net: TextDenoiser, *, chain: bool = True, temperature: float = 1.0,
                 repeat_penalty: float = 0.0, guidance_mix: str = "logits"):
        if not net.self_conditioning:
            raise ValueError("SelfConditioned wraps a self-conditioned TextDenoiser (self_conditioning=True)")
        self.net, self.chain = net, chain
        self.word_options: dict[str, float] = {}  # only what differs from the network's own distribution
        if temperature != 1.0:
            self.word_options["temperature"] = temperature
        if repeat_penalty:
            self.word_options["repeat_penalty"] = repeat_penalty
        if check_guidance_mix(guidance_mix) == "x0":
            self.classifier_free_guidance = None  # the core mixes
        self.previous: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        cond = {**self.word_options, **cond}
        if not self.chain:
            return self.net(x, t, x0_previous=self.net(x, t, **cond).detach(), **cond)
        out = self.net(x, t, x0_previous=self._previous_for(x), **cond)
        self.previous = out.detach()
        return out

    def classifier_free_guidance(self, x: torch.Tensor, t: torch.Tensor, scale: float, **cond) -> torch.Tensor:
        """Guidance mixed on the word logits (:meth:`TextDenoiser.guided`); each half of the
        doubled batch carries its own estimate on, as with the core's mix."""
        previous = self._previous_for(torch.cat([x, x])) if self.chain else None
        out, both = self.net.guided(x, t, scale, x0_previous=previous, **{**self.word_options, **cond})
        self.previous = both.detach()
        return out

    def _previous_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The last estimate, fitted to this call's batch. Classifier-free guidance calls the
        network on a doubled batch (the core puts the conditional half first), so where a
        guidance interval starts or ends the batch doubles or halves within one sample: the
        estimate carries over (both halves continue it; the conditional half goes on alone).
        Any other change of shape is a new sample, which starts from zeros."""
        previous = self.previous
        if previous is None or previous.shape[1:] != x.shape[1:]:
            return None
        if previous.shape[0] == x.shape[0]:
            return previous
        if previous.shape[0] == 2 * x.shape[0]:
            return previous[: x.shape[0]]
        if 2 * previous.shape[0] == x.shape[0]:
            return torch.cat([previous, previous])
        return None


class NoisyMRClassifier(nn.Module):
    """p(slot value | x_t, t) for every E2E slot, read from noisy word embeddings: the
    classifier of Diffusion-LM's plug-and-play control.

    It works in the embedding space of one denoiser: ``embedding`` (V, D) is a frozen copy of
    that denoiser's word embeddings, used to make training inputs and to check at sampling
    time that classifier and denoiser belong together.

    ``forward(x_t (B, D, L), t (B,), attention_mask (B, L)) -> logits (B, sum(mr_sizes))``,
    one block of logits per slot (codes as in :class:`modalities.text.data.MRVocabulary`).
    ``time_scale`` is its denoiser's (the times it is told are the denoiser's).
    """

    def __init__(self, vocab_size: int, embed_dim: int, mr_sizes: Sequence[int], hidden: int = 128,
                 depth: int = 2, heads: int = 4, max_length: int = 64, dropout: float = 0.1,
                 time_scale: float = 1.0):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden width {hidden} must be divisible by the number of heads {heads}")
        self.embed_dim, self.max_length, self.mr_sizes = embed_dim, max_length, list(mr_sizes)
        self.register_buffer("embedding", torch.zeros(vocab_size, embed_dim))
        self.up = nn.Sequential(nn.Linear(embed_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.time = TimeEmbedding(hidden, out_dim=hidden, scale=time_scale)
        self.positions = nn.Parameter(torch.randn(max_length, hidden) * 0.02)
        layer = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, sum(self.mr_sizes))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) -> clean embeddings (B, D, L) of the denoiser this classifier serves."""
        return self.embedding[ids].transpose(1, 2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, dim, length = x.shape
        if dim != self.embed_dim or length > self.max_length:
            raise ValueError(f"expected x of shape (B, {self.embed_dim}, L <= {self.max_length}), got {tuple(x.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.bool, device=x.device)
        h = self.up(x.transpose(1, 2)) + self.positions[:length] + self.time(t)[:, None]
        h = self.norm(self.encoder(h, src_key_padding_mask=~attention_mask))
        # Mean over real tokens only: padding says nothing about the content.
        weights = attention_mask[..., None].to(h.dtype)
        pooled = (h * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.head(pooled)

    def log_prob(self, x: torch.Tensor, t: torch.Tensor, codes: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """sum over slots with a code > 0 of log p(code | x_t, t): one value per example (B,).
        Code 0 (unspecified) leaves a slot out."""
        logits = self(x, t, attention_mask).float()
        total = torch.zeros(x.shape[0], device=x.device)
        for slot, block in enumerate(logits.split(self.mr_sizes, dim=1)):
            code = codes[:, slot]
            picked = block.log_softmax(1).gather(1, code.clamp(min=0)[:, None])[:, 0]
            total = total + torch.where(code > 0, picked, torch.zeros_like(picked))
        return total


def slot_cross_entropy(logits: torch.Tensor, codes: torch.Tensor, mr_sizes: Sequence[int]) -> torch.Tensor:
    """Cross-entropy (nats) of each slot's logits against its code, batch-averaged: (S,)."""
    return torch.stack([F.cross_entropy(block.float(), codes[:, slot])
                        for slot, block in enumerate(logits.split(list(mr_sizes), dim=1))])


def token_cross_entropy(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (nats) of logits (B, L, V) against ids (B, L), averaged over the real
    tokens of each example (``mask`` True): one value per example (B,)."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none")
    mask = mask.to(ce.dtype)
    return (ce * mask).sum(1) / mask.sum(1).clamp(min=1)


def rounding_loss(net: TextDenoiser, x: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (nats) of the tied head at real tokens, one value per example (B,)."""
    return token_cross_entropy(net.logits(x), ids, mask)
