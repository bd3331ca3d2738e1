"""bf16 evaluation: autocast on the model's device, and robust numbers checked against fp32 on the first batch.

A tiny colour classifier stands in for CLIP: its logits come out of one ``F.linear`` (an op CPU autocast runs
in bf16). With a zero bias its class margins (about 1) are far above bf16's rounding there, so both precisions
agree; with a bias of 512 the logits round to bf16's steps of 4, argmax ties everywhere (class 0 wins), and
bf16's accuracies are wrong: the check must refuse them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from mmtard.attacks import create_attack
from mmtard.errors import ConfigError
from mmtard.eval.run import EvalRequest, evaluate_bundle
from mmtard.eval.zeroshot import BF16_TOLERANCE_POINTS, PrecisionError, evaluate_classifier

CLASSES = 4


class ColourClassifier(nn.Module):
    """Logits ``W @ mean colour + bias`` with one class per primary-ish colour."""

    def __init__(self, bias: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.tensor([[8.0, -4, -4], [-4, 8, -4], [-4, -4, 8], [3, 3, 3]]))
        self.bias = nn.Parameter(torch.full((CLASSES,), bias))
        self.dtypes: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.mean(dim=(2, 3)), self.weight, self.bias)
        self.dtypes.append(logits.dtype)
        return logits


def colour_images(per_class: int = 6, size: int = 8) -> TensorDataset:
    """Images of the four classes in turn (so a first batch of 8 holds each class twice)."""
    generator = torch.Generator().manual_seed(0)
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9], [0.6, 0.6, 0.6]])
    y = torch.arange(CLASSES).repeat(per_class)
    noise = 0.05 * torch.randn(len(y), 3, size, size, generator=generator)
    return TensorDataset((colours[y][:, :, None, None] + noise).clamp(0, 1), y)


def attacks():
    return [create_attack("pgd", eps=eps, steps=2) for eps in (4 / 255, 16 / 255)]


def test_bf16_agreeing_with_fp32_keeps_its_numbers_and_the_comparison():
    data = colour_images()
    fp32 = evaluate_classifier(ColourClassifier(), data, attacks(), batch_size=8, progress=False)
    model = ColourClassifier()
    bf16 = evaluate_classifier(model, data, attacks(), batch_size=8, progress=False, precision="bf16")
    assert torch.bfloat16 in model.dtypes and torch.float32 in model.dtypes  # the check ran both precisions
    assert bf16.precision == "bf16" and fp32.precision == "fp32"
    assert [r["acc"] for r in bf16.robust] == [r["acc"] for r in fp32.robust]
    assert bf16.clean_acc == fp32.clean_acc == 100.0
    check = bf16.to_dict()["precision_check"]
    assert check["images"] == 8 and check["tolerance_points"] == BF16_TOLERANCE_POINTS
    assert check["fp32"] == check["bf16"] and check["max_difference_points"] == 0.0
    assert "precision_check" not in fp32.to_dict() and fp32.to_dict()["precision"] == "fp32"


def test_bf16_that_changes_robust_accuracy_is_refused():
    data = colour_images()
    fp32 = evaluate_classifier(ColourClassifier(bias=512.0), data, attacks(), batch_size=8, progress=False)
    assert fp32.clean_acc == 100.0 and fp32.robust[0]["acc"] > 50  # fp32 resolves the margins above 512
    with pytest.raises(PrecisionError, match=r"precision: bf16 changes robust accuracy by more than 1 point") as err:
        evaluate_classifier(
            ColourClassifier(bias=512.0), data, attacks(), batch_size=8, progress=False, precision="bf16"
        )
    assert isinstance(err.value, ConfigError)
    assert "on the first 8 images of dataset" in str(err.value) and "evaluate with precision fp32" in str(err.value)
    assert "pgd 4/255: " in str(err.value) and "% in bf16, 100.0% in fp32" in str(err.value)


def test_bf16_without_attacks_has_no_comparison_and_runs_in_bf16():
    model = ColourClassifier()
    result = evaluate_classifier(model, colour_images(), [], batch_size=8, progress=False, precision="bf16")
    assert set(model.dtypes) == {torch.bfloat16}
    assert result.precision_check is None and result.to_dict()["precision"] == "bf16"


def test_an_unknown_precision_is_refused(tiny_bundle, npz_dir):
    request = EvalRequest(datasets=["npz"], data_dirs=[str(npz_dir)], attacks=["none"], precision="fp16")
    with pytest.raises(ConfigError, match="precision: expected fp32 or bf16, got 'fp16'"):
        evaluate_bundle(tiny_bundle, request)


def test_evaluate_bundle_records_the_precision(tiny_bundle, npz_dir):
    request = EvalRequest(
        datasets=["npz"], data_dirs=[str(npz_dir)], samples=8, attacks=["none"], precision="bf16", progress=False
    )
    (record,) = evaluate_bundle(tiny_bundle, request)
    assert record["precision"] == "bf16" and record["samples"] == 8


def test_the_first_batch_in_bf16_is_computed_once(monkeypatch):
    """The check's bf16 counts of batch 0 are the evaluation's: 3 batches cost 2 (check) + 2 (batches 1, 2)."""
    from mmtard.eval import zeroshot

    calls = []
    real = zeroshot._evaluate_batch

    def counted(classifier, attacks, x, y, ids):
        calls.append(len(y))
        return real(classifier, attacks, x, y, ids)

    monkeypatch.setattr(zeroshot, "_evaluate_batch", counted)
    result = evaluate_classifier(ColourClassifier(), colour_images(), attacks(), batch_size=8, precision="bf16")
    assert calls == [8, 8, 8, 8] and result.samples == 24
