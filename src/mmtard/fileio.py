"""Files: atomic writes, writes the machine refuses, the check that a user's file is a file, and the stamp that
tells a rewritten file from the one seen before.

Every file is written to a temporary name in the same folder, flushed and fsynced, then renamed over
the target: a crash or kill mid-write leaves the previous file intact, never half a file. A write the
machine refuses (disk full, quota, read-only file system) is an ``OSError`` naming the target, not the
temporary name; :func:`reported_write_errors` makes it one :class:`OutputWriteError` naming the command's field.

A path the user gives as a file (a checkpoint, an npz, an image, a results file) is checked with
:func:`require_regular_file` before it is opened: opening a FIFO blocks until something writes to it, and a
device (``/dev/zero``, ``/dev/null``) reads as an endless or empty file, so both are refused at once.

A folder that one process at a time may write (a run folder, an evaluation's output) is guarded by a
:class:`FolderLock`, an operating-system lock on one file that ends with its process however it ends.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import yaml
from filelock import FileLock, Timeout

from mmtard.errors import ConfigError

#: errno values of a write the machine refused (not a bug of the program), with what the user can do
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
WRITE_REFUSED_ERRNOS = FULL_ERRNOS | READ_ONLY_ERRNOS


class OutputWriteError(ConfigError):
    """A file could not be written: the disk is full, a quota is reached, or the folder is read-only."""


class NotARegularFileError(ConfigError):
    """A path given as a file is a FIFO, a socket or a device (reading it would hang or never end)."""


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


def require_regular_file(path: str | Path, field: str, expected: str = "a file") -> Path:
    """``path`` as a ``Path`` when it is a regular file (or a link to one); nothing is opened.

    Args:
        path: the file.
        field: the flag or config field that named it; the message starts with it.
        expected: what the file should be, for the message (``"a checkpoint file"``).

    Raises:
        FileNotFoundError: nothing at ``path`` (callers with their own message check existence first).
        NotARegularFileError: a FIFO, socket, device or folder: ``"<field>: '<path>' is a FIFO (named pipe),
            expected a regular file (<expected>)"``.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode  # stat never blocks, even on a FIFO
    except FileNotFoundError:
        raise FileNotFoundError(f"{field}: '{path}' does not exist (expected {expected})") from None
    if stat.S_ISREG(mode):
        return path
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise NotARegularFileError(f"{field}: '{path}' is {kind}, expected a regular file ({expected})")


@contextmanager
def reported_write_errors(field: str, where: str | Path) -> Iterator[None]:
    """A write the machine refuses inside (see ``WRITE_REFUSED_ERRNOS``) becomes one :class:`OutputWriteError`:
    ``"<field>: cannot write '<file>': No space left on device; free space or choose another folder"``.
    A refused read of a file (``EACCES``) inside is reported the same way: give this only code that writes.

    Args:
        field: the command's output flag or field (``--out``).
        where: the output folder, named when the error carries no file name.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno not in WRITE_REFUSED_ERRNOS:
            raise
        target = exc.filename if exc.filename is not None else where
        remedy = "free space or choose another folder" if exc.errno in FULL_ERRNOS else "choose a writable folder"
        raise OutputWriteError(
            f"{field}: cannot write '{target}': {exc.strerror or os.strerror(exc.errno)}; {remedy}"
        ) from None


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    A refused write (``WRITE_REFUSED_ERRNOS``) of the temporary file is an ``OSError`` of the same errno
    whose ``filename`` is ``path``; the temporary file is removed.
    """
    path = Path(path)
    with _named_after(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _named_after(path):
            yield tmp_path
            # mkstemp makes 0600, and a writer may replace the file (safetensors does): give the final file the
            # permissions of any file this user creates, after it is written
            os.chmod(tmp_path, 0o666 & ~current_umask())
            with open(tmp_path, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, path)
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def _named_after(path: Path) -> Iterator[None]:
    """A refused write of ``path``'s temporary file (or of no named file) is reported as one of ``path``."""
    try:
        yield
    except OSError as exc:
        named = None if exc.filename is None else Path(os.path.abspath(exc.filename))
        is_temporary = (
            named is not None
            and named.parent == Path(os.path.abspath(path.parent))
            and named.name.startswith(f".{path.name}.")
        )
        if exc.errno in WRITE_REFUSED_ERRNOS and (named is None or is_temporary):
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        raise


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks; computed once per (file, size, modification time)."""
    info = Path(path).stat()
    return _cached_sha256(os.path.abspath(path), info.st_size, info.st_mtime_ns)


@functools.cache
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(pretrained: str | None) -> str | None:
    """The SHA-256 of a local weights file (``None`` for tags and random weights)."""
    return file_sha256(pretrained) if pretrained and Path(pretrained).is_file() else None


def weights_stamp(pretrained: str | None) -> list[int] | None:
    """Size and modification time of a local weights file (``None`` for tags and random weights)."""
    if pretrained and Path(pretrained).is_file():
        stat = Path(pretrained).stat()
        return [stat.st_size, stat.st_mtime_ns]
    return None


class FolderLock:
    """An operating-system lock on the file ``path`` (``filelock``: ``flock`` on Unix), taken without waiting.

    The system drops the lock when its process ends, however it ends (SIGKILL included), so a lock left by a
    killed process blocks nothing. While held, the file holds ``<pid> <host>`` of its holder, read only to name
    it in messages; what the file holds decides nothing (a damaged or stale file blocks nothing). Released, the
    lock's file is emptied and stays: removing it would let a process that opened it a moment before and one
    that creates it anew hold two files of one name at once. The lock is held until :meth:`release`, or until
    this object is garbage collected: keep it.

    Args:
        path: the lock file (created when the lock is first taken).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock: FileLock | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._lock is not None

    def is_held(self) -> bool:
        """Whether a process (this one included, through another object) holds the lock; creates nothing."""
        if self.held:
            return True
        if not self.path.is_file():
            return False
        probe = FileLock(self.path, timeout=0)
        try:
            probe.acquire()
        except Timeout:
            return True
        probe.release()
        return False

    def acquire(self) -> bool:
        """Take the lock (creating its file) and write ``<pid> <host>`` into it; False when another holds it.

        Raises:
            OSError: the system refused the note's write (a full disk), naming the file; the lock is released.
        """
        lock = FileLock(self.path, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return False
        try:
            self.path.write_text(f"{os.getpid()} {socket.gethostname()}\n")
        except OSError as exc:
            lock.release()
            raise OSError(exc.errno, exc.strerror, str(self.path)) from None
        self._lock = lock
        return True

    def release(self) -> None:
        """Empty the lock's file and release the lock (nothing when this object does not hold it)."""
        if self._lock is None:
            return
        with suppress(OSError):  # a folder removed or made read-only since: the lock is released all the same
            os.truncate(self.path, 0)
        self._lock.release()
        self._lock = None

    def holder(self) -> str:
        """The holder named in the lock's file, for messages: ``process 123``, ``process 123 on node7``, or
        ``another process`` when the file names none (the holder is writing it this moment)."""
        try:
            pid, host = self.path.read_text().split()
            int(pid)
        except (OSError, UnicodeDecodeError, ValueError):
            return "another process"
        return f"process {pid}" if host == socket.gethostname() else f"process {pid} on {host}"


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"the key {key!r} is written twice (the second would silently win)",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml_file(path: str | Path, field: str, expected: str) -> object:
    """The YAML value of a regular UTF-8 file, read with :class:`UniqueKeyLoader`.

    Raises:
        FileNotFoundError: nothing at ``path``.
        NotARegularFileError: a folder, FIFO or device.
        ConfigError: naming ``field`` and the file: unreadable, not UTF-8, not YAML (with the line and column),
            a key written twice, or nested too deeply to read.
    """
    path = require_regular_file(path, field, expected)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read '{path}' ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{field}: '{path}' is not UTF-8 text (byte {exc.start}); expected {expected}") from None
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{field}: '{path}' is not valid YAML{where}: {problem}") from None
    except RecursionError:  # the YAML parser recurses once per nesting level
        raise ConfigError(f"{field}: '{path}' is nested too deeply to be {expected}") from None
