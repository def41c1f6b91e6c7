import math

import numpy as np
import pytest
import torch

from ptsne.affinity import joint_probabilities
from ptsne.knn import knn_graph
from ptsne.model import ModelConfig, build_mapper
from ptsne.train import MIN_STEPS, TARGET_STEPS, NeighborSampler, TrainConfig, default_epochs, fit_mapper


def problem(blobs):
    X, y = blobs
    edges = joint_probabilities(knn_graph(X, k=30, method="exact"), 10.0)
    return X, y, edges


def test_sampler_draws_neighbours_with_p_row_probabilities(blobs):
    X, _, edges = problem(blobs)
    n = len(X)
    sampler = NeighborSampler(edges, n)
    P = edges.to_csr(n).toarray()
    anchor = 7
    gen = torch.Generator().manual_seed(0)
    tails, weight = sampler.sample(torch.full((100_000,), anchor), gen)
    freq = np.bincount(tails.numpy(), minlength=n) / 100_000
    expected = P[anchor] / P[anchor].sum()
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(expected))
    np.testing.assert_allclose(freq, expected, atol=0.005)
    assert float(weight[0]) == pytest.approx(n * P[anchor].sum(), rel=1e-5)


def test_sampler_rejects_isolated_points(blobs):
    X, _, edges = problem(blobs)
    keep = (edges.head != 3) & (edges.tail != 3)
    from ptsne.affinity import Edges

    with pytest.raises(ValueError, match="without neighbours"):
        NeighborSampler(Edges(edges.head[keep], edges.tail[keep], edges.weight[keep]), len(X))


def _train(X, edges, seed, epochs=3):
    torch.manual_seed(seed)
    model = build_mapper(ModelConfig(X.shape[1], 2, (32, 32)))
    model.standardize.fit(X)
    cfg = TrainConfig(n_epochs=epochs, batch_size=128, learning_rate=3e-3, seed=seed)
    history = fit_mapper(model, X, edges, cfg)
    return model, history


def test_training_is_deterministic_on_cpu(blobs):
    X, _, edges = problem(blobs)
    m1, h1 = _train(X, edges, seed=5)
    m2, h2 = _train(X, edges, seed=5)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [h["loss"] for h in h1] == [h["loss"] for h in h2]


def test_training_lowers_loss_and_separates_clusters(blobs):
    from ptsne.metrics import knn_accuracy

    X, y, edges = problem(blobs)
    model, history = _train(X, edges, seed=0, epochs=30)
    assert history[-1]["loss"] < history[3]["loss"]
    assert [h["phase"] for h in history[:2]] == ["early_exaggeration"] * 2
    assert history[-1]["phase"] == "embedding"
    with torch.no_grad():
        Y = model(torch.from_numpy(X)).numpy()
    assert knn_accuracy(Y[:300], y[:300], Y[300:], y[300:], k=5) > 0.95


def test_callback_stops_training(blobs):
    X, _, edges = problem(blobs)
    model = build_mapper(ModelConfig(X.shape[1], 2, (16,)))
    seen = []
    history = fit_mapper(
        model, X, edges, TrainConfig(n_epochs=10, batch_size=64), callbacks=[lambda e, m: seen.append(e) or e == 1]
    )
    assert len(history) == 2 and seen == [0, 1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_epochs": 0}, "n_epochs"),
        ({"batch_size": 1}, "batch_size"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"early_exaggeration": 0}, "early_exaggeration"),
        ({"early_exaggeration_fraction": 1.0}, "early_exaggeration_fraction"),
        ({"exaggeration": float("nan")}, "exaggeration"),
        ({"dof": 0}, "dof"),
        ({"weight_decay": -1}, "weight_decay"),
        ({"positives_per_anchor": 0}, "positives_per_anchor"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_default_epochs_scale_with_n():
    # MNIST-sized data gets about TARGET_STEPS steps, large data fewer passes of many steps.
    assert default_epochs(60_000, 512) == math.ceil(TARGET_STEPS / (60_000 // 512)) == 30
    assert default_epochs(1_000_000, 512) == 10
    assert default_epochs(10_000_000, 512) == 10
    sizes = [60_000, 100_000, 300_000, 1_000_000]
    epochs = [default_epochs(n, 512) for n in sizes]
    assert epochs == sorted(epochs, reverse=True)
    # Small data: never fewer than MIN_STEPS steps.
    for n in (100, 700, 5_000):
        steps = max(1, n // min(512, n))
        assert default_epochs(n, 512) * steps >= MIN_STEPS
