"""Export to open_clip and Hugging Face ``transformers`` folders, and the model card written from data.

Equivalence tests build open_clip models offline with random weights and then move every parameter by
seeded noise (so LayerNorms are not all ones and a swapped or transposed tensor changes the output),
export them, load the folder with transformers and compare embeddings on the same pixels and tokens
in fp32: within 1e-4 relative to open_clip's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import yaml
from helpers import make_npz_dir

from mmtard.cli import main
from mmtard.errors import ConfigError, MissingExtraError
from mmtard.export import check_hf_convertible, export_model, hf_config_dict
from mmtard.export.card import CardInput, front_matter, model_section, read_results, usage_section
from mmtard.export.files import sha256
from mmtard.export.hf import write_hf_folder
from mmtard.export.source import ExportSource, preprocess_config
from mmtard.models import list_models, load_clip
from mmtard.units import format_eps

REPO = Path(__file__).resolve().parents[1]
MMT_ARD = REPO / "configs" / "cpu" / "mmt-ard.yaml"
TOLERANCE = 1e-4
PROMPTS = ["a photo of a cat.", "a blurry photo of a truck, seen from far away."]

# The published transformers configs of OpenAI's CLIPs (openai/clip-vit-*): what a correct conversion gives.
# (vision width, layers, heads, image, patch, text width, layers, heads, projection)
OPENAI_SHAPES = {
    "ViT-B-32": (768, 12, 12, 224, 32, 512, 12, 8, 512),
    "ViT-B-16": (768, 12, 12, 224, 16, 512, 12, 8, 512),
    "ViT-L-14": (1024, 24, 16, 224, 14, 768, 12, 12, 768),
    "ViT-L-14-336": (1024, 24, 16, 336, 14, 768, 12, 12, 768),
}
REFUSED = [
    "RN50",
    "RN50-quickgelu",
    "convnext_base",
    "coca_ViT-B-32",
    "ViT-B-16-SigLIP",
    "EVA02-B-16",
    "ViT-B-32-SigLIP2-256",
]


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="the hf export needs transformers: pip install 'mmtard[hf]'")


def perturbed_bundle(arch: str, seed: int = 0):
    """An open_clip model with random weights, every parameter moved by seeded noise."""
    torch.manual_seed(seed)
    bundle = load_clip(arch, "none")
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in bundle.model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return bundle


def features(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and an output with ``pooler_output`` in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """The largest per-row ``||value - reference|| / ||reference||``."""
    return ((value - reference).norm(dim=-1) / reference.norm(dim=-1)).max().item()


def open_clip_block_output(model, pixels: torch.Tensor, block: int) -> torch.Tensor:
    """The tokens after residual block ``block`` of open_clip's image tower, ``(batch, tokens, width)``."""
    transformer = model.visual.transformer
    captured = {}
    handle = transformer.resblocks[block].register_forward_hook(lambda m, i, o: captured.update(tokens=o))
    with torch.no_grad():
        model.encode_image(pixels)
    handle.remove()
    tokens = captured["tokens"]
    return tokens if getattr(transformer, "batch_first", True) else tokens.permute(1, 0, 2)


def assert_hf_matches_open_clip(bundle, folder: Path, transformers, batch: int = 2, text: bool = True) -> None:
    """transformers' embeddings (CLIPModel, CLIPVisionModelWithProjection) and LLaVA's features
    (CLIPVisionModel hidden_states[-2]) equal open_clip's on the same inputs."""
    torch.manual_seed(1)
    pixels = torch.randn(batch, 3, bundle.image_size, bundle.image_size)
    with torch.no_grad():
        reference = bundle.model.encode_image(pixels)
        vision = transformers.CLIPVisionModelWithProjection.from_pretrained(folder).eval()
        assert relative_error(vision(pixel_values=pixels).image_embeds, reference) < TOLERANCE
        del vision
        tower = transformers.CLIPVisionModel.from_pretrained(folder).eval()
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        del tower
    assert relative_error(hidden, open_clip_block_output(bundle.model, pixels, -2)) < TOLERANCE
    if not text:
        return
    tokens = bundle.tokenizer(PROMPTS)
    with torch.no_grad():
        clip = transformers.CLIPModel.from_pretrained(folder).eval()
        assert relative_error(features(clip.get_image_features(pixel_values=pixels)), reference) < TOLERANCE
        text_reference = bundle.model.encode_text(tokens)
        assert relative_error(features(clip.get_text_features(input_ids=tokens)), text_reference) < TOLERANCE
    assert clip.logit_scale.item() == pytest.approx(bundle.model.logit_scale.item(), rel=1e-6)


# ---------------------------------------------------------------- configs and refusals


@pytest.mark.parametrize("arch", sorted(OPENAI_SHAPES))
@pytest.mark.parametrize("quick_gelu", [False, True])
def test_hf_config_has_openai_shapes_and_the_activation_open_clip_builds(arch, quick_gelu):
    name = f"{arch}-quickgelu" if quick_gelu else arch
    config = hf_config_dict(name)
    vision, text = config["vision_config"], config["text_config"]
    v_width, v_layers, v_heads, image, patch, t_width, t_layers, t_heads, projection = OPENAI_SHAPES[arch]
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["num_attention_heads"]) == (
        v_width,
        v_layers,
        v_heads,
    )
    assert (vision["image_size"], vision["patch_size"], vision["intermediate_size"]) == (image, patch, 4 * v_width)
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (t_width, t_layers, t_heads)
    assert (text["max_position_embeddings"], text["vocab_size"], text["eos_token_id"]) == (77, 49408, 49407)
    assert config["projection_dim"] == vision["projection_dim"] == text["projection_dim"] == projection
    expected_act = "quick_gelu" if quick_gelu else "gelu"
    assert vision["hidden_act"] == text["hidden_act"] == expected_act


@pytest.mark.parametrize("arch", ["tiny-vit-s", "tiny-vit-m", "tiny-vit-l"])
def test_hf_config_of_tiny_architectures_reads_their_json(arch):
    spec = json.loads((REPO / "src" / "mmtard" / "models" / "configs" / f"{arch}.json").read_text())
    config = hf_config_dict(arch)
    vision, text = config["vision_config"], config["text_config"]
    assert vision["image_size"] == spec["vision_cfg"]["image_size"] == 32
    assert vision["patch_size"] == spec["vision_cfg"]["patch_size"]
    assert (vision["hidden_size"], vision["num_hidden_layers"]) == (
        spec["vision_cfg"]["width"],
        spec["vision_cfg"]["layers"],
    )
    assert vision["num_attention_heads"] == spec["vision_cfg"]["width"] // spec["vision_cfg"]["head_width"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (
        spec["text_cfg"]["width"],
        spec["text_cfg"]["layers"],
        spec["text_cfg"]["heads"],
    )
    assert text["max_position_embeddings"] == spec["text_cfg"]["context_length"]
    assert config["projection_dim"] == spec["embed_dim"]


def test_every_open_clip_architecture_converts_or_is_refused_naming_model():
    refused = []
    for name in list_models():
        try:
            check_hf_convertible(name)
        except ConfigError as exc:
            assert str(exc).startswith("--model: ") and name in str(exc)
            refused.append(name)
    present = [name for name in REFUSED if name in list_models()]
    assert len(present) >= 4 and set(present) <= set(refused)
    assert not {*OPENAI_SHAPES, "tiny-vit-s"} & set(refused)


def test_an_unsupported_architecture_is_refused_before_anything_is_read_or_written(tmp_path):
    out = tmp_path / "rn50"
    with pytest.raises(ConfigError, match=r"^--model: RN50 has no Hugging Face CLIP equivalent \(a ResNet"):
        export_model("RN50", tmp_path / "missing.safetensors", out, format="hf")
    assert not out.exists()
    assert main(["export", "--model", "RN50", "--pretrained", "none", "--format", "hf", "--out", str(out)]) == 2


def test_unknown_format_and_hub_names_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="^--format: unknown"):
        export_model("tiny-vit-s", "none", tmp_path / "x", format="onnx")
    with pytest.raises(ConfigError, match="^--model: 'hf-hub:org/repo' is not a built-in"):
        export_model("hf-hub:org/repo", "none", tmp_path / "x", format="open_clip")


def test_hf_export_without_transformers_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(MissingExtraError, match=r"mmtard\[hf\]"):
        export_model("tiny-vit-s", "none", tmp_path / "x", format="hf")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- equivalence, ViT-B-32 and ViT-L-14


def write_hf_export(bundle, folder: Path) -> Path:
    """The hf folder of an in-memory open_clip model (what ``export_model`` writes, without the card)."""
    write_hf_folder(bundle.name, bundle.model, preprocess_config(bundle, None), folder)
    return folder


@pytest.fixture(scope="module", params=["ViT-B-32", "ViT-B-32-quickgelu"])
def vit_b32_export(request, tmp_path_factory, transformers):
    bundle = perturbed_bundle(request.param)
    return bundle, write_hf_export(bundle, tmp_path_factory.mktemp(request.param))


def test_vit_b32_hf_export_equals_open_clip(vit_b32_export, transformers):
    bundle, folder = vit_b32_export
    config = json.loads((folder / "config.json").read_text())
    activation = bundle.model.visual.transformer.resblocks[0].mlp.gelu  # the module open_clip built for the name
    expected = "quick_gelu" if isinstance(activation, open_clip.model.QuickGELU) else "gelu"
    assert config["vision_config"]["hidden_act"] == config["text_config"]["hidden_act"] == expected
    assert_hf_matches_open_clip(bundle, folder, transformers)


@pytest.mark.slow
def test_vit_l14_hf_image_embeddings_equal_open_clip(tmp_path_factory, transformers):
    bundle = perturbed_bundle("ViT-L-14")
    folder = write_hf_export(bundle, tmp_path_factory.mktemp("vit-l14"))
    config = json.loads((folder / "config.json").read_text())
    assert config["vision_config"]["hidden_act"] == "gelu" and config["vision_config"]["num_hidden_layers"] == 24
    assert_hf_matches_open_clip(bundle, folder, transformers, batch=1, text=False)
    # weights that started from a tag are prepared as that tag's were (this one normalises with 0.5, 0.5)
    tag = open_clip.get_pretrained_cfg("ViT-L-14", "laion2b_s32b_b82k")
    preprocess = preprocess_config(bundle, "laion2b_s32b_b82k")
    assert preprocess["mean"] == list(tag["mean"]) and preprocess["std"] == list(tag["std"])
    assert preprocess["size"] == [224, 224]


# ---------------------------------------------------------------- a run folder, both formats, the card


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A two-step MMT-ARD run of tiny-vit-s (tiny-vit-s teachers) through the CLI, and a results.json of
    ``mmtard eval`` on its student."""
    root = tmp_path_factory.mktemp("tiny-run")
    data = make_npz_dir(root / "data", train_per_class=8, test_per_class=2)
    run = root / "run"
    overrides = [
        f"data.dir={data}",
        "data.dataset=npz",
        f"output_dir={run}",
        "data.batch_size=8",
        "data.eval_samples=10",
        "method.steps=1",
        "eval.eps=[4/255]",
        "eval.steps=1",
        "train.steps=2",
        "train.checkpoint_every=0",
        "teachers.clean.arch=tiny-vit-s",
        "teachers.robust.arch=tiny-vit-s",
    ]
    assert (
        main(["train", "--config", str(MMT_ARD), "--no-progress", *(a for o in overrides for a in ("--set", o))]) == 0
    )
    results = root / "results"
    eval_args = ["eval", "--model", "tiny-vit-s", "--pretrained", str(run / "model.safetensors"), "--dataset", "npz"]
    eval_args += ["--data-dir", str(data), "--samples", "10", "--attack", "pgd", "--eps", "2/255", "--steps", "1"]
    assert main([*eval_args, "--no-progress", "--out", str(results)]) == 0
    return run, results / "results.json"


@pytest.fixture(scope="module")
def tiny_exports(tiny_run, tmp_path_factory, transformers):
    run, results = tiny_run
    out = tmp_path_factory.mktemp("tiny-exports")
    common = ["--model", "tiny-vit-s", "--pretrained", str(run), "--results", str(results), "--license", "mit"]
    assert main(["export", *common, "--format", "hf", "--out", str(out / "hf")]) == 0
    assert main(["export", *common, "--format", "open_clip", "--out", str(out / "open_clip")]) == 0
    return out / "hf", out / "open_clip"


def test_tiny_run_exports_to_hf_equal_to_open_clip(tiny_run, tiny_exports, transformers):
    run, _ = tiny_run
    hf_folder, _ = tiny_exports
    assert sorted(p.name for p in hf_folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    assert_hf_matches_open_clip(load_clip("tiny-vit-s", str(run / "model.safetensors")), hf_folder, transformers)


def test_tiny_run_exports_to_open_clip_loadable_by_open_clip_alone(tiny_run, tiny_exports):
    run, _ = tiny_run
    _, folder = tiny_exports
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "model.safetensors", "open_clip_config.json"]
    code = f"""
import open_clip, torch
from safetensors.torch import load_file
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{folder}")
tokenizer = open_clip.get_tokenizer("local-dir:{folder}")
trained = load_file("{run / "model.safetensors"}")
assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items()), "weights differ"
assert set(model.state_dict()) == set(trained), "keys differ"
print(tokenizer(["a cat"]).shape[1], preprocess.transforms[0].size)
"""
    # a fresh interpreter: open_clip must load the folder without mmtard registering the tiny architectures
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "32"  # the tiny architectures' context length, read from the folder


def test_preprocessor_config_prepares_pixels_as_open_clip(tiny_exports, transformers):
    from PIL import Image

    hf_folder, oc_folder = tiny_exports
    preprocess_cfg = json.loads((oc_folder / "open_clip_config.json").read_text())["preprocess_cfg"]
    processor = transformers.CLIPImageProcessor.from_pretrained(hf_folder)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
    transform = open_clip.image_transform(
        32, is_train=False, mean=preprocess_cfg["mean"], std=preprocess_cfg["std"], resize_mode="shortest"
    )
    expected = transform(image)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-5)
    assert processor.crop_size["height"] == 32 and list(processor.image_mean) == preprocess_cfg["mean"]


def card_of(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def test_model_card_is_written_from_the_run_and_results(tiny_run, tiny_exports):
    run, results = tiny_run
    hf_folder, oc_folder = tiny_exports
    config = yaml.safe_load((run / "config.yaml").read_text())
    final = json.loads((run / "final_eval.json").read_text())
    (record,) = read_results(results)
    for folder, library in ((hf_folder, "transformers"), (oc_folder, "open_clip")):
        meta, body = card_of(folder)
        assert meta["library_name"] == library and meta["license"] == "mit"
        assert {"clip", "adversarial-robustness", config["method"]["name"]} <= set(meta["tags"])
        assert meta["datasets"] == [config["data"]["dataset"]]
        assert "base_model" not in meta  # the student started from random weights: no base model to name
        # the training config
        for role, teacher in config["teachers"].items():
            assert f"{role}: `{teacher['arch']}` from `{teacher['pretrained']}`" in body
        method = config["method"]
        attack = f"eps {format_eps(method['eps'])} ({method['norm']}), {method['steps']} steps"
        assert attack in body
        assert f"| batch | {config['data']['batch_size']} (global) |" in body
        assert f"| seed | {config['train']['seed']} |" in body
        assert yaml.safe_dump(config, sort_keys=False).rstrip() in body
        # the evaluation tables: one row per robust entry, with the numbers of the files
        for label, rec, entry in [("final_eval.json", final, e) for e in final["robust"]] + [
            ("results.json", record, e) for e in record["robust"]
        ]:
            row = f"| {label} | {rec['dataset']} | " + (f"{rec['split']} | {rec['classes']}" if "split" in rec else "")
            assert row in body
            cells = (
                f"| {rec['samples']} | {rec['clean_acc']:.1f} | {entry['attack']} | {format_eps(entry['eps_value'])}"
            )
            assert f"{cells} | {entry['norm']} | {entry['steps']} | {entry['restarts']} | {entry['acc']:.1f} |" in body
        assert "NOT the exported weights" not in body  # results.json evaluated this very model.safetensors
        # provenance
        assert f"SHA-256 `{sha256(folder / 'model.safetensors')}`" in body
        assert f"SHA-256 `{sha256(run / 'model.safetensors')}`" in body
        assert f"open_clip {open_clip.__version__}" in body
        (start,) = json.loads((run / "provenance.json").read_text())  # the run's one start names its code
        assert f"- Training started at step 0, {start['started']}: mmtard {start['mmtard']}, commit " in body


def test_card_flags_results_of_other_weights_and_gives_llava_shapes(tiny_run, tmp_path, transformers):
    run, results = tiny_run
    (record,) = read_results(results)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**record, "pretrained": str(run / "config.yaml")}))
    export_model("tiny-vit-s", run, tmp_path / "hf", format="hf", results=[other])
    _, body = card_of(tmp_path / "hf")
    assert "NOT the exported weights" in body
    patches = (32 // 4) ** 2
    assert f"gives {patches} tokens of width 128" in body and "projector must be trained" in body
    assert "max_length=32" in body


def test_export_refuses_a_run_of_another_architecture_and_a_folder_with_other_files(tiny_run, tmp_path):
    run, _ = tiny_run
    with pytest.raises(ConfigError, match="^--model: 'tiny-vit-m', but the run .* 'tiny-vit-s' student"):
        export_model("tiny-vit-m", run, tmp_path / "x", format="open_clip")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "config.json").write_text("{}")  # an hf export's file, foreign to an open_clip export
    with pytest.raises(ConfigError, match="^--out: .* already holds config.json"):
        export_model("tiny-vit-s", run, busy, format="open_clip")
    export_model("tiny-vit-s", run, tmp_path / "again", format="open_clip")
    export_model("tiny-vit-s", run, tmp_path / "again", format="open_clip")  # a re-export overwrites its own files


@pytest.mark.parametrize(
    ("arch", "tag", "activation_note"),
    [("ViT-L-14", "laion2b_s32b_b82k", False), ("ViT-B-32", "openai", True), ("ViT-B-32-quickgelu", "openai", False)],
)
def test_card_names_the_base_model_and_an_activation_other_than_the_tag_s(arch, tag, activation_note, tmp_path):
    tag_config = open_clip.get_pretrained_cfg(arch, tag)
    source = ExportSource(arch=arch, weights="none", base_tag=tag)
    preprocess = {"size": [224, 224], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
    card = CardInput(source, "hf", "transformers", tmp_path, [], preprocess | {"resize_mode": "shortest"})
    meta = yaml.safe_load("\n".join(front_matter(card)[1:-2]))
    assert meta["base_model"] == tag_config["hf_hub"].strip("/")
    activation = next(line for line in model_section(card) if line.startswith("| activation"))
    assert ("were trained with `quick_gelu`" in activation) is activation_note


@pytest.mark.parametrize(("arch", "same_as_llava"), [("ViT-L-14-336", True), ("ViT-L-14", False)])
def test_card_says_whether_the_tower_has_llava_1_5_s_shape(arch, same_as_llava, tmp_path):
    size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
    preprocess = {"size": [size, size], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
    card = CardInput(
        ExportSource(arch, "none"), "hf", "transformers", tmp_path, [], preprocess | {"resize_mode": "shortest"}
    )
    text = "\n".join(usage_section(card))
    assert f"gives {(size // 14) ** 2} tokens of width 1024" in text and f"{size} x {size} px" in text
    assert ("replaces that tower with the same projector" in text) is same_as_llava
