"""Where a result came from: the mmtard version and git commit, the packages and the machine that made it.

A training run appends one record per start (the first and every ``--resume``) to ``provenance.json`` in its
folder (:class:`mmtard.train.RunDir`), so a table built from runs can say which code produced each; an export's
model card names the commit that exported it.
"""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path

import open_clip
import torch

import mmtard


def git_commit() -> str | None:
    """``<sha>`` of the mmtard checkout (``<sha>+uncommitted changes`` when it is dirty), ``None`` outside git."""
    package = Path(mmtard.__file__).resolve().parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=package, capture_output=True, text=True)
        if top.returncode != 0 or not (Path(top.stdout.strip()) / "src" / "mmtard").is_dir():
            return None
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True, check=True)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=package,
            capture_output=True,
            text=True,
            check=True,
        )
    except (FileNotFoundError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+uncommitted changes" if status.stdout.strip() else "")


def environment(device: torch.device) -> dict:
    """The code and machine of this process: mmtard's version and commit, Python, torch, open_clip, the platform
    and the device (with the GPU's name on CUDA)."""
    device = torch.device(device)
    record = {
        "mmtard": mmtard.__version__,
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def start_record(step: int, world_size: int, device: torch.device) -> dict:
    """One start of a training run: UTC time, the step it starts from, the process count and :func:`environment`."""
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"started": started, "step": step, "world_size": world_size, **environment(device)}
