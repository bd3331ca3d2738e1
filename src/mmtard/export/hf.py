"""open_clip CLIP -> Hugging Face ``transformers`` CLIP: the config, the weights and the image processor.

An open_clip CLIP converts when both towers are the plain OpenAI design that ``transformers.CLIPModel``
implements: a ViT image tower (class-token pooling, LayerNorm before and after the transformer, a linear
projection without bias) and a causal text tower pooled at the end-of-text token. ``ViT-B-32``,
``ViT-B-16``, ``ViT-L-14``, ``ViT-L-14-336``, their ``-quickgelu`` variants and the tiny ``tiny-vit-*``
architectures do; ResNets, timm and Hugging Face towers, CoCa, SigLIP and the other variants are refused
with one :class:`~mmtard.errors.ConfigError` naming ``--model``.

The activation is the one open_clip builds for the architecture name: ``quick_gelu`` for the
``-quickgelu`` names, exact ``gelu`` otherwise (open_clip >= 3 no longer switches to QuickGELU for the
``openai`` tag; it only warns).

Keys, open_clip -> transformers (``T`` is ``text_model``, ``V`` is ``vision_model``)::

    visual.class_embedding                    V.embeddings.class_embedding
    visual.positional_embedding               V.embeddings.position_embedding.weight
    visual.conv1.weight                       V.embeddings.patch_embedding.weight
    visual.ln_pre / ln_post                   V.pre_layrnorm / V.post_layernorm
    visual.proj (width, dim)                  visual_projection.weight (dim, width), transposed
    token_embedding / positional_embedding    T.embeddings.token_embedding / position_embedding
    ln_final                                  T.final_layer_norm
    text_projection (width, dim)              text_projection.weight (dim, width), transposed
    logit_scale                               logit_scale (both store the log)
    [visual.]transformer.resblocks.i.         [V|T].encoder.layers.i.
        ln_1 / ln_2                               layer_norm1 / layer_norm2
        attn.in_proj_weight / in_proj_bias        self_attn.{q,k,v}_proj.weight / .bias (split in three)
        attn.out_proj                             self_attn.out_proj
        mlp.c_fc / mlp.c_proj                     mlp.fc1 / mlp.fc2
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import ModuleType

import open_clip
import torch

from mmtard.errors import ConfigError, import_optional
from mmtard.export.files import contiguous_copy, save_safetensors
from mmtard.fileio import atomic_write_text
from mmtard.models.tiny import ensure_tiny_models_registered

HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_PROCESSOR_FILE = "preprocessor_config.json"
HF_FILES = (HF_CONFIG_FILE, HF_WEIGHTS_FILE, HF_PROCESSOR_FILE)

# open_clip's LayerNorm is torch's, with torch's default eps.
LAYER_NORM_EPS = torch.nn.LayerNorm(1).eps

# Config fields whose value transformers' CLIP can express whatever it is; every other field must keep
# open_clip's default. patch_dropout only acts in training and output_tokens only changes what forward returns.
FREE_MODEL_FIELDS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale"}
FREE_VISION_FIELDS = {
    "layers",
    "width",
    "head_width",
    "mlp_ratio",
    "patch_size",
    "image_size",
    "patch_dropout",
    "output_tokens",
}
# pad_id and eos_id are only read by text pool types other than the default argmax.
FREE_TEXT_FIELDS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "output_tokens"}
FREE_TEXT_FIELDS |= {"pad_id", "eos_id"}

# PIL resampling codes, as transformers' image processors store them.
PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}


def _refuse(arch: str, reason: str) -> ConfigError:
    return ConfigError(
        f"--model: {arch} has no Hugging Face CLIP equivalent ({reason}). --format hf converts open_clip ViT "
        "CLIPs such as ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336 (and their -quickgelu variants) and the "
        "tiny-vit-* architectures; use --format open_clip for the others."
    )


def _non_default_fields(values: dict, cfg_class: type, free: set[str]) -> list[str]:
    defaults = {f.name: f.default for f in dataclasses.fields(cfg_class)}
    return sorted(k for k, v in values.items() if k not in free and (k not in defaults or v != defaults[k]))


def open_clip_model_config(arch: str) -> dict:
    """open_clip's model config (``embed_dim``, ``vision_cfg``, ``text_cfg``...) of a built-in architecture.

    Raises:
        ConfigError: ``arch`` is not a built-in open_clip or tiny architecture name.
    """
    ensure_tiny_models_registered()
    config = None if arch.startswith(("hf-hub:", "local-dir:")) else open_clip.get_model_config(arch)
    if config is None:
        raise ConfigError(
            f"--model: '{arch}' is not a built-in open_clip architecture (ViT-B-32, ViT-L-14, tiny-vit-s, ...); "
            "export needs the architecture's config, so hf-hub: and local-dir: names are not accepted"
        )
    return config


def check_hf_convertible(arch: str) -> dict:
    """The open_clip config of ``arch`` if transformers' CLIP can express it exactly.

    Raises:
        ConfigError: naming ``--model`` and what has no equivalent.
    """
    config = open_clip_model_config(arch)
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if not isinstance(vision.get("layers", 12), int):
        raise _refuse(arch, "a ResNet image tower")
    if vision.get("timm_model_name"):
        raise _refuse(arch, f"a timm image tower, {vision['timm_model_name']}")
    if text.get("hf_model_name"):
        raise _refuse(arch, f"a Hugging Face text tower, {text['hf_model_name']}")
    if "multimodal_cfg" in config:
        raise _refuse(arch, "a CoCa multimodal decoder")
    size = vision.get("image_size", 224)
    if isinstance(size, (list, tuple)) and len(set(size)) != 1:
        raise _refuse(arch, f"a non-square image size {size}")
    unexpressible = (
        [k for k in config if k not in FREE_MODEL_FIELDS and config[k] not in (False, None)]
        + [f"vision_cfg.{k}" for k in _non_default_fields(vision, open_clip.CLIPVisionCfg, FREE_VISION_FIELDS)]
        + [f"text_cfg.{k}" for k in _non_default_fields(text, open_clip.CLIPTextCfg, FREE_TEXT_FIELDS)]
    )
    if unexpressible:
        raise _refuse(arch, "open_clip options " + ", ".join(unexpressible))
    return config


def hidden_act(config: dict) -> str:
    """``quick_gelu`` for open_clip's QuickGELU architectures (``-quickgelu`` names), else ``gelu``."""
    return "quick_gelu" if config.get("quick_gelu", False) else "gelu"


def hf_config_dict(arch: str) -> dict:
    """The arguments of ``transformers.CLIPConfig`` for ``arch``, read from its open_clip config.

    Token ids come from open_clip's tokenizer for ``arch`` (the OpenAI BPE: start 49406, end 49407).
    """
    config = check_hf_convertible(arch)
    vision_defaults, text_defaults = open_clip.CLIPVisionCfg(), open_clip.CLIPTextCfg()
    vision, text = config["vision_cfg"], config["text_cfg"]
    embed_dim, act = config["embed_dim"], hidden_act(config)
    vision_width = vision.get("width", vision_defaults.width)
    image_size = vision.get("image_size", vision_defaults.image_size)
    text_width = text.get("width", text_defaults.width)
    tokenizer = open_clip.get_tokenizer(arch)
    return {
        "projection_dim": embed_dim,
        "vision_config": {
            "hidden_size": vision_width,
            "intermediate_size": int(vision_width * vision.get("mlp_ratio", vision_defaults.mlp_ratio)),
            "num_hidden_layers": vision.get("layers", vision_defaults.layers),
            "num_attention_heads": vision_width // vision.get("head_width", vision_defaults.head_width),
            "image_size": image_size[0] if isinstance(image_size, (list, tuple)) else image_size,
            "patch_size": vision.get("patch_size", vision_defaults.patch_size),
            "num_channels": 3,
            "hidden_act": act,
            "layer_norm_eps": LAYER_NORM_EPS,
            "projection_dim": embed_dim,
        },
        "text_config": {
            "vocab_size": text.get("vocab_size", text_defaults.vocab_size),
            "hidden_size": text_width,
            "intermediate_size": int(text_width * text.get("mlp_ratio", text_defaults.mlp_ratio)),
            "num_hidden_layers": text.get("layers", text_defaults.layers),
            "num_attention_heads": text.get("heads", text_defaults.heads),
            "max_position_embeddings": text.get("context_length", text_defaults.context_length),
            "hidden_act": act,
            "layer_norm_eps": LAYER_NORM_EPS,
            "projection_dim": embed_dim,
            "bos_token_id": tokenizer.sot_token_id,
            "eos_token_id": tokenizer.eot_token_id,
            "pad_token_id": text.get("pad_id", text_defaults.pad_id),
        },
    }


def _encoder_layers(state: dict[str, torch.Tensor], source: str, target: str) -> dict[str, torch.Tensor]:
    """The residual blocks under ``source`` (``visual.transformer.resblocks``) as transformers' layers."""
    renames = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    converted = {}
    prefix = source + "."
    for key, tensor in state.items():
        if not key.startswith(prefix):
            continue
        index, name = key[len(prefix) :].split(".", 1)
        layer = f"{target}.{index}."
        if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = name.rsplit("_", 1)[1]
            for projection, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                converted[f"{layer}self_attn.{projection}.{kind}"] = part
            continue
        module, parameter = name.rsplit(".", 1)
        if module not in renames:
            raise KeyError(f"open_clip key {key} has no transformers equivalent")
        converted[f"{layer}{renames[module]}.{parameter}"] = tensor
    return converted


def convert_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict with transformers ``CLIPModel`` key names and layouts.

    Every open_clip key is used exactly once; a key left over is a ``KeyError`` (an architecture that
    :func:`check_hf_convertible` should have refused). Tensors are new contiguous copies.
    """
    direct = {
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
    }
    transposed = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
    layers = {
        "visual.transformer.resblocks": "vision_model.encoder.layers",
        "transformer.resblocks": "text_model.encoder.layers",
    }
    converted = {target: state[source] for source, target in direct.items()}
    converted |= {target: state[source].t() for source, target in transposed.items()}
    for source, target in layers.items():
        converted |= _encoder_layers(state, source, target)
    used = set(direct) | set(transposed)
    used |= {k for k in state if k.startswith(tuple(f"{source}." for source in layers))}
    left_over = sorted(set(state) - used)
    if left_over:
        raise KeyError(f"open_clip keys without a transformers equivalent: {', '.join(left_over[:5])}")
    return contiguous_copy(converted)


def image_processor_config(image_size: int, preprocess: dict) -> dict:
    """``preprocessor_config.json`` of a ``CLIPImageProcessor`` that prepares images as open_clip does.

    Args:
        image_size: the model's input side in pixels.
        preprocess: open_clip's preprocess config (``mean``, ``std``, ``interpolation``, ``resize_mode``).

    Raises:
        ConfigError: a resize mode or interpolation the CLIP image processor cannot reproduce.
    """
    interpolation = preprocess.get("interpolation", "bicubic")
    resize_mode = preprocess.get("resize_mode", "shortest")
    if interpolation not in PIL_RESAMPLE:
        raise ConfigError(f"preprocess: interpolation '{interpolation}' has no CLIPImageProcessor equivalent")
    if resize_mode == "shortest":  # resize the shorter side, then crop the centre square
        size, crop = {"shortest_edge": image_size}, True
    elif resize_mode == "squash":  # resize both sides, no crop
        size, crop = {"height": image_size, "width": image_size}, False
    else:
        raise ConfigError(f"preprocess: resize mode '{resize_mode}' has no CLIPImageProcessor equivalent")
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": size,
        "resample": PIL_RESAMPLE[interpolation],
        "do_center_crop": crop,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(v) for v in preprocess["mean"]],
        "image_std": [float(v) for v in preprocess["std"]],
        "do_convert_rgb": True,
    }


def import_transformers() -> ModuleType:
    """The ``transformers`` module, or a :class:`~mmtard.errors.MissingExtraError` naming ``mmtard[hf]``."""
    return import_optional("transformers", "hf", "--format hf")


def write_hf_folder(arch: str, model: torch.nn.Module, preprocess: dict, out: Path) -> list[Path]:
    """Write ``config.json``, ``model.safetensors`` and ``preprocessor_config.json`` for ``arch`` into ``out``.

    The folder loads offline with ``CLIPModel``, ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``
    and ``CLIPImageProcessor`` ``.from_pretrained(out)``.

    Returns:
        The paths written.
    """
    transformers = import_transformers()
    config = transformers.CLIPConfig(**hf_config_dict(arch))
    config.architectures = ["CLIPModel"]
    weights = convert_state_dict(model.state_dict())
    size = config.vision_config.image_size
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / HF_CONFIG_FILE, config.to_json_string())
    save_safetensors(out / HF_WEIGHTS_FILE, weights)
    atomic_write_text(out / HF_PROCESSOR_FILE, json.dumps(image_processor_config(size, preprocess), indent=2) + "\n")
    return [out / name for name in HF_FILES]
