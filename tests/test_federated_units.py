"""``strategy=federated``'s pure parts, without Ray: client splits, sampling, local training
and the config's checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.client_data import client_rows, label_skew_split, token_windows
from actors.datasets import DataError, digits
from actors.fed_clients import ClientGroupRuntime
from actors.fed_server import sample_clients, server_optimizer
from orchestrator import JobSpec
from orchestrator.spec import ConfigError

BASE = ["strategy=federated", "model=mlp", "model.hidden=[8]", "data=digits"]


def _spec(*extra: str) -> JobSpec:
    return JobSpec.from_overrides([*BASE, *extra])


# -- client data -------------------------------------------------------------


def test_iid_split_deals_every_row_once_in_near_equal_shares():
    rows = np.arange(100, 203)
    parts = label_skew_split(np.zeros(len(rows)), rows, 7, None, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == rows.tolist()
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dirichlet_split_skews_labels_more_as_alpha_falls():
    data = digits()
    labels = data.y[data.train_rows]

    def classes_per_client(alpha: float) -> float:
        parts = label_skew_split(labels, data.train_rows, 10, alpha, seed=0)
        assert sorted(np.concatenate(parts).tolist()) == sorted(data.train_rows.tolist())
        # Classes holding >= 5% of a client's rows.
        counts = [np.bincount(data.y[p], minlength=10) / len(p) for p in parts]
        return float(np.mean([(c >= 0.05).sum() for c in counts]))

    skewed, mild = classes_per_client(0.1), classes_per_client(100.0)
    assert skewed < 4 < 9 <= mild
    again = label_skew_split(labels, data.train_rows, 10, 0.1, seed=0)
    first = label_skew_split(labels, data.train_rows, 10, 0.1, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(again, first, strict=True))  # seeded


def test_splits_that_cannot_serve_every_client_say_which_field_to_change():
    with pytest.raises(DataError, match="strategy.clients"):
        label_skew_split(np.zeros(3), np.arange(3), 5, None, seed=0)
    with pytest.raises(DataError, match="data.alpha"):
        label_skew_split(np.zeros(10), np.arange(10), 2, -1.0, seed=0)
    with pytest.raises(DataError, match="model.seq_len"):
        token_windows(100, None, 10, seq_len=16)


def test_token_clients_hold_whole_documents_when_the_corpus_has_them():
    starts = np.array([0, 40, 90, 150, 260, 300])
    windows = token_windows(400, starts, 3, seq_len=8)
    spans = [(int(w[0]), int(w[-1]) + 8) for w in windows]
    assert [lo for lo, _ in spans] == [0, 150, 260]  # each span begins at a document
    for lo_hi, w in zip(spans, windows, strict=True):
        assert np.all(np.diff(w) == 8) and lo_hi[1] <= 400
    # A document longer than a span is cut inside, rather than leaving a client nothing.
    windows = token_windows(400, np.array([0, 90, 380]), 4, seq_len=8)
    assert [int(w[0]) for w in windows] == [0, 90, 200, 300]


def test_a_dataset_may_split_itself():
    class Own:
        def client_rows(self, n, seed):
            return [np.array([i]) for i in range(n)]

    assert [r.tolist() for r in client_rows(Own(), 3, 0, None)] == [[0], [1], [2]]


# -- sampling ------------------------------------------------------------------


def test_client_sampling_is_a_pure_function_of_seed_round_and_attempt():
    a = sample_clients(0, 5, 0, 100, 10)
    assert a == sample_clients(0, 5, 0, 100, 10) and len(set(a)) == 10
    assert a != sample_clients(0, 6, 0, 100, 10) and a != sample_clients(0, 5, 1, 100, 10)
    pool = [1, 3, 5, 7]
    assert set(sample_clients(0, 5, 1, 100, 10, pool)) == set(pool)  # all it can get


# -- local training ------------------------------------------------------------


def _clients(*extra: str) -> tuple[ClientGroupRuntime, torch.Tensor]:
    spec = _spec("strategy.clients=4", "strategy.per_round=4", *extra)
    runtime = ClientGroupRuntime(spec, 0, digits())
    runtime.setup(None, 0, 1)  # one actor hosts every client
    return runtime, runtime.flat.detach().clone()


def test_a_partial_sum_is_the_weighted_sum_of_the_clients_updates():
    runtime, start = _clients()
    each = runtime.train(0, start, [0, 2, 3], 0.1, "each")
    summed = runtime.train(0, start, [0, 2, 3], 0.1, "sum")
    weights = torch.tensor(each.samples, dtype=torch.float32)
    expected = (each.updates * weights[:, None]).sum(0)
    torch.testing.assert_close(summed.weighted_sum, expected, atol=1e-5, rtol=1e-5)
    assert summed.clients == each.clients == [0, 2, 3]
    assert summed.loss_sum == pytest.approx(each.loss_sum)


def test_fedprox_pulls_local_training_towards_the_global_model():
    plain, start = _clients("strategy.local_epochs=3")
    prox, _ = _clients(
        "strategy.local_epochs=3", "strategy.aggregator=fedprox", "strategy.prox_mu=5"
    )
    far = plain.train(0, start, [1], 0.2, "each").updates.norm()
    near = prox.train(0, start, [1], 0.2, "each").updates.norm()
    assert near < 0.8 * far


def test_scaffold_keeps_a_control_variate_per_client():
    runtime, start = _clients("strategy.aggregator=scaffold")
    control = torch.zeros_like(start)
    out = runtime.train(0, start, [0, 1], 0.1, "sum", control)
    # Option II with c = c_i = 0: c_i+ = -delta / (K lr); the sum of the changes comes back.
    steps = -(-len(runtime.rows[0]["y"]) // 32)
    delta0 = runtime.train(0, start, [0], 0.1, "each", None).updates[0]
    torch.testing.assert_close(runtime.control[0], -delta0 / (steps * 0.1), atol=1e-5, rtol=1e-4)
    assert out.control_sum is not None and torch.isfinite(out.control_sum).all()


def test_a_client_that_raises_is_reported_and_the_others_still_train():
    runtime, start = _clients()
    runtime.rows[2]["y"][:] = 99  # past the last class: cross-entropy raises
    out = runtime.train(0, start, [1, 2, 3], 0.1, "sum")
    assert out.clients == [1, 3] and list(out.errors) == [2]
    assert "out of bounds" in out.errors[2]
    runtime.rows[3]["x"][:] = float("nan")
    out = runtime.train(0, start, [1, 3], 0.1, "sum")
    assert out.clients == [1] and out.rejected == {3: "update is not finite"}
    assert torch.isfinite(out.weighted_sum).all()


# -- config --------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, field",
    [
        ("strategy.per_round=30", "strategy.per_round"),
        ("strategy.aggregator=krum", "strategy.aggregator"),
        ("strategy.min_results=11", "strategy.min_results"),
        ("strategy.over_commit=11", "strategy.over_commit"),
        ("strategy.trim=0.5", "strategy.trim"),
        ("strategy.round_deadline_s=0", "strategy.round_deadline_s"),
        ("strategy.dp.delta=2", "strategy.dp"),
        ("cluster.max_workers=4", "cluster.min_workers / cluster.max_workers"),
    ],
)
def test_bad_federated_fields_are_named(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _spec(override)


def test_secure_aggregation_refuses_rules_that_need_each_update():
    with pytest.raises(ConfigError, match="secure_aggregation"):
        _spec("strategy.secure_aggregation=true", "strategy.aggregator=median")


def test_the_server_optimizer_follows_the_aggregator():
    assert server_optimizer(_spec()).name == "sgd"
    assert server_optimizer(_spec("strategy.aggregator=fedadam")).name == "adamw"
    assert server_optimizer(_spec("strategy.aggregator=fedyogi")).name == "yogi"
    assert server_optimizer(_spec()).weight_decay == 0.0


# -- the server's checks and rules ----------------------------------------------


def _server(*extra: str, numel: int = 4):
    from types import SimpleNamespace

    from actors.fed_server import FederatedServerRuntime

    server = FederatedServerRuntime(_spec(*extra), 0, digits())
    server.engine = SimpleNamespace(layout=SimpleNamespace(numel=numel))  # only its size is read
    server.center = torch.zeros(numel)
    return server


def test_the_server_rejects_malformed_updates_before_they_are_used():
    from actors.fed_clients import ClientResults
    from actors.fed_server import RoundOutcome

    server = _server("strategy.aggregator=median", "strategy.max_update_norm=10")
    result = ClientResults(slot=0, clients=[0, 1, 2, 3, 4], samples=[5] * 5)
    result.updates = torch.stack(
        [
            torch.ones(4),
            torch.full((4,), float("nan")),
            torch.full((4,), 100.0),  # norm 200 > 10
            torch.ones(4) * 2,
            torch.ones(4) * 3,
        ]
    )
    partial = ClientResults(slot=1, clients=[5], samples=[5], weighted_sum=torch.ones(3))
    out = RoundOutcome(sampled=list(range(6)))
    for r in (result, partial):
        server._validate(r, out)
        out.results.append(r)
    assert set(out.rejected) == {1, 2, 5}
    assert "shape" in out.rejected[5] and "finite" in out.rejected[1]
    assert out.finished == [0, 3, 4]
    # The median of what was accepted: the bad rows never reach the rule.
    torch.testing.assert_close(server._aggregate(out), torch.full((4,), 2.0))


def test_local_steps_caps_a_clients_round():
    runtime, start = _clients("strategy.local_epochs=3", "strategy.batch_size=8")
    *_, steps = runtime._train_client(0, 1, start, 0.1, None)
    assert steps == 3 * -(-len(runtime.rows[1]["y"]) // 8)  # every batch of every epoch
    capped, _ = _clients(
        "strategy.local_epochs=3", "strategy.batch_size=8", "strategy.local_steps=2"
    )
    *_, steps = capped._train_client(0, 1, start, 0.1, None)
    assert steps == 2
