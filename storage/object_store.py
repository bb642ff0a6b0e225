"""Where checkpoint bytes live: a small object-store interface and its backends.

Keys are ``/``-separated paths relative to the store's root URI. A ``put`` is
atomic: a reader sees the whole object or none of it, never a prefix, which
is what makes "manifest written last" a commit.

Backends: ``file://`` (local or shared file system, the default) here;
``s3://bucket/prefix`` in ``storage/s3_store.py``. ``open_store(uri)`` picks
one by the URI's scheme from a registry (:func:`register_scheme`). A backend
may be registered by a ``"module:attribute"`` path, imported on first use: S3
is registered that way, so this module never imports ``storage.s3_store``
(which imports this one) and boto3 is loaded only when S3 is used.
"""

from __future__ import annotations

import importlib
import os
import tempfile
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
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


# -- the scheme registry ---------------------------------------------------------

# What opens a store: ``factory(uri, **options)``.
StoreFactory = Callable[..., ObjectStore]

# scheme -> a factory, or the "module:attribute" path of one (resolved on first use).
_SCHEMES: dict[str, StoreFactory | str] = {}
_SCHEMES_LOCK = threading.Lock()


def register_scheme(scheme: str, factory: StoreFactory | str, *, replace: bool = False) -> None:
    """Make ``open_store`` open ``<scheme>://...`` URIs with ``factory(uri, **options)``.

    ``factory`` is a callable, or a ``"package.module:name"`` path to one
    (``name`` may be dotted, e.g. ``"storage.s3_store:S3Store.from_uri"``),
    imported only when a URI of that scheme is first opened -- so a backend's
    module and dependencies cost nothing to jobs that do not use it.
    Registering a scheme that is already known is a ``ValueError`` unless
    ``replace`` is set.
    """
    scheme = scheme.lower()
    if not scheme or not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        raise ValueError(f"invalid URI scheme {scheme!r}")
    if isinstance(factory, str) and factory.count(":") != 1:
        raise ValueError(f"factory path {factory!r} must look like 'package.module:name'")
    with _SCHEMES_LOCK:
        if scheme in _SCHEMES and not replace:
            raise ValueError(f"URI scheme {scheme!r} is already registered")
        _SCHEMES[scheme] = factory


def unregister_scheme(scheme: str) -> None:
    """Forget ``scheme`` (tests use this to undo a registration); unknown ones are ignored."""
    with _SCHEMES_LOCK:
        _SCHEMES.pop(scheme.lower(), None)


def known_schemes() -> list[str]:
    """The registered URI schemes, sorted."""
    with _SCHEMES_LOCK:
        return sorted(_SCHEMES)


def _factory(scheme: str) -> StoreFactory | None:
    """The factory for ``scheme``, importing it on first use; None if the scheme is unknown."""
    with _SCHEMES_LOCK:
        entry = _SCHEMES.get(scheme)
    if entry is None or callable(entry):
        return entry
    module_name, _, attr = entry.partition(":")
    try:
        target: object = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as e:
        raise StoreError(f"the backend for {scheme}:// URIs ({entry}) cannot be loaded: {e}") from e
    if not callable(target):
        raise StoreError(f"the backend for {scheme}:// URIs ({entry}) is not callable")
    with _SCHEMES_LOCK:
        if _SCHEMES.get(scheme) == entry:  # not re-registered meanwhile
            _SCHEMES[scheme] = target
    return target


def _open_local(uri: str, **options: object) -> LocalStore:
    """``file:///abs/path``, ``file://relative/dir`` or a plain path; ``options`` are ignored."""
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        return LocalStore(uri)
    # file://relative/dir is a common slip; treat the netloc as the first path part.
    return LocalStore(parsed.netloc + parsed.path)


register_scheme("file", _open_local)
register_scheme("s3", "storage.s3_store:S3Store.from_uri")


def open_store(uri: str, **options: object) -> ObjectStore:
    """The store for ``uri``: ``file:///abs/path``, a plain path, ``s3://bucket/prefix``,
    or any scheme added with :func:`register_scheme`.

    ``options`` go to the backend (for S3: ``endpoint_url``, ``region``,
    ``path_style``, retry settings; the local store ignores them).
    ``StoreError`` for an unknown scheme (naming the known ones) or a
    backend that cannot be loaded.
    """
    scheme = urlparse(uri).scheme.lower() or "file"
    factory = _factory(scheme)
    if factory is None:
        known = ", ".join(f"{s}://" for s in known_schemes())
        raise StoreError(
            f"unsupported checkpoint URI scheme {scheme!r} in {uri!r}: known schemes are {known}"
        )
    return factory(uri, **options)
