"""Every run config under ``configs/`` loads and validates; the ``defaults:`` include; radii parsed once.

Run configs are the files whose name does not start with ``_``; ``_base.yaml`` files hold shared settings
and are only read through a config's ``defaults:`` key.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from mmtard.errors import ConfigError
from mmtard.train.config import RunConfig
from mmtard.train.config_io import load_config, read_config_file, save_config
from mmtard.units import parse_eps

REPO = Path(__file__).resolve().parents[1]
ALL_YAML = sorted((REPO / "configs").rglob("*.yaml"))
RUN_CONFIGS = [p for p in ALL_YAML if not p.name.startswith("_")]
BASE_FILES = [p for p in ALL_YAML if p.name.startswith("_")]


def ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(REPO / "configs")) for p in paths]


def test_the_configs_folder_is_found():
    assert len(RUN_CONFIGS) >= 19 and BASE_FILES


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=ids(RUN_CONFIGS))
def test_every_run_config_loads_validates_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.output_dir.startswith("runs/")
    assert all(0 < eps <= 1 for eps in [cfg.method.eps, *cfg.eval.eps])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("path", BASE_FILES, ids=ids(BASE_FILES))
def test_every_base_file_is_included_by_a_config(path):
    includers = [p for p in ALL_YAML if p != path and path.resolve() in _includes(p)]
    assert includers, f"{path} is not named by any defaults: key"
    assert read_config_file(path)  # parses, and its own defaults chain resolves


def _includes(path: Path) -> set[Path]:
    import yaml

    names = yaml.safe_load(path.read_text()).get("defaults") or []
    return {(path.parent / name).resolve() for name in ([names] if isinstance(names, str) else names)}


def test_cpu_configs_share_their_settings_through_the_base_file():
    base = read_config_file(REPO / "configs" / "cpu" / "_base.yaml")
    for path in (REPO / "configs" / "cpu").glob("[!_]*.yaml"):
        cfg = load_config(path)
        assert cfg.data.batch_size == base["data"]["batch_size"] and cfg.train.steps == base["train"]["steps"]


# ------------------------------------------------------------------------------------------ defaults


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_chain_precedence_base_then_file_then_set(tmp_path):
    """defaults < preset < base < middle < file < --set; mappings merge key by key."""
    write(tmp_path, "_root.yaml", "train: {steps: 5, lr: 1.0e-3, seed: 3}\nmethod: {name: reference, beta: 2.0}\n")
    write(tmp_path, "sub/_mid.yaml", "defaults: ../_root.yaml\ntrain: {steps: 6}\nmethod: {lambda_clean: 0.5}\n")
    path = write(
        tmp_path,
        "sub/run.yaml",
        """\
        defaults: [_mid.yaml]
        teachers: {clean: {arch: tiny-vit-s}, robust: {arch: tiny-vit-s}}
        train: {steps: 7}
        """,
    )
    cfg = load_config(path, ["train.seed=4"])
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-3 and cfg.train.seed == 4
    assert cfg.method.name == "reference" and cfg.method.balance == "fixed"  # the preset
    assert cfg.method.beta == 2.0 and cfg.method.lambda_clean == 0.5  # base files over the preset
    assert cfg.train.warmup == 0.07  # nobody set it: the dataclass default


@pytest.mark.parametrize(
    "files, message",
    [
        ({"run.yaml": "defaults: missing.yaml\n"}, r"defaults of '.*run.yaml': '.*missing.yaml' does not exist"),
        ({"run.yaml": "defaults: run.yaml\n"}, "includes itself"),
        ({"run.yaml": "defaults: {a: 1}\n"}, "defaults: in '.*run.yaml', expected a file name or a list"),
        ({"run.yaml": "train: {steps: [1\n"}, r"--config: '.*run.yaml' is not valid YAML at line 2"),
        ({"run.yaml": "- a\n- b\n"}, "must hold a mapping of sections"),
        ({"run.yaml": "defaults: _b.yaml\n", "_b.yaml": "train: {stepz: 3}\n"}, "train.stepz: unknown config key"),
    ],
)
def test_bad_config_files_are_one_error_naming_the_file(files, message, tmp_path):
    for name, text in files.items():
        write(tmp_path, name, text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "run.yaml")


def test_a_missing_config_or_a_folder_is_one_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


# ------------------------------------------------------------------------------------ whole validation

MMT_ARD = REPO / "configs" / "cpu" / "mmt-ard.yaml"


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.attack=pgdd", "eval.attack: expected one of aa, apgd-ce"),
        ("eval.eps=[nan]", r"eval.eps\[0\]: expected a finite radius"),
        ("eval.eps=[-1/255]", r"eval.eps\[0\]: must not be negative"),
        ("eval.eps=[4]", r"eval.eps\[0\].*write 4/255"),
        ("eval.steps=0", "eval.steps: expected a whole number >= 1"),
        ("eval.batch_size=0", "eval.batch_size: expected a whole number >= 1"),
        ("data.workers=-1", "data.workers: expected a whole number >= 0"),
        ("data.samples=0", "data.samples: expected a whole number >= 1"),
        ("data.dataset=cifar11", "data.dataset: unknown dataset 'cifar11'"),
        ("train.lr=.nan", "train.lr: expected a positive learning rate"),
        ("train.lr=.inf", "train.lr: expected a positive learning rate"),
        ("train.grad_clip=0", "train.grad_clip: expected a positive gradient norm"),
        ("train.betas=[0.9]", "train.betas: expected two numbers"),
        ("train.on_nonfinite=ignore", "train.on_nonfinite: expected one of stop, skip"),
        ("train.dist_timeout_s=0", "train.dist_timeout_s: expected a positive number of seconds"),
        ("student.lora.dropout=1", "student.lora.dropout: expected a probability"),
        ("method.name=mmtard", "method.name: unknown method 'mmtard'"),
        ("method.eps=inf", "method.eps: expected a finite radius"),
        ("device=gpu", "device: expected auto, cpu, cuda or cuda:N"),
        ("output_dir=''", "output_dir: expected a folder"),
        ("eval.eps=[1/255,", "--set eval.eps: cannot read"),
        ("data.augment=1", "data.augment: expected true or false"),
        ("train.compile=yes please", "train.compile: expected true or false"),
        ("data.augment=true", "data.augment: .*method.cache_clean_teacher=false or data.augment=false"),
    ],
)
def test_every_field_is_checked_when_the_config_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(MMT_ARD, [override])


# ------------------------------------------------------------------------------------------ augmentation

PAPER_CONFIGS = [p for p in RUN_CONFIGS if "paper" in p.relative_to(REPO / "configs").parts]


def test_augmentation_and_compilation_are_off_by_default():
    assert RunConfig().data.augment is False and RunConfig().train.compile is False
    cpu_configs = [p for p in RUN_CONFIGS if p not in PAPER_CONFIGS]
    assert cpu_configs and not any(load_config(p).data.augment for p in cpu_configs)


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=ids(PAPER_CONFIGS))
def test_paper_configs_train_with_augmentation_and_no_logit_cache(path):
    cfg = load_config(path)
    assert cfg.data.augment is True and cfg.method.cache_clean_teacher is False


def test_augmentation_with_the_clean_teacher_cache_is_one_error_naming_both(tmp_path):
    assert load_config(MMT_ARD).method.cache_clean_teacher  # the CPU preset caches; augmenting it is refused
    with pytest.raises(ConfigError, match=r"^data\.augment: .*method\.cache_clean_teacher.* would be stale"):
        load_config(MMT_ARD, ["data.augment=true"])
    cfg = load_config(MMT_ARD, ["data.augment=true", "method.cache_clean_teacher=false"])
    assert cfg.data.augment and not cfg.method.cache_clean_teacher
    paper = REPO / "configs" / "paper" / "mmt-ard-vit-b32.yaml"
    with pytest.raises(ConfigError, match="method.cache_clean_teacher"):
        load_config(paper, ["method.cache_clean_teacher=true"])


# ----------------------------------------------------------------------------------------------- radii


@pytest.mark.parametrize(
    "value, norm, expected",
    [
        ("4/255", "linf", 4 / 255),
        ("0.5", "linf", 0.5),
        (0, "linf", 0.0),
        ("2", "l2", 2.0),
        ("128/255", "l2", 128 / 255),
    ],
)
def test_parse_eps_reads_fractions_of_the_pixel_range(value, norm, expected):
    assert parse_eps(value, "--eps", norm) == expected


@pytest.mark.parametrize(
    "value, norm, message",
    [
        ("nan", "linf", "expected a finite radius"),
        (math.nan, "l2", "expected a finite radius"),
        ("inf", "l2", "expected a finite radius"),
        ("-inf", "linf", "expected a finite radius"),
        ("-1/255", "linf", "must not be negative"),
        ("-0.5", "l2", "must not be negative"),
        ("4", "linf", "write 4/255"),
        ("abc", "linf", "cannot read 'abc'"),
        ("1/0", "l2", "cannot read"),
        (True, "linf", "cannot read"),
        ("1/255", "l3", "unknown norm 'l3'"),
    ],
)
def test_parse_eps_refuses_what_is_not_a_radius(value, norm, message):
    with pytest.raises(ConfigError, match=rf"^--eps: .*{message}"):
        parse_eps(value, "--eps", norm)
