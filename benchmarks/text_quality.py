"""Text modality: quality, control, likelihood and speed of the shipped E2E model, by sampler steps.

    OMP_NUM_THREADS=1 python benchmarks/text_quality.py                 # the shipped checkpoint
    OMP_NUM_THREADS=1 python benchmarks/text_quality.py --checkpoint runs/text-cpu/checkpoint \\
        --classifier runs/text-cpu-classifier/export --samples 64
    OMP_NUM_THREADS=1 python benchmarks/text_quality.py --quick         # a smoke run, not a measurement

Everything is measured on the E2E held-out split (123 meaning representations, 957 human
descriptions) that neither the diffusion model nor the judge saw:

- **judge and baseline**: a small autoregressive Transformer LM (causal, 4 layers of width 128,
  tied embeddings, about the diffusion network's size) trained here on the *training* split
  with the diffusion checkpoint's own tokenizer (so both models see the same tokens). It is
  the fluency judge (perplexity of the samples), the autoregressive baseline for generation
  time (KV-cached, batched) and for likelihood (bits per token), and its own samples get the
  same fluency row (scored by the model that wrote them: a flattering number).
- **fluency**: judge perplexity of unconditional samples beside that of held-out human text
  (the floor). Goal: within 1.5x of the human figure.
- **diversity**: distinct-1/2 (unique n-grams over all n-grams of the sample set).
- **copies**: the share of samples that are, word for word, a training description.
- **control**: (a) one slot at a time: for every (slot, value) pair of the held-out MRs,
  samples guided (classifier-free, the checkpoint's guidance scale and mix: on the word logits
  or on the x0 estimates; the other mix beside it at ``--other-mix-scales``) towards that value alone;
  success = the value appears in the text (token match; familyFriendly by a
  negation rule, see ``value_appears``), per slot and overall (Diffusion-LM reports 81% on
  this kind of task, FUDGE 69.9%); the same pairs without control show the chance rate.
  (b) whole MRs: one sample per held-out MR with all its slots, per-slot success.
  (c) the same measure on held-out human text against its own MR: how often people state a
  value in the MR's own words (priceRange "less than £20" is often "cheap"), the ceiling.
  With ``--classifier`` (a noisy-embedding classifier) (a) is repeated with classifier guidance.
- **likelihood**: the diffusion bound in bits per token on held-out text (the core's bound on
  the embeddings + the rounding term, ``TextModality.nll_per_token``), unconditional and given
  each text's MR, beside the AR model's bits per token (with and without its end token).
- **speed**: seconds per sentence, batched, at each step count, beside the AR model's.

Results go to ``benchmarks/results/text_quality_<name>.{md,json}``. Sample counts are flags;
the defaults (``--nll-steps 250``, here with ``--pair-samples 3``) ran in 587 s on one shared
core of the development machine, after the AR judge's 1,000 training steps (2,067 s there, once: it is cached in
``runs/text-ar``, keyed by its settings and the tokenizer).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffkit  # noqa: E402
from diffkit.runs import hardware_summary, seeded_generator  # noqa: E402
from diffkit.utils import replaced_atomically  # noqa: E402
from modalities.text.data import SLOTS, load_corpus  # noqa: E402
from modalities.text.modality import (  # noqa: E402
    FALLBACKS,
    RowConditions,
    TextSampling,
    _lengths,
    classifier_control,
    load_classifier,
    load_text_model,
    nll_per_token,
    padding_mask,
    sample_best_of,
    sample_ids,
)
from modalities.text.ranking import RANKINGS, SELECT_AT, CandidateChoice, choose_candidates  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The neighbour-repeat penalty measured beside the defaults (generate's repeat_penalty).
REPEAT_PENALTY = 10.0


# ---------------------------------------------------------------------------------- AR model
class CausalLM(nn.Module):
    """A small GPT: token + position embeddings, pre-norm causal self-attention blocks, tied
    output head. Token ``bos`` starts every text; the tokenizer's padding id ends it."""

    def __init__(self, vocab_size: int, hidden: int = 128, depth: int = 4, heads: int = 4,
                 max_length: int = 65, dropout: float = 0.1):
        super().__init__()
        self.vocab_size, self.hidden, self.heads, self.max_length = vocab_size + 1, hidden, heads, max_length
        self.bos = vocab_size
        self.tok = nn.Embedding(vocab_size + 1, hidden)
        self.pos = nn.Parameter(torch.randn(max_length, hidden) * 0.02)
        self.blocks = nn.ModuleList([Block(hidden, heads, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor, cache: list | None = None, offset: int = 0) -> torch.Tensor:
        h = self.drop(self.tok(ids) + self.pos[offset: offset + ids.shape[1]])
        for i, block in enumerate(self.blocks):
            h = block(h, None if cache is None else cache[i])
        return self.norm(h) @ self.tok.weight.t()

    def token_nll(self, ids: torch.Tensor, lengths: torch.Tensor, end_id: int) -> torch.Tensor:
        """(B, L+1) nats of each word and of the end token (zero after the end)."""
        batch, length = ids.shape
        inp = torch.cat([torch.full((batch, 1), self.bos, dtype=torch.long), ids], 1)
        target = torch.cat([ids, torch.full((batch, 1), end_id, dtype=torch.long)], 1)
        target[torch.arange(batch), lengths] = end_id
        nll = F.cross_entropy(self(inp).transpose(1, 2), target, reduction="none")
        keep = torch.arange(length + 1)[None] <= lengths[:, None]
        return nll * keep

    @torch.no_grad()
    def sample(self, n: int, end_id: int, generator: torch.Generator, max_new: int) -> list[list[int]]:
        """Ancestral sampling at temperature 1 with a KV cache; stops a row at its end token."""
        cache = [{} for _ in self.blocks]
        tokens = torch.full((n, 1), self.bos, dtype=torch.long)
        out = torch.zeros(n, 0, dtype=torch.long)
        done = torch.zeros(n, dtype=torch.bool)
        for step in range(max_new):
            logits = self(tokens, cache, offset=step)[:, -1].float()
            logits[:, self.bos] = float("-inf")
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            nxt = torch.where(done[:, None], torch.full_like(nxt, end_id), nxt)
            out = torch.cat([out, nxt], 1)
            done |= nxt[:, 0] == end_id
            if bool(done.all()):
                break
            tokens = nxt
        texts = []
        for row in out.tolist():
            texts.append(row[: row.index(end_id)] if end_id in row else row)
        return texts


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.drop = nn.Dropout(dropout)
        self.p = dropout

    def forward(self, h: torch.Tensor, cache: dict | None) -> torch.Tensor:
        batch, length, width = h.shape
        q, k, v = self.qkv(self.n1(h)).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:  # incremental decoding: one new position, earlier keys cached
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
        h = h + self.drop(self.proj(a.transpose(1, 2).reshape(batch, length, width)))
        return h + self.drop(self.mlp(self.n2(h)))


def train_ar(ids: torch.Tensor, lengths: torch.Tensor, vocab_size: int, end_id: int, *, steps: int,
             batch_size: int = 64, lr: float = 1e-3, seed: int = 0, log=print) -> CausalLM:
    """The judge/baseline: AdamW, linear warm-up then cosine decay, dropout 0.1, seeded."""
    torch.manual_seed(seed)
    model = CausalLM(vocab_size, max_length=ids.shape[1] + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, ids.shape[0], (batch_size,), generator=gen)
        length = int(lengths[idx].max())
        nll = model.token_nll(ids[idx, :length], lengths[idx], end_id)
        loss = nll.sum() / (lengths[idx] + 1).sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0:
            log(f"  AR step {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    return model.eval()


@torch.no_grad()
def ar_scores(model: CausalLM, tokenizer, texts: list[str], max_length: int) -> dict[str, float]:
    """Perplexity (words + end token), bits per word token, bits per token with the end token."""
    enc = tokenizer.encode(texts, max_length, warn=False)
    keep = enc.lengths > 0
    ids, lengths = enc.ids[keep], enc.lengths[keep]
    total_words = total_end = 0.0
    for start in range(0, ids.shape[0], 128):
        part = slice(start, start + 128)
        length = int(lengths[part].max())
        nll = model.token_nll(ids[part, :length], lengths[part], tokenizer.pad_id)
        end = nll.gather(1, lengths[part][:, None])[:, 0]
        total_end += float(end.sum())
        total_words += float(nll.sum() - end.sum())
    words = float(lengths.sum())
    return {"perplexity": math.exp((total_words + total_end) / (words + len(lengths))),
            "bits_per_token": total_words / words / math.log(2),
            "bits_per_token_with_end": (total_words + total_end) / (words + len(lengths)) / math.log(2)}


# ---------------------------------------------------------------------------------- metrics
def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def training_texts(tokenizer, encoded, texts: list[str]) -> set[str]:
    """The training texts, normalised, as written and as the tokenizer gives them back (rare words
    as [UNK], long texts truncated): a sample equal to either is a copy of a training text."""
    decoded = {normalise(tokenizer.decode(row[: int(n)].tolist())) for row, n in zip(encoded.ids, encoded.lengths)}
    return decoded | {normalise(t) for t in texts}


def repeat_share(texts: list[str]) -> float:
    """The share of texts with the same word twice in a row ("Italian Italian")."""
    return sum(any(a == b for a, b in zip(t.split(), t.split()[1:])) for t in texts) / max(1, len(texts))


def distinct(texts: list[str], n: int) -> float:
    grams = [tuple(words[i: i + n]) for words in (t.lower().split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def _tokens(tokenizer, text: str) -> list[str]:
    ids, _ = tokenizer.tokenize(text)
    return [tokenizer.decode([i]).lower() for i in ids]


def value_appears(tokenizer, text: str, slot: str, value: str) -> bool:
    """Does the text state slot=value? The value's tokens appear in order (case-insensitive);
    familyFriendly (yes/no) is a mention of family/kids/children with (no) or without (yes) a
    negation (not, no, n't, non, adults)."""
    words = _tokens(tokenizer, text)
    if slot == "familyFriendly":
        joined = " ".join(words)
        mention = any(w in joined for w in ("family", "kid", "child"))
        negated = any(f" {w} " in f" {joined} " for w in ("not", "no", "n't", "non", "isn", "adults", "adult"))
        return mention and (negated if value == "no" else not negated)
    target = _tokens(tokenizer, value)
    return any(words[i: i + len(target)] == target for i in range(len(words) - len(target) + 1))


# ---------------------------------------------------------------------------------- sampling
def diffusion_samples(model, n, *, steps, seed, mr=None, wrappers_fn=None, sampler=None, batch=128, clamp=None,
                      temperature=None, group_by_length=True, guidance_scale=None, guidance_interval=None,
                      repeat_penalty=None, guidance_mix=None):
    """n texts from the diffusion model (lengths drawn from the training lengths), in batches
    (``sample_ids`` groups each by length unless told not to); ``mr`` (n, S) codes guided with
    ``guidance_scale``, ``guidance_interval`` and ``guidance_mix`` (None: the checkpoint's); ``sampler``, ``clamp``,
    ``temperature`` and ``repeat_penalty`` None are the checkpoint's defaults; ``wrappers_fn(start, rows, mask)``
    the extra wrappers of rows ``start + rows``. Returns (texts, seconds)."""
    gen = seeded_generator(seed)
    sampler = sampler or model.default("sampler", "ddim")
    if mr is None:
        scale = 1.0
    else:
        scale = float(model.default("guidance_scale", 2.0) if guidance_scale is None else guidance_scale)
    texts, seconds = [], 0.0
    for start in range(0, n, batch):
        k = min(batch, n - start)
        lengths = _lengths(model, k, None, gen)
        extra = (lambda rows, mask, start=start: wrappers_fn(start, rows, mask)) if wrappers_fn else None
        t0 = time.perf_counter()
        with torch.no_grad():  # classifier guidance turns gradients on where it needs them
            ids = sample_ids(model, lengths, TextSampling(sampler, steps, scale, guidance_interval, clamp, temperature,
                                                          repeat_penalty, guidance_mix),
                             RowConditions(mr=None if mr is None else mr[start: start + k], extra_wrappers=extra),
                             generator=gen, group_by_length=group_by_length)
        seconds += time.perf_counter() - t0
        texts += [model.tokenizer.decode(row[: int(m)].tolist()) for row, m in zip(ids, lengths)]
    return texts, seconds


def best_of_samples(model, n, k, *, steps, seed, mr=None, batch=128):
    """n texts, each the best of ``k`` candidates of its length (and MR row of ``mr`` (n, S),
    guided at the checkpoint's defaults), as ``generate(best_of=k, ...)`` chooses them, in three
    ways: ``"likelihood"``, compared at the default share of the steps (:func:`sample_best_of`);
    ``"likelihood, finished"`` and ``"mbr, finished"``, both compared when finished, on the
    same candidates. {way: (texts, seconds)}."""
    gen = seeded_generator(seed)
    scale = 1.0 if mr is None else float(model.default("guidance_scale", 2.0))
    settings = TextSampling(model.default("sampler", "ddim"), steps, scale)
    out = {way: ([], 0.0) for way in ("likelihood", "likelihood, finished", "mbr, finished")}

    def add(way, ids, lengths, seconds):
        texts, total = out[way]
        texts += [model.tokenizer.decode(row[: int(m)].tolist()) for row, m in zip(ids, lengths)]
        out[way] = (texts, total + seconds)

    per_batch = max(1, batch // k)
    for start in range(0, n, per_batch):
        m = min(per_batch, n - start)
        lengths = _lengths(model, m, None, gen)
        rows_mr = None if mr is None else mr[start: start + m].repeat_interleave(k, 0)
        t0 = time.perf_counter()
        with torch.no_grad():
            ids = sample_best_of(model, lengths, settings, RowConditions(mr=rows_mr), CandidateChoice(k),
                                 generator=gen)
        add("likelihood", ids, lengths, time.perf_counter() - t0)
        candidate_lengths = lengths.repeat_interleave(k)
        t0 = time.perf_counter()
        with torch.no_grad():
            ids = sample_ids(model, candidate_lengths, settings, RowConditions(mr=rows_mr), generator=gen)
        drawn = time.perf_counter() - t0
        for ranking in RANKINGS:
            t0 = time.perf_counter()
            keep = choose_candidates(model.net, model.diffusion, ids, padding_mask(candidate_lengths), group_size=k,
                                     rank_by=ranking, generator=gen, mr=rows_mr)
            add(f"{ranking}, finished", ids[keep], lengths, drawn + time.perf_counter() - t0)
    return out


def control_rates(tokenizer, texts, targets) -> dict[str, float]:
    """Per slot and overall: the share of (text, slot=value) targets whose value appears, and
    ``all_se``, the binomial standard error of the overall share."""
    hits: dict[str, list[bool]] = {}
    for text, target in zip(texts, targets):
        for slot, value in target.items():
            hits.setdefault(slot, []).append(value_appears(tokenizer, text, slot, value))
    out = {slot: sum(h) / len(h) for slot, h in sorted(hits.items(), key=lambda kv: SLOTS.index(kv[0]))}
    every = [x for h in hits.values() for x in h]
    out["all"] = sum(every) / max(1, len(every))
    out["all_se"] = math.sqrt(out["all"] * (1 - out["all"]) / max(1, len(every)))
    return out


# ---------------------------------------------------------------------------------- main
def judge(tok, enc, max_length: int, steps: int, seed: int, cache_path: str, log) -> tuple[CausalLM, float]:
    """The AR judge/baseline trained on the encoded training texts, or read from its cache when
    one trained with the same settings and tokenizer is there; (model, its training seconds)."""
    cache = ROOT / cache_path if not Path(cache_path).is_absolute() else Path(cache_path)
    key = {"steps": steps, "seed": seed, "vocab": tok.vocab_size, "max_length": max_length,
           "tokenizer": hashlib.sha256(tok.to_str().encode()).hexdigest()}
    # Cached as safetensors with the key in its metadata: loading never unpickles anything.
    cached = _read_ar_cache(cache)
    if cached is not None and cached[0] == key:
        _, state, train_s = cached
        ar = CausalLM(tok.vocab_size, max_length=max_length + 1)
        ar.load_state_dict(state)
        log(f"AR model from {cache}")
        return ar.eval(), train_s
    log(f"training the AR judge/baseline ({steps} steps)")
    t0 = time.perf_counter()
    ar = train_ar(enc.ids, enc.lengths, tok.vocab_size, tok.pad_id, steps=steps, seed=seed, log=log)
    train_s = time.perf_counter() - t0
    with replaced_atomically(cache) as staging:  # 35 minutes of training: never a half-written cache
        save_file({k: v.detach().contiguous() for k, v in ar.state_dict().items()}, str(staging),
                  metadata={"key": json.dumps(key, sort_keys=True), "train_s": repr(train_s)})
    return ar, train_s



def _read_ar_cache(path: Path):
    """(key, state dict, training seconds) of a cached AR model, or None when there is none to use."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()}
        return json.loads(metadata["key"]), state, float(metadata["train_s"])
    except (SafetensorError, KeyError, ValueError, OSError):
        return None  # an old or damaged cache: train again


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="text checkpoint (default: the shipped one)")
    p.add_argument("--classifier", default=None, help="noisy-embedding classifier checkpoint: also measure its control")
    p.add_argument("--classifier-scale", type=float, default=None)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 200])
    p.add_argument("--samples", type=int, default=100, help="unconditional samples per step count")
    p.add_argument("--pair-samples", type=int, default=1, help="samples per held-out (slot, value) pair")
    p.add_argument("--detail-steps", type=int, default=50,
                   help="the step count at which whole-MR control, the uncontrolled chance rate and the "
                        "variant rows (other sampler, temperature 1, clamping flipped) are measured")
    p.add_argument("--guidance-scales", type=float, nargs="*", default=[2.0, 2.5, 4.0],
                   help="other classifier-free guidance scales given a single-slot and a whole-MR control row at "
                        "--detail-steps (the checkpoint's own scale is always measured)")
    p.add_argument("--other-mix-scales", type=float, nargs="*", default=[5.0, 10.0],
                   help="scales given a single-slot control row with guidance mixed the other way (on the x0 "
                        "estimates if the checkpoint mixes on the word logits, and the reverse), at --detail-steps")
    p.add_argument("--compare-samplers", nargs="*", default=["ddim"],
                   help="other samplers given an unconditional row at --detail-steps (default: ddim)")
    p.add_argument("--best-of", type=int, nargs="*", default=[], metavar="K",
                   help="also at each step count: unconditional texts, each the best of K candidates "
                        "(generate's best_of): by likelihood compared early (the default), and by likelihood and by "
                        "MBR compared when finished; and single-slot control, by likelihood compared early")
    p.add_argument("--nll-texts", type=int, default=64, help="held-out texts for the likelihood bound")
    p.add_argument("--nll-steps", type=int, default=250, help="chain of the bound (the model's T for the full bound)")
    p.add_argument("--no-nll", action="store_true", help="skip the likelihood bounds")
    p.add_argument("--ar-steps", type=int, default=1000, help="training steps of the AR judge/baseline")
    p.add_argument("--ar-only", action="store_true", help="only train (and cache) the AR judge/baseline, then stop")
    p.add_argument("--ar-cache", default="runs/text-ar/ar_lm.safetensors", help="where the AR model is kept between runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="e2e")
    p.add_argument("--out-dir", help="where the .md/.json go (default: benchmarks/results; a temporary folder with "
                                     "--quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run, not a measurement: 64 training and 16 held-out texts, an AR judge of 2 steps "
                        "(not cached), 4 samples and 1 sample per control pair at 2 steps, no extra scales or samplers, a 2-step bound on 2 texts; writes "
                        "to a temporary folder unless --out-dir is given")
    args = p.parse_args(argv)
    scratch = None
    if args.quick:
        scratch = tempfile.TemporaryDirectory(prefix="text_quality-quick-")  # removed when main returns
        args.steps, args.detail_steps, args.samples, args.pair_samples = [2], 2, 4, 1
        args.guidance_scales, args.other_mix_scales, args.compare_samplers = [], [], []
        args.nll_texts, args.nll_steps, args.ar_steps = 2, 2, 2
        args.ar_cache = str(Path(scratch.name) / "ar_lm.safetensors")
        args.out_dir = args.out_dir or scratch.name
    args.out_dir = args.out_dir or str(ROOT / "benchmarks" / "results")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    began = time.perf_counter()
    log = lambda *a: print(*a, flush=True)  # noqa: E731

    model = load_text_model(args.checkpoint, "cpu")
    if model.route == "masked":  # a masked model's table is every route's, beside the same baseline
        import text_routes

        forwarded = ["--checkpoint", str(model.path), "--seed", str(args.seed), "--name", args.name,
                     "--ar-steps", str(args.ar_steps), "--ar-cache", args.ar_cache,
                     *(["--out-dir", args.out_dir] if args.out_dir else []), *(["--quick"] if args.quick else [])]
        return text_routes.main(forwarded)
    tok = model.tokenizer
    train = load_corpus(model.info.get("data", "e2e"), "train")
    held = load_corpus(model.info.get("data", "e2e"), "eval")
    if args.quick:  # a few texts of each split: the smoke run checks the code, not the figures
        train, held = (dataclasses.replace(c, texts=c.texts[:n], mrs=None if c.mrs is None else c.mrs[:n])
                       for c, n in ((train, 64), (held, 16)))
    log(f"checkpoint {model.path} (step {diffkit.load_checkpoint(model.path).step}); "
        f"{len(train)} training / {len(held)} held-out texts; {hardware_summary()}")
    n_params = sum(p.numel() for p in model.net.parameters())

    # ---- the AR judge / baseline
    enc = tok.encode(train.texts, model.max_length, warn=False)
    ar, ar_train_s = judge(tok, enc, model.max_length, args.ar_steps, args.seed, args.ar_cache, log)
    ar_params = sum(p.numel() for p in ar.parameters())
    if args.ar_only:
        return 0
    human = {**ar_scores(ar, tok, held.texts, model.max_length), "repeats": repeat_share(held.texts)}
    train_fit = ar_scores(ar, tok, train.texts[::10], model.max_length)
    log(f"AR {ar_params / 1e6:.2f}M parameters; held-out human perplexity {human['perplexity']:.2f} "
        f"(training texts {train_fit['perplexity']:.2f})")

    train_set = training_texts(tok, enc, train.texts)

    def quality(texts):
        return {"perplexity": ar_scores(ar, tok, texts, model.max_length)["perplexity"],
                "distinct_1": distinct(texts, 1), "distinct_2": distinct(texts, 2),
                "copies": sum(normalise(t) in train_set for t in texts) / len(texts),
                "repeats": repeat_share(texts)}

    results: dict = {"checkpoint": str(model.path), "hardware": hardware_summary(), "seed": args.seed,
                     "clamp": model.default_clamp, "temperature": model.default_temperature,
                     "sampler": model.default("sampler", "ddim"),
                     "guidance_scale": float(model.default("guidance_scale", 2.0)),
                     "guidance_interval": model.default("guidance_interval", None),
                     "guidance_mix": model.default("guidance_mix"),
                     "command": "python " + " ".join(["benchmarks/text_quality.py", *(argv or sys.argv[1:])]),
                     "diffusion_parameters": n_params, "ar_parameters": ar_params, "ar_train_s": ar_train_s,
                     "ar_steps": args.ar_steps, "human": human, "ar_on_training_texts": train_fit,
                     "samples": args.samples, "steps": {}}

    # ---- the AR baseline's own samples and time
    g = seeded_generator(args.seed)
    t0 = time.perf_counter()
    ar_ids = ar.sample(args.samples, tok.pad_id, g, model.max_length)
    ar_s = (time.perf_counter() - t0) / args.samples
    ar_texts = [tok.decode(ids) for ids in ar_ids]
    results["ar"] = {**quality(ar_texts), "seconds_per_sentence": ar_s, "examples": ar_texts[:8]}
    log(f"AR samples: {results['ar']}")

    # ---- control targets: every (slot, value) pair of the held-out MRs, and the whole MRs
    pairs = sorted({(slot, value) for mr in held.mrs for slot, value in mr.items()},
                   key=lambda kv: (SLOTS.index(kv[0]), kv[1]))
    single = [{slot: value} for slot, value in pairs for _ in range(args.pair_samples)]
    whole = []
    for mr in held.mrs:
        if mr not in whole:
            whole.append(mr)
    vocab = model.mr_vocab
    single_codes = torch.tensor([vocab.encode(t, partial=True) for t in single]) if vocab else None
    whole_codes = torch.tensor([vocab.encode(m) for m in whole]) if vocab else None
    log(f"control: {len(pairs)} held-out (slot, value) pairs x {args.pair_samples}, {len(whole)} whole MRs")
    if vocab is not None:
        # The measure's ceiling: how often human writers state each value in these words.
        results["control_human"] = control_rates(tok, held.texts, held.mrs)
        log(f"control, held-out human text against its own MR: {results['control_human']}")

    clf = load_classifier(args.classifier, model) if args.classifier else None

    for steps in args.steps:
        t_step = time.perf_counter()
        row: dict = {}
        texts, secs = diffusion_samples(model, args.samples, steps=steps, seed=args.seed)
        row["unconditional"] = {**quality(texts), "seconds_per_sentence": secs / len(texts), "examples": texts[:8]}
        if steps == args.detail_steps:
            # The same seed with one sampling default changed at a time: what each choice is worth
            # (without length groups the noise is drawn in another shape, so those texts differ by their draws too).
            variants = {f"clamping trick {'off' if model.default_clamp else 'on'}": {"clamp": not model.default_clamp}}
            if model.default_temperature != 1.0:
                variants["word temperature 1"] = {"temperature": 1.0}
            variants["one batch padded to the longest (no length groups)"] = {"group_by_length": False}
            variants[f"repeat penalty {REPEAT_PENALTY:g}"] = {"repeat_penalty": REPEAT_PENALTY}
            for other in args.compare_samplers:
                if other != model.default("sampler", "ddim"):
                    variants[f"sampler {other}"] = {"sampler": other}
            row["variants"] = {}
            for label, change in variants.items():
                texts_v, secs = diffusion_samples(model, args.samples, steps=steps, seed=args.seed, **change)
                row["variants"][label] = {**quality(texts_v), "seconds_per_sentence": secs / len(texts_v),
                                          "examples": texts_v[:8]}
        if vocab is not None and steps == args.detail_steps:
            # the same number of samples, unguided, for the chance rate of each pair
            free, _ = diffusion_samples(model, len(single), steps=steps, seed=args.seed + 1)
            row["control_none"] = control_rates(tok, free, single)
        if vocab is not None:
            guided, secs = diffusion_samples(model, len(single), steps=steps, seed=args.seed + 2, mr=single_codes)
            row["control_single"] = {**control_rates(tok, guided, single), **quality(guided),
                                     "seconds_per_sentence": secs / len(guided),
                                     "examples": [f"{t} => {s}" for t, s in list(zip(single, guided))[::9][:8]]}
        if vocab is not None and steps == args.detail_steps:
            # Control against fluency: the same pairs and draws at other guidance scales.
            row["control_scales"] = {}
            for scale in args.guidance_scales:
                if scale != float(model.default("guidance_scale", 2.0)):
                    guided, _ = diffusion_samples(model, len(single), steps=steps, seed=args.seed + 2,
                                                  mr=single_codes, guidance_scale=scale)
                    row["control_scales"][scale] = {**control_rates(tok, guided, single), **quality(guided)}
            # The same draws with guidance mixed the other way: on the x0 estimates or on the word logits.
            other = "x0" if results["guidance_mix"] == "logits" else "logits"
            row["control_other_mix"] = {"mix": other, "scales": {}}
            for scale in args.other_mix_scales:
                guided, _ = diffusion_samples(model, len(single), steps=steps, seed=args.seed + 2, mr=single_codes,
                                              guidance_scale=scale, guidance_mix=other)
                row["control_other_mix"]["scales"][scale] = {**control_rates(tok, guided, single), **quality(guided)}
            if model.default("guidance_interval", None) is not None:
                # What the checkpoint's guidance interval saves: the same draws guided at every step.
                guided, secs = diffusion_samples(model, len(single), steps=steps, seed=args.seed + 2,
                                                 mr=single_codes, guidance_interval=(0.0, None))
                row["control_every_step"] = {**control_rates(tok, guided, single), **quality(guided),
                                             "seconds_per_sentence": secs / len(guided)}
            # The same draws with the neighbour-repeat penalty (generate's repeat_penalty).
            guided, _ = diffusion_samples(model, len(single), steps=steps, seed=args.seed + 2, mr=single_codes,
                                          repeat_penalty=REPEAT_PENALTY)
            row["control_repeat_penalty"] = {**control_rates(tok, guided, single), **quality(guided)}
            mrs, secs = diffusion_samples(model, len(whole), steps=steps, seed=args.seed + 3, mr=whole_codes)
            row["control_whole"] = {**control_rates(tok, mrs, whole), **quality(mrs),
                                    "examples": [f"{m} => {s}" for m, s in list(zip(whole, mrs))[:4]]}
            # A whole MR moves the logits further than one slot: the same MRs at the other scales.
            row["control_whole_scales"] = {}
            for scale in args.guidance_scales:
                if scale != float(model.default("guidance_scale", 2.0)):
                    mrs, _ = diffusion_samples(model, len(whole), steps=steps, seed=args.seed + 3, mr=whole_codes,
                                               guidance_scale=scale)
                    row["control_whole_scales"][scale] = {**control_rates(tok, mrs, whole), **quality(mrs)}
        if clf is not None and steps == args.detail_steps:
            codes = torch.tensor([clf.mr_vocab.encode(t, partial=True) for t in single])
            scale = 1.0 if args.classifier_scale is None else args.classifier_scale

            def wrappers_fn(start, rows, mask, codes=codes, scale=scale):  # bound now, not at call time
                return [classifier_control(clf, codes[start + rows], mask, "gradient", scale)]

            steered, secs = diffusion_samples(model, len(single), steps=steps, seed=args.seed + 2,
                                              wrappers_fn=wrappers_fn)
            row["control_classifier"] = {**control_rates(tok, steered, single), **quality(steered),
                                         "seconds_per_sentence": secs / len(steered)}
        for k in args.best_of:
            for way, (texts_k, secs) in best_of_samples(model, args.samples, k, steps=steps, seed=args.seed).items():
                row.setdefault("best_of", {})[f"{k} {way}"] = {
                    **quality(texts_k), "seconds_per_sentence": secs / len(texts_k), "examples": texts_k[:8]}
            if vocab is not None:
                # The finished comparisons are drawn here too, unreported: without them the generator's later
                # draws, and so the published rows, would change.
                texts_k, secs = best_of_samples(model, len(single), k, steps=steps, seed=args.seed + 2,
                                                mr=single_codes)["likelihood"]
                row.setdefault("control_best_of", {})[k] = {**control_rates(tok, texts_k, single), **quality(texts_k),
                                                            "seconds_per_sentence": secs / len(texts_k)}
        results["steps"][steps] = row
        log(f"{steps} steps ({time.perf_counter() - t_step:.0f} s): " + json.dumps(
            {k: {m: (round(v, 3) if isinstance(v, float) else None) for m, v in r.items() if m != "examples"}
             for k, r in row.items()}))

    # ---- likelihood on held-out text
    results["wall_s"] = time.perf_counter() - began
    if args.no_nll:
        write(results, Path(args.out_dir), args.name)
        return 0
    t0 = time.perf_counter()
    texts = held.texts[:: max(1, len(held.texts) // args.nll_texts)][: args.nll_texts]
    mrs = held.mrs[:: max(1, len(held.texts) // args.nll_texts)][: args.nll_texts]
    nll_steps = None if args.nll_steps >= model.diffusion.num_timesteps else args.nll_steps
    enc_h = tok.encode(texts, model.max_length, warn=False)
    weights = enc_h.lengths.float()
    results["nll"] = {"texts": len(texts), "chain_steps": args.nll_steps,
                      "ar": ar_scores(ar, tok, texts, model.max_length)}
    for bound in ("discrete", "embedding"):
        with torch.no_grad():
            uncond = nll_per_token(texts, checkpoint=model.path, steps=nll_steps, seed=args.seed, device="cpu",
                                   bound=bound)
            cond = nll_per_token(texts, checkpoint=model.path, steps=nll_steps, seed=args.seed, device="cpu",
                                 mrs=mrs, bound=bound) if vocab else None
        results["nll"][bound] = {
            "bits_per_token": float((uncond * weights).sum() / weights.sum()),
            "bits_per_token_given_mr": float((cond * weights).sum() / weights.sum()) if cond is not None else None}
    results["nll"]["seconds"] = time.perf_counter() - t0
    log(f"likelihood: {results['nll']}")
    results["wall_s"] = time.perf_counter() - began
    write(results, Path(args.out_dir), args.name)
    return 0


MIX_WORDS = {"logits": "mixed on the word logits", "x0": "mixed on the x0 estimates"}


def guidance_interval_words(interval) -> str:
    """A recorded guidance interval ([low, high], null for an open end) as words for the tables."""
    if interval is None:
        return ""
    low, high = interval
    return f", guided where sigma/alpha >= {low:g}" if high is None else f", guided where {low:g} <= sigma/alpha <= {high:g}"


def _repeats(row: dict) -> str:
    return f"{row['repeats']:.3f}" if "repeats" in row else ""


def _se(rates: dict) -> str:
    return f" +- {rates['all_se']:.2f}" if "all_se" in rates else ""


def write(results: dict, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"text_quality_{name}.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n",
                                                       encoding="utf-8")
    h = results["human"]["perplexity"]
    lines = [f"# Text quality: {results['checkpoint'].split('/')[-1]}", "",
             f"`{results['command']}` (seed {results['seed']}), {results['hardware']}, "
             f"{results['wall_s']:.0f} s.", "",
             f"Judge: an autoregressive Transformer LM ({results['ar_parameters'] / 1e6:.2f}M parameters, "
             f"{results['ar_steps']} steps on the training split, {results['ar_train_s']:.0f} s); "
             f"diffusion network {results['diffusion_parameters'] / 1e6:.2f}M parameters. "
             f"{results['samples']} unconditional samples per row; `adjacent repeats` is the share of texts with the "
             "same word twice in a row. The checkpoint's sampling defaults unless a row "
             f"says: sampler {results['sampler']}, word temperature {results['temperature']:g}, clamping trick "
             f"{'on' if results['clamp'] else 'off'}, guidance scale {results['guidance_scale']:g} for control"
             f"{guidance_interval_words(results.get('guidance_interval'))}, "
             f"{MIX_WORDS[results.get('guidance_mix', FALLBACKS.guidance_mix)]}.", "",
             "| samples | steps | perplexity | x human | distinct-1 | distinct-2 | copies | adjacent repeats | s / sentence |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| held-out human text (floor) | | {h:.2f} | 1.00 | | | | {_repeats(results['human'])} | |"]
    ar = results["ar"]
    lines.append(f"| AR baseline (scored by itself) | | {ar['perplexity']:.2f} | {ar['perplexity'] / h:.2f} | "
                 f"{ar['distinct_1']:.3f} | {ar['distinct_2']:.3f} | {ar['copies']:.2f} | {_repeats(ar)} | "
                 f"{ar['seconds_per_sentence'] * 1000:.1f} ms |")
    for steps, row in results["steps"].items():
        u = row["unconditional"]
        lines.append(f"| diffusion, unconditional | {steps} | {u['perplexity']:.2f} | {u['perplexity'] / h:.2f} | "
                     f"{u['distinct_1']:.3f} | {u['distinct_2']:.3f} | {u['copies']:.2f} | {_repeats(u)} | "
                     f"{u['seconds_per_sentence'] * 1000:.1f} ms |")
    for steps, row in results["steps"].items():
        for label, u in row.get("variants", {}).items():
            lines.append(f"| diffusion, unconditional, {label} | {steps} | {u['perplexity']:.2f} | "
                         f"{u['perplexity'] / h:.2f} | {u['distinct_1']:.3f} | {u['distinct_2']:.3f} | "
                         f"{u['copies']:.2f} | {_repeats(u)} | {u['seconds_per_sentence'] * 1000:.1f} ms |")
    for steps, row in results["steps"].items():
        for label, u in row.get("best_of", {}).items():
            k, way = label.split(" ", 1)
            if way == "likelihood":
                way = f"likelihood, compared at {SELECT_AT:g} of the steps"
            lines.append(f"| diffusion, unconditional, best of {k} by {way} | {steps} | {u['perplexity']:.2f} | "
                         f"{u['perplexity'] / h:.2f} | {u['distinct_1']:.3f} | {u['distinct_2']:.3f} | "
                         f"{u['copies']:.2f} | {_repeats(u)} | {u['seconds_per_sentence'] * 1000:.1f} ms |")
    for steps, row in results["steps"].items():
        if "control_single" in row:
            c = row["control_single"]
            lines.append(f"| diffusion, one slot controlled | {steps} | {c['perplexity']:.2f} | "
                         f"{c['perplexity'] / h:.2f} | {c['distinct_1']:.3f} | {c['distinct_2']:.3f} | "
                         f"{c['copies']:.2f} | {_repeats(c)} | {c['seconds_per_sentence'] * 1000:.1f} ms |")
    first = next(iter(results["steps"].values()))
    if "control_single" in first:
        slots = [s for s in SLOTS if s in first["control_single"]]
        lines += ["", "Control success (the requested value appears in the text), one slot at a time over every "
                  "(slot, value) pair of the held-out MRs; `none` is the same targets without control; `all` is given with "
                  "its binomial standard error; `perplexity` is the judge's on the same samples:", "",
                  "| control | steps | " + " | ".join(slots) + " | all | perplexity |",
                  "|---|---|" + "---|" * (len(slots) + 2)]
        scale = results["guidance_scale"]
        interval = guidance_interval_words(results.get("guidance_interval")).removeprefix(", ")
        for kind in ("control_none", "control_single", "control_best_of", "control_every_step",
                     "control_repeat_penalty", "control_scales", "control_other_mix", "control_classifier", "control_whole",
                     "control_whole_scales"):
            for steps, row in results["steps"].items():
                if kind not in row:
                    continue
                if kind == "control_scales":
                    labelled = {f"classifier-free (scale {w:g}), one slot": r for w, r in row[kind].items()}
                elif kind == "control_best_of":
                    labelled = {f"classifier-free (scale {scale:g}), one slot, best of {k} by likelihood at {SELECT_AT:g} "
                                f"({r['seconds_per_sentence'] * 1000:.0f} ms a sentence)": r for k, r in row[kind].items()}
                elif kind == "control_whole_scales":
                    labelled = {f"classifier-free (scale {w:g}), whole MR": r for w, r in row[kind].items()}
                elif kind == "control_other_mix":
                    labelled = {f"classifier-free (scale {w:g}), one slot, {MIX_WORDS[row[kind]['mix']]}": r
                                for w, r in row[kind]["scales"].items()}
                elif kind == "control_repeat_penalty":
                    labelled = {f"classifier-free (scale {scale:g}), one slot, repeat penalty {REPEAT_PENALTY:g} "
                                f"(adjacent repeats {row[kind]['repeats']:.2f} against "
                                f"{row['control_single']['repeats']:.2f})": row[kind]}
                elif kind == "control_every_step":
                    own = row["control_single"]["seconds_per_sentence"] * 1000
                    labelled = {f"classifier-free (scale {scale:g}), one slot, guided at every step "
                                f"({row[kind]['seconds_per_sentence'] * 1000:.0f} ms a sentence against "
                                f"{own:.0f} ms with the interval {interval})": row[kind]}
                else:
                    labelled = {{"control_none": "none", "control_single": f"classifier-free (scale {scale:g}), one slot",
                                 "control_classifier": "noisy-embedding classifier, one slot",
                                 "control_whole": f"classifier-free (scale {scale:g}), whole MR"}[kind]: row[kind]}
                for label, r in labelled.items():
                    ppl = f"{r['perplexity']:.1f}" if "perplexity" in r else ""
                    lines.append(f"| {label} | {steps} | " + " | ".join(
                        f"{r[s]:.2f}" if s in r else "" for s in slots) + f" | **{r['all']:.2f}**{_se(r)} | {ppl} |")
        if "control_human" in results:
            r = results["control_human"]
            lines.append("| held-out human text, its own whole MR (the measure's ceiling) | | " + " | ".join(
                f"{r[s]:.2f}" if s in r else "" for s in slots) + f" | **{r['all']:.2f}**{_se(r)} | |")
    nll = results.get("nll")
    if nll:
        lines += ["", f"Likelihood on {nll['texts']} held-out texts, bits per token. Diffusion: upper bounds over a "
                  f"{nll['chain_steps']}-step chain; `discrete` bounds -log2 p(words) (prior + KL terms + the rounding "
                  "term as decoder), `embedding` is Diffusion-LM's quantity (the bound on the continuous embeddings, "
                  "Gaussian decoder, plus rounding), a density that can go below zero and is not comparable with the AR "
                  "model's:", "",
                  "| model | bits / token |", "|---|---|"]
        for bound in ("discrete", "embedding"):
            lines.append(f"| diffusion, {bound}, unconditional | {nll[bound]['bits_per_token']:.2f} |")
            if nll[bound]["bits_per_token_given_mr"] is not None:
                lines.append(f"| diffusion, {bound}, given the MR | {nll[bound]['bits_per_token_given_mr']:.2f} |")
        lines += [f"| AR baseline, words only | {nll['ar']['bits_per_token']:.2f} |",
                  f"| AR baseline, words + end token | {nll['ar']['bits_per_token_with_end']:.2f} |"]
    lines += ["", "Examples (50 steps or the middle row):", ""]
    mid = results["steps"].get(50) or list(results["steps"].values())[len(results["steps"]) // 2]
    lines += [f"- {t}" for t in mid["unconditional"]["examples"][:5]]
    lines += [f"- {t}" for t in mid.get("control_single", {}).get("examples", [])[:5]]
    (out_dir / f"text_quality_{name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
