"""The run folder's records: ``metrics.jsonl``, ``loss.png``, ``sample.txt`` (and, with
``train.tensorboard``, TensorBoard event files: ``orchestrator/tensorboard_log.py``).

The controller hands each step's record to the ``RunReporter`` and goes on;
files and the plot are the reporter's business. The loss curve is redrawn,
at most every ``plot_every_s`` and once more when the run ends, by a child
process at the lowest CPU priority that reads ``metrics.jsonl``
(``python -m orchestrator.report``): matplotlib's import and a drawing take
~1 s of CPU, and drawn on a thread of the controller they held the GIL
while a recovery needed the controller (measured: export 0.14 -> 0.19 s,
stalls of 0.3-0.4 s on a busy machine). A process shares no GIL, and the
OS, not the interpreter, gives it only time the workers leave idle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from orchestrator.report import plot_loss
from orchestrator.tensorboard_log import TensorBoardLog

METRICS = "metrics.jsonl"
PLOT_TIMEOUT_S = 120.0  # a drawing that takes longer is given up (the next one retries)


def _lowest_priority() -> None:
    """In the plotting child: nice 19, so it only uses CPU the workers leave idle."""
    os.nice(19)


class RunReporter:
    """Keeps the step records of a run, in memory and in ``<run_dir>/metrics.jsonl``."""

    def __init__(self, run_dir: Path, plot_every_s: float = 10.0, tensorboard: bool = False):
        self.run_dir = run_dir
        self.path = run_dir / METRICS
        self._tensorboard = TensorBoardLog(run_dir) if tensorboard else None
        self._lock = threading.Lock()
        self._records: list[dict[str, Any]] = []
        self._plot_every_s = plot_every_s
        self._plot_wanted = threading.Event()
        self._closed = threading.Event()
        self._plotter = threading.Thread(target=self._plot_loop, name="shoal-plot", daemon=True)
        self._plotter.start()

    def start_fresh(self) -> None:
        """A fresh run: no earlier records in this folder count."""
        with self._lock:
            self._records = []
            self.path.unlink(missing_ok=True)

    def add(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._records.append(record)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self._tensorboard is not None:
                self._tensorboard.add(record)

    def since(self, index: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            return self._records[index:]

    def amend_last(self, step: int, fields: dict[str, Any]) -> None:
        """Add ``fields`` to the record of step ``step - 1`` if it is the last one.

        Rewrites only the last line of ``metrics.jsonl``, so the cost does not
        grow with the length of the run.
        """
        with self._lock:
            if not self._records or self._records[-1]["step"] != step - 1:
                return
            self._records[-1].update(fields)
            if self._tensorboard is not None:
                self._tensorboard.add({"step": step - 1, **fields})
            line = json.dumps(self._records[-1]).encode() + b"\n"
            with open(self.path, "r+b") as f:
                size = f.seek(0, 2)
                back = min(size, 1 << 16)
                f.seek(size - back)
                tail = f.read()
                start = tail.rfind(b"\n", 0, len(tail) - 1) + 1
                if json.loads(tail[start:]).get("step") != step - 1:
                    return
                f.seek(size - back + start)
                f.truncate()
                f.write(line)

    def keep_before(self, step: int) -> None:
        """Drop the records of steps from ``step`` on: they will be run again (resume, recovery)."""
        with self._lock:
            if not self.path.exists():
                self._records = []
                return
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if line and json.loads(line)["step"] < step]
            self.path.write_text("".join(line + "\n" for line in kept))
            self._records = [json.loads(line) for line in kept]

    def plot_soon(self) -> None:
        """Ask for the loss curve to be redrawn (in the background)."""
        self._plot_wanted.set()

    def write_sample(self, text: str) -> None:
        (self.run_dir / "sample.txt").write_text(text)

    def close(self) -> None:
        """Draw the final curve now and stop the plotting thread."""
        self._closed.set()
        self._plot_wanted.set()
        self._plotter.join(timeout=60)
        plot_loss(self.since(), self._png)
        if self._tensorboard is not None:
            self._tensorboard.close()

    @property
    def _png(self) -> Path:
        return self.run_dir / "loss.png"

    def _plot_loop(self) -> None:
        # The first drawing too waits an interval: a short run is drawn once, at
        # its end (a drawing costs ~1.5 s of CPU, much of a short job's).
        self._closed.wait(self._plot_every_s)
        while not self._closed.is_set():
            self._plot_wanted.wait()
            if self._closed.is_set():
                return
            self._plot_wanted.clear()
            try:
                # This thread only waits (releasing the GIL) while the child draws.
                subprocess.run(
                    [sys.executable, "-m", "orchestrator.report", str(self.path), str(self._png)],
                    preexec_fn=_lowest_priority,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=PLOT_TIMEOUT_S,
                    check=False,
                )
            except (OSError, subprocess.SubprocessError):  # a plot must never stop training
                pass
            # Throttle: at most one drawing per interval, however often asked.
            self._closed.wait(self._plot_every_s)
