"""Where the training state comes from after a membership change: a pure plan.

After a failure, every surviving worker reports the copies of state it holds
(``Holding``): its own live state, its own snapshots, and the replica of its
buddy's shard. ``plan_recovery`` picks the newest step at which the whole
flat state can be assembled from those copies, and which copy serves each
old shard. No copy at any common step (a rank and its buddy both lost) means
``None``: the controller then falls back to the last checkpoint.

State is divided into named **state spaces** (``dp`` for the data-parallel
flat vectors, later ``stage/2``, ``expert/1.7``, ``server``), each with its
own owner ranges. A holding names its space; ``plan_recovery`` plans one
space, ``plan_recovery_spaces`` all of a program's spaces at one common step
(a ``StatePlan``), which is what the controller carries out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from storage.checkpoint import DEFAULT_SPACE

# An owner's range in its space: a list indexed by old rank, or old rank -> range.
OwnerRanges = Sequence[tuple[int, int]] | Mapping[int, tuple[int, int]]


@dataclass(frozen=True)
class Holding:
    """A copy of old rank ``owner``'s range ``[lo, hi)`` of state space ``space``.

    Held by ``holder`` after ``done`` steps. ``kind`` is "live" (the
    engine's own state), "own" (a snapshot) or "replica" (a buddy's).
    """

    holder: int  # old rank of a surviving worker
    owner: int  # old rank whose shard this is
    done: int  # steps applied to this state
    kind: str  # "live" (the engine's own state), "own" (a snapshot), "replica" (a buddy's)
    lo: int
    hi: int
    space: str = DEFAULT_SPACE


@dataclass(frozen=True)
class RecoveryPlan:
    """Which copy serves each old owner's range of one state space, at step ``done``."""

    done: int  # the new epoch continues with step number ``done``
    pieces: tuple[Holding, ...]  # one per non-empty old range, sorted by ``lo``
    space: str = DEFAULT_SPACE

    @property
    def from_replicas(self) -> list[int]:
        """Old ranks whose shard is rebuilt from a buddy's replica."""
        return [p.owner for p in self.pieces if p.kind == "replica"]


@dataclass(frozen=True)
class StatePlan:
    """A ``RecoveryPlan`` for every state space of a program, all at step ``done``."""

    done: int
    by_space: Mapping[str, RecoveryPlan]

    @property
    def from_replicas(self) -> dict[str, list[int]]:
        """Per space, the old ranks whose range is rebuilt from a buddy's replica."""
        return {s: p.from_replicas for s, p in self.by_space.items() if p.from_replicas}


_PREFERENCE = {"live": 0, "own": 1, "replica": 2}


def _owners(ranges: OwnerRanges) -> dict[int, tuple[int, int]]:
    return dict(ranges.items()) if isinstance(ranges, Mapping) else dict(enumerate(ranges))


def _pieces_at(
    done: int, owners: dict[int, tuple[int, int]], holdings: list[Holding]
) -> tuple[Holding, ...] | None:
    """One copy per non-empty owner range at step ``done``, or None if one has none."""
    pieces = []
    for owner, (lo, hi) in sorted(owners.items()):
        if hi == lo:
            continue
        options = [
            h for h in holdings if h.owner == owner and h.done == done and (h.lo, h.hi) == (lo, hi)
        ]
        if not options:
            return None
        pieces.append(min(options, key=lambda h: (_PREFERENCE[h.kind], h.holder != owner)))
    return tuple(sorted(pieces, key=lambda h: h.lo))


def plan_recovery(
    old_bounds: OwnerRanges, holdings: list[Holding], *, space: str = DEFAULT_SPACE
) -> RecoveryPlan | None:
    """The newest step at which every old range of ``space`` has a copy, and which copy to use.

    ``old_bounds[r]`` is old rank ``r``'s range of ``space`` (a list by rank,
    or a mapping from rank to range for a space only some ranks own; for
    replicated data parallelism, a single range ``[(0, numel)]`` owned by
    "rank 0" that every survivor holds live). Holdings of other spaces are
    ignored. A rank's own copy is preferred over a replica, so state moves
    over the network only when it has to.
    """
    owners = _owners(old_bounds)
    mine = [h for h in holdings if h.space == space]
    for done in sorted({h.done for h in mine}, reverse=True):
        pieces = _pieces_at(done, owners, mine)
        if pieces is not None:
            return RecoveryPlan(done, pieces, space)
    return None


def plan_recovery_spaces(
    bounds: Mapping[str, OwnerRanges], holdings: list[Holding], *, upto: int | None = None
) -> StatePlan | None:
    """A plan for every space of ``bounds``, all at the newest step at which each is complete.

    Each space is planned from its own holdings against its own owner ranges
    (a copy of one space never stands in for another), but all at one step:
    the spaces of a program together are its model and optimizer state, and
    a stage at step 7 next to a stage at step 6 is no state at all. None if
    no step has every space complete. A space whose ranges are all empty is
    complete at any step. ``upto``: the newest step not after it is preferred
    when one is complete (a step applied but never reported is redone from
    the copies of the step before, so that it gets its metrics record).
    """
    owners = {space: _owners(ranges) for space, ranges in bounds.items()}
    by_space = {space: [h for h in holdings if h.space == space] for space in bounds}
    steps = sorted({h.done for h in holdings if h.space in bounds}, reverse=True)
    if upto is not None:  # not after ``upto`` first, newest first; then the rest
        steps = [d for d in steps if d <= upto] + [d for d in steps if d > upto]
    for done in steps:
        plans = {}
        for space, ranges in owners.items():
            pieces = _pieces_at(done, ranges, by_space[space])
            if pieces is None:
                break
            plans[space] = RecoveryPlan(done, pieces, space)
        else:
            return StatePlan(done, plans)
    return None
