"""The MLflow flavour of a ``ParametricTSNE`` mapper: how it is logged and how MLflow loads it.

The logged model is a pyfunc model whose only payload is a
``ParametricTSNE.save`` directory (``config.json``, ``model.safetensors`` and
their ``SHA256SUMS``) under ``data/estimator``. It is logged with a
``loader_module`` (this module, whose :func:`_load_pyfunc` MLflow calls) and no
``code_paths``: loading it unpickles nothing and runs no code from the artifact,
only the installed ``ptsne`` package and this module, which imports nothing
else of the command line; the third-party dependencies are pinned in explicit
``pip_requirements``. Inference in this project never goes through pyfunc:
:func:`jobs.registry.resolve_model` downloads the directory and calls
``ParametricTSNE.load``.

Models logged before this module existed name ``jobs.registry`` as their
``loader_module``; that module re-exports :func:`_load_pyfunc`, so they keep
loading.

Integrity: :func:`log_model` records the sha256 of the config and weights as
tags of the logged model (:func:`sha256_tags`); :func:`jobs.registry.register`
copies them to the new model version, and :func:`jobs.registry.download` checks
the downloaded files against them.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Directory name of the estimator inside the pyfunc model's ``data`` folder.
ESTIMATOR_DIR = "estimator"
#: Default artifact name of the logged model.
DEFAULT_NAME = "mapper"
#: Third-party packages the pyfunc model needs, pinned to the installed versions; of the two
#: FAISS builds (``ptsne[cpu]`` / ``ptsne[gpu]``) the one installed is recorded.
REQUIREMENTS = ("torch", "numpy", "scipy", "safetensors", "faiss-cpu", "faiss-gpu", "openTSNE", "tqdm", "mlflow")
#: Prefix of the model version (and logged model) tags that hold a model file's sha256:
#: ``sha256.config.json``, ``sha256.model.safetensors``.
SHA256_TAG_PREFIX = "sha256."


class _PyfuncModel:
    """What ``mlflow.pyfunc.load_model`` wraps: ``predict`` = ``ParametricTSNE.transform``.

    ``params={"method": "network"}`` (or ``"refine"``, default ``"auto"``) is
    ``transform``'s ``method``.
    """

    def __init__(self, estimator):
        self.estimator = estimator

    def predict(self, model_input, params=None) -> np.ndarray:
        values = getattr(model_input, "values", model_input)  # DataFrame -> ndarray
        method = (params or {}).get("method") or "auto"
        return self.estimator.transform(np.asarray(values, dtype=np.float32), method=method)


def _load_pyfunc(data_path: str) -> _PyfuncModel:
    """Entry point named by ``loader_module``: load the estimator from ``data_path``."""
    from ptsne.estimator import ParametricTSNE

    return _PyfuncModel(ParametricTSNE.load(data_path, device="cpu"))


def pip_requirements() -> list[str]:
    """Pinned requirements of the pyfunc model (the installed versions)."""
    reqs = []
    for pkg in REQUIREMENTS:
        try:
            version = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            continue
        reqs.append(f"{pkg}=={version.split('+')[0]}")
    return reqs


def _signature(n_features: int, n_components: int):
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(n_features)))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(n_components)))]),
        params=ParamSchema([ParamSpec("method", "string", "auto")]),
    )


def reference_facts(estimator) -> dict[str, int]:
    """``reference_points`` (0 for a network-only model) and ``reference_bytes`` of a model."""
    reference = getattr(estimator, "reference_", None)
    if reference is None:
        return {"reference_points": 0, "reference_bytes": 0}
    return {"reference_points": len(reference), "reference_bytes": int(reference.nbytes)}


def sha256_tags(sums: dict[str, str]) -> dict[str, str]:
    """MLflow tags that record the sums ``{file name: hex sha256}`` of a model's files."""
    return {f"{SHA256_TAG_PREFIX}{name}": value for name, value in sums.items()}


def _sums_of_tags(tags: dict | None) -> dict[str, str]:
    """The sums recorded in MLflow tags (the inverse of :func:`sha256_tags`)."""
    return {k[len(SHA256_TAG_PREFIX):]: str(v) for k, v in (tags or {}).items() if k.startswith(SHA256_TAG_PREFIX)}


def log_model(
    estimator,
    name: str = DEFAULT_NAME,
    *,
    registered_model_name: str | None = None,
    metadata: dict | None = None,
    tags: dict | None = None,
):
    """Log a fitted ``ParametricTSNE`` as a pyfunc model of the active run.

    Parameters
    ----------
    estimator : ParametricTSNE
        A fitted estimator (``fit``, ``load`` or ``from_mapper``).
    name : str
        Model name within the run (``runs:/RUN_ID/<name>``).
    registered_model_name : str, optional
        Also register it under this name, through :func:`jobs.registry.register` (which gives
        the version the files' sha256 tags; see there for aliases).
    metadata, tags : dict, optional
        Extra MLflow model metadata / logged-model tags.

    Returns
    -------
    mlflow.models.model.ModelInfo
        ``model_uri`` names the logged model.

    Notes
    -----
    Call :func:`jobs.tracking.configure_mlflow` first. Without an active run,
    MLflow logs the model outside any run (no source run in ``ptsne models show``).
    """
    import mlflow

    from ptsne.estimator import ParametricTSNE

    if not isinstance(estimator, ParametricTSNE):
        raise TypeError(f"log_model: estimator must be a ParametricTSNE, got {type(estimator).__name__}")
    if not hasattr(estimator, "model_"):
        from ptsne.errors import NotFittedError

        raise NotFittedError("log_model: the estimator is not fitted; call fit(X) first")
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"log_model: name must be a non-empty string without '/', got {name!r}")
    if registered_model_name is not None:
        from jobs.registry import check_name

        check_name(registered_model_name, "log_model: registered_model_name")
    n_features = int(estimator.n_features_in_)
    n_components = int(estimator.n_components)
    meta = {
        "ptsne_format_version": 1,
        "n_features_in": n_features,
        "n_components": n_components,
        "n_neighbors": int(estimator.n_neighbors_),
        "pca": estimator.pca_ is not None,
        **reference_facts(estimator),
    }
    meta.update(metadata or {})
    from ptsne import digest

    with tempfile.TemporaryDirectory(prefix="ptsne-log-") as tmp:
        tmp = Path(tmp)
        sums = digest.read(estimator.save(tmp / ESTIMATOR_DIR))
        with warnings.catch_warnings():
            # MLflow asks for an input example; the explicit signature already types the input.
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            info = mlflow.pyfunc.log_model(
                name=name,
                loader_module=__name__,
                data_path=str(tmp / ESTIMATOR_DIR),
                # No code_paths: loading runs the installed packages, never code from the artifact.
                pip_requirements=pip_requirements(),
                signature=_signature(n_features, n_components),
                metadata=meta,
                # `register` copies the sums to the model version.
                tags={**(tags or {}), **sha256_tags(sums)},
                # Logged-model params: `describe_model` reads them for each registered version.
                params=reference_facts(estimator),
            )
    log.info("logged model %s (%d -> %d)", info.model_uri, n_features, n_components)
    if registered_model_name is not None:
        from jobs.registry import register

        register(info.model_uri, registered_model_name)
    return info
