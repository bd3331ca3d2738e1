"""Per-image results (issue 25): a round trip through the committed file gives back every outcome, and the
accuracies and paired intervals recomputed from it equal the rows'."""

from __future__ import annotations

import gzip
import json

import pytest

from mmtard.experiments.per_image import accuracy, read_per_image, write_per_image
from mmtard.experiments.stats import paired_bootstrap


def row(stage, clean, pgd, aa=None, **fields):
    def record(clean_outcomes, robust, indices):
        return {
            "clean_acc": accuracy(clean_outcomes),
            "robust": [{"attack": a, "eps": "4/255", "acc": accuracy(o)} for a, o in robust],
            "outcomes": {"clean": clean_outcomes, "robust": [o for _, o in robust]},
            "subset": {"indices": indices},
        }

    result = {"stage": stage, **fields}
    for split, robust_images, clean_images in (("seen", [1, 3, 5, 7], list(range(8))), ("unseen", [10, 11], [10, 11])):
        n = len(robust_images)
        result[split] = record(clean[:n], [("pgd", pgd[:n])], robust_images)
        result.setdefault("clean_all", {})[split] = record(clean.ljust(len(clean_images), "1"), [], clean_images)
        if aa is not None:
            result.setdefault("aa", {})[split] = record(clean[:n], [("aa", aa[:n])], robust_images)
    return result


def test_round_trip_keeps_every_outcome_and_recomputes_the_tables(tmp_path):
    rows = [
        row("student-ard-x-seed0", "1101", "1001", aa="1000", cell="ard", seed=0),
        row("interp0.5-ard-x-seed0", "1111", "0001", cell="ard", seed=0, control="interpolation", alpha=0.5),
        row("teacher-robust", "1111", "1100", role="teacher"),
    ]
    path = write_per_image(tmp_path / "per-image.json.gz", rows, describe="test")
    again = write_per_image(tmp_path / "again.json.gz", rows, describe="test")
    assert path.read_bytes() == again.read_bytes()  # the same results, the same bytes (no name or time inside)
    document = read_per_image(path)
    assert document["images"]["seen"] == {"clean": list(range(8)), "robust": [1, 3, 5, 7]}
    models = {m["stage"]: m for m in document["models"]}
    ard, interp = models["student-ard-x-seed0"], models["interp0.5-ard-x-seed0"]
    assert (interp["control"], interp["alpha"], ard["cell"], ard["seed"]) == ("interpolation", 0.5, "ard", 0)
    assert ard["outcomes"]["seen"] == {"clean": "11011111", "pgd@4/255": "1001", "aa@4/255": "1000"}
    assert "aa@4/255" not in interp["outcomes"]["seen"]
    for original in rows:
        outcomes = models[original["stage"]]["outcomes"]
        for split in ("seen", "unseen"):
            assert accuracy(outcomes[split]["clean"]) == original["clean_all"][split]["clean_acc"]
            assert accuracy(outcomes[split]["pgd@4/255"]) == original[split]["robust"][0]["acc"]
    # the paired difference from the file is the one from the rows
    from_file = paired_bootstrap([interp["outcomes"]["seen"]["pgd@4/255"]], [ard["outcomes"]["seen"]["pgd@4/255"]])
    from_rows = paired_bootstrap([rows[1]["seen"]["outcomes"]["robust"][0]], [rows[0]["seen"]["outcomes"]["robust"][0]])
    assert from_file.to_dict() == from_rows.to_dict()


def test_rows_on_other_images_and_foreign_files_are_refused(tmp_path):
    a, b = row("a", "1111", "1111"), row("b", "1111", "1111")
    b["seen"]["subset"]["indices"] = [0, 2, 4, 6]
    with pytest.raises(ValueError, match="b: evaluated on other seen images than a"):
        write_per_image(tmp_path / "x.json.gz", [a, b])
    assert not (tmp_path / "x.json.gz").exists()
    with gzip.open(tmp_path / "other.json.gz", "wb") as file:
        file.write(json.dumps({"models": []}).encode())
    with pytest.raises(ValueError, match="not a per-image results file"):
        read_per_image(tmp_path / "other.json.gz")
