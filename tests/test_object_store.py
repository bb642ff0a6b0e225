"""The ObjectStore contract, run against LocalStore and against S3Store on a real S3 server.

The S3 server is moto's server mode on 127.0.0.1 (``tests/s3_server.py``);
boto3 talks HTTP to it, nothing is patched. Each S3 test gets a fresh bucket.
"""

from __future__ import annotations

import pickle
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from storage.object_store import (
    LocalStore,
    ObjectInfo,
    ObjectStore,
    StoreError,
    known_schemes,
    open_store,
    register_scheme,
    unregister_scheme,
)

if TYPE_CHECKING:
    from tests.s3_server import S3Server

# The session-scoped ``s3_server`` fixture: a moto server on 127.0.0.1.
pytest_plugins = ["tests.s3_server"]

pytest.importorskip("boto3")

from storage.s3_store import S3Store, is_transient, retry  # noqa: E402 - after the skip

MiB = 1024 * 1024
REGION = "us-east-1"
ROOT_PREFIX = "runs/job-1/ckpt"


def s3_store(
    server: S3Server | str, bucket: str | None = None, prefix: str = ROOT_PREFIX, **options: Any
) -> S3Store:
    """An S3Store with test-friendly settings: small multipart parts, few quick retries.

    ``server`` is the test server (``bucket`` None: a fresh bucket on it) or
    any endpoint URL.
    """
    if isinstance(server, str):
        endpoint = server
    else:
        endpoint = server.endpoint
        bucket = bucket or server.make_bucket()
    assert bucket is not None
    settings: dict[str, Any] = dict(
        endpoint_url=endpoint,
        region=REGION,
        path_style=True,
        max_attempts=2,
        op_attempts=2,
        base_delay=0.01,
        connect_timeout=2.0,
        read_timeout=10.0,
        multipart_threshold_mb=5,
        multipart_chunk_mb=5,
        multipart_concurrency=4,
    )
    settings.update(options)
    return S3Store(bucket, prefix, **settings)


def count_calls(store: S3Store, operation: str) -> list[int]:
    """A counter of ``operation`` requests the store's client completes (botocore's event hooks)."""
    calls = [0]

    def bump(**_: Any) -> None:
        calls[0] += 1

    store._client.meta.events.register(f"after-call.s3.{operation}", bump)
    return calls


def closed_port() -> int:
    """A port on 127.0.0.1 with nothing listening (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "local":
        yield LocalStore(tmp_path / "store")
    else:
        # moto's server now and then answers 500 when threads overwrite one
        # key at once (real S3 answers InternalError at times too); botocore
        # retries 500s, so give the contract tests the product's 5 attempts.
        yield s3_store(request.getfixturevalue("s3_server"), max_attempts=5)


# -- the contract, for every backend -------------------------------------------------


def test_put_get_round_trip(store: ObjectStore) -> None:
    store.put("a/b/c.bin", b"hello")
    store.put("empty", b"")
    store.put("from-bytearray", bytearray(b"\x00\x01\x02"))
    store.put("from-memoryview", memoryview(b"0123456789")[2:6])
    assert store.get("a/b/c.bin") == b"hello"
    assert store.get("empty") == b""
    assert store.get("from-bytearray") == b"\x00\x01\x02"
    assert store.get("from-memoryview") == b"2345"


def test_put_accepts_a_typed_buffer(store: ObjectStore) -> None:
    import array

    floats = array.array("d", [1.0, 2.5, -3.0])  # a memoryview with format 'd', itemsize 8
    store.put("floats", memoryview(floats))
    assert store.get("floats") == floats.tobytes()


def test_overwrite_replaces_whole_object(store: ObjectStore) -> None:
    store.put("k", b"a much longer first version")
    store.put("k", b"short")
    assert store.get("k") == b"short"
    assert [o.size for o in store.list("k")] == [5]


def test_get_range(store: ObjectStore) -> None:
    store.put("r", bytes(range(100)))
    assert store.get_range("r", 0, 10) == bytes(range(10))
    assert store.get_range("r", 42, 50) == bytes(range(42, 50))
    assert store.get_range("r", 99, 100) == b"\x63"
    assert store.get_range("r", 7, 7) == b""
    # Like a file read: a range past the end is cut short, not an error.
    assert store.get_range("r", 90, 200) == bytes(range(90, 100))
    assert store.get_range("r", 100, 110) == b""


def test_list_prefix_sorted_with_sizes(store: ObjectStore) -> None:
    for key, size in [("step-2/b", 2), ("step-10/a", 10), ("step-1/a", 1), ("other", 3)]:
        store.put(key, b"x" * size)
    listed = store.list("step-1")
    assert [o.key for o in listed] == ["step-1/a", "step-10/a"]  # prefixes are strings
    assert [o.size for o in listed] == [1, 10]
    assert [o.key for o in store.list()] == ["other", "step-1/a", "step-10/a", "step-2/b"]
    assert store.list("nothing-here") == []
    now = time.time()
    assert all(abs(o.mtime - now) < 300 for o in store.list())


def test_exists(store: ObjectStore) -> None:
    store.put("dir/ab", b"1")
    assert store.exists("dir/ab")
    assert not store.exists("dir/a")  # a prefix of a key is not a key
    assert not store.exists("dir/abc")


def test_delete(store: ObjectStore) -> None:
    store.put("x/1", b"1")
    store.put("x/2", b"2")
    store.delete("x/1")
    assert [o.key for o in store.list()] == ["x/2"]
    store.delete("x/1")  # deleting a missing object is not an error
    store.delete("never-existed")
    with pytest.raises(StoreError):
        store.get("x/1")


def test_delete_prefix(store: ObjectStore) -> None:
    for i in range(7):
        store.put(f"step-1/shard-{i}", b"s")
    store.put("step-10/shard-0", b"t")
    store.put("step-2/shard-0", b"u")
    assert store.delete_prefix("step-1/") == 7
    assert [o.key for o in store.list()] == ["step-10/shard-0", "step-2/shard-0"]
    assert store.delete_prefix("step-1/") == 0
    assert store.delete_prefix("") == 2
    assert store.list() == []


def test_missing_key_is_store_error(store: ObjectStore) -> None:
    with pytest.raises(StoreError, match="nope/missing"):
        store.get("nope/missing")
    with pytest.raises(StoreError, match="nope/missing"):
        store.get_range("nope/missing", 0, 4)
    with pytest.raises(StoreError):
        store.get_range("nope/missing", 3, 3)


def test_key_escaping_the_root_is_refused(store: ObjectStore) -> None:
    with pytest.raises(StoreError):
        store.put("../outside", b"x")
    with pytest.raises(StoreError):
        store.put("/etc/absolute", b"x")


def test_large_object_round_trip(store: ObjectStore) -> None:
    # ~12 MiB: three parts with S3's 5 MiB minimum. Random bytes, so a part
    # stored at the wrong offset or twice cannot go unnoticed.
    data = random.Random(0).randbytes(12 * MiB + 12345)
    store.put("big/shard-0", memoryview(data))
    assert store.get("big/shard-0") == data
    assert (
        store.get_range("big/shard-0", 5 * MiB - 3, 5 * MiB + 3) == data[5 * MiB - 3 : 5 * MiB + 3]
    )
    assert [o.size for o in store.list("big/")] == [len(data)]


def test_concurrent_puts_from_threads(store: ObjectStore) -> None:
    def writer(t: int) -> None:
        for i in range(5):
            store.put(f"t{t}/obj-{i}", f"{t}:{i}".encode() * 100)
            # Everyone also overwrites one shared key; whichever wins must be whole.
            store.put("shared", f"writer-{t}".encode() * 1000)

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(writer, range(6)))
    for t in range(6):
        for i in range(5):
            assert store.get(f"t{t}/obj-{i}") == f"{t}:{i}".encode() * 100
    assert store.get("shared") in {f"writer-{t}".encode() * 1000 for t in range(6)}
    assert len(store.list()) == 6 * 5 + 1


def test_check_passes_and_leaves_nothing_behind(store: ObjectStore) -> None:
    store.check()
    assert store.list() == []


# -- S3 specifics --------------------------------------------------------------------


def test_s3_large_object_is_uploaded_multipart(s3_server: S3Server) -> None:
    store = s3_store(s3_server)
    parts = count_calls(store, "UploadPart")
    puts = count_calls(store, "PutObject")
    data = random.Random(1).randbytes(12 * MiB)
    store.put("big", data)
    assert parts[0] == 3 and puts[0] == 0  # 5 + 5 + 2 MiB
    # A multipart upload's ETag ends in "-<number of parts>": the server agrees.
    head = store._client.head_object(Bucket=store.bucket, Key=store.prefix + "big")
    assert head["ETag"].strip('"').endswith("-3")
    assert store.get("big") == data

    store.put("small", b"x" * (5 * MiB - 1))  # below the threshold: one PutObject
    assert puts[0] == 1 and parts[0] == 3


def test_s3_list_paginates(s3_server: S3Server) -> None:
    store = s3_store(s3_server, list_page_size=2)
    keys = [f"k/{i:02d}" for i in range(7)]
    for k in reversed(keys):
        store.put(k, k.encode())
    pages = count_calls(store, "ListObjectsV2")
    assert [o.key for o in store.list("k/")] == keys
    assert pages[0] == 4  # 2 + 2 + 2 + 1


def test_s3_delete_prefix_batches(s3_server: S3Server) -> None:
    store = s3_store(s3_server, delete_batch_size=3)
    for i in range(7):
        store.put(f"old/{i}", b"x")
    store.put("keep", b"y")
    batches = count_calls(store, "DeleteObjects")
    assert store.delete_prefix("old/") == 7
    assert batches[0] == 3  # 3 + 3 + 1
    assert [o.key for o in store.list()] == ["keep"]


def test_s3_root_prefix_isolates_stores(s3_server: S3Server) -> None:
    bucket = s3_server.make_bucket()
    a = s3_store(s3_server, bucket, prefix="ckpt")
    b = s3_store(s3_server, bucket, prefix="/ckpt2/")
    whole = s3_store(s3_server, bucket, prefix="")
    a.put("x", b"a")
    b.put("x", b"b")
    assert a.uri == f"s3://{bucket}/ckpt" and b.uri == f"s3://{bucket}/ckpt2"
    assert [o.key for o in a.list()] == ["x"]
    assert a.get("x") == b"a" and b.get("x") == b"b"
    assert [o.key for o in whole.list()] == ["ckpt/x", "ckpt2/x"]
    assert a.delete_prefix("") == 1
    assert [o.key for o in whole.list()] == ["ckpt2/x"]


def test_s3_check_missing_bucket(s3_server: S3Server) -> None:
    store = s3_store(s3_server, "no-such-bucket-shoal", max_attempts=1, op_attempts=1)
    start = time.monotonic()
    with pytest.raises(StoreError) as info:
        store.check()
    message = str(info.value)
    assert "bucket 'no-such-bucket-shoal' does not exist" in message
    assert s3_server.endpoint in message
    assert time.monotonic() - start < 5


def test_s3_check_unreachable_endpoint(s3_server: S3Server) -> None:
    # s3_server only for its fake credentials: without any, signing fails before connecting.
    endpoint = f"http://127.0.0.1:{closed_port()}"
    store = s3_store(endpoint, "any-bucket", max_attempts=1, op_attempts=1, connect_timeout=1.0)
    start = time.monotonic()
    with pytest.raises(StoreError) as info:
        store.check()
    assert "cannot reach S3 endpoint" in str(info.value)
    assert endpoint in str(info.value)
    assert time.monotonic() - start < 5


def test_s3_check_without_credentials(
    s3_server: S3Server,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    # Point the shared files somewhere empty so a developer's ~/.aws is not found.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    store = s3_store(s3_server, max_attempts=1)
    with pytest.raises(StoreError, match="no usable AWS credentials.*AWS_ACCESS_KEY_ID"):
        store.check()


def test_s3_error_messages_for_denied_and_bad_credentials() -> None:
    # moto does not enforce auth, so these go through the translation directly,
    # with the errors exactly as botocore builds them from S3's responses.
    from botocore.exceptions import ClientError

    store = S3Store("bkt", "p", endpoint_url="http://127.0.0.1:1", region=REGION)

    def error(code: str, status: int, op: str = "GetObject") -> ClientError:
        return ClientError(
            {
                "Error": {"Code": code, "Message": "m"},
                "ResponseMetadata": {"HTTPStatusCode": status},
            },
            op,
        )

    denied = str(store._describe(error("403", 403, "HeadBucket")))
    assert "access denied to s3://bkt/p" in denied
    assert "AWS_ACCESS_KEY_ID" in denied and "policy" in denied  # a bare 403 could be either
    denied = str(store._describe(error("AccessDenied", 403, "PutObject"), key="k"))
    assert "access denied to s3://bkt/p/k" in denied and "s3:PutObject" in denied
    bad = str(store._describe(error("InvalidAccessKeyId", 403), key="k"))
    assert "rejected the credentials for s3://bkt/p/k" in bad and "AWS_ACCESS_KEY_ID" in bad
    region = ClientError(
        {
            "Error": {"Code": "301", "Message": ""},
            "ResponseMetadata": {
                "HTTPStatusCode": 301,
                "HTTPHeaders": {"x-amz-bucket-region": "eu-west-1"},
            },
        },
        "HeadBucket",
    )
    assert "storage.region=eu-west-1" in str(store._describe(region))
    assert str(store._describe(error("NoSuchKey", 404), key="k")) == "s3://bkt/p/k does not exist"


def test_s3_store_pickles_and_works_after_unpickling(s3_server: S3Server) -> None:
    store = s3_store(s3_server)
    fresh = pickle.loads(pickle.dumps(store))  # before any client exists
    store.put("a", b"1")  # now the original has a live client...
    clone = pickle.loads(pickle.dumps(store))  # ...which must not travel
    assert clone._client_obj is None
    assert clone.get("a") == b"1"
    fresh.put("b", b"2")
    assert store.get("b") == b"2"
    assert clone.uri == store.uri and clone.multipart_threshold == store.multipart_threshold


def test_open_store_dispatch(tmp_path: Path, s3_server: S3Server) -> None:
    local = open_store(f"file://{tmp_path}/ckpt")
    assert isinstance(local, LocalStore) and local.root == (tmp_path / "ckpt").resolve()
    assert isinstance(open_store(str(tmp_path / "plain")), LocalStore)

    bucket = s3_server.make_bucket()
    s3 = open_store(
        f"s3://{bucket}/runs/x",
        endpoint_url=s3_server.endpoint,
        region=None,  # None means "default", as a config's null does
        path_style=True,
        max_attempts=2,
    )
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.uri) == (bucket, "runs/x/", f"s3://{bucket}/runs/x")
    s3.put("k", b"v")
    assert s3.get("k") == b"v"

    with pytest.raises(StoreError, match="unknown S3 store option.*endpoint"):
        open_store(f"s3://{bucket}/x", endpoint="http://typo")
    with pytest.raises(StoreError, match="bucket"):
        open_store("s3:///no-bucket")
    with pytest.raises(StoreError, match="scheme"):
        open_store("gs://bucket/x")


class MemoryStore(ObjectStore):
    """A whole store in a dict: what a third-party backend registered by scheme looks like."""

    def __init__(self, uri: str, **options: Any):
        self.uri = uri
        self.options = options
        self.objects: dict[str, bytes] = {}

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        self.objects[key] = bytes(data)

    def get(self, key: str) -> bytes:
        if key not in self.objects:
            raise StoreError(f"{self.uri}/{key} does not exist")
        return self.objects[key]

    def get_range(self, key: str, start: int, end: int) -> bytes:
        return self.get(key)[start:end]

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        return [
            ObjectInfo(k, len(v), 0.0)
            for k, v in sorted(self.objects.items())
            if k.startswith(prefix)
        ]

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)


def test_a_registered_scheme_opens_and_an_unknown_one_names_the_known(tmp_path: Path) -> None:
    register_scheme("mem", MemoryStore)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_scheme("mem", MemoryStore)
        store = open_store("mem://bucket/x", endpoint_url="http://e")
        assert isinstance(store, MemoryStore) and store.options == {"endpoint_url": "http://e"}
        store.check()  # the ObjectStore contract's own round trip works on the new backend
        assert "mem" in known_schemes()
        # By "module:name", imported on first use, as the S3 backend is.
        register_scheme("mem2", "tests.test_object_store:MemoryStore")
        assert isinstance(open_store("mem2://b"), MemoryStore)
        register_scheme("broken", "tests.no_such_module:Store")
        with pytest.raises(StoreError, match=r"broken://.*cannot be loaded.*no_such_module"):
            open_store("broken://b")
    finally:
        for scheme in ("mem", "mem2", "broken"):
            unregister_scheme(scheme)
    with pytest.raises(StoreError, match=r"scheme 'mem' .*known schemes are file://, s3://$"):
        open_store("mem://bucket/x")
    with pytest.raises(ValueError, match="package.module:name"):
        register_scheme("bad", "storage.s3_store.S3Store")


def test_no_import_cycle_and_boto3_only_when_s3_is_used() -> None:
    # Either module can be imported first; opening a local store loads neither
    # the S3 backend nor boto3.
    code = (
        "import sys\n"
        "import storage.s3_store, storage.object_store\n"
        "for m in [m for m in sys.modules if m.startswith(('storage', 'boto'))]:\n"
        "    del sys.modules[m]\n"
        "from storage.object_store import open_store\n"
        "open_store('file:///tmp/shoal-no-cycle')\n"
        "assert 'storage.s3_store' not in sys.modules and 'boto3' not in sys.modules\n"
        "store = open_store('s3://b/p', endpoint_url='http://127.0.0.1:1')\n"
        "assert type(store).__module__ == 'storage.s3_store'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, check=True)


# -- the retry helper ----------------------------------------------------------------


def test_retry_retries_transient_errors_with_growing_jittered_delays() -> None:
    from botocore.exceptions import ResponseStreamingError

    failures = [ResponseStreamingError(error="connection reset")] * 3
    sleeps: list[float] = []

    def flaky() -> str:
        if failures:
            raise failures.pop()
        return "ok"

    assert retry(flaky, attempts=4, base_delay=1.0, sleep=sleeps.append) == "ok"
    assert len(sleeps) == 3
    assert all(0 <= s <= bound for s, bound in zip(sleeps, [1.0, 2.0, 4.0], strict=True))


def test_retry_gives_up_and_does_not_retry_permanent_errors() -> None:
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    calls = []

    def always(exc: Exception) -> None:
        calls.append(1)
        raise exc

    with pytest.raises(ReadTimeoutError):
        retry(lambda: always(ReadTimeoutError(endpoint_url="u")), 3, 0.0, sleep=lambda _: None)
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(EndpointConnectionError):
        retry(lambda: always(EndpointConnectionError(endpoint_url="u")), 3, 0.0)
    assert len(calls) == 1  # botocore already retried connecting; report it now
    calls.clear()
    with pytest.raises(KeyError):
        retry(lambda: always(KeyError("bug")), 3, 0.0)
    assert len(calls) == 1
    assert not is_transient(ValueError())


def test_invalid_options_are_store_errors() -> None:
    with pytest.raises(StoreError, match="minimum part size"):
        S3Store("b", multipart_chunk_mb=1)
    with pytest.raises(StoreError, match="list_page_size"):
        S3Store("b", list_page_size=5000)
    with pytest.raises(StoreError, match="retry_mode"):
        S3Store("b", retry_mode="sometimes")


def test_store_is_usable_from_many_threads_before_first_use(s3_server: S3Server) -> None:
    # The client is created lazily; many threads racing to create it must share one.
    store = s3_store(s3_server)
    barrier = threading.Barrier(4)

    def first_use(i: int) -> Any:
        barrier.wait()
        store.put(f"k{i}", b"v")
        return store._client

    with ThreadPoolExecutor(max_workers=4) as pool:
        clients = list(pool.map(first_use, range(4)))
    assert all(c is clients[0] for c in clients)
