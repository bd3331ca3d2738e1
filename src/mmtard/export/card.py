"""The model card (``README.md`` of an export folder), written from data only.

Every value in the card is read from a file or an object: the architecture's open_clip config, the
preprocess config, the run's ``config.yaml`` and ``final_eval.json``, ``results.json`` files from
``mmtard eval``, file digests, package versions and the git commit. The front matter is Hugging Face
model-card metadata (``library_name``, ``pipeline_tag``, ``tags``, ``datasets`` and, when known,
``license`` and ``base_model``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import yaml

import mmtard
from mmtard.errors import ConfigError
from mmtard.export.files import check_record, read_json, sha256
from mmtard.export.hf import HF_PROCESSOR_FILE, hidden_act
from mmtard.export.source import ExportSource
from mmtard.fileio import require_regular_file
from mmtard.models.loading import RANDOM_INIT
from mmtard.units import format_eps

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
# The transformers tokenizer of every OpenAI CLIP repository is the same BPE; name the one of the same size.
OPENAI_HF_REPOS = {
    "ViT-B-32": "openai/clip-vit-base-patch32",
    "ViT-B-16": "openai/clip-vit-base-patch16",
    "ViT-L-14": "openai/clip-vit-large-patch14",
    "ViT-L-14-336": "openai/clip-vit-large-patch14-336",
}
DEFAULT_TOKENIZER_REPO = OPENAI_HF_REPOS["ViT-B-32"]
# LLaVA-1.5 was trained with this tower; its projector expects the token count and width of this architecture.
LLAVA_TOWER = "ViT-L-14-336"
# LLaVA reads the hidden states of this layer, patch tokens only (mm_vision_select_layer, mm_vision_select_feature).
LLAVA_SELECT_LAYER = -2


@dataclass
class CardInput:
    """What a model card is written from.

    Attributes:
        source: the weights exported and their run, config and final evaluation.
        format_name: ``open_clip`` or ``hf``.
        library_name: the card's ``library_name`` (``open_clip`` or ``transformers``).
        folder: the export folder.
        files: the files written into it.
        preprocess: open_clip's preprocess config of the model.
        results: ``(file, records)`` for each ``results.json`` given.
        license: a license identifier for the front matter, or ``None`` when not known.
        versions: package name -> version, of the packages that made the export.
        commit: the mmtard git commit, or ``None`` outside a git checkout.
    """

    source: ExportSource
    format_name: str
    library_name: str
    folder: Path
    files: list[Path]
    preprocess: dict
    results: list[tuple[Path, list[dict]]] = field(default_factory=list)
    license: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    commit: str | None = None


def read_results(path: str | Path) -> list[dict]:
    """The records of a ``results.json`` written by ``mmtard eval`` (one record, or ``{"results": [...]}``).

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: the file is not a regular file, not JSON, or not a results file (each record is checked
            as :func:`check_record` does, so the card can be written from it).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--results: file '{path}' does not exist")
    require_regular_file(path, "--results", "a results.json of mmtard eval")
    data = read_json(path, "--results")
    records = data.get("results", [data]) if isinstance(data, dict) else None
    if not records or not all(isinstance(r, dict) and "clean_acc" in r and "dataset" in r for r in records):
        raise ConfigError(f"--results: '{path}' is not a results.json of mmtard eval (records with dataset, clean_acc)")
    for record in records:
        check_record(record, path, "--results")
    return records


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _eps_text(value: float | str | None) -> str:
    return format_eps(value) if isinstance(value, (int, float)) else str(value)


def _base_model(card: CardInput) -> str | None:
    """The Hugging Face repository of the open_clip tag the weights started from, when there is one."""
    if card.source.base_tag is None:
        return None
    hub = open_clip.get_pretrained_cfg(card.source.arch, card.source.base_tag).get("hf_hub")
    return hub.strip("/") if hub else None


def _datasets(card: CardInput) -> list[str]:
    names = []
    if card.source.run_config:
        names.append(card.source.run_config.get("data", {}).get("dataset"))
    names += [record.get("dataset") for _, records in card.results for record in records]
    return list(dict.fromkeys(n for n in names if n))


def front_matter(card: CardInput) -> list[str]:
    """Hugging Face model-card metadata, as YAML between ``---`` lines."""
    method = (card.source.run_config or {}).get("method", {}).get("name")
    meta: dict = {"library_name": card.library_name, "pipeline_tag": "zero-shot-image-classification"}
    if card.license:
        meta["license"] = card.license
    if base := _base_model(card):
        meta["base_model"] = base
    meta["tags"] = list(dict.fromkeys(t for t in ("clip", "adversarial-robustness", "mmtard", method) if t))
    if datasets := _datasets(card):
        meta["datasets"] = datasets
    return ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", ""]


def _activation_text(card: CardInput, config: dict) -> str:
    """The activation open_clip built, and whether the tag the weights started from was trained with another."""
    built = hidden_act(config)
    if card.source.base_tag is None:
        return f"`{built}`"
    tag_quick_gelu = open_clip.get_pretrained_cfg(card.source.arch, card.source.base_tag).get("quick_gelu", False)
    if tag_quick_gelu == (built == "quick_gelu"):
        return f"`{built}`"
    logger.warning(
        "%s: open_clip builds %s, but the '%s' weights it started from were trained with %s",
        card.source.arch,
        built,
        card.source.base_tag,
        "quick_gelu" if tag_quick_gelu else "gelu",
    )
    return (
        f"`{built}` (as open_clip builds `{card.source.arch}`; the `{card.source.base_tag}` weights it started "
        f"from were trained with `{'quick_gelu' if tag_quick_gelu else 'gelu'}`)"
    )


def _image_tower_text(vision: dict) -> str:
    if vision.get("timm_model_name"):
        return f"timm `{vision['timm_model_name']}`"
    if isinstance(vision["layers"], (list, tuple)):
        return f"ResNet, width {vision['width']}, layers {list(vision['layers'])}"
    return f"ViT, width {vision['width']}, {vision['layers']} layers, patch {vision['patch_size']}"


def _text_tower_text(text: dict) -> str:
    if text.get("hf_model_name"):
        return f"Hugging Face `{text['hf_model_name']}`, context {text['context_length']} tokens"
    return f"width {text['width']}, {text['layers']} layers, context {text['context_length']} tokens"


def model_section(card: CardInput) -> list[str]:
    """The architecture, read from open_clip's config, and the image preprocessing."""
    config = open_clip.get_model_config(card.source.arch)
    vision = {**vars(open_clip.CLIPVisionCfg()), **config["vision_cfg"]}
    text = {**vars(open_clip.CLIPTextCfg()), **config["text_cfg"]}
    pre = card.preprocess
    size = pre["size"][0] if isinstance(pre["size"], (list, tuple)) else pre["size"]
    rows = [
        ["architecture", f"`{card.source.arch}` (open_clip)"],
        ["activation", _activation_text(card, config)],
        ["image tower", _image_tower_text(vision)],
        ["text tower", _text_tower_text(text)],
        ["embedding", str(config["embed_dim"])],
        ["input", f"{size} x {size} px"],
        [
            "preprocessing",
            f"resize ({pre['resize_mode']}, {pre['interpolation']}), normalise mean "
            f"{list(pre['mean'])} std {list(pre['std'])}",
        ],
    ]
    return [
        "## Model",
        "",
        *_table(["", ""], rows),
        "",
        "Robust accuracies below were measured with perturbations of the `[0, 1]` pixels, before this normalisation.",
        "",
    ]


def _teacher_text(name: str, teacher: dict) -> str:
    extra = ", ".join(f"{k}: {v}" for k, v in teacher.items() if k not in ("arch", "pretrained", "trust_checkpoint"))
    return f"{name}: `{teacher.get('arch')}` from `{teacher.get('pretrained')}`" + (f" ({extra})" if extra else "")


def _training_attack_text(method: dict) -> str:
    if not method.get("steps"):
        return "none (method.steps: 0)"
    alpha = method.get("alpha")
    return (
        f"eps {_eps_text(method.get('eps'))} ({method.get('norm')}), {method.get('steps')} steps, "
        f"step size {_eps_text(alpha) if alpha is not None else 'the method default'}"
    )


def training_section(card: CardInput) -> list[str]:
    """The run's resolved config: a summary table and the whole ``config.yaml``."""
    config = card.source.run_config
    if config is None:
        return [
            "## Training",
            "",
            f"Not recorded: exported from `{card.source.weights}`, not from a run folder.",
            "",
        ]
    method, data, train = config.get("method", {}), config.get("data", {}), config.get("train", {})
    student, teachers = config.get("student", {}), config.get("teachers") or {}
    rows = [
        ["method", f"`{method.get('name')}`"],
        [
            "student",
            f"`{student.get('arch')}` from `{student.get('pretrained')}`, fine-tuning: {student.get('finetune')}",
        ],
        ["teachers", "; ".join(_teacher_text(n, t) for n, t in teachers.items()) or "none"],
        ["training attack", _training_attack_text(method)],
        [
            "data",
            f"{data.get('dataset')} {data.get('split')}, classes {data.get('classes')}, "
            f"samples {data.get('samples') if data.get('samples') is not None else 'all'}",
        ],
        ["batch", f"{data.get('batch_size')} (global)"],
        ["steps", f"{train.get('steps')}, lr {train.get('lr')}, precision {train.get('precision')}"],
        ["seed", str(train.get("seed"))],
    ]
    return [
        "## Training",
        "",
        f"From `{card.source.run.config.name}` of the run (the resolved config the trainer saved).",
        "",
        *_table(["", ""], rows),
        "",
        "<details><summary>config.yaml</summary>",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False).rstrip(),
        "```",
        "",
        "</details>",
        "",
    ]


def check_summary(checks: dict) -> str:
    """``pass (k of n)`` or ``FAIL: names``, plus the zero-gradient fraction, from a record's ``checks``."""
    verdicts = {k: v for k, v in checks.items() if isinstance(v, bool) or (v is None and k != "warnings")}
    applied = {k: v for k, v in verdicts.items() if v is not None}
    failed = [k for k, v in applied.items() if v is False]
    text = f"FAIL: {', '.join(failed)}" if failed else f"pass ({len(applied)} of {len(applied)})"
    zero = checks.get("zero_gradient_fraction")
    return text + (f", zero gradients {100 * zero:.1f}%" if isinstance(zero, (int, float)) else "")


def _result_rows(label: str, record: dict, split: str, classes: str) -> list[list[str]]:
    first = [
        label,
        str(record.get("dataset")),
        str(record.get("split", split)),
        str(record.get("classes", classes)),
        str(record.get("samples")),
        f"{record['clean_acc']:.1f}",
    ]
    checks = check_summary(record.get("checks", {}))
    robust = record.get("robust") or []
    if not robust:
        return [first + ["none", "", "", "", "", "", checks]]
    return [
        first
        + [
            str(entry.get("attack")),
            _eps_text(entry.get("eps_value", entry.get("eps"))),
            str(entry.get("norm")),
            str(entry.get("steps")),
            str(entry.get("restarts")),
            f"{entry['acc']:.1f}",
            checks,
        ]
        for entry in robust
    ]


def _which_weights(
    record: dict, source_digest: str | None, tower: tuple[str, float] | None = None, base: str = ""
) -> str | None:
    """``None`` when the record evaluated the exported weights (same SHA-256), else what it evaluated. With an
    image-tower file (``tower``: its SHA-256 and alpha), the record must have loaded the same file with the same
    alpha over the same base weights (``base``: the file, or the open_clip tag)."""
    evaluated = Path(str(record.get("pretrained", "")))
    described = f"`{record.get('model')}` `{record.get('pretrained')}`"
    evaluated_tower = None
    if record.get("vision_weights"):
        described += f" with image tower `{record['vision_weights']}` (alpha {record.get('vision_weights_alpha')})"
        evaluated_tower = (record.get("vision_weights_sha256"), record.get("vision_weights_alpha"))
    if evaluated_tower != tower:
        what = "those have no image-tower file" if tower is None else "another image-tower file or alpha"
        return f"{described}: NOT the exported weights ({what})"
    if not evaluated.is_file():
        if tower is not None and str(record.get("pretrained")) == base and base.lower() not in RANDOM_INIT:
            return None  # the same open_clip tag, the same tower file and alpha
        return f"{described} (not a file here, so not compared with the exported weights)"
    if source_digest is not None and sha256(evaluated) == source_digest:
        return None
    return f"{described}: NOT the exported weights (another SHA-256)"


def evaluation_section(card: CardInput, source_digest: str | None) -> list[str]:
    """One table over ``final_eval.json`` and every ``results.json``: clean and robust accuracy per attack."""
    config = card.source.run_config or {}
    data = config.get("data", {})
    sources: list[tuple[str, dict, str, str]] = []
    if card.source.final_eval is not None:
        eval_split, eval_classes = data.get("eval_split", "?"), data.get("eval_classes", "?")
        sources.append(("final_eval.json", card.source.final_eval, eval_split, eval_classes))
    notes = []
    tower = None
    if card.source.vision_weights is not None:
        tower = (sha256(Path(card.source.vision_weights)), card.source.vision_weights_alpha)
    for path, records in card.results:
        for record in records:
            sources.append((path.name, record, "?", "?"))
            if (other := _which_weights(record, source_digest, tower, card.source.weights)) is not None:
                notes.append(f"- `{path.name}` ({record.get('dataset')}) evaluated {other}.")
                logger.warning("%s: %s evaluated %s", path, record.get("dataset"), other)
    if not sources:
        return ["## Evaluation", "", "No evaluation was recorded (no final_eval.json, no --results).", ""]
    header = ["file", "dataset", "split", "classes", "samples", "clean %", "attack", "eps", "norm", "steps"]
    header += ["restarts", "robust %", "checks"]
    rows = [row for label, record, split, classes in sources for row in _result_rows(label, record, split, classes)]
    warnings = [
        f"- `{label}` ({record.get('dataset')}): {warning}"
        for label, record, _, _ in sources
        for warning in record.get("checks", {}).get("warnings", [])
    ]
    intro = "Zero-shot accuracy in percent"
    if card.source.final_eval is not None:
        intro += "; `final_eval.json` is the trainer's held-out evaluation at the end of the run"
    lines = ["## Evaluation", "", intro + ".", "", *_table(header, rows), ""]
    if warnings:
        lines += ["Gradient-masking warnings (signs that a robust number may be too high):", "", *warnings, ""]
    if notes:
        lines += ["Weights of the results files:", "", *notes, ""]
    return lines


def _tokens_and_width(arch: str) -> tuple[int, int]:
    vision = {**vars(open_clip.CLIPVisionCfg()), **open_clip.get_model_config(arch)["vision_cfg"]}
    size = vision["image_size"][0] if isinstance(vision["image_size"], (list, tuple)) else vision["image_size"]
    return (size // vision["patch_size"]) ** 2, vision["width"]


def usage_section(card: CardInput) -> list[str]:
    """How to load the folder with the library it was written for (and, for ``hf``, in LLaVA)."""
    if card.format_name == "open_clip":
        return _open_clip_usage(card.folder.name)
    return _transformers_usage(card) + _llava_usage(card)


def _open_clip_usage(folder: str) -> list[str]:
    return [
        "## Use",
        "",
        "With open_clip alone (the folder holds the architecture's config, so no mmtard is needed):",
        "",
        "```python",
        "import open_clip",
        "",
        f'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{folder}")',
        f'tokenizer = open_clip.get_tokenizer("local-dir:{folder}")',
        "```",
        "",
    ]


def _transformers_usage(card: CardInput) -> list[str]:
    """Loading the ``hf`` folder's towers with ``transformers``, and the tokenizer it leaves out."""
    arch, folder = card.source.arch, card.folder.name
    context = {**vars(open_clip.CLIPTextCfg()), **open_clip.get_model_config(arch)["text_cfg"]}["context_length"]
    repo = OPENAI_HF_REPOS.get(arch.removesuffix("-quickgelu"), DEFAULT_TOKENIZER_REPO)
    return [
        "## Use",
        "",
        "With `transformers`, offline (`CLIPModel`, `CLIPVisionModel` and `CLIPVisionModelWithProjection` load it):",
        "",
        "```python",
        "from transformers import CLIPImageProcessor, CLIPTokenizer, CLIPTextModelWithProjection, "
        "CLIPVisionModelWithProjection",
        "",
        f'processor = CLIPImageProcessor.from_pretrained("{folder}")',
        f'vision = CLIPVisionModelWithProjection.from_pretrained("{folder}")',
        'image_embeds = vision(**processor(images=images, return_tensors="pt")).image_embeds',
        "",
        f'text = CLIPTextModelWithProjection.from_pretrained("{folder}")',
        f'tokenizer = CLIPTokenizer.from_pretrained("{repo}")  # not in this folder, see below',
        f'tokens = tokenizer(texts, padding="max_length", max_length={context}, truncation=True, return_tensors="pt")',
        "text_embeds = text(**tokens).text_embeds",
        "```",
        "",
        "Tokenizer: no tokenizer files are included. The text tower uses OpenAI's CLIP BPE (the tokenizer of "
        f"every `openai/clip-vit-*` repository, e.g. `{repo}`), with at most {context} tokens.",
        "",
    ]


def _llava_usage(card: CardInput) -> list[str]:
    """The ``hf`` folder as LLaVA's vision tower: its preprocessing, its tokens, and whether LLaVA-1.5's projector
    fits it."""
    tokens, width = _tokens_and_width(card.source.arch)
    llava_tokens, llava_width = _tokens_and_width(LLAVA_TOWER)
    size = card.preprocess["size"][0] if isinstance(card.preprocess["size"], (list, tuple)) else card.preprocess["size"]
    same_shape = (tokens, width) == (llava_tokens, llava_width)
    return [
        "### In LLaVA",
        "",
        "- Point `mm_vision_tower` (`--vision_tower` when training) at this folder by its absolute path; LLaVA "
        "loads a local folder with `CLIPVisionModel.from_pretrained` and `CLIPImageProcessor.from_pretrained`.",
        f"- `{HF_PROCESSOR_FILE}` prepares images as open_clip does for this model: {size} x {size} px "
        f"({card.preprocess['resize_mode']} side resize, {card.preprocess['interpolation']}), the mean and std above.",
        f"- With `mm_vision_select_layer: {LLAVA_SELECT_LAYER}` and `mm_vision_select_feature: patch` the tower "
        f"gives {tokens} tokens of width {width}.",
        f"- LLaVA-1.5 was trained with `{OPENAI_HF_REPOS[LLAVA_TOWER]}` ({LLAVA_TOWER}: {llava_tokens} tokens of "
        f"width {llava_width}). "
        + (
            "This tower has the same shape, so it replaces that tower with the same projector."
            if same_shape
            else "This tower has another shape: LLaVA's projector must be trained for it (LLaVA's pretraining "
            "stage with `mm_vision_tower` set to this folder)."
        ),
        "",
    ]


def provenance_section(card: CardInput, source_digest: str | None) -> list[str]:
    """Versions, commit and file digests."""
    versions = ", ".join(f"{name} {version}" for name, version in card.versions.items())
    weights = [f for f in card.files if f.suffix == ".safetensors"]
    lines = [
        "## Provenance",
        "",
        f"- Exported by mmtard {mmtard.__version__}, commit "
        f"{card.commit or 'not available (not a git checkout)'}, with {versions}.",
        f"- Format: `{card.format_name}`; files: " + ", ".join(f"`{f.name}`" for f in card.files) + ".",
    ]
    if card.source.run is not None:
        lines.append(f"- Run folder: `{card.source.run.path}`.")
    for start in card.source.run_starts or []:
        start = {key: _plain(value) for key, value in start.items()}  # a file's text: no escape codes, no new lines
        lines.append(
            f"- Training {'started' if start.get('step') == '0' else 'resumed'} at step {start.get('step')}, "
            f"{start.get('started')}: mmtard {start.get('mmtard')}, commit {start.get('commit') or 'not available'}, "
            f"torch {start.get('torch')}, open_clip {start.get('open_clip')}, {start.get('world_size')} process(es) "
            f"on {start.get('gpu') or start.get('device')}."
        )
    source_file = card.source.weights_file
    if source_file is not None:
        lines.append(f"- Source weights: `{source_file}`, SHA-256 `{source_digest}`.")
    elif card.source.weights.lower() in RANDOM_INIT:
        lines.append(f"- Source weights: random initialisation (`--pretrained {card.source.weights}`).")
    else:
        lines.append(f"- Source weights: open_clip pretrained tag `{card.source.weights}`.")
    if card.source.vision_weights is not None:
        lines.append(
            f"- Image tower: `{card.source.vision_weights}`, SHA-256 `{sha256(Path(card.source.vision_weights))}`, "
            f"loaded over the source weights with alpha {card.source.vision_weights_alpha} (alpha x the file's tower "
            "+ (1 - alpha) x the base tower, in weight space)."
        )
    lines += [f"- `{f.name}`: SHA-256 `{sha256(f)}`." for f in weights]
    return lines + [""]


#: the longest value of a run's provenance.json the card quotes
PLAIN_LENGTH = 200


def _plain(value: object) -> str:
    """``value`` as one line of plain text: control characters (escape codes, new lines that would start a
    heading) written as ``\\xNN``, markdown's backticks removed, at most :data:`PLAIN_LENGTH` characters."""
    if value is None or value == "":
        return ""
    text = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in str(value)).replace("`", "'")
    return text if len(text) <= PLAIN_LENGTH else text[: PLAIN_LENGTH - 3] + "..."


def render_card(card: CardInput) -> str:
    """The whole ``README.md`` of an export folder."""
    source_file = card.source.weights_file
    source_digest = sha256(source_file) if source_file is not None else None
    config = card.source.run_config
    if config is not None:
        title = f"# {card.source.arch}, {config.get('method', {}).get('name')} (mmtard)"
    else:
        title = f"# {card.source.arch}, {Path(card.source.weights).name} (mmtard)"
    if card.source.vision_weights is not None:
        alpha = card.source.vision_weights_alpha
        title = title.removesuffix(" (mmtard)") + f", image tower {Path(card.source.vision_weights).name} alpha {alpha}"
        title += " (mmtard)"
    sections = [
        front_matter(card),
        [title, ""],
        model_section(card),
        usage_section(card),
        training_section(card),
        evaluation_section(card, source_digest),
        provenance_section(card, source_digest),
    ]
    return "\n".join(line for section in sections for line in section)
