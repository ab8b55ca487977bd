"""Train a text diffusion model (Diffusion-LM style) with diffkit.

With no arguments this trains the default model: a small Transformer denoiser over learned
16-d word embeddings, conditioned on E2E meaning representations (for --control), on the E2E
restaurant descriptions shipped in data/e2e, on the CPU or GPU. Presets and flags scale it:

    python recipes/text_train.py                                  # E2E, the cpu preset
    python recipes/text_train.py --preset gpu                     # BERT-base-sized, GPU
    python recipes/text_train.py --flow                           # flow matching instead of diffusion
    python recipes/text_train.py --data my_sentences.txt          # any text, one per line
    python recipes/text_train.py --tokenizer path/to/tokenizer.json   # a local pretrained tokenizer
    python recipes/text_train.py --export runs/text-cpu/export     # + a compact shipping copy
    python recipes/text_train.py --route masked --export runs/text-masked-cpu/export   # block diffusion
    python recipes/text_train.py --task classifier --denoiser runs/text-cpu/checkpoint
    python recipes/text_train.py --task distill --denoiser runs/text-cpu/checkpoint --student-steps 5
    torchrun --nproc_per_node 4 recipes/text_train.py --preset gpu

Every run writes to ``--output-dir``: ``checkpoint/`` (resumed automatically when the same
command is run again), ``samples/step_XXXXXX.txt`` every ``--sample-every`` steps and
``tensorboard/`` logs. ``--export DIR`` finally writes a compact copy (float16 weights, EMA or
trained per ``--export-weights``, the tokenizer as a side file) with the command, seed, hardware
and wall time recorded: the form the shipped checkpoint ``modalities/text/checkpoints/e2e``
takes (the cpu preset, run in parts; its README lists the commands), then calibrated as ``diffkit
calibrate`` does (``--no-calibrate`` skips it). ``--task classifier``
trains, instead of a denoiser, the classifier of plug-and-play control (p(MR slot | noisy
embeddings)) for the denoiser given by ``--denoiser``; ``--task distill`` a student of it that
samples in ``--student-steps`` DDIM steps (modalities/text/distillation.py).

``--route masked`` trains the other text route instead: masked (absorbing-state) diffusion over
word ids with blocks (BD3-LM; modalities/text/masked_model.py), which writes a text block by
block and ends it itself. Its presets are ``MASKED_PRESETS``; the embedding route's network
and diffusion flags do not apply to it.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import diffkit
from diffkit.checkpoint import checkpoint_exists, load_checkpoint, read_config, save_checkpoint
from diffkit.runs import (
    add_calibrate_arguments,
    add_flow_argument,
    add_sampling_default_arguments,
    add_training_arguments,
    apply_flow,
    calibrate_export,
    export_checkpoint,
    flow_time_scale,
    is_main_process,
    positive_int,
    sampling_defaults,
    train_config,
    usage_errors,
)
from diffkit.trainer import Trainer, ema_initial_share

# The recipe runs as a script from anywhere: make the repository's modalities importable.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from modalities.text.data import MRVocabulary, encode_corpus, format_mr, is_e2e, load_corpus  # noqa: E402
from modalities.text.distillation import (  # noqa: E402
    STUDENT_SAMPLER,
    DistillationObjective,
    TrajectoryDataset,
    student_diffusion,
    student_grid,
    teacher_trajectories,
)
from modalities.text.modality import RowConditions, TextModel, TextSampling, load_text_model, sample_ids  # noqa: E402
from modalities.text.masked_model import MaskedTextDenoiser  # noqa: E402
from modalities.text.masked_route import MaskedTextSampling, sample_masked_ids  # noqa: E402
from modalities.text.model import GUIDANCE_MIXES, HEADS, NoisyMRClassifier, TextDenoiser  # noqa: E402
from modalities.text.objective import ClassifierObjective, MaskedTextObjective, TextObjective  # noqa: E402
from modalities.text.tokenizer import TOKENIZER_FILE, TextTokenizer  # noqa: E402

PROG = "text_train.py"
TASKS = ("denoiser", "classifier", "distill")
DISTILL_FLAGS = ("student_steps", "teacher_steps", "trajectories", "guided_share")
TRAJECTORIES_FILE = "trajectories.safetensors"
# What a student takes from its teacher, so these flags have no say with --task distill.
TEACHER_FLAGS = ("data", "conditional", "tokenizer", "min_count", "max_length", "embed_dim", "hidden", "depth", "heads",
                 "dropout", "head", "self_conditioning", "flow", "schedule", "num_timesteps", "cond_drop_prob",
                 "slot_drop_prob", "t0_fraction", "self_condition_prob")
MODEL_CLASS = "modalities.text.model.TextDenoiser"
MASKED_CLASS = "modalities.text.masked_model.MaskedTextDenoiser"
ROUTES = ("embedding", "masked")
# The embedding route's flags that mean nothing to a masked model.
EMBEDDING_FLAGS = ("embed_dim", "head", "self_conditioning", "flow", "schedule", "num_timesteps", "t0_fraction",
                   "self_condition_prob", "guidance_mix", "guidance_interval", "export_weights")
# The masked route's flags that mean nothing to the embedding route.
MASKED_FLAGS = ("block_size", "plain_share", "top_p", "threshold")
CLASSIFIER_CLASS = "modalities.text.model.NoisyMRClassifier"

# --task classifier: a shallower network and a shorter run than the denoiser's (the preset's
# other entries stay); flags still override.
CLASSIFIER_SETTINGS = {"cpu": dict(depth=2, max_steps=1500, lr=1e-3), "gpu": dict(depth=4, max_steps=20_000, lr=1e-4)}

# --task distill: fine-tuning from the teacher's weights, so a small learning rate and a short
# run; the student samples with DDIM at the teacher's word temperature and, having learnt the
# guided trajectories, follows an MR without guidance (scale 1: one network call a step).
DISTILL_SETTINGS = {
    "cpu": dict(max_steps=400, lr=1e-4, warmup_steps=50, student_steps=5, teacher_steps=50, trajectories=4000,
                guided_share=0.5, sampler=STUDENT_SAMPLER, guidance_scale=1.0, guidance_interval=None),
    "gpu": dict(max_steps=10_000, lr=3e-5, warmup_steps=500, student_steps=5, teacher_steps=50, trajectories=50_000,
                guided_share=0.5, sampler=STUDENT_SAMPLER, guidance_scale=1.0, guidance_interval=None),
}

# Each preset is a complete, reproducible configuration; flags override single entries.
PRESETS: dict[str, dict[str, Any]] = {
    # Sized for one CPU machine and a few hours: 4 layers of width 128 with a softmax head
    # and self-conditioning (1.08M parameters) at batch 64 over sequences trimmed to each
    # batch's longest text, at most 48 tokens (all but 36 of the 8,408 E2E training
    # descriptions fit; those are truncated), 28000 steps (213 epochs). The shipped model was
    # trained to 4000 steps and resumed in parts to 28000 (362 min in all, one or two threads on
    # the 2-core development machine; modalities/text/checkpoints/e2e/README.md, diffkit info).
    # Sampling defaults measured on it (benchmarks/results/text_quality_e2e.md): ancestral
    # sampling (ddpm) at word temperature 0.5 writes far more fluent text than the deterministic
    # solvers at 50 steps; guidance mixed on the word logits follows control more often than
    # the x0 mix at the same fluency, and scale 2.5 is where it reaches Diffusion-LM's 81%;
    # guiding only where sigma/alpha >= 1.5 changed few measured samples (81% against 82%
    # control) and saves calls.
    "cpu": dict(
        data="e2e", conditional=True, min_count=3, max_length=48,
        embed_dim=16, hidden=128, depth=4, heads=4, dropout=0.1, head="softmax", self_conditioning=True,
        schedule="sqrt", num_timesteps=2000,
        max_steps=28000, batch_size=64, lr=1e-3, warmup_steps=200, lr_decay="cosine", ema_decay=0.999,
        cond_drop_prob=0.1, slot_drop_prob=0.3, t0_fraction=0.25, self_condition_prob=0.5,
        sampler="ddpm", sample_steps=50, guidance_scale=2.5, guidance_interval=(1.5, None), guidance_mix="logits",
        sample_temperature=0.5,
        sample_every=1000,
        save_every=500, export_weights="model",
    ),
    # Diffusion-LM's E2E configuration: a BERT-base-sized Transformer, sqrt schedule, T=2000.
    "gpu": dict(
        data="e2e", conditional=True, min_count=3, max_length=64,
        embed_dim=16, hidden=768, depth=12, heads=12, dropout=0.1, head="softmax", self_conditioning=True,
        schedule="sqrt", num_timesteps=2000,
        max_steps=100_000, batch_size=64, lr=1e-4, warmup_steps=2000, lr_decay="cosine", ema_decay=0.9999,
        cond_drop_prob=0.1, slot_drop_prob=0.3, t0_fraction=0.25, self_condition_prob=0.5,
        sampler="ddpm", sample_steps=50, guidance_scale=2.5, guidance_interval=(1.5, None), guidance_mix="logits",
        sample_temperature=0.5,
        sample_every=5000,
        save_every=5000, export_weights="ema",
    ),
}


# --route masked: block diffusion over word ids. Same width and depth as the autoregressive
# baseline of benchmarks/text_quality.py, so that time per sentence compares like with like.
# 2,400 steps took 47 minutes on one thread of the development machine. Sampling defaults,
# measured on that model (modalities/text/README.md): the confidence sampler, 4 steps a block
# (one word a step; fewer steps write two words at once and lose fluency), words drawn at
# temperature 1.25 (the confidence order alone is mode-seeking and narrows the text; 1.25
# trades some of that back) and every word drawn with probability >= 0.9 written at once.
# What both masked presets share: the data, the block, the conditioning and the sampling defaults.
_MASKED_COMMON = dict(
    data="e2e", conditional=True, min_count=3, dropout=0.1, block_size=4, plain_share=0.2, heads=4,
    batch_size=64, lr_decay="cosine", cond_drop_prob=0.1, slot_drop_prob=0.3,
    sampler="confidence", sample_steps=4, guidance_scale=2.0, sample_temperature=1.25, top_p=1.0, threshold=0.9,
)
MASKED_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(_MASKED_COMMON, max_length=48, hidden=128, depth=4, max_steps=2400, lr=1e-3, warmup_steps=100,
                ema_decay=0.999, sample_every=500, save_every=250),
    "gpu": dict(_MASKED_COMMON, max_length=64, hidden=768, depth=12, heads=12, max_steps=100_000, lr=1e-4,
                warmup_steps=2000, ema_decay=0.9999, sample_every=5000, save_every=5000),
}


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(
        prog=PROG,
        description=doc[0] + " " + doc[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n" + __doc__.split("flags scale it:\n\n")[1].split("\n\n")[0]
        + "\n\n" + doc[3],
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="base configuration (default: cpu); the flags below override it")
    p.add_argument("--route", choices=ROUTES, default="embedding",
                   help="embedding: Diffusion-LM (Gaussian diffusion over word embeddings, the default); masked: "
                        "block diffusion over word ids (masked diffusion inside blocks of --block-size words, "
                        "one block after another), with its own presets")
    p.add_argument("--task", choices=TASKS, default="denoiser",
                   help="what to train: the text denoiser (default), the noisy-embedding MR classifier "
                        "for plug-and-play --control of the denoiser given by --denoiser, or a few-step student "
                        "distilled from that denoiser (distill)")
    p.add_argument("--denoiser", metavar="DIR",
                   help="--task classifier: the denoiser checkpoint whose embedding space it works in; "
                        "--task distill: the teacher")
    g = p.add_argument_group("distillation (--task distill)")
    g.add_argument("--student-steps", type=positive_int,
                   help="DDIM steps the student samples in (default 5); its points are taken from the teacher's grid")
    g.add_argument("--teacher-steps", type=positive_int, help="DDIM steps of the teacher's trajectories (default 50)")
    g.add_argument("--trajectories", type=positive_int,
                   help="teacher trajectories to learn from, drawn once and kept in the run directory (default: "
                        "the preset's, 4000 on cpu)")
    g.add_argument("--guided-share", type=float,
                   help="share of the trajectories guided by a training MR (slots dropped as in training) at the "
                        "teacher's guidance defaults; the rest are unconditional (default 0.5)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="e2e (the shipped copy, default), e2e:DIR (a directory holding the E2E dev and "
                                  "test sets, devset.csv and testset_w_refs.csv, plain or .gz; trainset.csv is not "
                                  "read) or a UTF-8 text file with one example per line")
    g.add_argument("--conditional", action=argparse.BooleanOptionalAction, default=None,
                   help="condition on E2E meaning representations (needed for --control; default: on for e2e)")
    g.add_argument("--tokenizer", metavar="PATH",
                   help="a local pretrained tokenizer.json (or a directory with one); default: train a "
                        "word-level vocabulary on the data")
    g.add_argument("--min-count", type=int, help="words seen fewer times become [UNK] (trained vocabulary)")
    g.add_argument("--max-length", type=int, help="tokens per example; longer texts are truncated with a warning")
    g = p.add_argument_group("network")
    g.add_argument("--embed-dim", type=int, help="width of the diffused word embeddings (Diffusion-LM: 16)")
    g.add_argument("--hidden", type=int, help="Transformer width")
    g.add_argument("--depth", type=int, help="Transformer layers")
    g.add_argument("--heads", type=int, help="attention heads")
    g.add_argument("--dropout", type=float, help="dropout inside the Transformer")
    g.add_argument("--head", choices=HEADS,
                   help="how x0 is predicted: softmax (a distribution over words, cross-entropy trained; x0 is its "
                        "mean embedding) or regression (Diffusion-LM's direct x0 output)")
    g.add_argument("--self-conditioning", action=argparse.BooleanOptionalAction, default=None,
                   help="feed the network its own previous x0 estimate (Chen et al., 2022)")
    g = p.add_argument_group("diffusion")
    add_flow_argument(g)
    next(a for a in g._group_actions if a.dest == "flow").help = (
        "train on the flow-matching (rectified-flow) path x_s = (1 - s) x0 + s eps, s in [0, 1], instead of the "
        "preset's diffusion; the network still predicts x0, which the rounding and embedding terms act on (the "
        "same as --schedule flow)")
    g.add_argument("--schedule", help="noise schedule (default sqrt, Diffusion-LM's; flow is the same as --flow)")
    g.add_argument("--num-timesteps", type=int, help="T, training timesteps (Diffusion-LM: 2000)")
    g.add_argument("--cond-drop-prob", type=float, help="probability of dropping the whole MR (guidance)")
    g.add_argument("--slot-drop-prob", type=float, help="probability of dropping each MR slot on its own")
    g.add_argument("--t0-fraction", type=float, help="share of each batch that gets the t=0 embedding term")
    g.add_argument("--self-condition-prob", type=float,
                   help="share of each batch trained with the network's own first estimate (self-conditioning)")
    g = p.add_argument_group("masked route (--route masked)")
    g.add_argument("--block-size", type=positive_int,
                   help="words per block: 1 is autoregressive, the whole text plain masked diffusion (default 4)")
    g.add_argument("--plain-share", type=float,
                   help="share of batches trained as plain masked diffusion over the whole text (infilling reads "
                        "texts that way; default 0.2)")
    g.add_argument("--top-p", type=float, help="default nucleus (top-p) recorded with a masked model")
    g.add_argument("--threshold", type=float,
                   help="default confidence threshold recorded with a masked model (confidence sampler: words drawn "
                        "with at least this probability are written at once)")
    add_training_arguments(p, run_dir="runs/text-<preset>", data_workers=False)
    g = add_sampling_default_arguments(p, guidance="default guidance for --control")
    sampler = next(a for a in g._group_actions if a.dest == "sampler")
    sampler.choices = [*sampler.choices, *diffkit.masked.SAMPLERS]
    sampler.help += " (masked route: ancestral or confidence)"
    g.add_argument("--guidance-mix", choices=GUIDANCE_MIXES,
                   help="where the recorded guidance mixes: on the word logits (logits) or on the x0 estimates "
                        "(x0) (default: the preset's, logits)")
    g.add_argument("--sample-temperature", type=float,
                   help="default word temperature recorded with the model (softmax head; below 1 sampling leans "
                        "towards the likelier words)")
    g.add_argument("--export", metavar="DIR",
                   help="after training, write a compact float16 checkpoint (with the tokenizer) here")
    g.add_argument("--export-weights", choices=EXPORT_WEIGHTS,
                   help="which weights --export ships: the EMA, the EMA without its share of the initial weights "
                        "(ema-debiased; denoisers only), or the raw trained weights (model) (default: the preset's: "
                        "cpu model, gpu ema)")
    add_calibrate_arguments(g)
    return p


def resolve_masked_settings(args: argparse.Namespace) -> dict[str, Any]:
    """--route masked: its preset with the flags laid over it; bad values raise ValueError."""
    if args.task != "denoiser":
        raise ValueError(f"--task {args.task} belongs to the embedding route; --route masked trains a denoiser")
    given = [flag for flag in (*EMBEDDING_FLAGS, *DISTILL_FLAGS, "denoiser") if getattr(args, flag) is not None]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} is an embedding-route flag; --route masked does not use it")
    s = dict(MASKED_PRESETS[args.preset])
    for key, value in vars(args).items():
        if value is not None and key not in ("preset", "route"):
            s[key] = value
    if args.conditional is None and not is_e2e(s["data"]):
        s["conditional"] = False
    if s["conditional"] and not is_e2e(s["data"]):
        raise ValueError("--conditional needs E2E data (meaning representations); use --no-conditional")
    for key in ("max_length", "hidden", "depth", "heads", "max_steps", "batch_size", "min_count"):
        if s[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {s[key]}")
    if not 0 <= s["plain_share"] < 1:
        raise ValueError(f"--plain-share must lie in [0, 1), got {s['plain_share']}")
    try:
        masked_defaults(s)
    except ValueError as error:
        raise ValueError(f"sampling defaults: {error}") from None
    s.setdefault("output_dir", f"runs/text-masked-{args.preset}")
    return s


def masked_defaults(s: dict[str, Any]) -> dict[str, Any]:
    """The sampling defaults a masked model records, checked by :class:`MaskedTextSampling`."""
    defaults = MaskedTextSampling(s["sampler"], s["sample_steps"], s["guidance_scale"], s["sample_temperature"],
                                  s["top_p"], s.get("threshold"))
    return {"sampler": defaults.sampler, "steps": defaults.steps, "guidance_scale": defaults.guidance_scale,
            "temperature": defaults.temperature, "top_p": defaults.top_p, "threshold": defaults.threshold}


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The preset with every flag that was given laid over it; bad values raise ValueError."""
    if args.route == "masked":
        return resolve_masked_settings(args)
    given = [flag for flag in MASKED_FLAGS if getattr(args, flag) is not None]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} is for --route masked")
    s = dict(PRESETS[args.preset])
    if args.task == "classifier":
        s.update(CLASSIFIER_SETTINGS[args.preset])
        if not args.denoiser:
            raise ValueError("--task classifier needs --denoiser DIR (the denoiser checkpoint it will steer)")
    elif args.task == "distill":
        s.update(DISTILL_SETTINGS[args.preset])
        if not args.denoiser:
            raise ValueError("--task distill needs --denoiser DIR (the teacher checkpoint)")
        fixed = [flag for flag in TEACHER_FLAGS if getattr(args, flag) is not None]
        if fixed:
            raise ValueError(f"--{fixed[0].replace('_', '-')}: a student is its teacher's network, vocabulary and "
                             "diffusion; leave it out with --task distill")
    elif args.denoiser:
        raise ValueError("--denoiser is for --task classifier and --task distill")
    if args.task != "distill":
        given = [flag for flag in DISTILL_FLAGS if getattr(args, flag) is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is for --task distill")
    for key, value in vars(args).items():
        if value is not None and key != "preset":
            s[key] = value
    apply_flow(s, "x0")  # the text objective's clamping and embedding terms act on x0
    if args.conditional is None and not is_e2e(s["data"]):
        s["conditional"] = False  # a plain text file has no meaning representations
    if s["conditional"] and not is_e2e(s["data"]):
        raise ValueError("--conditional needs E2E data (meaning representations); use --no-conditional")
    for key in ("max_length", "embed_dim", "hidden", "depth", "heads", "num_timesteps", "max_steps",
                "batch_size", "min_count", "sample_steps"):
        if s[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {s[key]}")
    if args.sample_temperature is None and s["head"] != "softmax":
        s["sample_temperature"] = 1.0  # the presets' word temperature is a softmax head's
    if not s["sample_temperature"] > 0:
        raise ValueError(f"--sample-temperature must be > 0, got {s['sample_temperature']}")
    if s["sample_temperature"] != 1.0 and s["head"] != "softmax":
        raise ValueError("--sample-temperature sharpens a softmax head's word distribution; use --head softmax "
                         "or leave it at 1")
    sampling_defaults(s)  # bad sampling defaults are a usage error before anything is built
    if args.task == "distill":
        # The student is trained for one grid: its own sampler and step count are not choices.
        if args.sampler not in (None, STUDENT_SAMPLER) or args.sample_steps not in (None, s["student_steps"]):
            raise ValueError(f"--task distill records the student's own sampling ({STUDENT_SAMPLER}, --student-steps "
                             "steps); leave --sampler and --sample-steps out")
        s["sample_steps"] = s["student_steps"]
        if not 0.0 <= s["guided_share"] <= 1.0:
            raise ValueError(f"--guided-share must lie in [0, 1], got {s['guided_share']}")
        if s["student_steps"] > s["teacher_steps"]:
            raise ValueError(f"--student-steps {s['student_steps']} must not exceed --teacher-steps "
                             f"{s['teacher_steps']}: the student's points are taken from the teacher's grid")
    if args.export_weights == "ema-debiased":  # found now, not after hours of training
        if args.task != "denoiser":
            raise ValueError(f"--export-weights ema-debiased is for denoisers trained from scratch; export a "
                             f"--task {args.task} run with ema or model")
        left = ema_initial_share(s["max_steps"], s["ema_decay"], warmup=s.get("ema_warmup") is not False)
        if left > 0.5:
            raise ValueError(f"--export-weights ema-debiased needs at most half of the initial weights left in the "
                             f"EMA, but {s['max_steps']} steps at --ema-decay {s['ema_decay']} leave "
                             f"{left:.2f}; use ema or model, or train longer")
    s.setdefault("output_dir", f"runs/text-{args.preset}" + ("" if args.task == "denoiser" else f"-{args.task}"))
    return s


def load_tokenizer(s: dict[str, Any], texts: list[str]) -> TextTokenizer:
    """The run's tokenizer: the one saved with a checkpoint being resumed, a pretrained one,
    or a word-level vocabulary trained on the texts."""
    saved = Path(s["output_dir"]) / "checkpoint" / TOKENIZER_FILE
    if saved.is_file():
        tokenizer = TextTokenizer.load(saved)  # resuming: the embedding rows belong to this vocabulary
        if s.get("tokenizer") and TextTokenizer.load(s["tokenizer"]).to_str() != tokenizer.to_str():
            raise ValueError(f"--tokenizer {s['tokenizer']} is not the tokenizer of the run in {saved.parent}; "
                             "leave --tokenizer out to resume that run, or choose another --output-dir for a new one")
        return tokenizer
    if s.get("tokenizer"):
        return TextTokenizer.load(s["tokenizer"])
    return TextTokenizer.train(texts, min_count=s["min_count"])


def recorded_path(path: Path) -> str:
    """How a checkpoint names the checkpoint it was built from: relative to the project root when
    it lies inside it, so that a shipped checkpoint names no directory of the machine that made it."""
    path = Path(path).resolve()
    try:
        return path.relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return str(path)


def check_same_run(s: dict[str, Any], expected: dict[str, Any]) -> None:
    """A run directory holds one run: resuming it with other data or another denoiser would go
    on training its weights on something else (or ship them as if they were new). ``expected``
    holds this command's values of the recorded ``modality_config`` entries that must match."""
    directory = Path(s["output_dir"]) / "checkpoint"
    if not checkpoint_exists(directory):
        return
    recorded = read_config(directory, modality="text").get("modality_config") or {}
    if isinstance(recorded.get("denoiser"), str):  # runs of earlier versions recorded it absolute
        recorded = {**recorded, "denoiser": recorded_path(PROJECT_ROOT / recorded["denoiser"])}
    changed = [f"{key} {recorded.get(key)!r} -> {value!r}" for key, value in expected.items()
               if recorded.get(key) != value]
    if changed:
        raise ValueError(f"{directory} holds a run with other inputs ({', '.join(changed)}); resume it with its "
                         "own, or choose another --output-dir for a new run")


def build(s: dict[str, Any], tokenizer: TextTokenizer, mr_vocab: MRVocabulary | None):
    """The network and its checkpoint description, the diffusion and the objective."""
    kwargs = dict(vocab_size=tokenizer.vocab_size, embed_dim=s["embed_dim"], hidden=s["hidden"],
                  depth=s["depth"], heads=s["heads"], max_length=s["max_length"],
                  mr_sizes=mr_vocab.sizes if mr_vocab else None, dropout=s["dropout"], head=s["head"],
                  self_conditioning=s["self_conditioning"], **flow_time_scale(s["schedule"]))
    # Seeded right before the weights are drawn, so the same --seed gives the same network.
    diffkit.seed_everything(s["seed"])
    net = TextDenoiser(**kwargs)
    diffusion = diffkit.Diffusion(**diffusion_arguments(s))
    objective = TextObjective(diffusion, t0_fraction=s["t0_fraction"], self_condition_prob=s["self_condition_prob"],
                              cond_drop_prob=s["cond_drop_prob"] if mr_vocab else 0.0,
                              slot_drop_prob=s["slot_drop_prob"] if mr_vocab else 0.0)
    return net, {"class": MODEL_CLASS, "kwargs": kwargs}, diffusion, objective


def diffusion_arguments(s: dict[str, Any]) -> dict[str, Any]:
    """``diffkit.Diffusion(**these)`` is the run's diffusion (x0 prediction: the clamping trick
    and the embedding term act on x0)."""
    return {"schedule": s["schedule"], "num_timesteps": s["num_timesteps"], "prediction": "x0"}


def modality_info(s, dataset, mr_vocab, objective) -> dict[str, Any]:
    return {
        "tokenizer": TOKENIZER_FILE,
        "data": s["data"],
        "max_length": s["max_length"],
        "length_counts": dataset.length_counts(),
        "mr_values": mr_vocab.to_config() if mr_vocab else None,
        "objective": objective.config,
        "defaults": {**sampling_defaults(s), "temperature": s["sample_temperature"], "guidance_mix": s["guidance_mix"]},
    }


def make_sample_fn(s, diffusion, tokenizer, info, mr_vocab: MRVocabulary | None, num: int = 8):
    """Writes a few EMA samples as text: unconditional ones and, for an MR-conditioned model,
    one per held-out MR (shown before it), so a run can be watched learning to follow MRs."""
    out = Path(s["output_dir"]) / "samples"
    held_out = load_corpus(s["data"], "eval").mrs[::100][:num] if mr_vocab is not None else []

    def sample_fn(trainer: Trainer, step: int) -> None:
        model = TextModel(Path(s["output_dir"]), trainer.ema_model, diffusion, info, tokenizer=tokenizer)
        g = torch.Generator().manual_seed(s["seed"])
        counts = torch.tensor(info["length_counts"], dtype=torch.float64)
        counts[0] = 0
        lengths = torch.multinomial(counts, num, replacement=True, generator=g)
        ids = sample_ids(model, lengths, TextSampling(s["sampler"], s["sample_steps"]), generator=g)
        lines = [tokenizer.decode(row[: int(k)].tolist()) for row, k in zip(ids, lengths)]
        if held_out:
            mr = torch.tensor([mr_vocab.encode(m) for m in held_out])
            lengths = torch.multinomial(counts, len(held_out), replacement=True, generator=g)
            ids = sample_ids(model, lengths, TextSampling(s["sampler"], s["sample_steps"], s["guidance_scale"]),
                             RowConditions(mr=mr), generator=g)
            lines += [f"{format_mr(m)} => {tokenizer.decode(row[: int(k)].tolist())}"
                      for m, row, k in zip(held_out, ids, lengths)]
        out.mkdir(parents=True, exist_ok=True)
        (out / f"step_{step:06d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    return sample_fn


EXPORT_WEIGHTS = ("ema", "ema-debiased", "model")


def shipped_state(s: dict[str, Any], run_checkpoint: Path, which: str, initial: dict[str, torch.Tensor] | None):
    """The weights to ship: the EMA as the Trainer kept it, the EMA with the share of the
    initial weights taken out (``ema-debiased``: (ema - s w_0) / (1 - s), the trainer's EMA starts
    at the initial weights w_0, which after n steps still weigh s, ``diffkit.trainer.ema_initial_share``:
    d^n without the EMA warm-up, 11% after 2200 steps at 0.999), or the raw trained weights (``model``)."""
    ckpt = load_checkpoint(run_checkpoint, modality="text")
    if which == "model" or ckpt.ema_state is None:
        return ckpt, ckpt.model_state
    if which == "ema":
        return ckpt, ckpt.ema_state
    train = ckpt.config.get("train") or {}  # a run recorded before the warm-up existed averaged without it
    share = ema_initial_share(ckpt.step, s["ema_decay"], warmup=bool(train.get("ema_warmup", False)))
    if initial is None or share > 0.5:
        raise ValueError(f"--export-weights ema-debiased needs the initial weights and at most half of them left "
                         f"in the EMA (here {share:.2f}); use ema or model")
    return ckpt, {key: (value - share * initial[key].to(value)) / (1 - share) if value.is_floating_point() else value
                  for key, value in ckpt.ema_state.items()}


def export(s, trainer: Trainer, path: Path, wall_time: float, argv: list[str],
           initial: dict[str, torch.Tensor] | None = None, defaults: dict[str, Any] | None = None) -> Path:
    """A compact shipping checkpoint (``diffkit.runs.export_checkpoint``): float16 weights (see
    ``--export-weights``), the tokenizer (a side file of the run) carried along, command, seed,
    hardware, wall time and the run's training time. ``defaults`` (this command's sampling
    defaults) replace the ones the run recorded: an export of a finished run can set them."""
    which = s.get("export_weights", "ema")
    record = dict(command=["recipes/text_train.py", *argv], seed=s["seed"], wall_time_s=wall_time,
                  device=trainer.device, final_loss=trainer.history[-1]["loss"] if trainer.history else None)
    ckpt, state = shipped_state(s, Path(trainer.checkpoint_dir), which, initial)
    if ckpt.ema_state is None:
        which = "model"  # the run kept no EMA: its trained weights are all there is
    config = {key: ckpt.config.get(key) for key in ("modality", "model", "diffusion", "modality_config", "train")}
    side = {name: Path(ckpt.path) / name for name in (ckpt.config.get("checksums") or {})
            if name.endswith(".json") and name != "config.json"}
    with tempfile.TemporaryDirectory() as tmp:
        # A run checkpoint holding only the chosen weights, exported the usual way.
        staged = save_checkpoint(Path(tmp) / "run", model=state, config=config, step=ckpt.step, side_files=side,
                                 extra={key: ckpt.extra.get(key) for key in ("train_seconds", "segments")})
        path = export_checkpoint(staged, path, modality="text", **record, defaults=defaults,
                                 extra={"weights": f"{which.replace('-', ' ')}, float16"})
    for file in path.iterdir():
        file.chmod(0o644)  # safetensors writes owner-only files; shipped files must be readable
    return path


def train_and_export(trainer: Trainer, s: dict[str, Any], args: argparse.Namespace, argv: list[str],
                     *, calibrate: bool = True, **export_options: Any) -> int:
    """Train (from where the run left off), say where it ended, and export when ``--export`` asks
    (``export_options`` go to :func:`export`)."""
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    if is_main_process():
        print(f"trained to step {trainer.step} in {wall:.0f} s; checkpoint: {trainer.checkpoint_dir}")
        if args.export:
            path = export(s, trainer, Path(args.export), wall, argv, **export_options)
            print(f"exported {path}")
            if calibrate:  # a classifier records its denoiser's diffusion but samples nothing itself
                calibrate_export(path, args, trainer.device)
    return 0


def embedding_denoiser(path: str, task: str) -> TextModel:
    """The --denoiser of --task classifier / distill, which work in an embedding route's space."""
    model = load_text_model(path, "cpu")
    if model.route != "embedding":
        raise ValueError(f"--denoiser {path} holds a {model.route}-route model; --task {task} works on the embedding "
                         "route's checkpoints (a masked model has no embedding space to work in)")
    return model


def run_classifier(args: argparse.Namespace, s: dict[str, Any], argv: list[str]) -> int:
    """--task classifier: p(MR slot codes | x_t, t) in the embedding space of --denoiser."""
    main_process = is_main_process()
    if not is_e2e(s["data"]):
        raise ValueError("--task classifier learns meaning representations: it needs E2E data")
    denoiser = embedding_denoiser(args.denoiser, "classifier")
    check_same_run(s, {"kind": "classifier", "data": s["data"], "denoiser": recorded_path(denoiser.path)})
    tokenizer = denoiser.tokenizer
    corpus = load_corpus(s["data"], "train")
    values = denoiser.info.get("mr_values")
    mr_vocab = MRVocabulary.from_config(values) if values else MRVocabulary.from_mrs(corpus.mrs)
    dataset = encode_corpus(corpus, tokenizer, denoiser.max_length, mr_vocab)
    kwargs = dict(vocab_size=denoiser.net.vocab_size, embed_dim=denoiser.net.embed_dim, mr_sizes=mr_vocab.sizes,
                  hidden=s["hidden"], depth=s["depth"], heads=s["heads"], max_length=denoiser.max_length,
                  dropout=s["dropout"], **flow_time_scale(denoiser.diffusion.config["schedule"].get("name")))
    diffkit.seed_everything(s["seed"])
    net = NoisyMRClassifier(**kwargs)
    with torch.no_grad():
        net.embedding.copy_(denoiser.net.embedding.weight.float().cpu())  # frozen: a buffer, not trained
    model_config = {"class": CLASSIFIER_CLASS, "kwargs": kwargs}
    info = {"kind": "classifier", "tokenizer": TOKENIZER_FILE, "data": s["data"],
            "denoiser": recorded_path(denoiser.path), "mr_values": mr_vocab.to_config()}
    if main_process:
        print(f"classifier for {denoiser.path}: {len(dataset)} texts, "
              f"{sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters")
    # The denoiser's diffusion is recorded with the classifier: it was trained on its noise levels.
    trainer = Trainer(net, denoiser.diffusion, dataset, train_config({**s, "sample_every": 0}),
                      loss_fn=ClassifierObjective(denoiser.diffusion), modality="text",
                      model_config=model_config, modality_config=info,
                      side_files={TOKENIZER_FILE: tokenizer.to_str().encode("utf-8")})
    return train_and_export(trainer, s, args, argv, calibrate=False)


def guided_codes(teacher: TextModel, s: dict[str, Any], count: int) -> torch.Tensor:
    """MR codes for ``count`` guided trajectories: training MRs drawn with the run's seed, each
    slot dropped with the teacher's own training probability (so the student also learns the
    partial MRs that ``control`` names)."""
    mr_vocab = teacher.mr_vocab
    corpus = load_corpus(s["data"], "train")
    generator = torch.Generator().manual_seed(s["seed"])
    rows = torch.randint(0, len(corpus.mrs), (count,), generator=generator)
    codes = torch.tensor([mr_vocab.encode(corpus.mrs[int(i)]) for i in rows], dtype=torch.long)
    drop = float((teacher.info.get("objective") or {}).get("slot_drop_prob", 0.0))
    return torch.where(torch.rand(codes.shape, generator=generator) < drop, torch.zeros_like(codes), codes)


def distillation_trajectories(teacher: TextModel, s: dict[str, Any], main_process: bool) -> TrajectoryDataset:
    """The run's teacher trajectories: read from the run directory when a run with the same
    settings drew them, else drawn (unconditional and MR-guided ones) and kept there."""
    count = s["trajectories"]
    guided = round(s["guided_share"] * count) if teacher.net.conditional else 0
    key = {"teacher": str(teacher.path), "steps": s["student_steps"], "teacher_steps": s["teacher_steps"],
           "count": count, "guided": guided, "seed": s["seed"]}
    path = Path(s["output_dir"]) / TRAJECTORIES_FILE
    if path.is_file():
        kept = TrajectoryDataset.load(path)
        if kept.key != key:
            raise ValueError(f"{path} holds trajectories drawn with other settings ({kept.key}); resume that run "
                             "with its own, or choose another --output-dir")
        return kept
    common = dict(steps=s["student_steps"], teacher_steps=s["teacher_steps"],
                  progress=main_process and not s["no_progress"])
    parts = []
    if count > guided:
        parts.append(teacher_trajectories(teacher, count=count - guided, seed=s["seed"], **common))
    if guided:
        parts.append(teacher_trajectories(teacher, count=guided, seed=s["seed"] + 1,
                                          mr=guided_codes(teacher, s, guided), **common))
    dataset = TrajectoryDataset.concatenate(parts, key)
    if main_process:
        dataset.save(path)
    return dataset


def run_distill(args: argparse.Namespace, s: dict[str, Any], argv: list[str]) -> int:
    """--task distill: a --student-steps student of --denoiser (modalities/text/distillation.py)."""
    main_process = is_main_process()
    teacher = embedding_denoiser(args.denoiser, "distill")
    if teacher.net.head != "softmax":
        raise ValueError(f"--task distill learns the teacher's words by cross-entropy: it needs a softmax-head "
                         f"teacher, and {teacher.path} has a {teacher.net.head} head")
    s["data"] = teacher.info.get("data", s["data"])  # guided trajectories follow the teacher's MRs
    check_same_run(s, {"kind": "distillation", "denoiser": recorded_path(teacher.path)})
    trajectories = distillation_trajectories(teacher, s, main_process)
    grid, _ = student_grid(teacher.diffusion.sampling_grid(s["teacher_steps"], sampler=STUDENT_SAMPLER),
                           s["student_steps"])
    diffusion = student_diffusion(teacher.diffusion, grid)
    model_config = read_config(teacher.path, modality="text")["model"]
    diffkit.seed_everything(s["seed"])
    net = copy.deepcopy(teacher.net).float().train()
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(not name.startswith("embedding."))  # the states live in the teacher's space
    objective = DistillationObjective(grid.model_times(diffusion.time_input))
    info = {**teacher.info, "kind": "distillation", "denoiser": recorded_path(teacher.path),
            "objective": objective.config,
            "defaults": {**sampling_defaults(s), "temperature": s["sample_temperature"],
                         "guidance_mix": s["guidance_mix"]}}
    if main_process:
        print(f"student of {teacher.path}: {len(trajectories)} trajectories, {s['student_steps']} steps at times "
              f"{[round(t) for t in grid.times.tolist()]}")
    trainer = Trainer(net, diffusion, trajectories, train_config({**s, "sample_every": 0}), loss_fn=objective,
                      modality="text", model_config=model_config, modality_config=info,
                      side_files={TOKENIZER_FILE: teacher.tokenizer.to_str().encode("utf-8")})
    return train_and_export(trainer, s, args, argv, defaults=info["defaults"])


def run(argv: list[str], parser: argparse.ArgumentParser) -> int:
    args = parser.parse_args(argv)
    s = resolve_settings(args)
    if args.route == "masked":
        return run_masked(args, s, argv)
    if args.task == "classifier":
        return run_classifier(args, s, argv)
    if args.task == "distill":
        return run_distill(args, s, argv)
    main_process = is_main_process()  # torchrun starts one process per GPU
    check_same_run(s, {"kind": None, "data": s["data"]})
    corpus = load_corpus(s["data"], "train")
    tokenizer = load_tokenizer(s, corpus.texts)
    mr_vocab = MRVocabulary.from_mrs(corpus.mrs) if s["conditional"] else None
    dataset = encode_corpus(corpus, tokenizer, s["max_length"], mr_vocab)
    net, model_config, diffusion, objective = build(s, tokenizer, mr_vocab)
    initial = {key: value.detach().clone() for key, value in net.state_dict().items()}  # for ema-debiased
    info = modality_info(s, dataset, mr_vocab, objective)
    if main_process:
        n_params = sum(p.numel() for p in net.parameters())
        print(f"preset {args.preset}: {len(dataset)} texts from {corpus.source} (skipped: {corpus.num_empty} empty, "
              f"{corpus.num_invalid} not UTF-8), "
              f"vocabulary {tokenizer.vocab_size}, {'MR-conditioned' if mr_vocab else 'unconditional'} "
              f"Transformer {n_params / 1e6:.2f}M parameters, {diffusion!r}")
    trainer = Trainer(net, diffusion, dataset, train_config(s), loss_fn=objective, modality="text",
                      model_config=model_config, modality_config=info,
                      side_files={TOKENIZER_FILE: tokenizer.to_str().encode("utf-8")},
                      sample_fn=make_sample_fn(s, diffusion, tokenizer, info, mr_vocab) if s["sample_every"] else None)
    return train_and_export(trainer, s, args, argv, initial=initial, defaults=info["defaults"])


def run_masked(args: argparse.Namespace, s: dict[str, Any], argv: list[str]) -> int:
    """--route masked: a block-diffusion text model (modalities/text/masked_model.py)."""
    main_process = is_main_process()
    check_same_run(s, {"kind": "masked", "data": s["data"]})
    corpus = load_corpus(s["data"], "train")
    tokenizer = load_tokenizer(s, corpus.texts)
    mr_vocab = MRVocabulary.from_mrs(corpus.mrs) if s["conditional"] else None
    dataset = encode_corpus(corpus, tokenizer, s["max_length"], mr_vocab)
    # Room for the end token's block after the longest text.
    kwargs = dict(vocab_size=tokenizer.vocab_size, hidden=s["hidden"], depth=s["depth"], heads=s["heads"],
                  max_length=s["max_length"] + s["block_size"], block_size=s["block_size"],
                  mr_sizes=mr_vocab.sizes if mr_vocab else None, dropout=s["dropout"])
    diffkit.seed_everything(s["seed"])
    net = MaskedTextDenoiser(**kwargs)
    diffusion = diffkit.MaskedDiffusion(tokenizer.vocab_size, "linear", block_size=s["block_size"])
    objective = MaskedTextObjective(diffusion, tokenizer.pad_id, plain_share=s["plain_share"],
                                    cond_drop_prob=s["cond_drop_prob"] if mr_vocab else 0.0,
                                    slot_drop_prob=s["slot_drop_prob"] if mr_vocab else 0.0)
    info = {"kind": "masked", "tokenizer": TOKENIZER_FILE, "data": s["data"], "max_length": s["max_length"],
            "length_counts": dataset.length_counts(), "mr_values": mr_vocab.to_config() if mr_vocab else None,
            "objective": objective.config, "defaults": masked_defaults(s)}
    if main_process:
        n_params = sum(p.numel() for p in net.parameters())
        print(f"masked route, preset {args.preset}: {len(dataset)} texts from {corpus.source}, vocabulary "
              f"{tokenizer.vocab_size}, {'MR-conditioned' if mr_vocab else 'unconditional'} Transformer "
              f"{n_params / 1e6:.2f}M parameters, {diffusion!r}")
    trainer = Trainer(net, diffusion, dataset, train_config(s), loss_fn=objective, modality="text",
                      model_config={"class": MASKED_CLASS, "kwargs": kwargs}, modality_config=info,
                      side_files={TOKENIZER_FILE: tokenizer.to_str().encode("utf-8")},
                      sample_fn=masked_sample_fn(s, diffusion, tokenizer, mr_vocab) if s["sample_every"] else None)
    return train_and_export(trainer, s, args, argv, calibrate=False, defaults=info["defaults"])


def masked_sample_fn(s, diffusion, tokenizer, mr_vocab: MRVocabulary | None, num: int = 8):
    """Writes a few EMA samples of a masked model: unconditional ones and one per held-out MR."""
    out = Path(s["output_dir"]) / "samples"
    held_out = load_corpus(s["data"], "eval").mrs[::100][:num] if mr_vocab is not None else []
    settings = MaskedTextSampling(s["sampler"], s["sample_steps"], 1.0, s["sample_temperature"], s["top_p"])

    def sample_fn(trainer: Trainer, step: int) -> None:
        g = torch.Generator().manual_seed(s["seed"])
        net = trainer.ema_model.eval()
        rows = sample_masked_ids(net, diffusion, tokenizer, num, settings, generator=g)
        lines = [tokenizer.decode(row) for row in rows]
        if held_out:
            mr = torch.tensor([mr_vocab.encode(m) for m in held_out])
            guided = MaskedTextSampling(s["sampler"], s["sample_steps"], s["guidance_scale"], s["sample_temperature"],
                                        s["top_p"])
            rows = sample_masked_ids(net, diffusion, tokenizer, len(held_out), guided, mr=mr, generator=g)
            lines += [f"{format_mr(m)} => {tokenizer.decode(row)}" for m, row in zip(held_out, rows)]
        out.mkdir(parents=True, exist_ok=True)
        (out / f"step_{step:06d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    return sample_fn


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    with usage_errors(parser):  # "text_train.py: error: ..." and exit status 2, no traceback
        return run(argv, parser)
    return 2


if __name__ == "__main__":
    sys.exit(main())
