"""``ptsne train`` then ``ptsne embed`` through ``ray job submit`` on a real two-node cluster.

The cluster is two ``ray start --block`` processes on this machine (a head with
the dashboard/job server on 127.0.0.1 and one worker node; Ray itself advertises
the host's own address for ``--node-ip-address=127.0.0.1``, so nothing leaves the
machine), each in its own process group, with every port chosen free and a
private ``--temp-dir``; teardown stops exactly those two process groups (never
``ray stop``, which would stop every Ray on the machine).
Token authentication is on, with a token of this module's own passed through the
environment, so that the submission path is the one a secured cluster uses.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")

# Two `ray start` nodes plus a training and an embedding job: minutes, not seconds.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
START_TIMEOUT_S = 120
#: Not uploaded by ``ray job submit`` either (git-ignored or Ray's default excludes).
SNAPSHOT_IGNORE = (".git", ".venv", "__pycache__", "*.pyc", ".pytest_cache", "ptsne-runs", "mlruns",
                   "results", "*.egg-info", "build", "dist")
JOB_TIMEOUT_S = 540


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _head_ports() -> list[str]:
    # Ray Client (default port 10001) starts only where its extra is installed.
    from ray._private.utils import get_ray_client_dependency_error

    return [] if get_ray_client_dependency_error() else [f"--ray-client-server-port={_free_port()}"]


def _node_ports() -> list[str]:
    # Fixed defaults (52365 for the agent, ...) would collide with the second
    # node and with any other Ray on this machine.
    return [
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
    ]


class LocalCluster:
    """A head and one worker node started with ``ray start --block`` on 127.0.0.1."""

    def __init__(self, root: Path):
        self.root = root
        self.temp_dir = root / "ray"
        self.gcs_port = _free_port()
        self.dashboard_port = _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.token = secrets.token_hex(32)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.pop("RAY_API_SERVER_ADDRESS", None)
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
        )
        self.env = env
        self.procs: list[subprocess.Popen] = []
        self.submitted: list[str] = []

    def _start(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.root / log_name, "wb")
        proc = subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.root,
            # Its own process group: teardown signals exactly this node's processes.
            start_new_session=True,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        self.temp_dir.mkdir(parents=True)
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
                  "--object-store-memory=150000000", f"--temp-dir={self.temp_dir}"]
        self._start(
            ["--head", f"--port={self.gcs_port}", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
             *common, *_head_ports(), *_node_ports()],
            "head.log",
        )
        self._wait(lambda: self._get("/api/version") is not None, "the job server")
        self._start([f"--address=127.0.0.1:{self.gcs_port}", *common, *_node_ports()], "worker.log")
        self._wait(lambda: self.alive_nodes() == 2, "two alive nodes")

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"ray start exited with {proc.returncode}:\n{self.logs()}")
            if ready():
                return
            time.sleep(1)
        raise TimeoutError(f"no {what} after {START_TIMEOUT_S} s:\n{self.logs()}")

    def _get(self, path: str):
        req = urllib.request.Request(self.address + path, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return json.loads(resp.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            return None

    def alive_nodes(self) -> int:
        body = self._get("/api/v0/nodes?limit=10")
        if not body or not body.get("result"):
            return 0
        nodes = body["data"]["result"]["result"]
        return sum(1 for n in nodes if n.get("state") == "ALIVE")

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.root.glob("*.log"))
        )

    def working_dir(self) -> Path:
        """A copy of the repository as ``--working-dir`` uploads it (git-ignored paths left out).

        Jobs get a snapshot taken once, so files being edited in the working tree
        while the module runs cannot give a job a half-written package.
        """
        dst = self.root / "repo"
        if not dst.exists():
            shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(*SNAPSHOT_IGNORE))
        return dst

    def submit(self, submission_id: str, entrypoint: list[str], env_vars: dict[str, str]) -> subprocess.CompletedProcess:
        """``ray job submit`` of ``entrypoint`` with the repository as working directory; waits for the job."""
        self.submitted.append(submission_id)
        cmd = [
            RAY, "job", "submit", "--address", self.address, "--submission-id", submission_id,
            "--working-dir", str(self.working_dir()), "--runtime-env-json", json.dumps({"env_vars": env_vars}),
            "--log-style", "record", "--", *entrypoint,
        ]
        return subprocess.run(cmd, env=self.env, cwd=self.root, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)

    def job_status(self, submission_id: str) -> str:
        body = self._get(f"/api/jobs/{submission_id}")
        return body.get("status") if body else "UNKNOWN"

    def stop(self) -> None:
        for sid in self.submitted:
            if self.job_status(sid) in ("PENDING", "RUNNING"):
                subprocess.run([RAY, "job", "stop", "--address", self.address, sid],
                               env=self.env, capture_output=True, timeout=60)
        # Worker node first, then the head; each is its own process group.
        for proc in reversed(self.procs):
            _stop_group(proc)
        shutil.rmtree(self.root, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    pgid = proc.pid  # start_new_session=True: the group id is the leader's pid
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        proc.poll()
        time.sleep(0.5)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cluster():
    # A short path: Ray's unix sockets live under --temp-dir and have a length limit.
    root = Path(tempfile.mkdtemp(prefix="ptsne-rc-", dir="/tmp"))
    c = LocalCluster(root)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _cli() -> list[str]:
    """The ``ptsne`` console script when installed, else the same entry point via ``-m``."""
    script = BIN / "ptsne"
    return [str(script)] if script.exists() else ["python", "-m", "jobs.cli"]


def _check(result: subprocess.CompletedProcess, cluster: LocalCluster) -> None:
    if result.returncode != 0:
        pytest.fail(
            f"job failed ({result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}\n{cluster.logs()}"
        )


PROBE = """
import ray, socket
ray.init()
@ray.remote(num_cpus=1)
def where():
    import time; time.sleep(0.5)
    return ray.get_runtime_context().get_node_id()
nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
seen = set(ray.get([where.options(scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(n, soft=False)).remote() for n in nodes]))
print("PROBE", len(nodes), len(seen), flush=True)
"""


def test_job_runs_tasks_on_both_nodes(cluster):
    """The harness itself: a submitted job sees two nodes and runs a task on each."""
    result = cluster.submit("probe", ["python", "-c", PROBE], {})
    _check(result, cluster)
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("PROBE"))
    _, n_nodes, n_seen = line.split()
    assert (int(n_nodes), int(n_seen)) == (2, 2)
    assert cluster.job_status("probe") == "SUCCEEDED"


MODEL = "cluster-map"
ALIAS = "prod"


def _write_data(root: Path) -> tuple[Path, Path]:
    """Training shards and one "new" shard from the same synthetic mixture."""
    from pipeline.schema import part_name
    from pipeline.storage import resolve, write_parquet_atomic
    from pipeline.synth import SynthConfig, generate_shard

    config = SynthConfig(n=1600, dim=8, centers=3, seed=7, shard_rows=400)
    train, incoming = root / "train", root / "incoming"
    fs, _ = resolve(str(root))
    for i in range(config.n_shards):
        directory = incoming if i == config.n_shards - 1 else train
        directory.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(fs, str(directory / part_name(i)), generate_shard(config, i))
    return train, incoming


def test_train_then_embed_through_job_submission(cluster, mlflow_store, tmp_path):
    import pyarrow.parquet as pq

    from jobs.registry import lookup, resolve_model
    from pipeline.embed import load_output, read_current
    from pipeline.schema import arrow_to_vectors

    train_dir, incoming_dir = _write_data(tmp_path / "data")
    env_vars = {
        "MLFLOW_TRACKING_URI": mlflow_store["tracking_uri"],
        "MLFLOW_REGISTRY_URI": mlflow_store["tracking_uri"],
        "PTSNE_ARTIFACT_ROOT": str(mlflow_store["artifact_root"]),
        "TQDM_DISABLE": "1",
    }
    workdir = tmp_path / "work"
    train = cluster.submit(
        "ptsne-train",
        [*_cli(), "train", "--input", str(train_dir), "--workdir", str(workdir),
         "--id-col", "id", "--label-col", "label", "--perplexity", "10", "--epochs", "3",
         "--batch-size", "256", "--hidden-layers", "32,32", "--workers", "2",
         "--eval-samples", "200", "--plot-points", "1000",
         "--register", MODEL, "--alias", ALIAS],
        env_vars,
    )
    _check(train, cluster)
    assert cluster.job_status("ptsne-train") == "SUCCEEDED"

    # The job registered the model in the store it was given, not in a default one.
    ref = lookup(f"models:/{MODEL}@{ALIAS}")
    assert ref.version == "1"
    assert (tmp_path / "mlflow.db").is_file()

    out_dir = tmp_path / "maps"
    embed = cluster.submit(
        "ptsne-embed",
        [*_cli(), "embed", "--model", f"models:/{MODEL}@{ALIAS}", "--input", str(incoming_dir),
         "--output", str(out_dir), "--num-actors", "2", "--cpus-per-actor", "0.5", "--no-progress"],
        env_vars,
    )
    _check(embed, cluster)
    assert cluster.job_status("ptsne-embed") == "SUCCEEDED"

    incoming = pq.read_table(sorted(incoming_dir.glob("*.parquet")))
    current = read_current(out_dir)
    assert current is not None
    out = load_output(out_dir / current["dir"])
    assert out.num_rows == incoming.num_rows
    ids = incoming.column("id").to_numpy()
    row_of = {int(i): j for j, i in enumerate(out.column("id").to_numpy())}
    assert sorted(row_of) == sorted(int(i) for i in ids)  # each input row exactly once

    # Same numbers as the registered model applied here.
    estimator, _ = resolve_model(f"models:/{MODEL}@{ALIAS}", dst=tmp_path / "model")
    expected = estimator.transform(arrow_to_vectors(incoming.column("vector")))
    got = arrow_to_vectors(out.column("embedding"))[[row_of[int(i)] for i in ids]]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
