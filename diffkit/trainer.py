"""A small, modality-agnostic training loop for diffusion models.

One :class:`Trainer` serves every modality: it only needs a model, a diffusion object with
``.loss(model, x0, **cond)`` and ``.config``, and a map-style dataset whose items are a tensor
``x0`` or a dict ``{"x": x0, **cond}``. It adds what every run needs and is easy to get wrong:
AdamW with linear warm-up, gradient clipping, EMA weights, bf16 autocast on GPUs, TensorBoard
and progress output, periodic samples, atomic checkpoints with exact resume, a hard stop on
NaN/Inf that keeps the last good checkpoint, and DistributedDataParallel under ``torchrun``.

Determinism: the data order of each epoch comes from (seed, epoch), and every step reseeds the
Python, NumPy and torch RNGs from (seed, rank, step). A run resumed from a checkpoint therefore
continues exactly as the uninterrupted run would have (with ``num_workers=0``; with worker
processes the data order is still exact, only random augmentations inside workers may differ).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from tqdm.auto import tqdm

from diffkit import distributed
from diffkit.checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from diffkit.utils import resolve_device, seed_everything

__all__ = ["TrainConfig", "Trainer", "TrainingError"]

logger = logging.getLogger(__name__)

MIXED_PRECISION_MODES = ("auto", "bf16", "no")


class TrainingError(FloatingPointError):
    """Training diverged (NaN/Inf loss, gradient or weights). Carries the step and checkpoint path."""

    def __init__(self, message: str, *, step: int, checkpoint_path: Path | None):
        super().__init__(message)
        self.step = step
        self.checkpoint_path = checkpoint_path


@dataclass
class TrainConfig:
    """Everything that controls a training run; stored in each checkpoint as ``config["train"]``.

    ``batch_size`` is per process: under torchrun the effective batch is batch_size x world size.
    ``grad_clip`` None or 0 disables clipping (the gradient norm is still logged and checked).
    ``ema_start``: for the first ``ema_start`` steps the EMA copies the weights instead of
    averaging, so that it does not keep a long memory of the random initialisation.
    ``save_every`` / ``sample_every`` 0 disables periodic saves (the final one still happens) /
    samples. ``mixed_precision``: "auto" (bf16 autocast on CUDA, off elsewhere), "bf16" or "no".
    """

    max_steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-4
    warmup_steps: int = 100
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    ema_start: int = 0
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
        for name in ("max_steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        for name in ("warmup_steps", "ema_start", "save_every", "sample_every", "num_workers", "seed", "weight_decay"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if not self.lr > 0:
            problems.append("lr must be > 0")
        if self.grad_clip is not None and self.grad_clip < 0:
            problems.append("grad_clip must be > 0, or None/0 to disable clipping")
        if not 0.0 <= self.ema_decay <= 1.0:
            problems.append("ema_decay must be in [0, 1]")
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
    """Train ``model`` with ``diffusion.loss`` on ``dataset``; see the module docstring.

    Attributes available to ``sample_fn(trainer, step)`` and after training: ``model`` (the
    plain module, never the DDP wrapper), ``ema_model``, ``optimizer``, ``lr_scheduler``,
    ``step`` (optimizer steps done), ``device``, ``config``, ``checkpoint_dir``, ``history``
    (one dict per logged step: step, loss, lr, grad_norm, steps_per_sec), ``rank``, ``world_size``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        diffusion: Any,
        dataset: Dataset,
        config: TrainConfig | None = None,
        *,
        modality: str | None = None,
        model_config: Mapping[str, Any] | None = None,
        sample_fn: Callable[[Trainer, int], Any] | None = None,
        loss_kwargs: Mapping[str, Any] | None = None,
    ):
        self.config = config if config is not None else TrainConfig()
        cfg = self.config
        _validate_dataset(dataset)
        self.diffusion = diffusion
        self.dataset = dataset
        self.modality = modality
        model_class = type(model)
        self.model_config = dict(model_config or {"class": f"{model_class.__module__}.{model_class.__qualname__}", "kwargs": {}})
        self.sample_fn = sample_fn
        self.loss_kwargs = dict(loss_kwargs or {})

        self.device = distributed.device_for_rank(resolve_device(cfg.device))
        self._owns_process_group = distributed.init_distributed(self.device)
        self.rank = distributed.get_rank()
        self.world_size = distributed.get_world_size()
        self.is_main = self.rank == 0
        seed_everything(cfg.seed)

        self.model = model.to(self.device)
        self._train_model: torch.nn.Module = self.model
        if distributed.is_distributed():
            # Wrapping broadcasts rank 0's weights, so every rank starts from the same model.
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        # Copied after the DDP broadcast so the EMA starts identical on every rank.
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False).eval()

        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _warmup(cfg.warmup_steps))
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
        self._resumed = False

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
            bar = tqdm(
                total=cfg.max_steps,
                initial=self.step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                disable=not (cfg.progress and self.is_main),
            )
            self._loop(bar, writer)
            if self.last_saved_step != self.step:
                self.save()
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            if self._owns_process_group:
                distributed.cleanup()
                self._owns_process_group = False

    def resume(self) -> bool:
        """Load model, EMA, optimizer, LR schedule and step from ``checkpoint_dir`` if it exists.

        Called by :meth:`train`; returns True when a checkpoint was loaded. Every rank loads the
        same files, so the replicas stay identical.
        """
        if self._resumed or not checkpoint_exists(self.checkpoint_dir):
            return False
        ckpt = load_checkpoint(self.checkpoint_dir, modality=self.modality)
        self.model.load_state_dict(ckpt.model_state)
        if ckpt.ema_state is not None:
            self.ema_model.load_state_dict(ckpt.ema_state)
        else:
            warnings.warn(f"checkpoint {ckpt.path} has no EMA weights; the EMA restarts from the current weights")
            self.ema_model.load_state_dict(ckpt.model_state)
        if ckpt.optimizer_state is not None:
            self.optimizer.load_state_dict(ckpt.optimizer_state)
        else:
            warnings.warn(f"checkpoint {ckpt.path} has no optimizer state; AdamW's moments restart from zero")
        if ckpt.lr_scheduler_state is not None:
            self.lr_scheduler.load_state_dict(ckpt.lr_scheduler_state)
        changed = _changed_settings(ckpt.diffusion_config, getattr(self.diffusion, "config", None))
        if changed:
            warnings.warn(
                f"resuming from {ckpt.path} with a different diffusion config (changed: {', '.join(changed)}); "
                "the model was trained for the old one"
            )
        self.step = self.last_saved_step = ckpt.step
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
                    "train": self.config.to_dict(),
                },
                ema_model=self.ema_model,
                optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler,
                step=self.step,
                extra={"world_size": self.world_size},
            )
        self.last_saved_step = self.step
        distributed.barrier()

    # ----------------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------------

    def _loop(self, bar: tqdm, writer: Any) -> None:
        cfg = self.config
        batches = self._batches()
        window_losses: list[float] = []
        window_start = time.perf_counter()
        first_batch = True
        while self.step < cfg.max_steps:
            step = self.step + 1
            # Reseeding per step (not once per run) is what makes a resumed run exact.
            seed_everything(_step_seed(cfg.seed, self.rank, step))
            batch = next(batches)
            if first_batch:
                _check_batch_finite(batch)
                first_batch = False
            loss, grad_norm, lr = self._train_step(step, batch)
            window_losses.append(loss)
            bar.update(1)

            if self.is_main and (step % cfg.log_every == 0 or step == cfg.max_steps):
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": step,
                    "loss": sum(window_losses) / len(window_losses),
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "steps_per_sec": len(window_losses) / max(elapsed, 1e-9),
                }
                self.history.append(record)
                bar.set_postfix(step=step, loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                if writer is not None:
                    for name in ("loss", "lr", "grad_norm", "steps_per_sec"):
                        writer.add_scalar(f"train/{name}", record[name], step)
                window_losses.clear()
                window_start = time.perf_counter()
            if cfg.save_every and step % cfg.save_every == 0:
                self.save()
            if self.sample_fn is not None and cfg.sample_every and step % cfg.sample_every == 0 and self.is_main:
                self.ema_model.eval()
                with torch.no_grad():
                    self.sample_fn(self, step)

    def _train_step(self, step: int, batch: Any) -> tuple[float, float, float]:
        """One optimizer step; returns (loss averaged over ranks, gradient norm, learning rate used)."""
        cfg = self.config
        x, cond = self._to_device(batch)
        self._train_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            loss = self.diffusion.loss(self._train_model, x, **cond, **self.loss_kwargs)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            raise TypeError(f"diffusion.loss must return a scalar tensor, got {_describe(loss)}")
        loss.backward()
        max_norm = cfg.grad_clip if cfg.grad_clip else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        # One sync per step for both numbers; the all-reduce also makes every rank agree on
        # whether to stop (the gradient norm is already identical after DDP's averaging).
        stats = distributed.all_reduce_mean(torch.stack([loss.detach().float(), grad_norm.detach().float().to(loss.device)]))
        loss_value, grad_norm_value = stats.tolist()
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm_value)):
            raise self._divergence_error(
                step, f"loss={loss_value}, gradient norm={grad_norm_value} is not finite; the weights were not updated."
            )
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.lr_scheduler.step()
        self._update_ema(step)
        self.step = step
        return loss_value, grad_norm_value, lr

    @torch.no_grad()
    def _update_ema(self, step: int) -> None:
        """ema = decay * ema + (1 - decay) * weights; a plain copy during the first ema_start steps."""
        ema_params = list(self.ema_model.parameters())
        params = [p.detach() for p in self.model.parameters()]
        if step <= self.config.ema_start:
            torch._foreach_copy_(ema_params, params)
        else:
            # lerp: ema + w * (param - ema) with w = 1 - decay; one fused kernel for all tensors.
            torch._foreach_lerp_(ema_params, params, 1.0 - self.config.ema_decay)
        # Buffers (e.g. normalisation statistics) are not averaged, only copied.
        for ema_buffer, buffer in zip(self.ema_model.buffers(), self.model.buffers()):
            ema_buffer.copy_(buffer)

    def _batches(self):
        """Endless batches, starting where ``self.step`` left off (mid-epoch after a resume)."""
        batches_per_epoch = math.ceil(self.sampler.num_samples / self.config.batch_size)
        epoch, offset = divmod(self.step, batches_per_epoch)
        for epoch in itertools.count(epoch):
            self.sampler.set_epoch(epoch, skip=offset * self.config.batch_size)
            self._loader_generator.manual_seed(_step_seed(self.config.seed, self.rank, epoch, 1))
            yield from self.loader
            offset = 0

    def _to_device(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        non_blocking = self.device.type == "cuda"
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=non_blocking), {}
        cond = {
            key: value.to(self.device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()
        }
        x = cond.pop("x")
        clash = sorted(set(cond) & set(self.loss_kwargs))
        if clash:
            raise ValueError(f"dataset condition key(s) {', '.join(clash)} clash with loss_kwargs; rename one of them")
        return x, cond

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


def _warmup(warmup_steps: int) -> Callable[[int], float]:
    """LR factor for LambdaLR: the k-th optimizer step (1-based) uses lr * min(1, k / warmup_steps)."""

    # A plain function (not a callable object) keeps LambdaLR's state_dict free of custom objects.
    def factor(completed_steps: int) -> float:
        if warmup_steps <= 0:
            return 1.0
        return min(1.0, (completed_steps + 1) / warmup_steps)

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
    """Keys whose values differ between two diffusion configs (empty when either is unknown)."""
    if saved is None or current is None:
        return []
    # The version that wrote a config is not a setting: upgrading diffkit is no reason to warn.
    keys = (set(saved) | set(current)) - {"diffkit_version"}
    return sorted(k for k in keys if saved.get(k) != current.get(k))


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _validate_dataset(dataset: Any) -> None:
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


def _check_batch_finite(batch: Any) -> None:
    values = {"x": batch} if isinstance(batch, torch.Tensor) else batch
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(
                f"the first training batch holds {bad} NaN/Inf value(s) in {key!r}; clean or rescale the dataset "
                "(diffusion training assumes finite data, usually scaled to [-1, 1])"
            )
