"""Kills timed right after a step: how often does asynchronous replication redo one?

    python bench/kill_after_step.py --kills 16 --seed 1

With ``elastic.replication=async`` a worker lost before its copy of the
last step reached its buddy sends the job back that step (see
``collectives/replication.py``). This script aims at that moment: for each
kill it starts a zero1/2/3 job (drawn at random; 3 workers, the GPT of
``bench/recovery.py``), polls ``handle.metrics()`` every ``--poll-ms`` until
a drawn step is reported, SIGKILLs a drawn rank at once, and lets the job
finish. It prints, per kill, the job's state, ``status.steps_redone``, where
the state came from (``restored-from-buddy`` or ``-checkpoint`` events) and
whether a survivor was ``stuck``; then the totals. No assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recovery import job_spec, start_ray  # noqa: E402

from orchestrator import submit  # noqa: E402


def one_kill(args: argparse.Namespace, rng: random.Random, run_dir: Path) -> dict:
    strategy = rng.choice(["zero1", "zero2", "zero3"])
    spec = job_spec(args, strategy, run_dir, f"elastic.replication={args.replication}")
    handle = submit(spec)
    step, rank = rng.randint(5, 25), rng.randrange(3)
    while not (records := handle.metrics()) or records[-1]["step"] < step:
        time.sleep(args.poll_ms / 1000)
    os.kill(handle.worker_pids()[rank], signal.SIGKILL)
    status = handle.wait(timeout=300)
    handle.close()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return {
        "strategy": strategy,
        "after_step": step,
        "rank": rank,
        "state": status.state.value,
        "steps_redone": status.steps_redone,
        "restored": [(e["event"], e["step"]) for e in events if e["event"].startswith("restored")],
        "stuck": sum(e["event"] == "stuck" for e in events),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--poll-ms", type=float, default=2.0)
    p.add_argument("--replication", choices=["async", "sync"], default="async")
    args = p.parse_args()
    # The job of bench/recovery.py, 40 steps, 3 workers.
    args.workers, args.n_layer, args.d_model, args.seq_len = 3, 4, 192, 64
    args.global_batch, args.steps, args.every = 12, 40, 0
    start_ray(args)
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="shoal-kill-after-step-"))
    rows = []
    for i in range(args.kills):
        rows.append(one_kill(args, rng, root / str(i)))
        print(rows[-1], flush=True)
    from_checkpoint = sum(any("checkpoint" in r[0] for r in row["restored"]) for row in rows)
    print(
        f"\n{len(rows)} kills ({args.replication}): "
        f"{sum(r['state'] == 'succeeded' for r in rows)} jobs succeeded, "
        f"{sum(r['steps_redone'] > 0 for r in rows)} redid a step "
        f"(steps redone: {[r['steps_redone'] for r in rows]}), "
        f"{from_checkpoint} restored from a checkpoint, "
        f"{sum(r['stuck'] for r in rows)} stuck survivors"
    )


if __name__ == "__main__":
    main()
