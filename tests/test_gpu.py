"""The engines and buddy replication on the device the state lives on.

Always run (no GPU needed): the engines built on the ``meta`` device over a
fake two-rank process group (``torch.testing``'s ``fake`` backend, whose
collectives return at once and move nothing) must keep every buffer they
make (shard gradient, group gradient buffers, reduce-scatter outputs,
gathered units, optimizer state) on ``meta``. A buffer made on the CPU by
default fails there at once, which is why zero1-3 could not run on a GPU.

On CUDA (skipped without it): ``test_zero_engine.py``'s equivalence check
with NCCL, world size 1 on one GPU and 2 on two (NCCL cannot put two ranks
on one GPU), against the one-process reference trained on the same GPU; and
buddy replication of CUDA state by two ranks sharing one GPU over gloo: the
replicas land in host memory; and a GPU member's own process group as
``collectives.process_group.join_group`` builds it (``cpu:gloo,cuda:nccl``
with a ``dp`` sub-group) training ZeRO-3 on the GPU. Both checks run on the CPU with gloo too, so
their harness is exercised where there is no GPU.

Tolerance on CUDA: parameters within ``atol=rtol=1e-4`` of the reference
after 4 AdamW steps (the CPU tests: 1e-5). cuBLAS picks kernels by shape
(a rank's batch is not the reference's), and the embedding's backward
accumulates with atomics in no fixed order, so the sums round differently;
Adam turns such last-digit differences of a near-zero gradient into larger
steps. A real bug (a wrong shard, a missed reduction) is off by ~1e-2.
"""

from __future__ import annotations

import datetime
import functools
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from actors.memory import worker_available_bytes
from collectives.flat import FlatLayout
from collectives.process_group import Rendezvous, host_store, join_group, leave_group, subgroup
from collectives.replication import BuddyReplicator
from collectives.zero import ZeroEngine, build_engine
from orchestrator.shard_plan import shard_bounds
from tests import test_zero_engine as z

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")
CUDA_ATOL, CUDA_RTOL = 1e-4, 1e-4
COLLECTIVE_TIMEOUT_S = 120


def needs_gpus(n: int) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < n,
        reason=f"needs {n} CUDA device(s)",
    )


# -- on the meta device, over a fake group (CPU) -----------------------------------


@pytest.fixture
def fake_group():
    """A fake default process group of two ranks (this process is rank 0)."""
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


def _engine_tensors(engine) -> dict[str, torch.Tensor]:
    """Every tensor an engine holds or has in flight, by a name for the failure message."""
    out = {f"optimizer.{k}": t for k, t in engine.optimizer.state_tensors().items()}
    for name in ("flat_param", "flat_grad", "shard_param", "shard_grad"):
        t = getattr(engine, name, None)
        if t is not None:
            out[name] = t
    if isinstance(engine, ZeroEngine):
        for i, pend in enumerate(engine._inflight):
            out[f"inflight{i}.out"] = pend.out
            out.update({f"inflight{i}.in{j}": t for j, t in enumerate(pend.keep)})
        out.update(
            {f"group{i}.buf": g.buf for i, g in enumerate(engine.groups) if g.buf is not None}
        )
        out.update({f"unit{i}.buf": u.buf for i, u in enumerate(engine.units)})
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_engine_buffers_follow_the_parameters_device(fake_group, strategy):
    with torch.device("meta"):
        model = z.TinyMLP()
    numel = FlatLayout.of(model).numel
    engine = build_engine(
        strategy,
        model,
        z.ADAMW,
        grad_clip=z.CLIP,
        bucket_mb=z.BUCKET_MB,
        shard_bounds=shard_bounds(numel, z.UNEVEN[2]),
    )
    engine.zero_grad()
    x = torch.randn(3, 8, device="meta")
    engine.backward(model(x).pow(2).sum(), sync=False)  # stages 2-3 reduce every micro-batch
    engine.backward(model(x).pow(2).sum())
    held = _engine_tensors(engine)
    # Through the reduction, norm, clipping, update and re-gather; only reading the
    # norm as a Python float needs data, which a meta tensor has not.
    with pytest.raises(RuntimeError, match="meta"):
        engine.step(z.LR)
    held.update(_engine_tensors(engine))
    assert len(held) >= 4
    for name, t in held.items():
        assert t.device.type == "meta", f"{strategy}: {name} is on {t.device}"


def test_replication_refuses_a_group_that_cannot_move_host_memory(fake_group):
    """Replicas live in host memory; a group without gloo (NCCL only) cannot move them."""
    rep = BuddyReplicator(0, 2)
    with pytest.raises(ValueError, match="gloo"):
        rep.replicate(1, 0, 4, {"param": torch.zeros(4)}, (4, 8), space="dp")


# -- the equivalence checks with NCCL (and, as a harness check, gloo) ---------------


def device_cases(ws: int) -> list[z.Case]:
    """Both models and all strategies (uneven shards and batches on 2 ranks), SGD, accumulation."""
    out = []
    for model in ("mlp", "gpt"):
        for strategy in STRATEGIES:
            uneven = ws == 2 and strategy != "ddp"
            out.append(
                z.Case(
                    f"{model}-{strategy}",
                    model,
                    strategy,
                    shard_weights=tuple(z.UNEVEN[2]) if uneven else None,
                    batch_weights=(1.0, 2.0) if ws == 2 else None,
                )
            )
    out.append(z.Case("gpt-zero3-sgd", "gpt", "zero3", opt="sgd"))
    # Parameters and gradients of the shard in pinned host memory, gathered onto the GPU.
    out.append(z.Case("gpt-zero3-params-host", "gpt", "zero3", offload="host"))
    out.append(z.Case("gpt-zero2-accum", "gpt", "zero2", micro=2))
    return out


def _engine_child(rank: int, ws: int, backend: str, store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    device = "cpu"
    extra = {}
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
        extra["device_id"] = torch.device("cuda", rank)
    dist.init_process_group(
        backend,
        store=dist.FileStore(store_path, ws),
        rank=rank,
        world_size=ws,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        **extra,
    )
    real = {name: getattr(dist, name) for name in z.COLLECTIVES}
    results = {}
    for case in device_cases(ws):
        results[case.name] = z._run_case(ws, rank, case, {}, device)
        for name, fn in real.items():  # drop the case's counting wrappers
            setattr(dist, name, fn)
    dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@functools.cache
def engine_results(backend: str, ws: int) -> dict[str, list[dict]]:
    """``[case][rank]``: one process group of ``ws`` ranks that runs every case."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _engine_child,
            args=(ws, backend, os.path.join(tmp, "store"), tmp),
            nprocs=ws,
            join=True,
            start_method=z._START_METHOD,
        )
        per_rank = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(ws)]
    return {c.name: [per_rank[r][c.name] for r in range(ws)] for c in device_cases(ws)}


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("backend", "ws"),
    [
        pytest.param("gloo", 2, id="gloo-cpu-ws2"),
        pytest.param("nccl", 1, marks=needs_gpus(1), id="nccl-ws1"),
        pytest.param("nccl", 2, marks=needs_gpus(2), id="nccl-ws2"),
    ],
)
def test_engines_match_reference_on_device(backend, ws):
    on_cuda = backend == "nccl"
    atol, rtol = (CUDA_ATOL, CUDA_RTOL) if on_cuda else (z.ATOL, z.RTOL)
    results = engine_results(backend, ws)
    for case in device_cases(ws):
        ref = z.reference(case, device="cuda:0" if on_cuda else "cpu")
        ranks = results[case.name]
        for r, res in enumerate(ranks):
            where = f"{case.name} rank {r}"
            assert res["norms"] == pytest.approx(ref["norms"], rel=1e-4), where
            assert set(res["state"]) == set(ref["state"]), where
            for name, want in ref["state"].items():
                torch.testing.assert_close(
                    res["state"][name],
                    want,
                    atol=atol,
                    rtol=rtol,
                    msg=lambda m, n=name, w=where: f"{w} {n}: {m}",
                )
                assert torch.equal(res["state"][name], ranks[0]["state"][name]), where


# -- buddy replication of device state ------------------------------------------------

REPLICA_BOUNDS = [(0, 5), (5, 9)]


def _state(rank: int, done: int) -> dict[str, torch.Tensor]:
    """A rank's shard after step ``done``; one key in float64, to check dtypes carry over."""
    lo, hi = REPLICA_BOUNDS[rank]
    base = torch.arange(lo, hi, dtype=torch.float32)
    return {"param": base + 100 * done, "exp_avg": (-base - done).double()}


def _replica_child(rank: int, device: str, store_path: str, out_dir: str, overlap: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    rep = BuddyReplicator(rank, 2, overlap=overlap)
    for done in (1, 2, 3):
        tensors = {k: t.to(device) for k, t in _state(rank, done).items()}
        rep.replicate(done, *REPLICA_BOUNDS[rank], tensors, REPLICA_BOUNDS[rep.source], space="dp")
        rep.wait_until_copied()
        tensors["param"].zero_()  # the optimizer update: the copies must not see it
    assert rep.settle()
    out = {
        "own": {d: c.tensors for d, c in rep.own_copies().items()},
        "replica": {d: (c.rank, c.tensors) for d, c in rep.replica_copies().items()},
    }
    dist.destroy_process_group()
    torch.save(out, os.path.join(out_dir, f"{rank}.pt"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize(
    "device", [pytest.param("cpu"), pytest.param("cuda:0", marks=needs_gpus(1))]
)
def test_replicas_of_device_state_land_in_host_memory(device, overlap):
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _replica_child,
            args=(device, os.path.join(tmp, "store"), tmp, overlap),
            nprocs=2,
            start_method=z._START_METHOD,
        )
        got = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    for rank in range(2):
        source = 1 - rank
        assert sorted(got[rank]["replica"]) == [2, 3]
        for done in (2, 3):
            owner, tensors = got[rank]["replica"][done]
            assert owner == source
            for key, want in _state(source, done).items():
                assert tensors[key].device.type == "cpu"
                assert tensors[key].dtype == want.dtype
                assert torch.equal(tensors[key], want), (rank, done, key)
        for done, tensors in got[rank]["own"].items():
            for key, want in _state(rank, done).items():
                assert tensors[key].device.type == "cpu"
                assert torch.equal(tensors[key], want), (rank, done, key)


# -- shoal's own process group on a GPU -----------------------------------------------

MIXED_CASE = z.Case("gpt-zero3-mixed", "gpt", "zero3")


def _mixed_group_child(rank: int, out_dir: str) -> None:
    """Rank 0 of 1: join as a GPU member does (``cpu:gloo,cuda:nccl``, a ``dp`` sub-group)."""
    torch.cuda.set_device(0)
    store = host_store("127.0.0.1", 1, COLLECTIVE_TIMEOUT_S)
    rdzv = Rendezvous("127.0.0.1", store.port, 1, "nccl", COLLECTIVE_TIMEOUT_S, {"dp": [[0]]})
    join_group(rdzv, 0, store)
    out = {"backend": str(dist.get_backend())}
    # NCCL moves the device tensor, gloo the host one (buddy replicas live there).
    on_gpu, on_host = torch.ones(3, device="cuda:0"), torch.ones(3)
    dist.all_reduce(on_gpu, group=subgroup("dp"))
    dist.all_reduce(on_host)
    out["sums"] = (on_gpu.cpu(), on_host)
    out["case"] = z._run_case(1, 0, MIXED_CASE, {}, "cuda:0")
    out["budget"] = worker_available_bytes(torch.device("cuda", 0))
    leave_group()
    out["left"] = not dist.is_initialized()
    torch.save(out, os.path.join(out_dir, "0.pt"))


@needs_gpus(1)
@pytest.mark.timeout(300)
def test_a_gpu_member_trains_over_the_mixed_group():
    """What ``join_group`` builds for a GPU job trains exactly and moves host memory too."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_mixed_group_child, args=(tmp,), nprocs=1, start_method=z._START_METHOD)
        got = torch.load(os.path.join(tmp, "0.pt"))
    assert "nccl" in got["backend"] and "gloo" in got["backend"], got["backend"]
    assert all(torch.equal(t, torch.ones(3)) for t in got["sums"])
    assert got["left"]
    total = torch.cuda.get_device_properties(0).total_memory
    assert 0 < got["budget"] <= total  # the device's free memory, not the host's
    ref = z.reference(MIXED_CASE, device="cuda:0")
    assert got["case"]["norms"] == pytest.approx(ref["norms"], rel=1e-4)
    for name, want in ref["state"].items():
        torch.testing.assert_close(got["case"]["state"][name], want, atol=CUDA_ATOL, rtol=CUDA_RTOL)
