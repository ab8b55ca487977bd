"""A small, modality-agnostic training loop for diffusion models and any other network.

One :class:`Trainer` serves every modality: it needs a model, a map-style dataset and either a
diffusion object with ``.loss(model, x0, **cond)`` and ``.config`` (dataset items are a tensor
``x0`` or a dict ``{"x": x0, **cond}``), or a ``loss_fn(model, batch)`` for any other objective
(dataset items are any dict of tensors). It adds what every run needs and is easy to get wrong:
AdamW with linear warm-up and optional cosine/linear decay, gradient accumulation, gradient
clipping, EMA weights, bf16 autocast on GPUs, TensorBoard and progress output, periodic samples,
atomic checkpoints with exact resume, a hard stop on NaN/Inf that keeps the last good
checkpoint, and DistributedDataParallel under ``torchrun``.

Under ``torchrun`` a Trainer joins the process group and, if it created the group, leaves it
when ``train()`` ends. A script that trains several networks in one run (a planner's value
function, inverse dynamics and denoiser) calls ``diffkit.distributed.init_distributed(device)``
first; the Trainers then use that group and leave it alone.

Determinism: the data order of each epoch comes from (seed, epoch), and every step reseeds the
Python, NumPy and torch RNGs from (seed, rank, step). A run resumed from a checkpoint therefore
continues exactly as the uninterrupted run would have (with ``num_workers=0``; with worker
processes the data order is still exact, only random augmentations inside workers may differ).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import logging
import math
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from tqdm.auto import tqdm

from diffkit import distributed
from diffkit.checkpoint import CheckpointError, checkpoint_exists, holds_other_files, load_checkpoint, save_checkpoint
from diffkit.utils import resolve_device, seed_everything

__all__ = ["TrainConfig", "Trainer", "TrainingError", "ema_decay_at", "ema_initial_share"]

logger = logging.getLogger(__name__)

MIXED_PRECISION_MODES = ("auto", "bf16", "no")
LR_DECAYS = ("none", "cosine", "linear")
# Names every history record has; a loss_fn's extra logged values must not shadow them.
_RECORD_FIELDS = ("step", "loss", "lr", "grad_norm", "steps_per_sec")
# Relative tolerance for "the same setting": configs that went through JSON or were recomputed
# on another machine differ in the last bits of their floats (betas by ~1e-16).
_SETTING_RTOL = 1e-9


class TrainingError(FloatingPointError):
    """Training diverged (NaN/Inf loss, gradient or weights). Carries the step and checkpoint path."""

    def __init__(self, message: str, *, step: int, checkpoint_path: Path | None):
        super().__init__(message)
        self.step = step
        self.checkpoint_path = checkpoint_path


@dataclass
class TrainConfig:
    """Everything that controls a training run; stored in each checkpoint as ``config["train"]``.

    ``batch_size`` is per process and per micro-batch: one optimizer step sees
    batch_size x grad_accum_steps x world size examples.
    Learning rate of the k-th optimizer step (k = 1 .. max_steps, W = ``warmup_steps``,
    p = (k - W) / (max_steps - W)): lr * k / W while k <= W, then for ``lr_decay`` "none" lr,
    "linear" min_lr + (lr - min_lr) * (1 - p), "cosine" min_lr + (lr - min_lr) * (1 + cos(pi p)) / 2.
    So the peak lr is used at step W and ``min_lr`` at the last step (with min_lr=0 that step
    changes nothing but the EMA). A resumed run follows its current settings: the schedule
    (``max_steps``, ``warmup_steps``, ``lr_decay``, ``min_lr``) and AdamW's ``lr``, ``betas``,
    ``adam_eps`` and ``weight_decay`` (a warning names those that changed); only the optimizer's
    moments and the step count come from the checkpoint. So resuming a decayed run with a
    larger max_steps raises the LR again from the first resumed step.
    ``grad_accum_steps``: gradients of that many consecutive micro-batches are averaged (weighted
    by their sizes, so a short last micro-batch of an epoch counts per example) before one
    optimizer step, which then equals a step on their union when the loss is a mean over examples.
    ``grad_clip`` None or 0 disables clipping (the gradient norm is still logged and checked).
    ``ema_start``: for the first ``ema_start`` steps the EMA copies the weights instead of
    averaging, so that it does not keep a long memory of the random initialisation.
    ``ema_warmup`` (on by default): the k-th averaging update (k = step - ema_start) uses the
    decay min(ema_decay, (1 + k) / (10 + k)) (TensorFlow's ExponentialMovingAverage with
    ``num_updates``, diffusers' EMAModel), so the EMA forgets the initial weights within a few
    dozen steps instead of keeping ema_decay ** steps of them (0.999 over 800 steps keeps 45%);
    the decay reaches 0.999 after ~9000 updates, 0.99 after ~900. Off, every update uses
    ``ema_decay`` (:func:`ema_decay_at` gives the decay of any step, :func:`ema_initial_share`
    what is left of the initial weights).
    ``save_every`` / ``sample_every`` 0 disables periodic saves (the final one still happens) /
    samples. ``mixed_precision``: "auto" (bf16 autocast on CUDA, off elsewhere), "bf16" or "no".
    """

    max_steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 100
    lr_decay: str = "none"
    min_lr: float = 0.0
    grad_accum_steps: int = 1
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    ema_start: int = 0
    ema_warmup: bool = True
    mixed_precision: str = "auto"
    seed: int = 0
    output_dir: str = "runs/default"
    save_every: int = 500
    sample_every: int = 500
    log_every: int = 50
    device: str = "auto"
    num_workers: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        # Normalise types that JSON round-trips differently (Path -> str, list -> tuple).
        self.output_dir = str(self.output_dir)
        self.device = str(self.device)
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        problems = []
        if isinstance(self.grad_accum_steps, bool) or not isinstance(self.grad_accum_steps, int):
            problems.append(f"grad_accum_steps must be an integer, got {self.grad_accum_steps!r}")
        elif self.grad_accum_steps < 1:
            problems.append("grad_accum_steps must be >= 1")
        for name in ("max_steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        for name in ("warmup_steps", "ema_start", "save_every", "sample_every", "num_workers", "seed", "weight_decay"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if not self.lr > 0:
            problems.append("lr must be > 0")
        if self.lr_decay not in LR_DECAYS:
            problems.append(f"lr_decay must be one of {', '.join(LR_DECAYS)}, got {self.lr_decay!r}")
        if not 0.0 <= self.min_lr <= self.lr:
            problems.append(f"min_lr must be in [0, lr={self.lr:g}], got {self.min_lr:g}")
        elif self.lr_decay == "none" and self.min_lr != 0:
            problems.append(f"min_lr={self.min_lr:g} has no effect with lr_decay='none'; set lr_decay='cosine' or 'linear'")
        if self.grad_clip is not None and self.grad_clip < 0:
            problems.append("grad_clip must be > 0, or None/0 to disable clipping")
        if not 0.0 <= self.ema_decay <= 1.0:
            problems.append("ema_decay must be in [0, 1]")
        if not isinstance(self.ema_warmup, bool):
            problems.append(f"ema_warmup must be True or False, got {self.ema_warmup!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            problems.append("betas must be two numbers in [0, 1)")
        if self.mixed_precision not in MIXED_PRECISION_MODES:
            problems.append(f"mixed_precision must be one of {', '.join(MIXED_PRECISION_MODES)}")
        if problems:
            raise ValueError(f"invalid TrainConfig: {'; '.join(problems)}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_dict` rebuilds an equal config."""
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(known))}")
        return cls(**data)


class Trainer:
    """Train ``model`` on ``dataset`` with ``diffusion.loss`` or with ``loss_fn``; see the module docstring.

    At least one of ``diffusion`` and ``loss_fn`` is given (with both, ``loss_fn`` trains and
    ``diffusion`` is the process the network belongs to, recorded in the checkpoint: e.g. an
    objective that adds its own terms to ``diffusion.loss``):

    - ``diffusion``: dataset items are a tensor ``x0`` or a dict ``{"x": x0, **cond}``; the loss
      is ``diffusion.loss(model, x0, **cond, **loss_kwargs)``.
    - ``loss_fn(model, batch) -> loss`` or ``(loss, {name: float or 0-dim tensor})``: any
      network, any objective. ``batch`` is the collated dataset item on the device (a tensor, or
      a dict of tensors with any keys); ``loss`` a scalar tensor, best a mean over the examples
      (gradient accumulation assumes so). The named values are averaged like the loss and
      logged next to it (history, progress bar, TensorBoard ``train/<name>``). ``model`` is the
      module being trained (the DDP wrapper under torchrun): call it, not its submodules, or
      the gradients are not averaged across processes. Without a diffusion, checkpoints
      record ``"diffusion": null``.

    ``parameters`` (an iterable of the model's parameters) limits what the optimiser updates,
    e.g. a value head on a frozen body; default: every parameter of the model that requires
    grad. The others keep their weights; ``requires_grad_(False)`` on them also saves the
    backward pass through them. ``modality_config`` (JSON-able) is stored as the checkpoint's
    ``"modality_config"``; ``side_files`` ({file name: path or bytes}) are written into every
    checkpoint (a tokenizer, normaliser statistics).

    Seeding: the trainer seeds its own randomness (data order, diffusion noise) from
    ``config.seed``, but the network is built before the trainer sees it. For two runs with the
    same seed to start from the same weights, build the network right after
    ``diffkit.seed_everything(seed)``. (A resumed run takes its weights from the checkpoint.)

    Attributes available to ``sample_fn(trainer, step)`` and after training: ``model`` (the
    plain module, never the DDP wrapper), ``ema_model``, ``optimizer``, ``lr_scheduler``,
    ``step`` (optimizer steps done), ``device``, ``config``, ``checkpoint_dir``, ``history``
    (one dict per logged step: step, loss, lr, grad_norm, steps_per_sec and the loss_fn's named
    values, averaged over the steps since the previous record), ``rank``, ``world_size``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        diffusion: Any,
        dataset: Dataset,
        config: TrainConfig | None = None,
        *,
        loss_fn: Callable[[torch.nn.Module, Any], Any] | None = None,
        parameters: Iterable[torch.nn.Parameter] | None = None,
        modality: str | None = None,
        model_config: Mapping[str, Any] | None = None,
        modality_config: Mapping[str, Any] | None = None,
        side_files: Mapping[str, str | os.PathLike | bytes] | None = None,
        sample_fn: Callable[[Trainer, int], Any] | None = None,
        loss_kwargs: Mapping[str, Any] | None = None,
    ):
        self.config = config if config is not None else TrainConfig()
        cfg = self.config
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(cfg).__name__}; build one with TrainConfig(...)")
        _validate_objective(diffusion, loss_fn, loss_kwargs)
        _validate_dataset(dataset, needs_x=loss_fn is None)
        self.diffusion = diffusion
        self.loss_fn = loss_fn
        self.dataset = dataset
        self.modality = modality
        model_class = type(model)
        self.model_config = dict(model_config or {"class": f"{model_class.__module__}.{model_class.__qualname__}", "kwargs": {}})
        if modality_config is not None and not isinstance(modality_config, Mapping):
            raise TypeError(f"modality_config must be a dict, got {_describe(modality_config)}")
        self.modality_config = dict(modality_config or {})
        # Checked now: save_checkpoint would only refuse them after the first save_every steps.
        _check_json_able(self.model_config, "model_config")
        _check_json_able(self.modality_config, "modality_config")
        self.side_files = _validate_side_files(side_files)
        self.sample_fn = sample_fn
        self.loss_kwargs = dict(loss_kwargs or {})

        self.device = distributed.device_for_rank(resolve_device(cfg.device))
        self._owns_process_group = distributed.init_distributed(self.device)
        self.rank = distributed.get_rank()
        self.world_size = distributed.get_world_size()
        self.is_main = self.rank == 0
        seed_everything(cfg.seed)

        # Module.to() moves parameters in place, so the identities checked here stay valid.
        self.model = model.to(self.device)
        self._parameters = _select_parameters(self.model, parameters)
        self._train_model: torch.nn.Module = self.model
        if distributed.is_distributed():
            # Wrapping broadcasts rank 0's weights, so every rank starts from the same model.
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        # Copied after the DDP broadcast so the EMA starts identical on every rank.
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False).eval()

        self.optimizer = torch.optim.AdamW(
            self._parameters,
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_factor(cfg))
        self.autocast_dtype = _autocast_dtype(cfg.mixed_precision, self.device)

        self.sampler = _ResumableSampler(
            dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=cfg.seed
        )
        # Seeds the worker processes (num_workers > 0); reseeded every epoch in _batches().
        self._loader_generator = torch.Generator()
        self.loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            num_workers=cfg.num_workers,
            generator=self._loader_generator,
            pin_memory=self.device.type == "cuda",
        )

        self.checkpoint_dir = Path(cfg.output_dir) / "checkpoint"
        self.step = 0
        self.last_saved_step: int | None = None
        self.history: list[dict[str, float]] = []
        # Seconds spent in the training loop by every run that led to the current weights (a
        # resumed run adds its own to what the checkpoint records); None when it resumed from a
        # checkpoint that did not record it.
        self.train_seconds: float | None = 0.0
        # One record per run (segment) that led to the current weights: its steps, command,
        # weight-affecting settings, time and last loss. Earlier ones come from the checkpoint;
        # the current one is added at each save. (The checkpoint's config["train"] is only the last run's.)
        self.segments: list[dict[str, Any]] = []
        self._segment: dict[str, Any] | None = None
        self.writer: Any = None  # the TensorBoard SummaryWriter while train() runs on the main process
        self._resumed = False
        # The loss_fn's value names of the first step; fixed so that every rank all-reduces
        # the same vector at every step.
        self._value_names: tuple[str, ...] | None = None

    # ----------------------------------------------------------------------------------------
    # Public API
    # ----------------------------------------------------------------------------------------

    def train(self) -> None:
        """Run until ``config.max_steps``, resuming from ``output_dir/checkpoint`` when it exists."""
        cfg = self.config
        writer = bar = None
        try:
            self.resume()
            if self.step >= cfg.max_steps:
                if self.is_main:
                    logger.info("nothing to do: checkpoint step %d >= max_steps %d", self.step, cfg.max_steps)
                return
            if self.is_main and cfg.tensorboard:
                writer = _summary_writer(Path(cfg.output_dir) / "tensorboard", purge_step=self.step or None)
            # sample_fn may log to it too (audio clips, images); None when TensorBoard is off.
            self.writer = writer
            bar = tqdm(
                total=cfg.max_steps,
                initial=self.step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                disable=not (cfg.progress and self.is_main),
            )
            self._segment = {"steps": [self.step, self.step], "command": shlex.join(sys.argv), "seconds": 0.0,
                             "device": str(self.device), "world_size": self.world_size,
                             "threads": torch.get_num_threads(),
                             "train": {key: value for key, value in self.config.to_dict().items()
                                       if key in _WEIGHT_SETTINGS}}
            self._loop(bar, writer)
            if self.last_saved_step != self.step:
                self.save()
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            self.writer = None
            if self._owns_process_group:
                distributed.cleanup()
                self._owns_process_group = False

    def resume(self) -> bool:
        """Load model, EMA, optimizer, LR schedule and step from ``checkpoint_dir`` if it exists.

        Called by :meth:`train`; returns True when a checkpoint was loaded. Every rank loads the
        same files, so the replicas stay identical.
        """
        if self._resumed:
            return False
        if holds_other_files(self.checkpoint_dir):
            # Starting over would overwrite whatever is left of the old run.
            raise CheckpointError(
                f"{self.checkpoint_dir} holds files but no config.json: an incomplete or damaged checkpoint. "
                "Restore it to resume, or move it away (or choose another output_dir) to start a new run."
            )
        if not checkpoint_exists(self.checkpoint_dir):
            return False
        ckpt = load_checkpoint(self.checkpoint_dir, modality=self.modality)
        try:
            self.model.load_state_dict(ckpt.model_state)
        except RuntimeError as err:
            raise CheckpointError(
                f"cannot resume from {ckpt.path}: its weights do not fit this model "
                f"({_model_differences(ckpt.model_config, self.model_config)}). Train with the settings of the run "
                "that wrote it, or choose another output_dir for a new run."
            ) from err
        if ckpt.ema_state is not None:
            self.ema_model.load_state_dict(ckpt.ema_state)
        else:
            warnings.warn(f"checkpoint {ckpt.path} has no EMA weights; the EMA restarts from the current weights",
                          stacklevel=2)
            self.ema_model.load_state_dict(ckpt.model_state)
        if ckpt.optimizer_state is not None:
            try:
                self.optimizer.load_state_dict(ckpt.optimizer_state)
            except ValueError as err:
                raise ValueError(
                    f"cannot resume the optimizer from {ckpt.path} ({err}): it optimised other parameters than "
                    f"this trainer ({len(self._parameters)}). Pass the same `parameters=` as the run that wrote it."
                ) from err
        else:
            warnings.warn(f"checkpoint {ckpt.path} has no optimizer state; AdamW's moments restart from zero",
                          stacklevel=2)
        if ckpt.lr_scheduler_state is not None:
            self.lr_scheduler.load_state_dict(ckpt.lr_scheduler_state)
        self._apply_optimizer_settings(ckpt.config.get("train") or {}, ckpt.path)
        changed = _changed_settings(ckpt.diffusion_config, getattr(self.diffusion, "config", None))
        if changed:
            warnings.warn(
                f"resuming from {ckpt.path} with a different diffusion config (changed: {', '.join(changed)}); "
                "the model was trained for the old one",
                stacklevel=2,
            )
        self.step = self.last_saved_step = ckpt.step
        recorded = ckpt.extra.get("train_seconds")
        self.train_seconds = float(recorded) if isinstance(recorded, (int, float)) else None
        segments = ckpt.extra.get("segments")
        if isinstance(segments, list):
            self.segments = list(segments)
        elif ckpt.step > 0:  # a checkpoint from before this record: its runs are unknown, not absent
            self.segments = [{"steps": [0, ckpt.step], "command": None}]
        self._resumed = True
        if self.is_main:
            logger.info("resumed from %s at step %d", ckpt.path, ckpt.step)
        return True

    def save(self) -> None:
        """Write ``checkpoint_dir`` (rank 0 only; the other ranks wait)."""
        distributed.barrier()
        if self.is_main:
            self._check_weights_finite()
            save_checkpoint(
                self.checkpoint_dir,
                model=self.model,
                config={
                    "modality": self.modality,
                    "model": self.model_config,
                    "diffusion": getattr(self.diffusion, "config", None),
                    "modality_config": self.modality_config,
                    "train": self.config.to_dict(),
                },
                ema_model=self.ema_model,
                optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler,
                step=self.step,
                extra={"world_size": self.world_size, "train_seconds": self.train_seconds,
                       "segments": self._segments_so_far()},
                side_files=self.side_files,
            )
        self.last_saved_step = self.step
        distributed.barrier()

    # ----------------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------------

    def _loop(self, bar: tqdm, writer: Any) -> None:
        cfg = self.config
        batches = self._batches()
        window: list[dict[str, float]] = []
        window_start = time.perf_counter()
        first_step = True
        while self.step < cfg.max_steps:
            step_start = time.perf_counter()
            step = self.step + 1
            # Reseeding per step (not once per run) is what makes a resumed run exact.
            seed_everything(_step_seed(cfg.seed, self.rank, step))
            micro_batches = [next(batches) for _ in range(cfg.grad_accum_steps)]
            if first_step:
                for batch in micro_batches:
                    _check_batch_finite(batch)
                first_step = False
            values, grad_norm, lr = self._train_step(step, micro_batches)
            window.append(values)
            bar.update(1)

            if self.is_main and (step % cfg.log_every == 0 or step == cfg.max_steps):
                elapsed = time.perf_counter() - window_start
                record: dict[str, float] = {"step": step}
                record.update({name: sum(v[name] for v in window) / len(window) for name in window[0]})
                record.update(lr=lr, grad_norm=grad_norm, steps_per_sec=len(window) / max(elapsed, 1e-9))
                self.history.append(record)
                shown = {name: f"{record[name]:.4g}" for name in self._value_names or ()}
                bar.set_postfix(step=step, loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", **shown)
                if writer is not None:
                    for name, value in record.items():
                        if name != "step":
                            writer.add_scalar(f"train/{name}", value, step)
                window.clear()
                window_start = time.perf_counter()
            if cfg.save_every and step % cfg.save_every == 0:
                self.save()
            if self.sample_fn is not None and cfg.sample_every and step % cfg.sample_every == 0 and self.is_main:
                self.ema_model.eval()
                with torch.no_grad():
                    self.sample_fn(self, step)
            elapsed = time.perf_counter() - step_start
            if self.train_seconds is not None:
                self.train_seconds += elapsed
            if self._segment is not None:
                self._segment["seconds"] += elapsed

    def _segments_so_far(self) -> list[dict[str, Any]]:
        """The runs that led to the weights being saved, this one up to the current step included."""
        if self._segment is None or self.step <= self._segment["steps"][0]:
            return list(self.segments)
        current = {**self._segment, "steps": [self._segment["steps"][0], self.step],
                   "seconds": round(self._segment["seconds"], 1),
                   "final_loss": self.history[-1]["loss"] if self.history else None}
        return [*self.segments, current]

    def _train_step(self, step: int, micro_batches: list[Any]) -> tuple[dict[str, float], float, float]:
        """One optimizer step over ``micro_batches``.

        Returns ({"loss": ..., **loss_fn values} averaged over micro-batches and ranks, gradient
        norm before clipping, learning rate used).
        """
        cfg = self.config
        self._train_model.train()
        # The whole model, not just the optimised parameters: frozen ones that still require
        # grad would otherwise accumulate gradients over the whole run.
        self.model.zero_grad(set_to_none=True)
        sizes = [_batch_length(batch) for batch in micro_batches]
        if None in sizes:
            weights = [1.0 / len(micro_batches)] * len(micro_batches)
        else:
            weights = [size / sum(sizes) for size in sizes]
        totals: torch.Tensor | None = None
        for index, (batch, weight) in enumerate(zip(micro_batches, weights)):
            last = index == len(micro_batches) - 1
            # DDP all-reduces in backward; the gradients of the earlier micro-batches only need
            # to be summed locally, so one all-reduce per optimizer step is enough.
            sync = contextlib.nullcontext() if last or self._train_model is self.model else self._train_model.no_sync()
            with sync:
                with torch.autocast(
                    self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
                ):
                    loss, values = self._loss(batch)
                (loss if weight == 1.0 else loss * weight).backward()
            stats = torch.stack([loss.detach().float(), *(values[name] for name in self._value_names or ())]) * weight
            totals = stats if totals is None else totals + stats
        max_norm = cfg.grad_clip if cfg.grad_clip else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self._parameters, max_norm)
        # One sync per step for all numbers; the all-reduce also makes every rank agree on
        # whether to stop (the gradient norm is already identical after DDP's averaging).
        assert totals is not None
        stats = distributed.all_reduce_mean(torch.cat([totals, grad_norm.detach().float().to(totals.device).reshape(1)]))
        *averages, grad_norm_value = stats.tolist()
        loss_value = averages[0]
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm_value)):
            raise self._divergence_error(
                step, f"loss={loss_value}, gradient norm={grad_norm_value} is not finite; the weights were not updated."
            )
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.lr_scheduler.step()
        self._update_ema(step)
        self.step = step
        return dict(zip(("loss", *(self._value_names or ())), averages)), grad_norm_value, lr

    def _apply_optimizer_settings(self, recorded: dict[str, Any], path: Path) -> None:
        """Make the current config's optimizer settings win over those restored from a checkpoint.

        Loading AdamW's and LambdaLR's state dicts brings back the old run's lr, betas, eps and
        weight decay, and the LR the old schedule set for the next step; a resumed run must use
        the settings it is given (the moments still carry over). ``recorded`` is the checkpoint's
        ``config["train"]``: the settings that differ are named in a warning.
        """
        cfg = self.config
        # The next step's LR under the current schedule (max_steps, warm-up, decay and lr may all have changed).
        factor = self.lr_scheduler.lr_lambdas[0](self.lr_scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group.update(initial_lr=cfg.lr, lr=cfg.lr * factor, betas=tuple(cfg.betas), eps=cfg.adam_eps,
                         weight_decay=cfg.weight_decay)
        self.lr_scheduler.base_lrs = [cfg.lr] * len(self.optimizer.param_groups)
        changed = []
        for name in ("lr", "betas", "adam_eps", "weight_decay"):
            before, after = recorded.get(name), getattr(cfg, name)
            if name == "betas" and before is not None:
                before, after = tuple(before), tuple(after)
            if name in recorded and before != after:
                changed.append(f"{name} {before} -> {after}")
        if changed:
            warnings.warn(f"resuming from {path} with changed optimizer settings ({', '.join(changed)}); "
                          "the new values apply from this step on", stacklevel=3)
        if recorded:
            # A run recorded before ema_warmup existed averaged without it.
            before = {"ema_decay": recorded.get("ema_decay", cfg.ema_decay),
                      "ema_start": recorded.get("ema_start", cfg.ema_start),
                      "ema_warmup": recorded.get("ema_warmup", False)}
            changed = [f"{name} {value} -> {getattr(cfg, name)}" for name, value in before.items()
                       if value != getattr(cfg, name)]
            if changed:
                warnings.warn(f"resuming from {path} with changed EMA settings ({', '.join(changed)}); the EMA "
                              "follows the new ones from this step on (the decay of each step is "
                              "diffkit.trainer.ema_decay_at(step, ...))", stacklevel=3)

    def _loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's loss and the loss_fn's named values (as float32 0-dim tensors)."""
        batch = _to_device(batch, self.device)
        if self.loss_fn is None:
            x, cond = self._split(batch)
            output = self.diffusion.loss(self._train_model, x, **cond, **self.loss_kwargs)
            source = "diffusion.loss"
        else:
            output = self.loss_fn(self._train_model, batch)
            source = "loss_fn"
        loss, values = _split_loss_output(output, source)
        names = tuple(sorted(values))
        if self._value_names is None:
            self._value_names = names
        elif names != self._value_names:
            raise ValueError(
                f"{source} returned the values {list(names)} but {list(self._value_names)} before; "
                "return the same names at every step"
            )
        return loss, values

    def _split(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """(x0, conditions) of a diffusion batch."""
        if isinstance(batch, torch.Tensor):
            return batch, {}
        cond = dict(batch)
        x = cond.pop("x")
        clash = sorted(set(cond) & set(self.loss_kwargs))
        if clash:
            raise ValueError(f"dataset condition key(s) {', '.join(clash)} clash with loss_kwargs; rename one of them")
        return x, cond

    @torch.no_grad()
    def _update_ema(self, step: int) -> None:
        """ema = decay * ema + (1 - decay) * weights with the decay :func:`ema_decay_at` gives for
        ``step``; a plain copy during the first ema_start steps."""
        ema_params = list(self.ema_model.parameters())
        params = [p.detach() for p in self.model.parameters()]
        cfg = self.config
        if step <= cfg.ema_start:  # torch has no public multi-tensor copy; 600 vs 506 us above, rarely run
            for ema_param, param in zip(ema_params, params):
                ema_param.copy_(param)
        else:
            # torch's public multi-tensor EMA: one fused lerp over all tensors, as fast as calling the
            # private torch._foreach_lerp_ directly (1.04M parameters in 150 tensors, 1 thread, best of
            # 25 rounds: 546-608 us per update against 550 us; a per-tensor lerp_ loop: 968 us).
            decay = ema_decay_at(step, cfg.ema_decay, start=cfg.ema_start, warmup=cfg.ema_warmup)
            get_ema_multi_avg_fn(decay)(ema_params, params, None)
        # Buffers (e.g. normalisation statistics) are not averaged, only copied.
        for ema_buffer, buffer in zip(self.ema_model.buffers(), self.model.buffers()):
            ema_buffer.copy_(buffer)

    def _batches(self):
        """Endless micro-batches, starting where ``self.step`` left off (mid-epoch after a resume)."""
        batches_per_epoch = math.ceil(self.sampler.num_samples / self.config.batch_size)
        first_epoch, offset = divmod(self.step * self.config.grad_accum_steps, batches_per_epoch)
        for epoch in itertools.count(first_epoch):
            self.sampler.set_epoch(epoch, skip=offset * self.config.batch_size)
            self._loader_generator.manual_seed(_step_seed(self.config.seed, self.rank, epoch, 1))
            yield from self.loader
            offset = 0

    # ----------------------------------------------------------------------------------------
    # Divergence handling
    # ----------------------------------------------------------------------------------------

    def _divergence_error(self, step: int, problem: str) -> TrainingError:
        if self.last_saved_step is not None:
            kept = f"The last good checkpoint at {self.checkpoint_dir} (step {self.last_saved_step}) is kept unchanged."
            checkpoint_path: Path | None = self.checkpoint_dir
        else:
            kept = f"No checkpoint had been written yet (it would go to {self.checkpoint_dir})."
            checkpoint_path = None
        return TrainingError(
            f"training diverged at step {step}: {problem} {kept} "
            f"Try a lower learning rate (lr={self.config.lr:g}), gradient clipping (grad_clip=1.0), a longer "
            "warm-up, mixed_precision='no', and check the data for NaN/Inf or extreme values.",
            step=step,
            checkpoint_path=checkpoint_path,
        )

    def _check_weights_finite(self) -> None:
        """Last line of defence: never write non-finite weights over a good checkpoint."""
        for name, tensor in itertools.chain(self.model.state_dict().items(), self.ema_model.state_dict().items()):
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise self._divergence_error(self.step, f"weight {name!r} is not finite; no checkpoint was written.")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class _ResumableSampler(DistributedSampler):
    """A DistributedSampler (also used with a single process) that can start mid-epoch.

    The permutation of epoch e comes from a torch.Generator seeded with seed + e, so the same
    seed gives the same order; ``skip`` drops the samples already consumed before a resume.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self._skip = skip

    def __iter__(self):
        return itertools.islice(super().__iter__(), self._skip, None)

    def __len__(self) -> int:
        return max(0, self.num_samples - self._skip)


def _model_differences(recorded: Mapping[str, Any] | None, current: Mapping[str, Any]) -> str:
    """The model settings that differ between a checkpoint and this run, in words."""
    recorded = recorded or {}
    if recorded.get("class") != current.get("class"):
        return f"model class {recorded.get('class')} -> {current.get('class')}"
    before, after = recorded.get("kwargs") or {}, current.get("kwargs") or {}
    # The comparison of the diffusion settings, so a JSON round trip (tuple -> list) is no change.
    keys = sorted({path.split(".")[0] for path in _differences(before, after, "")})
    changed = [f"{key} {before.get(key)!r} -> {after.get(key)!r}" for key in keys]
    return ", ".join(changed) if changed else "the same recorded settings; the parameter shapes differ"


# The TrainConfig fields that change the weights a run produces (the rest say where and how it reports),
# recorded for each run of a resumed model.
_WEIGHT_SETTINGS = ("max_steps", "batch_size", "lr", "warmup_steps", "lr_decay", "min_lr", "grad_accum_steps",
                    "grad_clip", "ema_decay", "ema_start", "ema_warmup", "mixed_precision", "seed", "weight_decay", "betas",
                    "adam_eps")


def ema_decay_at(step: int, decay: float, *, start: int = 0, warmup: bool = True) -> float:
    """The EMA decay of optimizer step ``step`` (1-based): 0.0 (a copy of the weights) while
    step <= ``start``; then ``decay``, or with ``warmup`` min(decay, (1 + k) / (10 + k)) for the
    k-th averaging update, k = step - start."""
    if step <= start:
        return 0.0
    if not warmup:
        return decay
    k = step - start
    return min(decay, (1 + k) / (10 + k))


def ema_initial_share(steps: int, decay: float, *, start: int = 0, warmup: bool = True) -> float:
    """The weight the EMA still gives the initial weights after ``steps`` optimizer steps (the
    product of :func:`ema_decay_at` over steps 1..steps): decay ** steps without warm-up."""
    share = 1.0
    for step in range(1, steps + 1):
        share *= ema_decay_at(step, decay, start=start, warmup=warmup)
    return share


def _lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """LR factor for LambdaLR: warm-up, then decay to min_lr (the formulas are in TrainConfig's docstring)."""
    warmup, total, decay = cfg.warmup_steps, cfg.max_steps, cfg.lr_decay
    floor = cfg.min_lr / cfg.lr

    # A plain function (not a callable object) keeps LambdaLR's state_dict free of custom objects.
    def factor(completed_steps: int) -> float:
        step = completed_steps + 1  # the step this LR will be used for
        if step <= warmup:
            return step / warmup
        if decay == "none":
            return 1.0
        # max(1, ...): with warmup_steps >= max_steps only the call after the last step gets here.
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * shape

    return factor


def _autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "no":
        return None
    if mode == "bf16":
        return torch.bfloat16
    # "auto": bf16 needs no loss scaling and is fast on recent GPUs; on CPUs it is usually slower.
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _step_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from several integers (seed, rank, step, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


_warned_no_tensorboard = False


def _summary_writer(log_dir: Path, purge_step: int | None) -> Any:
    """A TensorBoard SummaryWriter, or None (with one warning per process) if tensorboard is missing."""
    global _warned_no_tensorboard
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        if not _warned_no_tensorboard:
            warnings.warn(
                f"TensorBoard logging is off ({err}). Install it with `pip install tensorboard`, "
                "or pass TrainConfig(tensorboard=False) to silence this warning.",
                stacklevel=3,
            )
            _warned_no_tensorboard = True
        return None
    # purge_step drops events a crashed run logged after the checkpoint we resume from.
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _changed_settings(saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> list[str]:
    """Settings (dotted paths into nested dicts) that differ between two diffusion configs.

    Empty when either config is unknown. Numbers count as equal within a relative tolerance of
    1e-9, so float noise (JSON round trips, schedules recomputed elsewhere) is no change.
    """
    if saved is None or current is None:
        return []
    # Neither the version that wrote a config nor a calibration fitted to some weights (step
    # grids, Analytic-DPM statistics) is a training setting: no reason to warn.
    ignored = ("diffkit_version", "calibration")
    return _differences(
        {k: v for k, v in saved.items() if k not in ignored},
        {k: v for k, v in current.items() if k not in ignored},
        "",
    )


_MISSING = object()


def _differences(a: Any, b: Any, path: str) -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        found = []
        for key in sorted(set(a) | set(b), key=str):
            found += _differences(a.get(key, _MISSING), b.get(key, _MISSING), f"{path}.{key}" if path else str(key))
        return found
    return [] if _same_setting(a, b) else [path]


def _same_setting(a: Any, b: Any) -> bool:
    if _is_number(a) and _is_number(b):
        return a == b or math.isclose(a, b, rel_tol=_SETTING_RTOL, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return not _differences(a, b, "")
    return type(a) is type(b) and a == b


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but True and 1 are different settings.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _validate_objective(diffusion: Any, loss_fn: Any, loss_kwargs: Mapping[str, Any] | None) -> None:
    if diffusion is None and loss_fn is None:
        raise ValueError(
            "pass diffusion (to train with diffusion.loss) or loss_fn (any objective: loss_fn(model, batch) -> loss); "
            "got neither"
        )
    if loss_fn is not None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {_describe(loss_fn)}")
        if loss_kwargs:
            raise ValueError("loss_kwargs are passed to diffusion.loss; with loss_fn, bind them into the function instead")
        if diffusion is not None and not isinstance(getattr(diffusion, "config", None), Mapping):
            raise TypeError(f"with loss_fn, diffusion is only recorded: it needs a .config dict, got {_describe(diffusion)}")
    elif not callable(getattr(diffusion, "loss", None)):
        raise TypeError(
            f"diffusion must have a .loss(model, x0, **cond) method (a diffkit.Diffusion), got {_describe(diffusion)}; "
            "for another objective pass loss_fn=..."
        )


def _validate_dataset(dataset: Any, *, needs_x: bool) -> None:
    """Fail before training starts, with a message that says how to fix the dataset."""
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(
            "Trainer needs a map-style dataset (with __len__ and __getitem__), got "
            f"{type(dataset).__name__}; wrap the data in a torch.utils.data.Dataset or a list of tensors"
        )
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: there is nothing to train on; check the data path or filters")
    item = dataset[0]
    if isinstance(item, torch.Tensor):
        return
    if not needs_x:
        if isinstance(item, Mapping):
            return
        raise ValueError(
            f"with loss_fn, dataset items must be a Tensor or a dict of tensors; item 0 is {_describe(item)}. "
            "For (obs, target) pairs return {'obs': obs, 'target': target}."
        )
    if isinstance(item, Mapping) and isinstance(item.get("x"), torch.Tensor):
        return
    if isinstance(item, Mapping):
        raise ValueError(
            f"dataset items that are dicts need the data tensor under 'x'; item 0 has keys {sorted(map(str, item))}"
        )
    raise ValueError(
        f"dataset items must be a Tensor (x0) or a dict {{'x': x0, **cond}}; item 0 is {_describe(item)}. "
        "For (x, label) pairs return {'x': x, 'label': label} (and make the model accept label=...)."
    )


def _check_json_able(value: Mapping[str, Any], name: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{name} must be JSON-able (plain dicts, lists, strings, numbers, booleans, None) to go into "
            f"checkpoints: {err}"
        ) from err


def _validate_side_files(side_files: Mapping[str, Any] | None) -> dict[str, Any]:
    if side_files is None:
        return {}
    if not isinstance(side_files, Mapping):
        raise TypeError(f"side_files must be a dict {{file name: path or bytes}}, got {_describe(side_files)}")
    for name, source in side_files.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"side file names must be non-empty strings, got {name!r}")
        if isinstance(source, (bytes, bytearray)):
            continue
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"side file {name!r} must be a path or bytes, got {_describe(source)}")
        if not Path(source).is_file():
            raise FileNotFoundError(f"side file {name!r}: {source} is not a file; it is copied into every checkpoint")
    return dict(side_files)


def _select_parameters(model: torch.nn.Module, parameters: Iterable[torch.nn.Parameter] | None) -> list[torch.nn.Parameter]:
    """The parameters to optimise, in the model's order (which the optimizer state is keyed by)."""
    if parameters is None:
        chosen = [p for p in model.parameters() if p.requires_grad]
        if not chosen:
            raise ValueError("the model has no parameters that require grad: there is nothing to train")
        return chosen
    if isinstance(parameters, torch.Tensor):
        raise TypeError("parameters must be an iterable of parameters (e.g. model.head.parameters()), not one tensor")
    wanted = list(parameters)
    if not wanted:
        raise ValueError("parameters is empty: there is nothing to train")
    owned = {id(p) for p in model.parameters()}
    for p in wanted:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameters must hold tensors, got {_describe(p)}")
        if id(p) not in owned:
            raise ValueError(
                f"parameters holds a tensor of shape {tuple(p.shape)} that is not a parameter of the model; "
                "only the model's weights are checkpointed, so the optimiser may only update those"
            )
        if not p.requires_grad:
            raise ValueError(f"parameters holds a parameter of shape {tuple(p.shape)} that does not require grad")
    ids = {id(p) for p in wanted}
    return [p for p in model.parameters() if id(p) in ids]


def _split_loss_output(output: Any, source: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, {name: float32 0-dim tensor}) from ``loss`` or ``(loss, {name: value})``."""
    values: Any = {}
    if isinstance(output, tuple):
        if len(output) != 2 or not isinstance(output[1], Mapping):
            raise TypeError(f"{source} must return a loss or (loss, {{name: value}}), got a tuple of {len(output)}")
        output, values = output
    if not isinstance(output, torch.Tensor) or output.ndim != 0 or not output.is_floating_point():
        raise TypeError(f"{source} must return a scalar (0-dim) floating tensor as the loss, got {_describe(output)}")
    if not output.requires_grad:
        raise ValueError(
            f"the loss from {source} does not depend on any parameter that requires grad; check that it is "
            "computed from the model's output and not under torch.no_grad()"
        )
    converted = {}
    for name, value in values.items():
        if not isinstance(name, str) or name in _RECORD_FIELDS:
            raise ValueError(f"{source} returned a value named {name!r}; use a string other than {', '.join(_RECORD_FIELDS)}")
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            converted[name] = value.detach().float().reshape(()).to(output.device)
        elif _is_number(value):
            converted[name] = torch.tensor(float(value), device=output.device)
        else:
            raise TypeError(f"{source} value {name!r} must be a number or a 0-dim tensor, got {_describe(value)}")
    return output, converted


def _to_device(batch: Any, device: torch.device) -> Any:
    """The batch with every tensor (also inside dicts, lists and tuples) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


def _tensors(batch: Any, name: str = "x") -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a collated batch, depth first."""
    if isinstance(batch, torch.Tensor):
        yield name, batch
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            yield from _tensors(value, str(key))
    elif isinstance(batch, (list, tuple)):
        for index, value in enumerate(batch):
            yield from _tensors(value, f"{name}[{index}]")


def _batch_length(batch: Any) -> int | None:
    """Number of examples in a collated batch (the first tensor's first dim), None if unknown."""
    for _, tensor in _tensors(batch):
        return int(tensor.shape[0]) if tensor.ndim else None
    return None


def _check_batch_finite(batch: Any) -> None:
    for key, value in _tensors(batch):
        if value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(
                f"the first training batch holds {bad} NaN/Inf value(s) in {key!r}; clean or rescale the dataset "
                "(training assumes finite data; diffusion data is usually scaled to [-1, 1])"
            )
