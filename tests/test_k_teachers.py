"""Teachers by name and kind (issue 12 part 4): the two-teacher presets bitwise as before, against a saved
trajectory; K-teacher steps and balances by hand; refusals.

The fixture ``tests/data/two_teacher_reference.json`` was written by the code before teachers became named
(commit "tests: two-teacher trajectories saved from the current code"). Regenerate it only for an intended
change of the two-teacher numbers: ``python tests/test_k_teachers.py --write-fixture``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmtard.methods import create_method, method_config
from mmtard.models.zeroshot import ZeroShotClassifier

FIXTURE = Path(__file__).parent / "data" / "two_teacher_reference.json"
B, K = 8, 5
SCALE = 10.0
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
EPS = 8 / 255
TRAJECTORY_STEPS = 4
# name -> (preset, overrides): every balance and the switches that change which logits a term reads.
TRAJECTORIES = {
    "mmt-ard": ("mmt-ard", {}),
    "mmt-ard-gap-rho-robust-inner": ("mmt-ard", {"balance": "gap", "rho": 9.0, "inner": "kl-robust-teacher"}),
    "mmt-ard-ratio-confidence": ("mmt-ard", {"balance": "ratio", "diw": "confidence", "diw_temperature": 2.0}),
    "mmt-ard-mtard-rslad": ("mmt-ard", {"balance": "mtard", "robust_target": "clean"}),
    "mmt-ard-fixed-cached": ("mmt-ard", {"balance": "fixed", "lambda_robust": 0.7, "cache_clean_teacher": True}),
    "reference": ("reference", {}),
    "ard": ("ard", {}),
    "ard-rslad": ("ard", {"robust_target": "clean"}),
}


def fake_classifier(seed: int, dim: int) -> ZeroShotClassifier:
    """A zero-shot classifier whose tower is a seeded two-layer map of the flattened 3x4x4 image."""
    torch.manual_seed(seed)
    tower = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.GELU(), nn.Linear(16, dim))
    prototypes = F.normalize(torch.randn(K, dim), dim=-1)
    return ZeroShotClassifier(tower, MEAN, STD, prototypes, SCALE).train()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.rand(B, 3, 4, 4, generator=g), torch.randint(0, K, (B,), generator=g)
    index = torch.arange(B) + (step % 2) * (B // 2)  # half the rows seen again on the next step
    return x, y, index


def parameter_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def trajectory(preset: str, overrides: dict, method_factory=None) -> dict:
    """A few SGD steps of ``preset`` on the fakes: every step's losses and metrics, then the student's digest."""
    cfg = method_config(preset, eps=EPS, steps=2, **overrides)
    method = create_method(cfg) if method_factory is None else method_factory(cfg)
    student = fake_classifier(0, 6)
    teachers = {"clean": fake_classifier(1, 7), "robust": fake_classifier(2, 5)}
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    torch.manual_seed(7)
    steps = []
    for step in range(TRAJECTORY_STEPS):
        x, y, index = batch(step)
        out = method(student, teachers, x, y, index)
        total = out.total()
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        steps.append(
            {
                "total": total.item(),
                "losses": {name: term.item() for name, term in out.losses.items()},
                "metrics": dict(out.metrics),
                "x_adv_sum": out.x_adv.double().sum().item(),
            }
        )
    return {"steps": steps, "student": parameter_digest(student), "method_state": method.state_dict()}


def all_trajectories() -> dict:
    return {name: trajectory(preset, overrides) for name, (preset, overrides) in TRAJECTORIES.items()}


# ---------------------------------------------------------------- two teachers: bitwise as before


@pytest.mark.parametrize("name", sorted(TRAJECTORIES))
def test_two_teacher_presets_are_bitwise_as_saved(name):
    """Exact equality (floats round-trip through JSON): losses, lambdas, every metric, x', the student's weights."""
    saved = json.loads(FIXTURE.read_text())["trajectories"][name]
    preset, overrides = TRAJECTORIES[name]
    assert trajectory(preset, overrides) == saved


if __name__ == "__main__" and "--write-fixture" in sys.argv:
    FIXTURE.parent.mkdir(exist_ok=True)
    payload = {"torch": torch.__version__, "trajectories": all_trajectories()}
    FIXTURE.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")
