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
    run.lock            # runs/try/.lock                the PID of the process training in this folder
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from mmtard.errors import ConfigError

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


#: what :meth:`RunLock._holder` gives for a lock file it cannot read
UNREADABLE_LOCK = (-1, "?", None)


class RunLockedError(ConfigError):
    """Another live process trains in this run folder."""


class RunLock:
    """``<run>/.lock``: one training process per run folder.

    The file holds ``<pid> <host> <start>``, ``start`` the process's start time where the system tells it
    (Linux: ``/proc/<pid>/stat``; ``-`` elsewhere). It is created exclusively (``O_EXCL``) and removed when
    the run ends, however it ends; a lock left by a process that no longer exists on this host (killed with
    SIGKILL) is taken over with a warning, also when its process id now belongs to a newer process (ids are
    reused, within seconds on a busy machine with a small ``pid_max``).

    Args:
        run: the run folder.
    """

    def __init__(self, run: RunDir):
        self.run = run
        self.held = False

    def check_free(self) -> None:
        """Raise :class:`RunLockedError` naming the holder if a live process holds the lock; writes nothing."""
        holder = self._holder()
        if holder == UNREADABLE_LOCK:
            raise RunLockedError(
                f"output_dir: the lock file {self.run.lock} is unreadable (it holds {self._text()!r}, not "
                f"'<pid> <host> <start>'): a run starting in '{self.run.path}' this moment, or a damaged file; if no "
                "mmtard train runs there, remove the lock file and run again"
            )
        if holder is not None and _alive(*holder):
            pid, host, _ = holder
            where = f"process {pid}" if host == socket.gethostname() else f"process {pid} on {host}"
            raise RunLockedError(
                f"output_dir: '{self.run.path}' is in use by {where} (lock file {self.run.lock}); wait for it to "
                "end or choose another output_dir (remove the lock file only if that process is gone)"
            )

    def acquire(self) -> None:
        """Create the lock file (and the run folder); raise :class:`RunLockedError` if a live process holds it.

        A write the system refuses (a full disk) raises its ``OSError`` naming the lock file, which is removed (and
        the run folder, when this call created it).
        """
        created = not self.run.path.exists()
        self.run.path.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.run.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                self.check_free()
                logger.warning("%s: removing the lock of a process that no longer runs", self.run.lock)
                self.run.lock.unlink(missing_ok=True)
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(f"{os.getpid()} {socket.gethostname()} {_start_time(os.getpid()) or '-'}\n")
            except OSError as exc:  # a full disk: no lock file (half written or empty) nor new folder left behind
                self.run.lock.unlink(missing_ok=True)
                if created:
                    self.run.path.rmdir()
                raise OSError(exc.errno, exc.strerror, str(self.run.lock)) from None
            self.held = True
            return
        self.check_free()  # lost a race with another starting process
        raise RunLockedError(f"output_dir: could not lock '{self.run.path}' ({self.run.lock} keeps reappearing)")

    def release(self) -> None:
        if self.held:
            self.run.lock.unlink(missing_ok=True)
            self.held = False

    def _holder(self) -> tuple[int, str, str | None] | None:
        """``(pid, host, start)`` of the lock file (``start`` None when not recorded), None without one."""
        try:
            pid, host, *start = self.run.lock.read_text().split()
            if len(start) > 1:
                raise ValueError("too many fields")
            return int(pid), host, (start[0] if start and start[0] != "-" else None)
        except FileNotFoundError:
            return None
        except (ValueError, OSError, UnicodeDecodeError):
            return UNREADABLE_LOCK  # half written, or not a lock file: held until the user says otherwise

    def _text(self) -> str:
        """The start of the lock file's text, for messages."""
        try:
            return self.run.lock.read_bytes()[:40].decode("utf-8", errors="replace")
        except OSError as exc:
            return f"<{exc.strerror}>"


def _alive(pid: int, host: str, start: str | None = None) -> bool:
    """Whether process ``pid`` started at ``start`` runs (on this host; a lock from another host or unreadable
    counts as live). A process with that id but another start time is a newer one: the holder is gone."""
    if pid <= 0 or host != socket.gethostname():
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _start_time(pid)
    return start is None or now is None or now == start


def _start_time(pid: int) -> str | None:
    """Process ``pid``'s start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), None where
    there is no ``/proc`` or the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": field 3 (state) onwards
    return fields[19] if len(fields) > 19 else None
