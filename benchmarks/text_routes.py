"""Text: every route's fluency against its time, beside the autoregressive baseline, in one run.

    OMP_NUM_THREADS=1 python benchmarks/text_routes.py                # the shipped masked and embedding models
    OMP_NUM_THREADS=1 python benchmarks/text_routes.py --checkpoint runs/text-masked-cpu/export
    OMP_NUM_THREADS=1 python benchmarks/text_routes.py --quick        # a smoke run, not a measurement

``benchmarks/text_quality.py`` hands a masked checkpoint to this script. The judge and baseline
are text_quality's: a small autoregressive Transformer (the same width and depth as the masked
network) trained on the E2E training split with the checkpoints' tokenizer, cached between runs.
Everything is measured on the held-out split.

Rows, one sample per text, no best-of:

- **AR baseline**: its own samples (temperature 1, KV cache, one batch), scored by itself.
- **block diffusion** (the masked checkpoint's default reading): blocks of ``block_size`` words
  one after another, masked diffusion inside each, ``steps`` per block; the model ends the text.
- **plain masked diffusion** (the same network reading the whole text at once): lengths drawn
  from the training lengths, ``steps`` over the whole text.
- **embedding route** (Diffusion-LM, ``--embedding-checkpoint``) and its 5-step student
  (``--distilled-checkpoint``), at their own defaults.

Each row gives the judge's perplexity (and its ratio to held-out human text), distinct-2 and
unigram entropy (beside human text's: a low-entropy sampler can buy a low perplexity), verbatim
copies of training texts, adjacent repeated words, the share of distinct outputs, time per
sentence (all samples in one batch, as the baseline's) and its ratio to the baseline's, and the
network calls the batch needed. Then single-slot control (classifier-free guidance towards each
(slot, value) pair of the held-out MRs) for the default reading, the bound in bits per token
beside the baseline's, and the goals, each marked met or not.

Results go to ``benchmarks/results/text_routes_<name>.{md,json}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from diffkit.runs import hardware_summary, seeded_generator  # noqa: E402
from modalities.text.data import SLOTS, load_corpus  # noqa: E402
from modalities.text.masked_route import (  # noqa: E402
    MaskedTextSampling,
    fill_masked_ids,
    masked_bits_per_token,
    request_settings,
    sample_masked_ids,
)
from modalities.text.modality import (  # noqa: E402
    DEFAULT_CHECKPOINT,
    EMBEDDING_CHECKPOINT,
    TextRequest,
    _lengths,
    load_text_model,
)
from text_quality import (  # noqa: E402
    ar_scores,
    control_rates,
    diffusion_samples,
    distinct,
    judge,
    normalise,
    repeat_share,
    training_texts,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MASKED = DEFAULT_CHECKPOINT
DEFAULT_EMBEDDING = EMBEDDING_CHECKPOINT
DEFAULT_DISTILLED = ROOT / "modalities" / "text" / "checkpoints" / "e2e-5step"


def text_scores(judge_model, tokenizer, max_length: int, train_set: set[str], texts: list[str]) -> dict[str, float]:
    """What a row of texts is scored by: the judge's perplexity (an empty text read as "."),
    distinct-2, unigram entropy, the share of copies of ``train_set`` (:func:`training_texts`),
    of adjacent repeated words and of distinct outputs."""
    return {"perplexity": ar_scores(judge_model, tokenizer, [t if t.strip() else "." for t in texts],
                                    max_length)["perplexity"],
            "distinct_2": distinct(texts, 2), "entropy": unigram_entropy(texts),
            "copies": sum(normalise(t) in train_set for t in texts) / len(texts),
            "repeats": repeat_share(texts), "distinct_outputs": len({normalise(t) for t in texts}) / len(texts)}


def unigram_entropy(texts: list[str]) -> float:
    """Entropy in bits of the word distribution over all the texts."""
    counts = Counter(w for t in texts for w in t.lower().split())
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


class _Counted:
    """A network whose calls (including those through its block cache) are counted."""

    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.net, name)

    def block_cache(self, batch, **cond):
        cache = self.net.block_cache(batch, **cond)
        logits = cache.logits

        def counted(x_block, t=None, rows=None):
            self.calls += 1
            return logits(x_block, t, rows)
        cache.logits = counted
        return cache


def masked_samples(model, n: int, settings: MaskedTextSampling, *, reading: str, seed: int, mr=None, repeats: int = 1):
    """(texts, seconds for the batch: the fastest of ``repeats`` identical runs, network calls)
    of ``n`` texts in one batch."""
    tok, best = model.tokenizer, math.inf
    for _ in range(repeats):
        gen = seeded_generator(seed)
        counted = _Counted(model.net)
        t0 = time.perf_counter()
        with torch.no_grad():
            if reading == "block":
                rows = sample_masked_ids(counted, model.diffusion, tok, n, settings, mr=mr, generator=gen)
                texts = [tok.decode(row) for row in rows]
            else:
                lengths = _lengths(model, n, None, gen)
                ids = fill_masked_ids(counted, model.diffusion, tok, lengths, settings, mr=mr, generator=gen)
                texts = [tok.decode(row[: int(k)].tolist()) for row, k in zip(ids, lengths)]
        best = min(best, time.perf_counter() - t0)
    return texts, best, counted.calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(DEFAULT_MASKED), help="masked text checkpoint (default: the shipped one)")
    p.add_argument("--embedding-checkpoint", default=str(DEFAULT_EMBEDDING),
                   help="embedding-route checkpoint for its rows ('' to leave them out)")
    p.add_argument("--distilled-checkpoint", default=str(DEFAULT_DISTILLED),
                   help="the embedding route's few-step student ('' to leave it out)")
    p.add_argument("--samples", type=int, default=200, help="texts per row, drawn in one batch")
    p.add_argument("--block-steps", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="steps per block")
    p.add_argument("--plain-steps", type=int, nargs="+", default=[4, 8, 16, 32, 64],
                   help="steps of plain masked diffusion over the whole text")
    p.add_argument("--samplers", nargs="+", default=["ancestral", "confidence"])
    p.add_argument("--temperatures", type=float, nargs="*", default=[0.8, 0.9],
                   help="other token temperatures given a block-diffusion row at the default sampler and steps")
    p.add_argument("--top-ps", type=float, nargs="*", default=[0.9, 0.95],
                   help="other nucleus sizes given a block-diffusion row at the default sampler and steps")
    p.add_argument("--embedding-steps", type=int, nargs="*", default=[10, 50, 200])
    p.add_argument("--pair-samples", type=int, default=3, help="samples per held-out (slot, value) pair")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of the AR baseline and of each masked row (the same texts each time); the fastest "
                        "counts, so that another job on the machine does not decide a ratio")
    p.add_argument("--guidance-scales", type=float, nargs="*", default=[1.5, 3.0],
                   help="other guidance scales given a control row (the checkpoint's own is always measured)")
    p.add_argument("--nll-texts", type=int, default=256, help="held-out texts for the bound")
    p.add_argument("--nll-samples", type=int, default=16, help="time draws per text of the bound")
    p.add_argument("--ar-steps", type=int, default=1000, help="training steps of the AR judge/baseline")
    p.add_argument("--ar-cache", default="runs/text-ar/ar_lm.safetensors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="e2e")
    p.add_argument("--out-dir", help="where the .md/.json go (default: benchmarks/results; a temporary folder with "
                                     "--quick)")
    p.add_argument("--quick", action="store_true", help="smoke run, not a measurement: tiny everything")
    args = p.parse_args(argv)
    scratch = None
    if args.quick:
        scratch = tempfile.TemporaryDirectory(prefix="text_routes-quick-")
        args.samples, args.block_steps, args.plain_steps, args.embedding_steps = 4, [1], [2], [2]
        args.samplers, args.guidance_scales, args.nll_texts, args.nll_samples, args.ar_steps = ["ancestral"], [], 2, 1, 2
        args.temperatures, args.top_ps, args.repeats, args.pair_samples = [0.9], [], 1, 1
        args.ar_cache = str(Path(scratch.name) / "ar_lm.safetensors")
        args.out_dir = args.out_dir or scratch.name
    out_dir = Path(args.out_dir or ROOT / "benchmarks" / "results")
    began = time.perf_counter()
    log = lambda *a: print(*a, flush=True)  # noqa: E731

    model = load_text_model(args.checkpoint, "cpu")
    if model.route != "masked":
        raise SystemExit(f"{args.checkpoint} is not a masked text checkpoint; benchmarks/text_quality.py measures "
                         "embedding-route checkpoints")
    tok = model.tokenizer
    max_length = int(model.info.get("max_length", model.max_length))
    train = load_corpus(model.info.get("data", "e2e"), "train")
    held = load_corpus(model.info.get("data", "e2e"), "eval")
    if args.quick:
        train, held = (dataclasses.replace(c, texts=c.texts[:n], mrs=None if c.mrs is None else c.mrs[:n])
                       for c, n in ((train, 64), (held, 16)))
    enc = tok.encode(train.texts, max_length, warn=False)
    ar, ar_train_s = judge(tok, enc, max_length, args.ar_steps, args.seed, args.ar_cache, log)
    train_set = training_texts(tok, enc, train.texts)
    quality = functools.partial(text_scores, ar, tok, max_length, train_set)

    human_texts = [held.texts[i] for i in torch.randperm(len(held.texts), generator=seeded_generator(args.seed))
                   [: args.samples].tolist()]
    results: dict = {"checkpoint": str(model.path), "hardware": hardware_summary(), "seed": args.seed,
                     "command": "python " + " ".join(["benchmarks/text_routes.py", *(argv or sys.argv[1:])]),
                     "samples": args.samples, "block_size": model.diffusion.block_size,
                     "defaults": dict(model.info.get("defaults") or {}),
                     "parameters": sum(p.numel() for p in model.net.parameters()),
                     "ar_parameters": sum(p.numel() for p in ar.parameters()), "ar_train_s": ar_train_s,
                     "human": {**quality(human_texts),
                               "perplexity": ar_scores(ar, tok, held.texts, max_length)["perplexity"]},
                     "rows": []}
    ar_s = math.inf
    for _ in range(args.repeats):
        g = seeded_generator(args.seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            ar_ids = ar.sample(args.samples, tok.pad_id, g, max_length)
        ar_s = min(ar_s, (time.perf_counter() - t0) / args.samples)
    ar_texts = [tok.decode(ids) for ids in ar_ids]
    results["ar"] = {**quality(ar_texts), "seconds_per_sentence": ar_s, "calls": max(len(r) for r in ar_ids) + 1,
                     "examples": ar_texts[:6]}
    log(f"AR: {json.dumps({k: v for k, v in results['ar'].items() if k != 'examples'})}")

    default = request_settings(model, TextRequest(1))

    def add(route: str, sampler: str, steps: int, texts, seconds, calls) -> dict:
        row = {"route": route, "sampler": sampler, "steps": steps, **quality(texts),
               "seconds_per_sentence": seconds / len(texts), "calls": calls, "examples": texts[:6]}
        results["rows"].append(row)
        log(f"{route} {sampler} {steps}: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                                         for k, v in row.items() if k != "examples"}))
        return row

    for reading, step_counts in (("block", args.block_steps), ("plain", args.plain_steps)):
        for sampler in args.samplers:
            for steps in step_counts:
                settings = dataclasses.replace(default, sampler=sampler, steps=steps, guidance_scale=1.0,
                                               threshold=default.threshold if sampler == "confidence" else None)
                texts, seconds, calls = masked_samples(model, args.samples, settings, reading=reading, seed=args.seed,
                                                      repeats=args.repeats)
                name = f"block diffusion (blocks of {model.diffusion.block_size})" if reading == "block" else \
                    "plain masked diffusion"
                add(name, sampler, steps, texts, seconds, calls)
    variants = [{"temperature": t} for t in args.temperatures] + [{"top_p": q} for q in args.top_ps]
    for change in variants:
        settings = dataclasses.replace(default, guidance_scale=1.0, **change)
        texts, seconds, calls = masked_samples(model, args.samples, settings, reading="block", seed=args.seed,
                                               repeats=args.repeats)
        label = ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in change.items())
        add(f"block diffusion (blocks of {model.diffusion.block_size}), {label}", default.sampler, default.steps,
            texts, seconds, calls)
    for path, step_counts, route in ((args.embedding_checkpoint, args.embedding_steps, "embedding (Diffusion-LM)"),
                                     (args.distilled_checkpoint, [None], "embedding, distilled student")):
        if not path:
            continue
        other = load_text_model(path, "cpu")
        for steps in step_counts:
            steps = steps or int(other.default("steps"))
            texts, seconds = diffusion_samples(other, args.samples, steps=steps, seed=args.seed, batch=args.samples)
            add(route, str(other.default("sampler")), steps, texts, seconds, steps)

    # ---- the default reading: its row, control, likelihood
    default_texts, seconds, calls = masked_samples(model, args.samples, default, reading="block", seed=args.seed,
                                                   repeats=args.repeats)
    results["default"] = add("default (block diffusion, the checkpoint's settings)", default.sampler, default.steps,
                             default_texts, seconds, calls)
    pairs = sorted({(slot, value) for mr in held.mrs for slot, value in mr.items()},
                   key=lambda kv: (SLOTS.index(kv[0]), kv[1]))
    single = [{slot: value} for slot, value in pairs for _ in range(args.pair_samples)]
    codes = torch.tensor([model.mr_vocab.encode(t, partial=True) for t in single])
    results["control"] = {}
    for scale in [float(model.default("guidance_scale", 2.0)), *args.guidance_scales]:
        settings = dataclasses.replace(default, guidance_scale=scale)
        texts, seconds, _ = masked_samples(model, len(single), settings, reading="block", seed=args.seed + 2, mr=codes)
        results["control"][scale] = {**control_rates(tok, texts, single), **quality(texts),
                                     "seconds_per_sentence": seconds / len(texts),
                                     "examples": [f"{t} => {s}" for t, s in list(zip(single, texts))[::9][:6]]}
        log(f"control at scale {scale}: all {results['control'][scale]['all']:.3f}, "
            f"perplexity {results['control'][scale]['perplexity']:.2f}")
    texts = held.texts[:: max(1, len(held.texts) // args.nll_texts)][: args.nll_texts]
    enc_h = tok.encode(texts, max_length, warn=False)
    bits = masked_bits_per_token(model, enc_h, None, samples=args.nll_samples, batch_size=64,
                                 generator=seeded_generator(args.seed))
    weights = (enc_h.lengths + 1).double()
    masked_bits = float((bits.double() * weights).sum() / weights.sum())
    results["nll"] = {"texts": len(texts), "masked_bits_per_token": masked_bits,
                      "masked_stderr": float(bits.std() / math.sqrt(len(bits))),
                      "ar": ar_scores(ar, tok, texts, max_length)}
    log(f"likelihood: {results['nll']}")
    results["wall_s"] = time.perf_counter() - began
    write(results, out_dir, args.name)
    return 0


def goals(results: dict) -> list[tuple[str, str, bool]]:
    """(goal, measured, met) for the default reading."""
    h, d, ar = results["human"], results["default"], results["ar"]
    control = next(iter(results["control"].values()))
    nll = results["nll"]
    ratio = nll["masked_bits_per_token"] / nll["ar"]["bits_per_token_with_end"]
    return [
        ("judge perplexity <= 1.5x human", f"{d['perplexity'] / h['perplexity']:.2f}x", d["perplexity"] <= 1.5 * h["perplexity"]),
        ("time per sentence <= 2x AR", f"{d['seconds_per_sentence'] / ar['seconds_per_sentence']:.2f}x",
         d["seconds_per_sentence"] <= 2 * ar["seconds_per_sentence"]),
        ("adjacent repeats <= human + 5 points", f"{d['repeats']:.3f} (human {h['repeats']:.3f})",
         d["repeats"] <= h["repeats"] + 0.05),
        ("distinct-2 within 10% of human", f"{d['distinct_2']:.3f} (human {h['distinct_2']:.3f})",
         abs(d["distinct_2"] / h["distinct_2"] - 1) <= 0.1),
        ("unigram entropy within 10% of human", f"{d['entropy']:.2f} bits (human {h['entropy']:.2f})",
         abs(d["entropy"] / h["entropy"] - 1) <= 0.1),
        ("verbatim copies <= 50%", f"{d['copies']:.2f}", d["copies"] <= 0.5),
        ("distinct outputs >= 90%", f"{d['distinct_outputs']:.2f}", d["distinct_outputs"] >= 0.9),
        ("single-slot control >= 81%", f"{control['all']:.3f} +- {control['all_se']:.3f}", control["all"] >= 0.81),
        ("controlled perplexity <= 2x human", f"{control['perplexity'] / h['perplexity']:.2f}x",
         control["perplexity"] <= 2 * h["perplexity"]),
        ("bound <= 1.2x AR NLL per token", f"{ratio:.2f}x ({nll['masked_bits_per_token']:.2f} against "
         f"{nll['ar']['bits_per_token_with_end']:.2f} bits)", ratio <= 1.2),
    ]


def write(results: dict, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"text_routes_{name}.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")
    h, ar = results["human"], results["ar"]
    lines = [f"# Text routes: {Path(results['checkpoint']).name}", "",
             f"`{results['command']}` (seed {results['seed']}), {results['hardware']}, {results['wall_s']:.0f} s.", "",
             f"Judge and baseline: an autoregressive Transformer ({results['ar_parameters'] / 1e6:.2f}M parameters); "
             f"the masked network has {results['parameters'] / 1e6:.2f}M. {results['samples']} texts per row, one "
             "batch, one sample per text. `steps` is per block for block diffusion, per text otherwise; `calls` is "
             "the network calls of the whole batch. Times are the fastest of the repeated runs for the AR baseline and the "
             "masked rows, one run for the embedding rows. Masked rows use the checkpoint's token settings (temperature "
             f"{results['defaults'].get('temperature', 1.0):g}, threshold {results['defaults'].get('threshold')}) unless "
             "they say otherwise. Ratios are to held-out human text (perplexity, distinct-2, "
             "entropy) and to the AR baseline (time).", "",
             "| route | sampler | steps | perplexity | x human | distinct-2 | unigram entropy | copies | adjacent "
             "repeats | distinct outputs | ms / sentence | x AR time | calls |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| held-out human text | | | {h['perplexity']:.2f} | 1.00 | {h['distinct_2']:.3f} | {h['entropy']:.2f} | "
             f"| {h['repeats']:.3f} | {h['distinct_outputs']:.2f} | | | |",
             f"| AR baseline (scored by itself) | multinomial | | {ar['perplexity']:.2f} | "
             f"{ar['perplexity'] / h['perplexity']:.2f} | {ar['distinct_2']:.3f} | {ar['entropy']:.2f} | "
             f"{ar['copies']:.2f} | {ar['repeats']:.3f} | {ar['distinct_outputs']:.2f} | "
             f"{ar['seconds_per_sentence'] * 1000:.1f} | 1.00 | {ar['calls']} |"]
    for row in results["rows"]:
        lines.append(f"| {row['route']} | {row['sampler']} | {row['steps']} | {row['perplexity']:.2f} | "
                     f"{row['perplexity'] / h['perplexity']:.2f} | {row['distinct_2']:.3f} | {row['entropy']:.2f} | "
                     f"{row['copies']:.2f} | {row['repeats']:.3f} | {row['distinct_outputs']:.2f} | "
                     f"{row['seconds_per_sentence'] * 1000:.1f} | "
                     f"{row['seconds_per_sentence'] / ar['seconds_per_sentence']:.2f} | {row['calls']} |")
    lines += ["", "Single-slot control of the default reading (classifier-free guidance towards each (slot, value) "
              "pair of the held-out MRs; success = the value appears in the text):", "",
              "| guidance scale | " + " | ".join(SLOTS) + " | all | perplexity | x human |",
              "|---|" + "---|" * (len(SLOTS) + 3)]
    for scale, c in results["control"].items():
        lines.append(f"| {float(scale):g} | " + " | ".join(f"{c.get(s, float('nan')):.2f}" for s in SLOTS) +
                     f" | **{c['all']:.3f}** +- {c['all_se']:.3f} | {c['perplexity']:.2f} | "
                     f"{c['perplexity'] / h['perplexity']:.2f} |")
    nll = results["nll"]
    lines += ["", f"Likelihood on {nll['texts']} held-out texts, bits per token counting the end token: the masked "
              f"model's block-diffusion bound {nll['masked_bits_per_token']:.3f} (+- {nll['masked_stderr']:.3f}), the "
              f"AR model's exact {nll['ar']['bits_per_token_with_end']:.3f}.", "",
              "Goals, for the default reading:", "", "| goal | measured | met |", "|---|---|---|"]
    lines += [f"| {goal} | {measured} | {'yes' if met else '**no**'} |" for goal, measured, met in goals(results)]
    lines += ["", "Examples (default reading):", ""] + [f"- {t}" for t in results["default"]["examples"]]
    lines += ["", "Controlled examples:", ""] + [f"- {t}" for t in next(iter(results["control"].values()))["examples"]]
    (out_dir / f"text_routes_{name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
