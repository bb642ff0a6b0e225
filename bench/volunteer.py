"""Volunteer compute: the gateway's throughput and overhead, and training with liars.

    .venv/bin/python bench/volunteer.py                 # everything (~12 min on a loaded 2-core VM)
    .venv/bin/python bench/volunteer.py --quick         # fewer items, repeats and rounds
    .venv/bin/python bench/volunteer.py --part throughput --repeats 7
    .venv/bin/python bench/volunteer.py --part convergence --volunteers 4

Prints markdown tables and the exact command line. No assertions.

(a) Gateway throughput on loopback
----------------------------------
A ``VolunteerGateway`` (actors/gateway_server.py: gRPC over TLS, a token per
volunteer, the run's own CA) runs in this process on 127.0.0.1. Four
volunteers run as **separate processes** (``python bench/volunteer.py _echo
...``), each a ``VolunteerClient`` whose handler returns its input tensor
(echo). A work item is one float32 tensor of 4 KiB, 1 MiB or 16 MiB sent down
to a volunteer and the same tensor sent back up; the gateway checks each
result as a federated job does (``expect`` = name, dtype, shape; every value
finite). With 1 volunteer all items go to one of them; with 4 they are spread
round robin, ``--window`` items (default 4) in flight per volunteer, so the
volunteer never waits for the next item. Per measurement: items/s and MB/s
(10^6 bytes of payload per second, counted once although every payload
crosses the wire twice), from the first ``submit`` to the last accepted
result; ``--repeats`` measurements, the **median** reported (the machine is
shared; min and max are printed too). Before the timed items, an untimed
warm-up spends each volunteer's rate-limit burst (400 messages, 160 MiB), so
what is timed is the sustained rate.

Two gateway settings, the same volunteer processes (they reconnect when the
gateway restarts on the same port and learn its limits from ``Welcome``):

* **job defaults**: ``GatewayConfig``'s defaults, which the job's gateway
  (actors/gateway_actor.py) uses: per volunteer at most 200 messages/s and 64
  MiB/s, and an honest volunteer paces its sends to 90% of that.
* **no rate limit**: both rates set to 10^12: what TLS, gRPC, protobuf
  framing (2 MiB chunks) and the checks cost by themselves.

Per-item overhead: one item at a time (sequential round trips, one
volunteer) through the gateway, versus a direct in-cluster Ray actor call with
the same tensor (``ray.get(echo.echo.remote(x))`` on a tiny actor of a local
``ray.init``): the median latency of each, and their ratio (gateway / Ray).
The same call with the tensor as a numpy array (Ray's zero-copy path for
large objects) is shown too. Gateway events that mean trouble (rejected,
rate-limited, lost) are listed with the phase they came in.

(b) Convergence with malicious volunteers
-----------------------------------------
A ``strategy=federated`` job (model=mlp data=digits, 16 clients, 8 sampled
per round, ``trimmed_mean``) with ``gateway.enabled=true``: ``--volunteers``
volunteers (default 8) take over sampled clients' work, 0, 1 or 2 of them
malicious: ``tests/malicious_volunteer.py``, which trains honestly then sends
its update scaled by -5. The reference is the same job without a gateway.

Honest volunteers run ``shoal volunteer join --gateway ADDR --token T --ca
RUN/gateway/ca.pem --name NAME`` (``orchestrator.cli.main`` with exactly that
argv, which is what the ``shoal`` script calls); malicious ones run
``tests.malicious_volunteer.main`` with ``ADDR TOKEN CA``. Every volunteer is
one process, started *before* the job is submitted: it imports torch, grpc
and shoal's modules, then waits for ``RUN/gateway/address`` and joins at once
(a federated round here takes ~0.1 s, so a volunteer that starts importing
torch only when the address appears would miss most of the run). Tokens are
made with ``create_token`` before the submit, as tests/test_volunteer_jobs.py
does. Rounds that run before the volunteers have connected are done by the
trusted client actors. Reported per run: the final held-out accuracy (the
job's status, i.e. the last evaluation in metrics.jsonl), volunteer results
that passed the gateway's checks (the sum of the per-round
``volunteer_results``; a liar's result caught by a spot check is among them,
then replaced by the trusted recomputation), rounds with any volunteer
result, who was banned and in which round (``volunteer-banned`` in
events.jsonl), the honest volunteers' credit and spot checks passed (the
job's status), and the job's wall time. Everything runs on one local Ray
instance started by this script (``ray.init(num_cpus=max(cores, 4))``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import queue
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

KiB, MiB = 1 << 10, 1 << 20
SIZES = {"4 KiB": 4 * KiB, "1 MiB": MiB, "16 MiB": 16 * MiB}
# Items per throughput measurement, by payload: (full, --quick).
ITEMS = {"4 KiB": (400, 120), "1 MiB": (120, 40), "16 MiB": (16, 8)}
# Sequential round trips per latency measurement.
# Untimed items per volunteer before a "job defaults" measurement: past the burst.
WARM_ITEMS = {"4 KiB": 400, "1 MiB": 160, "16 MiB": 10}
ROUND_TRIPS = {"4 KiB": (60, 20), "1 MiB": (30, 10), "16 MiB": (8, 4)}
ITEM_DEADLINE_S = 120.0
PROCESS_START_S = 300.0  # a volunteer process imports torch: slow on a busy 2-core machine
NO_LIMIT = 1e12

JOB = [
    "strategy=federated",
    "model=mlp",
    "model.hidden=[32]",
    "data=digits",
    "strategy.clients=16",
    "strategy.per_round=8",
    "strategy.aggregator=trimmed_mean",
    "strategy.trim=0.15",
    "strategy.local_epochs=4",
    "train.eval_every=20",
    "train.sample_tokens=0",
    "cluster.cpus_per_worker=0.5",
    "strategy.server_cpus=0.5",
]
GATEWAY = ["gateway.enabled=true", "gateway.host=127.0.0.1", "gateway.port=0"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_for(cond: Callable[[], Any], what: str, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def child_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def stop_processes(procs: list[subprocess.Popen], timeout_s: float = 20.0) -> None:
    """Ctrl-C each (a volunteer leaves cleanly), then SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# ---------------------------------------------------------------------- child processes


def echo_volunteer_main(argv: list[str]) -> None:
    """``_echo ADDRESS TOKEN CA NAME``: a volunteer that returns its input."""
    from actors.volunteer_client import VolunteerClient

    address, token, ca, name = argv

    def echo(method: str, tensors: dict, args: dict) -> tuple[dict, dict]:
        return {"y": tensors["x"]}, {}

    client = VolunteerClient(
        address,
        token,
        ca,
        name,
        {"role": "bench-echo"},
        echo,
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
        connect_timeout_s=30.0,
    )
    client.run_forever(poll_s=0.2)


def job_volunteer_main(argv: list[str]) -> None:
    """``_join KIND RUN_DIR NAME TOKEN READY_FILE``: import first, join once the job serves."""
    import grpc  # noqa: F401
    import torch  # noqa: F401

    import actors.fed_clients  # noqa: F401
    import actors.task  # noqa: F401
    import actors.volunteer_client  # noqa: F401
    import orchestrator.spec  # noqa: F401
    import orchestrator.volunteer_cli  # noqa: F401
    from orchestrator.cli import main as shoal_main
    from storage.gateway_trust import gateway_dir
    from tests import malicious_volunteer

    kind, run_dir, name, token, ready = argv
    Path(ready).write_text("ready\n")
    address_file = gateway_dir(run_dir) / "address"
    while True:
        text = address_file.read_text().strip() if address_file.exists() else ""
        if ":" in text:
            break
        time.sleep(0.05)
    ca = str(gateway_dir(run_dir) / "ca.pem")
    if kind == "honest":
        sys.exit(
            shoal_main(
                ["volunteer", "join", "--gateway", text, "--token", token, "--ca", ca]
                + ["--name", name]
            )
        )
    sys.argv = [malicious_volunteer.__file__, text, token, ca]
    malicious_volunteer.main()


# ---------------------------------------------------------------------- (a) throughput


@dataclass
class Throughput:
    setting: str
    volunteers: int
    size: str
    items: int
    seconds: list[float] = field(default_factory=list)

    def rates(self) -> list[float]:
        return [self.items / s for s in self.seconds]

    def summary(self) -> tuple[float, float, float]:
        r = self.rates()
        return statistics.median(r), min(r), max(r)


@dataclass
class Latency:
    setting: str
    size: str
    samples: list[float] = field(default_factory=list)


def pump(gw: Any, volunteers: list[str], payload: Any, n_items: int, window: int) -> float:
    """Push ``n_items`` echo items through ``volunteers``, ``window`` in flight on each."""
    done: queue.Queue = queue.Queue()
    expect = {"y": ("float32", tuple(payload.shape))}
    submitted = 0

    def send(volunteer: str) -> None:
        nonlocal submitted
        future = gw.submit(
            volunteer, "echo", {"x": payload}, {}, submitted, ITEM_DEADLINE_S, expect=expect
        )
        submitted += 1
        future.add_done_callback(lambda f, v=volunteer: done.put((v, f)))

    t0 = time.perf_counter()
    for _ in range(window):
        for v in volunteers:
            if submitted < n_items:
                send(v)
    finished = 0
    while finished < n_items:
        volunteer, future = done.get(timeout=ITEM_DEADLINE_S + 10)
        future.result()  # raises if the item failed: a benchmark of failures is no benchmark
        finished += 1
        if submitted < n_items:
            send(volunteer)
    return time.perf_counter() - t0


def round_trips(call: Callable[[], Any], n: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        call()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    return out


def bench_throughput(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import numpy as np
    import ray
    import torch

    from actors.gateway_server import GatewayConfig, VolunteerGateway
    from storage.gateway_trust import create_token, ensure_run_certificates

    quick = int(args.quick)
    run_dir = workdir / "throughput"
    creds = ensure_run_certificates(run_dir)
    names = [f"echo{i}" for i in range(args.echo_volunteers)]
    tokens = {n: create_token(run_dir, n) for n in names}
    payloads = {
        label: torch.randn(size // 4, generator=torch.Generator().manual_seed(i))
        for i, (label, size) in enumerate(SIZES.items())
    }
    events: list[tuple[str, dict]] = []
    phase = ["start"]  # what was running when an event came (for the report)

    def make_gateway(port: int, no_limit: bool) -> VolunteerGateway:
        extra: dict[str, Any] = {}
        if no_limit:
            extra = dict(
                rate_msgs_per_s=NO_LIMIT,
                rate_msgs_burst=NO_LIMIT,
                rate_bytes_per_s=NO_LIMIT,
                rate_bytes_burst=NO_LIMIT,
            )
        config = GatewayConfig(
            job_id="bench-volunteer",
            run_dir=str(run_dir),
            credentials=creds,
            host="127.0.0.1",
            port=port,
            **extra,
        )
        gw = VolunteerGateway(
            config, audit=lambda event, **f: events.append((event, {"during": phase[0], **f}))
        )
        gw.start()
        return gw

    def all_connected(gw: VolunteerGateway) -> bool:
        up = {v.volunteer_id for v in gw.volunteers() if v.connected}
        return up >= set(names)

    results: list[Throughput] = []
    latencies: list[Latency] = []

    def measure_setting(gw: VolunteerGateway, setting: str) -> None:
        try:
            wait_for(lambda: all_connected(gw), "the echo volunteers", PROCESS_START_S)
        except TimeoutError:
            for name in names:
                log(f"{name}.log: {tail(workdir / f'{name}.log')}")
            raise
        phase[0] = f"{setting}: first items"
        # A first item each: the volunteers answer correctly.
        for label, x in payloads.items():
            for v in names:
                y, _ = gw.submit(v, "echo", {"x": x}, {}, 0, ITEM_DEADLINE_S).result()
                assert torch.equal(y["y"], x), f"{v} echoed something else ({label})"
        for label, x in payloads.items():
            phase[0] = f"{setting}: latency {label}"
            lat = Latency(setting, label)
            lat.samples = round_trips(
                lambda x=x: gw.submit(names[0], "echo", {"x": x}, {}, 1, ITEM_DEADLINE_S).result(
                    ITEM_DEADLINE_S + 10
                ),
                ROUND_TRIPS[label][quick],
            )
            latencies.append(lat)
            for n_vol in (1, len(names)) if len(names) > 1 else (1,):
                vols = names[:n_vol]
                phase[0] = f"{setting}: throughput {label}, {n_vol} volunteer(s)"
                # Untimed: drains each volunteer's rate-limit burst, so what is timed
                # is the sustained rate (the burst is 400 messages and 160 MiB).
                warm = WARM_ITEMS[label] if setting == "job defaults" else 2
                pump(gw, vols, x, warm * n_vol, args.window)
                t = Throughput(setting, n_vol, label, ITEMS[label][quick])
                for _ in range(args.repeats):
                    t.seconds.append(pump(gw, vols, x, t.items, args.window))
                results.append(t)
                med = t.summary()[0]
                log(
                    f"  {setting}, {n_vol} volunteer(s), {label}: {med:,.1f} items/s "
                    f"({med * SIZES[label] / 1e6:,.1f} MB/s)"
                )

    procs: list[subprocess.Popen] = []
    gw = make_gateway(0, no_limit=False)
    port = gw.port
    try:
        for name in names:
            cmd = [sys.executable, str(Path(__file__).resolve()), "_echo"]
            cmd += [f"127.0.0.1:{port}", tokens[name], str(creds.ca_path), name]
            with open(workdir / f"{name}.log", "wb") as out:
                procs.append(
                    subprocess.Popen(cmd, cwd=REPO_ROOT, env=child_env(), stdout=out, stderr=out)
                )
        log(f"throughput: gateway on 127.0.0.1:{port}; {len(names)} echo volunteer processes")
        for setting in ("job defaults", "no rate limit"):
            if setting == "no rate limit":
                gw.stop(grace_s=0.5)
                gw = make_gateway(port, no_limit=True)
            measure_setting(gw, setting)
        phase[0] = "ray"
        # the direct in-cluster call, same payloads (and as numpy: Ray's zero-copy path)
        echo = ray.remote(num_cpus=0)(Echo).remote()
        ray.get(echo.echo.remote(1))
        for label, x in payloads.items():
            for name, obj in (("ray actor", x), ("ray actor, numpy", x.numpy())):
                lat = Latency(name, label)
                lat.samples = round_trips(
                    lambda obj=obj: ray.get(echo.echo.remote(obj)), ROUND_TRIPS[label][quick]
                )
                got = ray.get(echo.echo.remote(obj))
                assert np.array_equal(np.asarray(got), x.numpy())
                latencies.append(lat)
        ray.kill(echo)
    finally:
        phase[0] = "shutdown (Ctrl-C to the volunteers)"
        stop_processes(procs)
        phase[0] = "shutdown (gateway stop)"
        gw.stop(grace_s=0.5)
    rejected = [{"event": e, **f} for e, f in events if e in ("rejected", "rate_limited", "lost")]
    return {"throughput": results, "latency": latencies, "problems": rejected}


class Echo:
    def echo(self, x: Any) -> Any:
        return x


def print_throughput(out: dict[str, Any]) -> None:
    print("\n### Gateway throughput, loopback, echo (payload down and the same back up)\n")
    print(
        "| gateway setting | volunteers | payload | items/s (median) | MB/s (median) "
        "| items/s min-max | items x repeats |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for t in out["throughput"]:
        med, lo, hi = t.summary()
        print(
            f"| {t.setting} | {t.volunteers} | {t.size} | {med:,.1f} | "
            f"{med * SIZES[t.size] / 1e6:,.1f} | {lo:,.1f}-{hi:,.1f} | "
            f"{t.items} x {len(t.seconds)} |"
        )
    print("\n### Per-item overhead: one item at a time, gateway vs a direct Ray actor call\n")
    print(
        "| payload | Ray actor call, torch tensor (ms) | gateway, job defaults (ms) | ratio "
        "| gateway, no rate limit (ms) | ratio | Ray actor call, numpy array (ms) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    by = {(lat.setting, lat.size): statistics.median(lat.samples) for lat in out["latency"]}
    for label in SIZES:
        ray_ms = by[("ray actor", label)] * 1e3
        cells = [f"{ray_ms:,.2f}"]
        for setting in ("job defaults", "no rate limit"):
            ms = by[(setting, label)] * 1e3
            cells += [f"{ms:,.2f}", f"{ms / ray_ms:,.2f}x"]
        cells.append(f"{by[('ray actor, numpy', label)] * 1e3:,.2f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(
        "\nThroughput: the timed items follow an untimed warm-up that spends each volunteer's "
        'rate-limit burst, so "job defaults" is the sustained rate (an honest volunteer '
        "paces its sends to 90% of 200 messages/s and 64 MiB/s). Per-item latency: sequential "
        "round trips, measured before the throughput runs: within the burst, so never paced."
    )
    n = {lat.size: len(lat.samples) for lat in out["latency"]}
    print(f"\n(median of {', '.join(f'{v} round trips for {k}' for k, v in n.items())})")
    if out["problems"]:
        print("\nGateway events (rejected, rate-limited, lost) during the throughput runs:\n")
        for f in out["problems"][:20]:
            print(f"- {json.dumps(f, default=str)}")


# ---------------------------------------------------------------------- (b) convergence


@dataclass
class Outcome:
    label: str
    volunteers: int
    malicious: int
    state: str
    accuracy: float | None
    volunteer_results: int = 0
    rounds_with_volunteers: int = 0
    rounds: int = 0
    banned: list[str] = field(default_factory=list)
    honest_credit: list[float] = field(default_factory=list)
    honest_checks: list[int] = field(default_factory=list)  # spot checks passed
    joined: int = 0
    rejected: int = 0
    wall_s: float = 0.0
    error: str | None = None


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def run_job(job: list[str], run_dir: Path, label: str, n_vol: int, n_bad: int) -> Outcome:
    from orchestrator import JobSpec, submit
    from storage.gateway_trust import create_token

    with_gateway = n_vol > 0
    spec = JobSpec.from_overrides([*job, f"run_dir={run_dir}", *(GATEWAY if with_gateway else [])])
    procs: list[subprocess.Popen] = []
    names = [f"honest{i}" for i in range(n_vol - n_bad)] + [f"mallory{i}" for i in range(n_bad)]
    try:
        if with_gateway:
            tokens = {n: create_token(spec.run_dir, n) for n in names}
            for n in names:
                kind = "malicious" if n.startswith("mallory") else "honest"
                ready = run_dir / f"{n}.ready"
                cmd = [sys.executable, str(Path(__file__).resolve()), "_join", kind]
                cmd += [str(run_dir), n, tokens[n], str(ready)]
                with open(run_dir / f"{n}.log", "wb") as out:
                    procs.append(
                        subprocess.Popen(
                            cmd, cwd=REPO_ROOT, env=child_env(), stdout=out, stderr=out
                        )
                    )
            t0 = time.monotonic()
            for n, p in zip(names, procs, strict=True):
                wait_for(
                    lambda n=n, p=p: (run_dir / f"{n}.ready").exists() or p.poll() is not None,
                    f"volunteer {n} to import",
                    PROCESS_START_S,
                )
                if p.poll() is not None:
                    raise RuntimeError(f"volunteer {n} exited: {tail(run_dir / f'{n}.log')}")
            log(f"  {n_vol} volunteer processes imported in {time.monotonic() - t0:.0f}s")
        t0 = time.monotonic()
        handle = submit(spec)
        status = handle.wait(timeout=1800)
        wall = time.monotonic() - t0
    finally:
        stop_processes(procs)
    records = _metrics(run_dir)
    events = _events(run_dir)
    o = Outcome(
        label=label,
        volunteers=n_vol,
        malicious=n_bad,
        state=str(status.state.value if hasattr(status.state, "value") else status.state),
        accuracy=status.accuracy,
        wall_s=wall,
        error=status.error,
        rounds=len(records),
    )
    o.volunteer_results = sum(int(r.get("volunteer_results", 0)) for r in records)
    o.rounds_with_volunteers = sum(1 for r in records if r.get("volunteer_results", 0))
    for e in events:
        if e["event"] == "volunteer-banned":
            why = str(e.get("why", ""))
            at = re.search(r"round (\d+)", why)
            who = str(e.get("volunteer_id") or e.get("name"))
            o.banned.append(f"{who} (round {at.group(1)})" if at else f"{who} ({why[:60]})")
    o.joined = len({e.get("volunteer_id") for e in events if e["event"] == "volunteer-joined"})
    o.rejected = sum(1 for e in events if e["event"] == "volunteer-rejected")
    program = status.program or {}
    for row in program.get("volunteers", []) or []:
        if not row.get("banned") and row.get("name", "").startswith("honest"):
            o.honest_credit.append(float(row.get("credit", 0.0)))
            o.honest_checks.append(int(row.get("spot_checks_passed", 0)))
    return o


def bench_convergence(args: argparse.Namespace, workdir: Path) -> list[Outcome]:
    steps = args.steps or (40 if args.quick else 100)
    job = [*JOB, f"train.steps={steps}", f"train.seed={args.seed}"]
    outcomes = []
    log(f"convergence: {steps} rounds, {args.volunteers} volunteers")
    o = run_job(job, workdir / "reference", "no volunteers (reference)", 0, 0)
    log(f"  reference: {o.state}, accuracy {o.accuracy}, {o.wall_s:.0f}s")
    outcomes.append(o)
    for n_bad in args.malicious:
        label = f"{args.volunteers} volunteers, {n_bad} malicious"
        o = run_job(job, workdir / f"vol-{n_bad}", label, args.volunteers, n_bad)
        log(
            f"  {label}: {o.state}, accuracy {o.accuracy}, volunteer results "
            f"{o.volunteer_results}, banned {o.banned}, {o.wall_s:.0f}s"
        )
        outcomes.append(o)
    return outcomes


def print_convergence(outcomes: list[Outcome], job: list[str]) -> None:
    print("\n### Convergence with malicious volunteers (federated, mlp on digits)\n")
    print(f"Job: `{' '.join(job)}`\n")
    print(
        "| run | state | held-out accuracy | volunteer results (passed the gateway's checks) "
        "| rounds with volunteers | banned | honest volunteers: credit (spot checks passed) "
        "| wall (s) |"
    )
    print("|---|---|---:|---:|---:|---|---|---:|")
    for o in outcomes:
        acc = f"{o.accuracy * 100:.1f}%" if o.accuracy is not None else "-"
        banned = ", ".join(o.banned) or "-"
        credit = (
            ", ".join(f"{c:g} ({k})" for c, k in zip(o.honest_credit, o.honest_checks, strict=True))
            or "-"
        )
        vr = f"{o.volunteer_results}" if o.volunteers else "-"
        rv = f"{o.rounds_with_volunteers}/{o.rounds}" if o.volunteers else f"0/{o.rounds}"
        print(
            f"| {o.label} | {o.state} | {acc} | {vr} | {rv} | {banned} | {credit} "
            f"| {o.wall_s:.0f} |"
        )
    print(
        "\nA volunteer result counts once it passed the gateway's checks (name, dtype, shape, "
        "finite, norm); a liar's result that a spot check caught is then replaced by the "
        "trusted client actor's recomputation, and the liar banned. Credit: 1 per result, "
        "2 for one that was spot-checked and matched."
    )
    for o in outcomes:
        if o.error:
            print(f"\n{o.label}: error: {o.error[:2000]}")


# ---------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer items, repeats and rounds")
    parser.add_argument("--part", choices=("all", "throughput", "convergence"), default="all")
    parser.add_argument("--repeats", type=int, default=None, help="per throughput figure")
    parser.add_argument("--window", type=int, default=4, help="items in flight per volunteer")
    parser.add_argument("--echo-volunteers", type=int, default=4)
    parser.add_argument("--volunteers", type=int, default=8, help="in the federated job")
    parser.add_argument("--malicious", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="rounds (default 100; quick 40)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    command = shlex.join([os.path.relpath(sys.executable, REPO_ROOT), *sys.argv])

    import grpc
    import ray
    import torch

    from orchestrator.api import NAMESPACE

    logging.basicConfig(level=logging.WARNING)
    load = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="shoal-bench-volunteer-"))
    log(f"work folder {workdir}")
    os.environ["PYTHONPATH"] = child_env()["PYTHONPATH"]
    ray.init(
        address="local",  # our own instance, never another user's cluster
        namespace=NAMESPACE,
        num_cpus=max(os.cpu_count() or 1, 4),
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}},
    )
    t0 = time.monotonic()
    throughput = outcomes = None
    try:
        if args.part in ("all", "throughput"):
            throughput = bench_throughput(args, workdir)
        if args.part in ("all", "convergence"):
            outcomes = bench_convergence(args, workdir)
    finally:
        ray.shutdown()
    print(f"\n`{command}`\n")
    print(
        f"Machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"load average at start {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}; "
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"grpcio {grpc.__version__}, ray {ray.__version__}; "
        f"{time.monotonic() - t0:.0f}s in all."
    )
    if throughput is not None:
        print_throughput(throughput)
    if outcomes is not None:
        steps = args.steps or (40 if args.quick else 100)
        print_convergence(outcomes, [*JOB, f"train.steps={steps}", f"train.seed={args.seed}"])
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"\nwork folder kept: {workdir}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_echo"]:
        echo_volunteer_main(sys.argv[2:])
    elif sys.argv[1:2] == ["_join"]:
        job_volunteer_main(sys.argv[2:])
    else:
        main()
