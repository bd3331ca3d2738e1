"""``mmtard eval --suite``: a protocol as data, tried as a new user would on a synthetic data root."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmtard.cli import main
from mmtard.errors import ConfigError
from mmtard.eval.suite import list_suites, load_suite

ZERO_SHOT_13 = [
    "cifar10", "cifar100", "stl10", "cars", "caltech101", "pets", "flowers", "dtd", "eurosat", "fgvc_aircraft",
    "pcam", "imagenet-r", "imagenet_sketch",
]  # fmt: skip


def _npz(folder, classes: int, images: int, rng) -> None:
    folder.mkdir(parents=True)
    np.savez(
        folder / "test.npz", x=rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8), y=np.arange(images) % classes
    )
    (folder / "classes.txt").write_text("\n".join(f"class {i}" for i in range(classes)))


def _image_folder(folder, classes: list[str], per_class: int, rng) -> None:
    for name in classes:
        (folder / "test" / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "test" / name / f"{i}.png")


@pytest.fixture
def data_root(tmp_path):
    """Small versions of four of the suite's datasets, each at ROOT/<name>, as the README lays them out."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    _npz(root / "cifar10", 10, 20, rng)
    _npz(root / "cifar100", 100, 100, rng)
    _image_folder(root / "dtd", ["banded", "braided", "bubbly", "cracked"], 2, rng)
    _image_folder(root / "eurosat", [f"class{i}" for i in range(10)], 1, rng)
    return root


def test_the_shipped_robustvlm_suite_is_the_standard_protocol():
    suite = load_suite("robustvlm")
    assert "robustvlm" in list_suites()
    assert [(d.name, d.split, d.samples, d.zero_shot) for d in suite.datasets[:1]] == [("imagenet", "val", 5000, False)]
    assert [d.name for d in suite.datasets[1:]] == ZERO_SHOT_13
    assert all(d.samples == 1000 and d.zero_shot for d in suite.datasets[1:])
    assert suite.attacks == ("aa",) and suite.eps == ("1/255", "2/255", "4/255") and suite.norm == "linf"


def test_missing_datasets_are_named_in_one_message_before_anything_runs(tmp_path, data_root, capsys):
    out = tmp_path / "out"
    assert (
        main(["eval", "--model", "tiny-vit-s", "--suite", "robustvlm", "--data-dir", str(data_root), "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "mmtard eval: error: --data-dir: 10 of the 14 datasets of suite robustvlm"
    )
    for name in ("imagenet", "stl10", "cars", "caltech101", "pets", "flowers", "fgvc_aircraft", "pcam", "imagenet-r"):
        assert f"{name} (expected at {data_root / name})" in err
    for name in ("cifar10 ", "cifar100 ", "dtd ", "eurosat "):
        assert name not in err
    assert not out.exists()


def test_a_suite_part_runs_and_writes_the_standard_table(tmp_path, data_root, capsys):
    suite_file = tmp_path / "mini.yaml"
    suite_file.write_text(
        "name: mini\nattacks: [pgd]\neps: [1/255, 4/255]\n"
        "datasets:\n  - {name: cifar10, samples: 10, zero_shot: false}\n  - cifar100\n  - {name: dtd, samples: 4}\n"
        "  - eurosat\n"
    )
    out = tmp_path / "out"
    argv = ["eval", "--model", "tiny-vit-s", "--suite", str(suite_file), "--data-dir", str(data_root)]
    assert main([*argv, "--steps", "2", "--no-progress", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    records = {r["dataset"]: r for r in results["results"]}
    assert results["suite"]["name"] == "mini" and list(records) == ["cifar10", "cifar100", "dtd", "eurosat"]
    assert [records[n]["samples"] for n in records] == [10, 100, 4, 10]
    table = (out / "results.md").read_text()
    assert (
        "| dataset | samples | clean | pgd linf 1/255 (2 steps, 1 restart) | pgd linf 4/255 (2 steps, 1 restart) |"
        in table
    )
    zero_shot = [records[n] for n in ("cifar100", "dtd", "eurosat")]  # cifar10 is zero_shot: false here
    means = [sum(r["clean_acc"] for r in zero_shot) / 3]
    means += [sum(r["robust"][i]["acc"] for r in zero_shot) / 3 for i in (0, 1)]
    row = next(line for line in table.splitlines() if line.startswith("| **zero-shot average** (3 datasets)"))
    assert row == "| **zero-shot average** (3 datasets) |  | " + " | ".join(f"{m:.1f}" for m in means) + " |"
    wide = table.split("## The field's layout")[1]
    assert "| setting | cifar10 | cifar100 | dtd | eurosat | zero-shot average |" in wide
    assert not (out / "journal").exists()
    assert "zero-shot average" in capsys.readouterr().out


def test_suite_fixes_its_settings_and_names_the_flag(tmp_path, data_root, capsys):
    argv = [
        "eval",
        "--model",
        "tiny-vit-s",
        "--suite",
        "robustvlm",
        "--data-dir",
        str(data_root),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--eps", "8/255"]) == 2
    assert "error: --eps: set by --suite robustvlm" in capsys.readouterr().err
    assert main([*argv, "--dataset", "mnist"]) == 2
    assert "error: --dataset: ['mnist'] are not datasets of suite robustvlm" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\neps: [4/255]\n", "datasets: expected a non-empty list"),
        ("datasets: [cifar10]\neps: [4]\n", "eps"),
        ("datasets: [{name: cifar10, samples: 0}]\n", "samples: expected a whole number >= 1"),
        ("datasets: [cifar10]\nradii: [1]\n", "unknown keys ['radii']"),
    ],
)
def test_a_wrong_suite_file_is_one_error_naming_the_key(tmp_path, text, message):
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="^suite: ") as info:
        load_suite(path)
    assert message in str(info.value)


class Crash(Exception):
    pass


def test_an_interrupted_suite_continues_where_it_stopped(tmp_path, data_root, monkeypatch):
    from mmtard.eval import zeroshot

    suite_file = tmp_path / "two.yaml"
    suite_file.write_text("name: two\nattacks: [pgd]\neps: [4/255]\ndatasets: [{name: cifar10, samples: 10}, dtd]\n")
    real, calls = zeroshot._evaluate_batch, []

    def counted(*args):
        calls.append(len(args[3]))
        if len(calls) == 4:  # cifar10's 3 batches of 4, 4, 2 are done; dtd's first is interrupted
            raise Crash("interrupted")
        return real(*args)

    monkeypatch.setattr(zeroshot, "_evaluate_batch", counted)
    argv = ["eval", "--model", "tiny-vit-s", "--suite", str(suite_file), "--data-dir", str(data_root), "--steps", "1"]
    argv += ["--batch-size", "4", "--no-progress", "--out", str(tmp_path / "out")]
    with pytest.raises(Crash):
        main(argv)
    assert calls == [4, 4, 2, 4] and (tmp_path / "out" / "journal").is_dir()
    calls.clear()
    assert main(argv) == 0
    assert calls == [4, 4]  # dtd's 8 images only: cifar10 came from the journal
    records = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert [r["samples"] for r in records] == [10, 8]
