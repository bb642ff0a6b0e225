"""``shoal status`` on damaged run folders, one-line errors, ``--debug``, ``shoal scale``'s report.

No Ray here: ``status`` reads run folders only, and the error guard and the
scale message are plain functions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator.status import (
    JobState,
    JobStatus,
    StatusError,
    StatusMissing,
    load_status,
    read_status,
    write_status,
)
from tests.test_cli import shoal


def _good_status(run_dir: Path, job_id: str = "20260101-000000-good") -> JobStatus:
    run_dir.mkdir(parents=True, exist_ok=True)
    status = JobStatus(
        job_id,
        JobState.SUCCEEDED,
        str(run_dir),
        step=12,
        total_steps=12,
        loss=1.5,
        workers=[{"rank": 0, "pid": 1, "node_ip": "127.0.0.1", "worker_id": 0}],
        epoch=1,
    )
    write_status(run_dir, status)
    return status


def _fields(**changes) -> str:
    d = json.loads(JobStatus("j", JobState.RUNNING, "/r").to_json())
    d.update(changes)
    return json.dumps(d)


# Each: what status.json holds, and words the one-line error must contain.
BAD_STATUS = {
    "not_json": ("{not json", "not JSON"),
    "a_list": ("[1, 2, 3]", "expected a JSON object, found a list"),
    "a_string": ('"running"', "expected a JSON object, found a string"),
    "missing_fields": ('{"job_id": "x"}', "missing field(s): state, run_dir"),
    "bad_state": (_fields(state="sleeping"), "unknown state 'sleeping'"),
    "state_not_a_string": (_fields(state=[1]), "unknown state [1]"),
    "loss_a_string": (_fields(loss="abc"), "wrong type for loss (a string)"),
    "workers_a_number": (_fields(workers=3), "wrong type for workers (the number 3)"),
    "step_a_float": (_fields(step=2.5), "wrong type for step (the number 2.5)"),
    "not_utf8": (b"\xff\xfe{", "unreadable"),
}


def _write_bad(run_dir: Path, content: str | bytes) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "status.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("case", sorted(BAD_STATUS))
def test_bad_status_json_is_one_line_naming_path_and_problem(case, tmp_path, capsys):
    content, problem = BAD_STATUS[case]
    path = _write_bad(tmp_path / "run", content)
    assert cli.main(["status", str(tmp_path / "run")]) == cli.EXIT_FAILED
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith(f"shoal: {path}: "), err
    assert problem in err, err
    # The old contract holds: no usable status reads as None.
    assert read_status(tmp_path / "run") is None
    with pytest.raises(StatusError, match="status.json"):
        load_status(tmp_path / "run")


def test_status_of_a_file_or_a_missing_folder(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello")
    assert cli.main(["status", str(a_file)]) == cli.EXIT_FAILED
    assert capsys.readouterr().err == f"shoal: {a_file}: a file, not a run folder\n"
    assert cli.main(["status", str(tmp_path / "nowhere")]) == cli.EXIT_FAILED
    assert "no such folder" in capsys.readouterr().err
    assert cli.main(["status", str(tmp_path)]) == cli.EXIT_FAILED
    assert "no status.json" in capsys.readouterr().err
    with pytest.raises(StatusMissing):
        load_status(a_file)
    assert read_status(a_file) is None


def test_status_whose_worker_records_lack_fields_is_one_line(tmp_path, capsys):
    # The fields' types are right; what the summary reads inside them is not there.
    path = _write_bad(tmp_path / "run", _fields(workers=[{}]))
    assert cli.main(["status", str(tmp_path / "run")]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"shoal: {path}: unexpected content"), err
    assert "KeyError" in err, err


@pytest.mark.parametrize("pid", [-1, 0, 2**80])
def test_status_with_a_strange_driver_pid_still_shows(pid, tmp_path, capsys):
    _write_bad(tmp_path / "run", _fields(driver_pid=pid))
    assert cli.main(["status", str(tmp_path / "run")]) == cli.EXIT_OK
    assert "job j:" in capsys.readouterr().out


def test_listing_shows_good_runs_and_a_line_per_bad_one(tmp_path, capsys):
    runs = tmp_path / "runs"
    _good_status(runs / "good")
    for case in ("a_list", "not_json", "missing_fields"):
        _write_bad(runs / case, BAD_STATUS[case][0])
    (runs / "empty").mkdir()  # not a run folder: not listed
    (runs / "stray.txt").write_text("x")
    assert cli.main(["status", "--runs", str(runs)]) == cli.EXIT_OK
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = out.splitlines()
    assert lines[0].startswith("job") and "20260101-000000-good" in out and "12/12" in out
    for case in ("a_list", "not_json", "missing_fields"):
        (line,) = [x for x in lines if x.startswith(f"{runs / case}:")]
        assert "unreadable status.json (" in line and BAD_STATUS[case][1] in line
    assert "empty" not in out and "stray" not in out


def test_listing_of_only_bad_runs_still_names_them(tmp_path, capsys):
    _write_bad(tmp_path / "runs" / "bad", "[1, 2, 3]")
    assert cli.main(["status", "--runs", str(tmp_path / "runs")]) == cli.EXIT_OK
    assert "bad: unreadable status.json (expected a JSON object" in capsys.readouterr().out


def test_status_command_on_bad_input_prints_no_traceback(tmp_path):
    """The same, as a user runs it: a real ``shoal`` process."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello")
    _write_bad(tmp_path / "runs" / "bad", "[1, 2, 3]")
    _good_status(tmp_path / "runs" / "good")
    out = shoal("status", str(a_file))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"shoal: {a_file}: a file, not a run folder"
    out = shoal("status", str(tmp_path / "runs" / "bad"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "expected a JSON object, found a list" in out.stderr
    out = shoal("status", "--runs", str(tmp_path / "runs"))
    assert out.returncode == 0 and "Traceback" not in out.stderr
    assert "20260101-000000-good" in out.stdout and "unreadable status.json" in out.stdout


def _raise_missing_file() -> int:
    # A real error from the standard library, not a made-up one.
    Path("/nonexistent-shoal-dir/x").read_text()
    return 0


def test_an_escaping_error_is_one_line_without_traceback(monkeypatch, capsys):
    monkeypatch.delenv("SHOAL_DEBUG", raising=False)
    monkeypatch.setattr(cli, "_debug_flag", False)
    assert cli.run_guarded(_raise_missing_file) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("shoal: FileNotFoundError: [Errno 2] No such file or directory")
    assert "/nonexistent-shoal-dir/x" in err and "(run with --debug for the traceback)" in err


@pytest.mark.parametrize("value", ["1", "yes", "true"])
def test_shoal_debug_env_shows_the_traceback(value, monkeypatch, capsys):
    monkeypatch.setenv("SHOAL_DEBUG", value)
    monkeypatch.setattr(cli, "_debug_flag", False)
    assert cli.debug_enabled()
    assert cli.run_guarded(_raise_missing_file) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "Traceback" in err and "_raise_missing_file" in err
    assert err.splitlines()[-1].startswith("shoal: FileNotFoundError")


@pytest.mark.parametrize("value", ["", "0", "false"])
def test_shoal_debug_env_off(value, monkeypatch):
    monkeypatch.setenv("SHOAL_DEBUG", value)
    monkeypatch.setattr(cli, "_debug_flag", False)
    assert not cli.debug_enabled()


def test_debug_flag_is_accepted_before_or_after_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SHOAL_DEBUG", raising=False)
    _good_status(tmp_path / "run")
    for argv in (
        ["--debug", "status", str(tmp_path / "run")],
        ["status", "--debug", str(tmp_path / "run")],
    ):
        assert cli.main(argv) == cli.EXIT_OK
        assert cli.debug_enabled()
        assert "12/12" in capsys.readouterr().out
    assert cli.main(["status", str(tmp_path / "run")]) == cli.EXIT_OK
    assert not cli.debug_enabled()


def test_ctrl_c_in_a_command_is_exit_130_without_traceback(monkeypatch, capsys):
    monkeypatch.delenv("SHOAL_DEBUG", raising=False)
    monkeypatch.setattr(cli, "_debug_flag", False)

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert cli.run_guarded(interrupted) == cli.EXIT_CANCELLED
    err = capsys.readouterr().err
    assert "Traceback" not in err and "shoal: interrupted" in err


def test_one_line_keeps_the_first_line_and_a_bounded_length():
    assert cli.one_line(ValueError("first\nsecond")) == "ValueError: first"
    assert cli.one_line(KeyError()) == "KeyError"
    assert len(cli.one_line(RuntimeError("x" * 1000))) == 300


def test_scale_message_says_when_it_clamps():
    same = cli.scale_message("j1", 3, 3)
    assert same == "job j1: target 3 workers (applied at the next step boundary)"
    clamped = cli.scale_message("j1", 9, 4)
    assert "asked for 9 workers; clamped to 4" in clamped
    assert "cluster.min_workers..cluster.max_workers" in clamped
    assert "next step boundary" in clamped


def test_run_help_lists_the_strategies_and_checkpoint_overwrite():
    assert "strategy=ddp|zero1|zero2|zero3" in cli.RUN_EPILOG
    assert "come next" not in cli.RUN_EPILOG
    assert "checkpoint.overwrite=true" in cli.RUN_EPILOG
    assert "another run's checkpoints; they are deleted" in cli.RUN_EPILOG
