"""Run configs: ``vision_weights:`` on the student and teachers, and held-out evaluation in the training norm."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from helpers import make_npz_dir

from mmtard.errors import ConfigError
from mmtard.methods import base as method_base
from mmtard.models import check_architecture
from mmtard.train import load_config
from mmtard.train.config import build_eval_attacks
from mmtard.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
MMT_ARD = REPO / "configs" / "cpu" / "mmt-ard.yaml"


@pytest.fixture(scope="module")
def tower_file(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny-vit-s image tower in TeCoA's format."""
    check_architecture("tiny-vit-s")
    torch.manual_seed(11)
    tower = {k: v.clone() for k, v in open_clip.create_model("tiny-vit-s").visual.state_dict().items()}
    path = tmp_path_factory.mktemp("tower") / "tecoa4.pt"
    torch.save({"vision_encoder_state_dict": tower}, path)
    return path, tower


def test_a_robust_teacher_from_a_published_tower_trains(tmp_path, tower_file, monkeypatch):
    path, tower = tower_file
    data = make_npz_dir(tmp_path / "data", train_per_class=4, test_per_class=1)
    loaded = []
    real = method_base.load_clip  # the method builds its teachers
    monkeypatch.setattr(method_base, "load_clip", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    cfg = load_config(
        MMT_ARD,
        [
            f"data.dir={data}",
            f"output_dir={tmp_path / 'run'}",
            "data.batch_size=8",
            "method.steps=1",
            "method.cache_clean_teacher=false",
            "train.steps=1",
            "eval.final=false",
            "teachers.robust.arch=tiny-vit-s",  # the CPU configs' teachers are tiny-vit-m
            f"teachers.robust.vision_weights={path}",
        ],
    )
    train(cfg, progress=False)
    (robust,) = [bundle for bundle in loaded if bundle.vision_weights is not None]
    assert robust.vision_weights == str(path)
    for key, value in robust.model.visual.state_dict().items():
        assert torch.equal(value, tower[key]), key


def test_a_tower_of_another_width_names_the_teachers_field(tmp_path, tower_file):
    data = make_npz_dir(tmp_path / "data", train_per_class=4, test_per_class=1)
    sets = [f"data.dir={data}", f"output_dir={tmp_path / 'run'}", "data.batch_size=8", "eval.final=false"]
    cfg = load_config(
        MMT_ARD, [*sets, "teachers.robust.arch=tiny-vit-m", f"teachers.robust.vision_weights={tower_file[0]}"]
    )
    with pytest.raises(
        ConfigError, match=r"^teachers\.robust\.vision_weights: .* is not an image tower of tiny-vit-m"
    ) as info:
        train(cfg, progress=False)
    assert "class_embedding is (128,) in the file, tiny-vit-m expects (192,)" in str(info.value)
    assert not (tmp_path / "run").exists()


def test_vision_weights_alpha_is_validated_with_its_field():
    with pytest.raises(ConfigError, match=r"^student\.vision_weights_alpha: expected a number in \[0, 1\]"):
        load_config(MMT_ARD, ["student.vision_weights_alpha=2"])


def test_held_out_evaluation_uses_the_training_norm_unless_set():
    l2 = load_config(MMT_ARD, ["method.norm=l2", "method.eps=0.5", "eval.eps=[0.5]"])
    assert l2.eval.norm is None and {a.norm for a in build_eval_attacks(l2)} == {"l2"}
    linf = load_config(MMT_ARD)
    assert {a.norm for a in build_eval_attacks(linf)} == {"linf"}
    forced = load_config(MMT_ARD, ["method.norm=l2", "method.eps=0.5", "eval.eps=[0.5]", "eval.norm=l2"])
    assert {a.norm for a in build_eval_attacks(forced)} == {"l2"}
    with pytest.raises(ConfigError, match="^eval.norm: "):
        load_config(MMT_ARD, ["eval.norm=l1"])
