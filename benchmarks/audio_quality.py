"""Sample quality of an audio checkpoint on spoken digits (FSDD), against real-clip references.

    python benchmarks/audio_quality.py                        # the shipped model, its vocoder and Griffin-Lim
    python benchmarks/audio_quality.py --checkpoint runs/audio-cpu/checkpoint --steps 6 20
    python benchmarks/audio_quality.py --likelihood-checkpoint runs/audio-cpu/checkpoint
    python benchmarks/audio_quality.py --vocoder runs/audio-ddsp/checkpoint   # another vocoder beside Griffin-Lim
    python benchmarks/audio_quality.py --train-classifier     # (re)train the digit classifier
    python benchmarks/audio_quality.py --quick                # a smoke run, not a measurement (seconds)

What it measures (the references are FSDD's test split, takes 0-4, which no model trained on):

- acc: how often the project's spoken-digit classifier (``modalities/audio/metrics.py``,
  trained on takes 5-49) hears a class-conditional clip as its label. Its accuracy on the
  held-out real clips is the ceiling.
- FD: Frechet distance between Gaussians fitted to the classifier's 64-d features of generated
  and held-out clips (DiffWave's FID on SC09, here on FSDD); IS: the inception score
  exp(E KL(p(y|x) || p(y))) of the generated clips (10 = ten confident, balanced classes).
  Real-data references, with as many clips as a generated row (Frechet distances shrink with
  more clips): training clips (features the classifier has seen, so a lower bound) and the
  same clips sent through log-mel and Griffin-Lim (the spectrogram route's ceiling) and through
  log-mel and the vocoder (``--vocoder``; default the shipped learned vocoder); and held-out
  clips, unchanged and through each inverse (their FD is to a reference set that holds them,
  so it is low, but the same for every inverse).
- voicing clarity (``metrics.voicing_clarity``): the peak of the normalised autocorrelation at
  pitch lags (80-400 Hz) over the loudest half of each clip's frames, averaged over clips; the
  pitch harmonics that 64 mel bands lose and a vocoder must put back.
- at 6, 20, 50 and 200 sampler steps (one model, the checkpoint's default sampler; 6 steps of
  a DiffWave-schedule checkpoint is DiffWave's fast schedule), a mel model's frames through the
  vocoder and, beside them, the same frames (same seed) through Griffin-Lim; unconditional samples at 6 and
  50 steps, to show that they are not one sound (the share of the most common class, and the
  IS) and that fast and slow sampling agree;
- real-time factor at 6 steps: compute seconds per second of audio for a batch of clips, the
  whole route (mel model and vocoder; and with Griffin-Lim), and each inverse alone, on this
  machine's CPU (run with OMP_NUM_THREADS=1 for one thread);
- bits per sample of held-out clips (16-bit, discretised decoder, real samples only) under a
  waveform checkpoint (the shipped one when it is a waveform model, or ``--likelihood-checkpoint``),
  and with a DiffWave ``--vocoder`` under the vocoder given each clip's own log-mel frames (what
  the waveform holds beyond its spectrogram; a learned harmonic vocoder is not a density).

Writes ``--out-dir/audio_quality_<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmark_stats import mean_se
from diffkit.runs import hardware_summary
from modalities.audio.data import DEFAULT_WINDOW, FSDD_SAMPLE_RATE, load_fsdd
from modalities.audio.mel import griffin_lim, log_mel
from modalities.audio.metrics import (
    CLASSIFIER_DIR,
    frechet_distance,
    inception_score,
    load_digit_classifier,
    save_digit_classifier,
    train_digit_classifier,
    voicing_clarity,
)
from modalities.audio.modality import (
    DEFAULT_CHECKPOINT,
    LEARNED_VOCODER_KIND,
    bits_per_sample,
    checkpoint_kind,
    default_vocoder,
    generate_audio,
    load_audio_model,
    vocode,
)


def score(clf, audio: torch.Tensor, labels: torch.Tensor | None, ref_features: np.ndarray) -> dict:
    """Classifier accuracy (when labels are given), FD to the reference features, IS, class shares."""
    feats = clf.embed(audio)
    probs = clf.head(feats).softmax(-1)
    pred = probs.argmax(1)
    shares = torch.bincount(pred, minlength=probs.shape[1]).float() / len(pred)
    row = {
        "n": len(audio),
        "fd": round(frechet_distance(feats.numpy(), ref_features), 2),
        "is": round(inception_score(probs.numpy()), 3),
        "top_class_share": round(shares.max().item(), 3),
        "classes_heard": int((shares > 0).sum()),
        "voicing": round(voicing_clarity(audio).mean().item(), 3),
    }
    if labels is not None:
        row["acc"] = round((pred == labels).float().mean().item(), 4)
    return row


def train_classifier(args) -> int:
    start = time.perf_counter()
    model, acc, steps = train_digit_classifier(epochs=args.classifier_epochs, seed=args.seed, progress=True)
    wall = time.perf_counter() - start
    path = save_digit_classifier(model, args.classifier, {
        "trained_on": "FSDD train split (takes 5-49, 2,700 clips), peak 0.9, log-mel front end",
        "held_out_accuracy": acc,
        "held_out": "FSDD test split (takes 0-4, 300 clips)",
        "epochs": args.classifier_epochs,
        "seed": args.seed,
        "wall_time_s": round(wall, 1),
        "command": "python benchmarks/audio_quality.py --train-classifier",
        "hardware": hardware_summary(),
    }, step=steps)
    print(f"classifier: held-out accuracy {acc:.4f} after {steps} steps in {wall:.0f} s; wrote {path}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="audio checkpoint (waveform or mel)")
    p.add_argument("--num-samples", type=int, default=100, help="class-conditional clips per row (10 per digit)")
    p.add_argument("--steps", type=int, nargs="+", default=[6, 20, 50, 200])
    p.add_argument("--sampler", help="default: the checkpoint's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rtf-clips", type=int, default=8, help="clips in the real-time-factor batch")
    p.add_argument("--likelihood-checkpoint", help="waveform checkpoint for bits per sample (default: the "
                                                   "checkpoint when it is a waveform model)")
    p.add_argument("--nll-clips", type=int, default=100, help="held-out clips for bits per sample")
    p.add_argument("--vocoder", help="the vocoder of a mel model's rows, beside Griffin-Lim (default: the shipped "
                                     "learned vocoder, checkpoints/digits-vocoder)")
    p.add_argument("--vocoder-steps", type=int, nargs="+", default=[6],
                   help="DiffWave vocoders: sampler steps for the --vocoder rows (default: 6, DiffWave's fast "
                        "schedule; a learned vocoder has no steps)")
    p.add_argument("--out-dir", help="where the .json/.md go (default: benchmarks/results; a temporary folder with "
                                     "--quick)")
    p.add_argument("--name", help="file name stem (default: the checkpoint's directory name)")
    p.add_argument("--classifier", default=str(CLASSIFIER_DIR))
    p.add_argument("--train-classifier", action="store_true", help="(re)train the spoken-digit classifier")
    p.add_argument("--classifier-epochs", type=int, default=12)
    p.add_argument("--quick", action="store_true",
                   help="smoke run, not a measurement: 10 clips a row at 2 steps, 2 clips for the real-time factor "
                        "and bits per sample, 2 vocoder steps")
    args = p.parse_args(argv)
    scratch = None
    if args.quick:
        args.num_samples, args.steps, args.rtf_clips, args.nll_clips, args.vocoder_steps = 10, [2], 2, 2, [2]
        if args.out_dir is None:
            scratch = tempfile.TemporaryDirectory(prefix="audio_quality-quick-")  # removed when main returns
            args.out_dir = scratch.name
    args.out_dir = args.out_dir or "benchmarks/results"
    torch.manual_seed(args.seed)
    if args.train_classifier:
        return train_classifier(args)

    t0 = time.perf_counter()
    clf = load_digit_classifier(args.classifier)
    model = load_audio_model(args.checkpoint, "cpu")
    name = args.name or Path(args.checkpoint).resolve().name
    train = load_fsdd("train", FSDD_SAMPLE_RATE, DEFAULT_WINDOW, peak=0.9)
    test = load_fsdd("test", FSDD_SAMPLE_RATE, DEFAULT_WINDOW, peak=0.9)
    ref = clf.embed(test.audio).numpy()
    results: dict = {
        "checkpoint": _shown(args.checkpoint), "kind": model.kind, "seed": args.seed,
        "command": "python " + " ".join(["benchmarks/audio_quality.py", *(argv if argv is not None else sys.argv[1:])]),
        "hardware": hardware_summary(), "classifier": dict(clf_info(args.classifier)),
        "sampler": args.sampler or model.default("sampler", "ddpm"),
        "guidance_scale": model.default("guidance_scale", 1.0), "rows": {},
    }
    rows = results["rows"]
    # Real-clip references.
    rows["real held-out clips (ceiling)"] = score(clf, test.audio, test.labels, ref)
    g = torch.Generator().manual_seed(args.seed)
    # As many clips as each generated row, so that the Frechet distances share their sample-size bias.
    pick = torch.randperm(len(train), generator=g)[: args.num_samples]
    rows["real training clips (seen by the classifier)"] = score(clf, train.audio[pick], train.labels[pick], ref)
    cfg = model.mel_config
    voc = (args.vocoder or default_vocoder()) if cfg is not None else None
    voc = None if voc is None or str(voc) == "griffin-lim" else _shown(voc)
    learned = voc is not None and checkpoint_kind(voc) == LEARNED_VOCODER_KIND
    results["vocoder"] = voc
    voc_name = "the learned vocoder" if learned else "the vocoder"
    inverses = [("Griffin-Lim", "griffin-lim")] + ([(voc_name, voc)] if voc else [])

    def invert(frames, how, length):
        if how == "griffin-lim":
            return griffin_lim(frames, cfg, length=length)
        steps = {} if learned else {"steps": args.vocoder_steps[0]}  # a learned vocoder has no steps
        return vocode(frames, checkpoint=how, seed=args.seed, device="cpu", **steps).audio[..., :length]

    if cfg is not None:
        held = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed + 7))[: args.num_samples]
        rows["held-out clips (the same clips as the held-out rows below)"] = score(clf, test.audio[held],
                                                                                test.labels[held], ref)
        for source, clips, labels_ in (("training clips", train.audio[pick], train.labels[pick]),
                                       ("held-out clips", test.audio[held], test.labels[held])):
            for title, how in inverses:
                start = time.perf_counter()
                out = invert(log_mel(clips, cfg), how, clips.shape[-1])
                rows[f"{source} -> log-mel -> {title}"] = {**score(clf, out, labels_, ref),
                                                           "seconds": round(time.perf_counter() - start, 1)}
        if voc and not learned:
            for vsteps in args.vocoder_steps[1:]:
                start = time.perf_counter()
                voiced = vocode(log_mel(train.audio[pick], cfg), checkpoint=voc, steps=vsteps, seed=args.seed,
                                device="cpu").audio
                rows[f"training clips -> log-mel -> the vocoder, {vsteps} steps"] = {
                    **score(clf, voiced, train.labels[pick], ref), "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(rows, indent=1), flush=True)

    labels = torch.arange(args.num_samples) % 10
    route = {"vocoder": voc or "griffin-lim"} if model.kind == "mel" else {}
    for steps in args.steps:
        for title, how in (inverses[::-1] if model.kind == "mel" else [("", None)]):
            start = time.perf_counter()
            out = generate_audio(checkpoint=args.checkpoint, labels=labels, steps=steps, seed=args.seed,
                                 sampler=args.sampler, device="cpu", **({"vocoder": how} if how else {}))
            wall = time.perf_counter() - start
            key = f"class-conditional, {steps} steps" + (f", {title}" if title else "")
            rows[key] = {**score(clf, out.audio, labels, ref), "seconds": round(wall, 1)}
            print(f"{key}: {rows[key]}", flush=True)
    if model.num_classes is not None:
        for steps in sorted({min(args.steps), 50 if 50 in args.steps else max(args.steps)}):
            out = generate_audio(checkpoint=args.checkpoint, num_samples=args.num_samples, steps=steps,
                                 seed=args.seed + 1, sampler=args.sampler, device="cpu", **route)
            rows[f"unconditional, {steps} steps"] = score(clf, out.audio, None, ref)
            print(f"unconditional {steps}: {rows[f'unconditional, {steps} steps']}", flush=True)

    # Real-time factor at 6 steps: compute seconds per second of audio, the whole route.
    n = args.rtf_clips
    generate_audio(checkpoint=args.checkpoint, labels=labels[:2], steps=6, seed=0, device="cpu", **route)  # warm-up
    start = time.perf_counter()
    out = generate_audio(checkpoint=args.checkpoint, labels=labels[:n], steps=6, seed=args.seed, device="cpu",
                         **route)
    total = time.perf_counter() - start
    seconds_of_audio = n * out.audio.shape[-1] / out.sample_rate
    rtf = {"clips": n, "audio_seconds": round(seconds_of_audio, 3), "compute_seconds": round(total, 3),
           "rtf": round(total / seconds_of_audio, 4), "threads": torch.get_num_threads(),
           "route": f"mel model, then {route['vocoder']}" if route else model.kind}
    if model.kind == "mel":
        frames = log_mel(out.audio, cfg)
        start = time.perf_counter()
        griffin_lim(frames, cfg, length=out.audio.shape[-1])
        rtf["griffin_lim_seconds"] = round(time.perf_counter() - start, 3)
        if voc:
            start = time.perf_counter()
            invert(frames, voc, out.audio.shape[-1])
            rtf["vocoder_seconds"] = round(time.perf_counter() - start, 3)
            if route["vocoder"] != "griffin-lim":
                start = time.perf_counter()
                generate_audio(checkpoint=args.checkpoint, labels=labels[:n], steps=6, seed=args.seed, device="cpu",
                               vocoder="griffin-lim")
                rtf["griffin_lim_route_rtf"] = round((time.perf_counter() - start) / seconds_of_audio, 4)
    results["rtf_6_steps"] = rtf
    print(f"RTF at 6 steps: {rtf}", flush=True)

    # Bits per sample under a waveform model, and under the vocoder given each clip's own log-mel.
    nll_ckpt = args.likelihood_checkpoint or (args.checkpoint if model.kind == "waveform" else None)
    raw = load_fsdd("test", FSDD_SAMPLE_RATE, DEFAULT_WINDOW, peak=None)  # 16-bit as stored
    idx = torch.randperm(len(raw), generator=torch.Generator().manual_seed(args.seed))[: args.nll_clips]
    for key, ckpt, note in (
        ("bits_per_sample", nll_ckpt, "variational bound over all training steps, 16-bit discretised decoder, "
                                      "real samples only"),
        ("vocoder_bits_per_sample", None if learned else voc, "-log2 p(audio | its own log-mel) per sample: the "
                                                              "same bound, conditional on the spectrogram"),
    ):
        if not ckpt:
            results[key] = None
            continue
        start = time.perf_counter()
        bps = bits_per_sample(raw.audio[idx], checkpoint=ckpt, lengths=[raw.lengths[i] for i in idx],
                              seed=args.seed, device="cpu")
        mean, stderr = mean_se(bps)
        results[key] = {"checkpoint": str(ckpt), "clips": len(idx), "mean": round(mean, 4), "stderr": round(stderr, 4),
                        "seconds": round(time.perf_counter() - start, 1), "note": note}
        print(f"{key.replace('_', ' ')}: {results[key]}", flush=True)
    results["wall_time_s"] = round(time.perf_counter() - t0, 1)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"audio_quality_{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / f"audio_quality_{name}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def _shown(path) -> str:
    """A path as the results show it: relative to the working directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def clf_info(path) -> dict:
    cfg = json.loads((Path(path) / "config.json").read_text())
    info = cfg.get("modality_config") or {}
    return {k: info.get(k) for k in ("held_out_accuracy", "trained_on", "command")}


def markdown(r: dict) -> str:
    lines = [f"# Audio quality: `{r['checkpoint']}` ({r['kind']} model)", "",
             f"`{r['command']}`; seed {r['seed']}; {r['hardware']}; {r['wall_time_s']} s in all.", "",
             f"Sampler {r['sampler']}, guidance scale {r['guidance_scale']} for labelled clips. Classifier: "
             f"held-out accuracy {r['classifier']['held_out_accuracy']:.4f} ({r['classifier']['trained_on']}).", "",
             f"Vocoder: `{r.get('vocoder')}`, beside Griffin-Lim (64 iterations)." if r.get("vocoder") else
             "Inverse: Griffin-Lim (64 iterations).", "",
             "| clips | n | accuracy | FD (to held-out) | IS | top class share | voicing clarity | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for key, row in r["rows"].items():
        acc = f"{row['acc']:.3f}" if "acc" in row else ""
        voicing = f"{row['voicing']:.3f}" if "voicing" in row else ""
        lines.append(f"| {key} | {row['n']} | {acc} | {row['fd']:.2f} | {row['is']:.2f} | "
                     f"{row['top_class_share']:.2f} | {voicing} | {row.get('seconds', '')} |")
    rtf = r["rtf_6_steps"]
    lines += ["", f"Real-time factor at 6 steps, the whole route ({rtf.get('route', '')}): **{rtf['rtf']:.3f}** "
                  f"({rtf['compute_seconds']} s of compute for "
                  f"{rtf['clips']} clips, {rtf['audio_seconds']} s of audio, {rtf['threads']} thread(s)"
              + (f"; Griffin-Lim alone {rtf['griffin_lim_seconds']} s" if "griffin_lim_seconds" in rtf else "")
              + (f"; the vocoder alone {rtf['vocoder_seconds']} s" if "vocoder_seconds" in rtf else "")
              + (f"; the Griffin-Lim route's real-time factor {rtf['griffin_lim_route_rtf']:.3f}"
                 if "griffin_lim_route_rtf" in rtf else "")
              + ")."]
    b = r.get("bits_per_sample")
    if b:
        lines += ["", f"Bits per sample of {b['clips']} held-out clips under `{b['checkpoint']}`: "
                      f"**{b['mean']:.3f}** (standard error {b['stderr']:.3f}; {b['note']})."]
    else:
        lines += ["", "Bits per sample: not measured (needs a waveform checkpoint: --likelihood-checkpoint)."]
    b = r.get("vocoder_bits_per_sample")
    if b:
        lines += ["", f"Bits per sample of the same clips under the vocoder `{b['checkpoint']}`: "
                      f"**{b['mean']:.3f}** (standard error {b['stderr']:.3f}; {b['note']})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
