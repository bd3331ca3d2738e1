"""Class names and prompt templates, read from the packages that maintain them.

- ImageNet: ``open_clip.zero_shot_metadata`` (OpenAI's class names and 80 templates).
- The zero-shot datasets: the ``clip-benchmark`` package's ``datasets/en_classnames.json`` and
  ``datasets/en_zeroshot_classification_templates.json``. Where clip-benchmark has no class-name list
  (cifar10, cifar100, stl10, cars, dtd, fgvc_aircraft...), the names come from the data itself, as
  clip-benchmark does (torchvision's ``classes``, folder names, or ``classes.txt``).

Templates are returned as ``str.format`` strings with one ``{}`` for the class name.
"""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path

from open_clip import zero_shot_metadata


@cache
def _clip_benchmark_json(name: str) -> dict:
    spec = importlib.util.find_spec("clip_benchmark")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the clip-benchmark package is needed for zero-shot class names and templates: pip install clip-benchmark"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / name
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def clip_benchmark_templates(key: str) -> list[str]:
    """clip-benchmark's English templates for ``key``, converted from ``{c}`` to ``{}``."""
    return [t.replace("{c}", "{}") for t in _clip_benchmark_json("en_zeroshot_classification_templates.json")[key]]


def clip_benchmark_classnames(key: str) -> list[str]:
    return list(_clip_benchmark_json("en_classnames.json")[key])


def imagenet_classnames() -> list[str]:
    return list(zero_shot_metadata.IMAGENET_CLASSNAMES)


def imagenet_templates() -> list[str]:
    return [template("{}") for template in zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES]
