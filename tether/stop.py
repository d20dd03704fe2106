"""Stopping a run cleanly: SIGINT (Ctrl-C) and SIGTERM (what a scheduler sends before it preempts a job).

The first signal asks the loop to stop: it finishes the step it is in (the rollout and every optimiser step of
it), writes a checkpoint, flushes the logs and raises :class:`RunStopped`, which the command line prints as one
line saying how to resume, exiting 130 (SIGINT) or 143 (SIGTERM). A second signal stops at once
(``KeyboardInterrupt``): a checkpoint being written is abandoned, and since checkpoints are written into a
temporary directory and renamed only when complete, the last good one is untouched.

With several processes every one checks, at the end of each step, whether any process was asked to stop (one
small all-reduce), so all stop after the same step and write the checkpoint together.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from tether.backend import Backend

#: The signals that ask a run to stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunStopped(Exception):
    """``train()`` stopped early on a signal, after writing the checkpoint of ``step``."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, run_dir: Path, command: str) -> None:
        super().__init__(signum, step, checkpoint, run_dir, command)
        self.signum, self.step, self.checkpoint, self.run_dir, self.command = (
            signum,
            step,
            checkpoint,
            run_dir,
            command,
        )

    @property
    def exit_code(self) -> int:
        """The shell's code for death by this signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum

    def __str__(self) -> str:
        saved = f"checkpoint {self.checkpoint}" if self.checkpoint is not None else "no checkpoint"
        return (
            f"stopped by {signal.Signals(self.signum).name} after step {self.step} ({saved}); continue with: "
            f"tether {self.command} --resume {self.run_dir}"
        )


class StopSignals:
    """Context manager that turns the first SIGINT / SIGTERM into a request (:attr:`requested`) and a second one
    into ``KeyboardInterrupt``; the previous handlers come back on exit. Outside the main thread (where Python
    cannot install handlers) it does nothing."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignals:
        """Take over SIGINT and SIGTERM (main thread only); returns self."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def uninstall(self) -> None:
        """Give the previous handlers back."""
        self._restore()

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            self._restore()
            raise KeyboardInterrupt  # the second signal: stop now
        self.requested = signum
        print(
            f"\ntether: {signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
            "(send it again to stop at once, keeping the last checkpoint)",
            file=sys.stderr,
            flush=True,
        )

    def agreed(self, backend: Backend) -> int | None:
        """The signal to stop on if any process was asked to (the same answer on every process), else None."""
        if backend.world_size == 1:
            return self.requested
        asked = backend.all_reduce_sum(torch.tensor([float(self.requested is not None)], dtype=torch.float64))
        if float(asked[0]) == 0:
            return None
        return self.requested or int(signal.SIGTERM)  # a process that got none stops as a preempted one
