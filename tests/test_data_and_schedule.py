"""Pure pieces: deterministic global batches, byte corpora, the LR schedule."""

from __future__ import annotations

import numpy as np

from actors.data import stdlib_text, text_file
from actors.datasets import window_offsets, windows
from orchestrator.schedule import lr_at
from orchestrator.schema import TrainConfig
from orchestrator.shard_plan import batch_shares


def test_global_batch_is_a_function_of_seed_and_step_only():
    a = window_offsets(seed=3, step=5, global_batch=7, n_tokens=10_000, seq_len=16)
    b = window_offsets(seed=3, step=5, global_batch=7, n_tokens=10_000, seq_len=16)
    c = window_offsets(seed=3, step=6, global_batch=7, n_tokens=10_000, seq_len=16)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # Any split of the rows among workers reassembles the same global batch.
    for workers in (1, 2, 3):
        shares = batch_shares(7, [1.0] * workers)
        bounds = np.cumsum([0, *shares])
        parts = [a[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        assert np.array_equal(np.concatenate(parts), a)


def test_window_targets_are_next_tokens():
    tokens = np.arange(100, dtype=np.uint8)
    x, y = windows(tokens, np.array([0, 10]), seq_len=5)
    assert x.tolist() == [[0, 1, 2, 3, 4], [10, 11, 12, 13, 14]]
    assert y.tolist() == [[1, 2, 3, 4, 5], [11, 12, 13, 14, 15]]


def test_stdlib_corpus_is_deterministic_and_real_text():
    a, b = stdlib_text(max_bytes=200_000), stdlib_text(max_bytes=200_000)
    assert len(a.tokens) == 200_000
    assert a.fingerprint() == b.fingerprint()
    assert b"def " in a.tokens.tobytes()


def test_text_file(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("héllo")
    corpus = text_file(str(f))
    assert corpus.decode(corpus.tokens.tolist()) == "héllo"


def test_lr_schedule_warms_up_then_decays_to_floor():
    t = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, t) == 0.1 and lr_at(9, t) == 1.0
    assert lr_at(10, t) == 1.0
    assert abs(lr_at(100, t) - 0.1) < 1e-9
    lrs = [lr_at(s, t) for s in range(10, 100)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:], strict=False))
    assert lr_at(50, TrainConfig(steps=100, lr=0.5, warmup_steps=0, lr_schedule="constant")) == 0.5
