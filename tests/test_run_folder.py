"""What ``mmtard train`` does to a run folder it cannot or must not write (issue 27, items 12 and 13): a finished
run is never replaced by a run without ``--resume``, and a full disk is one line of error that leaves no lock file,
no half-written checkpoint and no new folder behind. A full disk is simulated by making the write raise
``OSError(ENOSPC)`` (or safetensors' ``SafetensorError`` around it), as no test here can mount a small tmpfs.

The run folder's lock (issue 26) is the system's: a process holding it refuses another run, naming it; a process
killed with SIGKILL holds it no more; what the lock file holds blocks nothing.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
from pathlib import Path

import pytest
from helpers import MMT_ARD, as_argv, lock_holder, lock_released, make_npz_dir, same_weights, small
from safetensors import SafetensorError

from mmtard.cli import main
from mmtard.train import checkpoint as ckpt
from mmtard.train.rundir import RunDir, RunLock, RunLockedError

SETS = ("train.steps=3", "train.checkpoint_every=1", "eval.final=false")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_npz_dir(tmp_path_factory.mktemp("run-folder-data") / "cifar10", train_per_class=4, test_per_class=1)


def listing(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_a_finished_run_is_not_replaced_by_a_run_without_resume(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = as_argv(MMT_ARD, small(data_dir, out, *SETS))
    assert main(argv) == 0
    capsys.readouterr()
    before = listing(out)
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"mmtard train: error: output_dir: '{out}' holds a finished run (model.safetensors)"), line
    assert "--resume" in line and "another output_dir" in line
    assert listing(out) == before  # the model, metrics.jsonl, provenance.json and checkpoints as they were


def test_a_full_disk_while_locking_is_one_line_and_leaves_no_lock(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_write_text = Path.write_text

    def full_disk_at_the_lock(path, text, *args, **kwargs):
        if path.name == ".lock":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk_at_the_lock)
    argv = as_argv(MMT_ARD, small(data_dir, out, *SETS))
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert line == (
        f"mmtard train: error: output_dir: cannot write '{out / '.lock'}': No space left on device; free space or "
        "choose another folder"
    )
    assert not out.exists()  # no lock file, no run folder
    monkeypatch.undo()  # space freed: the next run is not refused
    assert main(argv) == 0 and RunDir(out).is_finished() and lock_released(RunDir(out).lock)


def test_a_full_disk_while_checkpointing_is_one_line_and_the_resume_is_bitwise(data_dir, tmp_path, monkeypatch, capsys):
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert main(as_argv(MMT_ARD, small(data_dir, reference, *SETS))) == 0
    real_save_file, saves = ckpt.save_file, []

    def room_for_one_checkpoint(tensors, path, *args, **kwargs):
        saves.append(path)
        if len(saves) > 1:  # safetensors' own error around the system's
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", room_for_one_checkpoint)
    argv = as_argv(MMT_ARD, small(data_dir, out, *SETS))
    capsys.readouterr()
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"mmtard train: error: output_dir: cannot write '{saves[1]}': No space left on device"), line
    run = RunDir(out)
    assert lock_released(run.lock) and not list(run.checkpoints.glob(".tmp_*"))  # nothing half written
    assert run.latest.read_text().strip() == "step_00000001" and not run.model.exists()
    monkeypatch.undo()
    assert main([*argv, "--resume", "latest"]) == 0
    assert same_weights(run.model, RunDir(reference).model)


# ------------------------------------------------------------------------------------ the run folder's lock


def test_a_held_lock_refuses_naming_its_process_and_a_sigkill_frees_it(tmp_path):
    run = RunDir(tmp_path / "run")
    holder = lock_holder(run.lock)
    try:
        with pytest.raises(RunLockedError) as refused:
            RunLock(run).check_free()
        assert str(refused.value) == (
            f"output_dir: '{run.path}' is in use by process {holder.pid} (lock file {run.lock}); wait for it to end "
            "or choose another output_dir"
        )
        with pytest.raises(RunLockedError, match=f"in use by process {holder.pid} "):
            RunLock(run).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert run.lock.read_text().split()[0] == str(holder.pid)  # the killed process's note stays, and blocks nothing
    RunLock(run).check_free()
    lock = RunLock(run)
    lock.acquire()
    assert run.lock.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    with pytest.raises(RunLockedError, match=f"in use by process {os.getpid()} "):
        RunLock(run).check_free()  # held by this process: a second run in it is refused too
    lock.release()
    assert lock_released(run.lock)


@pytest.mark.parametrize(
    "text",
    [b"\x00\xff not a lock \x07", b"", f"{os.getpid()} {socket.gethostname()}\n".encode(), b"7 another-host\n"],
    ids=["garbage", "empty", "a-live-process-that-holds-no-lock", "another-host"],
)
def test_what_a_lock_file_holds_blocks_nothing(tmp_path, text):
    """Only a held lock refuses a run: a damaged lock file, an empty one, or one naming a process that holds no
    lock (alive, or on another host) is taken, and its text replaced by this process's."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.lock.write_bytes(text)
    RunLock(run).check_free()
    lock = RunLock(run)
    lock.acquire()
    assert run.lock.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    lock.release()
    assert lock_released(run.lock)


def test_a_run_in_a_folder_with_a_garbage_lock_file_proceeds(data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_bytes(b"\x00\xff not a lock \x07")
    assert main(as_argv(MMT_ARD, small(data_dir, out, *SETS))) == 0
    assert RunDir(out).is_finished() and lock_released(RunDir(out).lock)
