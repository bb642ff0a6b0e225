"""``train.tensorboard``: the reporter's records as TensorBoard scalars, read back from the
event files (TFRecord framing, ``Event`` protos) as TensorBoard would."""

from __future__ import annotations

import struct

from tensorboardX.proto.event_pb2 import Event

from orchestrator.reporter import RunReporter
from orchestrator.tensorboard_log import TENSORBOARD_DIR, scalars


def read_scalars(log_dir) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` from every event file under ``log_dir``."""
    out: dict[str, dict[int, float]] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])  # skip the length's crc
            at += 12 + length + 4  # and the data's crc
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def test_scalars_are_the_finite_numbers_and_per_rank_lists():
    record = {
        "step": 3,
        "epoch": 1,
        "loss": 2.5,
        "grad_norm": float("nan"),
        "compute_s": [0.5, 0.25],
        "resumed": True,
        "note": "text",
    }
    assert dict(scalars(record)) == {"loss": 2.5, "compute_s/rank0": 0.5, "compute_s/rank1": 0.25}


def test_reporter_writes_every_record_and_amended_fields(tmp_path):
    reporter = RunReporter(tmp_path, tensorboard=True)
    reporter.add({"step": 0, "loss": 3.0, "lr": 0.1, "compute_s": [1.0, 2.0]})
    reporter.add({"step": 1, "loss": 2.0, "lr": 0.1, "compute_s": [1.5, 2.5]})
    reporter.amend_last(2, {"checkpoint_blocked_s": 0.25})
    reporter.close()
    got = read_scalars(tmp_path / TENSORBOARD_DIR)
    assert got["loss"] == {0: 3.0, 1: 2.0}
    assert got["compute_s/rank1"] == {0: 2.0, 1: 2.5}
    assert got["checkpoint_blocked_s"] == {1: 0.25}


def test_no_event_files_unless_asked(tmp_path):
    reporter = RunReporter(tmp_path)
    reporter.add({"step": 0, "loss": 3.0})
    reporter.close()
    assert not (tmp_path / TENSORBOARD_DIR).exists()
