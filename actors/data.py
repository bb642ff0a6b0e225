"""Byte-level text corpora and the deterministic global-batch sampler.

A dataset is any callable (a Hydra ``_target_``) that returns a
``ByteCorpus``. The batch for step ``s`` is a pure function of
``(seed, s)``: the same global batches whatever the number of workers, and
the "data position" of a checkpoint is just the step number.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

VOCAB_SIZE = 256  # bytes


@dataclass(frozen=True)
class ByteCorpus:
    """A text as a 1-D array of byte tokens, with the name of where it came from."""

    tokens: np.ndarray  # uint8[N]
    source: str

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def fingerprint(self) -> str:
        """A short hash of the tokens, recorded in checkpoints to catch data mix-ups on resume."""
        return hashlib.sha256(self.tokens.tobytes()).hexdigest()[:16]

    @staticmethod
    def decode(ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    @staticmethod
    def encode(text: str) -> list[int]:
        return list(text.encode("utf-8"))


def stdlib_text(max_bytes: int = 4_000_000) -> ByteCorpus:
    """Python source from this interpreter's standard library: real text on every machine.

    Files are taken in sorted path order (tests and site-packages skipped)
    until ``max_bytes``, so the corpus is the same on every machine with the
    same Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("test", "tests", "site-packages", "idlelib", "lib2to3") for p in rel):
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise FileNotFoundError(f"no Python source files found under {root}")
    tokens = np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8).copy()
    return ByteCorpus(tokens, f"Python {sysconfig.get_python_version()} stdlib ({root})")


def text_file(path: str, max_bytes: int | None = None) -> ByteCorpus:
    """The bytes of a user's text file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data.path: file {str(p)!r} does not exist")
    data = p.read_bytes() if max_bytes is None else p.read_bytes()[:max_bytes]
    return ByteCorpus(np.frombuffer(data, dtype=np.uint8).copy(), str(p.resolve()))


def batch_offsets(
    seed: int, step: int, global_batch: int, n_tokens: int, seq_len: int
) -> np.ndarray:
    """Start offsets of the ``global_batch`` windows of step ``step`` (pure function)."""
    high = n_tokens - seq_len - 1
    if high <= 0:
        raise ValueError(
            f"the corpus has {n_tokens} tokens, fewer than model.seq_len+1 = {seq_len + 1}"
        )
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, high, size=global_batch, dtype=np.int64)


def make_batch(
    tokens: np.ndarray, offsets: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``x[B, T]`` and next-token targets ``y[B, T]`` for windows starting at ``offsets``."""
    idx = offsets[:, None] + np.arange(seq_len + 1)[None, :]
    window = torch.from_numpy(tokens[idx].astype(np.int64))
    return window[:, :-1], window[:, 1:]
