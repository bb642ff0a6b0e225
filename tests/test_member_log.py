"""Structured per-member logs (``actors/member_log.py``): JSON lines with job id, role,
worker, epoch and rank; first calls and periodic summaries; failures with tracebacks."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from actors import member_log as ml


@pytest.fixture
def log(tmp_path, monkeypatch):
    spec = SimpleNamespace(run_dir=tmp_path, job_id="job-1")
    member = ml.member_log((spec, 3, None), "worker")
    yield member
    logging.getLogger().removeHandler(member._handler)
    member._handler.close()


def _lines(log) -> list[dict]:
    log._handler.flush()
    return [json.loads(x) for x in log.path.read_text().splitlines()]


def test_lines_carry_the_members_position_and_summaries_are_bounded(log, monkeypatch):
    assert log.path.name == "worker3.jsonl" and log.path.parent.name == ml.LOGS_DIR
    clock = [100.0]
    monkeypatch.setattr(ml.time, "monotonic", lambda: clock[0])
    log.set_position(*ml.position_of(SimpleNamespace(rank=1), SimpleNamespace(epoch=4)))
    log.called("setup", 0.5)
    for _ in range(5):  # within SUMMARY_EVERY_S: counted, not logged
        log.called("train_step", 0.25)
    clock[0] += ml.SUMMARY_EVERY_S
    log.called("train_step", 0.25)
    logging.getLogger("orchestrator.something").info("shoal's own info")
    logging.getLogger("somelib").info("another library's info is dropped")
    logging.getLogger("somelib").warning("its warnings are kept")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.failed("save_shard")
    lines = _lines(log)
    assert [x["message"] for x in lines] == [
        "setup: first call, 0.500 s",
        "train_step: first call, 0.250 s",
        "train_step: 5 calls since the last line, 0.250 s each",
        "shoal's own info",
        "its warnings are kept",
        "save_shard raised",
    ]
    assert all(
        (x["job_id"], x["role"], x["worker"], x["epoch"], x["rank"]) == ("job-1", "worker", 3, 4, 1)
        for x in lines
    )
    assert "RuntimeError: boom" in lines[-1]["traceback"] and lines[-1]["level"] == "ERROR"


def test_a_standing_member_is_placed_by_its_slot():
    runtime = SimpleNamespace(rank=-1, slot=2)
    assert ml.position_of(runtime, None) == (None, 2)


def test_no_run_folder_no_log(tmp_path):
    assert ml.member_log((object(), 1), "worker") is None
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the run folder should be: cannot be written
    assert ml.member_log((SimpleNamespace(run_dir=blocked, job_id="j"), 1), "worker") is None
