"""The run folder's step records and plot (``orchestrator/reporter.py``), without Ray."""

from __future__ import annotations

import json
import time

from orchestrator.reporter import RunReporter


def _steps(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_amend_and_rewind(tmp_path):
    reporter = RunReporter(tmp_path, plot_every_s=0.0)
    for step in range(5):
        reporter.add({"step": step, "loss": 5.0 - step})
    reporter.amend_last(5, {"checkpoint_blocked_s": 0.25})
    reporter.amend_last(3, {"ignored": True})  # not the last record: left alone
    records = _steps(tmp_path / "metrics.jsonl")
    assert records[-1] == {"step": 4, "loss": 1.0, "checkpoint_blocked_s": 0.25}
    assert all("ignored" not in r for r in records)
    assert reporter.since(3) == records[3:]
    reporter.keep_before(2)  # steps 2.. are run again after a recovery
    assert [r["step"] for r in _steps(tmp_path / "metrics.jsonl")] == [0, 1]
    assert [r["step"] for r in reporter.since()] == [0, 1]
    reporter.close()
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_a_fresh_run_drops_an_earlier_runs_records(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 9.0}\n')
    reporter = RunReporter(tmp_path)
    reporter.start_fresh()
    reporter.add({"step": 0, "loss": 1.0})
    assert _steps(tmp_path / "metrics.jsonl") == [{"step": 0, "loss": 1.0}]
    reporter.close()


def test_the_plot_is_drawn_by_a_child_process_from_the_file(tmp_path):
    """Drawing happens outside the controller's process (no GIL shared with recovery)."""
    reporter = RunReporter(tmp_path, plot_every_s=0.0)
    for step in range(20):
        reporter.add({"step": step, "loss": 3.0 - 0.1 * step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 20, "lo')  # a record being written: skipped, not fatal
    reporter.plot_soon()
    deadline = time.monotonic() + 120
    while not (tmp_path / "loss.png").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (tmp_path / "loss.png").stat().st_size > 0
    reporter._closed.set()  # stop the thread without the final in-process drawing
    reporter._plot_wanted.set()
