"""The protocol check (issue 25): its statistics against a hand computation, its records on tiny models, and the
preconditions it derives."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from helpers import make_npz_dir
from safetensors.torch import save_file

from mmtard.data import create_dataset
from mmtard.experiments import ZOO_SCALE
from mmtard.experiments.protocol import DISTILL_IMAGES
from mmtard.experiments.protocol_check import (
    CHECKED,
    check_table,
    classifier_logits,
    distribution_statistics,
    measure_teachers,
    preconditions,
)
from mmtard.models import build_zero_shot_classifier, load_clip


def test_statistics_by_hand():
    # row 0: probabilities 1/4, 3/4 (label 1: correct, p_true 3/4); row 1: 1/2, 1/2 (label 0: argmax picks 0, p 1/2)
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])
    stats = distribution_statistics(logits, torch.tensor([1, 0]), temperature=1.0)
    entropy0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert stats["accuracy"] == pytest.approx(100.0)
    assert stats["entropy"] == pytest.approx((entropy0 + math.log(2)) / 2)
    assert stats["p_true"] == pytest.approx((0.75 + 0.5) / 2)
    # temperature 2 halves the logits: row 0 becomes 1 : sqrt(3)
    hot = distribution_statistics(logits, torch.tensor([1, 0]), temperature=2.0)
    q = math.sqrt(3) / (1 + math.sqrt(3))
    assert hot["p_true"] == pytest.approx((q + 0.5) / 2)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    data = make_npz_dir(root / "data", train_per_class=6, test_per_class=8)
    models = {}
    for i, stage in enumerate(CHECKED):
        torch.manual_seed(i)
        bundle = load_clip("tiny-vit-s", "none")
        models[stage] = root / f"{stage}.safetensors"
        save_file({k: v.contiguous() for k, v in bundle.model.state_dict().items()}, str(models[stage]))
    scale = replace(ZOO_SCALE, data_dir=str(data), teacher_arch="tiny-vit-s")
    return scale, models


def test_records_are_the_statistics_of_each_models_logits(tiny_zoo):
    scale, models = tiny_zoo
    records = measure_teachers(scale, models, samples=10)
    assert len(records) == len(CHECKED) * len(DISTILL_IMAGES) * 2
    assert {r["images"] for r in records} == {"distill", "held-out"}
    (record,) = [
        r
        for r in records
        if (r["teacher"], r["distill_images"], r["images"]) == ("teacher-clean", "transfer", "distill")
    ]
    assert (record["split"], record["part"], record["samples"]) == ("test", "1/2", 10)
    bundle = load_clip("tiny-vit-s", str(models["teacher-clean"]))
    data = create_dataset(
        "cifar10", scale.data_dir, split="test", image_size=32, classes="seen", samples=10, part="1/2"
    )
    classifier = build_zero_shot_classifier(bundle, data.classnames, data.templates, 100.0)
    with torch.no_grad():
        logits = classifier(torch.stack([data[i][0] for i in range(len(data))]))
    assert torch.allclose(classifier_logits(classifier, data, batch_size=3), logits, atol=1e-4)
    expected = distribution_statistics(logits, data.labels, 1.0)
    for key in ("accuracy", "entropy", "p_true"):
        assert record[key] == pytest.approx(expected[key], abs=1e-3)
    assert "| teacher-clean | transfer | distill | test, 1/2 | 10 |" in check_table(records)


def test_preconditions_p0_and_p1(tiny_zoo):
    scale, _ = tiny_zoo
    transfer = replace(scale, **DISTILL_IMAGES["transfer"])
    labels = torch.arange(10).repeat_interleave(8)

    def record(images, accuracy, entropy):
        return {
            "teacher": "teacher-clean",
            "distill_images": "transfer",
            "images": images,
            "accuracy": accuracy,
        }, entropy

    def checks(distill, held_out, scale=transfer):
        records = [dict(r, entropy=e) for r, e in (record("distill", *distill), record("held-out", *held_out))]
        return {p.name.split()[0]: p for p in preconditions(scale, "transfer", records, test_labels=labels)}

    ok = checks((84.0, 0.2), (86.5, 0.3))
    assert ok["P0"].met and ok["P1"].met and ok["P2"].met is None and ok["P3"].met is None
    assert not checks((100.0, 0.2), (85.0, 0.3))["P1"].met  # memorised: 15 points above held-out
    assert not checks((85.0, 0.1), (85.0, 0.3))["P1"].met  # sharper than half the held-out entropy
    overlapping = replace(transfer, seen_eval_part="1/2")
    assert not checks((85.0, 0.3), (85.0, 0.3), overlapping)["P0"].met
