"""What a result file says it is (issue 27, items 1 to 3): ``results.md`` of an eval and of a suite, and the model
card of an export, name the model, the weights (a file's SHA-256, an image-tower file's SHA-256 and alpha), the
suite, and the norm and eps of every robust column; read back here from the files written."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mmtard.cli import main
from mmtard.models import load_clip

EVAL = ["eval", "--model", "tiny-vit-s", "--pretrained", "none", "--no-progress", "--attack", "pgd", "--steps", "1"]


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    """A whole tiny-vit-s model and an image tower of it, as safetensors files."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    model = load_clip("tiny-vit-s", "none").model
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(folder / "whole.safetensors"))
    save_file({k: v.contiguous().clone() for k, v in model.visual.state_dict().items()}, str(folder / "t.safetensors"))
    return folder


def test_eval_results_md_names_model_weights_tower_and_every_columns_norm(tmp_path, npz_dir, weight_files):
    tower = weight_files / "t.safetensors"
    l2 = tmp_path / "l2"
    argv = [*EVAL, "--dataset", "npz", "--data-dir", str(npz_dir), "--samples", "4", "--norm", "l2", "--eps", "0.5"]
    assert main([*argv, "--vision-weights", str(tower), "--vision-weights-alpha", "0.5", "--out", str(l2)]) == 0
    text = (l2 / "results.md").read_text()
    record = json.loads((l2 / "results.json").read_text())
    assert record["vision_weights_sha256"] == _sha256(tower) and "pretrained_sha256" not in record
    head = text.split("| model |")[0]
    assert "- Model: `tiny-vit-s`" in head and "- Weights: random initialisation (`--pretrained none`)" in head
    assert f"- Image tower: `{tower}`, SHA-256 `{_sha256(tower)}`, alpha 0.5 " in head
    assert "| pgd l2 0.5 (1 steps, 1 restart) |" in text

    linf = tmp_path / "linf"
    whole = weight_files / "whole.safetensors"
    argv = [*argv[:-4], "--norm", "linf", "--eps", "0.5", "--out", str(linf)]
    argv[argv.index("--pretrained") + 1] = str(whole)
    assert main(argv) == 0
    text = (linf / "results.md").read_text()
    assert f"- Weights: `{whole}`, SHA-256 `{_sha256(whole)}`" in text and "no --vision-weights" in text
    assert "| pgd linf 0.5 (1 steps, 1 restart) |" in text  # no longer the L2 column's title


def test_a_suites_results_md_names_the_suite_and_the_weights(tmp_path, weight_files):
    rng = np.random.default_rng(0)
    root = tmp_path / "data" / "cifar10"
    root.mkdir(parents=True)
    np.savez(root / "test.npz", x=rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8), y=np.arange(10))
    (root / "classes.txt").write_text("\n".join(f"class {i}" for i in range(10)))
    suite = tmp_path / "mini.yaml"
    suite.write_text("name: mini\nattacks: [pgd]\neps: [1/255, 0.5]\nnorm: l2\ndatasets: [cifar10]\n")
    tower = weight_files / "t.safetensors"
    argv = ["eval", "--model", "tiny-vit-s", "--pretrained", "none", "--suite", str(suite), "--no-progress"]
    argv += ["--data-dir", str(tmp_path / "data"), "--steps", "1", "--vision-weights", str(tower)]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "results.md").read_text()
    assert f"- Suite: `mini` (`{suite}`)" in text and "- Model: `tiny-vit-s`" in text
    assert f"- Image tower: `{tower}`, SHA-256 `{_sha256(tower)}`, alpha 1.0 " in text
    assert "| pgd l2 1/255 (1 steps, 1 restart) | pgd l2 0.5 (1 steps, 1 restart) |" in text


def test_an_exports_model_card_names_the_tower_file_its_sha256_and_alpha(tmp_path, npz_dir, weight_files):
    tower = weight_files / "t.safetensors"
    tower_flags = ["--vision-weights", str(tower), "--vision-weights-alpha", "0.25"]
    argv = [*EVAL, "--dataset", "npz", "--data-dir", str(npz_dir), "--samples", "4", "--norm", "l2", "--eps", "0.5"]
    assert main([*argv, *tower_flags, "--out", str(tmp_path / "ev")]) == 0
    export = ["export", "--model", "tiny-vit-s", "--pretrained", "none", "--format", "open_clip", *tower_flags]
    assert main([*export, "--results", str(tmp_path / "ev" / "results.json"), "--out", str(tmp_path / "ex")]) == 0
    card = (tmp_path / "ex" / "README.md").read_text()
    assert card.splitlines()[card.splitlines().index("---", 1) + 2].startswith("# tiny-vit-s, none, image tower t.")
    assert (
        f"- Image tower: `{tower}`, SHA-256 `{_sha256(tower)}`, loaded over the source weights with alpha 0.25" in card
    )
    row = next(line for line in card.splitlines() if line.startswith("| results.json | npz |"))
    assert "| pgd | 0.5 | l2 | 1 |" in row
    # the record evaluated another alpha: the card says so
    assert main([*argv, "--vision-weights", str(tower), "--out", str(tmp_path / "ev1")]) == 0
    assert main([*export, "--results", str(tmp_path / "ev1" / "results.json"), "--out", str(tmp_path / "ex1")]) == 0
    assert (
        "NOT the exported weights (another image-tower file or alpha)" in (tmp_path / "ex1" / "README.md").read_text()
    )


def test_a_radius_too_small_to_be_one_255th_is_not_labelled_0_255():
    """Issue 27, item 19: ``--eps 1e-12`` was labelled ``0/255``."""
    from mmtard.units import format_eps

    assert format_eps(1e-12) == "1e-12" and format_eps(0.0) == "0/255" and format_eps(4 / 255) == "4/255"


def test_provenance_strings_reach_the_model_card_as_plain_text(tmp_path, weight_files):
    """Issue 27, item 18: escape codes and a new line that starts a ``#`` heading went raw into the card."""
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(weight_files / "whole.safetensors", run / "model.safetensors")
    (run / "config.yaml").write_text("student: {arch: tiny-vit-s, pretrained: none}\nmethod: {name: tecoa}\n")
    start = {"step": 0, "started": "2026-01-01", "mmtard": "0.1\x1b[31m", "commit": "abc\n# Owned", "torch": "2`x`"}
    (run / "provenance.json").write_text(json.dumps([start]))
    argv = ["export", "--model", "tiny-vit-s", "--pretrained", str(run), "--format", "open_clip"]
    assert main([*argv, "--out", str(tmp_path / "ex")]) == 0
    card = (tmp_path / "ex" / "README.md").read_text()
    assert "\x1b" not in card and "\n# Owned" not in card
    line = next(line for line in card.splitlines() if line.startswith("- Training started at step 0"))
    assert "mmtard 0.1\\x1b[31m, commit abc\\x0a# Owned, torch 2'x'," in line
