"""Image-tower files (RobustVLM's FARE / TeCoA, TeCoA's ``vision_encoder_state_dict``) over a base open_clip model.

Every format is written here from random weights of a real architecture (ViT-B-32), and the image embeddings
of ``load_clip(..., vision_weights=FILE)`` are compared with a model loaded by hand the way the publishers'
code does: ``model.visual.load_state_dict(sd)``.
"""

from __future__ import annotations

import json
import pickle

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from mmtard.cli import main
from mmtard.models import CheckpointError, check_architecture, load_clip
from mmtard.models.vision_weights import quickgelu_name

ARCH = "ViT-B-32"
FORMATS = ("bare.pt", "tecoa.pt", "bare.safetensors", "prefixed.pt", "module-visual.safetensors")


def _tower(seed: int, arch: str = ARCH) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None)
    return {k: v.clone() for k, v in model.visual.state_dict().items()}


@pytest.fixture(scope="module")
def robust_tower() -> dict[str, torch.Tensor]:
    """A ViT-B-32 image tower with random weights: what a RobustVLM file holds."""
    return _tower(1)


@pytest.fixture(scope="module")
def tower_files(tmp_path_factory, robust_tower) -> dict[str, object]:
    """The tower in every published format: name -> path."""
    folder = tmp_path_factory.mktemp("towers")
    files = {name: folder / name for name in FORMATS}
    torch.save(robust_tower, files["bare.pt"])  # RobustVLM
    torch.save({"vision_encoder_state_dict": robust_tower}, files["tecoa.pt"])  # TeCoA
    save_file(robust_tower, str(files["bare.safetensors"]))
    torch.save({f"visual.{k}": v for k, v in robust_tower.items()}, files["prefixed.pt"])
    save_file(
        {f"module.visual.{k}": v.contiguous() for k, v in robust_tower.items()}, str(files["module-visual.safetensors"])
    )
    return files


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.rand(2, 3, 224, 224)


@pytest.fixture(scope="module")
def publishers_embeddings(robust_tower, images) -> torch.Tensor:
    """How RobustVLM's loader does it: an open_clip model, then ``model.visual.load_state_dict(sd)``."""
    torch.manual_seed(4)  # another base than any load_clip below: only the tower may matter
    model = open_clip.create_model(ARCH, pretrained=None).eval()
    model.visual.load_state_dict(robust_tower)
    with torch.no_grad():
        return model.encode_image(images)


@pytest.fixture(scope="module")
def vit_b16_tower_file(tmp_path_factory) -> object:
    path = tmp_path_factory.mktemp("b16") / "vit-b16.pt"
    torch.save(_tower(3, "ViT-B-16"), path)
    return path


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_gives_the_publishers_image_embeddings(name, tower_files, publishers_embeddings, images):
    bundle = load_clip(ARCH, "none", vision_weights=tower_files[name])
    with torch.no_grad():
        assert torch.equal(bundle.model.encode_image(images), publishers_embeddings)
    assert bundle.vision_weights == str(tower_files[name]) and bundle.vision_weights_alpha == 1.0


def test_alpha_interpolates_in_weight_space(tmp_path):
    base, tower, files = _tiny_files(tmp_path)
    mixed = load_clip(
        "tiny-vit-s", str(tmp_path / "base.safetensors"), vision_weights=files["bare.pt"], vision_weights_alpha=0.25
    )
    for key, value in mixed.model.visual.state_dict().items():
        torch.testing.assert_close(value, 0.25 * tower[key] + 0.75 * base[f"visual.{key}"])
    assert mixed.vision_weights_alpha == 0.25


def test_a_tower_of_another_architecture_names_the_field_and_the_shapes(vit_b16_tower_file):
    with pytest.raises(CheckpointError) as info:
        load_clip(ARCH, "none", vision_weights=vit_b16_tower_file)
    message = str(info.value)
    assert message.startswith("vision_weights: ") and "\n" not in message
    assert "conv1.weight is (768, 3, 16, 16) in the file, ViT-B-32 expects (768, 3, 32, 32)" in message
    assert "positional_embedding is (197, 768) in the file, ViT-B-32 expects (50, 768)" in message


def test_missing_and_extra_tensors_are_named(tmp_path, robust_tower):
    partial = {k: v for k, v in robust_tower.items() if k != "proj"} | {"head.weight": torch.zeros(2)}
    path = tmp_path / "partial.safetensors"
    save_file(partial, str(path))
    with pytest.raises(CheckpointError, match=r"^vision_weights: .* lacks 1 of its \d+ tensors \(proj\) and has 1"):
        load_clip(ARCH, "none", vision_weights=path)


def test_a_pickle_that_runs_code_is_refused_without_trust(tmp_path, robust_tower):
    path = tmp_path / "tower.pt"
    with open(path, "wb") as f:
        pickle.dump({"vision_encoder_state_dict": robust_tower, "optimizer": torch.optim.SGD}, f)
    with pytest.raises(CheckpointError, match="^vision_weights: .* needs code execution"):
        load_clip(ARCH, "none", vision_weights=path)


def test_alpha_outside_0_1_is_refused(tower_files):
    with pytest.raises(ValueError, match=r"^vision_weights_alpha: expected a number in \[0, 1\]"):
        load_clip(ARCH, "none", vision_weights=tower_files["bare.pt"], vision_weights_alpha=1.5)


def test_quickgelu_for_openai_towers():
    """Decision: a tower over the openai tag is built with QuickGELU (what the weights were trained with)."""
    assert quickgelu_name("ViT-B-32", "openai") == "ViT-B-32-quickgelu"
    assert quickgelu_name("ViT-B-32-quickgelu", "openai") is None
    assert quickgelu_name("ViT-B-32", "laion2b_s34b_b79k") is None
    assert quickgelu_name("tiny-vit-s", "openai") is None


# --- export: the file's tensors as visual.*, the base's for everything else -------------------------------------


def _tiny_files(tmp_path) -> tuple[dict, dict, dict]:
    """A tiny-vit-s base checkpoint and another tower in every format: (base, tower, files)."""
    check_architecture("tiny-vit-s")  # registers the tiny architectures with open_clip
    torch.manual_seed(10)
    base = open_clip.create_model("tiny-vit-s", pretrained=None).state_dict()
    tower = {k[len("visual.") :]: v.clone() + 1 for k, v in base.items() if k.startswith("visual.")}
    save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "base.safetensors"))
    files = {name: tmp_path / name for name in FORMATS}
    torch.save(tower, files["bare.pt"])
    torch.save({"vision_encoder_state_dict": tower}, files["tecoa.pt"])
    save_file(tower, str(files["bare.safetensors"]))
    torch.save({f"visual.{k}": v for k, v in tower.items()}, files["prefixed.pt"])
    save_file({f"module.visual.{k}": v for k, v in tower.items()}, str(files["module-visual.safetensors"]))
    return base, tower, files


def test_export_writes_the_files_tower_and_the_base_elsewhere_for_every_format(tmp_path):
    base, tower, files = _tiny_files(tmp_path)
    for name, path in files.items():
        out = tmp_path / f"export-{name}"
        argv = ["export", "--model", "tiny-vit-s", "--pretrained", str(tmp_path / "base.safetensors")]
        assert main([*argv, "--vision-weights", str(path), "--format", "open_clip", "--out", str(out)]) == 0
        written = load_file(str(out / "model.safetensors"))
        assert set(written) == set(base)
        for key, value in written.items():
            expected = tower[key[len("visual.") :]] if key.startswith("visual.") else base[key]
            assert torch.equal(value, expected), (name, key)


def test_export_of_the_published_vit_b32_case(tmp_path, tower_files, robust_tower):
    """RobustVLM's case at the real shapes: a bare .pt over ViT-B-32, every visual.* tensor exactly the file's."""
    out = tmp_path / "export"
    argv = ["export", "--model", ARCH, "--pretrained", "none", "--vision-weights", str(tower_files["bare.pt"])]
    assert main([*argv, "--format", "open_clip", "--out", str(out)]) == 0
    written = load_file(str(out / "model.safetensors"))
    for key, value in robust_tower.items():
        assert torch.equal(written[f"visual.{key}"], value), key


def test_export_of_a_vit_b16_tower_over_vit_b32_is_one_line_exit_2(tmp_path, vit_b16_tower_file, capsys):
    path = vit_b16_tower_file
    out = tmp_path / "export"
    argv = ["export", "--model", ARCH, "--pretrained", "none", "--vision-weights", str(path)]
    assert main([*argv, "--format", "open_clip", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mmtard export: error: --vision-weights: ")
    assert "(768, 3, 16, 16) in the file, ViT-B-32 expects (768, 3, 32, 32)" in err
    assert not out.exists()


def test_eval_flag_reaches_the_model_and_the_record(tmp_path, npz_dir):
    _, _, files = _tiny_files(tmp_path)
    out = tmp_path / "out"
    argv = ["eval", "--model", "tiny-vit-s", "--pretrained", str(tmp_path / "base.safetensors"), "--dataset", "npz"]
    argv += ["--data-dir", str(npz_dir), "--attack", "none", "--no-progress", "--out", str(out)]
    assert main([*argv, "--vision-weights", str(files["tecoa.pt"]), "--vision-weights-alpha", "0.5"]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["vision_weights"] == str(files["tecoa.pt"]) and record["vision_weights_alpha"] == 0.5


def test_eval_refuses_a_missing_tower_file_before_anything(tmp_path, npz_dir, capsys):
    out = tmp_path / "out"
    argv = ["eval", "--model", "tiny-vit-s", "--dataset", "npz", "--data-dir", str(npz_dir), "--out", str(out)]
    assert main([*argv, "--vision-weights", str(tmp_path / "nope.pt")]) == 2
    assert "error: --vision-weights: checkpoint file" in capsys.readouterr().err
    assert not out.exists()


def test_a_tower_over_openai_is_built_with_quickgelu_and_says_so(tower_files, monkeypatch, caplog):
    """No download here: the tag's weights are stood in for by random ones; the architecture built is the point."""
    from mmtard.models import loading

    built = []

    def tagged(name, tag, device, cache_dir, field):
        built.append((name, tag))
        return open_clip.create_model(name, pretrained=None)

    monkeypatch.setattr(loading, "_create_tagged_model", tagged)
    bundle = load_clip(ARCH, "openai", vision_weights=tower_files["bare.pt"])
    assert built == [("ViT-B-32-quickgelu", "openai")] and bundle.name == "ViT-B-32-quickgelu"
    assert isinstance(bundle.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    assert "building ViT-B-32-quickgelu (name it to silence this warning)" in caplog.text


def _tiny_tower() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = load_clip("tiny-vit-s", "none").model
    return {k: v.contiguous().clone() for k, v in model.visual.state_dict().items()}


def test_a_safetensors_file_whose_header_length_starts_with_the_pickle_byte_is_read(tmp_path):
    """Issue 27, item 9: a header of 0x80 + 256 * k bytes starts the file with 0x80, a pickle's first byte; the JSON
    after the length tells a safetensors file from a PyTorch one."""
    from mmtard.models import check_checkpoint_file
    from mmtard.models.vision_weights import read_vision_state_dict

    tower = _tiny_tower()
    path = tmp_path / "t.safetensors"
    for pad in range(300):  # find the metadata that makes the header length's low byte 0x80
        save_file(tower, str(path), metadata={"note": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    check_checkpoint_file(path, "--vision-weights")
    read = read_vision_state_dict(path)
    assert read.keys() == tower.keys() and all(torch.equal(read[k], tower[k]) for k in tower)
    with pytest.raises(CheckpointError, match="is a PyTorch file"):  # a real pickle under the name is still refused
        (tmp_path / "p.safetensors").write_bytes(pickle.dumps({"w": 1}))
        check_checkpoint_file(tmp_path / "p.safetensors", "--vision-weights")


def test_a_file_that_holds_itself_under_state_dict_is_refused_not_followed_forever(tmp_path, npz_dir, capsys):
    """Issue 27, item 11: ``d['state_dict'] = d`` once hung eval, export and train at 100 % CPU."""
    cycle = {"w": torch.zeros(1)}
    cycle["state_dict"] = cycle
    torch.save(cycle, tmp_path / "r.pt")
    argv = ["eval", "--model", "tiny-vit-s", "--pretrained", "none", "--dataset", "npz", "--data-dir", str(npz_dir)]
    argv += ["--attack", "none", "--no-progress", "--vision-weights", str(tmp_path / "r.pt")]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmtard eval: error: --vision-weights: ") and "r.pt" in err[0]
    assert not (tmp_path / "out").exists()


def test_eval_with_several_alphas_writes_each_and_the_frontier(tmp_path, npz_dir):
    """``--vision-weights-alpha 0 0.5 1``: one evaluation per alpha in OUT/alpha<A>/, each as a run with that one
    alpha gives, and frontier.md / .json / .png through them."""
    _, _, files = _tiny_files(tmp_path)
    argv = ["eval", "--model", "tiny-vit-s", "--pretrained", str(tmp_path / "base.safetensors"), "--dataset", "npz"]
    argv += ["--data-dir", str(npz_dir), "--attack", "pgd", "--eps", "4/255", "--steps", "1", "--no-progress"]
    argv += ["--vision-weights", str(files["tecoa.pt"])]
    out = tmp_path / "frontier"
    assert main([*argv, "--vision-weights-alpha", "0", "0.5", "1", "--out", str(out)]) == 0
    frontier = json.loads((out / "frontier.json").read_text())
    assert list(frontier) == ["0", "0.5", "1"]
    for alpha in ("0", "0.5", "1"):
        record = json.loads((out / f"alpha{alpha}" / "results.json").read_text())
        assert record["vision_weights_alpha"] == float(alpha) and frontier[alpha] == [record]
    assert main([*argv, "--vision-weights-alpha", "0.5", "--out", str(tmp_path / "single")]) == 0
    single = json.loads((tmp_path / "single" / "results.json").read_text())
    assert single["clean_acc"] == frontier["0.5"][0]["clean_acc"]
    assert single["robust"][0]["acc"] == frontier["0.5"][0]["robust"][0]["acc"]
    table = (out / "frontier.md").read_text()
    assert "| alpha | dataset | samples | clean | pgd linf 4/255 (1 steps, 1 restart) |" in table
    assert table.count("| npz |") == 3 and (out / "frontier.png").stat().st_size > 0
