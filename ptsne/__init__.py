"""ptsne: parametric t-SNE in PyTorch, with FAISS kNN graphs.

The stages are modules of their own (``knn`` -> ``affinity`` -> ``train`` ->
``transform``; ``model``, ``loss``, ``metrics``); :class:`ParametricTSNE` wires
them together. Their settings are declared in ``configs``, which imports
neither torch nor FAISS. This package never imports ray or mlflow.

The names below are imported on first use, so that importing ``ptsne.configs``
or ``ptsne.settings`` (the command line does) loads neither torch nor FAISS.
"""

import importlib
import importlib.util

# The one FAISS build is an explicit choice at install time: say which, before anything needs it.
if importlib.util.find_spec("faiss") is None:
    raise ImportError(
        "ptsne needs FAISS, installed as one build: pip install 'ptsne[cpu]' (faiss-cpu) or, on a GPU node "
        "beside torch's CUDA build, pip install 'ptsne[gpu-cu12]' (CUDA 12) or 'ptsne[gpu-cu13]' (CUDA 13, "
        "Python 3.12); never two"
    )

#: Public name -> the module that defines it.
_EXPORTS = {
    "Edges": "ptsne.affinity",
    "joint_probabilities": "ptsne.affinity",
    "NotFittedError": "ptsne.errors",
    "ParametricTSNE": "ptsne.estimator",
    "KNNGraph": "ptsne.knn",
    "knn_graph": "ptsne.knn",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ptsne' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
