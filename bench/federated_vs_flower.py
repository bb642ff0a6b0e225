"""strategy=federated vs Flower's simulation engine vs a one-process loop, on one workload.

    python bench/federated_vs_flower.py                         # configs A and B, 2 runs each
    python bench/federated_vs_flower.py --configs a --repeats 1 --skip-flower
    python bench/federated_vs_flower.py --shoal-workers 1,2     # shoal with 1 and 2 client actors

**Workload** (the same for all three): a synthetic 10-class problem,
``--samples`` rows of 32 features (class means drawn from N(0, I) times
``--separation``, unit-variance noise; seeded), written to an ``.npz``;
20% held out. Training rows are dealt to the clients with label skew,
Dirichlet(alpha = 0.5) per class. MLP 32 -> 128 -> 10 (shoal's
``model=mlp``: GELU, not ReLU, and that activation is used everywhere).
FedAvg (updates weighted by the client's rows), 1 local epoch, batch 32,
plain SGD at lr 0.05, 10 rounds; after every round the global model is
evaluated on all held-out rows (in batches of 32, as shoal does).

- Config A: 20 clients, 10 per round. Config B: 1000 clients, 50 per round.

**Identical work.** This script computes, with shoal's own functions, what
shoal computes: the held-out rows (``actors.datasets.arrays``), each
client's rows (``actors.client_data.client_rows``, seeded by train.seed),
the clients of each round (``actors.fed_server.sample_clients``) and the
initial weights (``torch.manual_seed(seed)`` then ``MLP``). It writes them
to one ``.npz`` that the floor and the Flower run read; their local
training shuffles each client's rows with shoal's seed for
``(seed, round, client)``. So the three train the same clients on the same
rows in the same order from the same weights: their accuracies should agree
to float rounding (the order of the sums differs), and their times measure
the systems, not the sampling.

**Systems.** Each is a fresh process (its start-up counted), run one after
another, interleaved by repeat so that the shared machine's noise spreads
over all of them:

- **shoal**: ``shoal run strategy=federated ...`` (the overrides are printed
  with the table), ``cluster.workers`` = ``--shoal-workers`` client actors
  plus the server actor. Round times: ``step_time_s`` of
  ``run_dir/metrics.jsonl`` (the controller's time between rounds done:
  dispatch, local training, aggregation, evaluation); accuracy: its
  ``accuracy`` (``train.eval_batches`` set to cover every held-out row).
- **Flower**: ``flwr.simulation.run_simulation`` (the Ray-based simulation
  engine) with a ``ServerApp`` running ``flwr.serverapp.strategy.FedAvg``
  and a ``ClientApp`` whose train function does the local epoch; in its
  own virtualenv (``--flower-venv``, made on first use: ``flwr[simulation]``
  with torch pinned to this venv's release, Ray as Flower's pin resolves).
  ``--flower-actors`` Ray CPUs, 1 per client (so as many ClientApp actors
  as shoal has client actors). Flower picks the nodes of a round (its own
  sampling); the round's message tells each node which client's rows to
  train (shoal's sample), read from the ``.npz`` once per actor process and
  kept, as shoal's client actors keep theirs. Centralized evaluation
  (``evaluate_fn``) after each round, no federated evaluation. Round time:
  between the ends of consecutive ``evaluate_fn`` calls.
- **floor**: one process, plain PyTorch, one thread: the same clients
  trained one after another, the weighted average, the evaluation. Round
  time: the loop's own clock.

**Reported** per config and system, medians over ``--repeats`` runs: the
median seconds per round (all rounds: the first pays for warm-up, the median
ignores it), the total wall time of the process (start to exit), the part of
it that is not rounds (``total - rounds x median round``: start-up, the first
round's warm-up and teardown), and the final held-out accuracy. Then the
ratios against the goals: shoal within 1.5x the floor per round, and at
least 3x faster than Flower per round, at equal accuracy.

No assertions: the table goes to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent

# The workload (see the module docstring).
FEATURES = 32
CLASSES = 10
HIDDEN = 128
TEST_FRACTION = 0.2
ALPHA = 0.5
ROUNDS = 10
LOCAL_EPOCHS = 1
BATCH = 32
CLIENT_LR = 0.05
EVAL_BATCH = 32  # shoal evaluates in batches of train.global_batch (32)


@dataclass(frozen=True)
class FedConfig:
    name: str
    clients: int
    per_round: int


CONFIGS = {"a": FedConfig("A", 20, 10), "b": FedConfig("B", 1000, 50)}


def log(text: str) -> None:
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"[{time.strftime('%H:%M:%S')} load {load}] {text}", flush=True)


# -- shared by the floor and Flower's ClientApp (no shoal imports) -------------------


class Net(nn.Module):
    """shoal's ``model=mlp``, ``hidden=[128]``: the same modules, so the same state_dict keys."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(FEATURES, HIDDEN),
            nn.GELU(),
            nn.Dropout(0.0),
            nn.Linear(HIDDEN, CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class Prepared:
    """What ``prepare`` wrote: the data, the split, the clients' rows, the rounds' clients."""

    x: torch.Tensor
    y: torch.Tensor
    test_rows: np.ndarray
    shards: list[np.ndarray]
    sampled: np.ndarray  # [rounds, per_round] client ids
    init: dict[str, torch.Tensor]
    seed: int
    _clients: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @staticmethod
    def load(path: str) -> Prepared:
        with np.load(path, allow_pickle=False) as f:
            offsets = f["shard_offsets"]
            rows = f["shard_rows"]
            shards = [rows[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
            init = {k[5:]: torch.from_numpy(f[k]) for k in f if k.startswith("init/")}
            return Prepared(
                x=torch.from_numpy(f["x"]),
                y=torch.from_numpy(f["y"]),
                test_rows=f["test_rows"],
                shards=shards,
                sampled=f["sampled"],
                init=init,
                seed=int(f["seed"]),
            )

    def client(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client ``c``'s rows as tensors, gathered once and kept (as shoal's actors keep them)."""
        if c not in self._clients:
            rows = torch.from_numpy(self.shards[c])
            self._clients[c] = (self.x[rows], self.y[rows])
        return self._clients[c]

    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(self.test_rows)
        return self.x[rows], self.y[rows]


_PREPARED: dict[str, Prepared] = {}


def prepared(path: str) -> Prepared:
    """``Prepared.load(path)``, once per process (a Flower actor serves many calls)."""
    if path not in _PREPARED:
        _PREPARED[path] = Prepared.load(path)
    return _PREPARED[path]


def local_train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, round_: int, client: int
) -> tuple[int, float]:
    """shoal's local training (``actors/fed_clients.py``): ``LOCAL_EPOCHS`` passes over the
    client's rows in shuffled batches of ``BATCH``, plain SGD on the mean cross-entropy, the
    shuffle seeded by ``(seed, round, client)``. Returns (rows, mean training loss)."""
    n = len(y)
    s = np.random.SeedSequence([seed, round_, client]).generate_state(1)[0]
    gen = torch.Generator().manual_seed(int(s))
    torch.randint(0, 2**31 - 1, (1,), generator=gen)  # shoal draws its dropout seed first
    opt = torch.optim.SGD(model.parameters(), lr=CLIENT_LR)
    model.train()
    loss_sum, steps = 0.0, 0
    for _ in range(LOCAL_EPOCHS):
        order = torch.randperm(n, generator=gen)
        for lo in range(0, n, BATCH):
            rows = order[lo : lo + BATCH]
            opt.zero_grad(set_to_none=False)
            loss = F.cross_entropy(model(x[rows]), y[rows])
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(rows)
            steps += len(rows)
    return n, loss_sum / max(steps, 1)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of rows classified right, in batches of ``EVAL_BATCH`` (as shoal evaluates)."""
    model.eval()
    correct = 0
    for lo in range(0, len(y), EVAL_BATCH):
        correct += int((model(x[lo : lo + EVAL_BATCH]).argmax(-1) == y[lo : lo + EVAL_BATCH]).sum())
    return correct / len(y)


# -- the floor: one process, plain PyTorch -------------------------------------------


@torch.no_grad()
def set_flat(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    """Copy ``flat`` into the parameters (``vector_to_parameters`` would alias it)."""
    lo = 0
    for p in params:
        p.copy_(flat[lo : lo + p.numel()].view_as(p))
        lo += p.numel()


def floor_main(prep_path: str) -> None:
    """Train every round's clients one after another; print the rounds as JSON."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    prep = prepared(prep_path)
    model = Net()
    model.load_state_dict(prep.init)
    for c in sorted({int(c) for c in prep.sampled.ravel()}):
        prep.client(c)  # resident, as in shoal's client actors (start-up, not rounds)
    x_test, y_test = prep.test()
    params = list(model.parameters())
    rounds = []
    ready_s = time.perf_counter() - start
    for r, clients in enumerate(prep.sampled):
        t0 = time.perf_counter()
        w = nn.utils.parameters_to_vector(params).detach()  # a copy
        total, weight = torch.zeros_like(w), 0
        for c in clients:
            set_flat(params, w)
            x, y = prep.client(int(c))
            n, _ = local_train(model, x, y, prep.seed, r, int(c))
            total.add_(nn.utils.parameters_to_vector(params).detach() - w, alpha=float(n))
            weight += n
        set_flat(params, w + total / weight)
        acc = accuracy(model, x_test, y_test)
        rounds.append({"time_s": time.perf_counter() - t0, "accuracy": acc})
    print("RESULT " + json.dumps({"rounds": rounds, "ready_s": ready_s}), flush=True)


# -- Flower: its venv's side (imports flwr; no shoal imports) -------------------------


def flower_train(msg: Any, context: Any) -> Any:
    """The ClientApp's train function: the round's client (named in the message) trains."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    torch.set_num_threads(1)
    cfg = msg.content["config"]
    prep = prepared(str(cfg["prep"]))
    client, round_ = int(cfg["client"]), int(cfg["server-round"]) - 1
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = prep.client(client)
    n, loss = local_train(model, x, y, prep.seed, round_, client)
    reply = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": n, "train-loss": loss}),
        }
    )
    return Message(content=reply, reply_to=msg)


def flower_main(prep_path: str, actors: int) -> None:
    """Run the workload in Flower's simulation engine; print the rounds as JSON."""
    import importlib
    import logging

    import flwr
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    torch.set_num_threads(1)
    start = time.perf_counter()
    # By reference (the module, not __main__), so that Ray's actors import it once and
    # keep its cache of client rows between calls.
    here = importlib.import_module(Path(__file__).stem)
    prep = prepared(prep_path)
    sampled = prep.sampled
    clients, per_round = len(prep.shards), sampled.shape[1]
    x_test, y_test = prep.test()
    ends: list[float] = []
    accs: list[float] = []

    class SampledFedAvg(FedAvg):
        """FedAvg whose round-r nodes (Flower's sample) train shoal's round-r clients."""

        def configure_train(self, server_round, arrays, config, grid):  # type: ignore[override]
            msgs = list(super().configure_train(server_round, arrays, config, grid))
            chosen = [int(c) for c in sampled[server_round - 1]]
            if len(msgs) != len(chosen):
                raise RuntimeError(f"Flower sampled {len(msgs)} nodes, expected {len(chosen)}")
            out = []
            for m, c in zip(msgs, chosen, strict=True):
                cfg = ConfigRecord({**dict(config), "client": c})
                out.append(
                    Message(
                        content=RecordDict({self.arrayrecord_key: arrays, "config": cfg}),
                        message_type=MessageType.TRAIN,
                        dst_node_id=m.metadata.dst_node_id,
                    )
                )
            return out

    def evaluate(server_round: int, arrays: Any) -> Any:
        model = Net()
        model.load_state_dict(arrays.to_torch_state_dict())
        acc = accuracy(model, x_test, y_test)
        if server_round > 0:
            accs.append(acc)
        ends.append(time.perf_counter())
        return MetricRecord({"accuracy": acc})

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Any, context: Any) -> None:
        strategy = SampledFedAvg(
            fraction_train=per_round / clients,
            fraction_evaluate=0.0,  # no federated evaluation: the server's evaluate_fn
            min_train_nodes=per_round,
            min_available_nodes=clients,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(dict(prep.init)),
            train_config=ConfigRecord({"prep": str(Path(prep_path).resolve())}),
            num_rounds=len(sampled),
            evaluate_fn=evaluate,
        )

    client_app = ClientApp()
    client_app.train()(here.flower_train)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": actors, "logging_level": logging.WARNING},
        },
    )
    rounds = [
        {"time_s": b - a, "accuracy": acc}
        for a, b, acc in zip(ends[:-1], ends[1:], accs, strict=True)
    ]
    if len(rounds) != len(sampled):
        raise RuntimeError(f"Flower ran {len(rounds)} rounds of {len(sampled)}")
    import ray

    print(
        "RESULT "
        + json.dumps(
            {
                "rounds": rounds,
                "ready_s": ends[0] - start,
                "flwr": flwr.__version__,
                "ray": ray.__version__,
                "torch": torch.__version__,
            }
        ),
        flush=True,
    )


# -- the driver (shoal's venv) ---------------------------------------------------------


@dataclass
class Run:
    """One process run of one system on one config."""

    config: str
    system: str  # "shoal w=2", "Flower", "floor"
    repeat: int
    wall_s: float
    round_s: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and len(self.round_s) == ROUNDS

    @property
    def median_round(self) -> float:
        return statistics.median(self.round_s)

    @property
    def other_s(self) -> float:
        """Wall time that is not rounds: start-up, the first round's warm-up, teardown."""
        return self.wall_s - ROUNDS * self.median_round


def run_timed(cmd: list[str], log_path: Path, timeout: float, env: dict | None = None):
    """``cmd`` in its own session (killed whole on timeout): (exit code, wall s, stdout)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as err:
        p = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
            start_new_session=True,
        )  # fmt: skip
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
            return None, time.perf_counter() - t0, out
    return p.returncode, time.perf_counter() - t0, out


def tail(path: Path, n: int = 8) -> str:
    lines = path.read_text(errors="replace").strip().splitlines()
    return "\n".join(lines[-n:])


def make_data(path: Path, samples: int, separation: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((CLASSES, FEATURES)) * separation
    y = rng.integers(0, CLASSES, samples)
    x = (means[y] + rng.standard_normal((samples, FEATURES))).astype(np.float32)
    np.savez(path, x=x, y=y.astype(np.int64))


def prepare(data_path: Path, cfg: FedConfig, seed: int, out: Path) -> int:
    """What shoal will compute (see the module docstring), written for the floor and Flower.

    Returns the number of held-out rows."""
    from actors.client_data import client_rows
    from actors.datasets import arrays
    from actors.fed_server import sample_clients
    from actors.models.mlp import MLP

    data = arrays(str(data_path), test_fraction=TEST_FRACTION, alpha=ALPHA)
    shards = client_rows(data, cfg.clients, seed, None)
    sampled = [sample_clients(seed, r, 0, cfg.clients, cfg.per_round) for r in range(ROUNDS)]
    torch.manual_seed(seed)
    init = MLP(in_features=FEATURES, num_classes=CLASSES, hidden=[HIDDEN]).state_dict()
    np.savez(
        out,
        x=data.x,
        y=data.y,
        test_rows=data.test_rows,
        shard_rows=np.concatenate(shards),
        shard_offsets=np.cumsum([0] + [len(s) for s in shards]),
        sampled=np.asarray(sampled, dtype=np.int64),
        seed=np.int64(seed),
        **{f"init/{k}": v.numpy() for k, v in init.items()},
    )
    return len(data.test_rows)


def shoal_overrides(
    args: argparse.Namespace, cfg: FedConfig, data: Path, workers: int, n_test: int, run_dir: Path
) -> list[str]:
    return [
        "strategy=federated",
        "model=mlp",
        f"model.hidden=[{HIDDEN}]",
        "data=arrays",
        f"data.path={data}",
        f"data.test_fraction={TEST_FRACTION}",
        f"data.alpha={ALPHA}",
        f"strategy.clients={cfg.clients}",
        f"strategy.per_round={cfg.per_round}",
        f"strategy.local_epochs={LOCAL_EPOCHS}",
        "strategy.local_steps=null",  # whole epochs, as the floor and Flower train
        f"strategy.batch_size={BATCH}",
        f"strategy.client_lr={CLIENT_LR}",
        f"train.steps={ROUNDS}",
        f"train.seed={args.seed}",
        f"train.eval_batches={math.ceil(n_test / EVAL_BATCH)}",  # every held-out row
        f"cluster.workers={workers}",
        "train.sample_tokens=0",
        f"run_dir={run_dir}",
        "checkpoint.every=0",
    ]


def run_shoal(
    args: argparse.Namespace, cfg: FedConfig, data: Path, n_test: int, workers: int, rep: int
) -> Run:
    run_dir = args.workdir / f"shoal-{cfg.name}-w{workers}-r{rep}"
    overrides = shoal_overrides(args, cfg, data, workers, n_test, run_dir)
    shoal = Path(sys.executable).with_name("shoal")
    log_path = args.workdir / f"{run_dir.name}.log"
    rc, wall, _ = run_timed([str(shoal), "run", *overrides], log_path, args.timeout)
    run = Run(cfg.name, f"shoal w={workers}", rep, wall, extra={"log": str(log_path)})
    metrics = run_dir / "metrics.jsonl"
    records = (
        [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    )
    run.round_s = [float(r["step_time_s"]) for r in records]
    run.accuracy = [float(r["accuracy"]) for r in records if "accuracy" in r]
    run.extra["clients_finished"] = [r.get("clients_finished") for r in records]
    status = run_dir / "status.json"
    if status.exists():
        startup = json.loads(status.read_text()).get("startup_s") or {}
        run.extra["first_step_s"] = startup.get("first_step")
    if rc != 0 or len(records) != ROUNDS:
        why = "timed out" if rc is None else f"exit {rc}"
        run.error = f"{why}, {len(records)} rounds recorded:\n{tail(log_path)}"
    return run


def run_worker(
    args: argparse.Namespace, python: str, role: str, cfg: FedConfig, prep: Path, rep: int
) -> Run:
    """The floor or Flower: this script's ``--role`` in a subprocess; its RESULT line parsed."""
    label = {"floor": "floor", "flower": "Flower"}[role]
    log_path = args.workdir / f"{role}-{cfg.name}-r{rep}.log"
    cmd = [python, str(Path(__file__).resolve()), "--role", role, "--prep", str(prep)]
    cmd += ["--flower-actors", str(args.flower_actors)]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    rc, wall, out = run_timed(cmd, log_path, args.timeout, env)
    run = Run(cfg.name, label, rep, wall, extra={"log": str(log_path)})
    results = [line[7:] for line in (out or "").splitlines() if line.startswith("RESULT ")]
    if rc != 0 or not results:
        why = "timed out" if rc is None else f"exit {rc}"
        run.error = f"{why}:\n{tail(log_path)}"
        return run
    got = json.loads(results[-1])
    run.round_s = [r["time_s"] for r in got["rounds"]]
    run.accuracy = [r["accuracy"] for r in got["rounds"]]
    run.extra.update({k: v for k, v in got.items() if k != "rounds"})
    return run


def flower_python(args: argparse.Namespace) -> tuple[str | None, str]:
    """The Flower venv's python (made if missing), or None and why not."""
    venv = Path(args.flower_venv)
    python = venv / "bin" / "python"
    probe = [
        str(python),
        "-c",
        "import flwr, ray, torch; from flwr.simulation import run_simulation; "
        "print(flwr.__version__, ray.__version__, torch.__version__)",
    ]

    def check() -> tuple[str | None, str]:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            return None, f"the Flower venv does not import: {last}"
        flwr_v, ray_v, torch_v = done.stdout.split()
        return str(python), f"flwr {flwr_v}, ray {ray_v}, torch {torch_v}"

    if python.exists():
        found, why = check()
        if found:
            return found, why
    pinned = f"torch=={torch.__version__.split('+')[0]}"  # never another torch release
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", pinned, args.flower_spec],
    ]
    for cmd in steps:
        log(f"$ {shlex.join(cmd)}")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            last = "\n".join(done.stderr.strip().splitlines()[-8:])
            return None, f"`{shlex.join(cmd)}` failed:\n{last}"
    return check()


# -- the report ----------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(runs: list[Run]) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for run in runs:
        out.setdefault((run.config, run.system), {"runs": [], "failed": []})
        out[(run.config, run.system)]["runs" if run.ok else "failed"].append(run)
    for row in out.values():
        ok = row["runs"]
        row["round"] = med([r.median_round for r in ok])
        row["wall"] = med([r.wall_s for r in ok])
        row["other"] = med([r.other_s for r in ok])
        row["acc"] = med([r.accuracy[-1] for r in ok if r.accuracy])
    return out


def report(args: argparse.Namespace, runs: list[Run], flower_note: str) -> None:
    rows = summarize(runs)
    print()
    print(f"command: `{args.command}`")
    print()
    print(
        f"{os.cpu_count()} cores, shared; {args.samples} samples x {FEATURES} features, "
        f"{CLASSES} classes (separation {args.separation}), {int(TEST_FRACTION * 100)}% held out, "
        f"Dirichlet alpha {ALPHA}; MLP {FEATURES}-{HIDDEN}-{CLASSES} (GELU); FedAvg, "
        f"{LOCAL_EPOCHS} local epoch, batch {BATCH}, SGD lr {CLIENT_LR}, {ROUNDS} rounds. "
        f"Medians of {args.repeats} runs each. Flower: {flower_note}."
    )
    loads = [r.extra["load_1min"] for r in runs if "load_1min" in r.extra]
    if loads:
        print(f"Load average (1 min) after each run: {min(loads):.1f} to {max(loads):.1f}.")
    print()
    print(
        "| config | system | s/round (median) | each run | not rounds, s | total wall, s "
        "| final accuracy | per round vs floor |"
    )
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for cfg_key in args.configs:
        cfg = CONFIGS[cfg_key]
        floor = rows.get((cfg.name, "floor"), {}).get("round", float("nan"))
        for (name, system), row in rows.items():
            if name != cfg.name:
                continue
            label = f"{cfg.name} ({cfg.clients} clients, {cfg.per_round}/round)"
            if not row["runs"]:
                err = row["failed"][0].error.splitlines()[0]
                print(f"| {label} | {system} | failed: {err} | | | | | |")
                continue
            each = " / ".join(f"{r.median_round:.3f}" for r in row["runs"])
            vs_floor = "n/a" if math.isnan(floor) else f"{row['round'] / floor:.2f}x"
            print(
                f"| {label} | {system} | {row['round']:.3f} | {each} | {row['other']:.1f} "
                f"| {row['wall']:.1f} | {row['acc']:.4f} | {vs_floor} |"
            )
    print()
    for cfg_key in args.configs:
        cfg = CONFIGS[cfg_key]
        floor = rows.get((cfg.name, "floor"))
        flower = rows.get((cfg.name, "Flower"))
        for (name, system), row in rows.items():
            if name != cfg.name or not system.startswith("shoal") or not row["runs"]:
                continue
            parts = [f"config {cfg.name}, {system}:"]
            first = [r.extra["first_step_s"] for r in row["runs"] if r.extra.get("first_step_s")]
            if first:
                parts.append(f"first round started {med(first):.1f} s after submit (status.json);")
            if floor and floor["runs"]:
                ratio = row["round"] / floor["round"]
                goal = "meets" if ratio <= 1.5 else "misses"
                parts.append(f"{ratio:.2f}x the floor per round ({goal} <= 1.5x);")
                gap = max(
                    abs(a - b)
                    for r in row["runs"]
                    for f in floor["runs"]
                    for a, b in zip(r.accuracy, f.accuracy, strict=False)
                )
                parts.append(f"accuracy per round within {gap:.4f} of the floor's;")
            if flower and flower["runs"]:
                speedup = flower["round"] / row["round"]
                goal = "meets" if speedup >= 3 else "misses"
                parts.append(f"{speedup:.2f}x faster than Flower per round ({goal} >= 3x);")
                parts.append(f"final accuracy {row['acc']:.4f} vs Flower's {flower['acc']:.4f}")
            print("- " + " ".join(parts))
    failed = [r for r in runs if not r.ok]
    if failed:
        print()
        for r in failed:
            print(f"- failed: config {r.config}, {r.system}, run {r.repeat}: {r.error}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="a,b", help="comma-separated: a (20 clients), b (1000)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-flower", action="store_true")
    p.add_argument("--skip-shoal", action="store_true")
    p.add_argument("--skip-floor", action="store_true")
    p.add_argument("--shoal-workers", default="2", help="comma-separated cluster.workers values")
    p.add_argument("--flower-actors", type=int, default=2, help="Ray CPUs = ClientApp actors")
    p.add_argument("--flower-venv", default="/tmp/shoal-bench-flwr")
    p.add_argument("--flower-spec", default="flwr[simulation]==1.42.0")
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument("--separation", type=float, default=1.0, help="scale of the class means")
    p.add_argument("--seed", type=int, default=0, help="train.seed: split, sampling, init")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/shoal-bench-fed"))
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds for one run")
    p.add_argument("--json", type=Path, help="also write every run's numbers here")
    # A worker's side (this script in a subprocess).
    p.add_argument("--role", choices=["floor", "flower"], help=argparse.SUPPRESS)
    p.add_argument("--prep", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.configs = [c.strip().lower() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {unknown}; known: {sorted(CONFIGS)}")
    args.shoal_workers = [int(w) for w in args.shoal_workers.split(",")]
    args.command = shlex.join(["python", "bench/federated_vs_flower.py", *sys.argv[1:]])
    return args


def main() -> None:
    args = parse_args()
    if args.role == "floor":
        floor_main(args.prep)
        return
    if args.role == "flower":
        flower_main(args.prep, args.flower_actors)
        return
    sys.path.insert(0, str(ROOT))
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log(f"{args.command}; files under {args.workdir}; {os.cpu_count()} cores")
    data = args.workdir / "data.npz"
    make_data(data, args.samples, args.separation, args.data_seed)
    preps: dict[str, tuple[Path, int]] = {}
    for key in args.configs:
        path = args.workdir / f"prep-{CONFIGS[key].name}.npz"
        preps[key] = (path, prepare(data, CONFIGS[key], args.seed, path))
    py, flower_note = None, "skipped (--skip-flower)"
    if not args.skip_flower:
        py, flower_note = flower_python(args)
        log(f"Flower: {flower_note}")
        if py is None:
            flower_note = f"not run: {flower_note}"
    runs: list[Run] = []
    for rep in range(args.repeats):
        for key in args.configs:
            cfg = CONFIGS[key]
            prep, n_test = preps[key]
            systems = [] if args.skip_shoal else [f"shoal w={w}" for w in args.shoal_workers]
            systems += [] if args.skip_floor else ["floor"]
            systems += [] if py is None else ["Flower"]
            for system in systems:
                if system == "floor":
                    run = run_worker(args, sys.executable, "floor", cfg, prep, rep)
                elif system == "Flower":
                    run = run_worker(args, str(py), "flower", cfg, prep, rep)
                else:
                    workers = int(system.split("=")[1])
                    run = run_shoal(args, cfg, data, n_test, workers, rep)
                run.extra["load_1min"] = os.getloadavg()[0]
                runs.append(run)
                if run.ok:
                    log(
                        f"config {cfg.name} run {rep}: {system}: {run.median_round:.3f} s/round, "
                        f"wall {run.wall_s:.1f} s, accuracy {run.accuracy[-1]:.4f}"
                    )
                else:
                    log(f"config {cfg.name} run {rep}: {system} FAILED: {run.error}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=1))
    log(f"done in {time.time() - t0:.0f} s")
    report(args, runs, flower_note)


if __name__ == "__main__":
    main()
