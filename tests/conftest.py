"""Shared fixtures: one local Ray instance per test session."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray instance, started once (a start costs seconds).

    num_cpus is set explicitly and above the core count so that tests with
    up to 4 one-CPU workers are placed on a 2-core CI machine. PYTHONPATH
    lets workers import test-only models from ``tests/``.
    """
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    from tests.s3_server import FAKE_AWS_ENV

    # Workers get the fake S3 credentials of tests/s3_server.py from the
    # start, so the S3 tests need no Ray restart of their own.
    ray.init(
        address="local",  # our own instance, even if a cluster runs on this machine
        num_cpus=4,
        include_dashboard=False,
        namespace="shoal-tests",
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"], **FAKE_AWS_ENV}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def default_sigint():
    """Python's default SIGINT handler in this process while the test runs.

    Children of a pytest started in the background (``pytest &``) inherit
    SIGINT ignored, and ``shoal run`` / ``shoal volunteer join`` rightly leave
    an ignored SIGINT alone; tests that Ctrl-C the processes they start need
    a terminal's disposition, which a handled signal becomes again in a child.
    """
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
