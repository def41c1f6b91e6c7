"""``ParametricTSNE``: the estimator that wires kNN -> affinities -> training -> transform."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from sklearn.base import BaseEstimator
from torch import nn

from ptsne import digest
from ptsne.affinity import Edges, as_perplexities, default_k, joint_probabilities
from ptsne.device import current_gpu, default_num_threads, resolve_device, set_num_threads
from ptsne.errors import ModelFileError, NotFittedError
from ptsne.knn import KNNConfig, KNNGraph, knn_graph, resolve_knn_device
from ptsne.model import Mapper, ModelConfig, build_mapper
from ptsne.pca import PCA
from ptsne.reference import (
    METHODS,
    Reference,
    ReferenceConfig,
    best_scale,
    check_size,
    fold_similarity,
    optimize_map,
    similarity_fit,
)
from ptsne.settings import public_name, settings_of
from ptsne.train import Callback, TrainConfig, default_epochs, fit_mapper
from ptsne.transform import check_batch_size
from ptsne.transform import transform as batched_transform
from ptsne.validation import check_array

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


#: The one estimator parameter named otherwise than its setting: scikit-learn's name of the seed.
_RENAMED = {"seed": "random_state"}


def param_name(f: dataclasses.Field) -> str:
    """The :class:`ParametricTSNE` parameter of setting ``f`` of a core config."""
    name = public_name(f)
    return _RENAMED.get(name, name)


def params_of(*configs) -> dict:
    """The :class:`ParametricTSNE` parameters that the settings of ``configs`` give
    (any of :class:`TrainConfig`, :class:`ModelConfig`, :class:`ReferenceConfig`)."""
    return {param_name(f): getattr(c, f.name) for c in configs for f in settings_of(type(c))}


class ParametricTSNE(BaseEstimator):
    """Parametric t-SNE: learns a network that maps vectors to a 2-D/3-D t-SNE map.

    Parameters
    ----------
    n_components : int
        Embedding dimension.
    perplexity : float or list of float
        Effective neighbourhood size; a list averages the affinities of each
        perplexity (multiscale).
    dof : float
        Degrees of freedom ``alpha`` of the Student-t output kernel (1 is t-SNE).
    hidden_layers : sequence of int
        Hidden widths of the default MLP (``ptsne.model.LEGACY_HIDDEN`` gives the
        original [500, 500, 2000] network).
    activation : str
        Hidden activation of the default MLP.
    layer_norm : bool
        A LayerNorm after each hidden linear layer of the default MLP.
    model : torch.nn.Module, optional
        A network of your own from ``n_features`` (after PCA) to ``n_components``;
        replaces the default MLP (inputs are standardised before it).
    n_epochs : int or "auto"
        Passes over the points; ``"auto"`` aims at about 2400 steps within 10 to 60
        epochs (21 for 60k points, 10 from about 125k points on), and more epochs for small
        datasets so that training takes at least 2000 steps
        (:func:`ptsne.train.default_epochs`).
    batch_size, learning_rate, early_exaggeration, early_exaggeration_fraction,
    exaggeration, weight_decay, positives_per_anchor :
        Optimisation, see :class:`ptsne.train.TrainConfig`.
    n_neighbors : int or "auto"
        Neighbours per point; ``"auto"`` is ``min(n - 1, 3 * max(perplexity))``.
    knn_method : {"auto", "exact", "ivf"}
        kNN search, see :mod:`ptsne.knn`.
    pca_components : int, optional
        Fit a PCA to this many dimensions inside ``fit`` and apply it in ``transform``.
    reference_size : int
        The model keeps up to this many training points (a uniform sample beyond
        it) as a *reference*: their coordinates optimised to t-SNE's own objective
        on the same P, starting from the network's map, and the network turned to
        the same frame. ``transform`` then places new points on that map at
        t-SNE quality (:mod:`ptsne.reference`); 0 keeps a network-only model.
    reference_iter : int or "auto"
        Most gradient-descent iterations of the reference map's first phase (it stops
        earlier once converged); ``"auto"`` grows with the number of reference points
        (:func:`ptsne.reference.default_iterations`).
    random_state : int, optional
        Seed (``TrainConfig.seed``; None draws one); with a seed, CPU training is deterministic.
    device : {"auto", "cpu", "cuda"}
        ``"auto"`` takes a GPU when one is visible; its kNN search then runs on
        CPU when FAISS is a CPU build (with a warning, see
        :func:`ptsne.knn.resolve_knn_device`). :meth:`load` ignores it and loads
        onto the device it is given (CPU by default).
    precision : {"auto", "float32", "bfloat16"}
        Arithmetic of the training forward pass. ``"auto"`` trains the default MLP
        with bfloat16 autocast where the device has bfloat16 in hardware (recent
        x86 CPUs, CUDA GPUs) and a custom ``model`` in float32; the output layer,
        the loss and ``transform`` are always float32. The environment variable
        ``PTSNE_PRECISION=float32`` (or ``bfloat16``) overrides what ``"auto"``
        picks (:func:`ptsne.device.resolve_precision`).
    n_threads : int, optional
        Threads for torch and FAISS on CPU; ``None`` keeps the current settings.
    verbose : bool
        Progress bars and info logging of each stage.

    Attributes
    ----------
    model_ : torch.nn.Module
        The trained mapper (standardisation + network).
    embedding_ : ndarray, float32 (n, n_components)
        The training points' embedding: the reference map when the model has one
        (training points beyond the reference sample placed on it), else the
        network's map.
    reference_ : Reference or None
        The reference points and their map (see ``reference_size``).
    history_ : list of dict
        Per-epoch training metrics.
    n_features_in_ : int
        Input dimension seen in ``fit``.
    n_neighbors_ : int
        Neighbours per point used for P.
    timings_ : dict
        Seconds spent in each stage of ``fit``.
    """

    def __init__(
        self,
        n_components: int = ModelConfig.n_components,
        perplexity: float | Sequence[float] = 30.0,
        dof: float = TrainConfig.dof,
        hidden_layers: Sequence[int] = ModelConfig.hidden_layers,
        activation: str = ModelConfig.activation,
        layer_norm: bool = ModelConfig.layer_norm,
        model: nn.Module | None = None,
        n_epochs: int | str = "auto",
        batch_size: int = TrainConfig.batch_size,
        learning_rate: float = TrainConfig.learning_rate,
        early_exaggeration: float = TrainConfig.early_exaggeration,
        early_exaggeration_fraction: float = TrainConfig.early_exaggeration_fraction,
        exaggeration: float = TrainConfig.exaggeration,
        weight_decay: float = TrainConfig.weight_decay,
        positives_per_anchor: int = TrainConfig.positives_per_anchor,
        n_neighbors: int | str = "auto",
        knn_method: str = "auto",
        pca_components: int | None = None,
        reference_size: int = ReferenceConfig.size,
        reference_iter: int | str = ReferenceConfig.n_iter,
        random_state: int | None = None,
        device: str = "auto",
        precision: str = TrainConfig.precision,
        n_threads: int | None = None,
        verbose: bool = False,
    ):
        self.n_components = n_components
        self.perplexity = perplexity
        self.dof = dof
        self.hidden_layers = hidden_layers
        self.activation = activation
        self.layer_norm = layer_norm
        self.model = model
        self.n_epochs = n_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.early_exaggeration = early_exaggeration
        self.early_exaggeration_fraction = early_exaggeration_fraction
        self.exaggeration = exaggeration
        self.weight_decay = weight_decay
        self.positives_per_anchor = positives_per_anchor
        self.n_neighbors = n_neighbors
        self.knn_method = knn_method
        self.pca_components = pca_components
        self.reference_size = reference_size
        self.reference_iter = reference_iter
        self.random_state = random_state
        self.device = device
        self.precision = precision
        self.n_threads = n_threads
        self.verbose = verbose

    # -- configuration -------------------------------------------------------------

    def set_params(self, **params) -> ParametricTSNE:
        """Set constructor arguments (scikit-learn's ``set_params``, with our message for an unknown name)."""
        valid = self._get_param_names()
        for name in params:
            if name not in valid:
                raise ValueError(f"ParametricTSNE: unknown parameter {name!r}; valid: {tuple(valid)}")
        return super().set_params(**params)

    def _config(self, cls: type, **resolved):
        """Core config ``cls`` from the parameters of its settings (:func:`param_name`), ``resolved`` replacing some."""
        values = {f.name: getattr(self, param_name(f)) for f in settings_of(cls)}
        # NumPy scalars as Python numbers: the configs are written to JSON.
        values = {k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()}
        return cls(**{**values, **resolved})

    def _train_config(self, n: int) -> TrainConfig:
        n_epochs = self.n_epochs
        if n_epochs == "auto":
            batch = self.batch_size if isinstance(self.batch_size, (int, np.integer)) else 1
            n_epochs = default_epochs(n, max(1, int(batch)))
        return self._config(
            TrainConfig,
            n_epochs=n_epochs,
            seed=self._seed(),
            # A network of the user's own may hold layers that are unsafe in bfloat16.
            precision="float32" if self.precision == "auto" and self.model is not None else self.precision,
        )

    def _seed(self) -> int:
        if self.random_state is None:
            return int(np.random.SeedSequence().entropy % (2**31))
        if isinstance(self.random_state, bool) or not isinstance(self.random_state, (int, np.integer)):
            raise TypeError(f"ParametricTSNE: random_state must be an int or None, got {self.random_state!r}")
        return int(self.random_state)

    def _resolve_k(self, n: int) -> int:
        if self.n_neighbors == "auto":
            return default_k(self.perplexity, n)
        k = self.n_neighbors
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < n:
            raise ValueError(
                f"ParametricTSNE: n_neighbors must be 'auto' or an integer in [1, {n - 1}], got {k!r}"
            )
        if k < max(as_perplexities(self.perplexity)):
            raise ValueError(
                f"ParametricTSNE: n_neighbors={k} is below perplexity={self.perplexity}; "
                "use n_neighbors >= 3 * perplexity"
            )
        return int(k)

    def _validate(self, n: int) -> None:
        perplexities = as_perplexities(self.perplexity)
        if n <= 3 * max(perplexities):
            raise ValueError(
                f"ParametricTSNE: perplexity={self.perplexity} needs more than 3 * perplexity = "
                f"{3 * max(perplexities):g} points, got n={n}; lower the perplexity or add data"
            )
        if self.pca_components is not None:
            p = self.pca_components
            if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 1:
                raise ValueError(
                    f"ParametricTSNE: pca_components must be a positive integer or None, got {p!r}"
                )
        if self.model is not None and not isinstance(self.model, nn.Module):
            raise TypeError(
                f"ParametricTSNE: model must be a torch.nn.Module or None, got {type(self.model).__name__}"
            )
        resolve_device(self.device)
        check_size(self._reference_config(), "ParametricTSNE")

    def _reference_config(self) -> ReferenceConfig:
        return self._config(ReferenceConfig)

    # -- fitting ---------------------------------------------------------------------

    def fit(self, X: np.ndarray, y=None, callbacks: Sequence[Callback] = ()) -> ParametricTSNE:
        """Learn the mapper from ``X`` (n, n_features). ``y`` is ignored.

        ``callbacks`` are called after each epoch with ``(epoch, metrics)``; one
        that returns True stops training early.
        """
        X = check_array(X, "X")
        n, dim = X.shape
        self._validate(n)
        train_config = self._train_config(n)  # validates the optimisation settings early
        k = self._resolve_k(n)
        device = resolve_device(self.device)
        search_on = resolve_knn_device(knn_device(self.device, device), k)  # before PCA: k may not fit a GPU
        if self.n_threads is not None:
            set_num_threads(self.n_threads)
        timings = {}

        t = time.perf_counter()
        self.pca_ = None
        if self.pca_components is not None:
            if self.pca_components > dim:
                raise ValueError(
                    f"ParametricTSNE: pca_components={self.pca_components} exceeds the "
                    f"number of features {dim}"
                )
            self.pca_ = PCA(self.pca_components, random_state=train_config.seed).fit(X)
            Z = self.pca_.transform(X)
        else:
            Z = X
        timings["pca"] = time.perf_counter() - t

        t = time.perf_counter()
        graph = self._knn_graph(Z, k, device, search_on, train_config.seed)
        timings["knn"] = time.perf_counter() - t
        t = time.perf_counter()
        edges = joint_probabilities(graph, self.perplexity)
        del graph
        timings["affinity"] = time.perf_counter() - t

        t = time.perf_counter()
        self.model_ = self._build_model(Z.shape[1], train_config.seed)
        self.model_.standardize.fit(Z)
        self.history_ = fit_mapper(
            self.model_, Z, edges, train_config, device, callbacks, self.verbose
        )
        timings["train"] = time.perf_counter() - t
        self.n_features_in_ = dim
        self.n_neighbors_ = k
        self.device_ = device
        t = time.perf_counter()
        self.embedding_ = self._forward(Z)
        timings["embed"] = time.perf_counter() - t
        self.reference_ = None
        if self.reference_size > 0:
            t = time.perf_counter()
            self.reference_, self.embedding_ = self._fit_reference(Z, edges, train_config.seed)
            timings["reference"] = time.perf_counter() - t
        self.timings_ = timings
        if self.verbose:
            log.info("fit: %s", {k: round(v, 2) for k, v in timings.items()})
        return self

    def _fit_reference(self, Z: np.ndarray, edges: Edges, seed: int) -> tuple[Reference, np.ndarray]:
        """The reference map of (a sample of) the training points, and the training embedding."""
        n = len(Z)
        if n <= self.reference_size:
            self.fit_reference(Z, edges, random_state=seed)
            return self.reference_, self.reference_.embedding
        ids = np.sort(np.random.default_rng(seed).choice(n, self.reference_size, replace=False))
        self.fit_reference(Z[ids], random_state=seed)
        embedding = self.reference_.place(Z, self._forward(Z))
        embedding[ids] = self.reference_.embedding
        return self.reference_, embedding

    def fit_reference(
        self, Z: np.ndarray, edges: Edges | None = None, random_state: int | None = None
    ) -> ParametricTSNE:
        """Give a fitted network a reference: ``Z`` with coordinates optimised to t-SNE's objective.

        ``Z`` are points in the network's input space (after the PCA, if any), e.g. the
        training points or a sample of them; ``edges`` their joint P (computed with the
        estimator's perplexity when not given). The map starts from the network's and
        the network is then turned, scaled and shifted onto it, so both modes share one
        frame. ``fit`` calls this; ``pipeline.train`` calls it on one node after
        distributed training.
        """
        self._check_fitted()
        config = self._reference_config()
        Z = check_array(Z, "Z", n_features=int(self.model_.standardize.mean.shape[0]))
        seed = self._seed() if random_state is None else int(random_state)
        if edges is None:
            k = min(int(self.n_neighbors_), len(Z) - 1)
            graph = self._knn_graph(Z, k, self.device_, knn_device(self.device, self.device_), seed)
            edges = joint_probabilities(graph, self.perplexity)
        init = self._forward(Z)
        threads = self.n_threads or default_num_threads()
        scale = best_scale(edges, init, self.dof, random_state=seed)
        Yr = optimize_map(edges, scale * init, config, self.dof, threads, seed, self.verbose)
        A, shift = similarity_fit(init, Yr)
        if not fold_similarity(self.model_.net, A, shift):
            log.warning("reference: the network does not end in a linear layer; its map keeps its own frame")
        self.reference_ = Reference(Z, Yr, dof=self.dof, config=config).prepare()
        return self

    def _knn_graph(self, Z: np.ndarray, k: int, device: torch.device, search_on: str, seed: int) -> KNNGraph:
        """The kNN graph of ``Z`` searched on ``search_on``, on the GPU of ``device`` (the network's) when it is one."""
        with current_gpu(device):  # a cuda:N model searches on GPU N, not on the current GPU
            return knn_graph(Z, KNNConfig(n_neighbors=k, method=self.knn_method, device=search_on, seed=seed))

    def _build_model(self, n_inputs: int, seed: int) -> Mapper:
        torch.manual_seed(seed)
        if self.model is not None:
            return build_mapper(ModelConfig(n_inputs, self.n_components), net=self.model)
        return build_mapper(self._model_config(n_inputs))

    def _model_config(self, n_inputs: int) -> ModelConfig:
        return self._config(ModelConfig, n_inputs=n_inputs)

    def fit_transform(self, X: np.ndarray, y=None, callbacks: Sequence[Callback] = ()) -> np.ndarray:
        """``fit(X)`` and return the training embedding, float32 (n, n_components)."""
        return self.fit(X, callbacks=callbacks).embedding_

    # -- inference -------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise NotFittedError(
                "This ParametricTSNE instance is not fitted yet; call fit(X) or load(path) first"
            )

    def transform(self, X: np.ndarray, batch_size: int | None = None, method: str = "auto") -> np.ndarray:
        """Embed new points: float32 ``(m, n_components)``.

        ``method="network"`` is one forward pass of the network; ``"refine"`` starts
        each point there and optimises it against the reference map (see
        :mod:`ptsne.reference`; a training point lands on its reference coordinate);
        ``"auto"`` is ``"refine"`` when the model has a reference, else ``"network"``.
        Each row is mapped independently, so a batch gives the same result as its rows
        one by one; ``batch_size`` rows go through the network at a time (default: 2048
        on CPU, 65536 on GPU, see :data:`ptsne.transform.DEFAULT_BATCH`).
        """
        self._check_fitted()
        method = self._resolve_method(method)
        X = check_array(X, "X", n_features=self.n_features_in_)
        if batch_size is not None:  # checked here too: the default placement runs no network pass
            check_batch_size(batch_size, "ParametricTSNE.transform")
        Z = self.pca_.transform(X) if self.pca_ is not None else X
        if method == "network":
            return self._forward(Z, batch_size)
        # The median start needs no network pass; the "network" start does.
        start = self._forward(Z, batch_size) if self.reference_.config.transform_init == "network" else None
        return self.reference_.place(Z, start)

    def _resolve_method(self, method: str) -> str:
        if method not in METHODS:
            raise ValueError(f"ParametricTSNE.transform: method must be one of {METHODS}, got {method!r}")
        reference = getattr(self, "reference_", None)
        if method == "refine" and reference is None:
            raise ValueError(
                "ParametricTSNE.transform: method='refine' needs a model with a reference "
                "(fit with reference_size > 0); this one has none, use method='network'"
            )
        if method == "auto":
            return "refine" if reference is not None else "network"
        return method

    def _forward(self, Z: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        return batched_transform(self.model_, Z, batch_size=batch_size, device=self.device_)

    # -- persistence -----------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted mapper to directory ``path`` (``config.json`` + safetensors weights).

        ``SHA256SUMS`` beside them records both files' sha256 (:mod:`ptsne.digest`),
        which :meth:`load` checks.

        The directory is written under a temporary name and renamed into place, so
        an interrupted save never leaves a half-written model. An existing ``path``
        is replaced only when it is a saved model itself; any other file or
        directory there is left alone (``FileExistsError``).
        """
        self._check_fitted()
        path = Path(path)
        _check_replaceable(path)
        params = self.get_params()
        params.pop("model")
        config = {
            "format_version": FORMAT_VERSION,
            "params": _jsonable(params),
            "custom_model": self.model is not None,
            "n_features_in": int(self.n_features_in_),
            "n_inputs": int(self.model_.standardize.mean.shape[0]),
            "n_neighbors": int(self.n_neighbors_),
        }
        tensors = {f"mapper.{k}": v.detach().cpu().contiguous() for k, v in self.model_.state_dict().items()}
        if self.pca_ is not None:
            tensors.update({f"pca.{k}": torch.from_numpy(v) for k, v in self.pca_.state().items()})
        reference = getattr(self, "reference_", None)
        if reference is not None:
            config["reference"] = {"dof": reference.dof, "config": dataclasses.asdict(reference.config),
                                   "size": len(reference)}
            tensors["reference.vectors"] = torch.from_numpy(reference.vectors)
            tensors["reference.embedding"] = torch.from_numpy(reference.embedding)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
            save_file(tensors, str(tmp / WEIGHTS_FILE))
            digest.write(tmp, (CONFIG_FILE, WEIGHTS_FILE))
            _share_like_umask(tmp)
            _replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: nn.Module | None = None, device: str = "cpu"
    ) -> ParametricTSNE:
        """Load a mapper written by :meth:`save`.

        The mapper goes onto ``device``: CPU unless another is asked for (``"cuda"``,
        ``"auto"``), whatever device it was trained on, so that a model loads and
        transforms the same way on every host; the loaded estimator's ``device``
        parameter is that device.

        ``model`` must be given (an untrained instance of the same network) when the
        mapper was trained with a custom ``model``; weights are read with safetensors,
        never unpickled. The files are first checked against the sha256 sums ``save``
        recorded (a model saved before sums were recorded loads with a warning), then
        for what they must hold: a config that parses, weights whose names and shapes
        fit it and ``n_features_in``, and finite values.

        Raises
        ------
        FileNotFoundError
            ``path`` holds no ``config.json``.
        ptsne.errors.ModelFileError
            A file that is missing, corrupt or does not fit the rest of the model
            (:class:`~ptsne.errors.DigestMismatchError` for a wrong sha256); the
            message starts with the file's path.
        """
        path = Path(path)
        config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not config_file.is_file():
            raise FileNotFoundError(f"ParametricTSNE.load: no {CONFIG_FILE} in {str(path)!r}")
        digest.verify(path, (CONFIG_FILE, WEIGHTS_FILE))
        config = _read_config(config_file)
        if config["custom_model"] and model is None:
            raise ValueError(
                f"ParametricTSNE.load: {str(path)!r} holds a custom network; pass model= "
                "an instance of the same architecture"
            )
        params = dict(config["params"])
        params["device"] = device
        try:
            est = cls(**params, model=model)
            # On the meta device: the shapes the config describes, without allocating them.
            with torch.device("meta"):
                wanted = {k: tuple(v.shape) for k, v in est._build_model(config["n_inputs"], 0).state_dict().items()}
        except (TypeError, ValueError) as exc:
            raise ModelFileError(config_file, f"its params do not describe a ParametricTSNE network ({exc})") from None
        _check_shapes(wanted, _read_shapes(weights_file), config_file)
        mapper = est._build_model(config["n_inputs"], 0)
        tensors = _read_weights(weights_file)
        try:
            mapper.load_state_dict(
                {k[len("mapper.") :]: v for k, v in tensors.items() if k.startswith("mapper.")}
            )
        except RuntimeError as exc:
            raise ModelFileError(
                weights_file, f"the mapper's weights do not fit the network of {CONFIG_FILE}: {_one_line(exc)}"
            ) from None
        pca_state = {k[len("pca.") :]: v.numpy() for k, v in tensors.items() if k.startswith("pca.")}
        est.pca_ = _read_pca(pca_state, config, config_file, weights_file)
        est.device_ = resolve_device(device)
        est.model_ = mapper.to(est.device_).eval()
        est.n_features_in_ = config["n_features_in"]
        est.n_neighbors_ = config["n_neighbors"]
        est.reference_ = _read_reference(tensors, config, config_file, weights_file) if "reference" in config else None
        return est

    @classmethod
    def from_mapper(
        cls,
        mapper: Mapper,
        n_features_in: int,
        n_neighbors: int,
        pca: PCA | None = None,
        reference: Reference | None = None,
        **params,
    ) -> ParametricTSNE:
        """A fitted estimator around a mapper trained elsewhere (e.g. by ``pipeline.train``).

        ``params`` are the constructor arguments the mapper was trained with;
        ``pca`` is the projection applied before it, if any; ``reference`` a reference
        in the mapper's frame (or call :meth:`fit_reference` on the result).
        """
        est = cls(**params)
        est.model_ = mapper.eval()
        est.pca_ = pca
        est.reference_ = reference
        est.n_features_in_ = int(n_features_in)
        est.n_neighbors_ = int(n_neighbors)
        est.device_ = next(mapper.parameters()).device
        return est

    # The names of the original Keras package.
    def save_model(self, path: str | os.PathLike) -> Path:
        """Alias of :meth:`save`."""
        return self.save(path)

    def restore_model(self, path: str | os.PathLike, device: str = "cpu") -> ParametricTSNE:
        """Load a saved mapper into this instance (alias of :meth:`load`, onto CPU by default); returns self."""
        loaded = type(self).load(path, model=self.model, device=device)
        self.__dict__.update(loaded.__dict__)
        return self


def knn_device(asked: str | torch.device, resolved: torch.device) -> str:
    """The ``KNNConfig.device`` of an estimator asked for ``asked`` and running on ``resolved``.

    The search follows the device the network runs on, except that ``"auto"`` on a GPU
    stays ``"auto"``: it searches on the GPU with FAISS or, beside a CPU build of FAISS,
    exactly in torch (:func:`ptsne.knn.resolve_knn_device`), and on CPU when ``k`` is
    more than FAISS selects on a GPU.
    """
    if resolved.type != "cuda":
        return "cpu"
    return "auto" if isinstance(asked, str) and asked == "auto" else "cuda"


def _jsonable(params: dict) -> dict:
    out = {}
    for k, v in params.items():
        if isinstance(v, tuple):
            v = list(v)
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, list):
            v = [x.item() if isinstance(x, np.generic) else x for x in v]
        out[k] = v
    return out


MODEL_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, digest.SUMS_FILE})
#: Names of a directory's entries that a refusal to replace it shows.
_SHOWN_NAMES = 5

#: The keys of ``config.json`` besides ``params`` (and the optional ``reference``), each a
#: positive integer, except ``custom_model``.
_CONFIG_COUNTS = ("n_features_in", "n_inputs", "n_neighbors")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_config(file: Path) -> dict:
    """``config.json`` of a saved model, with the types ``load`` relies on checked."""
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelFileError(file, f"not readable JSON ({_one_line(exc)})") from None
    if not isinstance(config, dict):
        raise ModelFileError(file, f"must hold a JSON object, got {type(config).__name__}")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(file, f"format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    for key in _CONFIG_COUNTS:
        v = config.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ModelFileError(file, f"{key} must be a positive integer, got {v!r}")
    if not isinstance(config.get("params"), dict):
        raise ModelFileError(file, f"params must be a JSON object, got {config.get('params')!r}")
    if not isinstance(config.get("custom_model"), bool):
        raise ModelFileError(file, f"custom_model must be true or false, got {config.get('custom_model')!r}")
    if "reference" in config and not isinstance(config["reference"], dict):
        raise ModelFileError(file, f"reference must be a JSON object, got {config['reference']!r}")
    return config


def _read_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """The mapper's tensor shapes in ``model.safetensors``'s header, by name without ``mapper.``; nothing is loaded."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k[len("mapper."):]: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("mapper.")}
    except FileNotFoundError:
        raise ModelFileError(file, "missing: the model directory is incomplete") from None
    except (OSError, SafetensorError) as exc:
        raise ModelFileError(file, f"not a readable safetensors file ({_one_line(exc)})") from None


def _check_shapes(wanted: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], config_file: Path) -> None:
    """Refuse a config whose network differs from the weights file's, before that network is allocated.

    A config rewritten to describe a much larger network would otherwise be
    allocated first (``hidden_layers=[100000] * 3`` asks for tens of GB).
    """
    problems = [f"{k}: {wanted[k]} in {CONFIG_FILE}, {found[k]} in {WEIGHTS_FILE}"
                for k in sorted(wanted.keys() & found.keys()) if wanted[k] != found[k]]
    problems += [f"{k} missing from {WEIGHTS_FILE}" for k in sorted(wanted.keys() - found.keys())]
    problems += [f"{k} in {WEIGHTS_FILE} is not part of the network" for k in sorted(found.keys() - wanted.keys())]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ModelFileError(
            config_file, f"describes a network whose shapes differ from the weights of {WEIGHTS_FILE}: "
            + "; ".join(problems[:3]) + more
        )


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``, every floating-point one finite."""
    try:
        tensors = load_file(str(file))
    except FileNotFoundError:
        raise ModelFileError(file, "missing: the model directory is incomplete") from None
    except (OSError, SafetensorError) as exc:
        raise ModelFileError(file, f"not a readable safetensors file ({_one_line(exc)})") from None
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise ModelFileError(file, f"non-finite values (NaN or Inf) in {', '.join(bad[:5])}")
    return tensors


def _read_pca(state: dict, config: dict, config_file: Path, weights_file: Path) -> PCA | None:
    """The saved PCA, checked to map ``n_features_in`` inputs to the network's ``n_inputs``."""
    n_features, n_inputs = config["n_features_in"], config["n_inputs"]
    if not state:
        if n_inputs != n_features:
            raise ModelFileError(
                config_file, f"n_inputs={n_inputs} differs from n_features_in={n_features}, "
                f"and {WEIGHTS_FILE} holds no PCA to map one to the other"
            )
        return None
    if set(state) != {"mean", "components"}:
        raise ModelFileError(weights_file, f"the PCA needs pca.mean and pca.components, got {sorted(state)}")
    mean, components = state["mean"], state["components"]
    if mean.shape != (n_features,) or components.shape != (n_inputs, n_features):
        raise ModelFileError(
            weights_file, f"PCA mean {tuple(mean.shape)} and components {tuple(components.shape)} do not map "
            f"n_features_in={n_features} to n_inputs={n_inputs} of {CONFIG_FILE}"
        )
    return PCA.from_state(state)


def _read_reference(tensors: dict, config: dict, config_file: Path, weights_file: Path) -> Reference:
    """The saved reference, checked against the network's input and output dimensions."""
    try:
        vectors, embedding = tensors["reference.vectors"].numpy(), tensors["reference.embedding"].numpy()
    except KeyError as exc:
        raise ModelFileError(weights_file, f"{CONFIG_FILE} lists a reference, but {exc} is missing") from None
    n_components = config["params"].get("n_components")
    if vectors.ndim != 2 or vectors.shape[1] != config["n_inputs"] or embedding.ndim != 2 \
            or embedding.shape[1] != n_components or len(vectors) != len(embedding):
        raise ModelFileError(
            weights_file, f"reference vectors {tuple(vectors.shape)} and embedding {tuple(embedding.shape)} "
            f"do not fit n_inputs={config['n_inputs']} and n_components={n_components!r} of {CONFIG_FILE}"
        )
    ref = config["reference"]
    try:
        return Reference(vectors, embedding, dof=float(ref["dof"]), config=ReferenceConfig(**ref["config"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(config_file, f"its reference settings are not valid ({_one_line(exc)})") from None


def _is_saved_model(path: Path) -> bool:
    """Whether directory ``path`` holds a saved model and nothing else."""
    try:
        names = {p.name for p in path.iterdir()}
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return names <= MODEL_FILES and isinstance(config, dict) and "format_version" in config


def _check_replaceable(path: Path) -> None:
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise FileExistsError(
            f"ParametricTSNE.save: {str(path)!r} exists and is not a model directory; "
            "choose another path or remove it"
        )
    if path.is_dir() and not _is_saved_model(path):
        try:
            names = sorted(p.name for p in path.iterdir())
            held = ", ".join(repr(n) for n in names[:_SHOWN_NAMES]) or "nothing"
        except OSError as exc:
            names, held = [], f"entries that cannot be listed: {exc.strerror or exc}"
        if len(names) > _SHOWN_NAMES:
            held += f" and {len(names) - _SHOWN_NAMES} more"
        raise FileExistsError(
            f"ParametricTSNE.save: {str(path)!r} is not a saved model (it holds {held}; a saved model holds "
            f"only {', '.join(sorted(MODEL_FILES))}), so it is not replaced: choose another path"
        )


def _share_like_umask(directory: Path) -> None:
    """Give a temporary directory (0700) and its files the modes of ordinary new files."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move directory ``src`` to ``dst``, replacing a saved model at ``dst`` if there is one."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(old / dst.name, dst)  # put the previous model back
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)

