"""Preemption: a signal some seconds before a kill becomes a checkpoint and a clean exit.

SLURM (`--signal=USR1@90`, or SIGTERM at the time limit and on `scancel`), spot instances and
Kubernetes (SIGTERM, then SIGKILL after the grace period) warn a job before they end it. Without a
handler the default action of SIGTERM kills the run at once and everything since the last periodic
checkpoint is lost. With one, the handler only sets a flag: the trainer finishes the optimizer
step in flight, every process agrees that a stop was asked for, the checkpoint of that step is
written, and `distill run` exits with `PREEMPTED_EXIT_CODE`. The rerun resumes from that step,
bitwise as from any checkpoint.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from types import FrameType, TracebackType

# sysexits.h EX_TEMPFAIL, "a temporary failure; the user is invited to retry": a wrapper script
# (or SLURM's requeue) tells a preempted run from a finished one (0) or a failed one (1, 2).
PREEMPTED_EXIT_CODE = 75

DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


def signal_number(name: str) -> signal.Signals:
    """`SIGTERM`, `TERM` or `sigterm` -> signal.SIGTERM; ValueError for an unknown name."""
    text = name.upper()
    text = text if text.startswith("SIG") else f"SIG{text}"
    try:
        return signal.Signals[text]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}") from None


class StopRequests:
    """While entered, the named signals set a flag instead of ending the process.

    Handlers can only be installed from the main thread; entered from another thread (a trainer
    run inside a test harness's thread) the object installs nothing and never reports a stop. On
    exit the previous handlers come back, so a second signal after the checkpoint, or one outside
    training, acts as it would have without us.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.signals = [signal_number(name) for name in names]
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, number: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(number)

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for number in self.signals:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()


class Preempted(RuntimeError):
    """A stop signal arrived; the checkpoint of the step named in the message is on disk."""
