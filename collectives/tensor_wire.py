"""Tensors to and from protobuf for peers outside the Ray cluster: raw bytes, never pickle.

A tensor travels as ``TensorChunk`` messages (collectives/volunteer.proto):
its name, dtype (a string from ``ALLOWED_DTYPES``), shape, a byte offset and
a slice of its raw little-endian bytes. A tensor larger than ``chunk_bytes``
is cut into several chunks, which arrive in order; ``pack_chunks`` groups
the chunks of a message into frames of at most ``chunk_bytes`` of data, so
no gRPC message grows past a few MiB however large the tensors are.

The receiving side is untrusted input handling. ``Assembler`` checks every
declaration against ``WireLimits`` *before* it allocates anything: the dtype
is on the allow-list, the shape has at most ``max_ndim`` non-negative dims,
the element count and byte size are within the per-tensor bounds, the sum of
declared sizes is within the per-message bound, and the number of tensors is
bounded. Each later chunk must repeat the declaration, continue exactly where
the previous one ended, and not overrun the declared size; memory grows with
the bytes that arrive, never ahead of them. Anything else is
a ``WireError`` whose ``kind`` says why (for counting rejections). Decoding
is ``torch.frombuffer`` over the received bytes: no code runs on data.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from collectives import volunteer_pb2 as pb

# The wire's dtype names and what they decode to: nothing else is accepted.
ALLOWED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAME_OF_DTYPE = {dtype: name for name, dtype in ALLOWED_DTYPES.items()}
MAX_NAME_CHARS = 200

if sys.byteorder != "little":  # the wire is little-endian and bytes are sent as they lie
    raise ImportError("collectives.tensor_wire supports little-endian hosts only")


class WireError(ValueError):
    """Received tensor data broke the wire's rules; ``kind`` names which (for counting)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # "dtype", "oversized", "malformed"


@dataclass(frozen=True, kw_only=True)
class WireLimits:
    """Bounds on received tensors, checked before allocating (see the module docstring)."""

    max_tensor_elements: int = 1 << 26
    max_tensor_bytes: int = 64 << 20
    max_message_bytes: int = 128 << 20
    max_tensors: int = 256
    max_ndim: int = 8
    chunk_bytes: int = 2 << 20  # tensor bytes per chunk and per frame

    def __post_init__(self) -> None:
        for name in ("max_tensor_elements", "max_tensor_bytes", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"WireLimits.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tensors < 1 or self.max_ndim < 0 or self.chunk_bytes < 1024:
            raise ValueError(
                "WireLimits: max_tensors must be >= 1, max_ndim >= 0 and chunk_bytes >= 1024, "
                f"got {self.max_tensors}, {self.max_ndim}, {self.chunk_bytes}"
            )


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of ``dtype``; ValueError for one not on the allow-list."""
    try:
        return _NAME_OF_DTYPE[dtype]
    except KeyError:
        raise ValueError(
            f"dtype {dtype} cannot travel to volunteers; allowed: {sorted(ALLOWED_DTYPES)}"
        ) from None


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_ELEMENT_SIZE = {name: _element_size(dtype) for name, dtype in ALLOWED_DTYPES.items()}


def check_tensors(tensors: Mapping[str, torch.Tensor], limits: WireLimits) -> int:
    """Check tensors about to be sent against ``limits``; returns their total bytes.

    Raises ValueError (not WireError: this is the sender's own mistake).
    """
    if len(tensors) > limits.max_tensors:
        raise ValueError(f"{len(tensors)} tensors, more than max_tensors={limits.max_tensors}")
    total = 0
    for name, t in tensors.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            raise ValueError(f"tensor names must be 1..{MAX_NAME_CHARS} characters: {name!r}")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name!r} is a {type(t).__name__}, not a torch.Tensor")
        dtype_name(t.dtype)
        if t.dim() > limits.max_ndim:
            raise ValueError(f"{name!r} has {t.dim()} dims, more than max_ndim={limits.max_ndim}")
        nbytes = t.numel() * t.element_size()
        if t.numel() > limits.max_tensor_elements or nbytes > limits.max_tensor_bytes:
            raise ValueError(
                f"{name!r} has {t.numel()} elements ({nbytes} bytes), over the bound of "
                f"{limits.max_tensor_elements} elements / {limits.max_tensor_bytes} bytes"
            )
        total += nbytes
    if total > limits.max_message_bytes:
        raise ValueError(f"{total} tensor bytes, over max_message_bytes={limits.max_message_bytes}")
    return total


def tensor_chunks(name: str, tensor: torch.Tensor, chunk_bytes: int) -> Iterator[pb.TensorChunk]:
    """The chunks of one tensor: at most ``chunk_bytes`` of data each, at least one."""
    dname = dtype_name(tensor.dtype)
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    raw = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
    shape = list(tensor.shape)
    offset = 0
    while True:
        piece = raw[offset : offset + chunk_bytes]
        yield pb.TensorChunk(name=name, dtype=dname, shape=shape, offset=offset, data=bytes(piece))
        offset += len(piece)
        if offset >= len(raw):
            return


def pack_chunks(
    tensors: Mapping[str, torch.Tensor], chunk_bytes: int
) -> Iterator[list[pb.TensorChunk]]:
    """The chunks of all ``tensors``, grouped into frames of at most ``chunk_bytes`` of data.

    Yields at least one (possibly empty) group, so a message without tensors
    still has a frame.
    """
    group: list[pb.TensorChunk] = []
    size = 0
    for name, tensor in tensors.items():
        for chunk in tensor_chunks(name, tensor, chunk_bytes):
            if group and size + len(chunk.data) > chunk_bytes:
                yield group
                group, size = [], 0
            group.append(chunk)
            size += len(chunk.data)
    yield group


@dataclass
class _Partial:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int  # declared
    buffer: bytearray  # what has arrived: grows with the data, never ahead of it

    @property
    def received(self) -> int:
        return len(self.buffer)


class Assembler:
    """Reassembles one message's tensors from its chunks, checking ``limits`` first.

    Feed every chunk with ``add`` (in arrival order), then call ``finish``.
    Raises WireError at the first chunk that breaks a rule; the assembler is
    then unusable.
    """

    def __init__(self, limits: WireLimits):
        self.limits = limits
        self._partial: dict[str, _Partial] = {}
        self._declared = 0  # bytes declared by all tensors so far

    @property
    def declared_bytes(self) -> int:
        return self._declared

    def add(self, chunk: pb.TensorChunk) -> None:
        part = self._partial.get(chunk.name)
        if part is None:
            part = self._declare(chunk)
        elif chunk.dtype != part.dtype or tuple(chunk.shape) != part.shape:
            raise WireError(
                "malformed",
                f"tensor {chunk.name!r}: a chunk declares {chunk.dtype}{list(chunk.shape)}, "
                f"its first chunk {part.dtype}{list(part.shape)}",
            )
        n = len(chunk.data)
        if chunk.offset != part.received:
            raise WireError(
                "malformed",
                f"tensor {chunk.name!r}: chunk at offset {chunk.offset}, expected "
                f"{part.received} (chunks arrive in order, once)",
            )
        if n > part.nbytes - part.received:
            raise WireError(
                "oversized",
                f"tensor {chunk.name!r}: {part.received + n} bytes sent, {part.nbytes} declared",
            )
        part.buffer += chunk.data

    def _declare(self, chunk: pb.TensorChunk) -> _Partial:
        limits = self.limits
        name = chunk.name
        if not 0 < len(name) <= MAX_NAME_CHARS:
            raise WireError("malformed", f"tensor names must be 1..{MAX_NAME_CHARS} characters")
        if len(self._partial) >= limits.max_tensors:
            raise WireError("oversized", f"more than max_tensors={limits.max_tensors} tensors")
        if chunk.dtype not in ALLOWED_DTYPES:
            raise WireError(
                "dtype",
                f"tensor {name!r}: dtype {chunk.dtype[:40]!r} is not allowed "
                f"(allowed: {', '.join(ALLOWED_DTYPES)})",
            )
        shape = tuple(int(d) for d in chunk.shape)
        if len(shape) > limits.max_ndim or any(d < 0 for d in shape):
            raise WireError(
                "malformed",
                f"tensor {name!r}: shape {list(shape)[:16]} (at most {limits.max_ndim} "
                "dims, none negative)",
            )
        numel = math.prod(shape)  # Python ints: no overflow to hide a huge size
        nbytes = numel * _ELEMENT_SIZE[chunk.dtype]
        if numel > limits.max_tensor_elements or nbytes > limits.max_tensor_bytes:
            raise WireError(
                "oversized",
                f"tensor {name!r}: {chunk.dtype}{list(shape)} is {numel} elements / {nbytes} "
                f"bytes, over the bound of {limits.max_tensor_elements} elements / "
                f"{limits.max_tensor_bytes} bytes",
            )
        if self._declared + nbytes > limits.max_message_bytes:
            raise WireError(
                "oversized",
                f"tensor {name!r} brings the message to {self._declared + nbytes} bytes, "
                f"over max_message_bytes={limits.max_message_bytes}",
            )
        if chunk.offset != 0:
            raise WireError("malformed", f"tensor {name!r}: its first chunk is not at offset 0")
        # Only now, with every bound checked, is anything stored; and memory grows
        # with the bytes that actually arrive (rate-limited), not with a declaration.
        self._declared += nbytes
        part = _Partial(chunk.dtype, shape, nbytes, bytearray())
        self._partial[name] = part
        return part

    def finish(self) -> dict[str, torch.Tensor]:
        """The message's tensors; WireError if one is incomplete."""
        out: dict[str, torch.Tensor] = {}
        for name, part in self._partial.items():
            if part.received != part.nbytes:
                raise WireError(
                    "malformed", f"tensor {name!r}: {part.received} of {part.nbytes} bytes arrived"
                )
            dtype = ALLOWED_DTYPES[part.dtype]
            if part.buffer:
                out[name] = torch.frombuffer(part.buffer, dtype=dtype).reshape(part.shape)
            else:
                out[name] = torch.empty(part.shape, dtype=dtype)
        return out


def decode(chunks: Iterable[pb.TensorChunk], limits: WireLimits) -> dict[str, torch.Tensor]:
    """All tensors of a message whose chunks are at hand (see ``Assembler``)."""
    assembler = Assembler(limits)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()
