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
