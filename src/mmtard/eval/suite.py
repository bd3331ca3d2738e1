"""Evaluation suites: a protocol as data (datasets, sample counts, attacks, radii) run in one command.

A suite is a small YAML file::

    name: robustvlm
    attacks: [aa]
    eps: [1/255, 2/255, 4/255]
    norm: linf
    datasets:
      - {name: imagenet, split: val, samples: 5000, zero_shot: false}
      - {name: cifar10, split: test, samples: 1000}

``robustvlm`` (ImageNet 5k + 13 zero-shot datasets x 1k, ``aa`` at 1, 2, 4/255) ships with the package
(``mmtard/eval/suites/``); any other file path is read the same way. ``mmtard eval --suite NAME|FILE --data-dir
ROOT`` reads each dataset from ``ROOT/<name>``; every missing or unreadable one is named in one message, with
the folder it should be, before anything is evaluated. ``samples`` may be omitted (the whole split);
``zero_shot: false`` keeps a dataset out of the zero-shot average (ImageNet, the training distribution).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mmtard.data.check import check_dataset
from mmtard.errors import ConfigError
from mmtard.eval.report import robust_column
from mmtard.fileio import read_yaml_file
from mmtard.units import parse_eps

__all__ = [
    "Suite",
    "SuiteDataset",
    "check_suite_data",
    "list_suites",
    "load_suite",
    "select_datasets",
    "suite_table",
    "suite_wide_table",
]

SUITE_KEYS = {"name", "description", "attacks", "eps", "norm", "datasets"}
DATASET_KEYS = {"name", "split", "samples", "zero_shot"}


@dataclass(frozen=True)
class SuiteDataset:
    """One dataset of a suite: read from ``ROOT/<name>``, its ``split``, ``samples`` images (None: all)."""

    name: str
    split: str = "test"
    samples: int | None = None
    zero_shot: bool = True


@dataclass(frozen=True)
class Suite:
    """A protocol: datasets, attacks, radii (as written, ``"4/255"``) and norm; ``source`` is the file read."""

    name: str
    datasets: tuple[SuiteDataset, ...]
    attacks: tuple[str, ...]
    eps: tuple[str, ...]
    norm: str = "linf"
    description: str = ""
    source: str = ""

    def eps_values(self) -> list[float]:
        return [parse_eps(e, "eps", self.norm) for e in self.eps]

    def describe(self) -> dict:
        """What a results file records of the suite."""
        return {
            "name": self.name,
            "source": self.source,
            "attacks": list(self.attacks),
            "eps": list(self.eps),
            "norm": self.norm,
            "datasets": [vars(d) for d in self.datasets],
        }


def _shipped() -> dict[str, Path]:
    folder = resources.files("mmtard.eval") / "suites"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def list_suites() -> list[str]:
    """The suites that ship with mmtard."""
    return sorted(_shipped())


def load_suite(name_or_path: str | Path, field: str = "suite") -> Suite:
    """A shipped suite by name (``robustvlm``) or a suite file.

    Raises:
        ConfigError: an unknown name that is no file, or a file that is not a valid suite (the message names
            the key and what was expected).
    """
    shipped = _shipped()
    path = shipped.get(str(name_or_path), Path(name_or_path))
    if not path.is_file():
        raise ConfigError(
            f"{field}: '{name_or_path}' is neither a suite ({', '.join(sorted(shipped))}) nor a suite file"
        )
    data = read_yaml_file(path, field, "a suite file")
    where = f"{field}: '{path}'"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping with {', '.join(sorted(SUITE_KEYS))}")
    unknown = set(data) - SUITE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; expected {sorted(SUITE_KEYS)}")
    entries = data.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: datasets: expected a non-empty list of {{name, split, samples, zero_shot}}")
    datasets = tuple(_dataset(entry, f"{where}: datasets[{i}]") for i, entry in enumerate(entries))
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: datasets: a name appears twice; each is read from ROOT/<name>")
    attacks = _strings(data.get("attacks", ["aa"]), f"{where}: attacks")
    eps = tuple(str(e) for e in _list(data.get("eps", []), f"{where}: eps"))
    norm = str(data.get("norm", "linf"))
    suite = Suite(
        name=str(data.get("name", path.stem)),
        datasets=datasets,
        attacks=attacks,
        eps=eps,
        norm=norm,
        description=str(data.get("description", "")),
        source=str(path),
    )
    for text in eps:
        parse_eps(text, f"{where}: eps", norm)
    return suite


def _list(value: object, field: str) -> list:
    if not isinstance(value, list):
        raise ConfigError(f"{field}: expected a list, got {value!r}")
    return value


def _strings(value: object, field: str) -> tuple[str, ...]:
    items = _list(value, field)
    if not items or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"{field}: expected a non-empty list of names, got {value!r}")
    return tuple(items)


def _dataset(entry: object, field: str) -> SuiteDataset:
    if isinstance(entry, str):
        return SuiteDataset(entry)
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
        raise ConfigError(f"{field}: expected a dataset name or {{name, split, samples, zero_shot}}, got {entry!r}")
    unknown = set(entry) - DATASET_KEYS
    if unknown:
        raise ConfigError(f"{field}: unknown keys {sorted(unknown)}; expected {sorted(DATASET_KEYS)}")
    samples = entry.get("samples")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ConfigError(f"{field}: samples: expected a whole number >= 1 or nothing (all images), got {samples!r}")
    zero_shot = entry.get("zero_shot", True)
    if not isinstance(zero_shot, bool):
        raise ConfigError(f"{field}: zero_shot: expected true or false, got {zero_shot!r}")
    return SuiteDataset(entry["name"], str(entry.get("split", "test")), samples, zero_shot)


def select_datasets(suite: Suite, names: Sequence[str] | None, field: str = "dataset") -> tuple[SuiteDataset, ...]:
    """The suite's datasets, or those of ``names`` (each must be one of the suite's)."""
    if not names:
        return suite.datasets
    known = {d.name: d for d in suite.datasets}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"{field}: {unknown} are not datasets of suite {suite.name} ({', '.join(known)})")
    return tuple(known[n] for n in names)


def check_suite_data(datasets: Sequence[SuiteDataset], root: str | Path, suite_name: str, field: str) -> list[str]:
    """The folder of each dataset, ``root/<name>``, once every one of them is found and readable.

    Raises:
        ConfigError: one message naming every missing or unreadable dataset, the folder it should be, and for
            an unreadable one what is wrong; ``mmtard data check`` gives the expected layouts.
    """
    root = Path(root)
    folders, problems = [], []
    for entry in datasets:
        folder = root / entry.name
        check = check_dataset(entry.name, folder, entry.split, decode=False)  # evaluation decodes what it reads
        folders.append(str(folder))
        if not check.found:
            problems.append(f"{entry.name} (expected at {folder})")
        elif not check.usable:
            problems.append(f"{entry.name} (at {folder}: {check.problem})")
    if problems:
        raise ConfigError(
            f"{field}: {len(problems)} of the {len(datasets)} datasets of suite {suite_name} are missing or unreadable "
            f"under '{root}': {'; '.join(problems)}. Each dataset is read from ROOT/<name>; `mmtard data check "
            f"--suite {suite_name} --data-dir {root}` shows the layouts expected, --dataset runs a part of the suite"
        )
    return folders


def suite_table(records: Sequence[Mapping], suite: Suite) -> str:
    """The field's table: one row per dataset, then the zero-shot average; clean and each radius, in percent.

    The average is over the zero-shot datasets evaluated (``zero_shot: true`` in the suite), unweighted, as
    the RobustVLM table reports it; its row says how many.
    """
    zero_shot = {d.name for d in suite.datasets if d.zero_shot}
    columns: list[str] = []
    for record in records:
        for entry in record["robust"]:
            if robust_column(entry) not in columns:
                columns.append(robust_column(entry))
    header = ["dataset", "samples", "clean", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in records:
        values = {robust_column(e): e["acc"] for e in record["robust"]}
        cells = [record["dataset"], str(record["samples"]), f"{record['clean_acc']:.1f}"]
        lines.append("| " + " | ".join(cells + [_cell(values.get(c)) for c in columns]) + " |")
    averaged = [r for r in records if r["dataset"] in zero_shot]
    if averaged:
        clean = sum(r["clean_acc"] for r in averaged) / len(averaged)
        means = []
        for column in columns:
            accs = [e["acc"] for r in averaged for e in r["robust"] if robust_column(e) == column]
            means.append(sum(accs) / len(accs) if len(accs) == len(averaged) else None)
        label = f"**zero-shot average** ({len(averaged)} datasets)"
        lines.append("| " + " | ".join([label, "", f"{clean:.1f}", *(_cell(m) for m in means)]) + " |")
    return "\n".join(lines)


def suite_wide_table(records: Sequence[Mapping], suite: Suite) -> str:
    """The same numbers in the layout of the field's papers: one row per setting (clean, then each attack and
    radius), one column per dataset, then the zero-shot average."""
    zero_shot = {d.name for d in suite.datasets if d.zero_shot}
    averaged = [r for r in records if r["dataset"] in zero_shot]
    columns = [r["dataset"] for r in records] + (["zero-shot average"] if averaged else [])
    settings: list[str] = []
    for record in records:
        settings += [robust_column(e) for e in record["robust"] if robust_column(e) not in settings]
    lines = ["| " + " | ".join(["setting", *columns]) + " |", "|" + "---|" * (len(columns) + 1)]
    for setting in ["clean", *settings]:
        values = [_value(r, setting) for r in records]
        chosen = [_value(r, setting) for r in averaged]
        mean = sum(chosen) / len(chosen) if chosen and None not in chosen else None
        cells = [_cell(v) for v in values] + ([_cell(mean)] if averaged else [])
        lines.append("| " + " | ".join([setting, *cells]) + " |")
    return "\n".join(lines)


def _value(record: Mapping, setting: str) -> float | None:
    if setting == "clean":
        return record["clean_acc"]
    return next((e["acc"] for e in record["robust"] if robust_column(e) == setting), None)


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"
