"""Optimizer state offloaded to host memory and NVMe files (issue 17, first slice).

In-process, no Ray (one test runs a small job through ``shoal run``): the
engines train a tiny GPT with their optimizer state in a tier and must end
bit-identical to the same engines without offload; the tier's reads must run
ahead of the update; budgets, a full disk and stale files behave as
``storage/tiers.py`` says; the planner and the config checks refuse what
cannot work, naming the field.
"""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from actors.models.gpt import GPT
from collectives.flat import FlatLayout
from collectives.offloaded_optim import OffloadedOptimizer, OffloadSpec
from collectives.optim import OptimizerSpec, decay_ranges
from collectives.zero import build_engine
from orchestrator.offload_plan import Budgets, OffloadPlanError, plan_offload
from orchestrator.spec import ConfigError, JobSpec
from storage.object_store import open_store
from storage.tiers import (
    OWNER_FILE,
    HostTier,
    NvmeTier,
    OffloadBudgetError,
    OffloadError,
    TierFlat,
    chunk_numel_for,
)
from tests.checkpoint_helpers import write_shard
from tests.conftest import REPO_ROOT

ADAMW = OptimizerSpec("adamw", weight_decay=0.1)
CHUNK_MB = 0.01  # 2,560 elements: the tiny GPT's state spans many chunks
STEPS = 3


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=64, n_layer=2, n_head=2, d_model=32, seq_len=16)


def _train(engine, steps: int = STEPS, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 64, (4, 17), generator=g)
        engine.zero_grad()
        logits = engine.model(x[:, :-1])
        engine.backward(F.cross_entropy(logits.reshape(-1, 64), x[:, 1:].reshape(-1)))
        engine.step(1e-2)


def _offload(kind: str, tmp_path: Path, prefetch: int = 2) -> OffloadSpec | None:
    if kind == "none":
        return None
    path = str(tmp_path / "nvme") if kind == "nvme" else None
    return OffloadSpec(kind, nvme_path=path, job_id="t", chunk_mb=CHUNK_MB, prefetch=prefetch)


def _params_after(strategy: str, kind: str, tmp_path: Path, opt=ADAMW) -> dict:
    engine = build_engine(strategy, _model(), opt, grad_clip=1.0, offload=_offload(kind, tmp_path))
    try:
        _train(engine)
        return engine.full_state_dict()
    finally:
        engine.close()


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3"])
@pytest.mark.parametrize("kind", ["host", "nvme"])
def test_training_with_offloaded_state_is_bitwise_the_same(strategy, kind, tmp_path):
    base = _params_after(strategy, "none", tmp_path)
    got = _params_after(strategy, kind, tmp_path)
    assert base.keys() == got.keys()
    for name in base:
        assert torch.equal(base[name], got[name]), name
    assert not list((tmp_path / "nvme").glob("*/*")) if kind == "nvme" else True


@pytest.mark.parametrize(
    "opt", [OptimizerSpec("sgd", momentum=0.9, weight_decay=0.1), OptimizerSpec("yogi")]
)
def test_other_optimizers_offloaded_to_nvme(opt, tmp_path):
    base = _params_after("zero2", "none", tmp_path, opt)
    got = _params_after("zero2", "nvme", tmp_path, opt)
    assert all(torch.equal(base[k], got[k]) for k in base)


class RecordingTier(NvmeTier):
    """An NVMe tier that logs the order in which reads and writes are issued."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log: list[tuple[str, str, int]] = []

    def read(self, key, i):
        self.log.append(("read", key, i))
        return super().read(key, i)

    def write(self, key, i, buf):
        self.log.append(("write", key, i))
        return super().write(key, i, buf)


def _offloaded(tier, n: int = 10_000, prefetch: int = 2) -> OffloadedOptimizer:
    param = torch.randn(n, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(n, generator=torch.Generator().manual_seed(1))
    return OffloadedOptimizer(
        ADAMW, param, grad, decayed=[(0, n // 2)], tier=tier, prefetch=prefetch
    )


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_reads_run_prefetch_chunks_ahead_of_the_update(prefetch, tmp_path):
    tier = RecordingTier(tmp_path, "job", 0, chunk_numel_for(CHUNK_MB))
    opt = _offloaded(tier, prefetch=prefetch)
    n = opt.grid.n_chunks
    assert n == 5  # 10,000 elements in chunks of 2,048
    tier.log.clear()
    opt.step(1e-3)
    assert opt.last_io_wait_s > 0  # measured: at least the last writes were waited for
    reads = [i for op, key, i in tier.log if op == "read" and key == "exp_avg"]
    assert reads == list(range(n))  # each chunk read once, in order
    for i in range(n):
        # Chunk i is written back (updated) only after the reads up to i + prefetch were issued.
        write_at = tier.log.index(("write", "exp_avg", i))
        ahead = min(n - 1, i + prefetch)
        assert tier.log.index(("read", "exp_avg", ahead)) < write_at
        if i + prefetch + 1 < n:  # and no further ahead than that
            assert tier.log.index(("read", "exp_avg", i + prefetch + 1)) > write_at
    opt.close()


def test_nvme_budget_is_enforced_and_bytes_counted(tmp_path):
    chunk = chunk_numel_for(CHUNK_MB)
    tier = NvmeTier(tmp_path, "job", 0, chunk, budget_bytes=1 << 20)
    opt = _offloaded(tier)  # 2 states x 10,000 fp32 in 5 page-aligned files each
    files = sorted(tier.root.glob("*.bin"))
    assert len(files) == 10 and chunk == 2048
    on_disk = sum(f.stat().st_size for f in files)
    last = -(-(10_000 - 4 * chunk) * 4 // 4096) * 4096  # the short last chunk, page-padded
    assert tier.held_bytes == on_disk == 2 * (4 * chunk * 4 + last)
    assert opt.state_bytes() == 2 * 10_000 * 4
    opt.close()
    assert not tier.root.exists()

    small = NvmeTier(tmp_path, "job", 0, chunk, budget_bytes=50_000)
    with pytest.raises(OffloadBudgetError) as e:
        _offloaded(small)
    msg = str(e.value)
    assert "offload.nvme_bytes=50000" in msg and "exp_avg_sq" in msg and "40960" in msg
    small.close()


def test_host_budget_is_enforced(tmp_path):
    tier = HostTier(chunk_numel_for(CHUNK_MB), budget_bytes=60_000)
    with pytest.raises(OffloadBudgetError, match=r"offload.host_bytes=60000 .*'exp_avg_sq'"):
        _offloaded(tier)
    assert tier.held_bytes == 40_000  # exp_avg fitted, exp_avg_sq was refused


class FullDiskTier(NvmeTier):
    """An NVMe tier whose disk fills up once ``full`` is set: every write fails with ENOSPC."""

    full = False

    def _pwrite(self, fd, data, offset):
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super()._pwrite(fd, data, offset)


def test_full_disk_is_a_clear_error_and_the_checkpoint_is_untouched(tmp_path):
    engine = build_engine("zero2", _model(), ADAMW, grad_clip=1.0)
    tier = FullDiskTier(tmp_path / "nvme", "job", 0, chunk_numel_for(CHUNK_MB))
    engine.optimizer = OffloadedOptimizer(
        ADAMW,
        engine.shard_param,
        engine.shard_grad,
        decayed=decay_ranges(engine.layout),
        tier=tier,
        prefetch=2,
    )
    _train(engine, steps=2)
    store = open_store(f"file://{tmp_path / 'ckpt'}")
    lo, hi, tensors = engine.checkpoint_slice()
    assert isinstance(tensors["exp_avg"], TierFlat)  # read chunk by chunk into the snapshot
    record = write_shard(store, 2, 0, lo, hi, tensors)
    saved = {k: v.clone() for k, v in tensors.items()}
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}

    tier.full = True
    with pytest.raises(OffloadError, match=rf"offload.nvme_path {tmp_path / 'nvme'} is full: "):
        _train(engine, steps=1, seed=2)
    with pytest.raises(OffloadError, match="unusable after an earlier error"):
        engine.optimizer.step(1e-2)  # half-updated state is never stepped again

    after = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    assert after == before
    (shard,) = [p for p in (tmp_path / "ckpt").rglob("*") if p.name.endswith(record.key[-12:])]
    loaded = safetensors.torch.load_file(shard)
    for key, t in saved.items():
        assert torch.equal(loaded[key], t), key
    engine.close()
    assert not list((tmp_path / "nvme").glob("*/*"))


def test_checkpoint_of_offloaded_state_restores_into_a_plain_engine(tmp_path):
    engine = build_engine("zero1", _model(), ADAMW, offload=_offload("nvme", tmp_path))
    _train(engine)
    lo, hi, tensors = engine.checkpoint_slice()
    copied = {k: v.clone() for k, v in tensors.items()}

    def read(key, a, b):
        return copied[key][a - lo : b - lo]

    plain = build_engine("zero1", _model(), ADAMW)
    plain.load_state(read, engine.optimizer.step_count)
    again = build_engine("zero1", _model(), ADAMW, offload=_offload("nvme", tmp_path))
    again.load_state(read, engine.optimizer.step_count)
    for e in (engine, plain, again):
        _train(e, steps=1, seed=5)
    a, b, c = (e.full_state_dict() for e in (engine, plain, again))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    for e in (engine, again):
        e.close()


def test_chunk_grid_ends_chunks_at_cuts():
    from storage.tiers import ChunkGrid

    grid = ChunkGrid(25, 10, cuts=(7, 12, 25, 40))
    assert [grid.bounds(i) for i in range(grid.n_chunks)] == [(0, 7), (7, 12), (12, 22), (22, 25)]
    assert list(grid.chunks_of(7, 12)) == [1] and list(grid.chunks_of(6, 13)) == [0, 1, 2]
    assert list(grid.chunks_of(24, 25)) == [3] and list(grid.chunks_of(3, 3)) == []
    plain = ChunkGrid(25, 10)
    assert [plain.bounds(i) for i in range(plain.n_chunks)] == [(0, 10), (10, 20), (20, 25)]


# -- parameters and gradients offloaded (zero3, offload.params) -------------------


def _params_spec(tmp_path: Path, params: str = "nvme", **kw) -> OffloadSpec:
    kw = {"chunk_mb": CHUNK_MB, "prefetch": 1, **kw}
    return OffloadSpec("nvme", nvme_path=str(tmp_path / "nvme"), job_id="t", params=params, **kw)


def _lazy_gpt() -> GPT:
    with torch.device("meta"):
        return GPT(vocab_size=64, n_layer=2, n_head=2, d_model=32, seq_len=16)


@pytest.mark.parametrize("params", ["host", "nvme"])
def test_parameters_offloaded_train_as_in_memory(params, tmp_path):
    """A lazily built zero3 engine with everything in tiers = a plain one from the same start."""
    engine = build_engine(
        "zero3",
        _lazy_gpt(),
        ADAMW,
        grad_clip=1.0,
        offload=_params_spec(tmp_path, params),
        init_seed=0,
    )
    start = engine.full_state_dict()
    model = _model()
    model.load_state_dict(start)
    plain = build_engine("zero3", model, ADAMW, grad_clip=1.0)
    for e in (engine, plain):
        _train(e)
    got, want = engine.full_state_dict(), plain.full_state_dict()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    memory = engine.memory_bytes()
    assert memory["params"] == memory["grads"] == memory["optimizer"] == 0
    shard = 4 * engine.layout.numel
    assert memory[f"params_{params}"] == memory[f"grads_{params}"] == shard
    assert memory["optimizer_nvme"] == 2 * shard
    # Every parameter is a view of a freed unit buffer between steps.
    assert sum(p.untyped_storage().nbytes() for p in engine.model.parameters()) == 0
    engine.close()
    assert not list((tmp_path / "nvme").glob("*/*"))


def test_lazy_init_is_deterministic_tied_and_scaled(tmp_path):
    a = build_engine("zero3", _lazy_gpt(), ADAMW, offload=_params_spec(tmp_path), init_seed=3)
    b = build_engine("zero3", _lazy_gpt(), ADAMW, offload=_params_spec(tmp_path), init_seed=3)
    c = build_engine("zero3", _lazy_gpt(), ADAMW, offload=_params_spec(tmp_path), init_seed=4)
    sa, sb, sc = (e.full_state_dict() for e in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn.qkv.weight"], sc["blocks.0.attn.qkv.weight"])
    assert a.model.lm_head.weight is a.model.wte.weight  # still tied: one parameter
    assert torch.equal(sa["lm_head.weight"], sa["wte.weight"])
    # GPT's own rules, unit by unit: N(0, 0.02), residual projections scaled by depth.
    assert sa["blocks.1.mlp.fc.weight"].std() == pytest.approx(0.02, rel=0.1)
    assert sa["blocks.1.mlp.proj.weight"].std() == pytest.approx(0.02 / 2, rel=0.1)
    assert torch.equal(sa["blocks.0.ln1.weight"], torch.ones(32))
    for e in (a, b, c):
        e.close()


class RootParam(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.scale = torch.nn.Parameter(torch.ones(4))  # the root's own: no unit initialises it

    def forward(self, x):
        return self.lin(x) * self.scale


class NoInit(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4))  # no reset_parameters() to redo this

    def forward(self, x):
        return x @ self.w


@pytest.mark.parametrize(
    "make, match",
    [
        (RootParam, r"\['scale'\] belong to no submodule"),
        (lambda: torch.nn.Sequential(NoInit()), r"'0.w' was not initialised"),
    ],
)
def test_lazy_init_refuses_parameters_it_cannot_initialise(make, match, tmp_path):
    with torch.device("meta"):
        model = make()
    with pytest.raises(ValueError, match=match):
        build_engine("zero3", model, ADAMW, offload=_params_spec(tmp_path), init_seed=0)
    assert not list((tmp_path / "nvme").glob("*/*/*.bin"))  # the refused engine left no files


def test_unit_pieces_are_read_ahead_in_the_order_of_use(tmp_path):
    """After the first step recorded the order, each unit's piece is read before its turn."""
    engine = build_engine(
        "zero3", _lazy_gpt(), ADAMW, offload=_params_spec(tmp_path, prefetch=2), init_seed=1
    )
    reads: list[tuple[int, bool]] = []  # (unit, read ahead?) in the order pieces are taken
    piece = engine._piece

    def logged(g_idx):
        reads.append((g_idx, g_idx in engine._piece_reads))
        return piece(g_idx)

    engine._piece = logged
    _train(engine, steps=1)  # records the order: every read waits
    first = list(reads)
    reads.clear()
    _train(engine, steps=2, seed=3)
    units = len(engine.units)
    forward, backward = engine._order["forward"], engine._order["backward"]
    # Blocks in order, the tied embedding again for the LM head; backward the reverse.
    assert forward == (*range(units), 0) and backward == (0, *range(units - 1, 0, -1))
    assert [u for u, _ in first] == [*forward, *backward]
    assert not any(ahead for _, ahead in first)
    assert [u for u, _ in reads] == [*forward, *backward] * 2
    # Only each pass's first unit is read when needed; the rest were read ahead.
    per_pass = [reads[: len(forward)], reads[len(forward) : len(forward) + len(backward)]]
    for taken in per_pass:
        assert [ahead for _, ahead in taken] == [False] + [True] * (len(taken) - 1)
    engine.close()


def test_host_budget_counts_offloaded_parameters(tmp_path):
    # One host tier holds the state and the parameters: the state fits, 'param' does not.
    state = 2 * 4 * FlatLayout.of(_model()).numel
    spec = OffloadSpec("host", params="host", chunk_mb=CHUNK_MB, host_bytes=state + 1000)
    with pytest.raises(OffloadBudgetError, match=rf"offload.host_bytes={state + 1000} .*'param'"):
        build_engine("zero3", _lazy_gpt(), ADAMW, offload=spec, init_seed=0)


def test_full_disk_while_writing_gradients_is_a_clear_error(tmp_path):
    engine = build_engine("zero3", _lazy_gpt(), ADAMW, offload=_params_spec(tmp_path), init_seed=0)
    _train(engine, steps=1)
    tier = engine.optimizer.param_tier
    tier._pwrite = lambda fd, data, offset: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    )
    with pytest.raises(OffloadError, match=rf"offload.nvme_path {tmp_path / 'nvme'} is full: "):
        _train(engine, steps=1, seed=2)
    engine.close()
    assert not list((tmp_path / "nvme").glob("*/*"))


def test_summary_names_what_each_tier_holds():
    from orchestrator.report import _offloaded

    mem = {"params": 0, "params_nvme": 4096, "grads_nvme": 4096, "optimizer_nvme": 8192}
    assert _offloaded({**mem, "peak_rss": 1}) == " (offloaded: NVMe 16.0 KiB)"
    assert _offloaded({"optimizer": 5, "params_host": 2048}) == " (offloaded: host 2.0 KiB)"
    assert _offloaded({"params": 1, "optimizer": 3, "peak_rss": 3}) == ""


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def test_stale_files_of_dead_processes_are_removed_on_start(tmp_path):
    import socket

    host = socket.gethostname()
    dead = tmp_path / "old-job" / "rank0.pid1.0"
    live = tmp_path / "other-job" / "rank1.pid2.0"
    foreign = tmp_path / "not-ours" / "data"
    for d, pid in ((dead, _dead_pid()), (live, os.getpid())):
        d.mkdir(parents=True)
        (d / OWNER_FILE).write_text(json.dumps({"host": host, "pid": pid}))
        (d / "exp_avg.000000.bin").write_bytes(b"\0" * 4096)
    foreign.mkdir(parents=True)
    (foreign / "x").write_text("keep")
    tier = NvmeTier(tmp_path, "new-job", 0, chunk_numel_for(CHUNK_MB))
    assert not dead.exists() and not dead.parent.exists()
    assert live.exists() and (foreign / "x").exists()
    tier.close()


def test_files_removed_at_exit_and_after_a_kill(tmp_path):
    script = (
        "import sys, time\n"
        "from storage.tiers import NvmeTier\n"
        f"t = NvmeTier({str(tmp_path)!r}, 'job', 0, 1024)\n"
        "t.allocate('exp_avg', 5000, 0.0)\n"
        "print(t.root, flush=True)\n"
        "if sys.argv[1] == 'kill': time.sleep(60)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run(
        [sys.executable, "-c", script, "exit"], capture_output=True, text=True, env=env, check=True
    )
    assert not Path(out.stdout.strip()).exists()  # atexit removed it
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "kill"], stdout=subprocess.PIPE, text=True, env=env
    )
    root = Path(proc.stdout.readline().strip())
    assert len(list(root.glob("*.bin"))) == 5  # 5,000 elements in chunks of 1,024
    proc.kill()
    proc.wait()
    assert root.exists()  # SIGKILL runs no atexit
    NvmeTier(tmp_path, "job", 1, 1024).close()  # the next tier on the path sweeps it
    assert not root.exists()


# -- the planner and the config ------------------------------------------------------


def test_plan_reports_where_state_lives():
    plan = plan_offload(
        numel=1_000_000,
        strategy="zero3",
        workers=2,
        n_states=2,
        device="cpu",
        optimizer="nvme",
        params="host",
        nvme_path="/tmp/x",
        chunk_mb=1,
        prefetch=2,
        budgets=Budgets(memory=1 << 30, host=1 << 30, disk=1 << 30),
    )
    text = "\n".join(plan.lines())
    assert "parameters       host memory (CPU worker: already there): 1.9 MiB" in text
    assert "optimizer state  NVMe files under /tmp/x: 3.8 MiB" in text
    assert "NVMe             holds 3.8 MiB of 1.0 GiB (free space at /tmp/x)" in text


def test_plan_refuses_what_cannot_fit_naming_the_budget():
    common = dict(numel=10_000_000, strategy="zero2", workers=2, n_states=2, device="cpu")
    with pytest.raises(OffloadPlanError, match=r"host memory would hold .* available memory"):
        plan_offload(**common, optimizer="host", budgets=Budgets(50 << 20, 50 << 20, None))
    fits = plan_offload(**common, optimizer="nvme", nvme_path="/x", chunk_mb=1)
    assert fits.tiers["NVMe"][0] == 40_000_000
    with pytest.raises(OffloadPlanError, match=r"NVMe would hold .*offload.nvme_bytes=1000000"):
        plan_offload(**common, optimizer="nvme", nvme_path="/x", nvme_bytes=1_000_000)
    # Parameters and gradients on NVMe under zero3: the host keeps only staging buffers.
    z3 = {**common, "strategy": "zero3"}
    fits = plan_offload(**z3, optimizer="nvme", params="nvme", nvme_path="/x", chunk_mb=1)
    assert fits.tiers["NVMe"][0] == 4 * 5_000_000 * 4  # params, grads, 2 states: the shard each
    # (read ahead 1 + updated + written) chunks of 1 MiB for each of the 4 tensors streamed.
    assert fits.tiers["host memory"][0] == fits.staging_bytes == (1 + 2) * 4 * (1 << 20)
    with pytest.raises(OffloadPlanError, match=r"host memory would hold .*buddy replicas"):
        plan_offload(
            **z3,
            optimizer="nvme",
            params="nvme",
            nvme_path="/x",
            replica_elements=5 * 5_000_000,
            budgets=Budgets(None, 200 << 20, None),
        )


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["offload.optimizer=nvme"], "offload.nvme_path"),
        (["offload.optimizer=disk"], "offload.optimizer"),
        (["offload.optimizer=host", "strategy=pipeline"], "strategy.name"),
        (["offload.params=host", "cluster.gpus_per_worker=1"], "offload.params"),
        (["offload.params=nvme", "offload.nvme_path=/x", "strategy=zero2"], "offload.params"),
        (["offload.params=nvme", "offload.nvme_path=/x", "strategy=zero3"], "offload.optimizer"),
        (["offload.params=nvme", "offload.optimizer=host", "strategy=zero3"], "offload.nvme_path"),
        (["offload.nvme_path=/tmp/x"], "offload.optimizer"),
        (["offload.optimizer=host", "offload.prefetch=-1"], "offload.prefetch"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        JobSpec.from_overrides(overrides)
    assert str(e.value).startswith(f"{field}:")


def test_job_zero3_with_everything_on_nvme(tmp_path, ray_session):
    """One small Ray job, parameters, gradients and optimizer state on NVMe (buddy replicas
    and checkpoints read them from the files): the plan is made before it starts, it
    trains, the files are gone.
    """
    from orchestrator.api import submit

    nvme = tmp_path / "nvme"
    spec = JobSpec.from_overrides(
        [
            "strategy=zero3",
            "offload.optimizer=nvme",
            "offload.params=nvme",
            f"offload.nvme_path={nvme}",
            "offload.chunk_mb=0.05",
            "model.n_layer=1",
            "model.d_model=32",
            "model.n_head=2",
            "model.seq_len=16",
            "data.max_bytes=100000",
            "train.steps=4",
            "checkpoint.every=2",
            "train.sample_tokens=0",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    handle = submit(spec)
    final = handle.wait(timeout=120)
    records = handle.metrics()
    handle.close()
    assert final.state.value == "succeeded", final.error
    # Every step says how long each rank's optimizer step waited on the NVMe tier.
    waits = [r["offload_wait_s"] for r in records]
    assert len(waits) == 4 and all(len(w) == 2 and min(w) >= 0 for w in waits)
    lines = handle.offload_plan.lines()
    for kind in ("parameters", "gradients", "optimizer state"):
        assert f"  {kind:<16} NVMe files under {nvme}" in "\n".join(lines)
    assert all(math.isfinite(r["loss"]) for r in records)
    assert (tmp_path / "run" / "offload_plan.txt").read_text().splitlines() == lines
    assert (tmp_path / "run" / "checkpoints" / "step-00000004" / "manifest.json").is_file()
    assert not list(nvme.glob("*/*"))  # the workers' files were removed at the job's end
