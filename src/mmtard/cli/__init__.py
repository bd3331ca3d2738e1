"""``mmtard eval | train | demo | export | data check``: argument parsing only; the work is in the library.

Every error the user can cause (a flag, a config field, a file, the machine) is one line on stderr,
``mmtard <command>: error: <field>: <what is wrong and what is expected>``, with exit code 2; a refused
command leaves the file system as it found it. ``--debug`` shows the traceback instead. SIGTERM or SIGINT
during ``mmtard train`` save a checkpoint and exit with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
from collections.abc import Sequence

from mmtard.cli.common import EXIT_USER_ERROR, USER_ERRORS, ArgumentParser, check_vision_flags, one_line
from mmtard.cli.eval_command import add_eval_parser, run_eval
from mmtard.cli.file_commands import add_data_parser, add_export_parser, run_data, run_export
from mmtard.cli.train_commands import add_demo_parser, add_train_parser, run_demo, run_train, without_partial_stages
from mmtard.errors import TrainingInterrupted, WorkerTimeoutError

__all__ = ["main", "without_partial_stages"]

logger = logging.getLogger("mmtard")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="mmtard", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages (INFO)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    add_train_parser(sub)
    add_demo_parser(sub)
    add_export_parser(sub)
    add_data_parser(sub)
    for command in sub.choices.values():  # also accepted after the command: mmtard train ... --debug
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


COMMANDS = {"eval": run_eval, "train": run_train, "demo": run_demo, "export": run_export, "data": run_data}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    prefix = f"mmtard {args.command}:"
    try:
        check_vision_flags(args)
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # mmtard data check | head: the reader is gone, as for cat or ls
        if not _stdout_closed():
            raise
        return 128 + signal.SIGPIPE
    except TrainingInterrupted as exc:
        print(f"{prefix} {one_line(exc)}", file=sys.stderr)
        return 128 + exc.signum
    except WorkerTimeoutError as exc:  # a fault of the machine, not of the input: exit code 1
        if args.debug:
            raise
        print(f"{prefix} error: {one_line(exc)}", file=sys.stderr)
        return 1
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"{prefix} error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (the write end then polls as an error); if so it
    is pointed at ``os.devnull``, so that Python's flush at exit does not fail again."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        closed = any(event & select.POLLERR for _, event in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor (a test's capture), or no poll
        return False
    if closed:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    return closed
