"""``mmtard eval`` as a library call: one model, several datasets, several attacks and radii."""

from __future__ import annotations

import logging
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mmtard.attacks import Attack, create_attack, list_attacks
from mmtard.data import ImageDataset, check_dataset_source, create_dataset, parse_part
from mmtard.distributed import Shard
from mmtard.errors import ConfigError
from mmtard.eval.journal import EvalJournal, journal_path, weights_stamp
from mmtard.eval.subset import classes_key, indices_sha256, subset_entry
from mmtard.eval.zeroshot import (
    EvalResult,
    NonFiniteLogitsError,
    check_finite_logits,
    check_precision,
    evaluate_classifier,
)
from mmtard.fileio import weights_sha256
from mmtard.models import CLIPBundle, ZeroShotClassifier, build_zero_shot_classifier
from mmtard.models.zeroshot import check_logit_scale
from mmtard.units import format_eps
from mmtard.validate import check_whole_number

logger = logging.getLogger(__name__)


@dataclass
class EvalRequest:
    """What to evaluate: datasets, class subset, sample count and attack settings.

    ``attacks`` names from ``mmtard.attacks.list_attacks()`` (``none`` for clean accuracy only); every
    attack runs at every radius in ``eps`` (fractions of the pixel range). ``steps`` / ``restarts``
    None means each attack's own default (PGD-10, APGD 100 iterations). With ``journal_dir`` every
    finished batch is journaled there (see :mod:`mmtard.eval.journal`) and a rerun of the same request on
    the same model continues where an interrupted one stopped. ``precision`` ``bf16`` autocasts the
    forwards and attacks; its robust numbers are checked against fp32 on the first batch (see
    :mod:`mmtard.eval.zeroshot`). ``subset`` (dataset name -> a record's ``subset``, see
    :mod:`mmtard.eval.subset`) evaluates exactly those images of each dataset, instead of ``samples``.
    ``part`` (``"k/n"``) evaluates only the k-th of n disjoint, class-balanced parts of the split
    (:func:`mmtard.data.part_positions`), e.g. the half of a test set a student was not distilled on.
    """

    datasets: Sequence[str]
    data_dirs: Sequence[str | None]
    split: str = "test"
    classes: str | Sequence[str] = "all"
    samples: int | None = None
    attacks: Sequence[str] = ("pgd",)
    eps: Sequence[float] = (1 / 255, 2 / 255, 4 / 255)
    norm: str = "linf"
    steps: int | None = None
    restarts: int | None = None
    batch_size: int = 128
    num_workers: int = 0
    logit_scale: float | str = 100.0
    seed: int = 0
    download: bool = False
    progress: bool = True
    classnames: Sequence[str] | None = None
    journal_dir: str | None = None
    precision: str = "fp32"
    subset: Mapping[str, dict] | None = None
    part: str | None = None


def build_attacks(request: EvalRequest) -> list[Attack]:
    names = [a for a in request.attacks if a != "none"]
    return [
        create_attack(
            name, eps=eps, norm=request.norm, steps=request.steps, restarts=request.restarts, seed=request.seed
        )
        for name in names
        for eps in request.eps
    ]


def check_attack_names(names: Sequence[str], field: str = "attack") -> None:
    """Each of ``names`` is ``none`` (clean accuracy only) or a registered attack.

    Raises:
        ConfigError: ``"<field>: unknown attack 'fgsm'; expected one of none, aa, ..."``.
    """
    known = ["none", *list_attacks()]
    for name in names:
        if name not in known:
            raise ConfigError(f"{field}: unknown attack {name!r}; expected one of {', '.join(known)}")


def check_eval_request(request: EvalRequest) -> list[Attack]:
    """Validate every setting of ``request`` that can be checked before a dataset is read or a file written.

    Returns:
        The attacks, one per attack name x eps.

    Raises:
        ConfigError: the first wrong setting, naming its field: sizes and counts, the logit scale, an
            attack's name, eps, norm, steps or restarts, a dataset, split or missing data folder.
    """
    if not request.datasets:
        raise ConfigError("dataset: give at least one dataset")
    if len(request.data_dirs) != len(request.datasets):
        raise ConfigError(
            f"data_dir: one data folder per dataset: {len(request.datasets)} datasets, {len(request.data_dirs)} folders"
        )
    check_whole_number("batch_size", request.batch_size, low=1)
    check_whole_number("num_workers", request.num_workers, low=0)
    if request.samples is not None:
        check_whole_number("samples", request.samples, low=1)
    check_whole_number("seed", request.seed)
    if request.part is not None:
        parse_part(request.part)
    check_logit_scale(request.logit_scale)
    check_precision(request.precision)
    if not request.attacks:
        raise ConfigError("attack: give at least one attack, or none for clean accuracy only")
    check_attack_names(request.attacks)
    if any(name != "none" for name in request.attacks) and not request.eps:
        raise ConfigError("eps: give at least one radius for the attacks")
    attacks = build_attacks(request)
    for name, data_dir in zip(request.datasets, request.data_dirs):
        check_dataset_source(name, data_dir, request.split, request.download)
    _check_subset(request)
    return attacks


def _check_subset(request: EvalRequest) -> None:
    if request.subset is None:
        return
    if request.samples is not None:
        raise ConfigError("samples: give samples or a subset, not both (a subset fixes the images)")
    if request.part is not None:
        raise ConfigError("part: give a part or a subset, not both (a subset fixes the images)")
    for name in request.datasets:
        entry = request.subset.get(name)
        if entry is None:
            raise ConfigError(f"subset: no images of {name} in it (it has {', '.join(sorted(request.subset))})")
        if entry.get("split", request.split) != request.split:
            raise ConfigError(f"subset: its {name} images are of split {entry['split']!r}, not {request.split!r}")
        if entry.get("classes", classes_key(request.classes)) != classes_key(request.classes):
            raise ConfigError(
                f"subset: its {name} images were chosen with classes {entry['classes']!r}, this run asks for "
                f"{classes_key(request.classes)!r}; a subset pins its class selection (the zero-shot head), so "
                "evaluate it with the classes it was made with"
            )


def _refuse_non_finite(bundle: CLIPBundle, dataset_name: str, exc: NonFiniteLogitsError) -> NonFiniteLogitsError:
    detail = str(exc).removeprefix("model: ")
    return NonFiniteLogitsError(
        f"pretrained: the weights '{bundle.pretrained}' ({bundle.name}) give non-finite logits on {dataset_name}: "
        f"{detail}. They are broken (a diverged training run?), so no accuracy is reported"
    )


def _check_first_batch(classifier: ZeroShotClassifier, dataset: ImageDataset, batch_size: int) -> None:
    """Run the first batch clean, before a journal is created: a model with non-finite logits leaves nothing."""
    count = min(batch_size, len(dataset))
    if count == 0:
        return
    x = torch.stack([dataset[i][0] for i in range(count)]).to(next(classifier.parameters()).device)
    was_training = classifier.training
    classifier.eval()
    with torch.no_grad():
        check_finite_logits(classifier(x), "clean")
    classifier.train(was_training)


def evaluate_bundle(bundle: CLIPBundle, request: EvalRequest, shard: Shard | None = None) -> list[dict]:
    """Evaluate one loaded model on every dataset of ``request``; one results record per dataset (and data
    folder: a record carries its ``data_dir``).

    Every setting is validated (:func:`check_eval_request`) before any dataset is read or journal written.

    Args:
        bundle: the loaded model.
        request: what to evaluate.
        shard: this process's share of the batches (see :mod:`mmtard.distributed`); None: the
            initialised process group's (``torchrun``, every process must call this), else the whole
            evaluation. Every process returns the merged records, equal to a single process's.

    Raises:
        ConfigError: a wrong setting or unreadable data.
        NonFiniteLogitsError: the model's logits hold NaN or inf; the message names the weights.
        PrecisionError: ``bf16`` robust accuracy differs from fp32's by more than 1 point.
    """
    attacks = check_eval_request(request)
    shard = Shard.from_process_group() if shard is None else shard
    records = []
    for name, data_dir in zip(request.datasets, request.data_dirs):
        dataset = create_dataset(
            name,
            data_dir,
            split=request.split,
            image_size=bundle.image_size,
            classes=request.classes,
            samples=request.samples,
            classnames=request.classnames,
            download=request.download,
            seed=request.seed,
            part=request.part,
            **_subset_arguments(request, name),
        )
        classifier = build_zero_shot_classifier(bundle, dataset.classnames, dataset.templates, request.logit_scale)
        try:
            _check_first_batch(classifier, dataset, request.batch_size)
            journal = _open_journal(bundle, request, name, data_dir, dataset, classifier, attacks, shard)
            torch.manual_seed(request.seed)
            result = evaluate_classifier(
                classifier,
                dataset,
                attacks,
                batch_size=request.batch_size,
                num_workers=request.num_workers,
                progress=request.progress,
                dataset_name=name,
                journal=journal,
                precision=request.precision,
                shard=shard,
            )
        except NonFiniteLogitsError as exc:
            raise _refuse_non_finite(bundle, name, exc) from exc
        records.append(_record(bundle, request, name, data_dir, dataset, classifier, result, attacks))
    return records


def _record(
    bundle: CLIPBundle,
    request: EvalRequest,
    name: str,
    data_dir: str | None,
    dataset: ImageDataset,
    classifier: ZeroShotClassifier,
    result: EvalResult,
    attacks: list[Attack],
) -> dict:
    """The results record of one dataset: the model and its files, the data and its subset, the settings, the
    accuracies (``result``) and the radii."""
    return {
        "model": bundle.name,
        "pretrained": bundle.pretrained,
        **_digest("pretrained_sha256", bundle.pretrained),
        **_vision_fields(bundle),
        "split": request.split,
        **({"part": request.part} if request.part is not None else {}),
        "data_dir": None if data_dir is None else str(data_dir),
        "classes": request.classes if isinstance(request.classes, str) else list(request.classes),
        "classnames": dataset.classnames,
        "num_templates": len(dataset.templates),
        "logit_scale": classifier.logit_scale,
        "seed": request.seed,
        "device": str(bundle.device),
        "machine": platform.node() or platform.machine(),
        **result.to_dict(),
        "eps_values": [format_eps(e) for e in request.eps] if attacks else [],
        "subset": subset_entry(request.split, dataset.source_size, dataset.source_indices, request.classes),
    }


def _subset_arguments(request: EvalRequest, name: str) -> dict:
    if request.subset is None:
        return {}
    entry = request.subset[name]
    return {"indices": entry["indices"], "source_size": entry.get("source_size")}


def _vision_fields(bundle: CLIPBundle) -> dict:
    """``vision_weights`` (and its alpha) for a record, when an image-tower file was loaded."""
    if bundle.vision_weights is None:
        return {}
    return {
        "vision_weights": bundle.vision_weights,
        **_digest("vision_weights_sha256", bundle.vision_weights),
        "vision_weights_alpha": bundle.vision_weights_alpha,
    }


def _digest(key: str, weights: str | None) -> dict:
    """``{key: SHA-256}`` of a local weights file; nothing for a tag or random weights."""
    digest = weights_sha256(weights)
    return {} if digest is None else {key: digest}


def _open_journal(
    bundle: CLIPBundle,
    request: EvalRequest,
    name: str,
    data_dir: str | None,
    dataset: ImageDataset,
    classifier: ZeroShotClassifier,
    attacks: list[Attack],
    shard: Shard,
) -> EvalJournal | None:
    if request.journal_dir is None:
        return None
    identity = {
        "model": bundle.name,
        "pretrained": bundle.pretrained,
        "weights_file": weights_stamp(bundle.pretrained),
        "vision_weights": bundle.vision_weights,
        "vision_weights_file": weights_stamp(bundle.vision_weights),
        "vision_weights_alpha": bundle.vision_weights_alpha,
        "dataset": name,
        "data_dir": data_dir,
        "split": request.split,
        "classnames": dataset.classnames,
        "templates": list(dataset.templates),
        "images": len(dataset),
        "indices_sha256": indices_sha256(dataset.source_indices),
        "logit_scale": classifier.logit_scale,
        "seed": request.seed,
        "batch_size": request.batch_size,
        "attacks": [attack.describe() for attack in attacks],
    }
    if request.precision != "fp32":
        identity["precision"] = request.precision
    if shard.distributed:  # each process journals its own batches, in its own file
        identity["shard"] = [shard.rank, shard.world_size]
    return EvalJournal(journal_path(request.journal_dir, name, identity), identity)
