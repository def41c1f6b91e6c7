"""The MLflow model registry of ``ParametricTSNE`` mappers: register, look up, download, describe.

How a mapper is logged and how MLflow loads it (the pyfunc flavour) is
:mod:`jobs.flavor`; :func:`log_model`, :func:`_load_pyfunc` and the flavour's
constants are re-exported here, so that callers and models logged with
``loader_module="jobs.registry"`` (before the flavour had its own module) keep
working. Inference in this project never goes through pyfunc:
:func:`resolve_model` downloads the directory and calls ``ParametricTSNE.load``.

Integrity: :func:`jobs.flavor.log_model` records the sha256 of the config and weights as
tags of the logged model (``sha256.config.json``, ``sha256.model.safetensors``),
:func:`register` copies them to the new model version, and :func:`download`
checks the downloaded files against the version's tags before anything loads
them (``ParametricTSNE.load`` then checks them against the directory's own
``SHA256SUMS``, which is also all the pyfunc loader can check).

Model URIs accepted by :func:`resolve_model`: ``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, ``models:/NAME/latest``, the same without the
``models:/`` prefix, a bare ``NAME`` (its latest version), ``runs:/RUN_ID/PATH``
and a local ``ParametricTSNE.save`` or MLflow model directory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

# Re-exported: the loader of models logged before jobs.flavor existed, and the old home of log_model.
from jobs.flavor import (  # noqa: F401
    DEFAULT_NAME,
    ESTIMATOR_DIR,
    SHA256_TAG_PREFIX,
    _load_pyfunc,
    _PyfuncModel,
    _sums_of_tags,
    log_model,
    sha256_tags,
)

log = logging.getLogger(__name__)

_ALIAS = re.compile(r"^(?P<name>[^@/]+)@(?P<alias>[^@/]+)$")
_VERSION = re.compile(r"^(?P<name>[^@/]+)/(?P<version>\d+|latest)$")
_RUNS = re.compile(r"^runs:/(?P<run>[^/]+)/(?P<path>.+)$")
class ModelNotFoundError(LookupError):
    """The model, alias, version or run does not exist (the message lists what does)."""


@dataclass(frozen=True)
class ModelRef:
    """Which model was resolved.

    Attributes
    ----------
    name : str
        Registered model name; the artifact path for ``runs:/`` URIs; the
        directory name for a local directory.
    version : str
        Registry version (``"3"``); the run id for ``runs:/`` URIs; ``"local"``.
    uri : str
        A URI that names exactly this version (``models:/NAME/3``).
    run_id : str or None
        The run that logged the model, when known.
    path : pathlib.Path or None
        Local ``ParametricTSNE.save`` directory it was loaded from.
    aliases : tuple of str
        Aliases pointing at this version.
    sha256 : dict
        ``{file name: hex sha256}`` recorded in the model version's tags (empty for
        an unregistered model or a version registered before sums were recorded).
    weights_sha256 : str or None
        sha256 of the weights (``model.safetensors``): part of the model's identity,
        with its name and version (two local directories are both version
        ``local``). A local directory's is known at lookup (its ``SHA256SUMS``); a
        registered version's from its tags, and any model's once downloaded
        (:func:`resolve_model`).
    """

    name: str
    version: str
    uri: str
    run_id: str | None = None
    path: Path | None = field(default=None, compare=False)
    aliases: tuple[str, ...] = ()
    sha256: dict[str, str] = field(default_factory=dict, compare=False)
    weights_sha256: str | None = None

    @property
    def is_registered(self) -> bool:
        return self.uri.startswith("models:/")

    @property
    def tag(self) -> str:
        """Short directory-safe label of this version: ``v3``, ``run-<id>``, or ``local-<sha256 of the
        weights, 10 digits>`` (two local directories of one name are two models)."""
        if self.is_registered:
            return f"v{self.version}"
        if self.run_id:
            return f"run-{self.run_id}"
        return f"local-{self.weights_sha256[:10]}" if self.weights_sha256 else "local"


def _filter_literal(field_name: str, value: str) -> str:
    """``field = 'value'`` for an MLflow search filter, quoted so that ``value`` stays one literal.

    MLflow's filter strings have no escape character; a value with a ``'`` is
    written in double quotes instead, and one holding both quote characters
    cannot be searched for at all (ValueError naming it).
    """
    if "'" not in value:
        return f"{field_name} = '{value}'"
    if '"' not in value:
        return f'{field_name} = "{value}"'
    raise ValueError(
        f"{field_name} {value!r} holds both ' and \" and cannot be searched for in the MLflow registry; "
        "use a name with at most one kind of quote"
    )


def check_name(name, what: str = "name") -> str:
    """A registered model name that every lookup of this module can handle; ValueError naming it otherwise."""
    if not isinstance(name, str) or not name.strip() or "/" in name or "@" in name:
        raise ValueError(f"{what} must be a non-empty string without '/' or '@', got {name!r}")
    if "'" in name and '"' in name:
        raise ValueError(f"{what} must not hold both ' and \" (MLflow's search filters cannot quote it), got {name!r}")
    return name


def register(model_uri: str, name: str, alias: str | None = None, tags: dict | None = None) -> ModelRef:
    """Register ``model_uri`` (a logged model or ``runs:/`` URI) as a new version of ``name``.

    ``alias`` (e.g. ``"prod"``) is moved to the new version. The sha256 sums that
    :func:`jobs.flavor.log_model` recorded on a logged model (``models:/m-...``) become tags of
    the version; without them (a ``runs:/`` URI, a model logged before sums were
    recorded) the version is registered with a warning, and its files are later
    checked against their own ``SHA256SUMS`` only. Returns its :class:`ModelRef`.
    """
    import mlflow

    check_name(name, "register: name")
    if alias is not None and (not isinstance(alias, str) or not alias or "/" in alias or "@" in alias):
        raise ValueError(f"register: alias must be a non-empty string without '/' or '@', got {alias!r}")
    client = mlflow.MlflowClient()
    sums = _sums_of_tags(_logged_model(client, model_uri, "tags"))
    if not sums:
        log.warning("register: %s records no sha256 of its files (not logged by log_model?); version of %r "
                    "is registered without them", model_uri, name)
    mv = mlflow.register_model(model_uri, name, tags={**(tags or {}), **sha256_tags(sums)})
    if alias is not None:
        client.set_registered_model_alias(name, alias, mv.version)
    log.info("registered %s as %s version %s%s", model_uri, name, mv.version, f" (@{alias})" if alias else "")
    return ModelRef(
        name=name,
        version=str(mv.version),
        uri=f"models:/{name}/{mv.version}",
        run_id=mv.run_id or None,
        aliases=(alias,) if alias else (),
        sha256=sums,
    )


# --------------------------------------------------------------------------- lookups


def _is_not_found(exc: Exception) -> bool:
    return "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc).lower()


def _model_names(client) -> list[str]:
    return sorted(m.name for m in client.search_registered_models(max_results=1000))


def _registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if not _is_not_found(exc):
            raise
        names = _model_names(client)
        listing = ", ".join(names) if names else "none (register one with `ptsne train --register NAME`)"
        raise ModelNotFoundError(f"unknown model {name!r}; registered models: {listing}") from None


def _versions(client, name: str) -> list:
    versions = client.search_model_versions(_filter_literal("name", name), max_results=10000)
    return sorted(versions, key=lambda v: int(v.version))


def _version_listing(client, name: str, rm) -> str:
    versions = [str(v.version) for v in _versions(client, name)]
    aliases = ", ".join(f"@{a} -> {v}" for a, v in sorted(_aliases(rm).items())) or "none"
    return f"versions: {', '.join(versions) or 'none'}; aliases: {aliases}"


def _aliases(rm) -> dict[str, str]:
    raw = getattr(rm, "aliases", None) or {}
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    return {str(a.alias): str(a.version) for a in raw}


def parse_model_uri(uri: str) -> tuple[str, dict]:
    """Classify a model URI: ``("alias", {name, alias})``, ``("version", {name, version})``,
    ``("latest", {name})``, ``("run", {run_id, path})`` or ``("dir", {path})``."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"model URI must be a non-empty string, got {uri!r}")
    uri = uri.strip()
    m = _RUNS.match(uri)
    if m:
        return "run", {"run_id": m["run"], "path": m["path"].strip("/")}
    if uri.startswith("models:/"):
        rest = uri[len("models:/") :].strip("/")
    elif os.path.isdir(uri):
        return "dir", {"path": uri}
    else:
        rest = uri
    if (m := _ALIAS.match(rest)) is not None:
        return "alias", {"name": m["name"], "alias": m["alias"]}
    if (m := _VERSION.match(rest)) is not None:
        if m["version"] == "latest":
            return "latest", {"name": m["name"]}
        return "version", {"name": m["name"], "version": m["version"]}
    if rest and "/" not in rest and "@" not in rest and "://" not in uri:
        return "latest", {"name": rest}
    raise ValueError(
        f"model URI {uri!r} is not understood; use models:/NAME@ALIAS, models:/NAME/VERSION, "
        "NAME/VERSION, NAME@ALIAS, runs:/RUN_ID/PATH or a local model directory"
    )


def lookup(uri: str) -> ModelRef:
    """Resolve ``uri`` to a concrete version without downloading anything."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from ptsne.digest import recorded_sha256
    from ptsne.estimator import WEIGHTS_FILE

    kind, parts = parse_model_uri(uri)
    if kind == "dir":
        path = Path(parts["path"]).resolve()
        return ModelRef(name=path.name, version="local", uri=str(path), path=path,
                        weights_sha256=recorded_sha256(_estimator_dir(path), WEIGHTS_FILE))
    client = mlflow.MlflowClient()
    if kind == "run":
        run_id, path = parts["run_id"], parts["path"]
        try:
            client.get_run(run_id)
        except MlflowException as exc:
            if not _is_not_found(exc):
                raise
            raise ModelNotFoundError(f"unknown run {run_id!r} in {mlflow.get_tracking_uri()}") from None
        return ModelRef(name=path, version=run_id, uri=f"runs:/{run_id}/{path}", run_id=run_id)
    name = parts["name"]
    rm = _registered_model(client, name)
    aliases = _aliases(rm)
    if kind == "alias":
        alias = parts["alias"]
        if alias not in aliases:
            raise ModelNotFoundError(
                f"model {name!r} has no alias {alias!r}; {_version_listing(client, name, rm)}"
            )
        version = aliases[alias]
    elif kind == "latest":
        versions = _versions(client, name)
        if not versions:
            raise ModelNotFoundError(f"model {name!r} has no versions yet")
        version = str(versions[-1].version)
    else:
        version = parts["version"]
    try:
        mv = client.get_model_version(name, version)
    except MlflowException as exc:
        if not _is_not_found(exc):
            raise
        raise ModelNotFoundError(
            f"model {name!r} has no version {version}; {_version_listing(client, name, rm)}"
        ) from None
    return ModelRef(
        name=name,
        version=str(mv.version),
        uri=f"models:/{name}/{mv.version}",
        run_id=mv.run_id or None,
        aliases=tuple(sorted(a for a, v in aliases.items() if v == str(mv.version))),
        sha256=_sums_of_tags(mv.tags),
        weights_sha256=_sums_of_tags(mv.tags).get(WEIGHTS_FILE),
    )


def _estimator_dir(model_dir: Path) -> Path:
    """The ``ParametricTSNE.save`` directory inside a downloaded MLflow model (or itself)."""
    from ptsne.estimator import CONFIG_FILE

    if (model_dir / CONFIG_FILE).is_file():
        return model_dir
    if (model_dir / "MLmodel").is_file():
        from mlflow.models import Model

        flavor = Model.load(str(model_dir / "MLmodel")).flavors.get("python_function", {})
        data = flavor.get("data")
        if data and (model_dir / data / CONFIG_FILE).is_file():
            return model_dir / data
    raise ModelNotFoundError(
        f"{str(model_dir)!r} is not a ptsne model: no {CONFIG_FILE}, and no pyfunc 'data' "
        "directory holding one (was it logged with jobs.flavor.log_model?)"
    )


def _run_models(run_id: str) -> list[str]:
    """Names of the models logged by a run (MLflow 3 logged models, then plain artifacts)."""
    import mlflow

    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    names = []
    try:
        found = client.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=_filter_literal("source_run_id", run_id)
        )
        names = [m.name for m in found]
    except Exception:  # older servers without logged-model search
        log.debug("search_logged_models failed", exc_info=True)
    names += [a.path for a in client.list_artifacts(run_id) if a.is_dir]
    return sorted(set(names))


def download(ref: ModelRef, dst: str | os.PathLike | None = None) -> Path:
    """Download ``ref``'s model into ``dst`` (default a new temp dir); return the estimator dir.

    A registered version's files are checked against the sha256 sums in its tags
    (``ptsne.errors.DigestMismatchError`` naming the file on a mismatch); a version
    without them is left to ``ParametricTSNE.load``'s check of ``SHA256SUMS``.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    if ref.version == "local" and ref.path is not None:
        return _estimator_dir(Path(ref.path))
    # MLflow draws one progress bar per file otherwise; keep logs readable.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="ptsne-model-"))
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=str(dst))
    except MlflowException as exc:
        if ref.run_id and not ref.is_registered:
            names = _run_models(ref.run_id)
            raise ModelNotFoundError(
                f"run {ref.run_id} has no model at {ref.name!r}; its models: {names or 'none'}"
            ) from exc
        raise
    path = _estimator_dir(Path(local))
    if ref.sha256:
        from ptsne import digest
        from ptsne.estimator import CONFIG_FILE, WEIGHTS_FILE

        digest.verify(path, (CONFIG_FILE, WEIGHTS_FILE), ref.sha256, source=f"the tags of {ref.uri}")
    elif ref.is_registered:
        log.warning("%s records no sha256 of its files (registered before they were recorded); only the "
                    "model's own SHA256SUMS is checked", ref.uri)
    return path


def resolve_model(uri: str, dst: str | os.PathLike | None = None, device: str = "cpu"):
    """Find, download and load the model named by ``uri``.

    Parameters
    ----------
    uri : str
        ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``NAME/VERSION``,
        ``NAME@ALIAS``, ``NAME`` (latest), ``runs:/RUN_ID/PATH`` or a local directory.
    dst : path, optional
        Where to download it (default a new temp dir, left to the caller).
    device : str
        Torch device of the loaded estimator.

    Returns
    -------
    (ParametricTSNE, ModelRef)
        ``ModelRef.path`` is the local ``ParametricTSNE.save`` directory.

    Raises
    ------
    ModelNotFoundError
        Unknown model, alias, version or run; the message lists what exists.
    ptsne.errors.ModelFileError
        A model file that is missing, corrupt or fails its sha256 check (the
        message names it).
    ValueError
        A URI in none of the forms above.
    """
    from ptsne.estimator import ParametricTSNE

    from ptsne.digest import recorded_sha256
    from ptsne.estimator import WEIGHTS_FILE

    ref = lookup(uri)
    path = download(ref, dst)
    estimator = ParametricTSNE.load(path, device=device)
    return estimator, dataclasses.replace(ref, path=path, weights_sha256=recorded_sha256(path, WEIGHTS_FILE))


def _iso(ms: int | None) -> str | None:
    if not ms:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")


def list_models() -> list[dict]:
    """Registered models: ``name``, ``latest_version``, ``n_versions``, ``aliases``, ``updated``, ``description``."""
    import mlflow

    client = mlflow.MlflowClient()
    out = []
    for rm in sorted(client.search_registered_models(max_results=1000), key=lambda m: m.name):
        versions = _versions(client, rm.name)
        out.append(
            {
                "name": rm.name,
                "latest_version": str(versions[-1].version) if versions else None,
                "n_versions": len(versions),
                "aliases": _aliases(rm),
                "updated": _iso(rm.last_updated_timestamp),
                "description": rm.description or "",
            }
        )
    return out


def _logged_model(client, source: str | None, what: str) -> dict[str, str]:
    """``params`` or ``tags`` of the logged model ``source`` (``models:/m-...``), or {}."""
    if not source or not source.startswith("models:/m-"):
        return {}
    try:
        return dict(getattr(client.get_logged_model(source[len("models:/") :].strip("/")), what) or {})
    except Exception:  # a store without logged models, or the model is gone
        log.debug("no logged model for %s", source, exc_info=True)
        return {}


def describe_model(name: str) -> dict:
    """One registered model with each version's aliases, source run, status and quality metrics.

    Metrics are those of the version's source run (``knn_accuracy``,
    ``trustworthiness``, ... as logged by training) merged with metrics logged
    on the model itself. ``reference_points`` and ``reference_bytes`` are
    those :func:`log_model` recorded (0 for a network-only model, None when the
    version was logged without them).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    rm = _registered_model(client, name)
    aliases = _aliases(rm)
    versions = []
    for mv in _versions(client, name):
        metrics: dict[str, float] = {}
        run_name = None
        if mv.run_id:
            try:
                run = client.get_run(mv.run_id)
                metrics.update(run.data.metrics)
                run_name = run.info.run_name
            except MlflowException:
                log.warning("model %s version %s: source run %s is gone", name, mv.version, mv.run_id)
        for m in getattr(mv, "metrics", None) or []:
            metrics.setdefault(m.key, m.value)
        params = _logged_model(client, mv.source, "params")
        facts = {k: int(params[k]) if str(params.get(k, "")).isdigit() else None
                 for k in ("reference_points", "reference_bytes")}
        versions.append(
            {
                "version": str(mv.version),
                "aliases": sorted(a for a, v in aliases.items() if v == str(mv.version)),
                "run_id": mv.run_id or None,
                "run_name": run_name,
                "status": mv.status,
                "created": _iso(mv.creation_timestamp),
                "source": mv.source,
                "tags": dict(mv.tags or {}),
                **facts,
                "metrics": dict(sorted(metrics.items())),
            }
        )
    return {
        "name": rm.name,
        "description": rm.description or "",
        "aliases": aliases,
        "created": _iso(rm.creation_timestamp),
        "updated": _iso(rm.last_updated_timestamp),
        "versions": versions,
    }
