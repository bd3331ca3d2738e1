"""Faults of a run: non-finite losses, gradients and weights, stop signals, stalled workers and refusals that
every process must share.

A non-finite loss stops the run (or skips the batch, ``train.on_nonfinite``) and non-finite weights are never
saved; SIGTERM / SIGINT ask for a checkpoint at the end of the current step; a user error on one process is
raised on every process, so none waits in a collective for one that gave up.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch

from mmtard.distributed import DistEnv, any_process
from mmtard.errors import ConfigError, NonFiniteError, TrainingInterrupted
from mmtard.train.config import OptimConfig
from mmtard.train.rundir import RunDir
from mmtard.train.state import Setup, TrainState

logger = logging.getLogger(__name__)


PROBE_IMAGES = 8  # held-out images the student must map to finite logits before its weights are saved


def check_finite_student(built: Setup, step: int, run: RunDir) -> None:
    """Raise :class:`NonFiniteError` if a trained weight is NaN or infinite, or if the student's logits on a
    few held-out images are (weights can be finite yet so large that the logits overflow). Weights are
    identical on every process, so every process raises together; nothing is written."""
    if not all(bool(torch.isfinite(p.detach()).all()) for p in built.params):
        what = "weights are"
    elif not bool(torch.isfinite(probe_logits(built)).all()):
        what = "logits on held-out images are"
    else:
        return
    raise NonFiniteError(
        f"step {step}: the student's {what} not finite after the update (train.lr too high?); nothing was saved. "
        f"{last_good_checkpoint(run)}"
    )


@torch.no_grad()
def probe_logits(built: Setup) -> torch.Tensor:
    """The student's logits on the first :data:`PROBE_IMAGES` held-out images, in eval mode (batch-norm
    statistics untouched), leaving the mode as it was; eagerly (``forward``: with ``train.compile`` the
    compiled call would compile an eval-mode graph for these few images)."""
    student = built.student
    images = torch.stack([built.eval_set[i][0] for i in range(min(PROBE_IMAGES, len(built.eval_set)))])
    was_training = student.training
    student.eval()
    try:
        return student.forward(images.to(next(student.parameters()).device))
    finally:
        student.train(was_training)


def last_good_checkpoint(run: RunDir) -> str:
    """A sentence naming the checkpoint ``latest`` points at, for error messages."""
    if run.latest.is_file():
        return f"The last good checkpoint is {run.checkpoint(run.latest.read_text().strip())} (--resume latest)."
    return "No checkpoint was written before it."


def non_finite_problem(
    loss: torch.Tensor, loss_finite: torch.Tensor, norm: torch.Tensor | None, scaler: torch.amp.GradScaler
) -> str | None:
    """What is not finite in this step (None when all is well), read from the device in one transfer.

    Args:
        loss: this process's loss.
        loss_finite: the mean over processes of ``isfinite(loss)``: 1 when every process's loss is finite.
        norm: the clipped gradients' total norm, or None without clipping. A non-finite norm with fp16's
            grad scaler (scale above 1) is the scaler's to handle: it skips such steps itself.
    """
    checks = [loss_finite < 1] if norm is None else [loss_finite < 1, ~torch.isfinite(norm)]
    loss_bad, *norm_bad = torch.stack(checks).tolist()
    if loss_bad:
        return f"the loss is not finite on some process (here {loss.item()})"
    if norm_bad and norm_bad[0] and scaler.get_scale() == 1.0:
        return f"the gradient norm is not finite ({norm.item()})"
    return None


def handle_non_finite(state: TrainState, optim: OptimConfig, loss: torch.Tensor, output, what: str):
    """A non-finite loss or gradient norm (``what``): stop (:class:`NonFiniteError`) or drop this batch's update,
    as ``optim.on_nonfinite`` says. Returns :func:`~mmtard.train.trainer.train_step`'s result of a skipped step."""
    step = state.step + 1
    if optim.on_nonfinite == "stop":
        raise NonFiniteError(
            f"step {step}: {what}, terms {plain_metrics(output.metrics)}; stopped before the update "
            "(train.on_nonfinite: stop). Lower train.lr or check the teachers, or set train.on_nonfinite=skip "
            "to drop such batches"
        )
    logger.warning("step %d: %s; this batch's update is dropped (train.on_nonfinite: skip)", step, what)
    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler.is_enabled():  # forget this step's unscale_, keep the scale as it was
        state.scaler.update(state.scaler.get_scale())
    state.scheduler.step()
    state.step += 1
    state.skipped_steps += 1
    return loss, output, True


def plain_metrics(metrics: dict) -> dict:
    """``metrics`` with one-element tensors read as Python floats (for messages)."""
    return {name: value.item() if isinstance(value, torch.Tensor) else value for name, value in metrics.items()}


class StopSignals:
    """SIGTERM and SIGINT ask the loop to stop at the end of the current step, with a checkpoint.

    Installed only in the main thread (Python's rule for signal handlers); a second SIGINT interrupts at
    once (``KeyboardInterrupt``). The previous handlers come back on exit.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self.finishing = False  # set once the last step is done and saved: a signal then stops at once
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.finishing:  # the model and the last checkpoint are on disk: nothing is lost by stopping now
            raise TrainingInterrupted(
                f"stopped by {signal.Signals(signum).name} during the final evaluation: model.safetensors and the "
                "last checkpoint are saved, final_eval.json is not; run the same command with --resume latest to "
                "evaluate it (or mmtard eval the model)",
                signum,
            )
        logger.warning(
            "%s received: saving a checkpoint at the end of this step, then stopping", signal.strsignal(signum)
        )


def stop_requested(stop: StopSignals, env: DistEnv) -> int:
    """The signal any process received (0 if none): every process stops at the same step."""
    return any_process(stop.signum) if env.distributed else stop.signum


def is_collective_timeout(exc: RuntimeError) -> bool:
    """Whether ``exc`` is a collective that timed out (gloo: "Timed out waiting ... for recv")."""
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


def agree(env: DistEnv, work, *args):
    """``work(*args)`` on every process; if it raised a user error on any process, every process raises
    (so none waits in a collective for a process that gave up)."""
    error: Exception | None = None
    try:
        result = work(*args)
    except (ConfigError, FileNotFoundError) as exc:
        if not env.distributed:
            raise
        error, result = exc, None
    if env.distributed and any_process(error is not None):
        if error is not None:
            raise error
        raise ConfigError(f"rank {env.rank}: another process refused the run (its error says why)")
    return result
