"""Training checkpoints: written atomically, resumable exactly, loadable by ``mmtard eval`` and open_clip.

Layout of ``<run>/checkpoints/step_00000100/``:

- ``model.safetensors``: the student's full open_clip state dict (LoRA merged): a plain CLIP checkpoint.
- ``adapter.safetensors``: LoRA students only, the adapter weights to resume from.
- ``trainer_state.pt``: optimizer, scheduler, grad scaler, RNG states (a list, one per process), step, method
  (balance) state and the in-memory clean-teacher logit caches (``method.cache_clean_teacher`` without
  ``cache_dir``: a list, one per process, since a row's last bits depend on the batch it was computed in);
  tensors and plain containers only, read back with ``torch.load(weights_only=True)``.

:func:`save` writes a run's checkpoint (every process gives its RNG state), :func:`restore` reads one back into
the :class:`~mmtard.train.state.TrainState`. A checkpoint is assembled in a temporary folder and renamed into
place; only then is ``checkpoints/latest`` (a one-line text file naming it) replaced atomically. A step saved a
second time goes to ``step_00000100_1`` and the first save is removed only after ``latest`` names the new one,
so a crash at any point leaves ``latest`` naming a complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmtard.distributed import DistEnv, gather_objects
from mmtard.errors import ConfigError
from mmtard.fileio import atomic_write_text, current_umask, file_sha256
from mmtard.models import CLIPBundle
from mmtard.train.build import adapter_state, merged_student_state
from mmtard.train.config import RunConfig
from mmtard.train.faults import check_finite_student
from mmtard.train.rundir import LATEST_FILE, MODEL_FILE, RunDir
from mmtard.train.state import Setup, TrainState

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "trainer_state.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``tensors`` as a ``.safetensors`` file. A write the system refuses (a full disk) is the ``OSError`` of its
    errno naming ``path``, as any other write's: safetensors wraps it in its own ``SafetensorError`` (``"...: I/O
    error: No space left on device (os error 28)"``)."""
    try:
        save_file(_contiguous(tensors), str(path))
    except SafetensorError as exc:
        code = re.search(r"\(os error (\d+)\)", str(exc))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(path)) from None


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    trainer_state: dict,
    adapter_state: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Write one checkpoint atomically, point ``latest`` at it, and keep only the newest ``keep``."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = checkpoints_dir / name
    repeat = 0
    while final.exists():  # this step saved again (e.g. resumed and stopped at once): `latest` may name the old one
        repeat += 1
        final = checkpoints_dir / f"{name}_{repeat}"
    tmp = checkpoints_dir / f".tmp_step_{step:08d}_{os.getpid()}"
    for stale in checkpoints_dir.glob(".tmp_step_*"):  # left by a process killed mid-write (one writer per run)
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        save_tensors(model_state, tmp / MODEL_FILE)
        if adapter_state is not None:
            save_tensors(adapter_state, tmp / ADAPTER_FILE)
        torch.save(trainer_state, tmp / STATE_FILE)
        mode = 0o666 & ~current_umask()  # safetensors writes 0600: the user's umask decides, as for any file
        for file in tmp.iterdir():
            os.chmod(file, mode)
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(checkpoints_dir / LATEST_FILE, final.name + "\n")
    for replaced in [checkpoints_dir / name, *checkpoints_dir.glob(f"{name}_*")]:  # earlier saves of this step
        if replaced != final:
            shutil.rmtree(replaced, ignore_errors=True)
    for old in sorted(checkpoints_dir.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_model_file(path: Path, model_state: dict[str, torch.Tensor]) -> None:
    """A student's open_clip state dict as one ``.safetensors`` file, written atomically."""
    from mmtard.fileio import atomic_path

    with atomic_path(path) as tmp:
        save_tensors(model_state, tmp)


def resolve_resume(output_dir: Path, resume: str) -> Path:
    """``latest`` -> the checkpoint ``latest`` names; otherwise a checkpoint folder path."""
    run = RunDir(output_dir)
    if resume == "latest":
        if not run.latest.is_file():
            raise FileNotFoundError(f"--resume latest: no checkpoint in '{run.checkpoints}' (nothing to resume)")
        path = run.checkpoint(run.latest.read_text().strip())
    else:
        path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume: '{path}' is not a complete checkpoint (no {STATE_FILE})")
    return path


def check_checkpoint_files(path: Path) -> None:
    """A cheap check of a checkpoint folder before anything is built: the model file's header is readable
    and the trainer state is a complete ``torch.save`` archive (a zip whose directory, at the end, is there).

    Raises:
        ConfigError: naming the file that is missing, truncated or of another format.
    """
    import zipfile

    from mmtard.models import check_checkpoint_file

    check_checkpoint_file(path / MODEL_FILE, "--resume")
    if (path / ADAPTER_FILE).exists():
        check_checkpoint_file(path / ADAPTER_FILE, "--resume")
    if not zipfile.is_zipfile(path / STATE_FILE):
        raise ConfigError(f"--resume: '{path / STATE_FILE}' is not a complete trainer state (truncated or foreign)")
    try:  # memory-mapped: the structure is read, the tensors are not
        trainer_state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a foreign or damaged file: say which file, keep the cause
        raise ConfigError(f"--resume: '{path / STATE_FILE}' cannot be read as a trainer state ({exc})") from exc
    check_trainer_state(trainer_state, path / STATE_FILE)


#: what every trainer state holds, and the type of each
TRAINER_STATE_KEYS = {
    "step": int,
    "optimizer": dict,
    "scheduler": dict,
    "scaler": dict,
    "method": dict,
    "rng": (list, dict),
}


def check_trainer_state(trainer_state: object, file: Path) -> None:
    """A trainer state holds every entry :func:`restore` reads, each of its type.

    Raises:
        ConfigError: naming ``--resume``, the file and the first entry missing or of another type.
    """
    if not isinstance(trainer_state, dict):
        raise ConfigError(f"--resume: '{file}' holds a {type(trainer_state).__name__}, expected a trainer state")
    missing = [key for key in TRAINER_STATE_KEYS if key not in trainer_state]
    if missing:
        raise ConfigError(
            f"--resume: '{file}' lacks {', '.join(missing)}; it is not a complete trainer state of mmtard train"
        )
    for key, kind in TRAINER_STATE_KEYS.items():
        value = trainer_state[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"--resume: '{file}' has {key} of type {type(value).__name__}; not a trainer state")


def versions() -> dict[str, str]:
    """The versions a checkpoint records: another mmtard or torch may resume it, but not bitwise."""
    import mmtard

    return {"mmtard": str(mmtard.__version__), "torch": str(torch.__version__)}  # TorchVersion is no str


def weight_file_fields(cfg: RunConfig) -> dict[str, str]:
    """Every weights file of the run by its config field (``teachers.robust.pretrained`` -> its path); tags,
    ``none`` and hub ids are not files and are left out."""
    models = {"student": cfg.student, **{f"teachers.{role}": teacher for role, teacher in cfg.teachers.items()}}
    fields = {}
    for prefix, model in models.items():
        for key in ("pretrained", "vision_weights"):
            value = getattr(model, key, None)
            if value and Path(str(value)).is_file():
                fields[f"{prefix}.{key}"] = str(value)
    return fields


def weight_file_stamps(cfg: RunConfig) -> dict[str, dict]:
    """``field -> {path, size, mtime_ns, sha256}`` of every weights file (the SHA-256 is computed once per file)."""
    stamps = {}
    for field, path in weight_file_fields(cfg).items():
        info = Path(path).stat()
        stamps[field] = {"path": path, "size": info.st_size, "mtime_ns": info.st_mtime_ns, "sha256": file_sha256(path)}
    return stamps


def check_resume_files(path: Path, cfg: RunConfig) -> None:
    """The weights files a checkpoint was trained with are the ones this resume reads (size and modification
    time, else the SHA-256); a checkpoint of another mmtard or torch resumes with a warning (not bitwise).

    Raises:
        ConfigError: naming the field whose file changed since the checkpoint was written.
    """
    trainer_state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    for field, stamp in (trainer_state.get("weight_files") or {}).items():
        now = weight_file_fields(cfg).get(field)
        if now is None or not isinstance(stamp, dict):
            continue  # the field names no file now: check_resume_configs reports a changed config
        info = Path(now).stat()
        if [info.st_size, info.st_mtime_ns] == [stamp.get("size"), stamp.get("mtime_ns")]:
            continue
        if file_sha256(now) != stamp.get("sha256"):
            raise ConfigError(
                f"{field}: '{now}' changed since checkpoint {path} was written (SHA-256 {str(stamp.get('sha256'))[:12]}"
                f"..., now {file_sha256(now)[:12]}...): the resumed run would go on with other weights. Restore the "
                "file, or start a new output_dir"
            )
    written = trainer_state.get("versions")
    if written != versions():
        by = (
            "an mmtard that did not record its versions"
            if not isinstance(written, dict)
            else (f"mmtard {written.get('mmtard')}, torch {written.get('torch')}")
        )
        logger.warning(
            "checkpoint %s was written by %s, this is mmtard %s, torch %s: the run continues, but not bitwise as the "
            "uninterrupted one would",
            path,
            by,
            *versions().values(),
        )


def check_finetune_kind(path: Path, cfg: RunConfig) -> None:
    """A LoRA checkpoint (it has adapters) resumes a LoRA student only, a full fine-tuning one a full student.

    Raises:
        ConfigError: naming ``--resume`` and both kinds.
    """
    adapter = (path / ADAPTER_FILE).is_file()
    if adapter != (cfg.student.finetune == "lora"):
        kind = "a LoRA" if adapter else "a full fine-tuning"
        raise ConfigError(f"--resume: '{path}' is {kind} checkpoint, but student.finetune is {cfg.student.finetune}")


def load_checkpoint_files(path: Path) -> tuple[dict, dict, dict | None]:
    """``(model_state, trainer_state, adapter_state or None)`` of a checkpoint folder, read safely."""
    try:
        trainer_state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which file, keep the cause
        raise ConfigError(f"--resume: '{path / STATE_FILE}' cannot be read as a trainer state ({exc})") from exc
    adapter = load_file(str(path / ADAPTER_FILE)) if (path / ADAPTER_FILE).is_file() else None
    return load_file(str(path / MODEL_FILE)), trainer_state, adapter


def save(state: TrainState, built: Setup, cfg: RunConfig, run: RunDir, env: DistEnv) -> Path | None:
    """Write a checkpoint from rank 0; every process must call it (it gathers each one's RNG state).
    A student with non-finite weights or logits is refused (:func:`check_finite_student`), so ``latest``
    always names a good one."""
    check_finite_student(built, state.step, run)
    bundle = built.student_bundle
    # One per process: each draws its own attack random starts and caches the teacher logits of its own batches.
    rng, caches = zip(*gather_objects((rng_state(), state.method.logit_cache_state())))
    if not env.is_main:
        return None
    trainer_state = {
        "step": state.step,
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "rng": list(rng),
        "method": state.method.state_dict(),
        "logit_caches": list(caches),
        "skipped_steps": state.skipped_steps,
        "weight_files": weight_file_stamps(cfg),
        "versions": versions(),
    }
    return save_checkpoint(
        run.checkpoints,
        state.step,
        merged_student_state(bundle),
        trainer_state,
        adapter_state(bundle),
        cfg.train.keep_checkpoints,
    )


def restore(state: TrainState, bundle: CLIPBundle, path: Path, cfg: RunConfig, env: DistEnv) -> None:
    check_finetune_kind(path, cfg)
    model_state, trainer_state, adapter = load_checkpoint_files(path)
    try:
        if adapter is not None:  # the frozen base weights come from student.pretrained, as in the first run
            loaded = bundle.model.visual.load_state_dict(adapter, strict=False)
            missing = [k for k in loaded.missing_keys if "lora_" in k]
            if loaded.unexpected_keys or missing:
                raise ConfigError(
                    f"--resume: the LoRA adapters in '{path}' do not match student.lora "
                    f"(not in the model: {loaded.unexpected_keys[:2]}, not in the checkpoint: {missing[:2]})"
                )
        else:
            bundle.model.load_state_dict(model_state)
    except RuntimeError as exc:  # shapes of another architecture or LoRA rank
        raise ConfigError(f"--resume: '{path}' does not fit the student {cfg.student.arch}: {exc}") from None
    state.optimizer.load_state_dict(trainer_state["optimizer"])
    state.scheduler.load_state_dict(trainer_state["scheduler"])
    state.scaler.load_state_dict(trainer_state["scaler"])
    state.method.load_state_dict(trainer_state["method"])
    state.step = int(trainer_state["step"])
    state.skipped_steps = int(trainer_state.get("skipped_steps", 0))
    rng = trainer_state["rng"]
    rng = [rng] if isinstance(rng, dict) else rng
    caches = trainer_state.get("logit_caches") or [{}] * len(rng)  # absent from checkpoints of older versions
    if len(rng) == env.world_size:
        set_rng_state(rng[env.rank])
        state.method.load_logit_cache_state(caches[env.rank])
    else:  # another number of processes: the run continues, but not as the uninterrupted one would
        logger.warning(
            "checkpoint %s was written by %d process(es), this run has %d: attack random starts are reseeded "
            "(and cached teacher logits computed again)",
            path,
            len(rng),
            env.world_size,
        )
        torch.manual_seed((cfg.train.seed + env.rank) * 1_000_003 + state.step)
