"""The reference map and the placement of new points on it, against exact dense references."""

import numpy as np
import pytest
import torch

from ptsne import ParametricTSNE
from ptsne.affinity import joint_probabilities
from ptsne.knn import knn_graph
from ptsne.loss import exact_kl
from ptsne.metrics import kl_divergence
from ptsne.reference import (
    CHECK_EVERY,
    Convergence,
    Reference,
    ReferenceConfig,
    RepulsionField,
    best_scale,
    fold_similarity,
    optimize_map,
    placement_gradient,
    placement_objective,
    refine,
    similarity_fit,
)
from tests.conftest import gaussian_blobs

FAST = dict(n_epochs=4, batch_size=128, hidden_layers=(32, 32), random_state=0, device="cpu")


def _map(n, dim=2, seed=0):
    """A clustered 2-D/3-D point cloud with t-SNE-like spacing."""
    r = np.random.default_rng(seed)
    centres = r.normal(scale=15.0, size=(6, dim))
    return (centres[r.integers(0, 6, n)] + r.normal(scale=3.0, size=(n, dim))).astype(np.float32)


def _placement_problem(m=40, n_ref=300, k=12, seed=0, dim=2):
    r = np.random.default_rng(seed)
    ref = torch.as_tensor(_map(n_ref, dim, seed)).double()
    neighbors = torch.as_tensor(r.integers(0, n_ref, size=(m, k)))
    p = torch.as_tensor(r.random((m, k)))
    p = p / p.sum(1, keepdim=True)
    y = ref[neighbors[:, 0]] + torch.as_tensor(r.normal(size=(m, dim)))
    return y, neighbors, p, ref


@pytest.mark.parametrize("dof", [1.0, 0.7])
@pytest.mark.parametrize("exaggeration", [1.0, 1.5])
def test_placement_gradient_equals_autograd_of_the_exact_objective(dof, exaggeration):
    y, neighbors, p, ref = _placement_problem()
    y = y.clone().requires_grad_(True)
    placement_objective(y, neighbors, p, ref, dof, exaggeration).sum().backward()
    field = RepulsionField(ref.numpy(), dof, exact=True)
    field.points = ref  # float64, like y
    grad, curvature = placement_gradient(y.detach(), neighbors, p, ref, field, exaggeration)
    torch.testing.assert_close(grad, y.grad, rtol=1e-9, atol=1e-12)
    assert (curvature > 0).all()


@pytest.mark.parametrize("dim", [2, 3])
def test_grid_field_matches_the_exact_sums(dim):
    ref = _map(3000, dim)
    exact = RepulsionField(ref, exact=True)
    grid = RepulsionField(ref, exact=False)
    r = np.random.default_rng(1)
    y = torch.as_tensor(ref[r.integers(0, len(ref), 500)] + r.normal(scale=1.0, size=(500, dim)).astype(np.float32))
    Ze, Re = exact(y)
    Zg, Rg = grid(y)
    # Measured (2-D, spacing 0.125): Z within 0.10% (mean 0.02%), R within 2.2% of its
    # typical size (mean 0.42%); 3-D on its 96-node cap: Z 5.2% (1.1%), R 51% (12%).
    z_max, r_mean = (2e-3, 1e-2) if dim == 2 else (0.1, 0.2)
    assert float(((Zg - Ze).abs() / Ze).max()) < z_max
    # R is a vector sum with cancellations: compare with its typical size.
    r_err = (Rg - Re).norm(dim=1) / Re.norm(dim=1).mean()
    assert float(r_err.mean()) < r_mean and float(r_err.max()) < 25 * r_mean


def test_refine_lowers_the_exact_objective_and_reaches_its_stationary_point():
    y, neighbors, p, ref = _placement_problem(m=60, n_ref=800, k=15)
    start = y.float().numpy() + 3.0  # a poor start
    field = RepulsionField(ref.float().numpy(), exact=True)
    out = refine(start, neighbors.numpy(), p.float().numpy(), ref.float().numpy(), field, n_iter=200)
    before = placement_objective(torch.as_tensor(start).double(), neighbors, p, ref)
    after = placement_objective(torch.as_tensor(out).double(), neighbors, p, ref)
    assert bool((after <= before + 1e-6).all())
    assert float((before - after).mean()) > 0.1
    grad, _ = placement_gradient(torch.as_tensor(out), neighbors, p.float(), ref.float(), field)
    assert float(grad.norm(dim=1).max()) < 1e-2


def _small_problem(n=400, seed=0):
    X, y = gaussian_blobs(n, 8, 4, seed=seed)
    edges = joint_probabilities(knn_graph(X, n_neighbors=30, method="exact"), 10.0)
    return X, y, edges


def test_kl_divergence_equals_the_dense_exact_kl():
    X, _, edges = _small_problem()
    Y = np.random.default_rng(0).normal(size=(len(X), 2)).astype(np.float32)
    P = torch.as_tensor(edges.to_csr(len(X)).toarray())
    for dof in (1.0, 0.6):
        dense = float(exact_kl(P, torch.as_tensor(Y).double(), dof))
        assert kl_divergence(edges, Y, dof, block=97) == pytest.approx(dense, rel=1e-6)


def test_optimize_map_lowers_the_exact_kl():
    X, _, edges = _small_problem()
    init = np.random.default_rng(0).normal(scale=3.0, size=(len(X), 2)).astype(np.float32)
    Y = optimize_map(edges, init, ReferenceConfig(n_iter=200, fine_iter=100))
    assert Y.shape == init.shape and Y.dtype == np.float32
    assert kl_divergence(edges, Y) < kl_divergence(edges, init) - 0.3


def test_convergence_stops_once_the_objective_falls_by_less_than_tol():
    stop = Convergence(tol=0.01)
    assert not stop(25, 3.0)  # nothing to compare with yet
    assert not stop(50, 2.9)  # fell by 0.1, more than 1% of 3.0
    assert stop(75, 2.88)  # fell by 0.02, less than 1% of 2.9
    assert stop.converged and stop.iterations == 75
    never = Convergence(tol=0.0)
    assert not never(25, 1.0) and not never(50, 1.0)  # tol=0: an objective that stays put goes on


@pytest.mark.parametrize("tol, stops", [(0.0, False), (0.5, True)])
def test_optimize_map_stops_its_first_phase_once_converged(tol, stops, caplog):
    X, _, edges = _small_problem()
    init = np.random.default_rng(0).normal(scale=3.0, size=(len(X), 2)).astype(np.float32)
    config = ReferenceConfig(n_iter=8 * CHECK_EVERY, fine_iter=0, tol=tol)
    with caplog.at_level("INFO", logger="ptsne.reference"):
        Y = optimize_map(edges, init, config)
    ran = [r for r in caplog.records if "reference map" in r.getMessage()][-1].getMessage()
    # tol=0.5: the objective cannot halve within 25 iterations twice, so the phase stops at the
    # second check; tol=0 runs every iteration.
    assert (f"{2 * CHECK_EVERY} iterations (first phase converged)" in ran) == stops
    assert (f"{8 * CHECK_EVERY} iterations" in ran) == (not stops)
    assert kl_divergence(edges, Y) < kl_divergence(edges, init)


def test_reference_config_refuses_a_tol_outside_zero_to_one():
    for bad in (-0.1, 1.0, "x", True):
        with pytest.raises(ValueError, match="ReferenceConfig: tol must be a number in \\[0, 1\\)"):
            ReferenceConfig(tol=bad)


def test_best_scale_minimises_the_exact_kl_over_scales():
    X, _, edges = _small_problem()
    Y = optimize_map(edges, np.random.default_rng(0).normal(size=(len(X), 2)), ReferenceConfig(n_iter=100))
    s = best_scale(edges, 0.3 * Y)
    kl = lambda f: kl_divergence(edges, f * 0.3 * Y)  # noqa: E731
    assert kl(s) < min(kl(s * 1.25), kl(s / 1.25))
    assert s > 1.5 and kl(s) < kl(1.0) - 0.05  # the shrunken map is scaled back up


def test_similarity_fit_recovers_a_similarity_and_folds_into_the_output_layer():
    r = np.random.default_rng(0)
    src = r.normal(size=(200, 2))
    angle = 0.7
    A_true = 2.5 * np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    dst = src @ A_true + np.array([3.0, -1.0])
    A, t = similarity_fit(src, dst)
    np.testing.assert_allclose(A, A_true, atol=1e-10)
    np.testing.assert_allclose(t, [3.0, -1.0], atol=1e-10)

    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(30, 5)
    before = net(x).detach().double().numpy()
    assert fold_similarity(net, A, t)
    np.testing.assert_allclose(net(x).detach().numpy(), before @ A + t, rtol=1e-5, atol=1e-4)
    assert not fold_similarity(torch.nn.ReLU(), A, t)


def test_fold_similarity_follows_the_network_onto_its_device():
    # A network on another device than the host's numpy A and t (a GPU in use; "meta" here,
    # where a host tensor in the product raises just as a CPU one does against CUDA).
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).to("meta")
    assert fold_similarity(net, 2.0 * np.eye(2), np.array([1.0, -1.0]))
    assert net[-1].weight.device.type == "meta" and net[-1].bias.device.type == "meta"


def test_reference_config_rejects_bad_values_by_name():
    with pytest.raises(ValueError, match="size must be an integer >= 0, got -1"):
        ReferenceConfig(size=-1)
    with pytest.raises(ValueError, match="transform_perplexity must be a number > 1, got 0.5"):
        ReferenceConfig(transform_perplexity=0.5)
    with pytest.raises(ValueError, match="learning_rate must be 'auto' or a number > 0"):
        ReferenceConfig(learning_rate="fast")
    with pytest.raises(ValueError, match="too few for transform_perplexity=10.0"):
        Reference(np.zeros((30, 3)), np.zeros((30, 2)))  # needs more than 3 * perplexity = 30 points


# -- the estimator with a reference ------------------------------------------------------


@pytest.fixture(scope="module")
def with_reference():
    X, y = gaussian_blobs(700, 10, 4)
    est = ParametricTSNE(perplexity=10.0, **FAST).fit(X[:600])
    return est, X, y


def test_fit_builds_a_reference_map_better_than_the_network_map(with_reference):
    est, X, _ = with_reference
    ref = est.reference_
    assert len(ref) == 600 and ref.embedding.shape == (600, 2)
    np.testing.assert_array_equal(est.embedding_, ref.embedding)
    assert "reference" in est.timings_
    edges = joint_probabilities(knn_graph(X[:600], n_neighbors=est.n_neighbors_, method="exact"), 10.0)
    network = est.transform(X[:600], method="network")
    assert kl_divergence(edges, est.embedding_) < kl_divergence(edges, network) - 0.05


def test_network_is_turned_into_the_reference_frame(with_reference):
    est, X, _ = with_reference
    network = est.transform(X[:600], method="network")
    A, t = similarity_fit(network, est.embedding_)
    # After the fold the best similarity from the network map to the reference is the identity.
    np.testing.assert_allclose(A, np.eye(2), atol=0.05)
    assert np.abs(t).max() < 0.05 * np.abs(est.embedding_).max()


def test_training_points_land_on_their_reference_coordinates(with_reference):
    est, X, _ = with_reference
    np.testing.assert_array_equal(est.transform(X[:600]), est.embedding_)
    np.testing.assert_array_equal(est.transform(X[:600], method="refine"), est.embedding_)


def test_refined_new_points_have_a_lower_placement_objective_than_the_network(with_reference):
    est, X, _ = with_reference
    new = X[600:]
    ref = est.reference_
    neighbors, _, p = ref.affinities(new)
    args = (torch.as_tensor(neighbors), torch.as_tensor(p).double(), torch.as_tensor(ref.embedding).double())
    net = placement_objective(torch.as_tensor(est.transform(new, method="network")).double(), *args)
    refined = placement_objective(torch.as_tensor(est.transform(new)).double(), *args)
    assert float(refined.mean()) < float(net.mean()) - 0.01
    # Rows are placed independently: a batch equals its rows one by one.
    batch = est.transform(new[:10])
    single = np.concatenate([est.transform(new[i : i + 1]) for i in range(10)])
    np.testing.assert_allclose(batch, single, rtol=1e-5, atol=1e-5)


def test_save_and_load_keep_both_modes(with_reference, tmp_path):
    est, X, _ = with_reference
    loaded = ParametricTSNE.load(est.save(tmp_path / "m"), device="cpu")
    for method in ("network", "refine", "auto"):
        np.testing.assert_array_equal(loaded.transform(X, method=method), est.transform(X, method=method))
    assert len(loaded.reference_) == 600


def test_sampled_reference_keeps_the_sample_coordinates():
    X, _ = gaussian_blobs(500, 6, 3, seed=2)
    est = ParametricTSNE(perplexity=8.0, reference_size=300, **FAST).fit(X)
    assert len(est.reference_) == 300
    ref_rows = {tuple(r) for r in est.reference_.vectors}
    in_ref = np.array([tuple(r) in ref_rows for r in X.astype(np.float32)])
    assert in_ref.sum() == 300
    np.testing.assert_array_equal(est.transform(X[in_ref]), est.embedding_[in_ref])


def test_methods_are_checked():
    X, _ = gaussian_blobs(300, 6, 3)
    est = ParametricTSNE(perplexity=8.0, reference_size=0, **FAST).fit(X)
    assert est.reference_ is None
    np.testing.assert_array_equal(est.transform(X), est.transform(X, method="network"))
    with pytest.raises(ValueError, match="method='refine' needs a model with a reference"):
        est.transform(X, method="refine")
    with pytest.raises(ValueError, match=r"method must be one of \('auto', 'network', 'refine'\), got 'knn'"):
        est.transform(X, method="knn")
    with pytest.raises(ValueError, match="reference_size must be an integer >= 0, got -5"):
        ParametricTSNE(reference_size=-5, **FAST).fit(X)


def test_auto_iterations_grow_with_the_number_of_reference_points():
    from ptsne.reference import MIN_FINE_ITER, MIN_ITER, default_iterations, resolve_iterations

    assert default_iterations(10_000) == (MIN_ITER, MIN_FINE_ITER)
    assert default_iterations(60_000) == (100, 40)
    assert default_iterations(200_000) == (300, 80)
    assert default_iterations(250_000) == (375, 100)
    coarse = [default_iterations(n)[0] for n in range(1_000, 1_000_000, 7_919)]
    assert coarse == sorted(coarse) and all(c % CHECK_EVERY == 0 for c in coarse)
    assert resolve_iterations(ReferenceConfig(n_iter=7, fine_iter=3), 200_000) == (7, 3)
    assert resolve_iterations(ReferenceConfig(n_iter=7), 200_000) == (7, 80)
    with pytest.raises(ValueError, match="reference_iter must be 'auto' or an integer >= 0, got -1"):
        ReferenceConfig(n_iter=-1)
