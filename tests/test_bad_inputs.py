"""Every bad input is one line on stderr, exit code 2, and leaves the file system as it found it.

Each case runs the CLI's ``main(argv)`` inside a fresh folder holding a tiny npz dataset, a run config, a
few broken model files and run folders with broken checkpoints. It asserts the exit code 2, exactly one
stderr line, starting ``mmtard <command>: error: <field>``, no ``Traceback``, and the same listing of the
folder (names, sizes, modification times) before and after. A few cases also run as a real process
(``python -m mmtard.cli``), whose stderr includes what logging prints.

Every case must also end within ``CASE_SECONDS`` (an alarm stops one that hangs, e.g. on a FIFO). Files that
cannot be copied (FIFOs, links to devices) are made in each case's own folder by ``SPECIAL_FILES``; model files
too large to copy for every case are made once, outside the folder (``@models/`` in a case's arguments).
Faults of the machine (a full disk, a read-only file system) are simulated in-process by ``FAULTS``.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CLASSES, lock_holder

NO_CUDA = not torch.cuda.is_available()
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

EVAL = ["eval", "--model", "tiny-vit-s", "--dataset", "cifar10", "--data-dir", "data", "--no-progress"]
TRAIN = ["train", "--config", "run.yaml", "--no-progress"]
EXPORT = ["export", "--model", "tiny-vit-s", "--pretrained"]
NPZ = ["eval", "--model", "tiny-vit-s", "--dataset", "npz", "--no-progress", "--attack", "none", "--data-dir"]
IMAGES = [*NPZ[:4], "imagefolder", *NPZ[5:]]
CASE_SECONDS = 30
NO_MPS = not torch.backends.mps.is_available()
RUN_CONFIG = {"student": {"arch": "tiny-vit-s", "pretrained": "none"}, "method": {"name": "tecoa"}, "data": {}}


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels (its pixel data is a stub: PIL reads the
    header, and checks the size, when the file is opened)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4)) + chunk(b"IEND", b"")
    )


def npz_declaring(path: Path, shape: tuple[int, ...], body: int = 64) -> None:
    """An npz whose ``x.npy`` header declares ``shape`` (uint8) but holds only ``body`` bytes of data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    labels = io.BytesIO()
    np.save(labels, np.zeros(4, dtype=np.int64))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + bytes(body))
        archive.writestr("y.npy", labels.getvalue())


def npz_folder(root: Path, name: str, x=None, y=None, classes: bytes | None = None) -> None:
    """A folder with ``train.npz`` and ``test.npz`` (4 images of 32 px, labels 0..3 unless given) and
    ``classes.txt``."""
    folder = root / name
    folder.mkdir()
    x = np.zeros((4, 32, 32, 3), dtype=np.uint8) if x is None else x
    for split in ("train", "test"):
        np.savez(folder / f"{split}.npz", x=x, y=np.arange(4) if y is None else y)
    (folder / "classes.txt").write_bytes(b"cat\ndog\nbird\nfrog\n" if classes is None else classes)


def run_folder(root: Path, name: str, config: str, final_eval: str | None = None) -> None:
    """A finished-looking run folder for export; its model file is a link to a good one (``link_models``)."""
    folder = root / name
    folder.mkdir()
    (folder / "config.yaml").write_text(config)
    if final_eval is not None:
        (folder / "final_eval.json").write_text(final_eval)


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
    # data the loaders refuse, each naming its file
    npz_folder(root, "labels-negative", y=np.array([0, 1, -1, 2]))
    npz_folder(root, "labels-string", y=np.array(["cat", "dog", "bird", "frog"]))
    npz_folder(root, "labels-float", y=np.array([0.0, 1.0, 2.5, 3.0]))
    npz_folder(root, "labels-2d", y=np.zeros((4, 2), dtype=np.int64))
    npz_folder(root, "images-0x0", x=np.zeros((4, 0, 0, 3), dtype=np.uint8))
    npz_folder(root, "classes-latin1", classes="café\ndog\nbird\nfrog\n".encode("latin-1"))
    npz_folder(root, "classes-twice", classes=b"cat\ndog\ncat\nfrog\n")
    npz_folder(root, "npz-huge")
    npz_declaring(root / "npz-huge" / "test.npz", (2**40, 1024, 1024, 3))  # 3 EiB: more than any machine
    npz_folder(root, "npz-truncated")
    npz_declaring(root / "npz-truncated" / "test.npz", (4, 32, 32, 3))  # 12 KiB declared, 64 bytes held
    (root / "images-bomb" / "cat").mkdir(parents=True)
    (root / "images-bomb" / "cat" / "huge.png").write_bytes(png_header(20_000, 12_000))  # 240 megapixels
    (root / "images-zero" / "cat").mkdir(parents=True)
    (root / "images-zero" / "cat" / "empty.png").write_bytes(png_header(0, 0))
    (root / "fifo-npz").mkdir()  # its test.npz is a FIFO (SPECIAL_FILES)
    (root / "fifo-npz" / "classes.txt").write_text("cat\ndog\nbird\nfrog\n")
    npz_folder(root, "fifo-classes")
    (root / "fifo-classes" / "classes.txt").unlink()  # a FIFO instead (SPECIAL_FILES)
    (root / "device-npz").mkdir()  # its test.npz is a link to /dev/zero (SPECIAL_FILES)
    (root / "fifo-images" / "cat").mkdir(parents=True)  # cat/photo.png is a FIFO (SPECIAL_FILES)
    # export: run folders whose config.yaml or final_eval.json is unusable, results files
    good_config = textwrap.dedent("""\
        student: {arch: tiny-vit-s, pretrained: none}
        method: {name: tecoa}
        data: {dataset: cifar10}
        """)
    run_folder(root, "run-config-not-yaml", "student: {arch: [tiny-vit-s\n")
    run_folder(root, "run-config-empty", "")
    run_folder(root, "run-config-a-list", "- student\n- method\n")
    run_folder(root, "run-config-section", good_config + "train: 200\n")
    run_folder(root, "run-config-latin1", "")
    (root / "run-config-latin1" / "config.yaml").write_bytes("student: {arch: tiny-vit-s}  # é\n".encode("latin-1"))
    run_folder(root, "run-final-not-json", good_config, '{"clean_acc": 5')
    run_folder(root, "run-final-no-acc", good_config, '{"robust": [], "samples": 4}')
    run_folder(root, "run-final-robust-text", good_config, '{"clean_acc": 5.0, "robust": [{"acc": "high"}]}')
    run_folder(root, "run-provenance-a-dict", good_config)
    (root / "run-provenance-a-dict" / "provenance.json").write_text('{"step": 0}')
    make_train_workspace(root)
    results = {"dataset": "cifar10", "clean_acc": 50.0, "robust": [{"attack": "pgd", "eps": "4/255"}]}
    (root / "results-no-acc.json").write_text(json.dumps(results))
    (root / "results-not-json.json").write_text('{"dataset": ')


class RunsCodeWhenUnpickled:
    """Unpickling it creates ``MARKER_FILE`` in the working folder (the case's folder): code from a file ran."""

    def __reduce__(self):
        return (open, (MARKER_FILE, "w"))


MARKER_FILE = "pickle-ran-code.txt"


def with_section(text: str, line: str) -> str:
    """``run.yaml``'s text with one top-level line replaced (the line starting like ``line``)."""
    key = line.split(":")[0] + ":"
    return "".join((line + "\n" if old.startswith(key) else old) for old in text.splitlines(keepends=True))


def checkpoint_folder(run: Path, step: int = 1, state: dict | None = None) -> None:
    """``run/checkpoints/step_N`` with a readable model header and a whole (empty) trainer state, and ``latest``.
    ``state`` replaces the trainer state."""
    folder = run / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    header = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    whole = {"step": step, "optimizer": {}, "scheduler": {}, "scaler": {}, "method": {}, "rng": []}
    torch.save(whole if state is None else state, folder / "trainer_state.pt")
    (run / "checkpoints" / "latest").write_text(folder.name + "\n")


def make_train_workspace(root: Path) -> None:
    """The files of the ``mmtard train`` cases of issue 17's second round."""
    from mmtard.train.config_io import load_config, save_config

    run_yaml = (root / "run.yaml").read_text()
    (root / "weights" / "runs-code.pt").write_bytes(pickle.dumps({"state_dict": RunsCodeWhenUnpickled()}))
    trusting = "student: {arch: tiny-vit-s, pretrained: weights/runs-code.pt, trust_checkpoint: true}"
    (root / "trusting-student.yaml").write_text(with_section(run_yaml, trusting))
    trusting = (
        "teachers: {clean: {arch: tiny-vit-s, pretrained: weights/runs-code.pt, trust_checkpoint: true}, "
        "robust: {arch: tiny-vit-s}}"
    )
    (root / "trusting-teacher.yaml").write_text(with_section(run_yaml, trusting))
    (root / "teacher-224px.yaml").write_text(with_section(run_yaml, "teachers: {clean: {arch: ViT-B-32}, robust: {}}"))
    (root / "empty.yaml").write_text("# nothing here yet\n")
    (root / "nested.yaml").write_text("train: " + "[" * 10_000 + "]" * 10_000 + "\n")
    checkpoint_folder(root / "interrupted-run")
    checkpoint_folder(root / "torn-metrics-run")
    (root / "torn-metrics-run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.3}\n{"step": 2, "lo\n{"step": 3}\n')
    checkpoint_folder(root / "other-run")
    make_issue_27_workspace(root, run_yaml)
    other = load_config(root / "run.yaml", ["train.lr=0.01", "output_dir=other-run"])
    save_config(other, root / "other-run" / "config.yaml")


def make_issue_27_workspace(root: Path, run_yaml: str) -> None:
    """The files of the cases of issue 27's fresh audit."""
    (root / "suite-latin1.yaml").write_bytes("name: caf\xe9\ndatasets: [cifar10]\n".encode("latin-1"))
    (root / "suite-nested.yaml").write_text("datasets: " + "[" * 20_000 + "]" * 20_000 + "\n")
    (root / "suite-fgsm.yaml").write_text("name: mini\nattacks: [fgsm]\neps: [1/255]\ndatasets: [cifar10]\n")
    (root / "subset-nested.json").write_text("[" * 100_000 + "]" * 100_000)
    state = {"step": 1, "scheduler": {}, "scaler": {}, "method": {}, "rng": []}  # no optimizer
    checkpoint_folder(root / "no-optimizer-run", state=state)
    (root / "duplicate-key.yaml").write_text(run_yaml + "train: {steps: 5}\n")
    good_config = "student: {arch: tiny-vit-s, pretrained: none}\nmethod: {name: tecoa}\ndata: {dataset: cifar10}\n"
    run_folder(root, "run-provenance-a-folder", good_config)
    (root / "run-provenance-a-folder" / "provenance.json").mkdir()
    from mmtard.train.config_io import load_config, save_config

    checkpoint_folder(root / "received-run")  # started elsewhere, its logit cache beside it there
    moved = ["output_dir=elsewhere/run", "method.cache_clean_teacher=true", "method.cache_dir=elsewhere/cache"]
    save_config(load_config(root / "run.yaml", moved), root / "received-run" / "config.yaml")


#: what the one line of a case says besides its field (the field alone would also match a misleading message)
EXPECTED_TEXT = {
    "eval-pretrained-fifo": "is a FIFO",
    "eval-pretrained-dev-zero": "is a character device",
    "eval-pretrained-dev-null": "is a character device",
    "export-pretrained-fifo": "is a FIFO",
    "export-pretrained-dev-null": "is a character device",
    "train-teacher-fifo": "is a FIFO",
    "train-student-dev-zero": "is a character device",
    "eval-npz-fifo": "'fifo-npz/test.npz' is a FIFO",
    "eval-npz-dev-zero": "'device-npz/test.npz' is a character device",
    "eval-classes-fifo": "'fifo-classes/classes.txt' is a FIFO",
    "eval-image-fifo": "'fifo-images/cat/photo.png' is a FIFO",
    "export-results-fifo": "'results-fifo.json' is a FIFO",
    "eval-labels-negative": "'labels-negative/test.npz' array y holds 1 negative label",
    "eval-labels-string": "'labels-string/test.npz' array y holds string labels",
    "eval-labels-float": "'labels-float/test.npz' array y holds float labels",
    "eval-labels-2d": "'labels-2d/test.npz' array y has shape (4, 2)",
    "eval-images-0x0": "'images-0x0/test.npz' holds images of 0x0 pixels",
    "eval-classes-not-utf8": "'classes-latin1/classes.txt' is not UTF-8",
    "eval-classes-twice": "'classes-twice/classes.txt' names class 'cat' twice",
    "eval-npz-declares-exabytes": "more than this machine's memory",
    "eval-npz-declares-more-than-held": "'npz-truncated/test.npz' array x declares (4, 32, 32, 3)",
    "eval-image-240-megapixels": "'images-bomb/cat/huge.png' is too large to decode safely",
    "eval-image-0x0": "'images-zero/cat/empty.png' cannot be decoded",
    "train-labels-negative": "'labels-negative/train.npz' array y holds 1 negative label",
    "eval-seed-2-to-the-64": f"from 0 to {2**63 - 1}",
    "eval-seed-2-to-the-63": f"from 0 to {2**63 - 1}",
    "eval-device-mps": "no MPS backend",
    "demo-device-mps": "no MPS backend",
    "eval-logit-scale-1e39": "beyond float32's range",
    "demo-download": "the demo never downloads",
    "demo-cifar10-folder-empty": "(mmtard eval --download fetches",
    "demo-npz-labels-negative": "'labels-negative/train.npz' array y holds 1 negative label",
    "export-non-finite-weights": "nan.safetensors' holds non-finite weights",
    "export-run-config-not-yaml": "'run-config-not-yaml/config.yaml' is not readable YAML",
    "export-run-config-empty": "'run-config-empty/config.yaml' is empty",
    "export-run-config-a-list": "'run-config-a-list/config.yaml' is a list",
    "export-run-config-section": "has train: 200, expected a mapping",
    "export-run-config-not-utf8": "'run-config-latin1/config.yaml' is not readable YAML",
    "export-run-final-eval-not-json": "'run-final-not-json/final_eval.json' is not JSON",
    "export-run-final-eval-no-acc": "'run-final-no-acc/final_eval.json' has clean_acc None",
    "export-run-final-eval-robust-text": "final_eval.json' has a robust entry without a numeric acc",
    "export-run-provenance-a-dict": "'run-provenance-a-dict/provenance.json' is not a list of the run's starts",
    "export-results-no-acc": "'results-no-acc.json' has a robust entry without a numeric acc",
    "export-results-not-json": "'results-not-json.json' is not JSON",
    "train-trust-checkpoint-in-yaml": "give --trust-checkpoint on the mmtard train command line",
    "train-trust-checkpoint-teacher-yaml": "give --trust-checkpoint on the mmtard train command line",
    "train-trust-checkpoint-set": "give --trust-checkpoint on the mmtard train command line",
    "train-teacher-224px-student-32px": "ViT-B-32 takes 224 px images, the student (student.arch tiny-vit-s) 32 px",
    "train-interrupted-run-without-resume": "holds an interrupted run (checkpoint step_00000001",
    "train-device-mps": "no MPS backend",
    "train-seed-2-to-the-64": "from 0 to 4294967295",
    "train-config-nested-10000-deep": "nested too deeply",
    "train-set-nested-5000-deep": "cannot read",
    "train-config-empty": "'empty.yaml' is empty",
    "train-resume-metrics-middle-line-corrupt": "'torn-metrics-run/metrics.jsonl' line 2 is not JSON",
    "train-resume-another-runs-checkpoint": "the run was started with 0.01 (other-run/config.yaml)",
}

#: files a folder copy cannot hold, made in each case's folder: name -> (path, kind)
SPECIAL_FILES = {
    "eval-pretrained-fifo": [("weights/fifo.pt", "fifo")],
    "export-pretrained-fifo": [("weights/fifo.safetensors", "fifo")],
    "train-teacher-fifo": [("weights/fifo.pt", "fifo")],
    "eval-npz-fifo": [("fifo-npz/test.npz", "fifo")],
    "eval-classes-fifo": [("fifo-classes/classes.txt", "fifo")],
    "eval-npz-dev-zero": [("device-npz/test.npz", "/dev/zero")],
    "eval-image-fifo": [("fifo-images/cat/photo.png", "fifo")],
    "export-results-fifo": [("results-fifo.json", "fifo")],
    "eval-out-dangling-link": [("dangling-out", "no-such-folder")],
    "train-output-dir-dangling-link": [("dangling-out", "no-such-folder")],
    "train-config-fifo": [("fifo.yaml", "fifo")],
}


def make_special_files(case_name: str, root: Path) -> None:
    for name, kind in SPECIAL_FILES.get(case_name, []):
        if kind == "fifo":
            os.mkfifo(root / name)
        else:
            (root / name).symlink_to(kind)


def listing(root: Path) -> list[tuple[str, int, int]]:
    """Names, sizes (-1 for anything but a regular file) and modification times; links are not followed."""
    entries = [(p, p.lstat()) for p in root.rglob("*")]
    return sorted(
        (str(p.relative_to(root)), st.st_size if stat.S_ISREG(st.st_mode) else -1, st.st_mtime_ns) for p, st in entries
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
    # ------------------------------------------------ issue 17, round 2: train checks before it writes anything
    ("train-trust-checkpoint-in-yaml", ["train", "--config", "trusting-student.yaml"], "student.trust_checkpoint"),
    (
        "train-trust-checkpoint-teacher-yaml",
        ["train", "--config", "trusting-teacher.yaml"],
        "teachers.clean.trust_checkpoint",
    ),
    ("train-trust-checkpoint-set", [*TRAIN, "--set", "student.trust_checkpoint=true"], "student.trust_checkpoint"),
    ("train-teacher-224px-student-32px", ["train", "--config", "teacher-224px.yaml"], "teachers.clean.arch"),
    ("train-interrupted-run-without-resume", [*TRAIN, "--set", "output_dir=interrupted-run"], "output_dir"),
    ("train-device-mps", [*TRAIN, "--set", "device=mps"], "device", None if NO_MPS else "has MPS"),
    ("train-seed-2-to-the-64", [*TRAIN, "--set", f"train.seed={2**64}"], "train.seed"),
    ("train-config-nested-10000-deep", ["train", "--config", "nested.yaml"], "--config"),
    ("train-set-nested-5000-deep", [*TRAIN, "--set", "train.betas=" + "[" * 5000 + "]" * 5000], "--set train.betas"),
    ("train-config-empty", ["train", "--config", "empty.yaml"], "--config"),
    (
        "train-resume-metrics-middle-line-corrupt",
        [*TRAIN, "--set", "output_dir=torn-metrics-run", "--resume", "latest"],
        "--resume",
    ),
    (
        "train-resume-another-runs-checkpoint",
        [*TRAIN, "--resume", "other-run/checkpoints/step_00000001"],
        "train.lr",
    ),
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
    # ------------------------------------------------ issue 17: FIFOs and devices given as files (no hang)
    ("eval-pretrained-fifo", [*EVAL, "--pretrained", "weights/fifo.pt", "--out", "out"], "--pretrained"),
    ("eval-pretrained-dev-zero", [*EVAL, "--pretrained", "/dev/zero", "--out", "out"], "--pretrained"),
    ("eval-pretrained-dev-null", [*EVAL, "--pretrained", "/dev/null", "--out", "out"], "--pretrained"),
    ("export-pretrained-fifo", [*EXPORT, "weights/fifo.safetensors", "--out", "out"], "--pretrained"),
    ("export-pretrained-dev-null", [*EXPORT, "/dev/null", "--out", "out"], "--pretrained"),
    (
        "train-teacher-fifo",
        [*TRAIN, "--set", "teachers.clean.pretrained=weights/fifo.pt"],
        "teachers.clean.pretrained",
    ),
    ("train-student-dev-zero", [*TRAIN, "--set", "student.pretrained=/dev/zero"], "student.pretrained"),
    ("eval-npz-fifo", [*NPZ, "fifo-npz", "--out", "out"], "--data-dir"),
    ("eval-npz-dev-zero", [*NPZ, "device-npz", "--out", "out"], "--data-dir"),
    ("eval-classes-fifo", [*NPZ, "fifo-classes", "--out", "out"], "--data-dir"),
    ("eval-image-fifo", [*IMAGES, "fifo-images", "--out", "out"], "--data-dir"),
    ("export-results-fifo", [*EXPORT, "none", "--results", "results-fifo.json", "--out", "out"], "--results"),
    # -------------------------------------------------------------------- issue 17: the data loader
    ("eval-labels-negative", [*NPZ, "labels-negative", "--out", "out"], "--data-dir"),
    ("eval-labels-string", [*NPZ, "labels-string", "--out", "out"], "--data-dir"),
    ("eval-labels-float", [*NPZ, "labels-float", "--out", "out"], "--data-dir"),
    ("eval-labels-2d", [*NPZ, "labels-2d", "--out", "out"], "--data-dir"),
    ("eval-images-0x0", [*NPZ, "images-0x0", "--out", "out"], "--data-dir"),
    ("eval-classes-not-utf8", [*NPZ, "classes-latin1", "--out", "out"], "--data-dir"),
    ("eval-classes-twice", [*NPZ, "classes-twice", "--out", "out"], "--data-dir"),
    ("eval-npz-declares-exabytes", [*NPZ, "npz-huge", "--out", "out"], "--data-dir"),
    ("eval-npz-declares-more-than-held", [*NPZ, "npz-truncated", "--out", "out"], "--data-dir"),
    ("eval-image-240-megapixels", [*IMAGES, "images-bomb", "--out", "out"], "--data-dir"),
    ("eval-image-0x0", [*IMAGES, "images-zero", "--out", "out"], "--data-dir"),
    ("train-labels-negative", [*TRAIN, "--set", "data.dataset=npz", "--set", "data.dir=labels-negative"], "data.dir"),
    # ------------------------------------------------------------ issue 17: seeds, devices, messages
    ("eval-seed-2-to-the-64", [*EVAL, "--seed", str(2**64), "--out", "out"], "--seed"),
    ("eval-seed-2-to-the-63", [*EVAL, "--seed", str(2**63), "--out", "out"], "--seed"),
    ("eval-device-mps", [*EVAL, "--device", "mps", "--out", "out"], "--device", None if NO_MPS else "has MPS"),
    ("demo-device-mps", ["demo", "--device", "mps", "--out", "out"], "--device", None if NO_MPS else "has MPS"),
    ("eval-logit-scale-1e39", [*EVAL, "--logit-scale", "1e39", "--out", "out"], "--logit-scale"),
    ("demo-download", ["demo", "--download", "--out", "out"], "--download"),
    (
        "demo-cifar10-folder-empty",
        ["demo", "--dataset", "cifar10", "--data-dir", "empty-data", "--out", "out"],
        "--data-dir",
    ),
    (
        "demo-npz-labels-negative",
        ["demo", "--dataset", "npz", "--data-dir", "labels-negative", "--out", "out"],
        "--data-dir",
    ),
    # --------------------------------------------- issue 17: export reads and checks everything first
    (
        "export-non-finite-weights",
        [*EXPORT, "@models/nan.safetensors", "--format", "open_clip", "--out", "out"],
        "--pretrained",
    ),
    ("export-run-config-not-yaml", [*EXPORT, "run-config-not-yaml", "--out", "out"], "--pretrained"),
    ("export-run-config-empty", [*EXPORT, "run-config-empty", "--out", "out"], "--pretrained"),
    ("export-run-config-a-list", [*EXPORT, "run-config-a-list", "--out", "out"], "--pretrained"),
    ("export-run-config-section", [*EXPORT, "run-config-section", "--out", "out"], "--pretrained"),
    ("export-run-config-not-utf8", [*EXPORT, "run-config-latin1", "--out", "out"], "--pretrained"),
    ("export-run-final-eval-not-json", [*EXPORT, "run-final-not-json", "--out", "out"], "--pretrained"),
    ("export-run-final-eval-no-acc", [*EXPORT, "run-final-no-acc", "--out", "out"], "--pretrained"),
    ("export-run-final-eval-robust-text", [*EXPORT, "run-final-robust-text", "--out", "out"], "--pretrained"),
    ("export-run-provenance-a-dict", [*EXPORT, "run-provenance-a-dict", "--out", "out"], "--pretrained"),
    ("export-results-no-acc", [*EXPORT, "none", "--results", "results-no-acc.json", "--out", "out"], "--results"),
    ("export-results-not-json", [*EXPORT, "none", "--results", "results-not-json.json", "--out", "out"], "--results"),
    (
        "export-out-read-only",
        [*EXPORT, "none", "--out", "readonly/out"],
        "--out",
        "root writes anywhere" if IS_ROOT else None,
    ),
]

LOCAL_DIR = ["eval", "--no-progress", "--dataset", "cifar10", "--data-dir", "data", "--out", "out", "--model"]
# ------------------------------------------------------------------------------ issue 27: the fresh audit
CASES += [
    ("eval-local-dir-truncated", [*LOCAL_DIR, "local-dir:@models/ex-truncated"], "--model"),
    ("eval-local-dir-pickle-bin", [*LOCAL_DIR, "local-dir:@models/ex-pickle-bin"], "--model"),
    ("eval-local-dir-other-width", [*LOCAL_DIR, "local-dir:@models/ex-other-width"], "--model"),
    ("eval-local-dir-foreign-state-dict", [*LOCAL_DIR, "local-dir:@models/ex-foreign"], "--model"),
    (
        "eval-vision-weights-nan",
        [*EVAL, "--vision-weights", "@models/tower-nan.safetensors", "--out", "out"],
        "--vision-weights",
    ),
    (
        "export-vision-weights-nan",
        [*EXPORT, "none", "--vision-weights", "@models/tower-nan.safetensors", "--out", "out"],
        "--vision-weights",
    ),
    (
        "train-teacher-vision-weights-nan",
        [*TRAIN, "--set", "teachers.robust.vision_weights=@models/tower-nan.safetensors"],
        "teachers.robust.vision_weights",
    ),
    (
        "train-teacher-pretrained-nan",
        [*TRAIN, "--set", "teachers.robust.pretrained=@models/nan.safetensors"],
        "teachers.robust.pretrained",
    ),
    (
        "eval-vision-alpha-without-weights",
        [*EVAL, "--vision-weights-alpha", "0.5", "--out", "out"],
        "--vision-weights-alpha",
    ),
    (
        "export-vision-alpha-without-weights",
        [*EXPORT, "none", "--vision-weights-alpha", "1", "--out", "out"],
        "--vision-weights-alpha",
    ),
    (
        "eval-vision-weights-keys-equal-once-stripped",
        [*EVAL, "--vision-weights", "@models/tower-twice.safetensors", "--out", "out"],
        "--vision-weights",
    ),
    (
        "train-resume-received-run-cache-dir-outside",
        [*TRAIN, "--set", "output_dir=received-run", "--resume", "latest"],
        "method.cache_dir",
    ),
    ("eval-out-in-use", [*EVAL, "--attack", "none", "--out", "busy-out"], "--out"),
    (
        "eval-suite-attack-unknown",
        [*EVAL[:3], "--suite", "suite-fgsm.yaml", "--data-dir", ".", "--out", "out"],
        "--suite",
    ),
    ("eval-suite-not-utf8", [*EVAL[:3], "--suite", "suite-latin1.yaml", "--data-dir", ".", "--out", "out"], "--suite"),
    (
        "eval-suite-nested-20000-deep",
        [*EVAL[:3], "--suite", "suite-nested.yaml", "--data-dir", ".", "--out", "out"],
        "--suite",
    ),
    ("data-check-suite-not-utf8", ["data", "check", "--suite", "suite-latin1.yaml", "--data-dir", "."], "--suite"),
    (
        "data-check-suite-nested-20000-deep",
        ["data", "check", "--suite", "suite-nested.yaml", "--data-dir", "."],
        "--suite",
    ),
    ("eval-subset-nested-100000-deep", [*EVAL, "--subset", "subset-nested.json", "--out", "out"], "--subset"),
    (
        "train-resume-state-without-optimizer",
        [*TRAIN, "--set", "output_dir=no-optimizer-run", "--resume", "latest"],
        "--resume",
    ),
    ("eval-out-dangling-link", [*EVAL, "--out", "dangling-out"], "--out"),
    ("train-output-dir-dangling-link", [*TRAIN, "--set", "output_dir=dangling-out"], "output_dir"),
    ("export-run-provenance-a-folder", [*EXPORT, "run-provenance-a-folder", "--out", "out"], "--pretrained"),
    ("train-provenance-a-folder", [*TRAIN, "--set", "output_dir=run-provenance-a-folder"], "output_dir"),
    ("train-config-fifo", ["train", "--config", "fifo.yaml"], "--config"),
    ("train-config-duplicate-key", ["train", "--config", "duplicate-key.yaml"], "--config"),
    ("train-set-no-key", [*TRAIN, "--set", "=5"], "--set"),
    ("eval-out-empty", [*EVAL, "--out", ""], "--out"),
    ("eval-classes-flag-twice", [*EVAL, "--classes", "cat,cat", "--out", "out"], "--classes"),
    ("eval-eps-l2-1e30", [*EVAL, "--norm", "l2", "--eps", "1e30", "--out", "out"], "--eps"),
    (
        "eval-vision-weights-bool",
        [*EVAL, "--vision-weights", "@models/tower-bool.safetensors", "--out", "out"],
        "--vision-weights",
    ),
]
EXPECTED_TEXT |= {
    "eval-local-dir-truncated": "ex-truncated/model.safetensors' is truncated",
    "eval-local-dir-pickle-bin": "ex-pickle-bin/pytorch_model.bin' is a pickle that needs code execution",
    "eval-local-dir-other-width": "ex-other-width': its weights do not fit its config",
    "eval-local-dir-foreign-state-dict": "ex-foreign': its weights do not fit its config",
    "eval-vision-weights-nan": "tower-nan.safetensors' holds non-finite weights",
    "export-vision-weights-nan": "tower-nan.safetensors' holds non-finite weights",
    "train-teacher-vision-weights-nan": "tower-nan.safetensors' holds non-finite weights",
    "train-teacher-pretrained-nan": "nan.safetensors' holds non-finite weights (NaN or inf in 1 tensor(s)",
    "eval-vision-alpha-without-weights": "given without --vision-weights",
    "export-vision-alpha-without-weights": "given without --vision-weights",
    "eval-vision-weights-keys-equal-once-stripped": "holds both 'module.visual.proj' and 'visual.proj'",
    "train-resume-received-run-cache-dir-outside": "--set method.cache_dir=FOLDER (e.g. received-run/logit-cache)",
    "eval-out-in-use": "'busy-out' is in use by another mmtard eval (process ",
    "train-output-dir-locked": "'locked-run' is in use by process ",
    "eval-suite-attack-unknown": "--suite: 'suite-fgsm.yaml': attacks: unknown attack 'fgsm'",
    "eval-suite-not-utf8": "'suite-latin1.yaml' is not UTF-8 text",
    "eval-suite-nested-20000-deep": "'suite-nested.yaml' is nested too deeply",
    "data-check-suite-not-utf8": "'suite-latin1.yaml' is not UTF-8 text",
    "data-check-suite-nested-20000-deep": "'suite-nested.yaml' is nested too deeply",
    "eval-subset-nested-100000-deep": "'subset-nested.json' is nested too deeply",
    "train-resume-state-without-optimizer": "trainer_state.pt' lacks optimizer",
    "eval-out-dangling-link": "'dangling-out' is a link to 'no-such-folder', which does not exist",
    "train-output-dir-dangling-link": "'dangling-out' is a link to 'no-such-folder', which does not exist",
    "export-run-provenance-a-folder": "provenance.json' is a folder",
    "train-provenance-a-folder": "provenance.json' is a folder, where the run keeps its file provenance.json",
    "train-config-fifo": "'fifo.yaml' is a FIFO",
    "train-config-duplicate-key": "the key 'train' is written twice",
    "train-set-no-key": "'=5' names no key",
    "eval-out-empty": "--out: empty",
    "eval-classes-flag-twice": "['cat'] named twice",
    "eval-eps-l2-1e30": "beyond the l2 diameter of any image",
    "eval-vision-weights-bool": "non-floating-point tensor(s) where tiny-vit-s's image tower has floating-point",
}


def link_models(root: Path, models: Path) -> None:
    """Every export run folder's ``model.safetensors`` links to a good model: the run's own files are what is
    wrong, and the weights would load (kept as links when the folder is copied)."""
    for folder in root.glob("run-*"):
        (folder / "model.safetensors").symlink_to(models / "good.safetensors")


@pytest.fixture(scope="module")
def workspace_template(tmp_path_factory, model_files) -> Path:
    root = tmp_path_factory.mktemp("workspace")
    make_workspace(root)
    link_models(root, model_files)
    return root


@pytest.fixture
def workspace(workspace_template, tmp_path) -> Path:
    import shutil

    root = tmp_path / "ws"
    shutil.copytree(workspace_template, root, symlinks=True)
    (root / "readonly").chmod(0o555)
    return root


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> Path:
    """Model files too large to copy into every case's folder (``@models/`` in a case's arguments)."""
    from safetensors.torch import save_file

    from mmtard.models import load_clip

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    state = {k: v.contiguous().clone() for k, v in load_clip("tiny-vit-s", "none").model.state_dict().items()}
    save_file(state, str(root / "good.safetensors"))
    state["visual.proj"][0, 0] = float("nan")
    save_file(state, str(root / "nan.safetensors"))
    make_local_dirs(root)
    tower = {k[len("visual.") :]: v.clone() for k, v in state.items() if k.startswith("visual.")}
    save_file(tower, str(root / "tower-nan.safetensors"))  # proj holds a NaN (set above)
    twice = {f"visual.{k}": v.clone() for k, v in tower.items()}
    twice["visual.proj"] = torch.zeros_like(tower["proj"])  # finite (the tower's proj holds the NaN)
    twice["module.visual.proj"] = torch.zeros_like(tower["proj"])
    save_file(twice, str(root / "tower-twice.safetensors"))
    tower["proj"] = torch.ones_like(tower["proj"]).bool()
    save_file(tower, str(root / "tower-bool.safetensors"))
    return root


def make_local_dirs(root: Path) -> None:
    """``local-dir:`` export folders of tiny-vit-s whose weights are truncated, a pickle that runs code, of
    another width (tiny-vit-m), or another model's state dict."""
    import shutil

    from safetensors.torch import save_file

    from mmtard.export import export_model

    export_model("tiny-vit-s", "none", root / "ex", format="open_clip")
    export_model("tiny-vit-m", "none", root / "ex-m", format="open_clip")
    for name in ("ex-truncated", "ex-pickle-bin", "ex-other-width", "ex-foreign"):
        shutil.copytree(root / "ex", root / name)
    weights = (root / "ex" / "model.safetensors").read_bytes()
    (root / "ex-truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (root / "ex-pickle-bin" / "model.safetensors").unlink()
    (root / "ex-pickle-bin" / "pytorch_model.bin").write_bytes(pickle.dumps({"w": RunsCodeWhenUnpickled()}))
    shutil.copy(root / "ex-m" / "model.safetensors", root / "ex-other-width" / "model.safetensors")
    save_file({"head.weight": torch.zeros(3)}, str(root / "ex-foreign" / "model.safetensors"))


class CaseTimeout(BaseException):
    """Raised by the alarm in a case that runs past ``CASE_SECONDS`` (not an OSError: nothing may catch it)."""


@contextmanager
def time_limit(seconds: int):
    """Stop the code inside after ``seconds`` (a blocking open of a FIFO included) and fail the case."""

    def stop(signum, frame):
        raise CaseTimeout(f"still running after {seconds} s (a hang?)")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def lock_holders():
    """The processes that hold a lock during the test (a run folder's, an evaluation's), killed at its end."""
    holders: list[subprocess.Popen] = []
    yield holders
    for proc in holders:
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


#: the lock a process holds while a case runs
HELD_LOCKS = {
    "eval-out-in-use": "busy-out/journal/.lock",
    "train-output-dir-locked": "locked-run/.lock",
}


def prepare(case: tuple, workspace: Path, lock_holders: list[subprocess.Popen]) -> None:
    if len(case) > 3 and case[3]:
        pytest.skip(case[3])
    make_special_files(case[0], workspace)
    if case[0] in HELD_LOCKS:
        lock_holders.append(lock_holder(workspace / HELD_LOCKS[case[0]]))


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    case, workspace, lock_holders, model_files, monkeypatch, capsys
):
    prepare(case, workspace, lock_holders)
    argv = [arg.replace("@models", str(model_files)) for arg in case[1]]
    before = listing(workspace)
    started = time.monotonic()
    with time_limit(CASE_SECONDS):
        code, stderr = run_in_process(argv, workspace, monkeypatch, capsys)
    assert time.monotonic() - started < CASE_SECONDS
    check_refused(case, code, stderr)
    assert EXPECTED_TEXT.get(case[0], "") in stderr, stderr
    assert not (workspace / MARKER_FILE).exists()  # no pickle ran code
    assert listing(workspace) == before  # nothing created, changed or removed


IN_A_PROCESS = [
    "eval-pretrained-pickle-as-safetensors",
    "train-batch-larger-than-data",
    "train-resume-truncated-state",
    "eval-pretrained-fifo",
    "export-non-finite-weights",
    "train-trust-checkpoint-in-yaml",
    "train-teacher-224px-student-32px",
    "train-interrupted-run-without-resume",
]


@pytest.mark.parametrize("name", IN_A_PROCESS)
def test_a_real_process_prints_only_the_error_line(name, workspace, lock_holders, model_files):
    """Refused before any model is built (or with weights from a file), so not even a warning is printed."""
    case = next(case for case in CASES if case[0] == name)
    prepare(case, workspace, lock_holders)
    before = listing(workspace)
    code, stderr = run_process([arg.replace("@models", str(model_files)) for arg in case[1]], workspace)
    check_refused(case, code, stderr)
    assert EXPECTED_TEXT.get(name, "") in stderr, stderr
    assert listing(workspace) == before


def test_debug_shows_the_traceback(workspace, monkeypatch, capsys):
    from mmtard.errors import ConfigError

    with pytest.raises(ConfigError, match="--batch-size|data.batch_size"):
        run_in_process([*TRAIN, "--set", "data.batch_size=64", "--debug"], workspace, monkeypatch, capsys)


# ------------------------------------------------------ issue 17: a full disk or a read-only file system


def disk_full_in_safetensors(monkeypatch) -> None:
    """What safetensors raises when the disk fills while it writes (its I/O errors are not OSErrors)."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)


def disk_full_on_fsync(monkeypatch) -> None:
    """Every atomic write fails when its data is flushed to the disk (as on a full disk)."""

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)


def disk_full_at_the_model_card(monkeypatch) -> None:
    """The export's weights and config are written (two files: two fsyncs each, the file's and the folder's),
    then the disk is full when the model card is flushed."""
    real_fsync, calls = os.fsync, []

    def fills(fd):
        calls.append(fd)
        if len(calls) > 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fills)


def read_only_file_system(monkeypatch) -> None:
    """Creating a folder or file fails with EROFS, as on a read-only mount (root included)."""
    import tempfile

    def refused(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def refused_file(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))

    monkeypatch.setattr(os, "mkdir", refused)
    monkeypatch.setattr(tempfile, "mkstemp", refused_file)


OPEN_CLIP_EXPORT = [*EXPORT, "@models/good.safetensors", "--format", "open_clip"]
# (id, argv, what the one line names after "--out: cannot write", the fault, a previous run to make first)
FAULTS = [
    (
        "export-disk-full-weights",
        [*OPEN_CLIP_EXPORT, "--out", "out"],
        "out/model.safetensors",
        disk_full_in_safetensors,
    ),
    ("export-disk-full-on-flush", [*OPEN_CLIP_EXPORT, "--out", "out"], "out/model.safetensors", disk_full_on_fsync),
    ("export-read-only", [*OPEN_CLIP_EXPORT, "--out", "new/out"], "new", read_only_file_system),
    ("export-disk-full-at-the-card", [*OPEN_CLIP_EXPORT, "--out", "out"], "out/README.md", disk_full_at_the_model_card),
    (
        "export-disk-full-over-a-previous-export",
        [*OPEN_CLIP_EXPORT, "--out", "out"],
        "out/README.md",
        disk_full_at_the_model_card,
        [*OPEN_CLIP_EXPORT, "--out", "out"],
    ),
    ("eval-disk-full", [*EVAL, "--attack", "none", "--out", "out"], "out/journal/", disk_full_on_fsync),
    ("eval-read-only", [*EVAL, "--attack", "none", "--out", "out"], "out", read_only_file_system),
    ("demo-disk-full", ["demo", "--no-progress", "--out", "out"], "out/foundation-student/", disk_full_on_fsync),
]


@pytest.mark.parametrize("fault", FAULTS, ids=[fault[0] for fault in FAULTS])
def test_a_full_disk_or_read_only_output_is_one_line_naming_the_file_and_nothing_is_left(
    fault, workspace, model_files, monkeypatch, capsys
):
    """The partial output folder is removed; a previous export stays as it was (its files are replaced only
    once every new file is whole)."""
    name, argv, named, simulate = fault[:4]
    argv = [arg.replace("@models", str(model_files)) for arg in argv]
    if len(fault) > 4:
        previous = [arg.replace("@models", str(model_files)) for arg in fault[4]]
        assert run_in_process(previous, workspace, monkeypatch, capsys)[0] == 0
    before = listing(workspace)
    simulate(monkeypatch)
    started = time.monotonic()
    with time_limit(CASE_SECONDS * 4):  # demo: the first stage's models are built before its first write
        code, stderr = run_in_process(argv, workspace, monkeypatch, capsys)
    monkeypatch.undo()
    check_refused((name, argv, "--out: cannot write"), code, stderr)
    assert f"'{named}" in stderr and os.strerror(errno.ENOSPC if "full" in name else errno.EROFS) in stderr, stderr
    assert listing(workspace) == before
    assert time.monotonic() - started < CASE_SECONDS * 4


def test_demo_keeps_finished_stages_and_removes_what_it_did_not_finish(tmp_path):
    """On an error (a full disk here), the stage folders this demo created without a final model and its
    evaluation journals go; finished stages (a rerun reuses them) and what was there before stay. A new output
    folder with nothing finished is removed."""
    from mmtard.cli import without_partial_stages
    from mmtard.errors import ConfigError
    from mmtard.fileio import OutputWriteError

    out = tmp_path / "demo"
    (out / "earlier-partial" / "checkpoints").mkdir(parents=True)
    with pytest.raises(OutputWriteError), without_partial_stages(out):
        (out / "finished" / "eval_journal").mkdir(parents=True)
        (out / "finished" / "model.safetensors").write_bytes(b"weights")
        (out / "partial" / "checkpoints").mkdir(parents=True)
        raise OutputWriteError("--out: cannot write 'demo/partial/checkpoints/x': No space left on device")
    assert sorted(p.name for p in out.iterdir()) == ["earlier-partial", "finished"]
    assert sorted(p.name for p in (out / "finished").iterdir()) == ["model.safetensors"]

    new = tmp_path / "new-demo"
    with pytest.raises(ConfigError), without_partial_stages(new):
        (new / "foundation-student" / "checkpoints").mkdir(parents=True)
        raise ConfigError("data.dir: unreadable")
    assert not new.exists()
