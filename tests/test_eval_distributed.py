"""``mmtard eval`` under ``torchrun --nproc_per_node 2`` on CPU (gloo) equals one process's evaluation.

The two processes share out whole batches (batch ``b`` to rank ``b % 2``, the same images a single process
puts in batch ``b``); attacks are seeded per call, so each batch's counts are the single process's and the
merged ``results.json`` is identical except ``seconds`` (wall time). Only rank 0 writes and prints.

One launch runs, through ``mmtard.cli.main`` after :func:`mmtard.distributed.start_eval_processes`
(the call ``mmtard eval`` makes first under torchrun):

- ``uneven``: two datasets, 12 images in batches of 5 (5, 5, 2): rank 0 evaluates batches 0 and 2, rank 1
  batch 1; PGD-2 at two radii.
- ``idle``: 3 images in one batch of 4: rank 1 has no batch and still reaches the merge.

The launcher also records the size of every batch each process evaluates, so the test sees the work shared
out, not done twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import CLASSES, run_torchrun, without_seconds

from mmtard.cli import main
from mmtard.distributed import Shard, start_eval_processes
from mmtard.errors import ConfigError

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is needed"
)


LAUNCHER = """
import json, os, sys
from mmtard.cli import main
from mmtard.eval import zeroshot
from mmtard.distributed import start_eval_processes

start_eval_processes("cpu")
real, evaluated = zeroshot._evaluate_batch, []

def counted(*args):  # the batches this process evaluates, by their size
    evaluated[-1].append(len(args[3]))
    return real(*args)

zeroshot._evaluate_batch = counted
for argv in json.loads(sys.argv[1]):
    evaluated.append([])
    code = main(argv)
    if code:
        sys.exit(code)
with open(os.path.join(sys.argv[2], f"batches-{os.environ['RANK']}.json"), "w") as f:
    json.dump(evaluated, f)
"""

RUNS = {
    "uneven": ["--dataset", "cifar10", "npz", "--samples", "12", "--batch-size", "5", "--eps", "2/255", "8/255"],
    "idle": ["--dataset", "npz", "--samples", "3", "--batch-size", "4", "--eps", "8/255"],
}


def make_data(folder: Path) -> Path:
    """A CIFAR-format npz folder: each class a distinct colour plus noise, 3 images per class."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 3)
    x = rng.integers(0, 256, size=(10, 3))[y][:, None, None, :] + rng.normal(0, 20, size=(len(y), 32, 32, 3))
    folder.mkdir(parents=True)
    np.savez(folder / "test.npz", x=np.clip(x, 0, 255).astype(np.uint8), y=y)
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return folder


def eval_argv(data_dir: Path, out: Path, run: str) -> list[str]:
    return [
        "eval",
        "--model",
        "tiny-vit-s",
        "--data-dir",
        str(data_dir),
        "--attack",
        "pgd",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
        *RUNS[run],
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The torchrun launch and the single-process runs: (torchrun outputs, single outputs, the launch)."""
    root = tmp_path_factory.mktemp("eval-ddp")
    data_dir = make_data(root / "data")
    launched = {run: root / f"ddp-{run}" for run in RUNS}
    argvs = json.dumps([eval_argv(data_dir, out, run) for run, out in launched.items()])
    proc = run_torchrun(root, LAUNCHER, argvs, str(root), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    single = {run: root / f"single-{run}" for run in RUNS}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process: the same float summation order in the kernels
    try:
        for run, out in single.items():
            assert main(eval_argv(data_dir, out, run)) == 0
    finally:
        torch.set_num_threads(threads)
    batches = [json.loads((root / f"batches-{rank}.json").read_text()) for rank in (0, 1)]
    return launched, single, proc, batches


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("run", sorted(RUNS))
def test_torchrun_results_equal_one_process(runs, run):
    launched, single, _, _ = runs
    assert files(launched[run]) == files(single[run])  # the same files; no journal or per-rank leftovers
    for name in files(single[run]):
        path = single[run] / name
        if path.suffix == ".json":
            expected = without_seconds(json.loads(path.read_text()))
            assert without_seconds(json.loads((launched[run] / name).read_text())) == expected, name
        elif path.is_file():
            assert (launched[run] / name).read_text() == path.read_text(), name


def test_the_comparison_has_something_to_compare(runs):
    _, single, _, _ = runs
    summary = json.loads((single["uneven"] / "results.json").read_text())
    records = summary["results"]
    assert [r["samples"] for r in records] == [12, 12]
    assert any(r["clean_acc"] > 0 for r in records)  # otherwise every robust count would be 0 by construction
    assert json.loads((single["idle"] / "results.json").read_text())["samples"] == 3


def test_only_rank_0_prints(runs):
    _, _, proc, _ = runs
    assert proc.stdout.count("| tiny-vit-s | npz |") == 1 + 1  # once per launch of uneven and idle
    assert proc.stdout.count("wrote ") == 2


def test_each_process_evaluates_only_its_batches(runs):
    """Batch sizes per process and launch, in order: uneven (two datasets of 5, 5, 2), then idle (one of 3)."""
    *_, batches = runs
    assert batches[0] == [[5, 2, 5, 2], [3]]
    assert batches[1] == [[5, 5], []]


def test_shards_cover_every_batch_once():
    shards = [Shard(rank, 3) for rank in range(3)]
    owned = sorted(b for shard in shards for b in shard.batches(10))
    assert owned == list(range(10))
    assert all(shard.owns(b) for shard in shards for b in shard.batches(10))
    assert list(Shard().batches(4)) == [0, 1, 2, 3] and Shard().is_main and not Shard().distributed


def test_without_torchrun_nothing_is_started(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert start_eval_processes("cpu") == Shard() and not dist.is_initialized()


def test_one_gpu_for_every_process_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="device: 'cuda:0' puts all 2 processes on one GPU; give cuda"):
        start_eval_processes("cuda:0")
    assert not dist.is_initialized()
