"""``mmtard eval`` end to end through the real ``main(argv)`` on a tiny model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed
from helpers import without_seconds

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
    assert "pgd linf 4/255 (10 steps, 1 restart)" in (out / "results.md").read_text()
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


# ------------------------------------------------------------------------------- flags -> EvalRequest


def test_the_flags_become_one_request_whose_left_out_fields_keep_their_defaults(tmp_path, npz_dir):
    """Issue 26: the eval defaults are ``EvalRequest``'s alone; the CLI sets only the fields of the flags given."""
    from mmtard.cli import build_parser
    from mmtard.cli.eval_command import check_eval_args
    from mmtard.eval.run import EvalRequest

    base = ["eval", "--model", "tiny-vit-s", "--dataset", "cifar10", "--data-dir", str(npz_dir), "--out", str(tmp_path)]
    plan = check_eval_args(build_parser().parse_args([*base, "--no-progress"]))
    journal = str(tmp_path / "journal")
    assert plan.requests == [
        EvalRequest(datasets=["cifar10"], data_dirs=[str(npz_dir)], progress=False, journal_dir=journal)
    ]
    given = ["--eps", "2/255", "--norm", "l2", "--attack", "none", "pgd", "--batch-size", "7", "--workers", "1"]
    given += ["--seed", "3", "--precision", "bf16", "--logit-scale", "model", "--split", "train", "--samples", "5"]
    (request,) = check_eval_args(build_parser().parse_args([*base, *given])).requests
    assert request == EvalRequest(
        datasets=["cifar10"],
        data_dirs=[str(npz_dir)],
        split="train",
        samples=5,
        attacks=["none", "pgd"],
        eps=[2 / 255],
        norm="l2",
        batch_size=7,
        num_workers=1,
        logit_scale="model",
        seed=3,
        precision="bf16",
        journal_dir=journal,
    )


def test_eval_help_gives_the_requests_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        main(["eval", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in ("test", "pgd", "1/255 2/255 4/255", "linf", "128", "0", "100", "fp32"):
        assert f"(default: {default})" in text or f"default: {default}" in text, default


def test_a_subset_with_samples_is_refused_by_the_librarys_check_naming_the_flag(tmp_path, npz_dir, capsys):
    subset = tmp_path / "subset.json"
    entry = {"split": "test", "source_size": 40, "count": 2, "indices": [0, 1], "classes": "all"}
    subset.write_text(json.dumps({"datasets": {"cifar10": entry}}))
    code, out = _run(tmp_path, "--data-dir", str(npz_dir), "--subset", str(subset), "--samples", "3")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert err == ["mmtard eval: error: --samples: give samples or a subset, not both (a subset fixes the images)"]


# ------------------------------------------------------------------------------------------ precision


def test_precision_bf16_is_used_and_recorded(tmp_path, npz_dir):
    code, out = _run(tmp_path, "--data-dir", str(npz_dir), "--samples", "10", "--attack", "none", "--precision", "bf16")
    assert code == 0
    record = json.loads((out / "results.json").read_text())
    assert record["precision"] == "bf16" and record["samples"] == 10


def test_precision_defaults_to_fp32(tmp_path, npz_dir):
    code, out = _run(tmp_path, "--data-dir", str(npz_dir), "--samples", "10", "--attack", "none")
    assert code == 0 and json.loads((out / "results.json").read_text())["precision"] == "fp32"


def test_an_unknown_precision_is_one_clear_error_before_anything_is_written(tmp_path, npz_dir, capsys):
    code, out = _run(tmp_path, "--data-dir", str(npz_dir), "--precision", "fp16")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert err == ["mmtard eval: error: --precision: expected fp32 or bf16, got 'fp16'"]


# ---------------------------------------------------------------------------------------------- torchrun


def test_eval_joins_torchrun_processes_with_its_device(tmp_path, npz_dir, monkeypatch):
    """``mmtard eval`` calls ``start_eval_processes`` with the checked device (it starts nothing without torchrun)."""
    from mmtard import distributed

    devices = []
    real = distributed.start_eval_processes

    def recording(device, *args, **kwargs):
        devices.append(device)
        return real(device, *args, **kwargs)

    monkeypatch.setattr(distributed, "start_eval_processes", recording)
    code, _ = _run(tmp_path, "--data-dir", str(npz_dir), "--samples", "4", "--attack", "none", "--device", "cpu")
    assert code == 0 and devices == ["cpu"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_module_cli_shards_and_equals_one_process(tmp_path, npz_dir):
    """``torchrun --nproc_per_node 2 -m mmtard.cli eval ...`` as a user types it (gloo on the CPU): only rank 0
    writes and prints, and ``results.json`` equals one process's but for the wall time."""
    args = ["--data-dir", str(npz_dir), "--samples", "12", "--batch-size", "5", "--attack", "pgd", "--steps", "1"]
    args += ["--eps", "8/255", "--device", "cpu", "--seed", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}  # torchrun's temp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    launch += ["--master_port", str(port), "-m", "mmtard.cli"]
    common = ["eval", "--model", "tiny-vit-s", "--dataset", "cifar10", "--no-progress", *args]
    proc = subprocess.run(
        [*launch, *common, "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("| tiny-vit-s | cifar10 | 12 |") == 1  # the table, printed by rank 0 only
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process: the same summation order in the kernels
    try:
        assert main([*common, "--out", str(tmp_path / "single")]) == 0
    finally:
        torch.set_num_threads(threads)
    ddp, single = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("ddp", "single"))
    assert without_seconds(ddp) == without_seconds(single)
    assert not (tmp_path / "ddp" / "journal").exists()
