"""The S3 backend of :class:`storage.object_store.ObjectStore`, on boto3.

Works with AWS S3 and with S3-compatible servers (MinIO, Ceph RGW, moto's
server mode, ...): pass ``endpoint_url`` and, for most of those,
``path_style=True``.

Contracts (beyond the ones :class:`ObjectStore` states):

* Credentials come from boto3's usual chain (environment, ``AWS_PROFILE`` /
  ``profile``, shared files, container or instance roles). They are never
  stored on the object, so pickling an ``S3Store`` never pickles a secret.
* ``put`` is atomic: objects below ``multipart_threshold_mb`` go up in one
  ``PutObject``; larger ones as a multipart upload, which S3 makes visible
  only when it completes (a failed one is aborted by boto3's transfer manager).
* Every failure surfaces as :class:`StoreError` naming the ``s3://`` URI; a
  missing object, bucket, credentials or endpoint each get their own message.
* Retries happen in two layers, both with exponential backoff and jitter:

  1. botocore, per HTTP request (``retry_mode`` "standard" or "adaptive",
     ``max_attempts`` attempts in total): throttling (``SlowDown``, 503, ...),
     5xx, and connection errors. Each multipart part is retried on its own.
  2. :func:`retry`, around a whole operation (``op_attempts`` attempts):
     failures botocore cannot retry because they happen after it has handed
     back a response -- a body that breaks off or times out while being read.

  So one call makes at most ``op_attempts * max_attempts`` requests.
* Timeouts are explicit: ``connect_timeout`` for opening a connection and
  ``read_timeout`` for each socket read, in seconds, per attempt.
"""

from __future__ import annotations

import inspect
import io
import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlparse

from storage.object_store import ObjectInfo, ObjectStore, StoreError

T = TypeVar("T")

MiB = 1024 * 1024
# S3's limits: every part but the last must be at least 5 MiB, and one
# DeleteObjects call takes at most 1000 keys.
MIN_PART_BYTES = 5 * MiB
MAX_DELETE_BATCH = 1000
# check() at a job's start: a live S3 endpoint answers a HEAD in well under a
# second, so these only cut short the wait on a dead or silent one.
CHECK_CONNECT_TIMEOUT_S = 5.0
CHECK_READ_TIMEOUT_S = 10.0

# Error codes that mean "this object / bucket is not there". HEAD responses
# carry no body, so for them botocore reports the bare status code.
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}
_MISSING_BUCKET_CODES = {"NoSuchBucket"}
_BAD_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem"}
_WRONG_REGION_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "301"}


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying at the operation level (layer 2).

    True for a response body that broke off or timed out while being read,
    and for connections dropped mid-request. Not for errors S3 answered
    with (missing key, access denied, ...), and not for "cannot connect at
    all": botocore has already retried those, and an unreachable endpoint
    should be reported quickly rather than after another round of backoff.
    """
    from botocore import exceptions as bce
    from urllib3 import exceptions as u3e

    if isinstance(exc, bce.EndpointConnectionError | bce.ConnectTimeoutError):
        return False
    return isinstance(
        exc,
        bce.ResponseStreamingError
        | bce.IncompleteReadError
        | bce.ReadTimeoutError
        | bce.ConnectionClosedError
        | u3e.ProtocolError
        | u3e.ReadTimeoutError
        | ConnectionResetError
        | TimeoutError,
    )


def retry(
    fn: Callable[[], T],
    attempts: int,
    base_delay: float,
    *,
    max_delay: float = 20.0,
    retryable: Callable[[BaseException], bool] = is_transient,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` up to ``attempts`` times while it raises a ``retryable`` error.

    Before retry ``n`` (1-based) it sleeps a uniformly random time in
    ``[0, min(max_delay, base_delay * 2**(n-1))]`` ("full jitter"), so many
    workers hitting the same throttled prefix do not retry in lockstep. A
    non-retryable error, or the last attempt's error, propagates unchanged.
    ``fn`` must be safe to call again (every caller here is idempotent).
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:
            if attempt + 1 >= attempts or not retryable(e):
                raise
            sleep(random.uniform(0.0, min(max_delay, base_delay * 2**attempt)))
    raise AssertionError("unreachable")  # the loop returns or raises


class _MemoryReader(io.RawIOBase):
    """A seekable, read-only file over a buffer, without copying it.

    boto3's transfer manager wants a file object; ``io.BytesIO(memoryview)``
    would copy a multi-GB shard first. Seekable matters: botocore rewinds the
    body to retry a failed part.
    """

    def __init__(self, view: memoryview):
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        chunk = self._view[self._pos : self._pos + len(buffer)]
        n = len(chunk)
        memoryview(buffer).cast("B")[:n] = chunk
        self._pos += n
        return n


def _as_bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat byte view of ``data`` (e.g. a memoryview of a float tensor's buffer)."""
    view = memoryview(data)
    if view.format == "B" and view.ndim == 1:
        return view
    if view.c_contiguous:
        return view.cast("B")
    return memoryview(view.tobytes())  # non-contiguous: one copy is unavoidable


class S3Store(ObjectStore):
    """Objects under ``s3://bucket/prefix``; see the module docstring for contracts.

    Args:
        bucket: bucket name.
        prefix: key prefix acting as the store root ("" for the whole bucket).
        endpoint_url: an S3-compatible endpoint such as ``http://127.0.0.1:9000``;
            None for AWS (or ``AWS_ENDPOINT_URL`` / the profile's setting).
        region: region name; None for the credential chain's default.
        path_style: address buckets as ``endpoint/bucket/key`` instead of
            ``bucket.endpoint/key``; needed by most S3-compatible servers.
        profile: a named profile from the shared AWS config files.
        max_attempts: botocore's attempts per HTTP request, first one included.
        retry_mode: botocore retry mode, "standard" or "adaptive" (adds a
            client-side rate limiter that slows down on throttling).
        op_attempts: attempts per operation for errors botocore cannot retry.
        base_delay: first backoff bound of :func:`retry`, seconds.
        connect_timeout: seconds to open a connection, per attempt.
        read_timeout: seconds a socket read may wait, per attempt.
        multipart_threshold_mb: objects at least this big (MiB) go multipart.
        multipart_chunk_mb: part size (MiB, >= 5); boto3 raises it if an
            object would otherwise need more than 10,000 parts.
        multipart_concurrency: parts uploaded in parallel per object.
        max_pool_connections: HTTP connections kept per client (None: enough
            for ``multipart_concurrency`` plus a few callers).
        list_page_size: keys per ListObjectsV2 page (at most 1000).
        delete_batch_size: keys per DeleteObjects call (at most 1000).
        request_checksums: botocore's ``request_checksum_calculation``:
            "when_supported" (CRC checksums on uploads, the AWS default) or
            "when_required" for older S3-compatible servers that reject them.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool = False,
        profile: str | None = None,
        max_attempts: int = 5,
        retry_mode: str = "standard",
        op_attempts: int = 3,
        base_delay: float = 0.2,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        multipart_threshold_mb: float = 64,
        multipart_chunk_mb: float = 16,
        multipart_concurrency: int = 8,
        max_pool_connections: int | None = None,
        list_page_size: int = 1000,
        delete_batch_size: int = MAX_DELETE_BATCH,
        request_checksums: str = "when_supported",
    ):
        if not bucket:
            raise StoreError("S3 store needs a bucket name: use s3://bucket/prefix")
        if retry_mode not in ("standard", "adaptive"):
            raise StoreError(f"retry_mode must be 'standard' or 'adaptive', got {retry_mode!r}")
        if request_checksums not in ("when_supported", "when_required"):
            raise StoreError(
                "request_checksums must be 'when_supported' or 'when_required', "
                f"got {request_checksums!r}"
            )
        if max_attempts < 1 or op_attempts < 1:
            raise StoreError("max_attempts and op_attempts must be >= 1")
        if multipart_chunk_mb * MiB < MIN_PART_BYTES:
            raise StoreError("multipart_chunk_mb must be >= 5 (S3's minimum part size)")
        if not 1 <= list_page_size <= 1000:
            raise StoreError(f"list_page_size must be in [1, 1000], got {list_page_size}")
        if not 1 <= delete_batch_size <= MAX_DELETE_BATCH:
            raise StoreError(f"delete_batch_size must be in [1, 1000], got {delete_batch_size}")
        self.bucket = bucket
        # The root is a "directory": s3://b/ckpt must not see s3://b/ckpt2/x.
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self.path_style = path_style
        self.profile = profile
        self.max_attempts = max_attempts
        self.retry_mode = retry_mode
        self.op_attempts = op_attempts
        self.base_delay = base_delay
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.multipart_threshold = int(multipart_threshold_mb * MiB)
        self.multipart_chunk = int(multipart_chunk_mb * MiB)
        self.multipart_concurrency = multipart_concurrency
        self.max_pool_connections = max_pool_connections or max(10, multipart_concurrency + 4)
        self.list_page_size = list_page_size
        self.delete_batch_size = delete_batch_size
        self.request_checksums = request_checksums
        self._client_lock = threading.Lock()
        self._client_obj: Any = None

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> S3Store:
        """The store for ``s3://bucket/prefix``; ``options`` are the constructor's keywords.

        Options whose value is None are dropped, so a config's ``endpoint_url:
        null`` means "the default". An unknown option is a ``StoreError``
        listing the valid ones.
        """
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StoreError(f"not an S3 URI: {uri!r}; expected s3://bucket/prefix")
        allowed = [
            name
            for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise StoreError(f"unknown S3 store option(s) {unknown}; valid: {', '.join(allowed)}")
        kwargs = {k: v for k, v in options.items() if v is not None}
        return cls(parsed.netloc, parsed.path, **kwargs)

    # -- the client: created lazily, dropped on pickling -----------------------------

    def __getstate__(self) -> dict[str, Any]:
        # boto3 clients and locks do not pickle; Ray ships stores to actors.
        state = self.__dict__.copy()
        state["_client_obj"] = None
        del state["_client_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._client_lock = threading.Lock()

    @property
    def _client(self) -> Any:
        """The boto3 S3 client, created on first use (thread-safe; clients are)."""
        if self._client_obj is None:
            with self._client_lock:
                if self._client_obj is None:
                    self._client_obj = self._make_client()
        return self._client_obj

    def _make_client(
        self,
        *,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        max_attempts: int | None = None,
    ) -> Any:
        """A new client; timeouts and attempts default to the store's settings."""
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError

        attempts = max_attempts or self.max_attempts
        config = Config(
            region_name=self.region,
            connect_timeout=connect_timeout or self.connect_timeout,
            read_timeout=read_timeout or self.read_timeout,
            retries={"total_max_attempts": attempts, "mode": self.retry_mode},
            s3={"addressing_style": "path" if self.path_style else "auto"},
            max_pool_connections=self.max_pool_connections,
            request_checksum_calculation=self.request_checksums,
            response_checksum_validation="when_supported",
        )
        try:
            # A private session: boto3's default session is not thread-safe.
            session = boto3.session.Session(profile_name=self.profile, region_name=self.region)
            return session.client("s3", endpoint_url=self.endpoint_url, config=config)
        except (BotoCoreError, ValueError) as e:
            raise StoreError(f"cannot set up an S3 client for {self.uri}: {e}") from e

    @property
    def endpoint(self) -> str:
        """The endpoint requests go to, for messages."""
        if self._client_obj is not None:
            return str(self._client_obj.meta.endpoint_url)
        return self.endpoint_url or "the default AWS endpoint"

    # -- keys and errors -------------------------------------------------------------

    def _key(self, key: str) -> str:
        # Same keys LocalStore accepts as staying inside its root; "." and ".."
        # would be literal (and confusing) in S3, so they are refused outright.
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise StoreError(f"invalid key {key!r} for {self.uri}: use 'a/b/c' relative keys")
        return self.prefix + key

    def _describe(
        self, exc: BaseException, key: str | None = None, *, attempts: int | None = None
    ) -> StoreError:
        """One clear ``StoreError`` for a botocore error, saying what to do about it.

        ``attempts``: how many requests were made, if not the store's ``max_attempts``.
        """
        from botocore import exceptions as bce

        where = f"{self.uri}/{key}" if key is not None else self.uri
        endpoint = self.endpoint
        if isinstance(exc, bce.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            msg = err.get("Message") or code
            if code in _MISSING_BUCKET_CODES or (key is None and code in ("404", "NotFound")):
                return StoreError(
                    f"bucket '{self.bucket}' does not exist at endpoint {endpoint}: create it "
                    f"(aws s3 mb s3://{self.bucket}) or fix checkpoint.uri / storage.endpoint_url"
                )
            if key is not None and code in _MISSING_KEY_CODES:
                return StoreError(f"{where} does not exist")
            if code in _BAD_CREDENTIAL_CODES:
                return StoreError(
                    f"S3 rejected the credentials for {where} at {endpoint} ({code}: {msg}): "
                    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or "
                    "AWS_PROFILE, and refresh expired session tokens"
                )
            if code == "403":
                # A HEAD answer has no body: wrong keys and missing permissions look alike.
                return StoreError(
                    f"access denied to {where} at {endpoint}: either the credentials are "
                    "wrong (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN "
                    "or AWS_PROFILE) or they lack permission on bucket "
                    f"'{self.bucket}' (check the IAM / bucket policy)"
                )
            if code in _DENIED_CODES:
                return StoreError(
                    f"access denied to {where} at {endpoint}: the credentials in use lack "
                    "permission (s3:GetObject, s3:PutObject, s3:ListBucket, s3:DeleteObject on "
                    f"bucket '{self.bucket}'); check the IAM / bucket policy or AWS_PROFILE"
                )
            if code in _WRONG_REGION_CODES:
                headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
                actual = headers.get("x-amz-bucket-region") or err.get("Region")
                hint = f"set storage.region={actual}" if actual else "set storage.region"
                return StoreError(
                    f"bucket '{self.bucket}' is in another region than {self.region!r} "
                    f"at {endpoint}: {hint}"
                )
            return StoreError(f"S3 error on {where} at {endpoint}: {code} (HTTP {status}): {msg}")
        if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
            return StoreError(
                f"no usable AWS credentials for {self.uri}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance / pod role"
            )
        if isinstance(exc, bce.EndpointConnectionError | bce.ConnectTimeoutError):
            return StoreError(
                f"cannot reach S3 endpoint {endpoint} for {self.uri} after "
                f"{attempts or self.max_attempts} attempt(s) ({exc}): check "
                "storage.endpoint_url, that the server is running, and the network / proxy "
                "settings"
            )
        return StoreError(f"S3 request for {where} at {endpoint} failed: {exc}")

    def _call(self, what: Callable[[], T], key: str | None = None) -> T:
        """Run an operation with layer-2 retries, translating any failure to ``StoreError``."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return retry(what, self.op_attempts, self.base_delay)
        except StoreError:
            raise
        except (BotoCoreError, ClientError) as e:
            raise self._describe(e, key) from e
        except Boto3Error as e:  # the transfer manager's own failures
            where = f"{self.uri}/{key}" if key is not None else self.uri
            raise StoreError(f"S3 transfer for {where} at {self.endpoint} failed: {e}") from e
        except OSError as e:  # e.g. a socket error surfacing raw while reading a body
            where = f"{self.uri}/{key}" if key is not None else self.uri
            raise StoreError(f"S3 request for {where} at {self.endpoint} failed: {e}") from e

    # -- the ObjectStore interface ---------------------------------------------------

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Upload atomically; multipart (in parallel parts) at or above the threshold."""
        full = self._key(key)
        view = _as_bytes_view(data)

        def single() -> None:
            # bytes(view) copies, but only objects below the threshold get here.
            self._client.put_object(Bucket=self.bucket, Key=full, Body=bytes(view))

        def multipart() -> None:
            from boto3.s3.transfer import TransferConfig

            config = TransferConfig(
                multipart_threshold=self.multipart_threshold,
                multipart_chunksize=self.multipart_chunk,
                max_concurrency=self.multipart_concurrency,
                use_threads=self.multipart_concurrency > 1,
            )
            self._client.upload_fileobj(_MemoryReader(view), self.bucket, full, Config=config)

        self._call(single if len(view) < self.multipart_threshold else multipart, key)

    def get(self, key: str) -> bytes:
        full = self._key(key)

        def fetch() -> bytes:
            # botocore checks the body against Content-Length while reading, so a
            # short body raises (and is retried) instead of returning truncated.
            resp = self._client.get_object(Bucket=self.bucket, Key=full)
            return resp["Body"].read()

        return self._call(fetch, key)

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``; like a file read, shorter if the object ends first.

        ``ValueError`` if ``start < 0`` or ``end < start``; ``StoreError`` if
        the object does not exist (also when the range is empty).
        """
        if start < 0 or end < start:
            raise ValueError(f"invalid range [{start}, {end}) for {self.uri}/{key}")
        full = self._key(key)
        if end == start:
            # "bytes=5-4" is not a valid range and S3 would answer with the whole
            # object; still fail on a missing key, like a ranged read would.
            if not self.exists(key):
                raise StoreError(f"{self.uri}/{key} does not exist")
            return b""

        def fetch() -> bytes:
            from botocore.exceptions import ClientError

            try:
                resp = self._client.get_object(
                    Bucket=self.bucket, Key=full, Range=f"bytes={start}-{end - 1}"
                )
            except ClientError as e:
                # 416: the range starts at or past the end -- the object exists
                # and has nothing there, which a file read reports as b"".
                if e.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b""
                raise
            return resp["Body"].read()

        return self._call(fetch, key)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects under ``prefix``, sorted by key; paginates ``list_page_size`` keys a call."""

        def fetch() -> list[ObjectInfo]:
            paginator = self._client.get_paginator("list_objects_v2")
            pages = paginator.paginate(
                Bucket=self.bucket,
                Prefix=self.prefix + prefix,
                PaginationConfig={"PageSize": self.list_page_size},
            )
            out = []
            for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix) :]
                    # Zero-byte "dir/" markers made by consoles and some tools are
                    # not objects a LocalStore could hold; hide them.
                    if not key or key.endswith("/"):
                        continue
                    out.append(ObjectInfo(key, obj["Size"], obj["LastModified"].timestamp()))
            return sorted(out, key=lambda o: o.key)

        return self._call(fetch)

    def exists(self, key: str) -> bool:
        """One HEAD request, instead of the base class's listing."""
        from botocore.exceptions import ClientError

        full = self._key(key)

        def head() -> bool:
            try:
                self._client.head_object(Bucket=self.bucket, Key=full)
                return True
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code")) in _MISSING_KEY_CODES:
                    return False
                raise

        return self._call(head, key)

    def delete(self, key: str) -> None:
        """Remove one object; S3 itself treats a missing one as deleted."""
        full = self._key(key)
        self._call(lambda: self._client.delete_object(Bucket=self.bucket, Key=full), key)

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix`` with batched DeleteObjects calls.

        Returns how many were removed. Objects written under ``prefix`` while
        this runs may survive. ``StoreError`` names the keys S3 refused.
        """
        keys = [self.prefix + o.key for o in self.list(prefix)]
        for i in range(0, len(keys), self.delete_batch_size):
            batch = keys[i : i + self.delete_batch_size]

            def delete_batch(batch: list[str] = batch) -> dict[str, Any]:
                return self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )

            resp = self._call(delete_batch)
            # DeleteObjects answers 200 even when some keys failed; they are listed here.
            errors = resp.get("Errors", [])
            if errors:
                shown = ", ".join(f"{e.get('Key')} ({e.get('Code')})" for e in errors[:5])
                raise StoreError(
                    f"could not delete {len(errors)} object(s) under {self.uri}/{prefix}: {shown}"
                )
        return len(keys)

    def check(self) -> None:
        """Fail now, with a message saying what to fix, if the store is unusable.

        Checks the bucket (exists, credentials accepted, reachable, right
        region) with one request of short timeouts (``CHECK_CONNECT_TIMEOUT_S``,
        ``CHECK_READ_TIMEOUT_S``, or the store's own if shorter), so a dead
        or silent endpoint fails in seconds, not after every retry. Then
        writes, reads back and deletes a uniquely named probe object under
        the root (unique so concurrent checks from many workers do not delete
        each other's probe), with the store's usual retries.
        """
        self._check_bucket()
        probe = f".shoal-write-check-{uuid.uuid4().hex}"
        self.put(probe, b"ok")
        try:
            if self.get(probe) != b"ok":
                raise StoreError(f"{self.uri}: read back different bytes than written")
        finally:
            self.delete(probe)

    def _check_bucket(self) -> None:
        """One HeadBucket with short timeouts; ``StoreError`` saying what to check."""
        from botocore import exceptions as bce

        connect_s = min(self.connect_timeout, CHECK_CONNECT_TIMEOUT_S)
        read_s = min(self.read_timeout, CHECK_READ_TIMEOUT_S)
        client = self._make_client(connect_timeout=connect_s, read_timeout=read_s, max_attempts=1)
        try:
            client.head_bucket(Bucket=self.bucket)
        except bce.ReadTimeoutError as e:
            raise StoreError(
                f"S3 endpoint {client.meta.endpoint_url} accepted a connection for {self.uri} "
                f"but sent no answer within {read_s:g}s: check that storage.endpoint_url "
                "points at an S3 server (not another service) and that it is healthy, and "
                "the network / proxy settings"
            ) from e
        except (bce.BotoCoreError, bce.ClientError) as e:
            raise self._describe(e, attempts=1) from e

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint={self.endpoint_url!r})"
