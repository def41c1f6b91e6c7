"""ptsne: parametric t-SNE in PyTorch, with FAISS kNN graphs.

The stages are modules of their own (``knn`` -> ``affinity`` -> ``train`` ->
``transform``; ``model``, ``loss``, ``metrics``); :class:`ParametricTSNE` wires
them together. This package never imports ray or mlflow.
"""

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
