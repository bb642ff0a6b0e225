"""``data._target_=mypkg.data.my_images``: scikit-learn's digits as 1-channel images.

A dataset is whatever the function returns; ``ArrayDataset.split`` makes a
labelled one (task ``classification``) whose facts are
``input_shape=(1, 8, 8)`` and ``num_classes=10``.
"""

from __future__ import annotations

import numpy as np

from actors.datasets import ArrayDataset


def my_images(test_fraction: float = 0.2, seed: int = 0) -> ArrayDataset:
    """The 1,797 digits as float32 ``[N, 1, 8, 8]`` in [0, 1], labels 0-9; a seeded test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    return ArrayDataset.split(x, bunch.target, "mypkg.data.my_images", test_fraction, seed)
