import math

import numpy as np
import pytest
import torch

from ptsne.affinity import joint_probabilities
from ptsne.knn import knn_graph
from ptsne.loss import TSNELoss
from ptsne.model import ModelConfig, build_mapper
from ptsne.train import MIN_STEPS, TARGET_STEPS, NeighborSampler, TrainConfig, default_epochs, fit_mapper


def problem(blobs):
    X, y = blobs
    edges = joint_probabilities(knn_graph(X, n_neighbors=30, method="exact"), 10.0)
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


def _train(X, edges, seed, epochs=3, precision="auto"):
    torch.manual_seed(seed)
    model = build_mapper(ModelConfig(X.shape[1], 2, (32, 32)))
    model.standardize.fit(X)
    cfg = TrainConfig(n_epochs=epochs, batch_size=128, learning_rate=3e-3, seed=seed, precision=precision)
    history = fit_mapper(model, X, edges, cfg)
    return model, history


def test_training_is_deterministic_on_cpu(blobs):
    X, _, edges = problem(blobs)
    m1, h1 = _train(X, edges, seed=5)
    m2, h2 = _train(X, edges, seed=5)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [h["loss"] for h in h1] == [h["loss"] for h in h2]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_training_lowers_loss_and_separates_clusters(blobs, precision):
    from ptsne.metrics import knn_accuracy

    X, y, edges = problem(blobs)
    model, history = _train(X, edges, seed=0, epochs=30, precision=precision)
    assert history[-1]["loss"] < history[3]["loss"]
    assert [h["phase"] for h in history[:2]] == ["early_exaggeration"] * 2
    assert history[-1]["phase"] == "embedding"
    with torch.no_grad():
        Y = model(torch.from_numpy(X))
    assert Y.dtype == torch.float32
    Y = Y.numpy()
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
        ({"exaggeration": 0.8}, "exaggeration must be a finite number >= 1, got 0.8"),
        ({"early_exaggeration": 0.5}, "early_exaggeration must be a finite number >= 1"),
        ({"dof": 0}, "dof"),
        ({"weight_decay": -1}, "weight_decay"),
        ({"positives_per_anchor": 0}, "positives_per_anchor"),
        ({"precision": "float16"}, "precision must be one of"),
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


# -- mixed precision ----------------------------------------------------------


def test_resolve_precision(monkeypatch):
    from ptsne.device import PRECISION_ENV, native_bfloat16, resolve_precision

    monkeypatch.delenv(PRECISION_ENV, raising=False)
    cpu = torch.device("cpu")
    assert resolve_precision("float32", cpu) is None
    assert resolve_precision("bfloat16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cpu) is (torch.bfloat16 if native_bfloat16(cpu) else None)
    with pytest.raises(ValueError, match="precision must be one of .* got 'half'"):
        resolve_precision("half", cpu)


def test_precision_env_decides_what_auto_resolves_to(monkeypatch):
    from ptsne.device import PRECISION_ENV, native_bfloat16, resolve_precision

    cpu = torch.device("cpu")
    native = torch.bfloat16 if native_bfloat16(cpu) else None
    for value, auto in [("float32", None), ("bfloat16", torch.bfloat16), ("auto", native), ("", native)]:
        monkeypatch.setenv(PRECISION_ENV, value)
        assert resolve_precision("auto", cpu) is auto, value
        # An explicit precision is kept whatever the environment says.
        assert resolve_precision("float32", cpu) is None, value
        assert resolve_precision("bfloat16", cpu) is torch.bfloat16, value
    monkeypatch.setenv(PRECISION_ENV, "half")
    with pytest.raises(ValueError, match=r"PTSNE_PRECISION must be one of \('auto', 'float32', 'bfloat16'\).* got 'half'"):
        resolve_precision("auto", cpu)


def test_cuda_bfloat16_counts_only_hardware_support(monkeypatch):
    # torch.cuda.is_bf16_supported() is also True on GPUs that only emulate bfloat16 (pre-Ampere).
    from ptsne.device import native_bfloat16

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert native_bfloat16(cuda) is False  # an emulating GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert native_bfloat16(cuda) is True  # compute capability >= 8


def test_output_layer_stays_float32_under_autocast():
    torch.manual_seed(0)
    net = build_mapper(ModelConfig(8, 2, (16, 16))).net
    x = torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = net[:-1](x)
        out = net(x)
    assert hidden.dtype == torch.bfloat16
    assert out.dtype == torch.float32
    # The output layer's float32 product of the bfloat16 hidden features, exactly.
    torch.testing.assert_close(out, torch.nn.functional.linear(hidden.float(), net[-1].weight, net[-1].bias))


def test_bfloat16_step_follows_the_float32_gradient(blobs):
    # One step's gradient under bfloat16 autocast points where the float32 one does.
    from ptsne.loss import TSNELoss
    from ptsne.train import train_step

    X, _, edges = problem(blobs)
    sampler = NeighborSampler(edges, len(X))
    anchors = torch.arange(128)
    tails, weight = sampler.sample(anchors.repeat_interleave(2), torch.Generator().manual_seed(0))
    grads = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = build_mapper(ModelConfig(X.shape[1], 2, (64, 64)))
        model.standardize.fit(X)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        Xt = torch.from_numpy(X)
        out = train_step(model, opt, TSNELoss(), Xt[anchors], Xt[tails], weight, len(X), 4.0, dtype)
        assert math.isfinite(out["loss"])
        grads[dtype] = torch.cat([p.grad.flatten() for p in model.parameters()])
    cos = torch.nn.functional.cosine_similarity(grads[None], grads[torch.bfloat16], dim=0)
    assert cos > 0.99


def test_exaggeration_below_one_has_no_minimum():
    """Why exaggeration must be >= 1: scaling a map out lowers rho * attraction + log Z without bound."""
    torch.manual_seed(0)
    Y = torch.randn(200, 2, dtype=torch.float64)
    head = torch.arange(200).repeat_interleave(3)
    tail = torch.randint(0, 200, (600,))
    tail = torch.where(tail == head, (tail + 1) % 200, tail)
    fn = TSNELoss()

    def loss(scale, rho):
        Ys = Y * scale
        return float(fn(Ys[head], Ys[tail], Ys, 200, exaggeration=rho)[0])

    below = [loss(s, 0.8) for s in (1e4, 1e5, 1e6)]
    assert all(b < a for a, b in zip(below, below[1:]))  # keeps falling as the map expands
    assert below[-2] - below[-1] == pytest.approx(2 * (0.8 - 1) * -math.log(10), rel=1e-3)
    at_one = [loss(s, 1.0) for s in (1e4, 1e5, 1e6)]
    assert max(at_one) - min(at_one) < 1e-2  # flat: no gain from expanding at rho = 1


def test_sampler_from_csr_is_the_sampler_of_the_same_rows_in_12_bytes_an_edge(blobs):
    X, _, edges = problem(blobs)
    n = len(X)
    order = np.lexsort((edges.tail, edges.head))
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(edges.head, minlength=n), out=indptr[1:])
    weight = edges.weight[order].astype(np.float64)
    csr = NeighborSampler.from_csr(indptr, edges.tail[order].astype(np.int32), weight)
    single = NeighborSampler(edges, n)
    assert csr.tail.dtype == single.tail.dtype == torch.int32
    # The running sum is built in the caller's array, not in a copy.
    assert np.shares_memory(csr.cumw.numpy(), weight)
    anchors = torch.arange(n).repeat(20)
    a = csr.sample(anchors, torch.Generator().manual_seed(1))
    b = single.sample(anchors, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].dtype == torch.int64
    assert csr.nbytes / csr.n_edges <= 16
    with pytest.raises(TypeError, match="float64"):
        NeighborSampler.from_csr(indptr, edges.tail[order], edges.weight[order])
    with pytest.raises(ValueError, match="disagree"):
        NeighborSampler.from_csr(indptr[:-1], edges.tail[order], edges.weight[order].astype(np.float64))


def test_precision_float32_on_cuda_uses_tf32_never_on_cpu(monkeypatch):
    from ptsne import device as dev

    assert dev.use_tf32(torch.device("cuda"), None) is True
    assert dev.use_tf32(torch.device("cuda:1"), None) is True
    assert dev.use_tf32(torch.device("cuda"), torch.bfloat16) is False  # autocast: not float32
    assert dev.use_tf32(torch.device("cpu"), None) is False
    before = torch.backends.cuda.matmul.fp32_precision
    with dev.training_precision(torch.device("cpu"), None):
        assert torch.backends.cuda.matmul.fp32_precision == before  # CPU training leaves the CUDA switches alone
    with dev.training_precision(torch.device("cuda"), None):
        assert dev.tf32_enabled() is True
    with dev.training_precision(torch.device("cuda"), torch.bfloat16):
        assert dev.tf32_enabled() is False
    assert torch.backends.cuda.matmul.fp32_precision == before  # restored after training


def test_tf32_is_set_through_one_api_only():
    from ptsne import device as dev

    assert dev.tf32_api() == "fp32_precision"  # torch 2.13 has the per-backend switches
    new = dev.tf32_settings(True, "fp32_precision")
    assert [(name, value) for _, name, value in new] == [("fp32_precision", "tf32")] * 2
    assert {module for module, _, _ in new} == {torch.backends.cuda.matmul, torch.backends.cudnn.conv}
    assert [value for _, _, value in dev.tf32_settings(False, "fp32_precision")] == ["ieee", "ieee"]
    legacy = dev.tf32_settings(True, "allow_tf32")
    assert [(name, value) for _, name, value in legacy] == [("allow_tf32", True)] * 2
    with pytest.raises(ValueError, match=r"api must be one of \('fp32_precision', 'allow_tf32'\), got 'x'"):
        dev.tf32_settings(True, "x")


def test_matmul_precision_restores_the_switches_it_found():
    from ptsne import device as dev

    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    with dev.matmul_precision(True):
        assert torch.backends.cuda.matmul.fp32_precision == "tf32" and dev.tf32_enabled()
        with dev.matmul_precision(False):  # an exact kNN search inside training
            assert torch.backends.cuda.matmul.fp32_precision == "ieee" and not dev.tf32_enabled()
        assert dev.tf32_enabled()
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == before
    with pytest.raises(RuntimeError, match="inside"):
        with dev.matmul_precision(True):
            raise RuntimeError("inside")
    assert torch.backends.cuda.matmul.fp32_precision == before[0]


def test_legacy_tf32_flags_where_torch_has_no_new_api():
    # In a process of its own: torch refuses reads of one API after writes of the other.
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import torch\n"
        "from ptsne.device import matmul_precision, tf32_enabled\n"
        "with matmul_precision(True, api='allow_tf32'):\n"
        "    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32\n"
        "    assert tf32_enabled(api='allow_tf32')\n"
        "assert torch.backends.cuda.matmul.allow_tf32 is False\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_precision_float32_fit_on_cpu_leaves_tf32_off(blobs):
    X, _ = blobs
    before = torch.backends.cuda.matmul.fp32_precision
    _train(X[:300], joint_probabilities(knn_graph(X[:300], n_neighbors=30, method="exact"), 10.0), seed=0, epochs=1,
           precision="float32")
    assert torch.backends.cuda.matmul.fp32_precision == before
