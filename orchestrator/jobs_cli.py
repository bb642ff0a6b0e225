"""``shoal submit`` and ``shoal jobs ls|logs|stop|status``: shoal jobs on a shared Ray cluster.

A thin layer over ``orchestrator/remote_jobs.py``; every command talks to
Ray's job service (the dashboard, ``http://HEAD:8265``) and nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
# How long `shoal jobs stop` waits for the driver to end and for Ray to free the job's actors.
STOP_WAIT_S = 60.0

ADDRESS_HELP = (
    "the Ray cluster's dashboard, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, "
    "$RAY_ADDRESS, else http://127.0.0.1:8265)"
)

SUBMIT_EPILOG = """\
The job runs on the cluster exactly as `shoal run` would run it there (same
overrides, same configs/). What is sent:
  - the overrides, recomposed on the cluster by `python -m orchestrator.job_driver`;
  - your working directory (--working-dir, default .), so your own model/data/loss
    (model._target_=mypkg.nets.Net) import there; .git, .venv, runs/ are left out;
  - shoal's own packages (a runtime_env py_modules), so the cluster runs this shoal;
    its dependencies (torch, hydra, ...) must be on the cluster (the image of
    infra/Dockerfile has them), or add --pip to have Ray install them per job.
The run folder is on the cluster: $SHOAL_RUNS_ROOT/<job id> (default ~/shoal-runs);
for checkpoints that outlive the cluster use checkpoint.uri=s3://...

examples:
  ray start --head --dashboard-host 127.0.0.1      # a one-machine cluster, dashboard :8265
  shoal submit strategy=zero2 cluster.workers=2 train.steps=300
  shoal submit --address http://HEAD:8265 --follow model=mlp data=digits
  shoal submit --dry-run cluster.workers=4          # print what would be sent (RayJob fields)
then:
  shoal jobs ls                                     # id, state, step, loss, workers, started
  shoal jobs logs ID --follow                       # the progress lines, streamed
  shoal status ID                                   # the same status as a local run
  shoal jobs stop ID                                # every actor of the job gone
"""

JOBS_EPILOG = """\
examples:
  shoal jobs ls --address http://HEAD:8265
  shoal jobs logs 20250101-120000-ab12 --follow
  shoal jobs stop 20250101-120000-ab12
  shoal jobs status 20250101-120000-ab12          # = shoal status ID
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``submit`` and ``jobs`` on the ``shoal`` command line."""
    sm = sub.add_parser(
        "submit",
        help="submit a job to a Ray cluster's job service (runs there; this returns)",
        description=(
            "Package a job (overrides, working directory, shoal itself) and submit it to a Ray "
            "cluster through Ray's Job Submission API. Prints the job id on stdout."
        ),
        epilog=SUBMIT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sm.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides, as for `shoal run`")
    sm.add_argument("--address", help=ADDRESS_HELP)
    sm.add_argument(
        "--working-dir", default=".", help="uploaded as the job's working directory (default .)"
    )
    sm.add_argument("--no-working-dir", action="store_true", help="upload no working directory")
    sm.add_argument(
        "--pip", action="store_true", help="have Ray pip-install shoal's dependencies for the job"
    )
    sm.add_argument("--follow", action="store_true", help="then stream its logs until it ends")
    sm.add_argument(
        "--dry-run",
        action="store_true",
        help="print the entrypoint, runtime_env and metadata as JSON; submit nothing",
    )

    jobs = sub.add_parser(
        "jobs",
        help="list, follow, stop shoal jobs on a Ray cluster",
        description="shoal jobs on a Ray cluster, through Ray's job service.",
        epilog=JOBS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    jsub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION")
    ls = jsub.add_parser("ls", help="the cluster's shoal jobs: id, state, step, loss, workers")
    ls.add_argument("--address", help=ADDRESS_HELP)
    logs = jsub.add_parser("logs", help="a job's progress lines (--follow: stream them)")
    logs.add_argument("job", help="the job id (as `shoal submit` printed it)")
    logs.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    logs.add_argument("--raw", action="store_true", help="also the SHOAL_STATUS/RECORD/EVENT lines")
    logs.add_argument("--address", help=ADDRESS_HELP)
    stop = jsub.add_parser(
        "stop", help="stop a job: cancelled at a step boundary, then every actor of it ended"
    )
    stop.add_argument("job", help="the job id")
    stop.add_argument("--address", help=ADDRESS_HELP)
    status = jsub.add_parser("status", help="a job's status, as `shoal status` shows a local run")
    status.add_argument("job", help="the job id")
    status.add_argument("--address", help=ADDRESS_HELP)


def run(args: argparse.Namespace) -> int:
    """Dispatch ``submit`` / ``jobs ...``; expected errors are one line on stderr."""
    from orchestrator.remote_jobs import DashboardUnreachable, NotAShoalJob

    try:
        if args.command == "submit":
            return cmd_submit(args)
        action = getattr(args, "jobs_command", None)
        if action == "ls":
            return cmd_ls(args.address)
        if action == "logs":
            return cmd_logs(args.job, args.address, follow=args.follow, raw=args.raw)
        if action == "stop":
            return cmd_stop(args.job, args.address)
        if action == "status":
            return remote_status(args.job, args.address)
        print("usage: shoal jobs {ls,logs,stop,status} ... (see `shoal jobs --help`)")
        return EXIT_CONFIG
    except (DashboardUnreachable, NotAShoalJob) as e:
        print(f"shoal: {e}", file=sys.stderr)
        return EXIT_FAILED


def _with_address(address: str, text: str) -> str:
    from orchestrator.remote_jobs import resolve_address

    return text if address == resolve_address(None) else f"{text} --address {address}"


def cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator.remote_jobs import RemoteJob, connect, package, submit_package
    from orchestrator.spec import ConfigError, JobSpec

    try:
        spec = JobSpec.from_overrides(args.overrides)
        pkg = package(
            spec,
            working_dir=None if args.no_working_dir else args.working_dir,
            pip=args.pip,
        )
    except ConfigError as e:
        print(f"shoal: bad configuration: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.dry_run:
        print(json.dumps(pkg.to_dict(), indent=1))
        return EXIT_OK
    client, address = connect(args.address)
    job_id = submit_package(client, pkg)
    print(job_id)
    print(
        f"shoal: submitted job {job_id} to {address}\n"
        f"  follow:  {_with_address(address, f'shoal jobs logs {job_id} --follow')}\n"
        f"  status:  {_with_address(address, f'shoal status {job_id}')}\n"
        f"  stop:    {_with_address(address, f'shoal jobs stop {job_id}')}",
        file=sys.stderr,
    )
    if not args.follow:
        return EXIT_OK
    job = RemoteJob(client, job_id, address)
    return _follow_to_end(job)


def _follow_to_end(job: Any) -> int:
    from orchestrator.status import JobState

    job.follow(lambda line: print(line, flush=True))
    final = job.wait(timeout=30)
    return EXIT_OK if final.state == JobState.SUCCEEDED else EXIT_FAILED


def cmd_logs(job_id: str, address: str | None, *, follow: bool, raw: bool) -> int:
    from orchestrator.remote_jobs import RemoteJob, is_machine_line

    job = RemoteJob.find(job_id, address)
    if follow:
        return _follow_to_end(job) if not raw else _follow_raw(job)
    for line in job.client.get_job_logs(job_id).splitlines():
        if raw or not is_machine_line(line):
            print(line)
    return EXIT_OK


def _follow_raw(job: Any) -> int:
    job.follow(lambda line: print(line, flush=True), raw=True)
    return EXIT_OK


def cmd_ls(address: str | None) -> int:
    from orchestrator.remote_jobs import (
        connect,
        is_shoal_job,
        merged_status,
        parse_log,
        shoal_job_id,
    )

    client, resolved = connect(address)
    jobs = [j for j in client.list_jobs() if is_shoal_job(j)]
    if not jobs:
        print(f"no shoal jobs on the cluster at {resolved} (submit one with `shoal submit`)")
        return EXIT_OK
    jobs.sort(key=lambda j: j.start_time or 0)
    print(f"{'id':24} {'state':20} {'step':>11} {'loss':>8} {'wrk':>3}  started")
    for info in jobs:
        job_id = shoal_job_id(info)
        try:
            log = parse_log(client.get_job_logs(info.submission_id))
        except RuntimeError:
            log = parse_log("")
        s = merged_status(job_id, info, log)
        step = f"{s.step}/{s.total_steps}" if s.total_steps else "-"
        loss = f"{s.loss:.4f}" if s.loss is not None else "-"
        started = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.start_time / 1000))
            if info.start_time
            else "-"
        )
        print(f"{job_id:24} {s.state.value:20} {step:>11} {loss:>8} {len(s.workers):>3}  {started}")
    return EXIT_OK


def cmd_stop(job_id: str, address: str | None) -> int:
    from orchestrator.remote_jobs import RemoteJob

    job = RemoteJob.find(job_id, address)
    if job.done():
        print(f"job {job_id} had already ended ({job.status().state.value})")
        return EXIT_OK
    job.stop()
    deadline = time.monotonic() + STOP_WAIT_S
    while not job.done() and time.monotonic() < deadline:
        time.sleep(0.5)
    alive = job.actors_alive()
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = job.actors_alive()
    if alive:
        names = ", ".join(sorted(a.class_name for a in alive))
        print(
            f"shoal: job {job_id}: {len(alive)} actor(s) still alive after {STOP_WAIT_S:.0f}s: "
            f"{names}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(f"job {job_id} stopped ({job.status().state.value}); every actor of it is gone")
    return EXIT_OK


def remote_status(job_id: str, address: str | None) -> int:
    """``shoal status ID`` for a job on a cluster: the same text as for a local run."""
    from orchestrator.remote_jobs import RemoteJob
    from orchestrator.report import summary

    job = RemoteJob.find(job_id, address)
    info = job.info()
    status = job.status(info=info)
    print(summary(status, []))
    print(f"ray job: {job_id} {getattr(info.status, 'value', info.status)} at {job.address}")
    return EXIT_OK
