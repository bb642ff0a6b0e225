"""Text corpora for the ``lm`` task: ``data=stdlib_text`` and ``data=text_file``.

Each returns a ``TokenDataset`` (``actors/datasets.py``) whose global
batches are a pure function of ``(seed, step)``: byte tokens (vocabulary
256), or with ``data.tokenizer=bpe`` a byte-level BPE trained on the text
(``actors/tokenizer.py``).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np

from actors.datasets import DataFacts, TokenDataset

VOCAB_SIZE = 256  # bytes
BYTE_FACTS = DataFacts(vocab_size=VOCAB_SIZE)  # what a model of byte text is built for


def encode_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode_bytes(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def byte_corpus(data: bytes, source: str, doc_starts: np.ndarray | None = None) -> TokenDataset:
    """A text as byte tokens (vocabulary 256), decodable back to text."""
    tokens = np.frombuffer(data, dtype=np.uint8).copy()
    return TokenDataset(tokens, VOCAB_SIZE, source, decode_bytes, encode_bytes, doc_starts)


def stdlib_text(max_bytes: int = 4_000_000) -> TokenDataset:
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
    source = f"Python {sysconfig.get_python_version()} stdlib ({root})"
    starts = np.cumsum([0] + [len(c) for c in chunks[:-1]], dtype=np.int64)  # one per file
    return byte_corpus(b"".join(chunks)[:max_bytes], source, starts)


def text_file(
    path: str,
    max_bytes: int | None = None,
    tokenizer: str = "bytes",
    vocab_size: int = 4096,
    run_dir: str | None = None,
) -> TokenDataset:
    """A user's text file, as bytes or as the ids of a BPE trained on it.

    ``tokenizer="bpe"`` trains a byte-level BPE of ``vocab_size`` tokens at
    job start and saves it in ``run_dir`` (``actors/tokenizer.py``), so a
    resume reuses it; with ``run_dir=None`` it is trained and not saved.
    """
    if tokenizer not in ("bytes", "bpe"):
        raise ValueError(f"data.tokenizer must be 'bytes' or 'bpe', not {tokenizer!r}")
    if tokenizer == "bpe" and vocab_size < 257:
        raise ValueError(
            f"data.vocab_size must be >= 257 for data.tokenizer=bpe (256 byte symbols plus "
            f"merges), not {vocab_size}"
        )
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data.path: file {str(p)!r} does not exist")
    data = p.read_bytes() if max_bytes is None else p.read_bytes()[:max_bytes]
    if tokenizer == "bytes":
        return byte_corpus(data, str(p.resolve()))
    from actors.tokenizer import bpe_corpus  # imports `tokenizers` only when asked for

    return bpe_corpus(data, str(p.resolve()), vocab_size, run_dir)
