"""``mmtard eval`` end to end through the real ``main(argv)`` on a tiny model."""

from __future__ import annotations

import json

import pytest

from mmtard.cli import main


def _run(tmp_path, *extra):
    out = tmp_path / "out"
    argv = [
        "eval",
        "--model",
        "tiny-vit-s",
        "--pretrained",
        "none",
        "--dataset",
        "cifar10",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]
    return main(argv), out


def test_eval_pgd_writes_results_with_schema(tmp_path, npz_dir, capsys):
    code, out = _run(
        tmp_path, "--data-dir", str(npz_dir), "--samples", "20", "--attack", "pgd", "--eps", "1/255", "4/255"
    )
    assert code == 0
    record = json.loads((out / "results.json").read_text())
    for key in ("model", "pretrained", "dataset", "samples", "clean_acc", "robust", "checks"):
        assert key in record
    assert record["samples"] == 20 and record["model"] == "tiny-vit-s" and record["pretrained"] == "none"
    assert [r["eps"] for r in record["robust"]] == ["1/255", "4/255"]
    for entry in record["robust"]:
        assert {"attack", "eps", "eps_value", "steps", "restarts", "acc"} <= set(entry)
        assert entry["attack"] == "pgd" and entry["steps"] == 10 and entry["restarts"] == 1
        assert entry["acc"] <= record["clean_acc"]
    assert record["robust"][0]["eps_value"] == pytest.approx(1 / 255)
    assert {"robust_not_above_clean", "monotonic_in_eps", "zero_gradient_fraction", "warnings"} <= set(record["checks"])
    assert "pgd 4/255 (10 steps, 1 restart)" in (out / "results.md").read_text()
    assert "| tiny-vit-s | cifar10 | 20 |" in capsys.readouterr().out


def test_eval_aa_on_the_shared_cifar10(tmp_path, cifar_dir):
    code, out = _run(
        tmp_path, "--data-dir", str(cifar_dir), "--samples", "30", "--attack", "aa", "--eps", "4/255", "--steps", "20"
    )
    assert code == 0
    record = json.loads((out / "results.json").read_text())
    assert record["robust"][0]["attack"] == "aa" and record["robust"][0]["steps"] == 20


def test_eval_several_datasets(tmp_path, npz_dir):
    out = tmp_path / "multi"
    argv = [
        "eval",
        "--model",
        "tiny-vit-s",
        "--dataset",
        "cifar10",
        "npz",
        "--data-dir",
        str(npz_dir),
        "--samples",
        "10",
        "--attack",
        "none",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    summary = json.loads((out / "results.json").read_text())
    assert [r["dataset"] for r in summary["results"]] == ["cifar10", "npz"]
    assert (out / "npz" / "results.json").is_file()


def test_eps_without_unit_is_refused(tmp_path, npz_dir, capsys):
    code, out = _run(tmp_path, "--data-dir", str(npz_dir), "--eps", "4")
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert err.startswith("mmtard eval: error: --eps:") and "4/255" in err


def test_missing_data_dir_is_one_clear_error(tmp_path, capsys):
    code, _ = _run(tmp_path, "--data-dir", str(tmp_path / "nowhere"))
    assert code == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "nowhere" in err and "Traceback" not in err


def test_class_list_mismatch_is_one_clear_error(tmp_path, npz_dir, capsys):
    (npz_dir / "classes.txt").write_text("cat\ndog\n")
    code, _ = _run(tmp_path, "--data-dir", str(npz_dir))
    assert code == 2 and "one name per label" in capsys.readouterr().err


def test_unknown_model_is_one_clear_error(tmp_path, npz_dir, capsys):
    code = main(
        ["eval", "--model", "ViT-Nope", "--dataset", "cifar10", "--data-dir", str(npz_dir), "--out", str(tmp_path)]
    )
    assert code == 2 and "unknown architecture 'ViT-Nope'" in capsys.readouterr().err
