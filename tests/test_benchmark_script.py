"""Helpers of ``benchmarks/zoo_benchmark.py`` and its cells (the run itself is by hand: hours on 2 cores)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mmtard.experiments.cells import ABLATION, BASELINES, CALIBRATED, CALIBRATION, CELLS, RECIPES, Job, make_jobs
from mmtard.methods import method_config

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo_benchmark.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("zoo_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_cell_is_a_valid_config_and_the_lists_name_cells():
    for cell in CELLS.values():
        assert cell.config().name == cell.preset
    assert set(BASELINES) | set(ABLATION) | set(CALIBRATION) <= set(CELLS) and CALIBRATED in RECIPES
    # issue 16: the ablation measures mmt-ard's settings, never a setting that drops one of its parts
    assert all(CELLS[name].preset == "mmt-ard" for name in ABLATION)
    assert all(CELLS[name].config().clean_input != "adversarial" for name in ABLATION)
    assert CELLS["mmt-ard"].config() == method_config("mmt-ard")
    assert CELLS["mmt-ard-adv"].config() == method_config("mmt-ard-adv")


def test_a_job_is_a_cell_a_recipe_and_a_seed_in_its_own_folder():
    jobs = make_jobs(["ard", "mmt-ard_rho9"], ["lr1e-3"], [0, 2])
    assert [job.stage for job in jobs] == [
        "student-ard-lr1e-3-seed0",
        "student-ard-lr1e-3-seed2",
        "student-mmt-ard_rho9-lr1e-3-seed0",
        "student-mmt-ard_rho9-lr1e-3-seed2",
    ]
    job = jobs[2]
    assert job == Job(CELLS["mmt-ard_rho9"], RECIPES["lr1e-3"], 0)
    ((name, variant),) = job.variants().items()
    assert name == "mmt-ard_rho9-lr1e-3" and variant["method"] == "mmt-ard" and variant["rho"] == 9.0
    assert variant["train"] == {"steps": 200, "lr": 1e-3, "attack_steps": 2, "weight_decay": 1e-4}
    assert CELLS["mmt-ard_fare"].variant(RECIPES["issue8"])["more_teachers"] == {"fare": "robust"}
    # issue 25: LoRA students and the regime (a tenth of the learning rate, 4x the images seen)
    assert CELLS["ard_lora"].variant(RECIPES["lr2e-3"])["finetune"] == "lora"
    assert "finetune" not in CELLS["ard"].variant(RECIPES["lr2e-3"])
    regime, calibrated = RECIPES["lr2e-4-800"], RECIPES[CALIBRATED]
    assert regime.steps == 4 * calibrated.steps and regime.lr == pytest.approx(calibrated.lr / 10)


def record(clean, pgd4, aa4=None, samples=4, pgd_outcomes="1100", aa_outcomes="1000"):
    robust = [{"attack": "pgd", "eps": e, "acc": pgd4 + 10 * i} for i, e in enumerate(("4/255", "2/255", "1/255"))]
    outcomes = {"clean": "1110", "robust": [pgd_outcomes, "1110", "1110"]}
    result = {"clean_acc": clean, "robust": robust, "samples": samples, "outcomes": outcomes}
    if aa4 is not None:
        result = {**result, "robust": [{"attack": "aa", "eps": "4/255", "acc": aa4}]}
        result["outcomes"] = {"clean": "1110", "robust": [aa_outcomes]}
    return result


def student(cell, seed, clean_outcomes="1111", aa_outcomes="1000"):
    clean_all = {
        "clean_acc": 100.0 * clean_outcomes.count("1") / 4,
        "samples": 4,
        "outcomes": {"clean": clean_outcomes},
    }
    return {
        "stage": f"student-{cell}-lr1e-3-seed{seed}",
        "cell": cell,
        "preset": CELLS[cell].preset,
        "recipe": "lr1e-3",
        "seed": seed,
        "seen": record(75.0, 50.0),
        "unseen": record(75.0, 50.0),
        "clean_all": {"seen": clean_all, "unseen": clean_all},
        "aa": {split: record(75.0, 0, aa4=25.0, aa_outcomes=aa_outcomes) for split in ("seen", "unseen")},
    }


def test_headline_records_carry_cell_preset_and_the_paired_difference_to_ard(bench):
    rows = [student("ard", s, "1100", "1000") for s in (0, 1)] + [student("mmt-ard", s, "1111", "1100") for s in (0, 1)]
    diffs = bench.differences(rows, "student-ard-lr1e-3")
    assert set(diffs) == {"student-mmt-ard-lr1e-3"}
    clean = diffs["student-mmt-ard-lr1e-3"]["unseen/clean"]
    assert clean.mean == pytest.approx(50.0) and clean.seeds == 2 and clean.images == 4  # 4/4 against 2/4
    records = bench.headline_records(rows, diffs, {"student-ard-lr1e-3": [200, 180]}, "student-ard-lr1e-3")
    assert len(records) == 4  # one per (cell, split)
    mmt = next(r for r in records if r["cell"] == "mmt-ard" and r["split"] == "unseen")
    assert (mmt["preset"], mmt["recipe"], mmt["seeds"]) == ("mmt-ard", "lr1e-3", [0, 1])
    assert mmt["clean_mean"] == 100.0 and mmt["clean_samples"] == 4 and mmt["aa4_mean"] == 25.0
    assert mmt["vs_baseline"]["aa4"]["mean"] == pytest.approx(25.0)  # 2/4 against 1/4 robust images
    assert mmt["baseline"] == "student-ard-lr1e-3" and "control" not in mmt
    ard = next(r for r in records if r["cell"] == "ard" and r["split"] == "seen")
    assert ard["preset"] == "ard" and ard["steps_to_baseline_final"] == [200, 180] and ard["vs_baseline"] == {}


def test_controls_are_marked_in_the_headline_records(bench):
    anchor = student("mmt-ard_diwref_selfanchor", 0)
    frontier = dict(student("ard", 0), stage="interp0.5-ard-lr1e-3-seed0", control="interpolation", alpha=0.5)
    records = bench.headline_records([student("ard", 0), anchor, frontier], {}, {}, "student-ard-lr1e-3")
    by_model = {(r["model"], r["split"]): r for r in records}
    assert by_model[("student-mmt-ard_diwref_selfanchor-lr1e-3", "seen")]["control"] == "self-anchor"
    interp = by_model[("interp0.5-ard-lr1e-3", "unseen")]
    assert (interp["control"], interp["alpha"], interp["cell"]) == ("interpolation", 0.5, "ard")
    assert "control" not in by_model[("student-ard-lr1e-3", "seen")]
    lines = bench.frontier_lines([frontier, dict(frontier, alpha=0.25)], "lr1e-3")
    assert lines == [["foundation-student", "interp0.25-ard-lr1e-3", "interp0.5-ard-lr1e-3", "student-ard-lr1e-3"]]


def test_the_baseline_is_the_more_robust_of_ard_and_ard_rslad(bench):
    ard = [student("ard", s) for s in (0, 1)]
    rslad = [student("ard_rslad", s) for s in (0, 1)]
    for row in rslad:
        row["aa"] = {split: record(75.0, 0, aa4=50.0) for split in ("seen", "unseen")}  # ard's aa is 25
    assert bench.stronger_baseline([*ard, *rslad], "lr1e-3") == "student-ard_rslad-lr1e-3"
    del rslad[1]["aa"]  # aa not on every seed of both: PGD-10 decides (a tie keeps ard, the first)
    assert bench.stronger_baseline([*ard, *rslad], "lr1e-3") == "student-ard-lr1e-3"
    assert bench.stronger_baseline(ard, "lr1e-3") == "student-ard-lr1e-3"


def test_aa_on_fewer_seeds_is_compared_on_those_and_the_tables_say_which(bench):
    """aa on seed 0 only (of 2): its mean and its paired difference come from seed 0 and the tables name it."""
    rows = [student("ard", s, "1100", "1000") for s in (0, 1)] + [student("mmt-ard", s, "1111", "1100") for s in (0, 1)]
    for row in rows:
        if row["seed"] == 1:
            del row["aa"]
    diffs = bench.differences(rows, "student-ard-lr1e-3")["student-mmt-ard-lr1e-3"]
    assert diffs["seen/aa4"].seeds == 1 and diffs["seen/clean"].seeds == 2
    assert diffs["seen/aa4"].mean == pytest.approx(25.0)
    table = bench.differences_table({"student-mmt-ard-lr1e-3": diffs}, "student-ard-lr1e-3")
    assert "| student-mmt-ard-lr1e-3 | 2 | +50.0" in table and "(1 of them)" in table
    accuracy = bench.accuracy_table(rows, "seen", 4)
    assert (
        "| student-mmt-ard-lr1e-3 | 0, 1 | 100.0 ± 0.0 | 70.0 ± 0.0 | 60.0 ± 0.0 | 50.0 ± 0.0 | 25.0 (seed 0) |"
        in accuracy
    )


def test_against_adds_the_differences_to_another_cell_such_as_the_lora_baseline(bench):
    """``--against ard_lora``: the LoRA candidate against the LoRA baseline (issue 25's hypothesis 5), beside the
    main table against the stronger full fine-tune."""
    rows = [student("ard", 0, "1100"), student("ard_lora", 0, "1000"), student("mmt-ard_diwref_lora", 0, "1110")]
    interp = dict(student("ard", 0), stage="interp0.5-ard-lr1e-3-seed0", control="interpolation", alpha=0.5)
    (section,) = bench.against_sections([*rows, interp], [], ["student-ard_lora-lr1e-3"])
    assert "interp0.5-ard" not in section  # another baseline's frontier point
    assert section.startswith("## Differences against `student-ard_lora-lr1e-3` (`--against`)")
    diffs = bench.differences(rows, "student-ard_lora-lr1e-3")
    assert diffs["student-mmt-ard_diwref_lora-lr1e-3"]["seen/clean"].mean == pytest.approx(50.0)  # 3/4 against 1/4
    assert "| student-mmt-ard_diwref_lora-lr1e-3 | 1 | +50.0" in section
    assert bench.against_sections(rows, [], ["student-tecoa-lr1e-3"]) == []  # no such students: nothing
    with pytest.raises(SystemExit):
        bench.parse_args(["--against", "no-such-cell"])


def test_calibration_table_states_each_target_beside_the_result(bench):
    def calibrated(cell, unseen_clean, pgd4):
        row = student(cell, 0)
        row["clean_all"]["unseen"] = {"clean_acc": unseen_clean}
        row["seen"] = record(70.0, pgd4)
        return row | {"train_seconds": 100.0}

    table = bench.calibration_table([calibrated("tecoa", 58.0, 36.0), calibrated("ard", 70.0, 31.0)])
    assert "| lr1e-3 | tecoa | 1 | 100.0 | 36.0 | 58.0 | unseen clean ≤ 60, PGD ≥ 35 | yes | 100 |" in table
    assert "| lr1e-3 | ard | 1 | 100.0 | 31.0 | 70.0 | unseen clean ≤ 66, PGD ≥ 30 | no | 100 |" in table


def test_efficiency_counts_steps_to_the_baselines_final_held_out_accuracy(bench, tmp_path):
    def run(cell, curve):
        stage = f"student-{cell}-lr1e-3-seed0"
        folder = tmp_path / stage
        folder.mkdir()
        metrics = [{"step": s, "samples_per_s": 32.0} for s in range(1, 101)]  # 2 s per step at batch 64
        (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        evals = [{"step": s, "robust": [{"attack": "pgd", "eps": "4/255", "acc": a}]} for s, a in curve]
        (folder / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
        return {"stage": stage, "cell": cell, "seed": 0, "batch_size": 64}

    rows = [
        run("ard", [(20, 5.0), (40, 12.0), (60, 20.0)]),
        run("mmt-ard", [(20, 21.0), (40, 25.0), (60, 30.0)]),
        run("reference", [(20, 1.0), (40, 2.0), (60, 3.0)]),
        {"stage": "student-tecoa-lr1e-3-seed0", "cell": "tecoa", "seed": 0},
    ]
    table, steps = bench.efficiency(tmp_path, rows, "student-ard-lr1e-3")
    assert steps == {"student-ard-lr1e-3": [60], "student-mmt-ard-lr1e-3": [20], "student-reference-lr1e-3": [None]}
    assert "| student-mmt-ard-lr1e-3 | 0 | 2.00 | 30.0 | 20 |" in table
    assert "| student-reference-lr1e-3 | 0 | 2.00 | 3.0 | not reached |" in table


def test_unknown_cell_or_recipe_is_one_usage_error(bench, capsys):
    with pytest.raises(SystemExit) as info:
        bench.parse_args(["--cells", "mmt-ard_nope"])
    assert info.value.code == 2 and "--cells: unknown ['mmt-ard_nope']" in capsys.readouterr().err


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


@pytest.mark.slow
def test_the_benchmark_runs_end_to_end_in_worker_processes(tmp_path, monkeypatch):
    """Calibration and the main run on a random-weight zoo and a small synthetic CIFAR-10 folder, two spawned
    workers (the path GPU runs use): rows, tables, and headline records with cell, preset and the paired difference."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from mmtard.experiments.protocol import GIVEN_STAGES
    from mmtard.models import load_clip
    from mmtard.train import RunDir

    zoo, data = tmp_path / "zoo", tmp_path / "cifar"
    for seed, stage in enumerate(GIVEN_STAGES):
        torch.manual_seed(seed)
        state = load_clip("tiny-vit-s" if stage == "foundation-student" else "tiny-vit-l", "none").model.state_dict()
        (zoo / stage).mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(RunDir(zoo / stage).model))
    data.mkdir()
    rng = np.random.default_rng(0)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (data / "classes.txt").write_text("\n".join(classes) + "\n")
    for split, per_class in (("train", 8), ("test", 4)):
        y = np.repeat(np.arange(10), per_class)
        np.savez(data / f"{split}.npz", x=rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8), y=y)
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # spawned workers import the script by its module name
    module = importlib.import_module("zoo_benchmark")
    common = ["--zoo", str(zoo), "--data-dir", str(data), "--out", str(tmp_path / "out"), "--seeds", "0", "--jobs", "2"]
    common += ["--batch-size", "8", "--eval-samples", "10", "--eval-every", "1"]
    module.main([*common, "--calibrate", "smoke"])
    calibration = (tmp_path / "out" / "calibration.md").read_text()
    assert "| smoke | tecoa | 1 |" in calibration and "| smoke | ard | 1 |" in calibration

    module.main([*common, "--recipe", "smoke", "--cells", "ard", "mmt-ard", "--ablation"])
    report = (tmp_path / "out" / "benchmark.md").read_text()
    assert "| student-mmt-ard-smoke |" in report and "| teacher-robust | given |" in report
    assert "Differences against `student-ard-smoke`" in report and "Not in these tables yet" not in report
    assert "## Protocol check (distillation images: transfer)" in report and "- P1 (the clean teacher" in report
    check = json.loads((tmp_path / "out" / "protocol-check.json").read_text())
    assert {(r["distill_images"], r["images"]) for r in check} == {
        (d, i) for d in ("train", "transfer") for i in ("distill", "held-out")
    }
    from mmtard.experiments.per_image import read_per_image

    per_image = read_per_image(tmp_path / "out" / "per-image.json.gz")
    # seen classes: the held-out half of their 20 test images, never the half the students distilled on
    assert per_image["images"]["seen"]["clean"] == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19]
    assert {m["stage"] for m in per_image["models"]} >= {"student-ard-smoke-seed0", "teacher-robust"}
    records = json.loads((tmp_path / "out" / "zoo-headline.json").read_text())
    assert {(r["cell"], r["preset"], r["split"]) for r in records} == {
        (cell, cell, split) for cell in ("ard", "mmt-ard") for split in ("seen", "unseen")
    }
    mmt = next(r for r in records if r["cell"] == "mmt-ard" and r["split"] == "seen")
    assert mmt["clean_samples"] == 10 and mmt["robust_samples"] == 10 and mmt["aa4_mean"] is not None
    assert set(mmt["vs_baseline"]) == {"clean", "pgd4", "aa4"} and len(mmt["vs_baseline"]["aa4"]["ci95"]) == 2
    assert all(
        (tmp_path / "out" / plot).stat().st_size > 0 for plot in ("pareto.png", "pareto_pgd.png", "lambda_r.png")
    )

    module.main(
        [*common, "--recipe", "smoke", "--cells", "ard", "--ablation", "--no-zoo-models", "--out", str(tmp_path / "o2")]
    )
    assert "| teacher-robust | given |" not in (tmp_path / "o2" / "benchmark.md").read_text()
    lora = ["--ablation", "ard_lora", "--against", "ard_lora"]  # a LoRA student: trained, merged, evaluated
    module.main([*common, "--recipe", "smoke", "--cells", "ard", *lora, "--zoo-models", "foundation-student"])
    report = (tmp_path / "out" / "benchmark.md").read_text()
    assert "| foundation-student | given |" in report and "| teacher-robust | given |" not in report
    assert "| student-ard_lora-smoke | 0 |" in report and "Differences against `student-ard_lora-smoke`" in report
    # the frontier control: the finished ard student, interpolated with the foundation at each alpha
    assert all(f"| interp{a}-ard-smoke | 0 |" in report for a in ("0.25", "0.5", "0.75"))


def test_pareto_points_put_clean_accuracy_on_every_image_beside_the_robust_one():
    """The plot's x is the tables' clean accuracy (``clean_all``, every test image), its y the attack's accuracy;
    a model without that attack is left out."""
    from mmtard.experiments.report import pareto_points

    rows = [student("ard", s, clean) for s, clean in ((0, "1100"), (1, "1110"))]
    aa_rows = [dict(r, seen=r["aa"]["seen"], unseen=r["aa"]["unseen"]) for r in rows]
    ((name, seeds, clean, clean_std, robust, robust_std),) = pareto_points(aa_rows, "unseen", "aa", "4/255")
    assert (name, seeds) == ("student-ard-lr1e-3", 2)
    assert clean == pytest.approx(62.5) and clean_std == pytest.approx(17.6777, abs=1e-3)  # 50 and 75, not 75
    assert (robust, robust_std) == (25.0, 0.0)
    assert pareto_points(rows, "seen", "aa", "4/255") == []  # PGD rows: no aa point
    given = {"stage": "teacher-clean", "role": "teacher", "seen": record(80.0, 40.0)}
    ((_, _, clean, *_),) = pareto_points([given], "seen", "pgd", "4/255")
    assert clean == 80.0  # no clean_all: the robust evaluation's own clean accuracy


def test_margin_above_the_baselines_interpolation_frontier(bench):
    """Foundation (clean 100 %, PGD 0 %), ard interpolated at 0.5 (75 %, 25 %), ard (50 %, 50 %): at a candidate's
    PGD 50 % the frontier is at clean 50 %, so a candidate with clean 75 % lies 25 points above it."""

    def model(stage, cell, clean, pgd, **fields):
        row = student(cell, 0, clean) if cell else {"stage": stage, "role": "foundation"}
        all_images = {"clean_acc": 0.0, "samples": 4, "outcomes": {"clean": clean}}
        split_record = record(0.0, 0.0, pgd_outcomes=pgd)
        return (
            row
            | {"stage": stage, "clean_all": {"seen": all_images, "unseen": all_images}}
            | {"seen": split_record, "unseen": split_record, **fields}
        )

    rows = [
        model("student-ard-lr1e-3-seed0", "ard", "1100", "1100"),
        model("interp0.5-ard-lr1e-3-seed0", "ard", "1110", "1000", control="interpolation", alpha=0.5),
        model("student-mmt-ard-lr1e-3-seed0", "mmt-ard", "1110", "1100"),
    ]
    given = [model("foundation-student", None, "1111", "0000")]
    margins = bench.frontier_margins(rows, given, "student-ard-lr1e-3")
    assert set(margins) == {"student-mmt-ard-lr1e-3"}
    assert margins["student-mmt-ard-lr1e-3"]["unseen"].mean == pytest.approx(25.0)
    table = bench.frontier_table(margins, "student-ard-lr1e-3")
    assert "| student-mmt-ard-lr1e-3 | 1 | +25.0 [" in table
    assert bench.frontier_margins(rows, [], "student-ard-lr1e-3") == {}  # no foundation: no frontier
    assert bench.frontier_margins(rows, given, "student-mmt-ard-lr1e-3") == {}  # no controls of its own: none
    line = bench.no_frontier_line(rows, "student-mmt-ard-lr1e-3")  # the report says so, and how to add them
    assert "No interpolation frontier of `student-mmt-ard-lr1e-3`" in line and "`--frontier mmt-ard`" in line


def test_the_pareto_plot_gives_the_interpolation_controls_one_grey_legend_entry(monkeypatch, tmp_path):
    """The controls are crosses on the dashed frontier, one legend entry for all of them; models keep their own."""
    from mmtard.experiments import report

    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.append(fig))
    ard = dict(student("ard", 0), role="ard-lr1e-3")
    controls = [
        dict(ard, stage=f"interp{a}-ard-lr1e-3-seed0", role="control", control="interpolation", alpha=a)
        for a in (0.25, 0.5)
    ]
    given = dict(ard, stage="foundation-student", role="foundation", cell=None)
    lines = [["foundation-student", "interp0.25-ard-lr1e-3", "interp0.5-ard-lr1e-3", "student-ard-lr1e-3"]]
    report.plot_pareto([given, ard, *controls], tmp_path / "p.png", attack="pgd", eps="4/255", lines=lines)
    labels = [t.get_text() for t in figures[0].axes[1].get_legend().get_texts()]
    assert sorted(labels) == [
        "foundation-student (given)",
        "interpolation controls (alpha 0 to 1 on each dashed line)",
        "student-ard-lr1e-3 (1 seed)",
    ]
