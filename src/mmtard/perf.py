"""Floating-point work, phase timing and model FLOP utilisation (MFU) of a training step.

A training step of an adversarial method has three phases:

- ``attack``: the inner maximisation (PGD on the student, inside ``Method.attack``);
- ``teachers``: the frozen teachers' forwards;
- ``student_update``: everything else: the student's training forwards, the loss, the backward and the
  optimizer step.

:class:`StepPhases` marks where a step enters and leaves each phase (it wraps the method's ``attack`` and
hooks the teachers' forwards); the marks are FLOP totals for :func:`count_step_flops` and CUDA events (or
clock readings on a CPU) for :func:`time_step`. Attribution is exclusive: a teacher forward called from
inside the attack counts as ``teachers``.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions and
attention, forward and backward; a multiply-add is 2 FLOPs; element-wise work is not counted), with
formulas added for the two attention kernels it does not know: PyTorch's CPU flash attention and the
fused ``nn.MultiheadAttention`` inference path (eval mode without gradients, which teachers take in
fp32). MFU is ``flops_per_step / seconds_per_step / peak_flops_per_second``, against a matrix-product rate
measured on the same device (:func:`measure_matmul_tflops`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from mmtard.errors import ConfigError

PHASES = ("attack", "teachers", "student_update")
#: The phase of work outside the attack and the teachers' forwards.
DEFAULT_PHASE = "student_update"

aten = torch.ops.aten


def _native_mha_flops(query_shape, key_shape, value_shape, embed_dim: int, num_heads: int, *args, **kwargs) -> int:
    """``aten._native_multi_head_attention`` (batch-first ``(B, L, E)`` inputs): the q/k/v projections,
    ``Q K^T``, ``A V`` and the output projection, 2 FLOPs per multiply-add."""
    batch, query_len, _ = query_shape
    key_len, value_len = key_shape[1], value_shape[1]
    projections = 2 * batch * embed_dim * embed_dim * (query_len + key_len + value_len)
    attention = 2 * 2 * batch * query_len * key_len * embed_dim
    output = 2 * batch * query_len * embed_dim * embed_dim
    return projections + attention + output


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """``aten._scaled_dot_product_flash_attention_for_cpu``: as PyTorch's formula for the CUDA kernels."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """``aten._scaled_dot_product_flash_attention_for_cpu_backward``: as PyTorch's CUDA backward formula."""
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


#: FLOP formulas for attention kernels ``FlopCounterMode`` has none for (it would count them as 0).
EXTRA_FLOP_FORMULAS = {
    aten._native_multi_head_attention: _native_mha_flops,
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts the attention kernels of :data:`EXTRA_FLOP_FORMULAS`."""
    return FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matrix products, convolutions and attention that ``fn()`` runs (its backward too, when
    ``fn`` calls ``backward`` or ``torch.autograd.grad``)."""
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


class StepPhases:
    """Marks where one training step enters and leaves the attack and the teachers' forwards.

    Used as a context manager around the step. While active, the method's ``attack`` is wrapped (an
    instance attribute, removed on exit) and each teacher has a forward pre-hook and hook. Each change of
    phase appends ``(phase, mark())``; :meth:`split` turns consecutive marks into per-phase amounts.

    Args:
        method: the ``Method`` whose ``attack`` calls are the ``attack`` phase.
        teachers: frozen models whose forwards are the ``teachers`` phase.
        mark: returns a marker of "now": a FLOP total, a recorded CUDA event, a clock reading.
    """

    def __init__(self, method: Any, teachers: Mapping[str, nn.Module], mark: Callable[[], Any]):
        self.method = method
        self.teachers = list({id(t): t for t in teachers.values()}.values())
        self.mark = mark
        self.marks: list[tuple[str | None, Any]] = []
        self._stack: list[str] = []
        self._handles: list[Any] = []

    def _enter(self, phase: str) -> None:
        self._stack.append(phase)
        self.marks.append((phase, self.mark()))

    def _leave(self) -> None:
        self._stack.pop()
        self.marks.append((self._stack[-1], self.mark()))

    def __enter__(self) -> StepPhases:
        if "attack" in vars(self.method):
            raise RuntimeError("StepPhases: the method's attack is already wrapped (nested StepPhases?)")
        self.marks = []
        self._stack = []
        self._enter(DEFAULT_PHASE)
        attack = self.method.attack

        def marked_attack(*args, **kwargs):
            self._enter("attack")
            try:
                return attack(*args, **kwargs)
            finally:
                self._leave()

        self.method.attack = marked_attack
        for teacher in self.teachers:
            self._handles.append(teacher.register_forward_pre_hook(lambda module, args: self._enter("teachers")))
            self._handles.append(teacher.register_forward_hook(lambda module, args, output: self._leave()))
        return self

    def __exit__(self, *exc) -> None:
        del self.method.attack
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.marks.append((None, self.mark()))

    def split(self, amount: Callable[[Any, Any], float]) -> dict[str, float]:
        """Per phase, the sum of ``amount(start_mark, end_mark)`` over the stretches spent in it."""
        totals = dict.fromkeys(PHASES, 0)
        for (phase, start), (_, end) in zip(self.marks, self.marks[1:]):
            totals[phase] += amount(start, end)
        return totals


def count_step_flops(step: Callable[[], Any], method: Any, teachers: Mapping[str, nn.Module]) -> dict[str, int]:
    """FLOPs of one run of ``step`` (a whole training step), in total and per phase.

    Args:
        step: runs one training step of ``method`` with ``teachers``.
        method: the step's ``Method``.
        teachers: the step's frozen teachers.

    Returns:
        ``{"total": ..., "attack": ..., "teachers": ..., "student_update": ...}``; the phases add up to
        the total.
    """
    with flop_counter() as counter, StepPhases(method, teachers, counter.get_total_flops) as phases:
        step()
    flops = {phase: int(value) for phase, value in phases.split(lambda start, end: end - start).items()}
    return {"total": counter.get_total_flops(), **flops}


def _cuda_event() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


@contextmanager
def timed_phases(method: Any, teachers: Mapping[str, nn.Module], device: torch.device) -> Iterator[StepPhases]:
    """:class:`StepPhases` whose marks are CUDA events on a GPU (no host synchronisation while the step
    runs) and ``time.perf_counter`` readings otherwise. Read the split with :func:`phase_seconds` once the
    device has finished the step."""
    mark = _cuda_event if torch.device(device).type == "cuda" else time.perf_counter
    with StepPhases(method, teachers, mark) as phases:
        yield phases


def phase_seconds(phases: StepPhases) -> dict[str, float]:
    """Seconds per phase and ``total`` of a step timed by :func:`timed_phases`, after it has finished
    (synchronise the device first)."""
    first, last = phases.marks[0][1], phases.marks[-1][1]
    if isinstance(first, torch.cuda.Event):
        seconds = phases.split(lambda start, end: start.elapsed_time(end) / 1000)
        return {"total": first.elapsed_time(last) / 1000, **seconds}
    return {"total": last - first, **phases.split(lambda start, end: end - start)}


def time_step(
    step: Callable[[], Any], method: Any, teachers: Mapping[str, nn.Module], device: torch.device
) -> dict[str, float]:
    """Seconds of one run of ``step`` in total and per phase (CUDA events on a GPU; synchronises once at
    the end)."""
    with timed_phases(method, teachers, device) as phases:
        step()
    synchronize(device)
    return phase_seconds(phases)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (nothing to wait for on a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mfu(flops_per_step: float, seconds_per_step: float, peak_flops_per_second: float) -> float:
    """Model FLOP utilisation: ``flops_per_step / seconds_per_step / peak_flops_per_second``, a fraction.

    Raises:
        ConfigError: a non-positive time or peak rate, or negative FLOPs.
    """
    if seconds_per_step <= 0 or peak_flops_per_second <= 0 or flops_per_step < 0:
        raise ConfigError(
            "mfu: need flops_per_step >= 0, seconds_per_step > 0 and peak_flops_per_second > 0 "
            f"(got {flops_per_step}, {seconds_per_step}, {peak_flops_per_second})"
        )
    return flops_per_step / seconds_per_step / peak_flops_per_second


#: Side of the square matrices of :func:`measure_matmul_tflops` when ``n`` is not given.
MATMUL_SIDE = {"cuda": 8192, "cpu": 512}


def measure_matmul_tflops(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16, n: int | None = None, repeats: int | None = None
) -> float:
    """The device's measured matrix-product rate in TFLOP/s: ``repeats`` products of two random ``n x n``
    matrices of ``dtype`` (``2 n^3`` FLOPs each) after warm-up products, timed between synchronisations.

    Args:
        device: where to measure.
        dtype: the matrices' type (bf16: the rate that mixed-precision training can reach).
        n: matrix side; default 8192 on a GPU, 512 on a CPU.
        repeats: timed products; default 20 on a GPU, 5 on a CPU.
    """
    device = torch.device(device)
    n = n or MATMUL_SIDE.get(device.type, MATMUL_SIDE["cpu"])
    repeats = repeats or (20 if device.type == "cuda" else 5)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=generator)
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    seconds = time.perf_counter() - started
    return 2 * n**3 * repeats / seconds / 1e12
