"""What a resume reads besides its checkpoint (issue 27, item 17): the weights files the run was trained with,
stamped in every trainer state, and the versions that wrote it."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import MMT_ARD, as_argv, make_npz_dir, small
from safetensors.torch import save_file

from mmtard.cli import main
from mmtard.models import load_clip
from mmtard.train import checkpoint as ckpt


def _listing(root):
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def trained(tmp_path):
    """A 1-step MMT-ARD run whose robust teacher is a weights file."""
    torch.manual_seed(3)
    teacher = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous().clone() for k, v in load_clip("tiny-vit-s", "none").model.state_dict().items()},
              str(teacher))  # fmt: skip
    data, out = make_npz_dir(tmp_path / "data", 2, 1), tmp_path / "run"
    overrides = small(data, out, "train.steps=1", f"teachers.robust.pretrained={teacher}")
    assert main(as_argv(MMT_ARD, overrides)) == 0
    return teacher, out, overrides


def test_a_teacher_file_changed_since_the_checkpoint_is_one_error_and_nothing_is_written(trained, capsys):
    teacher, out, overrides = trained
    stamps = torch.load(ckpt.resolve_resume(out, "latest") / ckpt.STATE_FILE, weights_only=True)["weight_files"]
    assert stamps["teachers.robust.pretrained"]["path"] == str(teacher)
    weights = teacher.read_bytes()
    os.utime(teacher)  # touched, same bytes: the SHA-256 decides, and it is the same
    ckpt.check_resume_files(ckpt.resolve_resume(out, "latest"), _config(overrides))
    torch.manual_seed(4)
    save_file({k: v.contiguous().clone() for k, v in load_clip("tiny-vit-s", "none").model.state_dict().items()},
              str(teacher))  # fmt: skip
    assert teacher.read_bytes() != weights
    before = _listing(out)
    capsys.readouterr()
    assert main(as_argv(MMT_ARD, [*overrides[:-1], "train.steps=2", overrides[-1]], "--resume", "latest")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmtard train: error: teachers.robust.pretrained: ")
    assert "changed since checkpoint" in err[0] and _listing(out) == before


def test_a_checkpoint_of_another_mmtard_or_torch_resumes_with_a_warning(trained, monkeypatch, caplog):
    _, out, overrides = trained
    monkeypatch.setattr(ckpt, "versions", lambda: {"mmtard": "9.9", "torch": "9.9"})
    with caplog.at_level("WARNING"):
        ckpt.check_resume_files(ckpt.resolve_resume(out, "latest"), _config(overrides))
    assert "was written by mmtard" in caplog.text and "not bitwise" in caplog.text


def _config(overrides):
    from mmtard.train import load_config

    return load_config(MMT_ARD, overrides)
