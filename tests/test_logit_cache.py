"""The clean-teacher ``LogitCache``: the in-memory default, and the disk-backed fp16 memory-mapped store; the
method's ``cache_dir`` (one store per teacher name)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmtard.errors import ConfigError
from mmtard.methods import create_method, method_config
from mmtard.methods.logit_cache import LogitCache
from mmtard.models.zeroshot import ZeroShotClassifier

ROWS, CLASSES = 12, 5


class CountingTeacher(nn.Module):
    """Logits = a fixed linear map of the flattened image; counts the images it is asked to forward."""

    def __init__(self, classes: int = CLASSES, scale: float = 30.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, 3 * 4 * 4, generator=torch.Generator().manual_seed(0)))
        self.scale = scale
        self.forwarded = 0

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        self.forwarded += len(x)
        return self.scale * torch.tanh(x.flatten(1) @ self.weight.T)


def _images(rows: int = ROWS) -> torch.Tensor:
    return torch.rand(rows, 3, 4, 4, generator=torch.Generator().manual_seed(1))


def _batch(images: torch.Tensor, keys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.tensor(keys)
    return images[index], index


def test_in_memory_default_is_exact_and_forwards_each_row_once():
    teacher, images, cache = CountingTeacher(), _images(), LogitCache()
    x, index = _batch(images, [0, 3, 5])
    first = cache.logits(teacher, x, index)
    assert torch.equal(first, teacher(x).detach()) and teacher.forwarded == 3 + 3
    x, index = _batch(images, [3, 5, 7])
    second = cache.logits(teacher, x, index)
    assert teacher.forwarded == 6 + 1 and len(cache) == 4
    assert torch.equal(second[:2], first[1:]) and second.dtype == torch.float32


def test_disk_rows_round_trip_within_fp16_rounding(tmp_path):
    teacher, images = CountingTeacher(), _images()
    cache = LogitCache(tmp_path / "cache", rows=ROWS, identity={"teacher": "counting"})
    x, index = _batch(images, [1, 2, 8, 11])
    got = cache.logits(teacher, x, index)
    exact = teacher(x).detach()
    assert got.dtype == torch.float32 and got.shape == exact.shape
    # fp16 keeps 11 significant bits: a relative error of at most 2**-11 (one half unit in the last place)
    torch.testing.assert_close(got, exact, rtol=2**-11, atol=1e-7)
    assert torch.equal(got, exact.half().float())  # returned as stored, the first time too
    stored = np.load(tmp_path / "cache" / "logits.npy", mmap_mode="r")
    assert stored.dtype == np.float16 and stored.shape == (ROWS, CLASSES)
    np.testing.assert_array_equal(stored[[1, 2, 8, 11]], exact.half().numpy())
    filled = np.load(tmp_path / "cache" / "filled.npy")
    assert filled.tolist() == [i in (1, 2, 8, 11) for i in range(ROWS)]


def test_disk_cache_forwards_only_unseen_rows(tmp_path):
    teacher, images = CountingTeacher(), _images()
    cache = LogitCache(tmp_path / "cache", rows=ROWS)
    x, index = _batch(images, [0, 1, 2, 3])
    first = cache.logits(teacher, x, index)
    forwarded = teacher.forwarded
    x, index = _batch(images, [2, 3, 4, 9, 2])  # two seen rows, two new, one repeated
    second = cache.logits(teacher, x, index)
    assert teacher.forwarded == forwarded + 2 and len(cache) == 6
    assert torch.equal(second[:2], first[2:]) and torch.equal(second[4], first[2])


def test_a_reopened_disk_cache_reuses_its_filled_rows(tmp_path, caplog):
    teacher, images = CountingTeacher(), _images()
    identity = {"teacher": "counting", "dataset": "npz", "image_size": 4}
    written = LogitCache(tmp_path / "cache", rows=ROWS, identity=identity)
    x, index = _batch(images, [0, 4, 6])
    before = written.logits(teacher, x, index)
    del written
    with caplog.at_level(logging.INFO, logger="mmtard.methods.logit_cache"):
        reopened = LogitCache(tmp_path / "cache", rows=ROWS, identity=dict(reversed(identity.items())))
    assert len(reopened) == 3 and "reusing 3 of 12 cached rows" in caplog.text
    fresh = CountingTeacher()
    x, index = _batch(images, [6, 0, 4, 5])
    after = reopened.logits(fresh, x, index)
    assert fresh.forwarded == 1  # only row 5
    assert torch.equal(after[:3], before[[2, 0, 1]])


@pytest.mark.parametrize("change", ["identity", "rows", "meta-missing", "meta-garbage"])
def test_a_folder_of_another_cache_is_started_over(tmp_path, change, caplog):
    teacher, images = CountingTeacher(), _images()
    folder = tmp_path / "cache"
    LogitCache(folder, rows=ROWS, identity="teacher-a").logits(teacher, *_batch(images, [0, 1]))
    identity, rows = "teacher-a", ROWS
    if change == "identity":
        identity = "teacher-b"
    elif change == "rows":
        rows = ROWS + 1
    elif change == "meta-missing":  # a creation interrupted before cache.json was written
        (folder / "cache.json").unlink()
    else:
        (folder / "cache.json").write_text("{not json")
    cache = LogitCache(folder, rows=rows, identity=identity)
    assert len(cache) == 0
    if change != "meta-missing":
        assert "starting it over" in caplog.text
    forwarded = teacher.forwarded
    cache.logits(teacher, *_batch(images, [0, 1]))
    assert teacher.forwarded == forwarded + 2
    meta = json.loads((folder / "cache.json").read_text())
    assert meta["rows"] == rows and meta["identity"] == identity and meta["classes"] == CLASSES


def test_disk_cache_refusals(tmp_path):
    with pytest.raises(ConfigError, match="cache_dir: a disk cache needs rows"):
        LogitCache(tmp_path / "cache")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        LogitCache(tmp_path / "file", rows=ROWS)
    images = _images()
    cache = LogitCache(tmp_path / "cache", rows=ROWS)
    with pytest.raises(ConfigError, match="dataset index 12 is outside the cache's rows 0..11"):
        cache.logits(CountingTeacher(), images[:2], torch.tensor([0, 12]))
    with pytest.raises(ConfigError, match="beyond fp16's range"):
        cache.logits(CountingTeacher(scale=1e6), *_batch(images, [0]))
    assert len(cache) == 0  # nothing was marked filled


def test_given_classes_the_store_is_created_at_construction_and_opened_by_the_next(tmp_path):
    """The DDP order: rank 0 creates the files, the other processes (after a barrier) open the same ones."""
    first = LogitCache(tmp_path / "cache", rows=ROWS, identity="t", classes=CLASSES)
    assert json.loads((tmp_path / "cache" / "cache.json").read_text())["classes"] == CLASSES and len(first) == 0
    second = LogitCache(tmp_path / "cache", rows=ROWS, identity="t", classes=CLASSES)
    teacher, images = CountingTeacher(), _images()
    written = second.logits(teacher, *_batch(images, [2, 7]))
    assert len(first) == 2  # the same memory-mapped files: rows written by one process are seen by the other
    other_teacher = CountingTeacher()
    assert torch.equal(first.logits(other_teacher, *_batch(images, [7, 2])), written.flip(0))
    assert other_teacher.forwarded == 0


# ---------------------------------------------------------------- method.cache_dir: the method's disk caches

EPS = 8 / 255
TEACHER_KINDS = {"clip": "clean", "tecoa": "robust", "fare": "robust"}


def _classifier(seed: int, dim: int) -> ZeroShotClassifier:
    torch.manual_seed(seed)
    prototypes = F.normalize(torch.randn(CLASSES, dim), dim=-1)
    return ZeroShotClassifier(
        nn.Sequential(nn.Flatten(), nn.Linear(48, dim)), (0.5,) * 3, (0.25,) * 3, prototypes, 10.0
    )


def _teachers() -> dict[str, ZeroShotClassifier]:
    teachers = {"clip": _classifier(1, 7), "tecoa": _classifier(2, 5), "fare": _classifier(3, 9)}
    for teacher in teachers.values():
        teacher.forwarded = []
        teacher.visual.register_forward_hook(lambda m, inputs, out, t=teacher: t.forwarded.append(len(inputs[0])))
    return teachers


def _method(cache_dir, **overrides):
    cfg = method_config(
        "mmt-ard", eps=EPS, steps=1, cache_clean_teacher=True, cache_dir=None if cache_dir is None else str(cache_dir),
        **overrides,
    )  # fmt: skip
    return create_method(cfg, TEACHER_KINDS)


IDENTITY = {
    "clip": {"arch": "fake", "seed": 1},
    "tecoa": {"arch": "fake", "seed": 2},
    "fare": {"arch": "fake", "seed": 3},
}


def _step(method, teachers, keys: list[int]):
    images = _images()
    x, index = _batch(images, keys)
    y = torch.tensor(keys) % CLASSES
    torch.manual_seed(0)
    return method.use_teachers(teachers)(_classifier(0, 6).train(), x, y, index)


def test_method_cache_dir_keeps_each_teachers_clean_logits_in_its_own_fp16_folder(tmp_path):
    teachers = _teachers()
    method = _method(tmp_path / "logits", robust_target="clean")
    method.open_logit_caches(rows=ROWS, identity=IDENTITY, classes=CLASSES)
    for name in TEACHER_KINDS:  # with robust_target: clean every teacher's clean-image logits are read
        meta = json.loads((tmp_path / "logits" / name / "cache.json").read_text())
        assert meta["rows"] == ROWS and meta["classes"] == CLASSES and meta["identity"]["source"] == IDENTITY[name]
        assert np.load(tmp_path / "logits" / name / "logits.npy", mmap_mode="r").dtype == np.float16
    first = _step(method, teachers, [0, 1, 2, 3])
    assert {name: t.forwarded for name, t in teachers.items()} == {"clip": [4], "tecoa": [4], "fare": [4]}
    _step(method, teachers, [2, 3, 4, 5])
    assert {name: t.forwarded for name, t in teachers.items()} == {"clip": [4, 2], "tecoa": [4, 2], "fare": [4, 2]}

    # a later run with the same teachers and data forwards nothing and computes the same loss, bitwise
    later = _method(tmp_path / "logits", robust_target="clean")
    later.open_logit_caches(rows=ROWS, identity=IDENTITY, classes=CLASSES)
    again = _step(later, teachers, [0, 1, 2, 3])
    assert all(len(t.forwarded) == 2 for t in teachers.values())
    assert again.total().item() == first.total().item()
    # against float32 logits kept in memory: the same within fp16 rounding
    in_memory = _step(_method(None, robust_target="clean"), _teachers(), [0, 1, 2, 3])
    assert again.total().item() == pytest.approx(in_memory.total().item(), rel=1e-3)
    assert again.total().item() != in_memory.total().item()  # the fp16 store is really read


def test_method_cache_dir_holds_only_the_logits_a_step_reads(tmp_path):
    """Robust teachers distilled on x' read no clean-image logits (except the inner objective's teacher)."""
    method = _method(tmp_path / "logits")
    assert method.clean_image_readers() == ("clip",)
    method.open_logit_caches(rows=ROWS, identity=IDENTITY, classes=CLASSES)
    assert sorted(p.name for p in (tmp_path / "logits").iterdir()) == ["clip"]
    inner = _method(tmp_path / "inner", inner="kl-robust-teacher", inner_teacher="fare")
    assert inner.clean_image_readers() == ("clip", "fare")


def test_method_cache_dir_of_another_teacher_is_started_over(tmp_path):
    teachers = _teachers()
    method = _method(tmp_path / "logits")
    method.open_logit_caches(rows=ROWS, identity=IDENTITY, classes=CLASSES)
    _step(method, teachers, [0, 1])
    changed = _method(tmp_path / "logits")
    changed.open_logit_caches(rows=ROWS, identity={**IDENTITY, "clip": {"arch": "fake", "seed": 99}}, classes=CLASSES)
    _step(changed, teachers, [0, 1])
    assert teachers["clip"].forwarded == [2, 2]


def test_method_cache_dir_must_be_opened_before_a_step(tmp_path):
    method = _method(tmp_path / "logits")
    with pytest.raises(RuntimeError, match=r"open_logit_caches\(rows=...\) before the first step"):
        _step(method, _teachers(), [0, 1])
    with pytest.raises(ConfigError, match="cache_dir: .*needs cache_clean_teacher: true"):
        method_config("mmt-ard", cache_dir=str(tmp_path / "logits"))
    memory = _method(None)
    memory.open_logit_caches(rows=ROWS)  # without cache_dir: a no-op, the caches stay in memory
    assert all(cache.cache_dir is None for cache in memory.caches.values())
    create_method("tecoa").open_logit_caches(rows=ROWS)  # methods without teacher logits: a no-op
