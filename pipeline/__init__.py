"""pipeline: the stages of :mod:`ptsne` on Ray, for data that does not fit one process.

The same nouns as ``ptsne/``, each wrapped in Ray: ``knn`` (FAISS indexes in the
object store, searched by batch tasks), ``affinity`` (calibrated rows and the
distributed symmetrisation, written as an affinity directory read through
``affinity_dir``), ``train`` (Ray Train, DDP), ``embed`` (an actor pool over
Parquet shards, each exactly once). Around them: ``shards`` and ``schema`` (the
Parquet files), ``storage`` (one I/O layer for local paths and ``s3://`` alike),
``session`` (the one way to start or join Ray), ``pca`` and ``synth``.

Functions take typed configs and locations, never parsed command lines; this
package never imports mlflow (a test checks). ``docs/architecture.md`` maps
every module.
"""

import ptsne  # noqa: E402,F401  (first: it names the FAISS build to install when none is)
