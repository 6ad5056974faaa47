"""Plotting shared by opd-report and opd-study: a centre line with a band over repeated runs (seeds).

``band_stats`` is the arithmetic (pure numpy); ``draw_band`` draws it on a matplotlib axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CENTERS = ("mean", "median")


BANDS = ("minmax", "std")


BAND_WORDS = {"minmax": "min-max", "std": "± 1 std (n-1)"}


def band_stats(runs: np.ndarray, center: str = "mean", band: str = "minmax") -> tuple[np.ndarray, ...]:
    """Per column of ``runs [n_runs, n_points]``: the centre (``mean`` or ``median`` over runs) and the
    band's lower and upper edge: ``minmax`` the smallest and largest run, ``std`` the mean minus and plus
    one sample standard deviation (ddof 1; a single run has no spread, its band is the line)."""
    runs = np.asarray(runs, dtype=float)
    mid = runs.mean(0) if center == "mean" else np.median(runs, 0)
    if band == "minmax":
        return mid, runs.min(0), runs.max(0)
    spread = runs.std(0, ddof=1) if runs.shape[0] > 1 else np.zeros(runs.shape[1])
    return mid, runs.mean(0) - spread, runs.mean(0) + spread


def draw_band(
    ax,
    xs: Sequence[float],
    runs: np.ndarray,
    label: str,
    center: str = "mean",
    band: str = "minmax",
    color: str | None = None,
    alpha: float = 0.2,
    **line,
) -> str:
    """The centre line of ``runs`` (one row per run) over ``xs``, and the band around it; returns the colour."""
    mid, lo, hi = band_stats(runs, center, band)
    (drawn,) = ax.plot(xs, mid, label=label, color=color, **line)
    ax.fill_between(xs, lo, hi, color=drawn.get_color(), alpha=alpha, linewidth=0)
    return drawn.get_color()
