"""ptsne: parametric t-SNE in PyTorch, with FAISS kNN graphs.

The stages are modules of their own (``knn`` -> ``affinity`` -> ``train`` ->
``transform``; ``model``, ``loss``, ``metrics``); :class:`ParametricTSNE` wires
them together. This package never imports ray or mlflow.
"""

try:
    import faiss  # noqa: F401
except ImportError as exc:  # the one FAISS build is an explicit choice at install time
    raise ImportError(
        "ptsne needs FAISS, installed as one build: pip install 'ptsne[cpu]' (faiss-cpu) or, on a GPU node "
        "beside torch's CUDA build, pip install 'ptsne[gpu-cu12]' (CUDA 12) or 'ptsne[gpu-cu13]' (CUDA 13, "
        "Python 3.12); never two"
    ) from exc

from ptsne.affinity import Edges, joint_probabilities
from ptsne.errors import NotFittedError
from ptsne.estimator import ParametricTSNE
from ptsne.knn import KNNGraph, knn_graph

__all__ = [
    "Edges",
    "KNNGraph",
    "NotFittedError",
    "ParametricTSNE",
    "joint_probabilities",
    "knn_graph",
]
__version__ = "0.1.0"
