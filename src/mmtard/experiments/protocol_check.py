"""The protocol check (issue 25): can this testbed show what a second teacher adds at all?

Before any student is compared, every zoo model is measured on the images the students distil on and on held-out
images of the same classes: accuracy, mean entropy of its distribution at the method's temperature, and mean
probability of the true class. A teacher that has memorised the distillation images passes on the label and nothing
more (entropy near 0, accuracy far above held-out). The preconditions, stated beside the table:

- P0: no student and no teacher trained on an evaluation image;
- P1: the clean teacher's accuracy on the distillation images is within 3 points of its held-out accuracy, and its
  mean entropy there is at least half its held-out entropy;
- P2: each teacher beats the student's foundation on its own axis on held-out images (clean teacher: clean accuracy;
  robust teacher: PGD-10 4/255), seen classes;
- P3: the baselines forget as at scale (issue 16's targets for ``tecoa`` and ``ard``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mmtard.data import create_dataset, parse_part, part_positions
from mmtard.data.registry import ImageDataset
from mmtard.experiments.protocol import DISTILL_IMAGES, ProtocolScale, stage_arch
from mmtard.models import build_zero_shot_classifier, load_clip
from mmtard.models.zeroshot import ZeroShotClassifier

#: the zoo's models the check measures, in table order
CHECKED = ("teacher-clean", "teacher-robust", "foundation-teacher", "foundation-student")
#: issue 16's targets: preset -> (highest unseen clean accuracy, lowest seen PGD-10 4/255 accuracy)
FORGETTING_TARGETS = {"tecoa": (60.0, 35.0), "ard": (66.0, 30.0)}
P1_ACCURACY_POINTS = 3.0
P1_ENTROPY_RATIO = 0.5


@dataclass(frozen=True)
class Precondition:
    """One precondition: its name, whether it is met (None: not measured yet), and what was measured."""

    name: str
    met: bool | None
    detail: str

    def line(self) -> str:
        verdict = {True: "met", False: "NOT MET", None: "not measured yet"}[self.met]
        return f"- {self.name}: {verdict}. {self.detail}"


def distribution_statistics(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, float]:
    """Accuracy (percent), mean entropy (nats) of ``softmax(logits / temperature)`` and mean probability of the
    true class, over the rows of ``logits`` ``(N, K)``."""
    log_p = torch.log_softmax(logits.double() / temperature, dim=1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(dim=1)
    return {
        "accuracy": 100.0 * (logits.argmax(dim=1) == labels).double().mean().item(),
        "entropy": entropy.mean().item(),
        "p_true": p.gather(1, labels.view(-1, 1)).mean().item(),
    }


@torch.no_grad()
def classifier_logits(classifier: ZeroShotClassifier, dataset: ImageDataset, batch_size: int = 256) -> torch.Tensor:
    """The classifier's logits on every image of ``dataset``, in order (eval mode, no gradient)."""
    classifier.eval()
    device = classifier.prototypes.device
    chunks = []
    for start in range(0, len(dataset), batch_size):
        images = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])
        chunks.append(classifier(images.to(device)).float().cpu())
    return torch.cat(chunks)


def image_sets(scale: ProtocolScale) -> dict[str, dict]:
    """``distill`` and ``held-out``: the split and part of the seen-class images the students distil on and are
    evaluated on."""
    return {
        "distill": {"split": scale.student_split, "part": scale.student_part},
        "held-out": {"split": "test", "part": scale.seen_eval_part},
    }


def measure_teachers(
    scale: ProtocolScale,
    models: Mapping[str, Path],
    samples: int = 512,
    temperature: float = 1.0,
    logit_scale: float = 100.0,
    device: str = "cpu",
) -> list[dict]:
    """One record per model of :data:`CHECKED` and image set, for every way of choosing the distillation images
    (:data:`mmtard.experiments.protocol.DISTILL_IMAGES`): ``teacher``, ``images`` (``distill`` or ``held-out``),
    ``distill_images``, ``split``, ``part``, ``samples``, ``temperature``, ``accuracy``, ``entropy``, ``p_true``.
    ``samples`` class-balanced seen-class images per set (the same for every model)."""
    sets = {}
    for name, choice in DISTILL_IMAGES.items():
        for images, where in image_sets(_with(scale, choice)).items():
            sets[(name, images)] = where
    records = []
    for stage in CHECKED:
        bundle = load_clip(stage_arch(scale, stage), str(models[stage]), device=device)
        for (distill_images, images), where in sets.items():
            dataset = create_dataset(
                scale.dataset,
                scale.data_dir,
                image_size=bundle.image_size,
                classes="seen",
                samples=samples,
                **where,
            )
            classifier = build_zero_shot_classifier(bundle, dataset.classnames, dataset.templates, logit_scale)
            stats = distribution_statistics(classifier_logits(classifier, dataset), dataset.labels, temperature)
            records.append(
                {
                    "teacher": stage,
                    "images": images,
                    "distill_images": distill_images,
                    **where,
                    "samples": len(dataset),
                    "temperature": temperature,
                    **{key: round(value, 4) for key, value in stats.items()},
                }
            )
    return records


def _with(scale: ProtocolScale, choice: Mapping[str, object]) -> ProtocolScale:
    defaults = {"student_split": "train", "student_part": None, "seen_eval_part": None}
    return replace(scale, **(defaults | dict(choice)))


def disjoint_from_evaluation(scale: ProtocolScale, labels: torch.Tensor | None = None) -> bool:
    """Whether the distillation images and the evaluated seen-class images are disjoint: other splits, or other
    parts of one split (``labels``: that split's labels, to check the parts by position)."""
    if scale.student_split != "test":
        return True
    if scale.student_part is None or scale.seen_eval_part is None or labels is None:
        return False
    distill = set(part_positions(labels, *parse_part(scale.student_part)).tolist())
    held_out = set(part_positions(labels, *parse_part(scale.seen_eval_part)).tolist())
    return not distill & held_out


def preconditions(
    scale: ProtocolScale,
    distill_images: str,
    records: Sequence[dict],
    given_rows: Sequence[dict] = (),
    student_rows: Sequence[dict] = (),
    test_labels: torch.Tensor | None = None,
) -> list[Precondition]:
    """P0 to P3 for the protocol ``distill_images`` from the check's ``records``, the zoo models' evaluated rows
    (``given_rows``: ``clean_all`` and PGD-10 per split) and the baselines' rows (``student_rows`` with ``preset``)."""
    disjoint = disjoint_from_evaluation(scale, test_labels)
    p0 = Precondition(
        "P0 (no model trained on an evaluation image)",
        disjoint,
        f"students distil on split '{scale.student_split}' part {scale.student_part or 'all'} of the seen classes and "
        f"are evaluated on split 'test' part {scale.seen_eval_part or 'all'} (seen) and all unseen test images: "
        f"{'disjoint' if disjoint else 'overlapping'}; the zoo's models trained on train.npz only "
        "(../shared/zoo/README.md).",
    )
    clean = {
        r["images"]: r for r in records if r["teacher"] == "teacher-clean" and r["distill_images"] == distill_images
    }
    gap = abs(clean["distill"]["accuracy"] - clean["held-out"]["accuracy"])
    ratio = clean["distill"]["entropy"] / clean["held-out"]["entropy"] if clean["held-out"]["entropy"] else math.inf
    p1 = Precondition(
        "P1 (the clean teacher has not memorised the distillation images)",
        gap <= P1_ACCURACY_POINTS and ratio >= P1_ENTROPY_RATIO,
        f"accuracy {clean['distill']['accuracy']:.1f} on them against {clean['held-out']['accuracy']:.1f} held-out "
        f"(gap {gap:.1f}, at most {P1_ACCURACY_POINTS:g}); mean entropy {clean['distill']['entropy']:.3f} against "
        f"{clean['held-out']['entropy']:.3f} nats (ratio {ratio:.2f}, at least {P1_ENTROPY_RATIO:g}).",
    )
    return [p0, p1, _p2(given_rows), _p3(student_rows)]


def _p2(given_rows: Sequence[dict]) -> Precondition:
    name = "P2 (each teacher beats the student's foundation on its own axis, held-out seen images)"
    rows = {row["stage"]: row for row in given_rows}
    if not {"teacher-clean", "teacher-robust", "foundation-student"} <= set(rows):
        return Precondition(name, None, "the zoo's models are not evaluated yet.")
    from mmtard.experiments.report import robust_accuracy

    def clean(stage):
        return rows[stage]["clean_all"]["seen"]["clean_acc"]

    def pgd(stage):
        return robust_accuracy(rows[stage]["seen"], "pgd", "4/255")

    met = clean("teacher-clean") > clean("foundation-student") and pgd("teacher-robust") > pgd("foundation-student")
    return Precondition(
        name,
        met,
        f"clean: teacher-clean {clean('teacher-clean'):.1f} against foundation-student "
        f"{clean('foundation-student'):.1f}; PGD-10 4/255: teacher-robust {pgd('teacher-robust'):.1f} against "
        f"{pgd('foundation-student'):.1f}.",
    )


def _p3(student_rows: Sequence[dict]) -> Precondition:
    name = "P3 (the baselines forget as at scale: issue 16's targets)"
    from mmtard.experiments.report import robust_accuracy

    parts, met = [], True
    for preset, (clean_max, pgd_min) in FORGETTING_TARGETS.items():
        rows = [r for r in student_rows if r.get("cell") == preset and not r.get("control")]
        if not rows:
            return Precondition(name, None, f"no `{preset}` student evaluated yet.")
        unseen = sum(r["clean_all"]["unseen"]["clean_acc"] for r in rows) / len(rows)
        pgd = sum(robust_accuracy(r["seen"], "pgd", "4/255") for r in rows) / len(rows)
        ok = unseen <= clean_max and pgd >= pgd_min
        met = met and ok
        parts.append(
            f"`{preset}` ({len(rows)} seed{'s' if len(rows) > 1 else ''}): unseen clean {unseen:.1f} (at most "
            f"{clean_max:g}), seen PGD-10 4/255 {pgd:.1f} (at least {pgd_min:g}): {'met' if ok else 'not met'}"
        )
    return Precondition(name, met, "; ".join(parts) + ".")


def check_table(records: Sequence[dict]) -> str:
    """The check's records as a Markdown table, one row per model, image set and way of choosing the images."""
    lines = [
        "| model | distillation images | image set | split, part | images | accuracy | mean entropy (nats, tau "
        f"{records[0]['temperature']:g}) | mean p(true class) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['teacher']} | {r['distill_images']} | {r['images']} | {r['split']}, {r['part'] or 'all'} | "
            f"{r['samples']} | {r['accuracy']:.1f} | {r['entropy']:.3f} | {r['p_true']:.3f} |"
        )
    return "\n".join(lines)
