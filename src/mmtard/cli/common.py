"""What every ``mmtard`` command shares: the parser class, argument types, the device check, the folder guard."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from mmtard.errors import ConfigError, NonFiniteError
from mmtard.fileio import FolderLock
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


#: the lock file of an evaluation, inside its journal folder (removed with it)
EVAL_LOCK = ".lock"


@contextmanager
def eval_lock(journal_dir: Path, field: str = "--out") -> Iterator[None]:
    """One ``mmtard eval`` per output folder: ``<journal>/.lock`` is a :class:`~mmtard.fileio.FolderLock` held
    while it runs. Another evaluation there is one error (two would remove each other's journal); the system
    releases the lock of a killed one. Under ``torchrun`` the process of rank 0 holds it for all of them.

    Raises:
        ConfigError: naming ``field``, the process and the lock file.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    journal_dir.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(journal_dir / EVAL_LOCK)
    if not lock.acquire():
        raise ConfigError(
            f"{field}: '{journal_dir.parent}' is in use by another mmtard eval ({lock.holder()}, lock file "
            f"{lock.path}); wait for it to end or choose another --out"
        )
    try:
        yield
    finally:
        lock.release()


def check_dataset_folders(datasets: Sequence[str] | None, data_dirs: Sequence[str]) -> None:
    """``--dataset`` and ``--data-dir`` without ``--suite``: some datasets, and one folder for all or one each.

    Raises:
        ConfigError: naming the flag and what was expected.
    """
    if not datasets:
        raise ConfigError("--dataset: give one or more datasets, or --suite (e.g. --suite robustvlm)")
    if len(data_dirs) not in (1, len(datasets)):
        raise ConfigError(
            f"--data-dir: give one folder for all datasets or one per dataset ({len(datasets)}), got {len(data_dirs)}"
        )


def fraction_arg(text: str) -> float:
    """An argparse type: a number in ``[0, 1]``."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


class RecordGiven(argparse.Action):
    """Store the value, and ``<dest>_given = True``: a flag given on the command line, even at its default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def check_vision_flags(args: argparse.Namespace) -> None:
    """``--vision-weights-alpha`` weighs a ``--vision-weights`` file against the base tower: alone it would be
    ignored silently.

    Raises:
        ConfigError: ``--vision-weights-alpha`` given without ``--vision-weights``.
    """
    if getattr(args, "vision_weights_alpha_given", False) and getattr(args, "vision_weights", None) is None:
        raise ConfigError(
            "--vision-weights-alpha: given without --vision-weights; it weighs an image-tower file against the base "
            "tower, so give the file too (or leave the alpha out)"
        )


def add_vision_weights_flags(p: argparse.ArgumentParser, several_alphas: bool = False) -> None:
    """``--vision-weights`` and ``--vision-weights-alpha``; with ``several_alphas`` (``mmtard eval``) the alpha
    takes several values, a list (default ``[1.0]``): one evaluation each, and the frontier through them."""
    p.add_argument(
        "--vision-weights",
        default=None,
        metavar="FILE",
        help="an image-tower state dict (RobustVLM FARE/TeCoA .pt, TeCoA vision_encoder_state_dict, .safetensors) "
        "loaded into the model's image tower over --pretrained",
    )
    help_text = "weight-space interpolation: A * file + (1 - A) * base tower (default 1: the file's tower)"
    if several_alphas:
        help_text += "; several values evaluate each (OUT/alpha<A>/) and write the frontier (OUT/frontier.md, .png)"
    p.add_argument(
        "--vision-weights-alpha",
        type=fraction_arg,
        action=RecordGiven,
        nargs="+" if several_alphas else None,
        default=[1.0] if several_alphas else 1.0,
        metavar="A",
        help=help_text,
    )


#: The flags of the data layer's fields.
EVAL_DATA_FLAGS = {"dataset": "--dataset", "data_dir": "--data-dir", "split": "--split"}
