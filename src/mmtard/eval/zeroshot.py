"""Clean and robust zero-shot accuracy of a classifier on one dataset.

Protocol (RobustVLM / MMT-ARD): an image misclassified when clean counts as not robust and is not
attacked; each attack runs only on images still correctly classified. Gradient-masking checks run with
every robust evaluation and land in ``checks``.

Precision: ``fp32`` (the default) or ``bf16``, autocast on the model's device for the forwards, the
attacks' gradients included. bf16 must not flatter robustness: before a robust evaluation in bf16, the
first batch is evaluated in both precisions, and a robust accuracy that differs by more than
:data:`BF16_TOLERANCE_POINTS` is refused (:class:`PrecisionError`): a robust number is the product, and a
number 2 points too high in a table does more harm than an evaluation that has to run again in fp32, so
no marked-but-written result. Otherwise the comparison is kept in the result (``precision_check``).

Under ``torchrun`` (a :class:`~mmtard.distributed.Shard`), each process evaluates its own batches
(the single process's batches, ``b % world_size == rank``) and the counts are merged.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mmtard.attacks import Attack, check_robust_results, zero_gradient_fraction
from mmtard.distributed import AUTOCAST_DTYPES, EVAL_PRECISIONS, Shard, gather
from mmtard.errors import ConfigError
from mmtard.eval.journal import EvalJournal

logger = logging.getLogger(__name__)

#: the largest difference, in points, between a bf16 and an fp32 robust accuracy on the same images
BF16_TOLERANCE_POINTS = 1.0


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


class PrecisionError(ConfigError):
    """bf16 gives another robust accuracy than fp32 on the same images: its robust numbers are refused."""


def check_precision(precision: str) -> str:
    """``precision`` itself if it is one of :data:`mmtard.distributed.EVAL_PRECISIONS`.

    Raises:
        ConfigError: ``"precision: expected fp32 or bf16, got ..."``.
    """
    if precision not in EVAL_PRECISIONS:
        raise ConfigError(f"precision: expected {' or '.join(EVAL_PRECISIONS)}, got {precision!r}")
    return precision


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """bf16 autocast on ``device`` for ``bf16``; nothing for ``fp32``."""
    if check_precision(precision) == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


@dataclass
class EvalResult:
    """Accuracies in percent over ``samples`` images; ``robust`` has one entry per attack x eps.

    ``outcomes``: per image, in dataset order, ``"1"`` where it was classified correctly and ``"0"`` where not:
    ``clean`` one string, ``robust`` one string per entry of ``robust`` (an image wrong when clean is ``"0"``).
    They make paired comparisons of two models on the same images possible (bootstrap intervals).
    ``precision_check`` (bf16 with attacks only): the first batch's accuracies in both precisions.
    """

    dataset: str
    samples: int
    clean_acc: float
    robust: list[dict] = field(default_factory=list)
    checks: dict = field(default_factory=dict)
    seconds: float = 0.0
    precision: str = "fp32"
    precision_check: dict | None = None
    outcomes: dict | None = None

    def to_dict(self) -> dict:
        result = {
            "dataset": self.dataset,
            "samples": self.samples,
            "clean_acc": self.clean_acc,
            "robust": self.robust,
            "checks": self.checks,
            "seconds": round(self.seconds, 2),
            "precision": self.precision,
        }
        if self.precision_check is not None:
            result["precision_check"] = self.precision_check
        if self.outcomes is not None:
            result["outcomes"] = self.outcomes
        return result


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
    precision: str = "fp32",
    shard: Shard | None = None,
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
        precision: ``fp32`` or ``bf16`` (autocast; robust numbers checked against fp32 on the first batch).
        shard: this process's share under ``torchrun``: it evaluates its batches, then every process of the
            group must reach the merge (a collective). None: the whole dataset, in this process alone.

    Returns:
        The accuracies, the attacks' settings and the gradient-masking checks (every process of a shard
        returns the merged result). ``seconds`` is the slowest process's.

    Raises:
        NonFiniteLogitsError: the classifier's logits hold NaN or inf on a clean or an attacked image.
        PrecisionError: ``bf16`` changes a robust accuracy of the first batch by more than 1 point.
    """
    check_precision(precision)
    shard = Shard() if shard is None else shard
    was_training = classifier.training
    classifier.eval()
    start = time.perf_counter()
    batches = [
        list(range(b * batch_size, min((b + 1) * batch_size, len(dataset))))
        for b in range(math.ceil(len(dataset) / batch_size))
    ]
    name = dataset_name or getattr(dataset, "name", "dataset")
    precision_check, computed = _check_first_batch(classifier, attacks, dataset, batches, precision, name, shard)
    own = list(shard.batches(len(batches)))
    loader = DataLoader(dataset, batch_sampler=[batches[b] for b in own], num_workers=num_workers)
    bar = tqdm(zip(own, loader), total=len(own), desc=f"eval {name}", disable=not (progress and shard.is_main))
    counts_by_batch, earlier_seconds = _evaluate_batches(
        classifier, attacks, bar, batches, computed, journal, precision, name
    )
    classifier.train(was_training)
    parts = gather((counts_by_batch, time.perf_counter() - start + earlier_seconds), shard)
    return _merge(parts, attacks, name, precision, precision_check, log_warnings=shard.is_main)


def _check_first_batch(
    classifier: nn.Module,
    attacks: list[Attack],
    dataset: Dataset,
    batches: list[list[int]],
    precision: str,
    name: str,
    shard: Shard,
) -> tuple[dict | None, dict[int, dict]]:
    """Below fp32 with attacks: the first batch in both precisions (:func:`_compare_precisions`). Returns the
    comparison (None when not made) and the batch's counts by index when this process owns it, to be reused."""
    if precision == "fp32" or not attacks or not batches:
        return None, {}
    precision_check, first_counts = _compare_precisions(classifier, attacks, dataset, batches[0], precision, name)
    return precision_check, ({0: first_counts} if shard.owns(0) else {})


def _evaluate_batches(
    classifier: nn.Module,
    attacks: list[Attack],
    loaded: Iterable[tuple[int, list]],
    batches: list[list[int]],
    computed: dict[int, dict],
    journal: EvalJournal | None,
    precision: str,
    name: str,
) -> tuple[dict[int, dict], float]:
    """Each ``(index, batch)`` of ``loaded``'s counts, by index, and the seconds of those read from the journal.

    A batch the journal holds, whose entry fits the batch (:func:`_fits_batch`), is not run again; one in
    ``computed`` (the precision check's first batch) is taken from there; any other is evaluated now. Those are
    recorded in the journal.
    """
    counts_by_batch: dict[int, dict] = {}
    earlier_seconds = 0.0
    for index, batch in loaded:
        journaled = journal.done.get(index) if journal is not None else None
        if journaled is not None and not _fits_batch(journaled, len(batches[index]), len(attacks)):
            if "clean_outcomes" in journaled:  # else journaled before outcomes were kept: run again, nothing wrong
                size = len(batches[index])
                logger.warning(
                    "%s: journaled counts of batch %d do not fit its %d images; run again", name, index, size
                )
            journaled = None
        if journaled is not None:
            counts_by_batch[index] = journaled
            earlier_seconds += journaled["seconds"]
            continue
        counts = computed.pop(index, None)
        if counts is None:
            counts = _evaluate_loaded_batch(classifier, attacks, batch, batches[index], precision)
        if journal is not None:
            journal.record(dict(counts, batch=index))
        counts_by_batch[index] = counts
    return counts_by_batch, earlier_seconds


def _evaluate_loaded_batch(
    classifier: nn.Module, attacks: list[Attack], batch: list, indices: list[int], precision: str
) -> dict:
    """One loaded batch's counts (:func:`_evaluate_batch`) on the classifier's device under ``precision``; the
    images' ids are the batch's third item, else their dataset ``indices``."""
    device = next(classifier.parameters()).device
    x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
    ids = batch[2] if len(batch) > 2 else torch.tensor(indices)
    with autocast(precision, device):
        return _evaluate_batch(classifier, attacks, x, y, ids)


def _fits_batch(counts: dict, images: int, attacks: int) -> bool:
    """Whether a journal entry can be the counts of a batch of ``images`` images under ``attacks`` attacks: every
    outcome string has one 0/1 per image, and every count is the number of 1s in its string."""

    def outcome(bits: object, count: object) -> bool:
        return (
            isinstance(bits, str)
            and len(bits) == images
            and set(bits) <= {"0", "1"}
            and isinstance(count, int)
            and count == bits.count("1")
        )

    robust, robust_bits = counts.get("robust"), counts.get("robust_outcomes")
    zero_grad, seconds = counts.get("zero_grad"), counts.get("seconds")
    return (
        counts.get("images") == images
        and outcome(counts.get("clean_outcomes"), counts.get("clean"))
        and isinstance(robust, list)
        and isinstance(robust_bits, list)
        and len(robust) == len(robust_bits) == attacks
        and all(outcome(bits, count) for bits, count in zip(robust_bits, robust))
        and isinstance(zero_grad, int)
        and 0 <= zero_grad <= images
        and isinstance(seconds, (int, float))
    )


def _merge(
    parts: list[tuple[dict[int, dict], float]],
    attacks: list[Attack],
    name: str,
    precision: str,
    precision_check: dict | None,
    log_warnings: bool,
) -> EvalResult:
    """One result from every process's per-batch counts (summed in batch order) and times (the largest)."""
    merged = {index: counts for counts_by_batch, _ in parts for index, counts in counts_by_batch.items()}
    clean_correct, zero_grad, total = 0, 0, 0
    robust_correct = [0] * len(attacks)
    outcomes = {"clean": "", "robust": [""] * len(attacks)}
    for index in sorted(merged):
        counts = merged[index]
        clean_correct += counts["clean"]
        for i, count in enumerate(counts["robust"]):
            robust_correct[i] += count
        zero_grad += counts["zero_grad"]
        total += counts["images"]
        outcomes["clean"] += counts["clean_outcomes"]
        outcomes["robust"] = [done + more for done, more in zip(outcomes["robust"], counts["robust_outcomes"])]

    def percent(count: int) -> float:
        return 100.0 * count / max(total, 1)

    robust = [dict(attack.describe(), acc=percent(count)) for attack, count in zip(attacks, robust_correct)]
    clean_acc = percent(clean_correct)
    checks = check_robust_results(clean_acc, robust, zero_grad / max(total, 1)) if attacks else {}
    for warning in checks.get("warnings", []) if log_warnings else ():
        logger.warning("%s: %s", name, warning)
    seconds = max(elapsed for _, elapsed in parts)
    return EvalResult(name, total, clean_acc, robust, checks, seconds, precision, precision_check, outcomes)


def _compare_precisions(
    classifier: nn.Module, attacks: list[Attack], dataset: Dataset, indices: list[int], precision: str, name: str
) -> tuple[dict, dict]:
    """The first batch in fp32 and in ``precision``: the comparison, and the counts in ``precision``.

    Raises:
        PrecisionError: a robust accuracy differs by more than :data:`BF16_TOLERANCE_POINTS`.
    """
    device = next(classifier.parameters()).device
    x, y = next(iter(DataLoader(dataset, batch_sampler=[indices])))[:2]
    x, y = x.to(device), y.to(device)
    ids = torch.tensor(indices)
    reference = _evaluate_batch(classifier, attacks, x, y, ids)
    with autocast(precision, device):
        lowered = _evaluate_batch(classifier, attacks, x, y, ids)
    images = len(indices)

    def accuracies(counts: dict) -> dict:
        return {
            "clean": 100.0 * counts["clean"] / images,
            "robust": [100.0 * count / images for count in counts["robust"]],
        }

    check = {
        "images": images,
        "tolerance_points": BF16_TOLERANCE_POINTS,
        "fp32": accuracies(reference),
        precision: accuracies(lowered),
    }
    differences = [abs(a - b) for a, b in zip(check[precision]["robust"], check["fp32"]["robust"])]
    check["max_difference_points"] = max(differences, default=0.0)
    worst = [
        f"{attack.name} {attack.describe()['eps']}: {low:.1f}% in {precision}, {ref:.1f}% in fp32"
        for attack, low, ref, difference in zip(
            attacks, check[precision]["robust"], check["fp32"]["robust"], differences
        )
        if difference > BF16_TOLERANCE_POINTS
    ]
    if worst:
        raise PrecisionError(
            f"precision: {precision} changes robust accuracy by more than {BF16_TOLERANCE_POINTS:g} point on the "
            f"first {images} images of {name} ({'; '.join(worst)}), so its robust numbers are refused; "
            "evaluate with precision fp32"
        )
    return check, lowered


def _evaluate_batch(
    classifier: nn.Module, attacks: list[Attack], x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor
) -> dict:
    """Counts on one batch: correct when clean, still correct under each attack, zero input gradients.

    ``ids`` are the images' dataset positions: attacks with per-sample randomness (PGD's random start) draw
    it per image, so the counts do not depend on how the images are batched.
    """
    start = time.perf_counter()
    with torch.no_grad():
        correct = check_finite_logits(classifier(x), "clean").argmax(1) == y
    robust_correct = [torch.zeros_like(correct) for _ in attacks]
    zero_grad = 0
    if attacks:
        zero_grad = round(zero_gradient_fraction(classifier, x, y) * len(y))
        if correct.any():  # an image misclassified when clean is not attacked and counts as not robust
            x_ok, y_ok, ids_ok = x[correct], y[correct], ids[correct.cpu()]
            for i, attack in enumerate(attacks):
                x_adv = attack(classifier, x_ok, y_ok, sample_ids=ids_ok)
                with torch.no_grad():
                    logits = check_finite_logits(classifier(x_adv), f"{attack.name} at {attack.describe()['eps']}")
                    robust_correct[i][correct] = logits.argmax(1) == y_ok
    return {
        "images": len(y),
        "clean": int(correct.sum()),
        "robust": [int(r.sum()) for r in robust_correct],
        "clean_outcomes": _bits(correct),
        "robust_outcomes": [_bits(r) for r in robust_correct],
        "zero_grad": zero_grad,
        "seconds": time.perf_counter() - start,
    }


def _bits(correct: torch.Tensor) -> str:
    """``"1"``/``"0"`` per image: correct or not."""
    return "".join("1" if c else "0" for c in correct.tolist())
