"""Per-image results of a benchmark, small enough to commit (issue 25): whether each evaluated image was classified
correctly, clean and under each attack, for every model, so that the tables and the paired intervals can be
recomputed from a clone without retraining.

The file is gzip-compressed JSON. The images are listed once per split and measurement (every model is evaluated on
the same images): ``images[split]["clean"]`` (clean accuracy, every evaluated image) and ``images[split]["robust"]``
(the attacks' images), as positions in the CIFAR-10 ``test.npz`` split. Each model has, per split, the outcome
string of each measurement (``"1"`` correct, ``"0"`` not, in the images' order).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path

from mmtard.fileio import atomic_path

SPLITS = ("seen", "unseen")
FORMAT = "mmtard-per-image-1"
ROW_FIELDS = ("stage", "cell", "preset", "recipe", "seed", "control", "alpha", "role")


def _measurements(row: dict, split: str) -> dict[str, str]:
    """``clean`` (every evaluated image) and ``<attack>@<eps>`` (e.g. ``pgd@4/255``) -> outcomes."""
    measured = {"clean": row.get("clean_all", row)[split]["outcomes"]["clean"]}
    for record in (row[split], row.get("aa", {}).get(split)):
        if record is None:
            continue
        for entry, outcomes in zip(record["robust"], record["outcomes"]["robust"]):
            measured[f"{entry['attack']}@{entry['eps']}"] = outcomes
    return measured


def per_image_document(rows: Sequence[dict], describe: str = "") -> dict:
    """The per-image document of ``rows`` (benchmark rows with ``clean_all``, the PGD records per split and, where
    run, ``aa``).

    Raises:
        ValueError: two rows evaluated on different images of a split (they could not be compared).
    """
    images: dict[str, dict] = {}
    models = []
    for row in rows:
        for split in SPLITS:
            found = {
                "clean": row.get("clean_all", row)[split]["subset"]["indices"],
                "robust": row[split]["subset"]["indices"],
            }
            if images.setdefault(split, found) != found:
                raise ValueError(f"{row['stage']}: evaluated on other {split} images than {models[0]['stage']}")
        model = {key: row[key] for key in ROW_FIELDS if row.get(key) is not None}
        model["outcomes"] = {split: _measurements(row, split) for split in SPLITS}
        models.append(model)
    return {"format": FORMAT, "describe": describe, "images": images, "models": models}


def write_per_image(path: str | Path, rows: Sequence[dict], describe: str = "") -> Path:
    """Write :func:`per_image_document` of ``rows`` to ``path`` (gzip JSON), atomically."""
    path = Path(path)
    data = json.dumps(per_image_document(rows, describe), separators=(",", ":")).encode()
    with atomic_path(path) as tmp, open(tmp, "wb") as raw, gzip.GzipFile("", "wb", fileobj=raw, mtime=0) as file:
        file.write(data)  # no name or time in the header: the same results give the same bytes
    return path


def read_per_image(path: str | Path) -> dict:
    """A per-image document written by :func:`write_per_image`.

    Raises:
        ValueError: the file is not such a document.
    """
    with gzip.open(path, "rb") as file:
        document = json.loads(file.read())
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{path}: not a per-image results file (format {FORMAT})")
    return document


def accuracy(outcomes: str) -> float:
    """Percent of ``"1"`` in an outcome string."""
    return 100.0 * outcomes.count("1") / len(outcomes)
