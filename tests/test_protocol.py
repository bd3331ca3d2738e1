"""The CPU-scale protocol behind ``mmtard demo``, end to end at a toy scale, and its report."""

from __future__ import annotations

from dataclasses import replace

from mmtard.eval.protocol_report import write_protocol_report
from mmtard.protocol import DEMO_SCALE, protocol_stages, run_protocol

TOY = replace(
    DEMO_SCALE,
    batch_size=16,
    foundation_steps=2,
    teacher_steps=2,
    student_steps=2,
    train_attack_steps=1,
    eval_samples=10,
    eval_steps=1,
    eval_eps=(4 / 255,),
    train_samples=64,
)


def test_stages_reuse_foundations_and_teachers():
    stages = protocol_stages(TOY, ("tecoa", "ard", "mmt-ard"), seeds=(0, 1))
    names = [stage.name for _, stage in stages]
    assert names[:4] == ["foundation-student", "foundation-teacher", "teacher-clean", "teacher-robust"]
    assert names.count("student-mmt-ard-seed1") == 1 and len(names) == 10
    mmt = next(stage for _, stage in stages if stage.name == "student-mmt-ard-seed0")
    assert (
        mmt.teachers == {"clean": "teacher-clean", "robust": "teacher-robust"}
        and mmt.pretrained == "@foundation-student"
    )


def test_demo_protocol_runs_writes_report_and_reuses_stages(tmp_path):
    rows = run_protocol(tmp_path, TOY, progress=False)
    assert [row["stage"] for row in rows][-3:] == ["student-tecoa-seed0", "student-ard-seed0", "student-mmt-ard-seed0"]
    for row in rows:
        for split in ("seen", "unseen"):
            assert len(row[split]["classnames"]) == 5
            assert row[split]["robust"][0]["acc"] <= row[split]["clean_acc"]
    report = write_protocol_report(tmp_path, rows, "mmtard demo (test)", "toy scale")
    text = report.read_text()
    for name in ("student-mmt-ard", "student-ard", "student-tecoa", "teacher-robust", "foundation-student"):
        assert f"| {name} |" in text
    assert (tmp_path / "robust_vs_eps.png").stat().st_size > 0 and (tmp_path / "training_curves.png").stat().st_size > 0

    model = tmp_path / "teacher-robust" / "model.safetensors"
    before = model.stat().st_mtime_ns
    again = run_protocol(tmp_path, TOY, methods=("tecoa",), progress=False)
    assert model.stat().st_mtime_ns == before  # reused, not retrained
    assert again[-1]["seen"] == rows[-3]["seen"]
