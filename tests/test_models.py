"""Model loading (architectures, tags, files, safety) and the zero-shot classifier's formula."""

from __future__ import annotations

import pickle

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from mmtard.errors import ConfigError
from mmtard.models import CheckpointError, build_zero_shot_classifier, list_tiny_models, load_clip, text_prototypes


def test_tiny_models_are_registered_with_distinct_sizes():
    assert list_tiny_models() == ["tiny-vit-l", "tiny-vit-m", "tiny-vit-s"]
    dims = set()
    for name in list_tiny_models():
        bundle = load_clip(name, "none")
        assert bundle.image_size == 32
        dims.add(bundle.model.visual.output_dim)
    assert dims == {128, 192, 256}


def test_classifier_logits_equal_hand_computation(tiny_bundle):
    classnames = ["cat", "dog", "truck"]
    templates = ["a photo of a {}.", "a blurry {}."]
    classifier = build_zero_shot_classifier(tiny_bundle, classnames, templates, logit_scale=100.0)
    x = torch.rand(4, 3, 32, 32)

    model, tokenizer = tiny_bundle.model, tiny_bundle.tokenizer
    with torch.no_grad():
        mean = torch.tensor(tiny_bundle.mean).view(1, 3, 1, 1)
        std = torch.tensor(tiny_bundle.std).view(1, 3, 1, 1)
        image = model.encode_image((x - mean) / std)
        image = image / image.norm(dim=-1, keepdim=True)
        prototypes = []
        for name in classnames:
            prompts = model.encode_text(tokenizer([t.format(name) for t in templates]))
            prompts = prompts / prompts.norm(dim=-1, keepdim=True)
            mean_prompt = prompts.mean(0)
            prototypes.append(mean_prompt / mean_prompt.norm())
        expected = 100.0 * image @ torch.stack(prototypes).T
        got = classifier(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert classifier(x, return_features=True).shape == (4, 128)


def test_prototypes_are_computed_once(tiny_bundle, monkeypatch):
    calls = []
    original = tiny_bundle.model.encode_text

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tiny_bundle.model, "encode_text", counting)
    first = text_prototypes(tiny_bundle, ("p", "q"), ("x {}.",))
    second = text_prototypes(tiny_bundle, ("p", "q"), ("x {}.",))
    assert len(calls) == 1 and first is second


def test_model_logit_scale(tiny_bundle):
    classifier = build_zero_shot_classifier(tiny_bundle, ["a", "b"], ["{}"], logit_scale="model")
    assert classifier.logit_scale == pytest.approx(float(tiny_bundle.model.logit_scale.detach().exp()))
    with pytest.raises(ConfigError, match="logit_scale"):
        build_zero_shot_classifier(tiny_bundle, ["a", "b"], ["{}"], logit_scale="big")


@pytest.fixture(scope="module")
def vit_b32():
    torch.manual_seed(0)
    return load_clip("ViT-B-32", "none")


def _outputs(bundle, x, tokens):
    with torch.no_grad():
        return bundle.model.encode_image(x), bundle.model.encode_text(tokens)


def test_vit_b32_round_trips_through_safetensors_and_pt(vit_b32, tmp_path):
    x = torch.rand(2, 3, 224, 224)
    tokens = vit_b32.tokenizer(["a photo of a cat."])
    reference = _outputs(vit_b32, x, tokens)
    state = {k: v.contiguous() for k, v in vit_b32.model.state_dict().items()}

    st_path = tmp_path / "vit.safetensors"
    save_file(state, str(st_path))
    pt_path = tmp_path / "vit.pt"
    torch.save(state, pt_path)
    for path in (st_path, pt_path):
        loaded = load_clip("ViT-B-32", str(path))
        for a, b in zip(reference, _outputs(loaded, x, tokens)):
            assert torch.equal(a, b), path.suffix
        assert loaded.pretrained == str(path)


class _RunsCodeOnLoad:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_pickle_that_runs_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _RunsCodeOnLoad()}, f)
    with pytest.raises(CheckpointError, match="trust-checkpoint"):
        load_clip("tiny-vit-s", str(path))
    assert "this pickle ran code" not in capsys.readouterr().out


def test_trust_checkpoint_allows_a_full_pickle(tiny_bundle, tmp_path):
    path = tmp_path / "full.pt"
    torch.save({"state_dict": tiny_bundle.model.state_dict(), "note": _Note()}, path)
    with pytest.raises(CheckpointError):
        load_clip("tiny-vit-s", str(path))
    loaded = load_clip("tiny-vit-s", str(path), trust_checkpoint=True)
    assert torch.equal(loaded.model.visual.conv1.weight, tiny_bundle.model.visual.conv1.weight)


class _Note:
    """A non-tensor object: loading it needs full unpickling."""


def test_unknown_architecture_is_one_clear_error():
    with pytest.raises(ConfigError, match="unknown architecture 'ViT-Q-99'"):
        load_clip("ViT-Q-99", "none")


def test_missing_checkpoint_file_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_clip("tiny-vit-s", str(tmp_path / "nope.safetensors"))


def test_unknown_pretrained_tag_names_the_tags():
    with pytest.raises(ConfigError, match="openai"):
        load_clip("ViT-B-32", "not-a-tag")


def test_checkpoint_of_another_architecture_is_refused(tiny_bundle, tmp_path):
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_bundle.model.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_clip("tiny-vit-m", str(path))


def test_plain_open_clip_loads_a_saved_model(tiny_bundle, tmp_path):
    path = tmp_path / "student.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_bundle.model.state_dict().items()}, str(path))
    from mmtard.models.tiny import TINY_CONFIG_DIR

    open_clip.add_model_config(TINY_CONFIG_DIR)
    model = open_clip.create_model("tiny-vit-s", pretrained=str(path)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), tiny_bundle.model.encode_image(x))
