"""The trainer end to end on a tiny synthetic dataset: config, CLI run, every preset, exact resume,
crash-safe checkpoints, frozen teachers, and the student's round trip through ``mmtard eval``.

Every run uses tiny CLIPs with random weights (tiny-vit-s student; tiny-vit-s teachers, tiny-vit-m as in
the config for the CLI run), a few steps and small batches, and the npz folder written by
:func:`make_npz_dir`, so nothing is skipped or downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MMT_ARD, REPO, as_argv, make_npz_dir, read_metrics, same_weights, small
from safetensors.torch import load_file

import mmtard
from mmtard.cli import main
from mmtard.distributed import DistEnv
from mmtard.errors import ConfigError
from mmtard.methods import create_method, list_methods
from mmtard.train import checkpoint as ckpt
from mmtard.train import faults, load_config, metrics_log, save_config
from mmtard.train import trainer as trainer_module
from mmtard.train.rundir import RunDir
from mmtard.train.trainer import train

PRESET_FILES = sorted(p for p in (REPO / "configs" / "cpu").glob("*.yaml") if not p.name.startswith("_"))
METRIC_KEYS = {
    "step",
    "loss",
    "L_R",
    "L_C",
    "lambda_R",
    "robust_teacher_score",
    "clean_teacher_score",
    "acc_clean",
    "acc_adv",
    "lr",
    "samples_per_s",
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_npz_dir(tmp_path_factory.mktemp("train-data") / "cifar10")


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.stepz=3", "train.stepz"),
        ("train.steps=abc", "train.steps"),
        ("teachers.clean.archh=x", "teachers.clean.archh"),
        ("method.stepz=2", "method.stepz"),
    ],
)
def test_bad_key_or_type_is_one_error_naming_the_key(override, key, tmp_path, capsys):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(MMT_ARD, [override])
    code = main(["train", "--config", str(MMT_ARD), "--set", override, "--set", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("mmtard train: error:") and key in err[0]
    assert not (tmp_path / "run").exists()  # refused before anything is written


@pytest.mark.parametrize("field", ["method.eps", "method.alpha", "eval.eps"])
def test_eps_without_unit_is_refused_with_a_hint(field):
    with pytest.raises(ConfigError, match=rf"{field}.*write 4/255"):
        load_config(MMT_ARD, [f"{field}=4"])


def test_eps_fraction_is_stored_as_the_float():
    cfg = load_config(MMT_ARD, ["method.eps=2/255", "method.alpha=1/255", "eval.eps=[1/255, 4/255]"])
    assert type(cfg.method.eps) is float and cfg.method.eps == 2 / 255
    assert cfg.method.alpha == 1 / 255 and cfg.method.step_size == 1 / 255
    assert cfg.eval.eps == [1 / 255, 4 / 255]


def test_numbers_in_exponent_notation_are_numbers():
    """YAML 1.1 reads ``1e-4`` (no dot) as text; ``--set train.lr=1e-4`` must still be the number."""
    cfg = load_config(MMT_ARD, ["train.lr=1e-4", "train.weight_decay=5E-2", "student.lora.alpha=32"])
    assert cfg.train.lr == 1e-4 and cfg.train.weight_decay == 0.05 and cfg.student.lora.alpha == 32.0
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(MMT_ARD, ["train.lr=-1e-4"])


def test_precedence_preset_then_yaml_then_set(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        textwrap.dedent("""\
        teachers: {clean: {arch: tiny-vit-m}, robust: {arch: tiny-vit-m}}
        method: {name: reference, diw: confidence, lambda_clean: 2.0, lambda_robust: 3.0}
        train: {lr: 3.0e-4, steps: 7}
        """)
    )
    cfg = load_config(yaml_file, ["method.lambda_clean=0.5", "train.steps=9"])
    assert cfg.method.balance == "fixed" and cfg.method.alpha == 1 / 255  # preset over the defaults
    assert (
        cfg.method.diw == "confidence" and cfg.method.lambda_robust == 3.0 and cfg.train.lr == 3e-4
    )  # yaml over preset
    assert cfg.method.lambda_clean == 0.5 and cfg.train.steps == 9  # --set over yaml
    assert cfg.method.beta == 5.0 and cfg.train.weight_decay == 1e-4  # nobody set them: the defaults
    assert load_config(yaml_file).method.lambda_clean == 2.0


def test_saved_config_loads_back_to_the_same_run_config(tmp_path):
    cfg = load_config(
        MMT_ARD,
        [
            "method.name=reference",
            "student.finetune=lora",
            "student.lora.alpha=32",
            "eval.eps=[1/255, 2/255]",
            "train.lr=3e-5",
            "data.samples=40",
            "method.logit_scale=model",
        ],
    )
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


# -------------------------------------------------------------------------------------- CLI end to end


@pytest.fixture(scope="module")
def cli_run(data_dir, tmp_path_factory):
    """``mmtard train`` on the MMT-ARD CPU config (tiny-vit-m teachers): 8 steps, PGD-1, held-out eval
    PGD-2 on 20 images."""
    out = tmp_path_factory.mktemp("cli") / "run"
    overrides = [
        f"data.dir={data_dir}",
        f"output_dir={out}",
        "train.steps=8",
        "train.checkpoint_every=4",
        "data.batch_size=8",
        "method.steps=1",
        "data.eval_samples=20",
        "eval.eps=[4/255]",
        "eval.steps=2",
        "eval.batch_size=16",
    ]
    assert main(as_argv(MMT_ARD, overrides)) == 0
    return out, overrides


def test_cli_train_writes_metrics_and_the_loss_falls(cli_run):
    out, _ = cli_run
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, 9))
    for record in records:
        assert METRIC_KEYS <= set(record), METRIC_KEYS - set(record)
        assert all(np.isfinite(record[k]) for k in METRIC_KEYS)
        assert 0 <= record["lambda_R"] <= 1
    losses = [r["loss"] for r in records]
    # Distilling two fixed teachers is learnable: measured 4.3 -> 0.6 over these steps (seed 0).
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    for name in ("config.yaml", "model.safetensors", "final_eval.json", "checkpoints/latest"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    # model.safetensors is the final student (step 8), not an earlier state.
    assert same_weights(out / "model.safetensors", out / "checkpoints" / "step_00000008" / "model.safetensors")
    assert not same_weights(out / "model.safetensors", out / "checkpoints" / "step_00000004" / "model.safetensors")


def test_run_dir_config_is_the_resolved_config(cli_run):
    out, overrides = cli_run
    saved = load_config(out / "config.yaml")
    assert saved == load_config(MMT_ARD, overrides)
    assert saved.train.steps == 8 and saved.method.eps == 4 / 255


@pytest.mark.parametrize("finetune, steps, lr", [("full", 3, "1e-3"), ("lora", 4, "3e-3")])
def test_student_loads_in_mmtard_eval_with_the_same_accuracy(finetune, steps, lr, data_dir, tmp_path):
    """A clean-ft student, trained to a middling accuracy so that a wrong file or a different held-out subset
    would show, gives in ``mmtard eval`` the clean and PGD accuracies of the run's ``final_eval.json``.
    For LoRA the file holds the merged weights, while the run evaluated the unmerged adapters."""
    out = tmp_path / "run"
    config = REPO / "configs" / "cpu" / "clean-ft.yaml"
    sets = [
        f"data.dir={data_dir}",
        f"output_dir={out}",
        f"train.steps={steps}",
        f"train.lr={lr}",
        f"student.finetune={finetune}",
        "data.batch_size=16",
        "data.eval_samples=20",
        "eval.eps=[8/255]",
        "eval.steps=2",
        "eval.batch_size=16",
    ]
    assert main(as_argv(config, sets)) == 0
    final = json.loads((out / "final_eval.json").read_text())
    assert final["samples"] == 20 and 0 < final["robust"][0]["acc"] < final["clean_acc"] < 100, (
        final
    )  # informative numbers
    argv = [
        "eval",
        "--model",
        "tiny-vit-s",
        "--pretrained",
        str(out / "model.safetensors"),
        "--dataset",
        "cifar10",
        "--data-dir",
        str(data_dir),
        "--split",
        "test",
        "--classes",
        "seen",
        "--samples",
        "20",
        "--attack",
        "pgd",
        "--eps",
        "8/255",
        "--steps",
        "2",
        "--batch-size",
        "16",
        "--seed",
        "0",
        "--no-progress",
        "--out",
        str(tmp_path / "eval"),
    ]
    assert main(argv) == 0
    record = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert record["samples"] == final["samples"]
    assert record["clean_acc"] == final["clean_acc"]
    assert record["robust"][0]["acc"] == final["robust"][0]["acc"]  # the same seeded PGD on the same images


# ------------------------------------------------------------------------------------------- presets


def test_every_registered_method_has_a_cpu_config():
    assert {load_config(path).method.name for path in PRESET_FILES} >= set(list_methods())


@pytest.fixture
def recorded_teachers(monkeypatch) -> dict:
    """Every teacher the trainer builds, by role: ``(classifier, state before training, prototypes before)``."""
    built = {}
    real_build_teachers = trainer_module.build_teachers

    def recording_build_teachers(*args, **kwargs):
        teachers = real_build_teachers(*args, **kwargs)
        built.update(
            {
                role: (model, {k: v.clone() for k, v in model.state_dict().items()}, model.prototypes.clone())
                for role, model in teachers.items()
            }
        )
        return teachers

    monkeypatch.setattr(trainer_module, "build_teachers", recording_build_teachers)
    return built


@pytest.mark.parametrize("config", PRESET_FILES, ids=[p.stem for p in PRESET_FILES])
def test_every_preset_runs_with_frozen_unchanged_teachers(config, data_dir, tmp_path, recorded_teachers):
    out = tmp_path / "run"
    assert main(as_argv(config, small(data_dir, out, "train.steps=2", config=config))) == 0
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records)
    method = create_method(load_config(config).method)
    if method.cfg.name in ("mmt-ard", "reference"):
        assert METRIC_KEYS <= set(records[0])
    assert json.loads((out / "final_eval.json").read_text())["samples"] == 10
    student = load_file(str(out / "model.safetensors"))

    # Teachers (and FARE / PMG-AFT's frozen original model): no gradient, eval mode, bitwise unchanged.
    assert set(recorded_teachers) == set(method.teacher_roles)
    for role, (model, before, prototypes) in recorded_teachers.items():
        assert not model.training, role
        for name, param in model.named_parameters():
            assert not param.requires_grad and param.grad is None, (role, name)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), role
        assert torch.equal(prototypes, model.prototypes), role
        if role == "original":  # a copy of the starting student, which has moved away from it
            assert any(not torch.equal(v, student[k]) for k, v in before.items()), "the student did not train"


# -------------------------------------------------------------------------------------------- resume

RESUME = ("train.steps=4", "train.checkpoint_every=2", "eval.final=false")
CHECKPOINT_1, CHECKPOINT_2 = "step_00000002", "step_00000004"


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """4 uninterrupted steps (full fine-tuning and LoRA), the reference for every resume test."""
    runs = {}
    for finetune in ("full", "lora"):
        out = tmp_path_factory.mktemp(f"uninterrupted-{finetune}") / "run"
        train(load_config(MMT_ARD, small(data_dir, out, *RESUME, f"student.finetune={finetune}")), progress=False)
        runs[finetune] = out
    return runs


def assert_same_run(resumed: Path, reference: Path) -> None:
    assert same_weights(resumed / "model.safetensors", reference / "model.safetensors")
    got, want = read_metrics(resumed), read_metrics(reference)
    assert [r["step"] for r in got] == list(range(1, 5))  # no duplicated or missing step
    for a, b in zip(got, want):
        a.pop("samples_per_s"), b.pop("samples_per_s")
        assert a == b


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_stop_crash_and_resume_is_bitwise_the_uninterrupted_run(
    finetune, uninterrupted, data_dir, tmp_path, monkeypatch
):
    """``--stop-after 2``; ``--resume latest`` crashes while writing the step-4 checkpoint; ``--resume latest``
    again finishes: the student and the logged metrics are those of the uninterrupted run."""
    out, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    overrides = small(data_dir, out, *RESUME, f"student.finetune={finetune}")
    assert main(as_argv(MMT_ARD, overrides, "--stop-after", "2")) == 0
    assert not (out / "model.safetensors").exists() and (checkpoints / "latest").read_text().strip() == CHECKPOINT_1
    assert (checkpoints / CHECKPOINT_1 / "adapter.safetensors").is_file() == (finetune == "lora")

    def crash_mid_write(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\x00" * 100)  # half a file, then the process "dies"
        raise OSError("simulated crash while writing a checkpoint")

    monkeypatch.setattr(ckpt, "save_file", crash_mid_write)
    with pytest.raises(OSError, match="simulated crash"):
        main(as_argv(MMT_ARD, overrides, "--resume", "latest"))
    monkeypatch.undo()
    assert (checkpoints / "latest").read_text().strip() == CHECKPOINT_1
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", CHECKPOINT_1]  # no half checkpoint left
    model_state, trainer_state, adapter = ckpt.load_checkpoint_files(checkpoints / CHECKPOINT_1)
    assert trainer_state["step"] == 2 and model_state and (adapter is not None) == (finetune == "lora")
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]  # steps 3-4 were logged before the crash

    assert main(as_argv(MMT_ARD, overrides, "--resume", "latest")) == 0
    assert_same_run(out, uninterrupted[finetune])
    # The student trained after the checkpoint (LoRA included), so equal final weights are not a given.
    assert not same_weights(out / "model.safetensors", checkpoints / CHECKPOINT_1 / "model.safetensors")
    starts = json.loads((out / "provenance.json").read_text())
    assert [s["step"] for s in starts] == [0, 2, 2]  # the first start, the crashed resume, the last resume
    for start in starts:
        assert (start["mmtard"], start["torch"], start["device"]) == (mmtard.__version__, torch.__version__, "cpu")
        assert start["commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+uncommitted changes)?", start["commit"])


def test_a_fresh_start_begins_the_provenance_list_and_a_resume_extends_it(tmp_path, caplog):
    run, env = RunDir(tmp_path), DistEnv(0, 1, 0, torch.device("cpu"))
    run.provenance.write_text(json.dumps([{"step": 0, "commit": "an earlier run"}]))
    trainer_module.record_start(run, 0, env)  # a new run in the folder: the old run's starts are not its own
    assert [s["step"] for s in json.loads(run.provenance.read_text())] == [0]
    trainer_module.record_start(run, 6, env)
    assert [s["step"] for s in json.loads(run.provenance.read_text())] == [0, 6]
    run.provenance.write_text("{not json")
    trainer_module.record_start(run, 8, env)
    assert [s["step"] for s in json.loads(run.provenance.read_text())] == [8]
    assert "not a list of starts" in caplog.text


KILL_SCRIPT = """
import os, signal, sys
import torch
from mmtard.train import checkpoint
from mmtard.train import load_config
from mmtard.train.rundir import RunDir
from mmtard.train.trainer import train

real_save, calls = torch.save, []
def save_then_die(obj, path, *args, **kwargs):
    calls.append(path)
    if len(calls) == 2:  # the second checkpoint: half a trainer state on disk, then SIGKILL
        with open(path, "wb") as f:
            f.write(b"PK" + bytes(64))
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *args, **kwargs)
checkpoint.torch.save = save_then_die
train(load_config(sys.argv[1], sys.argv[2:]), progress=False)
"""


def test_sigkill_while_writing_a_checkpoint_then_resume(uninterrupted, data_dir, tmp_path):
    out = tmp_path / "run"
    overrides = small(data_dir, out, *RESUME)
    # The reference ran in this process: the same thread count keeps CPU kernels bitwise comparable.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(MMT_ARD), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == CHECKPOINT_1
    assert list(checkpoints.glob(f".tmp_{CHECKPOINT_2}_*"))  # the killed write's leftovers
    ckpt.load_checkpoint_files(ckpt.resolve_resume(out, "latest"))
    assert main(as_argv(MMT_ARD, overrides, "--resume", "latest")) == 0
    assert_same_run(out, uninterrupted["full"])
    assert not list(checkpoints.glob(".tmp_*"))  # cleaned up by the next checkpoint


@pytest.mark.parametrize(
    "change, message",
    [
        ("student.lora.targets=[c_fc]", "do not match student.lora"),
        ("student.lora.rank=4", "does not fit"),
        ("student.finetune=full", "is a LoRA checkpoint"),
    ],
)
def test_resume_with_another_student_setup_is_one_clear_error(change, message, uninterrupted, data_dir, tmp_path):
    """A LoRA checkpoint resumed with other adapters must not silently train fresh ones."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted["lora"] / "checkpoints", out / "checkpoints")
    cfg = load_config(MMT_ARD, small(data_dir, out, *RESUME, "student.finetune=lora", change))
    with pytest.raises(ConfigError, match=message):
        train(cfg, resume="latest", progress=False)


def test_truncated_trainer_state_is_one_clear_error(tmp_path):
    folder = tmp_path / CHECKPOINT_1
    folder.mkdir()
    (folder / ckpt.STATE_FILE).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ConfigError, match="trainer_state.pt"):
        ckpt.load_checkpoint_files(folder)


def test_saving_a_step_again_keeps_the_first_save_until_latest_names_the_second(tmp_path, monkeypatch):
    """The second save of one step must not remove the first before ``latest`` names the second."""
    folder = tmp_path / "checkpoints"
    ckpt.save_checkpoint(folder, 2, {"w": torch.zeros(3)}, {"step": 2})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while replacing latest")

    monkeypatch.setattr(ckpt, "atomic_write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(folder, 2, {"w": torch.ones(3)}, {"step": 2})
    model, _, _ = ckpt.load_checkpoint_files(ckpt.resolve_resume(tmp_path, "latest"))
    assert torch.equal(model["w"], torch.zeros(3))

    monkeypatch.undo()
    final = ckpt.save_checkpoint(folder, 2, {"w": torch.ones(3)}, {"step": 2})
    model, _, _ = ckpt.load_checkpoint_files(ckpt.resolve_resume(tmp_path, "latest"))
    assert torch.equal(model["w"], torch.ones(3))
    assert sorted(p.name for p in folder.iterdir()) == ["latest", final.name]


# ------------------------------------------------------------------------------------------- teachers


@pytest.mark.parametrize("role", ["clean", "robust"])
def test_each_teacher_forward_reaches_the_loss(role, data_dir, tmp_path, monkeypatch):
    """Poison one teacher's output with NaN (no attack, so the loss is the only path): the trainer must stop."""
    real_build_teachers = trainer_module.build_teachers

    def poisoned_build_teachers(*args, **kwargs):
        teachers = real_build_teachers(*args, **kwargs)
        teachers[role].register_forward_hook(lambda module, inputs, output: output * float("nan"))
        return teachers

    monkeypatch.setattr(trainer_module, "build_teachers", poisoned_build_teachers)
    cfg = load_config(MMT_ARD, small(data_dir, tmp_path / "run", "train.steps=1", "method.steps=0"))
    with pytest.raises(FloatingPointError, match="step 1"):
        train(cfg, progress=False)


def test_without_tensorboard_the_run_logs_a_warning_and_writes_json_logs_only(tmp_path, monkeypatch, caplog):

    real_find_spec = metrics_log.importlib.util.find_spec
    monkeypatch.setattr(
        metrics_log.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a),
    )
    assert metrics_log.tensorboard_writer(RunDir(tmp_path / "run"), 0) is None
    assert "pip install 'mmtard[tensorboard]'" in caplog.text
    log = metrics_log.MetricsLog(RunDir(tmp_path / "run"), enabled=True, resume_step=0)
    (tmp_path / "run").mkdir()
    log.log({"step": 1, "loss": 0.5})
    log.close()
    assert read_metrics(tmp_path / "run") == [{"step": 1, "loss": 0.5}]
    assert not (tmp_path / "run" / "tensorboard").exists()


# --------------------------------------------------------------------------------------- augmentation

NO_CACHE = ("method.cache_clean_teacher=false",)  # the CPU preset caches teacher logits, which augmenting refuses


@pytest.fixture
def recorded_batches(monkeypatch) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(step, x, index)`` of every batch the loop hands to ``train_step``."""
    seen = []
    real_train_step = trainer_module.train_step

    def recording_train_step(state, batch, **kwargs):
        x, _, index = batch
        seen.append((state.step, x.clone(), index.clone()))
        return real_train_step(state, batch, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", recording_train_step)
    return seen


def test_augmentation_changes_each_training_batch_as_seeded_per_step(data_dir, tmp_path, recorded_batches):
    """Off (the default), the step sees the dataset's images; on, the same images through ``TrainAugment`` with
    the generator of (seed, step, rank 0); a second run draws the same boxes."""
    from mmtard.data import TrainAugment, step_generator

    plain_cfg = load_config(MMT_ARD, small(data_dir, tmp_path / "plain", "train.steps=2", *NO_CACHE))
    assert plain_cfg.data.augment is False
    train(plain_cfg, progress=False)
    plain = list(recorded_batches)
    train_set, _ = trainer_module.build_datasets(plain_cfg, 32, plain_cfg.train.seed)
    for _, x, index in plain:
        assert torch.equal(x, torch.stack([train_set[i][0] for i in index.tolist()]))

    for run in ("augmented", "again"):
        recorded_batches.clear()
        cfg = load_config(MMT_ARD, small(data_dir, tmp_path / run, "train.steps=2", "data.augment=true", *NO_CACHE))
        train(cfg, progress=False)
        assert [step for step, _, _ in recorded_batches] == [0, 1]
        for (step, x, index), (_, x_plain, index_plain) in zip(recorded_batches, plain):
            assert torch.equal(index, index_plain)  # the same images, in the same order
            assert not torch.allclose(x, x_plain) and 0 <= x.min() and x.max() <= 1
            expected = TrainAugment()(x_plain, generator=step_generator(cfg.train.seed, step, 0))
            assert torch.equal(x, expected)
    assert same_weights(tmp_path / "augmented" / "model.safetensors", tmp_path / "again" / "model.safetensors")
    assert not same_weights(tmp_path / "augmented" / "model.safetensors", tmp_path / "plain" / "model.safetensors")
    finals = [json.loads((tmp_path / run / "final_eval.json").read_text()) for run in ("augmented", "again")]
    assert [{k: v for k, v in final.items() if k != "seconds"} for final in finals] == [
        {k: v for k, v in finals[0].items() if k != "seconds"}
    ] * 2


def test_an_augmented_run_resumes_bitwise(data_dir, tmp_path):
    sets = ("train.steps=3", "train.checkpoint_every=1", "eval.final=false", "data.augment=true", *NO_CACHE)
    train(load_config(MMT_ARD, small(data_dir, tmp_path / "whole", *sets)), progress=False)
    overrides = small(data_dir, tmp_path / "resumed", *sets)
    assert main(as_argv(MMT_ARD, overrides, "--stop-after", "2")) == 0
    assert main(as_argv(MMT_ARD, overrides, "--resume", "latest")) == 0
    assert same_weights(tmp_path / "resumed" / "model.safetensors", tmp_path / "whole" / "model.safetensors")
    got, want = read_metrics(tmp_path / "resumed"), read_metrics(tmp_path / "whole")
    assert [r["step"] for r in got] == [1, 2, 3]
    for a, b in zip(got, want):
        a.pop("samples_per_s"), b.pop("samples_per_s")
        assert a == b


def test_augmentation_with_the_teacher_cache_is_refused_before_anything_is_written(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(as_argv(MMT_ARD, small(data_dir, out, "data.augment=true"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmtard train: error: data.augment:") and "cache_clean_teacher" in err[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------------ host syncs

DEVICE_READS = ("item", "tolist", "__float__", "__int__", "__bool__")
LOOP_FILES = {module.__file__ for module in (trainer_module, faults, metrics_log)}  # the loop's own code


def test_the_loop_reads_the_device_once_per_step_and_once_per_logged_step(data_dir, tmp_path, monkeypatch):
    """The trainer's own code waits for the device once per step (the non-finite check) and once per logged
    step (``train.log_every``): metrics stay tensors in between. Checkpoints and the end are left out."""
    reads = []
    for name in DEVICE_READS:
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename in LOOP_FILES:
                reads.append((_name, sys._getframe(1).f_code.co_name))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    monkeypatch.setattr(ckpt, "save", lambda *args: None)
    monkeypatch.setattr(trainer_module, "check_finite_student", lambda *args: None)
    sets = ("train.steps=4", "train.log_every=2", "eval.final=false")
    train(load_config(MMT_ARD, small(data_dir, tmp_path / "run", *sets)), progress=False)
    assert sorted(reads) == sorted([("tolist", "non_finite_problem")] * 4 + [("tolist", "logged_values")] * 2)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [2, 4]


def test_logged_values_are_python_numbers_from_tensors_or_numbers():
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    metrics = {"L_R": torch.tensor(0.25), "acc": torch.tensor([50.0]), "lambda_R": 0.3, "name": "x"}
    values = metrics_log.logged_values(torch.tensor(1.5, requires_grad=True), metrics, env)
    assert values == {"loss": 1.5, "L_R": 0.25, "acc": 50.0, "lambda_R": 0.3, "name": "x"}
    assert all(type(values[k]) is float for k in ("loss", "L_R", "acc", "lambda_R"))


def test_a_skipped_step_leaves_the_grad_scaler_ready_with_its_scale(monkeypatch):
    """With a grad scaler (fp16's), a dropped update forgets that step's ``unscale_`` and keeps the scale, so
    the next step runs (a scaler left mid-step refuses the next ``unscale_``)."""
    from torch import nn

    from mmtard.methods.base import MethodOutput
    from mmtard.train.config import OptimConfig, RunConfig

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    poisoned = [True]

    def method(student, x, y, index):
        scale = float("nan") if poisoned[0] else 1.0
        return MethodOutput(losses={"loss": scale * student(x).pow(2).mean()})

    cfg = RunConfig(train=OptimConfig(steps=4, on_nonfinite="skip", grad_clip=1.0))
    params = list(model.parameters())
    optimizer, scheduler = trainer_module.build_optimizer(cfg, params)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    state = trainer_module.TrainState(0, model, optimizer, scheduler, scaler, method)
    x, y = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    before = [p.detach().clone() for p in params]
    _, _, skipped = trainer_module.train_step(state, (x, y, None), precision=None, optim=cfg.train)
    assert skipped and state.step == 1 and state.skipped_steps == 1 and scaler.get_scale() == 16.0
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    poisoned[0] = False
    _, _, skipped = trainer_module.train_step(state, (x, y, None), precision=None, optim=cfg.train)
    assert not skipped and state.step == 2 and scaler.get_scale() == 16.0
    assert not all(torch.equal(p, b) for p, b in zip(params, before))
