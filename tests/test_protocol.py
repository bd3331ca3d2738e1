"""The CPU-scale protocol behind ``mmtard demo`` and the benchmark, end to end at a toy scale, and its report."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from mmtard.errors import ConfigError
from mmtard.experiments import DEMO_SCALE, given_models, protocol_stages, run_protocol, write_protocol_report
from mmtard.experiments.protocol import GIVEN_STAGES, stage_config
from mmtard.models import load_clip
from mmtard.train import RunDir, load_config

TOY = replace(
    DEMO_SCALE,
    batch_size=16,
    foundation_steps=2,
    teacher_steps=2,
    student_steps=2,
    train_attack_steps=1,
    eval_samples=10,
    eval_steps=1,
    eval_eps=(4 / 255,),
    train_samples=64,
)


def test_stages_reuse_foundations_and_teachers():
    stages = protocol_stages(TOY, ("tecoa", "ard", "mmt-ard"), seeds=(0, 1))
    names = [stage.name for _, stage in stages]
    assert names[:4] == list(GIVEN_STAGES)
    assert names.count("student-mmt-ard-seed1") == 1 and len(names) == 10
    mmt = next(stage for _, stage in stages if stage.name == "student-mmt-ard-seed0")
    assert mmt.teachers == {"clean": "teacher-clean", "robust": "teacher-robust"}
    assert mmt.pretrained == "@foundation-student"
    curves = {stage.name: stage.eval_every for _, stage in stages}
    assert curves["student-tecoa-seed0"] == 0 and curves["student-ard-seed0"] == TOY.eval_every


def test_a_variants_train_recipe_replaces_the_scales_for_that_student(tmp_path):
    """A variant's ``train`` sets its steps, learning rate, weight decay and PGD steps inside training."""
    recipe = {"steps": 7, "lr": 3e-3, "attack_steps": 4, "weight_decay": 0.2}
    variants = {"fast": {"method": "tecoa", "train": recipe}, "plain": {"method": "tecoa"}}
    stages = dict((stage.name, stage) for _, stage in protocol_stages(TOY, (), (0,), variants))
    fast, plain = stages["student-fast-seed0"], stages["student-plain-seed0"]
    assert (fast.steps, fast.lr, fast.weight_decay, fast.attack_steps) == (7, 3e-3, 0.2, 4)
    assert (plain.steps, plain.lr, plain.attack_steps) == (TOY.student_steps, TOY.finetune_lr, None)
    models = {"foundation-student": tmp_path / "s.safetensors"}
    fast_cfg = stage_config(TOY, replace(fast, pretrained="none"), tmp_path, models)
    plain_cfg = stage_config(TOY, replace(plain, pretrained="none"), tmp_path, models)
    assert (fast_cfg.train.steps, fast_cfg.train.lr, fast_cfg.train.weight_decay) == (7, 3e-3, 0.2)
    assert fast_cfg.method.steps == 4 and plain_cfg.method.steps == TOY.train_attack_steps


def test_demo_protocol_runs_writes_report_and_reuses_stages(tmp_path):
    rows = run_protocol(tmp_path, TOY, progress=False)
    assert [row["stage"] for row in rows][-3:] == ["student-tecoa-seed0", "student-ard-seed0", "student-mmt-ard-seed0"]
    for row in rows:
        for split in ("seen", "unseen"):
            assert len(row[split]["classnames"]) == 5
            assert row[split]["robust"][0]["acc"] <= row[split]["clean_acc"]
    report = write_protocol_report(tmp_path, rows, "mmtard demo (test)", "toy scale")
    text = report.read_text()
    for name in ("student-mmt-ard", "student-ard", "student-tecoa", "teacher-robust", "foundation-student"):
        assert f"| {name} |" in text
    for plot in ("robust_vs_eps.png", "training_curves.png", "pareto.png", "lambda_r.png"):
        assert (tmp_path / plot).stat().st_size > 0 and f"({plot})" in text
    assert "does not show the ordering of the methods" in text and "`BENCHMARKS.md` section 2" in text

    model = RunDir(tmp_path / "teacher-robust").model
    before = model.stat().st_mtime_ns
    again = run_protocol(tmp_path, TOY, methods=("tecoa",), progress=False)
    assert model.stat().st_mtime_ns == before  # reused, not retrained
    assert again[-1]["seen"] == rows[-3]["seen"]


@pytest.fixture(scope="module")
def toy_zoo(tmp_path_factory):
    """A zoo folder in the rebuilt format: <stage>/model.safetensors, random tiny-vit-s weights."""
    zoo = tmp_path_factory.mktemp("zoo")
    for seed, stage in enumerate(GIVEN_STAGES):
        torch.manual_seed(seed)
        state = load_clip("tiny-vit-s", "none").model.state_dict()
        (zoo / stage).mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, str(RunDir(zoo / stage).model))
    return zoo


def test_protocol_reuses_given_models_without_training_them(tmp_path, toy_zoo):
    scale = replace(TOY, teacher_arch="tiny-vit-s")
    given = given_models(toy_zoo)
    stamps = {stage: path.stat().st_mtime_ns for stage, path in given.items()}
    rows = run_protocol(tmp_path, scale, methods=("ard",), zoo=toy_zoo, progress=False)
    assert [row["stage"] for row in rows] == [*GIVEN_STAGES, "student-ard-seed0"]
    assert {stage: path.stat().st_mtime_ns for stage, path in given.items()} == stamps  # not retrained
    for stage in GIVEN_STAGES:
        assert not RunDir(tmp_path / stage).model.exists() and not RunDir(tmp_path / stage).config.exists()
    student = load_config(RunDir(tmp_path / "student-ard-seed0").config)
    assert student.student.pretrained == str(given["foundation-student"])
    assert student.teachers["robust"].pretrained == str(given["teacher-robust"])
    assert all(row["train_seconds"] is None for row in rows[:4]) and rows[-1]["train_seconds"] > 0


@pytest.mark.parametrize("remove", [None, "teacher-robust"])
def test_a_missing_or_incomplete_zoo_is_one_error_naming_the_rebuild_script(tmp_path, toy_zoo, remove):
    zoo = tmp_path / "zoo"
    if remove:
        zoo.mkdir()
        for stage in GIVEN_STAGES:
            if stage != remove:
                (zoo / stage).mkdir()
                os.symlink(RunDir(toy_zoo / stage).model, RunDir(zoo / stage).model)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"--zoo: .*\.\./shared/zoo/rebuild\.py") as info:
        run_protocol(out, TOY, methods=("ard",), zoo=zoo, progress=False)
    assert (remove or "does not exist") in str(info.value)
    assert not out.exists()  # refused before anything was written


def test_more_teachers_trains_the_extra_teacher_once_and_distils_from_all_three(tmp_path, toy_zoo):
    """A variant's ``more_teachers`` adds teacher-<preset> (trained from the teacher foundation) of that kind."""
    scale = replace(TOY, teacher_arch="tiny-vit-s")
    variants = {
        "three": {"method": "mmt-ard-adv", "more_teachers": {"fare": "robust"}},
        "three-b": {"method": "mmt-ard", "more_teachers": {"fare": "robust"}},
    }
    stages = protocol_stages(scale, (), (0,), variants)
    assert [stage.name for _, stage in stages].count("teacher-fare") == 1
    student = next(stage for _, stage in stages if stage.name == "student-three-seed0")
    assert student.teachers == {"clean": "teacher-clean", "robust": "teacher-robust", "fare": "teacher-fare"}
    assert student.teacher_kinds == {"clean": "clean", "robust": "robust", "fare": "robust"}
    assert "more_teachers" not in student.method_overrides

    rows = run_protocol(tmp_path, scale, (), (0,), {"three": variants["three"]}, zoo=toy_zoo, progress=False)
    assert [row["stage"] for row in rows] == [*GIVEN_STAGES, "teacher-fare", "student-three-seed0"]
    fare = load_config(RunDir(tmp_path / "teacher-fare").config)
    assert fare.method.name == "fare" and fare.student.pretrained == str(given_models(toy_zoo)["foundation-teacher"])
    config = load_config(RunDir(tmp_path / "student-three-seed0").config)
    assert config.teachers["fare"].kind == "robust"
    assert config.teachers["fare"].pretrained == str(RunDir(tmp_path / "teacher-fare").model)
    logged = json.loads(RunDir(tmp_path / "student-three-seed0").metrics.read_text().splitlines()[-1])
    assert {"lambda_R", "lambda_C", "lambda_fare", "L_fare"} <= set(logged)
    assert abs(logged["lambda_R"] + logged["lambda_C"] + logged["lambda_fare"] - 1) < 1e-6
