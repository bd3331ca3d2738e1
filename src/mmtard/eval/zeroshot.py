"""Clean and robust zero-shot accuracy of a classifier on one dataset.

Protocol (RobustVLM / MMT-ARD): an image misclassified when clean counts as not robust and is not
attacked; each attack runs only on images still correctly classified. Gradient-masking checks run with
every robust evaluation and land in ``checks``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mmtard.attacks import Attack, check_robust_results, zero_gradient_fraction
from mmtard.errors import ConfigError
from mmtard.eval.journal import EvalJournal

logger = logging.getLogger(__name__)


class NonFiniteLogitsError(ConfigError):
    """The model's logits hold NaN or inf: its weights are broken, and no accuracy computed from them means
    anything (argmax of NaN logits picks class 0, which passes every gradient-masking check)."""


def check_finite_logits(logits: torch.Tensor, what: str) -> torch.Tensor:
    """``logits`` itself if every value is finite.

    Raises:
        NonFiniteLogitsError: ``"model: logits are not finite (NaN or inf) on N of B images (<what>)"``.
    """
    finite = torch.isfinite(logits).all(dim=1)
    if not finite.all():
        raise NonFiniteLogitsError(
            f"model: logits are not finite (NaN or inf) on {int((~finite).sum())} of {len(finite)} images ({what})"
        )
    return logits


@dataclass
class EvalResult:
    """Accuracies in percent over ``samples`` images; ``robust`` has one entry per attack x eps."""

    dataset: str
    samples: int
    clean_acc: float
    robust: list[dict] = field(default_factory=list)
    checks: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "dataset": self.dataset,
            "samples": self.samples,
            "clean_acc": self.clean_acc,
            "robust": self.robust,
            "checks": self.checks,
            "seconds": round(self.seconds, 2),
        }


def evaluate_classifier(
    classifier: nn.Module,
    dataset: Dataset,
    attacks: list[Attack] = (),
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    progress: bool = True,
    dataset_name: str | None = None,
    journal: EvalJournal | None = None,
) -> EvalResult:
    """Clean accuracy and, for each attack, robust accuracy of ``classifier`` on ``dataset``.

    Args:
        classifier: maps ``[0, 1]`` images to logits (a ``ZeroShotClassifier``); evaluated in eval mode.
        dataset: items ``(image, label, ...)``.
        attacks: each with its own eps, steps and restarts (see ``mmtard.attacks.create_attack``).
        batch_size: images per batch.
        num_workers: DataLoader workers.
        progress: show a tqdm bar.
        dataset_name: name recorded in the result.
        journal: records each finished batch; batches it already holds are not run again, so an
            interrupted evaluation continues where it stopped (with the same counts: attacks are seeded
            per call). ``seconds`` then includes the journaled batches' time.

    Returns:
        The accuracies, the attacks' settings and the gradient-masking checks.

    Raises:
        NonFiniteLogitsError: the classifier's logits hold NaN or inf on a clean or an attacked image.
    """
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    start = time.perf_counter()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    clean_correct = 0
    robust_correct = [0] * len(attacks)
    zero_grad = 0
    total = 0
    earlier_seconds = 0.0
    name = dataset_name or getattr(dataset, "name", "dataset")
    for index, batch in enumerate(tqdm(loader, desc=f"eval {name}", disable=not progress, leave=False)):
        counts = journal.done.get(index) if journal is not None else None
        if counts is None:
            counts = _evaluate_batch(
                classifier, attacks, batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            )
            if journal is not None:
                journal.record(dict(counts, batch=index))
        else:
            earlier_seconds += counts["seconds"]
        clean_correct += counts["clean"]
        for i, count in enumerate(counts["robust"]):
            robust_correct[i] += count
        zero_grad += counts["zero_grad"]
        total += counts["images"]
    classifier.train(was_training)

    def percent(count: int) -> float:
        return 100.0 * count / max(total, 1)

    robust = [dict(attack.describe(), acc=percent(count)) for attack, count in zip(attacks, robust_correct)]
    clean_acc = percent(clean_correct)
    checks = check_robust_results(clean_acc, robust, zero_grad / max(total, 1)) if attacks else {}
    for warning in checks.get("warnings", []):
        logger.warning("%s: %s", name, warning)
    return EvalResult(name, total, clean_acc, robust, checks, time.perf_counter() - start + earlier_seconds)


def _evaluate_batch(classifier: nn.Module, attacks: list[Attack], x: torch.Tensor, y: torch.Tensor) -> dict:
    """Counts on one batch: correct when clean, still correct under each attack, zero input gradients."""
    start = time.perf_counter()
    with torch.no_grad():
        correct = check_finite_logits(classifier(x), "clean").argmax(1) == y
    robust = [0] * len(attacks)
    zero_grad = 0
    if attacks:
        zero_grad = round(zero_gradient_fraction(classifier, x, y) * len(y))
        if correct.any():  # an image misclassified when clean is not attacked and counts as not robust
            x_ok, y_ok = x[correct], y[correct]
            for i, attack in enumerate(attacks):
                x_adv = attack(classifier, x_ok, y_ok)
                with torch.no_grad():
                    logits = check_finite_logits(classifier(x_adv), f"{attack.name} at {attack.describe()['eps']}")
                    robust[i] = int((logits.argmax(1) == y_ok).sum())
    return {
        "images": len(y),
        "clean": int(correct.sum()),
        "robust": robust,
        "zero_grad": zero_grad,
        "seconds": time.perf_counter() - start,
    }
