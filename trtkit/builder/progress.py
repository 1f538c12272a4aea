"""TensorRT's build progress (phases, nested, with steps) on a rich progress bar, and Ctrl-C as a
clean cancel: `step_complete` returns False, TensorRT stops, the builder raises `BuildCancelled`
(exit 130, "build cancelled").

`BuildProgress` holds the state and is plain Python (thread-safe, testable without TensorRT);
`make_monitor` wraps it in a subclass of the backend's `IProgressMonitor`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from trtkit.errors import TrtkitError

log = logging.getLogger(__name__)


class BuildCancelled(TrtkitError):
    """The build was cancelled (Ctrl-C or `BuildProgress.cancel`): exit 130 as for any interrupt."""

    exit_code = 130


class BuildProgress:
    """Phase/step bookkeeping behind the progress monitor; every method may be called from any thread."""

    def __init__(self, display: Any = None, max_depth: int = 3) -> None:
        self._lock = threading.Lock()
        self._display = display  # a rich Progress or None (then log lines)
        self._max_depth = max_depth  # deeper phases (thousands of reformat timings) are counted, not shown
        self._phases: dict[str, dict[str, Any]] = {}
        self._cancel = threading.Event()
        self._wakeup_fd: int | None = None  # read end of the SIGINT wakeup pipe while cancel_on_sigint is on
        self.cancel_reason = ""
        self.steps = 0
        self.phases_seen: list[str] = []

    def show_on(self, display: Any) -> None:
        """Show the phases on `display` from now on (a rich Progress, or None for log lines)."""
        with self._lock:
            self._display = display

    # -- cancelling
    def cancel(self, reason: str = "cancelled") -> None:
        if not self._cancel.is_set():
            self.cancel_reason = reason
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        self._poll_signal()
        return self._cancel.is_set()

    def _poll_signal(self) -> None:
        """Notice a Ctrl-C from any thread: Python runs signal handlers on the main thread only, and
        TensorRT may call the monitor from its worker threads while the main thread waits in C++. The
        C-level handler writes the signal number to the wakeup pipe at once, whoever runs."""
        fd = self._wakeup_fd
        if fd is None:
            return
        try:
            data = os.read(fd, 64)
        except OSError:  # empty (EAGAIN) or already closed
            return
        if signal.SIGINT in data:
            self.cancel("interrupted (Ctrl-C)")

    # -- the IProgressMonitor protocol
    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        with self._lock:
            parent = self._phases.get(parent_phase) if parent_phase else None
            depth = parent["depth"] + 1 if parent else 0
            task = None
            if self._display is not None and depth < self._max_depth:
                task = self._display.add_task(("  " * depth) + phase_name, total=max(num_steps, 1))
            elif self._display is None and depth < 2:
                log.info("%s%s (%d steps)", "  " * depth, phase_name, num_steps)
            self._phases[phase_name] = {"depth": depth, "task": task, "total": num_steps}
            if phase_name not in self.phases_seen:
                self.phases_seen.append(phase_name)

    def step_complete(self, phase_name: str, step: int) -> bool:
        with self._lock:
            self.steps += 1
            ph = self._phases.get(phase_name)
            if ph is not None and ph["task"] is not None:
                self._display.update(ph["task"], completed=step + 1)
            self._poll_signal()
        return not self._cancel.is_set()

    def phase_finish(self, phase_name: str) -> None:
        with self._lock:
            ph = self._phases.pop(phase_name, None)
            if ph is not None and ph["task"] is not None:
                self._display.remove_task(ph["task"])


def make_monitor(trt: Any, state: BuildProgress) -> Any:
    """An instance of a `trt.IProgressMonitor` subclass forwarding to `state`.

    The caller keeps it referenced for the whole build (TensorRT holds only a raw pointer).
    """

    class _Monitor(trt.IProgressMonitor):
        # TensorRT catches (and drops) any exception a callback raises, a second Ctrl-C's
        # KeyboardInterrupt included: turn it into a cancel instead.
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)  # the pybind trampoline needs this explicit call

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                state.phase_start(phase_name, parent_phase, num_steps)
            except KeyboardInterrupt:
                state.cancel("interrupted (Ctrl-C)")

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                return state.step_complete(phase_name, step)
            except KeyboardInterrupt:
                state.cancel("interrupted (Ctrl-C)")
                return False

        def phase_finish(self, phase_name: str) -> None:
            try:
                state.phase_finish(phase_name)
            except KeyboardInterrupt:
                state.cancel("interrupted (Ctrl-C)")

    return _Monitor()


@contextlib.contextmanager
def cancel_on_sigint(state: BuildProgress) -> Iterator[None]:
    """While TensorRT parses and builds, Ctrl-C asks it to stop (`state.cancel`) instead of raising.

    A KeyboardInterrupt raised inside a TensorRT callback (logger, monitor) is caught and dropped by
    TensorRT, so the handler never raises while TensorRT runs: every Ctrl-C only cancels, and the
    caller checks `state.cancelled` after the parse and after the build. The wakeup pipe lets
    `step_complete` see the signal on whatever thread TensorRT calls it from.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        state.cancel("interrupted (Ctrl-C)")
        log.info("Ctrl-C: cancelling the build")

    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    previous = signal.signal(signal.SIGINT, handler)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    state._wakeup_fd = read_fd
    try:
        yield
    finally:
        state._poll_signal()  # a Ctrl-C whose Python handler has not run yet still counts
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGINT, previous)
        state._wakeup_fd = None
        os.close(read_fd)
        os.close(write_fd)


class DropAfterCancel(logging.Filter):
    """Once the build is cancelled, TensorRT's messages about it ("Error Code 7: BuildCanceled") are
    noise next to the one-line "build cancelled"."""

    def __init__(self, state: BuildProgress) -> None:
        super().__init__()
        self.state = state

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.state.cancelled

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        trt_log = logging.getLogger("trtkit.tensorrt")
        trt_log.addFilter(self)
        try:
            yield
        finally:
            trt_log.removeFilter(self)


@contextlib.contextmanager
def progress_display(enabled: bool, title: str) -> Iterator[Any]:
    """A rich Progress on a terminal (stderr), else None (the monitor logs phases instead)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    t0 = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True, highlight=False), transient=True) as prog:
        prog.add_task(title, total=None)
        yield prog
    log.debug("build display closed after %.1f s", time.perf_counter() - t0)


class TensorRTWarnings(logging.Filter):
    """Counts and hides TensorRT's messages below ERROR (hundreds of per-layer warnings for a UNet); keeps
    the distinct warnings with their counts, which are few (the same message per layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.distinct: Counter[str] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if record.levelno >= logging.WARNING:
            self.count += 1
            first = record.getMessage().strip().splitlines()
            self.distinct[first[0] if first else ""] += 1
        return False

    def summary(self, top: int = 5) -> list[str]:
        """'26x <message>' lines, most frequent first, then how many other distinct messages there were."""
        lines = [f"{n}x {msg}" for msg, n in self.distinct.most_common(top)]
        if len(self.distinct) > top:
            lines.append(f"... and {len(self.distinct) - top} more distinct messages")
        return lines


@contextlib.contextmanager
def quiet_tensorrt_log() -> Iterator[TensorRTWarnings]:
    """While active, TensorRT's warnings are counted instead of printed (errors still show)."""
    counter = TensorRTWarnings()
    trt_log = logging.getLogger("trtkit.tensorrt")
    trt_log.addFilter(counter)
    try:
        yield counter
    finally:
        trt_log.removeFilter(counter)
