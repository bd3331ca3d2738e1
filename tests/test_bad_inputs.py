"""Every bad input is one line on stderr, exit code 2, and leaves the file system as it found it.

Each case runs the CLI's ``main(argv)`` inside a fresh folder holding a tiny npz dataset, a run config, a
few broken model files and run folders with broken checkpoints. It asserts the exit code 2, exactly one
stderr line, starting ``mmtard <command>: error: <field>``, no ``Traceback``, and the same listing of the
folder (names, sizes, modification times) before and after. A few cases also run as a real process
(``python -m mmtard.cli``), whose stderr includes what logging prints.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CLASSES

NO_CUDA = not torch.cuda.is_available()
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

EVAL = ["eval", "--model", "tiny-vit-s", "--dataset", "cifar10", "--data-dir", "data", "--no-progress"]
TRAIN = ["train", "--config", "run.yaml", "--no-progress"]
EXPORT = ["export", "--model", "tiny-vit-s", "--pretrained"]


def make_workspace(root: Path) -> None:
    """The files the cases point at (paths relative to ``root``, the subprocess's working folder)."""
    rng = np.random.default_rng(0)
    (root / "data").mkdir()
    for split, n in (("train", 20), ("test", 10)):
        y = np.arange(n) % 10
        np.savez(root / "data" / f"{split}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=y)
    (root / "data" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "empty-data").mkdir()
    (root / "run.yaml").write_text(
        textwrap.dedent("""\
        output_dir: out
        student: {arch: tiny-vit-s, pretrained: none}
        teachers: {clean: {arch: tiny-vit-s}, robust: {arch: tiny-vit-s}}
        method: {name: mmt-ard, steps: 1}
        data: {dataset: cifar10, dir: data, batch_size: 4, eval_samples: 4}
        train: {steps: 2}
        eval: {eps: []}
        """)
    )
    (root / "broken.yaml").write_text("train: {steps: [1\n")
    (root / "a-file").write_text("not a folder\n")
    (root / "readonly").mkdir()
    (root / "readonly").chmod(0o555)
    (root / "weights").mkdir()
    tensors = struct.pack("<Q", 2) + b"{}"
    (root / "weights" / "empty.safetensors").write_bytes(b"")
    (root / "weights" / "garbage.safetensors").write_bytes(os.urandom(64))
    (root / "weights" / "pickle.safetensors").write_bytes(pickle.dumps({"visual.proj": [1.0, 2.0]}))
    (root / "weights" / "header-only.safetensors").write_bytes(tensors)
    header = b'{"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}'
    (root / "weights" / "truncated.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(100))
    (root / "weights" / "truncated.pt").write_bytes(b"PK\x03\x04 truncated")
    # a run folder whose latest checkpoint has a truncated trainer state, and one whose latest names nothing
    broken = root / "broken-run" / "checkpoints" / "step_00000001"
    broken.mkdir(parents=True)
    (root / "broken-run" / "checkpoints" / "latest").write_text("step_00000001\n")
    (broken / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4000))
    (broken / "trainer_state.pt").write_bytes(b"PK\x03\x04 truncated")
    (root / "dangling-run" / "checkpoints").mkdir(parents=True)
    (root / "dangling-run" / "checkpoints" / "latest").write_text("step_00000009\n")
    (root / "locked-run").mkdir()


def listing(root: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
        for p in root.rglob("*")
    )


# (id, argv, field the message must name first, skip reason or None)
CASES = [
    # ------------------------------------------------------------------------------------------- eval
    ("eval-no-data-dir", ["eval", "--model", "tiny-vit-s", "--dataset", "cifar10", "--out", "out"], "--data-dir"),
    ("eval-logit-scale-text", [*EVAL, "--logit-scale", "abc", "--out", "out"], "--logit-scale"),
    ("eval-batch-size-0", [*EVAL, "--batch-size", "0", "--out", "out"], "--batch-size"),
    ("eval-workers-negative", [*EVAL, "--workers", "-1", "--out", "out"], "--workers"),
    ("eval-samples-0", [*EVAL, "--samples", "0", "--out", "out"], "--samples"),
    ("eval-steps-0", [*EVAL, "--steps", "0", "--out", "out"], "--steps"),
    ("eval-eps-unitless", [*EVAL, "--eps", "4", "--out", "out"], "--eps"),
    ("eval-eps-nan", [*EVAL, "--eps", "nan", "--out", "out"], "--eps"),
    ("eval-eps-negative", [*EVAL, "--eps=-1/255", "--out", "out"], "--eps"),
    ("eval-eps-l2-negative", [*EVAL, "--norm", "l2", "--eps", "-0.5", "--out", "out"], "--eps"),
    ("eval-norm-unknown", [*EVAL, "--norm", "l3", "--out", "out"], "--norm"),
    ("eval-attack-unknown", [*EVAL, "--attack", "fgsm", "--out", "out"], "--attack"),
    ("eval-dataset-unknown", [*EVAL[:4], "cifar11", "--data-dir", "data", "--out", "out"], "--dataset"),
    ("eval-data-dir-missing", [*EVAL[:6], "nowhere", "--out", "out"], "--data-dir"),
    (
        "eval-data-dir-count",
        [*EVAL, "--dataset", "cifar10", "cifar10", "cifar10", "--data-dir", "data", "data", "--out", "out"],
        "--data-dir",
    ),
    ("eval-model-unknown", ["eval", "--model", "vit-huge-9", *EVAL[3:], "--out", "out"], "--model"),
    ("eval-pretrained-missing", [*EVAL, "--pretrained", "weights/none.safetensors", "--out", "out"], "--pretrained"),
    ("eval-pretrained-folder", [*EVAL, "--pretrained", "weights", "--out", "out"], "--pretrained"),
    ("eval-pretrained-empty", [*EVAL, "--pretrained", "weights/empty.safetensors", "--out", "out"], "--pretrained"),
    ("eval-pretrained-garbage", [*EVAL, "--pretrained", "weights/garbage.safetensors", "--out", "out"], "--pretrained"),
    (
        "eval-pretrained-pickle-as-safetensors",
        [*EVAL, "--pretrained", "weights/pickle.safetensors", "--out", "out"],
        "--pretrained",
    ),
    (
        "eval-pretrained-header-only",
        [*EVAL, "--pretrained", "weights/header-only.safetensors", "--out", "out"],
        "--pretrained",
    ),
    (
        "eval-pretrained-truncated",
        [*EVAL, "--pretrained", "weights/truncated.safetensors", "--out", "out"],
        "--pretrained",
    ),
    ("eval-pretrained-truncated-pt", [*EVAL, "--pretrained", "weights/truncated.pt", "--out", "out"], "--pretrained"),
    ("eval-hf-hub-offline", ["eval", "--model", "hf-hub:nobody/nothing", *EVAL[3:], "--out", "out"], "--model"),
    ("eval-split-not-a-name", [*EVAL[:4], "npz", "--data-dir", "data", "--split", "../x", "--out", "out"], "--split"),
    ("eval-split-no-file", [*EVAL[:4], "npz", "--data-dir", "data", "--split", "nosuch", "--out", "out"], "--data-dir"),
    ("eval-device-cuda", [*EVAL, "--device", "cuda", "--out", "out"], "--device", None if NO_CUDA else "has CUDA"),
    ("eval-device-unknown", [*EVAL, "--device", "gpu0", "--out", "out"], "--device"),
    ("eval-out-is-a-file", [*EVAL, "--out", "a-file"], "--out"),
    ("eval-out-read-only", [*EVAL, "--out", "readonly/out"], "--out", "root writes anywhere" if IS_ROOT else None),
    # ------------------------------------------------------------------------------------------ train
    ("train-config-missing", ["train", "--config", "nope.yaml"], "--config"),
    ("train-config-not-yaml", ["train", "--config", "broken.yaml"], "--config"),
    ("train-unknown-key", [*TRAIN, "--set", "train.stepz=3"], "train.stepz"),
    ("train-wrong-type", [*TRAIN, "--set", "train.steps=abc"], "train.steps"),
    ("train-set-without-value", [*TRAIN, "--set", "train.steps"], "--set"),
    ("train-unknown-method", [*TRAIN, "--set", "method.name=mmtard"], "method.name"),
    ("train-eval-attack-unknown", [*TRAIN, "--set", "eval.attack=fgsm"], "eval.attack"),
    ("train-eval-eps-nan", [*TRAIN, "--set", "eval.eps=[nan]"], "eval.eps[0]"),
    ("train-eval-steps-0", [*TRAIN, "--set", "eval.steps=0"], "eval.steps"),
    ("train-stop-after-0", [*TRAIN, "--stop-after", "0"], "--stop-after"),
    (
        "train-teacher-file-missing",
        [*TRAIN, "--set", "teachers.clean.pretrained=weights/none.safetensors"],
        "teachers.clean.pretrained",
    ),
    (
        "train-teacher-file-garbage",
        [*TRAIN, "--set", "teachers.robust.pretrained=weights/garbage.safetensors"],
        "teachers.robust.pretrained",
    ),
    ("train-student-arch-unknown", [*TRAIN, "--set", "student.arch=vit-huge-9"], "student.arch"),
    ("train-bf16-on-cpu", [*TRAIN, "--set", "train.precision=bf16", "--set", "device=cpu"], "train.precision"),
    ("train-device-cuda", [*TRAIN, "--set", "device=cuda"], "device", None if NO_CUDA else "has CUDA"),
    ("train-data-dir-missing", [*TRAIN, "--set", "data.dir=nowhere"], "data.dir"),
    ("train-data-dir-empty", [*TRAIN, "--set", "data.dir=empty-data"], "data.dir"),
    ("train-batch-larger-than-data", [*TRAIN, "--set", "data.batch_size=64"], "data.batch_size"),
    ("train-output-dir-is-a-file", [*TRAIN, "--set", "output_dir=a-file"], "output_dir"),
    ("train-nothing-to-resume", [*TRAIN, "--resume", "latest"], "--resume"),
    ("train-resume-truncated-state", [*TRAIN, "--set", "output_dir=broken-run", "--resume", "latest"], "--resume"),
    ("train-resume-dangling-latest", [*TRAIN, "--set", "output_dir=dangling-run", "--resume", "latest"], "--resume"),
    ("train-output-dir-locked", [*TRAIN, "--set", "output_dir=locked-run"], "output_dir"),
    # ------------------------------------------------------------------------------------------- demo
    ("demo-dataset-unknown", ["demo", "--dataset", "cifar11", "--out", "out"], "--dataset"),
    ("demo-no-data-dir", ["demo", "--dataset", "cifar10", "--out", "out"], "--data-dir"),
    ("demo-device-cuda", ["demo", "--device", "cuda", "--out", "out"], "--device", None if NO_CUDA else "has CUDA"),
    ("demo-out-is-a-file", ["demo", "--out", "a-file"], "--out"),
    # ----------------------------------------------------------------------------------------- export
    ("export-pretrained-missing", [*EXPORT, "weights/none.safetensors", "--out", "out"], "--pretrained"),
    ("export-pretrained-truncated-pt", [*EXPORT, "weights/truncated.pt", "--out", "out"], "--pretrained"),
    ("export-model-unknown", ["export", "--model", "vit-huge-9", "--pretrained", "none", "--out", "out"], "--model"),
    ("export-out-is-a-file", [*EXPORT, "none", "--format", "open_clip", "--out", "a-file"], "--out"),
    ("export-format-unknown", [*EXPORT, "none", "--format", "onnx", "--out", "out"], "--format"),
    # -------------------------------------------------------------------------------------------- cli
    ("unknown-command", ["evaluate"], "command"),
]


@pytest.fixture(scope="module")
def workspace_template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("workspace")
    make_workspace(root)
    return root


@pytest.fixture
def workspace(workspace_template, tmp_path) -> Path:
    import shutil

    root = tmp_path / "ws"
    shutil.copytree(workspace_template, root)
    (root / "readonly").chmod(0o555)
    return root


@pytest.fixture
def live_process():
    """A process that is alive during the test (holds a run folder's lock)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def run_in_process(argv: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    from mmtard.cli import main

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err


def run_process(argv: list[str], cwd: Path) -> tuple[int, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mmtard.cli", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    return proc.returncode, proc.stderr


def check_refused(case: tuple, code: int, stderr: str) -> None:
    name, argv, field = case[:3]
    lines = stderr.strip().splitlines()
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1, stderr
    command = "mmtard" if argv[0] == "evaluate" else f"mmtard {argv[0]}"
    assert lines[0].startswith(f"{command}: error: {field}"), lines[0]


def prepare(case: tuple, workspace: Path, live_pid: int) -> None:
    if len(case) > 3 and case[3]:
        pytest.skip(case[3])
    if case[0] == "train-output-dir-locked":
        import socket

        (workspace / "locked-run" / ".lock").write_text(f"{live_pid} {socket.gethostname()}\n")


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, workspace, live_process, monkeypatch, capsys):
    prepare(case, workspace, live_process)
    before = listing(workspace)
    code, stderr = run_in_process(case[1], workspace, monkeypatch, capsys)
    check_refused(case, code, stderr)
    assert listing(workspace) == before  # nothing created, changed or removed


IN_A_PROCESS = ["eval-pretrained-pickle-as-safetensors", "train-batch-larger-than-data", "train-resume-truncated-state"]


@pytest.mark.parametrize("name", IN_A_PROCESS)
def test_a_real_process_prints_only_the_error_line(name, workspace, live_process):
    """Refused before any model is built, so not even a warning is printed."""
    case = next(case for case in CASES if case[0] == name)
    prepare(case, workspace, live_process)
    before = listing(workspace)
    code, stderr = run_process(case[1], workspace)
    check_refused(case, code, stderr)
    assert listing(workspace) == before


def test_debug_shows_the_traceback(workspace, monkeypatch, capsys):
    from mmtard.errors import ConfigError

    with pytest.raises(ConfigError, match="--batch-size|data.batch_size"):
        run_in_process([*TRAIN, "--set", "data.batch_size=64", "--debug"], workspace, monkeypatch, capsys)
