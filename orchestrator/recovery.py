"""Where the training state comes from after a membership change: a pure plan.

After a failure, every surviving worker reports the copies of state it holds
(``Holding``): its own live state, its own snapshots, and the replica of its
buddy's shard. ``plan_recovery`` picks the newest step at which the whole
flat state can be assembled from those copies, and which copy serves each
old shard. No copy at any common step (a rank and its buddy both lost) means
``None``: the controller then falls back to the last checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Holding:
    """A copy of old rank ``owner``'s shard ``[lo, hi)`` after ``done`` steps, held by ``holder``.

    ``kind`` is "live" (the engine's own state), "own" (a snapshot) or "replica" (a buddy's).
    """

    holder: int  # old rank of a surviving worker
    owner: int  # old rank whose shard this is
    done: int  # steps applied to this state
    kind: str  # "live" (the engine's own state), "own" (a snapshot), "replica" (a buddy's)
    lo: int
    hi: int


@dataclass(frozen=True)
class RecoveryPlan:
    done: int  # the new epoch continues with step number ``done``
    pieces: tuple[Holding, ...]  # one per old shard, sorted by ``lo``, covering [0, numel)

    @property
    def from_replicas(self) -> list[int]:
        """Old ranks whose shard is rebuilt from a buddy's replica."""
        return [p.owner for p in self.pieces if p.kind == "replica"]


_PREFERENCE = {"live": 0, "own": 1, "replica": 2}


def plan_recovery(
    old_bounds: list[tuple[int, int]], holdings: list[Holding]
) -> RecoveryPlan | None:
    """The newest step at which every old shard has a copy, and which copy to use.

    ``old_bounds[r]`` is old rank ``r``'s flat range (for replicated data
    parallelism, a single range ``[(0, numel)]`` owned by "rank 0" that every
    survivor holds live). A rank's own copy is preferred over a replica, so
    state moves over the network only when it has to.
    """
    for done in sorted({h.done for h in holdings}, reverse=True):
        pieces = []
        for owner, (lo, hi) in enumerate(old_bounds):
            if hi == lo:
                continue
            options = [
                h
                for h in holdings
                if h.owner == owner and h.done == done and (h.lo, h.hi) == (lo, hi)
            ]
            if not options:
                break
            pieces.append(min(options, key=lambda h: (_PREFERENCE[h.kind], h.holder != owner)))
        else:
            return RecoveryPlan(done, tuple(sorted(pieces, key=lambda h: h.lo)))
    return None
