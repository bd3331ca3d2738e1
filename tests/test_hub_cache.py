"""``--model hf-hub:ORG/NAME`` read from the local Hugging Face cache with ``HF_HUB_OFFLINE=1``.

The cache is laid out the way ``huggingface_hub`` writes it (``models--ORG--NAME/snapshots/<rev>/`` with the
open_clip config and weights, ``refs/main`` naming the revision), with a tiny architecture to keep it fast.
The check runs in a fresh interpreter: ``huggingface_hub`` reads ``HF_HUB_CACHE`` when it is imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from mmtard.export.hf import open_clip_model_config
from mmtard.models import check_architecture

REPO = "chs20-test/FARE4-tiny"
REVISION = "0123456789abcdef0123456789abcdef01234567"
SRC = Path(__file__).resolve().parents[1] / "src"

CHECK = """
import json, sys
import torch
from safetensors.torch import load_file
from mmtard.cli import main
from mmtard.models import load_clip

code = main(["eval", "--model", "hf-hub:{repo}", "--dataset", "npz", "--data-dir", sys.argv[1], "--attack", "none",
             "--no-progress", "--out", sys.argv[2]])
bundle = load_clip("hf-hub:{repo}")
expected = load_file(sys.argv[3])
same = all(torch.equal(value, expected[key]) for key, value in bundle.model.state_dict().items())
print(json.dumps({{"code": code, "same": same, "keys": len(expected), "pretrained": bundle.pretrained}}))
"""


def _cache(root: Path) -> Path:
    """A huggingface_hub cache holding REPO: config and weights in a snapshot, refs/main -> the snapshot."""
    check_architecture("tiny-vit-s")  # registers tiny-vit-s
    repo = root / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    config = {
        "model_cfg": open_clip_model_config("tiny-vit-s"),
        "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3},
    }
    (snapshot / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(3)
    weights = {k: v.contiguous() for k, v in open_clip.create_model("tiny-vit-s").state_dict().items()}
    save_file(weights, str(snapshot / "open_clip_model.safetensors"))
    return snapshot / "open_clip_model.safetensors"


def open_clip_state_keys() -> list[str]:
    check_architecture("tiny-vit-s")
    return list(open_clip.create_model("tiny-vit-s").state_dict())


def test_an_hf_hub_id_loads_from_the_cache_offline(tmp_path, npz_dir):
    weights = _cache(tmp_path / "hub")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"), HF_HUB_CACHE=str(tmp_path / "hub"))
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", CHECK.format(repo=REPO), str(npz_dir), str(out), str(weights)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "same": True, "keys": len(open_clip_state_keys()), "pretrained": f"hf-hub:{REPO}"}
    record = json.loads((out / "results.json").read_text())
    assert record["model"] == f"hf-hub:{REPO}" and record["samples"] == 40


def test_an_uncached_hf_hub_id_offline_is_one_line(tmp_path, npz_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"), HF_HUB_CACHE=str(tmp_path / "hub"))
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    argv = ["-m", "mmtard.cli", "eval", "--model", f"hf-hub:{REPO}", "--dataset", "npz", "--data-dir", str(npz_dir)]
    proc = subprocess.run(
        [sys.executable, *argv, "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"mmtard eval: error: --model: 'hf-hub:{REPO}': offline")
