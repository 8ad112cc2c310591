"""One vector per video from its ``(rows, 1024)`` matrix, for search: each result is
L2-normalised, and the zero tensor of a bad video aggregates to zeros, never NaN."""

from __future__ import annotations

import numpy as np

__all__ = ["aggregate_max", "aggregate_mean", "aggregate_segment", "aggregate_weighted"]


def _normalise(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else np.zeros_like(vector)


def aggregate_mean(rows: np.ndarray) -> np.ndarray:
    """L2-normalised mean of the rows: the standard whole-video vector."""
    return _normalise(np.asarray(rows, dtype=np.float32).mean(axis=0))


def aggregate_max(rows: np.ndarray) -> np.ndarray:
    """L2-normalised element-wise max: keeps the strongest feature of any moment."""
    return _normalise(np.asarray(rows, dtype=np.float32).max(axis=0))


def aggregate_weighted(rows: np.ndarray) -> np.ndarray:
    """L2-normalised Gaussian-weighted mean, centred on the middle (sigma = n / 4),
    for clips whose subject sits mid-video."""
    rows = np.asarray(rows, dtype=np.float32)
    n = len(rows)
    weights = np.exp(-0.5 * ((np.arange(n) - n / 2) / (n / 4)) ** 2)
    return _normalise(np.average(rows, axis=0, weights=weights).astype(np.float32))


def aggregate_segment(rows: np.ndarray, *, start: float = 0.0, end: float = 1 / 3) -> np.ndarray:
    """L2-normalised mean of a temporal segment, given as fractions of the clip
    (default: the first third)."""
    rows = np.asarray(rows, dtype=np.float32)
    n = len(rows)
    lo = min(int(start * n), n - 1)
    hi = max(int(end * n), lo + 1)
    return _normalise(rows[lo:hi].mean(axis=0))
