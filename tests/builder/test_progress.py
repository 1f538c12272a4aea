from __future__ import annotations

import io
import os
import signal
import threading

import pytest

from trtkit.builder.progress import BuildProgress, cancel_on_sigint, make_monitor


class RecordingDisplay:
    """The part of rich.progress.Progress the monitor uses, recording calls."""

    def __init__(self) -> None:
        self.tasks: dict[int, dict] = {}
        self.removed: list[str] = []
        self._next = 0

    def add_task(self, description: str, total: float | None = None) -> int:
        self._next += 1
        self.tasks[self._next] = {"description": description, "total": total, "completed": 0}
        return self._next

    def update(self, task: int, completed: int) -> None:
        self.tasks[task]["completed"] = completed

    def remove_task(self, task: int) -> None:
        self.removed.append(self.tasks.pop(task)["description"])


def test_nested_phases_on_display() -> None:
    d = RecordingDisplay()
    p = BuildProgress(d)
    p.phase_start("Building engine", None, 3)
    p.phase_start("Optimizing graph", "Building engine", 30)
    assert [t["description"] for t in d.tasks.values()] == ["Building engine", "  Optimizing graph"]
    assert all(p.step_complete("Optimizing graph", i) for i in range(30))
    assert d.tasks[2]["completed"] == 30 and d.tasks[2]["total"] == 30
    p.phase_finish("Optimizing graph")
    assert p.step_complete("Building engine", 0)
    p.phase_finish("Building engine")
    assert d.tasks == {} and d.removed == ["  Optimizing graph", "Building engine"]
    assert p.steps == 31 and p.phases_seen == ["Building engine", "Optimizing graph"]


def test_deep_phases_are_counted_not_shown() -> None:
    d = RecordingDisplay()
    p = BuildProgress(d, max_depth=1)
    p.phase_start("a", None, 1)
    p.phase_start("b", "a", 5)
    assert len(d.tasks) == 1
    assert p.step_complete("b", 0) and p.steps == 1


def test_cancel_stops_steps() -> None:
    p = BuildProgress()
    p.phase_start("a", None, 2)
    assert p.step_complete("a", 0)
    p.cancel("test")
    assert not p.step_complete("a", 1) and p.cancelled and p.cancel_reason == "test"


def test_thread_safe() -> None:
    d = RecordingDisplay()
    p = BuildProgress(d)
    p.phase_start("root", None, 1)

    def worker(k: int) -> None:
        for j in range(50):
            name = f"phase-{k}-{j}"
            p.phase_start(name, "root", 10)
            for i in range(10):
                assert p.step_complete(name, i)
            p.phase_finish(name)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert p.steps == 8 * 50 * 10
    assert list(d.tasks.values())[0]["description"] == "root" and len(d.tasks) == 1


def test_sigint_cancels_and_never_raises() -> None:
    """A KeyboardInterrupt raised inside a TensorRT callback is dropped by TensorRT: every Ctrl-C cancels."""
    p = BuildProgress()
    before = signal.getsignal(signal.SIGINT)
    with cancel_on_sigint(p):
        os.kill(os.getpid(), signal.SIGINT)
        assert p.step_complete("x", 0) is False  # the handler ran at the next bytecode: build asked to stop
        assert p.cancel_reason.startswith("interrupted")
        os.kill(os.getpid(), signal.SIGINT)  # a second one: no KeyboardInterrupt either
        for _ in range(1000):  # let the handler run
            pass
    assert signal.getsignal(signal.SIGINT) is before


def test_sigint_seen_from_a_worker_thread() -> None:
    """Review finding 15: TensorRT may call the monitor from its worker threads while the main thread
    waits in C++ and so never runs the Python handler; the wakeup pipe carries the signal anyway."""
    p = BuildProgress()
    seen: list[bool] = []
    go = threading.Event()

    def worker() -> None:
        go.wait()
        signal.raise_signal(signal.SIGINT)  # delivered to this thread (SIGINT unblocked here)
        seen.append(p.step_complete("x", 0))

    with cancel_on_sigint(p):
        t = threading.Thread(target=worker)
        t.start()  # before the mask below, which a new thread would inherit
        # The main thread blocks SIGINT and waits in C (join): Python cannot run the handler before the
        # worker's step_complete, so only the wakeup pipe can tell the worker.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            go.set()
            t.join()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    assert seen == [False] and p.cancelled and p.cancel_reason.startswith("interrupted")


def test_real_rich_display() -> None:
    from rich.console import Console
    from rich.progress import Progress

    buf = io.StringIO()
    with Progress(console=Console(file=buf, force_terminal=True, width=100)) as prog:
        p = BuildProgress(prog)
        p.phase_start("Building engine", None, 2)
        p.step_complete("Building engine", 0)
        p.phase_finish("Building engine")
    assert "Building engine" in buf.getvalue()


@pytest.mark.rtx
def test_monitor_is_a_tensorrt_progress_monitor() -> None:
    from trtkit.backend import load_backend

    trt = load_backend("rtx").trt
    p = BuildProgress()
    m = make_monitor(trt, p)
    assert isinstance(m, trt.IProgressMonitor)
    m.phase_start("a", None, 1)
    assert m.step_complete("a", 0) is True
    p.cancel()
    assert m.step_complete("a", 0) is False


@pytest.mark.rtx
def test_monitor_turns_keyboard_interrupt_into_cancel() -> None:
    """TensorRT drops what a callback raises: a KeyboardInterrupt in the monitor must cancel instead."""
    from trtkit.backend import load_backend

    class Raising(BuildProgress):
        def step_complete(self, phase_name: str, step: int) -> bool:
            raise KeyboardInterrupt

    p = Raising()
    assert make_monitor(load_backend("rtx").trt, p).step_complete("x", 0) is False and p.cancelled


@pytest.mark.rtx
def test_logger_keeps_keyboard_interrupt() -> None:
    """A KeyboardInterrupt in the logger callback is kept for the caller, not dropped by TensorRT."""
    import logging

    from trtkit.backend import load_backend

    logger = load_backend("rtx").logger

    class Interrupt(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            raise KeyboardInterrupt

    trt_log = logging.getLogger("trtkit.tensorrt")
    f = Interrupt()
    trt_log.addFilter(f)
    try:
        logger.log(load_backend("rtx").trt.ILogger.Severity.ERROR, "x")  # does not raise
    finally:
        trt_log.removeFilter(f)
    with pytest.raises(KeyboardInterrupt):
        logger.reraise_interrupt()
    logger.reraise_interrupt()  # once only


def test_quiet_tensorrt_log_counts_warnings(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from trtkit.builder.progress import quiet_tensorrt_log

    trt_log = logging.getLogger("trtkit.tensorrt")
    with caplog.at_level(logging.DEBUG, logger="trtkit.tensorrt"):
        with quiet_tensorrt_log() as counter:
            trt_log.warning("per-layer warning")
            trt_log.warning("another")
            trt_log.info("info")
            trt_log.error("a real error")
        trt_log.warning("after")
    assert counter.count == 2
    assert [r.getMessage() for r in caplog.records] == ["a real error", "after"]


def test_warnings_summary_lists_distinct_messages() -> None:
    """Newcomer trial P11: "52 warnings (--verbose shows them)" were 2 messages x 26; say which."""
    import logging

    from trtkit.builder.progress import quiet_tensorrt_log

    trt_log = logging.getLogger("trtkit.tensorrt")
    with quiet_tensorrt_log() as counter:
        for _ in range(26):
            trt_log.warning("(foreignNode) Converting conv weight/activation scales to fp32")
            trt_log.warning("Detected layernorm nodes in FP16.\nsecond line")
        for i in range(7):
            trt_log.warning(f"rare {i}")
    assert counter.count == 59 and len(counter.distinct) == 9
    assert counter.summary(top=3) == ["26x (foreignNode) Converting conv weight/activation scales to fp32",
                                      "26x Detected layernorm nodes in FP16.", "1x rare 0",
                                      "... and 6 more distinct messages"]
