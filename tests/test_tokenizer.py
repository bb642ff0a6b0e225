"""data.tokenizer=bpe: a byte-level BPE trained on the corpus, saved in run_dir, reused."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest

from actors import tokenizer as bpe
from actors.data import text_file

WORDS = "the quick brown fox jumps over lazy dog while river stones whisper softly".split()
VOCAB = 400


def make_text(seed: int = 0, n_words: int = 1500) -> str:
    """A few KB of English-like text, with newlines, punctuation and non-ASCII."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 10):
        line = " ".join(rng.choice(WORDS) for _ in range(10))
        lines.append(line.capitalize() + rng.choice([".", ",", "!", " — café"]))
    return "\n".join(lines) + "\n  indented line\ttab\n"


@pytest.fixture
def book(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


def test_bpe_round_trips_the_text_and_reports_the_tokenizers_vocab(book):
    ds = text_file(str(book), tokenizer="bpe", vocab_size=VOCAB)
    text = book.read_text(encoding="utf-8")
    assert ds.decode(ds.tokens.tolist()) == text
    assert ds.encode(text) == ds.tokens.tolist()
    assert ds.tokens.dtype == np.uint16
    assert len(ds.tokens) < len(text.encode()) / 2  # merges actually compress
    codec = bpe.load_or_train(book.read_bytes(), VOCAB, None)
    assert ds.vocab_size == codec.tokenizer.get_vocab_size() <= VOCAB
    assert int(ds.tokens.max()) < ds.vocab_size


def test_saved_tokenizer_is_reused_for_the_same_corpus(book, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    first = text_file(str(book), tokenizer="bpe", vocab_size=VOCAB, run_dir=str(run_dir))
    saved = run_dir / bpe.TOKENIZER_FILE
    assert saved.is_file() and (run_dir / bpe.META_FILE).is_file()
    mtime = saved.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although a matching tokenizer was saved")

    monkeypatch.setattr(bpe, "train_bpe", no_training)
    second = text_file(str(book), tokenizer="bpe", vocab_size=VOCAB, run_dir=str(run_dir))
    assert saved.stat().st_mtime_ns == mtime
    assert np.array_equal(first.tokens, second.tokens)
    assert first.fingerprint() == second.fingerprint()
    assert not list(run_dir.glob("*.tmp"))


def test_changed_corpus_or_vocab_or_damaged_file_retrains(book, tmp_path):
    run_dir = tmp_path / "run"
    text_file(str(book), tokenizer="bpe", vocab_size=VOCAB, run_dir=str(run_dir))
    saved = run_dir / bpe.TOKENIZER_FILE
    original = saved.read_text(encoding="utf-8")

    book.write_text(make_text(seed=1, n_words=800) + "zebra zebra quartz", encoding="utf-8")
    ds = text_file(str(book), tokenizer="bpe", vocab_size=VOCAB, run_dir=str(run_dir))
    retrained = saved.read_text(encoding="utf-8")
    assert retrained != original
    assert ds.decode(ds.tokens.tolist()) == book.read_text(encoding="utf-8")

    text_file(str(book), tokenizer="bpe", vocab_size=300, run_dir=str(run_dir))
    assert saved.read_text(encoding="utf-8") != retrained

    saved.write_text("{", encoding="utf-8")  # e.g. a crash between the two files
    ds = text_file(str(book), tokenizer="bpe", vocab_size=300, run_dir=str(run_dir))
    assert ds.decode(ds.tokens.tolist()) == book.read_text(encoding="utf-8")
    assert saved.read_text(encoding="utf-8") != "{"


def test_dataset_pickles_with_a_working_codec(book):
    ds = text_file(str(book), tokenizer="bpe", vocab_size=VOCAB)
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.vocab_size == ds.vocab_size
    assert np.array_equal(copy.tokens, ds.tokens)
    ids = ds.tokens[:50].tolist()
    assert copy.decode(ids) == ds.decode(ids)
    assert copy.encode("the lazy fox") == ds.encode("the lazy fox")


def test_bytes_tokenizer_keeps_byte_tokens(book):
    ds = text_file(str(book))
    assert ds.vocab_size == 256
    assert ds.tokens.tobytes() == book.read_bytes()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tokenizer": "wordpiece"}, "data.tokenizer"),
        ({"tokenizer": "bpe", "vocab_size": 256}, "data.vocab_size"),
    ],
)
def test_bad_settings_name_the_field(book, kwargs, field):
    with pytest.raises(ValueError, match=field):
        text_file(str(book), **kwargs)


class EncodeCounter:
    """Counts BpeCodec.encode calls (encoding the corpus is what the token cache saves)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = bpe.BpeCodec.encode

        def encode(codec, text):
            self.calls += 1
            return original(codec, text)

        monkeypatch.setattr(bpe.BpeCodec, "encode", encode)


def test_encoded_tokens_are_cached_and_reused(book, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    first = text_file(str(book), tokenizer="bpe", vocab_size=VOCAB, run_dir=str(run_dir))
    cache = run_dir / bpe.TOKENS_FILE
    assert cache.is_file()
    mtime = cache.stat().st_mtime_ns
    encodes = EncodeCounter(monkeypatch)
    second = text_file(str(book), tokenizer="bpe", vocab_size=VOCAB, run_dir=str(run_dir))
    assert encodes.calls == 0 and cache.stat().st_mtime_ns == mtime
    assert second.tokens.dtype == first.tokens.dtype == np.uint16
    assert np.array_equal(second.tokens, first.tokens)
    assert second.fingerprint() == first.fingerprint()
    assert second.decode(second.tokens.tolist()) == book.read_text(encoding="utf-8")
    assert not list(run_dir.glob(".*.tmp"))
    # No run folder: nothing is cached (and nothing read).
    text_file(str(book), tokenizer="bpe", vocab_size=VOCAB)
    assert encodes.calls == 1


def test_tokens_of_another_corpus_or_tokenizer_are_encoded_again(book, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    text_file(str(book), tokenizer="bpe", vocab_size=VOCAB, run_dir=str(run_dir))
    cache = run_dir / bpe.TOKENS_FILE
    encodes = EncodeCounter(monkeypatch)
    # Another vocab_size: another tokenizer, so the ids are encoded again (and re-cached).
    ds = text_file(str(book), tokenizer="bpe", vocab_size=300, run_dir=str(run_dir))
    assert encodes.calls == 1
    assert ds.decode(ds.tokens.tolist()) == book.read_text(encoding="utf-8")
    assert np.array_equal(bpe._load_tokens(run_dir, _key(book, run_dir), np.uint16), ds.tokens)
    # A changed corpus, with the tokens of the old one left in the run folder.
    old_tokens = cache.read_bytes()
    book.write_text(make_text(seed=2, n_words=900), encoding="utf-8")
    ds = text_file(str(book), tokenizer="bpe", vocab_size=300, run_dir=str(run_dir))
    assert encodes.calls == 2 and cache.read_bytes() != old_tokens
    assert ds.decode(ds.tokens.tolist()) == book.read_text(encoding="utf-8")
    # The key names both the corpus and the tokenizer file.
    key = _key(book, run_dir)
    assert bpe._load_tokens(run_dir, key, np.uint16) is not None
    for name in key:
        assert bpe._load_tokens(run_dir, {**key, name: "0" * 64}, np.uint16) is None
    assert bpe._load_tokens(run_dir, key, np.int32) is None  # another dtype: not these ids


def _key(book, run_dir) -> dict[str, str]:
    tokenizer_json = (run_dir / bpe.TOKENIZER_FILE).read_bytes()
    return {
        "corpus_sha256": bpe._sha256(book.read_bytes()),
        "tokenizer_sha256": bpe._sha256(tokenizer_json),
    }


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "not safetensors", "empty"])
def test_damaged_token_cache_is_detected_and_rebuilt(book, tmp_path, monkeypatch, damage):
    run_dir = tmp_path / "run"
    first = text_file(str(book), tokenizer="bpe", vocab_size=VOCAB, run_dir=str(run_dir))
    cache = run_dir / bpe.TOKENS_FILE
    good = cache.read_bytes()
    if damage == "flipped byte":  # same size, valid header: only the checksum can tell
        data = bytearray(good)
        data[-3] ^= 0x01
        cache.write_bytes(bytes(data))
    elif damage == "truncated":
        cache.write_bytes(good[: len(good) - 10])
    elif damage == "not safetensors":
        np.save(cache.with_suffix(".npy"), first.tokens)
        cache.with_suffix(".npy").replace(cache)
    else:
        cache.write_bytes(b"")
    assert bpe._load_tokens(run_dir, _key(book, run_dir), np.uint16) is None
    encodes = EncodeCounter(monkeypatch)
    again = text_file(str(book), tokenizer="bpe", vocab_size=VOCAB, run_dir=str(run_dir))
    assert encodes.calls == 1
    assert np.array_equal(again.tokens, first.tokens)
    # Rewritten, and read back (its header's key order may differ from the first file's).
    assert np.array_equal(bpe._load_tokens(run_dir, _key(book, run_dir), np.uint16), first.tokens)
