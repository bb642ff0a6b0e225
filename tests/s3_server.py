"""A real S3-protocol server for tests: moto's server mode on 127.0.0.1.

Tests talk plain HTTP to it through boto3, exactly as they would to MinIO or
AWS; nothing in boto3 is patched. A test module gets the fixtures with::

    pytest_plugins = ["tests.s3_server"]

``s3_server`` (session-scoped) is an :class:`S3Server` with ``endpoint``
(``http://127.0.0.1:<port>``) and ``make_bucket()``; ``s3_endpoint`` is just
the URL. While the server runs, fake credentials and region are set in the
environment (and restored afterwards) so boto3's credential chain finds them
and never reaches for a developer's real ~/.aws profile or an instance role.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

# What the fixture puts in the environment. Unset variables that would make
# boto3 look elsewhere for credentials, or send requests somewhere else.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
CLEARED_AWS_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)


@contextmanager
def moto_server(host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run moto's S3-compatible server in a background thread; yields its endpoint URL.

    ``port=0`` lets the OS pick a free port, so parallel test runs never
    collide. The server keeps state in memory and is gone when the block exits.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()  # returns once the socket is bound and listening
    try:
        bound_host, bound_port = server.get_host_and_port()
        yield f"http://{bound_host}:{bound_port}"
    finally:
        server.stop()


@contextmanager
def fake_aws_env() -> Iterator[None]:
    """Fake credentials in the environment for the block; the previous values after."""
    with pytest.MonkeyPatch.context() as mp:
        for name in CLEARED_AWS_ENV:
            mp.delenv(name, raising=False)
        for name, value in FAKE_AWS_ENV.items():
            mp.setenv(name, value)
        yield


@dataclass(frozen=True)
class S3Server:
    """A running test S3 server: where it is, and a way to make buckets on it."""

    endpoint: str
    region: str = "us-east-1"

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh uniquely named one by default) and return its name.

        Uses explicit fake keys, so it works even in a test that removed the
        credentials from the environment.
        """
        import boto3
        from botocore.config import Config

        name = name or f"shoal-test-{uuid.uuid4().hex[:12]}"
        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            config=Config(s3={"addressing_style": "path"}),
        )
        if self.region == "us-east-1":  # the one region that refuses a LocationConstraint
            client.create_bucket(Bucket=name)
        else:
            client.create_bucket(
                Bucket=name, CreateBucketConfiguration={"LocationConstraint": self.region}
            )
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 shared by the test session (state lives in memory).

    Skips the requesting tests if moto's server extra is not installed
    (``pip install -e '.[test]'`` installs it). Tests should make their own
    bucket with ``s3_server.make_bucket()`` rather than share one.
    """
    pytest.importorskip("moto.server", reason="needs moto[server] (pip install -e '.[test]')")
    with fake_aws_env(), moto_server() as endpoint:
        yield S3Server(endpoint)


@pytest.fixture(scope="session")
def s3_endpoint(s3_server: S3Server) -> str:
    """Just the endpoint URL of ``s3_server``, e.g. ``http://127.0.0.1:41234``."""
    return s3_server.endpoint
