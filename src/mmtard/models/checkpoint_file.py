"""Checks of a weights file before any model is built: one clear error for every way a file can be unusable.

A checkpoint is data, not code. ``.safetensors`` files hold tensors only; every other file (``.pt``, ``.pth``,
``.bin``, ``.ckpt``, no suffix) must be a state dict that ``torch.load(weights_only=True)`` reads, unless the
user trusts the file. :func:`check_checkpoint_file` reads only what it needs: the safetensors header, or the
pickled structure of a PyTorch file with its tensors memory-mapped, so it is cheap enough to run on every
model and teacher file before a run creates anything.
"""

from __future__ import annotations

import json
import pickle
import pickletools
import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mmtard.errors import ConfigError
from mmtard.fileio import require_regular_file

SAFETENSORS_HEADER_BYTES = 8  # little-endian u64: the length of the JSON header that follows
SAFETENSORS_MAX_HEADER = 100_000_000  # the format's own limit on the JSON header
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
PICKLE_PROTOCOL_2_PLUS = b"\x80"  # first byte of a pickle (torch.save's legacy format, pickle.dump)
#: the keys a checkpoint may nest its state dict under
STATE_DICT_KEYS = ("state_dict", "vision_encoder_state_dict")
#: what torch.load raises on bytes that are not a readable checkpoint (it has no single error type for that)
UNREADABLE_FILE_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    OSError,
    KeyError,
    IndexError,
    ValueError,
    TypeError,
    AttributeError,
    struct.error,
)


class CheckpointError(ConfigError):
    """A checkpoint file could not be read safely or does not fit the architecture."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path that does not exist."""


def check_checkpoint_file(path: str | Path, field: str = "pretrained", *, trust_checkpoint: bool = False) -> Path:
    """Check that ``path`` is a weights file that can be loaded, without building a model.

    Args:
        path: the file.
        field: the flag or config field that named it (``"pretrained"``, ``"teachers.robust.pretrained"``);
            every message starts with it.
        trust_checkpoint: a PyTorch file may be a full pickle (it can run code when loaded); only its
            container is checked, since reading its contents would run that code.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        NotARegularFileError: a FIFO or device file (``/dev/zero``, ``/dev/null``), refused without reading it.
        CheckpointError: a folder, an unreadable, empty, truncated or corrupt file, a PyTorch file under a
            ``.safetensors`` name, a pickle that needs code execution (without ``trust_checkpoint``), or a
            file that holds no state dict.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{field}: checkpoint file '{path}' does not exist")
    if path.is_dir():
        raise CheckpointError(f"{field}: '{path}' is a folder, expected a file (.safetensors, or a .pt state dict)")
    require_regular_file(path, field, "a checkpoint: .safetensors, or a .pt state dict")  # a FIFO would hang
    try:
        with open(path, "rb") as f:
            head = f.read(SAFETENSORS_HEADER_BYTES)
    except OSError as exc:
        raise CheckpointError(f"{field}: cannot read '{path}' ({exc.strerror})") from None
    if not head:
        raise CheckpointError(f"{field}: '{path}' is empty (0 bytes); expected a checkpoint file")
    if path.suffix == ".safetensors":
        _check_safetensors(path, head, field)
    else:
        _check_torch_file(path, head, field, trust_checkpoint)
    return path


def _check_safetensors(path: Path, head: bytes, field: str) -> None:
    size = path.stat().st_size
    if head.startswith((ZIP_MAGIC, PICKLE_PROTOCOL_2_PLUS)) and not _has_json_header(path):
        raise CheckpointError(
            f"{field}: '{path}' is a PyTorch file (torch.save / pickle), not safetensors; name it .pt so that it is "
            "read as a state dict (weights only), or convert it to safetensors"
        )
    if len(head) < SAFETENSORS_HEADER_BYTES:
        raise CheckpointError(f"{field}: '{path}' has {size} bytes, too short for a safetensors file")
    header_length = int.from_bytes(head, "little")
    if header_length > SAFETENSORS_MAX_HEADER:
        raise CheckpointError(f"{field}: '{path}' is not a safetensors file (no valid header)")
    if SAFETENSORS_HEADER_BYTES + header_length > size:
        raise CheckpointError(
            f"{field}: '{path}' is truncated: its header alone needs {SAFETENSORS_HEADER_BYTES + header_length} "
            f"bytes, the file has {size}"
        )
    with open(path, "rb") as f:
        f.seek(SAFETENSORS_HEADER_BYTES)
        raw_header = f.read(header_length)
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{field}: '{path}' is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{field}: '{path}' is not a safetensors file (its header is not a JSON object)")
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    if not tensors:
        raise CheckpointError(f"{field}: '{path}' holds no tensors")
    data_end = max((_data_end(entry) for entry in tensors.values()), default=0)
    expected = SAFETENSORS_HEADER_BYTES + header_length + data_end
    if expected > size:
        raise CheckpointError(
            f"{field}: '{path}' is truncated: its header describes {expected} bytes, the file has {size}"
        )
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as exc:
        raise CheckpointError(f"{field}: '{path}' is not a readable safetensors file ({exc})") from None


def _has_json_header(path: Path) -> bool:
    """Whether a JSON object starts right after the 8-byte header length, as in every safetensors file. A
    header length whose low byte is 0x80 (a pickle's first byte) or whose bytes spell ``PK`` is then no
    PyTorch file."""
    with open(path, "rb") as f:
        f.seek(SAFETENSORS_HEADER_BYTES)
        return f.read(1) == b"{"


def _data_end(entry: object) -> int:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets):
        return offsets[1]
    return 0  # malformed entries are reported by safe_open


def _check_torch_file(path: Path, head: bytes, field: str, trust_checkpoint: bool) -> None:
    is_zip = head.startswith(ZIP_MAGIC)
    if is_zip:
        try:
            zipfile.ZipFile(path).close()  # reads the central directory at the end: a cut file has none
        except (zipfile.BadZipFile, OSError):
            raise CheckpointError(
                f"{field}: '{path}' is truncated or corrupt (its zip archive is incomplete); save it again"
            ) from None
    if trust_checkpoint:
        return  # reading the pickle would run its code; the real load reports what is wrong
    try:
        with warnings.catch_warnings():  # torch notes pickle protocols it did not write; the file is judged here
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except UNREADABLE_FILE_ERRORS as exc:
        if _is_weights_only_refusal(exc) and _is_complete_pickle(path, is_zip):
            raise CheckpointError(
                f"{field}: '{path}' is a pickle that needs code execution to load, so it was refused "
                f"(torch.load(weights_only=True): {_weights_only_reason(exc)}; a checkpoint from the internet is data, "
                "not code). Convert it to .safetensors, or pass --trust-checkpoint if you made this file yourself."
            ) from None
        reason = "not a PyTorch file" if isinstance(exc, pickle.UnpicklingError) else _first_line(exc)
        raise _unreadable(path, field, reason) from None
    state_dict = checkpoint
    if isinstance(checkpoint, Mapping):  # open_clip's "state_dict", TeCoA's "vision_encoder_state_dict"
        state_dict = next((checkpoint[k] for k in STATE_DICT_KEYS if k in checkpoint), checkpoint)
    if not (isinstance(state_dict, Mapping) and any(isinstance(v, torch.Tensor) for v in state_dict.values())):
        raise CheckpointError(
            f"{field}: '{path}' holds a {type(state_dict).__name__}, expected a state dict (parameter name -> tensor)"
        )


#: how torch's weights-only unpickler has worded its refusals (2.4 to 2.14), lower case; matched only when the
#: error is not the ``pickle.UnpicklingError`` it raises today
WEIGHTS_ONLY_WORDING = ("weights only load failed", "weights_only", "weightsunpickler", "unsupported global")


def _is_weights_only_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` may be the weights-only unpickler's refusal: the ``pickle.UnpicklingError`` torch raises
    (by type, whatever its wording), or another error type that uses torch's words for it (a later torch may
    change the type). :func:`_is_complete_pickle` then decides from the file."""
    if isinstance(exc, pickle.UnpicklingError):
        return True
    text = str(exc).lower()
    return any(words in text for words in WEIGHTS_ONLY_WORDING)


def _is_complete_pickle(path: Path, is_zip: bool) -> bool:
    """True when the file's pickle (the file itself, or the ``data.pkl`` of torch.save's zip) is whole and
    well-formed: read opcode by opcode, nothing executed. Decides "refused by the weights-only unpickler"
    from the file, not from the wording of torch's message (which changes between versions)."""
    try:
        if is_zip:
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
                if len(names) != 1:
                    return False
                with archive.open(names[0]) as f:
                    _read_all_opcodes(f)
        else:
            with open(path, "rb") as f:
                _read_all_opcodes(f)
    except (ValueError, EOFError, struct.error, UnicodeDecodeError, zipfile.BadZipFile, OSError):
        return False
    return True


def _read_all_opcodes(f) -> None:
    for _ in pickletools.genops(f):
        pass


def _weights_only_reason(exc: BaseException) -> str:
    """The unpickler's own reason from torch's message (``Unsupported global: GLOBAL x.Y ...``), one line.

    torch wraps it in a few sentences that have changed between versions ("Weights only load failed. ...
    WeightsUnpickler error: <reason>"); the reason is the last non-empty line before the documentation link.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [
        line.split("WeightsUnpickler error:", 1)[1].strip() if "WeightsUnpickler error:" in line else line
        for line in lines
        if not line.startswith(("Check the documentation", "Weights only load failed", "Please file an issue"))
    ]
    reasons = [r for r in reasons if r and not r.startswith(("(1)", "(2)", "In PyTorch"))]
    reason = reasons[0] if reasons else "weights-only load failed"
    return reason.split(". Please use")[0][:200]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def _unreadable(path: Path, field: str, reason: str) -> CheckpointError:
    return CheckpointError(
        f"{field}: '{path}' is not a readable checkpoint (truncated or corrupt: {reason}); "
        "expected a .safetensors file or a PyTorch state dict"
    )


def non_finite_tensors(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors of ``state_dict`` holding NaN or inf (a diverged run's weights)."""
    return [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
