"""``ray_cluster.yaml`` against Ray's own cluster-config schema and the project's safety defaults."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
jsonschema = pytest.importorskip("jsonschema")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    """The config as ``ray up`` sees it before contacting the cloud: merged with the
    provider defaults, then validated against ``ray/autoscaler/ray-schema.json``."""
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def _flags(command: str) -> dict[str, str]:
    """``--name=value`` / ``--name value`` options of the ``ray start`` in a shell line."""
    words = shlex.split(command.split("ray start", 1)[1])
    flags: dict[str, str] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            name, eq, value = word.partition("=")
            if not eq:
                nxt = words[i + 1] if i + 1 < len(words) else ""
                value = "" if nxt.startswith("--") else nxt
            flags[name] = value.rstrip(";")
    return flags


def _ray_start(commands: list[str]) -> str:
    starts = [c for c in commands if "ray start" in c]
    assert len(starts) == 1, commands
    return starts[0]


def test_config_passes_ray_schema(prepared):
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_schema_check_rejects_an_unknown_key(raw):
    """The validation above is a real check: a misspelt top-level key fails it."""
    broken = copy.deepcopy(raw)
    broken["max_worker"] = broken.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_head_is_cpu_and_gpu_workers_autoscale(prepared):
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    gpu_types = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no GPU worker type"
    for t in gpu_types:
        assert t["min_workers"] == 0  # scales to zero when idle
        assert 0 < t["max_workers"] <= prepared["max_workers"]
    assert prepared["idle_timeout_minutes"] > 0


def test_dashboard_and_job_server_bind_to_loopback(prepared):
    head = _flags(_ray_start(prepared["head_start_ray_commands"]))
    assert "--head" in head
    # The job server is part of the dashboard, so this covers `ray job submit` too.
    assert head["--dashboard-host"] == "127.0.0.1"
    worker = _flags(_ray_start(prepared["worker_start_ray_commands"]))
    assert worker["--address"].endswith(":" + head["--port"])


def test_no_service_is_bound_to_all_interfaces():
    text = CLUSTER_YAML.read_text()
    assert "0.0.0.0" not in text
    assert "::/0" not in text


def test_mlflow_server_on_head_binds_to_loopback(prepared):
    servers = [c for c in prepared["head_start_ray_commands"] if "mlflow server" in c]
    assert len(servers) == 1
    words = shlex.split(servers[0].split("mlflow server", 1)[1])
    assert words[words.index("--host") + 1] == "127.0.0.1"
    assert words[words.index("--backend-store-uri") + 1].startswith("sqlite:///")
    assert "--artifacts-destination" in words
    # Workers never see it: only the head's start commands launch it.
    assert not any("mlflow server" in c for c in prepared["worker_start_ray_commands"])


def test_setup_installs_pinned_torch_then_project_with_the_images_gpu_faiss(raw):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    torch_version = re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    cmds = raw["setup_commands"]

    def first(pattern: str) -> int:
        for i, c in enumerate(cmds):
            if re.search(pattern, c):
                return i
        raise AssertionError(f"no setup command matches {pattern!r}: {cmds}")

    torch_at = first(r"pip install .*" + re.escape(f"torch=={torch_version}"))
    project_at = first(r"pip install .*ptsne\[gpu-cu1[23]\]")
    assert torch_at < project_at
    extra = re.search(r"ptsne\[(gpu-cu1[23])\]", cmds[project_at]).group(1)
    assert extra in extras
    # faiss-gpu-cu13-cuvs has wheels for Python 3.12 only: an older image's Python takes the CUDA 12 build.
    python = re.search(r"-py(\d)(\d+)", raw["docker"]["image"])
    assert python, raw["docker"]["image"]
    if (int(python.group(1)), int(python.group(2))) < (3, 12):
        assert extra == "gpu-cu12"
    # One FAISS build: nothing installs faiss-cpu beside it.
    assert not any("faiss-cpu" in c or "ptsne[cpu" in c for c in cmds)
    # The project's own code reaches every node through file_mounts.
    assert any(f"{mount}[{extra}]" in cmds[project_at] for mount in raw["file_mounts"])


def test_image_matches_installed_ray(raw):
    """`ray up` needs the same Ray on the laptop and in the cluster."""
    tag = raw["docker"]["image"].rsplit(":", 1)[1]
    assert tag.split("-")[0] == ray.__version__
