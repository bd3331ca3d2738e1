"""Behaviour lock (issue 26): a fixed-seed CPU run of every registered preset gives the loss trajectory saved before
the method/trainer refactor.

Two levels, both parametrised over :func:`mmtard.methods.list_methods` (a new preset needs its trajectory saved):

- the method alone, in float64 on seeded fake classifiers (the teachers ``clean`` and ``robust``, and ``original`` a
  frozen copy of the starting student), 4 SGD steps: every step's loss terms and metrics, ``x'`` and the student's
  weights, compared as ``tests/test_k_teachers.py`` does (3e-5 relative, a weight tensor within 3e-5 of its largest
  entry): float64 keeps the cross-CPU differences near 1e-6, a change of a formula moves them by 1e-3 or more;
- the trainer, ``train(config)`` of ``configs/cpu/<preset>.yaml`` with tiny random-weight CLIPs, 3 steps of batch 8
  in float32: every logged loss and metric within 2e-3 relative (1e-5 absolute near 0). float32 kernels differ
  across CPUs in the last bits and PGD's sign amplifies that to about 1e-4 on these short runs; a change of the
  learning rate by 5% moves the losses by more than 2e-3 (:func:`test_the_trainer_comparison_catches_a_changed_run`).

The fixture ``tests/data/preset_trajectories.json`` was written by the code before issue 26's refactor. Regenerate it
only for an intended change of the numbers: ``python tests/test_preset_trajectories.py --write-fixture``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_close, fake_classifier, make_npz_dir, recorded_steps

from mmtard.methods import ORIGINAL, create_method, list_methods, method_config
from mmtard.models.zeroshot import ZeroShotClassifier

FIXTURE = Path(__file__).parent / "data" / "preset_trajectories.json"
EPS = 8 / 255
METHOD_STEPS = 4
TRAINER_STEPS = 3
TRAINER_REL = 2e-3
# metrics.jsonl fields that are not numbers of the run (wall times)
UNTIMED = ("samples_per_s", "first_step_s")


# ------------------------------------------------------------------------------------------ the comparison


# ------------------------------------------------------------------------------------------ the method alone


def method_with_teachers(preset: str, student: ZeroShotClassifier, **overrides):
    """``preset``'s method (PGD-2 at 8/255, ``overrides`` of its config) and a step function
    ``(x, y, index) -> MethodOutput`` that reads the fake teachers ``clean`` (seed 1) and ``robust`` (seed 2) and
    ``original``, a frozen copy of ``student``."""
    method = create_method(method_config(preset, eps=EPS, steps=2, **overrides))
    available = {"clean": fake_classifier(1, 7), "robust": fake_classifier(2, 5), ORIGINAL: copy.deepcopy(student)}
    teachers = {name: available[name] for name in method.teacher_roles}
    for teacher in teachers.values():
        teacher.eval().requires_grad_(False)
    method.use_teachers(teachers)
    return method, lambda x, y, index: method(student, x, y, index)


def method_trajectory(preset: str, **overrides) -> dict:
    """``METHOD_STEPS`` SGD steps of ``preset`` on the fakes in float64: each step's losses and metrics, the sum of
    ``x'``, then the student's weights and the method's state."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        student = fake_classifier(0, 6)
        method, step = method_with_teachers(preset, student, **overrides)
        return recorded_steps(step, student, method, METHOD_STEPS)
    finally:
        torch.set_default_dtype(default_dtype)


@pytest.mark.parametrize("preset", list_methods())
def test_every_preset_step_matches_the_saved_float64_trajectory(preset):
    saved = json.loads(FIXTURE.read_text())["method"]
    assert preset in saved, f"no saved trajectory for '{preset}': run this file with --write-fixture"
    assert_close(method_trajectory(preset), saved[preset], preset)


def test_the_method_comparison_catches_a_changed_step():
    """A changed number of a formula (the balance's beta 5 -> 5.01) is beyond the tolerance: the comparison can fail."""
    saved = json.loads(FIXTURE.read_text())["method"]["mmt-ard"]
    changed = method_trajectory("mmt-ard", beta=5.01)
    with pytest.raises(AssertionError, match="saved"):
        assert_close(changed, saved)


# ------------------------------------------------------------------------------------------ the trainer


def preset_config(preset: str, data_dir: Path, out: Path, *extra: str):
    """``configs/cpu/<preset>.yaml`` at test scale: tiny-vit-s teachers, 80 training images, batch 8, PGD-1, 3 steps,
    no held-out evaluation."""
    from mmtard.train import load_config

    path = REPO / "configs" / "cpu" / f"{preset}.yaml"
    teachers = [f"teachers.{name}.arch=tiny-vit-s" for name in load_config(path).teachers]
    overrides = [
        f"data.dir={data_dir}",
        f"output_dir={out}",
        "data.batch_size=8",
        "data.samples=80",
        "data.eval_samples=10",
        "method.steps=1",
        f"train.steps={TRAINER_STEPS}",
        "train.checkpoint_every=0",
        "eval.final=false",
        "eval.eps=[]",
        *teachers,
        *extra,
    ]
    return load_config(path, overrides)


def trainer_trajectory(preset: str, data_dir: Path, out: Path, *extra: str) -> list[dict]:
    """The logged records of a fixed-seed run of ``preset``, without wall times."""
    from mmtard.train import RunDir, train

    train(preset_config(preset, data_dir, out, *extra), progress=False)
    return [{k: v for k, v in record.items() if k not in UNTIMED} for record in RunDir(out).read_metrics()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_npz_dir(tmp_path_factory.mktemp("trajectory-data") / "cifar10")


@pytest.mark.parametrize("preset", list_methods())
def test_every_preset_trains_the_saved_trajectory(preset, data_dir, tmp_path):
    saved = json.loads(FIXTURE.read_text())["trainer"]
    assert preset in saved, f"no saved trajectory for '{preset}': run this file with --write-fixture"
    got = trainer_trajectory(preset, data_dir, tmp_path / "run")
    assert_close(got, saved[preset], preset, rel=TRAINER_REL, abs_tol=1e-5)


def test_the_trainer_comparison_catches_a_changed_run(data_dir, tmp_path):
    """A learning rate 5% higher moves the logged losses beyond the tolerance."""
    saved = json.loads(FIXTURE.read_text())["trainer"]["tecoa"]
    changed = trainer_trajectory("tecoa", data_dir, tmp_path / "run", "train.lr=1.05e-4")
    with pytest.raises(AssertionError, match="saved"):
        assert_close(changed, saved, rel=TRAINER_REL, abs_tol=1e-5)


if __name__ == "__main__" and "--write-fixture" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = make_npz_dir(Path(tmp) / "cifar10")
        payload = {
            "torch": torch.__version__,
            "method": {preset: method_trajectory(preset) for preset in list_methods()},
            "trainer": {preset: trainer_trajectory(preset, data, Path(tmp) / preset) for preset in list_methods()},
        }
    FIXTURE.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")
