"""Summary statistics the benchmarks share."""

from __future__ import annotations

import math

import numpy as np


def mean_se(values) -> tuple[float, float]:
    """The mean of ``values`` (a sequence, array or CPU tensor) and its standard error, the sample
    standard deviation (ddof 1) over sqrt(n). With one value the error is unknown (nan, not 0);
    with none both are nan."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(values) == 0:
        return float("nan"), float("nan")
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
    return float(values.mean()), se
