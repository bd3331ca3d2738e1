"""K named teachers in run configs (issue 12 part 4, the trainer's side): ``teachers.<name>.kind``, the teachers
the method distils from, their metrics, and two-teacher runs unchanged by naming or ordering.

The method side (the K-term balances, the hand computations, the saved two-teacher trajectory) is
``tests/test_k_teachers.py``. Here the teachers are tiny-vit-s CLIPs with seeded random weights saved as
safetensors files, so the run loads them as it would trained teachers.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_npz_dir
from safetensors.torch import load_file, save_file

from mmtard.cli import main
from mmtard.errors import ConfigError
from mmtard.methods import base as method_base
from mmtard.train import trainer as trainer_module
from mmtard.train.config import TeacherConfig
from mmtard.train.config_io import load_config, save_config
from mmtard.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
MMT_ARD = REPO / "configs" / "cpu" / "mmt-ard.yaml"
TEACHERS = {"clip": "clean", "tecoa": "robust", "fare": "robust"}  # 1 clean + 2 robust, in this order


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_npz_dir(tmp_path_factory.mktemp("k-teachers") / "data", train_per_class=8, test_per_class=2)


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory) -> dict[str, Path]:
    """One tiny-vit-s weights file per teacher name (seeded random weights, a different seed each)."""
    import open_clip

    from mmtard.models import check_architecture

    check_architecture("tiny-vit-s")  # registers the tiny architectures with open_clip
    folder = tmp_path_factory.mktemp("teacher-weights")
    files = {}
    for seed, name in enumerate(["clip", "tecoa", "fare", "clean", "robust"], start=1):
        torch.manual_seed(seed)
        state = open_clip.create_model("tiny-vit-s").state_dict()
        files[name] = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(files[name]))
    return files


def teacher_sets(files: dict[str, Path], kinds: dict[str, str | None]) -> list[str]:
    """``--set`` items for teachers ``name -> kind`` (None: no kind given), loading ``files[name]``."""
    items = []
    for name, kind in kinds.items():
        items += [f"teachers.{name}.arch=tiny-vit-s", f"teachers.{name}.pretrained={files[name]}"]
        if kind is not None:
            items.append(f"teachers.{name}.kind={kind}")
    return items


def run_sets(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """2 steps of batch 8 on 40 seen-class images, PGD-1, no held-out evaluation, no logit cache."""
    return [
        f"data.dir={data_dir}",
        f"output_dir={out}",
        "data.batch_size=8",
        "data.eval_samples=4",
        "method.steps=1",
        "method.cache_clean_teacher=false",
        "train.steps=2",
        "eval.final=false",
        *extra,
    ]


def three_teacher_yaml(tmp_path: Path, files: dict[str, Path], method: str = "mmt-ard", extra: str = "") -> Path:
    """A run config with no ``clean``/``robust`` teachers: ``clip`` (clean), ``tecoa`` and ``fare`` (robust)."""
    teachers = "\n".join(
        f"  {name}: {{arch: tiny-vit-s, pretrained: {files[name]}, kind: {kind}}}" for name, kind in TEACHERS.items()
    )
    path = tmp_path / "three.yaml"
    path.write_text(f"defaults: {REPO / 'configs' / 'cpu' / '_base.yaml'}\nteachers:\n{teachers}\n")
    path.write_text(path.read_text() + f"method: {{name: {method}, eps: 4/255, steps: 1{extra}}}\n")
    return path


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def same_weights(a: Path, b: Path) -> bool:
    sa, sb = load_file(str(a)), load_file(str(b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------------- config


def test_three_named_teachers_load_with_their_kinds_in_order(tmp_path, teacher_files):
    cfg = load_config(three_teacher_yaml(tmp_path, teacher_files))
    assert all(isinstance(spec, TeacherConfig) for spec in cfg.teachers.values())
    plan = cfg.teacher_plan()
    assert list(plan.kinds.items()) == list(TEACHERS.items()) and plan.unused == ()
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_the_standard_names_need_no_kind_and_keep_the_methods_order():
    cfg = load_config(MMT_ARD)
    assert {name: spec.kind for name, spec in cfg.teachers.items()} == {"clean": None, "robust": None}
    assert list(cfg.teacher_plan().kinds.items()) == [("clean", "clean"), ("robust", "robust")]
    reordered = load_config(MMT_ARD, ["teachers.robust.kind=robust", "teachers.clean.kind=clean"])
    reordered.teachers = dict(reversed(list(reordered.teachers.items())))  # robust first, as a YAML may list them
    assert list(reordered.teacher_plan().kinds) == ["clean", "robust"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("teachers.extra.arch=tiny-vit-s", r"^teachers\.extra\.kind: expected clean or robust$"),
        ("teachers.extra.kind=adversarial", r"^teachers\.extra\.kind: expected clean or robust, got 'adversarial'$"),
        ("teachers.robust.kind=teacher", r"^teachers\.robust\.kind: expected clean or robust, got 'teacher'$"),
        ("teachers.clean.kind=robust", r"^teachers\.clean\.kind: the teacher named 'clean' is the clean teacher"),
        ("teachers.original.kind=robust", r"^teachers\.original: the name is reserved"),
        ("teachers.2fast.kind=robust", r"^teachers\.2fast: expected a name of a letter"),
        ("method.inner_teacher=robust", r"^method\.inner_teacher: expected the name of a clean teacher"),
    ],
)
def test_a_bad_teacher_is_one_error_naming_its_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(MMT_ARD, [override])


def test_a_distilling_method_without_its_teachers_is_refused(tmp_path):
    path = tmp_path / "none.yaml"
    path.write_text("teachers: {}\nmethod: {name: mmt-ard}\n")
    with pytest.raises(ConfigError, match=r"^teachers: method mmt-ard needs teacher\(s\) \['clean', 'robust'\]"):
        load_config(path)
    path.write_text("teachers: {clip: {arch: tiny-vit-s, kind: clean}}\nmethod: {name: mmt-ard}\n")
    with pytest.raises(ConfigError, match=r"^teachers\.clip\.kind: method 'mmt-ard' needs at least one .* robust"):
        load_config(path)


def test_teachers_of_kinds_the_method_does_not_take_are_left_out(tmp_path, teacher_files):
    ard = load_config(three_teacher_yaml(tmp_path, teacher_files, method="ard"))
    plan = ard.teacher_plan()
    assert plan.kinds == {"tecoa": "robust", "fare": "robust"} and plan.unused == ("clip",)
    tecoa = load_config(MMT_ARD, ["method.name=tecoa", "method.cache_clean_teacher=false"])
    plan = tecoa.teacher_plan()
    assert plan.kinds == {} and plan.unused == ("clean", "robust")


def test_fixed_weights_and_the_inner_teacher_by_name(tmp_path, teacher_files):
    extra = ", balance: fixed, lambdas: {tecoa: 0.5, fare: 0.25}, inner: kl-robust-teacher, inner_teacher: fare"
    cfg = load_config(three_teacher_yaml(tmp_path, teacher_files, extra=extra))
    assert cfg.method.lambdas == {"tecoa": 0.5, "fare": 0.25} and cfg.method.inner_teacher == "fare"
    with pytest.raises(ConfigError, match=r"^method\.inner_teacher: expected the name of a robust teacher"):
        load_config(three_teacher_yaml(tmp_path, teacher_files, extra=extra.replace("fare", "clip")))


# ---------------------------------------------------------------------------------------------- training


def test_one_clean_and_two_robust_teachers_train_and_log_each(tmp_path, data_dir, teacher_files, monkeypatch):
    built = {}
    real_build_teachers = trainer_module.build_teachers

    def recording_build_teachers(*args, **kwargs):
        teachers = real_build_teachers(*args, **kwargs)
        built.update({name: {k: v.clone() for k, v in model.state_dict().items()} for name, model in teachers.items()})
        built["models"] = teachers
        return teachers

    monkeypatch.setattr(trainer_module, "build_teachers", recording_build_teachers)
    out = tmp_path / "run"
    config = three_teacher_yaml(tmp_path, teacher_files)
    argv = ["train", "--config", str(config), "--no-progress"]
    for item in run_sets(data_dir, out):
        argv += ["--set", item]
    assert main(argv) == 0

    models = built.pop("models")
    assert list(models) == list(TEACHERS)
    for name, model in models.items():  # each teacher its own file, frozen and unchanged
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert all(torch.equal(built[name][k], v) for k, v in model.state_dict().items()), name
        loaded = load_file(str(teacher_files[name]))
        assert torch.equal(model.visual.conv1.weight.cpu(), loaded["visual.conv1.weight"]), name

    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        for name in TEACHERS:
            assert np.isfinite(record[f"L_{name}"]) and 0 <= record[f"lambda_{name}"] <= 1, (name, record)
        assert sum(record[f"lambda_{name}"] for name in TEACHERS) == pytest.approx(1.0)
        assert np.isfinite(record["loss"]) and not {"L_R", "L_C", "lambda_R"} & set(record)
    assert load_config(out / "config.yaml").teachers["fare"].kind == "robust"


def test_ard_distils_from_the_robust_teachers_and_leaves_the_clean_one_unloaded(
    tmp_path, data_dir, teacher_files, monkeypatch, caplog
):
    loaded = []
    real_load_clip = method_base.load_clip

    def recording_load_clip(arch, pretrained, **kwargs):
        loaded.append(pretrained)
        return real_load_clip(arch, pretrained, **kwargs)

    monkeypatch.setattr(method_base, "load_clip", recording_load_clip)
    cfg = load_config(three_teacher_yaml(tmp_path, teacher_files, method="ard"), run_sets(data_dir, tmp_path / "run"))
    train(cfg, progress=False)
    assert str(teacher_files["clip"]) not in loaded
    assert {str(teacher_files["tecoa"]), str(teacher_files["fare"])} <= set(loaded)
    assert "does not distil from teacher(s) clip" in caplog.text
    record = read_metrics(tmp_path / "run")[-1]
    assert {"L_tecoa", "L_fare", "lambda_tecoa", "lambda_fare"} <= set(record) and "L_clip" not in record


def test_two_teachers_named_with_kinds_or_listed_robust_first_train_bitwise_as_the_plain_config(
    tmp_path, data_dir, teacher_files
):
    """The plain two-teacher config, the same teachers with explicit kinds, and a YAML listing ``robust`` first:
    the same student, bitwise, and the same logged numbers."""
    plain = teacher_sets(teacher_files, {"clean": None, "robust": None})
    runs = {
        "plain": load_config(MMT_ARD, [*run_sets(data_dir, tmp_path / "plain"), *plain]),
        "kinds": load_config(
            MMT_ARD,
            [
                *run_sets(data_dir, tmp_path / "kinds"),
                *teacher_sets(teacher_files, {"clean": "clean", "robust": "robust"}),
            ],
        ),
    }
    reversed_yaml = tmp_path / "reversed.yaml"
    reversed_yaml.write_text(
        textwrap.dedent(f"""\
        defaults: {REPO / "configs" / "cpu" / "_base.yaml"}
        teachers:
          robust: {{arch: tiny-vit-s, pretrained: {teacher_files["robust"]}}}
          clean: {{arch: tiny-vit-s, pretrained: {teacher_files["clean"]}, kind: clean}}
        method: {{name: mmt-ard, eps: 4/255, steps: 1}}
        """)
    )
    runs["reversed"] = load_config(reversed_yaml, run_sets(data_dir, tmp_path / "reversed"))
    assert list(runs["reversed"].teachers) == ["robust", "clean"]
    for cfg in runs.values():
        train(cfg, progress=False)
    reference = read_metrics(tmp_path / "plain")
    for record in reference:
        record.pop("samples_per_s")
    for name in ("kinds", "reversed"):
        assert same_weights(tmp_path / name / "model.safetensors", tmp_path / "plain" / "model.safetensors"), name
        records = read_metrics(tmp_path / name)
        for record in records:
            record.pop("samples_per_s")
        assert records == reference, name
        assert list(records[0]) == list(reference[0])  # the same metrics in the same order


def test_the_disk_cache_of_clean_image_logits_is_opened_per_teacher(tmp_path, data_dir, teacher_files):
    cache = tmp_path / "cache"
    sets = [*run_sets(data_dir, tmp_path / "run"), "method.cache_clean_teacher=true", f"method.cache_dir={cache}"]
    train(load_config(three_teacher_yaml(tmp_path, teacher_files), sets), progress=False)
    assert (cache / "clip" / "cache.json").is_file()  # the clean teacher's logits on x are read every step
    assert not (cache / "tecoa").exists() and not (cache / "fare").exists()  # robust teachers see x' only
    identity = json.loads((cache / "clip" / "cache.json").read_text())
    assert str(teacher_files["clip"]) in json.dumps(identity)
    assert all(np.isfinite(r["loss"]) for r in read_metrics(tmp_path / "run"))


def test_a_cache_dir_that_is_a_file_is_refused_before_anything_is_written(tmp_path, data_dir, teacher_files, capsys):
    (tmp_path / "cache").write_text("not a folder")
    out = tmp_path / "run"
    sets = [*run_sets(data_dir, out), "method.cache_clean_teacher=true", f"method.cache_dir={tmp_path / 'cache'}"]
    argv = ["train", "--config", str(three_teacher_yaml(tmp_path, teacher_files)), "--no-progress"]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmtard train: error: method.cache_dir:") and "is a file" in err[0]
    assert not out.exists()


def test_config_validation_plans_the_teachers_without_building_a_method(monkeypatch):
    """``RunConfig.validate`` asks :func:`mmtard.methods.plan_teachers` (a frozen plan), never a ``Method``."""
    import dataclasses

    def refuse(*args, **kwargs):
        raise AssertionError("a Method was built while validating a config")

    monkeypatch.setattr(method_base.Method, "__init__", refuse)
    cfg = load_config(MMT_ARD, ["teachers.fare.arch=tiny-vit-s", "teachers.fare.kind=robust"])
    plan = cfg.teacher_plan()
    assert dict(plan.kinds) == {"clean": "clean", "robust": "robust", "fare": "robust"}
    assert plan.roles == ("clean", "robust", "fare") and plan.inner == {"clean": "clean"} and plan.unused == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.reads_original = True
    with pytest.raises(TypeError):
        plan.kinds["clip"] = "clean"
