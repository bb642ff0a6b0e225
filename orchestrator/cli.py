"""``shoal``: the command line, a thin layer over ``orchestrator.api``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import checkpoints_cli, jobs_cli, volunteer_cli

if TYPE_CHECKING:
    import psutil

    from orchestrator.api import JobHandle
    from orchestrator.status import JobStatus

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_CANCELLED = 0, 1, 2, 130

# After the first Ctrl-C, how long the job may take to stop at a step boundary
# before it is stopped at once (a hung step must not hang the command).
CANCEL_GRACE_S = 120.0
# How long the embedded Ray's processes get to exit after ray.shutdown(), and
# then after SIGTERM, before SIGKILL (its agents have been seen to outlive it).
RAY_EXIT_GRACE_S = 1.0
RAY_TERM_GRACE_S = 2.0

_debug_flag = False  # set by `--debug`; see debug_enabled()


def debug_enabled() -> bool:
    """Whether errors should show their traceback: ``shoal --debug ...`` or ``SHOAL_DEBUG=1``."""
    env = os.environ.get("SHOAL_DEBUG", "").strip().lower()
    return _debug_flag or env not in ("", "0", "false", "no")


RUN_EPILOG = """\
overrides are Hydra-style KEY=VALUE pairs; pick a config group with GROUP=OPTION:

  strategy=ddp|zero1|zero2|zero3
                               data parallelism; zero1/2/3 also shard the optimizer
                               state, then the gradients, then the parameters
  strategy=pipeline            the layers cut into strategy.stages=N stages (schedule
                               gpipe|1f1b, partition auto|even); workers/stages replicas
  strategy=moe                 with model=gpt_moe: experts on strategy.expert_hosts=N
                               actors (strategy.k_min, strategy.grace_s: how long a
                               dispatch waits), the rest data-parallel on the workers
  strategy=federated           clients keep their data: strategy.clients=N on cluster.workers
                               actors, strategy.per_round=K a round (one step), a server
                               aggregates (strategy.aggregator=fedavg|fedadam|median|...);
                               strategy.dp.noise_multiplier, strategy.secure_aggregation=true
  gateway.enabled=true         volunteers outside the cluster join over gRPC (TLS, tokens:
                               shoal volunteer token create --run runs/JOB --name alice)
  offload.optimizer=host|nvme  ddp/zero1-3: optimizer state in host memory or NVMe files
                               (offload.nvme_path=DIR), streamed in offload.chunk_mb chunks,
                               offload.prefetch ahead; budgets offload.host_bytes/nvme_bytes;
                               zero3: offload.params=nvme puts parameters and gradients there too
  model=gpt_tiny|gpt_small|gpt_moe|mlp
                               gpt: model.n_layer, model.n_head, model.d_model, model.seq_len;
                               gpt_moe: + model.n_expert, model.top_k, model.capacity_factor;
                               mlp: model.hidden=[128,128] (sizes from the data)
  data=stdlib_text|text_file|digits|arrays
                               text_file: data.path=..., data.tokenizer=bytes|bpe,
                               data.vocab_size=N (bpe); arrays: data.path=x.npz
  model._target_=pkg.mod.Fn    your own model / dataset (data._target_=...) / loss
  task.loss=pkg.mod.fn         (task.loss: fn(model, batch) -> (loss_sum, count)),
                               imported from the working directory or an installed package
  task.type=auto|lm|classification
  train.eval_every=N           held-out loss and accuracy/perplexity every N steps
  cluster.workers=N            cluster.cpus_per_worker, cluster.gpus_per_worker,
                               cluster.address (null: embedded local Ray; else a cluster)
  train.steps, train.global_batch, train.lr, train.seed, train.log_every, ...
  checkpoint.uri (default file://<run_dir>/checkpoints), checkpoint.every, checkpoint.keep
  checkpoint.overwrite=true    start afresh in a run folder / checkpoint.uri that holds
                               another run's checkpoints; they are deleted
  run_dir (default ./runs/<job-id>), resume=latest|<checkpoint URI>

examples:
  shoal run                                     # gpt_tiny on 2 local workers
  shoal run cluster.workers=3 train.steps=500
  shoal run data=text_file data.path=~/book.txt model=gpt_small
  shoal run model=mlp data=digits train.eval_every=20
  shoal run strategy=pipeline strategy.stages=2 train.micro_batches=4
  shoal run model=gpt_moe strategy=moe strategy.expert_hosts=2 cluster.workers=2
  shoal run strategy=federated model=mlp data=digits data.alpha=0.5 train.steps=30
  shoal run data=text_file data.path=book.txt data.tokenizer=bpe data.vocab_size=4096
  shoal run run_dir=runs/a resume=latest        # continue runs/a from its last checkpoint
  shoal config train.lr=1e-3                    # print every field, resolved

Outputs go to the run folder: config.yaml, metrics.jsonl, status.json, loss.png,
sample.txt (language models), tokenizer.json (data.tokenizer=bpe) and checkpoints/.
Ctrl-C cancels at the next step boundary; a second Ctrl-C stops at once.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shoal",
        description="shoal: elastic, sharded training of PyTorch models on Ray.",
        epilog="Run `shoal COMMAND --help` for a command's options.",
    )
    # Only for --help: main() takes --debug out of argv wherever it stands.
    p.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error (also SHOAL_DEBUG=1; accepted after COMMAND too)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="train a model (streams progress; Ctrl-C cancels cleanly)",
        description="Compose a job from configs/ and the overrides, train it, and report.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    run.add_argument("--quiet", action="store_true", help="no progress bar; summary only")
    cfg = sub.add_parser(
        "config",
        help="print the resolved configuration (every field, with overrides applied)",
        description="Print the job configuration that `shoal run` would use.",
    )
    cfg.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    st = sub.add_parser(
        "status",
        help="show the state of runs (from their run folders)",
        description=(
            "Without arguments, list the runs under ./runs; with a run folder (or the id of a "
            "run under ./runs), show it; with the id of a job submitted by `shoal submit`, ask "
            "its cluster's job service (--address)."
        ),
    )
    st.add_argument("run_dir", nargs="?", help="a run folder, or a job id (default: list ./runs)")
    st.add_argument("--address", help="for a submitted job: " + jobs_cli.ADDRESS_HELP)
    st.add_argument("--runs", default="runs", help="where to look for runs (default ./runs)")
    sc = sub.add_parser(
        "scale",
        help="change the number of workers of a running job",
        description=(
            "Set a running job's target number of workers, within its cluster.min_workers and "
            "cluster.max_workers. New workers join, or surplus ones are drained (their state "
            "moved off first), at the next step boundary."
        ),
    )
    sc.add_argument("job", help="the job id, or its run folder")
    sc.add_argument("workers", type=int, help="the new number of workers")
    sc.add_argument("--address", default="auto", help="the job's Ray cluster (default: auto)")
    checkpoints_cli.add_parser(sub)
    jobs_cli.add_parsers(sub)
    volunteer_cli.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    global _debug_flag
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--debug` may stand anywhere, e.g. after `run` among the KEY=VALUE
    # overrides, where no override can look like it.
    _debug_flag = "--debug" in argv
    # A user's own model, dataset or loss (model._target_=mypkg.nets.Net) is
    # imported from the working directory, as `python -m` would; the workers
    # get it on PYTHONPATH (orchestrator.api.ensure_ray).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    parser = _parser()
    args = parser.parse_args([a for a in argv if a != "--debug"])
    return run_guarded(lambda: _dispatch(args, parser))


def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command == "run":
        return cmd_run(args.overrides, quiet=args.quiet)
    if args.command == "config":
        return cmd_config(args.overrides)
    if args.command == "status":
        return cmd_status(args.run_dir, Path(args.runs), args.address)
    if args.command == "checkpoints":
        return checkpoints_cli.run(args)
    if args.command in ("submit", "jobs"):
        return jobs_cli.run(args)
    if args.command == "volunteer":
        return volunteer_cli.main(args)
    if args.command == "scale":
        return cmd_scale(args.job, args.workers, args.address)
    parser.print_help()
    return EXIT_OK


def run_guarded(command: Callable[[], int]) -> int:
    """Run a command; whatever escapes it becomes one line on stderr and an exit code.

    Commands report the errors they expect themselves; this is the last line
    of defence, so that a user never has to read a traceback unless
    ``debug_enabled()`` asks for one. Ctrl-C gives ``EXIT_CANCELLED``,
    anything else ``EXIT_FAILED``.
    """
    try:
        return command()
    except KeyboardInterrupt:
        if debug_enabled():
            traceback.print_exc()
        print("\nshoal: interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as e:  # noqa: BLE001 - the last line of defence, by design
        if debug_enabled():
            traceback.print_exc()
            print(f"shoal: {one_line(e)}", file=sys.stderr)
        else:
            print(f"shoal: {one_line(e)} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILED


def one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _spec_or_exit(overrides: list[str]):
    from orchestrator.spec import ConfigError, JobSpec

    try:
        return JobSpec.from_overrides(overrides)
    except ConfigError as e:
        print(f"shoal: bad configuration: {e}", file=sys.stderr)
        return None


def cmd_config(overrides: list[str]) -> int:
    spec = _spec_or_exit(overrides)
    if spec is None:
        return EXIT_CONFIG
    print(spec.to_yaml(), end="")
    return EXIT_OK


def cmd_run(overrides: list[str], quiet: bool = False) -> int:
    spec = _spec_or_exit(overrides)
    if spec is None:
        return EXIT_CONFIG
    from orchestrator.api import submit
    from orchestrator.report import summary
    from orchestrator.spec import ConfigError

    t0 = time.time()
    embedded = spec.cluster.address is None
    print(f"shoal: job {spec.job_id} -> {spec.run_dir}", file=sys.stderr)
    try:
        handle = submit(spec)
    except ConfigError as e:
        print(f"shoal: bad configuration: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("\nshoal: interrupted while starting; nothing was trained", file=sys.stderr)
        with CtrlC():  # a further Ctrl-C must not cut the clean-up short
            _leave_ray(embedded)
        return EXIT_CANCELLED
    plan = getattr(handle, "offload_plan", None)
    for line in plan.lines() if plan is not None else []:
        print(f"shoal: {line}", file=sys.stderr)  # before training starts: where state lives
    with CtrlC() as ctrl_c:
        final = _follow(handle, quiet, t0, ctrl_c)
        if final is None:
            print(
                "shoal: stopped at once, in the middle of a step; "
                "`resume=latest` continues from the last checkpoint",
                file=sys.stderr,
            )
        else:
            print(summary(final, handle.metrics()))
        _leave_ray(embedded)
    return _run_exit_code(final)


def _run_exit_code(final: JobStatus | None) -> int:
    from orchestrator.status import JobState

    if final is None or final.state == JobState.CANCELLED:
        return EXIT_CANCELLED
    return EXIT_OK if final.state == JobState.SUCCEEDED else EXIT_FAILED


class CtrlC:
    """While active, Ctrl-C (SIGINT) is counted instead of raising KeyboardInterrupt.

    A KeyboardInterrupt raised inside Ray's code (a ``ray.get`` or ``ray.wait``,
    or the ``ray.shutdown`` run at exit) has ended the process with SIGABRT,
    SIGSEGV or a traceback, cutting Ray's clean-up short; a counter read
    between short waits cannot. Only the main thread may set a handler, and a SIGINT that is
    ignored (``nohup``, a background job) stays ignored.
    """

    def __init__(self) -> None:
        self.count = 0
        self._previous: Any = None
        self._installed = False

    def pressed(self) -> bool:
        return self.count > 0

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.count += 1

    def __enter__(self) -> CtrlC:
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
        ):
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False


def _follow(handle: JobHandle, quiet: bool, t0: float, ctrl_c: CtrlC) -> JobStatus | None:
    """Show progress until the job ends; on Ctrl-C cancel it at the next step boundary.

    Returns the job's final status, or None when it must be stopped at once:
    a second Ctrl-C, or no step boundary within ``CANCEL_GRACE_S``.
    """
    _stream_progress(handle, quiet, t0, stop=ctrl_c.pressed)
    if not ctrl_c.pressed():
        return handle.wait()
    print(
        "\nshoal: cancelling (finishing the current step; Ctrl-C again stops at once)...",
        file=sys.stderr,
    )
    handle.cancel()
    deadline = time.monotonic() + CANCEL_GRACE_S
    # Short polls, so that a second Ctrl-C is seen within a fraction of a second.
    while ctrl_c.count < 2:
        if handle.done():
            return handle.wait()
        if time.monotonic() > deadline:
            print(f"shoal: no step boundary within {CANCEL_GRACE_S:.0f}s", file=sys.stderr)
            return None
        time.sleep(0.2)
    return None


def _leave_ray(embedded: bool) -> None:
    """Disconnect from Ray; an embedded instance is stopped with every process it started.

    ``ray.shutdown()`` stops the processes ``ray.init(address="local")``
    started, but not always all of them (its agents have outlived it, and a
    start-up cut short leaves some it does not know of), so whatever still
    runs is stopped here. With a
    cluster, disconnecting ends this job's actors and leaves the cluster up.
    """
    import ray

    if not embedded:
        ray.shutdown()
        return
    processes = _embedded_ray_processes()
    ray.shutdown()
    _stop_survivors(processes)


def _embedded_ray_processes() -> list[psutil.Process]:
    """This process's descendants (GCS, raylet, agents, workers), and any other
    process naming the Ray session in its command line (one re-parented already)."""
    psutil = _psutil()
    me = psutil.Process()
    found = {p.pid: p for p in _safe(lambda: me.children(recursive=True), [])}
    session = _session_name()
    if session:
        for p in psutil.process_iter(["cmdline"]):
            if p.pid != me.pid and any(session in a for a in p.info["cmdline"] or ()):
                found.setdefault(p.pid, p)
    return list(found.values())


def _session_name() -> str | None:
    import ray

    if not ray.is_initialized():
        return None
    return _safe(lambda: ray.get_runtime_context().get_session_name(), None)


def _stop_survivors(processes: list[psutil.Process]) -> None:
    """Stop whichever of ``processes`` ``ray.shutdown()`` left running.

    Those it stopped need a moment to go (a worker exits once its raylet
    has); the rest get SIGTERM, then SIGKILL (Ray's agents have ignored
    SIGTERM; a start-up cut short leaves processes Ray does not know of yet).
    """
    alive = _wait_gone(processes, RAY_EXIT_GRACE_S)
    if alive and debug_enabled():
        names = ", ".join(sorted({_safe(p.name, "?") for p in alive}))
        print(f"shoal: stopping Ray processes ray.shutdown() left: {names}", file=sys.stderr)
    for how in ("terminate", "kill"):
        _signal_each(alive, how)
        alive = _wait_gone(alive, RAY_TERM_GRACE_S)
    if alive and debug_enabled():
        print(f"shoal: Ray processes still alive: {[p.pid for p in alive]}", file=sys.stderr)


def _signal_each(processes: list[psutil.Process], how: str) -> None:
    psutil = _psutil()
    for p in processes:
        try:
            getattr(p, how)()
        except psutil.Error:
            pass  # gone already, or not ours to signal


def _wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Those of ``processes`` still running after up to ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in processes if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def _running(p: psutil.Process) -> bool:
    psutil = _psutil()
    try:
        # A zombie has exited; it waits for a parent (maybe init) to reap it.
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _psutil() -> Any:
    """psutil as Ray bundles it: importing ray puts it on ``sys.path``."""
    import importlib

    import ray  # noqa: F401

    return importlib.import_module("psutil")


def _safe(fn: Callable[[], Any], default: Any) -> Any:
    """``fn()``, or ``default`` if it raises: clean-up must go on past what it cannot see."""
    try:
        return fn()
    except Exception:  # noqa: BLE001 - best effort by design
        return default


def _stream_progress(
    handle: JobHandle, quiet: bool, t0: float, stop: Callable[[], bool] = lambda: False
) -> None:
    """A progress bar with step, loss, tokens/s and ETA until the job ends or ``stop()``."""
    from tqdm import tqdm

    from orchestrator.status import JobState

    total = handle.spec.train.steps
    bar = None
    seen = 0
    held_out: dict[str, float] = {}
    shown_start = False
    while not handle.done() and not stop():
        time.sleep(0.5)
        if bar is None:
            status = handle.status()
            if status.state == JobState.STARTING and not shown_start and not quiet:
                print("shoal: starting workers...", file=sys.stderr)
                shown_start = True
            if status.state != JobState.RUNNING:
                continue
            if not quiet:
                # Created when training starts, so the rate and ETA exclude start-up.
                bar = tqdm(
                    total=total,
                    initial=status.step,
                    unit="step",
                    dynamic_ncols=True,
                    file=sys.stderr,
                )
        new = handle.metrics(since=seen)
        if not new:
            continue
        if seen == 0 and not quiet:
            print(f"shoal: first step after {time.time() - t0:.1f}s", file=sys.stderr)
        seen += len(new)
        if bar is not None:
            _show(bar, new, held_out)
    if bar is not None:
        rest = handle.metrics(since=seen)
        if rest:
            _show(bar, rest, held_out)
        bar.close()


def _show(bar, records: list[dict], held_out: dict[str, float]) -> None:
    """Advance the bar to the newest of ``records``; ``held_out`` keeps the last eval metrics
    (evaluations are every ``train.eval_every`` steps, the bar shows them until the next)."""
    for r in records:
        held_out.update({k: r[k] for k in ("accuracy", "perplexity") if k in r})
    record = {**held_out, **records[-1]}
    bar.update(record["step"] + 1 - bar.n)
    if "tokens_per_s" in record:  # a language model's rate in tokens, else in samples
        record.pop("samples_per_s", None)
    shown = {label: f"{record[key]:{spec}}" for key, label, spec in _POSTFIX if key in record}
    bar.set_postfix(shown)


# What the progress bar shows of a step record: (key, label, format).
_POSTFIX = (
    ("loss", "loss", ".3f"),
    ("tokens_per_s", "tok_s", ",.0f"),
    ("samples_per_s", "samples_s", ",.0f"),
    ("accuracy", "acc", ".1%"),
    ("perplexity", "eval_ppl", ".3g"),
    ("tflops", "TFLOPs", ".3g"),
    ("mfu", "MFU", ".1%"),
)


def cmd_scale(job: str, workers: int, address: str) -> int:
    from orchestrator.api import scale_job
    from orchestrator.status import StatusError, StatusMissing, load_status

    try:
        job_id = load_status(Path(job)).job_id
    except StatusMissing:
        job_id = job  # not a run folder: a job id
    except StatusError as e:
        print(f"shoal: {e}; give the job id instead", file=sys.stderr)
        return EXIT_FAILED
    try:
        target = scale_job(job_id, workers, address)
    except Exception as e:  # noqa: BLE001 - Ray's errors here are many; the message is what counts
        print(
            f"shoal: cannot reach job {job_id} through Ray at {address!r}: {e}\n"
            "(`shoal scale` works while the job runs; for a job started by `shoal run` on this "
            "machine the default --address auto finds it)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(scale_message(job_id, workers, target))
    return EXIT_OK


def scale_message(job_id: str, asked: int, target: int) -> str:
    """What ``shoal scale`` reports: the target set, and whether it is not the one asked for."""
    if target == asked:
        return f"job {job_id}: target {target} workers (applied at the next step boundary)"
    return (
        f"job {job_id}: asked for {asked} workers; clamped to {target} (the job's "
        "cluster.min_workers..cluster.max_workers range); applied at the next step boundary"
    )


def cmd_status(run_dir: str | None, runs_root: Path, address: str | None = None) -> int:
    """One run folder in full, or a table of the newest runs under ``runs_root``.

    A folder whose ``status.json`` cannot be used is one line naming the
    path and the problem (exit 1 for a single folder); in the table, the
    other runs are still shown. A name that is no folder here (nor under
    ``runs_root``), and no path, is a submitted job's id: its cluster's job service answers.
    """
    from orchestrator.status import StatusError, load_status

    if run_dir and not Path(run_dir).exists() and "/" not in run_dir:
        if (runs_root / run_dir).is_dir():
            run_dir = str(runs_root / run_dir)
        else:
            return jobs_cli.run(
                argparse.Namespace(
                    command="jobs", jobs_command="status", job=run_dir, address=address
                )
            )
    if run_dir:
        try:
            print(_status_text(load_status(Path(run_dir)), Path(run_dir) / "status.json"))
        except StatusError as e:
            print(f"shoal: {e}", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK
    return _list_runs(runs_root)


def _status_text(status: JobStatus, path: Path) -> str:
    from orchestrator.report import summary
    from orchestrator.status import StatusError

    try:
        return summary(_mark_interrupted(status), [])
    except (KeyError, TypeError, ValueError) as e:
        # Fields are type-checked on reading; this is what lies inside them (workers' dicts).
        raise StatusError(f"unexpected content ({one_line(e)})", path) from None


def _list_runs(runs_root: Path) -> int:
    from orchestrator.status import StatusError, StatusMissing, load_status

    rows, bad = [], []
    for folder in _newest_folders(runs_root, 30):
        try:
            rows.append(_status_row(_mark_interrupted(load_status(folder))))
        except StatusMissing:
            continue  # not a run folder
        except StatusError as e:
            bad.append(f"{folder}: unreadable status.json ({e.problem})")
    if not rows and not bad:
        print(f"no runs under {runs_root}/ (start one with `shoal run`)")
        return EXIT_OK
    if rows:
        header = (
            f"{'job':24} {'state':20} {'step':>11} {'loss':>7} {'wrk':>3} {'ep':>3} {'lost':>4}"
        )
        print(header + "  folder")
        print("\n".join(rows))
    if bad:
        print("\n".join(bad))
    return EXIT_OK


def _newest_folders(root: Path, n: int) -> list[Path]:
    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:  # e.g. a link to a folder that has gone
            return 0.0

    return sorted(root.glob("*/"), key=mtime, reverse=True)[:n]


def _status_row(s: JobStatus) -> str:
    loss = f"{s.loss:.3f}" if s.loss is not None else "-"
    step = f"{s.step}/{s.total_steps}"
    return (
        f"{s.job_id:24} {s.state.value:20} {step:>11} {loss:>7} {len(s.workers):>3} "
        f"{s.epoch:>3} {s.failures_survived:>4}  {s.run_dir}"
    )


def _mark_interrupted(status: JobStatus) -> JobStatus:
    """A run whose status says running but whose driver process is gone was interrupted."""
    from orchestrator.status import JobState

    if not status.state.finished and status.driver_pid and not _alive(status.driver_pid):
        status.state = JobState.FAILED
        status.error = "interrupted: the process that ran it exited (resume with resume=latest)"
    return status


def _alive(pid: int) -> bool:
    if pid <= 0:  # 0 and negative ids name process groups, never a driver
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    sys.exit(main())
