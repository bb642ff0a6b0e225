"""Map-style datasets with deterministic global batches: what a task trains on.

A dataset is what a ``data._target_`` returns (called with its config's
fields, plus ``run_dir`` if it accepts one). It holds its samples in memory
(the driver puts it in Ray's object store once; every worker maps it), and
its **global batch of step ``s`` is a pure function of ``(seed, s)``**: the
same batches whatever the number of workers or stages, so a checkpoint's
data position is its step and a recovery redoes exactly the steps it lost.
Each worker takes rows ``[lo, hi)`` of the global batch.

Two kinds, one per built-in task (``actors/task.py``):

- ``TokenDataset`` (task ``lm``): a 1-D token array; a sample is a window of
  ``seq_len + 1`` tokens at a random offset; the last ``EVAL_FRACTION`` of
  the tokens is held out for evaluation.
- ``ArrayDataset`` (task ``classification``): features ``x[N, ...]`` and
  integer labels ``y[N]``, split into train and test once (seeded); step
  ``s`` takes positions ``[s*B, (s+1)*B)`` of an endless sequence of
  per-epoch permutations of the training rows, so every sample is seen once
  per epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# Share of a token dataset held out for evaluation (its tail: no window
# crosses from training text into it).
EVAL_FRACTION = 0.05


class DataError(ValueError):
    """A dataset that cannot serve the job as configured (e.g. smaller than one batch)."""


def fingerprint_of(data: object) -> str | None:
    """A dataset's fingerprint (checkpoints record it; a resume on other data is refused),
    if it has one: a user's own dataset may not."""
    fingerprint = getattr(data, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else None


@dataclass(frozen=True)
class DataFacts:
    """What a model factory may need to know about its data (None: not applicable)."""

    vocab_size: int | None = None  # token datasets
    num_classes: int | None = None  # labelled datasets
    input_shape: tuple[int, ...] | None = None  # one sample's features

    def model_kwargs(self) -> dict[str, object]:
        """The facts as keyword arguments a model factory may take."""
        out: dict[str, object] = {}
        if self.vocab_size is not None:
            out["vocab_size"] = self.vocab_size
        if self.num_classes is not None:
            out["num_classes"] = self.num_classes
        if self.input_shape is not None:
            out["input_shape"] = self.input_shape
            out["in_features"] = int(np.prod(self.input_shape))
        return out


@dataclass(frozen=True)
class TokenDataset:
    """A token stream (bytes, or a tokenizer's ids) for language modelling."""

    tokens: np.ndarray  # 1-D integer array
    vocab_size: int
    source: str
    # ids -> text and text -> ids (module-level functions or a tokenizer's
    # bound methods: the dataset travels to workers by pickle); None: no text.
    decoder: Callable[[list[int]], str] | None = field(default=None, compare=False)
    encoder: Callable[[str], list[int]] | None = field(default=None, compare=False)
    # Where each source document starts (a corpus of files), if known:
    # federated clients then hold whole documents (actors/client_data.py).
    doc_starts: np.ndarray | None = field(default=None, compare=False)
    kind = "tokens"

    @property
    def facts(self) -> DataFacts:
        return DataFacts(vocab_size=self.vocab_size)

    @property
    def n_train(self) -> int:
        """Tokens that training windows are drawn from (the rest is held out)."""
        return len(self.tokens) - self.n_eval

    @property
    def n_eval(self) -> int:
        return int(len(self.tokens) * EVAL_FRACTION)

    def fingerprint(self) -> str:
        """A short hash of the tokens, recorded in checkpoints to catch data mix-ups on resume."""
        return hashlib.sha256(np.ascontiguousarray(self.tokens).tobytes()).hexdigest()[:16]

    def check(self, global_batch: int, seq_len: int) -> None:
        """Raise ``DataError`` unless a training window (and one eval window) fits."""
        if self.n_train <= seq_len + 1:
            raise DataError(
                f"the dataset has {self.n_train} training tokens ({self.source}); a sample needs "
                f"more than model.seq_len + 1 = {seq_len + 1}"
            )

    def offsets(self, seed: int, step: int, global_batch: int, seq_len: int) -> np.ndarray:
        """Start offsets of step ``step``'s ``global_batch`` windows (pure function)."""
        return window_offsets(seed, step, global_batch, self.n_train, seq_len)

    def batch(
        self, seed: int, step: int, global_batch: int, lo: int, hi: int, seq_len: int
    ) -> dict[str, torch.Tensor]:
        """Rows ``[lo, hi)`` of step ``step``'s global batch: inputs ``x`` and targets ``y``."""
        offsets = self.offsets(seed, step, global_batch, seq_len)[lo:hi]
        x, y = windows(self.tokens, offsets, seq_len)
        return {"x": x, "y": y}

    def eval_batches(self, batch_size: int, seq_len: int, limit: int) -> Iterator[np.ndarray]:
        """Offsets of up to ``limit`` held-out batches: consecutive windows of the tail."""
        start, end = self.n_train, len(self.tokens) - seq_len - 1
        starts = np.arange(start, max(start, end), seq_len, dtype=np.int64)
        for i in range(min(limit, -(-len(starts) // batch_size))):
            yield starts[i * batch_size : (i + 1) * batch_size]

    def eval_batch(self, offsets: np.ndarray, seq_len: int) -> dict[str, torch.Tensor]:
        x, y = windows(self.tokens, offsets, seq_len)
        return {"x": x, "y": y}

    def decode(self, ids: list[int]) -> str | None:
        return None if self.decoder is None else self.decoder(ids)

    def encode(self, text: str) -> list[int] | None:
        return None if self.encoder is None else self.encoder(text)


def window_offsets(
    seed: int, step: int, global_batch: int, n_tokens: int, seq_len: int
) -> np.ndarray:
    """Start offsets of the ``global_batch`` windows of step ``step`` (pure function)."""
    high = n_tokens - seq_len - 1
    if high <= 0:
        raise DataError(
            f"the corpus has {n_tokens} tokens, fewer than model.seq_len+1 = {seq_len + 1}"
        )
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, high, size=global_batch, dtype=np.int64)


def windows(
    tokens: np.ndarray, offsets: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``x[B, T]`` and next-token targets ``y[B, T]`` for windows starting at ``offsets``."""
    idx = offsets[:, None] + np.arange(seq_len + 1)[None, :]
    window = torch.from_numpy(tokens[idx].astype(np.int64))
    return window[:, :-1], window[:, 1:]


@dataclass(frozen=True)
class ArrayDataset:
    """Features and integer class labels, split into train and test rows once."""

    x: np.ndarray  # float32[N, ...]
    y: np.ndarray  # int64[N]
    train_rows: np.ndarray  # int64 indices into x/y
    test_rows: np.ndarray
    num_classes: int
    source: str
    # Label skew among federated clients: Dirichlet(alpha) class shares per
    # client (actors/client_data.py); None: an IID split. data.alpha.
    alpha: float | None = None
    kind = "labelled"

    @staticmethod
    def split(
        x: np.ndarray, y: np.ndarray, source: str, test_fraction: float, seed: int = 0
    ) -> ArrayDataset:
        """A dataset whose test rows are a seeded ``test_fraction`` of all rows."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.ascontiguousarray(y)
        if not (np.issubdtype(y.dtype, np.integer) or np.all(np.mod(y, 1) == 0)):
            raise DataError(f"{source}: labels must be class indices (whole numbers), not floats")
        y = y.astype(np.int64)
        if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"{source}: features must be [N, ...] and labels [N]; got {x.shape} and {y.shape}"
            )
        if len(y) and y.min() < 0:
            raise DataError(f"{source}: labels must be class indices >= 0 (found {y.min()})")
        order = np.random.default_rng(seed).permutation(len(x))
        n_test = int(round(len(x) * test_fraction))
        num_classes = int(y.max()) + 1 if len(y) else 0
        return ArrayDataset(x, y, order[n_test:], order[:n_test], num_classes, source)

    @property
    def facts(self) -> DataFacts:
        return DataFacts(num_classes=self.num_classes, input_shape=tuple(self.x.shape[1:]))

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.x.tobytes())
        h.update(self.y.tobytes())
        h.update(self.train_rows.tobytes())
        return h.hexdigest()[:16]

    def check(self, global_batch: int, seq_len: int | None = None) -> None:
        if len(self.train_rows) < global_batch:
            raise DataError(
                f"the dataset has {len(self.train_rows)} training samples ({self.source}), "
                f"fewer than one global batch (train.global_batch={global_batch})"
            )

    def rows(self, seed: int, step: int, global_batch: int) -> np.ndarray:
        """Training rows of step ``step``: positions ``[s*B, (s+1)*B)`` of the epochs' orders."""
        n = len(self.train_rows)
        first = step * global_batch
        out = np.empty(global_batch, dtype=np.int64)
        filled = 0
        while filled < global_batch:
            epoch, pos = divmod(first + filled, n)
            order = np.random.default_rng([seed, epoch]).permutation(n)
            take = min(global_batch - filled, n - pos)
            out[filled : filled + take] = self.train_rows[order[pos : pos + take]]
            filled += take
        return out

    def batch(
        self, seed: int, step: int, global_batch: int, lo: int, hi: int, seq_len: int | None = None
    ) -> dict[str, torch.Tensor]:
        rows = self.rows(seed, step, global_batch)[lo:hi]
        return self.eval_batch(rows)

    def eval_batches(
        self, batch_size: int, seq_len: int | None = None, limit: int | None = None
    ) -> Iterator[np.ndarray]:
        """The test rows in batches (all of them unless ``limit`` batches)."""
        n = -(-len(self.test_rows) // batch_size)
        for i in range(n if limit is None else min(n, limit)):
            yield self.test_rows[i * batch_size : (i + 1) * batch_size]

    def eval_batch(self, rows: np.ndarray, seq_len: int | None = None) -> dict[str, torch.Tensor]:
        return {"x": torch.from_numpy(self.x[rows]), "y": torch.from_numpy(self.y[rows])}

    def decode(self, ids: list[int]) -> str | None:
        return None


def digits(test_fraction: float = 0.2, seed: int = 0, alpha: float | None = None) -> ArrayDataset:
    """scikit-learn's bundled 8x8 digit images (1,797 of them, 10 classes), scaled to [0, 1].

    ``alpha``: label skew among federated clients (``ArrayDataset.alpha``).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    data = ArrayDataset.split(
        bunch.data / 16.0, bunch.target, "scikit-learn digits", test_fraction, seed
    )
    return dataclasses.replace(data, alpha=alpha)


def arrays(
    path: str,
    x_key: str = "x",
    y_key: str = "y",
    test_fraction: float = 0.2,
    alpha: float | None = None,
) -> ArrayDataset:
    """Features and labels from a ``.npz`` or ``.safetensors`` file (keys ``x_key``, ``y_key``).

    Read as data only: ``np.load`` with ``allow_pickle=False``, or safetensors.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data.path: file {str(p)!r} does not exist")
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as f:
            missing = [k for k in (x_key, y_key) if k not in f]
            if missing:
                raise DataError(f"data.path: {p} has no array {missing[0]!r} (has {list(f)})")
            try:
                x, y = f[x_key], f[y_key]
            except ValueError:  # allow_pickle=False refuses object arrays: never unpickled
                raise DataError(
                    f"data.path: {p} holds an object (pickled) array; only numeric arrays are read"
                ) from None
    elif p.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(p))
        missing = [k for k in (x_key, y_key) if k not in tensors]
        if missing:
            raise DataError(f"data.path: {p} has no tensor {missing[0]!r} (has {list(tensors)})")
        x, y = tensors[x_key], tensors[y_key]
    else:
        raise DataError(f"data.path: {p} is neither a .npz nor a .safetensors file")
    return dataclasses.replace(
        ArrayDataset.split(x, y, str(p.resolve()), test_fraction), alpha=alpha
    )
