"""Where MLflow runs, models and artifacts live (``configure_mlflow``).

Resolution order (the MLflow-location contract in the README):

1. ``MLFLOW_TRACKING_URI`` when set (a server, ``sqlite:///...``, Databricks...);
2. otherwise a local SQLite store ``sqlite:///<cwd>/ptsne-runs/mlflow.db``.

Artifacts of the experiments created here go to ``PTSNE_ARTIFACT_ROOT`` when set;
otherwise, for a local store (SQLite or file), to ``mlartifacts`` next to the
database (``<cwd>/ptsne-runs/mlartifacts`` by default); for a tracking server
the server decides. The registry URI follows the tracking URI unless
``MLFLOW_REGISTRY_URI`` is set.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)

#: Directory under the working directory that holds the default local store.
DEFAULT_DIR = "ptsne-runs"
#: Experiment used when none is given.
DEFAULT_EXPERIMENT = "ptsne"
ARTIFACT_ROOT_ENV = "PTSNE_ARTIFACT_ROOT"


@dataclass(frozen=True)
class MlflowLocation:
    """The MLflow endpoints in use.

    Attributes
    ----------
    tracking_uri, registry_uri : str
        As passed to ``mlflow.set_tracking_uri`` / ``mlflow.set_registry_uri``.
    artifact_root : str or None
        Artifact location given to experiments created here (a ``file://`` URI or
        a remote URI); None when the tracking server decides.
    experiment_id : str or None
        The active experiment, when one was asked for.
    """

    tracking_uri: str
    registry_uri: str
    artifact_root: str | None
    experiment_id: str | None = None


def tracking_uri() -> str:
    """The tracking URI per the contract, without touching MLflow's state."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    db = Path.cwd() / DEFAULT_DIR / "mlflow.db"
    return f"sqlite:///{db}"


def _local_store_dir(uri: str) -> Path | None:
    """Directory of a local SQLite database or file store, else None."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        # sqlite:////abs/path.db -> path "//abs/path.db"; sqlite:///rel.db -> "/rel.db"
        raw = unquote(uri[len("sqlite:///") :])
        if not raw or raw == ":memory:":
            return None
        return Path(raw).expanduser().resolve().parent
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path) or uri).expanduser().resolve()
    return None


def artifact_root(uri: str | None = None) -> str | None:
    """Artifact location for new experiments (None: let the tracking server decide)."""
    env = os.environ.get(ARTIFACT_ROOT_ENV, "").strip()
    if env:
        if "://" in env:
            return env
        path = Path(env).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path.as_uri()
    store = _local_store_dir(uri or tracking_uri())
    if store is None:
        return None
    path = store / "mlartifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def configure_mlflow(experiment: str | None = DEFAULT_EXPERIMENT) -> MlflowLocation:
    """Point MLflow at the store of the contract and (optionally) activate an experiment.

    Parameters
    ----------
    experiment : str or None
        Experiment to create (with the artifact root above) if missing and make
        active; None configures the URIs only.

    Returns
    -------
    MlflowLocation
    """
    import mlflow

    if experiment is not None and (not isinstance(experiment, str) or not experiment.strip()):
        raise ValueError(f"configure_mlflow: experiment must be a non-empty string or None, got {experiment!r}")
    uri = tracking_uri()
    store = _local_store_dir(uri)
    if store is not None and urlparse(uri).scheme == "sqlite":
        store.mkdir(parents=True, exist_ok=True)
    registry = os.environ.get("MLFLOW_REGISTRY_URI", "").strip() or uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry)
    root = artifact_root(uri)
    experiment_id = None
    if experiment is not None:
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=registry)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            location = f"{root.rstrip('/')}/{experiment}" if root else None
            try:
                experiment_id = client.create_experiment(experiment, artifact_location=location)
            except Exception:  # created by a concurrent process in the meantime
                found = client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        else:
            experiment_id = found.experiment_id
            if found.lifecycle_stage == "deleted":
                client.restore_experiment(experiment_id)
        mlflow.set_experiment(experiment_id=experiment_id)
    log.debug("mlflow: tracking=%s registry=%s artifacts=%s", uri, registry, root)
    return MlflowLocation(uri, registry, root, experiment_id)
