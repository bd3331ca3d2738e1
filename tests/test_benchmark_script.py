"""Helpers of ``benchmarks/cpu_protocol.py`` (the run itself is by hand: about two hours on 2 cores)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mmtard.protocol import ProtocolScale

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_protocol.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("cpu_protocol", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ablation_covers_the_whole_diw_by_balance_grid(bench):
    cells = {(d, b) for d in bench.DIW_MODES for b in bench.BALANCES}
    assert len(cells) == 16
    for diw, balance in cells - {(bench.DEFAULT_DIW, bench.DEFAULT_BALANCE)}:
        assert bench.ABLATION[bench.grid_stage_name(diw, balance)] == {
            "method": "mmt-ard",
            "diw": diw,
            "balance": balance,
        }
    assert bench.grid_stage_name("cosine", "sigmoid") == "mmt-ard"  # the default is the headline student
    assert set(bench.CANDIDATES) <= set(bench.ABLATION)  # the candidates trained for every seed are ablation cells


def _record(clean: float, eps: str, value: float, acc: float, zero: float, attack: str = "aa") -> dict:
    robust = [{"attack": attack, "eps": eps, "eps_value": value, "steps": 100, "restarts": 1, "acc": acc}]
    checks = {
        "robust_not_above_clean": True,
        "monotonic_in_eps": True,
        "stronger_attack_not_weaker": None,
        "zero_gradient_fraction": zero,
        "warnings": [],
    }
    return {"clean_acc": clean, "robust": robust, "checks": checks, "seconds": 1.0, "eps_values": [eps]}


def test_each_radius_is_evaluated_alone_and_the_checks_see_all_radii(bench, monkeypatch, tmp_path):
    # 2/255 is found *more* robust than 1/255: each single-radius record passes, the merged one must not.
    acc = {1 / 255: (20.0, 0.0), 2 / 255: (30.0, 0.25)}
    calls = []

    def fake_evaluate_stage(scale, arch, model_file, progress):
        (eps,) = scale.eval_eps
        calls.append(eps)
        name = f"{round(eps * 255)}/255"
        return {split: _record(50.0, name, eps, *acc[eps]) for split in ("seen", "unseen")}

    monkeypatch.setattr(bench, "evaluate_stage", fake_evaluate_stage)
    scale = ProtocolScale(eval_attacks=("aa",), eval_eps=(1 / 255, 2 / 255))
    row = bench.evaluate_each_setting(scale, {"stage": "s", "arch": "tiny-vit-s"}, tmp_path)
    assert calls == [1 / 255, 2 / 255]
    seen = row["seen"]
    assert [e["acc"] for e in seen["robust"]] == [20.0, 30.0] and seen["eps_values"] == ["1/255", "2/255"]
    assert seen["checks"]["monotonic_in_eps"] is False and seen["checks"]["warnings"]
    assert seen["checks"]["zero_gradient_fraction"] == 0.25 and seen["seconds"] == 2.0


def test_radii_evaluated_on_different_samples_are_refused(bench, monkeypatch, tmp_path):
    def fake_evaluate_stage(scale, arch, model_file, progress):
        (eps,) = scale.eval_eps
        return {split: _record(50.0 if eps < 2 / 255 else 48.0, "x", eps, 10.0, 0.0) for split in ("seen", "unseen")}

    monkeypatch.setattr(bench, "evaluate_stage", fake_evaluate_stage)
    scale = ProtocolScale(eval_attacks=("aa",), eval_eps=(1 / 255, 2 / 255))
    with pytest.raises(RuntimeError, match="clean accuracy differs between settings"):
        bench.evaluate_each_setting(scale, {"stage": "s", "arch": "tiny-vit-s"}, tmp_path)


def test_aa_weaker_than_pgd_on_the_same_images_is_flagged(bench, monkeypatch, tmp_path):
    acc = {"pgd": 30.0, "aa": 34.0}  # aa finds fewer errors than PGD-10: a broken attack or gradient masking
    calls = []

    def fake_evaluate_stage(scale, arch, model_file, progress):
        (attack,), (eps,) = scale.eval_attacks, scale.eval_eps
        calls.append((attack, eps))
        return {split: _record(50.0, "4/255", eps, acc[attack], 0.0, attack) for split in ("seen", "unseen")}

    monkeypatch.setattr(bench, "evaluate_stage", fake_evaluate_stage)
    scale = ProtocolScale(eval_attacks=("pgd", "aa"), eval_eps=(4 / 255,))
    row = bench.evaluate_each_setting(scale, {"stage": "s", "arch": "tiny-vit-s"}, tmp_path)
    assert calls == [("pgd", 4 / 255), ("aa", 4 / 255)]
    assert row["unseen"]["checks"]["stronger_attack_not_weaker"] is False
    assert row["unseen"]["eps_values"] == ["4/255"]


def test_grid_table_places_each_variant_in_its_cell(bench):
    def row(stage, clean, robust):
        return {
            "stage": f"student-{stage}-seed0",
            "seen": {"clean_acc": clean, "robust": [{"eps": "4/255", "acc": robust}]},
        }

    table = bench.grid_table([row("mmt-ard", 53.0, 12.0), row("diw=reference,balance=mtard", 49.0, 24.5)], "seen")
    lines = table.splitlines()
    assert lines[0] == "| DIW \\ balance | fixed | sigmoid | ratio | mtard |"
    assert lines[3] == "| cosine | - | 53.0 / 12.0 | - | - |"
    assert lines[5] == "| reference | - | - | - | 49.0 / 24.5 |"
