"""Where checkpoint bytes live: a small object-store interface and its backends.

Keys are ``/``-separated paths relative to the store's root URI. A ``put`` is
atomic: a reader sees the whole object or none of it, never a prefix, which
is what makes "manifest written last" a commit.

Backends: ``file://`` (local or shared file system, the default) here;
``s3://bucket/prefix`` in ``storage/s3_store.py``. ``open_store(uri)`` picks one.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse


class StoreError(RuntimeError):
    """The store is unreachable, misconfigured, or an object is missing."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch


class ObjectStore(ABC):
    """put/get/list/delete over keys under one root URI."""

    uri: str

    @abstractmethod
    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Write an object atomically (all or nothing), replacing any previous one."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Read a whole object; ``StoreError`` if it does not exist."""

    @abstractmethod
    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Read bytes ``[start, end)`` of an object."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix``, sorted by key."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; removing a missing one is not an error."""

    def exists(self, key: str) -> bool:
        return any(o.key == key for o in self.list(key))

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix``; returns how many were removed."""
        objects = self.list(prefix)
        for o in objects:
            self.delete(o.key)
        return len(objects)

    def check(self) -> None:
        """Fail now, with a clear message, if the store cannot be written and read back."""
        # A unique key: several workers may check the same store at once.
        key = f".shoal-write-check-{uuid.uuid4().hex}"
        try:
            self.put(key, b"ok")
            if self.get(key) != b"ok":
                raise StoreError(f"{self.uri}: read back different bytes than written")
            self.delete(key)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - turn any backend error into one clear message
            raise StoreError(f"cannot write to {self.uri}: {e}") from e


class LocalStore(ObjectStore):
    """Objects as files under a directory; atomic puts via write-to-temp + rename."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents and path != self.root:
            raise StoreError(f"key {key!r} escapes the store root {self.root}")
        return path

    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        path = self._path(key)
        for attempt in range(3):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd, tmp = tempfile.mkstemp(
                    dir=path.parent, prefix=f".{path.name}.", suffix=".partial"
                )
                break
            except FileNotFoundError:
                # A concurrent delete() pruned the (then empty) folder; make it again.
                if attempt == 2:
                    raise
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            # fsync the folder too, or the rename (a commit, for manifests) may
            # not survive a power loss.
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as e:
            raise StoreError(f"{self.uri}/{key} does not exist") from e

    def get_range(self, key: str, start: int, end: int) -> bytes:
        if start < 0 or end < start:
            raise ValueError(f"bad byte range [{start}, {end})")
        try:
            with open(self._path(key), "rb") as f:
                f.seek(start)
                return f.read(end - start)
        except FileNotFoundError as e:
            raise StoreError(f"{self.uri}/{key} does not exist") from e

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        if not self.root.exists():
            return []
        out = []
        for path in self.root.rglob("*"):
            if not path.is_file() or path.name.endswith(".partial"):
                continue
            key = path.relative_to(self.root).as_posix()
            if key.startswith(prefix):
                st = path.stat()
                out.append(ObjectInfo(key, st.st_size, st.st_mtime))
        return sorted(out, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Drop directories left empty, up to the root, so listings stay clean.
        parent = path.parent
        while parent != self.root and parent.exists() and not any(parent.iterdir()):
            try:
                parent.rmdir()
            except OSError:  # a concurrent put() just wrote into it: keep it
                break
            parent = parent.parent


def open_store(uri: str, **options: object) -> ObjectStore:
    """The store for ``uri``: ``file:///abs/path``, a plain path, or ``s3://bucket/prefix``.

    ``options`` go to the backend (for S3: ``endpoint_url``, ``region``,
    ``path_style``, retry settings).
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else uri
        if parsed.scheme == "file" and parsed.netloc:
            # file://relative/dir is a common slip; treat the netloc as the first path part.
            path = parsed.netloc + parsed.path
        return LocalStore(path)
    if parsed.scheme == "s3":
        from storage.s3_store import S3Store  # boto3 is only imported when S3 is used

        return S3Store.from_uri(uri, **options)
    raise StoreError(
        f"unsupported checkpoint URI scheme {parsed.scheme!r} in {uri!r}: use file:// or s3://"
    )
