"""An interrupted evaluation continues from its journal with exactly the counts of an uninterrupted one."""

from __future__ import annotations

import json
import signal

import pytest
from helpers import lock_holder

from mmtard.cli import main
from mmtard.eval import zeroshot
from mmtard.eval.journal import EvalJournal
from mmtard.eval.run import EvalRequest, evaluate_bundle

BATCHES = 5  # 40 images of the npz fixture, batch 8


def _request(npz_dir, journal_dir, eps=(4 / 255,)):
    return EvalRequest(
        datasets=["npz"],
        data_dirs=[str(npz_dir)],
        attacks=["pgd"],
        eps=eps,
        steps=2,
        batch_size=8,
        progress=False,
        journal_dir=str(journal_dir) if journal_dir else None,
    )


def _scores(record: dict) -> tuple:
    return record["samples"], record["clean_acc"], [(r["eps"], r["acc"]) for r in record["robust"]], record["checks"]


class Crash(Exception):
    pass


def _count_batches(monkeypatch, crash_at: int | None = None) -> list[int]:
    """Count the batches actually evaluated; raise ``Crash`` on the ``crash_at``-th (1-based)."""
    calls = []
    real = zeroshot._evaluate_batch

    def counted(*args, **kwargs):
        calls.append(1)
        if crash_at is not None and len(calls) == crash_at:
            raise Crash("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(zeroshot, "_evaluate_batch", counted)
    return calls


def test_resumed_evaluation_equals_the_uninterrupted_one(tiny_bundle, npz_dir, tmp_path, monkeypatch):
    (uninterrupted,) = evaluate_bundle(tiny_bundle, _request(npz_dir, None))

    calls = _count_batches(monkeypatch, crash_at=3)
    with pytest.raises(Crash):
        evaluate_bundle(tiny_bundle, _request(npz_dir, tmp_path / "journal"))
    (journal_file,) = (tmp_path / "journal").iterdir()
    assert len(journal_file.read_text().splitlines()) == 1 + 2  # identity, then the two finished batches

    calls = _count_batches(monkeypatch)
    (resumed,) = evaluate_bundle(tiny_bundle, _request(npz_dir, tmp_path / "journal"))
    assert len(calls) == BATCHES - 2  # the finished batches are not run again
    assert _scores(resumed) == _scores(uninterrupted)


def test_a_line_cut_by_a_crash_is_run_again(tiny_bundle, npz_dir, tmp_path, monkeypatch):
    (complete,) = evaluate_bundle(tiny_bundle, _request(npz_dir, tmp_path / "journal"))
    (journal_file,) = (tmp_path / "journal").iterdir()
    lines = journal_file.read_text().splitlines()
    journal_file.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])  # batch 2 half-written

    calls = _count_batches(monkeypatch)
    (again,) = evaluate_bundle(tiny_bundle, _request(npz_dir, tmp_path / "journal"))
    assert len(calls) == BATCHES - 2
    assert _scores(again) == _scores(complete)


def test_another_evaluation_never_reuses_a_journal(tiny_bundle, npz_dir, tmp_path, monkeypatch):
    evaluate_bundle(tiny_bundle, _request(npz_dir, tmp_path / "journal"))
    calls = _count_batches(monkeypatch)
    evaluate_bundle(tiny_bundle, _request(npz_dir, tmp_path / "journal", eps=(2 / 255,)))
    assert len(calls) == BATCHES
    assert len(list((tmp_path / "journal").iterdir())) == 2


def test_a_journal_with_another_identity_is_started_over(tmp_path):
    path = tmp_path / "j.jsonl"
    first = EvalJournal(path, {"model": "a"})
    first.record({"batch": 0, "clean": 1})
    assert EvalJournal(path, {"model": "a"}).done == {0: {"batch": 0, "clean": 1}}
    assert EvalJournal(path, {"model": "b"}).done == {}
    assert json.loads(path.read_text().splitlines()[0]) == {"model": "b"}


def test_cli_eval_removes_its_journal_once_results_are_written(npz_dir, tmp_path):
    out = tmp_path / "out"
    main(
        [
            "eval",
            "--model",
            "tiny-vit-s",
            "--pretrained",
            "none",
            "--dataset",
            "npz",
            "--data-dir",
            str(npz_dir),
            "--attack",
            "pgd",
            "--steps",
            "1",
            "--eps",
            "4/255",
            "--batch-size",
            "16",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert (out / "results.json").is_file() and not (out / "journal").exists()


def test_resuming_says_in_one_line_what_is_reused(tiny_bundle, npz_dir, tmp_path, monkeypatch, caplog):
    """Issue 27, item 7: without -v (WARNING), a resumed evaluation said nothing."""
    _count_batches(monkeypatch, crash_at=3)
    with pytest.raises(Crash):
        evaluate_bundle(tiny_bundle, _request(npz_dir, tmp_path / "journal"))
    monkeypatch.undo()
    with caplog.at_level("WARNING"):
        evaluate_bundle(tiny_bundle, _request(npz_dir, tmp_path / "journal"))
    reused = [r.getMessage() for r in caplog.records if "reused" in r.getMessage()]
    assert len(reused) == 1 and reused[0].endswith("resuming an interrupted evaluation: 2 finished batches reused")


@pytest.mark.parametrize(
    "damage",
    ["clean 53 of 8 images", "not UTF-8", "no batch", "batch a string", "too deep"],
)
def test_a_damaged_journal_line_is_run_again_not_trusted(tiny_bundle, npz_dir, tmp_path, monkeypatch, caplog, damage):
    """Issue 27, items 16 and 18: a line that is not UTF-8 or lacks ``batch`` was a traceback on every rerun; one
    whose counts do not fit its batch gave a clean accuracy of 132.5 % with every check passing."""
    (complete,) = evaluate_bundle(tiny_bundle, _request(npz_dir, tmp_path / "journal"))
    (journal_file,) = (tmp_path / "journal").iterdir()
    lines = journal_file.read_bytes().splitlines()
    entry = json.loads(lines[2])
    if damage == "clean 53 of 8 images":
        entry["clean"] = 53
        lines[2] = json.dumps(entry).encode()
    elif damage == "not UTF-8":
        lines[2] = lines[2].replace(b'"batch"', b'"b\xe9tch"')
    elif damage == "no batch":
        del entry["batch"]
        lines[2] = json.dumps(entry).encode()
    elif damage == "batch a string":
        entry["batch"] = "1"
        lines[2] = json.dumps(entry).encode()
    else:
        lines[2] = b"[" * 100_000 + b"]" * 100_000
    journal_file.write_bytes(b"\n".join(lines) + b"\n")
    calls = _count_batches(monkeypatch)
    with caplog.at_level("WARNING"):
        (again,) = evaluate_bundle(tiny_bundle, _request(npz_dir, tmp_path / "journal"))
    assert _scores(again) == _scores(complete)
    assert len(calls) == (1 if damage == "clean 53 of 8 images" else BATCHES - 1)
    assert "do not fit its 8 images" in caplog.text or "line 3 is damaged" in caplog.text


def test_the_lock_of_an_evaluation_that_was_killed_is_taken_over(npz_dir, tmp_path):
    """Issue 27, item 19: one eval per --out (two at once removed each other's journal); the lock of a process
    killed with SIGKILL (the system releases it) does not block the rerun that continues it."""
    lock = tmp_path / "out" / "journal" / ".lock"
    argv = ["eval", "--model", "tiny-vit-s", "--dataset", "npz", "--data-dir", str(npz_dir), "--attack", "none"]
    holder = lock_holder(lock)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock.read_text().split()[0] == str(holder.pid)  # its lock file still names it
    assert main([*argv, "--no-progress", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "results.json").is_file() and not (tmp_path / "out" / "journal").exists()
