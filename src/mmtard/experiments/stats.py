"""Paired bootstrap intervals for the difference of two models' accuracies on the same images and seeds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Difference:
    """``mean`` difference in points (model minus baseline) with its 95% interval ``[low, high]``."""

    mean: float
    low: float
    high: float
    seeds: int
    images: int

    def text(self) -> str:
        return f"{self.mean:+.1f} [{self.low:+.1f}, {self.high:+.1f}]"

    def to_dict(self) -> dict:
        return {"mean": round(self.mean, 2), "ci95": [round(self.low, 2), round(self.high, 2)]} | {
            "seeds": self.seeds,
            "images": self.images,
        }


def outcome_matrix(outcomes: Sequence[str]) -> np.ndarray:
    """``(seeds, images)`` 0/1 matrix from one ``"0"``/``"1"`` string per seed (``EvalResult.outcomes``).

    Raises:
        ValueError: the strings differ in length (not the same images).
    """
    if len({len(o) for o in outcomes}) != 1:
        raise ValueError(f"outcomes: every seed must cover the same images, got lengths {[len(o) for o in outcomes]}")
    return np.array([[c == "1" for c in o] for o in outcomes], dtype=np.float64)


def paired_bootstrap(
    model: Sequence[str], baseline: Sequence[str], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> Difference:
    """The difference of accuracies, model minus baseline, in points, with a paired bootstrap interval.

    ``model[s]`` and ``baseline[s]`` are the per-image outcomes of seed ``s`` on the same images. Each resample
    draws seeds with replacement and images with replacement (the same draw for both models, so the pairing by
    seed and image is kept) and takes the mean difference; the interval is the percentile interval at ``level``.
    """
    a, b = outcome_matrix(model), outcome_matrix(baseline)
    if a.shape != b.shape:
        raise ValueError(f"outcomes: model {a.shape} and baseline {b.shape} must be the same seeds and images")
    diff = a - b
    seeds, images = diff.shape
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, seeds, size=(resamples, seeds))
    image_draws = rng.integers(0, images, size=(resamples, images))
    # Mean over the drawn (seed, image) pairs: per-seed means over the drawn images, then over the drawn seeds.
    per_seed = np.stack([diff[:, draw].mean(axis=1) for draw in image_draws])  # (resamples, seeds)
    means = np.take_along_axis(per_seed, seed_draws, axis=1).mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Difference(100 * float(diff.mean()), 100 * float(low), 100 * float(high), seeds, images)
