"""Results files of ``mmtard eval``: ``results.json`` (schema in README) and ``results.md``."""

from __future__ import annotations

import json
from pathlib import Path

from mmtard.fileio import atomic_write_text


def robust_column(entry: dict) -> str:
    """Column title naming everything that produced a robust number: attack, eps, steps, restarts."""
    plural = "s" if entry["restarts"] != 1 else ""
    return f"{entry['attack']} {entry['eps']} ({entry['steps']} steps, {entry['restarts']} restart{plural})"


def markdown_table(records: list[dict]) -> str:
    """One row per (model, dataset) record, clean accuracy then each robust setting, in percent."""
    columns: list[str] = []
    for record in records:
        for entry in record["robust"]:
            if robust_column(entry) not in columns:
                columns.append(robust_column(entry))
    lines = [
        "| model | dataset | samples | clean | " + " | ".join(columns) + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    for record in records:
        values = {robust_column(e): f"{e['acc']:.1f}" for e in record["robust"]}
        cells = [record["model"], record["dataset"], str(record["samples"]), f"{record['clean_acc']:.1f}"]
        cells += [values.get(c, "") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out_dir: str | Path, records: list[dict]) -> list[Path]:
    """Write ``results.json`` + ``results.md``.

    One dataset: ``out_dir/results.json`` is that dataset's record. Several: each record goes to
    ``out_dir/<dataset>/results.json`` and ``out_dir/results.json`` holds ``{"results": [records]}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if len(records) == 1:
        payload: dict = records[0]
    else:
        payload = {"results": records}
        for record in records:
            sub = out / record["dataset"]
            sub.mkdir(exist_ok=True)
            atomic_write_text(sub / "results.json", json.dumps(record, indent=2))
            written.append(sub / "results.json")
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2))
    written.append(out / "results.json")
    warnings = [f"- {r['dataset']}: {w}" for r in records for w in r.get("checks", {}).get("warnings", [])]
    body = "# Zero-shot evaluation\n\nAccuracy in percent.\n\n" + markdown_table(records) + "\n"
    body += "\n## Gradient-masking checks\n\n" + ("\n".join(warnings) if warnings else "All checks passed.") + "\n"
    atomic_write_text(out / "results.md", body)
    written.append(out / "results.md")
    return written
