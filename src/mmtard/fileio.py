"""Files: atomic writes, and the stamp that tells a rewritten file from the one seen before.

Every file is written to a temporary name in the same folder, flushed and fsynced, then renamed over
the target: a crash or kill mid-write leaves the previous file intact, never half a file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
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


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def weights_stamp(pretrained: str | None) -> list[int] | None:
    """Size and modification time of a local weights file (``None`` for tags and random weights)."""
    if pretrained and Path(pretrained).is_file():
        stat = Path(pretrained).stat()
        return [stat.st_size, stat.st_mtime_ns]
    return None
