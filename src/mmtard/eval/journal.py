"""A per-batch journal of one evaluation, so an interrupted evaluation continues where it stopped.

A robust evaluation of a large model (APGD on 5,000 ImageNet images) runs for hours; without a journal an
interruption loses all of it. Every attack here is seeded per call (PGD draws its start from its own
generator, APGD reseeds inside an isolated RNG), so each batch's counts depend only on the model, the batch
and the settings: a resumed evaluation gives exactly the counts of an uninterrupted one.

The file is JSON lines: the first line is the evaluation's identity (model, weights file, dataset, class
names, samples, batch size, attacks...), each further line the counts of one finished batch, appended and
flushed to disk. The file name carries a digest of the identity, so two different evaluations never share a
journal; a line cut short by a crash (or damaged: not UTF-8, not JSON, without its ``batch``) is dropped and its
batch, and those after it, are run again. Resuming says in one line how many finished batches are reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from mmtard.fileio import atomic_write_text, weights_stamp  # noqa: F401 (weights_stamp: re-exported)

logger = logging.getLogger(__name__)


def _normalised(value: dict) -> dict:
    """``value`` as it reads back from JSON (tuples become lists), so headers compare equal."""
    return json.loads(json.dumps(value, sort_keys=True))


def journal_path(folder: str | Path, name: str, identity: dict) -> Path:
    """``<folder>/<name>-<digest of identity>.jsonl``."""
    digest = hashlib.sha256(json.dumps(_normalised(identity), sort_keys=True).encode()).hexdigest()[:16]
    return Path(folder) / f"{name}-{digest}.jsonl"


class EvalJournal:
    """Finished batches of one evaluation, read from and appended to ``path``.

    Args:
        path: the journal file (see :func:`journal_path`); its folder is created.
        identity: everything the counts depend on; a file whose first line differs is started over.

    Attributes:
        done: batch index -> the counts recorded for it.
    """

    def __init__(self, path: str | Path, identity: dict) -> None:
        self.path = Path(path)
        self.identity = _normalised(identity)
        self.done: dict[int, dict] = {}
        if self.path.is_file():
            lines = self.path.read_bytes().splitlines()
            if lines and self._parse(lines[0]) == self.identity:
                for number, line in enumerate(lines[1:], start=2):
                    entry = self._parse(line)
                    if entry is None or not _is_batch_number(entry.get("batch")):  # cut short by a crash, or
                        if any(rest.strip() for rest in lines[number:]):  # damaged: it and any after it run again
                            logger.warning(
                                "%s: line %d is damaged; its batch and later ones run again", self.path, number
                            )
                        break
                    self.done[entry["batch"]] = entry
                if self.done:
                    logger.warning(
                        "%s: resuming an interrupted evaluation: %d finished batches reused", self.path, len(self.done)
                    )
            else:
                logger.warning("%s: written by another evaluation; starting it over", self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [self.identity, *self.done.values()]
        atomic_write_text(self.path, "".join(json.dumps(item, sort_keys=True) + "\n" for item in kept))

    @staticmethod
    def _parse(line: bytes) -> dict | None:
        try:
            value = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            return None
        return value if isinstance(value, dict) else None

    def record(self, entry: dict) -> None:
        """Append the counts of one finished batch (a dict with ``batch``) and flush them to disk."""
        with open(self.path, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[entry["batch"]] = entry


def _is_batch_number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
