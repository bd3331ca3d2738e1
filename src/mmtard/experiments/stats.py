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


def frontier_margin(
    candidate: tuple[Sequence[str], Sequence[str]],
    frontier: Sequence[tuple[Sequence[str], Sequence[str]]],
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Difference:
    """How far ``candidate`` lies above a clean-versus-robust ``frontier``, in points of clean accuracy at the
    candidate's own robust accuracy, with a bootstrap interval.

    Each model is ``(clean outcomes per seed, robust outcomes per seed)``, every model on the same clean images and
    the same robust images (two sets, e.g. every test image and the attacked subset). The frontier is the piecewise
    linear line through its models' ``(robust, clean)`` accuracies, ordered by robust accuracy; beyond its ends it is
    flat (a candidate more robust than every frontier point is compared with the most robust point's clean
    accuracy). Each resample draws the clean images and the robust images with replacement (the same draws for every
    model) and each model's seeds with replacement (its own draw); the interval is the percentile interval at
    ``level``. ``seeds`` is the candidate's, ``images`` its clean images.
    """
    rng = np.random.default_rng(seed)
    models = [candidate, *frontier]
    clean = [outcome_matrix(c) for c, _ in models]
    robust = [outcome_matrix(r) for _, r in models]
    if len({m.shape[1] for m in clean}) != 1 or len({m.shape[1] for m in robust}) != 1:
        raise ValueError("outcomes: every model must cover the same clean images and the same robust images")
    clean_draws = rng.integers(0, clean[0].shape[1], size=(resamples, clean[0].shape[1]))
    robust_draws = rng.integers(0, robust[0].shape[1], size=(resamples, robust[0].shape[1]))

    def resampled(matrix: np.ndarray, image_draws: np.ndarray) -> np.ndarray:
        per_seed = np.stack([matrix[:, draw].mean(axis=1) for draw in image_draws])  # (resamples, seeds)
        seed_draws = rng.integers(0, matrix.shape[0], size=(resamples, matrix.shape[0]))
        return np.take_along_axis(per_seed, seed_draws, axis=1).mean(axis=1)

    def margin(clean_acc: Sequence[float], robust_acc: Sequence[float]) -> float:
        order = np.argsort(robust_acc[1:], kind="stable")
        xs, ys = np.asarray(robust_acc[1:])[order], np.asarray(clean_acc[1:])[order]
        return clean_acc[0] - float(np.interp(robust_acc[0], xs, ys))

    point = margin([m.mean() for m in clean], [m.mean() for m in robust])
    clean_rs = [resampled(m, clean_draws) for m in clean]
    robust_rs = [resampled(m, robust_draws) for m in robust]
    margins = [margin([c[i] for c in clean_rs], [r[i] for r in robust_rs]) for i in range(resamples)]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(margins, [tail, 100 - tail])
    return Difference(100 * point, 100 * float(low), 100 * float(high), clean[0].shape[0], clean[0].shape[1])
