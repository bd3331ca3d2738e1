"""Helpers shared by the test modules (no test module imports another): the synthetic data, the tiny training runs'
command lines, result readers and the torchrun launcher."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from mmtard.models.zeroshot import ZeroShotClassifier

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MMT_ARD = REPO / "configs" / "cpu" / "mmt-ard.yaml"


def make_npz_dir(folder: Path, train_per_class: int = 16, test_per_class: int = 4) -> Path:
    """A learnable CIFAR-format npz folder: each class a distinct colour plus noise."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, size=(10, 3))
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        y = np.repeat(np.arange(10), per_class)
        x = colours[y][:, None, None, :] + rng.normal(0, 20, size=(len(y), 32, 32, 3))
        np.savez(folder / f"{split}.npz", x=np.clip(x, 0, 255).astype(np.uint8), y=y.astype(np.int64))
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return folder


def small(data_dir: Path, out: Path, *extra: str, config: Path = MMT_ARD) -> list[str]:
    """``--set`` overrides for a tiny run of ``config``: 80 seen-class training images, batch 8, PGD-1 in
    training, tiny-vit-s teachers, clean-only held-out evaluation on 10 images."""
    from mmtard.train import load_config

    teachers = [f"teachers.{role}.arch=tiny-vit-s" for role in load_config(config).teachers]
    return [
        f"data.dir={data_dir}",
        f"output_dir={out}",
        "data.batch_size=8",
        "data.eval_samples=10",
        "method.steps=1",
        "eval.eps=[]",
        "eval.steps=1",
        "eval.batch_size=16",
        "train.checkpoint_every=0",
        *teachers,
        *extra,
    ]


def as_argv(config: Path, overrides: list[str], *extra: str) -> list[str]:
    """``mmtard train`` arguments: ``--config``, no progress bars, ``extra`` flags and ``--set`` per override."""
    return ["train", "--config", str(config), "--no-progress", *extra] + [
        a for item in overrides for a in ("--set", item)
    ]


def read_metrics(run: Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl``."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def same_weights(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold bitwise-identical tensors under the same names."""
    sa, sb = load_file(str(a)), load_file(str(b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def without_seconds(value):
    """``value`` read from a results file, with the wall times (``seconds``) removed everywhere."""
    if isinstance(value, dict):
        return {k: without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_seconds(v) for v in value]
    return value


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(root: Path, launcher: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """Run the script ``launcher`` (written to ``root/launch.py``) under ``torchrun`` with two CPU processes and
    ``args``, from the repository, offline and with one thread per process; the completed process. Its temp files
    (torchrun's ``torchelastic_*`` folders) go under ``root``, so they are removed with the test's folder."""
    (root / "launch.py").write_text(launcher)
    (root / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(root / "tmp")}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(root / "launch.py"),
        *args,
    ]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


#: a process that takes the lock file argv[1] as a training run or an evaluation does, says so, and keeps it
HOLD_LOCK = (
    "import sys, time\n"
    "from mmtard.fileio import FolderLock\n"
    "lock = FolderLock(sys.argv[1])\n"
    "assert lock.acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


def lock_holder(path: Path) -> subprocess.Popen:
    """A process that holds the lock ``path`` (a :class:`mmtard.fileio.FolderLock`, the lock of a run folder or an
    evaluation's journal), returned once it holds it; the caller kills it (SIGKILL frees the lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "held":
        proc.kill()
        raise RuntimeError(f"the helper process could not take the lock {path}")
    return proc


def lock_released(path: Path) -> bool:
    """Whether no process holds the lock ``path`` and its file names no holder (a lock released, or never
    taken)."""
    from mmtard.fileio import FolderLock

    return not FolderLock(path).is_held() and (not path.exists() or path.read_text() == "")


# ------------------------------------------------------------------------- seeded fakes for saved trajectories
# (tests/test_k_teachers.py and tests/test_preset_trajectories.py compare a method's steps with a saved file)

B, K = 8, 5
SCALE = 10.0
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def fake_classifier(seed: int, dim: int) -> ZeroShotClassifier:
    """A zero-shot classifier whose tower is a seeded two-layer map of the flattened 3x4x4 image."""
    torch.manual_seed(seed)
    tower = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.GELU(), nn.Linear(16, dim))
    prototypes = F.normalize(torch.randn(K, dim), dim=-1)
    return ZeroShotClassifier(tower, MEAN, STD, prototypes, SCALE).train()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.rand(B, 3, 4, 4, generator=g), torch.randint(0, K, (B,), generator=g)
    return x, y, torch.arange(B) + (step % 2) * (B // 2)  # half the rows seen again on the next step


def assert_close(got, saved, path: str = "", rel: float = 3e-5, abs_tol: float = 1e-7) -> None:
    """``got`` equals ``saved`` in structure; each number within ``rel`` relative (``abs_tol`` near 0), each list of
    floats (a weight tensor) within ``rel`` of its largest magnitude."""
    if isinstance(saved, dict):
        assert isinstance(got, dict) and set(got) == set(saved), f"{path}: keys {sorted(got)} != {sorted(saved)}"
        for key in saved:
            assert_close(got[key], saved[key], f"{path}/{key}", rel, abs_tol)
    elif isinstance(saved, list) and saved and all(isinstance(v, float) for v in saved):
        assert isinstance(got, list) and len(got) == len(saved), f"{path}: length differs"
        worst = max(abs(a - b) for a, b in zip(got, saved))
        scale = max(abs(v) for v in saved)
        assert worst <= rel * scale + abs_tol, f"{path}: differs by {worst!r} from saved (largest entry {scale!r})"
    elif isinstance(saved, list):
        assert isinstance(got, list) and len(got) == len(saved), f"{path}: length differs"
        for i, (a, b) in enumerate(zip(got, saved)):
            assert_close(a, b, f"{path}[{i}]", rel, abs_tol)
    elif isinstance(saved, float) or (isinstance(saved, int) and not isinstance(saved, bool)):
        assert math.isclose(got, saved, rel_tol=rel, abs_tol=abs_tol), f"{path}: {got!r} != saved {saved!r}"
    else:
        assert got == saved, f"{path}: {got!r} != saved {saved!r}"


def recorded_steps(step, student: nn.Module, method, steps: int) -> dict:
    """``steps`` SGD steps (lr 0.5, attack starts from seed 7) of ``step(x, y, index) -> MethodOutput`` on
    :func:`batch`: each step's total, losses, metrics and sum of ``x'``, then the student's weights and the method's
    state (the form of the saved trajectories)."""
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    torch.manual_seed(7)
    recorded = []
    for i in range(steps):
        out = step(*batch(i))
        total = out.total()
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        recorded.append(
            {
                "total": total.item(),
                "losses": {name: term.item() for name, term in out.losses.items()},
                "metrics": dict(out.metrics),
                "x_adv_sum": out.x_adv.double().sum().item(),
            }
        )
    weights = {k: v.detach().flatten().tolist() for k, v in sorted(student.state_dict().items())}
    return {"steps": recorded, "student": weights, "method_state": method.state_dict()}
