"""``strategy=moe``'s config checks, and the program's plan and status without Ray."""

from __future__ import annotations

import pytest

from actors.models.gpt_moe import GPTMoE
from orchestrator.program import program_for
from orchestrator.spec import ConfigError, JobSpec

MOE = ["model=gpt_moe", "strategy=moe"]


@pytest.mark.parametrize(
    "overrides, must_mention",
    [
        (["strategy=moe"], "model: strategy=moe needs a model with experts"),
        ([*MOE, "strategy.expert_hosts=5"], "strategy.expert_hosts: must be between 1 and"),
        ([*MOE, "strategy.expert_hosts=0"], "strategy.expert_hosts"),
        ([*MOE, "strategy.k_min=3"], "strategy.k_min: must be between 1 and model.top_k (2)"),
        ([*MOE, "strategy.grace_s=-1"], "strategy.grace_s: must be >= 0"),
        ([*MOE, "strategy.timeout_s=0"], "strategy.timeout_s: must be > 0"),
        ([*MOE, "model.top_k=5"], "model.top_k (5) must be between 1 and model.n_expert (4)"),
    ],
)
def test_bad_moe_fields_name_the_field(overrides, must_mention):
    with pytest.raises(ConfigError) as err:
        JobSpec.from_overrides(overrides)
    assert must_mention in str(err.value)


def test_the_trunk_is_what_workers_hold_and_hosts_are_a_state_saving_role():
    spec = JobSpec.from_overrides([*MOE, "strategy.expert_hosts=3", "cluster.workers=2"])
    program = program_for(spec)
    worker, host = program.roles()
    assert (worker.name, worker.count) == ("worker", 2)
    assert (host.name, host.count, host.saves_state) == ("expert_host", 3, True)
    assert [program.role_setup_args("expert_host", i) for i in range(3)] == [
        (0, 3),
        (1, 3),
        (2, 3),
    ]
    model = GPTMoE(vocab_size=256, n_layer=2, d_model=32, n_head=2, seq_len=16)
    experts = sum(p.numel() for _, _, m in model.expert_slots() for p in m.parameters())
    trunk = program.trained_layout(model)
    assert trunk.numel == sum(p.numel() for p in model.parameters()) - experts
    assert not any(".experts." in s.name for s in trunk.slots)
    plan = program.plan([None, None], trunk.numel)
    assert plan.bounds is None  # replicated, as ddp
    assert [s.bounds for s in program.state_spaces(plan, trunk.numel)] == [((0, trunk.numel),)]


def test_a_dead_host_stays_masked_until_the_registry_replaces_it():
    from actors.expert_client import ExpertClient, HostEntry

    spec = JobSpec.from_overrides([*MOE, "strategy.ban_s=0"])  # a timed ban ends at once
    client = ExpertClient(4, spec.strategy)
    client.update([HostEntry(0, None, (0, 2), 7), HostEntry(1, None, (2, 4), 8)], 1, 0)
    assert client.live().tolist() == [True] * 4
    client._strike(1)  # a failed call: banned for ban_s, i.e. not at all here
    assert client.live().tolist() == [True] * 4
    client._dead.add(8)  # the call failed because the actor died
    client.update([HostEntry(0, None, (0, 2), 7), HostEntry(1, None, (2, 4), 8)], 1, 1)
    assert client.live().tolist() == [True, True, False, False]  # the old registry: still out
    client.update([HostEntry(0, None, (0, 2), 7), HostEntry(1, None, (2, 4), 9)], 1, 2)
    assert client.live().tolist() == [True] * 4  # its replacement is live
