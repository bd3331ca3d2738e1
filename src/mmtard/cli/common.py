"""What every ``mmtard`` command shares: the parser class, argument types, the device check, the folder guard."""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from mmtard.errors import ConfigError, NonFiniteError
from mmtard.validate import whole_number_range

logger = logging.getLogger("mmtard")

#: Errors a user causes (input, files, the machine, a diverging run): one line and exit code 2.
USER_ERRORS = (ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, NonFiniteError)
EXIT_USER_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``mmtard <command>: error: <flag>: <message>`` (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("argument "):  # "argument --batch-size: invalid int value: 'x'"
            message = message[len("argument ") :]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {one_line(message)}\n")


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number ``>= low`` (and ``<= high`` when given)."""
    expected = whole_number_range(low, high)

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


def logit_scale_arg(text: str) -> float | str:
    """``model`` or a positive number."""
    if text == "model":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number (100) or 'model', got {text!r}")
    from mmtard.models.zeroshot import check_logit_scale

    try:
        return check_logit_scale(value, "")
    except ConfigError as exc:  # beyond float32's range
        raise argparse.ArgumentTypeError(str(exc).removeprefix(": ")) from None


@contextmanager
def leave_as_found(folder: Path, inside: Sequence[str] = ()) -> Iterator[None]:
    """On a user error, remove ``folder`` if this command created it, else the entries ``inside`` it that
    this command created; an interrupted command (Ctrl-C) keeps them, to continue from."""
    existed = folder.exists()
    existing = {name for name in inside if (folder / name).exists()}
    try:
        yield
    except USER_ERRORS:
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            for name in set(inside) - existing:
                shutil.rmtree(folder / name, ignore_errors=True)
        raise


def fraction_arg(text: str) -> float:
    """An argparse type: a number in ``[0, 1]``."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def add_vision_weights_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--vision-weights",
        default=None,
        metavar="FILE",
        help="an image-tower state dict (RobustVLM FARE/TeCoA .pt, TeCoA vision_encoder_state_dict, .safetensors) "
        "loaded into the model's image tower over --pretrained",
    )
    p.add_argument(
        "--vision-weights-alpha",
        type=fraction_arg,
        default=1.0,
        metavar="A",
        help="weight-space interpolation: A * file + (1 - A) * base tower (default 1: the file's tower)",
    )


#: The flags of the data layer's fields.
EVAL_DATA_FLAGS = {"dataset": "--dataset", "data_dir": "--data-dir", "split": "--split"}
