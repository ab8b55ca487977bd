"""The text modality: Diffusion-LM-style generation, infilling and control, as lists of strings.

    import diffkit
    texts = diffkit.generate(modality="text", num_samples=16, seed=0)
    texts = diffkit.generate(modality="text", control={"food": "Italian", "area": "riverside"})
    texts = diffkit.generate(modality="text", infill="The Eagle is a [MASK] [MASK] in the city centre .")

Sampling is the core's: ``Diffusion.sample`` with its solvers, and three wrappers do what
Diffusion-LM adds: ``X0Transform`` snaps every x0 prediction to the nearest word embedding
(the clamping trick), ``KnownValues`` holds the given words of an infilling template at their
embeddings, and classifier-free guidance (the core's ``guidance_scale``) steers an
MR-conditioned model towards ``control``. At the end each vector is rounded to the nearest
embedding by the tied head.

Lengths are the modality's job, never the user's: a sample's length is drawn from the training
data's length distribution (or set with ``length=``), an infilling template fixes it, and the
positions after it are padding that the network does not attend to.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

import diffkit
from diffkit.frontdoor import LoadedModel, SamplingDefaults, cached_loader
from diffkit.guidance import (
    GradientGuidance,
    KnownValues,
    StateHook,
    X0Transform,
    check_guidance_interval,
    check_guidance_scale,
)
from diffkit.runs import add_guidance_interval_argument, resolve_steps, seeded_generator

from .data import SLOTS, MRVocabulary
from .masked_model import MaskedTextDenoiser
from .model import (
    GUIDANCE_MIXES,
    NoisyMRClassifier,
    SelfConditioned,
    TextDenoiser,
    WordOptions,
    check_guidance_mix,
    rounding_loss,
)
from .objective import scales_at_step
from .ranking import RANKINGS, SELECT_AT, CandidateChoice, choose_candidates
from .tokenizer import MASK, TOKENIZER_FILE, TextTokenizer

__all__ = [
    "CHECKPOINTS_DIR",
    "DEFAULT_CHECKPOINT",
    "EMBEDDING_CHECKPOINT",
    "TextModality",
    "TextModel",
    "load_text_model",
    "load_classifier",
    "generate_text",
    "sample_ids",
    "sample_best_of",
    "TextSampling",
    "RowConditions",
    "nll_per_token",
    "parse_control",
    "save_text",
]

CHECKPOINTS_DIR = Path(__file__).parent / "checkpoints"
# The default is the masked (block-diffusion) model: on the goals of benchmarks/text_routes.py it
# writes the more fluent text at a fraction of the embedding model's time (modalities/text/README.md).
DEFAULT_CHECKPOINT = CHECKPOINTS_DIR / "e2e-masked"
EMBEDDING_CHECKPOINT = CHECKPOINTS_DIR / "e2e"

# The classes a checkpoint may name: a fixed table, so a checkpoint never chooses what runs.
NETWORKS = {"modalities.text.model.TextDenoiser": TextDenoiser,
            "modalities.text.masked_model.MaskedTextDenoiser": MaskedTextDenoiser}
CLASSIFIERS = {"modalities.text.model.NoisyMRClassifier": NoisyMRClassifier}
CONTROL_METHODS = ("gradient", "adagrad")



@dataclass(frozen=True)
class TextSamplingDefaults(SamplingDefaults):
    """The text route's defaults where a checkpoint records none. Checkpoints from before guidance
    could mix on the word logits had their scale tuned for the x0 mix."""

    guidance_mix: str = "x0"
    classifier_scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.guidance_mix not in GUIDANCE_MIXES:
            raise ValueError(f"guidance_mix must be one of {', '.join(GUIDANCE_MIXES)}, got {self.guidance_mix!r}")


FALLBACKS = TextSamplingDefaults(sampler="ddim", steps=50, guidance_scale=2.0)

_MASK_RE = re.compile(re.escape(MASK))


# ---------------------------------------------------------------------------------- loading
@dataclass
class TextModel(LoadedModel):
    """A loaded text checkpoint: network (EMA weights), diffusion, tokenizer and metadata."""

    tokenizer: TextTokenizer = None
    fallbacks: ClassVar[SamplingDefaults] = FALLBACKS

    @property
    def max_length(self) -> int:
        return self.net.max_length

    @property
    def route(self) -> str:
        """``"masked"`` for a masked-diffusion checkpoint, ``"embedding"`` for Diffusion-LM's route."""
        return "masked" if isinstance(self.diffusion, diffkit.MaskedDiffusion) else "embedding"

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def mr_vocab(self) -> MRVocabulary | None:
        values = self.info.get("mr_values")
        return MRVocabulary.from_config(values) if values else None

    @property
    def default_clamp(self) -> bool:
        """Whether sampling uses the clamping trick unless told: as recorded, else on for a
        regression head (it keeps a blurry x0 on the words) and off for a softmax head, whose
        x0 already weighs the words by their probability (snapping it throws that away: the
        4,000-step model's judge perplexity at temperature 1 was 438 clamped against 282 not; the
        shipped one's is about the same either way at temperature 0.5: modalities/text/README.md)."""
        return bool(self.default("clamp", self.net.head == "regression"))

    @property
    def default_temperature(self) -> float:
        """The word temperature sampling uses unless told: as recorded, else 1 (the network's
        own distribution). Only a softmax head has one."""
        return float(self.default("temperature", 1.0))

    @functools.cached_property
    def allowed(self) -> torch.Tensor:
        """(V,) bool: the words sampling may produce: not padding, not other special tokens and
        not [UNK] (the stand-in for rare words in training is no word to print)."""
        allowed = torch.ones(self.net.vocab_size, dtype=torch.bool)
        banned = [*self.tokenizer.special_ids, self.tokenizer.unk_id]
        allowed[[i for i in banned if i is not None and i < self.net.vocab_size]] = False
        return allowed.to(self.device)


def load_text_model(checkpoint: str | os.PathLike | None = None, device: str | torch.device = "auto") -> TextModel:
    """Load a text checkpoint directory (default: the shipped one) onto ``device``.

    Loaded models are cached (keyed by path, file time and device), so repeated generate calls
    do not reload the weights.
    """
    if checkpoint is None:
        checkpoint = DEFAULT_CHECKPOINT
        if not (DEFAULT_CHECKPOINT / "config.json").is_file():
            raise ValueError(
                f"the shipped text checkpoint is missing (expected {DEFAULT_CHECKPOINT}). Train one with "
                "`python recipes/text_train.py --route masked --export runs/text-masked-cpu/export` and pass that "
                "directory with "
                "--checkpoint (CLI) or checkpoint= (Python)")
    path = Path(checkpoint).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a checkpoint directory (it has no config.json); give the directory "
                         "that recipes/text_train.py wrote (RUN/checkpoint or the --export directory)")
    return _load(path, device)


def _text_model(loaded) -> TextModel:
    path, info, diffusion = loaded.path, dict(loaded.modality_config), loaded.diffusion
    tokenizer = TextTokenizer.load(loaded.side_file(info.get("tokenizer", TOKENIZER_FILE)))
    if tokenizer.vocab_size != loaded.net.vocab_size:
        raise diffkit.CheckpointError(f"the tokenizer of {path} has {tokenizer.vocab_size} tokens but the network "
                                      f"embeds {loaded.net.vocab_size}; the checkpoint's files do not belong together")
    return TextModel(Path(path), loaded.net, diffusion, info, tokenizer)


_load = cached_loader("text", NETWORKS, _text_model)


@dataclass
class MRClassifier:
    """A loaded noisy-embedding classifier and the MR vocabulary its slot codes follow."""

    path: Path
    net: NoisyMRClassifier
    mr_vocab: MRVocabulary


def load_classifier(path: str | os.PathLike, model: TextModel) -> MRClassifier:
    """Load a classifier checkpoint (``recipes/text_train.py --task classifier``) for ``model``,
    refusing one trained in another denoiser's embedding space."""
    path = Path(path).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a checkpoint directory (it has no config.json); give the directory "
                         "that `recipes/text_train.py --task classifier` wrote")
    loaded = diffkit.load_network(path, CLASSIFIERS, modality="text", device=model.device)
    clf = loaded.net
    emb = model.net.embedding.weight
    # Shipped checkpoints hold float16 weights, so equality is up to float16 rounding.
    if clf.embedding.shape != emb.shape or not torch.allclose(clf.embedding, emb, rtol=1e-2, atol=1e-2):
        raise ValueError(f"classifier {path} was trained for the word embeddings of another denoiser than "
                         f"{model.path}; train one for it with `python recipes/text_train.py --task classifier "
                         f"--denoiser {model.path}`")
    values = loaded.modality_config.get("mr_values")
    if not values:
        raise diffkit.CheckpointError(f"classifier {path} records no MR vocabulary (modality_config['mr_values'])")
    return MRClassifier(path, clf, MRVocabulary.from_config(values))


def classifier_control(classifier: MRClassifier, codes: torch.Tensor, attention_mask: torch.Tensor,
                       method: str = "gradient", scale: float = 1.0, *, adagrad_steps: int = 3,
                       adagrad_lr: float = 0.1, proximity: float = 0.01):
    """The core wrapper that steers sampling towards MR slot ``codes`` (B, S) (0 = free).

    ``"gradient"``: classifier guidance, the score shifted by scale * grad log p(codes | x_t)
    (``GradientGuidance``). ``"adagrad"``: Diffusion-LM's control, a few Adagrad steps on each
    new state x_{t-1} maximising scale * log p(codes | x) minus ``proximity`` * ||x - x_start||^2
    (``StateHook``); the proximity term stands in for Diffusion-LM's fluency regulariser (the
    denoiser's own log-density), which would cost a network call per step.
    """
    clf = classifier.net
    codes = codes.to(attention_mask.device)

    def log_prob(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return clf.log_prob(x, t, codes, attention_mask)

    if method == "gradient":
        return GradientGuidance(log_prob, scale)
    if method != "adagrad":
        raise ValueError(f"unknown control_method {method!r}; choose one of {', '.join(CONTROL_METHODS)}")
    real = attention_mask[:, None, :]

    def adagrad(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        start = x.detach()
        with torch.enable_grad():
            y = start.clone().requires_grad_(True)
            opt = torch.optim.Adagrad([y], lr=adagrad_lr)
            for _ in range(adagrad_steps):
                opt.zero_grad()
                loss = -scale * log_prob(y, t).sum() + proximity * ((y - start) ** 2).sum()
                loss.backward()
                opt.step()
        return torch.where(real, y.detach(), x)

    return StateHook(adagrad)


# ---------------------------------------------------------------------------------- inputs
def parse_control(control: Mapping[str, str] | Sequence[str] | str | None) -> dict[str, str]:
    """``{"food": "Italian"}``, ``["food=Italian", "area=riverside"]`` or ``"food=Italian"``
    -> a dict of slot values (the CLI's repeated ``--control key=value``)."""
    if control is None:
        return {}
    if isinstance(control, Mapping):
        items = list(control.items())
    else:
        items = []
        for entry in [control] if isinstance(control, str) else control:
            if not isinstance(entry, str) or "=" not in entry:
                raise ValueError(f"control entries look like slot=value (e.g. food=Italian), got {entry!r}")
            key, value = entry.split("=", 1)
            items.append((key.strip(), value.strip()))
    result: dict[str, str] = {}
    for key, value in items:
        if key not in SLOTS:
            raise ValueError(f"unknown control slot {key!r}; the slots are {', '.join(SLOTS)}")
        if not isinstance(value, str) or not value:
            raise ValueError(f"control {key!r} needs a value, e.g. {key}=...")
        if key in result and result[key] != value:
            raise ValueError(f"control slot {key!r} given twice ({result[key]!r} and {value!r})")
        result[key] = value
    return result


@dataclass
class InfillTemplate:
    """A template tokenised: ids (L,) with the known words, known (L,) bool, the unknown words."""

    ids: torch.Tensor
    known: torch.Tensor
    unknown_words: list[str]


def parse_infill(template: str, model: TextModel) -> InfillTemplate:
    """Split the template at [MASK], tokenise the pieces; each [MASK] is one word to fill."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"infill must be a template string like 'The Eagle is a {MASK} {MASK} in the city "
                         f"centre .', got {template!r}")
    pieces = _MASK_RE.split(template)
    if len(pieces) == 1:
        raise ValueError(f"the infill template has no {MASK}; write {MASK} for each word to fill in")
    ids: list[int] = []
    known: list[bool] = []
    unknown: list[str] = []
    for n, piece in enumerate(pieces):
        if n:
            ids.append(model.tokenizer.pad_id)
            known.append(False)
        tokens, unk = model.tokenizer.tokenize(piece)
        ids.extend(tokens)
        known.extend([True] * len(tokens))
        unknown.extend(unk)
    if len(ids) > model.max_length:
        raise ValueError(f"the infill template has {len(ids)} tokens but this model handles at most "
                         f"{model.max_length}; shorten it")
    return InfillTemplate(torch.tensor(ids), torch.tensor(known), unknown)


def _lengths(model: TextModel, n: int, length: int | None, generator: torch.Generator) -> torch.Tensor:
    if length is not None:
        if not isinstance(length, int) or not 1 <= length <= model.max_length:
            raise ValueError(f"length must be a whole number in [1, {model.max_length}], got {length!r}")
        return torch.full((n,), length, dtype=torch.long)
    counts = torch.tensor(model.info.get("length_counts") or [], dtype=torch.float64)
    if counts.numel() < 2 or counts[1:].sum() <= 0:
        raise ValueError(f"checkpoint {model.path} records no length distribution; pass length=")
    counts[0] = 0  # an empty text is not a sample
    return torch.multinomial(counts, n, replacement=True, generator=generator)


# ---------------------------------------------------------------------------------- generate
def snap_to_embeddings(net: TextDenoiser, allowed: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None):
    """Diffusion-LM's clamping trick as an ``X0Transform`` function: each x0_hat vector becomes
    the nearest word embedding (padding positions are left as they are)."""

    def snap(x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        snapped = net.embed(net.nearest(x0, allowed)).to(x0.dtype)
        if attention_mask is None:
            return snapped
        return torch.where(attention_mask[:, None, :].to(x0.device), snapped, x0)

    return snap


def padding_mask(lengths: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, max length) bool, True at the first ``lengths[i]`` positions of row i."""
    return (torch.arange(int(lengths.max()))[None] < lengths[:, None]).to(device)


def denoiser_call(net: TextDenoiser, *, chain: bool = True, temperature: float = 1.0, repeat_penalty: float = 0.0,
                  guidance_mix: str = "logits"):
    """What the core calls: a fresh :class:`SelfConditioned` for a self-conditioned network
    (``chain=True`` for a sampling run, False for the bound), :class:`WordOptions` for another,
    with the given word ``temperature`` and ``repeat_penalty`` (sampling only) and classifier-free
    guidance mixed as ``guidance_mix`` says."""
    if net.self_conditioning:
        return SelfConditioned(net, chain=chain, temperature=temperature, repeat_penalty=repeat_penalty,
                               guidance_mix=guidance_mix)
    return WordOptions(net, temperature=temperature, repeat_penalty=repeat_penalty, guidance_mix=guidance_mix)


# A network call costs about the same per (row x token) whatever the batch (measured on the
# shipped model, 1 thread: 33-52 us from 4 to 100 rows), plus a fixed share per call worth
# about this many row-tokens (Python, the sampler's own ops).
GROUP_OVERHEAD_TOKENS = 64


def length_groups(lengths: torch.Tensor, *, extra_tokens: int = 0,
                  overhead: int = GROUP_OVERHEAD_TOKENS) -> list[torch.Tensor]:
    """Row indices of ``lengths`` (N,) split into groups of similar length, to be sampled one
    group at a time so that short texts are not padded to the longest.

    A group of rows padded to its longest costs rows * (longest + ``extra_tokens``) plus
    ``overhead`` (the same units, row-tokens); the split minimises the total over groups of
    consecutive lengths (dynamic programming over the distinct lengths). ``extra_tokens`` are
    positions every row carries besides its words (the MR tokens of a conditional model).
    """
    if lengths.ndim != 1 or lengths.numel() == 0:
        raise ValueError(f"lengths must be a non-empty (N,) tensor, got shape {tuple(lengths.shape)}")
    values, counts = torch.unique(lengths.cpu(), sorted=True, return_counts=True)
    values, counts = values.tolist(), counts.tolist()
    k = len(values)
    # best[j]: least cost of the first j distinct lengths; cut[j]: where its last group starts.
    best, cut = [0.0] + [float("inf")] * k, [0] * (k + 1)
    for j in range(1, k + 1):
        rows = 0
        for i in range(j, 0, -1):  # last group: distinct lengths i-1 .. j-1
            rows += counts[i - 1]
            cost = best[i - 1] + overhead + rows * (values[j - 1] + extra_tokens)
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    bounds, j = [], k
    while j > 0:
        bounds.append((values[cut[j]], values[j - 1]))
        j = cut[j]
    lengths = lengths.cpu()
    return [torch.nonzero((lengths >= low) & (lengths <= high)).flatten() for low, high in reversed(bounds)]


@dataclass(frozen=True)
class TextSampling:
    """How to sample: the core's ``sampler`` and ``steps``, classifier-free ``guidance_scale``
    (1 = off) and ``guidance_interval`` (the core's: guide only where sigma/alpha lies in it;
    ``(0, None)`` guides at every step), the clamping trick, the word temperature and
    neighbour-repeat penalty of a softmax head (see :meth:`TextDenoiser.forward`), and where
    guidance mixes, ``guidance_mix`` (``"logits"``: :meth:`TextDenoiser.guided`; ``"x0"``: the
    core's mix of the x0 estimates). ``guidance_interval``, ``clamp``, ``temperature``,
    ``repeat_penalty`` and ``guidance_mix`` None follow the checkpoint (:meth:`TextModel.default`,
    :attr:`TextModel.default_clamp`, :attr:`TextModel.default_temperature`; no recorded penalty
    means 0, no recorded mix ``"x0"``)."""

    sampler: str
    steps: int
    guidance_scale: float = 1.0
    guidance_interval: Sequence[float | None] | None = None
    clamp: bool | None = None
    temperature: float | None = None
    repeat_penalty: float | None = None
    guidance_mix: str | None = None


@dataclass(frozen=True)
class RowConditions:
    """What each of the N rows of a batch is sampled under; every field is None or one entry per row.

    ``mr`` (N, S): MR slot codes, the condition of classifier-free guidance. ``known_ids`` /
    ``known_mask`` (N, L): words an infilling template holds fixed in place.
    ``extra_wrappers(rows, attention_mask)``: the extra core wrappers (e.g. classifier control)
    for the rows ``rows`` (indices into the N) and their (len(rows), L) mask, laid outside the
    built-in ones.
    """

    mr: torch.Tensor | None = None
    known_ids: torch.Tensor | None = None
    known_mask: torch.Tensor | None = None
    extra_wrappers: Callable[[torch.Tensor, torch.Tensor], Sequence] | None = None

    def select(self, rows: torch.Tensor) -> RowConditions:
        """The conditions of ``rows`` alone (a length group), wrappers re-indexed to them."""
        def pick(value):
            return None if value is None else value[rows]

        wrappers = None
        if self.extra_wrappers is not None:
            outer = self.extra_wrappers

            def wrappers(group_rows: torch.Tensor, mask: torch.Tensor) -> Sequence:
                return outer(rows[group_rows], mask)

        return RowConditions(pick(self.mr), pick(self.known_ids), pick(self.known_mask), wrappers)


def sample_ids(model: TextModel, lengths: torch.Tensor, settings: TextSampling,
               conditions: RowConditions = RowConditions(), *, generator: torch.Generator,
               group_by_length: bool = True, progress: bool = False,
               callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Token ids (N, L) from the core's sampler: L = the longest of ``lengths`` (N,), padding
    after each row's own. ``callback`` is the core sampler's (each state and its x0 estimate);
    with ``group_by_length`` it sees one length group at a time.

    With ``group_by_length`` rows are sampled in groups of similar length (:func:`length_groups`),
    each padded only to its own longest: on E2E lengths about twice as fast as one batch
    padded to the longest, with the same model and sampler. The draws depend on the grouping,
    so the same seed gives the same texts for the same ``lengths``.
    """
    if not group_by_length:
        return _sample_group(model, lengths, settings, conditions, generator, progress, callback)
    return _in_length_groups(model, lengths, lambda rows: _sample_group(
        model, lengths[rows], settings, conditions.select(rows), generator, progress, callback))


def _in_length_groups(model: TextModel, lengths: torch.Tensor,
                      sample_rows: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Token ids (N, L) for rows of ``lengths`` (N,), put together from ``sample_rows(rows)``,
    the ids of one length group of rows (:func:`length_groups`), padded to its own longest."""
    groups = length_groups(lengths, extra_tokens=len(model.net.mr_sizes or ()))
    if len(groups) == 1:
        return sample_rows(groups[0])
    out = torch.full((lengths.shape[0], int(lengths.max())), model.tokenizer.pad_id, dtype=torch.long)
    for rows in groups:
        out[rows, : int(lengths[rows].max())] = sample_rows(rows)
    return out


@dataclass(frozen=True)
class Continuation:
    """Where a run resumes: the grid points still to visit (training times, noisiest first,
    ending at clean data), the ``state`` (N, D, L) at the first of them, and a self-conditioned
    network's last estimate ``previous`` (N, D, L), which its first call reads."""

    times: torch.Tensor
    state: torch.Tensor
    previous: torch.Tensor | None = None


def _sample_group(model: TextModel, lengths: torch.Tensor, settings: TextSampling, conditions: RowConditions,
                  generator: torch.Generator, progress: bool,
                  callback: Callable[[dict], None] | None = None, *,
                  times: torch.Tensor | None = None, resume: Continuation | None = None) -> torch.Tensor:
    """:func:`sample_ids` for rows sampled as one batch, padded to their longest: over
    ``settings``' grid, or over the training ``times`` given (the run then lands on clean data
    from the last of them), or from where ``resume`` says."""
    net, dev = model.net, model.device
    temperature = model.default_temperature if settings.temperature is None else float(settings.temperature)
    interval = settings.guidance_interval
    if interval is None:
        interval = model.default("guidance_interval", None)
    clamp = model.default_clamp if settings.clamp is None else settings.clamp
    penalty = settings.repeat_penalty
    if penalty is None:
        penalty = float(model.default("repeat_penalty", 0.0))
    mix = settings.guidance_mix or model.default("guidance_mix")
    n = lengths.shape[0]
    attention_mask = padding_mask(lengths, dev)
    length = attention_mask.shape[1]
    cond: dict[str, torch.Tensor] = {"attention_mask": attention_mask}
    if conditions.mr is not None:
        cond["mr"] = conditions.mr.to(dev)
    known_ids = known_mask = None
    if conditions.known_ids is not None:
        known_ids, known_mask = conditions.known_ids[:, :length].to(dev), conditions.known_mask[:, :length].to(dev)
    chain = []
    if clamp:
        chain.append(X0Transform(snap_to_embeddings(net, model.allowed, attention_mask)))
    if known_ids is not None:
        mask = known_mask[:, None, :].expand(n, net.embed_dim, length)
        chain.append(KnownValues(mask, net.embed(known_ids)))
    if conditions.extra_wrappers is not None:
        chain.extend(conditions.extra_wrappers(torch.arange(n), attention_mask))
    call = denoiser_call(net, temperature=temperature, repeat_penalty=penalty, guidance_mix=mix)
    where: dict = {"steps": settings.steps}
    if resume is not None:
        times = resume.times
        where["noise"], where["start"] = resume.state.to(dev), "noise"  # the state as it is, not a fresh prior draw
        if resume.previous is not None and isinstance(call, SelfConditioned):
            call.previous = resume.previous.to(dev)
    if times is not None:
        where["grid"], where["steps"] = times, None
    x = model.diffusion.sample(call, (n, net.embed_dim, length), sampler=settings.sampler, generator=generator,
                               device=dev, guidance_scale=settings.guidance_scale, guidance_interval=interval,
                               wrappers=chain, progress=progress, callback=callback, **where, **cond)
    ids = net.nearest(x, model.allowed)
    if known_ids is not None:  # a template's words stay as written, [UNK] included
        ids = torch.where(known_mask, known_ids, ids)
    return ids.masked_fill(~attention_mask, model.tokenizer.pad_id).cpu()


def sample_best_of(model: TextModel, lengths: torch.Tensor, settings: TextSampling, conditions: RowConditions,
                   choice: CandidateChoice, *, generator: torch.Generator, progress: bool = False) -> torch.Tensor:
    """Token ids (N, L) of N texts of ``lengths`` (N,), each the best of ``choice.best_of``
    candidates; ``conditions`` has a row per candidate, text i's being rows i K to i K + K - 1.

    With ``choice.select_at`` < 1 the candidates are compared on the words of their x0
    estimates at that share of the grid, and only the kept one is run to the end: it resumes
    from its own state there (its self-conditioning from its own estimate), as an uninterrupted
    run would (a multistep solver restarts its history there). K candidates then cost
    K x select_at + 1 - select_at runs, not K. Otherwise (and always for ``"mbr"``) every
    candidate is finished and the finished texts compared.
    """
    k = choice.best_of
    candidate_lengths = lengths.repeat_interleave(k)
    net, diffusion = model.net, model.diffusion
    if k == 1 or choice.rank_by == "mbr" or choice.select_at >= 1:
        ids = sample_ids(model, candidate_lengths, settings, conditions, generator=generator, progress=progress)
        keep = choose_candidates(net, diffusion, ids, padding_mask(candidate_lengths), group_size=k,
                                 rank_by=choice.rank_by, generator=generator, mr=conditions.mr)
        return ids[keep]
    times = diffusion.sampling_grid(settings.steps, sampler=settings.sampler).times
    head = max(1, min(len(times), round(choice.select_at * len(times))))

    def best_of_texts(texts: torch.Tensor) -> torch.Tensor:
        rows = (texts[:, None] * k + torch.arange(k)).flatten()  # the candidates of these texts
        group_lengths, group_conditions = candidate_lengths[rows], conditions.select(rows)
        last: dict = {}

        def keep_last(info: dict, point: int = head - 1) -> None:
            if info["i"] == point:
                last.update(state=info["x"], estimate=info["denoised"])

        # The head run lands on clean data from its last point: the words of the x0 estimate there.
        guess = _sample_group(model, group_lengths, settings, group_conditions, generator, progress, keep_last,
                              times=times[:head])
        keep = choose_candidates(net, diffusion, guess, padding_mask(group_lengths), group_size=k,
                                 rank_by="likelihood", generator=generator, mr=group_conditions.mr)
        resume = Continuation(times[head - 1:], last["state"][keep], last["estimate"][keep])
        return _sample_group(model, group_lengths[keep], settings, group_conditions.select(keep), generator,
                             progress, resume=resume)

    return _in_length_groups(model, lengths, best_of_texts)


_GUIDED = "pass control= (without a classifier)"
_BEST_OF = "says how best_of candidates are chosen: pass best_of=K (K > 1) too, or leave it unset"
# (option, when it may be given, what to do otherwise): options that mean something only beside another.
_NEEDS = (
    ("rank_by", lambda r: r.best_of != 1, f"rank_by {_BEST_OF}"),
    ("select_at", lambda r: r.best_of != 1, f"select_at {_BEST_OF}"),
    ("select_at", lambda r: r.rank_by != "mbr" or r.select_at == 1,
     "rank_by='mbr' compares finished texts; select_at (comparing early) needs rank_by='likelihood'"),
    ("control_method", lambda r: r.classifier is not None,
     "control_method chooses how a classifier steers: pass classifier= too, or leave it unset"),
    ("classifier_scale", lambda r: r.classifier is not None, "classifier_scale needs classifier="),
    ("classifier", lambda r: bool(r.control), "classifier= steers towards control=; pass control={'food': ...} as well"),
    ("guidance_scale", lambda r: r.guidance_scale == 1.0 or r.classifier is None,
     "guidance_scale is classifier-free guidance; with classifier= use classifier_scale"),
    ("guidance_scale", lambda r: r.guidance_scale == 1.0 or bool(r.control),
     "guidance_scale needs a condition to guide towards: pass control="),
    ("guidance_interval", lambda r: r.guided, f"guidance_interval limits classifier-free guidance: {_GUIDED}"),
    ("guidance_mix", lambda r: r.guided, f"guidance_mix says how classifier-free guidance mixes: {_GUIDED}"),
    ("length", lambda r: r.infill is None, "an infill template fixes the length; leave length unset"),
)
# Options of one route only, refused (with the route named) for a checkpoint of the other.
EMBEDDING_OPTIONS = ("guidance_interval", "guidance_mix", "clamp", "repeat_penalty", "classifier", "classifier_scale",
                     "control_method", "rank_by", "select_at")
MASKED_OPTIONS = ("top_p", "threshold")


def _finite(name: str, value, low: float = -math.inf, *, above: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        value > low if above else value >= low)
    if not ok:
        bound = "" if low == -math.inf else f" {'>' if above else '>='} {low:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


@dataclass(frozen=True)
class TextRequest:
    """What :func:`generate_text` is asked for, checked when made: every value on its own and
    every option that only means something beside another (``_NEEDS``). ``control`` is kept
    parsed, as a dict of slot values."""

    num_samples: int = 16
    sampler: str | None = None
    steps: int | None = None
    infill: str | Sequence[str] | None = None
    control: Mapping[str, str] | Sequence[str] | str | None = None
    guidance_scale: float | None = None
    guidance_interval: Sequence[float | None] | None = None
    guidance_mix: str | None = None
    length: int | None = None
    clamp: bool | None = None
    temperature: float | None = None
    repeat_penalty: float | None = None
    top_p: float | None = None
    threshold: float | None = None
    classifier: str | os.PathLike | None = None
    classifier_scale: float | None = None
    control_method: str | None = None
    best_of: int = 1
    rank_by: str | None = None
    select_at: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_samples, int) or isinstance(self.num_samples, bool) or self.num_samples < 1:
            raise ValueError(f"num_samples must be a whole number >= 1, got {self.num_samples!r}")
        resolve_steps(self.steps, FALLBACKS.steps)
        if self.temperature is not None:
            _finite("temperature", self.temperature, 0, above=True)
        if self.repeat_penalty is not None:
            _finite("repeat_penalty", self.repeat_penalty, 0)
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if self.threshold is not None and (isinstance(self.threshold, bool) or not isinstance(
                self.threshold, (int, float)) or not 0 < self.threshold <= 1):
            raise ValueError(f"threshold must lie in (0, 1], got {self.threshold!r}")
        if self.guidance_scale is not None:
            check_guidance_scale(self.guidance_scale)  # the core's check, as image and audio use: no NaN, no bool
        if self.classifier_scale is not None:
            _finite("classifier_scale", self.classifier_scale)
        object.__setattr__(self, "control", parse_control(self.control))
        check_guidance_interval(self.guidance_interval)
        if self.guidance_mix is not None:
            check_guidance_mix(self.guidance_mix)
        if self.control_method is not None and self.control_method not in CONTROL_METHODS:
            raise ValueError(f"unknown control_method {self.control_method!r}; choose one of "
                             f"{', '.join(CONTROL_METHODS)}")
        for name, allowed, message in _NEEDS:
            if getattr(self, name) is not None and not allowed(self):
                raise ValueError(message)
        _ = self.choice  # best_of, rank_by and select_at check themselves there

    @property
    def guided(self) -> bool:
        """Classifier-free guidance towards ``control``."""
        return bool(self.control) and self.classifier is None

    @property
    def choice(self) -> CandidateChoice:
        return CandidateChoice(self.best_of, self.rank_by or "likelihood",
                               SELECT_AT if self.select_at is None else self.select_at)

    def check_route(self, model: TextModel) -> None:
        """Refuse the options of the other route than ``model``'s."""
        masked = model.route == "masked"
        given = [name for name in (EMBEDDING_OPTIONS if masked else MASKED_OPTIONS) if getattr(self, name) is not None]
        if masked and self.best_of != 1:
            given.append("best_of")
        if given:
            route, other = ("masked", "embedding") if masked else ("embedding", "masked")
            raise ValueError(f"{given[0]} is an option of the {other} text route, and {model.path} holds a {route}-route "
                             f"model; leave it unset")


def generate_text(
    *,
    checkpoint: str | os.PathLike | None = None,
    num_samples: int = 16,
    seed: int | None = None,
    device: str | torch.device = "auto",
    sampler: str | None = None,
    steps: int | None = None,
    progress: bool = False,
    infill: str | Sequence[str] | None = None,
    control: Mapping[str, str] | Sequence[str] | str | None = None,
    guidance_scale: float | None = None,
    guidance_interval: Sequence[float | None] | None = None,
    guidance_mix: str | None = None,
    length: int | None = None,
    clamp: bool | None = None,
    temperature: float | None = None,
    repeat_penalty: float | None = None,
    top_p: float | None = None,
    threshold: float | None = None,
    classifier: str | os.PathLike | None = None,
    classifier_scale: float | None = None,
    control_method: str | None = None,
    best_of: int = 1,
    rank_by: str | None = None,
    select_at: float | None = None,
) -> list[str]:
    """Sample ``num_samples`` texts; see the module docstring. Every argument is checked
    before anything is loaded (:class:`TextRequest`); options of the other route than the
    checkpoint's are refused with a message.

    Args:
        checkpoint: a text checkpoint directory; None uses the shipped one.
        seed: the same seed gives the same texts; None draws fresh ones.
        sampler, steps: any of ``diffkit.SAMPLERS`` (a masked checkpoint: ``"ancestral"`` or
            ``"confidence"``, steps per block); defaults come from the checkpoint.
        infill: a template with [MASK] for each word to fill (the other words are kept), or
            one template per sample.
        control: E2E slot values, ``{"food": "Italian"}`` or ``["food=Italian"]``: classifier-free
            guidance of an MR-conditioned checkpoint.
        guidance_scale: its weight (1 = plain conditional sampling); default the checkpoint's.
        guidance_interval: (low, high) on the noise-to-signal ratio sigma/alpha: guide only
            there, at half the network calls elsewhere (None for an open end; ``(0, None)``
            guides at every step); default the checkpoint's.
        guidance_mix: where guidance mixes the conditional and unconditional predictions:
            ``"logits"``, on each position's word logits (a word distribution sharpened towards
            the MR), or ``"x0"``, on the x0 estimates (averages of embeddings, which the mix
            pushes off the words). Default the checkpoint's (``"x0"`` if it records none). On
            the shipped model the logit mix gives more control at the same fluency
            (modalities/text/README.md).
        classifier: a noisy-embedding classifier checkpoint: ``control`` through it instead
            (plug-and-play control; works with unconditional checkpoints too).
        classifier_scale: the classifier's weight (default 1).
        control_method: with ``classifier``: ``"gradient"`` (classifier guidance, the default) or ``"adagrad"`` (Diffusion-LM's
            Adagrad steps on each state).
        length: tokens per sample (default: drawn from the training lengths; a masked
            checkpoint ends each text itself).
        top_p: a masked checkpoint's nucleus: each token is drawn from the smallest set of
            words holding this much probability (default: the checkpoint's).
        threshold: a masked checkpoint's confidence sampler also writes, at each step, every
            word it draws with at least this probability (default: the checkpoint's).
        clamp: the clamping trick (snap x0 predictions to word embeddings at every step); None
            follows the checkpoint (on for a regression head, off for a softmax head).
        temperature: a softmax head's word temperature; below 1 every step leans towards the
            likelier words (None: the checkpoint's, 1 if it records none).
        repeat_penalty: a softmax head's price, in nats, on the same word at neighbouring
            positions ("Italian Italian"); 0 (the default unless the checkpoint records one)
            leaves the network's distribution alone. On the shipped model 10 cuts the texts with
            such a repeat from 52% to 3%, but the judge perplexity rises from 16.6 to 20.5: the
            repeat often becomes another wrong word (modalities/text/README.md).
        best_of: candidates drawn per text, of its length and conditions; the one ``rank_by``
            prefers is kept (:mod:`modalities.text.ranking`, :func:`sample_best_of`). On the
            shipped model 4 candidates take the judge perplexity at 200 steps from 12.3 to 9.8
            (human text 7.1) at 2 times the time (modalities/text/README.md).
        rank_by: with ``best_of``: ``"likelihood"`` (the default), the model's own denoising
            log-likelihood of the words (under ``control``'s MR when guided classifier-free), or
            ``"mbr"``, the candidate that agrees most with the others (minimum Bayes risk,
            sentence BLEU; compares finished texts, so K candidates cost K runs).
        select_at: with the likelihood ranking, the share of the steps after which candidates
            are compared on their x0 estimates; only the kept one is finished, so K candidates
            cost K x select_at + 1 - select_at runs (default 0.25: 3.25 runs for K = 10; 1
            compares finished texts).
    """
    request = TextRequest(num_samples, sampler, steps, infill, control, guidance_scale, guidance_interval,
                          guidance_mix, length, clamp, temperature, repeat_penalty, top_p, threshold, classifier,
                          classifier_scale, control_method, best_of, rank_by, select_at)
    model = load_text_model(checkpoint, device)
    request.check_route(model)
    gen = seeded_generator(seed)
    mr = _control_codes(model, request)
    templates = None if infill is None else _templates(model, request)
    if model.route == "masked":
        from .masked_route import generate_masked

        return generate_masked(model, request, mr=mr, templates=templates, generator=gen)
    return _generate_embedding(model, request, mr, templates, gen, progress)


def _control_codes(model: TextModel, request: TextRequest) -> torch.Tensor | None:
    """(num_samples x best_of, S) MR codes of a classifier-free-guided ``control``, None without one."""
    if not request.guided:
        return None
    vocab = model.mr_vocab
    if vocab is None or not model.net.conditional:
        raise ValueError(f"checkpoint {model.path} was not trained on meaning representations, so it cannot "
                         "follow control= by itself; train one on E2E with recipes/text_train.py (the "
                         "default), or pass classifier= (trained with recipes/text_train.py --task classifier)")
    return torch.tensor([vocab.encode(request.control, partial=True)] * (request.num_samples * request.best_of))


def _templates(model: TextModel, request: TextRequest) -> list[tuple[str, InfillTemplate]]:
    """(template text, parsed template) per sample; unknown words are warned about once."""
    n, infill = request.num_samples, request.infill
    texts = [infill] if isinstance(infill, str) else list(infill)
    if len(texts) == 1:
        texts = texts * n
    if len(texts) != n:
        raise ValueError(f"infill must be one template or one per sample ({n}), got {len(texts)}")
    templates = [parse_infill(text, model) for text in texts]
    unknown = sorted({word for template in templates for word in template.unknown_words})
    if unknown:
        warnings.warn(f"words of the infill template that are not in the vocabulary map to [UNK]: "
                      f"{', '.join(unknown)} (the model reads them as [UNK]; the output keeps them as written)",
                      stacklevel=3)
    return list(zip(texts, templates))


def template_tensors(templates: Sequence[InfillTemplate], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lengths (n,), known ids (n, L), known mask (n, L)): templates of different lengths share
    a batch, each row padded after its own end."""
    lengths = torch.tensor([template.ids.numel() for template in templates])
    known_ids = torch.full((len(templates), int(lengths.max())), pad_id, dtype=torch.long)
    known_mask = torch.zeros(len(templates), int(lengths.max()), dtype=torch.bool)
    for row, template in enumerate(templates):
        known_ids[row, : template.ids.numel()] = template.ids
        known_mask[row, : template.ids.numel()] = template.known
    return lengths, known_ids, known_mask


def _generate_embedding(model: TextModel, request: TextRequest, mr, templates, gen, progress: bool) -> list[str]:
    """The embedding route (Diffusion-LM): lengths first, then the core's sampler on the embeddings."""
    n, best_of = request.num_samples, request.best_of
    sampler = request.sampler or model.default("sampler")
    steps = resolve_steps(request.steps, int(model.default("steps")))
    guidance_scale = request.guidance_scale
    if mr is not None and guidance_scale is None:
        guidance_scale = float(model.default("guidance_scale"))
    guidance_scale = 1.0 if guidance_scale is None else float(guidance_scale)
    known_ids = known_mask = None
    if templates is not None:
        lengths, known_ids, known_mask = template_tensors([t for _, t in templates], model.tokenizer.pad_id)
        # each text's candidates are consecutive rows, of its template
        known_ids, known_mask = known_ids.repeat_interleave(best_of, 0), known_mask.repeat_interleave(best_of, 0)
    else:
        lengths = _lengths(model, n, request.length, gen)
    extra_wrappers = None
    if request.classifier is not None:
        clf = load_classifier(request.classifier, model)
        clf_codes = torch.tensor([clf.mr_vocab.encode(request.control, partial=True)] * (n * best_of))
        scale = FALLBACKS.classifier_scale if request.classifier_scale is None else float(request.classifier_scale)
        method = request.control_method or "gradient"

        def extra_wrappers(rows: torch.Tensor, attention_mask: torch.Tensor) -> list:
            return [classifier_control(clf, clf_codes[rows], attention_mask, method, scale)]
    settings = TextSampling(sampler, steps, guidance_scale, request.guidance_interval, request.clamp,
                            request.temperature, request.repeat_penalty, request.guidance_mix)
    conditions = RowConditions(mr, known_ids, known_mask, extra_wrappers)
    ids = sample_best_of(model, lengths, settings, conditions, request.choice, generator=gen, progress=progress)
    if templates is not None:
        return [fill_template(text, template, row, model.tokenizer) for (text, template), row in zip(templates, ids)]
    return [model.tokenizer.decode(row[: int(k)].tolist()) for row, k in zip(ids, lengths)]


def fill_template(text: str, template: InfillTemplate, ids: torch.Tensor, tokenizer) -> str:
    """The infill template ``text`` as written, each [MASK] replaced by the word sampled at its
    position (``ids`` the sampled row of ``template``): the user's words, case and spacing stay
    exactly as given, unknown words included. A subword tokenizer's continuation piece
    ("##ping" after "shop") joins the text before it, as the tokenizer's decoder would join it."""
    holes = torch.nonzero(~template.known).flatten().tolist()
    pieces = _MASK_RE.split(text)
    out = pieces[0]
    for hole, after in zip(holes, pieces[1:]):
        word, joins = _filled_word(tokenizer, ids, hole)
        out = (out.rstrip() if joins else out) + word + after
    return out


def _filled_word(tokenizer, ids: torch.Tensor, i: int) -> tuple[str, bool]:
    """(the text token ``ids[i]`` adds, whether it joins the previous token with no space), read
    off the decoder: what decoding [previous, this] adds to decoding [previous] alone."""
    alone = tokenizer.decode([int(ids[i])]).strip()
    if i == 0:
        return alone, False
    before = tokenizer.decode([int(ids[i - 1])])
    both = tokenizer.decode([int(ids[i - 1]), int(ids[i])])
    if not before or not both.startswith(before) or len(both) == len(before):
        return alone, False
    added = both[len(before):]
    return added.strip(), not added[0].isspace()


# ---------------------------------------------------------------------------------- likelihood
@torch.no_grad()
def nll_per_token(texts: Sequence[str], *, checkpoint: str | os.PathLike | None = None,
                  mrs: Sequence[Mapping[str, str]] | None = None, steps: int | None = None,
                  seed: int | None = 0, device: str | torch.device = "auto",
                  batch_size: int = 64, bound: str = "discrete") -> torch.Tensor:
    """Bits per token of each text from the core's variational bound (padding masked, times the
    embedding width).

    ``bound="discrete"`` (default): an upper bound on -log2 p(words): the core's prior and KL
    terms with the rounding term -log2 p(w | x_0) (the tied head at the least noisy latent
    x_0 = alpha_0 EMB(w) + sigma_0 eps) as the decoder, in place of the Gaussian decoder.
    ``bound="embedding"``: Diffusion-LM's quantity, the core's whole bound on the continuous
    embeddings (Gaussian decoder included) plus the rounding term; a density of vectors, not a
    probability of text, it can be negative.

    ``steps`` evaluates the bound on a respaced chain (fewer network calls, a looser bound).
    ``mrs`` gives each text's meaning representation to an MR-conditioned model.

    A masked checkpoint's bound is the block-diffusion bound on the words and the end token
    (``bound`` must stay "discrete"; ``steps`` is its number of Monte-Carlo time draws, 16 by
    default), per word and end token, as an autoregressive model's bits per token with its end
    token are counted.
    """
    if bound not in ("discrete", "embedding"):
        raise ValueError(f"bound must be 'discrete' or 'embedding', got {bound!r}")
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    model = load_text_model(checkpoint, device)
    net, dev, diff = model.net, model.device, model.diffusion
    enc = model.tokenizer.encode(list(texts), model.max_length)
    if (enc.lengths == 0).any():
        raise ValueError("every text needs at least one token; remove empty texts")
    codes = None
    if mrs is not None:
        if model.mr_vocab is None or len(mrs) != len(texts):
            raise ValueError("mrs needs an MR-conditioned checkpoint and one MR per text")
        codes = torch.tensor([model.mr_vocab.encode(mr) for mr in mrs])
    if model.route == "masked":
        if bound != "discrete":
            raise ValueError(f"a masked model's bound is a bound on the words: use bound='discrete', not {bound!r}")
        from .masked_route import masked_bits_per_token

        return masked_bits_per_token(model, enc, codes, samples=resolve_steps(steps, 16), batch_size=batch_size,
                                     generator=seeded_generator(seed))
    if steps is not None:
        steps = resolve_steps(steps, model.diffusion.num_timesteps)
    gen = seeded_generator(seed)
    alpha0, sigma0 = scales_at_step(diff, 0)
    out = []
    for start in range(0, len(texts), batch_size):
        part = slice(start, start + batch_size)
        mask = enc.mask[part]
        length = int(mask.sum(1).max())
        ids, mask = enc.ids[part, :length].to(dev), mask[:, :length].to(dev)
        cond = {"attention_mask": mask}
        if codes is not None:
            cond["mr"] = codes[part].to(dev)
        x0 = net.embed(ids)
        bpd, terms = diff.nll(denoiser_call(net, chain=False), x0, mask=mask[:, None, :], steps=steps,
                              generator=gen, return_terms=True, **cond)
        if bound == "discrete":
            bpd = bpd - terms["decoder"]  # the rounding term below is the decoder
        eps = torch.randn(x0.shape, generator=gen).to(dev)
        rounding_bits = rounding_loss(net, alpha0 * x0 + sigma0 * eps, ids, mask) / math.log(2.0)
        out.append((bpd.float() * net.embed_dim + rounding_bits.float()).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------- saving
def check_text_path(path: str | os.PathLike) -> Path:
    """``path`` as a Path if a text file can be written there, else a ValueError."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a file path such as samples.txt")
    return path


def save_text(samples: Sequence[str], path: str | os.PathLike) -> list[Path]:
    """Write the texts to a UTF-8 file, one per line; returns [path]."""
    if isinstance(samples, str) or not all(isinstance(s, str) for s in samples):
        raise ValueError("text samples must be a list of strings")
    path = check_text_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A newline inside a sample would split it over two lines of the file.
    path.write_text("".join(" ".join(s.split()) + "\n" for s in samples), encoding="utf-8")
    return [path]


# ---------------------------------------------------------------------------------- modality
class TextModality:
    """The ``text`` modality object registered with diffkit (see docs/interfaces.md)."""

    name = "text"

    def calibration_inputs(self, checkpoint: str, *, batch: int, data: int, device, generator: torch.Generator):
        """What ``diffkit calibrate`` fits on: unconditional texts of a typical length (half the
        longest), sampled as :func:`generate_text` does at its defaults (temperature, clamping to
        the word embeddings); no variances (the embedding route scores with its own rounding)."""
        from diffkit.calibration import CalibrationInputs

        model = load_text_model(checkpoint, device)
        net = model.net
        length = max(2, model.max_length // 2)
        lengths = torch.full((batch,), length, dtype=torch.long)
        attention_mask = padding_mask(lengths, model.device)
        call = denoiser_call(net, temperature=model.default_temperature,
                             guidance_mix=model.default("guidance_mix"))
        wrappers = [X0Transform(snap_to_embeddings(net, model.allowed, attention_mask))] if model.default_clamp else []
        return CalibrationInputs(call, model.diffusion, (batch, net.embed_dim, length),
                                 {"attention_mask": attention_mask}, {"wrappers": wrappers})

    def generate(self, *, checkpoint=None, num_samples: int = 16, seed: int | None = None,
                 device="auto", sampler: str | None = None, steps: int | None = None,
                 progress: bool = False, **cond: Any) -> list[str]:
        """A list of ``num_samples`` strings; conditions as in :func:`generate_text`."""
        return generate_text(checkpoint=checkpoint, num_samples=num_samples, seed=seed, device=device,
                             sampler=sampler, steps=steps, progress=progress, **cond)

    def save(self, samples: Sequence[str], path: str | os.PathLike) -> list[Path]:
        """One UTF-8 text file, one sample per line."""
        return save_text(samples, path)

    def check_output(self, path: str | os.PathLike) -> None:
        """What :meth:`save` would refuse, before any sampling."""
        check_text_path(path)

    def format_samples(self, samples: Sequence[str]) -> str:
        """The texts one per line, as ``diffkit generate text`` prints them without --out
        (the same lines ``save`` writes)."""
        if isinstance(samples, str) or not all(isinstance(s, str) for s in samples):
            raise ValueError("text samples must be a list of strings")
        return "\n".join(" ".join(s.split()) for s in samples)

    def nll_per_token(self, texts: Sequence[str], **kwargs: Any) -> torch.Tensor:
        """Bits per token of each text (see :func:`nll_per_token`)."""
        return nll_per_token(texts, **kwargs)

    def add_cli_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Options of ``diffkit generate text``; their names match generate's arguments."""
        group = parser.add_argument_group(
            "text options",
            "With no --checkpoint the shipped E2E model is used. Samples are printed (or, with --out, written) one per line.",
        )
        group.add_argument("--infill", metavar="TEMPLATE",
                           help=f'fill the {MASK} words of a template, e.g. "The Eagle is a {MASK} {MASK} '
                                'in the city centre ." (one word per [MASK]; the rest is kept)')
        group.add_argument("--control", action="append", metavar="SLOT=VALUE",
                           help="E2E meaning-representation slot to steer towards, repeatable: "
                                f"--control food=Italian --control area=riverside (slots: {', '.join(SLOTS)})")
        group.add_argument("--guidance-scale", type=float, metavar="W",
                           help="classifier-free guidance weight for --control (1 = none; default: the checkpoint's)")
        add_guidance_interval_argument(group)
        group.add_argument("--guidance-mix", choices=GUIDANCE_MIXES,
                           help="where guidance mixes: on the word logits (logits) or on the x0 estimates (x0); "
                                "default: the checkpoint's")
        group.add_argument("--classifier", metavar="DIR",
                           help="steer --control with this noisy-embedding classifier checkpoint instead of "
                                "classifier-free guidance (recipes/text_train.py --task classifier)")
        group.add_argument("--classifier-scale", type=float, metavar="S",
                           help="weight of the classifier's gradient (default: 1)")
        group.add_argument("--control-method", choices=CONTROL_METHODS,
                           help="with --classifier: classifier guidance (gradient, default) or Diffusion-LM's "
                                "Adagrad steps on each state (adagrad)")
        group.add_argument("--clamp", action=argparse.BooleanOptionalAction, default=None,
                           help="snap the x0 predictions to word embeddings at every step, Diffusion-LM's clamping "
                                "trick (default: the checkpoint's; on for a regression head, off for a softmax head)")
        group.add_argument("--temperature", type=float, metavar="T",
                           help="word temperature of a softmax-head model: below 1 each step leans towards the "
                                "likelier words (default: the checkpoint's)")
        group.add_argument("--top-p", type=float, metavar="P",
                           help="masked models: draw each word from the smallest set of words holding this much "
                                "probability (nucleus sampling; default: the checkpoint's)")
        group.add_argument("--threshold", type=float, metavar="P",
                           help="masked models, confidence sampler: also write at once every word drawn with at least "
                                "this probability (fewer network calls; default: the checkpoint's)")
        group.add_argument("--repeat-penalty", type=float, metavar="P",
                           help="softmax-head models: price (nats) on the same word at neighbouring positions, "
                                "against 'Italian Italian'; 10 removes most such repeats, at some cost in fluency "
                                "(default: 0, off)")
        group.add_argument("--best-of", type=int, default=1, metavar="K",
                           help="draw K candidates per text (same length and conditions) and keep the one "
                                "--rank-by prefers (default: 1)")
        group.add_argument("--rank-by", choices=RANKINGS,
                           help="with --best-of: the model's own denoising likelihood of the words (likelihood, "
                                "the default) or the candidate closest to the others in BLEU (mbr)")
        group.add_argument("--select-at", type=float, metavar="S",
                           help="with --best-of and the likelihood ranking: compare the candidates after this "
                                "share of the steps and finish only the kept one (default: 0.25; 1 compares "
                                "finished texts)")
        group.add_argument("--length", type=int, metavar="L",
                           help="tokens per sample (default: drawn from the training data's lengths)")
