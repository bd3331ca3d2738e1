"""``mmtard data check``: each dataset found or not, its class and image counts, what is wrong and the layout."""

from __future__ import annotations

import numpy as np
from PIL import Image

from mmtard.cli import main
from mmtard.data.check import LAYOUTS, check_dataset


def _folder(root, split, classes, per_class):
    for name in classes:
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")


def test_a_usable_image_folder_reports_its_counts(tmp_path):
    _folder(tmp_path / "dtd", "test", ["banded", "braided", "cracked"], 2)
    check = check_dataset("dtd", tmp_path / "dtd")
    assert check.found and check.usable and (check.classes, check.images) == (3, 6)
    assert check.note == "3 of the full dataset's 47 classes" and check.problem is None


def test_a_missing_folder_says_where_and_the_layout(tmp_path):
    check = check_dataset("cars", tmp_path / "cars")
    assert not check.found and not check.usable
    assert check.problem == f"'{tmp_path / 'cars'}' does not exist or is not a folder"
    assert check.expected == LAYOUTS["cars"]


def test_a_wrong_class_count_is_not_usable_and_says_why(tmp_path):
    _folder(tmp_path / "eurosat", "test", ["a", "b", "c"], 1)  # clip-benchmark names 10 classes
    check = check_dataset("eurosat", tmp_path / "eurosat")
    assert check.found and not check.usable and "10 class names given for eurosat" in check.problem


def test_folders_that_are_not_wordnet_ids_are_refused_for_imagenet(tmp_path):
    _folder(tmp_path / "imagenet", "val", ["cat", "dog"], 1)
    check = check_dataset("imagenet", tmp_path / "imagenet")
    assert check.split == "val" and not check.usable and "are not ImageNet WordNet ids" in check.problem


def test_cli_exit_0_when_all_usable_else_1_with_a_report(tmp_path, npz_dir, capsys):
    _folder(tmp_path / "dtd", "test", ["banded", "braided"], 1)
    argv = ["data", "check", "--dataset", "npz", "dtd", "--data-dir", str(npz_dir), str(tmp_path / "dtd")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"ok       npz: {npz_dir} [test]: 10 classes, 40 images" in out and "2 of 2 datasets usable" in out

    assert main(["data", "check", "--suite", "robustvlm", "--dataset", "dtd", "pets", "--data-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "ok       dtd:" in out and f"missing  pets: {tmp_path / 'pets'} [test]: " in out
    assert f"expected: {LAYOUTS['pets']}" in out and "1 of 2 datasets usable" in out


def test_cli_unknown_dataset_is_one_line_exit_2(tmp_path, capsys):
    assert main(["data", "check", "--dataset", "imagenet1k", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmtard data: error: --dataset: unknown dataset 'imagenet1k'") and err.count("\n") == 1


def test_every_image_is_decoded_and_the_first_bad_ones_are_named(tmp_path, capsys):
    """Issue 27, item 5 (and 18: a 240-megapixel PNG, a FIFO): what eval would refuse is not called usable."""
    import os
    import struct
    import zlib

    _folder(tmp_path / "img", "test", ["cat", "dog"], 3)
    png = (tmp_path / "img" / "test" / "cat" / "1.png").read_bytes()
    (tmp_path / "img" / "test" / "cat" / "1.png").write_bytes(png[: len(png) // 2])  # truncated
    (tmp_path / "img" / "test" / "dog" / "notes.jpg").write_text("not an image\n")
    os.mkfifo(tmp_path / "img" / "test" / "dog" / "pipe.png")

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 20_000, 12_000, 8, 2, 0, 0, 0))
    bomb = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 4)) + chunk(b"IEND", b"")
    (tmp_path / "img" / "test" / "dog" / "zz-huge.png").write_bytes(bomb)
    check = check_dataset("imagefolder", tmp_path / "img")
    assert check.found and not check.usable
    assert check.problem.startswith("4 of the 9 image files checked cannot be used: image file ")
    assert "cat/1.png' cannot be decoded" in check.problem and "notes.jpg' cannot be decoded" in check.problem
    assert "pipe.png' is a FIFO" in check.problem and check.problem.endswith("; ...")
    assert main(["data", "check", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "img")]) == 1
    assert "invalid  imagefolder:" in capsys.readouterr().out

    huge = check_dataset("imagefolder", tmp_path / "img", quick=True)  # 9 files: all of them are the sample
    assert huge.problem == check.problem
    (tmp_path / "img" / "test" / "dog" / "zz-huge.png").unlink()
    (tmp_path / "img" / "test" / "dog" / "pipe.png").unlink()
    (tmp_path / "img" / "test" / "dog" / "notes.jpg").unlink()
    (tmp_path / "img" / "test" / "cat" / "1.png").unlink()
    for i in range(200):
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "img" / "test" / "cat" / f"x{i}.png")
    quick = check_dataset("imagefolder", tmp_path / "img", quick=True)
    assert quick.usable and quick.note == "100 of 205 image files decoded (--quick)"


def test_a_table_into_a_closed_pipe_ends_quietly(tmp_path, npz_dir):
    """Issue 27, item 6: ``mmtard data check ... | head`` ended in a BrokenPipeError traceback."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "mmtard.cli", "data", "check", "--dataset", "npz", "--data-dir", str(npz_dir)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    proc.stdout.close()  # the reader is gone before the table is printed
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and err == "", err
