"""Pinned, shareable subsets: which images of each dataset an evaluation used, and how to use exactly those.

Every ``results.json`` record carries ``subset``: the split, its image count (``source_size``), and the
positions (``indices``) in that split, as its loader lists it (sorted file paths of an ImageFolder, array order
of an npz or torchvision file), of the images evaluated, with their SHA-256 (of the indices written as
``"3,17,42"``) to compare subsets at a glance. Clean and robust accuracy are computed on these same images:
each image is attacked only in the batch where its clean prediction was taken, and one that is misclassified
clean counts as not robust.

``mmtard eval --subset FILE`` reads them back from a ``results.json`` (one record or ``{"results": [...]}``)
or from the ``subset.json`` written beside it (``{"datasets": {name: subset}}``) and evaluates exactly those
images: the same split, refused when the split here has another image count (other data).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from mmtard.errors import ConfigError
from mmtard.fileio import require_regular_file

logger = logging.getLogger(__name__)

__all__ = [
    "SUBSET_FILE",
    "classes_for_subset",
    "classes_key",
    "indices_sha256",
    "read_subset",
    "subset_entry",
    "subset_file",
]

#: written beside results.json
SUBSET_FILE = "subset.json"


def indices_sha256(indices: Sequence[int]) -> str:
    """SHA-256 of the indices written as ``"3,17,42"``."""
    return hashlib.sha256(",".join(str(int(i)) for i in indices).encode()).hexdigest()


def subset_entry(
    split: str, source_size: int, indices: Sequence[int], classes: str | Sequence[str] | None = None
) -> dict:
    """The ``subset`` of a results record; ``classes``, the class selection its images were taken with (it
    decides the zero-shot head), is pinned with them."""
    indices = [int(i) for i in indices]
    entry = {
        "split": split,
        "source_size": int(source_size),
        "count": len(indices),
        "sha256": indices_sha256(indices),
        "indices": indices,
    }
    if classes is not None:
        entry["classes"] = classes_key(classes)
    return entry


def classes_key(classes: str | Sequence[str]) -> str | list[str]:
    """A class selection as a subset records it: ``all``, ``seen``, ``unseen`` or a list of names."""
    if isinstance(classes, str):
        return classes if classes in ("all", "seen", "unseen") else [c.strip() for c in classes.split(",")]
    return [str(c) for c in classes]


def classes_for_subset(
    classes: str | Sequence[str] | None, subsets: Mapping[str, Mapping] | None, datasets: Sequence[str] | None
) -> str | Sequence[str]:
    """``classes`` when given; else the class selection the subsets of ``datasets`` (all of them when None)
    were made with, when they record one and agree (with a warning line saying so); else ``all``."""
    if classes is not None:
        return classes
    if not subsets:
        return "all"
    pinned = [subsets[name].get("classes") for name in (datasets or list(subsets)) if name in subsets]
    if pinned and pinned[0] not in (None, "all") and all(p == pinned[0] for p in pinned):
        shown = pinned[0] if isinstance(pinned[0], str) else ",".join(pinned[0])
        logger.warning("subset: its images were chosen with classes %s; evaluating those classes", shown)
        return pinned[0]
    return "all"


def subset_file(records: Sequence[Mapping]) -> dict:
    """``subset.json``: every record's subset, by dataset."""
    return {"datasets": {record["dataset"]: record["subset"] for record in records if "subset" in record}}


def read_subset(path: str | Path, field: str = "subset") -> dict[str, dict]:
    """Dataset name -> its subset, from a ``subset.json`` or a ``results.json``.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: not JSON, no subsets in it, a subset whose indices do not match its SHA-256, or two
            records of one dataset with different indices.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{field}: '{path}' does not exist; expected a subset.json or results.json file")
    require_regular_file(path, field, "a subset.json or results.json file")  # a FIFO would hang
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{field}: '{path}' is not JSON ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{field}: '{path}' is nested too deeply to be a subset.json or results.json") from None
    if isinstance(data, Mapping) and isinstance(data.get("datasets"), Mapping):
        subsets = dict(data["datasets"])
    else:
        records = data.get("results", [data]) if isinstance(data, Mapping) else []
        subsets = {}
        for record in records:
            if not (isinstance(record, Mapping) and isinstance(record.get("subset"), Mapping)):
                continue
            name = record.get("dataset")
            if name in subsets and subsets[name].get("sha256") != record["subset"].get("sha256"):
                raise ConfigError(
                    f"{field}: '{path}' has two records of {name} with different images; give its subset.json instead"
                )
            subsets[name] = record["subset"]
    if not subsets:
        raise ConfigError(
            f"{field}: '{path}' holds no subsets; expected the subset.json or results.json of an mmtard eval run"
        )
    for name, entry in subsets.items():
        indices = entry.get("indices") if isinstance(entry, Mapping) else None
        if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            raise ConfigError(f"{field}: '{path}': the {name} subset has no list of whole-number indices")
        if "sha256" in entry and entry["sha256"] != indices_sha256(indices):
            raise ConfigError(f"{field}: '{path}': the {name} indices do not match their sha256 (edited or cut?)")
    return subsets
