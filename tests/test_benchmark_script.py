"""Helpers of ``benchmarks/cpu_protocol.py`` (the run itself is by hand: about two hours on 2 cores)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mmtard.methods import method_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_protocol.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("cpu_protocol", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_ablation_cell_is_a_valid_config_and_candidates_are_cells(bench):
    for spec in bench.ABLATION.values():
        method_config(spec["method"], **{k: v for k, v in spec.items() if k not in ("method", "more_teachers")})
    assert set(bench.CANDIDATES) <= set(bench.ABLATION)
    v1 = method_config("mmt-ard", **{k: v for k, v in bench.SPEC_V1.items() if k != "method"})
    assert (v1.diw, v1.balance, v1.rho, v1.robust_target, v1.inner) == (
        "cosine",
        "sigmoid",
        1.0,
        "adversarial",
        "kl-clean-teacher",
    )


def test_default_cell_is_the_cell_with_the_presets_settings(bench):
    cell = bench.default_cell()
    assert cell is not None  # the preset's defaults were measured as an ablation cell
    spec = bench.ABLATION[cell]
    assert method_config("mmt-ard", **{k: v for k, v in spec.items() if k != "method"}) == method_config("mmt-ard")


def test_student_jobs_one_per_student_and_seed(bench):
    jobs = bench.student_jobs(("ard", "tecoa"), {"x": {"method": "mmt-ard"}}, [0, 1])
    assert jobs == [
        (("ard",), {}, 0),
        (("ard",), {}, 1),
        (("tecoa",), {}, 0),
        (("tecoa",), {}, 1),
        ((), {"x": {"method": "mmt-ard"}}, 0),
        ((), {"x": {"method": "mmt-ard"}}, 1),
    ]


def record(clean, pgd4, aa4=None, samples=200):
    robust = [{"attack": "pgd", "eps": e, "acc": pgd4 + 10 * i} for i, e in enumerate(("4/255", "2/255", "1/255"))]
    if aa4 is not None:
        robust.append({"attack": "aa", "eps": "4/255", "acc": aa4})
    return {"clean_acc": clean, "robust": robust, "samples": samples}


def row(stage, method, seed, seen, unseen, role=None):
    return {"stage": stage, "method": method, "seed": seed, "role": role or method, "seen": seen, "unseen": unseen}


def test_headline_records_are_means_and_stds_over_seeds(bench):
    pgd_rows = [row(f"student-ard-seed{s}", "ard", s, record(50 + s, 20 + s), record(60, 30)) for s in range(3)]
    aa_rows = [
        row(f"student-ard-seed{s}", "ard", s, record(50 + s, 20 + s, aa4=10 + 2 * s), record(60, 30, 5))
        for s in range(3)
    ]
    records = bench.headline_records(pgd_rows, aa_rows, {"student-ard": [100, 80, None]})
    seen = next(r for r in records if r["split"] == "seen")
    assert seen["method"] == "ard" and seen["seeds"] == [0, 1, 2] and seen["model"] == "student-ard"
    assert seen["clean_mean"] == 51.0 and seen["clean_std"] == 1.0
    assert seen["aa4_mean"] == 12.0 and seen["aa4_std"] == 2.0 and seen["aa4_samples"] == 200
    assert seen["pgd4_mean"] == 21.0 and seen["steps_to_ard_final"] == [100, 80, None]
    unseen = next(r for r in records if r["split"] == "unseen")
    assert unseen["clean_std"] == 0.0 and unseen["aa4_mean"] == 5.0


def test_efficiency_counts_steps_to_ards_final_held_out_accuracy(bench, tmp_path):
    def run(stage, method, curve):
        folder = tmp_path / stage
        folder.mkdir()
        metrics = [{"step": s, "samples_per_s": 32.0} for s in range(1, 101)]  # 2 s per step at batch 64
        (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        evals = [{"step": s, "robust": [{"attack": "pgd", "eps": "4/255", "acc": a}]} for s, a in curve]
        (folder / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
        return {"stage": stage, "method": method, "seed": 0, "role": method, "batch_size": 64}

    rows = [
        run("student-ard-seed0", "ard", [(20, 5.0), (40, 12.0), (60, 20.0)]),
        run("student-mmt-ard_x-seed0", "mmt-ard", [(20, 21.0), (40, 25.0), (60, 30.0)]),
        run("student-reference-seed0", "reference", [(20, 1.0), (40, 2.0), (60, 3.0)]),
        {"stage": "student-tecoa-seed0", "method": "tecoa", "seed": 0, "role": "tecoa"},
    ]
    table, steps = bench.efficiency(tmp_path, rows)
    assert steps == {"student-ard": [60], "student-mmt-ard_x": [20], "student-reference": [None]}
    assert "| student-mmt-ard_x | 0 | 2.00 | 30.0 | 20 | 40 |" in table
    assert "| student-reference | 0 | 2.00 | 3.0 | not reached | - |" in table


def test_job_stage_names_the_students_folder(bench):
    assert bench.job_stage((("ard",), {}, 2)) == "student-ard-seed2"
    assert bench.job_stage(((), {"mmt-ard_gap_ardinner": {}}, 0)) == "student-mmt-ard_gap_ardinner-seed0"


@pytest.fixture(scope="module")
def bundle():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bundle.py"
    spec = importlib.util.spec_from_file_location("gpu_bundle", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bundle_jpeg_round_trip_shares_one_header(bundle, tmp_path):
    import numpy as np

    ramp = np.linspace(0, 1, 32)
    smooth = np.stack(  # smooth colour ramps, what JPEG keeps well, a different one per image
        [np.stack([np.add.outer(ramp, ramp * k / 6) * 100 + 20 * c for c in range(3)], -1) for k in range(6)]
    ).astype(np.uint8)
    packed = bundle.encode_jpeg(smooth, quality=90)
    assert packed["jpeg_lengths"].sum() == packed["jpeg_body"].size and len(packed["jpeg_lengths"]) == 6
    np.savez(tmp_path / "x.npz", **packed)
    decoded = bundle.decode_jpeg(np.load(tmp_path / "x.npz"))
    assert decoded.shape == smooth.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - smooth).mean() < 3  # lossy, but the same images


def test_gpu_bundle_cifar10_unpacks_to_the_npz_layout(bundle, tmp_path):
    import numpy as np

    source = tmp_path / "src"
    source.mkdir()
    (source / "classes.txt").write_text("a\nb\n")
    images = np.full((4, 32, 32, 3), 128, np.uint8)
    for split in ("train", "test"):
        np.savez(source / f"{split}.npz", x=images, y=np.array([0, 1, 0, 1]), orig_index=np.arange(4))
    bundle.pack_cifar10(source, tmp_path / "packed")
    bundle.unpack_cifar10(tmp_path / "packed", tmp_path / "out")
    for split in ("train", "test"):
        data = np.load(tmp_path / "out" / f"{split}.npz")
        assert sorted(data.files) == ["orig_index", "x", "y"]
        assert data["x"].shape == images.shape and data["y"].tolist() == [0, 1, 0, 1]
    assert (tmp_path / "out" / "classes.txt").read_text() == "a\nb\n"
