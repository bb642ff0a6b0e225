"""Unit tests for ``actors/expert_host.py``'s ``ExpertHostRuntime``, in this process (no Ray).

A small ``gpt_moe`` (2 layers, d_model 32, 4 experts, top-2) under
``strategy=moe``. Hosts are built with ``setup(None, slot, hosts)`` and called
directly, as trunk workers call them over Ray:

- ``expert_range`` and the hosts' flat ranges tile the ``experts`` space
  ``[0, E * L * P)`` expert-major, holding the experts a ``GPTMoE`` built with
  the same seed has;
- ``forward`` / ``backward`` answer as the local expert modules do; the
  parameter gradients of a step's calls are summed and applied lazily, on the
  first call of a later step (every step in between too, with a zero
  gradient), and then equal torch's AdamW at ``lr_at(step)`` after a
  per-expert ``clip_grad_norm_``; a new attempt of a step drops its partial
  sum; a stale backward is ignored;
- ``save_shard`` / ``checkpoint_done`` then a load at another host count
  restore every expert's parameters and optimizer state; a host placed mid-run
  restores the newest checkpoint and takes up the trunk's step; a manifest
  whose experts space has the wrong size is refused, naming the model's fields.

Tolerance: ``ATOL`` where the host and torch compute the same update over
differently grouped tensors (the clip norm is one flat norm vs. a norm of
per-parameter norms).
"""

from __future__ import annotations

import copy
import time
from types import SimpleNamespace

import pytest
import torch

from actors.datasets import DataFacts
from actors.expert_host import EXPERTS_SPACE, ExpertHostRuntime
from actors.expert_slot import expert_range
from actors.models.gpt_moe import GPTMoE
from collectives.optim import OptimizerSpec
from orchestrator.schedule import lr_at
from orchestrator.spec import JobSpec
from storage.checkpoint import CorruptCheckpointError, Manifest, ShardRecord, commit
from storage.object_store import open_store
from tests.checkpoint_helpers import write_shard

ATOL = 1e-6
VOCAB = 50
L, E, D = 2, 4, 32
P = D * 4 * D + 4 * D + 4 * D * D + D  # one expert: fc (D -> 4D) and proj (4D -> D), biases
DATA = SimpleNamespace(facts=DataFacts(vocab_size=VOCAB))
CLIP = 1.0


@pytest.fixture(scope="module")
def base_spec(tmp_path_factory) -> JobSpec:
    """Composed once (Hydra takes seconds); each test copies it with its own checkpoint.uri."""
    spec = JobSpec.from_overrides(
        [
            "model=gpt_moe",
            f"model.n_layer={L}",
            f"model.d_model={D}",
            "model.n_head=2",
            f"model.n_expert={E}",
            "model.top_k=2",
            "strategy=moe",
            "train.steps=10",
            "train.lr=1e-2",
            "train.warmup_steps=2",  # every step below has its own lr
            f"train.grad_clip={CLIP}",
            "train.weight_decay=0.1",
            f"run_dir={tmp_path_factory.mktemp('run')}",
        ]
    )
    lrs = [lr_at(step, spec.train) for step in range(6)]
    assert len(set(lrs)) == len(lrs)
    return spec


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A host sets torch's thread count to strategy.host_cpus: give this process its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def spec_at(base: JobSpec, root) -> JobSpec:
    spec = copy.deepcopy(base)
    spec.config.checkpoint.uri = f"file://{root}"
    return spec


def make_host(spec: JobSpec, slot: int, hosts: int) -> ExpertHostRuntime:
    host = ExpertHostRuntime(spec, worker_id=100 + slot, data=DATA)
    host.setup(None, slot, hosts)
    return host


def make_hosts(spec: JobSpec, hosts: int) -> list[ExpertHostRuntime]:
    return [make_host(spec, slot, hosts) for slot in range(hosts)]


def seeded_model(spec: JobSpec) -> GPTMoE:
    """The model every worker builds: same seed, same architecture."""
    torch.manual_seed(spec.train.seed)
    return GPTMoE(
        vocab_size=VOCAB,
        n_layer=L,
        n_head=2,
        d_model=D,
        seq_len=spec.model.seq_len,
        n_expert=E,
        top_k=2,
    )


class Reference:
    """Experts ``a..b-1`` of every layer of a seeded GPTMoE, trained with torch's AdamW."""

    def __init__(self, spec: JobSpec, a: int, b: int):
        model = seeded_model(spec)
        self.train = spec.train
        self.order = [(layer, e) for e in range(a, b) for layer in range(L)]  # expert-major
        self.modules = {(layer, e): model.blocks[layer].moe.experts[e] for layer, e in self.order}
        self.params = [p for key in self.order for p in self.modules[key].parameters()]
        for p in self.params:
            p.grad = torch.zeros_like(p)  # a flat gradient: an expert without tokens has zeros
        t = spec.train
        opt = OptimizerSpec(name="adamw", weight_decay=t.weight_decay, beta1=t.beta1, beta2=t.beta2)
        self.optimizer = opt.build(self.params, lr=0.0)

    def forward(self, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.modules[(layer, e)](x)

    def backward(self, layer: int, e: int, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        x = x.clone().requires_grad_(True)
        self.modules[(layer, e)](x).backward(dy)
        return x.grad

    def grad_norms(self) -> dict[tuple[int, int], float]:
        return {
            key: float(torch.cat([p.grad.reshape(-1) for p in m.parameters()]).norm())
            for key, m in self.modules.items()
        }

    def step(self, step: int) -> None:
        """Optimizer step ``step``: each expert clipped on its own, AdamW at ``lr_at(step)``."""
        for m in self.modules.values():
            torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.train)
        self.optimizer.step()
        for p in self.params:
            p.grad.zero_()

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])


def tokens(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def call_backward(host, ref, attempt, step, layer, inputs):
    """One worker's backward call, also run on ``ref``; the input gradients must agree."""
    dx = host.backward(attempt, step, layer, inputs)
    assert sorted(dx) == sorted(inputs)
    for e, (x, dy) in inputs.items():
        torch.testing.assert_close(dx[e], ref.backward(layer, e, x, dy), atol=1e-7, rtol=1e-6)
    return dx


# -- placement -------------------------------------------------------------------------


@pytest.mark.parametrize("n_expert,hosts", [(4, 1), (4, 2), (4, 3), (4, 4), (7, 3), (9, 4)])
def test_expert_range_splits_the_experts_into_contiguous_near_equal_runs(n_expert, hosts):
    ranges = [expert_range(n_expert, hosts, slot) for slot in range(hosts)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n_expert
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(hosts - 1))
    sizes = [b - a for a, b in ranges]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger runs first
    assert expert_range(4, 3, 0) == (0, 2) and expert_range(4, 3, 2) == (3, 4)


@pytest.mark.parametrize("hosts", [1, 2, 3])
def test_host_ranges_tile_the_experts_space_and_hold_the_seeded_experts(base_spec, tmp_path, hosts):
    spec = spec_at(base_spec, tmp_path / "ckpt")
    model = seeded_model(spec)
    ends = 0
    for slot in range(hosts):
        host = ExpertHostRuntime(spec, worker_id=slot, data=DATA)
        info = host.setup(None, slot, hosts)
        a, b = expert_range(E, hosts, slot)
        assert info["experts"] == [a, b] and info["version"] == 0
        assert info["restored_from"] is None
        assert info["expert_ids"] == [f"{layer}.{e}" for e in range(a, b) for layer in range(L)]
        assert host.space_size == E * L * P
        assert (host.lo, host.hi) == (a * L * P, b * L * P)
        assert host.lo == ends  # no gap, no overlap with the previous host
        ends = host.hi
        expected = torch.cat(
            [
                p.detach().reshape(-1)
                for e in range(a, b)
                for layer in range(L)
                for p in model.blocks[layer].moe.experts[e].parameters()
            ]
        )
        assert host.flat_param.shape == (host.hi - host.lo,)
        assert torch.equal(host.flat_param, expected)
        # The modules serve from the flat buffer (views of it): an update shows.
        with torch.no_grad():
            host.flat_param.add_(1.0)
        assert torch.equal(host.held.experts[(0, a)].fc.bias, torch.ones(4 * D))
    assert ends == E * L * P


# -- serving ---------------------------------------------------------------------------


def test_forward_answers_as_the_local_experts_and_reports_the_version(base_spec, tmp_path):
    spec = spec_at(base_spec, tmp_path / "ckpt")
    host = make_host(spec, 1, 2)  # experts 2 and 3
    ref = Reference(spec, 2, 4)
    inputs = {2: tokens(5, 0), 3: tokens(3, 1)}
    out, (version, restored_from) = host.forward(1, 0, 1, inputs)
    assert version == 0 and restored_from is None and sorted(out) == [2, 3]
    for e, x in inputs.items():
        assert torch.equal(out[e], ref.forward(1, e, x))
        assert not torch.equal(out[e], ref.forward(0, e, x))  # the layer matters
    # bf16 tokens: computed in fp32, answered in the caller's dtype.
    x16 = tokens(4, 2).bfloat16()
    out16, _ = host.forward(1, 0, 0, {3: x16})
    assert out16[3].dtype == torch.bfloat16
    assert torch.equal(out16[3], ref.forward(0, 3, x16.float()).bfloat16())


def test_backward_sums_workers_and_applies_the_step_on_a_later_call(base_spec, tmp_path):
    spec = spec_at(base_spec, tmp_path / "ckpt")
    host = make_host(spec, 0, 2)  # experts 0 and 1 of both layers
    ref = Reference(spec, 0, 2)
    initial = host.flat_param.clone()

    # Step 0: two workers; expert (0, 0) gets tokens from both, (1, 0) from none.
    call_backward(
        host,
        ref,
        1,
        0,
        0,
        {0: (tokens(6, 1), tokens(6, 2, 30.0)), 1: (tokens(2, 3), tokens(2, 4, 1e-3))},
    )
    call_backward(host, ref, 1, 0, 0, {0: (tokens(4, 5), tokens(4, 6, 30.0))})
    call_backward(host, ref, 1, 0, 1, {1: (tokens(3, 7), tokens(3, 8))})
    norms = ref.grad_norms()
    assert norms[(0, 0)] > CLIP and 0 < norms[(0, 1)] < CLIP  # the clip binds on one only
    assert norms[(1, 0)] == 0
    assert host.applied == 0 and torch.equal(host.flat_param, initial)  # not yet applied
    ref.step(0)

    # The first call of step 1 applies step 0, then serves with the new experts.
    x = tokens(3, 9)
    out, (version, _) = host.forward(1, 1, 0, {0: x})
    assert version == 1 and host.applied == 1
    torch.testing.assert_close(host.flat_param, ref.flat(), atol=ATOL, rtol=0)
    assert not torch.equal(host.flat_param, initial)
    torch.testing.assert_close(out[0], ref.forward(0, 0, x), atol=ATOL, rtol=1e-5)

    # Step 1; a backward of step 2 applies it, at step 1's lr.
    call_backward(host, ref, 1, 1, 1, {0: (tokens(5, 10), tokens(5, 11, 10.0))})
    call_backward(host, ref, 1, 1, 0, {1: (tokens(5, 12), tokens(5, 13))})
    ref.step(1)
    host.backward(1, 2, 0, {0: (tokens(2, 14), tokens(2, 15))})
    assert host.applied == 2 and host.optimizer.step_count == 2
    torch.testing.assert_close(host.flat_param, ref.flat(), atol=ATOL, rtol=0)


def test_steps_in_which_no_token_came_are_applied_with_a_zero_gradient(base_spec, tmp_path):
    spec = spec_at(base_spec, tmp_path / "ckpt")
    host = make_host(spec, 1, 2)
    ref = Reference(spec, 2, 4)
    call_backward(host, ref, 1, 0, 1, {3: (tokens(4, 0), tokens(4, 1))})
    # Nothing came in steps 1 and 2; a forward of step 3 applies steps 0, 1 and 2.
    _, (version, _) = host.forward(1, 3, 0, {2: tokens(1, 2)})
    assert version == 3 and host.applied == 3 and host.optimizer.step_count == 3
    for step in range(3):
        ref.step(step)
    torch.testing.assert_close(host.flat_param, ref.flat(), atol=ATOL, rtol=0)
    # A checkpoint brings the experts to its step the same way.
    host.save_shard(5, "s5")
    assert host.applied == 5 and host.optimizer.step_count == 5
    ref.step(3)
    ref.step(4)
    torch.testing.assert_close(host.flat_param, ref.flat(), atol=ATOL, rtol=0)
    record = uploaded(host, 5, "s5")
    assert (record.lo, record.hi, record.space) == (host.lo, host.hi, EXPERTS_SPACE)


def test_a_new_attempt_of_a_step_drops_its_partial_sum(base_spec, tmp_path):
    spec = spec_at(base_spec, tmp_path / "ckpt")
    host = make_host(spec, 1, 2)
    ref = Reference(spec, 2, 4)
    # Attempt 1 of step 0 is cut short; attempt 2's first backward drops its sum.
    host.backward(1, 0, 0, {2: (tokens(4, 0), tokens(4, 1, 50.0))})
    call_backward(host, ref, 2, 0, 1, {3: (tokens(4, 2), tokens(4, 3))})
    call_backward(host, ref, 2, 0, 0, {2: (tokens(2, 4), tokens(2, 5))})
    ref.step(0)
    host.forward(2, 1, 0, {2: tokens(1, 6)})
    assert host.applied == 1
    torch.testing.assert_close(host.flat_param, ref.flat(), atol=ATOL, rtol=0)

    # Attempt 2 of step 1 is cut short; attempt 3's first call, a forward, drops its sum.
    host.backward(2, 1, 1, {2: (tokens(4, 7), tokens(4, 8, 50.0))})
    _, (version, _) = host.forward(3, 1, 1, {2: tokens(1, 9)})
    assert version == 1
    call_backward(host, ref, 3, 1, 1, {2: (tokens(3, 10), tokens(3, 11))})
    ref.step(1)
    host.forward(3, 2, 0, {3: tokens(1, 12)})
    assert host.applied == 2
    torch.testing.assert_close(host.flat_param, ref.flat(), atol=ATOL, rtol=0)


def test_a_stale_backward_is_ignored(base_spec, tmp_path):
    spec = spec_at(base_spec, tmp_path / "ckpt")
    host = make_host(spec, 0, 1)  # every expert
    ref = Reference(spec, 0, 4)
    call_backward(host, ref, 1, 0, 0, {1: (tokens(4, 0), tokens(4, 1))})
    ref.step(0)
    host.forward(1, 1, 0, {1: tokens(1, 2)})  # applies step 0
    assert host.applied == 1
    after_0 = host.flat_param.clone()

    # Step 0 is applied: its late backward changes nothing (nothing pending).
    assert host.backward(1, 0, 1, {2: (tokens(4, 3), tokens(4, 4, 50.0))}) == {}
    assert torch.equal(host.flat_param, after_0) and not host.flat_grad.any()
    # While step 1 is summed: a late backward of step 0 is not added to it.
    call_backward(host, ref, 1, 1, 1, {0: (tokens(3, 5), tokens(3, 6))})
    summed = host.flat_grad.clone()
    assert host.backward(1, 0, 0, {3: (tokens(4, 7), tokens(4, 8, 50.0))}) == {}
    assert torch.equal(host.flat_grad, summed)
    ref.step(1)
    host.forward(1, 2, 1, {0: tokens(1, 9)})
    assert host.applied == 2
    torch.testing.assert_close(host.flat_param, ref.flat(), atol=ATOL, rtol=0)


def test_a_late_backward_of_an_older_attempt_leaves_the_new_attempts_sum_alone(base_spec, tmp_path):
    spec = spec_at(base_spec, tmp_path / "ckpt")
    host = make_host(spec, 0, 1)
    ref = Reference(spec, 0, 4)
    host.backward(1, 0, 0, {0: (tokens(4, 0), tokens(4, 1))})  # attempt 1, cut short
    call_backward(host, ref, 2, 0, 0, {1: (tokens(4, 2), tokens(4, 3))})  # worker A
    # A straggler of attempt 1 (a call queued before the trunk's failure) runs now.
    host.backward(1, 0, 1, {2: (tokens(4, 4), tokens(4, 5, 50.0))})
    call_backward(host, ref, 2, 0, 1, {3: (tokens(4, 6), tokens(4, 7))})  # worker B
    ref.step(0)
    host.forward(2, 1, 0, {0: tokens(1, 8)})
    torch.testing.assert_close(host.flat_param, ref.flat(), atol=ATOL, rtol=0)


# -- checkpoints -----------------------------------------------------------------------


def train(hosts: list[ExpertHostRuntime], steps: range, attempt: int = 1) -> None:
    """Every expert of every host gets tokens in each of ``steps``; the last stays pending."""
    for step in steps:
        for host in hosts:
            a, b = host.expert_ids
            for layer in range(L):
                inputs = {
                    e: (tokens(3, 100 * step + 10 * e + layer), tokens(3, 7 + e, 5.0))
                    for e in range(a, b)
                }
                host.backward(attempt, step, layer, inputs)
    for host in hosts:
        assert host._acc == (attempt, steps[-1])  # summed, not applied


def uploaded(host: ExpertHostRuntime, step: int, save_id: str) -> ShardRecord:
    """The record of the host's upload, once ``checkpoint_done`` reports it (as the committer)."""
    deadline = time.monotonic() + 60
    while (result := host.checkpoint_done(step, save_id)) is None:
        assert time.monotonic() < deadline, "upload did not finish"
        time.sleep(0.01)
    assert result["ok"], result["error"]
    assert result["space"] == EXPERTS_SPACE and result["save_id"] == save_id
    return ShardRecord.from_dict(result["record"])


def save_checkpoint(hosts: list[ExpertHostRuntime], root, step: int) -> Manifest:
    """What the controller does: every host's save_shard, its outcome, then one manifest."""
    save_id = f"save{step}"
    for host in hosts:
        ticket = host.save_shard(step, save_id)
        assert ticket["step"] == step
    records = [uploaded(host, step, save_id) for host in hosts]
    manifest = Manifest(
        step=step,
        world_size=0,
        strategy="moe",
        numel=0,
        layout=[],
        optimizer={"name": "adamw", "step_count": step},
        shards=records,
    )
    commit(open_store(f"file://{root}"), manifest, keep=2)
    return manifest


def whole(hosts, what: str = "param") -> torch.Tensor:
    """The experts space, concatenated from the hosts' ranges (they tile it in slot order)."""
    if all(isinstance(h, torch.Tensor) for h in hosts):
        return torch.cat(hosts)
    if what == "param":
        return torch.cat([h.flat_param for h in hosts])
    return torch.cat([h.optimizer.state_tensors()[what] for h in hosts])


def test_save_then_load_at_another_host_count_restores_every_expert(base_spec, tmp_path):
    root = tmp_path / "ckpt"
    spec = spec_at(base_spec, root)
    saved = make_hosts(spec, 2)
    train(saved, range(2))
    manifest = save_checkpoint(saved, root, step=2)  # applies step 1 first
    assert [h.applied for h in saved] == [2, 2]
    assert manifest.spaces == {EXPERTS_SPACE: E * L * P}
    assert manifest.owner_ranges(EXPERTS_SPACE) == {0: (0, 2 * L * P), 1: (2 * L * P, E * L * P)}
    with pytest.raises(RuntimeError, match="holds experts of step 2, asked to save step 1"):
        saved[0].save_shard(1)

    # Fresh hosts in the same job restore the newest checkpoint in setup.
    restored = make_hosts(spec, 3)
    # And hosts of another job, told to load it (a resume), read it from its root.
    told = make_hosts(spec_at(base_spec, tmp_path / "elsewhere"), 3)
    assert all(h.applied == 0 and h.restored_from is None for h in told)
    told_before = [h.flat_param.clone() for h in told]
    for h in told:
        result = h.load_checkpoint(f"file://{root}", manifest.to_json())
        assert result["ok"] and result["step"] == 2 and result["bytes_read"] > 0

    params = whole(saved)
    assert not torch.equal(params, whole(told_before))  # training moved them
    by_expert = {k: m for h in saved for k, m in h.held.experts.items()}
    for hosts in (restored, told):
        assert [h.applied for h in hosts] == [2, 2, 2]
        assert all(h.restored_from == f"file://{root}/step-2" for h in hosts)
        assert torch.equal(whole(hosts), params)
        for key in ("exp_avg", "exp_avg_sq"):
            assert whole(saved, key).abs().sum() > 0
            assert torch.equal(whole(hosts, key), whole(saved, key)), key
        assert all(h.optimizer.step_count == 2 for h in hosts)
        assert not any(h.flat_grad.any() for h in hosts)
        # Expert by expert, the modules that serve hold the saved parameters.
        for h in hosts:
            for key, module in h.held.experts.items():
                for p, q in zip(module.parameters(), by_expert[key].parameters(), strict=True):
                    assert torch.equal(p, q), key

    # Both continue as the saving hosts do: the same next step, the same experts.
    for hosts in (saved, restored, told):
        train(hosts, range(2, 3))
        for h in hosts:
            h.forward(1, 3, 0, {})  # applies step 2
    assert torch.equal(whole(restored), whole(saved))
    assert torch.equal(whole(told), whole(saved))


def test_a_host_placed_mid_run_restores_and_takes_up_the_trunks_step(base_spec, tmp_path):
    root = tmp_path / "ckpt"
    spec = spec_at(base_spec, root)
    saved = make_hosts(spec, 2)
    train(saved, range(2))
    save_checkpoint(saved, root, step=2)
    at_2 = saved[1].flat_param.clone()
    train(saved, range(2, 5))  # the trunk trains on; host 1 dies after step 4's backward

    replacement = make_host(spec, 1, 2)
    assert replacement.restored_from == f"file://{root}/step-2"
    assert replacement.applied == 2 and torch.equal(replacement.flat_param, at_2)
    # Its first call is of the trunk's step 5: it serves the checkpoint's experts as
    # version 5 (the updates since are lost, not replayed with zero gradients).
    _, (version, restored_from) = replacement.forward(3, 5, 0, {2: tokens(1, 0)})
    assert version == 5 and replacement.applied == 5
    assert restored_from == f"file://{root}/step-2"
    assert torch.equal(replacement.flat_param, at_2)
    # A late backward of a step before it took up the trunk's is stale.
    assert replacement.backward(3, 4, 0, {2: (tokens(2, 1), tokens(2, 2))}) == {}
    assert not replacement.flat_grad.any()
    # Then it trains on from there.
    train([replacement], range(5, 6), attempt=3)
    replacement.forward(3, 6, 0, {})
    assert replacement.applied == 6 and not torch.equal(replacement.flat_param, at_2)


class DirectHandle:
    """Stands in for a host's Ray handle: ``handle.method.remote(*args)`` calls it directly."""

    def __init__(self, host: ExpertHostRuntime):
        self._host = host

    def __getattr__(self, name: str):
        return SimpleNamespace(remote=getattr(self._host, name))


def test_a_host_sends_its_state_to_its_buddy_every_replicate_every_steps(base_spec, tmp_path):
    spec = spec_at(base_spec, tmp_path / "ckpt")
    spec.config.elastic.enabled = True
    spec.config.elastic.replicate_every = 2
    host, buddy = make_hosts(spec, 2)
    host.forward(1, 0, 0, {})  # it has served: peers() only records the buddy
    host.peers(DirectHandle(buddy))
    copies = {}
    for step in range(5):
        train([host], range(step, step + 1))
        host.forward(1, step + 1, 0, {})  # applies step `step`
        copies[host.applied] = (whole([host]).clone(), whole([host], "exp_avg").clone())
        held = buddy.replica_of(0)
        newest = host.applied - host.applied % 2  # versions 2 and 4 are sent
        if newest == 0:
            assert held is None
            continue
        applied, step_count, tensors = held
        assert (applied, step_count) == (newest, newest)
        assert torch.equal(tensors["param"], copies[newest][0])  # a copy, not a view
        assert torch.equal(tensors["exp_avg"], copies[newest][1])
        assert not torch.equal(tensors["param"], host.flat_param) or newest == host.applied
    # An older copy arriving late does not replace the newer one.
    buddy.keep_replica(0, 2, 2, {"param": torch.zeros(1)})
    assert buddy.replica_of(0)[0] == 4 and buddy.replica_of(1) is None


def test_no_replicas_without_elastic(base_spec, tmp_path):
    spec = spec_at(base_spec, tmp_path / "ckpt")
    spec.config.elastic.enabled = False
    host, buddy = make_hosts(spec, 2)
    host.forward(1, 0, 0, {})
    host.peers(DirectHandle(buddy))
    train([host], range(2))
    host.forward(1, 2, 0, {})
    assert host.applied == 2 and buddy.replica_of(0) is None


def test_a_placed_hosts_optimizer_state_survives_a_checkpoint_round_trip(base_spec, tmp_path):
    root = tmp_path / "ckpt"
    spec = spec_at(base_spec, root)
    saved = make_hosts(spec, 2)
    train(saved, range(2))
    save_checkpoint(saved, root, step=2)
    train(saved[:1], range(2, 5))  # host 1 dies; a replacement takes slot 1 at step 4
    saved[1] = make_host(spec, 1, 2)
    train(saved, range(4, 5))
    save_checkpoint(saved, root, step=5)  # applies step 4

    restored = make_hosts(spec, 2)
    assert [h.optimizer.step_count for h in restored] == [h.optimizer.step_count for h in saved]
    for hosts in (saved, restored):
        train(hosts, range(5, 6))
        for h in hosts:
            h.forward(1, 6, 0, {})
    assert torch.equal(whole(restored), whole(saved))


def test_a_checkpoint_whose_experts_space_has_another_size_is_refused(base_spec, tmp_path):
    root = tmp_path / "ckpt"
    store = open_store(f"file://{root}")
    size = E * L * P - 2 * L * P  # as if saved by a model with 3 experts
    state = {k: torch.randn(size) for k in ("param", "exp_avg", "exp_avg_sq")}
    record = write_shard(store, 4, 0, 0, size, state, space=EXPERTS_SPACE)
    manifest = Manifest(
        step=4,
        world_size=0,
        strategy="moe",
        numel=0,
        layout=[],
        optimizer={"name": "adamw", "step_count": 4},
        shards=[record],
    )
    commit(store, manifest, keep=2)

    host = make_host(spec_at(base_spec, tmp_path / "elsewhere"), 0, 2)
    before = host.flat_param.clone()
    result = host.load_checkpoint(f"file://{root}", manifest.to_json())
    assert result["ok"] is False and result["step"] == 4
    for field in ("model.n_expert", "model.d_model", "model.d_expert", "model.n_layer"):
        assert field in result["error"]
    assert f"{size} values" in result["error"] and str(E * L * P) in result["error"]
    assert torch.equal(host.flat_param, before) and host.applied == 0
    assert host.restored_from is None
    # A host seated in that job would restore from it: its setup refuses it too.
    with pytest.raises(CorruptCheckpointError, match=r"model\.n_expert"):
        make_host(spec_at(base_spec, root), 0, 2)
