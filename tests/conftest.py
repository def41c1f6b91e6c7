"""Shared, seeded fixtures. Ray and MLflow fixtures start real local services.

Training with ``precision="auto"`` uses bfloat16 autocast on hardware that has it (AMX,
AVX512-BF16, CUDA). To run the suite in float32 there, as a machine without bfloat16
would: ``PTSNE_PRECISION=float32 make test`` (read by ``ptsne.device.resolve_precision``;
Ray workers of the local test Ray inherit it).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path

import numpy as np
import pytest

# Keep every test process within the 2 cores of the CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The S3-protocol server of the `s3` fixture listens on this port. Its address and
# credentials are in the environment from the start, so that every process the suite
# starts (local Ray's workers, `ptsne` subprocesses) reaches it the way pyarrow and
# boto reach S3: through AWS_ENDPOINT_URL.
S3_PORT = _free_port()
os.environ.update(
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}",
    AWS_ACCESS_KEY_ID="ptsne-test",
    AWS_SECRET_ACCESS_KEY="ptsne-test",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)

#: GPUs of the test Ray (``ray_local``): 0 unless set, so that the default suite never searches on a GPU.
RAY_GPUS_ENV = "PTSNE_TEST_RAY_GPUS"

MNIST_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def gaussian_blobs(n: int, dim: int, centers: int, seed: int = 0, spread: float = 6.0):
    """Labelled Gaussian clusters: (X float32 (n, dim), y int64 (n,))."""
    r = np.random.default_rng(seed)
    means = r.normal(scale=spread, size=(centers, dim))
    y = r.integers(0, centers, size=n)
    X = means[y] + r.normal(size=(n, dim))
    return X.astype(np.float32), y.astype(np.int64)


@pytest.fixture
def blobs():
    return gaussian_blobs(600, 10, 4)


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 8x8 digits (1797 x 64), a real dataset shipped with a dependency."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float32), d.target.astype(np.int64)


@pytest.fixture(scope="session")
def mnist_small():
    """The first 5000 MNIST train images in [0, 1], with labels; skipped without the data."""
    if not MNIST_PATH.exists():
        pytest.skip(f"MNIST not found at {MNIST_PATH}")
    d = np.load(MNIST_PATH)
    return d["X_train"][:5000].astype(np.float32) / 255.0, d["y_train"][:5000].astype(np.int64)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance with 2 CPUs and no GPU (unless ``PTSNE_TEST_RAY_GPUS``) for the whole session."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    # No GPU by default: on a CUDA host too the default suite searches and trains on CPU, where its
    # exact equalities hold. The GPU check runs the gpu-marked tests with PTSNE_TEST_RAY_GPUS=1.
    ray.init(num_cpus=2, num_gpus=int(os.environ.get(RAY_GPUS_ENV, "0")), include_dashboard=False,
             log_to_driver=False)
    yield ray
    ray.shutdown()


class S3:
    """A running S3-protocol server (moto) on 127.0.0.1; ``bucket()`` makes a fresh bucket."""

    def __init__(self, server):
        import boto3

        self.server = server
        self.endpoint = os.environ["AWS_ENDPOINT_URL"]
        self.client = boto3.client("s3", endpoint_url=self.endpoint)

    def bucket(self, prefix: str = "ptsne") -> str:
        """A new empty bucket; returns its URI ``s3://NAME``."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, uri: str) -> list[str]:
        """Every object key under an ``s3://bucket/prefix`` URI, sorted."""
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3():
    """A real S3-protocol server (moto's ``ThreadedMotoServer``) for the session, at AWS_ENDPOINT_URL."""
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    yield S3(server)
    server.stop()


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh MLflow SQLite tracking/registry store and artifact root in tmp_path."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    monkeypatch.setenv("PTSNE_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))
    import mlflow

    # An earlier test's `mlflow.set_tracking_uri` (every job calls it) outranks the
    # environment in this process: point MLflow's globals at this store too.
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield {"tracking_uri": uri, "artifact_root": tmp_path / "mlartifacts"}
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


# -- the end of the session -------------------------------------------------------------
# Native libraries loaded by the suite (Ray's core worker, OpenMP pools of FAISS, torch and
# openTSNE) have crashed the interpreter while it tore itself down after the last test
# (a segmentation fault after pytest had printed its summary), which turned a finished
# run's status into 139. Once pytest has reported, the process ends with pytest's own
# status and skips that teardown.
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _EXIT_STATUS and os.environ.get("PTSNE_TEST_KEEP_TEARDOWN") != "1":
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
