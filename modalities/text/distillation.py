"""Few-step sampling by distillation: a student that writes in K steps what its teacher writes in many.

The teacher's deterministic sampler (DDIM, eta = 0) maps each starting noise to one text. On the
way its trajectory passes the states x_{t_1}, ..., x_{t_K} at the student's K times (a subset of
the teacher's grid), and it ends on the words w. The student starts as a copy of the teacher and
learns to predict w from every x_{t_j} by the cross-entropy of its word logits:

    loss = 1/K sum_j CE(student(x_{t_j}, t_j, x0_previous_j), w)

Where the teacher at high noise predicts a blur of all the sentences still possible (the
posterior mean, whose per-position words rarely make a sentence), the student predicts the one
sentence that the teacher's path from that state reaches. Sampled by DDIM on its K points, the
student's x0 estimates are close to single words, so each jump lands near the teacher's own
path (Luhman and Luhman, 2021, distil whole trajectories the same way; consistency models ask
the same of every state). ``x0_previous_j`` is the student's own estimate at the point before,
as its self-conditioned sampler will give it, though at word temperature 1 where sampling
uses the recorded one (0.5): taking it at 0.5 in training was measured no better (judge
perplexity 73 against 69 at 5 steps, control 55% against 56%, with a throw-away change; the
e2e-5step README).

The word embeddings stay frozen: the states live in the teacher's embedding space, and the
rounding at the end must read them the same way. The student's grid is stored in its
diffusion's calibration, so ``sample(sampler="ddim", steps=K)`` visits exactly those points.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

import diffkit
from diffkit.runs import seeded_generator
from diffkit.sampling import SamplingGrid
from diffkit.utils import replaced_atomically

from .modality import RowConditions, TextModel, TextSampling, _lengths, sample_ids
from .model import TextDenoiser

__all__ = ["student_grid", "TrajectoryDataset", "teacher_trajectories", "DistillationObjective", "STUDENT_SAMPLER",
           "student_diffusion"]

# The student's sampler: the deterministic one its teacher's trajectories were drawn with.
STUDENT_SAMPLER = "ddim"


def student_grid(teacher: SamplingGrid, steps: int) -> tuple[SamplingGrid, list[int]]:
    """The student's ``steps`` points, taken from the teacher's grid at evenly spread indices
    (the first is the teacher's first), and those indices."""
    if not 1 <= steps <= len(teacher):
        raise ValueError(f"the student needs between 1 and the teacher's {len(teacher)} steps, got {steps}")
    indices = [round(j * len(teacher) / steps) for j in range(steps)]
    alphas = torch.cat([teacher.alphas[indices], teacher.alphas[-1:]])
    sigmas = torch.cat([teacher.sigmas[indices], teacher.sigmas[-1:]])
    return SamplingGrid(times=teacher.times[indices], alphas=alphas, sigmas=sigmas), indices


class TrajectoryDataset(torch.utils.data.Dataset):
    """The teacher's trajectories as training examples: dicts of ``states`` (K, D, L), the
    teacher's state at each of the student's K points, ``ids`` (L,) the words it ended on,
    ``mask`` (L,) True at real tokens and, for an MR-conditioned teacher, ``mr`` (S,) the codes
    it was guided by (all 0, "unspecified", for unconditional trajectories).

    ``key`` records what made them (teacher, steps, times, seed...): a run that is resumed
    reuses its trajectories only if its key matches."""

    def __init__(self, states: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                 mr: torch.Tensor | None = None, key: Mapping[str, Any] | None = None):
        n = states.shape[0]
        if states.ndim != 4 or ids.shape != mask.shape or ids.shape[0] != n or states.shape[3] != ids.shape[1]:
            raise ValueError(f"states (N, K, D, L) {tuple(states.shape)}, ids and mask (N, L) "
                             f"{tuple(ids.shape)}, {tuple(mask.shape)} must describe the same examples")
        if mr is not None and mr.shape[0] != n:
            raise ValueError(f"mr holds {mr.shape[0]} rows for {n} trajectories")
        self.states, self.ids, self.mask, self.mr = states, ids, mask.to(torch.bool), mr
        self.key = dict(key or {})

    def __len__(self) -> int:
        return self.states.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"states": self.states[index], "ids": self.ids[index], "mask": self.mask[index]}
        if self.mr is not None:
            item["mr"] = self.mr[index]
        return item

    def save(self, path: str | Path) -> Path:
        """One safetensors file, written beside and renamed into place (a crash leaves the old one)."""
        path = Path(path)
        tensors = {"states": self.states.contiguous(), "ids": self.ids.contiguous(), "mask": self.mask.contiguous()}
        if self.mr is not None:
            tensors["mr"] = self.mr.contiguous()
        with replaced_atomically(path) as staging:
            save_file(tensors, str(staging), metadata={"key": json.dumps(self.key, sort_keys=True)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> TrajectoryDataset:
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                key = json.loads((f.metadata() or {})["key"])
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            return cls(tensors["states"], tensors["ids"], tensors["mask"], tensors.get("mr"), key)
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as error:
            raise ValueError(f"{path} is not a readable trajectory file ({error}); delete it to draw the "
                             "trajectories again") from None

    @classmethod
    def concatenate(cls, parts: list[TrajectoryDataset], key: Mapping[str, Any] | None = None) -> TrajectoryDataset:
        """One dataset of several (unconditional and MR-guided trajectories, say)."""
        if any((part.mr is None) != (parts[0].mr is None) for part in parts):
            raise ValueError("trajectories with and without MR codes cannot be mixed")
        mr = None if parts[0].mr is None else torch.cat([part.mr for part in parts])
        return cls(torch.cat([part.states for part in parts]), torch.cat([part.ids for part in parts]),
                   torch.cat([part.mask for part in parts]), mr, key)


def teacher_trajectories(teacher: TextModel, *, steps: int, teacher_steps: int, count: int, seed: int,
                         mr: torch.Tensor | None = None, batch_size: int = 128,
                         progress: bool = False) -> TrajectoryDataset:
    """``count`` trajectories of the teacher's DDIM sampler on ``teacher_steps`` points, each
    recorded at the student's ``steps`` points (:func:`student_grid`), with lengths drawn from the
    teacher's training lengths and its own sampling defaults (word temperature, guidance).
    ``mr`` (count, S): the MR codes that guide each row (None: unconditional)."""
    grid, indices = student_grid(teacher.diffusion.sampling_grid(teacher_steps, sampler=STUDENT_SAMPLER), steps)
    net, width = teacher.net, teacher.max_length
    if count < 1:
        raise ValueError(f"count must be >= 1 trajectory, got {count}")
    if mr is not None and mr.shape != (count, len(net.mr_sizes or ())):
        raise ValueError(f"mr must be ({count}, {len(net.mr_sizes or ())}) slot codes, got {tuple(mr.shape)}")
    generator = seeded_generator(seed)
    lengths = _lengths(teacher, count, None, generator)
    order = torch.argsort(lengths, stable=True)  # a batch of similar lengths pads little
    states = torch.zeros(count, steps, net.embed_dim, width)
    ids = torch.full((count, width), teacher.tokenizer.pad_id, dtype=torch.long)
    scale = float(teacher.default("guidance_scale", 1.0)) if mr is not None else 1.0
    batches = range(0, count, batch_size)
    for start in tqdm(batches, desc="teacher trajectories", unit="batch", disable=not progress):
        rows = order[start: start + batch_size]
        seen: dict[int, torch.Tensor] = {}

        def keep(info: dict, wanted=frozenset(indices), seen=seen) -> None:  # this batch's dict, bound now
            if info["i"] in wanted:
                seen[info["i"]] = info["x"].detach().float().cpu()

        with torch.no_grad():
            out = sample_ids(teacher, lengths[rows], TextSampling(STUDENT_SAMPLER, teacher_steps, scale),
                             RowConditions(mr=None if mr is None else mr[rows]), generator=generator,
                             group_by_length=False, callback=keep)
        states[rows, :, :, : out.shape[1]] = torch.stack([seen[i] for i in indices], 1)
        ids[rows, : out.shape[1]] = out
    mask = torch.arange(width)[None] < lengths[:, None]
    if mr is None and net.mr_sizes:
        mr = torch.zeros(count, len(net.mr_sizes), dtype=torch.long)  # every slot unspecified
    key = {"teacher": str(teacher.path), "steps": steps, "teacher_steps": teacher_steps, "count": count,
           "seed": seed, "times": grid.times.tolist(), "guided": mr is not None and bool(mr.any())}
    return TrajectoryDataset(states, ids, mask, mr, key)


class DistillationObjective:
    """``loss_fn(model, batch)`` for ``diffkit.Trainer``: the student's cross-entropy against
    the teacher's words at each of its K points (module docstring), on batches of
    :class:`TrajectoryDataset` items. ``times`` (K,) are what the network is told at them.

    Terms: ``cross_entropy`` at each point (``first`` the noisiest, ``last`` the least noisy)
    and ``word_accuracy`` at the first point, how often the student already names the teacher's
    word from (nearly) pure noise."""

    def __init__(self, times: torch.Tensor):
        self.times = torch.as_tensor(times, dtype=torch.float64).flatten()
        if self.times.numel() < 1:
            raise ValueError("the student needs at least one point")

    @property
    def config(self) -> dict[str, Any]:
        return {"kind": "distillation", "times": self.times.tolist()}

    def __call__(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]):
        net = getattr(model, "module", model)
        if not isinstance(net, TextDenoiser) or net.head != "softmax":
            raise TypeError("distillation trains a TextDenoiser with a softmax head (it learns words by cross-entropy)")
        states, ids, mask = batch["states"], batch["ids"], batch["mask"].to(torch.bool)
        if states.shape[1] != self.times.numel():
            raise ValueError(f"trajectories hold {states.shape[1]} states per example, the student has "
                             f"{self.times.numel()} points")
        length = max(int(mask.sum(1).max()), 1)  # all-padding columns change nothing
        states, ids, mask = states[..., :length], ids[:, :length], mask[:, :length]
        cond = {"attention_mask": mask}
        if net.conditional:
            cond["mr"] = batch["mr"]
        previous, losses = None, []
        for j, t in enumerate(self.times.tolist()):
            x = states[:, j]
            kwargs = {"x0_previous": previous} if net.self_conditioning else {}
            out, logits = model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32),
                                return_logits=True, **kwargs, **cond)
            previous = out.detach()
            losses.append(F.cross_entropy(logits[mask].float(), ids[mask]))
            if j == 0:
                with torch.no_grad():
                    accuracy = (logits[mask].argmax(-1) == ids[mask]).float().mean()
        loss = torch.stack(losses).mean()
        return loss, {"cross_entropy_first": losses[0].detach(), "cross_entropy_last": losses[-1].detach(),
                      "word_accuracy": accuracy}


def student_diffusion(teacher: diffkit.Diffusion, grid: SamplingGrid) -> diffkit.Diffusion:
    """The teacher's diffusion with the student's grid stored in its calibration, so that
    ``sample(sampler="ddim", steps=K)`` (and every default that names them) visits the points
    the student was trained at."""
    calibration = dict(teacher.calibration)
    grids = dict(calibration.get("grids") or {})
    grids[f"{STUDENT_SAMPLER}/{len(grid)}"] = {"times": grid.times.tolist()}
    return diffkit.Diffusion.from_config({**teacher.config, "calibration": {**calibration, "grids": grids}})
