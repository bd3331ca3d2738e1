"""Evaluation output and refusals: one result per data folder, the table's shape, non-finite models, and
settings validated before a journal is written."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from helpers import CLASSES
from safetensors.torch import save_file

from mmtard.errors import ConfigError
from mmtard.eval.report import markdown_table, result_names, write_results
from mmtard.eval.run import EvalRequest, check_eval_request, evaluate_bundle
from mmtard.eval.zeroshot import NonFiniteLogitsError
from mmtard.models import load_clip
from mmtard.models.zeroshot import ZeroShotClassifier


def _corruption_folder(root, name, seed, n_per_class=2):
    """An npz folder of one CIFAR-10-C style corruption."""
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True)
    y = np.repeat(np.arange(10), n_per_class)
    np.savez(folder / "test.npz", x=rng.integers(0, 256, size=(len(y), 32, 32, 3), dtype=np.uint8), y=y)
    (folder / "classes.txt").write_text("\n".join(CLASSES))
    return folder


def _request(datasets, data_dirs, **overrides):
    settings = dict(attacks=["none"], eps=(), batch_size=8, progress=False)
    settings.update(overrides)
    return EvalRequest(datasets=datasets, data_dirs=data_dirs, **settings)


def _record(dataset, data_dir, robust=()):
    return {"model": "m", "dataset": dataset, "data_dir": data_dir, "samples": 4, "clean_acc": 50.0, "robust": robust}


def test_result_names_tell_folders_of_one_dataset_apart():
    records = [_record("npz", "/d/gaussian_noise"), _record("cifar10", "/d/c10"), _record("npz", "/e/fog blur/")]
    assert result_names(records) == ["npz-gaussian_noise", "cifar10", "npz-fog_blur"]
    same_folder_name = [_record("npz", "/a/test"), _record("npz", "/b/test"), _record("digits", None)]
    assert result_names(same_folder_name) == ["npz-1", "npz-2", "digits"]


def test_several_folders_of_one_dataset_write_one_result_each(tiny_bundle, tmp_path):
    folders = [_corruption_folder(tmp_path, name, seed) for seed, name in enumerate(("gaussian_noise", "fog"))]
    records = evaluate_bundle(tiny_bundle, _request(["npz", "npz"], [str(f) for f in folders]))
    assert [r["data_dir"] for r in records] == [str(f) for f in folders]
    out = tmp_path / "out"
    write_results(out, records)
    for folder in folders:
        record = json.loads((out / f"npz-{folder.name}" / "results.json").read_text())
        assert record["data_dir"] == str(folder) and record["samples"] == 20
    assert not (out / "npz").exists()
    summary = json.loads((out / "results.json").read_text())
    assert [r["data_dir"] for r in summary["results"]] == [str(f) for f in folders]
    table = (out / "results.md").read_text()
    assert "| tiny-vit-s | npz-gaussian_noise | 20 |" in table and "| tiny-vit-s | npz-fog | 20 |" in table


def test_clean_only_table_has_one_cell_per_column():
    table = markdown_table([_record("cifar10", "/d")])
    lines = table.splitlines()
    assert lines[0] == "| model | dataset | samples | clean |"
    assert lines[1] == "|---|---|---|---|"
    assert all(line.count("|") == 5 for line in lines)
    robust = [{"attack": "pgd", "eps": "4/255", "steps": 10, "restarts": 1, "acc": 25.0}]
    lines = markdown_table([_record("cifar10", "/d", robust)]).splitlines()
    assert lines[0] == "| model | dataset | samples | clean | pgd 4/255 (10 steps, 1 restart) |"
    assert all(line.count("|") == 6 for line in lines)


@pytest.fixture
def nan_weights(tmp_path):
    torch.manual_seed(0)
    bundle = load_clip("tiny-vit-s", "none")
    with torch.no_grad():
        bundle.model.visual.proj.fill_(math.nan)
    path = tmp_path / "diverged.safetensors"
    save_file({k: v.contiguous() for k, v in bundle.model.state_dict().items()}, str(path))
    return path


def test_a_model_with_non_finite_logits_is_refused(nan_weights, tmp_path):
    folder = _corruption_folder(tmp_path, "data", seed=0)
    bundle = load_clip("tiny-vit-s", str(nan_weights))
    journal = tmp_path / "journal"
    request = _request(["npz"], [str(folder)], attacks=["pgd"], eps=(4 / 255,), steps=1, journal_dir=str(journal))
    with pytest.raises(NonFiniteLogitsError, match="pretrained: the weights '.*diverged.safetensors'") as raised:
        evaluate_bundle(bundle, request)
    assert isinstance(raised.value, ConfigError)
    assert "non-finite logits on npz: logits are not finite (NaN or inf) on 8 of 8 images" in str(raised.value)
    assert not journal.exists()


def test_non_finite_logits_after_the_first_batch_are_refused_too(tiny_bundle, tmp_path, monkeypatch):
    from mmtard.eval import zeroshot

    folder = _corruption_folder(tmp_path, "data", seed=0)
    real = zeroshot._evaluate_batch
    batches = []

    def poisoned(classifier, attacks, x, y, ids):
        batches.append(1)
        if len(batches) == 2:
            x = x * math.inf  # an overflow inside the model
        return real(classifier, attacks, x, y, ids)

    monkeypatch.setattr(zeroshot, "_evaluate_batch", poisoned)
    with pytest.raises(NonFiniteLogitsError, match="non-finite logits on npz"):
        evaluate_bundle(tiny_bundle, _request(["npz"], [str(folder)]))


BAD_REQUESTS = {
    "batch_size": ({"batch_size": 0}, "batch_size: expected a whole number >= 1, got 0"),
    "num_workers": ({"num_workers": -1}, "num_workers: expected a whole number >= 0, got -1"),
    "samples": ({"samples": 0}, "samples: expected a whole number >= 1, got 0"),
    "seed": ({"seed": 1.5}, "seed: expected a whole number, got 1.5"),
    "logit_scale-text": ({"logit_scale": "abc"}, "logit_scale: expected a positive number or 'model'"),
    "logit_scale-nan": ({"logit_scale": math.nan}, "logit_scale: expected a positive number or 'model'"),
    "attack": ({"attacks": ["fgsm"], "eps": (4 / 255,)}, "attack: unknown attack 'fgsm'"),
    "steps": ({"attacks": ["pgd"], "eps": (4 / 255,), "steps": 0}, "pgd: steps: expected a whole number >= 1, got 0"),
    "eps-missing": ({"attacks": ["pgd"], "eps": ()}, "eps: give at least one radius"),
    "split": ({"split": "../test"}, "split: expected a plain name"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_settings_are_refused_before_a_journal_is_written(case, tiny_bundle, tmp_path):
    overrides, message = BAD_REQUESTS[case]
    folder = _corruption_folder(tmp_path, "data", seed=0)
    journal = tmp_path / "journal"
    request = _request(["npz"], [str(folder)], journal_dir=str(journal), **overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_eval_request(request)
    with pytest.raises(ConfigError, match=re.escape(message)):
        evaluate_bundle(tiny_bundle, request)
    assert not journal.exists()


def test_missing_data_folders_are_refused_before_any_dataset_is_read(tmp_path):
    folder = _corruption_folder(tmp_path, "data", seed=0)
    with pytest.raises(ConfigError, match="data_dir: .*absent' does not exist"):
        check_eval_request(_request(["npz", "npz"], [str(folder), str(tmp_path / "absent")]))
    with pytest.raises(ConfigError, match="--data-dir"):
        check_eval_request(_request(["cifar10"], [None]))
    with pytest.raises(ConfigError, match="data_dir: one data folder per dataset"):
        check_eval_request(_request(["npz", "npz"], [str(folder)]))
    assert check_eval_request(_request(["npz"], [str(folder)], attacks=["pgd", "aa"], eps=(1 / 255, 2 / 255)))


def test_outcomes_record_each_image_in_dataset_order_and_agree_with_the_accuracies():
    """``outcomes``: one "0"/"1" per image, clean and per attack; robust never "1" where clean is "0"."""
    from mmtard.attacks import create_attack
    from mmtard.eval.zeroshot import evaluate_classifier

    torch.manual_seed(0)
    tower = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 8))
    prototypes = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    classifier = ZeroShotClassifier(tower, (0.5,) * 3, (0.25,) * 3, prototypes, 10.0)
    images, labels = torch.rand(10, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    dataset = torch.utils.data.TensorDataset(images, labels)
    attack = create_attack("pgd", eps=8 / 255, steps=3)
    result = evaluate_classifier(classifier, dataset, [attack], batch_size=4, progress=False)
    clean, (robust,) = result.outcomes["clean"], result.outcomes["robust"]
    with torch.no_grad():
        expected = "".join("1" if c else "0" for c in (classifier(images).argmax(1) == labels).tolist())
    assert clean == expected
    assert len(robust) == 10 and set(robust) <= {"0", "1"}
    assert all(r == "0" for c, r in zip(clean, robust) if c == "0")
    assert 100.0 * clean.count("1") / 10 == result.clean_acc
    assert 100.0 * robust.count("1") / 10 == result.robust[0]["acc"]
    assert result.to_dict()["outcomes"] == {"clean": clean, "robust": [robust]}
