import math

import pytest
import torch
import torch.nn.functional as F

from flexres.methods import create_method


def kl(p, q):
    """KL(p || q) for probability rows, batch mean: sum_c p log(p/q)."""
    return (p * (p.log() - q.log())).sum(1).mean()


@pytest.fixture
def example():
    torch.manual_seed(1)
    logits = [torch.randn(4, 3, requires_grad=True) for _ in range(3)]  # S = 3, largest resolution first
    labels = torch.tensor([0, 2, 1, 2])
    return logits, labels


def test_parallel_is_the_sum_of_cross_entropies(example):
    logits, labels = example
    m = create_method("parallel", resolutions=[96, 64, 32])

    class FakeModel:
        def set_operating_point(self, r):
            self.r = r

        def __call__(self, x):
            return logits[[96, 64, 32].index(self.r)]

    out = m(FakeModel(), (None, None, None), labels)
    expect = sum(F.cross_entropy(z, labels) for z in logits)
    torch.testing.assert_close(out.loss, expect)


@pytest.mark.parametrize("mred", ["vanilla", "full"])
def test_mred_losses_match_the_equations(example, mred):
    logits, labels = example
    m = create_method("rsnet", resolutions=[96, 64, 32], mred=mred)
    with torch.no_grad():
        m.alpha_scores.copy_(torch.tensor([0.3, -0.2, 0.1]))
    terms = m.mred_losses(logits, labels)

    a = torch.exp(torch.tensor([0.3, -0.2, 0.1]))
    a = a / a.sum()  # Eq. 5 via softmax
    z0 = sum(a[s] * logits[s] for s in range(3))
    p = [F.softmax(z0, 1)] + [F.softmax(z, 1) for z in logits]
    ce = lambda z: -F.log_softmax(z, 1)[torch.arange(4), labels].mean()  # noqa: E731
    torch.testing.assert_close(terms["cls"], sum(ce(z) for z in logits))
    torch.testing.assert_close(terms["ens"], ce(z0))
    if mred == "vanilla":  # Eq. 8
        expect = sum(kl(p[0], p[s]) for s in range(1, 4))
    else:  # Eq. 10: 2/(S+1) * sum_{t=0}^{S-1} sum_{s=t+1}^{S} KL(p_t || p_s)
        expect = 2 / (3 + 1) * sum(kl(p[t], p[s]) for t in range(3) for s in range(t + 1, 4))
    torch.testing.assert_close(terms["dis"], expect, rtol=1e-5, atol=1e-6)


def test_alpha_is_a_distribution_initialised_uniform():
    m = create_method("rsnet", resolutions=[112, 96, 80, 64, 48])
    torch.testing.assert_close(m.alpha, torch.full((5,), 0.2))
    assert math.isclose(float(m.alpha.sum()), 1.0, rel_tol=1e-6)


def test_ens_moves_only_alpha_and_alpha_only_moves_by_ens(example):
    logits, labels = example
    m = create_method("rsnet", resolutions=[96, 64, 32], mred="full")
    terms = m.mred_losses(logits, labels)

    g_logits = torch.autograd.grad(terms["ens"], logits, allow_unused=True, retain_graph=True)
    assert all(g is None for g in g_logits), "L_ens must not reach the network's logits"
    (g_alpha,) = torch.autograd.grad(terms["ens"], [m.alpha_scores], retain_graph=True)
    assert g_alpha.abs().sum() > 0

    for name in ("cls", "dis"):
        (g,) = torch.autograd.grad(terms[name], [m.alpha_scores], allow_unused=True, retain_graph=True)
        assert g is None, f"alpha must get no gradient from L_{name}"
        g_logits = torch.autograd.grad(terms[name], logits, retain_graph=True)
        assert sum(float(g.abs().sum()) for g in g_logits) > 0


def test_teachers_are_detached_in_every_kl(example):
    """In Eq. 10 the largest resolution is a teacher for the others and a student only of the ensemble;
    its gradient from L_dis must then equal that of KL(p_0 || p_1) alone."""
    logits, labels = example
    m = create_method("rsnet", resolutions=[96, 64, 32], mred="full")
    terms = m.mred_losses(logits, labels)
    (g_full,) = torch.autograd.grad(terms["dis"], [logits[0]])
    z0 = (m.alpha.detach()[:, None, None] * torch.stack([z.detach() for z in logits])).sum(0)
    own = 2 / 4 * F.kl_div(F.log_softmax(logits[0], 1), F.softmax(z0, 1), reduction="batchmean")
    (g_own,) = torch.autograd.grad(own, [logits[0]])
    torch.testing.assert_close(g_full, g_own)


def test_individual_refuses_several_resolutions():
    with pytest.raises(ValueError, match="exactly one resolution"):
        create_method("individual", resolutions=[96, 64])


def test_mean_reduction_divides_the_network_loss_but_not_the_ensemble_loss(example):
    logits, labels = example

    class FakeModel:
        def set_operating_point(self, r):
            self.r = r

        def __call__(self, x):
            return logits[[96, 64, 32].index(self.r)]

    summed = create_method("rsnet", resolutions=[96, 64, 32])
    mean = create_method("rsnet", resolutions=[96, 64, 32], reduction="mean")
    a, b = summed(FakeModel(), (None,) * 3, labels), mean(FakeModel(), (None,) * 3, labels)
    t = a.terms
    torch.testing.assert_close(a.loss, t["cls"] + t["ens"] + t["dis"])
    torch.testing.assert_close(b.loss, (t["cls"] + t["dis"]) / 3 + t["ens"])
    par = create_method("parallel", resolutions=[96, 64, 32], reduction="mean")
    torch.testing.assert_close(
        par(FakeModel(), (None,) * 3, labels).loss, sum(F.cross_entropy(z, labels) for z in logits) / 3
    )
    with pytest.raises(ValueError, match="reduction must be"):
        create_method("parallel", resolutions=[96, 64], reduction="max")
