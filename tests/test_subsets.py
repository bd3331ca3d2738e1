"""Pinned subsets (``--subset``) and evaluation that does not depend on the batch size."""

from __future__ import annotations

import json

import pytest
import torch

from mmtard.attacks import create_attack
from mmtard.attacks.functional import random_start
from mmtard.attacks.pgd import sample_generator
from mmtard.cli import main
from mmtard.data import create_dataset
from mmtard.errors import ConfigError
from mmtard.eval import evaluate_classifier
from mmtard.eval.subset import indices_sha256, read_subset
from mmtard.models import build_zero_shot_classifier


def _eval(tmp_path, name, npz_dir, *extra):
    out = tmp_path / name
    argv = ["eval", "--model", "tiny-vit-s", "--dataset", "npz", "--data-dir", str(npz_dir), "--attack", "pgd"]
    assert main([*argv, "--eps", "4/255", "--steps", "2", "--no-progress", "--out", str(out), *extra]) == 0
    return out


def _without_times(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("seconds",)}


def test_results_record_the_indices_and_a_subset_round_trips(tmp_path, npz_dir):
    first = _eval(tmp_path, "first", npz_dir, "--samples", "12", "--seed", "3")
    record = json.loads((first / "results.json").read_text())
    subset = record["subset"]
    assert subset["count"] == record["samples"] == 12 and subset["source_size"] == 40 and subset["split"] == "test"
    assert subset["sha256"] == indices_sha256(subset["indices"]) and len(set(subset["indices"])) == 12
    assert read_subset(first / "subset.json") == {"npz": subset}

    # someone else's list, from either file: exactly those images, and two runs give identical records
    runs = [_eval(tmp_path, f"again{i}", npz_dir, "--subset", str(first / file)) for i, file in
            enumerate(["subset.json", "results.json", "subset.json"])]  # fmt: skip
    again = [json.loads((out / "results.json").read_text()) for out in runs]
    assert again[0]["subset"] == subset
    assert _without_times(again[0]) == _without_times(again[1]) == _without_times(again[2])
    assert again[0]["clean_acc"] == record["clean_acc"] and again[0]["robust"] == record["robust"]


def test_a_hand_written_subset_is_evaluated_exactly(tmp_path, npz_dir):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"datasets": {"npz": {"split": "test", "indices": [39, 0, 7]}}}))
    out = _eval(tmp_path, "mine", npz_dir, "--subset", str(path))
    record = json.loads((out / "results.json").read_text())
    assert record["samples"] == 3 and record["subset"]["indices"] == [39, 0, 7]


@pytest.mark.parametrize(
    ("subset", "message"),
    [
        ({"npz": {"indices": [0, 40]}}, "--subset: npz index 40 is outside its test split of 40 images"),
        ({"npz": {"indices": [1, 1]}}, "--subset: the npz indices repeat an image"),
        ({"npz": {"indices": [1], "source_size": 50}}, "--subset: the npz indices were taken from a split of 50"),
        ({"cifar10": {"indices": [1]}}, "--subset: no images of npz in it (it has cifar10)"),
        ({"npz": {"indices": [1, 2], "sha256": "0" * 64}}, "do not match their sha256"),
    ],
)
def test_a_wrong_subset_is_one_error(tmp_path, npz_dir, capsys, subset, message):
    path = tmp_path / "subset.json"
    path.write_text(json.dumps({"datasets": subset}))
    argv = ["eval", "--model", "tiny-vit-s", "--dataset", "npz", "--data-dir", str(npz_dir), "--attack", "none"]
    assert main([*argv, "--subset", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_subset_and_samples_together_are_refused(tmp_path):
    path = tmp_path / "subset.json"
    path.write_text(json.dumps({"datasets": {"npz": {"indices": [1]}}}))
    with pytest.raises(ConfigError, match="^samples: give samples or a subset's indices"):
        create_dataset("digits", None, indices=[1], samples=3)


def test_clean_and_pgd_do_not_change_with_the_batch_size(tiny_bundle, npz_dir):
    """PMG-AFT #1: results that rise with the batch size. Same images, same seed: the same counts at any size."""
    data = create_dataset("npz", npz_dir, image_size=tiny_bundle.image_size)
    classifier = build_zero_shot_classifier(tiny_bundle, data.classnames, ["a photo of a {}."])
    with torch.no_grad():  # class means of the image embeddings as prototypes: most right, so PGD has work
        x = torch.stack([data[i][0] for i in range(len(data))])
        features = classifier.embed(x)
        means = torch.stack([features[data.labels == k].mean(0) for k in range(10)])
        classifier.prototypes.copy_(torch.nn.functional.normalize(means, dim=-1))
    attack = create_attack("pgd", eps="1/255", steps=3, seed=7)
    results = [evaluate_classifier(classifier, data, [attack], batch_size=b, progress=False) for b in (1, 7, 40)]
    assert results[0].clean_acc > 0 and results[0].robust[0]["acc"] > 0
    for other in results[1:]:
        assert other.clean_acc == results[0].clean_acc and other.robust == results[0].robust


def test_pgd_start_of_a_sample_does_not_depend_on_its_batch():
    """The per-sample random start: sample 5 starts at the same point alone and in a batch with others."""
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    for norm in ("linf", "l2"):
        together = random_start(x, 4 / 255, norm, [sample_generator(1, i, x.device) for i in (3, 4, 5, 6)])
        alone = random_start(x[2:3], 4 / 255, norm, [sample_generator(1, 5, x.device)])
        assert torch.equal(together[2:3], alone)
        assert not torch.equal(together[0], random_start(x[:1], 4 / 255, norm, [sample_generator(1, 9, x.device)])[0])


def _clean(tmp_path, name, npz_dir, *extra) -> dict:
    out = tmp_path / name
    argv = ["eval", "--model", "tiny-vit-s", "--dataset", "npz", "--data-dir", str(npz_dir), "--attack", "none"]
    assert main([*argv, "--no-progress", "--out", str(out), *extra]) == 0
    return json.loads((out / "results.json").read_text())


def test_a_run_replays_its_own_subset_of_a_class_selection(tmp_path, npz_dir):
    """Issue 27, item 10: the images of ``--classes seen`` hold labels 0..4 only; 10 class names still fit them."""
    first = _clean(tmp_path, "a", npz_dir, "--classes", "seen", "--samples", "8")
    again = _clean(tmp_path, "b", npz_dir, "--classes", "seen", "--subset", str(tmp_path / "a" / "subset.json"))
    assert first["subset"]["classes"] == "seen" and again["subset"] == first["subset"]
    assert again["clean_acc"] == first["clean_acc"] and again["classnames"] == first["classnames"]


def test_a_split_holding_only_the_first_labels_fits_a_longer_class_list(tmp_path):
    """Issue 27, item 10: a split of labels 0..4 with the usual 10-name classes.txt (the names give the head)."""
    import numpy as np
    from helpers import CLASSES

    folder = tmp_path / "data"
    folder.mkdir()
    np.savez(folder / "test.npz", x=np.zeros((5, 32, 32, 3), dtype=np.uint8), y=np.arange(5))
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    data = create_dataset("npz", folder, image_size=32)
    assert data.classnames == CLASSES and len(data) == 5
    (folder / "classes.txt").write_text("\n".join(CLASSES[:4]) + "\n")  # fewer names than labels: refused
    with pytest.raises(ConfigError, match="^classnames: 4 class names given for npz"):
        create_dataset("npz", folder, image_size=32)


def test_a_subset_pins_its_class_selection(tmp_path, npz_dir, capsys, caplog):
    """Issue 27, item 4: reused without ``--classes``, the subset's selection is used with a line saying so; with
    other ``--classes``, one error. An older subset (no ``classes``) whose images fall outside the classes asked for
    is one error too, not a silently smaller set."""
    first = _clean(tmp_path, "unseen", npz_dir, "--classes", "unseen", "--samples", "10")
    subset = str(tmp_path / "unseen" / "subset.json")
    with caplog.at_level("WARNING"):
        again = _clean(tmp_path, "again", npz_dir, "--subset", subset)
    assert "its images were chosen with classes unseen" in caplog.text
    assert again["classes"] == "unseen" and again["classnames"] == first["classnames"]
    assert again["clean_acc"] == first["clean_acc"]

    argv = ["eval", "--model", "tiny-vit-s", "--dataset", "npz", "--data-dir", str(npz_dir), "--attack", "none"]
    capsys.readouterr()
    assert main([*argv, "--subset", subset, "--classes", "all", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmtard eval: error: --subset: its npz images were chosen with classes")
    older = tmp_path / "older.json"
    entry = json.loads((tmp_path / "unseen" / "subset.json").read_text())["datasets"]["npz"]
    del entry["classes"]
    older.write_text(json.dumps({"datasets": {"npz": entry}}))
    assert main([*argv, "--subset", str(older), "--classes", "seen", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--subset: 10 of its 10 npz images are of classes outside classes='seen'" in err[0]
    assert not (tmp_path / "out").exists()
