"""Disjoint parts of a split (issue 25's transfer set): the rule against a hand computation, its config and CLI
fields, and the protocol stages that distil on one part and evaluate on another."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import make_npz_dir

from mmtard.cli import main
from mmtard.data import create_dataset, parse_part, part_positions
from mmtard.errors import ConfigError
from mmtard.eval.run import EvalRequest, check_eval_request
from mmtard.experiments import ZOO_SCALE, protocol_stages
from mmtard.experiments.cells import CELLS, RECIPES
from mmtard.experiments.protocol import DISTILL_IMAGES, stage_config
from mmtard.methods import method_config
from mmtard.train.config import DataConfig, RunConfig


def test_parts_by_hand():
    # class 0 at positions 0, 2, 3, 6 (ranks 0..3), class 1 at 1, 4, 5 (ranks 0..2): part 1 of 2 keeps rank 0 and 2
    labels = torch.tensor([0, 1, 0, 0, 1, 1, 0])
    assert part_positions(labels, 1, 2).tolist() == [0, 1, 3, 5]
    assert part_positions(labels, 2, 2).tolist() == [2, 4, 6]
    assert part_positions(labels, 3, 3).tolist() == [3, 5]


def test_parts_are_disjoint_cover_the_split_and_are_class_balanced():
    labels = torch.randint(0, 5, (101,), generator=torch.Generator().manual_seed(0))
    parts = [set(part_positions(labels, k, 3).tolist()) for k in (1, 2, 3)]
    assert sum(len(p) for p in parts) == 101 and set().union(*parts) == set(range(101))
    for label in range(5):
        counts = [sum(int(labels[i]) == label for i in part) for part in parts]
        assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize("bad", ["0/2", "3/2", "1/1", "a/b", "2", "1/-2", ""])
def test_a_part_is_k_of_n(bad):
    with pytest.raises(ConfigError, match=r"^part: expected k/n"):
        parse_part(bad)
    assert parse_part("2/5") == (2, 5)


def test_create_dataset_keeps_the_part_before_classes_and_samples(tmp_path):
    data = make_npz_dir(tmp_path / "data", test_per_class=6)  # labels 0..9, 6 images each, in class order
    first = create_dataset("cifar10", data, split="test", image_size=32, classes="seen", part="1/2")
    second = create_dataset("cifar10", data, split="test", image_size=32, classes="seen", part="2/2")
    assert len(first) == len(second) == 15  # 5 seen classes x 3
    assert not set(first.source_indices) & set(second.source_indices)
    assert first.source_indices[:3] == [0, 2, 4]  # class 0 sits at positions 0..5
    sampled = create_dataset("cifar10", data, split="test", image_size=32, classes="seen", part="2/2", samples=5)
    assert set(sampled.source_indices) <= set(second.source_indices)
    with pytest.raises(ConfigError, match=r"^part: give a part or a subset"):
        create_dataset("cifar10", data, split="test", image_size=32, part="1/2", indices=[0, 1])


def test_the_run_config_and_eval_request_name_their_part_field(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.eval_part: expected k/n"):
        RunConfig(method=method_config("tecoa"), data=DataConfig(eval_part="3/2")).validate()
    with pytest.raises(ConfigError, match=r"^part: expected k/n"):
        check_eval_request(EvalRequest(datasets=["digits"], data_dirs=[None], part="half"))
    with pytest.raises(ConfigError, match=r"^part: give a part or a subset"):
        check_eval_request(EvalRequest(datasets=["digits"], data_dirs=[None], part="1/2", subset={"digits": {}}))


def test_eval_cli_part_is_recorded_and_a_bad_one_is_one_line(tmp_path, capsys):
    data = make_npz_dir(tmp_path / "data", test_per_class=4)
    common = ["eval", "--model", "tiny-vit-s", "--pretrained", "none", "--dataset", "cifar10", "--data-dir", str(data)]
    common += ["--attack", "none", "--no-progress"]
    assert main([*common, "--part", "2/2", "--out", str(tmp_path / "a")]) == 0
    import json

    record = json.loads((tmp_path / "a" / "results.json").read_text())
    assert record["part"] == "2/2" and record["samples"] == 20
    assert record["subset"]["indices"] == [i for i in range(40) if i % 4 in (1, 3)]
    assert main([*common, "--part", "2", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--part: expected k/n" in err[0]


def test_transfer_protocol_distils_on_one_half_and_evaluates_on_the_other(tmp_path):
    scale = replace(ZOO_SCALE, **DISTILL_IMAGES["transfer"])
    cell = CELLS["mmt-ard_diwref_selfanchor"]
    variants = {"anchor": cell.variant(RECIPES["smoke"])}
    stages = dict((stage.name, stage) for _, stage in protocol_stages(scale, (), (0,), variants))
    student = stages["student-anchor-seed0"]
    assert student.teachers == {"clean": "foundation-student", "robust": "teacher-robust"}
    models = {name: tmp_path / f"{name}.safetensors" for name in ("foundation-student", "teacher-robust")}
    cfg = stage_config(scale, replace(student, pretrained="none"), tmp_path, models)
    assert (cfg.data.split, cfg.data.part, cfg.data.eval_split, cfg.data.eval_part) == ("test", "1/2", "test", "2/2")
    # the student's foundation is the student's architecture, the robust teacher the teachers'
    assert cfg.teachers["clean"].arch == scale.student_arch and cfg.teachers["robust"].arch == scale.teacher_arch
    assert scale.eval_part("seen") == "2/2" and scale.eval_part("unseen") is None


def test_a_third_teacher_of_kind_clean_with_the_robust_teachers_weights():
    variants = {"rclean": CELLS["mmt-ard_diwref_rclean"].variant(RECIPES["smoke"])}
    (student,) = [s for _, s in protocol_stages(ZOO_SCALE, (), (0,), variants) if s.name.startswith("student-")]
    assert student.teachers == {"clean": "teacher-clean", "robust": "teacher-robust", "robust_clean": "teacher-robust"}
    assert student.teacher_kinds == {"clean": "clean", "robust": "robust", "robust_clean": "clean"}
    assert student.split == "train" and student.part is None  # the default scale distils on the training split


def test_a_lora_cell_trains_its_student_with_lora_adapters(tmp_path):
    """``Cell.finetune`` reaches the student's run config (``student.finetune``); the teachers are untouched."""
    variants = {"lora": CELLS["mmt-ard_diwref_lora"].variant(RECIPES["smoke"])}
    variants["full"] = CELLS["mmt-ard_diwref"].variant(RECIPES["smoke"])
    stages = {s.name: s for _, s in protocol_stages(ZOO_SCALE, (), (0,), variants) if s.name.startswith("student-")}
    assert stages["student-lora-seed0"].finetune == "lora" and stages["student-full-seed0"].finetune == "full"
    models = {name: tmp_path / f"{name}.safetensors" for name in ("teacher-clean", "teacher-robust")}
    for name, finetune in (("lora", "lora"), ("full", "full")):
        cfg = stage_config(ZOO_SCALE, replace(stages[f"student-{name}-seed0"], pretrained="none"), tmp_path, models)
        assert cfg.student.finetune == finetune and cfg.method.diw == "reference"


def test_a_cells_lr_scale_multiplies_its_recipes_learning_rate_and_reaches_the_run_config(tmp_path):
    """``Cell.lr_scale``: a LoRA cell at 10x the calibrated recipe's 2e-3 trains at 2e-2; everything else of the
    recipe (steps, PGD steps, weight decay) is the recipe's."""
    recipe = RECIPES["lr2e-3"]
    fast, plain = CELLS["ard_lora_lr10x"].variant(recipe), CELLS["ard_lora"].variant(recipe)
    assert fast["train"]["lr"] == pytest.approx(2e-2) and plain["train"]["lr"] == pytest.approx(2e-3)
    assert fast["train"] | {"lr": 0} == plain["train"] | {"lr": 0}
    assert recipe.train()["lr"] == pytest.approx(2e-3)  # the recipe itself is untouched
    (student,) = [s for _, s in protocol_stages(ZOO_SCALE, (), (0,), {"fast": fast}) if s.name.startswith("student-")]
    models = {name: tmp_path / f"{name}.safetensors" for name in ("teacher-clean", "teacher-robust")}
    cfg = stage_config(ZOO_SCALE, replace(student, pretrained="none"), tmp_path, models)
    assert cfg.train.lr == pytest.approx(2e-2) and cfg.student.finetune == "lora"
