"""``mmtard eval`` as a library call: one model, several datasets, several attacks and radii."""

from __future__ import annotations

import logging
import platform
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmtard.attacks import Attack, create_attack
from mmtard.data import create_dataset
from mmtard.eval.journal import EvalJournal, journal_path, weights_stamp
from mmtard.eval.zeroshot import evaluate_classifier
from mmtard.models import CLIPBundle, build_zero_shot_classifier
from mmtard.units import format_eps

logger = logging.getLogger(__name__)


@dataclass
class EvalRequest:
    """What to evaluate: datasets, class subset, sample count and attack settings.

    ``attacks`` names from ``mmtard.attacks.list_attacks()`` (``none`` for clean accuracy only); every
    attack runs at every radius in ``eps`` (fractions of the pixel range). ``steps`` / ``restarts``
    None means each attack's own default (PGD-10, APGD 100 iterations). With ``journal_dir`` every
    finished batch is journaled there (see :mod:`mmtard.eval.journal`) and a rerun of the same request on
    the same model continues where an interrupted one stopped.
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


def build_attacks(request: EvalRequest) -> list[Attack]:
    names = [a for a in request.attacks if a != "none"]
    return [
        create_attack(
            name, eps=eps, norm=request.norm, steps=request.steps, restarts=request.restarts, seed=request.seed
        )
        for name in names
        for eps in request.eps
    ]


def evaluate_bundle(bundle: CLIPBundle, request: EvalRequest) -> list[dict]:
    """Evaluate one loaded model on every dataset of ``request``; one results record per dataset."""
    attacks = build_attacks(request)
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
        )
        classifier = build_zero_shot_classifier(bundle, dataset.classnames, dataset.templates, request.logit_scale)
        journal = None
        if request.journal_dir is not None:
            identity = {
                "model": bundle.name,
                "pretrained": bundle.pretrained,
                "weights_file": weights_stamp(bundle.pretrained),
                "dataset": name,
                "data_dir": data_dir,
                "split": request.split,
                "classnames": dataset.classnames,
                "templates": list(dataset.templates),
                "images": len(dataset),
                "logit_scale": classifier.logit_scale,
                "seed": request.seed,
                "batch_size": request.batch_size,
                "attacks": [attack.describe() for attack in attacks],
            }
            journal = EvalJournal(journal_path(request.journal_dir, name, identity), identity)
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
        )
        record = {
            "model": bundle.name,
            "pretrained": bundle.pretrained,
            "split": request.split,
            "classes": request.classes if isinstance(request.classes, str) else list(request.classes),
            "classnames": dataset.classnames,
            "num_templates": len(dataset.templates),
            "logit_scale": classifier.logit_scale,
            "seed": request.seed,
            "device": str(bundle.device),
            "machine": platform.node() or platform.machine(),
            **result.to_dict(),
            "eps_values": [format_eps(e) for e in request.eps] if attacks else [],
        }
        records.append(record)
    return records
