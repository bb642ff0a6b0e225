"""Unit tests for mixture-of-experts routing and the MoE layer, in one process (no Ray).

``collectives/moe_routing.py``: ``route`` (dead experts masked before the
choice, the k largest live logits, Mixtral's softmax over the chosen ones,
padding when fewer experts live than ``top_k``, the capacity rule with first
choices seated before second choices and earlier tokens first),
``renormalise`` (over the slots that answered, zero and no gradient for the
rest) and ``load_balancing_loss`` (1.0 when balanced, gradient only through
the gate's probabilities), each against a hand-written reference.

``actors/models/gpt_moe.py``: ``MoEFeedForward`` whose experts partly fail to
answer (a test double standing in for remote hosts) against a per-token
reference, outputs and gradients; ``GPTMoE``'s forward and backward, its
expert-major ``expert_slots``, its active-parameter ``flops_per_token`` and
its ``top_k`` check.

Tolerance: ``ATOL``/``RTOL`` (float32) where the layer and the reference add
the same terms in another order; tighter or exact where both compute the same ops.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actors.models.gpt_moe import GPTMoE, LocalExperts, MoEFeedForward
from collectives.moe_routing import (
    DROPPED,
    load_balancing_loss,
    renormalise,
    route,
    slots_of,
)

# float32: the layer's batched expert calls vs. one token at a time, and gradients
# summed over the tokens in another order.
ATOL, RTOL = 1e-6, 1e-5


def live_mask(n_expert: int, dead: set[int] = frozenset()) -> torch.Tensor:
    return torch.tensor([e not in dead for e in range(n_expert)])


def random_logits(T: int, E: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, E, generator=g)


def chosen(experts_TK: torch.Tensor, t: int) -> list[int]:
    return [e for e in experts_TK[t].tolist() if e != DROPPED]


# -- route --------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
def test_route_never_chooses_a_dead_expert_even_with_the_highest_logits(top_k):
    E, dead = 7, {1, 4, 5}
    logits = random_logits(64, E, seed=top_k)
    logits[:, sorted(dead)] += 100.0  # every token's favourites are the dead ones
    r = route(logits, top_k, live_mask(E, dead))
    assert r.experts_TK.shape == (64, top_k)
    assert (r.experts_TK != DROPPED).all()  # 4 live experts: enough for every top_k here
    assert not set(r.experts_TK.unique().tolist()) & dead
    assert (r.probs_TE[:, sorted(dead)] == 0).all()


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_route_picks_the_k_largest_live_logits_with_softmax_weights(top_k):
    E, dead = 6, {2}
    logits = random_logits(50, E, seed=10 + top_k)
    live = live_mask(E, dead)
    r = route(logits, top_k, live)
    for t in range(len(logits)):
        ranked = sorted((e for e in range(E) if e not in dead), key=lambda e: -logits[t, e])
        assert r.experts_TK[t].tolist() == ranked[:top_k], t  # best first
        expected = torch.softmax(logits[t, ranked[:top_k]], dim=0)
        torch.testing.assert_close(r.weights_TK[t], expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(r.weights_TK.sum(-1), torch.ones(len(logits)), atol=1e-6, rtol=0)
    # probs: a softmax over the live experts only (the balancing loss reads it).
    expected_probs = torch.softmax(logits.masked_fill(~live, float("-inf")), dim=-1)
    torch.testing.assert_close(r.probs_TE, expected_probs, atol=1e-7, rtol=0)


def test_route_pads_with_dropped_slots_when_fewer_experts_live_than_top_k():
    E, top_k = 5, 4
    logits = random_logits(12, E, seed=3)
    live = live_mask(E, dead={0, 2, 3})  # 2 live
    r = route(logits, top_k, live)
    assert r.experts_TK.shape == (12, top_k) and r.weights_TK.shape == (12, top_k)
    assert (r.experts_TK[:, 2:] == DROPPED).all()
    assert (r.weights_TK[:, 2:] == 0).all()
    for t in range(12):
        assert sorted(r.experts_TK[t, :2].tolist()) == [1, 4]
    torch.testing.assert_close(r.weights_TK.sum(-1), torch.ones(12), atol=1e-6, rtol=0)


def test_route_with_no_live_expert_drops_every_slot():
    logits = random_logits(9, 4, seed=4)
    r = route(logits, 2, torch.zeros(4, dtype=torch.bool), capacity_factor=1.5)
    assert r.experts_TK.shape == (9, 2) and (r.experts_TK == DROPPED).all()
    assert r.weights_TK.shape == (9, 2) and (r.weights_TK == 0).all()
    assert not r.probs_TE.isnan().any()
    assert float(load_balancing_loss(r.probs_TE, r.experts_TK, torch.zeros(4, dtype=bool))) == 0


def seated_by_rule(experts_TK: torch.Tensor, capacity: int) -> torch.Tensor:
    """The capacity rule written out: per expert, a queue in (slot, token) order; first come."""
    T, K = experts_TK.shape
    out = experts_TK.clone()
    taken: dict[int, int] = {}
    for k in range(K):
        for t in range(T):
            e = int(experts_TK[t, k])
            if e == DROPPED:
                continue
            if taken.get(e, 0) >= capacity:
                out[t, k] = DROPPED
            else:
                taken[e] = taken.get(e, 0) + 1
    return out


@pytest.mark.parametrize(
    "T,E,dead,top_k,cf,seed",
    [
        (40, 4, set(), 2, 1.0, 0),
        (33, 6, {0, 3}, 2, 0.75, 1),
        (50, 5, {4}, 3, 1.25, 2),
        (20, 8, {1, 2, 3, 4}, 1, 1.0, 3),
    ],
)
def test_route_capacity_seats_first_choices_first_and_earlier_tokens_first(
    T, E, dead, top_k, cf, seed
):
    logits = random_logits(T, E, seed)
    logits[:, 0] += 1.5  # a popular expert (when alive): its queue overflows
    logits[:, 5 % E] += 1.0
    live = live_mask(E, dead)
    n_live = E - len(dead)
    capacity = math.ceil(cf * T * top_k / n_live)
    free = route(logits, top_k, live, capacity_factor=0.0)
    r = route(logits, top_k, live, capacity_factor=cf)
    expected = seated_by_rule(free.experts_TK, capacity)
    assert torch.equal(r.experts_TK, expected)
    counts = torch.bincount(r.experts_TK[r.experts_TK != DROPPED], minlength=E)
    assert int(counts.max()) == capacity  # the popular expert is full, none is over
    assert (r.experts_TK == DROPPED).any()
    # Dropped slots weigh 0; kept slots keep the gate's softmax weight over the chosen.
    kept = r.experts_TK != DROPPED
    assert (r.weights_TK[~kept] == 0).all()
    assert torch.equal(r.weights_TK[kept], free.weights_TK[kept])


def test_route_capacity_prefers_a_later_tokens_first_choice_to_an_earlier_second_choice():
    # Tokens 0-3 choose (1, 0), tokens 4-7 choose (0, 2); capacity ceil(0.5*8*2/4) = 2.
    logits = torch.zeros(8, 4)
    logits[:4, 1], logits[:4, 0] = 3.0, 2.0
    logits[4:, 0], logits[4:, 2] = 3.0, 2.0
    r = route(logits, 2, live_mask(4), capacity_factor=0.5)
    D = DROPPED
    expected = [[1, D], [1, D], [D, D], [D, D], [0, 2], [0, 2], [D, D], [D, D]]
    assert r.experts_TK.tolist() == expected


def test_route_capacity_counts_live_experts_only():
    # 8 experts, 4 live, every token's favourite is expert 0: capacity is
    # ceil(1.0 * 16 * 2 / 4) = 8 (it would be 4 if dead experts counted).
    logits = random_logits(16, 8, seed=5)
    logits[:, 0] += 10.0
    r = route(logits, 2, live_mask(8, dead={4, 5, 6, 7}), capacity_factor=1.0)
    assert int((r.experts_TK == 0).sum()) == 8
    assert (r.experts_TK[:8, 0] == 0).all() and (r.experts_TK[8:, 0] == DROPPED).all()


def test_route_capacity_factor_zero_drops_nothing():
    logits = random_logits(64, 4, seed=6)
    logits[:, 0] += 10.0  # every token wants expert 0
    r = route(logits, 2, live_mask(4), capacity_factor=0.0)
    assert (r.experts_TK != DROPPED).all()
    assert (r.experts_TK[:, 0] == 0).all()
    torch.testing.assert_close(r.weights_TK.sum(-1), torch.ones(64), atol=1e-6, rtol=0)


def test_slots_of_lists_token_and_slot_pairs_in_token_order():
    experts_TK = torch.tensor([[2, 0], [0, 1], [1, 2], [DROPPED, 2]])
    tokens, slots = slots_of(experts_TK, 2)
    assert tokens.tolist() == [0, 2, 3] and slots.tolist() == [0, 1, 1]
    tokens, slots = slots_of(experts_TK, 3)
    assert tokens.numel() == 0 and slots.numel() == 0


# -- renormalise ----------------------------------------------------------------


def test_renormalise_over_answered_slots():
    weights = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.25, 0.25], [0.7, 0.2, 0.1]])
    answered = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    out = renormalise(weights, answered)
    expected = torch.tensor([[0.6 / 0.7, 0.0, 0.1 / 0.7], [0.0, 0.0, 0.0], [0.7, 0.2, 0.1]])
    torch.testing.assert_close(out, expected, atol=1e-7, rtol=0)
    assert torch.isfinite(out).all()


def test_renormalise_gives_unanswered_slots_exactly_zero_gradient():
    g = torch.Generator().manual_seed(7)
    weights = torch.softmax(torch.randn(20, 3, generator=g), dim=-1).requires_grad_(True)
    answered = torch.rand(20, 3, generator=g) < 0.6
    answered[0] = False  # a token with nothing answered
    answered[1] = True  # and one with everything
    answered[2] = torch.tensor([False, True, False])  # and one with one slot only
    out = renormalise(weights, answered)
    with torch.no_grad():
        sums = out.sum(-1)
    assert (out[0] == 0).all()
    assert (out[~answered] == 0).all()
    torch.testing.assert_close(sums, answered.any(-1).float(), atol=1e-6, rtol=0)
    coef = torch.randn(20, 3, generator=g)
    (out * coef).sum().backward()
    grad = weights.grad
    assert torch.isfinite(grad).all()
    assert (grad[~answered] == 0).all()
    # And the answered slots' gradient is the quotient rule's: (c_i - sum_j w_j c_j) / W.
    for t in range(3, 20):
        a = answered[t]
        if not a.any():
            continue
        w = weights.detach()[t][a]
        c = coef[t][a]
        expected = (c - (w * c).sum() / w.sum()) / w.sum()
        torch.testing.assert_close(grad[t][a], expected, atol=1e-5, rtol=1e-5)


# -- load_balancing_loss -----------------------------------------------------------


def test_balancing_loss_is_one_for_uniform_balanced_routing():
    T, E, K = 8, 4, 2
    r = route(torch.zeros(T, E), K, live_mask(E))  # uniform probabilities
    experts_TK = torch.tensor([[0, 1], [2, 3]] * (T // 2))  # every expert 4 of 16 slots
    loss = load_balancing_loss(r.probs_TE, experts_TK, live_mask(E))
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


def test_balancing_loss_is_one_for_balanced_routing_over_live_experts_only():
    E, dead = 6, {1, 4}
    live = live_mask(E, dead)
    r = route(torch.zeros(8, E), 1, live)  # uniform over the 4 live ones, 0 on the dead
    experts_TK = torch.tensor([[0], [2], [3], [5]] * 2)
    loss = load_balancing_loss(r.probs_TE, experts_TK, live)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


def test_balancing_loss_value_and_gradient_only_through_probs():
    g = torch.Generator().manual_seed(8)
    T, E = 6, 4
    live = live_mask(E, dead={3})
    probs = torch.softmax(torch.randn(T, E, generator=g).masked_fill(~live, -math.inf), -1)
    probs.requires_grad_(True)
    experts_TK = torch.tensor([[0, 1], [0, 2], [0, DROPPED], [1, 0], [2, DROPPED], [0, 1]])
    loss = load_balancing_loss(probs, experts_TK, live)
    # f: 10 routed slots (dropped ones excluded): expert 0 five, 1 three, 2 two.
    f = torch.tensor([5, 3, 2, 0]) / 10
    expected = 3 * (f * probs.detach().mean(0)).sum()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    loss.backward()
    # f is a count, not differentiated: d loss / d probs[t, e] = n_live * f_e / T.
    torch.testing.assert_close(probs.grad, (3 * f / T).expand(T, E), atol=1e-7, rtol=0)
    assert not experts_TK.requires_grad


def test_balancing_loss_gradient_reaches_the_gate_logits_through_route():
    logits = random_logits(16, 4, seed=9).requires_grad_(True)
    r = route(logits, 2, live_mask(4), capacity_factor=1.0)
    load_balancing_loss(r.probs_TE, r.experts_TK, live_mask(4)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# -- MoEFeedForward with experts that fail to answer ----------------------------------


class FailingExperts(nn.Module):
    """Test double for remote experts: ``dead`` are not live (masked before routing);
    ``failed`` are routed to but never answer (zero output, answered False), as a host that
    missed its deadline. The others answer with the wrapped ``LocalExperts``."""

    def __init__(self, local: LocalExperts, dead: set[int], failed: set[int]):
        super().__init__()
        self.local = local
        self.dead, self.failed = dead, failed

    def live(self) -> torch.Tensor:
        return live_mask(len(self.local), self.dead)

    def forward(self, x_TC, experts_TK):
        failed_TK = torch.isin(experts_TK, torch.tensor(sorted(self.failed)))
        sent_TK = experts_TK.masked_fill(failed_TK, DROPPED)  # failed hosts never compute
        out_TKC, answered_TK = self.local(x_TC, sent_TK)
        return out_TKC, answered_TK & ~failed_TK


def reference_moe(x_BTC, gate: nn.Linear, experts, top_k, dead, failed):
    """Per token: the top_k live experts by gate logit; of those, the ones that answered,
    weighted by a softmax over their logits (softmax over the chosen, renormalised over the
    answered, is exactly this); y = sum of weight * expert(x). No answer: y = 0."""
    B, T, C = x_BTC.shape
    x_TC = x_BTC.reshape(B * T, C)
    logits = gate(x_TC)
    rows = []
    for t in range(B * T):
        live = [e for e in range(len(experts)) if e not in dead]
        ranked = sorted(live, key=lambda e: -float(logits[t, e].detach()))[:top_k]
        answered = [e for e in ranked if e not in failed]
        if not answered:
            rows.append(x_TC.new_zeros(C) + 0 * logits[t].sum())
            continue
        w = torch.softmax(logits[t, answered], dim=0)
        rows.append(sum(w[i] * experts[e](x_TC[t : t + 1])[0] for i, e in enumerate(answered)))
    return torch.stack(rows).view(B, T, C)


def test_moe_layer_mixes_the_experts_that_answered_outputs_and_gradients():
    torch.manual_seed(0)
    C, E, K = 16, 5, 2
    dead, failed = {3}, {0, 1}
    layer = MoEFeedForward(C, E, K, d_hidden=24, capacity_factor=0.0, dropout=0.0)
    with torch.no_grad():
        layer.gate.weight.mul_(20)  # sharper gate: clearly separated logits
    ref_gate, ref_experts = copy.deepcopy(layer.gate), copy.deepcopy(layer.experts)
    layer.experts = FailingExperts(layer.experts, dead, failed)
    x = torch.randn(2, 24, C)
    x_layer = x.clone().requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)

    y = layer(x_layer)
    y_ref = reference_moe(x_ref, ref_gate, ref_experts, K, dead, failed)

    # The case mix the test is about: none, some and all of a token's experts answered.
    logits = ref_gate(x.reshape(-1, C)).detach()
    logits[:, sorted(dead)] = -math.inf
    top = logits.topk(K, dim=-1).indices
    n_failed = torch.isin(top, torch.tensor(sorted(failed))).sum(-1)
    assert {0, 1, 2} <= set(n_failed.tolist())
    assert 3 not in top.unique().tolist()

    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=RTOL)
    assert (y.reshape(-1, C)[n_failed == K] == 0).all()
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(y.shape, generator=g)
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()
    torch.testing.assert_close(x_layer.grad, x_ref.grad, atol=ATOL, rtol=RTOL)
    assert layer.gate.weight.grad.abs().sum() > 0
    torch.testing.assert_close(layer.gate.weight.grad, ref_gate.weight.grad, atol=ATOL, rtol=RTOL)
    for e in range(E):
        ours = list(layer.experts.local[e].parameters())
        theirs = list(ref_experts[e].parameters())
        for p, q in zip(ours, theirs, strict=True):
            if e in failed or e in dead:
                assert p.grad is None or (p.grad == 0).all(), e
                assert q.grad is None, e  # the reference never called it either
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, e
                torch.testing.assert_close(p.grad, q.grad, atol=ATOL, rtol=RTOL)


def test_moe_layer_with_every_expert_answering_equals_the_plain_top_k_mixture():
    torch.manual_seed(1)
    C, E, K = 8, 4, 2
    layer = MoEFeedForward(C, E, K, d_hidden=16, capacity_factor=0.0, dropout=0.0)
    x = torch.randn(3, 5, C)
    y = layer(x)
    y_ref = reference_moe(x, layer.gate, layer.experts, K, dead=set(), failed=set())
    torch.testing.assert_close(y, y_ref, atol=ATOL, rtol=RTOL)
    # The balancing loss of this forward is kept for the model's auxiliary loss.
    r = route(layer.gate(x.reshape(-1, C)), K, live_mask(E))
    expected = load_balancing_loss(r.probs_TE, r.experts_TK, live_mask(E))
    assert layer.balance_loss is not None
    assert layer.balance_loss.item() == pytest.approx(expected.item(), abs=1e-6)


# -- GPTMoE ---------------------------------------------------------------------------

VOCAB = 40
MODEL = dict(vocab_size=VOCAB, n_layer=3, n_head=2, d_model=16, seq_len=8, n_expert=4, top_k=2)


def test_gpt_moe_forward_backward_trains_trunk_gates_and_experts():
    torch.manual_seed(0)
    model = GPTMoE(**MODEL, aux_loss_weight=0.5)
    idx = torch.randint(0, VOCAB, (4, 8))
    logits = model(idx)
    assert logits.shape == (4, 8, VOCAB)
    aux = model.auxiliary_loss()
    losses = [m.balance_loss for m in model.moe_layers()]
    assert aux is not None and all(x is not None for x in losses)
    assert aux.item() == pytest.approx(0.5 * sum(x.item() for x in losses), rel=1e-6)
    loss = F.cross_entropy(logits.view(-1, VOCAB), idx.view(-1)) + aux
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for m in model.moe_layers():
        assert m.gate.weight.grad.abs().sum() > 0
    # 32 tokens x top-2 over 4 experts with capacity 2.0: every expert gets some.
    for layer, e, expert in model.expert_slots():
        assert expert.fc.weight.grad.abs().sum() > 0, (layer, e)


def test_gpt_moe_without_aux_weight_has_no_auxiliary_loss():
    model = GPTMoE(**MODEL, aux_loss_weight=0.0)
    model(torch.randint(0, VOCAB, (1, 8)))
    assert model.auxiliary_loss() is None


def test_expert_slots_are_expert_major_and_cover_every_expert_once():
    model = GPTMoE(**MODEL)
    slots = model.expert_slots()
    L, E = MODEL["n_layer"], MODEL["n_expert"]
    assert [(layer, e) for layer, e, _ in slots] == [(l_, e) for e in range(E) for l_ in range(L)]
    for layer, e, module in slots:
        assert module is model.blocks[layer].moe.experts[e]
    assert len({id(m) for _, _, m in slots}) == L * E


def test_flops_per_token_counts_active_parameters_only():
    model = GPTMoE(**MODEL, d_expert=24)
    L, E, K, d, T = 3, 4, 2, 16, 8
    per_expert = d * 24 + 24 + 24 * d + d
    total = sum(p.numel() for p in model.parameters())  # the tied head counted once
    active = total - L * E * per_expert + L * K * per_expert
    assert model.flops_per_token() == 6 * active + 12 * L * d * T


@pytest.mark.parametrize("top_k", [0, -1, 5])
def test_gpt_moe_rejects_a_top_k_outside_one_to_n_expert(top_k):
    with pytest.raises(ValueError, match=r"model\.top_k \(" + str(top_k)):
        GPTMoE(**{**MODEL, "top_k": top_k})
