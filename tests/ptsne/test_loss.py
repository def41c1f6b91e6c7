import numpy as np
import pytest
import torch

from ptsne.affinity import joint_probabilities
from ptsne.knn import knn_graph
from ptsne.loss import TSNELoss, exact_kl, exact_kl_gradient


def small_problem(seed=0, n=60):
    r = np.random.default_rng(seed)
    X = r.normal(size=(n, 5))
    edges = joint_probabilities(knn_graph(X, n_neighbors=20, method="exact"), 6.0)
    P = torch.tensor(edges.to_csr(n).toarray(), dtype=torch.float64)
    P /= P.sum()  # exactly 1 in float64 (the edges store float32 weights)
    Y = torch.tensor(r.normal(scale=2.0, size=(n, 2)), dtype=torch.float64, requires_grad=True)
    return edges, P, Y


def dense_kl(P, Y, dof):
    """KL(P||Q) straight from the definition, with an explicit double loop over pairs."""
    Yn = Y.detach().numpy()
    Pn = P.numpy()
    n = len(Yn)
    W = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                W[i, j] = (1 + ((Yn[i] - Yn[j]) ** 2).sum() / dof) ** (-(dof + 1) / 2)
    Q = W / W.sum()
    m = Pn > 0
    return float((Pn[m] * np.log(Pn[m] / Q[m])).sum())


@pytest.mark.parametrize("dof", [1.0, 0.5, 3.0])
def test_exact_kl_matches_definition(dof):
    _, P, Y = small_problem()
    assert float(exact_kl(P, Y, dof).detach()) == pytest.approx(dense_kl(P, Y, dof), rel=1e-10)


@pytest.mark.parametrize("dof", [1.0, 0.5, 3.0])
def test_full_batch_estimator_equals_exact_kl_and_gradient(dof):
    edges, P, Y = small_problem()
    n = Y.shape[0]
    head = torch.as_tensor(edges.head)
    tail = torch.as_tensor(edges.tail)
    weight = P[head, tail]  # float64 weights of every edge
    loss, _ = TSNELoss(dof)(Y[head], Y[tail], Y, n, weight=weight)
    entropy = float((P[P > 0] * torch.log(P[P > 0])).sum())
    exact = exact_kl(P, Y, dof)
    assert float(loss.detach()) + entropy == pytest.approx(float(exact.detach()), rel=1e-10, abs=1e-12)
    (g_est,) = torch.autograd.grad(loss, Y)
    g_ref = exact_kl_gradient(P, Y.detach(), dof)
    np.testing.assert_allclose(g_est.numpy(), g_ref.numpy(), rtol=1e-8, atol=1e-12)


def test_closed_form_gradient_matches_autograd():
    _, P, Y = small_problem(seed=1)
    (g_auto,) = torch.autograd.grad(exact_kl(P, Y, 1.0), Y)
    np.testing.assert_allclose(g_auto.numpy(), exact_kl_gradient(P, Y.detach()).numpy(), rtol=1e-8, atol=1e-12)


def test_exaggeration_scales_attraction_only():
    edges, P, Y = small_problem()
    head, tail = torch.as_tensor(edges.head), torch.as_tensor(edges.tail)
    fn = TSNELoss()
    l1, parts = fn(Y[head], Y[tail], Y, 60, exaggeration=1.0)
    l4, _ = fn(Y[head], Y[tail], Y, 60, exaggeration=4.0)
    assert float((l4 - l1).detach()) == pytest.approx(3.0 * float(parts["attraction"]), rel=1e-10)


def test_minibatch_estimate_is_close_to_exact():
    # Uniform anchor sample, neighbours drawn from P: the estimate tracks the exact value.
    edges, P, Y = small_problem(n=300)
    n = 300
    r = np.random.default_rng(3)
    Pn = P.numpy()
    anchors = r.choice(n, size=200_000)
    rows = Pn[anchors]
    cdf = rows.cumsum(axis=1)
    tails = (cdf < r.random(len(anchors))[:, None] * cdf[:, -1:]).sum(axis=1)
    weight = torch.tensor(Pn.sum(axis=1)[anchors] * n)
    a = torch.as_tensor(anchors)
    t = torch.as_tensor(tails)
    loss, _ = TSNELoss()(Y[a], Y[t], Y, n, weight=weight)
    entropy = float((P[P > 0] * torch.log(P[P > 0])).sum())
    assert float(loss.detach()) + entropy == pytest.approx(float(exact_kl(P, Y).detach()), abs=0.02)


def test_bad_dof():
    with pytest.raises(ValueError, match="dof must be > 0"):
        TSNELoss(0.0)
