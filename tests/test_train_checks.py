"""``mmtard train``'s checks of issue 17's second round that the bad-input table cannot show: a pickle is trusted
only by ``--trust-checkpoint`` (given again on every resume), and a teacher whose image size is known only once
built is refused before anything is written.

The refusals themselves (one line, exit 2, nothing written) are cases of ``tests/test_bad_inputs.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from helpers import MMT_ARD, as_argv, make_npz_dir, small
from torch import nn

from mmtard.cli import main
from mmtard.errors import ConfigError
from mmtard.methods import base as method_base
from mmtard.models import load_clip
from mmtard.train import load_config
from mmtard.train import trainer as trainer_module
from mmtard.train.checks import check_built_image_sizes
from mmtard.train.rundir import RunDir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_npz_dir(tmp_path_factory.mktemp("checks-data") / "cifar10")


@pytest.fixture(scope="module")
def full_pickle(tmp_path_factory) -> Path:
    """A student checkpoint that ``torch.load(weights_only=True)`` refuses (it pickles an ``argparse.Namespace``
    beside the state dict) and a trusted load reads."""
    torch.manual_seed(0)
    state = load_clip("tiny-vit-s", "none").model.state_dict()
    path = tmp_path_factory.mktemp("full-pickle") / "student.pt"
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1e-4)}, path)
    return path


@pytest.fixture
def trust_seen(monkeypatch) -> dict[str, list[bool]]:
    """The ``trust_checkpoint`` every ``load_clip`` of the trainer (the student) and of the method (the teachers)
    was called with."""
    seen: dict[str, list[bool]] = {"student": [], "teachers": []}

    def spy(role: str, real):
        def load(*args, **kwargs):
            seen[role].append(kwargs.get("trust_checkpoint", False))
            return real(*args, **kwargs)

        return load

    monkeypatch.setattr(trainer_module, "load_clip", spy("student", trainer_module.load_clip))
    monkeypatch.setattr(method_base, "load_clip", spy("teachers", method_base.load_clip))
    return seen


def test_only_the_command_line_flag_trusts_a_pickle_and_a_resume_needs_it_again(
    data_dir, full_pickle, tmp_path, trust_seen, capsys
):
    out = tmp_path / "run"
    overrides = small(data_dir, out, "train.steps=2", "eval.final=false", f"student.pretrained={full_pickle}")

    assert main(as_argv(MMT_ARD, overrides)) == 2  # refused as a pickle, and nothing is written
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "student.pretrained" in err[0] and "--trust-checkpoint" in err[0], err
    assert not out.exists()

    assert main(as_argv(MMT_ARD, overrides, "--trust-checkpoint", "--stop-after", "1")) == 0
    assert trust_seen["student"] == [True] and trust_seen["teachers"] == [True, True]
    saved = RunDir(out).config.read_text()
    assert "trust_checkpoint" not in saved and str(full_pickle) in saved  # config.yaml never grants trust

    assert main(as_argv(MMT_ARD, overrides, "--resume", "latest")) == 2  # the saved config does not trust it
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trust-checkpoint" in err[0], err
    assert main(as_argv(MMT_ARD, overrides, "--resume", "latest", "--trust-checkpoint")) == 0
    assert trust_seen["student"][-1] is True and RunDir(out).is_finished()


@pytest.mark.parametrize("written", ["true", "True", "yes"])
def test_a_run_config_cannot_trust_a_checkpoint_but_false_is_accepted(written):
    """``true`` (YAML 1.1 reads ``yes`` as true) is refused, naming the field and the flag; ``false``, what
    ``config.yaml`` files written before this rule hold, changes nothing."""
    with pytest.raises(ConfigError, match="^teachers.robust.trust_checkpoint: .*--trust-checkpoint on the mmtard"):
        load_config(MMT_ARD, [f"teachers.robust.trust_checkpoint={written}"])
    cfg = load_config(MMT_ARD, ["student.trust_checkpoint=false", "teachers.clean.trust_checkpoint=false"])
    assert not cfg.student.trust_checkpoint and not cfg.teachers["clean"].trust_checkpoint


class _Tower(nn.Module):
    def __init__(self, image_size):
        super().__init__()
        self.image_size = image_size


class _Classifier(nn.Module):
    def __init__(self, image_size):
        super().__init__()
        self.visual = _Tower(image_size)


def test_a_teacher_whose_image_size_is_known_only_once_built_is_checked_then():
    """An ``hf-hub:`` teacher has no local config to read its size from; the built tower says it, and a size other
    than the student's is one error naming the teacher (before the run folder is created: ``build_run`` runs
    before any write)."""
    cfg = load_config(MMT_ARD)
    teachers = {"clean": _Classifier((32, 32)), "robust": _Classifier((224, 224)), "original": _Classifier(224)}
    with pytest.raises(ConfigError, match="^teachers.robust.arch: .* takes 224 px images, .* 32 px"):
        check_built_image_sizes(cfg, 32, teachers)
    check_built_image_sizes(cfg, 32, {"clean": _Classifier(32), "original": _Classifier(None)})
