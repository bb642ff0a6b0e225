"""Byte-level BPE for ``data.tokenizer=bpe``, trained on the corpus at job start.

Byte-level (GPT-2 style): the 256 byte symbols are always in the vocabulary,
so any text encodes with no unknown token and decodes back exactly. The
tokenizer is trained with the ``tokenizers`` library (nothing is downloaded)
and saved as ``<run_dir>/tokenizer.json``, next to a sidecar
``tokenizer.meta.json`` recording what it was trained for (the corpus's
sha256, the requested vocab_size) and the sha256 of the tokenizer file
itself. A resume (or any restart in the same run_dir) on the same corpus and
vocab_size loads it instead of retraining, so its token ids stay the ones
the checkpoints were trained on; anything else retrains and overwrites.

Encoding the corpus costs seconds as well (~5.5 s for a few MB), so the
token ids are saved beside the tokenizer, in ``tokenizer.tokens.safetensors``
(data only: no pickle), with the sha256 of the corpus, of the tokenizer file
and of the ids themselves in its metadata. They are reused only when the
corpus and tokenizer hashes match and the ids read back hash to the saved
value (so a truncated or damaged file is re-encoded, never loaded); anything
else encodes again and overwrites them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from actors.datasets import TokenDataset

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer.meta.json"
TOKENS_FILE = "tokenizer.tokens.safetensors"  # the corpus's ids, encoded with TOKENIZER_FILE
MIN_VOCAB_SIZE = 257  # the 256 byte symbols, plus at least one merge


class BpeCodec:
    """Text <-> ids with a trained tokenizer, picklable for Ray workers.

    It pickles as the tokenizer's JSON and rebuilds the ``Tokenizer`` on
    first use after unpickling, so the dataset can carry ``codec.decode``
    and ``codec.encode`` (bound methods of a picklable object) to workers.
    """

    def __init__(self, tokenizer_json: str):
        self.tokenizer_json = tokenizer_json
        self._tokenizer: Tokenizer | None = None

    def __getstate__(self) -> dict[str, str]:
        return {"tokenizer_json": self.tokenizer_json}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.tokenizer_json = state["tokenizer_json"]
        self._tokenizer = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_str(self.tokenizer_json)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids


def train_bpe(text: str, vocab_size: int) -> Tokenizer:
    """A byte-level BPE of at most ``vocab_size`` tokens (fewer if the text runs out of merges)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    lines = text.splitlines(keepends=True)  # many short strings: trained in parallel
    tok.train_from_iterator(lines, trainer, length=len(lines))
    return tok


def load_or_train(data: bytes, vocab_size: int, run_dir: str | Path | None) -> BpeCodec:
    """The tokenizer saved in ``run_dir`` for this corpus and vocab_size, else a new one (saved).

    ``run_dir=None`` (a Python caller with no run folder): train, save nothing.
    """
    meta = {"corpus_sha256": _sha256(data), "vocab_size": vocab_size}
    if run_dir is not None:
        saved = _load(Path(run_dir), meta)
        if saved is not None:
            log.info("reusing %s (vocab %d)", Path(run_dir) / TOKENIZER_FILE, saved.vocab_size)
            return saved
    t0 = time.monotonic()
    text = data.decode("utf-8", errors="replace")
    tokenizer_json = train_bpe(text, vocab_size).to_str()
    log.info("trained a BPE tokenizer on %d bytes in %.1fs", len(data), time.monotonic() - t0)
    if run_dir is not None:
        _save(Path(run_dir), tokenizer_json, meta)
    return BpeCodec(tokenizer_json)


def bpe_corpus(
    data: bytes, source: str, vocab_size: int, run_dir: str | Path | None = None
) -> TokenDataset:
    """A text as BPE token ids (tokenizer trained on it, or reused from ``run_dir``, and the
    ids encoded, or reused from ``run_dir`` when encoded from this corpus by this tokenizer)."""
    codec = load_or_train(data, vocab_size, run_dir)
    n_vocab = codec.vocab_size
    dtype = np.uint16 if n_vocab <= 2**16 else np.int32
    key = {
        "corpus_sha256": _sha256(data),
        "tokenizer_sha256": _sha256(codec.tokenizer_json.encode()),
    }
    tokens = _load_tokens(Path(run_dir), key, dtype) if run_dir is not None else None
    if tokens is not None:
        log.info("reusing %d encoded tokens from %s", len(tokens), Path(run_dir) / TOKENS_FILE)
    else:
        t0 = time.monotonic()
        tokens = np.asarray(codec.encode(data.decode("utf-8", errors="replace")), dtype=dtype)
        log.info("encoded %d bytes in %.1fs", len(data), time.monotonic() - t0)
        if run_dir is not None:
            _save_tokens(Path(run_dir), tokens, key)
    return TokenDataset(
        tokens, n_vocab, f"{source} (byte-level BPE, vocab {n_vocab})", codec.decode, codec.encode
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _load(run_dir: Path, meta: dict[str, object]) -> BpeCodec | None:
    """The saved tokenizer if its sidecar matches ``meta`` and its file is intact, else None."""
    try:
        saved_meta = json.loads((run_dir / META_FILE).read_text(encoding="utf-8"))
        tokenizer_json = (run_dir / TOKENIZER_FILE).read_text(encoding="utf-8")
    except (OSError, ValueError):
        return None
    # The file hash also catches a crash between writing the two files.
    if saved_meta != {**meta, "tokenizer_sha256": _sha256(tokenizer_json.encode())}:
        return None
    return BpeCodec(tokenizer_json)


def _save(run_dir: Path, tokenizer_json: str, meta: dict[str, object]) -> None:
    """Write the tokenizer, then its sidecar, each atomically (temp file + ``os.replace``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(run_dir / TOKENIZER_FILE, tokenizer_json)
    full_meta = {**meta, "tokenizer_sha256": _sha256(tokenizer_json.encode())}
    _write_atomic(run_dir / META_FILE, json.dumps(full_meta, indent=2) + "\n")


def _load_tokens(run_dir: Path, key: dict[str, str], dtype: type) -> np.ndarray | None:
    """The saved ids if saved for ``key`` (corpus and tokenizer) and intact, else None.

    Intact: one 1-d ``dtype`` tensor whose length and sha256 are the ones saved with it.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(run_dir / TOKENS_FILE), framework="np") as f:
            meta = f.metadata() or {}
            if any(meta.get(k) != v for k, v in key.items()) or list(f.keys()) != ["tokens"]:
                return None
            tokens = f.get_tensor("tokens")
        count = int(meta["count"])
    except Exception:  # noqa: BLE001 - missing, truncated or not safetensors: encode again
        return None
    if tokens.dtype != dtype or tokens.shape != (count,):
        return None
    if _sha256(tokens.tobytes()) != meta.get("tokens_sha256"):
        return None
    return tokens


def _save_tokens(run_dir: Path, tokens: np.ndarray, key: dict[str, str]) -> None:
    """Write the ids and their key and checksum as one safetensors file, atomically."""
    from safetensors.numpy import save

    meta = {**key, "count": str(len(tokens)), "tokens_sha256": _sha256(tokens.tobytes())}
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(run_dir / TOKENS_FILE, save({"tokens": tokens}, metadata=meta))


def _write_atomic(path: Path, content: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: os.replace is atomic
    try:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
