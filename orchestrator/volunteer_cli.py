"""``shoal volunteer``: tokens for a job's gateway, and joining one from another machine.

- ``shoal volunteer token create --run runs/JOB --name alice`` prints a
  token (shown once; only a salted hash is kept, in
  ``runs/JOB/gateway/tokens.json``); ``token revoke`` and ``token ls``.
- ``shoal volunteer join --gateway HOST:PORT --token T --ca runs/JOB/gateway/ca.pem``
  connects out (TLS, verified against the run's CA; no inbound port is
  needed), does the work items the job sends — federated client rounds,
  or serving a replica of an expert host's experts — and shows what it is
  doing; it reconnects after a network drop
  and leaves cleanly on Ctrl-C.

What a volunteer builds is named by the gateway (the job's model, data and
training settings), so a volunteer only ever instantiates shoal's own
built-in models and datasets: a job asking for anything else is refused
(``actors/volunteer_work.py``).
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import sys
import threading
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    vol = sub.add_parser(
        "volunteer",
        help="Give a job's gateway tokens, or join one as a volunteer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    vsub = vol.add_subparsers(dest="volunteer_command", required=True)
    token = vsub.add_parser("token", help="Create, revoke or list a run's volunteer tokens")
    tsub = token.add_subparsers(dest="token_command", required=True)
    for name, text in (
        ("create", "Make a token for a volunteer (printed once)"),
        ("revoke", "Revoke a volunteer's token (it is disconnected within a heartbeat)"),
        ("ls", "List the run's tokens"),
    ):
        p = tsub.add_parser(name, help=text)
        p.add_argument("--run", required=True, help="the job's run folder, e.g. runs/JOB")
        if name != "ls":
            p.add_argument("--name", required=True, help="the volunteer's name")
    join = vsub.add_parser(
        "join",
        help="Join a job's gateway and train for it until Ctrl-C",
        description="Connect to a job's gateway (TLS, your token) and do its work items.",
    )
    join.add_argument("--gateway", required=True, help="HOST:PORT of the job's gateway")
    join.add_argument("--token", required=True, help="the token `volunteer token create` printed")
    join.add_argument("--ca", required=True, help="the run's gateway/ca.pem")
    join.add_argument("--name", default=None, help="shown in `shoal status` (default: user@host)")


def main(args: argparse.Namespace) -> int:
    if args.volunteer_command == "token":
        return _token(args)
    return _join(args)


def _token(args: argparse.Namespace) -> int:
    from storage.gateway_trust import create_token, gateway_dir, list_tokens, revoke_token

    if args.token_command == "create":
        token = create_token(args.run, args.name)
        ca = gateway_dir(args.run) / "ca.pem"
        print(token)
        print(
            f"(shown once) volunteer {args.name!r} joins with:\n"
            f"  shoal volunteer join --gateway HOST:PORT --token {token} --ca {ca}",
            file=sys.stderr,
        )
        return 0
    if args.token_command == "revoke":
        revoke_token(args.run, args.name)
        print(f"revoked {args.name!r}: new connections are refused; a connected one is dropped")
        return 0
    for t in list_tokens(args.run):
        state = "revoked" if t.revoked else "active"
        print(f"{t.name:<20} {state:<8} created {t.created}")
    return 0


def _join(args: argparse.Namespace) -> int:
    from actors.volunteer_client import VolunteerClient
    from actors.volunteer_work import KINDS, VolunteerWork

    name = args.name or f"{getpass.getuser()}@{socket.gethostname()}"
    holder: dict[str, VolunteerWork] = {}

    def handler(method: str, tensors: dict, work_args: dict) -> tuple[dict, dict]:
        if "work" not in holder:  # the job's settings arrive with the gateway's Welcome
            holder["work"] = VolunteerWork(client.job_config())
        return holder["work"](method, tensors, work_args)

    client = VolunteerClient(args.gateway, args.token, args.ca, name, {"kinds": KINDS}, handler)
    print(f"shoal volunteer {name!r}: joining {args.gateway} (Ctrl-C leaves)", flush=True)
    stop = threading.Event()

    def show() -> None:
        last = None
        while not stop.wait(1.0):
            st = client.status()
            line = (
                f"{'connected' if st.connected else 'connecting'}: work done {st.work_done}, "
                f"failed {st.work_failed}, credit {st.credit:g}"
                + (f"; last error: {st.last_error}" if st.last_error else "")
            )
            if line != last:
                print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
                last = line

    threading.Thread(target=show, daemon=True).start()
    try:
        client.run_forever()
    finally:
        stop.set()
    st = client.status()
    print(f"left: work done {st.work_done}, credit {st.credit:g}", flush=True)
    sys.stderr.flush()
    # Done and left: exit now. Interpreter teardown with gRPC's threads still
    # unwinding has aborted the process (SIGABRT) after a clean leave.
    os._exit(0)
