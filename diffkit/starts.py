"""Where sampling starts: three small, frozen objects that :meth:`diffkit.Diffusion.sample` takes as ``start=``.

* :class:`NoiseStart` (``start="noise"``): exactly at the starting noise. Pass an exact draw of
  q(x_T) this way, or use it on a trained network, where it is the better default.
* :class:`PriorStart` (``start="prior"``): the N(0, I) noise moved to the mean of q(x_T) at the
  first call (:class:`~diffkit.guidance.PriorMeanStart`): free, exact for Gaussian data, and a
  no-op where alpha_T = 0 (the flow path, zero-terminal-SNR schedules).
* :class:`WarmStart` (``start=WarmStart(init, strength)``): ``init`` noised to ``strength`` of the
  chain, then all ``steps`` steps below it (SDEdit, img2img, a planner's warm start).

Each says how far up the chain sampling starts (:meth:`max_time`), what the first state is
(:meth:`initial_state`) and which wrappers it adds innermost (:meth:`wrappers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .guidance import PriorMeanStart
from .process import q_sample
from .utils import check_finite

__all__ = ["NoiseStart", "PriorStart", "WarmStart", "Start", "as_start"]


@dataclass(frozen=True)
class NoiseStart:
    """Start exactly at the noise."""

    def max_time(self, schedule) -> None:
        return None

    def initial_state(self, grid, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def wrappers(self) -> tuple:
        return ()


@dataclass(frozen=True)
class PriorStart(NoiseStart):
    """Start at the noise moved to the mean of q(x_T) at the first call (no extra call)."""

    def wrappers(self) -> tuple:
        # Innermost, next to the network: wrappers that pin entries (KnownValues) rewrite them afterwards.
        return (PriorMeanStart(),)


@dataclass(frozen=True, eq=False)
class WarmStart:
    """Start from ``init`` (clean data, broadcast to the sample) noised to ``strength`` in (0, 1] of the chain."""

    init: torch.Tensor
    strength: float

    def __post_init__(self) -> None:
        if not torch.is_tensor(self.init):
            object.__setattr__(self, "init", torch.as_tensor(self.init))
        if isinstance(self.strength, bool) or not 0 < float(self.strength) <= 1:
            raise ValueError(f"strength must lie in (0, 1], got {self.strength!r}")
        check_finite(self.init, "init")

    def max_time(self, schedule) -> Union[int, float]:
        """The grid's top: a time s on the flow path, a training step otherwise."""
        if schedule.is_continuous:
            return float(self.strength)
        return max(int(round(float(self.strength) * (schedule.num_timesteps - 1))), 0)

    def initial_state(self, grid, noise: torch.Tensor) -> torch.Tensor:
        init = self.init.to(device=noise.device, dtype=noise.dtype)
        try:
            init = init.expand(noise.shape)
        except RuntimeError:
            raise ValueError(f"init of shape {tuple(init.shape)} does not broadcast to the sample shape "
                             f"{tuple(noise.shape)}") from None
        return q_sample(init, float(grid.alphas[0]), float(grid.sigmas[0]), noise)

    def wrappers(self) -> tuple:
        return ()


Start = Union[NoiseStart, PriorStart, WarmStart]
_NAMED = {"noise": NoiseStart(), "prior": PriorStart()}


def as_start(start: Optional[Union[str, Start]]) -> Start:
    """``start`` as a start object: a name (``prior``, ``noise``) or one of the objects itself."""
    if isinstance(start, (NoiseStart, WarmStart)):
        return start
    if isinstance(start, str) and start in _NAMED:
        return _NAMED[start]
    raise ValueError(f"start must be 'prior', 'noise', or a NoiseStart, PriorStart or WarmStart, got {start!r}")
