"""The layout of a run folder: every file name the trainer writes, in one place.

``RunDir(path)`` names the files; it creates nothing. Everything that reads or writes a run (trainer,
checkpoints, CLI, experiments, reports, benchmarks) goes through it::

    run = RunDir("runs/try")
    run.config          # runs/try/config.yaml          the resolved run config
    run.metrics         # runs/try/metrics.jsonl        one JSON object per logged step
    run.eval_log        # runs/try/eval.jsonl           periodic held-out evaluations
    run.tensorboard     # runs/try/tensorboard/         TensorBoard events (when tensorboard is installed)
    run.checkpoints     # runs/try/checkpoints/         step_00000100/ ... and the `latest` pointer
    run.latest          # runs/try/checkpoints/latest   one line naming the newest complete checkpoint
    run.model           # runs/try/model.safetensors    the final student (a plain open_clip checkpoint)
    run.final_eval      # runs/try/final_eval.json      the final held-out evaluation
    run.provenance      # runs/try/provenance.json      each start's code and machine (mmtard.provenance)
    run.lock            # runs/try/.lock                the lock of the process training in this folder
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mmtard.errors import ConfigError
from mmtard.fileio import FolderLock

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
EVAL_LOG_FILE = "eval.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MODEL_FILE = "model.safetensors"
FINAL_EVAL_FILE = "final_eval.json"
PROVENANCE_FILE = "provenance.json"
LOCK_FILE = ".lock"


@dataclass(frozen=True)
class RunDir:
    """The files of one training run's output folder.

    Args:
        path: the run folder (``output_dir`` of the run config).
    """

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def eval_log(self) -> Path:
        return self.path / EVAL_LOG_FILE

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def latest(self) -> Path:
        return self.checkpoints / LATEST_FILE

    @property
    def model(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def final_eval(self) -> Path:
        return self.path / FINAL_EVAL_FILE

    @property
    def provenance(self) -> Path:
        return self.path / PROVENANCE_FILE

    @property
    def lock(self) -> Path:
        return self.path / LOCK_FILE

    def checkpoint(self, name: str) -> Path:
        """A checkpoint folder by name (``step_00000100``)."""
        return self.checkpoints / name

    def has_checkpoint(self) -> bool:
        """Whether ``checkpoints/latest`` exists, i.e. there is a run to resume."""
        return self.latest.is_file()

    def is_finished(self) -> bool:
        """Whether the run wrote its final student (``model.safetensors``)."""
        return self.model.is_file()

    def read_metrics(self) -> list[dict]:
        """The records of ``metrics.jsonl`` (``[]`` when absent); see :func:`read_jsonl`."""
        return read_jsonl(self.metrics)

    def read_eval_log(self) -> list[dict]:
        """The records of ``eval.jsonl`` (``[]`` when absent); see :func:`read_jsonl`."""
        return read_jsonl(self.eval_log)

    def read_final_eval(self) -> dict:
        """``final_eval.json`` as a dict."""
        return json.loads(self.final_eval.read_text())


def read_jsonl(path: Path) -> list[dict]:
    """One dict per line of a JSON-lines log; ``[]`` when the file does not exist.

    A last line that is not valid JSON (a process killed while appending it) is dropped with a warning;
    a bad line anywhere else is a real corruption and raises ``json.JSONDecodeError`` whose ``doc`` is the
    file's text and ``lineno`` the line's number in the file.
    """
    if not path.exists():
        return []
    text = path.read_text()
    offset, lines = 0, []  # (offset in the file, line) of each non-blank line
    for line in text.splitlines(keepends=True):
        if line.strip():
            lines.append((offset, line.rstrip("\r\n")))
        offset += len(line)
    records = []
    for number, (start, line) in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number < len(lines):
                raise json.JSONDecodeError(exc.msg, text, start + exc.pos) from None
            logger.warning("%s: dropped a torn last line (a crash while it was written): %.60s", path, line)
    return records


class RunLockedError(ConfigError):
    """Another live process trains in this run folder."""


class RunLock:
    """``<run>/.lock``: one training process per run folder, a :class:`~mmtard.fileio.FolderLock`.

    The system releases it when the process ends, however it ends, so the lock of a process killed with SIGKILL
    does not block the next run; what the lock file holds (``<pid> <host>`` while held) only names the holder.

    Args:
        run: the run folder.
    """

    def __init__(self, run: RunDir):
        self.run = run
        self._lock = FolderLock(run.lock)

    def check_free(self) -> None:
        """Raise :class:`RunLockedError` naming the holder if a process holds the lock; writes nothing."""
        if self._lock.is_held():
            raise self._locked()

    def acquire(self) -> None:
        """Take the lock (creating the run folder and the lock file); raise :class:`RunLockedError` if a process
        holds it.

        A write the system refuses (a full disk) raises its ``OSError`` naming the lock file; a run folder this
        call created is removed.
        """
        created = not self.run.path.exists()
        self.run.path.mkdir(parents=True, exist_ok=True)
        try:
            taken = self._lock.acquire()
        except OSError:
            if created:  # no lock file nor new folder left behind
                self.run.lock.unlink(missing_ok=True)
                self.run.path.rmdir()
            raise
        if not taken:
            raise self._locked()

    def release(self) -> None:
        self._lock.release()

    def _locked(self) -> RunLockedError:
        return RunLockedError(
            f"output_dir: '{self.run.path}' is in use by {self._lock.holder()} (lock file {self.run.lock}); wait for "
            "it to end or choose another output_dir"
        )
