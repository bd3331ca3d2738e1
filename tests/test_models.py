"""Model loading (architectures, tags, files, safety) and the zero-shot classifier's formula."""

from __future__ import annotations

import logging
import pickle

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from mmtard.errors import ConfigError
from mmtard.models import (
    CheckpointError,
    build_zero_shot_classifier,
    check_checkpoint_file,
    list_tiny_models,
    load_clip,
    text_prototypes,
)


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


@pytest.fixture(scope="module")
def tiny_state(tiny_bundle):
    return {k: v.contiguous() for k, v in tiny_bundle.model.state_dict().items()}


def _safetensors_bytes(state, tmp_path) -> bytes:
    save_file(state, str(tmp_path / "source.safetensors"))
    return (tmp_path / "source.safetensors").read_bytes()


def _torch_bytes(obj, tmp_path, legacy: bool = False) -> bytes:
    torch.save(obj, tmp_path / "source.pt", _use_new_zipfile_serialization=not legacy)
    return (tmp_path / "source.pt").read_bytes()


def _header_only(raw: bytes) -> bytes:
    return raw[: 8 + int.from_bytes(raw[:8], "little")]


BAD_CHECKPOINTS = {
    # name: (file name, bytes from (state, tmp_path), expected message)
    "pickle-named-safetensors": (
        "w.safetensors",
        lambda s, t: _torch_bytes(s, t),
        "is a PyTorch file .*not safetensors",
    ),
    "truncated-safetensors": ("w.safetensors", lambda s, t: _safetensors_bytes(s, t)[:-1000], "is truncated"),
    "header-only-safetensors": ("w.safetensors", lambda s, t: _header_only(_safetensors_bytes(s, t)), "is truncated"),
    "empty-safetensors": ("w.safetensors", lambda s, t: b"", "is empty"),
    "garbage-safetensors": ("w.safetensors", lambda s, t: bytes(range(256)) * 4, "is not a safetensors file"),
    "text-safetensors": ("w.safetensors", lambda s, t: b"\x05\x00\x00\x00\x00\x00\x00\x00hello", "header is not JSON"),
    "truncated-pt": ("w.pt", lambda s, t: _torch_bytes(s, t)[:-1000], "is truncated or corrupt"),
    "truncated-legacy-pt": ("w.pt", lambda s, t: _torch_bytes(s, t, legacy=True)[:5000], "not a readable checkpoint"),
    "garbage-pt": ("w.pt", lambda s, t: bytes(range(256)) * 4, "not a readable checkpoint"),
    "empty-pt": ("w.pt", lambda s, t: b"", "is empty"),
    "tensor-not-state-dict": ("w.pt", lambda s, t: _torch_bytes(torch.zeros(3), t), "expected a state dict"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_unusable_checkpoint_is_one_clear_error(case, tiny_state, tmp_path):
    file_name, make, message = BAD_CHECKPOINTS[case]
    path = tmp_path / file_name
    path.write_bytes(make(tiny_state, tmp_path))
    with pytest.raises(CheckpointError, match=message) as checked:
        check_checkpoint_file(path, "teachers.robust.pretrained")
    assert str(checked.value).startswith(f"teachers.robust.pretrained: '{path}' ")
    with pytest.raises(CheckpointError, match=message) as loaded:
        load_clip("tiny-vit-s", str(path))
    assert str(loaded.value).startswith("pretrained: ") and "does not fit" not in str(loaded.value)


def test_folder_given_as_checkpoint(tmp_path):
    folder = tmp_path / "weights.safetensors"
    folder.mkdir()
    for path in (folder, tmp_path):
        with pytest.raises(CheckpointError, match="is a folder, expected a file"):
            load_clip("tiny-vit-s", str(path))


def test_check_checkpoint_file_accepts_readable_weights(tiny_state, tmp_path):
    (tmp_path / "w.safetensors").write_bytes(_safetensors_bytes(tiny_state, tmp_path))
    (tmp_path / "w.pt").write_bytes(_torch_bytes({"state_dict": tiny_state, "epoch": 3}, tmp_path))
    (tmp_path / "legacy.bin").write_bytes(_torch_bytes(tiny_state, tmp_path, legacy=True))
    for name in ("w.safetensors", "w.pt", "legacy.bin"):
        assert check_checkpoint_file(str(tmp_path / name)) == tmp_path / name
    with pytest.raises(FileNotFoundError, match="pretrained: checkpoint file .* does not exist"):
        check_checkpoint_file(tmp_path / "absent.pt")


def test_check_checkpoint_file_does_not_run_a_trusted_pickle(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"payload": _RunsCodeOnLoad()}, path)
    assert check_checkpoint_file(path, trust_checkpoint=True) == path
    with pytest.raises(CheckpointError, match="needs code execution"):
        check_checkpoint_file(path)
    assert "this pickle ran code" not in capsys.readouterr().out


def test_a_pickle_the_weights_only_unpickler_refuses_is_named_so_in_torch_s_current_wording(tmp_path):
    """Judged from the file (a whole pickle that torch.load(weights_only=True) refused), not from torch's
    sentences: a custom class in torch.save's zip, a plain pickle calling a function, and a state dict pickled
    with protocol 4 (torch 2.14's weights-only unpickler refuses its FRAME opcode: "Unsupported operand 149")
    are refused as needing code execution, with torch's reason; a cut zip stays "truncated or corrupt"."""
    torch.save({"payload": _RunsCodeOnLoad()}, tmp_path / "custom-class.pt")
    (tmp_path / "calls-print.pt").write_bytes(pickle.dumps(_RunsCodeOnLoad(), protocol=2))
    torch.save({"w": torch.zeros(2)}, tmp_path / "protocol-4.pt", pickle_protocol=4)
    reasons = {
        "custom-class.pt": "Unsupported global",
        "calls-print.pt": "Unsupported global",
        "protocol-4.pt": "Unsupported operand",
    }
    for name, reason in reasons.items():
        with pytest.raises(CheckpointError, match=f"needs code execution.*weights_only=True\\): {reason}"):
            check_checkpoint_file(tmp_path / name)
    whole = (tmp_path / "protocol-4.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        check_checkpoint_file(tmp_path / "cut.pt")


@pytest.mark.parametrize(
    "refusal",
    [
        pickle.UnpicklingError("a wording no torch has used yet"),
        RuntimeError("Weights only load failed. Unsupported global: GLOBAL builtins.print"),
        TypeError("WeightsUnpickler error: Unsupported operand 149"),
    ],
    ids=["unpickling-error-any-wording", "runtime-error-torch-words", "type-error-torch-words"],
)
def test_a_blocked_pickle_is_recognised_by_error_type_or_by_any_of_torch_s_wordings(refusal, tmp_path, monkeypatch):
    """The weights-only unpickler's refusal is told from the error type (``pickle.UnpicklingError``, whatever its
    message) or, for another type, from torch's words; the file then decides (a whole pickle). An error of another
    type in other words stays "truncated or corrupt"."""
    path = tmp_path / "custom-class.pt"
    torch.save({"payload": _RunsCodeOnLoad()}, path)

    def refuse(*args, **kwargs):
        raise refusal

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(CheckpointError, match="needs code execution"):
        check_checkpoint_file(path)
    refusal_elsewhere = RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(refusal_elsewhere))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        check_checkpoint_file(path)


def test_hub_id_not_cached_while_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="model: 'hf-hub:mmtard-tests/absent': offline .*this id is not cached"):
        load_clip("hf-hub:mmtard-tests/absent", cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="names no repository"):
        load_clip("hf-hub:")


def test_open_clip_random_init_warning_is_silenced(tiny_state, tmp_path, caplog):
    path = tmp_path / "w.safetensors"
    path.write_bytes(_safetensors_bytes(tiny_state, tmp_path))
    filters_before = list(logging.getLogger().filters)
    with caplog.at_level(logging.WARNING):
        load_clip("tiny-vit-s", str(path))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_clip("tiny-vit-s", "none")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "the weights are random" in warnings[0]
    assert logging.getLogger().filters == filters_before


def test_cached_hf_hub_weights_are_checked_before_open_clip_reads_them(tmp_path, monkeypatch):
    """Issue 27, item 14: an ``hf-hub:`` id's cached weights file is checked as a checkpoint file is."""
    from mmtard.models import CheckpointError, loading

    (tmp_path / "open_clip_config.json").write_text("{}")
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # cut short

    def cached(repo_id, filename, cache_dir=None):
        return str(tmp_path / filename) if (tmp_path / filename).is_file() else None

    monkeypatch.setattr(loading, "try_to_load_from_cache", cached)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="^model: .*open_clip_model.safetensors' is truncated"):
        loading.check_hub_id("hf-hub:org/repo")
