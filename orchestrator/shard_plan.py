"""The data-parallel plan: who owns which flat range of the model and how many samples each takes.

Pure functions of measured capacities (no Ray, no torch), so the controller
can make a plan for any membership and tests can check it exhaustively. Two
independent splits come out of it:

* **shard bounds**, proportional to what a worker can *hold* (free memory):
  with ZeRO a worker's persistent state is proportional to its shard;
* **batch shares**, proportional to how fast a worker *computes*
  (samples/s), so that all ranks finish their micro-batch at about the same
  time.

Both use largest-remainder rounding (ties to the lower index), so the parts
always sum exactly to the whole, and no part is empty when there is at least
one unit per worker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def _check_weights(weights: Sequence[float], what: str) -> list[float]:
    if len(weights) == 0:
        raise ValueError(f"{what} must not be empty")
    out = []
    for i, w in enumerate(weights):
        w = float(w)
        if not math.isfinite(w) or w <= 0:
            raise ValueError(f"{what}[{i}] must be a positive finite number, got {weights[i]!r}")
        out.append(w)
    return out


def _largest_remainder(total: int, weights: list[float]) -> list[int]:
    """Integer parts of ``total`` proportional to ``weights``; each >= 1 if ``total >= len``."""
    wsum = sum(weights)
    quotas = [total * w / wsum for w in weights]
    sizes = [int(q) for q in quotas]
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - sizes[i]), i))
    for i in order[: total - sum(sizes)]:
        sizes[i] += 1
    if total >= len(weights):
        # A very small weight can round to zero; a zero-size part would leave a worker
        # idle (or a shard empty), so move one unit to it from the largest part.
        for i in range(len(sizes)):
            if sizes[i] == 0:
                donor = max(range(len(sizes)), key=lambda j: (sizes[j], -j))
                sizes[donor] -= 1
                sizes[i] = 1
    return sizes


def shard_bounds(total: int, weights: Sequence[float], align: int = 1) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` ranges covering ``range(total)``, sized in proportion to ``weights``.

    Every boundary but the final ``total`` is a multiple of ``align`` (e.g. a
    cache line or a vector width, in elements); the remainder
    ``total % align`` goes to the last range. Each range is non-empty when
    ``total // align >= len(weights)``; otherwise trailing ranges may be empty.
    Equal weights give the same split as ``collectives.flat.split_evenly`` for
    ``align=1``.

    Raises ``ValueError`` for empty or non-positive weights, ``total < 0`` or
    ``align < 1``.
    """
    w = _check_weights(weights, "weights")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    units, rest = divmod(total, align)
    sizes = [s * align for s in _largest_remainder(units, w)]
    sizes[-1] += rest
    bounds = []
    lo = 0
    for s in sizes:
        bounds.append((lo, lo + s))
        lo += s
    return bounds


def batch_shares(global_batch: int, weights: Sequence[float]) -> list[int]:
    """Per-worker sample counts proportional to ``weights`` that sum to ``global_batch``.

    Each share is >= 1 when ``global_batch >= len(weights)``. Raises
    ``ValueError`` for bad weights or a negative batch.
    """
    w = _check_weights(weights, "weights")
    if global_batch < 0:
        raise ValueError(f"global_batch must be >= 0, got {global_batch}")
    return _largest_remainder(global_batch, w)


def weights_from_memory(bytes_per_worker: Sequence[float]) -> list[float]:
    """Shard weights from each worker's free memory (normalized to sum to 1).

    With ZeRO every byte a rank persistently holds scales with its shard, so
    the shard is sized in proportion to the memory available for it.
    """
    w = _check_weights(bytes_per_worker, "bytes_per_worker")
    s = sum(w)
    return [x / s for x in w]


def weights_from_throughput(samples_per_s: Sequence[float]) -> list[float]:
    """Batch weights from each worker's measured throughput (normalized to sum to 1).

    A worker that is twice as fast gets twice the samples, so all ranks reach
    the gradient reduction at about the same time.
    """
    w = _check_weights(samples_per_s, "samples_per_s")
    s = sum(w)
    return [x / s for x in w]
